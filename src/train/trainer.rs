//! The DreamBooth training loop over a run directory: prepares the data (class
//! images generated when missing, latents cached), runs optimizer steps, and
//! between steps honours the epoch-based settings (checkpoints, previews,
//! pauses), control requests (stop, pause, resume, save, sample) and signals.
//! It only reports through the run directory (events.jsonl, train.log,
//! samples/, checkpoints/), so any process can follow it. Its checkpoints are
//! in trainer/persist.rs, previews and class images in trainer/samples.rs,
//! Imagic's two stages in trainer/imagic_run.rs, the plan it logs and its
//! warnings in trainer/plan.rs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use super::checkpoint as ckpt;
use super::cuda_graph::{GraphInputs, StepGraphs};
use super::ema::Ema;
use super::fused::FusedBackward;
use super::lr_schedule::LrSchedule;
use super::modules;
use super::optimizer::Optimizer;
use super::precision::{LossScaler, Precision};
use super::step::{draw_noise, masked_denoising_loss, ExampleWeights, LossInputs, PredictionType};
use crate::config::schema::{MixedPrecision, RunConfig};
use crate::model::lora::LoraNetwork;
use crate::conditioning::{PromptEmbeds, SizeIds};
use crate::data::buckets::Buckets;
use crate::data::dataset::{self, next_batch, BatchPlan, DataState, Dataset};
use crate::error::usage;
use crate::pipeline::{ModelParameters, StableDiffusion};
use crate::rng::{set_grad_to_none, CpuRng};
use crate::run::control::{self, Request};
use crate::run::events::{Event, EventLog};
use crate::run::lock::RunLock;
use crate::scheduler::NoiseSchedule;

/// How long the other ranks wait for rank 0 to make the class images.
/// How often (in steps) a data-parallel run gathers each rank's memory for the events.
const RANK_MEMORY_EVERY: u64 = 10;
const CLASS_IMAGES_WAIT: Duration = Duration::from_secs(24 * 3600);

/// How long the other ranks wait while rank 0 is paused (a pause from the
/// dashboard has no end of its own).
const PAUSE_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Optimizer steps of a run: epochs × the micro-batches of an epoch (ceil(images ÷
/// batch), counted per frame with aspect-ratio buckets: `Dataset::batches_per_epoch`),
/// of which `gradient_accumulation_steps` make one step. The one definition of the count.
pub fn total_steps(steps_per_image: u32, batches_per_epoch: u64, accumulation: u32) -> u64 {
    u64::from(steps_per_image) * batches_per_epoch / u64::from(accumulation.max(1))
}

/// The frames instance images are first loaded in, before the model is read.
fn early_buckets(config: &RunConfig) -> Buckets {
    Buckets::for_run(config, crate::data::buckets::source_size_multiple(&config.source_checkpoint))
}

/// The run directory of a config.
pub fn run_dir_of(config: &RunConfig) -> PathBuf {
    config.output_dir.join(&config.name)
}

/// The batch of one optimizer micro-step over every rank: `batch_size` is per
/// process (src/dist/).
pub fn global_batch(t: &crate::config::schema::Training) -> u32 {
    t.batch_size * crate::dist::world_size() as u32
}

/// Settings that cannot train with `world` processes, as one sentence.
pub fn check_world(config: &RunConfig, world: usize) -> anyhow::Result<()> {
    let t = &config.training;
    if world > 1 && t.fused_backward {
        return Err(usage("`training.fused_backward` updates each tensor inside the backward pass, before the processes could average its gradient, so it cannot train with --nproc or torchrun"));
    }
    if world > 1 && t.train_imagic_only {
        return Err(usage("`training.train_imagic_only` trains on one image, so it cannot train with --nproc or torchrun"));
    }
    Ok(())
}

/// Settings this build cannot honour yet: an explicit error, never ignored.
pub fn check_supported(config: &RunConfig) -> anyhow::Result<()> {
    check_world(config, crate::dist::world_size())?;
    let t = &config.training;
    if t.train_imagic_only && t.use_lora {
        return Err(usage("`training.train_imagic_only` fine-tunes the whole UNet; it cannot be combined with `use_lora`"));
    }
    if t.train_imagic_only && !t.train_unet {
        return Err(usage("`training.train_imagic_only` fine-tunes the UNet in its second stage; it cannot be combined with `train_unet: false`"));
    }
    if t.use_lora && t.use_ema {
        return Err(usage(
            "`training.use_ema` cannot be combined with `use_lora`: EMA averages the UNet's weights, which a LoRA run leaves frozen",
        ));
    }
    // Before a run directory is made for it: a mistyped path must not leave one behind.
    if !config.source_checkpoint.exists() {
        return Err(usage(format!("`source_checkpoint` {} does not exist", config.source_checkpoint.display())));
    }
    if let Some(vae) = config.vae.as_ref().filter(|v| !v.exists()) {
        return Err(usage(format!("`vae` {} does not exist", vae.display())));
    }
    validation::check(config)?;
    crate::data::holdout::check(config)?;
    crate::data::masks::check(config)?;
    Ok(())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// One line per step on stdout.
    pub plain: bool,
    /// Log lines go only to train.log (detached runs, tests).
    pub quiet: bool,
    /// Called (with the run directory) once the model has loaded, before class
    /// images are made: a detached run lets its waiting parent return then, so
    /// the wizard's dashboard follows the class images instead of a blank wait.
    pub before_class_images: Option<fn(&Path) -> anyhow::Result<()>>,
    /// `--force`: start even when the memory estimate is above what the device has.
    pub force: bool,
}

/// A stop (request or signal) that came before training began, while class
/// images were being made: nothing to checkpoint, and `resume` goes on from
/// the images already made. Callers treat it as a clean stop.
#[derive(Debug)]
pub struct StoppedBeforeTraining;

impl std::fmt::Display for StoppedBeforeTraining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped before training began")
    }
}

impl std::error::Error for StoppedBeforeTraining {}

/// `resume` of a run that has trained all its steps, without `--steps-per-image`
/// asking for more: nothing to do. Callers say so and exit cleanly.
#[derive(Debug)]
pub struct AlreadyFinished {
    pub message: String,
}

impl std::fmt::Display for AlreadyFinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AlreadyFinished {}

/// What the preparation before the first step reports to and listens to.
pub(crate) struct Preparation<'a> {
    pub events: &'a mut EventLog,
    pub stop_flag: &'a AtomicBool,
    pub before_class_images: Option<fn(&Path) -> anyhow::Result<()>>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// A stop request or a signal: checkpointed, then stopped.
    Stopped,
}

/// train.log, echoed to stderr unless quiet.
struct RunLog {
    file: std::fs::File,
    echo: bool,
}

impl RunLog {
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.file, "{text}");
        if self.echo {
            eprintln!("{text}");
        }
    }

    /// A line for train.log only: an error the caller returns, and `main` prints once.
    fn line_to_file(&mut self, text: &str) {
        let _ = writeln!(self.file, "{text}");
    }
}

pub struct Trainer {
    pub config: RunConfig,
    pub run_dir: PathBuf,
    /// Held by the process that writes the run (rank 0 of several).
    _lock: Option<RunLock>,
    pub device: Device,
    pub precision: Precision,
    pub sd: StableDiffusion,
    pub params: ModelParameters,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    pub data: Dataset,
    pub data_state: DataState,
    optimizer: Optimizer,
    /// The adapters a LoRA run trains (their tensors are the optimizer's).
    pub lora: Option<LoraNetwork>,
    lr_schedule: LrSchedule,
    pub scaler: Option<LossScaler>,
    pub ema: Option<Ema>,
    noise_rng: CpuRng,
    data_rng: CpuRng,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    pub micro_batches: u64,
    pub batches_per_epoch: u64,
    pub text_encoder_steps: u64,
    /// Steps whose update was skipped (fp16 overflow).
    pub skipped_steps: u64,
    events: EventLog,
    log: RunLog,
    options: TrainOptions,
    stop_flag: Arc<AtomicBool>,
    last_lr: f64,
    last_checkpoint_step: Option<u64>,
    last_sample_step: Option<u64>,
    resumed_from: Option<u64>,
    progress: Option<indicatif::ProgressBar>,
    /// `train_imagic_only`: the stages' step counts.
    imagic_plan: Option<imagic_run::ImagicPlan>,
    /// Imagic's (target, optimised) embeddings once stage (a) has begun.
    imagic: Option<(Tensor, Tensor)>,
    /// Imagic's encoded image and stage (a) optimiser, for checkpoints.
    imagic_progress: Option<imagic_run::ImagicProgress>,
    /// Stop (with a checkpoint) once this many steps are done: how a script or a
    /// test cuts a run at a chosen step.
    pub stop_at_step: Option<u64>,
    /// Read a step's loss only once the next step is queued, so that on a GPU
    /// the device never idles while the CPU launches the optimizer's kernels
    /// (reading a device value waits for all queued work). On by default on CUDA;
    /// the CPU gains nothing from it.
    pub defer_loss_readback: bool,
    /// CUDA graphs for the micro-batches (`DREAMBOOTH_CUDA_GRAPHS=1` on CUDA,
    /// without fp16 loss scaling; see train::cuda_graph).
    graphs: Option<StepGraphs>,
    /// `training.fused_backward`: the hooks that update each tensor in the backward pass.
    fused: Option<FusedBackward>,
    /// Several processes: the hooks that start averaging gradient buckets during
    /// the backward pass (dist/overlap.rs); None averages after it.
    overlap: Option<crate::dist::overlap::OverlappedAveraging>,
    /// Several processes: each rank's memory in use, gathered every
    /// RANK_MEMORY_EVERY steps, for rank 0's next step record (a `ranks` event).
    rank_memory: Option<Vec<u64>>,
    /// A frozen text encoder's output for each prompt (token ids) it has encoded.
    /// While the text encoder does not train, a prompt's hidden states are the
    /// same every step (no dropout, fixed weights), so each is computed once, as
    /// diffusers' `--pre_compute_text_embeddings` does; emptied whenever the text
    /// encoder's weights change (end of its training phase, checkpoint load).
    frozen_text_states: HashMap<Vec<i64>, PromptEmbeds>,
    /// The step whose loss is not read yet (with `defer_loss_readback`).
    pending_step: Option<PendingStep>,
    /// When the last step record was written (its interval is the step's time
    /// when records follow one another, deferred).
    last_record_at: Option<Instant>,
    /// `training.validate_every_n_epochs`: the held-out sets and the last pass (trainer/validation.rs).
    validation: validation::Validation,
    /// A pause request reached rank 0 of several: every rank pauses at the next step.
    pause_wanted: bool,
    /// The step has passed its micro-batches and is updating the weights: an
    /// out-of-memory from here on cannot be retried (trainer/oom.rs).
    updating: bool,
}

/// Whether a run directory holds anything a later `resume` could use: a checkpoint
/// or class images.
fn made_anything(run_dir: &Path) -> bool {
    !ckpt::list_checkpoints(run_dir).is_empty() || holds_a_file(&run_dir.join("class_images"))
}

/// Whether there is a file anywhere under `dir` (class images sit in per-concept folders).
fn holds_a_file(dir: &Path) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
        let path = e.path();
        if path.is_dir() { holds_a_file(&path) } else { path.is_file() }
    })
}

/// Checks a fresh run's inputs and makes its directory: nothing is written
/// until the config and every image have been read.
fn prepare_new_run_dir(config: &RunConfig) -> anyhow::Result<PathBuf> {
    let out = &config.output_dir;
    std::fs::create_dir_all(out)
        .map_err(|e| usage(format!("cannot create the output_dir {}: {e}", out.display())))?;
    let run_dir = run_dir_of(config);
    if run_dir.exists() {
        let busy = std::fs::read_dir(&run_dir).map(|mut d| d.next().is_some()).unwrap_or(true);
        if busy {
            if RunLock::is_held(&run_dir) {
                return Err(usage(format!("{} is in use by another trainer", run_dir.display())));
            }
            return Err(usage(format!(
                "the run directory {} already exists; continue it with `dreambooth resume {}` or choose another name",
                run_dir.display(),
                run_dir.display()
            )));
        }
    }
    std::fs::create_dir_all(&run_dir).map_err(|e| usage(format!("cannot create the run directory {}: {e}", run_dir.display())))?;
    // Probe: an output folder we cannot write into must fail now, in one sentence.
    let probe = run_dir.join(".write-test");
    if let Err(e) = std::fs::write(&probe, b"") {
        let _ = std::fs::remove_dir(&run_dir);
        return Err(usage(format!("cannot write into the output_dir {}: {e}", out.display())));
    }
    let _ = std::fs::remove_file(probe);
    Ok(run_dir)
}

impl Trainer {
    /// Starts a new run from a loaded config: checks the data, creates the run
    /// directory (config.yaml, lock), loads the model, prepares the data.
    pub fn start(config: RunConfig, options: TrainOptions) -> anyhow::Result<Trainer> {
        check_supported(&config)?;
        // Before the images are decoded and anything is written (src/vram/fit.rs).
        crate::vram::fit::check_run(&config, options.force)?;
        let instances = dataset::load_instances(&config, &early_buckets(&config))?;
        let device = crate::device::parse_device(&config.device, true)?;
        // With several processes only rank 0 writes the run directory (src/dist/).
        if !crate::dist::is_writer() {
            let run_dir = run_dir_of(&config);
            return Trainer::build(config, run_dir, None, device, instances, options, None);
        }
        let run_dir = prepare_new_run_dir(&config)?;
        if let Err(e) = crate::run::source::record(&run_dir, &config) {
            let _ = std::fs::remove_dir_all(&run_dir);
            return Err(e);
        }
        let lock = Some(RunLock::acquire(&run_dir)?);
        let yaml = serde_yaml::to_string(&config)?;
        std::fs::write(run_dir.join("config.yaml"), yaml)
            .with_context(|| format!("cannot write {}", run_dir.join("config.yaml").display()))?;
        std::fs::create_dir_all(run_dir.join("samples"))?;
        let started = Trainer::build(config, run_dir.clone(), lock, device, instances, options, None);
        if let Err(e) = &started {
            // A start that failed before it made anything (a model that does not load, a VAE
            // that does not fit) leaves no run directory: fixing the config and running
            // `train` again must work. Class images made, or a stop, keep it for `resume`.
            if !e.is::<StoppedBeforeTraining>() && !made_anything(&run_dir) {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
        }
        started
    }

    /// Continues the run of `run_dir` from its newest complete checkpoint.
    pub fn resume(run_dir: &Path, options: TrainOptions) -> anyhow::Result<Trainer> {
        Trainer::resume_with(run_dir, options, None)
    }

    /// `resume`, and with `steps_per_image` the run trains on to that many epochs
    /// instead (the method's "raise the steps until it looks right": a finished
    /// run goes on from its last checkpoint). The new count is written into the
    /// run's config.yaml once the checkpoint has loaded.
    pub fn resume_with(run_dir: &Path, options: TrainOptions, steps_per_image: Option<u32>) -> anyhow::Result<Trainer> {
        crate::run::require_run_dir(run_dir)?;
        let config_path = run_dir.join("config.yaml");
        let mut config = crate::config::load_run_config(&config_path)?;
        let planned = config.training.steps_per_image;
        if let Some(n) = steps_per_image.filter(|&n| n != planned) {
            if config.training.train_imagic_only {
                return Err(usage(
                    "--steps-per-image cannot change an Imagic run: its two stages were planned from the steps it started with",
                ));
            }
            if n == 0 {
                return Err(usage("--steps-per-image must be at least 1"));
            }
            config.training.steps_per_image = n;
        }
        check_supported(&config)?;
        let lock = if crate::dist::is_writer() { Some(RunLock::acquire(run_dir)?) } else { None };
        crate::vram::fit::check_run(&config, options.force)?;
        // A run that ended before its first checkpoint (killed while it made its
        // class images, or in its first steps) starts over from step 0: exactly the
        // run it would have been, with the class images it had made kept.
        let newest = ckpt::list_checkpoints(run_dir).last().cloned();
        let step = newest.as_ref().map_or(0, |(s, _)| *s);
        let instances = dataset::load_instances(&config, &early_buckets(&config))?;
        let wanted = config.training.steps_per_image;
        let accumulation = config.training.gradient_accumulation_steps;
        // Checked before the model loads: the batches an epoch come from the images.
        let batches = crate::data::buckets::batches_per_epoch(instances.iter().map(dataset::Example::frame), global_batch(&config.training));
        let total = match config.training.train_imagic_only {
            true => imagic_run::ImagicPlan::from_training(&config.training).total(),
            false => total_steps(wanted, batches, accumulation),
        };
        // The fewest epochs that still leave a step: n·batches ≥ (step + 1)·accumulation.
        let fewest = ((step + 1) * u64::from(accumulation.max(1))).div_ceil(batches.max(1));
        // Names the newest checkpoint's damage and the earlier one left, for a resume that cannot load it.
        let damaged = |e: &anyhow::Error, dir: &Path| {
            let mut msg = crate::error::one_line(e).trim_end_matches('.').to_string();
            if let Some((earlier, _)) = ckpt::list_checkpoints(run_dir).into_iter().rev().find(|(s, _)| *s < step) {
                msg.push_str(&format!(
                    "; to resume from the checkpoint of step {earlier} instead, move {} out of the checkpoints folder",
                    dir.display()
                ));
            }
            anyhow::anyhow!(msg)
        };
        // A cut-short file is found from its header now, before the model loads and
        // the latents are encoded (minutes at SD sizes); also for a finished run,
        // which has nothing to train but whose damaged final checkpoint is worth saying.
        if let Some((_, dir)) = &newest {
            for file in std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()) {
                if file.extension().is_some_and(|e| e == "safetensors") {
                    crate::checkpoint::safetensors_file::SafetensorsFile::open(&file).map_err(|e| damaged(&e, dir))?;
                }
            }
        }
        if wanted == planned && step >= total && newest.is_some() {
            let more = if config.training.train_imagic_only {
                String::new()
            } else {
                format!("; `dreambooth resume {} --steps-per-image {fewest}` (or more) trains on", run_dir.display())
            };
            return Err(AlreadyFinished { message: format!("{} has trained all its {total} steps{more}", run_dir.display()) }.into());
        }
        if wanted != planned && step >= total {
            return Err(usage(format!(
                "--steps-per-image {wanted} makes {total} steps and the run is at step {step} already: give {fewest} or more"
            )));
        }
        let device = crate::device::parse_device(&config.device, true)?;
        let mut t = Trainer::build(config, run_dir.to_path_buf(), lock, device, instances, options, newest.clone())?;
        let planned_total = total_steps(planned, t.batches_per_epoch, accumulation);
        let expected_total = if t.imagic_plan.is_some() { t.total_steps } else { planned_total };
        let Some((_, dir)) = newest else {
            t.log.line(&format!("{} has no checkpoint yet: training it from step 0", run_dir.display()));
            if wanted != planned {
                t.rewrite_config(&config_path, planned, wanted, planned_total)?;
            }
            return Ok(t);
        };
        if let Err(e) = t.load_checkpoint(&dir, expected_total) {
            // A checkpoint that is fine but was made by another number of processes.
            if crate::error::exit_code(&e) == 2 {
                return Err(e);
            }
            // A damaged newest checkpoint (disk fault, a copy cut short): say
            // which earlier one is left rather than silently going back to it.
            return Err(damaged(&e, &dir));
        }
        t.log.line(&format!("resumed from {} (step {step})", dir.display()));
        if wanted != planned && crate::dist::is_writer() {
            t.rewrite_config(&config_path, planned, wanted, planned_total)?;
        }
        Ok(t)
    }

    /// `resume --steps-per-image`: the run's config.yaml records the new count.
    fn rewrite_config(&mut self, config_path: &Path, planned: u32, wanted: u32, planned_total: u64) -> anyhow::Result<()> {
        let yaml = serde_yaml::to_string(&self.config)?;
        crate::checkpoint::write::write_atomically(config_path, |out| Ok(std::io::Write::write_all(out, yaml.as_bytes())?))?;
        self.log.line(&format!(
            "steps per image {planned} → {wanted}: {planned_total} → {} steps (written to config.yaml); the LR schedule now spans them",
            self.total_steps
        ));
        Ok(())
    }

    fn build(
        config: RunConfig,
        run_dir: PathBuf,
        lock: Option<RunLock>,
        device: Device,
        instances: Vec<dataset::Example>,
        options: TrainOptions,
        resume: Option<(u64, PathBuf)>,
    ) -> anyhow::Result<Trainer> {
        // The other ranks of several write nothing: their logs go nowhere.
        let writer = crate::dist::is_writer();
        let log_path = if writer { run_dir.join("train.log") } else { PathBuf::from("/dev/null") };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut log = RunLog { file, echo: !options.quiet && writer };
        let mut events = if writer { EventLog::open(&run_dir)? } else { EventLog::discard()? };
        // Signals are caught from here on: a stop while class images are made ends cleanly.
        let stop_flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
            signal_hook::flag::register(sig, stop_flag.clone()).context("cannot install the signal handlers")?;
        }
        let resumed_from = resume.as_ref().map(|(s, _)| *s);
        events.write(&Event::named(
            "loading",
            serde_json::json!({ "source": config.source_checkpoint.display().to_string(), "resumed_from": resumed_from }),
        ))?;
        let result = crate::error::catch_panics(&format!("loading the model for {}", run_dir.display()), || {
            let mut preparation =
                Preparation { events: &mut events, stop_flag: &stop_flag, before_class_images: options.before_class_images };
            Trainer::build_inner(config, &run_dir, device, instances, &mut log, &mut preparation)
        })
        // A signal while the model loaded: stop before the first step, with nothing to save.
        .and_then(|parts| if stop_flag.load(Ordering::Relaxed) { Err(StoppedBeforeTraining.into()) } else { Ok(parts) });
        let parts = match result {
            Ok(p) => p,
            Err(e) if e.is::<StoppedBeforeTraining>() => {
                let step = resumed_from.unwrap_or(0);
                let message = format!(
                    "stopped before training began; `dreambooth resume {}` goes on (with the class images made so far)",
                    run_dir.display()
                );
                let _ = events.write(&Event::named("stopped", serde_json::json!({ "step": step, "message": message })));
                log.line(&message);
                return Err(e);
            }
            Err(e) => {
                let msg = crate::error::one_line(&e);
                let _ = events.write(&Event::named("error", serde_json::json!({ "message": msg })));
                log.line_to_file(&format!("error: {msg}"));
                return Err(e);
            }
        };
        let (config, precision, sd, params, data, optimizer, lora, ema) = parts;
        let t = &config.training;
        let imagic_plan = t.train_imagic_only.then(|| imagic_run::ImagicPlan::from_training(t));
        let (total, batches_per_epoch, lr_steps) = match &imagic_plan {
            // Both stages count as steps; the LR schedule covers the UNet stage.
            Some(plan) => (plan.total(), 1, plan.unet_steps),
            None => {
                let batches = data.batches_per_epoch(global_batch(t));
                let total = total_steps(t.steps_per_image, batches, t.gradient_accumulation_steps);
                (total, batches, total)
            }
        };
        let lr_schedule = LrSchedule {
            kind: t.lr_scheduler,
            base_lr: t.learning_rate,
            warmup_steps: u64::from(t.lr_warmup_steps),
            total_steps: lr_steps,
            power: t.lr_power,
            lr_end: t.lr_end,
            cycles: t.lr_cycles,
        };
        let scaler = (t.mixed_precision == MixedPrecision::Fp16).then(LossScaler::default);
        let schedule = NoiseSchedule::new(&sd.scheduler_config)?.to_device(device);
        let prediction = PredictionType::from_config(&sd.scheduler_config)?;
        let seed = config.seed;
        let text_encoder_steps = modules::text_encoder_steps(t, total);
        let fused = if t.fused_backward && imagic_plan.is_none() { Some(FusedBackward::install(&optimizer)?) } else { None };
        let overlap = match crate::dist::current() {
            Some(g) if crate::dist::overlap::wanted() => Some(crate::dist::overlap::OverlappedAveraging::install(g, optimizer.params())?),
            _ => None,
        };
        let mut trainer = Trainer {
            data_state: DataState::new(config.concepts.len()),
            run_dir,
            _lock: lock,
            device,
            precision,
            sd,
            params,
            schedule,
            prediction,
            data,
            optimizer,
            lora,
            lr_schedule,
            scaler,
            ema,
            noise_rng: CpuRng::new(seed),
            data_rng: CpuRng::new(seed.wrapping_add(1)),
            step: 0,
            total_steps: total,
            micro_batches: 0,
            batches_per_epoch,
            text_encoder_steps,
            skipped_steps: 0,
            events,
            log,
            options,
            stop_flag,
            last_lr: 0.0,
            last_checkpoint_step: None,
            last_sample_step: None,
            resumed_from,
            progress: None,
            imagic_plan,
            imagic: None,
            imagic_progress: None,
            stop_at_step: None,
            defer_loss_readback: device.is_cuda(),
            pending_step: None,
            last_record_at: None,
            graphs: None,
            fused,
            overlap,
            rank_memory: None,
            frozen_text_states: HashMap::new(),
            validation: validation::Validation::default(),
            updating: false,
            pause_wanted: false,
            config,
        };
        trainer.describe_plan();
        trainer.describe_validation();
        trainer.start_cuda_graphs();
        Ok(trainer)
    }

    #[allow(clippy::type_complexity)]
    fn build_inner(
        config: RunConfig,
        run_dir: &Path,
        device: Device,
        instances: Vec<dataset::Example>,
        log: &mut RunLog,
        preparation: &mut Preparation,
    ) -> anyhow::Result<(RunConfig, Precision, StableDiffusion, ModelParameters, Dataset, Optimizer, Option<LoraNetwork>, Option<Ema>)> {
        let t = &config.training;
        super::precision::flush_denormals();
        let loaded = crate::checkpoint::vae::load_model_with_vae(&config.source_checkpoint, config.vae.as_deref())?;
        if let Some(vae) = &config.vae {
            log.line(&format!("VAE: {} (in place of the source's)", vae.display()));
        }
        // Float32 master weights; mixed precision is autocast around the forward pass.
        let (mut sd, params) = StableDiffusion::from_loaded_with_parameters(loaded, device, Kind::Float, t.attention)?;
        if t.train_imagic_only && sd.architecture.uses_text_time() {
            return Err(usage(format!(
                "`training.train_imagic_only` optimises SD 1.x/2.x prompt embeddings; this is an {} model",
                sd.architecture
            )));
        }
        let size_multiple = sd.size_multiple();
        if config.resolution % size_multiple != 0 {
            return Err(usage(format!(
                "`resolution` {} is not a multiple of {size_multiple}, which this model needs",
                config.resolution
            )));
        }
        let precision = Precision::new(t.mixed_precision, device);
        log.line(&precision.describe());
        for (i, c) in config.concepts.iter().enumerate() {
            let what = format!("concepts[{i}].instance_data_dir");
            if let Some(note) = dataset::unused_captions_note(&c.instance_data_dir, &what, &c.instance_prompt) {
                log.line(&note);
            }
        }
        for warning in plan::early_warnings(&config, run_dir, instances.len(), device) {
            log.line(&format!("warning: {warning}"));
            preparation.events.write(&Event::named("warning", serde_json::json!({ "message": warning })))?;
        }
        let buckets = Buckets::for_run(&config, size_multiple);
        // The images were framed before the model was read, with the multiple its
        // configs give (64 for a single file); frame them again if the model needs another.
        let instances = if buckets == early_buckets(&config) { instances } else { dataset::load_instances(&config, &buckets)? };
        // With several processes each makes its share of the class images (samples.rs).
        let classes = prepare_class_images(&config, run_dir, &sd, &instances, &buckets, log, preparation)?;
        let mut data = Dataset {
            instances,
            classes,
            prior_weights: config.concepts.iter().map(|c| c.prior_loss_weight).collect(),
        };
        let positions = sd.text.window();
        let max_tokens = t.max_token_length as usize;
        if max_tokens > positions.saturating_sub(2) && !max_tokens.is_multiple_of(positions.saturating_sub(2).max(1)) {
            return Err(usage(format!(
                "`training.max_token_length` {max_tokens} is not a whole number of this text encoder's {}-token windows",
                positions.saturating_sub(2)
            )));
        }
        // Class images were made as `generate` makes images; previews follow training.
        sd.text.max_token_length = max_tokens;
        let cut = data.tokenize(&sd.text);
        if let Some(first) = cut.first() {
            log.line(&format!(
                "{} prompts are longer than the {} tokens the text encoder reads (`training.max_token_length`) and are cut there, e.g. {first:?}",
                cut.len(),
                max_tokens.max(positions.saturating_sub(2))
            ));
        }
        if t.cache_latents {
            let vae = &sd.vae;
            let encode = |x: &Tensor| {
                let _guard = tch::no_grad_guard();
                let dist = vae.encode(&x.to_device(device));
                (dist.mean, dist.std)
            };
            data.cache_latents(&encode)?;
            if device.is_cuda() {
                move_parameters(&params.vae, Device::Cpu);
                log.line("latents cached; the VAE is off the GPU until previews need it");
            } else {
                log.line("latents cached");
            }
        }
        // The adapters' own generator: their initial values do not depend on the data.
        let trainable = modules::choose_trainable_parameters(t, &mut sd, &params, config.seed.wrapping_add(2))?;
        modules::set_trainable(&params, &trainable.params);
        // After class images and latents, which the source weights made in float32.
        let half = modules::half_storage(t);
        if let Some(kind) = precision.autocast.filter(|_| half.unet || half.text_encoder) {
            if half.unet {
                cast_parameters(&params.unet, kind);
                // Previews feed the UNet its own dtype.
                sd.kind = kind;
            }
            if half.text_encoder {
                for (_, list) in &params.text_encoders {
                    cast_parameters(list, kind);
                }
            }
            let which = match (half.unet, half.text_encoder) {
                (true, true) => "the frozen base UNet and text encoder are",
                (true, false) => "the frozen base UNet is",
                _ => "the frozen text encoder is",
            };
            log.line(&format!("{which} stored in {kind:?} (never trained, never saved)"));
        }
        if t.gradient_checkpointing {
            // Recompute each block's activations in backward instead of keeping them.
            sd.unet.set_gradient_checkpointing(true);
            if t.text_encoder_train_ratio > 0.0 {
                sd.text.set_gradient_checkpointing(true);
            }
        }
        let optimizer = Optimizer::from_training(trainable.params, t);
        let ema = t.use_ema.then(|| Ema::new(&params.unet, t.ema_decay));
        Ok((config, precision, sd, params, data, optimizer, trainable.lora, ema))
    }

    /// Turns CUDA graphs on when asked for (`DREAMBOOTH_CUDA_GRAPHS=1`, an
    /// experiment until its speed is measured) and the run allows them.
    fn start_cuda_graphs(&mut self) {
        if std::env::var("DREAMBOOTH_CUDA_GRAPHS").map_or(true, |v| v != "1") || crate::dist::world_size() > 1 {
            return;
        }
        let refusal = if !self.device.is_cuda() {
            Some("they need a CUDA device")
        } else if self.scaler.is_some() {
            Some("fp16 loss scaling changes the scale between steps (use bf16)")
        } else if self.imagic_plan.is_some() {
            Some("Imagic runs its own loop")
        } else if self.fused.is_some() {
            Some("`fused_backward` updates the weights inside the backward pass")
        } else {
            None
        };
        if let Some(why) = refusal {
            self.warn(&format!("DREAMBOOTH_CUDA_GRAPHS is set, but CUDA graphs stay off: {why}"));
            return;
        }
        match StepGraphs::new(self.device) {
            Ok(g) => {
                self.graphs = Some(g);
                let note = if self.config.training.set_grads_to_none {
                    "; gradients are zeroed in place instead of set to none (the graph writes into them)"
                } else {
                    ""
                };
                self.log.line(&format!("CUDA graphs: on, the micro-batch is captured after {} eager ones{note}", super::cuda_graph::WARMUP_MICRO_BATCHES));
            }
            Err(e) => self.warn(&format!("CUDA graphs stay off: {e}")),
        }
    }

    /// CUDA graph bookkeeping with capture and replay simulated by eager runs
    /// (`StepGraphs::simulated`), on any device: a test hook.
    pub fn simulate_cuda_graphs(&mut self) {
        self.graphs = Some(StepGraphs::simulated(self.device));
    }

    /// Whether CUDA graphs are in use: "off", "warming up", "captured" or "failed: …".
    pub fn cuda_graph_state(&self) -> String {
        match &self.graphs {
            None => "off".into(),
            Some(g) => g.state(),
        }
    }

    fn warn(&mut self, text: &str) {
        self.log.line(&format!("warning: {text}"));
        let _ = self.events.write(&Event::named("warning", serde_json::json!({ "message": text })));
    }

    /// Epochs completed so far.
    pub fn epochs_done(&self) -> u64 {
        self.micro_batches / self.batches_per_epoch.max(1)
    }

    pub fn text_encoder_training(&self) -> bool {
        self.step < self.text_encoder_steps
    }

    /// The optimizer's parameters by key (`unet.…`, `text_encoder.…`).
    pub fn trainable(&self) -> &[(String, Tensor)] {
        self.optimizer.params()
    }

    /// Stops training the text encoder once its share of the steps is done.
    fn apply_text_encoder_phase(&mut self) {
        if self.text_encoder_training() {
            return;
        }
        let mut changed = false;
        for (k, p) in self.optimizer.params() {
            if modules::is_text_encoder_key(k) && p.requires_grad() {
                let _ = p.set_requires_grad(false);
                set_grad_to_none(p);
                changed = true;
            }
        }
        // A captured step would still write the freed text-encoder gradients.
        if changed {
            self.frozen_text_states.clear();
            if let Some(g) = &mut self.graphs {
                g.clear();
            }
        }
    }

    /// One micro-batch's text encoders, UNet, loss (÷ `accum`) and backward, from
    /// inputs on the device or the CPU; returns the detached loss. The same code
    /// runs eagerly and under CUDA graph capture, so it queues only device work.
    /// `text_states`: the frozen text encoders' output for the batch, when cached.
    fn forward_backward(&self, b: &GraphInputs, text_states: Option<&PromptEmbeds>, te_training: bool, accum: u32) -> Tensor {
        let t = &self.config.training;
        let precision = self.precision;
        let text = match text_states {
            Some(states) => states.shallow_clone(),
            None => {
                let ids = b.ids.to_device(self.device);
                if te_training {
                    precision.autocast(|| self.sd.text.encode_ids(&ids, t.clip_skip)).map(|s| s.to_kind(Kind::Float))
                } else {
                    tch::no_grad(|| self.sd.text.encode_ids(&ids, t.clip_skip))
                }
            }
        };
        let conditioning = self.sd.text.conditioning_with_ids(&text, &b.time_ids);
        let inputs = LossInputs {
            latents: &b.latents,
            noise: &b.noise,
            timesteps: &b.timesteps,
            conditioning: &conditioning,
            coefficients: &b.coefficients,
        };
        let weights = b.loss_weights.as_ref();
        let out = masked_denoising_loss(&self.sd.unet, &self.schedule, self.prediction, t.min_snr_gamma, &inputs, weights, &|f| {
            precision.autocast(f)
        });
        let loss = &out.loss / f64::from(accum);
        if loss.requires_grad() {
            let scaled = match &self.scaler {
                Some(s) => s.scale_loss(&loss),
                None => loss.shallow_clone(),
            };
            scaled.backward();
        }
        loss.detach()
    }

    /// The frozen text encoders' conditioning for a micro-batch's prompts, one
    /// row per example, each encoded once and then taken from the cache.
    fn frozen_text_states(&mut self, item_ids: &[Vec<i64>], plan: &BatchPlan) -> PromptEmbeds {
        // Thousands of distinct captions would hold hundreds of MB on the card:
        // past this many prompts, new ones are encoded each time they come.
        const MAX_CACHED_PROMPTS: usize = 512;
        let _guard = tch::no_grad_guard();
        let clip_skip = self.config.training.clip_skip;
        let mut rows = Vec::with_capacity(item_ids.len());
        for (ids, shuffled) in item_ids.iter().zip(&plan.shuffled) {
            if let Some(states) = self.frozen_text_states.get(ids) {
                rows.push(states.shallow_clone());
                continue;
            }
            let input = crate::device::upload(&Tensor::from_slice(ids).view([1, -1]), self.device);
            let states = self.sd.text.encode_ids(&input, clip_skip);
            // A shuffled prompt seldom comes twice: not worth the memory.
            if shuffled.is_none() && self.frozen_text_states.len() < MAX_CACHED_PROMPTS {
                self.frozen_text_states.insert(ids.clone(), states.shallow_clone());
            }
            rows.push(states);
        }
        PromptEmbeds::cat(&rows)
    }

    /// The frozen text encoders' cached conditioning, by token ids.
    pub fn cached_text_states(&self) -> &HashMap<Vec<i64>, PromptEmbeds> {
        &self.frozen_text_states
    }

    /// Latents `[B, 4, h, w]` × scaling_factor for a micro-batch (sampled from the
    /// VAE's distribution with the noise generator).
    fn latents(&mut self, plan: &BatchPlan) -> Tensor {
        let _guard = tch::no_grad_guard();
        let scaling = self.sd.vae_config.scaling_factor;
        let cached = plan.items.first().is_some_and(|&(c, k, i, _)| self.data.example(c, k, i).cached.is_some());
        let z = if cached {
            let mut parts = Vec::new();
            for &(c, k, i, flip) in &plan.items {
                let (mean, std) = &self.data.example(c, k, i).cached.as_ref().expect("cached")[usize::from(flip)];
                let eps = crate::device::upload(&self.noise_rng.randn(&mean.size()), mean.device());
                parts.push(mean + std * eps);
            }
            Tensor::cat(&parts, 0)
        } else {
            let pixels = self.data.pixels(plan, self.device);
            self.sd.vae.encode(&pixels).sample(&mut self.noise_rng)
        };
        z * scaling
    }

    /// One optimizer step (gradient_accumulation_steps micro-batches); returns the mean loss.
    pub fn train_step(&mut self) -> anyhow::Result<f64> {
        Ok(self.queue_train_step()?.double_value(&[]))
    }

    /// `train_step` without reading the loss back: returns it as a 0-d tensor on
    /// the training device (on a GPU the step may still be running).
    pub fn queue_train_step(&mut self) -> anyhow::Result<Tensor> {
        fail_if_injected(self.step + 1);
        self.apply_text_encoder_phase();
        let t = self.config.training.clone();
        let accum = t.gradient_accumulation_steps.max(1);
        let te_training = self.text_encoder_training() && t.text_encoder_train_ratio > 0.0;
        let mut loss_sum = Tensor::zeros([], (Kind::Float, self.device));
        let (rank, world) = (crate::dist::rank(), crate::dist::world_size());
        for micro in 0..accum {
            fail_if_micro_batch_above_injected(t.batch_size);
            // Only the last micro-batch's backward pass averages (DDP's no_sync for the rest).
            if let Some(overlap) = self.overlap.as_mut().filter(|_| micro + 1 == accum) {
                overlap.arm();
            }
            // Every rank draws the whole global batch and its noise (the draws of one
            // process with world × batch_size), then trains on its own rows of it.
            let global = next_batch(
                &self.data,
                &mut self.data_state,
                &mut self.data_rng,
                global_batch(&t) as usize,
                t.random_flip,
                t.shuffle_tags,
            );
            let global_latents = self.latents(&global);
            let global_noise =
                draw_noise(&mut self.noise_rng, &global_latents.size(), self.schedule.num_train_timesteps(), t.offset_noise);
            let (plan, rows) = crate::dist::share::take_share(&global, rank, world);
            if rows.is_empty() {
                // An epoch's short last batch left this rank nothing: it adds no gradient.
                self.micro_batches += 1;
                continue;
            }
            let latents = global_latents.narrow(0, rows.start as i64, rows.len() as i64);
            let item_ids: Vec<Vec<i64>> = plan
                .items
                .iter()
                .zip(&plan.shuffled)
                .map(|(&(c, k, i, _), shuffled)| match shuffled {
                    Some(prompt) => self.sd.text.tokenize(prompt),
                    None => self.data.example(c, k, i).ids.clone(),
                })
                .collect();
            let sizes: Vec<SizeIds> =
                plan.items.iter().map(|&(c, k, i, flip)| self.data.example(c, k, i).size_ids(flip)).collect();
            let ids = Tensor::from_slice(&item_ids.concat()).view([plan.items.len() as i64, -1]);
            let narrow = |x: &Tensor| x.narrow(0, rows.start as i64, rows.len() as i64);
            let noise = crate::train::step::StepNoise { noise: narrow(&global_noise.noise), timesteps: narrow(&global_noise.timesteps) };
            let weights = ExampleWeights {
                prior: global.items.iter().map(|&(c, k, _, _)| c.then(|| self.data.prior_weights[k])).collect(),
            };
            // The global batch's loss weights: the ranks' mean of world × their rows' sum is the global loss.
            let coefficients = match world {
                1 => weights.coefficients_tensor(),
                _ => narrow(&weights.coefficients_tensor()) * world as f64,
            };
            let up = |x: &Tensor| crate::device::upload(x, self.device);
            // Masked loss: the batch's masks on the latent grid (data/masks.rs).
            let latent_size = (latents.size()[2], latents.size()[3]);
            let loss_weights = t.masked_loss.then(|| up(&self.data.loss_weights(&plan, latent_size, t.unmasked_weight)));
            let batch = GraphInputs {
                latents,
                noise: up(&noise.noise),
                timesteps: up(&noise.timesteps),
                ids: up(&ids),
                time_ids: up(&SizeIds::tensor(&sizes)),
                coefficients: up(&coefficients),
                loss_weights,
            };
            // A captured graph runs the text encoder inside it, reading the ids it
            // was captured with: the cache is for eager steps.
            let text_states = (!te_training && self.graphs.is_none()).then(|| self.frozen_text_states(&item_ids, &plan));
            let mut graphs = self.graphs.take();
            let grads_ready = graphs.is_some()
                && self.optimizer.params().iter().all(|(_, p)| !p.requires_grad() || p.grad().defined());
            let loss = match self.fused.take() {
                Some(mut fused) => {
                    // The optimizer steps inside the backward pass, through the hooks;
                    // it is out of `self` meanwhile, which the pass only reads.
                    let lr = self.lr_schedule.lr_at(self.step);
                    let mut optimizer = std::mem::replace(&mut self.optimizer, Optimizer::empty());
                    let loss = fused.run(&mut optimizer, lr, || self.forward_backward(&batch, text_states.as_ref(), te_training, accum));
                    self.optimizer = optimizer;
                    self.fused = Some(fused);
                    loss?
                }
                None => {
                    let compute = |b: &GraphInputs| self.forward_backward(b, text_states.as_ref(), te_training, accum);
                    match graphs.as_mut() {
                        Some(g) => g.run(&batch, te_training, grads_ready, &compute),
                        None => compute(&batch),
                    }
                }
            };
            if let Some(why) = graphs.as_mut().and_then(StepGraphs::take_failure) {
                self.warn(&format!("CUDA graphs are off for the rest of the run: {why}"));
            }
            self.graphs = graphs;
            loss_sum += loss;
            self.micro_batches += 1;
        }
        self.updating = true;
        // Every rank applies the same update: from the gradients' mean over the ranks.
        if let Some(group) = crate::dist::current() {
            match self.overlap.as_mut() {
                Some(overlap) => {
                    overlap.finish()?;
                    if let Some(note) = overlap.first_report() {
                        self.log.line(&note);
                    }
                }
                None => crate::dist::buckets::average_gradients(group, self.optimizer.params())?,
            }
            loss_sum = group.mean(&loss_sum)?;
            if self.step % RANK_MEMORY_EVERY == 0 {
                let mine = crate::device::memory_in_use(self.device).0 as f64;
                self.rank_memory = Some(group.gather(mine)?.into_iter().map(|b| b as u64).collect());
            }
        }
        let found_inf = match &self.scaler {
            Some(s) => s.unscale(self.optimizer.params()),
            None => false,
        };
        let lr = self.lr_schedule.lr_at(self.step);
        if found_inf {
            self.skipped_steps += 1;
            self.log.line(&format!("step {}: inf/nan gradients under fp16, update skipped", self.step + 1));
        } else {
            if t.max_grad_norm > 0.0 {
                clip_grad_norm(self.optimizer.params(), t.max_grad_norm);
            }
            // A fused step updated each tensor during its backward pass.
            if self.fused.is_none() {
                self.optimizer.step(lr);
            }
            if let Some(ema) = &mut self.ema {
                ema.update(&self.params.unet);
            }
        }
        if let Some(s) = &mut self.scaler {
            s.update(found_inf);
        }
        // A CUDA graph accumulates into the gradient tensors it captured: they stay
        // while graphs are in use.
        if t.set_grads_to_none && self.graphs.as_ref().is_none_or(StepGraphs::is_failed) {
            for (_, p) in self.optimizer.params() {
                set_grad_to_none(p);
            }
        } else {
            self.optimizer.zero_grad();
        }
        self.step += 1;
        self.last_lr = lr;
        Ok(loss_sum)
    }

    /// Trains to the end (or until stopped); writes the events; a failure is also
    /// an `error` event.
    pub fn run(&mut self) -> anyhow::Result<Outcome> {
        // A libtorch failure (CUDA out of memory above all) is a panic of tch: it
        // becomes an error event and one sentence, and the checkpoints already
        // written stay as they are, so the run can be resumed with other settings.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_inner()));
        let resume_hint = |msg: &mut String| {
            if let Some(step) = self.last_checkpoint_step {
                msg.push_str(&format!(
                    "; its checkpoint of step {step} is intact: `dreambooth resume {}` continues from it",
                    self.run_dir.display()
                ));
            }
        };
        let result = match result {
            Ok(Err(e)) if crate::error::exit_code(&e) == 1 => {
                // A failure of the machine, not of the config (a full disk, an
                // unreadable file): the same pointer to what is left.
                let mut msg = crate::error::one_line(&e).trim_end_matches('.').to_string();
                resume_hint(&mut msg);
                Err(anyhow::anyhow!(msg))
            }
            Ok(result) => result,
            Err(payload) => {
                let doing = format!("training step {} of {}", self.step + 1, self.run_dir.display());
                let mut msg = crate::error::panic_sentence(payload.as_ref(), &doing);
                resume_hint(&mut msg);
                Err(anyhow::anyhow!(msg))
            }
        };
        match result {
            Ok(o) => Ok(o),
            Err(e) => {
                // The last good step's record, if its loss can still be read.
                let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.flush_step_record()));
                if !matches!(flushed, Ok(Ok(()))) {
                    self.pending_step = None;
                }
                if let Some(bar) = self.progress.take() {
                    bar.abandon();
                }
                let msg = crate::error::one_line(&e);
                let _ = self.events.write(&Event::named("error", serde_json::json!({ "message": msg, "step": self.step })));
                self.log.line_to_file(&format!("error: {msg}"));
                Err(e)
            }
        }
    }

    fn run_inner(&mut self) -> anyhow::Result<Outcome> {
        self.events.write(&Event::named(
            "start",
            serde_json::json!({
                "step": self.step,
                "total_steps": self.total_steps,
                "epochs": self.config.training.steps_per_image,
                "images": self.data.instances.len(),
                "device": format!("{:?}", self.device),
                "precision": self.precision.describe(),
                "resumed_from": self.resumed_from,
                "pid": std::process::id(),
                "world_size": crate::dist::world_size(),
                "backend": crate::dist::current().map(|g| g.backend),
                "imagic": self.imagic_plan.map(|p| p.describe()),
            }),
        ))?;
        self.progress = self.make_progress();
        // Previews never touch the training generators: drawing these first
        // leaves the run as it would have been.
        if self.step == 0 && self.config.training.sample_before_training {
            self.previews()?;
        }
        if self.imagic_plan.is_some() {
            return self.run_imagic();
        }
        self.validate_before_training()?;
        while self.step < self.total_steps {
            let stop = self.poll_controls()?;
            // A signal or request that reached one rank stops (or pauses) every rank at the same step.
            let (stop, pause) = match crate::dist::current() {
                Some(group) => group.any_each([stop, std::mem::take(&mut self.pause_wanted)]).map(|[s, p]| (s, p))?,
                None => (stop, false),
            };
            if stop || (pause && self.pause_together(None, "requested")?) {
                return self.stop();
            }
            let epochs_before = self.epochs_done();
            let started = Instant::now();
            let loss = self.train_step_recovering()?;
            let pending = PendingStep { step: self.step, epoch: self.epochs_done(), lr: self.last_lr, loss, started };
            // The previous step's loss is ready (or nearly) now that this one is queued.
            self.flush_step_record()?;
            self.pending_step = Some(pending);
            if !self.defer_loss_readback {
                self.flush_step_record()?;
            }
            for epoch in epochs_before + 1..=self.epochs_done() {
                if self.end_of_epoch(epoch)? {
                    return self.stop();
                }
            }
        }
        self.flush_step_record()?;
        self.validate_at_end()?;
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        if self.last_sample_step != Some(self.step) && self.config.training.save_preview_every_n_epochs > 0 {
            self.previews()?;
        }
        self.checkpoint()?;
        let peak = crate::device::memory_in_use(self.device).1;
        self.events.write(&Event::named("done", serde_json::json!({ "step": self.step, "vram_peak_bytes": peak })))?;
        self.events.sync()?;
        self.log.line(&format!("done: {} steps in {}", self.step, self.run_dir.display()));
        Ok(Outcome::Finished)
    }

    fn make_progress(&self) -> Option<indicatif::ProgressBar> {
        use std::io::IsTerminal;
        if self.options.plain || self.options.quiet || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(self.total_steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(self.step);
        Some(bar)
    }

    /// Epoch-based work after epoch `epoch` completed; true when a stop came during a pause.
    fn end_of_epoch(&mut self, epoch: u64) -> anyhow::Result<bool> {
        let t = self.config.training.clone();
        let last = self.step >= self.total_steps;
        self.validate_if_due(epoch)?;
        if t.save_preview_every_n_epochs > 0 && epoch.is_multiple_of(u64::from(t.save_preview_every_n_epochs)) {
            self.previews()?;
        }
        if t.save_model_every_n_epochs > 0 && epoch.is_multiple_of(u64::from(t.save_model_every_n_epochs)) {
            self.checkpoint()?;
        }
        if !last && t.pause_after_n_epochs > 0 && epoch.is_multiple_of(u64::from(t.pause_after_n_epochs)) {
            let reason = format!("after epoch {epoch}");
            return self.pause_together(Some(Duration::from_secs(t.pause_seconds)), &reason);
        }
        Ok(false)
    }

    /// [`Trainer::pause`] on every rank: rank 0 waits for the time or the
    /// requests while the others wait for it (past the collectives' time-out,
    /// which a long pause would otherwise reach), then all agree on stopping.
    fn pause_together(&mut self, duration: Option<Duration>, reason: &str) -> anyhow::Result<bool> {
        let Some(group) = crate::dist::current() else { return self.pause(duration, reason) };
        let stop = if crate::dist::is_writer() { self.pause(duration, reason)? } else { false };
        group.barrier("the end of a pause", PAUSE_WAIT)?;
        group.any(stop || self.stop_flag.load(Ordering::Relaxed))
    }

    /// Waits `duration` (or, without one, for a resume request); true when a stop
    /// request or signal came meanwhile.
    fn pause(&mut self, duration: Option<Duration>, reason: &str) -> anyhow::Result<bool> {
        self.flush_step_record()?;
        self.events.write(&Event::named(
            "pause",
            serde_json::json!({ "step": self.step, "epoch": self.epochs_done(), "reason": reason,
                                "seconds": duration.map(|d| d.as_secs()) }),
        ))?;
        self.log.line(&format!("paused at step {} ({reason})", self.step));
        let until = duration.map(|d| Instant::now() + d);
        let mut stop = false;
        loop {
            if self.stop_flag.load(Ordering::Relaxed) {
                stop = true;
                break;
            }
            let mut resume = false;
            for r in control::take_if(crate::dist::is_writer(), &self.run_dir) {
                match r {
                    Request::Stop => stop = true,
                    Request::Resume => resume = true,
                    Request::Save => {
                        self.checkpoint()?;
                    }
                    Request::Sample => {
                        self.previews()?;
                    }
                    Request::Pause => {}
                }
            }
            if stop || resume || until.is_some_and(|u| Instant::now() >= u) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.events.write(&Event::named("resume", serde_json::json!({ "step": self.step })))?;
        self.log.line(&format!("resumed at step {}", self.step));
        Ok(stop)
    }

    /// Handles requests and signals; true when training must stop.
    fn poll_controls(&mut self) -> anyhow::Result<bool> {
        if self.stop_at_step.is_some_and(|s| self.step >= s) {
            return Ok(true);
        }
        if self.stop_flag.load(Ordering::Relaxed) {
            self.log.line("signal received: saving a checkpoint, then stopping");
            return Ok(true);
        }
        for r in control::take_if(crate::dist::is_writer(), &self.run_dir) {
            match r {
                Request::Stop => return Ok(true),
                // Several processes pause together, at the next step's agreement.
                Request::Pause if crate::dist::current().is_some() => self.pause_wanted = true,
                Request::Pause => {
                    if self.pause(None, "requested")? {
                        return Ok(true);
                    }
                }
                Request::Resume => {}
                Request::Save => {
                    self.checkpoint()?;
                }
                Request::Sample => {
                    self.previews()?;
                }
            }
        }
        Ok(false)
    }

    fn stop(&mut self) -> anyhow::Result<Outcome> {
        self.flush_step_record()?;
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        let path = self.checkpoint()?;
        self.events.write(&Event::named("stopped", serde_json::json!({ "step": self.step, "path": path.display().to_string() })))?;
        self.events.sync()?;
        self.log.line(&format!("stopped at step {}; continue with `dreambooth resume {}`", self.step, self.run_dir.display()));
        Ok(Outcome::Stopped)
    }
}

mod imagic_run;
mod oom;
mod persist;
mod plan;
mod samples;
mod step_records;
mod validation;
use samples::prepare_class_images;
use step_records::PendingStep;

/// `DREAMBOOTH_FAIL_AT_STEP=N`: step N asks libtorch for an impossible
/// allocation, so tests can drive the real out-of-memory path (a panic of tch
/// from a C++ exception) without a GPU.
fn fail_if_injected(step: u64) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("DREAMBOOTH_FAIL_AT_STEP").ok().and_then(|v| v.parse().ok()));
    if *at == Some(step) {
        // `DREAMBOOTH_KILL_RANK=R`: instead, rank R of several dies at once (SIGKILL),
        // as a worker the machine kills, for the tests of a run's collective faults.
        match std::env::var("DREAMBOOTH_KILL_RANK").ok().and_then(|v| v.parse::<usize>().ok()) {
            // SAFETY: signalling this very process.
            Some(rank) if rank == crate::dist::rank() => unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            },
            Some(_) => {}
            None => {
                let _ = Tensor::empty([1i64 << 52], (Kind::Float, Device::Cpu));
            }
        }
    }
}

/// `DREAMBOOTH_OOM_ABOVE_MICRO_BATCH=N`: a micro-batch above N examples fails
/// as an out-of-memory would (a device whose memory fits N), so tests can drive
/// the recovery in trainer/oom.rs without a GPU.
fn fail_if_micro_batch_above_injected(batch_size: u32) {
    static LIMIT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| std::env::var("DREAMBOOTH_OOM_ABOVE_MICRO_BATCH").ok().and_then(|v| v.parse().ok()));
    if limit.is_some_and(|n| batch_size > n) {
        let _ = Tensor::empty([1i64 << 52], (Kind::Float, Device::Cpu));
    }
}

/// `torch.nn.utils.clip_grad_norm_` (norm 2): scales every gradient by
/// min(1, max_norm / (total_norm + 1e-6)); returns the total norm (NaN on CUDA,
/// where it stays on the device).
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    if super::foreach::applies(grads.first()) {
        // Not read back: reading the norm would make the CPU wait for the GPU every step.
        return match super::foreach::clip_grad_norm(&grads, max_norm) {
            Ok(_) => f64::NAN,
            Err(e) => panic!("{e}"),
        };
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    for g in &grads {
        let _ = g.shallow_clone().g_mul_(&coef);
    }
    total.double_value(&[])
}

/// Converts tensors to `kind` in place (modules keep seeing the same tensors).
fn cast_parameters(params: &[(String, Tensor)], kind: Kind) {
    let _guard = tch::no_grad_guard();
    for (_, p) in params {
        let cast = p.to_kind(kind);
        p.shallow_clone().set_data(&cast);
    }
}

/// Moves tensors to `device` in place (modules keep seeing the same tensors).
fn move_parameters(params: &[(String, Tensor)], device: Device) {
    let _guard = tch::no_grad_guard();
    for (_, p) in params {
        let moved = p.to_device(device);
        p.shallow_clone().set_data(&moved);
    }
}
