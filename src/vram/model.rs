//! The sizes of the model a run trains: its configs (for activations) and its
//! real parameter tensors, read from the checkpoint's index (names and shapes;
//! no tensor data is read, so a multi-gigabyte file costs a header read).

use std::path::Path;

use anyhow::{bail, Context};

use super::shapes::{clip_layers, unet_layers, vae_layers, Layer, LayerKind, Param};
use crate::checkpoint::{diffusers, format_of, ldm, ldm_yaml, open_single_file, Architecture, ModelFormat};
use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};

/// Everything the estimator needs to know about a model.
#[derive(Debug, Clone)]
pub struct ModelShapes {
    pub unet: Vec<Layer>,
    pub vae_encoder: Vec<Layer>,
    pub vae_decoder: Vec<Layer>,
    pub text: Vec<Layer>,
    /// Pixels per latent along a side (8 for SD).
    pub vae_factor: i64,
    pub latent_channels: i64,
    /// Where the parameter tensors came from ("config" or the checkpoint).
    pub origin: String,
}

impl ModelShapes {
    /// The shapes for prompts read in `windows` 75-token windows
    /// (`training.max_token_length`): the text encoder runs once per window and
    /// the UNet's cross-attention reads the joined states, (tokens − 2) × windows + 2 long
    /// (with one window, the shapes as they are).
    pub fn with_token_windows(&self, windows: i64) -> ModelShapes {
        let mut m = self.clone();
        for l in m.text.iter_mut() {
            if let LayerKind::ClipLayer { windows: w, .. } = &mut l.kind {
                *w = windows;
            }
        }
        let tokens = m.text.iter().find_map(|l| match l.kind {
            LayerKind::ClipLayer { tokens, .. } => Some(tokens),
            _ => None,
        });
        for l in m.unet.iter_mut() {
            if let (LayerKind::TransformerBlock { context_len, .. }, Some(tokens)) = (&mut l.kind, tokens) {
                *context_len = (tokens - 2) * windows + 2;
            }
        }
        m
    }

    /// Shapes from configs alone (each tensor as the model code would ask for it).
    pub fn from_configs(unet: &UNetConfig, vae: &VaeConfig, text: &ClipConfig, origin: &str) -> Self {
        let (vae_encoder, vae_decoder) = vae_layers(vae);
        ModelShapes {
            unet: unet_layers(unet),
            vae_encoder,
            vae_decoder,
            text: clip_layers(text),
            vae_factor: vae.downsampling_factor(),
            latent_channels: vae.latent_channels,
            origin: origin.to_string(),
        }
    }

    /// Stable Diffusion 1.5 (the shapes `dreambooth presets` rates the tiers with).
    pub fn sd15() -> Self {
        let vae = VaeConfig::default();
        Self::from_configs(&UNetConfig::sd_v1_5(), &vae, &ClipConfig::sd_v1(), "Stable Diffusion 1.5 shapes")
    }

    /// A run's model: its source's shapes, with the VAE of a `vae` folder's own config
    /// (a single VAE file has the source VAE's shapes, which training checks).
    pub fn for_run(config: &crate::config::RunConfig) -> anyhow::Result<Self> {
        let mut shapes = Self::from_checkpoint(&config.source_checkpoint)?;
        let folder_config = config.vae.as_deref().filter(|v| v.is_dir()).and_then(|v| {
            [v.join("vae").join("config.json"), v.join("config.json")].into_iter().find(|p| p.is_file())
        });
        if let Some(path) = folder_config {
            let vae: VaeConfig = crate::checkpoint::diffusers::read_json(&path)?;
            (shapes.vae_encoder, shapes.vae_decoder) = vae_layers(&vae);
            shapes.vae_factor = vae.downsampling_factor();
            shapes.latent_channels = vae.latent_channels;
        }
        Ok(shapes)
    }

    /// The source checkpoint's configs; parameter tensors from its index.
    pub fn from_checkpoint(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            bail!("the source checkpoint {} does not exist", path.display());
        }
        let (configs, real) = match format_of(path)? {
            ModelFormat::Diffusers => diffusers_shapes(path)?,
            format => single_file_shapes(path, format)?,
        };
        let (unet, vae, text) = configs;
        let mut shapes = Self::from_configs(&unet, &vae, &text, &path.display().to_string());
        // Real tensors replace the config-derived ones wherever the checkpoint has them
        // (same keys; a checkpoint that breaks the conventions still counts right).
        let (real_unet, real_vae, real_text) = real;
        replace_params(&mut shapes.unet, &real_unet);
        replace_params(&mut shapes.vae_encoder, &real_vae);
        replace_params(&mut shapes.vae_decoder, &real_vae);
        replace_params(&mut shapes.text, &real_text);
        Ok(shapes)
    }
}

type Configs = (UNetConfig, VaeConfig, ClipConfig);
type RealParams = (Vec<Param>, Vec<Param>, Vec<Param>);

fn replace_params(layers: &mut [Layer], real: &[Param]) {
    if real.is_empty() {
        return;
    }
    let by_key: std::collections::HashMap<&str, &Param> = real.iter().map(|p| (p.key.as_str(), p)).collect();
    for layer in layers {
        for p in &mut layer.params {
            if let Some(r) = by_key.get(p.key.as_str()) {
                p.shape = r.shape.clone();
            }
        }
    }
}

fn index_params(dir: &Path, strip_text_prefix: bool) -> anyhow::Result<Vec<Param>> {
    let mut out = Vec::new();
    for file in diffusers::weight_files(dir)? {
        let src = diffusers::open_weights(&file)?;
        for (key, info) in src.index() {
            let key = if strip_text_prefix { key.strip_prefix("text_model.").unwrap_or(key) } else { key };
            out.push(Param { key: key.to_string(), shape: info.shape.clone() });
        }
    }
    Ok(out)
}

fn diffusers_shapes(dir: &Path) -> anyhow::Result<(Configs, RealParams)> {
    let c = diffusers::read_configs(dir)?;
    let shown = dir.display();
    let unet = c.unet.with_context(|| format!("{shown} has no unet/config.json"))?;
    let vae = c.vae.with_context(|| format!("{shown} has no vae/config.json"))?;
    let text = c.text.with_context(|| format!("{shown} has no text_encoder/config.json"))?;
    if let Architecture::Unknown(what) = diffusers::architecture_of(dir, &unet, &text) {
        bail!("{shown} is {what}");
    }
    let real = (
        index_params(&dir.join("unet"), false)?,
        index_params(&dir.join("vae"), false)?,
        index_params(&dir.join("text_encoder"), true)?,
    );
    Ok(((unet, vae, text), real))
}

/// A single file's configs as the loader reads them (tensor shapes from its
/// index, then its sidecar `.yaml`), without reading a weight.
pub fn single_file_configs(path: &Path) -> anyhow::Result<(UNetConfig, VaeConfig, ClipConfig)> {
    let src = open_single_file(path, format_of(path)?)?;
    Ok(configs_of(path, src.as_ref())?.0)
}

fn configs_of(path: &Path, src: &dyn crate::checkpoint::source::TensorSource) -> anyhow::Result<(Configs, Architecture)> {
    let shown = path.display();
    let arch = ldm::detect(src);
    if let Architecture::Unknown(what) = &arch {
        bail!("{shown} is not a Stable Diffusion 1.x/2.x checkpoint: {what}");
    }
    let inferred = ldm::infer(src, &arch).with_context(|| format!("cannot infer the architecture of {shown}"))?;
    let (mut unet, mut vae, mut text) = (inferred.unet, inferred.vae, inferred.text);
    let sidecar = ldm_yaml::sidecar_path(path);
    if sidecar.is_file() {
        let yaml = ldm_yaml::LdmYaml::read(&sidecar)?;
        yaml.apply_unet(&mut unet)?;
        yaml.apply_vae(&mut vae)?;
        yaml.apply_text(&mut text, inferred.stored_text_layers);
    }
    Ok(((unet, vae, text), arch))
}

fn single_file_shapes(path: &Path, format: ModelFormat) -> anyhow::Result<(Configs, RealParams)> {
    let src = open_single_file(path, format)?;
    let src = src.as_ref();
    let ((unet, vae, text), arch) = configs_of(path, src)?;
    let planned = |plan: Vec<ldm::Mapped>| -> Vec<Param> {
        plan.into_iter()
            .filter_map(|m| {
                let mut shape = src.shape(&m.source)?.to_vec();
                match m.transform {
                    ldm::Transform::Same => {}
                    ldm::Transform::Conv1x1ToLinear => shape.truncate(2),
                    ldm::Transform::ThirdOf(_) => shape[0] /= 3,
                    ldm::Transform::Transpose => shape.reverse(),
                }
                Some(Param { key: m.target, shape })
            })
            .collect()
    };
    let real = (
        planned(ldm::unet_plan(src)?),
        planned(ldm::vae_plan(src)?),
        planned(ldm::text_plan(src, ldm::text_layout(&arch), text.num_hidden_layers)?),
    );
    Ok(((unet, vae, text), real))
}

/// Parameter count of a list of layers.
pub fn count(layers: &[Layer]) -> u64 {
    layers.iter().flat_map(|l| &l.params).map(Param::numel).sum()
}
