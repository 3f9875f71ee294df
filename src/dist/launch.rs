//! `--nproc N`: starts N copies of this program on this machine as the ranks of
//! one group, with torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and watches them: the
//! first that fails ends the run on every rank (the others see their next
//! collective fail; any still alive after a grace period are killed), and the
//! launcher says which rank it was. SIGINT/SIGTERM/SIGHUP reaching the launcher
//! are passed on to every rank, which agree to stop at the same step; rank 0
//! writes the checkpoint.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long the other ranks get to end on their own once one has failed.
fn grace_period() -> Duration {
    let seconds = std::env::var("DREAMBOOTH_DIST_GRACE").ok().and_then(|v| v.parse::<f64>().ok());
    Duration::from_secs_f64(seconds.unwrap_or(30.0))
}

/// A free TCP port on the loopback interface for the group's store.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port for the process group")?;
    Ok(listener.local_addr()?.port())
}

/// How a rank ended, in words.
fn ending(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// Runs this program's `args` as `nproc` ranks and waits for them all.
/// `resume_hint`: the run directory, for the sentence that tells how to go on.
/// `detached_log`: a detached launcher's train.log, where its own output goes
/// once rank 0 has stopped writing to it (its start-up is over, or it ended).
pub fn launch(
    nproc: usize,
    args: &[OsString],
    resume_hint: Option<&std::path::Path>,
    detached_log: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    if !super::group::available() {
        return Err(crate::error::usage(super::group::MISSING_BACKEND));
    }
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let port = free_port()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install the signal handlers")?;
    }
    // Each rank's last line on stderr, for the sentence about a failed rank.
    let last_lines: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec![String::new(); nproc]));
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    let mut readers = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        // Rank 0 speaks for the run; the others' progress lines would repeat it.
        if rank != 0 {
            cmd.stdout(Stdio::null());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                end_all(&mut children);
                return Err(anyhow::anyhow!("cannot start rank {rank} of {nproc}: {e}"));
            }
        };
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = last_lines.clone();
        let log = if rank == 0 { detached_log.clone() } else { None };
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Rank 0 speaks for the run; another rank's last words go into the
                // launcher's sentence if it is the one that failed.
                if rank == 0 {
                    eprintln!("{line}");
                }
                if !line.trim().is_empty() && !line.contains("[c10d]") {
                    lines.lock().expect("no panics hold this lock")[rank] = line;
                }
            }
            // A run that failed before making its folder keeps the terminal's.
            if let Some(log) = log.filter(|l| l.parent().is_some_and(std::path::Path::is_dir)) {
                let _ = crate::run::redirect_output(&log);
            }
        }));
        children.push(child);
    }
    let mut forwarded = false;
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    let mut done = vec![None::<ExitStatus>; nproc];
    loop {
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            for child in &children {
                // SAFETY: signalling a child we started and have not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank].is_none() {
                if let Some(status) = child.try_wait()? {
                    done[rank] = Some(status);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((rank, status, Instant::now()));
                    }
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        if let Some((_, _, at)) = first_failure {
            if at.elapsed() > grace_period() {
                end_all(&mut children);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for reader in readers {
        let _ = reader.join();
    }
    let Some((rank, status, _)) = first_failure else { return Ok(()) };
    if rank == 0 {
        // Rank 0 has said what went wrong in its own sentence.
        std::process::exit(status.code().filter(|&c| c != 0).unwrap_or(1));
    }
    let last = last_lines.lock().expect("no panics hold this lock")[rank].trim().trim_start_matches("error: ").to_string();
    let mut message = format!("rank {rank} of {nproc} {} and the run stopped on every rank", ending(status));
    if !last.is_empty() {
        message.push_str(&format!(" (rank {rank}: {})", last.trim_end_matches('.')));
    }
    if let Some(dir) = resume_hint.filter(|d| crate::train::checkpoint::find_checkpoint(d, None).is_ok()) {
        message.push_str(&format!("; `dreambooth resume {} --nproc {nproc}` continues from its last checkpoint", dir.display()));
    }
    if status.code() == Some(2) {
        return Err(crate::error::usage(message));
    }
    Err(anyhow::anyhow!(message))
}

/// Kills every rank still running and reaps it.
fn end_all(children: &mut [Child]) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
