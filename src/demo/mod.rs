//! `dreambooth demo`: a tiny Stable-Diffusion-shaped model built deterministically
//! (no download), written as a diffusers folder, then trained DreamBooth-style on
//! a few drawn images on the CPU, with progress and previews: the whole stack
//! working on any machine in about a minute.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::checkpoint::export_diffusers::write_diffusers_folder;
use crate::checkpoint::{Architecture, LoadedModel, LoadedTextEncoder, ModelFormat, TokenizerSource};
use crate::checkpoint::single_file_scheduler;
use crate::model::config::{ClipConfig, PerBlock, UNetConfig, VaeConfig};
use crate::model::init::{random_clip, random_unet, random_vae};

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
    let role = Architecture::Sd1.text_encoders()[0];
    let model = LoadedModel {
        unet_config,
        vae_config,
        scheduler_config: single_file_scheduler(),
        unet,
        vae,
        text_encoders: vec![LoadedTextEncoder {
            role,
            config: text_config,
            tokenizer: TokenizerSource::for_role(&role),
            tensors: text_encoder,
        }],
        force_zeros_for_empty_prompt: false,
        architecture: Architecture::Sd1,
        source: dir.to_path_buf(),
        format: ModelFormat::Diffusers,
    };
    write_diffusers_folder(dir, &model).context("cannot write the demo model")?;
    Ok(dir.to_path_buf())
}

/// The demo's subject: a red disc on a blue background, a little shifted per image.
fn write_demo_images(dir: &Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for k in 0..n {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let (cx, cy) = (24.0 + 5.0 * k as f64, 30.0 + 2.0 * k as f64);
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            if d < 15.0 { image::Rgb([230, 40, 30]) } else { image::Rgb([20, 40, 200]) }
        });
        let path = dir.join(format!("disc-{k}.png"));
        img.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `dreambooth demo`: the tiny model, four drawn images of a subject, a short
/// DreamBooth run on the CPU with progress and previews, then a sample.
pub fn demo_command(dir: &Path, plain: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the demo folder {}", dir.display()))?;
    let model_dir = ensure_demo_model(&dir.join("model"))?;
    eprintln!("demo model: {} (tiny, random weights, SD 1.x layout)", model_dir.display());
    let images = dir.join("images");
    write_demo_images(&images, 4)?;
    let run_dir = dir.join("runs").join("demo");
    if run_dir.exists() {
        // The demo's own previous run: start afresh.
        std::fs::remove_dir_all(&run_dir).with_context(|| format!("cannot remove the old demo run {}", run_dir.display()))?;
    }
    let yaml = "name: demo\nsource_checkpoint: model\noutput_dir: runs\ndevice: cpu\nseed: 1234\nresolution: 64\n\
         concepts:\n  - instance_data_dir: images\n    instance_prompt: a photo of sks disc\n    sample_prompts: [a photo of sks disc]\n\
         training:\n  steps_per_image: 12\n  learning_rate: 2.0e-4\n  lr_scheduler: constant_with_warmup\n  lr_warmup_steps: 4\n\
         \x20 mixed_precision: 'no'\n  save_model_every_n_epochs: 6\n  save_preview_every_n_epochs: 6\n  keep_last_checkpoints: 2\n\
         sampling:\n  scheduler: ddim\n  steps: 12\n  guidance: 3.0\n  seed: 42\n".to_string();
    let config_path = dir.join("demo.yaml");
    std::fs::write(&config_path, yaml).with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = crate::config::load_run_config(&config_path)?;
    let started = std::time::Instant::now();
    let mut trainer = crate::train::trainer::Trainer::start(config, crate::train::trainer::TrainOptions { plain, quiet: false, ..Default::default() })?;
    trainer.run()?;
    let samples: Vec<_> = std::fs::read_dir(run_dir.join("samples"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    let newest = samples.iter().max();
    println!(
        "trained {} steps in {:.1} s; run directory {}{}",
        trainer.step,
        started.elapsed().as_secs_f64(),
        run_dir.display(),
        newest.map(|p| format!("; newest preview {}", p.display())).unwrap_or_default()
    );
    println!("see it with: dreambooth attach {}", run_dir.display());
    Ok(())
}
