//! VRAM: the peak-memory estimator (`dreambooth vram CONFIG.yaml`), the preset
//! list rated against the detected card (`dreambooth presets`), and the NVML probe.

pub mod activations;
pub mod estimate;
pub mod fit;
pub mod model;
pub mod probe;
pub mod shapes;

use std::path::Path;

use crate::config::presets::{builtin_for, load_preset};
use crate::model::family::Architecture;
use crate::config::schema::RunConfig;
pub use estimate::{estimate, estimate_sampling, with_cuda_overhead, Estimate, Plan, SamplingPlan};
pub use model::ModelShapes;
pub use probe::{probe, GpuMemory};

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: i64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// The estimate as a table: one line per component, grouped by phase, then the peak.
pub fn render(e: &Estimate, model: &str) -> String {
    let mut out = format!("Estimated peak VRAM for {model}\n\n");
    let width = e.rows.iter().map(|r| r.what.len()).max().unwrap_or(10).max(24);
    let dwidth = e.rows.iter().map(|r| r.detail.len()).max().unwrap_or(10);
    let mut phase = "";
    for r in &e.rows {
        if r.phase != phase {
            phase = r.phase;
            let extra = e.phases.iter().find(|(p, _)| *p == phase).map(|(_, b)| format!(" (+{})", gib(*b as i64)));
            out.push_str(&format!("{}{}\n", phase, extra.unwrap_or_default()));
        }
        out.push_str(&format!("  {:<width$}  {:<dwidth$}  {:>12}\n", r.what, r.detail, estimate::mib(r.bytes)));
    }
    out.push_str(&format!("\n  {:<width$}  {:<dwidth$}  {:>12}\n", "resident total", "", gib(e.resident as i64)));
    out.push_str(&format!(
        "  {:<width$}  {:<dwidth$}  {:>12}\n",
        "peak (allocated)",
        format!("during the {}", e.peak_phase),
        gib(e.peak as i64)
    ));
    out.push_str(&format!(
        "  {:<width$}  {:<dwidth$}  {:>12}\n",
        "card memory needed",
        "+ CUDA context and allocator slack",
        gib(with_cuda_overhead(e.peak) as i64)
    ));
    out
}

/// `dreambooth vram CONFIG.yaml`.
pub fn vram_command(config: &Path) -> anyhow::Result<()> {
    // A run directory is estimated from the config it trains with.
    let in_run_dir = config.join("config.yaml");
    let config = if config.is_dir() && in_run_dir.is_file() { in_run_dir.as_path() } else { config };
    let c = crate::config::load_run_config(config)?;
    let shapes = ModelShapes::for_run(&c)?;
    let e = estimate(&shapes, &Plan::from_config(&c));
    print!("{}", render(&e, &shapes.origin));
    let t = &c.training;
    let saves = crate::run::disk::checkpoint_saves(u64::from(t.steps_per_image), t.save_model_every_n_epochs);
    let at_once = crate::run::disk::checkpoints_on_disk(saves, t.keep_last_checkpoints);
    println!(
        "\ncheckpoints on disk: {} each, up to {at_once} at once: {}",
        crate::run::disk::size(e.checkpoint_bytes),
        crate::run::disk::size(e.checkpoint_bytes * at_once)
    );
    if let Some(gpu) = probe() {
        let need = with_cuda_overhead(e.peak);
        let free = gpu.total_bytes.saturating_sub(gpu.used_bytes);
        let verdict = if need <= gpu.total_bytes { "fits" } else { "does NOT fit" };
        println!(
            "\n{} ({} total, {} free now): {verdict}",
            gpu.name,
            gib(gpu.total_bytes as i64),
            gib(free as i64)
        );
        if let Some(why) = crate::device::unusable_gpu() {
            println!("warning: training runs on the CPU, because {why}");
        }
    }
    Ok(())
}

/// The tier a preset is named after, in bytes (`12gb`, `sdxl-12gb` → 12 GiB); `None` for `cpu`.
pub fn tier_bytes(name: &str) -> Option<u64> {
    let tier = name.rsplit('-').next().unwrap_or(name);
    tier.strip_suffix("gb").and_then(|n| n.parse::<u64>().ok()).map(|n| n << 30)
}

/// `config` with `preset`'s settings over its own (the estimate of "this run under that preset").
pub fn with_preset(config: &RunConfig, preset: &str) -> anyhow::Result<RunConfig> {
    let preset_value = load_preset(preset, Path::new("."))?;
    let own = serde_yaml::to_value(config)?;
    let merged = crate::config::load::merge(own, preset_value);
    let mut c: RunConfig = serde_yaml::from_value(merged)?;
    c.preset = Some(preset.to_string());
    Ok(c)
}

/// A minimal run at the family's own size with one instance concept (no prior preservation).
fn reference_run(family: &Architecture) -> RunConfig {
    let text = format!(
        "name: x\nsource_checkpoint: x\nresolution: {}\nconcepts:\n  - instance_data_dir: x\n    instance_prompt: a photo of sks dog\n",
        family.default_resolution()
    );
    crate::config::parse_run_config(&text, "the reference run", Path::new(".")).expect("the reference run parses")
}

/// The built-in presets made for the family of `shapes`, each with its estimated
/// peak (card memory needed) for `config` on `shapes`.
pub fn rate_presets(config: &RunConfig, shapes: &ModelShapes) -> Vec<(String, u64)> {
    builtin_for(&shapes.family)
        .filter_map(|name| {
            let c = with_preset(config, name).ok()?;
            Some((name.to_string(), with_cuda_overhead(estimate(shapes, &Plan::from_config(&c)).peak)))
        })
        .collect()
}

/// `dreambooth presets`.
pub fn presets_command() -> anyhow::Result<()> {
    let gpu = probe();
    match &gpu {
        Some(g) => println!(
            "GPU: {} ({} total, {} in use)\n",
            g.name,
            gib(g.total_bytes as i64),
            gib(g.used_bytes as i64)
        ),
        None => println!("No NVIDIA GPU found (no driver or no device): training runs on the CPU.\n"),
    }
    if let Some(why) = crate::device::unusable_gpu() {
        println!("warning: training runs on the CPU, because {why}\n");
    }
    // Each family's presets, rated on its usual model at its own size.
    for (family, model) in [(Architecture::Sd1, "SD 1.5"), (Architecture::Sdxl, "SDXL")] {
        let rated = rate_presets(&reference_run(&family), &ModelShapes::reference_for(&family));
        let needs = format!("{model} at {} needs", family.default_resolution());
        println!("{:<9}  {:>6}  {needs:>20}  fits", "preset", "tier");
        for (name, need) in rated {
            let tier = tier_bytes(&name).map(|b| format!("{} GB", b >> 30)).unwrap_or_else(|| "CPU".into());
            let fits = match (&gpu, tier_bytes(&name)) {
                (None, None) => "yes (CPU)",
                (None, Some(_)) => "-",
                (Some(_), None) => "",
                (Some(g), Some(_)) if need <= g.total_bytes => "yes",
                (Some(_), Some(_)) => "no",
            };
            println!("{name:<9}  {tier:>6}  {:>20}  {fits}", gib(need as i64));
        }
        println!();
    }
    println!("SD 1.x/2.x models take the plain tiers, SDXL models the sdxl- ones; cpu suits either.");
    println!("A config picks one with `preset: NAME`; its own keys override the preset's.");
    println!("`dreambooth vram CONFIG.yaml` estimates a run's own peak, component by component.");
    Ok(())
}
