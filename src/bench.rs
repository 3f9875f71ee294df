//! `dreambooth bench`: training speed and peak memory as one JSON line.
//!
//! It times the trainer's own optimizer step (`Trainer::train_step`: latents,
//! noise, text encoder, UNet, loss, backward, clipping, optimizer) on a
//! throw-away run: a few generated images in a temporary folder, the settings
//! of `--config` (a run config; its name, concepts and outputs are replaced) or
//! the defaults. Warm-up steps come first and are not counted, as in
//! `benches/diffusers_train_step.py`, which measures diffusers' step the same way.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tch::Device;

use crate::config::schema::{Concept, RunConfig};
use crate::train::trainer::{TrainOptions, Trainer};

/// Untimed steps first: kernel selection, allocator growth, lazy initialisation,
/// and with CUDA graphs the eager warm-up and the capture (the third micro-batch).
const WARMUP_STEPS: u64 = 3;
const DEFAULT_STEPS: u64 = 5;
/// Images in the throw-away instance folder at least (one epoch = images ÷ batch
/// steps); more when a batch is bigger, so every step trains a full batch.
const BENCH_IMAGES: usize = 4;

pub fn bench_command(model: &Path, config: Option<&Path>, steps: Option<u64>, device: Option<&str>) -> anyhow::Result<()> {
    let steps = steps.unwrap_or(DEFAULT_STEPS);
    if steps == 0 {
        return Err(crate::error::usage("--steps must be at least 1"));
    }
    let scratch = tempfile::tempdir().context("cannot create a temporary folder for the benchmark")?;
    let mut run = match config {
        Some(path) => crate::config::load_run_config(path)?,
        None => default_config(model)?,
    };
    run.source_checkpoint = std::fs::canonicalize(model).with_context(|| format!("{} does not exist", model.display()))?;
    if let Some(d) = device {
        // Checked here so that the error names the flag, not the config key.
        crate::device::parse_device(d, false)?;
        run.device = d.to_string();
    }
    let images = scratch.path().join("images");
    let per_step = (run.training.batch_size.max(1) * run.training.gradient_accumulation_steps.max(1)) as usize;
    let image_count = BENCH_IMAGES.max(per_step);
    write_images(&images, run.resolution as u32, image_count)?;
    run.name = "bench".into();
    run.output_dir = scratch.path().join("runs");
    run.concepts = vec![Concept {
        instance_data_dir: images,
        instance_prompt: "a photo of sks dog".into(),
        instance_token: String::new(),
        class_token: String::new(),
        class_prompt: String::new(),
        class_data_dir: None,
        num_class_images: 0,
        class_negative_prompt: String::new(),
        class_guidance_scale: None,
        class_infer_steps: None,
        prior_loss_weight: 1.0,
        sample_prompts: Vec::new(),
        validation_data_dir: None,
        validation_split: 0.0,
        mask_dir: None,
    }];
    let t = &mut run.training;
    // Enough epochs for warm-up + timed steps; nothing saved or sampled meanwhile.
    let per_epoch = (image_count as u64).div_ceil(u64::from(t.batch_size.max(1))) / u64::from(t.gradient_accumulation_steps.max(1));
    t.steps_per_image = ((WARMUP_STEPS + steps).div_ceil(per_epoch.max(1)) + 1) as u32;
    t.save_model_every_n_epochs = 0;
    t.save_preview_every_n_epochs = 0;
    t.pause_after_n_epochs = 0;
    let settings = serde_json::to_value(&run.training)?;
    let resolution = run.resolution;

    let mut trainer = Trainer::start(run, TrainOptions { plain: false, quiet: true, ..Default::default() })?;
    let device = trainer.device;
    for _ in 0..WARMUP_STEPS {
        trainer.train_step()?;
    }
    synchronize(device);
    crate::device::reset_cuda_peak(device);
    let busy = if device.is_cuda() { crate::vram::probe::BusySampler::start() } else { None };
    let start = Instant::now();
    // As the trainer does (`defer_loss_readback`): a step's loss is read once
    // the next step is queued.
    let mut pending: Option<tch::Tensor> = None;
    let mut loss = 0.0;
    for _ in 0..steps {
        let queued = trainer.queue_train_step()?;
        if !trainer.defer_loss_readback {
            loss = queued.double_value(&[]);
        } else if let Some(previous) = pending.replace(queued) {
            loss = previous.double_value(&[]);
        }
    }
    if let Some(last) = pending {
        loss = last.double_value(&[]);
    }
    synchronize(device);
    let elapsed = start.elapsed().as_secs_f64();
    let gpu_busy_percent = busy.and_then(crate::vram::probe::BusySampler::finish);
    let (peak, peak_kind) = match crate::device::cuda_memory(device) {
        Some(m) => (m.allocated_peak, "cuda_max_memory_allocated"),
        None => (peak_rss_bytes(), "cpu_peak_rss"),
    };
    let trained: i64 = trainer.trainable().iter().map(|(_, p)| p.numel() as i64).sum();
    let line = serde_json::json!({
        "steps_per_s": steps as f64 / elapsed,
        "peak_mem_bytes": peak,
        "peak_kind": peak_kind,
        "loss": loss,
        "trained_params": trained,
        "model": model.display().to_string(),
        "resolution": resolution,
        "device": format!("{device:?}"),
        "steps": steps,
        "gpu_busy_percent": gpu_busy_percent,
        "cuda_graphs": trainer.cuda_graph_state(),
        "threads": tch::get_num_threads(),
        "precision": trainer.precision.describe(),
        "training": settings,
    });
    println!("{line}");
    Ok(())
}

/// The defaults of a run config, at the model's native resolution.
fn default_config(model: &Path) -> anyhow::Result<RunConfig> {
    let loaded = crate::checkpoint::load_model(model, None)?;
    let resolution = loaded.unet_config.sample_size * loaded.vae_config.downsampling_factor();
    let yaml = format!(
        "name: bench\nsource_checkpoint: {}\nresolution: {resolution}\n\
         concepts:\n  - instance_data_dir: replaced-by-bench\n    instance_prompt: a photo of sks dog\n",
        serde_json::to_string(&model.display().to_string())?
    );
    crate::config::parse_run_config(&yaml, "the benchmark's default config", Path::new("."))
}

/// Smooth random-looking pictures (a seeded pattern, so every bench sees the same data).
fn write_images(dir: &Path, size: u32, count: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for k in 0..count {
        let f = (k + 1) as f64;
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            let (u, v) = (x as f64 / size as f64, y as f64 / size as f64);
            let c = |phase: f64| (127.5 * (1.0 + (6.0 * f * u + 4.0 * v + phase).sin())) as u8;
            image::Rgb([c(0.0), c(2.0), c(4.0)])
        });
        let path = dir.join(format!("bench-{k}.png"));
        img.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// The process's peak resident memory (what `/usr/bin/time -v` calls maximum RSS).
fn peak_rss_bytes() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    unsafe { usage.assume_init() }.ru_maxrss * 1024
}
