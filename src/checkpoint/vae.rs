//! A VAE given on its own, in place of the model's (the extension's and diffusers'
//! DreamBooth `pretrained_vae_name_or_path`; AUTOMATIC1111's VAE setting): most SD 1.5
//! users train and sample with `sd-vae-ft-mse` rather than the VAE inside the checkpoint.
//!
//! Read from a diffusers `AutoencoderKL` folder (`config.json` and weights, as
//! `stabilityai/sd-vae-ft-mse`), a diffusers model folder (its `vae/`), or a single
//! file in the LDM layout: AUTOMATIC1111's `vae-ft-mse-840000-ema-pruned.safetensors` /
//! `*.vae.pt` (`encoder.*`, `decoder.*`, no prefix), a whole checkpoint
//! (`first_stage_model.*`) or a diffusers VAE's weight file by itself. A folder brings
//! its own config (its `scaling_factor` above all); a single file's tensors must fit
//! the model's VAE config, as AUTOMATIC1111 loads them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::bail;
use tch::Tensor;

use super::diffusers::{load_component, read_json};
use super::{ldm, materialize, open_single_file, format_of, LoadedModel, ModelFormat};
use crate::model::config::VaeConfig;

/// The model at `source`, with the VAE at `vae` in place of its own when one is given.
pub fn load_model_with_vae(source: &Path, vae: Option<&Path>) -> anyhow::Result<LoadedModel> {
    let mut model = super::load_model(source, None)?;
    if let Some(vae) = vae {
        replace_vae(&mut model, vae)?;
    }
    Ok(model)
}

/// Replaces `model`'s VAE by the one at `path`; every problem is one sentence naming it.
pub fn replace_vae(model: &mut LoadedModel, path: &Path) -> anyhow::Result<()> {
    let (config, tensors) = load_vae(path, &model.vae_config)?;
    check_fits(path, &config, &tensors, &model.vae_config, &model.vae)?;
    model.vae_config = config;
    model.vae = tensors;
    Ok(())
}

/// The VAE at `path`: its config (a folder's own; else `model_config`) and its
/// tensors by diffusers key.
pub fn load_vae(path: &Path, model_config: &VaeConfig) -> anyhow::Result<(VaeConfig, HashMap<String, Tensor>)> {
    let shown = path.display();
    if !path.exists() {
        bail!("the VAE {shown} does not exist");
    }
    if path.is_dir() {
        let dir = if path.join("vae").join("config.json").is_file() { path.join("vae") } else { path.to_path_buf() };
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            bail!("the VAE folder {shown} has no config.json (nor vae/config.json): not a diffusers AutoencoderKL");
        }
        let raw: serde_json::Value = read_json(&config_path)?;
        if let Some(class) = raw.get("_class_name").and_then(|c| c.as_str()).filter(|c| *c != "AutoencoderKL") {
            bail!("the VAE folder {shown} holds a {class}, not an AutoencoderKL");
        }
        let config: VaeConfig = read_json(&config_path)?;
        return Ok((config, load_component(&dir)?));
    }
    let format = format_of(path)?;
    if format == ModelFormat::Diffusers {
        bail!("the VAE {shown} is neither a folder nor a single file");
    }
    let src = open_single_file(path, format)?;
    let src = src.as_ref();
    let prefix = if src.index().contains_key(&format!("{}encoder.conv_in.weight", ldm::VAE)) { ldm::VAE } else { "" };
    if !src.index().contains_key(&format!("{prefix}encoder.conv_in.weight")) {
        bail!("{shown} holds no VAE: it has no `encoder.conv_in.weight` (nor `{}encoder.conv_in.weight`)", ldm::VAE);
    }
    // A diffusers VAE's weight file given on its own already has diffusers keys.
    if prefix.is_empty() && src.index().contains_key("encoder.down_blocks.0.resnets.0.conv1.weight") {
        let mut tensors = HashMap::new();
        for key in src.index().keys() {
            tensors.insert(key.clone(), src.load(key)?);
        }
        return Ok((model_config.clone(), tensors));
    }
    let tensors = materialize(src, &ldm::vae_plan_under(src, prefix)?)?;
    Ok((model_config.clone(), tensors))
}

/// The new VAE must make the latents the UNet was trained on: the same channels and
/// downsampling, and (for a single file) tensors of the model's VAE's shapes.
fn check_fits(
    path: &Path,
    config: &VaeConfig,
    tensors: &HashMap<String, Tensor>,
    model_config: &VaeConfig,
    model_tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let shown = path.display();
    if config.latent_channels != model_config.latent_channels {
        bail!(
            "the VAE {shown} makes {}-channel latents and this model's UNet takes {}",
            config.latent_channels,
            model_config.latent_channels
        );
    }
    let (ours, theirs) = (config.block_out_channels.len(), model_config.block_out_channels.len());
    if ours != theirs {
        let factor = |levels: usize| 1u64 << levels.saturating_sub(1).min(16);
        bail!("the VAE {shown} downsamples {}× and this model's VAE {}×", factor(ours), factor(theirs));
    }
    // A single file was read with the model's config: its tensors must be the model's shapes.
    if !path.is_dir() {
        let mut keys: Vec<&String> = model_tensors.keys().collect();
        keys.sort();
        for key in keys {
            let want = model_tensors[key].size();
            match tensors.get(key) {
                None => bail!("the VAE {shown} has no `{key}`, which this model's VAE has"),
                Some(t) if t.size() != want => {
                    bail!("the VAE {shown} does not fit this model: `{key}` is {:?}, the model's is {want:?}", t.size())
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = tensors.keys().find(|k| !model_tensors.contains_key(*k)) {
            bail!("the VAE {shown} has `{extra}`, which this model's VAE does not");
        }
    }
    Ok(())
}
