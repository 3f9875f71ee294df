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

use anyhow::Context;
use ratatui::DefaultTerminal;

/// Owns the terminal while a screen runs: raw mode + alternate screen on
/// creation, restored on drop (errors, early returns) and by ratatui's panic hook.
pub struct TerminalGuard {
    pub terminal: DefaultTerminal,
}

impl TerminalGuard {
    pub fn new() -> anyhow::Result<TerminalGuard> {
        if !std::io::stdout().is_terminal() {
            anyhow::bail!("the terminal interface needs a terminal; use --plain or a config file instead");
        }
        // try_init installs a panic hook that restores the terminal before the panic message prints.
        let terminal = ratatui::try_init().context("cannot set up the terminal")?;
        Ok(TerminalGuard { terminal })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}
