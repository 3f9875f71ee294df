//! `dreambooth generate`: one image from a model file, a diffusers folder or a
//! run directory (its checkpoint over its source model), as diffusers'
//! pipelines draw it.

use anyhow::Context;
use tch::{Device, Kind};

use crate::checkpoint::load_model;
use crate::error::usage;
use crate::model::attention::AttentionBackend;
use crate::pipeline::{progress_bar, save_png, SampleRequest, StableDiffusion};

/// `generate` uses the fused SDPA kernel (`attention: default`), as diffusers'
/// pipeline does by default: the same attention without materialising the score matrix.
const GENERATE_ATTENTION: AttentionBackend = AttentionBackend::Default;

/// `dreambooth generate`.

pub fn generate_command(args: &crate::cli::GenerateArgs) -> anyhow::Result<()> {
    use crate::scheduler::SAMPLER_NAMES;
    // Cheap checks first, so a typo does not cost a model load.
    if let Some(name) = args.scheduler.as_ref().filter(|s| !SAMPLER_NAMES.contains(&s.as_str())) {
        return Err(usage(format!("--scheduler {name} is not one of {}", SAMPLER_NAMES.join(", "))));
    }
    if let Some(g) = args.guidance.filter(|g| !g.is_finite()) {
        return Err(usage(format!("--guidance {g} is not a number")));
    }
    if args.steps == 0 {
        return Err(usage("--steps must be at least 1"));
    }
    if !args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(usage(format!("--out {}: generate writes PNG images; give a name ending in .png", args.out.display())));
    }
    if let Some(n) = args.max_token_length.filter(|n| ![75, 150, 225].contains(n)) {
        return Err(usage(format!("--max-token-length {n} must be 75, 150 or 225")));
    }
    if args.lora_weight.len() > args.lora.len() {
        return Err(usage(format!(
            "{} --lora-weight values for {} --lora files: give one weight per file, in the same order",
            args.lora_weight.len(),
            args.lora.len()
        )));
    }
    if let Some(w) = args.lora_weight.iter().find(|w| !w.is_finite()) {
        return Err(usage(format!("--lora-weight {w} is not a number")));
    }
    let run_dir = crate::train::export::is_run_dir(&args.model);
    if args.step.is_some() && !run_dir {
        return Err(usage(format!("--step applies to run directories, and {} is not one", args.model.display())));
    }
    if run_dir && args.model_config.is_some() {
        return Err(usage("--model-config does not apply to a run directory (its source model is read as it was for training)"));
    }
    let max = crate::config::validate::MAX_RESOLUTION;
    for (flag, side) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = side.filter(|&v| v > max) {
            return Err(usage(format!("{flag} {v} is above {max}, the largest side this program draws")));
        }
    }
    let device = crate::device::parse_device(&args.device, false)?;
    if args.device == "auto" && device == Device::Cpu {
        if let Some(why) = crate::device::unusable_gpu() {
            eprintln!("warning: --device auto samples on the CPU, because {why}");
        }
    }
    // A run samples as its previews did: with the layer it trained against, at its resolution.
    let run_config = if run_dir { Some(crate::config::load_run_config(&args.model.join("config.yaml"))?) } else { None };
    check_fit(args, run_config.as_ref(), device)?;
    let mut loaded = if run_dir {
        // The run's checkpoint over its source model (with the run's VAE), as `export` would write it.
        crate::train::export::load_run_model(&args.model, args.step)?
    } else {
        load_model(&args.model, args.model_config.as_deref())?
    };
    if let Some(vae) = &args.vae {
        crate::checkpoint::vae::replace_vae(&mut loaded, vae)?;
    }
    let kind = if device.is_cuda() { Kind::Half } else { Kind::Float };
    let mut sd = StableDiffusion::from_loaded(loaded, device, kind, GENERATE_ATTENTION)?;
    for warning in run_config.iter().flat_map(|c| crate::run::source::changed_since_start(&args.model, c)) {
        eprintln!("warning: {warning}");
    }
    let clip_skip = match (args.clip_skip, &run_config) {
        (Some(n), _) => n,
        (None, Some(run)) => run.training.clip_skip,
        (None, None) => 1,
    };
    if clip_skip < 1 || clip_skip > sd.text.layers() {
        return Err(usage(format!(
            "--clip-skip {clip_skip} must be between 1 (the last layer) and the text encoder's {} layers",
            sd.text.layers()
        )));
    }
    sd.text.max_token_length = match (args.max_token_length, &run_config) {
        (Some(n), _) => n,
        (None, Some(run)) => run.training.max_token_length as usize,
        (None, None) => 75,
    };
    for (flag, text) in [("--prompt", &args.prompt), ("--negative", &args.negative)] {
        if let Some(warning) = sd.cut_prompt_warning(flag, text, "--max-token-length 150 or 225") {
            eprintln!("warning: {warning}");
        }
    }
    for (i, lora) in args.lora.iter().enumerate() {
        let weight = args.lora_weight.get(i).copied().unwrap_or(1.0);
        let layers = sd.merge_lora(lora, weight)?;
        eprintln!("merged {} at weight {weight} ({layers} layers)", lora.display());
    }
    let default_size = run_config.as_ref().map(|run| run.resolution).unwrap_or_else(|| sd.default_size());
    let width = args.width.unwrap_or(default_size);
    let height = args.height.unwrap_or(default_size);
    sd.check_size(width, height)?;
    if let Some(dir) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the folder {}", dir.display()))?;
    }
    let (family_sampler, family_guidance) = sd.architecture.default_sampling();
    let sampler = args.scheduler.clone().unwrap_or_else(|| family_sampler.to_string());
    let guidance = args.guidance.unwrap_or(family_guidance);
    let req = SampleRequest {
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        seed: args.seed,
        steps: args.steps,
        sampler: sampler.clone(),
        guidance,
        width,
        height,
        clip_skip,
    };
    let bar = progress_bar(args.steps as u64);
    let image = sd.text_to_image(&req, |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    save_png(&image, &args.out)?;
    eprintln!("wrote {} ({width}x{height}, {} steps of {}, seed {})", args.out.display(), args.steps, sampler, args.seed);
    Ok(())
}

/// The fit check before the model loads (src/vram/fit.rs): the weights in the
/// dtypes `generate` uses and the UNet's and VAE's activations at the size asked
/// (or the default one) against what the device has. Skipped where the model's
/// shapes cannot be read without loading it (its loader then says why).
fn check_fit(args: &crate::cli::GenerateArgs, run: Option<&crate::config::RunConfig>, device: Device) -> anyhow::Result<()> {
    if args.force {
        return Ok(());
    }
    let shapes = match run {
        Some(run) => crate::vram::ModelShapes::for_run(run),
        None => crate::vram::ModelShapes::from_checkpoint(&args.model),
    };
    let Ok(shapes) = shapes else { return Ok(()) };
    let default = run.map_or(shapes.native_size, |r| r.resolution);
    let (width, height) = (args.width.unwrap_or(default), args.height.unwrap_or(default));
    if width <= 0 || height <= 0 {
        return Ok(());
    }
    // Classifier-free guidance runs the prompt and the negative prompt as one batch of 2.
    let plan = crate::vram::SamplingPlan { width, height, batch: 2, half: device.is_cuda(), attention: GENERATE_ATTENTION };
    crate::vram::fit::check_sampling(&shapes, &plan, device, false)
}
