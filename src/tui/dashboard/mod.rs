//! The live dashboard of a run (`dreambooth attach RUN_DIR`). It only reads the
//! run directory and sends requests through it, so quitting it never stops
//! training.

pub mod list;
pub mod state;
pub mod view;

use std::path::Path;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Rect, Size};
use ratatui_image::picker::Picker;
use ratatui_image::Resize;

use crate::run::control::{send, Request};
pub use state::{DashboardState, RunStatus};
pub use view::draw;

/// How often the run directory is read again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pause when running, resume when paused.
    TogglePause,
    SaveNow,
    SampleNow,
    /// Leave the dashboard; training goes on.
    Detach,
    /// Open the stop confirmation.
    AskStop,
    ConfirmStop,
    CancelStop,
}

/// The action a key means in the current state, if any.
pub fn action_for_key(state: &DashboardState, key: KeyEvent) -> Option<Action> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Some(Action::Detach);
    }
    if state.confirm_stop {
        return Some(if key.code == KeyCode::Char('y') { Action::ConfirmStop } else { Action::CancelStop });
    }
    let live = state.is_live();
    // Pause, save and sample act on training steps; before the first one they would only queue.
    let training = live && state.preparing.is_none();
    match key.code {
        KeyCode::Char('d') | KeyCode::Esc => Some(Action::Detach),
        KeyCode::Char('q') | KeyCode::Char('x') if live => Some(Action::AskStop),
        KeyCode::Char('q') | KeyCode::Char('x') => Some(Action::Detach),
        KeyCode::Char('p') | KeyCode::Char(' ') if training => Some(Action::TogglePause),
        KeyCode::Char('s') if training => Some(Action::SaveNow),
        KeyCode::Char('n') if training => Some(Action::SampleNow),
        _ => None,
    }
}

/// Carries out `action`: sends requests through the run directory and updates
/// the screen state. Returns false when the dashboard should close.
pub fn apply(state: &mut DashboardState, action: Action) -> bool {
    let request = match action {
        Action::Detach => return false,
        Action::AskStop => {
            state.confirm_stop = true;
            return true;
        }
        Action::CancelStop => {
            state.confirm_stop = false;
            return true;
        }
        Action::ConfirmStop => {
            state.confirm_stop = false;
            Request::Stop
        }
        Action::TogglePause if state.status == RunStatus::Paused => Request::Resume,
        Action::TogglePause => Request::Pause,
        Action::SaveNow => Request::Save,
        Action::SampleNow => Request::Sample,
    };
    let sent = send(&state.run_dir, request);
    state.notice_answered_by = sent.is_ok().then(|| (answering_event(request), state.log.len()));
    state.notice = Some(match sent {
        Ok(()) => format!("{} requested", request.name()),
        Err(e) => crate::error::one_line(&e),
    });
    true
}

/// The event a trainer logs when it has carried out `request`.
fn answering_event(request: Request) -> &'static str {
    match request {
        Request::Stop => "stopped",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Save => "checkpoint",
        Request::Sample => "sample",
    }
}

/// Makes each preview's image protocol for the cell it will be drawn in
/// (again only when that size changed), so `draw` stays a pure function.
pub fn prepare_previews(state: &mut DashboardState, picker: &Picker, screen: Rect) {
    let areas = view::areas(screen, state);
    let cells = view::preview_cells(areas.previews, state.previews.len());
    for (preview, cell) in state.previews.iter_mut().zip(cells) {
        let size = (cell.width, cell.height);
        if preview.prepared_for == size && preview.protocol.is_some() {
            continue;
        }
        preview.prepared_for = size;
        preview.protocol = preview
            .image
            .clone()
            .and_then(|img| picker.new_protocol(img, Size::new(cell.width, cell.height), Resize::Scale(None)).ok());
    }
}

/// Runs the dashboard on the terminal until the user detaches (or stops and
/// the run ends). The terminal is restored on every way out.
pub fn run(run_dir: &Path) -> anyhow::Result<()> {
    crate::run::require_run_dir(run_dir)?;
    let live = watch(run_dir)?;
    // Printed after the terminal is restored, so it stays on screen.
    if live {
        println!("detached; training goes on. Reattach with: dreambooth attach {}", run_dir.display());
    }
    Ok(())
}

/// The dashboard's loop; returns whether the run was still live when the user left.
fn watch(run_dir: &Path) -> anyhow::Result<bool> {
    let mut guard = crate::tui::TerminalGuard::new()?;
    // Asks the terminal which graphics it speaks (sixel, kitty, iTerm2); half-blocks otherwise.
    let picker = crate::tui::graphics::detect_picker();
    let mut state = DashboardState::load(run_dir, crate::run::events::now());
    // The card's size, when the trainer did not log it: the dashboard runs on the same machine.
    if state.vram_total.is_none() {
        state.vram_total = crate::vram::probe().map(|g| g.total_bytes);
    }
    let mut last_poll = Instant::now();
    loop {
        let screen = guard.terminal.get_frame().area();
        prepare_previews(&mut state, &picker, screen);
        guard.terminal.draw(|frame| draw(frame, &state))?;
        if guard.interrupted() {
            return Ok(state.is_live());
        }
        let wait = POLL_INTERVAL.saturating_sub(last_poll.elapsed()).min(crate::tui::INPUT_POLL);
        if event::poll(wait)? {
            match event::read()? {
                TermEvent::Key(key) => {
                    if let Some(action) = action_for_key(&state, key) {
                        if !apply(&mut state, action) {
                            return Ok(state.is_live());
                        }
                    }
                }
                TermEvent::Resize(..) => guard.terminal.autoresize()?,
                _ => {}
            }
        }
        if last_poll.elapsed() >= POLL_INTERVAL {
            state.refresh(crate::run::events::now());
            last_poll = Instant::now();
        }
    }
}
