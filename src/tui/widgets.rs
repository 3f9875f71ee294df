//! Small drawing helpers shared by the wizard and the dashboard.

use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

/// "1h02m", "3m05s", "42s"; "?" for unknown or absurd values.
pub fn format_duration(seconds: Option<f64>) -> String {
    let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9) else {
        return "?".into();
    };
    let s = s.round() as u64;
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// Bytes as GiB with one decimal ("7.5 GiB").
pub fn format_gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A footer of key hints: `key` bold, then its label.
pub fn key_hints(hints: &[(&str, &str)]) -> Line<'static> {
    let mut spans = Vec::new();
    for (i, (key, label)) in hints.iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::styled(key.to_string(), Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan)));
        spans.push(Span::raw(format!(" {label}")));
    }
    Line::from(spans)
}

/// A centred rectangle of at most `width`×`height` inside `area` (popups).
pub fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))]).flex(Flex::Center).areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))]).flex(Flex::Center).areas(row);
    cell
}

/// A labelled text field: `label: value▏` with the cursor mark when focused.
pub fn field_line(label: &str, value: &str, focused: bool, note: &str) -> Line<'static> {
    let marker = if focused { "▶ " } else { "  " };
    let label_style = if focused { Style::new().add_modifier(Modifier::BOLD) } else { Style::new() };
    let mut spans = vec![
        Span::raw(marker.to_string()),
        Span::styled(format!("{label:<18}"), label_style),
        Span::styled(value.to_string(), Style::new().fg(Color::White).add_modifier(Modifier::UNDERLINED)),
    ];
    if focused {
        spans.push(Span::styled("▏".to_string(), Style::new().fg(Color::Cyan)));
    }
    if !note.is_empty() {
        spans.push(Span::styled(format!("  {note}"), Style::new().fg(Color::DarkGray)));
    }
    Line::from(spans)
}

/// A red error line (inline validation).
pub fn error_line(text: &str) -> Line<'static> {
    Line::from(Span::styled(format!("✗ {text}"), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Some(42.4)), "42s");
        assert_eq!(format_duration(Some(185.0)), "3m05s");
        assert_eq!(format_duration(Some(3720.0)), "1h02m");
        assert_eq!(format_duration(None), "?");
        assert_eq!(format_duration(Some(f64::INFINITY)), "?");
    }
}
