//! What the dashboard shows, built only by reading the run directory: the
//! config, events.jsonl, samples/*.png and whether the trainer's lock is held.
//! Reading never fails the dashboard: problems become a note on screen.

use std::path::{Path, PathBuf};

use image::DynamicImage;
use ratatui_image::protocol::Protocol;

use crate::config::RunConfig;
use crate::run::events::{Event, EventTail, StepRecord};
use crate::run::lock::RunLock;

/// Steps left out of the ETA's speed: the first steps include compilation,
/// cudnn autotuning and cache warm-up, and would make the estimate pessimistic.
pub const WARMUP_STEPS: u64 = 5;
/// Steps shown in the "recent" loss chart.
pub const RECENT_WINDOW: usize = 100;
/// Preview images kept on screen (the newest).
pub const MAX_PREVIEWS: usize = 3;

#[derive(Debug, Clone, PartialEq)]
pub enum RunStatus {
    /// The trainer holds the lock.
    Live,
    /// Live, and the last pause/resume event was a pause.
    Paused,
    /// A `done` event was logged.
    Finished,
    /// An `error` event was logged; its message.
    Failed(String),
    /// A `stopped` event was logged (stop request or signal): checkpointed, resumable.
    Stopped,
    /// Nobody holds the lock and the log has no end: stopped, crashed or not started.
    NotRunning,
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub time: Option<f64>,
    pub kind: String,
    pub text: String,
}

/// A preview image; `protocol` is prepared by the event loop for the size it is drawn at.
pub struct Preview {
    pub path: PathBuf,
    pub name: String,
    pub image: Option<DynamicImage>,
    pub protocol: Option<Protocol>,
    /// Cell size the protocol was made for.
    pub prepared_for: (u16, u16),
}

/// The outcome of a finished or failed run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub final_loss: Option<f64>,
    pub steps: u64,
    pub checkpoint: Option<PathBuf>,
    pub samples_dir: PathBuf,
    pub log_file: PathBuf,
}

/// One validation pass (a `validation` event): the held-out photos' loss and the
/// class images' (language drift), each pooled over the run's concepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationPoint {
    pub step: u64,
    pub epoch: u64,
    pub loss: Option<f64>,
    pub class_loss: Option<f64>,
}

/// What a live trainer does before its first step.
#[derive(Debug, Clone, PartialEq)]
pub enum Preparing {
    /// Reading the model (`loading` event).
    Loading,
    /// Making concept `concept`'s class images (`class_images` events): `done` of
    /// `total`; `seconds_per_image` once two events of the concept have been timed.
    ClassImages { concept: u64, done: u64, total: u64, seconds_per_image: Option<f64> },
}

pub struct DashboardState {
    pub run_dir: PathBuf,
    pub name: String,
    pub config: Option<RunConfig>,
    /// Why the config could not be read, when it could not.
    pub config_error: Option<String>,
    /// The trainer's own count from its `start` event; before that event, the
    /// same formula (`train::trainer::total_steps`) over the config; None when
    /// neither is known.
    pub total_steps: Option<u64>,
    /// The count the config gives, used until a `start` event says otherwise.
    config_total_steps: Option<u64>,
    /// Where the trainer runs (`start` event's `device`).
    pub device: Option<String>,
    pub steps: Vec<StepRecord>,
    /// Validation passes in step order, each step once (a restarted trainer's replace those it redoes).
    pub validations: Vec<ValidationPoint>,
    pub log: Vec<LogLine>,
    pub status: RunStatus,
    pub previews: Vec<Preview>,
    /// Seconds since the Unix epoch at the last refresh (a field so tests are deterministic).
    pub now: f64,
    /// When the run started (first event's time).
    pub started: Option<f64>,
    /// The stop confirmation popup is open.
    pub confirm_stop: bool,
    /// A short line about the last request sent ("pause requested").
    pub notice: Option<String>,
    /// The event that answers the request the notice is about, and how many log
    /// lines there were when it was sent: the notice goes once the answer is logged.
    pub notice_answered_by: Option<(&'static str, usize)>,
    pub summary: Option<Summary>,
    /// The card's memory, when the trainer logged it (an event field `vram_total_bytes`).
    pub vram_total: Option<u64>,
    /// How many processes train together (`start` event's `world_size`; 1 alone).
    pub world_size: u64,
    /// Each rank's memory in use, from the last `ranks` event of a data-parallel run.
    pub rank_memory: Vec<u64>,
    /// Set from the trainer's last `loading` / `class_images` event until its `start`.
    pub preparing: Option<Preparing>,
    /// The class images the trainer has made, in order (`class_images` events' paths).
    class_images: Vec<PathBuf>,
    /// The previews panel shows the newest class images (class images are being
    /// made and no sample exists yet).
    pub previews_are_class_images: bool,
    /// The run's events read so far (each refresh reads only what was appended).
    events: EventTail,
}

impl DashboardState {
    /// Reads `run_dir` as it is now.
    pub fn load(run_dir: &Path, now: f64) -> DashboardState {
        let mut state = DashboardState {
            run_dir: run_dir.to_path_buf(),
            name: run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            config: None,
            config_error: None,
            total_steps: None,
            config_total_steps: None,
            device: None,
            steps: Vec::new(),
            validations: Vec::new(),
            log: Vec::new(),
            status: RunStatus::NotRunning,
            previews: Vec::new(),
            now,
            started: None,
            confirm_stop: false,
            notice: None,
            notice_answered_by: None,
            summary: None,
            vram_total: None,
            world_size: 1,
            rank_memory: Vec::new(),
            preparing: None,
            class_images: Vec::new(),
            previews_are_class_images: false,
            events: EventTail::default(),
        };
        state.load_config();
        state.refresh(now);
        state
    }

    fn load_config(&mut self) {
        let path = self.run_dir.join("config.yaml");
        match crate::config::load_run_config(&path) {
            Ok(config) => {
                self.name = config.name.clone();
                self.config_total_steps = total_steps(&config);
                self.config = Some(config);
            }
            Err(e) => self.config_error = Some(crate::error::one_line(&e)),
        }
    }

    /// Re-reads the events, the lock and the samples folder.
    pub fn refresh(&mut self, now: f64) {
        self.now = now;
        if self.config.is_none() {
            self.load_config();
        }
        let mut events = std::mem::take(&mut self.events);
        let read = events.read(&self.run_dir).map(|events| self.apply_events(events));
        self.events = events;
        if let Err(e) = read {
            self.notice = Some(crate::error::one_line(&e));
            return;
        }
        if let Some((answer, sent_at)) = self.notice_answered_by {
            if self.log.iter().skip(sent_at).any(|l| l.kind == answer) {
                self.notice = None;
                self.notice_answered_by = None;
            }
        }
        let live = RunLock::is_held(&self.run_dir);
        self.status = match (&self.status, live) {
            // The end event is written just before the trainer lets go of the lock.
            (RunStatus::Finished | RunStatus::Failed(_) | RunStatus::Stopped, _) => self.status.clone(),
            (RunStatus::Paused, true) => RunStatus::Paused,
            (_, true) => RunStatus::Live,
            (_, false) => RunStatus::NotRunning,
        };
        // A run that is over, or that ended without saying so (killed), shows where its outputs are.
        self.summary = match self.status {
            RunStatus::Finished | RunStatus::Failed(_) | RunStatus::Stopped => Some(self.summarize()),
            // Events mean a trainer held the lock: it was killed (before its first step, maybe).
            RunStatus::NotRunning if !self.steps.is_empty() || !self.log.is_empty() => Some(self.summarize()),
            _ => None,
        };
        self.refresh_previews();
    }

    fn apply_events(&mut self, events: &[Event]) {
        self.steps.clear();
        self.validations.clear();
        self.log.clear();
        self.started = None;
        self.total_steps = self.config_total_steps;
        self.preparing = None;
        self.class_images.clear();
        let mut status = RunStatus::NotRunning;
        // The first `class_images` event of the concept being made: (time, done).
        let mut class_images_from: Option<(f64, u64)> = None;
        for event in events {
            match event {
                Event::Step(s) => {
                    self.preparing = None;
                    self.started.get_or_insert(s.time);
                    self.steps.push(s.clone());
                }
                Event::Named { name, fields } => {
                    let time = fields.get("time").and_then(|t| t.as_f64());
                    if let Some(t) = time {
                        self.started.get_or_insert(t);
                    }
                    if let Some(total) = fields.get("vram_total_bytes").and_then(|v| v.as_u64()) {
                        self.vram_total = Some(total);
                    }
                    // Each rank's memory, every few steps: a figure for the stats, not a log line.
                    if name == "ranks" {
                        let memory = fields.get("memory_bytes").and_then(|v| v.as_array());
                        self.rank_memory = memory.map(|m| m.iter().filter_map(|b| b.as_u64()).collect()).unwrap_or_default();
                        continue;
                    }
                    let text = describe(name, fields);
                    if name != "class_images" && name != "warning" {
                        self.preparing = None;
                    }
                    match name.as_str() {
                        // A (re)started trainer: whether it still runs is the lock's to say.
                        "loading" => {
                            status = RunStatus::NotRunning;
                            self.preparing = Some(Preparing::Loading);
                        }
                        "class_images" => {
                            let count = |key: &str| fields.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
                            let (concept, done, total) = (count("concept"), count("done"), count("total"));
                            let same = matches!(self.preparing, Some(Preparing::ClassImages { concept: c, .. }) if c == concept);
                            if !same {
                                class_images_from = time.map(|t| (t, done));
                            }
                            let seconds_per_image = match (class_images_from, time) {
                                (Some((t0, d0)), Some(t1)) if done > d0 => Some((t1 - t0) / (done - d0) as f64),
                                _ => None,
                            };
                            self.preparing = Some(Preparing::ClassImages { concept, done, total, seconds_per_image });
                            self.class_images.extend(fields.get("path").and_then(|p| p.as_str()).map(PathBuf::from));
                            // One line a concept, kept current, instead of one per image.
                            if same && self.log.last().is_some_and(|l| l.kind == "class_images") {
                                self.log.pop();
                            }
                        }
                        // Each (re)start of the trainer states its plan; whether it still runs is the lock's to say.
                        "start" => {
                            status = RunStatus::NotRunning;
                            // A restart goes back to its checkpoint (or to step 0): the steps
                            // logged after that point were lost with the process and are redone.
                            let from = fields.get("resumed_from").and_then(|v| v.as_u64()).unwrap_or(0);
                            self.steps.retain(|s| s.step <= from);
                            self.validations.retain(|v| v.step <= from);
                            if let Some(total) = fields.get("total_steps").and_then(|v| v.as_u64()) {
                                self.total_steps = Some(total);
                            }
                            if let Some(device) = fields.get("device").and_then(|v| v.as_str()) {
                                self.device = Some(device.to_string());
                            }
                            self.world_size = fields.get("world_size").and_then(|v| v.as_u64()).unwrap_or(1).max(1);
                            self.rank_memory.clear();
                        }
                        "validation" => {
                            let number = |key: &str| fields.get(key).and_then(|v| v.as_f64()).filter(|v| v.is_finite());
                            let step = fields.get("step").and_then(|v| v.as_u64()).unwrap_or(0);
                            // A pass logged again (a restart that redid its step) replaces the earlier one.
                            self.validations.retain(|v| v.step < step);
                            self.validations.push(ValidationPoint {
                                step,
                                epoch: fields.get("epoch").and_then(|v| v.as_u64()).unwrap_or(0),
                                loss: number("loss"),
                                class_loss: number("class_loss"),
                            });
                        }
                        "stopped" => status = RunStatus::Stopped,
                        "pause" => status = RunStatus::Paused,
                        "resume" => status = RunStatus::Live,
                        "done" => status = RunStatus::Finished,
                        "error" => status = RunStatus::Failed(text.clone()),
                        _ => {}
                    }
                    self.log.push(LogLine { time, kind: name.clone(), text });
                }
            }
        }
        self.status = status;
    }

    fn summarize(&self) -> Summary {
        let checkpoints = self.run_dir.join("checkpoints");
        let newest = std::fs::read_dir(&checkpoints).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
                .max()
        });
        Summary {
            final_loss: self.steps.last().map(|s| s.loss),
            steps: self.steps.last().map(|s| s.step).unwrap_or(0),
            checkpoint: newest,
            samples_dir: self.run_dir.join("samples"),
            log_file: self.run_dir.join("train.log"),
        }
    }

    /// Keeps the newest MAX_PREVIEWS images of samples/ (names sort by step), decoding only new ones.
    fn refresh_previews(&mut self) {
        let dir = self.run_dir.join("samples");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        // Before the first sample, the class images being made show what the class prompt gives.
        self.previews_are_class_images =
            paths.is_empty() && self.is_live() && matches!(self.preparing, Some(Preparing::ClassImages { .. }));
        if self.previews_are_class_images {
            paths = self.class_images.clone();
        }
        let newest: Vec<PathBuf> = paths.into_iter().rev().take(MAX_PREVIEWS).collect();
        let all_read = self.previews.iter().all(|p| p.image.is_some());
        if all_read && newest.iter().eq(self.previews.iter().map(|p| &p.path)) {
            return;
        }
        let mut old: Vec<Preview> = std::mem::take(&mut self.previews);
        for path in newest {
            if let Some(i) = old.iter().position(|p| p.path == path && p.image.is_some()) {
                self.previews.push(old.swap_remove(i));
                continue;
            }
            // Samples are renamed into place whole, but one that cannot be read now
            // (damaged, or copied in by hand mid-write) is tried again next refresh.
            let image = image::open(&path).ok();
            let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.previews.push(Preview { path, name, image, protocol: None, prepared_for: (0, 0) });
        }
    }

    pub fn last_step(&self) -> Option<&StepRecord> {
        self.steps.last()
    }

    pub fn is_live(&self) -> bool {
        matches!(self.status, RunStatus::Live | RunStatus::Paused)
    }

    /// Seconds since the first event; a run that is over stops the clock at its last event.
    pub fn elapsed(&self) -> Option<f64> {
        let start = self.started?;
        let end = if self.is_live() {
            self.now
        } else {
            let last_named = self.log.iter().filter_map(|l| l.time).fold(f64::MIN, f64::max);
            self.steps.last().map(|s| s.time).unwrap_or(f64::MIN).max(last_named)
        };
        Some((end - start).max(0.0))
    }

    /// Steps per second of the running trainer, measured after its warm-up steps:
    /// steps an earlier process logged (a resumed run) and the time spent paused
    /// are left out, or a night between crash and resume would stretch the ETA.
    pub fn measured_speed(&self) -> Option<f64> {
        let started = self.log.iter().rev().find(|l| l.kind == "start").and_then(|l| l.time).unwrap_or(f64::MIN);
        let current: Vec<&StepRecord> = self.steps.iter().filter(|s| s.time >= started).collect();
        let first = current.first()?.step;
        let from = current.iter().find(|s| s.step >= first + WARMUP_STEPS)?;
        let last = current.last()?;
        let paused = self.paused_seconds(from.time, last.time);
        let (ds, dt) = (last.step.saturating_sub(from.step) as f64, last.time - from.time - paused);
        (ds > 0.0 && dt > 0.0).then(|| ds / dt)
    }

    /// Seconds between `from` and `to` that the trainer spent paused (`pause` to `resume`).
    fn paused_seconds(&self, from: f64, to: f64) -> f64 {
        let mut total = 0.0;
        let mut paused_at: Option<f64> = None;
        for line in &self.log {
            match (line.kind.as_str(), line.time) {
                ("pause", Some(t)) => paused_at = Some(t),
                ("resume", Some(t)) => {
                    if let Some(p) = paused_at.take() {
                        total += (t.min(to) - p.max(from)).max(0.0);
                    }
                }
                _ => {}
            }
        }
        total
    }

    /// Seconds left at the speed measured after warm-up.
    pub fn eta(&self) -> Option<f64> {
        let total = self.total_steps?;
        let last = self.last_step()?.step;
        if last >= total {
            return Some(0.0);
        }
        Some((total - last) as f64 / self.measured_speed()?)
    }

    /// The validation pass with the lowest held-out loss (the earliest of equals):
    /// where a run that has begun to overfit was best.
    pub fn lowest_validation(&self) -> Option<&ValidationPoint> {
        self.validations.iter().filter(|v| v.loss.is_some()).fold(None, |best: Option<&ValidationPoint>, v| match best {
            Some(b) if b.loss <= v.loss => Some(b),
            _ => Some(v),
        })
    }

    /// Peak of the logged VRAM use; None when no step reported any (CPU runs log 0).
    /// Each rank's memory in GiB on one line (`rank 0 1.2 · rank 1 1.3 GiB`), for a run of several processes.
    pub fn rank_memory_line(&self) -> Option<String> {
        if self.rank_memory.len() < 2 {
            return None;
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let each: Vec<String> = self.rank_memory.iter().enumerate().map(|(r, &b)| format!("rank {r} {:.1}", gib(b))).collect();
        Some(format!("{} GiB", each.join(" · ")))
    }

    pub fn vram_peak(&self) -> Option<u64> {
        self.steps.iter().map(|s| s.vram_bytes).max().filter(|&b| b > 0)
    }

}

/// The trainer's formula over the config's instance images, for the moments
/// before its `start` event; None when a folder cannot be listed.
pub fn total_steps(config: &RunConfig) -> Option<u64> {
    let t = &config.training;
    let batches = crate::data::buckets::planned_batches_per_epoch(config)?;
    Some(crate::train::trainer::total_steps(t.steps_per_image, batches, t.gradient_accumulation_steps))
}

/// One log line for a named event, from the fields it usually carries.
fn describe(name: &str, fields: &serde_json::Map<String, serde_json::Value>) -> String {
    let text = |key: &str| fields.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let number = |key: &str| fields.get(key).and_then(|v| v.as_u64());
    if name == "start" {
        let mut parts = vec![match fields.get("resumed_from").and_then(|v| v.as_u64()) {
            Some(step) => format!("resumed from step {step}"),
            None => "started".to_string(),
        }];
        parts.extend(number("total_steps").map(|t| format!("{t} steps")));
        parts.extend(number("images").map(|i| format!("{i} images")));
        parts.extend(text("device"));
        parts.extend(number("world_size").filter(|&w| w > 1).map(|w| format!("{w} processes")));
        parts.extend(text("precision"));
        return parts.join(" · ");
    }
    if name == "class_images" {
        let mut line = format!(
            "class images {}/{} · concept {}",
            number("done").unwrap_or(0),
            number("total").unwrap_or(0),
            number("concept").unwrap_or(0) + 1
        );
        line.extend(text("prompt").map(|p| format!(" · {p:?}")));
        return line;
    }
    if name == "validation" {
        let value = |key: &str| fields.get(key).and_then(|v| v.as_f64()).map(|v| format!("{v:.4}"));
        let mut parts = vec![format!("validation · step {}", number("step").unwrap_or(0))];
        parts.extend(value("loss").map(|l| format!("loss {l}")));
        parts.extend(value("class_loss").map(|l| format!("class images {l}")));
        return parts.join(" · ");
    }
    if name == "loading" {
        return format!("loading the model{}", text("source").map(|s| format!(" · {s}")).unwrap_or_default());
    }
    let step = number("step").map(|s| format!("step {s}"));
    let detail = text("message").or_else(|| text("path")).or_else(|| {
        fields.get("paths").and_then(|v| v.as_array()).map(|a| {
            a.iter().filter_map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
        })
    });
    let mut parts = vec![name.to_string()];
    parts.extend(step);
    parts.extend(detail);
    parts.join(" · ")
}
