//! `dreambooth models [DIR...]`: the source checkpoints found in some folders.
//! Only headers are read (a safetensors header, a checkpoint's pickle), so a
//! listing of multi-gigabyte files is quick; a file that cannot be read is
//! listed with the reason instead of stopping the listing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{diffusers, format_of, ldm, open_single_file, Architecture, ModelFormat};
use crate::error::one_line;

#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub size_bytes: u64,
    /// The architecture, or why the file cannot be read.
    pub architecture: Result<Architecture, String>,
    /// A sidecar `.yaml` sits next to a single file.
    pub has_sidecar: bool,
}

const SINGLE_FILE_EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt", "pth"];

fn is_single_file(p: &Path) -> bool {
    p.is_file()
        && p.extension().map(|e| e.to_string_lossy().to_lowercase()).is_some_and(|e| SINGLE_FILE_EXTENSIONS.contains(&e.as_str()))
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Model files and diffusers folders in each of `dirs` and in their subfolders (one level).
pub fn scan(dirs: &[PathBuf]) -> Vec<ModelEntry> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut consider = |p: PathBuf, found: &mut Vec<ModelEntry>| -> bool {
        let is_model = is_single_file(&p) || (p.is_dir() && diffusers::is_diffusers_folder(&p));
        if is_model && seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())) {
            found.push(describe(&p));
        }
        is_model
    };
    for dir in dirs {
        if diffusers::is_diffusers_folder(dir) {
            consider(dir.clone(), &mut found);
            continue;
        }
        for entry in sorted_entries(dir) {
            if consider(entry.clone(), &mut found) || !entry.is_dir() {
                continue;
            }
            for inner in sorted_entries(&entry) {
                consider(inner, &mut found);
            }
        }
    }
    found
}

fn describe(path: &Path) -> ModelEntry {
    let size_bytes = disk_size(path);
    let format = format_of(path).unwrap_or(ModelFormat::SingleFileSafetensors);
    // The listing shows the path already: keep only what follows it in the message.
    let shown = path.display().to_string();
    let architecture = architecture_of(path, format).map_err(|e| {
        let line = one_line(&e);
        line.strip_prefix(&shown).map(|rest| rest.trim_start().to_string()).unwrap_or(line)
    });
    let has_sidecar = format != ModelFormat::Diffusers && super::ldm_yaml::sidecar_path(path).is_file();
    ModelEntry { path: path.to_path_buf(), format, size_bytes, architecture, has_sidecar }
}

fn architecture_of(path: &Path, format: ModelFormat) -> anyhow::Result<Architecture> {
    if format == ModelFormat::Diffusers {
        let c = diffusers::read_configs(path)?;
        let (Some(unet), Some(text)) = (c.unet, c.text) else {
            anyhow::bail!("{} is missing unet/config.json or text_encoder/config.json", path.display());
        };
        return Ok(diffusers::architecture_of(path, &unet, &text));
    }
    let src = open_single_file(path, format)?;
    Ok(ldm::detect(src.as_ref()))
}

fn disk_size(path: &Path) -> u64 {
    if path.is_dir() {
        sorted_entries(path).iter().map(|p| disk_size(p)).sum()
    } else {
        path.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

pub fn human_size(bytes: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The folders `dreambooth models` and the wizard scan when given none: see [`model_dirs`].
pub fn default_model_dirs() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let hub = std::env::var_os("HF_HUB_CACHE")
        .or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| home.as_ref().map(|h| h.join(".cache/huggingface/hub")));
    model_dirs(home.as_deref(), hub.as_deref())
}

/// The folders to scan that exist: here, `./models`, the web UIs' model folders
/// under here, the home folder and `/workspace` (RunPod's volume), and each
/// cached Hugging Face model's snapshots (diffusers folders, one per revision).
pub fn model_dirs(home: Option<&Path>, hub: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("."), PathBuf::from("models")];
    let roots = [Some(PathBuf::from(".")), home.map(PathBuf::from), Some(PathBuf::from("/workspace"))];
    for root in roots.into_iter().flatten() {
        for ui in ["stable-diffusion-webui/models/Stable-diffusion", "ComfyUI/models/checkpoints"] {
            let dir = root.join(ui);
            if dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    if let Some(entries) = hub.and_then(|h| std::fs::read_dir(h).ok()) {
        let mut snapshots: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("models--")))
            .map(|p| p.join("snapshots"))
            .filter(|p| p.is_dir())
            .collect();
        snapshots.sort();
        dirs.extend(snapshots);
    }
    dirs
}

pub fn models_command(dirs: &[PathBuf]) -> anyhow::Result<()> {
    let dirs: Vec<PathBuf> = if dirs.is_empty() { default_model_dirs() } else { dirs.to_vec() };
    for d in dirs.iter().filter(|d| !d.exists() && *d != Path::new("models")) {
        eprintln!("note: {} does not exist", d.display());
    }
    let entries = scan(&dirs);
    if entries.is_empty() {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        println!("No models found in {} (looked for .safetensors, .ckpt and diffusers folders).", names.join(", "));
        return Ok(());
    }
    let width = entries.iter().map(|e| e.path.display().to_string().len()).max().unwrap_or(4).max(4);
    println!("{:<width$}  {:<8}  {:<11}  {:>9}", "PATH", "ARCH", "FORMAT", "SIZE");
    for e in &entries {
        let arch = match &e.architecture {
            Ok(Architecture::Unknown(_)) | Err(_) => "?".to_string(),
            Ok(a) => a.to_string(),
        };
        let mut note = match &e.architecture {
            Ok(Architecture::Unknown(what)) => format!("  not loadable: {what}"),
            Err(why) => format!("  unreadable: {why}"),
            Ok(_) => String::new(),
        };
        if e.has_sidecar {
            note.push_str("  (+ .yaml)");
        }
        println!(
            "{:<width$}  {:<8}  {:<11}  {:>9}{note}",
            e.path.display(),
            arch,
            e.format.to_string(),
            human_size(e.size_bytes)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_ui_folders_and_cached_models_are_scanned() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        let webui = home.join("stable-diffusion-webui/models/Stable-diffusion");
        std::fs::create_dir_all(&webui).unwrap();
        let hub = root.path().join("hub");
        let snapshots = hub.join("models--runwayml--stable-diffusion-v1-5/snapshots");
        std::fs::create_dir_all(snapshots.join("abc123")).unwrap();
        std::fs::create_dir_all(hub.join("datasets--x/snapshots")).unwrap();
        let dirs = model_dirs(Some(&home), Some(&hub));
        assert!(dirs.contains(&webui), "{dirs:?}");
        assert!(dirs.contains(&snapshots), "{dirs:?}");
        assert!(!dirs.iter().any(|d| d.to_string_lossy().contains("datasets--")), "{dirs:?}");
        assert!(!dirs.contains(&home.join("ComfyUI/models/checkpoints")), "only folders that exist");
    }
}

