//! The setup wizard (`dreambooth`, `dreambooth wizard`): six steps that end in a
//! run config written to `<runs_dir>/<name>/config.yaml`.

pub mod settings;
pub mod state;
pub mod view;

use std::path::{Path, PathBuf};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

pub use state::{Action, ConceptKind, GpuInfo, ModelChoice, NoSources, PresetChoice, Sources, Step, WizardState};
pub use view::draw;

/// The action a key means where the wizard is.
pub fn action_for_key(state: &WizardState, key: KeyEvent) -> Option<Action> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Some(Action::Cancel);
    }
    match key.code {
        KeyCode::Enter => Some(Action::Next),
        KeyCode::Esc => Some(Action::Back),
        KeyCode::Up | KeyCode::BackTab => Some(Action::FocusPrev),
        KeyCode::Down => Some(Action::FocusNext),
        KeyCode::Tab if state.on_path_field() => Some(Action::Complete),
        KeyCode::Tab => Some(Action::FocusNext),
        KeyCode::Left => Some(Action::Left),
        KeyCode::Right => Some(Action::Right),
        KeyCode::Backspace => Some(Action::Backspace),
        KeyCode::Char(c) if state.typing() => Some(Action::Input(c)),
        KeyCode::Char(' ') => Some(Action::Right),
        KeyCode::Char('a') if state.step == Step::Concepts => Some(Action::AddConcept),
        KeyCode::Char('e') if state.step == Step::Concepts => Some(Action::EditConcept),
        KeyCode::Char('d') if state.step == Step::Concepts => Some(Action::RemoveConcept),
        KeyCode::Delete if state.step == Step::Concepts => Some(Action::RemoveConcept),
        KeyCode::Char('a') if state.step == Step::Vram => Some(Action::ToggleAdvanced),
        KeyCode::Char('s') if state.step == Step::Review => Some(Action::SaveOnly),
        _ => None,
    }
}

/// What the wizard ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// The config file written.
    pub config: PathBuf,
    /// The run directory the trainer will make.
    pub run_dir: PathBuf,
    /// "save and start" (not "save only").
    pub start: bool,
}

/// Runs the wizard with nothing found (no checkpoint discovery, presets or GPU).
pub fn run(runs_dir: &Path) -> anyhow::Result<Option<Saved>> {
    run_with(runs_dir, Box::new(NoSources))
}

/// Runs the wizard on the terminal. Returns the config written, or None when
/// the user quit. The terminal is restored on every way out.
pub fn run_with(runs_dir: &Path, sources: Box<dyn Sources>) -> anyhow::Result<Option<Saved>> {
    let mut state = WizardState::new(runs_dir, sources);
    let mut guard = crate::tui::TerminalGuard::new()?;
    while !state.is_done() {
        if guard.interrupted() {
            return Ok(None);
        }
        guard.terminal.draw(|frame| draw(frame, &state))?;
        if !event::poll(crate::tui::INPUT_POLL)? {
            continue;
        }
        match event::read()? {
            TermEvent::Key(key) => {
                if let Some(action) = action_for_key(&state, key) {
                    state.apply(action);
                }
            }
            TermEvent::Resize(..) => guard.terminal.autoresize()?,
            _ => {}
        }
    }
    Ok(state.saved.clone().map(|config| Saved { config, run_dir: state.run_dir(), start: state.start }))
}
