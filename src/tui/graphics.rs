//! Which image protocol the terminal speaks (kitty, sixel, iTerm2; half-blocks
//! otherwise), asked with ratatui-image's own query but read with a deadline.
//! `Picker::from_query_stdio` reads stdin on a thread that stays blocked when
//! the terminal never answers (a detached tmux session, some SSH clients); that
//! thread then swallows the user's keys and resets the terminal mode. Here the
//! reply is read only while `poll` says bytes are waiting, so nothing is left
//! behind: no answer in time means half-blocks, which work everywhere.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ratatui_image::picker::cap_parser::{Parser, QueryStdioOptions, Response};
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::FontSize;

/// Long enough for a terminal across an SSH link to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(800);

/// Asks the terminal (already in raw mode) what it can draw.
pub fn detect_picker() -> Picker {
    let is_tmux = std::env::var_os("TMUX").is_some_and(|v| !v.is_empty());
    let responses = query(is_tmux).unwrap_or_default();
    picker_from(&responses).unwrap_or_else(|| {
        let mut picker = Picker::halfblocks();
        if iterm2_from_env() {
            picker.set_protocol_type(ProtocolType::Iterm2);
        }
        picker
    })
}

/// The terminal's answers, up to its status report; None when it did not finish answering in time.
fn query(is_tmux: bool) -> Option<Vec<Response>> {
    let mut stdout = std::io::stdout();
    stdout.write_all(Parser::query(is_tmux, QueryStdioOptions::default()).as_bytes()).ok()?;
    stdout.flush().ok()?;
    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let mut parser = Parser::new();
    let mut responses = Vec::new();
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis().max(1) as libc::c_int) };
        if ready <= 0 {
            return None;
        }
        // Ready: this read returns what is waiting without blocking.
        let mut buf = [0u8; 64];
        let n = stdin.lock().read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        for &b in &buf[..n] {
            for response in parser.push(char::from(b)) {
                if response == Response::Status {
                    return Some(responses);
                }
                responses.push(response);
            }
        }
    }
}

/// A picker for what the terminal said it supports; None without a cell size (images cannot be scaled).
fn picker_from(responses: &[Response]) -> Option<Picker> {
    let (w, h) = responses.iter().find_map(|r| match r {
        Response::CellSize(Some(size)) => Some(*size),
        _ => None,
    })?;
    // Deprecated only in favour of the blocking query this module replaces.
    #[allow(deprecated)]
    let mut picker = Picker::from_fontsize(FontSize { width: w, height: h });
    let protocol = if responses.contains(&Response::Kitty) {
        ProtocolType::Kitty
    } else if responses.contains(&Response::Sixel) {
        ProtocolType::Sixel
    } else if iterm2_from_env() {
        ProtocolType::Iterm2
    } else {
        ProtocolType::Halfblocks
    };
    picker.set_protocol_type(protocol);
    Some(picker)
}

fn iterm2_from_env() -> bool {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    var("TERM_PROGRAM").contains("iTerm") || var("LC_TERMINAL").contains("iTerm") || var("TERM_PROGRAM") == "WezTerm"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_pick_the_protocol() {
        assert!(picker_from(&[Response::Sixel]).is_none(), "no cell size: cannot scale images");
        let p = picker_from(&[Response::Sixel, Response::CellSize(Some((9, 18)))]).unwrap();
        assert_eq!(p.protocol_type(), ProtocolType::Sixel);
        let p = picker_from(&[Response::Sixel, Response::Kitty, Response::CellSize(Some((9, 18)))]).unwrap();
        assert_eq!(p.protocol_type(), ProtocolType::Kitty);
        let size = p.font_size();
        assert_eq!((size.width, size.height), (9, 18));
    }
}
