//! The sizes of the model a run trains: its configs (for activations) and its
//! real parameter tensors, read from the checkpoint's index (names and shapes;
//! no tensor data is read, so a multi-gigabyte file costs a header read).

use std::path::Path;

use anyhow::{bail, Context};

use super::shapes::{clip_layers, unet_layers, vae_layers, Layer, LayerKind, Param};
use crate::checkpoint::{diffusers, format_of, ldm, ldm_yaml, open_single_file, Architecture, ModelFormat, TextEncoderRole};
use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::model::family::HiddenStates;

/// One text encoder of the model, in its family's role.
#[derive(Debug, Clone)]
pub struct TextEncoderShapes {
    pub role: TextEncoderRole,
    pub layers: Vec<Layer>,
}

impl TextEncoderShapes {
    /// Whether layer `i` runs when the encoder conditions the UNet. An encoder
    /// read at its penultimate layer that gives no pooled output (SDXL's first)
    /// stops before its last layer and never applies its final norm, so those
    /// keep no activations and get no gradients.
    pub fn runs(&self, i: usize) -> bool {
        let stops_early = self.role.hidden == HiddenStates::Penultimate && !self.role.pooled;
        if !stops_early {
            return true;
        }
        let last_block = self.layers.iter().rposition(|l| matches!(l.kind, LayerKind::ClipLayer { .. }));
        Some(i) != last_block && self.layers.get(i).is_some_and(|l| l.name != "final_layer_norm")
    }

    /// The width of its hidden states (its part of the UNet's context).
    pub fn hidden_size(&self) -> i64 {
        self.layers
            .iter()
            .find_map(|l| match l.kind {
                LayerKind::ClipLayer { hidden, .. } => Some(hidden),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// The width of its pooled embedding, when the family takes one from it.
    pub fn pooled_width(&self) -> Option<i64> {
        if !self.role.pooled {
            return None;
        }
        let projection = self.layers.iter().flat_map(|l| &l.params).find(|p| p.key == "text_projection.weight");
        Some(projection.map_or(self.hidden_size(), |p| p.shape[0]))
    }

    /// What the estimate calls it: "text encoder", "text encoder 2".
    pub fn label(&self) -> String {
        self.role.name.replace('_', " ")
    }
}

/// Everything the estimator needs to know about a model.
#[derive(Debug, Clone)]
pub struct ModelShapes {
    pub family: Architecture,
    pub unet: Vec<Layer>,
    pub vae_encoder: Vec<Layer>,
    pub vae_decoder: Vec<Layer>,
    /// The family's text encoders, in its order.
    pub text_encoders: Vec<TextEncoderShapes>,
    /// Pixels per latent along a side (8 for SD).
    pub vae_factor: i64,
    pub latent_channels: i64,
    /// The image side the model is made for, in pixels (the UNet's sample size
    /// times the VAE factor: what `generate` draws at unless told).
    pub native_size: i64,
    /// Image sides must be a multiple of this (the VAE factor times the UNet's downsampling).
    pub size_multiple: i64,
    /// Where the parameter tensors came from ("config" or the checkpoint).
    pub origin: String,
}

impl ModelShapes {
    /// The shapes for prompts read in `windows` 75-token windows
    /// (`training.max_token_length`): the text encoders run once per window and
    /// the UNet's cross-attention reads the joined states, (tokens − 2) × windows + 2 long
    /// (with one window, the shapes as they are).
    pub fn with_token_windows(&self, windows: i64) -> ModelShapes {
        let mut m = self.clone();
        for l in m.text_encoders.iter_mut().flat_map(|e| e.layers.iter_mut()) {
            if let LayerKind::ClipLayer { windows: w, .. } = &mut l.kind {
                *w = windows;
            }
        }
        let tokens = m.text_layers().find_map(|l| match l.kind {
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

    /// Every text encoder's layers, one encoder after another.
    pub fn text_layers(&self) -> impl Iterator<Item = &Layer> {
        self.text_encoders.iter().flat_map(|e| e.layers.iter())
    }

    /// Shapes from configs alone (each tensor as the model code would ask for it);
    /// `text` holds the family's text encoder configs in its order.
    pub fn from_configs(family: &Architecture, unet: &UNetConfig, vae: &VaeConfig, text: &[ClipConfig], origin: &str) -> Self {
        let (vae_encoder, vae_decoder) = vae_layers(vae);
        let text_encoders = family
            .text_encoders()
            .iter()
            .zip(text)
            .map(|(role, config)| TextEncoderShapes { role: *role, layers: clip_layers(config, role.pooled) })
            .collect();
        ModelShapes {
            family: family.clone(),
            unet: unet_layers(unet),
            vae_encoder,
            vae_decoder,
            text_encoders,
            vae_factor: vae.downsampling_factor(),
            latent_channels: vae.latent_channels,
            native_size: unet.sample_size * vae.downsampling_factor(),
            size_multiple: unet.size_multiple(vae),
            origin: origin.to_string(),
        }
    }

    /// Stable Diffusion 1.5 (the shapes `dreambooth presets` rates the SD tiers with).
    pub fn sd15() -> Self {
        let vae = VaeConfig::default();
        Self::from_configs(&Architecture::Sd1, &UNetConfig::sd_v1_5(), &vae, &[ClipConfig::sd_v1()], "Stable Diffusion 1.5 shapes")
    }

    /// Stable Diffusion XL base 1.0 (the shapes `dreambooth presets` rates the
    /// sdxl-* tiers with): its UNet, CLIP ViT-L and OpenCLIP bigG with its
    /// projection, and SD's VAE as SDXL configures it.
    pub fn sdxl() -> Self {
        let vae = VaeConfig { scaling_factor: 0.13025, sample_size: 1024, ..VaeConfig::default() };
        let text = [ClipConfig::sd_v1(), ClipConfig::sdxl_g()];
        Self::from_configs(&Architecture::Sdxl, &UNetConfig::sdxl(), &vae, &text, "Stable Diffusion XL 1.0 shapes")
    }

    /// The shapes of the family's usual model: what the presets of a family are
    /// rated with when no model is at hand.
    pub fn reference_for(family: &Architecture) -> Self {
        match family {
            Architecture::Sdxl => Self::sdxl(),
            _ => Self::sd15(),
        }
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
        let (family, configs, real) = match format_of(path)? {
            ModelFormat::Diffusers => diffusers_shapes(path)?,
            format => single_file_shapes(path, format)?,
        };
        let mut shapes = Self::from_configs(&family, &configs.unet, &configs.vae, &configs.text, &path.display().to_string());
        // Real tensors replace the config-derived ones wherever the checkpoint has them
        // (same keys; a checkpoint that breaks the conventions still counts right).
        replace_params(&mut shapes.unet, &real.unet);
        replace_params(&mut shapes.vae_encoder, &real.vae);
        replace_params(&mut shapes.vae_decoder, &real.vae);
        for (encoder, real) in shapes.text_encoders.iter_mut().zip(&real.text) {
            replace_params(&mut encoder.layers, real);
        }
        Ok(shapes)
    }
}

/// The model family of a checkpoint, from its configs or its key names (no weights read).
pub fn family_of(path: &Path) -> anyhow::Result<Architecture> {
    let family = match format_of(path)? {
        ModelFormat::Diffusers => {
            let c = diffusers::read_configs(path)?;
            let (Some(unet), Some(text)) = (c.unet, c.text) else {
                bail!("{} has no unet/config.json or text_encoder/config.json", path.display());
            };
            diffusers::architecture_of(path, &unet, &text)
        }
        format => ldm::detect(open_single_file(path, format)?.as_ref()),
    };
    match family {
        Architecture::Unknown(what) => bail!("{} is {what}", path.display()),
        family => Ok(family),
    }
}

/// A model's configs: UNet, VAE and the family's text encoders in its order.
struct Configs {
    unet: UNetConfig,
    vae: VaeConfig,
    text: Vec<ClipConfig>,
}

/// The parameter tensors a checkpoint holds, by part (diffusers keys).
struct RealParams {
    unet: Vec<Param>,
    vae: Vec<Param>,
    /// One list per text encoder, in the family's order.
    text: Vec<Vec<Param>>,
}

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

fn diffusers_shapes(dir: &Path) -> anyhow::Result<(Architecture, Configs, RealParams)> {
    let c = diffusers::read_configs(dir)?;
    let shown = dir.display();
    let unet = c.unet.with_context(|| format!("{shown} has no unet/config.json"))?;
    let vae = c.vae.with_context(|| format!("{shown} has no vae/config.json"))?;
    let first = c.text.with_context(|| format!("{shown} has no text_encoder/config.json"))?;
    let family = diffusers::architecture_of(dir, &unet, &first);
    if let Architecture::Unknown(what) = &family {
        bail!("{shown} is {what}");
    }
    let mut text = vec![first];
    let mut real_text = vec![index_params(&dir.join("text_encoder"), true)?];
    for role in family.text_encoders().iter().skip(1) {
        // Only SDXL has a second encoder (`text_encoder_2/`).
        let config = c.text_2.clone().with_context(|| format!("{shown} has no {}/config.json", role.name))?;
        text.push(config);
        real_text.push(index_params(&dir.join(role.name), true)?);
    }
    let real = RealParams {
        unet: index_params(&dir.join("unet"), false)?,
        vae: index_params(&dir.join("vae"), false)?,
        text: real_text,
    };
    Ok((family, Configs { unet, vae, text }, real))
}

/// A single file's UNet and VAE configs and first text encoder's, as the loader
/// reads them (tensor shapes from its index, then its sidecar `.yaml`), without
/// reading a weight.
pub fn single_file_configs(path: &Path) -> anyhow::Result<(UNetConfig, VaeConfig, ClipConfig)> {
    let src = open_single_file(path, format_of(path)?)?;
    let (_, mut configs) = configs_of(path, src.as_ref())?;
    let first = configs.text.swap_remove(0);
    Ok((configs.unet, configs.vae, first))
}

fn configs_of(path: &Path, src: &dyn crate::checkpoint::source::TensorSource) -> anyhow::Result<(Architecture, Configs)> {
    let shown = path.display();
    let family = ldm::detect(src);
    if let Architecture::Unknown(what) = &family {
        bail!("{shown} is not a Stable Diffusion 1.x/2.x or SDXL checkpoint: {what}");
    }
    // Widths that break the family's head convention (tiny test models) still
    // have their parameter shapes; only the attention estimate assumes heads.
    let inferred = ldm::infer(src, &family)
        .or_else(|e| ldm::infer_shapes(src, &family).map_err(|_| e))
        .with_context(|| format!("cannot infer the architecture of {shown}"))?;
    let stored_text_layers = inferred.stored_text_layers;
    let mut text: Vec<ClipConfig> = inferred.text_encoders().into_iter().cloned().collect();
    let (mut unet, mut vae) = (inferred.unet, inferred.vae);
    let sidecar = ldm_yaml::sidecar_path(path);
    if sidecar.is_file() {
        let yaml = ldm_yaml::LdmYaml::read(&sidecar)?;
        yaml.apply_unet(&mut unet)?;
        yaml.apply_vae(&mut vae)?;
        // The latent-diffusion `cond_stage_config` describes SD 1.x/2.x's one encoder.
        if family != Architecture::Sdxl {
            yaml.apply_text(&mut text[0], stored_text_layers);
        }
    }
    Ok((family, Configs { unet, vae, text }))
}

fn single_file_shapes(path: &Path, format: ModelFormat) -> anyhow::Result<(Architecture, Configs, RealParams)> {
    let src = open_single_file(path, format)?;
    let src = src.as_ref();
    let (family, configs) = configs_of(path, src)?;
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
    let mut text = Vec::new();
    for (layout, config) in ldm::text_layouts(&family).iter().zip(&configs.text) {
        text.push(planned(ldm::text_plan(src, *layout, config.num_hidden_layers)?));
    }
    let real = RealParams { unet: planned(ldm::unet_plan(src)?), vae: planned(ldm::vae_plan(src)?), text };
    Ok((family, configs, real))
}

/// Parameter count of a list of layers.
pub fn count(layers: &[Layer]) -> u64 {
    layers.iter().flat_map(|l| &l.params).map(Param::numel).sum()
}
