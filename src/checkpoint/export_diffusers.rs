//! Writing a model as a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`) that diffusers'
//! `StableDiffusionPipeline.from_pretrained` loads. The folder is assembled
//! under a temporary name and renamed into place when complete.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use tch::Tensor;

use super::write::write_safetensors;
use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::scheduler::config::SchedulerConfig;

const DIFFUSERS_VERSION: &str = "0.42.1";

/// The parts of a model, diffusers key names (text encoder without `text_model.`).
pub struct ModelParts<'a> {
    pub unet_config: &'a UNetConfig,
    pub vae_config: &'a VaeConfig,
    pub text_config: &'a ClipConfig,
    pub scheduler_config: &'a SchedulerConfig,
    pub unet: &'a HashMap<String, Tensor>,
    pub vae: &'a HashMap<String, Tensor>,
    pub text_encoder: &'a HashMap<String, Tensor>,
    /// Copies `vocab.json`, `merges.txt` and the token maps into `tokenizer/`.
    pub write_tokenizer: &'a dyn Fn(&Path) -> anyhow::Result<()>,
}

fn with_class(value: serde_json::Value, class: &str, library_version: (&str, &str)) -> serde_json::Value {
    let mut map = match value {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    map.insert("_class_name".into(), json!(class));
    map.insert(library_version.0.into(), json!(library_version.1));
    serde_json::Value::Object(map)
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn sorted(map: &HashMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = map.iter().map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes the folder at `dir` (which must not exist yet).
pub fn write_diffusers_folder(dir: &Path, parts: &ModelParts) -> anyhow::Result<()> {
    if dir.exists() {
        anyhow::bail!("{} already exists; choose a new folder", dir.display());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_into(&tmp, parts);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot move the new model into place as {}", dir.display()))?;
    Ok(())
}

fn write_into(root: &Path, p: &ModelParts) -> anyhow::Result<()> {
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(root.join(sub)).with_context(|| format!("cannot create {}", root.join(sub).display()))?;
    }
    let dv = ("_diffusers_version", DIFFUSERS_VERSION);
    write_json(
        &root.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", p.scheduler_config.class_name.clone().unwrap_or_else(|| "PNDMScheduler".into())],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    write_json(&root.join("unet/config.json"), &with_class(serde_json::to_value(p.unet_config)?, "UNet2DConditionModel", dv))?;
    write_safetensors(&root.join("unet/diffusion_pytorch_model.safetensors"), &sorted(p.unet, ""), None)?;
    write_json(&root.join("vae/config.json"), &with_class(serde_json::to_value(p.vae_config)?, "AutoencoderKL", dv))?;
    write_safetensors(&root.join("vae/diffusion_pytorch_model.safetensors"), &sorted(p.vae, ""), None)?;
    let mut text = serde_json::to_value(p.text_config)?;
    if let serde_json::Value::Object(m) = &mut text {
        m.insert("architectures".into(), json!(["CLIPTextModel"]));
        m.insert("model_type".into(), json!("clip_text_model"));
    }
    write_json(&root.join("text_encoder/config.json"), &text)?;
    // transformers 4's layout (with `text_model.`) loads in both 4 and 5.
    let mut te = sorted(p.text_encoder, "text_model.");
    te.retain(|(k, _)| !k.ends_with("position_ids"));
    let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&root.join("text_encoder/model.safetensors"), &te, Some(&meta))?;
    let sched = {
        let mut v = serde_json::to_value(p.scheduler_config)?;
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
            m.entry("_class_name").or_insert(json!("PNDMScheduler"));
        }
        v
    };
    write_json(&root.join("scheduler/scheduler_config.json"), &sched)?;
    (p.write_tokenizer)(&root.join("tokenizer"))?;
    Ok(())
}
