//! The terminal interface: the setup wizard and the live dashboard. It reads
//! and writes only the run directory and run configs; it never trains.
//! Drawing is a pure function of a state snapshot; user intents are `Action`s,
//! so both screens run headless in tests (TestBackend + insta).

pub mod dashboard;
pub mod graphics;
pub mod launch;
pub mod sources;
pub mod widgets;
pub mod wizard;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use ratatui::DefaultTerminal;

/// Owns the terminal while a screen runs: raw mode + alternate screen on
/// creation, restored on drop (errors, early returns), by ratatui's panic hook
/// (panics), and after SIGINT/SIGTERM/SIGHUP, which set `interrupted` so the
/// screen's loop returns and this guard drops (raw mode makes Ctrl-C a key,
/// which the screens handle themselves).
pub struct TerminalGuard {
    pub terminal: DefaultTerminal,
    interrupted: Arc<AtomicBool>,
    signals: Vec<signal_hook::SigId>,
    /// Set on drop: the hang-up watchdog's cue to stop.
    done: Arc<AtomicBool>,
    stdin_is_terminal: bool,
}

impl TerminalGuard {
    pub fn new() -> anyhow::Result<TerminalGuard> {
        if !std::io::stdout().is_terminal() {
            anyhow::bail!("the terminal interface needs a terminal; use --plain or a config file instead");
        }
        let interrupted = Arc::new(AtomicBool::new(false));
        let mut signals = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
            signals.push(signal_hook::flag::register(sig, interrupted.clone()).context("cannot install the signal handlers")?);
        }
        // try_init installs a panic hook that restores the terminal before the panic message prints.
        let terminal = match ratatui::try_init() {
            Ok(t) => t,
            Err(e) => {
                for id in signals {
                    signal_hook::low_level::unregister(id);
                }
                return Err(e).context("cannot set up the terminal");
            }
        };
        let done = Arc::new(AtomicBool::new(false));
        let stdin_is_terminal = std::io::stdin().is_terminal();
        if stdin_is_terminal {
            watch_for_hang_up(done.clone());
        }
        Ok(TerminalGuard { terminal, interrupted, signals, done, stdin_is_terminal })
    }

    /// A signal asked this program to end, or the terminal is gone: the screen
    /// should return.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed) || (self.stdin_is_terminal && terminal_hung_up())
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        ratatui::restore();
        // The default actions again, for whatever runs after this screen.
        for id in self.signals.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// The terminal on stdin has hung up (the SSH connection or the tmux server
/// went away). No SIGHUP need arrive: a shell killed first does not pass it on.
/// (Asked only when stdin was a terminal at the start: a hung-up one no longer
/// says it is one.)
fn terminal_hung_up() -> bool {
    let mut fd = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, timeout 0 (returns at once).
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// crossterm's event reader retries a read of 0 bytes for ever (0.29,
/// event/source/unix/mio.rs), so on a hung-up terminal a screen inside
/// `event::poll` never returns to look at `interrupted` and spins a core. This
/// thread ends the process once the terminal has been gone a second: nobody
/// can see the screen any more, and the trainer is a process of its own.
fn watch_for_hang_up(done: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if terminal_hung_up() {
                std::thread::sleep(std::time::Duration::from_secs(1));
                if !done.load(Ordering::Relaxed) {
                    // 128 + SIGHUP: the status a hang-up would have left.
                    std::process::exit(129);
                }
            }
        }
    });
}

/// How long a screen waits for a key before looking at signals and the run again.
pub const INPUT_POLL: std::time::Duration = std::time::Duration::from_millis(250);
