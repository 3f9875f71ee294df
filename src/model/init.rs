//! Deterministic random weights for the tiny built-in demo model: each network is
//! built once from a generating [`Weights`] store, so the keys and shapes come from
//! the model code itself (see [`Weights::random`] for the scales).

use std::collections::HashMap;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::attention::AttentionBackend;
use super::clip::ClipTextTransformer;
use super::config::{ClipConfig, UNetConfig, VaeConfig};
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;
use super::weights::Weights;

fn collect(w: &Weights) -> HashMap<String, Tensor> {
    w.parameters().into_iter().collect()
}

/// Float32 CPU weights of a UNet with `cfg`, by diffusers key.
pub fn random_unet(cfg: &UNetConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let w = Weights::random("UNet", seed, Device::Cpu, Kind::Float);
    UNet2DConditionModel::new(&w, cfg, AttentionBackend::Default)?;
    Ok(collect(&w))
}

/// Float32 CPU weights of a VAE with `cfg`, by diffusers key.
pub fn random_vae(cfg: &VaeConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let w = Weights::random("VAE", seed, Device::Cpu, Kind::Float);
    AutoencoderKL::new(&w, cfg)?;
    Ok(collect(&w))
}

/// Float32 CPU weights of a CLIP text encoder with `cfg`, by key without `text_model.`.
pub fn random_clip(cfg: &ClipConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let w = Weights::random("text encoder", seed, Device::Cpu, Kind::Float);
    ClipTextTransformer::new(&w, cfg, false)?;
    Ok(collect(&w))
}
