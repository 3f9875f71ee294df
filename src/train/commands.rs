//! The training commands of the CLI contract: train, resume, stop, export.

use std::path::Path;

pub fn train_command(_config: &Path, _detach: bool, _plain: bool) -> anyhow::Result<()> {
    anyhow::bail!("training is not available in this build yet")
}

pub fn resume_command(_run_dir: &Path, _detach: bool, _plain: bool) -> anyhow::Result<()> {
    anyhow::bail!("training is not available in this build yet")
}

pub fn stop_command(_run_dir: &Path) -> anyhow::Result<()> {
    anyhow::bail!("training is not available in this build yet")
}

pub fn export_command(_run_dir: &Path, _format: &str, _out: &Path, _step: Option<u64>) -> anyhow::Result<()> {
    anyhow::bail!("export is not available in this build yet")
}
