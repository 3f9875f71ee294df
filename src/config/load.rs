//! Reading a run config: YAML → preset merge → unknown-key check (naming the key
//! and the near one) → typed struct → range checks. Every problem is one
//! sentence naming the file and key; all of them are usage errors (exit 2).

use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use super::schema::{Concept, RunConfig, Sampling, Training};
use crate::error::usage;

/// Reads, merges and validates `path`. Relative paths inside it are taken
/// relative to the config file's folder and made absolute.
pub fn load_run_config(path: &Path) -> anyhow::Result<RunConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read the config {}: {e}", path.display())))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut config = parse_run_config(&text, &path.display().to_string(), &base)?;
    absolutize(&mut config, &base);
    super::validate::validate(&config).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    Ok(config)
}

/// Parses config text; `origin` names it in errors; presets are looked up from `base`.
pub fn parse_run_config(text: &str, origin: &str, base: &Path) -> anyhow::Result<RunConfig> {
    let mut value: Value =
        serde_yaml::from_str(text).map_err(|e| usage(format!("{origin} is not valid YAML: {e}")))?;
    if value.is_null() {
        return Err(usage(format!("{origin} is empty")));
    }
    if !value.is_mapping() {
        return Err(usage(format!("{origin} must be a mapping of keys to values")));
    }
    if let Some(preset) = value.get("preset").and_then(Value::as_str).map(str::to_string) {
        let preset_value = super::presets::load_preset(&preset, base)?;
        value = merge(preset_value, value);
    }
    check_keys(&value, origin)?;
    // The path to a wrongly typed value (`training.learning_rate`) goes in the message.
    serde_path_to_error::deserialize(value.clone()).map_err(move |e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            return usage(format!("{origin}: {inner}"));
        }
        // serde_yaml words a non-name where a name belongs (`mixed_precision: true`)
        // after its internals; the names the key takes say it better.
        if inner.contains("Value::Tagged enum") {
            if let Some((given, names)) = names_the_key_takes(value, &path) {
                return usage(format!("{origin}: `{path}` is {given}, not one of {names}"));
            }
        }
        usage(format!("{origin}: `{path}`: {inner}"))
    })
}

/// The value at a serde path such as `training.mixed_precision` or `concepts[0].x`.
fn lookup_mut<'a>(value: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    let mut at = value;
    for part in path.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        at = at.get_mut(key)?;
        if let Some(i) = index {
            at = at.get_mut(i)?;
        }
    }
    Some(at)
}

/// The value given at `path`, and the names that enum key accepts as serde lists
/// them for an unknown one: the config is read again with a name no key takes there.
fn names_the_key_takes(mut value: Value, path: &str) -> Option<(String, String)> {
    let at = lookup_mut(&mut value, path)?;
    let given = serde_json::to_string(at).ok()?;
    *at = Value::String("\u{1}".into());
    let err = serde_path_to_error::deserialize::<_, RunConfig>(value).err()?.into_inner().to_string();
    err.split_once("expected one of ").map(|(_, names)| (given, names.to_string()))
}

/// `over`'s keys win; mappings merge recursively; lists and scalars replace.
pub fn merge(under: Value, over: Value) -> Value {
    match (under, over) {
        (Value::Mapping(mut a), Value::Mapping(b)) => {
            for (k, v) in b {
                let merged = match a.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                a.insert(k, merged);
            }
            Value::Mapping(a)
        }
        (_, over) => over,
    }
}

fn keys_of<T: serde::Serialize>(sample: &T) -> Vec<String> {
    match serde_yaml::to_value(sample) {
        Ok(Value::Mapping(m)) => m.keys().filter_map(|k| k.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

fn top_level_keys() -> Vec<String> {
    [
        "name", "source_checkpoint", "vae", "output_dir", "device", "seed", "resolution", "preset", "concepts", "training",
        "sampling",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn concept_keys() -> Vec<String> {
    let mut keys = keys_of(&Concept {
        instance_data_dir: PathBuf::new(),
        instance_prompt: String::new(),
        // Non-empty: empty tokens are not written, and every key must be listed.
        instance_token: "x".into(),
        class_token: "x".into(),
        class_prompt: String::new(),
        class_data_dir: Some(PathBuf::new()),
        num_class_images: 0,
        class_negative_prompt: "x".into(),
        class_guidance_scale: Some(0.0),
        class_infer_steps: Some(0),
        prior_loss_weight: 0.0,
        sample_prompts: vec![],
        validation_data_dir: Some(PathBuf::new()),
        // Non-zero: a zero share is not written.
        validation_split: 0.5,
        mask_dir: Some(PathBuf::new()),
    });
    keys.sort();
    keys
}

fn check_mapping(m: &Mapping, known: &[String], section: &str, origin: &str) -> anyhow::Result<()> {
    for key in m.keys() {
        let Some(key) = key.as_str() else {
            return Err(usage(format!("{origin}: {section}has a key that is not text: {key:?}")));
        };
        if !known.iter().any(|k| k == key) {
            let hint = match nearest(key, known) {
                Some(near) => format!(" (did you mean `{near}`?)"),
                None => String::new(),
            };
            return Err(usage(format!("{origin}: unknown key `{section}{key}`{hint}")));
        }
    }
    Ok(())
}

fn check_keys(value: &Value, origin: &str) -> anyhow::Result<()> {
    let Value::Mapping(top) = value else { return Ok(()) };
    check_mapping(top, &top_level_keys(), "", origin)?;
    if let Some(Value::Mapping(t)) = top.get("training") {
        check_mapping(t, &keys_of(&Training::default()), "training.", origin)?;
    }
    if let Some(Value::Mapping(s)) = top.get("sampling") {
        check_mapping(s, &keys_of(&Sampling::default()), "sampling.", origin)?;
    }
    if let Some(Value::Sequence(list)) = top.get("concepts") {
        for (i, c) in list.iter().enumerate() {
            if let Value::Mapping(c) = c {
                check_mapping(c, &concept_keys(), &format!("concepts[{i}]."), origin)?;
            }
        }
    }
    Ok(())
}

/// The known key closest to `key` by edit distance, if it is plausibly a typo.
pub fn nearest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn absolutize(config: &mut RunConfig, base: &Path) {
    let abs = |p: &Path| -> PathBuf {
        let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        std::path::absolute(&joined).unwrap_or(joined)
    };
    config.source_checkpoint = abs(&config.source_checkpoint);
    config.vae = config.vae.as_deref().map(abs);
    config.output_dir = abs(&config.output_dir);
    for c in &mut config.concepts {
        c.instance_data_dir = abs(&c.instance_data_dir);
        if let Some(d) = &c.class_data_dir {
            c.class_data_dir = Some(abs(d));
        }
        c.validation_data_dir = c.validation_data_dir.as_deref().map(abs);
        c.mask_dir = c.mask_dir.as_deref().map(abs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name: dog\nsource_checkpoint: m.safetensors\nconcepts:\n  - instance_data_dir: data\n    instance_prompt: a photo of sks dog\n";

    #[test]
    fn minimal_config_takes_defaults() {
        let c = parse_run_config(MINIMAL, "t.yaml", Path::new(".")).unwrap();
        assert_eq!(c.training.steps_per_image, 175);
        assert_eq!(c.resolution, 512);
        assert_eq!(c.sampling.scheduler, "ddim");
        assert_eq!(c.concepts[0].num_class_images, 200);
    }

    #[test]
    fn folders_are_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(&path, MINIMAL.replace("    instance_prompt", "    validation_data_dir: held-out\n    mask_dir: masks\n    instance_prompt")).unwrap();
        let c = load_run_config(&path).unwrap();
        assert_eq!(c.concepts[0].instance_data_dir, dir.path().join("data"));
        assert_eq!(c.concepts[0].validation_data_dir, Some(dir.path().join("held-out")));
        assert_eq!(c.concepts[0].mask_dir, Some(dir.path().join("masks")));
    }

    #[test]
    fn unknown_key_is_named_with_the_near_one() {
        let text = format!("{MINIMAL}training:\n  learning_rte: 1.0e-6\n");
        let err = parse_run_config(&text, "t.yaml", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("`training.learning_rte`"), "{err}");
        assert!(err.contains("did you mean `learning_rate`"), "{err}");
        let err = parse_run_config(&format!("{MINIMAL}reslution: 512\n"), "t.yaml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`reslution`") && err.contains("`resolution`"), "{err}");
        let text = MINIMAL.replace("instance_prompt", "instance_promt");
        let err = parse_run_config(&text, "t.yaml", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("concepts[0].instance_promt"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}training:\n  learning_rate: fast\n");
        let err = parse_run_config(&text, "t.yaml", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
        assert!(err.contains("t.yaml"), "{err}");
        // A non-name where a name belongs is answered with the names, not serde's internals.
        let text = format!("{MINIMAL}training:\n  mixed_precision: true\n");
        let err = parse_run_config(&text, "t.yaml", Path::new(".")).unwrap_err().to_string();
        assert_eq!(err, "t.yaml: `training.mixed_precision` is true, not one of `no`, `fp16`, `bf16`");
        let text = format!("{MINIMAL}training:\n  attention: [a]\n");
        let err = parse_run_config(&text, "t.yaml", Path::new(".")).unwrap_err().to_string();
        assert_eq!(err, "t.yaml: `training.attention` is [\"a\"], not one of `default`, `explicit`, `xformers`, `flash_attention`");
    }

    #[test]
    fn merge_lets_the_config_win() {
        let preset: Value = serde_yaml::from_str("training:\n  batch_size: 4\n  use_lora: true\n").unwrap();
        let own: Value = serde_yaml::from_str("training:\n  batch_size: 2\n").unwrap();
        let m = merge(preset, own);
        assert_eq!(m["training"]["batch_size"], Value::from(2));
        assert_eq!(m["training"]["use_lora"], Value::from(true));
    }
}
