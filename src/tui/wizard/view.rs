//! Drawing the wizard: a pure function of `WizardState`.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};
use ratatui::Frame;

use super::settings::{self, SettingKind};
use super::state::{count_images, scheduler_name, ConceptDraft, Step, WizardState};
use crate::tui::widgets::{error_line, field_line, format_gib, key_hints};

pub fn draw(frame: &mut Frame, state: &WizardState) {
    let [bar, body, error, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(step_bar(state)), bar);
    let block = Block::bordered().title(format!(" {} · {} ", state.step_number(), title(state)));
    let inner = block.inner(body);
    frame.render_widget(block, body);
    match state.step {
        Step::Name => draw_name(frame, inner, state),
        Step::Source => draw_source(frame, inner, state),
        Step::Concepts if state.editing => draw_concept_form(frame, inner, state),
        Step::Concepts => draw_concepts(frame, inner, state),
        Step::Training => draw_training(frame, inner, state),
        Step::Vram => draw_vram(frame, inner, state),
        Step::Review => draw_review(frame, inner, state),
    }
    if let Some(e) = &state.error {
        frame.render_widget(Paragraph::new(error_line(e)), error);
    }
    frame.render_widget(Paragraph::new(footer_line(state)), footer);
}

fn title(state: &WizardState) -> &'static str {
    match state.step {
        Step::Name => "Model name",
        Step::Source => "Source checkpoint",
        Step::Concepts if state.editing => "Concept",
        Step::Concepts => "Concepts",
        Step::Training => "Training",
        Step::Vram => "VRAM preset",
        Step::Review => "Review, save and start",
    }
}

/// "1 Name › 2 Model › …" with the current step highlighted and done steps ticked.
fn step_bar(state: &WizardState) -> Line<'static> {
    let mut spans = Vec::new();
    for (i, step) in Step::ALL.iter().enumerate() {
        if i > 0 {
            spans.push(Span::styled(" › ", Style::new().fg(Color::DarkGray)));
        }
        let text = format!("{}{} {}", if *step < state.step { "✓" } else { "" }, i + 1, step.title());
        let style = if *step == state.step {
            Style::new().fg(Color::Black).bg(Color::Cyan).add_modifier(Modifier::BOLD)
        } else if *step < state.step {
            Style::new().fg(Color::Green)
        } else {
            Style::new().fg(Color::DarkGray)
        };
        spans.push(Span::styled(text, style));
    }
    Line::from(spans)
}

fn footer_line(state: &WizardState) -> Line<'static> {
    match state.step {
        Step::Concepts if state.editing => {
            key_hints(&[("↑↓", "field"), ("←→", "kind"), ("Tab", "complete"), ("Enter", "done"), ("Esc", "close")])
        }
        Step::Concepts => key_hints(&[("a", "add"), ("e", "edit"), ("d", "remove"), ("Enter", "next"), ("Esc", "back")]),
        Step::Source => key_hints(&[("↑↓", "choose"), ("Tab", "complete"), ("Enter", "next"), ("Esc", "back")]),
        Step::Training => key_hints(&[("↑↓", "field"), ("←→", "change"), ("Enter", "next"), ("Esc", "back")]),
        Step::Vram if state.advanced => {
            key_hints(&[("↑↓", "setting"), ("←→ Space", "change"), ("type", "edit"), ("a Esc", "presets"), ("Enter", "next")])
        }
        Step::Vram => key_hints(&[("↑↓", "preset"), ("a", "all settings"), ("Enter", "next"), ("Esc", "back")]),
        Step::Review => key_hints(&[("↑↓", "scroll"), ("Enter", "save and start"), ("s", "save only"), ("Esc", "back"), ("Ctrl-C", "quit")]),
        Step::Name => key_hints(&[("Enter", "next"), ("Esc", "quit")]),
    }
}

fn hint(text: String) -> Line<'static> {
    Line::from(Span::styled(text, Style::new().fg(Color::DarkGray)))
}

fn draw_name(frame: &mut Frame, area: Rect, state: &WizardState) {
    let lines = vec![
        field_line("Name", &state.name, true, ""),
        Line::from(""),
        hint(format!("The run is written to {}", state.run_dir().display())),
    ];
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn draw_source(frame: &mut Frame, area: Rect, state: &WizardState) {
    let mut lines = Vec::new();
    if state.models.is_empty() {
        lines.push(hint("No checkpoints found; type a path.".into()));
    } else {
        lines.push(hint("Found checkpoints:".into()));
    }
    for (i, m) in state.models.iter().enumerate() {
        let selected = state.focus == i;
        let style = if selected { Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD) } else { Style::new() };
        lines.push(Line::from(vec![
            Span::raw(if selected { "▶ " } else { "  " }),
            Span::styled(format!("{:<10} {:>8} {:<12} ", m.architecture, m.size, m.format), style),
            Span::styled(m.path.clone(), style),
        ]));
    }
    lines.push(Line::from(""));
    lines.push(field_line("Path", &state.source, state.focus == state.models.len(), ""));
    if !state.completions.is_empty() {
        lines.push(hint(format!("  {}", state.completions.join("  "))));
    }
    // The family decides the presets and the training size: say it before they appear.
    if let Some(family) = state.source_family() {
        let size = state.model_resolution().map(|s| format!(", made for {s}×{s} images")).unwrap_or_default();
        lines.push(Line::from(""));
        lines.push(hint(format!("{family} model{size}: the VRAM step offers {family} presets.")));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn draw_concepts(frame: &mut Frame, area: Rect, state: &WizardState) {
    let mut lines = Vec::new();
    if state.concepts.is_empty() {
        lines.push(hint("No concepts yet. Press a to add the subject you want to teach.".into()));
    }
    for (i, c) in state.concepts.iter().enumerate() {
        let selected = i == state.concept_index;
        let images = match count_images(&c.instance_dir) {
            Ok(n) => format!("{n} images"),
            Err(_) => "no images".into(),
        };
        let style = if selected { Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD) } else { Style::new() };
        lines.push(Line::from(vec![
            Span::raw(if selected { "▶ " } else { "  " }),
            Span::styled(format!("{}. {} ", i + 1, c.instance_prompt), style),
            Span::styled(format!("({}, {images}, {})", c.kind.label(), c.instance_dir), Style::new().fg(Color::DarkGray)),
        ]));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn draw_concept_form(frame: &mut Frame, area: Rect, state: &WizardState) {
    let Some(c) = state.concepts.get(state.concept_index) else { return };
    let images = match count_images(&c.instance_dir) {
        Ok(n) => match crate::data::images::skipped_files(std::path::Path::new(c.instance_dir.trim())).0.len() {
            0 => format!("{n} images"),
            1 => format!("{n} images; 1 other file is not read (not png, jpg, webp, bmp, tiff, gif)"),
            skipped => format!("{n} images; {skipped} other files are not read (not png, jpg, webp, bmp, tiff, gif)"),
        },
        Err(_) if c.instance_dir.trim().is_empty() => String::new(),
        Err(_) => "not a folder of images".into(),
    };
    let kind = format!("◀ {} ▶", c.kind.label());
    let recommended = format!(
        "sets {} steps/image, text encoder {:.0}% of steps",
        c.kind.steps_per_image(),
        c.kind.text_encoder_train_ratio() * 100.0
    );
    let mut lines = vec![
        field_line("Instance folder", &c.instance_dir, state.focus == 0, &images),
        field_line("Instance prompt", &c.instance_prompt, state.focus == 1, "[filewords]: each image's .txt caption"),
        field_line("Class prompt", &c.class_prompt, state.focus == 2, "empty: no prior preservation"),
        field_line("Class images", &c.class_images, state.focus == 3, ""),
        field_line("Subject", &kind, state.focus == 4, &recommended),
        field_line("Class folder", &c.class_dir, state.focus == 5, "empty: class_images/ in the run"),
        field_line("Prior loss weight", &c.prior_loss_weight, state.focus == 6, ""),
        field_line("Sample prompts", &c.sample_prompts, state.focus == 7, "| between prompts; empty: the instance prompt"),
        field_line("Instance token", &c.instance_token, state.focus == 8, "e.g. sks: put into instance prompts that lack it"),
        field_line("Class token", &c.class_token, state.focus == 9, "e.g. dog: what class prompts keep"),
        field_line("Class negative", &c.class_negative, state.focus == 10, "class images; empty: sampling's"),
        field_line("Class CFG scale", &c.class_guidance, state.focus == 11, "class images; empty: sampling's"),
        field_line("Class steps", &c.class_steps, state.focus == 12, "class images; empty: sampling's"),
        field_line("Mask folder", &c.mask_dir, state.focus == 13, &mask_hint(c)),
        field_line("Validation folder", &c.validation_dir, state.focus == 14, &validation_hint(c)),
    ];
    if !state.completions.is_empty() {
        lines.push(hint(format!("  {}", state.completions.join("  "))));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

/// What the mask folder field says: empty, how many of the photos have a mask.
fn mask_hint(c: &ConceptDraft) -> String {
    let dir = c.mask_dir.trim();
    if dir.is_empty() {
        return "optional: masks named as the photos (white: learn)".into();
    }
    let Ok(masks) = crate::data::masks::MaskFolder::read(std::path::Path::new(dir), "the mask folder") else {
        return "not a folder of masks".into();
    };
    match crate::data::images::list_images(std::path::Path::new(c.instance_dir.trim()), "the instance folder") {
        Ok(files) => {
            let masked = files.iter().filter(|f| masks.mask_for(&f.path).is_some()).count();
            format!("{masked} of {} photos have a mask (the rest train unmasked)", files.len())
        }
        Err(_) => "masks named as the photos".into(),
    }
}

/// What the validation folder field says: empty, how many held-out photos.
fn validation_hint(c: &ConceptDraft) -> String {
    let dir = c.validation_dir.trim();
    if dir.is_empty() {
        return "optional: held-out photos for a validation loss".into();
    }
    match count_images(dir) {
        Ok(n) => format!("{n} held-out photos: validation loss as often as previews"),
        Err(_) => "not a folder of images".into(),
    }
}

fn draw_training(frame: &mut Frame, area: Rect, state: &WizardState) {
    let total = match state.total_steps() {
        Some(t) => format!("= {t} steps for {} images", state.image_count()),
        None => String::new(),
    };
    let lines = vec![
        field_line("Steps per image", &state.steps_per_image, state.focus == 0, &total),
        field_line("Learning rate", &state.learning_rate, state.focus == 1, "1e-6 to 2e-6 is typical"),
        field_line("LR scheduler", &format!("◀ {} ▶", scheduler_name(state.lr_scheduler)), state.focus == 2, ""),
        field_line("Warmup steps", &state.lr_warmup_steps, state.focus == 3, ""),
        field_line("Preview sampler", &format!("◀ {} ▶", state.sampler), state.focus == 4, ""),
        Line::from(""),
        hint(match state.text_encoders_frozen_by() {
            Some(preset) => format!("Text encoder frozen: preset {preset} freezes it to fit its memory."),
            None => format!("Text encoder trains for {:.0}% of the steps.", state.text_encoder_train_ratio * 100.0),
        }),
    ];
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn draw_vram(frame: &mut Frame, area: Rect, state: &WizardState) {
    let mut lines = vec![match &state.gpu {
        Some(g) => Line::from(format!("GPU: {} · {}", g.name, format_gib(g.total_bytes))),
        None => hint("No GPU detected: training runs on the CPU.".into()),
    }];
    if let Some(why) = state.gpu.as_ref().and_then(|g| g.unusable.as_deref()) {
        lines.push(Line::styled(format!("Training runs on the CPU: {why}"), Style::default().fg(Color::Yellow)));
    }
    lines.push(Line::from(""));
    if state.presets.is_empty() {
        lines.push(hint("No presets available; the config's own settings are used.".into()));
    } else if let Some(family) = state.source_family() {
        lines.push(hint(format!("Presets for {family} models, with this run's estimated peak:")));
    }
    let card = state.gpu.as_ref().map(|g| g.total_bytes);
    let scale = card.or_else(|| state.presets.iter().map(|p| p.estimated_bytes).max()).unwrap_or(1).max(1);
    const BAR: usize = 24;
    for (i, p) in state.presets.iter().enumerate() {
        let selected = state.preset_index == Some(i);
        let filled = ((p.estimated_bytes as f64 / scale as f64) * BAR as f64).round().min(BAR as f64) as usize;
        let fits = card.is_none_or(|c| p.estimated_bytes <= c);
        let color = if fits { Color::Green } else { Color::Red };
        let style = if selected { Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan) } else { Style::new() };
        lines.push(Line::from(vec![
            Span::raw(if selected { "▶ " } else { "  " }),
            Span::styled(format!("{:<12}", p.name), style),
            Span::styled("█".repeat(filled), Style::new().fg(color)),
            Span::styled("░".repeat(BAR - filled), Style::new().fg(Color::DarkGray)),
            Span::raw(format!(" {}{}", format_gib(p.estimated_bytes), if fits { "" } else { "  too big" })),
        ]));
    }
    if state.advanced {
        return draw_advanced(frame, area, state);
    }
    frame.render_widget(Paragraph::new(lines), area);
}

/// The advanced panel: every other setting, a window of rows around the focus.
fn draw_advanced(frame: &mut Frame, area: Rect, state: &WizardState) {
    let preset = state.preset_index.and_then(|i| state.presets.get(i));
    let mut lines = vec![
        hint(match preset {
            Some(p) => format!("Over preset {} ({}); values you set are marked *", p.name, format_gib(p.estimated_bytes)),
            None => "Over the defaults; values you set are marked *".into(),
        }),
        Line::from(""),
    ];
    let rows = state.advanced_rows();
    let key_width = rows.iter().map(|r| r.key.chars().count()).max().unwrap_or(0) + 2;
    // The last two lines say what the focused setting does.
    let room = (area.height as usize).saturating_sub(lines.len() + 2).max(1);
    let first = state.advanced_focus.saturating_sub(room / 2).min(rows.len().saturating_sub(room));
    for (i, row) in rows.iter().enumerate().skip(first).take(room) {
        let selected = i == state.advanced_focus;
        let style = if selected { Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD) } else { Style::new() };
        let value_style = if row.set { Style::new().fg(Color::Yellow) } else { Style::new() };
        let shown = match row.kind {
            SettingKind::Switch | SettingKind::Choice if selected => format!("◀ {} ▶", row.value),
            SettingKind::Number | SettingKind::Text if selected => format!("{}▏", row.value),
            _ => row.value.clone(),
        };
        lines.push(Line::from(vec![
            Span::raw(if selected { "▶ " } else { "  " }),
            Span::styled(format!("{:<key_width$}", row.key), style),
            Span::styled(shown, value_style),
            Span::raw(if row.set { " *" } else { "" }),
        ]));
    }
    if let Some(row) = rows.get(state.advanced_focus) {
        lines.push(hint(settings::help(&row.key).to_string()));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn draw_review(frame: &mut Frame, area: Rect, state: &WizardState) {
    let text = match state.yaml() {
        Ok(yaml) => yaml,
        Err(e) => e,
    };
    let mut lines = vec![
        hint(format!("Will be saved as {}", state.config_path().display())),
        hint(format!("The run's folder: {}", state.run_dir().display())),
    ];
    lines.extend(text.lines().map(|l| Line::from(l.to_string())));
    frame.render_widget(Paragraph::new(lines).scroll((state.review_scroll, 0)), area);
}
