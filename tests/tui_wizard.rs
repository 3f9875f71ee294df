//! The wizard driven headless: actions and key events in, state and
//! TestBackend snapshots out, for every step and its validation errors.

use std::path::Path;

use dreambooth::config::RunConfig;
use dreambooth::run::lock::RunLock;
use dreambooth::tui::wizard::{
    action_for_key, draw, Action, ConceptKind, GpuInfo, ModelChoice, PresetChoice, Sources, Step, WizardState,
};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

struct Fixture {
    model: String,
    /// An RTX 4090 is found (else no GPU).
    gpu: bool,
    /// Why libtorch cannot use it (an old driver), if so.
    unusable: Option<&'static str>,
}

impl Sources for Fixture {
    fn models(&self) -> Vec<ModelChoice> {
        vec![
            ModelChoice { path: self.model.clone(), architecture: "SD 1.x".into(), size: "2.1 GB".into(), format: "safetensors".into() },
            ModelChoice { path: "/models/v2-1".into(), architecture: "SD 2.x".into(), size: "5.2 GB".into(), format: "diffusers".into() },
        ]
    }
    fn presets(&self, config: &RunConfig) -> Vec<PresetChoice> {
        // LoRA halves the (made-up) estimates: the wizard must ask again when it changes.
        let scale = if config.training.use_lora { 0.5 } else { 1.0 };
        [("8gb", 7.2), ("12gb", 10.9), ("24gb", 21.5), ("48gb", 38.0)]
            .iter()
            .map(|(n, gb)| PresetChoice { name: n.to_string(), estimated_bytes: (gb * scale * (1u64 << 30) as f64) as u64 })
            .collect()
    }
    fn gpu(&self) -> Option<GpuInfo> {
        self.gpu.then(|| GpuInfo { name: "NVIDIA GeForce RTX 4090".into(), total_bytes: 24 << 30, unusable: self.unusable.map(String::from) })
    }
}

struct Setup {
    root: tempfile::TempDir,
    state: WizardState,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("v1-5.safetensors");
    std::fs::write(&model, b"x").unwrap();
    let data = root.path().join("dog");
    std::fs::create_dir_all(&data).unwrap();
    for name in ["1.png", "2.png", "3.png"] {
        image::RgbImage::new(8, 8).save(data.join(name)).unwrap();
    }
    let state = WizardState::new(&root.path().join("runs"), Box::new(Fixture { model: model.display().to_string(), gpu: true, unusable: None }));
    Setup { root, state }
}

/// Drives the wizard from its first step to the VRAM step: run `name`, the first
/// found model, one concept on `root/dog` with `prompt`, the training defaults.
fn to_vram_step(state: &mut WizardState, root: &Path, name: &str, prompt: &str) {
    type_text(state, name);
    state.apply(Action::Next);
    state.apply(Action::FocusNext);
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    type_text(state, &root.join("dog").display().to_string());
    state.apply(Action::FocusNext);
    type_text(state, prompt);
    state.apply(Action::Next);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Training, "{:?}", state.error);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram, "{:?}", state.error);
}

/// The wizard on a machine without a GPU, at the VRAM step of a valid run.
fn at_vram_without_gpu(root: &Path) -> WizardState {
    let model = root.join("v1-5.safetensors");
    let mut state = WizardState::new(&root.join("runs"), Box::new(Fixture { model: model.display().to_string(), gpu: false, unusable: None }));
    to_vram_step(&mut state, root, "cpu-run", "a photo of sks dog");
    state
}

/// Asking for CUDA where there is none is refused before the run is saved.
#[test]
fn a_cuda_device_without_a_gpu_is_refused() {
    let Setup { root, .. } = setup();
    let mut state = at_vram_without_gpu(root.path());
    state.apply(Action::ToggleAdvanced);
    focus_setting(&mut state, "device");
    while state.advanced_rows()[state.advanced_focus].value != "cuda" {
        state.apply(Action::Right);
    }
    state.apply(Action::Next);
    if tch::Cuda::is_available() {
        return; // this machine has CUDA that NVML did not report: nothing to refuse
    }
    assert_eq!(state.step, Step::Vram);
    let error = state.error.clone().unwrap_or_default();
    assert!(error.contains("`device: cuda` needs a CUDA GPU and this machine has none"), "{error}");
}

/// A GPU the driver reports but libtorch cannot use (a driver older than the wheel's
/// CUDA) is said on the VRAM step, and `device: cuda` is refused with the reason.
#[test]
fn a_gpu_libtorch_cannot_use_is_said_and_cuda_is_refused() {
    let Setup { root, .. } = setup();
    let model = root.path().join("v1-5.safetensors");
    let why = "the NVIDIA GeForce RTX 4090 is out of libtorch's reach: its driver 535.104.05 supports CUDA 12.2";
    let fixture = Fixture { model: model.display().to_string(), gpu: true, unusable: Some(why) };
    let mut state = WizardState::new(&root.path().join("runs"), Box::new(fixture));
    to_vram_step(&mut state, root.path(), "old-driver", "a photo of sks dog");
    let text = screen_sized(&state, 200, 30);
    assert!(text.contains("Training runs on the CPU: the NVIDIA GeForce RTX 4090 is out of libtorch's reach"), "{text}");
    state.apply(Action::ToggleAdvanced);
    focus_setting(&mut state, "device");
    while state.advanced_rows()[state.advanced_focus].value != "cuda" {
        state.apply(Action::Right);
    }
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram);
    let error = state.error.clone().unwrap_or_default();
    assert!(error.contains(&format!("`device: cuda` cannot train: {why}")), "{error}");
}

/// Files the trainer will not read (an iPhone's .heic) are counted beside the
/// folder, so the user converts them before training without them.
#[test]
fn the_concept_form_counts_files_that_are_not_read() {
    let Setup { root, mut state } = setup();
    std::fs::write(root.path().join("dog").join("IMG_0001.HEIC"), b"x").unwrap();
    type_text(&mut state, "heic");
    state.apply(Action::Next);
    state.apply(Action::FocusNext);
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    type_text(&mut state, &root.path().join("dog").display().to_string());
    let text = screen_sized(&state, 200, 30);
    assert!(text.contains("3 images; 1 other file is not read"), "{text}");
}

/// The concept form's mask folder: a wrong folder is refused in a sentence, a
/// right one counts the photos it masks and turns masked loss on in the config.
#[test]
fn the_concept_form_takes_a_mask_folder() {
    let Setup { root, mut state } = setup();
    let masks = root.path().join("dog-masks");
    std::fs::create_dir_all(&masks).unwrap();
    for name in ["1.png", "2.png"] {
        image::GrayImage::new(8, 8).save(masks.join(name)).unwrap();
    }
    type_text(&mut state, "masked");
    state.apply(Action::Next);
    state.apply(Action::FocusNext);
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    type_text(&mut state, &root.path().join("dog").display().to_string());
    state.apply(Action::FocusNext);
    type_text(&mut state, "a photo of sks dog");
    while state.focus != 13 {
        state.apply(Action::FocusNext);
    }
    assert!(state.on_path_field());
    type_text(&mut state, &root.path().join("nowhere").display().to_string());
    state.apply(Action::Next);
    let error = state.error.clone().unwrap_or_default();
    assert!(error.contains("concept 1: the mask folder") && error.contains("does not exist"), "{error}");
    for _ in 0.."nowhere".len() {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "dog-masks");
    let text = screen_sized(&state, 200, 30);
    assert!(text.contains("2 of 3 photos have a mask (the rest train unmasked)"), "{text}");
    state.apply(Action::Next);
    assert!(!state.editing, "{:?}", state.error);
    let config = state.build_config().unwrap();
    assert_eq!(config.concepts[0].mask_dir.as_deref(), Some(masks.as_path()));
    assert!(config.training.masked_loss);
    let yaml = state.yaml().unwrap();
    assert!(yaml.contains("mask_dir:") && yaml.contains("masked_loss: true"), "{yaml}");
}

/// The concept form's validation folder: the instance folder itself is
/// refused; held-out photos are counted, and the run validates as often as it
/// previews.
#[test]
fn the_concept_form_takes_a_validation_folder() {
    let Setup { root, mut state } = setup();
    let held_out = root.path().join("dog-held-out");
    std::fs::create_dir_all(&held_out).unwrap();
    image::RgbImage::new(8, 8).save(held_out.join("a.png")).unwrap();
    type_text(&mut state, "validated");
    state.apply(Action::Next);
    state.apply(Action::FocusNext);
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    let dog = root.path().join("dog").display().to_string();
    type_text(&mut state, &dog);
    state.apply(Action::FocusNext);
    type_text(&mut state, "a photo of sks dog");
    while state.focus != 14 {
        state.apply(Action::FocusNext);
    }
    assert!(state.on_path_field());
    type_text(&mut state, &dog);
    state.apply(Action::Next);
    let error = state.error.clone().unwrap_or_default();
    assert!(error.contains("concept 1: the validation folder is the instance folder"), "{error}");
    for _ in 0..dog.len() {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, &held_out.display().to_string());
    let text = screen_sized(&state, 200, 30);
    assert!(text.contains("1 held-out photos: validation loss as often as previews"), "{text}");
    state.apply(Action::Next);
    assert!(!state.editing, "{:?}", state.error);
    let config = state.build_config().unwrap();
    assert_eq!(config.concepts[0].validation_data_dir.as_deref(), Some(held_out.as_path()));
    assert_eq!(config.training.validate_every_n_epochs, config.training.save_preview_every_n_epochs.max(1));
    let yaml = state.yaml().unwrap();
    assert!(yaml.contains("validation_data_dir:") && yaml.contains("validate_every_n_epochs:"), "{yaml}");
}

fn type_text(state: &mut WizardState, text: &str) {
    for c in text.chars() {
        state.apply(Action::Input(c));
    }
}

fn screen(state: &WizardState) -> String {
    screen_sized(state, 80, 24)
}

fn screen_sized(state: &WizardState, width: u16, height: u16) -> String {
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

fn snapshot(root: &Path, name: &str, state: &WizardState) {
    let text = screen(state);
    let mut s = insta::Settings::clone_current();
    let escaped: String =
        root.display().to_string().chars().map(|c| if c.is_alphanumeric() || c == '/' { c.to_string() } else { format!("\\{c}") }).collect();
    s.add_filter(&escaped, "[TMP]");
    s.add_filter(r"/tmp/\.tmp[A-Za-z0-9]+", "[TMP]");
    s.bind(|| insta::assert_snapshot!(name, text));
}

/// Walks the whole wizard, snapshotting each step and its validation errors.
/// Moves the advanced panel's focus to `key`.
fn focus_setting(state: &mut WizardState, key: &str) {
    for _ in 0..200 {
        if state.advanced_rows().get(state.advanced_focus).is_some_and(|r| r.key == key) {
            return;
        }
        state.apply(Action::FocusNext);
    }
    panic!("no setting {key}");
}

#[test]
fn every_step_with_validation_then_save() {
    let Setup { root, mut state } = setup();
    let r = root.path();

    // 1. Name
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Name);
    snapshot(r, "wizard_1_name_error", &state);
    type_text(&mut state, "my/dog");
    state.apply(Action::Next);
    assert!(state.error.as_deref().unwrap().contains("without slashes"));
    for _ in 0.."my/dog".len() {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "dog");
    assert_eq!(state.name, "dog");
    snapshot(r, "wizard_1_name", &state);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Source);

    // 2. Source: a typed path that does not exist, then a found model.
    type_text(&mut state, "/nowhere/model.ckpt");
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Source);
    snapshot(r, "wizard_2_source_error", &state);
    state.apply(Action::FocusNext); // from the path row to the first found model
    assert_eq!(state.source, r.join("v1-5.safetensors").display().to_string());
    state.error = None;
    snapshot(r, "wizard_2_source", &state);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Concepts);

    // 3. Concepts
    state.apply(Action::Next);
    assert!(state.error.as_deref().unwrap().contains("add at least one concept"));
    snapshot(r, "wizard_3_concepts_error", &state);
    state.apply(Action::AddConcept);
    assert!(state.editing);
    type_text(&mut state, &r.join("do").display().to_string());
    state.apply(Action::Complete);
    assert_eq!(state.concepts[0].instance_dir, format!("{}/", r.join("dog").display()));
    state.apply(Action::FocusNext);
    state.apply(Action::Next);
    assert!(state.error.as_deref().unwrap().contains("instance prompt is empty"));
    snapshot(r, "wizard_3_concept_form_error", &state);
    type_text(&mut state, "a photo of sks dog");
    state.apply(Action::FocusNext);
    type_text(&mut state, "a photo of a dog");
    state.apply(Action::FocusNext);
    state.apply(Action::FocusNext);
    state.apply(Action::Right); // person -> object/style
    assert_eq!(state.concepts[0].kind, ConceptKind::ObjectStyle);
    assert_eq!(state.steps_per_image, "175");
    state.apply(Action::Right); // back to person
    assert_eq!(state.steps_per_image, "150");
    assert_eq!(state.text_encoder_train_ratio, 0.7);
    state.apply(Action::FocusNext); // class folder
    assert!(state.on_path_field());
    type_text(&mut state, &r.join("class-dog").display().to_string());
    state.apply(Action::FocusNext); // prior loss weight
    state.apply(Action::Backspace);
    state.apply(Action::Backspace);
    state.apply(Action::Backspace);
    type_text(&mut state, "heavy");
    state.apply(Action::Next);
    assert!(state.error.as_deref().unwrap().contains("prior loss weight \"heavy\""), "{:?}", state.error);
    for _ in 0..5 {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "1.5");
    state.apply(Action::FocusNext); // sample prompts
    type_text(&mut state, "a photo of sks dog on the beach | a painting of sks dog");
    state.apply(Action::FocusNext); // instance token
    type_text(&mut state, "sks");
    state.apply(Action::FocusNext); // class token
    type_text(&mut state, "dog");
    state.apply(Action::FocusNext); // class negative prompt
    type_text(&mut state, "blurry");
    state.apply(Action::FocusNext); // class CFG scale
    type_text(&mut state, "strong");
    state.apply(Action::Next);
    assert!(state.error.as_deref().unwrap().contains("class CFG scale \"strong\" must be a number"), "{:?}", state.error);
    for _ in 0.."strong".len() {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "5");
    state.apply(Action::FocusNext); // class steps
    type_text(&mut state, "40");
    state.error = None;
    snapshot(r, "wizard_3_concept_form", &state);
    state.apply(Action::Next);
    assert!(!state.editing, "{:?}", state.error);
    snapshot(r, "wizard_3_concepts", &state);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Training);

    // 4. Training
    assert_eq!(state.total_steps(), Some(450));
    state.apply(Action::FocusNext);
    for _ in 0..10 {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "fast");
    state.apply(Action::Next);
    assert!(state.error.as_deref().unwrap().contains("learning rate \"fast\""));
    snapshot(r, "wizard_4_training_error", &state);
    for _ in 0..4 {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "2e-6");
    state.apply(Action::FocusNext);
    state.apply(Action::Right); // constant_with_warmup -> linear_with_warmup
    state.apply(Action::FocusNext);
    state.apply(Action::Backspace);
    type_text(&mut state, "50");
    state.apply(Action::FocusNext);
    state.apply(Action::Right); // ddim -> pndm
    snapshot(r, "wizard_4_training", &state);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram, "{:?}", state.error);

    // 5. VRAM: the biggest preset that fits 24 GiB is preselected.
    assert_eq!(state.preset_index, Some(2));
    snapshot(r, "wizard_5_vram", &state);
    let estimate_before = state.presets[2].estimated_bytes;
    // "All settings": every other key, edited in place and read as the file would be.
    state.apply(Action::ToggleAdvanced);
    let keys: Vec<String> = state.advanced_rows().into_iter().map(|r| r.key).collect();
    for key in ["device", "resolution", "training.use_lora", "training.mixed_precision", "training.attention", "sampling.negative_prompt"] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    assert!(!keys.iter().any(|k| k == "training.learning_rate"), "the training step's fields are not repeated");
    let ratio = state.advanced_rows().into_iter().find(|r| r.key == "training.text_encoder_train_ratio").unwrap();
    assert_eq!(ratio.value, "0.7", "the panel shows what the concept kind set, not the preset's value");
    focus_setting(&mut state, "training.use_lora");
    assert!(!state.typing(), "a switch takes no text");
    state.apply(Action::Right);
    // A combination the trainer refuses is refused here, not at start.
    focus_setting(&mut state, "training.use_ema");
    state.apply(Action::Right);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram);
    assert!(state.error.as_deref().unwrap().contains("`training.use_ema` cannot be combined with `use_lora`"), "{:?}", state.error);
    state.apply(Action::Right);
    focus_setting(&mut state, "sampling.steps");
    assert!(state.typing());
    type_text(&mut state, "x");
    let error = state.error.clone().expect("a bad number is an error at once");
    assert!(error.contains("`sampling.steps`"), "{error}");
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram, "a bad value keeps the step");
    for _ in 0..3 {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "20");
    assert_eq!(state.error, None);
    snapshot(r, "wizard_5_vram_advanced", &state);
    let config = state.build_config().unwrap();
    let concept = &config.concepts[0];
    assert_eq!(concept.class_data_dir.as_deref(), Some(r.join("class-dog").as_path()));
    assert_eq!(concept.prior_loss_weight, 1.5);
    assert_eq!(concept.sample_prompts, ["a photo of sks dog on the beach", "a painting of sks dog"]);
    assert_eq!((concept.instance_token.as_str(), concept.class_token.as_str()), ("sks", "dog"));
    assert_eq!(concept.class_negative_prompt, "blurry");
    assert_eq!((concept.class_guidance_scale, concept.class_infer_steps), (Some(5.0), Some(40)));
    assert!(config.training.use_lora);
    assert_eq!(config.sampling.steps, 20);
    // The presets were rated again (LoRA needs less); Esc closes the panel.
    assert!(state.presets[2].estimated_bytes < estimate_before);
    state.apply(Action::Back);
    assert!(!state.advanced);
    assert_eq!(state.step, Step::Vram);
    state.apply(Action::FocusPrev);
    assert_eq!(state.preset_index, Some(1));
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Review);

    // 6. Review, then save.
    snapshot(r, "wizard_6_review", &state);
    state.apply(Action::Next);
    let saved = state.saved.clone().expect("saved");
    assert!(state.start, "Enter on the review step saves and starts");
    assert_eq!(saved, r.join("runs/dog.yaml"));
    let text = std::fs::read_to_string(&saved).unwrap();
    saved_yaml_snapshot(r, "wizard_saved_yaml", &text);
    assert!(text.contains("use_lora: true") && text.contains("steps: 20"), "{text}");
    // Only what the user set is written; the preset the file names supplies the rest.
    for absent in ["mixed_precision", "optimizer", "gradient_checkpointing", "attention", "device", "resolution"] {
        assert!(!text.contains(absent), "{absent} would override the preset:\n{text}");
    }
    let config = dreambooth::config::load_run_config(&saved).unwrap();
    assert_eq!(config.preset.as_deref(), Some("12gb"));
    assert_eq!(config.name, "dog");
    assert_eq!(config.training.steps_per_image, 150);
    assert_eq!(config.training.learning_rate, 2e-6);
    assert_eq!(config.training.lr_warmup_steps, 50);
    assert_eq!(config.training.text_encoder_train_ratio, 0.7);
    assert_eq!(config.sampling.scheduler, "pndm");
    assert_eq!(config.concepts[0].class_prompt, "a photo of a dog");
    // The 12gb preset's own settings apply.
    let preset = dreambooth::config::parse_run_config(
        "name: x\nsource_checkpoint: m\nconcepts: []\npreset: 12gb\n",
        "preset",
        r,
    )
    .unwrap();
    assert_eq!(config.training.optimizer, preset.training.optimizer);
    assert_eq!(config.training.gradient_checkpointing, preset.training.gradient_checkpointing);
    assert_eq!(config.training.attention, preset.training.attention);
    assert_eq!(config.training.mixed_precision, preset.training.mixed_precision);
    assert!(config.training.gradient_checkpointing, "12gb checkpoints activations");
}

fn saved_yaml_snapshot(root: &Path, name: &str, text: &str) {
    let mut s = insta::Settings::clone_current();
    let escaped: String =
        root.display().to_string().chars().map(|c| if c.is_alphanumeric() || c == '/' { c.to_string() } else { format!("\\{c}") }).collect();
    s.add_filter(&escaped, "[TMP]");
    s.bind(|| insta::assert_snapshot!(name, text));
}

/// A setting the user leaves alone shows, and trains with, the chosen
/// preset's value; one the user sets wins over every preset.
#[test]
fn untouched_settings_follow_the_preset() {
    let Setup { root, mut state } = setup();
    let r = root.path();
    to_vram_step(&mut state, r, "cat", "a photo of sks cat");
    // 24gb preselected (full fine-tuning, the default 1e-6); 8gb is LoRA at 1e-4.
    assert_eq!(state.learning_rate, "1e-6");
    state.apply(Action::FocusPrev);
    state.apply(Action::FocusPrev);
    assert_eq!(state.preset_index, Some(0));
    assert_eq!(state.learning_rate, "1e-4", "the 8gb preset's learning rate is shown");
    state.apply(Action::Next);
    state.apply(Action::SaveOnly);
    let saved = state.saved.clone().expect("saved");
    assert!(!state.start, "s saves without starting");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(!text.contains("learning_rate"), "{text}");
    let config = dreambooth::config::load_run_config(&saved).unwrap();
    assert_eq!(config.training.learning_rate, 1e-4);
    assert!(config.training.use_lora);
    // The concept kind (person) is the user's choice: it is written and wins.
    assert_eq!(config.training.steps_per_image, 150);
    assert_eq!(config.training.text_encoder_train_ratio, 0.7);
}

/// The training step's count follows a batch size set in the settings panel
/// (3 images at 150 steps an image: 2 batches an epoch at the 24gb preset's
/// batch 2, 1 at batch 3), and a redraw keeps it.
#[test]
fn the_step_count_follows_the_batch_size() {
    let Setup { root, mut state } = setup();
    to_vram_step(&mut state, root.path(), "batched", "a photo of sks dog");
    assert_eq!((state.total_steps(), state.image_count()), (Some(300), 3));
    state.apply(Action::ToggleAdvanced);
    focus_setting(&mut state, "training.batch_size");
    state.apply(Action::Backspace);
    type_text(&mut state, "3");
    assert_eq!(state.build_config().unwrap().training.batch_size, 3);
    assert_eq!((state.total_steps(), state.image_count()), (Some(150), 3));
    let _ = screen(&state);
    assert_eq!(state.total_steps(), Some(150));
}

#[test]
fn an_existing_run_name_is_refused() {
    let Setup { root, mut state } = setup();
    let old = root.path().join("runs/old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("events.jsonl"), "").unwrap();
    type_text(&mut state, "old");
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Name);
    assert!(state.error.as_deref().unwrap().contains("already holds a run"), "{:?}", state.error);
}

#[test]
fn a_live_run_name_is_refused() {
    let Setup { root, mut state } = setup();
    let live = root.path().join("runs/busy");
    std::fs::create_dir_all(&live).unwrap();
    let _lock = RunLock::acquire(&live).unwrap();
    type_text(&mut state, "busy");
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Name);
    assert!(state.error.as_deref().unwrap().contains("is a live run"), "{:?}", state.error);
    snapshot(root.path(), "wizard_1_name_live_run", &state);
}

#[test]
fn keys_drive_the_wizard() {
    let Setup { root: _root, mut state } = setup();
    let press = |state: &mut WizardState, code: KeyCode| {
        if let Some(a) = action_for_key(state, KeyEvent::new(code, KeyModifiers::NONE)) {
            state.apply(a);
        }
    };
    for c in "cat".chars() {
        press(&mut state, KeyCode::Char(c));
    }
    press(&mut state, KeyCode::Enter);
    assert_eq!(state.step, Step::Source);
    press(&mut state, KeyCode::Esc);
    assert_eq!(state.step, Step::Name);
    assert_eq!(state.name, "cat");
    press(&mut state, KeyCode::Enter);
    press(&mut state, KeyCode::Down);
    press(&mut state, KeyCode::Enter);
    assert_eq!(state.step, Step::Concepts, "{:?} {:?}", state.error, state.source);
    // 'a' adds a concept here; inside the form it is typed.
    press(&mut state, KeyCode::Char('a'));
    assert!(state.editing);
    press(&mut state, KeyCode::Char('a'));
    assert_eq!(state.concepts[0].instance_dir, "a");
    press(&mut state, KeyCode::Esc);
    press(&mut state, KeyCode::Char('d'));
    assert!(state.concepts.is_empty());
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(action_for_key(&state, ctrl_c), Some(Action::Cancel));
    state.apply(Action::Cancel);
    assert!(state.is_done() && state.saved.is_none());
}

#[test]
fn every_step_draws_at_any_size() {
    let Setup { root, mut state } = setup();
    let r = root.path();
    let sizes = [(80, 24), (40, 12), (20, 5), (1, 1), (160, 50)];
    let check = |state: &WizardState| {
        for (w, h) in sizes {
            assert_eq!(screen_sized(state, w, h).lines().count(), h as usize);
        }
    };
    check(&state);
    type_text(&mut state, "dog");
    state.apply(Action::Next);
    check(&state);
    state.apply(Action::FocusNext);
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    type_text(&mut state, &r.join("dog").display().to_string());
    check(&state);
    state.apply(Action::FocusNext);
    type_text(&mut state, "a photo of sks dog");
    state.apply(Action::Next);
    state.apply(Action::Next);
    check(&state);
    state.apply(Action::Next);
    state.apply(Action::ToggleAdvanced);
    check(&state);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Review);
    check(&state);
}

/// A model made for 768-pixel images (an SD 2 v model, by its configs) trains at
/// 768 unless the settings panel says otherwise; the saved YAML says so.
#[test]
fn a_768_model_trains_at_its_own_resolution() {
    let Setup { root, mut state } = setup();
    to_vram_step(&mut state, root.path(), "wide", "a photo of sks dog");
    assert_eq!(state.build_config().unwrap().resolution, 512);
    let model = root.path().join("sd2-768");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd2");
    for part in ["unet", "vae"] {
        std::fs::create_dir_all(model.join(part)).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join(part).join("config.json")).unwrap()).unwrap();
        // The fixture's VAE downsamples 4×: 192 latents make 768 pixels.
        if part == "unet" {
            config["sample_size"] = 192.into();
        }
        std::fs::write(model.join(part).join("config.json"), config.to_string()).unwrap();
    }
    state.source = model.display().to_string();
    assert_eq!(state.build_config().unwrap().resolution, 768);
    assert!(state.yaml().unwrap().contains("resolution: 768"), "{}", state.yaml().unwrap());
    state.apply(Action::ToggleAdvanced);
    focus_setting(&mut state, "resolution");
    for _ in 0..3 {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "640");
    assert_eq!(state.build_config().unwrap().resolution, 640);
}

/// An SDXL model found on disk (the tiny SDXL folder): the model step names its
/// family, the VRAM step offers the SDXL presets (and cpu) with this run's
/// estimates, an SDXL preset trains at 1024, and a preset that freezes the text
/// encoders for memory wins over the ratio the person kind recommends.
#[test]
fn an_sdxl_model_gets_the_sdxl_presets() {
    let Setup { root, .. } = setup();
    let r = root.path();
    let sdxl = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sdxl");
    let sources = dreambooth::tui::sources::DiskSources { dirs: vec![sdxl.clone()] };
    let mut state = WizardState::new(&r.join("runs"), Box::new(sources));
    assert_eq!(state.models.len(), 1);
    assert_eq!(state.models[0].architecture, "SDXL");
    type_text(&mut state, "xl-dog");
    state.apply(Action::Next);
    state.apply(Action::FocusNext);
    assert_eq!(state.source, sdxl.display().to_string());
    let text = screen_sized(&state, 120, 24);
    assert!(text.contains("SDXL model, made for 64×64 images: the VRAM step offers SDXL presets."), "{text}");
    state.apply(Action::Next);
    state.apply(Action::AddConcept);
    type_text(&mut state, &r.join("dog").display().to_string());
    state.apply(Action::FocusNext);
    type_text(&mut state, "a photo of sks dog");
    state.apply(Action::Next);
    state.apply(Action::Next);
    state.apply(Action::Next);
    assert_eq!(state.step, Step::Vram, "{:?}", state.error);

    let names: Vec<&str> = state.presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["cpu", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb", "sdxl-48gb"]);
    assert!(state.presets.iter().all(|p| p.estimated_bytes > 0));
    let text = screen_sized(&state, 120, 24);
    assert!(text.contains("Presets for SDXL models, with this run's estimated peak:") && text.contains("sdxl-24gb"), "{text}");

    let choose = |state: &mut WizardState, name: &str| {
        for _ in 0..state.presets.len() {
            if state.preset_index.and_then(|i| state.presets.get(i)).is_some_and(|p| p.name == name) {
                return;
            }
            state.apply(Action::FocusNext);
        }
        panic!("no preset {name}");
    };
    choose(&mut state, "sdxl-24gb");
    let config = state.build_config().unwrap();
    assert_eq!(config.resolution, 1024);
    assert!(config.training.fused_backward && !config.training.use_lora);
    assert_eq!(config.training.text_encoder_train_ratio, 0.0, "the preset's frozen encoders win over the person kind's 0.7");
    let yaml = state.yaml().unwrap();
    assert!(yaml.contains("preset: sdxl-24gb") && !yaml.contains("text_encoder_train_ratio"), "{yaml}");
    state.apply(Action::Back);
    assert_eq!(state.step, Step::Training);
    let text = screen_sized(&state, 120, 24);
    assert!(text.contains("Text encoder frozen: preset sdxl-24gb freezes it to fit its memory."), "{text}");
    state.apply(Action::Next);

    // A preset with room for the text encoders keeps the kind's ratio.
    choose(&mut state, "sdxl-16gb");
    let config = state.build_config().unwrap();
    assert!(config.training.use_lora && config.training.text_encoder_train_ratio == 0.7);
    // A ratio typed in the settings panel wins over a freezing preset.
    choose(&mut state, "sdxl-12gb");
    state.apply(Action::ToggleAdvanced);
    focus_setting(&mut state, "training.text_encoder_train_ratio");
    while !state.advanced_rows()[state.advanced_focus].value.is_empty() {
        state.apply(Action::Backspace);
    }
    type_text(&mut state, "0.5");
    assert_eq!(state.build_config().unwrap().training.text_encoder_train_ratio, 0.5, "{:?}", state.error);
}
