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
