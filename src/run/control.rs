//! Requests to a live trainer (stop, pause, resume, save now, sample now), sent
//! through the run directory so any process — the dashboard, a script, `dreambooth
//! stop` — can send them. A request is a file `control/<name>` written atomically;
//! the trainer takes it (deletes it) at its next step boundary.

use std::path::Path;

use anyhow::Context;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stop,
    Pause,
    Resume,
    Save,
    Sample,
}

impl Request {
    pub const ALL: [Request; 5] = [Request::Stop, Request::Pause, Request::Resume, Request::Save, Request::Sample];

    pub fn name(self) -> &'static str {
        match self {
            Request::Stop => "stop",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Save => "save",
            Request::Sample => "sample",
        }
    }
}

/// Leaves a request for the trainer of `run_dir`.
pub fn send(run_dir: &Path, request: Request) -> anyhow::Result<()> {
    let dir = run_dir.join("control");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.{}", request.name(), std::process::id()));
    std::fs::write(&tmp, b"").with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(request.name())).with_context(|| format!("cannot send {} to {}", request.name(), run_dir.display()))?;
    Ok(())
}

/// Takes the pending requests of `run_dir` (the trainer's side), in a fixed order.
/// `take` for the process that answers requests (rank 0 of several); none for the others.
pub fn take_if(answers: bool, run_dir: &Path) -> Vec<Request> {
    if answers { take(run_dir) } else { Vec::new() }
}

pub fn take(run_dir: &Path) -> Vec<Request> {
    let dir = run_dir.join("control");
    Request::ALL
        .into_iter()
        .filter(|r| std::fs::remove_file(dir.join(r.name())).is_ok())
        .collect()
}

/// Takes `request` alone, leaving any other pending request for later.
pub fn take_one(run_dir: &Path, request: Request) -> bool {
    std::fs::remove_file(run_dir.join("control").join(request.name())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        send(dir.path(), Request::Save).unwrap();
        send(dir.path(), Request::Stop).unwrap();
        send(dir.path(), Request::Save).unwrap();
        assert_eq!(take(dir.path()), vec![Request::Stop, Request::Save]);
        assert!(take(dir.path()).is_empty());
    }
}
