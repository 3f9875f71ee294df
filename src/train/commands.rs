//! The training commands of the CLI contract: train, resume, stop, export.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::checkpoint as ckpt;
use super::trainer::{run_dir_of, Outcome, TrainOptions, Trainer};
use crate::error::usage;
use crate::run::control::{self, Request};
use crate::run::lock::RunLock;

/// Set in the environment of the background copy `--detach` starts.
const DETACHED_ENV: &str = "DREAMBOOTH_DETACHED";

fn detached_child() -> bool {
    std::env::var_os(DETACHED_ENV).is_some()
}

/// In the background copy: from now on stdout and stderr go to the run's train.log
/// (which also tells the waiting parent that start-up succeeded). Only the first call acts.
/// The other ranks of several keep theirs: the launcher reads them, and passes
/// on the last words of a rank that fails.
fn redirect_output_to_log(run_dir: &Path) -> anyhow::Result<()> {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !crate::dist::is_writer() || DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    crate::run::redirect_output(&run_dir.join("train.log"))
}

/// `--detach`: starts this program again as its own session (setsid, so a closed
/// terminal or SSH connection does not reach it) with `args`, waits until it has
/// set up the run (or failed), prints the run directory and returns.
fn detach(args: &[&std::ffi::OsStr], run_dir_hint: Option<&Path>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(DETACHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setsid is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the background trainer")?;
    // The child closes this pipe when its output moves to train.log, or exits.
    let mut early = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut early);
    }
    std::thread::sleep(Duration::from_millis(50));
    if let Some(status) = child.try_wait()? {
        // Done already: it failed, or had nothing to do (a finished run resumed).
        eprint!("{early}");
        if !status.success() {
            std::process::exit(status.code().unwrap_or(1));
        }
        return Ok(());
    }
    let dir = run_dir_hint.map(Path::to_path_buf).unwrap_or_default();
    // The background trainer logs to the run only; the config's warnings, which it
    // has given by now, belong on the terminal that started it too.
    for warning in warnings_of_this_start(&dir) {
        eprintln!("warning: {warning}");
    }
    println!("{}", dir.display());
    eprintln!(
        "training in the background (process {}); follow it with `dreambooth attach {}`, stop it with `dreambooth stop {}`",
        child.id(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// The `warning` events since the run's last `loading` (this start's).
fn warnings_of_this_start(run_dir: &Path) -> Vec<String> {
    use crate::run::events::Event;
    let events = crate::run::events::read_events(run_dir).unwrap_or_default();
    let since = events.iter().rposition(|e| matches!(e, Event::Named { name, .. } if name == "loading")).map_or(0, |i| i + 1);
    events[since..]
        .iter()
        .filter_map(|e| match e {
            Event::Named { name, fields } if name == "warning" => fields.get("message").and_then(|m| m.as_str()).map(String::from),
            _ => None,
        })
        .collect()
}

fn finish(trainer: &mut Trainer) -> anyhow::Result<()> {
    match trainer.run()? {
        Outcome::Finished | Outcome::Stopped => Ok(()),
    }
}

/// `--nproc N` (N > 1): checked here, then N copies of this command run as the
/// ranks of one group (src/dist/launch.rs). None: train alone, or as the rank
/// torchrun's variables say.
fn several(nproc: Option<usize>, config: &crate::config::schema::RunConfig) -> anyhow::Result<Option<usize>> {
    match nproc {
        None | Some(1) => Ok(None),
        Some(0) => Err(usage("--nproc must be at least 1")),
        Some(n) => {
            if !crate::dist::group::available() {
                return Err(usage(crate::dist::group::MISSING_BACKEND));
            }
            if std::env::var_os("WORLD_SIZE").is_some() {
                return Err(usage("--nproc starts its own processes: leave it out where torchrun (WORLD_SIZE) starts them"));
            }
            super::trainer::check_world(config, n)?;
            Ok(Some(n))
        }
    }
}

/// Starts the ranks and waits for them. A detached launcher (`--detach`)
/// moves its own output to the run's train.log once rank 0 has moved its own
/// there (the run is set up), so the terminal that started it is let go.
fn launch_ranks(n: usize, args: &[std::ffi::OsString], run_dir: &Path) -> anyhow::Result<()> {
    let log = detached_child().then(|| run_dir.join("train.log"));
    crate::dist::launch::launch(n, args, Some(run_dir), log)
}

/// The ranks' arguments: this command without `--nproc`.
fn rank_args(command: &str, target: &Path, plain: bool, force: bool, steps_per_image: Option<u32>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![command.into(), target.as_os_str().to_owned()];
    if plain {
        args.push("--plain".into());
    }
    if force {
        args.push("--force".into());
    }
    if let Some(n) = steps_per_image {
        args.extend(["--steps-per-image".into(), n.to_string().into()]);
    }
    args
}

/// A process torchrun (or our launcher) started joins its group before the model
/// loads; before CUDA is touched, so it can be given its GPU.
fn join_group(config: &crate::config::schema::RunConfig) -> anyhow::Result<()> {
    let device = config.device.trim();
    let cuda = device.starts_with("cuda") || (device == "auto" && Path::new("/dev/nvidiactl").exists());
    crate::dist::group::join_from_env(cuda)?;
    Ok(())
}

pub fn train_command(config_path: &Path, detach_flag: bool, plain: bool, force: bool, nproc: Option<usize>) -> anyhow::Result<()> {
    let config = crate::config::load_run_config(config_path)?;
    if let Some(n) = several(nproc, &config)? {
        super::trainer::check_supported(&config)?;
        let run_dir = run_dir_of(&config);
        if detach_flag {
            // The launcher goes to the background; its ranks follow it there.
            let mut args = rank_args("train", config_path, true, force, None);
            args.extend(["--nproc".into(), n.to_string().into()]);
            return detach(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(), Some(&run_dir));
        }
        return launch_ranks(n, &rank_args("train", config_path, plain, force, None), &run_dir);
    }
    join_group(&config)?;
    if detach_flag {
        let run_dir = run_dir_of(&config);
        let mut args: Vec<&std::ffi::OsStr> = vec!["train".as_ref(), config_path.as_os_str(), "--plain".as_ref()];
        if force {
            args.push("--force".as_ref());
        }
        return detach(&args, Some(&run_dir));
    }
    let quiet = detached_child();
    let Some(mut trainer) = stopped_is_fine(Trainer::start(config, options(plain, quiet, force)))? else {
        return Ok(());
    };
    if quiet {
        redirect_output_to_log(&trainer.run_dir)?;
    }
    finish(&mut trainer)
}

fn options(plain: bool, quiet: bool, force: bool) -> TrainOptions {
    // A detached run's parent waits for the model to load, not for the class images.
    let before_class_images = quiet.then_some(redirect_output_to_log as fn(&Path) -> anyhow::Result<()>);
    TrainOptions { plain, quiet, before_class_images, force }
}

/// A stop while class images were made is a clean end (the event and log say so);
/// so is resuming a run that has nothing left to train.
fn stopped_is_fine(started: anyhow::Result<Trainer>) -> anyhow::Result<Option<Trainer>> {
    match started {
        Err(e) if e.is::<super::trainer::StoppedBeforeTraining>() => Ok(None),
        Err(e) if e.is::<super::trainer::AlreadyFinished>() => {
            eprintln!("{e}");
            Ok(None)
        }
        other => other.map(Some),
    }
}

pub fn resume_command(
    run_dir: &Path,
    detach_flag: bool,
    plain: bool,
    steps_per_image: Option<u32>,
    force: bool,
    nproc: Option<usize>,
) -> anyhow::Result<()> {
    if nproc.is_some_and(|n| n != 1) || std::env::var_os("WORLD_SIZE").is_some() {
        crate::run::require_run_dir(run_dir)?;
        let config = crate::config::load_run_config(&run_dir.join("config.yaml"))?;
        if let Some(n) = several(nproc, &config)? {
            if detach_flag {
                let mut args = rank_args("resume", run_dir, true, force, steps_per_image);
                args.extend(["--nproc".into(), n.to_string().into()]);
                return detach(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(), Some(run_dir));
            }
            return launch_ranks(n, &rank_args("resume", run_dir, plain, force, steps_per_image), run_dir);
        }
        join_group(&config)?;
    }
    if detach_flag {
        let steps = steps_per_image.map(|n| n.to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec!["resume".as_ref(), run_dir.as_os_str(), "--plain".as_ref()];
        if let Some(n) = &steps {
            args.extend([std::ffi::OsStr::new("--steps-per-image"), std::ffi::OsStr::new(n)]);
        }
        if force {
            args.push("--force".as_ref());
        }
        return detach(&args, Some(run_dir));
    }
    let quiet = detached_child();
    let Some(mut trainer) = stopped_is_fine(Trainer::resume_with(run_dir, options(plain, quiet, force), steps_per_image))? else {
        return Ok(());
    };
    if quiet {
        redirect_output_to_log(&trainer.run_dir)?;
    }
    finish(&mut trainer)
}

/// Sends stop and waits until the trainer has checkpointed and let go of the run.
pub fn stop_command(run_dir: &Path) -> anyhow::Result<()> {
    crate::run::require_run_dir(run_dir)?;
    if !RunLock::is_held(run_dir) {
        return Err(usage(format!("no trainer is running on {}", run_dir.display())));
    }
    control::send(run_dir, Request::Stop)?;
    eprintln!("stop sent; waiting for the trainer to save a checkpoint");
    while RunLock::is_held(run_dir) {
        std::thread::sleep(Duration::from_millis(100));
    }
    match ckpt::list_checkpoints(run_dir).last() {
        Some((step, dir)) => println!("stopped at step {step}: {}", dir.display()),
        None => println!("stopped before the first checkpoint; `dreambooth resume {}` trains it from step 0", run_dir.display()),
    }
    Ok(())
}

pub fn export_command(run_dir: &Path, format: &str, out: &Path, step: Option<u64>, half: bool) -> anyhow::Result<()> {
    super::export::export(run_dir, format, out, step, half).map(|p: PathBuf| {
        println!("wrote {}", p.display());
    })
}
