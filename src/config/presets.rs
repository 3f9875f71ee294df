//! VRAM-tier presets: YAML fragments under `presets/` that a config names with
//! `preset:`. The project's own presets are built into the binary; a
//! `presets/<name>.yaml` beside the config (or in the working directory) wins.
//! Each preset is made for a model family: the plain tiers (`12gb`) for SD
//! 1.x/2.x at 512–768, the `sdxl-` tiers for SDXL at 1024, `cpu` for any.

use std::path::Path;

use serde_yaml::Value;

use crate::error::usage;
use crate::model::family::Architecture;

/// (name, YAML text) of the presets shipped with the program, smallest tier
/// first within each family.
pub const BUILTIN: &[(&str, &str)] = &[
    ("cpu", include_str!("../../presets/cpu.yaml")),
    ("6gb", include_str!("../../presets/6gb.yaml")),
    ("8gb", include_str!("../../presets/8gb.yaml")),
    ("12gb", include_str!("../../presets/12gb.yaml")),
    ("16gb", include_str!("../../presets/16gb.yaml")),
    ("24gb", include_str!("../../presets/24gb.yaml")),
    ("48gb", include_str!("../../presets/48gb.yaml")),
    ("sdxl-12gb", include_str!("../../presets/sdxl-12gb.yaml")),
    ("sdxl-16gb", include_str!("../../presets/sdxl-16gb.yaml")),
    ("sdxl-24gb", include_str!("../../presets/sdxl-24gb.yaml")),
    ("sdxl-48gb", include_str!("../../presets/sdxl-48gb.yaml")),
];

/// The prefix of the presets made for SDXL.
const SDXL_PREFIX: &str = "sdxl-";

/// Whether preset `name` is made for models of `family`: `sdxl-*` for SDXL,
/// the others for SD 1.x/2.x, `cpu` for every family.
pub fn is_for_family(name: &str, family: &Architecture) -> bool {
    if name == "cpu" {
        return true;
    }
    name.starts_with(SDXL_PREFIX) == (*family == Architecture::Sdxl)
}

/// The built-in presets made for `family`, in `BUILTIN`'s order.
pub fn builtin_for(family: &Architecture) -> impl Iterator<Item = &'static str> + '_ {
    BUILTIN.iter().map(|(name, _)| *name).filter(move |name| is_for_family(name, family))
}

pub fn load_preset(name: &str, base: &Path) -> anyhow::Result<Value> {
    if name.contains('/') || name.contains('\\') || name.is_empty() {
        return Err(usage(format!("`preset` {name:?} must be a preset name such as 12gb")));
    }
    let file = format!("{name}.yaml");
    for dir in [base.join("presets"), Path::new("presets").to_path_buf()] {
        let path = dir.join(&file);
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| usage(format!("cannot read the preset {}: {e}", path.display())))?;
            return parse_preset(&text, &path.display().to_string());
        }
    }
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
        return parse_preset(text, &format!("built-in preset {name}"));
    }
    let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
    Err(usage(format!(
        "`preset` {name:?} is not a known preset{}",
        if names.is_empty() { String::new() } else { format!(" (known: {})", names.join(", ")) }
    )))
}

/// The `training` values `preset` sets (the working directory's presets, else the
/// built-in ones), so a warning about a setting can tell the preset's from the user's own.
pub fn training_values(preset: &str) -> Option<serde_yaml::Mapping> {
    match load_preset(preset, Path::new(".")).ok()?.get("training")? {
        Value::Mapping(m) => Some(m.clone()),
        _ => None,
    }
}

fn parse_preset(text: &str, origin: &str) -> anyhow::Result<Value> {
    let v: Value = serde_yaml::from_str(text).map_err(|e| usage(format!("{origin} is not valid YAML: {e}")))?;
    if v.get("name").is_some() || v.get("concepts").is_some() || v.get("source_checkpoint").is_some() {
        return Err(usage(format!("{origin} may only hold settings, not name, source_checkpoint or concepts")));
    }
    Ok(v)
}
