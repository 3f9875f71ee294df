//! Diffusers model folders: `model_index.json`, and `unet/`, `vae/`,
//! `text_encoder/` each with a `config.json` and weights, `scheduler/`, `tokenizer/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use tch::Tensor;

use super::ckpt::TorchZipFile;
use super::safetensors_file::SafetensorsFile;
use super::source::TensorSource;
use super::{Architecture, LoadedModel, ModelFormat, TokenizerSource};
use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::scheduler::config::SchedulerConfig;

/// Whether `dir` looks like a diffusers model (for listings).
pub fn is_diffusers_folder(dir: &Path) -> bool {
    dir.join("model_index.json").is_file() || dir.join("unet").join("config.json").is_file()
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a valid config ({e})", path.display()))
}

/// The configs a diffusers folder holds (also what `--model-config DIR` reads).
#[derive(Debug, Clone, Default)]
pub struct FolderConfigs {
    pub unet: Option<UNetConfig>,
    pub vae: Option<VaeConfig>,
    pub text: Option<ClipConfig>,
    pub scheduler: Option<SchedulerConfig>,
    pub tokenizer: Option<PathBuf>,
}

pub fn read_configs(dir: &Path) -> anyhow::Result<FolderConfigs> {
    let opt = |sub: &str, file: &str| {
        let p = dir.join(sub).join(file);
        p.is_file().then_some(p)
    };
    Ok(FolderConfigs {
        unet: opt("unet", "config.json").map(|p| read_json(&p)).transpose()?,
        vae: opt("vae", "config.json").map(|p| read_json(&p)).transpose()?,
        text: opt("text_encoder", "config.json").map(|p| read_json(&p)).transpose()?,
        scheduler: opt("scheduler", "scheduler_config.json").map(|p| read_json(&p)).transpose()?,
        tokenizer: Some(dir.join("tokenizer"))
            .filter(|p| p.join("vocab.json").is_file() || p.join("tokenizer.json").is_file()),
    })
}

/// `read_configs` of a `--model-config` folder, which must describe something:
/// a folder with none of the configs would silently change nothing.
pub fn read_override_configs(dir: &Path) -> anyhow::Result<FolderConfigs> {
    if !dir.is_dir() {
        bail!("--model-config {} is not a folder", dir.display());
    }
    let configs = read_configs(dir)?;
    let any = configs.unet.is_some() || configs.vae.is_some() || configs.text.is_some() || configs.scheduler.is_some() || configs.tokenizer.is_some();
    if !any {
        bail!(
            "--model-config {} holds none of unet/config.json, vae/config.json, text_encoder/config.json, \
             scheduler/scheduler_config.json or tokenizer/ (it takes a diffusers model folder)",
            dir.display()
        );
    }
    Ok(configs)
}

/// SD 2.x and SDXL are told apart from SD 1.x by their configs.
pub fn architecture_of(dir: &Path, unet: &UNetConfig, text: &ClipConfig) -> Architecture {
    if dir.join("text_encoder_2").is_dir() || unet.addition_embed_type.is_some() {
        return Architecture::Unknown("SDXL (not supported)".into());
    }
    if unet.class_embed_type.is_some() {
        return Architecture::Unknown("a class-conditioned UNet (not supported)".into());
    }
    if text.hidden_act == "gelu" || unet.use_linear_projection {
        Architecture::Sd2
    } else {
        Architecture::Sd1
    }
}

/// Loads a diffusers folder; `overrides` (from `--model-config DIR`) replace
/// the folder's own configs and tokenizer where they have them.
pub fn load(dir: &Path, overrides: Option<&Path>) -> anyhow::Result<LoadedModel> {
    let shown = dir.display();
    if !dir.join("unet").is_dir() {
        bail!("{shown} has no unet/ folder (not a diffusers model?)");
    }
    let mut configs = read_configs(dir)?;
    if let Some(o) = overrides {
        let o = read_override_configs(o)?;
        configs = FolderConfigs {
            unet: o.unet.or(configs.unet),
            vae: o.vae.or(configs.vae),
            text: o.text.or(configs.text),
            scheduler: o.scheduler.or(configs.scheduler),
            tokenizer: o.tokenizer.or(configs.tokenizer),
        };
    }
    let need = |sub: &str, file: &str| format!("{shown} has no {sub}/{file}");
    let unet_config = configs.unet.with_context(|| need("unet", "config.json"))?;
    let vae_config = configs.vae.with_context(|| need("vae", "config.json"))?;
    let text_config = configs.text.with_context(|| need("text_encoder", "config.json"))?;
    let architecture = architecture_of(dir, &unet_config, &text_config);
    if let Architecture::Unknown(what) = &architecture {
        bail!("{shown} is {what}");
    }
    // diffusers itself cannot load a folder without its tokenizer; guessing one
    // would give SD 2 folders the wrong padding.
    let tokenizer = match configs.tokenizer {
        Some(p) => TokenizerSource::Folder(p),
        None => bail!("{shown} has no tokenizer/ folder (vocab.json and merges.txt)"),
    };
    let scheduler_config = configs.scheduler.unwrap_or_else(super::single_file_scheduler);

    let unet = load_component(&dir.join("unet"))?;
    let vae = load_component(&dir.join("vae"))?;
    let text_encoder = text_encoder_keys(load_component(&dir.join("text_encoder"))?);

    Ok(LoadedModel {
        unet_config,
        vae_config,
        text_config,
        scheduler_config,
        tokenizer,
        unet,
        vae,
        text_encoder,
        architecture,
        source: dir.to_path_buf(),
        format: ModelFormat::Diffusers,
    })
}

/// The component's weight files: `*.safetensors` before `*.bin`, the full-precision
/// variant before `*.fp16.*`; several files of the chosen kind are shards of one model.
pub fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    for ext in [".safetensors", ".bin"] {
        let of_kind: Vec<&PathBuf> = files.iter().filter(|p| name(p).ends_with(ext)).collect();
        let full: Vec<PathBuf> = of_kind.iter().filter(|p| !name(p).contains(".fp16.")).map(|p| p.to_path_buf()).collect();
        if !full.is_empty() {
            return Ok(full);
        }
        if !of_kind.is_empty() {
            return Ok(of_kind.into_iter().cloned().collect());
        }
    }
    bail!("{} has no weights (*.safetensors or *.bin)", dir.display())
}

pub fn open_weights(path: &Path) -> anyhow::Result<Box<dyn TensorSource>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        Ok(Box::new(SafetensorsFile::open(path)?))
    } else {
        Ok(Box::new(TorchZipFile::open(path)?))
    }
}

pub(super) fn load_component(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in weight_files(dir)? {
        let src = open_weights(&file)?;
        for key in src.index().keys() {
            out.insert(key.clone(), src.load(key)?);
        }
    }
    Ok(out)
}

/// transformers 4 saves `text_model.*`, 5 saves without the prefix; we use the latter.
/// Buffers (`position_ids`) and anything outside the text transformer are dropped.
pub fn text_encoder_keys(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("text_model.").map(str::to_string).unwrap_or(k);
            let keep = (k.starts_with("embeddings.") && k != "embeddings.position_ids")
                || k.starts_with("encoder.")
                || k.starts_with("final_layer_norm.");
            keep.then_some((k, v))
        })
        .collect()
}
