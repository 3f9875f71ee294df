//! From the wizard to a running trainer, headless: the wizard's "save and
//! start" config is started as a detached trainer through the binary, keeps
//! training with nobody watching, and the dashboard state read from its run
//! directory ends with the summary.

#[path = "train_support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use dreambooth::config::RunConfig;
use dreambooth::run::lock::RunLock;
use dreambooth::tui::dashboard::{DashboardState, RunStatus};
use dreambooth::tui::launch::start_detached;
use dreambooth::tui::wizard::{Action, GpuInfo, ModelChoice, PresetChoice, Sources, Step, WizardState};

/// No GPU; the presets the program ships (only their names matter here).
struct CpuMachine;

impl Sources for CpuMachine {
    fn models(&self) -> Vec<ModelChoice> {
        Vec::new()
    }
    fn presets(&self, _: &RunConfig) -> Vec<PresetChoice> {
        ["cpu", "8gb", "24gb"].iter().map(|n| PresetChoice { name: n.to_string(), estimated_bytes: 1 << 30 }).collect()
    }
    fn gpu(&self) -> Option<GpuInfo> {
        None
    }
}

/// A `cpu` preset beside the saved config wins over the built-in one: the
/// demo model's small resolution and few sampling steps keep the run short.
const SMALL_CPU_PRESET: &str = "device: cpu\nresolution: 64\ntraining:\n  mixed_precision: 'no'\n  attention: default\n  save_model_every_n_epochs: 0\n  save_preview_every_n_epochs: 0\nsampling:\n  steps: 2\n";

fn type_text(state: &mut WizardState, text: &str) {
    for c in text.chars() {
        state.apply(Action::Input(c));
    }
}

fn wizard_config(root: &Path) -> std::path::PathBuf {
    let runs = root.join("runs");
    std::fs::create_dir_all(runs.join("presets")).unwrap();
    std::fs::write(runs.join("presets/cpu.yaml"), SMALL_CPU_PRESET).unwrap();
    let data = root.join("data");
    support::subject_images(&data, 2);
    let mut state = WizardState::new(&runs, Box::new(CpuMachine));
    type_text(&mut state, "thing");
    state.apply(Action::Next);
    type_text(&mut state, &support::demo_model().display().to_string());
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    type_text(&mut state, &data.display().to_string());
    state.apply(Action::FocusNext);
    type_text(&mut state, "a photo of sks thing");
    state.apply(Action::Next);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Training, "{:?}", state.error);
    state.apply(Action::Backspace);
    state.apply(Action::Backspace);
    state.apply(Action::Backspace);
    type_text(&mut state, "3");
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram, "{:?}", state.error);
    assert_eq!(state.preset_index, Some(0), "without a GPU the cpu preset is preselected");
    state.apply(Action::Next);
    state.apply(Action::Next);
    assert!(state.start);
    state.saved.clone().expect("saved")
}

#[test]
fn save_and_start_runs_a_detached_trainer_the_dashboard_follows() {
    let root = tempfile::tempdir().unwrap();
    let config = wizard_config(root.path());
    let exe = Path::new(env!("CARGO_BIN_EXE_dreambooth"));
    let run_dir = start_detached(exe, &config).unwrap();
    assert_eq!(run_dir, root.path().join("runs/thing"));
    // The trainer goes on in its own process; this one only reads the run directory.
    let start = Instant::now();
    let mut state = DashboardState::load(&run_dir, dreambooth::run::events::now());
    while state.status != RunStatus::Finished {
        assert!(start.elapsed() < Duration::from_secs(90), "the run did not finish: {:?}", state.status);
        assert!(!matches!(state.status, RunStatus::Failed(_)), "{:?}", state.status);
        std::thread::sleep(Duration::from_millis(200));
        state.refresh(dreambooth::run::events::now());
    }
    assert_eq!(state.total_steps, Some(6), "3 steps per image × 2 images, from the trainer's start event");
    let summary = state.summary.clone().unwrap();
    assert_eq!(summary.steps, 6);
    assert!(summary.checkpoint.unwrap().ends_with("checkpoints/step-000006"));
    // The resolved config the trainer wrote has the preset's settings.
    let trained = dreambooth::config::load_run_config(&run_dir.join("config.yaml")).unwrap();
    assert_eq!(trained.resolution, 64);
    assert_eq!(trained.device, "cpu");
    let wait = Instant::now();
    while RunLock::is_held(&run_dir) && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_trainer_that_cannot_start_gives_one_sentence() {
    let root = tempfile::tempdir().unwrap();
    let config = wizard_config(root.path());
    // The run folder appears after the wizard checked the name.
    std::fs::create_dir_all(root.path().join("runs/thing")).unwrap();
    std::fs::write(root.path().join("runs/thing/keep.txt"), "mine").unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_dreambooth"));
    let err = start_detached(exe, &config).unwrap_err();
    assert_eq!(dreambooth::error::exit_code(&err), 2);
    assert!(dreambooth::error::one_line(&err).contains("already exists"), "{err:#}");
}
