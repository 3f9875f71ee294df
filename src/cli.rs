//! The command-line contract of DESIGN.md: argument definitions and dispatch.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "dreambooth", version, about = "DreamBooth fine-tuning of Stable Diffusion, in the terminal")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Guided set-up of a training run.
    Wizard {
        #[arg(long)]
        runs_dir: Option<PathBuf>,
    },
    /// Train from a run config.
    Train {
        config: PathBuf,
        #[arg(long)]
        detach: bool,
        #[arg(long)]
        plain: bool,
        /// Start even when the memory estimate is above what the GPU (or the machine) has free.
        #[arg(long)]
        force: bool,
        /// Train with N processes on this machine (one per GPU; on the CPU over Gloo).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Continue a run from its newest complete checkpoint.
    Resume {
        run_dir: PathBuf,
        #[arg(long)]
        detach: bool,
        #[arg(long)]
        plain: bool,
        /// Train on to this many steps per image ("epochs"), a finished run too;
        /// written into the run's config.yaml.
        #[arg(long)]
        steps_per_image: Option<u32>,
        /// Start even when the memory estimate is above what the GPU (or the machine) has free.
        #[arg(long)]
        force: bool,
        /// Train with N processes on this machine (the same N as before resumes exactly).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Dashboard of a running or finished run.
    Attach { run_dir: PathBuf },
    /// The runs in a folder (default `runs`): status, step, last loss, newest checkpoint.
    Runs { dir: Option<PathBuf> },
    /// Checkpoint, then stop a running run.
    Stop { run_dir: PathBuf },
    /// Text-to-image with a model.
    Generate(GenerateArgs),
    /// Export a run's weights.
    Export {
        run_dir: PathBuf,
        #[arg(long)]
        format: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        step: Option<u64>,
        /// Write float tensors as float16 (half the size, as AUTOMATIC1111's "Half model").
        #[arg(long)]
        half: bool,
    },
    /// Estimated peak VRAM of a run config (or a run directory's), per component.
    Vram { config: PathBuf },
    /// The VRAM presets.
    Presets,
    /// Source checkpoints found in folders.
    Models { dirs: Vec<PathBuf> },
    /// Training speed and memory, as one JSON line.
    Bench {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        steps: Option<u64>,
        #[arg(long)]
        device: Option<String>,
        /// Also time N data-parallel processes and report the scaling against one.
        #[arg(long)]
        nproc: Option<usize>,
    },
    /// Tiny built-in model on the CPU.
    Demo {
        #[arg(long)]
        plain: bool,
        /// Where to write the demo's files (default: a `demo` folder here).
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Diffusers folder, single-file .safetensors / .ckpt, or a run directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A diffusers folder whose */config.json describe the model (overrides inference).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// With a run directory: the checkpoint step to use.
    #[arg(long)]
    pub step: Option<u64>,
    /// A VAE in place of the model's (a diffusers AutoencoderKL folder or an LDM-layout
    /// file such as vae-ft-mse-840000-ema-pruned.safetensors). Default: the model's own
    /// (a run directory's: the run's `vae`, when it had one).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// A kohya-format LoRA merged into the weights; give it more than once to stack several.
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Strength of each `--lora`, in the same order (AUTOMATIC1111's `<lora:name:0.8>`); 1 when left out.
    #[arg(long, allow_negative_numbers = true)]
    pub lora_weight: Vec<f64>,
    /// Condition on the text encoder's n-th last layer, as training's `clip_skip`
    /// (1: the last layer; 2 for most anime models). Default: a run directory's
    /// own `training.clip_skip` (what its previews used), else 1.
    #[arg(long)]
    pub clip_skip: Option<i64>,
    /// Prompt tokens the text encoder reads: 75, or 150 / 225 in 75-token windows as
    /// AUTOMATIC1111 reads long prompts. Default: a run directory's own
    /// `training.max_token_length` (what its previews used), else 75.
    #[arg(long)]
    pub max_token_length: Option<usize>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// The sampler. Default: the model family's (ddim for SD 1.x/2.x, euler for SDXL, as its pipeline).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Classifier-free guidance scale. Default: the family's pipeline default (7.5; SDXL 5.0).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image width. Default: a run directory's `resolution` (what its previews used), else the model's native size.
    #[arg(long)]
    pub width: Option<i64>,
    /// Image height; the same default as `--width`.
    #[arg(long)]
    pub height: Option<i64>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Draw even when the memory estimate is above what the GPU (or the machine) has free.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let Some(command) = cli.command else {
        if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
            return wizard(&PathBuf::from("runs"));
        }
        use clap::CommandFactory;
        Cli::command().print_help()?;
        println!();
        return Ok(());
    };
    match command {
        Command::Generate(args) => crate::commands::generate::generate_command(&args),
        Command::Models { dirs } => crate::checkpoint::models_command(&dirs),
        Command::Demo { dir, plain } => crate::demo::demo_command(&dir, plain),
        Command::Wizard { runs_dir } => wizard(&runs_dir.unwrap_or_else(|| PathBuf::from("runs"))),
        Command::Attach { run_dir } => crate::tui::dashboard::run(&run_dir),
        Command::Train { config, detach, plain, force, nproc } => {
            crate::train::commands::train_command(&config, detach, plain, force, nproc)
        }
        Command::Resume { run_dir, detach, plain, steps_per_image, force, nproc } => {
            crate::train::commands::resume_command(&run_dir, detach, plain, steps_per_image, force, nproc)
        }
        Command::Stop { run_dir } => crate::train::commands::stop_command(&run_dir),
        Command::Runs { dir } => crate::tui::dashboard::list::runs_command(dir.as_deref().unwrap_or(std::path::Path::new("runs"))),
        Command::Export { run_dir, format, out, step, half } => {
            crate::train::commands::export_command(&run_dir, &format, &out, step, half)
        }
        Command::Vram { config } => crate::vram::vram_command(&config),
        Command::Presets => crate::vram::presets_command(),
        Command::Bench { model, config, steps, device, nproc } => match nproc.filter(|&n| n != 1) {
            Some(n) => crate::bench::bench_several(n, &model, config.as_deref(), steps, device.as_deref()),
            None => crate::bench::bench_command(&model, config.as_deref(), steps, device.as_deref()),
        },
    }
}

fn wizard(runs_dir: &std::path::Path) -> anyhow::Result<()> {
    crate::tui::launch::wizard_then_dashboard(runs_dir)
}
