//! The dashboard fed a recorded run directory: snapshots at 80×24 (and a resize),
//! keys turned into control requests, the summary of a finished run.

use std::io::Write;
use std::path::Path;

use dreambooth::run::control::{take, Request};
use dreambooth::run::events::{Event, EventLog, StepRecord};
use dreambooth::run::lock::RunLock;
use dreambooth::tui::dashboard::{action_for_key, apply, draw, prepare_previews, Action, DashboardState, RunStatus};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::Terminal;
use ratatui_image::picker::Picker;

const T0: f64 = 1_700_000_000.0;
/// How long the recorded run was paused (after step 30).
const PAUSE: f64 = 20.0;

fn png(path: &Path, seed: u8) {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, seed]));
    img.save(path).unwrap();
}

/// A run of 2 images × 25 steps per image, 40 steps in, with a checkpoint,
/// a sample, a pause and a resume.
fn recorded_run(root: &Path) -> std::path::PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    png(&data.join("a.png"), 10);
    png(&data.join("b.png"), 20);
    let run = root.join("runs").join("dog");
    std::fs::create_dir_all(run.join("samples")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/step-000020")).unwrap();
    let config = format!(
        "name: dog\nsource_checkpoint: {}\noutput_dir: {}\nconcepts:\n  - instance_data_dir: {}\n    instance_prompt: a photo of sks dog\ntraining:\n  steps_per_image: 25\n",
        root.join("model.safetensors").display(),
        root.join("runs").display(),
        data.display()
    );
    std::fs::write(run.join("config.yaml"), config).unwrap();
    png(&run.join("samples/step-000020-0.png"), 200);
    let mut log = EventLog::open(&run).unwrap();
    let named = |name: &str, time: f64, fields: serde_json::Value| {
        let mut map = fields.as_object().cloned().unwrap_or_default();
        map.insert("time".into(), serde_json::json!(time));
        Event::Named { name: name.into(), fields: map }
    };
    log.write(&named(
        "start",
        T0,
        serde_json::json!({"step": 0, "total_steps": 50, "epochs": 25, "images": 2, "device": "Cuda(0)",
                           "precision": "bf16", "resumed_from": null, "vram_total_bytes": 24u64 << 30}),
    ))
    .unwrap();
    for step in 1..=40u64 {
        // Slow warm-up steps, then 2 steps a second, with a 20 s pause after step 30.
        let paused = if step > 30 { PAUSE } else { 0.0 };
        let time = if step <= 5 { T0 + step as f64 * 3.0 } else { T0 + 15.0 + (step - 5) as f64 * 0.5 + paused };
        let loss = 0.3 / (1.0 + step as f64 * 0.05) + if step % 3 == 0 { 0.02 } else { 0.0 };
        let record = StepRecord { step, epoch: step / 2, loss, lr: 1e-6, it_s: 2.0, vram_bytes: (6u64 << 30) + step * (1 << 24), time };
        log.write(&Event::Step(record)).unwrap();
        let t = time + 0.1;
        match step {
            20 => {
                log.write(&named("checkpoint", t, serde_json::json!({"step": 20, "path": "checkpoints/step-000020"}))).unwrap();
                log.write(&named("sample", t, serde_json::json!({"step": 20, "paths": ["samples/step-000020-0.png"]}))).unwrap();
            }
            30 => {
                log.write(&named("pause", t, serde_json::json!({"step": 30, "message": "pause requested"}))).unwrap();
                log.write(&named("resume", t + PAUSE, serde_json::json!({"step": 30}))).unwrap();
            }
            35 => log.write(&named("warning", t, serde_json::json!({"message": "loss spiked at step 35"}))).unwrap(),
            _ => {}
        }
    }
    run
}

fn screen(state: &mut DashboardState, width: u16, height: u16) -> String {
    prepare_previews(state, &Picker::halfblocks(), Rect::new(0, 0, width, height));
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| draw(f, state)).unwrap();
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        for x in 0..width {
            out.push_str(buffer[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

fn settings(root: &Path) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(&regex_escape(&root.display().to_string()), "[TMP]");
    s.add_filter(r"/tmp/\.tmp[A-Za-z0-9]+", "[TMP]");
    s
}

fn regex_escape(s: &str) -> String {
    s.chars().map(|c| if c.is_alphanumeric() || c == '/' { c.to_string() } else { format!("\\{c}") }).collect()
}

fn key(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
}

#[test]
fn live_run_shows_progress_loss_vram_previews_and_events() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let _lock = RunLock::acquire(&run).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    assert_eq!(state.status, RunStatus::Live);
    assert_eq!(state.total_steps, Some(50));
    // 34 steps after the 5 warm-up steps took 17 s, not counting the pause: 2 it/s, 10 steps left.
    let speed = state.measured_speed().unwrap();
    assert!((speed - 2.0).abs() < 1e-9, "{speed}");
    assert!((state.eta().unwrap() - 5.0).abs() < 1e-9);
    assert_eq!(state.vram_total, Some(24 << 30));
    assert_eq!(state.previews.len(), 1);
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("step 40/50"), "{text}");
    assert!(text.matches(['▀', '▄']).count() > 20, "the preview is drawn with half-blocks:\n{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_live_80x24", text));
    // Resized larger, the same state draws without loss.
    let big = screen(&mut state, 120, 36);
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_live_120x36", big));
}

#[test]
fn keys_send_requests_and_stop_asks_first() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let _lock = RunLock::acquire(&run).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    for (c, expected) in [('p', Request::Pause), ('s', Request::Save), ('n', Request::Sample)] {
        let action = action_for_key(&state, key(c)).unwrap();
        assert!(apply(&mut state, action));
        assert_eq!(take(&run), vec![expected]);
    }
    let ask = action_for_key(&state, key('q')).unwrap();
    assert_eq!(ask, Action::AskStop);
    apply(&mut state, ask);
    assert!(state.confirm_stop);
    assert!(take(&run).is_empty(), "nothing is sent before the confirmation");
    let text = screen(&mut state, 80, 24);
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_confirm_stop", text));
    let cancel = action_for_key(&state, key('n')).unwrap();
    assert_eq!(cancel, Action::CancelStop);
    apply(&mut state, cancel);
    apply(&mut state, Action::AskStop);
    { let a = action_for_key(&state, key('y')).unwrap(); apply(&mut state, a) };
    assert_eq!(take(&run), vec![Request::Stop]);
    // Detach (d, Esc, Ctrl-C) closes the dashboard and sends nothing.
    assert!(!{ let a = action_for_key(&state, key('d')).unwrap(); apply(&mut state, a) });
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(action_for_key(&state, ctrl_c), Some(Action::Detach));
    assert!(take(&run).is_empty());
}

#[test]
fn paused_run_offers_resume() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let _lock = RunLock::acquire(&run).unwrap();
    let mut log = EventLog::open(&run).unwrap();
    log.write(&Event::Named { name: "pause".into(), fields: serde_json::Map::new() }).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    assert_eq!(state.status, RunStatus::Paused);
    { let a = action_for_key(&state, key('p')).unwrap(); apply(&mut state, a) };
    assert_eq!(take(&run), vec![Request::Resume]);
    // The footer says so until the trainer has done it.
    assert_eq!(state.notice.as_deref(), Some("resume requested"));
    state.refresh(T0 + 61.0);
    assert_eq!(state.notice.as_deref(), Some("resume requested"));
    log.write(&Event::Named { name: "resume".into(), fields: serde_json::Map::new() }).unwrap();
    state.refresh(T0 + 62.0);
    assert_eq!(state.status, RunStatus::Live);
    assert_eq!(state.notice, None, "the request was carried out");
}

#[test]
fn finished_run_shows_its_summary() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"done\",\"step\":40,\"time\":{}}}", T0 + 53.0).unwrap();
    let mut state = DashboardState::load(&run, T0 + 1000.0);
    assert_eq!(state.status, RunStatus::Finished);
    let summary = state.summary.clone().unwrap();
    assert_eq!(summary.steps, 40);
    assert!(summary.checkpoint.unwrap().ends_with("checkpoints/step-000020"));
    // The clock stops at the last event, not at `now`.
    assert_eq!(state.elapsed(), Some(53.0));
    assert_eq!(action_for_key(&state, key('q')), Some(Action::Detach), "q only quits a finished run");
    let text = screen(&mut state, 80, 24);
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_finished", text));
}

#[test]
fn failed_run_and_unreadable_config_do_not_break_the_screen() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    std::fs::write(run.join("config.yaml"), "name: [unclosed").unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"error\",\"message\":\"CUDA out of memory\",\"time\":{}}}", T0 + 54.0).unwrap();
    writeln!(file, "{{\"step\": 41, \"ep").unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    assert!(matches!(state.status, RunStatus::Failed(ref m) if m.contains("CUDA out of memory")));
    assert!(state.config_error.is_some());
    // The trainer's start event still gives the total when the config cannot be read.
    assert_eq!(state.total_steps, Some(50));
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("step 40/50"), "{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_failed", text));
}

#[test]
fn empty_run_directory_draws() {
    let root = tempfile::tempdir().unwrap();
    let mut state = DashboardState::load(root.path(), T0);
    assert_eq!(state.status, RunStatus::NotRunning);
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("no steps logged yet"), "{text}");
}

#[test]
fn total_steps_come_from_the_start_event_and_the_formula_before_it() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    // The trainer's count wins over the config's (here they differ on purpose).
    let text = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    std::fs::write(run.join("events.jsonl"), text.replacen("\"total_steps\":50", "\"total_steps\":60", 1)).unwrap();
    let state = DashboardState::load(&run, T0 + 60.0);
    assert_eq!(state.total_steps, Some(60));
    assert_eq!(state.device.as_deref(), Some("Cuda(0)"));
    // Before the trainer has logged its start: 25 steps per image × 2 images, the trainer's formula.
    std::fs::write(run.join("events.jsonl"), "").unwrap();
    let state = DashboardState::load(&run, T0);
    assert_eq!(state.total_steps, Some(50));
    assert!(state.log.is_empty());
}

#[test]
fn stopped_run_says_how_to_continue_and_shows_warnings() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"checkpoint\",\"step\":40,\"path\":\"checkpoints/step-000040\",\"time\":{}}}", T0 + 53.0).unwrap();
    writeln!(file, "{{\"event\":\"stopped\",\"step\":40,\"path\":\"{}\",\"time\":{}}}", run.join("checkpoints/step-000040").display(), T0 + 53.5).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/step-000040")).unwrap();
    let mut state = DashboardState::load(&run, T0 + 100.0);
    assert_eq!(state.status, RunStatus::Stopped);
    assert!(state.log.iter().any(|l| l.kind == "warning" && l.text.contains("loss spiked")));
    assert!(state.log.iter().any(|l| l.kind == "stopped"));
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("dreambooth resume"), "{text}");
    assert!(text.contains("step-000040"), "{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_stopped", text));
    // A resumed trainer (a new start event, the lock held again) is live again.
    let _lock = RunLock::acquire(&run).unwrap();
    writeln!(file, "{{\"event\":\"start\",\"step\":40,\"total_steps\":50,\"resumed_from\":40,\"time\":{}}}", T0 + 200.0).unwrap();
    state.refresh(T0 + 201.0);
    assert_eq!(state.status, RunStatus::Live);
    assert!(state.summary.is_none());
    assert!(state.log.last().unwrap().text.contains("resumed from step 40"));
}

#[test]
fn cpu_run_and_a_killed_trainer() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let text = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    let cpu: String = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v.get("vram_bytes").is_some() {
                // A CPU trainer logs its resident memory.
                v["vram_bytes"] = (1u64 << 30).into();
            }
            if v.get("event").and_then(|e| e.as_str()) == Some("start") {
                v["device"] = "Cpu".into();
            }
            format!("{v}\n")
        })
        .collect();
    std::fs::write(run.join("events.jsonl"), cpu).unwrap();
    // No end event and no lock: the trainer was killed; the summary says how to go on.
    let mut state = DashboardState::load(&run, T0 + 100.0);
    assert_eq!(state.status, RunStatus::NotRunning);
    assert!(state.summary.is_some());
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("learning rate · RAM") && text.contains("RAM 1.0 · peak 1.0 GiB"), "{text}");
    assert!(text.contains("dreambooth resume"), "{text}");
}

#[test]
fn any_terminal_size_draws_without_panicking() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"error\",\"message\":\"CUDA out of memory\",\"time\":{}}}", T0 + 54.0).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    // Resizes down to a sliver and back: every size draws (content is cut, never a panic).
    for (w, h) in [(80, 24), (60, 16), (40, 12), (20, 6), (1, 1), (200, 60), (80, 24)] {
        let text = screen(&mut state, w, h);
        assert_eq!(text.lines().count(), h as usize);
    }
}

#[test]
fn a_resumed_run_redoes_the_steps_after_its_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    // Killed at step 40; resumed from the checkpoint of step 20, it has redone 21..=25.
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"start\",\"step\":20,\"total_steps\":50,\"resumed_from\":20,\"time\":{}}}", T0 + 100.0).unwrap();
    for step in 21..=25u64 {
        let record = StepRecord { step, epoch: step / 2, loss: 0.5, lr: 1e-6, it_s: 2.0, vram_bytes: 0, time: T0 + 100.0 + step as f64 };
        writeln!(file, "{}", serde_json::to_string(&record).unwrap()).unwrap();
    }
    let state = DashboardState::load(&run, T0 + 130.0);
    let steps: Vec<u64> = state.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, (1..=25).collect::<Vec<_>>(), "each step once, the redone ones in place of the lost ones");
    assert_eq!(state.last_step().unwrap().loss, 0.5);
    // The speed is the restarted trainer's (1 step a second), not stretched by the time it was down.
    let writes_six = |from: u64| ((from + 1)..=(from + 6)).map(|step| StepRecord { step, epoch: step / 2, loss: 0.5, lr: 1e-6, it_s: 1.0, vram_bytes: 0, time: T0 + 100.0 + step as f64 });
    for record in writes_six(25) {
        writeln!(file, "{}", serde_json::to_string(&record).unwrap()).unwrap();
    }
    let state = DashboardState::load(&run, T0 + 132.0);
    assert_eq!(state.measured_speed(), Some(1.0));
    assert_eq!(state.eta(), Some(19.0));
    // A run restarted from nothing (killed before its first checkpoint) starts its chart over.
    writeln!(file, "{{\"event\":\"start\",\"step\":0,\"total_steps\":50,\"resumed_from\":null,\"time\":{}}}", T0 + 200.0).unwrap();
    let state = DashboardState::load(&run, T0 + 201.0);
    assert!(state.steps.is_empty());
}

#[test]
fn a_trainer_making_class_images_shows_their_progress() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    std::fs::write(run.join("events.jsonl"), "").unwrap();
    std::fs::remove_file(run.join("samples/step-000020-0.png")).unwrap();
    let class_dir = run.join("class_images/concept-0");
    std::fs::create_dir_all(&class_dir).unwrap();
    let _lock = RunLock::acquire(&run).unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"loading\",\"source\":\"/models/sd15.safetensors\",\"resumed_from\":null,\"time\":{T0}}}").unwrap();
    let mut state = DashboardState::load(&run, T0 + 1.0);
    assert_eq!(state.status, RunStatus::Live);
    assert!(screen(&mut state, 80, 24).contains("loading the model"));
    for done in 0..=3u64 {
        let path = match done {
            0 => serde_json::Value::Null,
            _ => {
                let path = class_dir.join(format!("class-{:05}.png", done - 1));
                png(&path, 40 * done as u8);
                serde_json::json!(path.display().to_string())
            }
        };
        writeln!(
            file,
            "{{\"event\":\"class_images\",\"concept\":0,\"done\":{done},\"total\":10,\"prompt\":\"a photo of a dog\",\"path\":{path},\"time\":{}}}",
            T0 + 4.0 + 2.0 * done as f64
        )
        .unwrap();
    }
    state.refresh(T0 + 11.0);
    let text = screen(&mut state, 80, 24);
    // 2 s an image, 7 to go.
    assert!(text.contains("class images 3/10 · concept 1 · elapsed 11s · ETA 14s"), "{text}");
    assert!(text.contains("preparing"), "{text}");
    // Until the first sample, the previews are the newest class images.
    assert!(text.contains("class images, newest"), "{text}");
    let shown: Vec<&str> = state.previews.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(shown, ["class-00002", "class-00001", "class-00000"]);
    assert_eq!(state.log.iter().filter(|l| l.kind == "class_images").count(), 1, "one line for the concept, kept current");
    // Only detach and stop apply before the first step.
    assert!(text.contains("d detach  q stop") && !text.contains("pause"), "{text}");
    assert!(action_for_key(&state, key('p')).is_none());
    assert!(action_for_key(&state, key('s')).is_none());
    assert_eq!(action_for_key(&state, key('q')), Some(Action::AskStop));
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_class_images", text));
    let lines = dreambooth::tui::dashboard::list::run_lines(&root.path().join("runs"), T0 + 11.0).unwrap();
    assert_eq!(lines[0].status, "class images 3/10");
    // The first step ends the preparation.
    let record = StepRecord { step: 1, epoch: 0, loss: 0.5, lr: 1e-6, it_s: 2.0, vram_bytes: 0, time: T0 + 30.0 };
    writeln!(file, "{{\"event\":\"start\",\"step\":0,\"total_steps\":50,\"resumed_from\":null,\"time\":{}}}", T0 + 29.0).unwrap();
    writeln!(file, "{}", serde_json::to_string(&record).unwrap()).unwrap();
    state.refresh(T0 + 31.0);
    assert!(state.preparing.is_none() && !state.previews_are_class_images && state.previews.is_empty());
    assert!(screen(&mut state, 80, 24).contains("step 1/50"));
}

/// With its own `text_encoder_learning_rate` the text encoder's rate (scheduled like
/// the UNet's) has a line of its own, and says when the text encoder stopped training.
#[test]
fn the_text_encoders_own_rate_is_shown() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let config = std::fs::read_to_string(run.join("config.yaml")).unwrap().replace(
        "  steps_per_image: 25\n",
        "  steps_per_image: 25\n  learning_rate: 2.0e-6\n  text_encoder_train_ratio: 0.5\n  text_encoder_learning_rate: 5.0e-6\n",
    );
    std::fs::write(run.join("config.yaml"), config).unwrap();
    // At step 40 of 50 the text encoder (half the steps) is done.
    let mut state = DashboardState::load(&run, T0 + 60.0);
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("TE done at step 25"), "{text}");
    // At step 10 the steps logged lr 1e-6, half the UNet's base: the text encoder's is half of its own.
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    let early: String = events.lines().take_while(|l| !l.contains("\"step\":11,")).map(|l| format!("{l}\n")).collect();
    std::fs::write(run.join("events.jsonl"), early).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("TE lr 2.500e-6 to step 25"), "{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_text_encoder_lr", text));
}

/// A live dashboard reads what the trainer appends between refreshes (only that),
/// and a preview it could not read is read once it can be.
#[test]
fn refreshes_read_appended_events_and_retry_an_unreadable_preview() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    std::fs::write(run.join("samples/step-000040-0.png"), b"not a png yet").unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    assert_eq!(state.last_step().unwrap().step, 40);
    assert!(state.previews.iter().find(|p| p.name == "step-000040-0").unwrap().image.is_none());
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    let record = StepRecord { step: 41, epoch: 20, loss: 0.125, lr: 1e-6, it_s: 2.0, vram_bytes: 0, time: T0 + 61.0 };
    writeln!(file, "{}", serde_json::to_string(&record).unwrap()).unwrap();
    png(&run.join("samples/step-000040-0.png"), 40);
    state.refresh(T0 + 62.0);
    assert_eq!(state.last_step().unwrap().loss, 0.125);
    assert_eq!(state.steps.len(), 41);
    assert!(state.previews.iter().find(|p| p.name == "step-000040-0").unwrap().image.is_some());
}

/// Appends validation passes every 5 epochs (10 steps) of the recorded run: the
/// held-out photos' loss falls to its lowest at epoch 10 and rises after (the
/// model starts reproducing the training photos), the class images' rises (drift).
fn append_validations(run: &Path, passes: &[(u64, f64, f64)]) {
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    for &(step, loss, class_loss) in passes {
        let event = serde_json::json!({
            "event": "validation", "step": step, "epoch": step / 2, "loss": loss,
            "concepts": [{"concept": 0, "loss": loss, "images": 3}],
            "class_loss": class_loss, "class_concepts": [{"concept": 0, "loss": class_loss, "images": 4}],
            "timesteps": [200, 400, 600, 800], "timestep_losses": [loss, loss, loss, loss], "seconds": 0.5,
            "time": T0 + 3.0 * step as f64 / 2.0 + 1.0,
        });
        writeln!(file, "{event}").unwrap();
    }
}

const PASSES: [(u64, f64, f64); 5] =
    [(0, 0.2150, 0.1800), (10, 0.1720, 0.1810), (20, 0.1610, 0.1850), (30, 0.1660, 0.1900), (40, 0.1745, 0.1960)];

/// The validation passes are drawn on their own scale beside the whole-run loss
/// (held-out photos and class images), the stats name the epoch of the lowest,
/// and the events say each pass's values.
#[test]
fn validation_passes_are_plotted_beside_the_loss() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    append_validations(&run, &PASSES);
    let _lock = RunLock::acquire(&run).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    assert_eq!(state.validations.len(), 5);
    let best = state.lowest_validation().unwrap();
    assert_eq!((best.step, best.epoch, best.loss), (20, 10, Some(0.1610)));
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("val: photos class"), "{text}");
    assert!(text.contains("val 0.1745 · best 0.1610 @ ep 10"), "{text}");
    assert!(text.contains("0.1610") && text.contains("0.1960"), "the validation chart's own scale:\n{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_validation_80x24", text));
    let big = screen(&mut state, 120, 36);
    assert!(big.contains("validation · step 40 · loss 0.1745 · class images 0.1960"), "{big}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_validation_120x36", big));
}

/// A finished run's summary names the epoch of the lowest validation loss (the
/// checkpoint to keep when the curve turned up) and how far the class images'
/// loss moved; `dreambooth runs` has it in its VALIDATION column.
#[test]
fn a_finished_runs_summary_names_its_lowest_validation_epoch() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    append_validations(&run, &PASSES);
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"done\",\"step\":40,\"time\":{}}}", T0 + 53.0).unwrap();
    let mut state = DashboardState::load(&run, T0 + 1000.0);
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("val: lowest 0.1610 @ epoch 10, step 20 · last 0.1745 · class 0.1800 → 0.1960"), "{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_validation_finished", text));
    let lines = dreambooth::tui::dashboard::list::run_lines(&root.path().join("runs"), T0 + 1000.0).unwrap();
    assert_eq!(lines[0].validation, "0.1610 @ epoch 10");
    let table = dreambooth::tui::dashboard::list::format_table(&lines);
    assert!(table.starts_with("RUN  STATUS    STEP   LOSS    VALIDATION         CHECKPOINT"), "{table}");
    // Without validation the table keeps its columns.
    let plain = recorded_run(&root.path().join("plain"));
    let lines = dreambooth::tui::dashboard::list::run_lines(&plain.parent().unwrap().to_path_buf(), T0 + 1000.0).unwrap();
    assert_eq!(lines[0].validation, "-");
    assert!(!dreambooth::tui::dashboard::list::format_table(&lines).contains("VALIDATION"));
}

/// A restarted trainer redoes the passes after its checkpoint: the dashboard
/// keeps each step once, the restarted trainer's; class images alone are drawn too.
#[test]
fn a_restart_replaces_the_validation_passes_it_redoes() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    append_validations(&run, &PASSES);
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"start\",\"step\":20,\"total_steps\":50,\"resumed_from\":20,\"time\":{}}}", T0 + 100.0).unwrap();
    let state = DashboardState::load(&run, T0 + 101.0);
    let steps: Vec<u64> = state.validations.iter().map(|v| v.step).collect();
    assert_eq!(steps, [0, 10, 20], "the passes after the checkpoint were lost with the process");
    // The restarted trainer's own pass at step 30, and one at 20 logged again, replace the old ones.
    writeln!(file, "{{\"event\":\"validation\",\"step\":30,\"epoch\":15,\"class_loss\":0.25,\"time\":{}}}", T0 + 110.0).unwrap();
    let mut state = DashboardState::load(&run, T0 + 111.0);
    let points: Vec<(u64, Option<f64>)> = state.validations.iter().map(|v| (v.step, v.class_loss)).collect();
    assert_eq!(points, [(0, Some(0.18)), (10, Some(0.181)), (20, Some(0.185)), (30, Some(0.25))]);
    writeln!(file, "{{\"event\":\"validation\",\"step\":20,\"epoch\":10,\"class_loss\":0.3,\"time\":{}}}", T0 + 112.0).unwrap();
    state.refresh(T0 + 113.0);
    let points: Vec<(u64, Option<f64>)> = state.validations.iter().map(|v| (v.step, v.class_loss)).collect();
    assert_eq!(points, [(0, Some(0.18)), (10, Some(0.181)), (20, Some(0.3))]);
    // A run with class images only: their chart and line.
    std::fs::write(run.join("events.jsonl"), "").unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"validation\",\"step\":0,\"epoch\":0,\"class_loss\":0.2,\"time\":{T0}}}").unwrap();
    let mut state = DashboardState::load(&run, T0 + 1.0);
    assert!(state.lowest_validation().is_none());
    let text = screen(&mut state, 80, 24);
    assert!(text.contains("validation: class") && text.contains("val class images 0.2000"), "{text}");
}

/// A data-parallel run: the stats give the world size and each rank's memory
/// (rank 0's `ranks` events), the log's start line the processes, and
/// `dreambooth runs` a PROCESSES column.
#[test]
fn a_run_of_two_processes_shows_each_ranks_memory() {
    let root = tempfile::tempdir().unwrap();
    let run = recorded_run(root.path());
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    std::fs::write(run.join("events.jsonl"), events.replacen("\"step\":0,", "\"step\":0,\"world_size\":2,", 1)).unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(run.join("events.jsonl")).unwrap();
    writeln!(file, "{{\"event\":\"ranks\",\"step\":40,\"memory_bytes\":[{},{}],\"time\":{}}}", 13u64 << 29, 7u64 << 30, T0 + 36.0)
        .unwrap();
    let _lock = RunLock::acquire(&run).unwrap();
    let mut state = DashboardState::load(&run, T0 + 60.0);
    assert_eq!(state.world_size, 2);
    assert_eq!(state.rank_memory, vec![13u64 << 29, 7u64 << 30]);
    assert!(state.log.iter().all(|l| l.kind != "ranks"), "a ranks event is not a log line");
    let text = screen(&mut state, 120, 36);
    assert!(text.contains("2 processes"), "{text}");
    assert!(text.contains("rank 0 6.5 · rank 1 7.0 GiB"), "{text}");
    settings(root.path()).bind(|| insta::assert_snapshot!("dashboard_two_processes_120x36", text));
    let lines = dreambooth::tui::dashboard::list::run_lines(&root.path().join("runs"), T0 + 60.0).unwrap();
    assert_eq!(lines[0].processes, "2: 6.5, 7.0 GiB");
    let table = dreambooth::tui::dashboard::list::format_table(&lines);
    assert!(table.lines().next().unwrap().contains("PROCESSES"), "{table}");
}
