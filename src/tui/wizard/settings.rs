//! The VRAM step's advanced panel: every run setting the other steps do not ask
//! for, listed with the value the run would use (the preset's, or the default),
//! and edited in place: switches toggle, choices cycle, numbers and text are
//! typed. What the user sets is kept as text, as it would stand in a config
//! file, and read back through the config's own types, so a bad value is the
//! same error the file would give, naming the key.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use crate::config::schema::RunConfig;

/// Keys other wizard steps set (name, model, concepts, the training step's
/// fields): not repeated in the panel.
const ASKED_ELSEWHERE: [&str; 10] = [
    "name",
    "source_checkpoint",
    "output_dir",
    "preset",
    "concepts",
    "training.steps_per_image",
    "training.learning_rate",
    "training.lr_scheduler",
    "training.lr_warmup_steps",
    "sampling.scheduler",
];

/// Numbers that may be left unset (`null` in the config, empty in the panel).
const OPTIONAL_NUMBERS: [&str; 3] =
    ["training.text_encoder_learning_rate", "training.lora_text_encoder_rank", "training.lora_text_encoder_alpha"];

/// Paths that may be left unset (absent from the config, empty in the panel); typed
/// paths are made absolute, as the wizard's other paths are.
const OPTIONAL_PATHS: [&str; 1] = ["vae"];

/// The values a choice setting cycles through (each parses as the key's type).
pub fn choices(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "device" => &["auto", "cpu", "cuda"],
        "training.optimizer" => &["adamw", "adamw_8bit"],
        "training.lora_layers" => &["attention", "transformer", "all"],
        "training.mixed_precision" => &["no", "fp16", "bf16"],
        "training.attention" => &["default", "xformers", "flash_attention", "explicit"],
        _ => return None,
    })
}

/// One line on what a setting does, shown under the panel for the focused row
/// (after the method guide, shared/000_08e16969a22e2253.txt, where it has one).
pub fn help(key: &str) -> &'static str {
    match key {
        "device" => "where to train: auto picks CUDA when a GPU is there",
        "vae" => "a VAE in place of the model's (sd-vae-ft-mse folder, vae-ft-mse-840000-ema-pruned.safetensors); empty: the model's",
        "seed" => "seed of the training noise, timesteps and data order",
        "resolution" => "training size in pixels (512 for SD 1.x, 768 for SD 2 v models, 1024 for SDXL); images are resized and cropped to it",
        "training.batch_size" => "images per step: faster, more VRAM; images should divide by batch × accumulation",
        "training.gradient_accumulation_steps" => "micro-batches summed before one optimizer step",
        "training.lr_power" => "polynomial scheduler: the degree of the decay",
        "training.lr_end" => "polynomial scheduler: the learning rate it ends at",
        "training.lr_cycles" => "cosine with restarts: how many times the rate decays to 0 and jumps back",
        "training.train_unet" => "train the UNet (off: only the text encoder trains)",
        "training.text_encoder_train_ratio" => "share of the steps that also train the text encoder: 0.7 faces, 0.2 styles, 0 to save VRAM",
        "training.text_encoder_learning_rate" => "the text encoder's own learning rate (its LoRA's too), scheduled alike; empty: the learning rate",
        "training.use_lora" => "train small LoRA adapters instead of the whole UNet: for 8–12 GB cards",
        "training.lora_rank" => "LoRA: rank of the adapters (size and capacity)",
        "training.lora_alpha" => "LoRA: scale of the adapters (alpha / rank)",
        "training.lora_text_encoder_rank" => "LoRA: the text encoder's adapters' rank; empty: lora_rank",
        "training.lora_text_encoder_alpha" => "LoRA: the text encoder's adapters' alpha; empty: lora_alpha",
        "training.lora_layers" => "LoRA: attention only; transformer adds feed-forward and proj layers; all adds the convolutions (LoCon)",
        "training.train_imagic_only" => "Imagic: edit one image (first of concept 1) to its prompt",
        "training.use_ema" => "keep an exponential moving average of the UNet (more VRAM; smoother result)",
        "training.ema_decay" => "EMA: how slowly the average follows the weights",
        "training.optimizer" => "adamw_8bit keeps both moments in 8 bits: less memory",
        "training.adam_beta1" => "AdamW: first-moment decay",
        "training.adam_beta2" => "AdamW: second-moment decay",
        "training.adam_epsilon" => "AdamW: the denominator's epsilon",
        "training.weight_decay" => "AdamW: decoupled weight decay",
        "training.max_grad_norm" => "clip gradients to this global norm; 0 = off",
        "training.mixed_precision" => "bf16 (recommended) or fp16 halves activation memory; no = full float32",
        "training.attention" => "default: libtorch's fused SDPA, as diffusers; explicit: softmax(q kᵀ) v, most VRAM; xformers / flash_attention: those SDPA kernels",
        "training.gradient_checkpointing" => "recompute activations in the backward pass: much less VRAM, slower",
        "training.fused_backward" => "update each tensor as its gradient is ready, never holding all gradients: a full SDXL UNet in 24 GB (max_grad_norm 0)",
        "training.skip_fit_check" => "start even when the memory estimate is above what the GPU (or the machine) has free",
        "training.set_grads_to_none" => "free the gradients between steps instead of zeroing them",
        "training.cache_latents" => "encode the images once and take the VAE off the GPU",
        "training.offset_noise" => "noise offset per channel: lets the model learn brightness and contrast; 0 = off",
        "training.min_snr_gamma" => "Min-SNR loss weighting (5 is usual); 0 = off",
        "training.freeze_clip_normalization" => "keep the text encoder's layer norms fixed: may curb overfitting",
        "training.clip_skip" => "condition on the text encoder's n-th last layer (1 = last; 2 for anime models)",
        "training.random_flip" => "flip images left-right at random (not for asymmetric subjects)",
        "training.aspect_ratio_bucketing" => "train each image in the frame nearest its shape (16:9 … 9:16) instead of a centre square",
        "training.max_token_length" => "prompt tokens read: 75 (CLIP's window), 150 or 225 for long captions",
        "training.shuffle_tags" => "shuffle a caption's comma-separated tags after the first, each draw",
        "training.pause_after_n_epochs" => "pause every n epochs (0 = never) for pause_seconds",
        "training.pause_seconds" => "length of each pause, in seconds",
        "training.save_model_every_n_epochs" => "checkpoint every n epochs (each the size of the model on disk); the end is always saved",
        "training.save_preview_every_n_epochs" => "preview images every n epochs and at the end (5 is usual); 0 = no previews",
        "training.sample_before_training" => "previews once before the first step too: what the source model draws, to compare",
        "training.validate_every_n_epochs" => "validation loss every n epochs (held-out photos in a concept's validation_data_dir, class images): a rise means over-training; 0 = off",
        "training.validation_timesteps" => "validation: fixed timesteps the loss is averaged over, spread over the schedule (4: 200, 400, 600, 800)",
        "training.masked_loss" => "learn only where each image's mask (a concept's mask folder, same file names) is white: the subject, not its background",
        "training.unmasked_weight" => "masked loss: the weight black (masked-out) areas keep; 0 = ignore the background, 0.1 = learn a little of it",
        "training.keep_last_checkpoints" => "checkpoints kept on disk, older ones deleted; 0 = keep all",
        "sampling.steps" => "sampler steps for previews and class images",
        "sampling.guidance" => "classifier-free guidance scale for previews and class images",
        "sampling.seed" => "seed of the previews (the same every time, to compare steps)",
        "sampling.negative_prompt" => "negative prompt for previews and class images",
        _ => "",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    /// true / false; ←→ or Space flips it.
    Switch,
    /// One of `choices(key)`; ←→ cycles.
    Choice,
    /// A number, typed.
    Number,
    /// Free text (a negative prompt), typed.
    Text,
}

/// One row of the panel.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingRow {
    /// `device`, `training.use_lora`, `sampling.steps`, ...
    pub key: String,
    pub kind: SettingKind,
    /// What the run uses now (typed text while it is being edited).
    pub value: String,
    /// The user set it (it overrides the preset).
    pub set: bool,
}

/// A scalar as it would be written in YAML (`1e-6`, `true`, `bf16`); strings as they are.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => serde_yaml::to_string(other).map(|s| s.trim().to_string()).unwrap_or_default(),
    }
}

fn kind_of(key: &str, v: &Value) -> Option<SettingKind> {
    if choices(key).is_some() {
        return Some(SettingKind::Choice);
    }
    if OPTIONAL_NUMBERS.contains(&key) {
        return Some(SettingKind::Number);
    }
    if OPTIONAL_PATHS.contains(&key) {
        return Some(SettingKind::Text);
    }
    match v {
        Value::Bool(_) => Some(SettingKind::Switch),
        Value::Number(_) => Some(SettingKind::Number),
        Value::String(_) => Some(SettingKind::Text),
        _ => None,
    }
}

/// Every scalar setting of `config` (top level, then `training`, then `sampling`)
/// that no other step asks for, in the config's own order.
fn scalar_settings(config: &RunConfig) -> Vec<(String, Value)> {
    let Ok(Value::Mapping(top)) = serde_yaml::to_value(config) else { return Vec::new() };
    let mut out = Vec::new();
    let mut push = |key: String, v: &Value| {
        if !ASKED_ELSEWHERE.contains(&key.as_str()) && kind_of(&key, v).is_some() {
            out.push((key, v.clone()));
        }
    };
    for (k, v) in &top {
        if let (Some(k), false) = (k.as_str(), v.is_mapping()) {
            push(k.to_string(), v);
        }
        // An unset optional path is not written; its row comes after the source's.
        if k.as_str() == Some("source_checkpoint") {
            for key in OPTIONAL_PATHS.iter().filter(|p| !top.contains_key(**p)) {
                push(key.to_string(), &Value::Null);
            }
        }
    }
    for section in ["training", "sampling"] {
        if let Some(Value::Mapping(m)) = top.get(section) {
            for (k, v) in m {
                if let Some(k) = k.as_str() {
                    push(format!("{section}.{k}"), v);
                }
            }
        }
    }
    out
}

/// The panel's rows for a baseline config (preset over defaults) and the values
/// the user set.
pub fn rows(baseline: &RunConfig, set: &BTreeMap<String, String>) -> Vec<SettingRow> {
    scalar_settings(baseline)
        .into_iter()
        .filter_map(|(key, v)| {
            let kind = kind_of(&key, &v)?;
            let (value, is_set) = match set.get(&key) {
                Some(text) => (text.clone(), true),
                None => (scalar_text(&v), false),
            };
            Some(SettingRow { key, kind, value, set: is_set })
        })
        .collect()
}

/// `config` with the user's values put in, read back through the config's types.
/// Errors name the key: "`training.batch_size`: invalid type: ...".
pub fn apply(config: RunConfig, set: &BTreeMap<String, String>) -> Result<RunConfig, String> {
    if set.is_empty() {
        return Ok(config);
    }
    let Ok(Value::Mapping(mut top)) = serde_yaml::to_value(&config) else {
        return Err("cannot read the config's settings".into());
    };
    for (key, text) in set {
        let (section, name) = match key.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, key.as_str()),
        };
        let map: &mut Mapping = match section {
            Some(s) => match top.get_mut(s) {
                Some(Value::Mapping(m)) => m,
                _ => return Err(format!("`{key}` is not a setting")),
            },
            None => &mut top,
        };
        if OPTIONAL_PATHS.contains(&key.as_str()) {
            let name = Value::String(name.to_string());
            match text.trim() {
                "" => map.remove(&name),
                path => map.insert(name, Value::String(std::path::absolute(path).unwrap_or_else(|_| path.into()).display().to_string())),
            };
            continue;
        }
        let current = map.get(name).ok_or_else(|| format!("`{key}` is not a setting"))?;
        let value = match kind_of(key, current) {
            Some(SettingKind::Text | SettingKind::Choice) => Value::String(text.clone()),
            _ if text.trim().is_empty() && OPTIONAL_NUMBERS.contains(&key.as_str()) => Value::Null,
            _ if text.trim().is_empty() => return Err(format!("`{key}` is empty; type a value")),
            _ => serde_yaml::from_str::<Value>(text.trim()).unwrap_or_else(|_| Value::String(text.clone())),
        };
        map.insert(Value::String(name.to_string()), value);
    }
    serde_path_to_error::deserialize(Value::Mapping(top)).map_err(|e| {
        let inner = e.inner().to_string();
        let why = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        format!("`{}`: {why}", e.path())
    })
}

/// The next (or previous) value of a switch or choice row.
pub fn cycled(row: &SettingRow, forward: bool) -> Option<String> {
    match row.kind {
        SettingKind::Switch => Some(if row.value == "true" { "false" } else { "true" }.to_string()),
        SettingKind::Choice => {
            let options = choices(&row.key)?;
            let n = options.len();
            let i = options.iter().position(|o| *o == row.value);
            let next = match i {
                Some(i) => (i + if forward { 1 } else { n - 1 }) % n,
                None => 0,
            };
            Some(options[next].to_string())
        }
        SettingKind::Number | SettingKind::Text => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        let text = "name: x\nsource_checkpoint: x\nconcepts:\n  - instance_data_dir: x\n    instance_prompt: a photo of sks dog\n";
        crate::config::parse_run_config(text, "a test config", std::path::Path::new(".")).unwrap()
    }

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_setting_is_in_the_panel_or_asked_by_another_step() {
        let c = config();
        let keys: Vec<String> = rows(&c, &BTreeMap::new()).into_iter().map(|r| r.key).collect();
        let Ok(Value::Mapping(top)) = serde_yaml::to_value(&c) else { panic!("a mapping") };
        let mut all = Vec::new();
        for (k, v) in &top {
            let k = k.as_str().unwrap();
            match v {
                Value::Mapping(m) if k != "concepts" => {
                    all.extend(m.keys().map(|n| format!("{k}.{}", n.as_str().unwrap())));
                }
                _ => all.push(k.to_string()),
            }
        }
        for key in all {
            assert!(keys.contains(&key) || ASKED_ELSEWHERE.contains(&key.as_str()), "{key} has no wizard field");
        }
    }

    #[test]
    fn every_row_says_what_it_does() {
        for row in rows(&config(), &BTreeMap::new()) {
            assert!(!help(&row.key).is_empty(), "{} has no help line", row.key);
        }
    }

    #[test]
    fn the_vae_row_is_an_optional_absolute_path() {
        let keys: Vec<String> = rows(&config(), &BTreeMap::new()).into_iter().map(|r| r.key).collect();
        assert_eq!(keys.first().map(String::as_str), Some("vae"), "{keys:?}");
        assert_eq!(apply(config(), &set(&[("vae", "")])).unwrap().vae, None);
        let vae = apply(config(), &set(&[("vae", "models/sd-vae-ft-mse")])).unwrap().vae.unwrap();
        assert!(vae.is_absolute() && vae.ends_with("models/sd-vae-ft-mse"), "{}", vae.display());
    }

    #[test]
    fn every_choice_reads_as_its_key() {
        for key in ["device", "training.optimizer", "training.mixed_precision", "training.attention"] {
            for option in choices(key).unwrap() {
                apply(config(), &set(&[(key, option)])).unwrap_or_else(|e| panic!("{key}: {option}: {e}"));
            }
        }
    }

    #[test]
    fn values_read_back_and_bad_ones_name_the_key() {
        let c = apply(config(), &set(&[("training.batch_size", "4"), ("training.use_ema", "true"), ("sampling.negative_prompt", "123")]))
            .unwrap();
        assert_eq!(c.training.batch_size, 4);
        assert!(c.training.use_ema);
        assert_eq!(c.sampling.negative_prompt, "123", "text stays text");
        let e = apply(config(), &set(&[("training.batch_size", "four")])).unwrap_err();
        assert!(e.starts_with("`training.batch_size`: "), "{e}");
        let e = apply(config(), &set(&[("resolution", "")])).unwrap_err();
        assert!(e.contains("`resolution` is empty"), "{e}");
        let key = "training.text_encoder_learning_rate";
        assert_eq!(apply(config(), &set(&[(key, "5e-5")])).unwrap().training.text_encoder_learning_rate, Some(5e-5));
        assert_eq!(apply(config(), &set(&[(key, " ")])).unwrap().training.text_encoder_learning_rate, None, "empty: unset");
        let e = apply(config(), &set(&[("resolution", "")])).unwrap_err();
        assert!(e.contains("`resolution` is empty"), "{e}");
        let row = rows(&config(), &BTreeMap::new()).into_iter().find(|r| r.key == "training.attention").unwrap();
        assert_eq!(cycled(&row, true).as_deref(), Some("xformers"));
        assert_eq!(cycled(&row, false).as_deref(), Some("explicit"));
    }
}
