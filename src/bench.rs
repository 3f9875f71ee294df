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
    let samples_per_step = u64::from(run.training.batch_size.max(1)) * u64::from(run.training.gradient_accumulation_steps.max(1));
    // A rank of `bench --nproc` joins its group before the model loads.
    let cuda = run.device.trim().starts_with("cuda") || (run.device.trim() == "auto" && Path::new("/dev/nvidiactl").exists());
    let group = crate::dist::group::join_from_env(cuda)?;
    let world = group.map_or(1, |g| g.world) as u64;

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
        // Every rank's rows: the global batch each step.
        "samples_per_s": (steps * samples_per_step * world) as f64 / elapsed,
        "world_size": world,
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
    // A rank of `bench --nproc`: rank 0's figures go to the launching process.
    match std::env::var_os(RANK_RESULT_VAR) {
        Some(path) if crate::dist::is_writer() => {
            std::fs::write(&path, line.to_string()).with_context(|| format!("cannot write {}", Path::new(&path).display()))?
        }
        Some(_) => {}
        None => println!("{line}"),
    }
    Ok(())
}

/// Where a rank of `bench --nproc` writes rank 0's line.
const RANK_RESULT_VAR: &str = "DREAMBOOTH_BENCH_RESULT";

/// `bench --nproc N`: the same benchmark alone, then as N data-parallel
/// processes (the `--nproc` launcher); one JSON line with the global samples/s
/// of both and the scaling efficiency (N processes' samples/s ÷ N × one's).
pub fn bench_several(nproc: usize, model: &Path, config: Option<&Path>, steps: Option<u64>, device: Option<&str>) -> anyhow::Result<()> {
    if nproc == 0 {
        return Err(crate::error::usage("--nproc must be at least 1"));
    }
    if std::env::var_os("WORLD_SIZE").is_some() {
        return Err(crate::error::usage("--nproc starts its own processes: leave it out where torchrun (WORLD_SIZE) starts them"));
    }
    let scratch = tempfile::tempdir().context("cannot create a temporary folder for the benchmark")?;
    let mut args: Vec<std::ffi::OsString> = vec!["bench".into(), "--model".into(), model.as_os_str().to_owned()];
    if let Some(c) = config {
        args.extend(["--config".into(), c.as_os_str().to_owned()]);
    }
    if let Some(n) = steps {
        args.extend(["--steps".into(), n.to_string().into()]);
    }
    if let Some(d) = device {
        args.extend(["--device".into(), d.into()]);
    }
    let run_once = |n: usize| -> anyhow::Result<serde_json::Value> {
        let out = scratch.path().join(format!("result-{n}.json"));
        std::env::set_var(RANK_RESULT_VAR, &out);
        if n == 1 {
            // In a child too, so both are measured alike (a fresh process each).
            let exe = std::env::current_exe().context("cannot find this program's own path")?;
            let status = std::process::Command::new(exe).args(&args).status().context("cannot start the one-process benchmark")?;
            anyhow::ensure!(status.success(), "the one-process benchmark failed ({status})");
        } else {
            crate::dist::launch::launch(n, &args, None, None)?;
        }
        let text = std::fs::read_to_string(&out).with_context(|| format!("the benchmark wrote no {}", out.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let one = run_once(1)?;
    let several = run_once(nproc)?;
    std::env::remove_var(RANK_RESULT_VAR);
    let rate = |v: &serde_json::Value| v["samples_per_s"].as_f64().unwrap_or(0.0);
    let efficiency = if rate(&one) > 0.0 { rate(&several) / (nproc as f64 * rate(&one)) } else { 0.0 };
    let line = serde_json::json!({
        "nproc": nproc,
        "samples_per_s": rate(&several),
        "samples_per_s_one_process": rate(&one),
        "scaling_efficiency": efficiency,
        "one_process": one,
        "processes": several,
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
