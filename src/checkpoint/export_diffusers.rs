//! Writing a model as a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! each text encoder and tokenizer of its family, `scheduler/`) that diffusers'
//! `StableDiffusionPipeline` (`StableDiffusionXLPipeline`) `.from_pretrained` loads. The folder is assembled
//! under a temporary name and renamed into place when complete.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use tch::Tensor;

use super::write::write_safetensors;
use super::{Architecture, LoadedModel, TokenizerSource};
use crate::tokenizer::ClipTokenizer;

const DIFFUSERS_VERSION: &str = "0.42.1";

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
pub fn write_diffusers_folder(dir: &Path, parts: &LoadedModel) -> anyhow::Result<()> {
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

fn write_into(root: &Path, p: &LoadedModel) -> anyhow::Result<()> {
    let mut subs = vec!["unet", "vae", "scheduler"];
    for t in &p.text_encoders {
        subs.extend([t.role.name, t.role.tokenizer]);
    }
    for sub in &subs {
        std::fs::create_dir_all(root.join(sub)).with_context(|| format!("cannot create {}", root.join(sub).display()))?;
    }
    let dv = ("_diffusers_version", DIFFUSERS_VERSION);
    let sdxl = p.architecture == Architecture::Sdxl;
    let mut index = json!({
        "_class_name": if sdxl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" },
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "scheduler": ["diffusers", p.scheduler_config.class_name.clone().unwrap_or_else(|| "PNDMScheduler".into())],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    let index_map = index.as_object_mut().expect("a JSON object");
    if sdxl {
        index_map.remove("feature_extractor");
        index_map.insert("force_zeros_for_empty_prompt".into(), json!(p.force_zeros_for_empty_prompt));
    } else {
        index_map.insert("requires_safety_checker".into(), json!(false));
        index_map.insert("safety_checker".into(), json!([null, null]));
    }
    for t in &p.text_encoders {
        let class = if t.role.pooled { "CLIPTextModelWithProjection" } else { "CLIPTextModel" };
        index_map.insert(t.role.name.into(), json!(["transformers", class]));
        index_map.insert(t.role.tokenizer.into(), json!(["transformers", "CLIPTokenizer"]));
    }
    write_json(&root.join("model_index.json"), &index)?;
    write_json(&root.join("unet/config.json"), &with_class(serde_json::to_value(&p.unet_config)?, "UNet2DConditionModel", dv))?;
    write_safetensors(&root.join("unet/diffusion_pytorch_model.safetensors"), &sorted(&p.unet, ""), None)?;
    write_json(&root.join("vae/config.json"), &with_class(serde_json::to_value(&p.vae_config)?, "AutoencoderKL", dv))?;
    write_safetensors(&root.join("vae/diffusion_pytorch_model.safetensors"), &sorted(&p.vae, ""), None)?;
    for t in &p.text_encoders {
        let class = if t.role.pooled { "CLIPTextModelWithProjection" } else { "CLIPTextModel" };
        let mut text = serde_json::to_value(&t.config)?;
        if let serde_json::Value::Object(m) = &mut text {
            m.insert("architectures".into(), json!([class]));
            m.insert("model_type".into(), json!("clip_text_model"));
        }
        write_json(&root.join(t.role.name).join("config.json"), &text)?;
        // transformers 4's layout (with `text_model.`) loads in both 4 and 5; the
        // projection sits beside the text model.
        let mut te: Vec<(String, Tensor)> = sorted(&t.tensors, "")
            .into_iter()
            .map(|(k, v)| if k.starts_with("text_projection.") { (k, v) } else { (format!("text_model.{k}"), v) })
            .collect();
        te.retain(|(k, _)| !k.ends_with("position_ids"));
        let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&root.join(t.role.name).join("model.safetensors"), &te, Some(&meta))?;
        let tokenizer = match &t.tokenizer {
            TokenizerSource::Folder(dir) => ClipTokenizer::from_folder(dir)?,
            TokenizerSource::OpenAi { pad_token } => ClipTokenizer::openai()?.with_pad_token(pad_token)?,
        };
        tokenizer.save_folder(&root.join(t.role.tokenizer))?;
    }
    let sched = {
        let mut v = serde_json::to_value(&p.scheduler_config)?;
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
            m.entry("_class_name").or_insert(json!("PNDMScheduler"));
        }
        v
    };
    write_json(&root.join("scheduler/scheduler_config.json"), &sched)?;
    Ok(())
}
