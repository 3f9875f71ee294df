//! The wizard's state machine: six steps, each with inline validation before
//! moving on. Headless: tests feed `Action`s and read the state; nothing here
//! draws or touches the terminal.

use std::path::{Path, PathBuf};

use anyhow::Context;

use serde_yaml::{Mapping, Value};

use super::settings::{self, SettingKind, SettingRow};
use crate::config::schema::{Concept, LrScheduler, RunConfig, Sampling, Training};
use crate::model::family::Architecture;

/// The config checks `train` makes before it starts (values, then combinations
/// this build refuses), so the wizard never saves a run that cannot start.
fn check_like_the_trainer(config: &RunConfig) -> Result<(), String> {
    crate::config::validate::validate(config)?;
    crate::train::trainer::check_supported(config).map_err(|e| crate::error::one_line(&e))
}

fn absolute(p: &str) -> PathBuf {
    let p = PathBuf::from(p.trim());
    std::path::absolute(&p).unwrap_or(p)
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, String> {
    serde_yaml::to_value(v).map_err(|e| format!("cannot write the config as YAML: {e}"))
}

/// A source checkpoint found on disk, as the checkpoint module describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    pub path: String,
    pub architecture: String,
    pub size: String,
    pub format: String,
}

/// A VRAM preset with the estimated peak of this run under it.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetChoice {
    pub name: String,
    pub estimated_bytes: u64,
}

/// The detected GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub name: String,
    pub total_bytes: u64,
    /// Why libtorch cannot use it (`device::unusable_gpu`), when it cannot.
    pub unusable: Option<String>,
}

/// What the wizard learns from the rest of the program (checkpoint discovery,
/// VRAM estimator, GPU probe); tests give fixtures.
pub trait Sources {
    /// Source checkpoints found in the usual places.
    fn models(&self) -> Vec<ModelChoice>;
    /// Every preset with its estimated peak for `config`.
    fn presets(&self, config: &RunConfig) -> Vec<PresetChoice>;
    fn gpu(&self) -> Option<GpuInfo>;
}

/// No models found, no presets, no GPU.
pub struct NoSources;

impl Sources for NoSources {
    fn models(&self) -> Vec<ModelChoice> {
        Vec::new()
    }
    fn presets(&self, _: &RunConfig) -> Vec<PresetChoice> {
        Vec::new()
    }
    fn gpu(&self) -> Option<GpuInfo> {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Name,
    Source,
    Concepts,
    Training,
    Vram,
    Review,
}

impl Step {
    pub const ALL: [Step; 6] = [Step::Name, Step::Source, Step::Concepts, Step::Training, Step::Vram, Step::Review];

    pub fn title(self) -> &'static str {
        match self {
            Step::Name => "Name",
            Step::Source => "Model",
            Step::Concepts => "Concepts",
            Step::Training => "Training",
            Step::Vram => "VRAM",
            Step::Review => "Review",
        }
    }

    fn index(self) -> usize {
        Step::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// What is being trained: sets the recommended steps per image and text-encoder ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConceptKind {
    Person,
    ObjectStyle,
}

impl ConceptKind {
    pub fn label(self) -> &'static str {
        match self {
            ConceptKind::Person => "person",
            ConceptKind::ObjectStyle => "object/style",
        }
    }

    /// Recommended steps per image. The method guide (shared/000_08e16969a22e2253.txt)
    /// says "try 175 steps (for objects/styles)" and that people have a different
    /// optimum without giving it; 150 is our choice for faces.
    pub fn steps_per_image(self) -> u32 {
        match self {
            ConceptKind::Person => 150,
            ConceptKind::ObjectStyle => 175,
        }
    }

    /// Text-encoder train ratio; the same guide: 0.7 is best for faces, 0.2 for styles.
    pub fn text_encoder_train_ratio(self) -> f64 {
        match self {
            ConceptKind::Person => 0.7,
            ConceptKind::ObjectStyle => 0.2,
        }
    }
}

/// A concept as typed (text until it is validated).
#[derive(Debug, Clone, PartialEq)]
pub struct ConceptDraft {
    pub instance_dir: String,
    pub instance_prompt: String,
    pub class_prompt: String,
    pub class_images: String,
    pub kind: ConceptKind,
    /// Where class images are read and generated; empty: the run's
    /// `class_images/concept-N`.
    pub class_dir: String,
    pub prior_loss_weight: String,
    /// Preview prompts separated by `|`; empty: the instance prompt.
    pub sample_prompts: String,
    pub instance_token: String,
    pub class_token: String,
    /// Class-image generation; empty: the sampling settings.
    pub class_negative: String,
    pub class_guidance: String,
    pub class_steps: String,
    /// Masks named as the instance images (white: learn, black: ignore); set,
    /// the run trains with `masked_loss`. Empty: no masks.
    pub mask_dir: String,
    /// Held-out photos of the subject (never trained on) for the validation
    /// loss; set, the run validates as often as it previews. Empty: none.
    pub validation_dir: String,
}

impl Default for ConceptDraft {
    fn default() -> Self {
        ConceptDraft {
            instance_dir: String::new(),
            instance_prompt: String::new(),
            class_prompt: String::new(),
            class_images: "200".into(),
            kind: ConceptKind::Person,
            class_dir: String::new(),
            prior_loss_weight: "1.0".into(),
            sample_prompts: String::new(),
            instance_token: String::new(),
            class_token: String::new(),
            class_negative: String::new(),
            class_guidance: String::new(),
            class_steps: String::new(),
            mask_dir: String::new(),
            validation_dir: String::new(),
        }
    }
}

/// What the folders' part of the step count depends on.
#[derive(Debug, Clone, PartialEq)]
struct EpochKey {
    instance_dirs: Vec<String>,
    source: String,
    /// Resolution, batch size and bucketing, when the config builds.
    frames: Option<(i64, u32, bool)>,
}

#[derive(Debug, Clone)]
struct EpochPlan {
    key: EpochKey,
    images: usize,
    batches: u64,
}

/// Number of images in a concept folder, or why it has none.
pub fn count_images(dir: &str) -> Result<usize, String> {
    if dir.trim().is_empty() {
        return Err("the instance folder is empty; type the folder of your photos".into());
    }
    crate::data::images::list_images(Path::new(dir.trim()), "the instance folder")
        .map(|files| files.len())
        .map_err(|e| crate::error::one_line(&e))
}

/// Fields of the concept form, in focus order.
pub const CONCEPT_FIELDS: usize = 15;
/// Fields of the training step, in focus order.
pub const TRAINING_FIELDS: usize = 5;

pub const LR_SCHEDULERS: [LrScheduler; 6] = [
    LrScheduler::Constant,
    LrScheduler::ConstantWithWarmup,
    LrScheduler::LinearWithWarmup,
    LrScheduler::Polynomial,
    LrScheduler::Cosine,
    LrScheduler::CosineWithRestarts,
];

pub fn scheduler_name(s: LrScheduler) -> &'static str {
    match s {
        LrScheduler::Constant => "constant",
        LrScheduler::ConstantWithWarmup => "constant_with_warmup",
        LrScheduler::LinearWithWarmup => "linear_with_warmup",
        LrScheduler::Polynomial => "polynomial",
        LrScheduler::Cosine => "cosine",
        LrScheduler::CosineWithRestarts => "cosine with restarts",
    }
}

/// What the user asked for; keys map to these by context (see `wizard::action_for_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Validate this step and go to the next (in the concept form: close the form).
    Next,
    /// The previous step (in the concept form: close the form).
    Back,
    Cancel,
    FocusNext,
    FocusPrev,
    /// Choice fields: the previous/next value.
    Left,
    Right,
    Input(char),
    Backspace,
    /// Path completion in path fields.
    Complete,
    AddConcept,
    EditConcept,
    RemoveConcept,
    ToggleAdvanced,
    /// On the review step: save the config without starting the run (Enter saves and starts).
    SaveOnly,
}

pub struct WizardState {
    pub runs_dir: PathBuf,
    pub step: Step,
    /// Focused field (or list row) within the step.
    pub focus: usize,
    /// Inline validation message of the current step.
    pub error: Option<String>,
    pub name: String,
    pub models: Vec<ModelChoice>,
    pub source: String,
    /// Completion candidates shown under the path field.
    pub completions: Vec<String>,
    pub concepts: Vec<ConceptDraft>,
    pub concept_index: usize,
    /// The concept form is open on `concept_index`.
    pub editing: bool,
    pub steps_per_image: String,
    pub learning_rate: String,
    pub lr_scheduler: LrScheduler,
    pub lr_warmup_steps: String,
    pub sampler: String,
    pub text_encoder_train_ratio: f64,
    pub gpu: Option<GpuInfo>,
    pub presets: Vec<PresetChoice>,
    pub preset_index: Option<usize>,
    pub advanced: bool,
    /// The advanced panel's focused row.
    pub advanced_focus: usize,
    /// Settings set in the advanced panel, by key (`training.use_lora`), as
    /// text the config file would hold; they override the preset.
    pub advanced_values: std::collections::BTreeMap<String, String>,
    pub review_scroll: u16,
    /// Config keys the user set (typed, cycled, or chose through the concept
    /// kind). Only these override the preset; the others show the preset's value.
    pub touched: std::collections::BTreeSet<&'static str>,
    /// Set when the user saved: the config file written.
    pub saved: Option<PathBuf>,
    /// The user chose "save and start" (not only "save").
    pub start: bool,
    pub cancelled: bool,
    sources: Box<dyn Sources>,
    /// The folders' part of the step count, kept until what it depends on
    /// changes, so a redraw reads no folder and no image header.
    epoch_plan: std::cell::RefCell<Option<EpochPlan>>,
    /// The source model's native resolution, by the source path it was read for.
    native_resolution: std::cell::RefCell<Option<(String, Option<i64>)>>,
    /// The source model's family, by the source path it was read for.
    source_family: std::cell::RefCell<Option<(String, Option<Architecture>)>>,
}

impl WizardState {
    pub fn new(runs_dir: &Path, sources: Box<dyn Sources>) -> WizardState {
        let defaults = Training::default();
        WizardState {
            runs_dir: runs_dir.to_path_buf(),
            step: Step::Name,
            focus: 0,
            error: None,
            name: String::new(),
            models: sources.models(),
            source: String::new(),
            completions: Vec::new(),
            concepts: Vec::new(),
            concept_index: 0,
            editing: false,
            steps_per_image: defaults.steps_per_image.to_string(),
            learning_rate: format!("{:e}", defaults.learning_rate),
            lr_scheduler: defaults.lr_scheduler,
            lr_warmup_steps: defaults.lr_warmup_steps.to_string(),
            sampler: Sampling::default().scheduler,
            text_encoder_train_ratio: defaults.text_encoder_train_ratio,
            gpu: sources.gpu(),
            presets: Vec::new(),
            preset_index: None,
            advanced: false,
            advanced_focus: 0,
            advanced_values: std::collections::BTreeMap::new(),
            review_scroll: 0,
            touched: Default::default(),
            saved: None,
            start: false,
            cancelled: false,
            sources,
            epoch_plan: Default::default(),
            native_resolution: Default::default(),
            source_family: Default::default(),
        }
    }

    pub fn step_number(&self) -> usize {
        self.step.index() + 1
    }

    pub fn is_done(&self) -> bool {
        self.saved.is_some() || self.cancelled
    }

    /// The step's text field under focus, if the focus is on one.
    fn focused_text(&mut self) -> Option<&mut String> {
        match self.step {
            Step::Name => Some(&mut self.name),
            Step::Source => Some(&mut self.source),
            Step::Concepts if self.editing => {
                let c = self.concepts.get_mut(self.concept_index)?;
                match self.focus {
                    0 => Some(&mut c.instance_dir),
                    1 => Some(&mut c.instance_prompt),
                    2 => Some(&mut c.class_prompt),
                    3 => Some(&mut c.class_images),
                    5 => Some(&mut c.class_dir),
                    6 => Some(&mut c.prior_loss_weight),
                    7 => Some(&mut c.sample_prompts),
                    8 => Some(&mut c.instance_token),
                    9 => Some(&mut c.class_token),
                    10 => Some(&mut c.class_negative),
                    11 => Some(&mut c.class_guidance),
                    12 => Some(&mut c.class_steps),
                    13 => Some(&mut c.mask_dir),
                    14 => Some(&mut c.validation_dir),
                    _ => None,
                }
            }
            Step::Training => match self.focus {
                0 => Some(&mut self.steps_per_image),
                1 => Some(&mut self.learning_rate),
                3 => Some(&mut self.lr_warmup_steps),
                _ => None,
            },
            _ => None,
        }
    }

    /// The config key the focused field sets, if it sets one.
    fn focused_key(&self) -> Option<&'static str> {
        match (self.step, self.focus) {
            (Step::Training, 0) => Some("steps_per_image"),
            (Step::Training, 1) => Some("learning_rate"),
            (Step::Training, 2) => Some("lr_scheduler"),
            (Step::Training, 3) => Some("lr_warmup_steps"),
            (Step::Training, 4) => Some("sampling.scheduler"),
            _ => None,
        }
    }

    fn edit_text(&mut self, edit: impl FnOnce(&mut String)) {
        let key = self.focused_key();
        if let Some(text) = self.focused_text() {
            edit(text);
            self.touched.extend(key);
            self.completions.clear();
            self.error = None;
        }
    }

    /// True when typed characters go into a text field.
    pub fn typing(&self) -> bool {
        match self.step {
            Step::Name | Step::Source => true,
            // Every field but the subject kind (4) takes text.
            Step::Concepts => self.editing && self.focus != 4,
            Step::Training => matches!(self.focus, 0 | 1 | 3),
            Step::Vram if self.advanced => self
                .advanced_row()
                .is_some_and(|r| matches!(r.kind, SettingKind::Number | SettingKind::Text)),
            _ => false,
        }
    }

    /// True when the focused field holds a path (Tab completes).
    pub fn on_path_field(&self) -> bool {
        self.step == Step::Source || (self.step == Step::Concepts && self.editing && matches!(self.focus, 0 | 5 | 13 | 14))
    }

    fn field_count(&self) -> usize {
        match self.step {
            Step::Source => self.models.len() + 1,
            Step::Concepts if self.editing => CONCEPT_FIELDS,
            Step::Concepts => self.concepts.len(),
            Step::Training => TRAINING_FIELDS,
            Step::Vram => self.presets.len(),
            _ => 1,
        }
    }

    pub fn apply(&mut self, action: Action) {
        match action {
            Action::Cancel => self.cancelled = true,
            Action::Next => self.next(),
            Action::Back => self.back(),
            Action::FocusNext | Action::FocusPrev => self.move_focus(action == Action::FocusNext),
            Action::Left | Action::Right => self.cycle(action == Action::Right),
            Action::Input(c) if self.step == Step::Vram && self.advanced => self.edit_setting(|text| text.push(c)),
            Action::Backspace if self.step == Step::Vram && self.advanced => self.edit_setting(|text| {
                text.pop();
            }),
            Action::Input(c) => self.edit_text(|text| text.push(c)),
            Action::Backspace => self.edit_text(|text| {
                text.pop();
            }),
            Action::SaveOnly if self.step == Step::Review => self.finish(false),
            Action::Complete => self.complete_path(),
            Action::AddConcept if self.step == Step::Concepts && !self.editing => {
                self.concepts.push(ConceptDraft::default());
                self.concept_index = self.concepts.len() - 1;
                self.apply_kind(ConceptKind::Person);
                self.editing = true;
                self.focus = 0;
                self.error = None;
            }
            Action::EditConcept if self.step == Step::Concepts && !self.editing && !self.concepts.is_empty() => {
                self.editing = true;
                self.focus = 0;
            }
            Action::RemoveConcept if self.step == Step::Concepts && !self.editing && !self.concepts.is_empty() => {
                self.concepts.remove(self.concept_index);
                self.concept_index = self.concept_index.min(self.concepts.len().saturating_sub(1));
            }
            Action::ToggleAdvanced if self.step == Step::Vram => self.toggle_advanced(),
            _ => {}
        }
    }

    fn move_focus(&mut self, forward: bool) {
        let n = self.field_count();
        if self.step == Step::Review {
            self.review_scroll = if forward { self.review_scroll.saturating_add(1) } else { self.review_scroll.saturating_sub(1) };
            return;
        }
        if n == 0 {
            return;
        }
        match self.step {
            Step::Concepts if !self.editing => {
                self.concept_index = (self.concept_index + if forward { 1 } else { n - 1 }) % n;
            }
            Step::Vram if self.advanced => {
                let n = self.advanced_rows().len().max(1);
                self.advanced_focus = (self.advanced_focus + if forward { 1 } else { n - 1 }) % n;
            }
            Step::Vram => {
                let i = self.preset_index.map(|i| (i + if forward { 1 } else { n - 1 }) % n).unwrap_or(0);
                self.preset_index = Some(i);
                self.show_preset_values();
            }
            Step::Source => {
                // Rows 0..models are the found models (choosing one fills the path); the last row is the path.
                self.focus = (self.focus + if forward { 1 } else { n - 1 }) % n;
                if let Some(m) = self.models.get(self.focus) {
                    self.source = m.path.clone();
                }
            }
            _ => self.focus = (self.focus + if forward { 1 } else { n - 1 }) % n,
        }
        self.completions.clear();
    }

    fn cycle(&mut self, forward: bool) {
        match (self.step, self.focus) {
            (Step::Concepts, 4) if self.editing => {
                let kind = match self.concepts.get(self.concept_index).map(|c| c.kind) {
                    Some(ConceptKind::Person) => ConceptKind::ObjectStyle,
                    _ => ConceptKind::Person,
                };
                self.apply_kind(kind);
            }
            (Step::Training, 2) => {
                self.touched.insert("lr_scheduler");
                let i = LR_SCHEDULERS.iter().position(|s| *s == self.lr_scheduler).unwrap_or(0);
                let n = LR_SCHEDULERS.len();
                self.lr_scheduler = LR_SCHEDULERS[(i + if forward { 1 } else { n - 1 }) % n];
            }
            (Step::Vram, _) if self.advanced => {
                if let Some(row) = self.advanced_row() {
                    if let Some(value) = settings::cycled(&row, forward) {
                        self.set_setting(row.key, value);
                    }
                }
            }
            (Step::Training, 4) => {
                self.touched.insert("sampling.scheduler");
                let names = crate::scheduler::SAMPLER_NAMES;
                let i = names.iter().position(|s| *s == self.sampler).unwrap_or(0);
                let n = names.len();
                self.sampler = names[(i + if forward { 1 } else { n - 1 }) % n].to_string();
            }
            _ => {}
        }
    }

    /// Sets the concept's kind and the training settings it recommends.
    fn apply_kind(&mut self, kind: ConceptKind) {
        if let Some(c) = self.concepts.get_mut(self.concept_index) {
            c.kind = kind;
        }
        self.steps_per_image = kind.steps_per_image().to_string();
        self.text_encoder_train_ratio = kind.text_encoder_train_ratio();
        self.touched.extend(["steps_per_image", "text_encoder_train_ratio"]);
        // The kind chosen last wins over a ratio typed in the advanced panel.
        self.advanced_values.remove("training.text_encoder_train_ratio");
    }

    fn back(&mut self) {
        self.error = None;
        self.completions.clear();
        if self.step == Step::Concepts && self.editing {
            self.editing = false;
            return;
        }
        if self.step == Step::Vram && self.advanced {
            self.toggle_advanced();
            return;
        }
        match Step::ALL.get(self.step.index().wrapping_sub(1)) {
            Some(prev) => {
                self.step = *prev;
                self.focus = if *prev == Step::Source { self.models.len() } else { 0 };
            }
            None => self.cancelled = true,
        }
    }

    fn next(&mut self) {
        self.completions.clear();
        if self.step == Step::Concepts && self.editing {
            match self.validate_concept(self.concept_index) {
                Ok(()) => {
                    self.editing = false;
                    self.error = None;
                }
                Err(e) => self.error = Some(e),
            }
            return;
        }
        if let Err(e) = self.validate_step() {
            self.error = Some(e);
            return;
        }
        self.error = None;
        if self.step == Step::Review {
            self.finish(true);
            return;
        }
        self.step = Step::ALL[self.step.index() + 1];
        self.focus = if self.step == Step::Source { self.models.len() } else { 0 };
        if self.step == Step::Vram {
            self.enter_vram();
        }
        if self.step == Step::Review {
            self.review_scroll = 0;
        }
    }

    /// Saves the config (the review step validated it); `start`: the caller starts the run.
    fn finish(&mut self, start: bool) {
        if let Err(e) = self.validate_step() {
            self.error = Some(e);
            return;
        }
        match self.save() {
            Ok(path) => {
                self.saved = Some(path);
                self.start = start;
            }
            Err(e) => self.error = Some(crate::error::one_line(&e)),
        }
    }

    /// Asks for the presets' estimates and preselects the largest that fits the card.
    fn enter_vram(&mut self) {
        let Ok(config) = self.build_config() else { return };
        self.presets = self.sources.presets(&config);
        let budget = self.gpu.as_ref().map(|g| g.total_bytes);
        let fits = |p: &PresetChoice| budget.is_none_or(|b| p.estimated_bytes <= b);
        // No GPU: the CPU preset is the one that can run at all.
        if self.gpu.is_none() {
            if let Some(i) = self.presets.iter().position(|p| p.name == "cpu") {
                self.preset_index = Some(i);
                self.show_preset_values();
                return;
            }
        }
        // The recommended preset is the most demanding one that fits (it keeps the most quality).
        self.preset_index = self
            .presets
            .iter()
            .enumerate()
            .filter(|(_, p)| fits(p))
            .max_by_key(|(_, p)| p.estimated_bytes)
            .map(|(i, _)| i)
            .or(if self.presets.is_empty() { None } else { Some(0) });
        self.show_preset_values();
    }

    /// Fields the user has not set show what the chosen preset (over the
    /// defaults) will train with, so the training step never shows a value
    /// that is not used.
    fn show_preset_values(&mut self) {
        let Ok(base) = self.baseline() else { return };
        let t = &base.training;
        if !self.touched.contains("steps_per_image") {
            self.steps_per_image = t.steps_per_image.to_string();
        }
        if !self.touched.contains("learning_rate") {
            self.learning_rate = format!("{:e}", t.learning_rate);
        }
        if !self.touched.contains("lr_scheduler") {
            self.lr_scheduler = t.lr_scheduler;
        }
        if !self.touched.contains("lr_warmup_steps") {
            self.lr_warmup_steps = t.lr_warmup_steps.to_string();
        }
        if !self.touched.contains("text_encoder_train_ratio") {
            self.text_encoder_train_ratio = t.text_encoder_train_ratio;
        }
        if !self.touched.contains("sampling.scheduler") {
            self.sampler = base.sampling.scheduler.clone();
        }
    }

    /// The advanced panel's rows: every other setting with the value it will train with.
    pub fn advanced_rows(&self) -> Vec<SettingRow> {
        match self.stepped_config() {
            Ok(base) => settings::rows(&base, &self.advanced_values),
            Err(_) => Vec::new(),
        }
    }

    fn advanced_row(&self) -> Option<SettingRow> {
        self.advanced_rows().into_iter().nth(self.advanced_focus)
    }

    /// Opens or closes the advanced panel.
    fn toggle_advanced(&mut self) {
        self.advanced = !self.advanced;
        self.error = None;
    }

    /// Sets a setting of the panel; the error line says at once if it does not read.
    fn set_setting(&mut self, key: String, value: String) {
        if key == "training.text_encoder_train_ratio" {
            // The training step shows this ratio: keep it in step.
            if let Ok(r) = value.trim().parse::<f64>() {
                self.text_encoder_train_ratio = r;
                self.touched.insert("text_encoder_train_ratio");
            }
        }
        self.advanced_values.insert(key, value);
        match self.build_config() {
            Ok(config) => {
                self.error = None;
                // Batch size, LoRA, precision... change what each preset needs.
                self.presets = self.sources.presets(&config);
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn edit_setting(&mut self, edit: impl FnOnce(&mut String)) {
        let Some(row) = self.advanced_row() else { return };
        if matches!(row.kind, SettingKind::Number | SettingKind::Text) {
            let mut text = row.value;
            edit(&mut text);
            self.set_setting(row.key, text);
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(self.name.trim())
    }

    fn validate_step(&self) -> Result<(), String> {
        match self.step {
            Step::Name => self.validate_name(),
            Step::Source => {
                let source = self.source.trim();
                if source.is_empty() {
                    return Err("choose a found model or type the path of a checkpoint".into());
                }
                if !Path::new(source).exists() {
                    return Err(format!("{source} does not exist"));
                }
                Ok(())
            }
            Step::Concepts => {
                if self.concepts.is_empty() {
                    return Err("add at least one concept (press a)".into());
                }
                (0..self.concepts.len()).try_for_each(|i| self.validate_concept(i))
            }
            Step::Training => self.training().map(|_| ()),
            // The advanced panel's values, read and checked as the trainer will.
            Step::Vram => self.build_config().and_then(|c| self.check_config(&c)),
            Step::Review => self.check_config(&self.build_config()?),
        }
    }

    /// What `train` will check before it starts, and a CUDA device this machine lacks.
    fn check_config(&self, config: &RunConfig) -> Result<(), String> {
        check_like_the_trainer(config)?;
        // NVML found no GPU; libtorch is asked only then (it may see one NVML cannot).
        if config.device.starts_with("cuda") && self.gpu.is_none() && !tch::Cuda::is_available() {
            return Err(format!("`device: {}` needs a CUDA GPU and this machine has none; choose auto or cpu", config.device));
        }
        if let Some(why) = self.gpu.as_ref().and_then(|g| g.unusable.as_deref()).filter(|_| config.device.starts_with("cuda")) {
            return Err(format!("`device: {}` cannot train: {why}", config.device));
        }
        Ok(())
    }

    fn validate_name(&self) -> Result<(), String> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err("type a name; it becomes the run's folder".into());
        }
        if name.contains('/') || name.contains('\\') || name == "." || name == ".." {
            return Err(format!("{name:?} must be a plain folder name, without slashes"));
        }
        let dir = self.run_dir();
        if crate::run::lock::RunLock::is_held(&dir) {
            return Err(format!("{} is a live run; choose another name or attach to it", dir.display()));
        }
        // The trainer starts only in a new (or empty) folder; an old run is continued with `resume`.
        if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(format!(
                "{} already holds a run; choose another name (or `dreambooth resume` it; `--steps-per-image N` trains it on)",
                dir.display()
            ));
        }
        Ok(())
    }

    fn validate_concept(&self, i: usize) -> Result<(), String> {
        let Some(c) = self.concepts.get(i) else { return Ok(()) };
        let n = i + 1;
        match count_images(&c.instance_dir) {
            Ok(0) => return Err(format!("concept {n}: {} has no images (png, jpg, webp, bmp)", c.instance_dir.trim())),
            Ok(_) => {}
            Err(e) => return Err(format!("concept {n}: {e}")),
        }
        if c.instance_prompt.trim().is_empty() {
            return Err(format!("concept {n}: the instance prompt is empty (e.g. a photo of sks dog)"));
        }
        let count: u32 = c
            .class_images
            .trim()
            .parse()
            .map_err(|_| format!("concept {n}: class images {:?} is not a whole number", c.class_images))?;
        if !c.class_prompt.trim().is_empty() && count == 0 {
            return Err(format!("concept {n}: a class prompt needs class images (200 is typical)"));
        }
        match c.prior_loss_weight.trim().parse::<f64>() {
            Ok(w) if w.is_finite() && w >= 0.0 => {}
            _ => {
                return Err(format!(
                    "concept {n}: prior loss weight {:?} must be a number, 0 or more (1.0 is usual)",
                    c.prior_loss_weight
                ))
            }
        }
        if !c.class_guidance.trim().is_empty() && !matches!(c.class_guidance.trim().parse::<f64>(), Ok(g) if g.is_finite() && g >= 0.0) {
            return Err(format!("concept {n}: class CFG scale {:?} must be a number, 0 or more (7.5 is usual)", c.class_guidance));
        }
        if !c.class_steps.trim().is_empty() && !matches!(c.class_steps.trim().parse::<usize>(), Ok(s) if s >= 1) {
            return Err(format!("concept {n}: class steps {:?} must be a whole number, at least 1", c.class_steps));
        }
        let class_dir = Path::new(c.class_dir.trim());
        if !c.class_dir.trim().is_empty() && class_dir.exists() && !class_dir.is_dir() {
            return Err(format!("concept {n}: the class folder {} is a file", class_dir.display()));
        }
        let mask_dir = c.mask_dir.trim();
        if !mask_dir.is_empty() {
            if let Err(e) = crate::data::masks::MaskFolder::read(Path::new(mask_dir), "the mask folder") {
                return Err(format!("concept {n}: {}", crate::error::one_line(&e)));
            }
        }
        let validation_dir = c.validation_dir.trim();
        if !validation_dir.is_empty() {
            if absolute(validation_dir) == absolute(c.instance_dir.trim()) {
                return Err(format!(
                    "concept {n}: the validation folder is the instance folder; held-out photos must be ones the run does not train on"
                ));
            }
            match crate::data::images::list_images(Path::new(validation_dir), "the validation folder") {
                Ok(files) if files.is_empty() => {
                    return Err(format!("concept {n}: the validation folder {validation_dir} holds no images"))
                }
                Ok(_) => {}
                Err(e) => return Err(format!("concept {n}: {}", crate::error::one_line(&e))),
            }
        }
        Ok(())
    }

    /// The training step's values, parsed.
    fn training(&self) -> Result<Training, String> {
        let mut t = Training::default();
        t.steps_per_image = match self.steps_per_image.trim().parse::<u32>() {
            Ok(v) if v >= 1 => v,
            _ => return Err(format!("steps per image {:?} must be a whole number, at least 1", self.steps_per_image)),
        };
        t.learning_rate = match self.learning_rate.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 1.0 => v,
            _ => {
                return Err(format!(
                    "learning rate {:?} must be a number above 0 and at most 1 (1e-6 to 2e-6 is typical)",
                    self.learning_rate
                ))
            }
        };
        t.lr_scheduler = self.lr_scheduler;
        t.lr_warmup_steps = self
            .lr_warmup_steps
            .trim()
            .parse()
            .map_err(|_| format!("warmup steps {:?} must be a whole number", self.lr_warmup_steps))?;
        t.text_encoder_train_ratio = self.text_encoder_train_ratio;
        Ok(t)
    }

    /// Images over all concepts whose folders can be read.
    pub fn image_count(&self) -> usize {
        self.epoch_plan().images
    }

    /// The trainer's count (`train::trainer::total_steps`) for these images, when the steps parse.
    pub fn total_steps(&self) -> Option<u64> {
        let per: u32 = self.steps_per_image.trim().parse().ok()?;
        let accumulation = self
            .build_config()
            .or_else(|_| self.baseline())
            .map(|c| c.training.gradient_accumulation_steps)
            .unwrap_or(Training::default().gradient_accumulation_steps);
        Some(crate::train::trainer::total_steps(per, self.epoch_plan().batches, accumulation))
    }

    /// Images and micro-batches an epoch, from the folders when the inputs
    /// they depend on changed since the last call, else from the memo.
    fn epoch_plan(&self) -> EpochPlan {
        let config = self.build_config().or_else(|_| self.baseline()).ok();
        let key = EpochKey {
            instance_dirs: self.concepts.iter().map(|c| c.instance_dir.trim().to_string()).collect(),
            source: self.source.trim().to_string(),
            frames: config.as_ref().map(|c| (c.resolution, c.training.batch_size, c.training.aspect_ratio_bucketing)),
        };
        if let Some(plan) = self.epoch_plan.borrow().as_ref().filter(|p| p.key == key) {
            return plan.clone();
        }
        let images = self.concepts.iter().filter_map(|c| count_images(&c.instance_dir).ok()).sum::<usize>();
        let batch_size = config.as_ref().map_or(Training::default().batch_size, |c| c.training.batch_size);
        let batches = config
            .as_ref()
            .and_then(crate::data::buckets::planned_batches_per_epoch)
            .unwrap_or_else(|| (images as u64).div_ceil(u64::from(batch_size.max(1))));
        let plan = EpochPlan { key, images, batches };
        *self.epoch_plan.borrow_mut() = Some(plan.clone());
        plan
    }

    fn concepts(&self) -> Vec<Concept> {
        self.concepts
            .iter()
            .map(|c| Concept {
                instance_data_dir: absolute(&c.instance_dir),
                instance_prompt: c.instance_prompt.trim().to_string(),
                instance_token: c.instance_token.trim().to_string(),
                class_token: c.class_token.trim().to_string(),
                class_negative_prompt: c.class_negative.trim().to_string(),
                class_guidance_scale: c.class_guidance.trim().parse().ok(),
                class_infer_steps: c.class_steps.trim().parse().ok(),
                class_prompt: c.class_prompt.trim().to_string(),
                class_data_dir: (!c.class_dir.trim().is_empty()).then(|| absolute(c.class_dir.trim())),
                num_class_images: c.class_images.trim().parse().unwrap_or(0),
                prior_loss_weight: c.prior_loss_weight.trim().parse().unwrap_or(1.0),
                sample_prompts: {
                    let typed: Vec<String> =
                        c.sample_prompts.split('|').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect();
                    if typed.is_empty() { vec![c.instance_prompt.trim().to_string()] } else { typed }
                },
                validation_data_dir: (!c.validation_dir.trim().is_empty()).then(|| absolute(c.validation_dir.trim())),
                validation_split: 0.0,
                mask_dir: (!c.mask_dir.trim().is_empty()).then(|| absolute(c.mask_dir.trim())),
            })
            .collect()
    }

    fn preset_name(&self) -> Option<String> {
        self.preset_index.and_then(|i| self.presets.get(i)).map(|p| p.name.clone())
    }

    /// What the config would train with if the user had set nothing: the
    /// defaults under the chosen preset, read exactly as `config::load` reads a file.
    pub fn baseline(&self) -> Result<RunConfig, String> {
        let mut top = Mapping::new();
        let put = |m: &mut Mapping, k: &str, v: Value| {
            m.insert(Value::String(k.into()), v);
        };
        put(&mut top, "name", Value::String(self.name.trim().to_string()));
        put(&mut top, "source_checkpoint", to_value(&absolute(&self.source))?);
        put(&mut top, "output_dir", to_value(&self.output_dir())?);
        if let Some(preset) = self.preset_name() {
            put(&mut top, "preset", Value::String(preset));
        }
        put(&mut top, "concepts", to_value(&self.concepts())?);
        let text = serde_yaml::to_string(&Value::Mapping(top)).map_err(|e| e.to_string())?;
        crate::config::parse_run_config(&text, "the wizard's config", &self.runs_dir)
            .map_err(|e| crate::error::one_line(&e))
    }

    fn output_dir(&self) -> PathBuf {
        std::path::absolute(&self.runs_dir).unwrap_or_else(|_| self.runs_dir.clone())
    }

    /// The config the run will train with: the baseline with the keys the user set.
    pub fn build_config(&self) -> Result<RunConfig, String> {
        settings::apply(self.stepped_config()?, &self.advanced_values)
    }

    /// The source model's native resolution (768 for SD 2's v models), read once per source.
    fn native_resolution(&self) -> Option<i64> {
        let source = self.source.trim().to_string();
        if let Some((read_for, size)) = self.native_resolution.borrow().as_ref() {
            if *read_for == source {
                return *size;
            }
        }
        let size = crate::checkpoint::native_resolution(&absolute(&source));
        *self.native_resolution.borrow_mut() = Some((source, size));
        size
    }

    /// The source model's family (SD 1.x, SD 2.x, SDXL), read once per source;
    /// None while the path is not a model this program reads.
    pub fn source_family(&self) -> Option<Architecture> {
        let source = self.source.trim().to_string();
        if let Some((read_for, family)) = self.source_family.borrow().as_ref() {
            if *read_for == source {
                return family.clone();
            }
        }
        let family = if source.is_empty() { None } else { crate::vram::model::family_of(&absolute(&source)).ok() };
        *self.source_family.borrow_mut() = Some((source, family.clone()));
        family
    }

    /// The image side the source model is made for: what its configs state,
    /// else its family's (1024 for SDXL).
    pub fn model_resolution(&self) -> Option<i64> {
        self.native_resolution().or_else(|| self.source_family().map(|f| f.default_resolution()))
    }

    /// Whether the chosen preset freezes the text encoders (`text_encoder_train_ratio: 0`,
    /// for memory: sdxl-12gb, sdxl-24gb). It then wins over the ratio a concept's
    /// kind recommends, so the run trains as the preset's estimate says; a ratio
    /// typed in the advanced panel still wins over it.
    fn preset_freezes_text_encoders(&self) -> bool {
        let Some(preset) = self.preset_name() else { return false };
        crate::config::presets::training_values(&preset)
            .and_then(|t| t.get("text_encoder_train_ratio").and_then(Value::as_f64))
            .is_some_and(|ratio| ratio == 0.0)
    }

    /// The preset that freezes the text encoders over the ratio the concept's kind
    /// recommends, when one does (the training step says so).
    pub fn text_encoders_frozen_by(&self) -> Option<String> {
        let overridden = self.touched.contains("text_encoder_train_ratio")
            && self.text_encoder_train_ratio > 0.0
            && !self.advanced_values.contains_key("training.text_encoder_train_ratio");
        if overridden && self.preset_freezes_text_encoders() {
            self.preset_name()
        } else {
            None
        }
    }

    /// The baseline with what the steps before the advanced panel set.
    fn stepped_config(&self) -> Result<RunConfig, String> {
        let mut config = self.baseline()?;
        // A model made for larger images (SD 2's 768 v models, SDXL) trains at its own
        // size (the advanced panel can still change it); smaller ones keep the default.
        if let Some(size) = self.model_resolution().filter(|&s| s > config.resolution) {
            config.resolution = size;
        }
        let typed = self.training()?;
        let t = &mut config.training;
        let set = |key: &str| self.touched.contains(key);
        if set("steps_per_image") {
            t.steps_per_image = typed.steps_per_image;
        }
        if set("learning_rate") {
            t.learning_rate = typed.learning_rate;
        }
        if set("lr_scheduler") {
            t.lr_scheduler = typed.lr_scheduler;
        }
        if set("lr_warmup_steps") {
            t.lr_warmup_steps = typed.lr_warmup_steps;
        }
        if set("text_encoder_train_ratio") && !self.preset_freezes_text_encoders() {
            t.text_encoder_train_ratio = typed.text_encoder_train_ratio;
        }
        if set("sampling.scheduler") {
            config.sampling.scheduler = self.sampler.clone();
        }
        // A mask folder is given to be used (the advanced panel can still turn it off).
        if config.concepts.iter().any(|c| c.mask_dir.is_some()) {
            t.masked_loss = true;
        }
        // Held-out photos are given to be measured: as often as the previews
        // (the advanced panel can still change it).
        if config.concepts.iter().any(|c| c.validation_data_dir.is_some()) && t.validate_every_n_epochs == 0 {
            t.validate_every_n_epochs = t.save_preview_every_n_epochs.max(1);
        }
        Ok(config)
    }

    /// The YAML the review step shows and `save` writes: the run's own keys
    /// (name, model, output folder, preset, concepts) and, of the settings, only
    /// those that differ from the preset's, so the preset the file names is the
    /// one that applies.
    pub fn yaml(&self) -> Result<String, String> {
        let config = to_value(&self.build_config()?)?;
        let base = to_value(&self.baseline()?)?;
        let (Value::Mapping(config), Value::Mapping(base)) = (config, base) else {
            return Err("cannot write the config as YAML".into());
        };
        const OWN: [&str; 5] = ["name", "source_checkpoint", "output_dir", "preset", "concepts"];
        let mut out = Mapping::new();
        for (key, value) in config {
            let own = key.as_str().is_some_and(|k| OWN.contains(&k));
            let value = match (value, base.get(&key)) {
                (value, _) if own => Some(value),
                (Value::Mapping(section), Some(Value::Mapping(base_section))) => {
                    let changed: Mapping =
                        section.into_iter().filter(|(k, v)| base_section.get(k) != Some(v)).collect();
                    (!changed.is_empty()).then_some(Value::Mapping(changed))
                }
                (value, Some(b)) if *b == value => None,
                (value, _) => Some(value),
            };
            if let Some(value) = value {
                out.insert(key, value);
            }
        }
        serde_yaml::to_string(&Value::Mapping(out)).map_err(|e| format!("cannot write the config as YAML: {e}"))
    }

    /// Where the config is saved: `<runs_dir>/<name>.yaml`, beside the run
    /// directory the trainer creates (it starts only in a new folder).
    pub fn config_path(&self) -> PathBuf {
        self.runs_dir.join(format!("{}.yaml", self.name.trim()))
    }

    /// Writes the config file (whole or not at all).
    fn save(&self) -> anyhow::Result<PathBuf> {
        let yaml = self.yaml().map_err(anyhow::Error::msg)?;
        let dir = &self.runs_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = self.config_path();
        crate::checkpoint::write::write_atomically(&path, |out| Ok(std::io::Write::write_all(out, yaml.as_bytes())?))?;
        Ok(path)
    }

    /// Completes the last part of the focused path field from the disk.
    fn complete_path(&mut self) {
        let Some(text) = self.focused_text() else { return };
        let typed = text.clone();
        let (parent, prefix) = match typed.rfind('/') {
            Some(i) => (typed[..=i].to_string(), typed[i + 1..].to_string()),
            None => (String::new(), typed.clone()),
        };
        let dir = if parent.is_empty() { PathBuf::from(".") } else { PathBuf::from(&parent) };
        let mut matches: Vec<(String, bool)> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        (name.starts_with(&prefix) && !name.starts_with('.')).then(|| (name, e.path().is_dir()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        matches.sort();
        let completed = match matches.as_slice() {
            [] => return,
            [(name, is_dir)] => format!("{parent}{name}{}", if *is_dir { "/" } else { "" }),
            many => {
                let first = &many[0].0;
                let common = many.iter().fold(first.len(), |len, (n, _)| {
                    first.chars().zip(n.chars()).take_while(|(a, b)| a == b).count().min(len)
                });
                format!("{parent}{}", &first[..first.char_indices().nth(common).map(|(i, _)| i).unwrap_or(first.len())])
            }
        };
        let candidates: Vec<String> = if matches.len() > 1 { matches.into_iter().map(|(n, _)| n).collect() } else { Vec::new() };
        if let Some(text) = self.focused_text() {
            *text = completed;
        }
        self.completions = candidates;
    }
}
