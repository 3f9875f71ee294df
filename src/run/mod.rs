//! The run directory: events, lock, control requests, disk room.

pub mod control;
pub mod disk;
pub mod events;
pub mod lock;
pub mod source;

/// A run directory is a folder with its config.yaml (the first file a run writes,
/// as the directory is made); anything else is refused in one sentence.
pub fn require_run_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if !dir.join("config.yaml").is_file() {
        return Err(crate::error::usage(format!("{} is not a run directory (it has no config.yaml)", dir.display())));
    }
    Ok(())
}

/// From now on this process's stdout and stderr append to `log` (a detached
/// run's train.log): whoever read them (the terminal that started it, through
/// a pipe) sees them close.
pub fn redirect_output(log: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    // SAFETY: dup2 onto the standard descriptors; `file` stays open for the call.
    unsafe {
        libc::dup2(file.as_raw_fd(), 1);
        libc::dup2(file.as_raw_fd(), 2);
    }
    Ok(())
}
