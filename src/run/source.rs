//! `source.json`: what the run's source model (and own VAE) were when it
//! started, so that a model replaced or re-downloaded under the same path later
//! is said, not silently trained on or exported over. A run's checkpoints hold
//! only what it trained (a LoRA's adapters, or the UNet without the VAE), so the
//! rest always comes from the source's path.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::Context;

const FILE: &str = "source.json";
/// Bytes read from each end of a file: the safetensors header and the first
/// tensors at the start, the last tensors at the end.
const HEAD: u64 = 4 << 20;
const TAIL: u64 = 1 << 20;

/// A file's size and checksums of its two ends; a folder's, file by file.
pub fn fingerprint(path: &Path) -> anyhow::Result<String> {
    if path.is_dir() {
        let mut files = Vec::new();
        collect_files(path, path, &mut files)?;
        files.sort();
        let parts: anyhow::Result<Vec<String>> =
            files.iter().map(|rel| Ok(format!("{rel}={}", file_fingerprint(&path.join(rel))?))).collect();
        return Ok(parts?.join(";"));
    }
    file_fingerprint(path)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "safetensors" || e == "bin" || e == "json" || e == "txt") {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn file_fingerprint(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut crc = |from: u64, len: u64| -> anyhow::Result<u32> {
        let mut buf = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(crc32fast::hash(&buf))
    };
    let head = crc(0, size.min(HEAD))?;
    let tail = crc(size.saturating_sub(TAIL), size.min(TAIL))?;
    Ok(format!("{size}:{head:08x}:{tail:08x}"))
}

/// The models a run reads from outside its directory: the source, and its own VAE.
fn models(config: &crate::config::schema::RunConfig) -> Vec<(&'static str, &Path)> {
    let mut out = vec![("source_checkpoint", config.source_checkpoint.as_path())];
    out.extend(config.vae.as_deref().map(|v| ("vae", v)));
    out
}

/// Writes `source.json` for a run starting now.
pub fn record(run_dir: &Path, config: &crate::config::schema::RunConfig) -> anyhow::Result<()> {
    let mut map = serde_json::Map::new();
    for (key, path) in models(config) {
        map.insert(key.into(), serde_json::json!({ "path": path.display().to_string(), "fingerprint": fingerprint(path)? }));
    }
    let path = run_dir.join(FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&map)?).with_context(|| format!("cannot write {}", path.display()))
}

/// One sentence per model of the run that is no longer what it started from
/// (nothing for runs made before `source.json`, or models that cannot be read:
/// reading them says why).
pub fn changed_since_start(run_dir: &Path, config: &crate::config::schema::RunConfig) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(run_dir.join(FILE)) else { return Vec::new() };
    let Ok(recorded) = serde_json::from_str::<serde_json::Value>(&text) else { return Vec::new() };
    models(config)
        .into_iter()
        .filter_map(|(key, path)| {
            let then = recorded.get(key)?.get("fingerprint")?.as_str()?;
            let now = fingerprint(path).ok()?;
            (now != then).then(|| {
                format!(
                    "`{key}` {} is not the model this run started from (its files changed since); \
                     the run's trained weights now sit over a different model",
                    path.display()
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_or_folder_has_another_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        std::fs::write(&file, vec![7u8; 6 << 20]).unwrap();
        let before = fingerprint(&file).unwrap();
        assert_eq!(fingerprint(&file).unwrap(), before);
        let mut bytes = std::fs::read(&file).unwrap();
        *bytes.last_mut().unwrap() = 8;
        std::fs::write(&file, &bytes).unwrap();
        assert_ne!(fingerprint(&file).unwrap(), before);
        let folder = dir.path().join("f");
        std::fs::create_dir_all(folder.join("unet")).unwrap();
        std::fs::write(folder.join("unet/config.json"), b"{}").unwrap();
        let before = fingerprint(&folder).unwrap();
        std::fs::write(folder.join("unet/config.json"), b"{ }").unwrap();
        assert_ne!(fingerprint(&folder).unwrap(), before);
    }
}
