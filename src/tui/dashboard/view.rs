//! Drawing the dashboard: a pure function of `DashboardState`.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Clear, Dataset, Gauge, GraphType, Paragraph, Wrap};
use ratatui::Frame;
use ratatui_image::Image;

use super::state::{DashboardState, Preparing, RunStatus, RECENT_WINDOW};
use crate::tui::widgets::{centered, format_duration, key_hints};

/// Points drawn for the whole-run chart (bucket means beyond that).
const WHOLE_RUN_POINTS: usize = 200;

/// The screen's regions; the event loop uses `previews` to size the images before drawing.
pub struct Areas {
    pub header: Rect,
    pub recent: Rect,
    pub whole: Rect,
    /// Beside the whole-run chart once a validation pass is logged.
    pub validation: Option<Rect>,
    pub stats: Rect,
    pub previews: Rect,
    pub summary: Option<Rect>,
    pub log: Rect,
    pub footer: Rect,
}

pub fn areas(area: Rect, state: &DashboardState) -> Areas {
    // A finished run trades event lines for its summary, so the charts keep their room at 80×24.
    let (summary_height, log_height) = match state.summary {
        // Rows as drawn: a line wider than the box wraps.
        Some(_) => {
            let inner = usize::from(area.width.saturating_sub(2)).max(1);
            let rows: usize = summary_lines(state).iter().map(|l| l.width().max(1).div_ceil(inner)).sum();
            (rows as u16 + 2, 4)
        }
        None => (0, 6),
    };
    let [header, middle, summary, log, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(8),
        Constraint::Length(summary_height),
        Constraint::Length(log_height),
        Constraint::Length(1),
    ])
    .areas(area);
    let [charts, right] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(middle);
    let [recent, whole] = Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    let (whole, validation) = if state.validations.is_empty() {
        (whole, None)
    } else {
        let [whole, validation] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(whole);
        (whole, Some(validation))
    };
    let stats_height = 5 + u16::from(text_encoder_lr_line(state).is_some()) + u16::from(validation_line(state).is_some());
    let [stats, previews] = Layout::vertical([Constraint::Length(stats_height), Constraint::Min(3)]).areas(right);
    Areas { header, recent, whole, validation, stats, previews, summary: state.summary.as_ref().map(|_| summary), log, footer }
}

/// Cell rectangles of each preview image inside the previews block.
pub fn preview_cells(previews: Rect, count: usize) -> Vec<Rect> {
    let inner = Block::bordered().inner(previews);
    if count == 0 || inner.height < 2 {
        return Vec::new();
    }
    let constraints = vec![Constraint::Ratio(1, count as u32); count];
    Layout::horizontal(constraints)
        .spacing(1)
        .split(inner)
        .iter()
        .map(|r| Rect { height: r.height.saturating_sub(1), ..*r })
        .collect()
}

pub fn draw(frame: &mut Frame, state: &DashboardState) {
    let a = areas(frame.area(), state);
    draw_header(frame, a.header, state);
    draw_loss(frame, a.recent, state, true);
    draw_loss(frame, a.whole, state, false);
    if let Some(area) = a.validation {
        draw_validation(frame, area, state);
    }
    draw_stats(frame, a.stats, state);
    draw_previews(frame, a.previews, state);
    if let Some(area) = a.summary {
        draw_summary(frame, area, state);
    }
    draw_log(frame, a.log, state);
    draw_footer(frame, a.footer, state);
    if state.confirm_stop {
        let popup = centered(frame.area(), 54, 5);
        frame.render_widget(Clear, popup);
        let text = vec![
            Line::from(if state.preparing.is_some() {
                "Stop? The class images made so far are kept."
            } else {
                "Stop training? A checkpoint is saved first."
            }),
            Line::from(vec![
                Span::styled("y", Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan)),
                Span::raw(" stop    any other key: keep training"),
            ]),
        ];
        frame.render_widget(
            Paragraph::new(text).block(Block::bordered().title(" Stop ").border_style(Style::new().fg(Color::Red))),
            popup,
        );
    }
}

fn status_span(status: &RunStatus) -> Span<'static> {
    match status {
        RunStatus::Live => Span::styled("training", Style::new().fg(Color::Green)),
        RunStatus::Paused => Span::styled("paused", Style::new().fg(Color::Yellow)),
        RunStatus::Finished => Span::styled("finished", Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)),
        RunStatus::Failed(_) => Span::styled("failed", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
        RunStatus::Stopped => Span::styled("stopped", Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
        RunStatus::NotRunning => Span::styled("not running", Style::new().fg(Color::DarkGray)),
    }
}

/// The header's ratio and text while a live trainer prepares (before its first step).
fn preparing_label(state: &DashboardState) -> Option<(f64, String)> {
    if !state.is_live() {
        return None;
    }
    let elapsed = format_duration(state.elapsed());
    Some(match state.preparing.as_ref()? {
        Preparing::Loading => (0.0, format!("loading the model · elapsed {elapsed}")),
        Preparing::ClassImages { concept, done, total, seconds_per_image } => {
            let eta = seconds_per_image.map(|s| s * total.saturating_sub(*done) as f64);
            (
                if *total > 0 { (*done as f64 / *total as f64).clamp(0.0, 1.0) } else { 0.0 },
                format!(
                    "class images {done}/{total} · concept {} · elapsed {elapsed} · ETA {}",
                    concept + 1,
                    format_duration(eta)
                ),
            )
        }
    })
}

fn draw_header(frame: &mut Frame, area: Rect, state: &DashboardState) {
    let (status, colour, ratio, label) = match preparing_label(state) {
        Some((ratio, label)) => (Span::styled("preparing", Style::new().fg(Color::Cyan)), Color::Cyan, ratio, label),
        None => {
            let last = state.last_step();
            let step = last.map(|s| s.step).unwrap_or(0);
            let total = state.total_steps.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
            let ratio = match state.total_steps {
                Some(t) if t > 0 => (step as f64 / t as f64).clamp(0.0, 1.0),
                _ => 0.0,
            };
            let label = format!(
                "step {step}/{total} · epoch {} · {:.2} it/s · elapsed {} · ETA {}",
                last.map(|s| s.epoch).unwrap_or(0),
                last.map(|s| s.it_s).unwrap_or(0.0),
                format_duration(state.elapsed()),
                if state.is_live() { format_duration(state.eta()) } else { "-".into() },
            );
            (status_span(&state.status), Color::Blue, ratio, label)
        }
    };
    let title = Line::from(vec![Span::raw(format!(" {} ", state.name)), status, Span::raw(" ")]);
    let gauge = Gauge::default()
        .block(Block::bordered().title(title))
        .gauge_style(Style::new().fg(colour).bg(Color::Black))
        .ratio(ratio)
        .label(label);
    frame.render_widget(gauge, area);
}

/// Bucket means so a long run fits the chart's width.
fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max);
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (c.iter().map(|p| p.0).sum::<f64>() / n, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

fn draw_loss(frame: &mut Frame, area: Rect, state: &DashboardState, recent: bool) {
    let all: Vec<(f64, f64)> =
        state.steps.iter().filter(|s| s.loss.is_finite()).map(|s| (s.step as f64, s.loss)).collect();
    let points = if recent {
        all[all.len().saturating_sub(RECENT_WINDOW)..].to_vec()
    } else {
        downsample(&all, WHOLE_RUN_POINTS)
    };
    let title = if recent { format!(" loss, last {RECENT_WINDOW} steps ") } else { " loss, whole run ".to_string() };
    let block = Block::bordered().title(title);
    if points.is_empty() {
        frame.render_widget(Paragraph::new("no steps logged yet").block(block), area);
        return;
    }
    let (x0, x1) = (points[0].0, points[points.len() - 1].0.max(points[0].0 + 1.0));
    let (mut y0, mut y1) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let dataset = Dataset::default()
        .marker(Marker::Braille)
        .graph_type(GraphType::Line)
        .style(Style::new().fg(Color::Cyan))
        .data(&points);
    let chart = Chart::new(vec![dataset])
        .block(block)
        .x_axis(Axis::default().bounds([x0, x1]).labels([format!("{x0:.0}"), format!("{x1:.0}")]))
        .y_axis(Axis::default().bounds([y0, y1]).labels([format!("{y0:.3}"), format!("{y1:.3}")]));
    frame.render_widget(chart, area);
}

/// Colours of the validation series: held-out photos, class images.
const HELD_OUT_COLOUR: Color = Color::Yellow;
const CLASS_COLOUR: Color = Color::Magenta;

/// The validation passes on their own scale (they move far less than the
/// per-step loss, drawn at random timesteps): the held-out photos' loss and, with
/// prior preservation, the class images' (the source model's own pictures:
/// rising, the class drifts).
fn draw_validation(frame: &mut Frame, area: Rect, state: &DashboardState) {
    let series = |pick: fn(&super::state::ValidationPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        state.validations.iter().filter_map(|v| Some((v.step as f64, pick(v)?))).collect()
    };
    let (held_out, class) = (series(|v| v.loss), series(|v| v.class_loss));
    let title = match (held_out.is_empty(), class.is_empty()) {
        (false, false) => Line::from(vec![
            Span::raw(" val: "),
            Span::styled("photos", Style::new().fg(HELD_OUT_COLOUR)),
            Span::raw(" "),
            Span::styled("class", Style::new().fg(CLASS_COLOUR)),
            Span::raw(" "),
        ]),
        (true, false) => Line::from(vec![Span::raw(" validation: "), Span::styled("class", Style::new().fg(CLASS_COLOUR)), Span::raw(" ")]),
        _ => Line::from(vec![Span::raw(" "), Span::styled("validation loss", Style::new().fg(HELD_OUT_COLOUR)), Span::raw(" ")]),
    };
    let block = Block::bordered().title(title);
    let all: Vec<&(f64, f64)> = held_out.iter().chain(&class).collect();
    if all.is_empty() {
        frame.render_widget(Paragraph::new("no values").block(block), area);
        return;
    }
    let x0 = all.iter().map(|p| p.0).fold(f64::MAX, f64::min);
    let x1 = all.iter().map(|p| p.0).fold(f64::MIN, f64::max).max(x0 + 1.0);
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if y1 - y0 < 1e-9 {
        y0 -= 0.5 * y0.abs().max(1e-3);
        y1 += 0.5 * y1.abs().max(1e-3);
    }
    fn dataset(points: &[(f64, f64)], colour: Color) -> Dataset<'_> {
        // A line needs two points; the first pass alone is drawn as a dot.
        let kind = if points.len() > 1 { GraphType::Line } else { GraphType::Scatter };
        Dataset::default().marker(Marker::Braille).graph_type(kind).style(Style::new().fg(colour)).data(points)
    }
    let mut datasets = Vec::new();
    if !held_out.is_empty() {
        datasets.push(dataset(&held_out, HELD_OUT_COLOUR));
    }
    if !class.is_empty() {
        datasets.push(dataset(&class, CLASS_COLOUR));
    }
    let chart = Chart::new(datasets)
        .block(block)
        .x_axis(Axis::default().bounds([x0, x1]).labels([format!("{x0:.0}"), format!("{x1:.0}")]))
        .y_axis(Axis::default().bounds([y0, y1]).labels([format!("{y0:.4}"), format!("{y1:.4}")]));
    frame.render_widget(chart, area);
}

/// The stats panel's validation line: the last held-out loss and the epoch of
/// the lowest (or, with class images only, their last loss); None before a pass.
fn validation_line(state: &DashboardState) -> Option<String> {
    let last = state.validations.last()?;
    Some(match (last.loss, state.lowest_validation()) {
        (Some(loss), Some(best)) => format!("val {loss:.4} · best {:.4} @ ep {}", best.loss.unwrap_or(loss), best.epoch),
        _ => format!("val class images {}", last.class_loss.map_or_else(|| "-".into(), |l| format!("{l:.4}"))),
    })
}

/// The text encoder's own rate (`text_encoder_learning_rate`, scheduled like the
/// UNet's) while it trains, or the step it stopped at; None when it has no rate of its own.
fn text_encoder_lr_line(state: &DashboardState) -> Option<String> {
    let t = &state.config.as_ref()?.training;
    let own = t.text_encoder_learning_rate?;
    if t.text_encoder_train_ratio <= 0.0 || t.train_imagic_only {
        return None;
    }
    let until = crate::train::modules::text_encoder_steps(t, state.total_steps?);
    let last = state.last_step();
    if last.is_some_and(|s| s.step >= until) {
        return Some(format!("TE done at step {until}"));
    }
    let lr = last.filter(|_| t.learning_rate > 0.0).map(|s| format!("{:.3e}", s.lr * own / t.learning_rate));
    Some(format!("TE lr {} to step {until}", lr.unwrap_or_else(|| "-".into())))
}

fn draw_stats(frame: &mut Frame, area: Rect, state: &DashboardState) {
    // A CPU trainer logs its resident memory where a GPU one logs VRAM.
    let cpu = state.device.as_deref().is_some_and(|d| d.to_ascii_lowercase().starts_with("cpu"));
    let memory = if cpu { "RAM" } else { "VRAM" };
    let processes = if state.world_size > 1 { format!(" · {} processes", state.world_size) } else { String::new() };
    let block = Block::bordered().title(format!(" learning rate · {memory}{processes} "));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let text_encoder = text_encoder_lr_line(state);
    let validation = validation_line(state);
    let ranks = state.rank_memory_line();
    let [lr_row, te_row, val_row, vram_label, vram_gauge, ranks_row] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(u16::from(text_encoder.is_some())),
        Constraint::Length(u16::from(validation.is_some())),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(u16::from(ranks.is_some())),
    ])
    .areas(inner);
    // Every rank's own figure under rank 0's gauge (rank 0 logs the steps).
    if let Some(line) = ranks {
        frame.render_widget(Paragraph::new(line), ranks_row);
    }
    if let Some(line) = text_encoder {
        frame.render_widget(Paragraph::new(line), te_row);
    }
    if let Some(line) = validation {
        frame.render_widget(Paragraph::new(line).style(Style::new().fg(HELD_OUT_COLOUR)), val_row);
    }
    let last = state.last_step();
    let lr = last.map(|s| format!("lr {:.3e}", s.lr)).unwrap_or_else(|| "lr -".into());
    let loss = last.map(|s| format!("   loss {:.4}", s.loss)).unwrap_or_default();
    frame.render_widget(Paragraph::new(format!("{lr}{loss}")), lr_row);
    let used = last.map(|s| s.vram_bytes).unwrap_or(0);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let card_total = state.vram_total.filter(|_| !cpu);
    let card = card_total.map(|t| format!(" of {:.1}", gib(t))).unwrap_or_default();
    let Some(peak) = state.vram_peak() else {
        // No step reported GPU memory: a CPU run, or no step yet.
        let text = match &state.device {
            Some(_) if cpu => "VRAM not used (CPU run)".to_string(),
            _ => format!("VRAM no reading yet{}", state.vram_total.map(|t| format!(" · card {:.1} GiB", gib(t))).unwrap_or_default()),
        };
        frame.render_widget(Paragraph::new(text), vram_label);
        return;
    };
    frame.render_widget(
        Paragraph::new(format!("{memory} {:.1} · peak {:.1}{card} GiB", gib(used), gib(peak))),
        vram_label,
    );
    let scale = card_total.unwrap_or(peak).max(1);
    let gauge = Gauge::default()
        .gauge_style(Style::new().fg(Color::Magenta).bg(Color::Black))
        .ratio((used as f64 / scale as f64).clamp(0.0, 1.0))
        .label("");
    frame.render_widget(gauge, vram_gauge);
}

fn draw_previews(frame: &mut Frame, area: Rect, state: &DashboardState) {
    let title = if state.previews_are_class_images { " class images, newest " } else { " previews " };
    frame.render_widget(Block::bordered().title(title), area);
    if state.previews.is_empty() {
        frame.render_widget(Paragraph::new("no previews yet"), Block::bordered().inner(area));
        return;
    }
    for (preview, cell) in state.previews.iter().zip(preview_cells(area, state.previews.len())) {
        match &preview.protocol {
            Some(protocol) => frame.render_widget(Image::new(protocol), cell),
            None => frame.render_widget(Paragraph::new("(unreadable)"), cell),
        }
        let caption = Rect { y: cell.y + cell.height, height: 1, ..cell };
        frame.render_widget(Paragraph::new(preview.name.clone()).style(Style::new().fg(Color::DarkGray)), caption);
    }
}

/// What the summary says: how the run ended, then where its outputs are.
fn summary_lines(state: &DashboardState) -> Vec<Line<'static>> {
    let Some(summary) = &state.summary else { return Vec::new() };
    let mut lines = Vec::new();
    let loss = summary.final_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
    let total = state.total_steps.map(|t| format!("/{t}")).unwrap_or_default();
    let outcome = format!("{}{total} steps · final loss {loss}", summary.steps);
    let resume = format!("continue with: dreambooth resume {}", state.run_dir.display());
    match &state.status {
        RunStatus::Failed(message) => {
            lines.push(Line::from(Span::styled(message.clone(), Style::new().fg(Color::Red))));
            lines.push(Line::from(format!("{outcome} · log: {}", summary.log_file.display())));
        }
        RunStatus::Stopped => {
            lines.push(Line::from(format!("stopped at {outcome}")));
            lines.push(Line::from(Span::styled(resume, Style::new().fg(Color::Yellow))));
        }
        RunStatus::NotRunning => {
            lines.push(Line::from(Span::styled(
                format!("the trainer ended without a final event at {outcome}"),
                Style::new().fg(Color::Yellow),
            )));
            lines.push(Line::from(Span::styled(resume, Style::new().fg(Color::Yellow))));
        }
        _ => lines.push(Line::from(format!("finished {outcome}"))),
    }
    if let Some(line) = validation_summary(state) {
        lines.push(Line::from(line));
    }
    lines.push(Line::from(format!(
        "checkpoint: {}",
        summary.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
    )));
    lines.push(Line::from(format!("samples:    {}", summary.samples_dir.display())));
    lines
}

/// The summary's validation line: the lowest held-out loss with its epoch (the
/// checkpoint nearest it is the one to keep when the curve turned up), the last,
/// and the class images' loss from the first pass to the last.
fn validation_summary(state: &DashboardState) -> Option<String> {
    let (first, last) = (state.validations.first()?, state.validations.last()?);
    let mut parts = Vec::new();
    if let (Some(best), Some(loss)) = (state.lowest_validation(), last.loss) {
        parts.push(format!("val: lowest {:.4} @ epoch {}, step {} · last {loss:.4}", best.loss.unwrap_or(loss), best.epoch, best.step));
    }
    if let (Some(a), Some(b)) = (first.class_loss, last.class_loss) {
        parts.push(format!("{}class {a:.4} → {b:.4}", if parts.is_empty() { "val: " } else { "" }));
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

fn draw_summary(frame: &mut Frame, area: Rect, state: &DashboardState) {
    frame.render_widget(
        Paragraph::new(summary_lines(state)).wrap(Wrap { trim: false }).block(Block::bordered().title(" summary ")),
        area,
    );
}

fn draw_log(frame: &mut Frame, area: Rect, state: &DashboardState) {
    let block = Block::bordered().title(" events ");
    let height = block.inner(area).height as usize;
    let mut lines: Vec<Line> = Vec::new();
    if let Some(e) = &state.config_error {
        lines.push(Line::from(Span::styled(e.clone(), Style::new().fg(Color::Yellow))));
    }
    let start = state.log.len().saturating_sub(height.saturating_sub(lines.len()));
    for entry in &state.log[start..] {
        let style = match entry.kind.as_str() {
            "error" => Style::new().fg(Color::Red),
            "warning" => Style::new().fg(Color::Yellow),
            "checkpoint" | "done" => Style::new().fg(Color::Green),
            _ => Style::new(),
        };
        let when = match (entry.time, state.started) {
            (Some(t), Some(s)) => format!("{:>7} ", format_duration(Some(t - s))),
            _ => "        ".into(),
        };
        lines.push(Line::from(vec![Span::styled(when, Style::new().fg(Color::DarkGray)), Span::styled(entry.text.clone(), style)]));
    }
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn draw_footer(frame: &mut Frame, area: Rect, state: &DashboardState) {
    let pause = if state.status == RunStatus::Paused { "resume" } else { "pause" };
    let mut line = if state.is_live() && state.preparing.is_some() {
        // Before the first step there is nothing to pause, save or sample yet.
        key_hints(&[("d", "detach"), ("q", "stop")])
    } else if state.is_live() {
        key_hints(&[("p", pause), ("s", "save now"), ("n", "sample now"), ("d", "detach"), ("q", "stop")])
    } else {
        let mut line = key_hints(&[("d/q", "quit")]);
        if state.status == RunStatus::Finished {
            // Over-trained or not yet? The method's answer is more epochs from here.
            line.spans.push(Span::styled(
                "  more epochs: dreambooth resume <run> --steps-per-image N",
                Style::new().fg(Color::DarkGray),
            ));
        }
        line
    };
    if let Some(notice) = &state.notice {
        line.spans.push(Span::styled(format!("  {notice}"), Style::new().fg(Color::Yellow)));
    }
    frame.render_widget(Paragraph::new(line), area);
}
