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
        Ok(TerminalGuard { terminal, interrupted, signals })
    }

    /// A signal asked this program to end: the screen should return.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
        // The default actions again, for whatever runs after this screen.
        for id in self.signals.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// How long a screen waits for a key before looking at signals and the run again.
pub const INPUT_POLL: std::time::Duration = std::time::Duration::from_millis(250);
