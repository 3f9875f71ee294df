//! The fit check: before `train`, `resume` or `generate` allocates anything large
//! (decoded images, weights, activations), the estimator's peak for the run or
//! the drawing is compared with what the device has: a GPU's free memory (NVML),
//! or on the CPU the kernel's `MemAvailable` (and a container's memory limit). A
//! run that cannot fit is refused in one sentence (exit 2) with the preset or
//! setting that would fit, instead of filling the machine's memory until the
//! kernel kills it (taking other people's jobs on a shared server with it).
//! `--force` or `training.skip_fit_check: true` start anyway.
//!
//! The CPU side is lenient: the estimator counts the tensors, not the process's
//! own few hundred MB, so only a run that would clearly run out is refused.

use tch::Device;

use super::estimate::{estimate, estimate_sampling, with_cuda_overhead, SamplingPlan};
use super::model::ModelShapes;
use super::{tier_bytes, with_preset, Plan};
use crate::config::presets::builtin_for;
use crate::config::schema::{Optimizer, RunConfig, Training};
use crate::error::usage;

/// `DREAMBOOTH_MEMORY_AVAILABLE=BYTES`: what the fit check takes the device to
/// have instead of asking it (tests, and checking a config for a smaller machine).
const AVAILABLE_ENV: &str = "DREAMBOOTH_MEMORY_AVAILABLE";

/// The largest micro-batch the estimator is evaluated at; larger ones are scaled
/// from it (the formulas multiply sizes, which would overflow far beyond it).
const MAX_ESTIMATED_BATCH: i64 = 1024;

/// Bytes in words: GiB with one decimal, MiB below 1 GiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    }
}

/// What the device can give a run now.
#[derive(Debug, Clone, PartialEq)]
pub struct Room {
    pub bytes: u64,
    /// "the NVIDIA H200 has 120.3 GiB free", "this machine has 20.1 GiB of memory available".
    pub what: String,
}

/// The memory free on `device`, or `None` where it cannot be told (no NVML).
pub fn room(device: Device) -> Option<Room> {
    if let Some(bytes) = std::env::var(AVAILABLE_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Room { bytes, what: format!("{} are available ({AVAILABLE_ENV})", size(bytes)) });
    }
    match device {
        Device::Cuda(index) => {
            let gpu = super::probe::probe_cuda(index)?;
            let free = gpu.total_bytes.saturating_sub(gpu.used_bytes);
            Some(Room { bytes: free, what: format!("the {} has {} free of {}", gpu.name, size(free), size(gpu.total_bytes)) })
        }
        _ => cpu_room(),
    }
}

/// The kernel's MemAvailable, or less where a container's memory limit (cgroup
/// v2 or v1) leaves less.
fn cpu_room() -> Option<Room> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|v| v.trim().parse::<u64>().ok());
    let limited = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ]
    .iter()
    .find_map(|(limit, usage)| Some(read(limit)?.saturating_sub(read(usage)?)))
    .filter(|&left| left < available);
    Some(match limited {
        Some(left) => Room { bytes: left, what: format!("this container's memory limit leaves {}", size(left)) },
        None => Room { bytes: available, what: format!("this machine has {} of memory available", size(available)) },
    })
}

/// What a training run needs on `device`: on CUDA the estimator's peak with the
/// CUDA context and the allocator's slack; on the CPU the peak plus the VAE,
/// which `cache_latents` takes off a GPU but leaves in the machine's memory.
pub fn run_need(config: &RunConfig, shapes: &ModelShapes, device: Device) -> u64 {
    let mut plan = Plan::from_config(config);
    let batch = plan.batch;
    plan.batch = batch.min(MAX_ESTIMATED_BATCH);
    let mut e = estimate(shapes, &plan);
    if batch > plan.batch {
        // Everything but the weights grows with the batch; counting all of it is on the safe side.
        e.peak = e.peak.saturating_mul((batch / plan.batch) as u64 + 1);
    }
    if device.is_cuda() {
        with_cuda_overhead(e.peak)
    } else {
        let vae: u64 = shapes.vae_encoder.iter().chain(&shapes.vae_decoder).flat_map(|l| &l.params).map(|p| p.numel()).sum();
        e.peak + if plan.cache_latents { vae * 4 } else { 0 }
    }
}

/// The device a config trains on, its room and the model's shapes; `None` where
/// any is unknown (the loader then gives its own error, or nothing is checked).
fn run_context(config: &RunConfig) -> Option<(Device, Room, ModelShapes)> {
    let device = crate::device::parse_device(&config.device, true).ok()?;
    let room = room(device)?;
    let shapes = ModelShapes::for_run(config).ok()?;
    Some((device, room, shapes))
}

/// `train` and `resume`: refuses (exit 2) a run whose estimate is above what
/// the device has, unless `force` or `training.skip_fit_check`. Class images
/// are counted (the estimate's sampling phase, with prior preservation).
pub fn check_run(config: &RunConfig, force: bool) -> anyhow::Result<()> {
    if force || config.training.skip_fit_check {
        return Ok(());
    }
    let Some((device, room, shapes)) = run_context(config) else { return Ok(()) };
    let need = run_need(config, &shapes, device);
    if need <= room.bytes {
        return Ok(());
    }
    let memory = if device.is_cuda() { "GPU memory" } else { "memory" };
    Err(usage(format!(
        "this run needs about {} of {memory} by the estimate (`dreambooth vram` itemises it) and {}; {}, or --force \
         (or `training.skip_fit_check: true`) starts it anyway",
        size(need),
        room.what,
        what_fits(config, &shapes, device, room.bytes)
    )))
}

/// The preset or setting that brings `config` under `room` bytes, in words. On a
/// GPU the largest of the family's presets that fits (at the run's own
/// resolution); then, for a resolution above the family's own size (a likely
/// typo), the largest resolution that fits; then memory savers one upon the
/// other (gradient checkpointing, 8-bit AdamW, LoRA); then any smaller resolution.
pub fn what_fits(config: &RunConfig, shapes: &ModelShapes, device: Device, room: u64) -> String {
    let need = |c: &RunConfig| run_need(c, shapes, device);
    if device.is_cuda() {
        // The largest tier that fits: it trades the least speed for memory.
        let mut best: Option<(&str, u64, u64)> = None;
        for name in builtin_for(&shapes.family) {
            let (Some(tier), Ok(mut c)) = (tier_bytes(name), with_preset(config, name)) else { continue };
            c.resolution = config.resolution;
            let n = need(&c);
            if n <= room && best.is_none_or(|(_, _, t)| tier > t) {
                best = Some((name, n, tier));
            }
        }
        if let Some((name, n, _)) = best {
            return format!("`preset: {name}` would fit ({})", size(n));
        }
    }
    let smaller_resolution = |c: &RunConfig| {
        let mut c = c.clone();
        let mut resolution = (config.resolution - 1) / 64 * 64;
        while resolution >= 64 {
            c.resolution = resolution;
            let n = need(&c);
            if n <= room {
                return Some(format!("`resolution: {resolution}` would fit ({})", size(n)));
            }
            resolution -= 64;
        }
        None
    };
    if config.resolution > shapes.family.default_resolution() {
        if let Some(fix) = smaller_resolution(config) {
            return fix;
        }
    }
    type Saver = (&'static str, fn(&mut Training));
    let t = &config.training;
    let savers: Vec<Saver> = [
        (!t.gradient_checkpointing, ("`training.gradient_checkpointing: true`", (|t| t.gradient_checkpointing = true) as fn(&mut Training))),
        (t.optimizer == Optimizer::Adamw, ("`training.optimizer: adamw_8bit`", |t| t.optimizer = Optimizer::Adamw8bit)),
        (!t.use_lora && !t.train_imagic_only && !t.use_ema, ("`training.use_lora: true`", |t| t.use_lora = true)),
    ]
    .into_iter()
    .filter_map(|(applies, saver)| applies.then_some(saver))
    .collect();
    let with = |chosen: &[&Saver]| {
        let mut c = config.clone();
        chosen.iter().for_each(|(_, apply)| apply(&mut c.training));
        need(&c)
    };
    // Savers one upon the other until the run fits; then those it fits without are left out.
    for k in 1..=savers.len() {
        let mut chosen: Vec<&Saver> = savers[..k].iter().collect();
        if with(&chosen) > room {
            continue;
        }
        let mut i = 0;
        while i + 1 < chosen.len() {
            let mut fewer = chosen.clone();
            fewer.remove(i);
            if with(&fewer) <= room {
                chosen = fewer;
            } else {
                i += 1;
            }
        }
        let names: Vec<&str> = chosen.iter().map(|(name, _)| *name).collect();
        let list = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => names.join(""),
        };
        return format!("{list} would fit ({})", size(with(&chosen)));
    }
    if let Some(fix) = smaller_resolution(config) {
        return fix;
    }
    let mut c = config.clone();
    c.resolution = 64;
    format!("no setting checked fits (even at `resolution: 64` it needs {})", size(need(&c)))
}

/// `generate`: refuses (exit 2) a drawing whose estimate is above what the
/// device has, unless `force`, naming the largest size of the same shape that fits.
pub fn check_sampling(shapes: &ModelShapes, plan: &SamplingPlan, device: Device, force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let Some(room) = room(device) else { return Ok(()) };
    let need = |p: &SamplingPlan| {
        let peak = estimate_sampling(shapes, p).peak;
        if device.is_cuda() { with_cuda_overhead(peak) } else { peak }
    };
    let n = need(plan);
    if n <= room.bytes {
        return Ok(());
    }
    let m = shapes.size_multiple.max(1);
    let smaller = (1..8i64).rev().find_map(|k| {
        let (w, h) = (plan.width * k / 8 / m * m, plan.height * k / 8 / m * m);
        let p = SamplingPlan { width: w, height: h, ..plan.clone() };
        (w >= m && h >= m && need(&p) <= room.bytes).then(|| format!("`--width {w} --height {h}` would fit ({})", size(need(&p))))
    });
    let fix = smaller.unwrap_or_else(|| {
        let weights = estimate_sampling(shapes, &SamplingPlan { width: m, height: m, ..plan.clone() }).resident;
        format!("no smaller size of that shape fits (the weights alone take {})", size(weights))
    });
    let memory = if device.is_cuda() { "GPU memory" } else { "memory" };
    Err(usage(format!(
        "drawing {}×{} needs about {} of {memory} by the estimate and {}; {fix}, or --force draws anyway",
        plan.width,
        plan.height,
        size(n),
        room.what
    )))
}
