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
use super::{Architecture, LoadedModel, LoadedTextEncoder, ModelFormat, TokenizerSource};
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
    /// SDXL's second text encoder (`text_encoder_2/`).
    pub text_2: Option<ClipConfig>,
    pub scheduler: Option<SchedulerConfig>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_2: Option<PathBuf>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL pipelines).
    pub force_zeros_for_empty_prompt: Option<bool>,
}

impl FolderConfigs {
    /// The config and tokenizer folder of the text encoder called `name`.
    fn text_encoder(&self, name: &str) -> (Option<&ClipConfig>, Option<&PathBuf>) {
        match name {
            "text_encoder_2" => (self.text_2.as_ref(), self.tokenizer_2.as_ref()),
            _ => (self.text.as_ref(), self.tokenizer.as_ref()),
        }
    }

    /// These configs, with `o`'s wherever it has one.
    fn overridden_by(self, o: FolderConfigs) -> FolderConfigs {
        FolderConfigs {
            unet: o.unet.or(self.unet),
            vae: o.vae.or(self.vae),
            text: o.text.or(self.text),
            text_2: o.text_2.or(self.text_2),
            scheduler: o.scheduler.or(self.scheduler),
            tokenizer: o.tokenizer.or(self.tokenizer),
            tokenizer_2: o.tokenizer_2.or(self.tokenizer_2),
            force_zeros_for_empty_prompt: o.force_zeros_for_empty_prompt.or(self.force_zeros_for_empty_prompt),
        }
    }
}

/// The parts of `model_index.json` this program reads.
#[derive(Debug, Default, serde::Deserialize)]
struct ModelIndex {
    force_zeros_for_empty_prompt: Option<bool>,
}

pub fn read_configs(dir: &Path) -> anyhow::Result<FolderConfigs> {
    let opt = |sub: &str, file: &str| {
        let p = dir.join(sub).join(file);
        p.is_file().then_some(p)
    };
    let tokenizer = |sub: &str| Some(dir.join(sub)).filter(|p| p.join("vocab.json").is_file() || p.join("tokenizer.json").is_file());
    let index = dir.join("model_index.json");
    let index: ModelIndex = if index.is_file() { read_json(&index)? } else { ModelIndex::default() };
    Ok(FolderConfigs {
        unet: opt("unet", "config.json").map(|p| read_json(&p)).transpose()?,
        vae: opt("vae", "config.json").map(|p| read_json(&p)).transpose()?,
        text: opt("text_encoder", "config.json").map(|p| read_json(&p)).transpose()?,
        text_2: opt("text_encoder_2", "config.json").map(|p| read_json(&p)).transpose()?,
        scheduler: opt("scheduler", "scheduler_config.json").map(|p| read_json(&p)).transpose()?,
        tokenizer: tokenizer("tokenizer"),
        tokenizer_2: tokenizer("tokenizer_2"),
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
    })
}

/// `read_configs` of a `--model-config` folder, which must describe something:
/// a folder with none of the configs would silently change nothing.
pub fn read_override_configs(dir: &Path) -> anyhow::Result<FolderConfigs> {
    if !dir.is_dir() {
        bail!("--model-config {} is not a folder", dir.display());
    }
    let configs = read_configs(dir)?;
    let any = configs.unet.is_some()
        || configs.vae.is_some()
        || configs.text.is_some()
        || configs.text_2.is_some()
        || configs.scheduler.is_some()
        || configs.tokenizer.is_some();
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
    match unet.addition_embed_type.as_deref() {
        Some("text_time") if dir.join("text_encoder_2").is_dir() => return Architecture::Sdxl,
        Some("text_time") => return Architecture::Unknown("an SDXL refiner or a UNet without its second text encoder (not supported)".into()),
        Some(other) => return Architecture::Unknown(format!("a UNet with addition_embed_type `{other}` (not supported)")),
        None if dir.join("text_encoder_2").is_dir() => {
            return Architecture::Unknown("a model with a second text encoder but no SDXL UNet (not supported)".into())
        }
        None => {}
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
        configs = configs.overridden_by(read_override_configs(o)?);
    }
    let need = |sub: &str, file: &str| format!("{shown} has no {sub}/{file}");
    let unet_config = configs.unet.clone().with_context(|| need("unet", "config.json"))?;
    let vae_config = configs.vae.clone().with_context(|| need("vae", "config.json"))?;
    let first_text = configs.text.as_ref().with_context(|| need("text_encoder", "config.json"))?;
    let architecture = architecture_of(dir, &unet_config, first_text);
    if let Architecture::Unknown(what) = &architecture {
        bail!("{shown} is {what}");
    }
    let mut text_encoders = Vec::new();
    for role in architecture.text_encoders() {
        let (config, tokenizer) = configs.text_encoder(role.name);
        let config = config.cloned().with_context(|| need(role.name, "config.json"))?;
        // diffusers itself cannot load a folder without its tokenizer; guessing one
        // would give SD 2 folders the wrong padding.
        let tokenizer = match tokenizer {
            Some(p) => TokenizerSource::Folder(p.clone()),
            None => bail!("{shown} has no {}/ folder (vocab.json and merges.txt)", role.tokenizer),
        };
        let tensors = text_encoder_keys(load_component(&dir.join(role.name))?);
        text_encoders.push(LoadedTextEncoder { role: *role, config, tokenizer, tensors });
    }
    let scheduler_config = configs.scheduler.clone().unwrap_or_else(super::single_file_scheduler);

    let unet = load_component(&dir.join("unet"))?;
    let vae = load_component(&dir.join("vae"))?;

    Ok(LoadedModel {
        unet_config,
        vae_config,
        scheduler_config,
        unet,
        vae,
        text_encoders,
        force_zeros_for_empty_prompt: configs.force_zeros_for_empty_prompt.unwrap_or(false),
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
/// Buffers (`position_ids`) and anything outside the text transformer and its
/// projection (`text_projection`, SDXL's second encoder) are dropped.
pub fn text_encoder_keys(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("text_model.").map(str::to_string).unwrap_or(k);
            let keep = (k.starts_with("embeddings.") && k != "embeddings.position_ids")
                || k.starts_with("encoder.")
                || k.starts_with("final_layer_norm.")
                || k.starts_with("text_projection.");
            keep.then_some((k, v))
        })
        .collect()
}
