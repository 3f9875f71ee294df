//! Measures one real training step on the CPU (UNet forward, MSE, backward,
//! AdamW step, gradients set to none; float32, explicit attention, frozen text
//! encoder, cached latents) and prints the measured memory next to the
//! estimator's figures, as one JSON line.
//!
//!     cargo bench --bench vram_measure -- MODEL_DIR RESOLUTION BATCH [fused]
//!
//! VRAM_MEASURE_THREADS sets libtorch's CPU threads (default 2).
//!
//! `fused`: the step as `training.fused_backward` runs it (each tensor updated
//! by AdamW inside the backward pass and its gradient freed; no clipping), and
//! the estimate for that config.
//!
//! Memory is the process's resident set (Linux /proc): the peak (VmHWM, reset
//! through /proc/self/clear_refs) over the resident size before the model was
//! loaded. glibc is told to map every block over 64 KiB on its own
//! (MALLOC_MMAP_THRESHOLD_, set by re-executing) so freed tensors leave the
//! resident set at once and it tracks live bytes.

use std::path::Path;

use dreambooth::checkpoint::load_model;
use dreambooth::model::attention::AttentionBackend;
use dreambooth::conditioning::{SizeIds, TextConditioner};
use dreambooth::model::unet::UNet2DConditionModel;
use dreambooth::model::weights::Weights;
use dreambooth::config::schema::Optimizer as OptimizerKind;
use dreambooth::train::adamw::AdamWConfig;
use dreambooth::train::fused::FusedBackward;
use dreambooth::train::optimizer::Optimizer;
use dreambooth::vram::{estimate, ModelShapes, Plan};
use tch::{Device, Kind, Tensor};

fn status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        let exe = std::env::current_exe()?;
        let status = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MALLOC_MMAP_THRESHOLD_", "65536")
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let model = args.first().map(String::as_str).unwrap_or("tests/fixtures/models/tiny-sd1");
    let resolution: i64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let batch: i64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let fused_mode = match args.get(3).map(String::as_str) {
        None => false,
        Some("fused") => true,
        Some(other) => anyhow::bail!("the fourth argument is `fused` or nothing, not {other:?}"),
    };
    // VRAM_MEASURE_THREADS: libtorch's CPU threads (default 2).
    let threads = std::env::var("VRAM_MEASURE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)).sum(Kind::Float);
    let rss0 = status("VmRSS:");

    let mut loaded = load_model(Path::new(model), None)?;
    let factor = loaded.vae_config.downsampling_factor();
    loaded.vae.clear(); // cache_latents: the VAE is not kept
    let unet_w = Weights::new("UNet", std::mem::take(&mut loaded.unet), Device::Cpu, Kind::Float);
    let unet = UNet2DConditionModel::new(&unet_w, &loaded.unet_config, AttentionBackend::Explicit)?;
    unet_w.release();
    let uses_text_time = loaded.architecture.uses_text_time();
    let (text, stores) =
        TextConditioner::build(std::mem::take(&mut loaded.text_encoders), uses_text_time, false, Device::Cpu, Kind::Float, Path::new(model))?;
    stores.iter().for_each(Weights::release);
    let params = unet_w.parameters();
    for (_, p) in &params {
        let _ = p.shallow_clone().set_requires_grad(true);
    }
    let trained: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
    let mut adamw = Optimizer::new(OptimizerKind::Adamw, unet_w.parameters(), AdamWConfig::default());
    let mut fused = if fused_mode { Some(FusedBackward::install(&adamw)?) } else { None };
    let ids = Tensor::from_slice(&text.tokenize("")).view([1, -1]).repeat([batch, 1]);
    let states = tch::no_grad(|| text.conditioning(&text.encode_ids(&ids, 1), &[SizeIds::plain(resolution, resolution)]));
    let latent = resolution / factor;
    let latents = Tensor::randn([batch, loaded.unet_config.in_channels, latent, latent], (Kind::Float, Device::Cpu));

    let step = |adamw: &mut Optimizer, fused: &mut Option<FusedBackward>| -> anyhow::Result<()> {
        let noise = latents.randn_like();
        let t = Tensor::from_slice(&vec![500i64; batch as usize]);
        let pred = unet.forward(&(&latents + &noise), &t, &states);
        let loss = pred.mse_loss(&noise, tch::Reduction::Mean);
        match fused.as_mut() {
            Some(f) => f.run(adamw, 1e-6, || loss.backward())?,
            None => {
                loss.backward();
                adamw.step(1e-6);
            }
        }
        for (_, p) in &params {
            dreambooth::rng::set_grad_to_none(p);
        }
        Ok(())
    };
    step(&mut adamw, &mut fused)?; // creates the optimizer state
    let rss1 = status("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5")?;
    let start = std::time::Instant::now();
    step(&mut adamw, &mut fused)?;
    let secs = start.elapsed().as_secs_f64();
    let hwm = status("VmHWM:");

    let shapes = ModelShapes::from_checkpoint(Path::new(model))?;
    let fused_keys = if fused_mode { "  fused_backward: true\n  max_grad_norm: 0\n" } else { "" };
    let text = format!(
        "name: m\nsource_checkpoint: {model}\nresolution: {resolution}\nconcepts:\n  - instance_data_dir: d\n    instance_prompt: p\ntraining:\n  batch_size: {batch}\n  mixed_precision: \"no\"\n  attention: explicit\n  save_preview_every_n_epochs: 0\n{fused_keys}"
    );
    let c = dreambooth::config::parse_run_config(&text, "measure", Path::new("."))?;
    let e = estimate(&shapes, &Plan::from_config(&c));
    let step_est = e.phases.iter().find(|(p, _)| *p == "training step").map(|(_, b)| *b).unwrap_or(0);
    let measured_resident = rss1.saturating_sub(rss0);
    let measured_step = hwm.saturating_sub(rss1);
    let measured_peak = hwm.saturating_sub(rss0);
    let err = |est: u64, got: u64| if got == 0 { 0.0 } else { (est as f64 - got as f64) / got as f64 * 100.0 };
    println!(
        "{{\"model\":\"{model}\",\"resolution\":{resolution},\"batch\":{batch},\"fused_backward\":{fused_mode},\"trained_params\":{trained},\"step_s\":{secs:.3},\
\"measured_resident\":{measured_resident},\"estimated_resident\":{},\"resident_err_pct\":{:.1},\
\"measured_step\":{measured_step},\"estimated_step\":{step_est},\"step_err_pct\":{:.1},\
\"measured_peak\":{measured_peak},\"estimated_peak\":{},\"peak_err_pct\":{:.1}}}",
        e.resident,
        err(e.resident, measured_resident),
        err(step_est, measured_step),
        e.peak,
        err(e.peak, measured_peak)
    );
    Ok(())
}
