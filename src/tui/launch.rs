//! From the wizard to a running trainer: the run is started as its own
//! detached process (`dreambooth train CONFIG --detach`), then the dashboard
//! attaches to its run directory. Leaving the dashboard never stops training.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::tui::sources::DiskSources;
use crate::tui::wizard::{self, Saved};

/// `dreambooth` / `dreambooth wizard`: the wizard, then (on "save and start")
/// the detached trainer and its dashboard.
pub fn wizard_then_dashboard(runs_dir: &Path) -> anyhow::Result<()> {
    // The wizard's terminal is restored before anything else prints.
    let Some(saved) = wizard::run_with(runs_dir, Box::new(DiskSources::default()))? else {
        return Ok(());
    };
    let Saved { config, run_dir, start } = saved;
    if !start {
        println!("saved {}; start it with: dreambooth train {} --detach", config.display(), config.display());
        return Ok(());
    }
    println!("saved {}; starting the run (loading the model)...", config.display());
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let started = start_detached(&exe, &config)?;
    let run_dir = if started.as_os_str().is_empty() { run_dir } else { started };
    crate::tui::dashboard::run(&run_dir)
}

/// Runs `EXE train CONFIG --detach`: it returns once the trainer (in its own
/// session) has set up the run, printing the run directory. A trainer that
/// fails to start gives its one-line error here, with its exit status kept
/// (2 for a config error).
pub fn start_detached(exe: &Path, config: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(exe)
        .arg("train")
        .arg(config)
        .arg("--detach")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| format!("the trainer did not start ({}): {}", out.status, stderr.trim()));
        return Err(if out.status.code() == Some(2) { crate::error::usage(message) } else { anyhow::anyhow!(message) });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout.lines().rev().find(|l| !l.trim().is_empty()).map(|l| PathBuf::from(l.trim())).unwrap_or_default())
}
