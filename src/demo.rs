//! `dreambooth demo`: a tiny Stable-Diffusion-shaped model built deterministically
//! (no download), written as a diffusers folder, then sampled on the CPU. It shows
//! the whole stack working on any machine in seconds.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::Device;

use crate::checkpoint::export_diffusers::{write_diffusers_folder, ModelParts};
use crate::checkpoint::single_file_scheduler;
use crate::model::attention::AttentionBackend;
use crate::model::config::{ClipConfig, PerBlock, UNetConfig, VaeConfig};
use crate::model::init::{random_clip, random_unet, random_vae};
use crate::pipeline::{save_png, SampleRequest, StableDiffusion};
use crate::tokenizer::ClipTokenizer;

/// Seed of the demo model's weights: the same model on every machine.
const DEMO_WEIGHTS_SEED: u64 = 20261125;

/// SD 1.x's layout at a few percent of its width: two UNet levels, a three-level
/// VAE (factor 4), a two-layer CLIP text encoder on OpenAI's vocabulary.
pub fn demo_configs() -> (UNetConfig, VaeConfig, ClipConfig) {
    let unet = UNetConfig {
        block_out_channels: vec![32, 64],
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        layers_per_block: PerBlock::One(1),
        attention_head_dim: PerBlock::One(8),
        cross_attention_dim: PerBlock::One(64),
        sample_size: 16,
        ..UNetConfig::default()
    };
    let vae = VaeConfig {
        block_out_channels: vec![32, 64, 64],
        down_block_types: vec!["DownEncoderBlock2D".into(); 3],
        up_block_types: vec!["UpDecoderBlock2D".into(); 3],
        layers_per_block: 1,
        sample_size: 64,
        ..VaeConfig::default()
    };
    let clip = ClipConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 1,
        projection_dim: 64,
        pad_token_id: 49407,
        ..ClipConfig::default()
    };
    (unet, vae, clip)
}

/// Writes the demo model to `dir` unless a complete one is there already.
pub fn ensure_demo_model(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.join("model_index.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let (unet_config, vae_config, text_config) = demo_configs();
    let unet = random_unet(&unet_config, DEMO_WEIGHTS_SEED)?;
    let vae = random_vae(&vae_config, DEMO_WEIGHTS_SEED + 1)?;
    let text_encoder = random_clip(&text_config, DEMO_WEIGHTS_SEED + 2)?;
    let tokenizer = ClipTokenizer::openai()?;
    let write_tokenizer = |d: &Path| tokenizer.save_folder(d);
    write_diffusers_folder(
        dir,
        &ModelParts {
            unet_config: &unet_config,
            vae_config: &vae_config,
            text_config: &text_config,
            scheduler_config: &single_file_scheduler(),
            unet: &unet,
            vae: &vae,
            text_encoder: &text_encoder,
            write_tokenizer: &write_tokenizer,
        },
    )
    .context("cannot write the demo model")?;
    Ok(dir.to_path_buf())
}

pub fn demo_command(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the demo folder {}", dir.display()))?;
    let model_dir = ensure_demo_model(&dir.join("model"))?;
    eprintln!("demo model: {} (tiny, random weights, SD 1.x layout)", model_dir.display());
    let sd = StableDiffusion::load(&model_dir, None, Device::Cpu, AttentionBackend::Default)?;
    let req = SampleRequest {
        prompt: "a photo of sks dog".into(),
        negative: String::new(),
        seed: 42,
        steps: 20,
        sampler: "dpmpp-2m".into(),
        guidance: 7.5,
        width: sd.default_size(),
        height: sd.default_size(),
        clip_skip: 1,
    };
    let bar = crate::pipeline::progress_bar(req.steps as u64);
    let started = std::time::Instant::now();
    let image = sd.text_to_image(&req, |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let out = dir.join("sample.png");
    save_png(&image, &out)?;
    println!(
        "wrote {} ({}x{}, {} steps of {} in {:.2} s)",
        out.display(),
        req.width,
        req.height,
        req.steps,
        req.sampler,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
