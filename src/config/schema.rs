//! The run configuration (DESIGN.md "Run configuration"): one struct per YAML
//! section, snake_case keys, defaults for every optional key. Unknown keys are
//! caught before deserialising (see `load.rs`) so the error can name the key and
//! suggest the near one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory = `<output_dir>/<name>`.
    pub name: String,
    /// A diffusers folder, LDM single file or .ckpt.
    pub source_checkpoint: PathBuf,
    /// A VAE that replaces the source's for training and previews, and goes into
    /// exports (a diffusers AutoencoderKL folder or an LDM-layout VAE file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<PathBuf>,
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// auto | cpu | cuda | cuda:N
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_resolution")]
    pub resolution: i64,
    /// Name of a file in `presets/` whose keys this config's own keys override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    pub concepts: Vec<Concept>,
    #[serde(default)]
    pub training: Training,
    #[serde(default)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concept {
    pub instance_data_dir: PathBuf,
    /// May hold `[filewords]`: each image's own words (see `data/prompts.rs`).
    pub instance_prompt: String,
    /// The subject's rare token ("sks"): put into instance prompts that lack it
    /// and taken out of class prompts (AUTOMATIC1111's "Instance Token").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_token: String,
    /// The subject's class word ("dog"): kept in class prompts, after the
    /// instance token in instance prompts (AUTOMATIC1111's "Class Token").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub class_token: String,
    /// Empty: no prior preservation. May hold `[filewords]`.
    #[serde(default)]
    pub class_prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_data_dir: Option<PathBuf>,
    #[serde(default = "default_num_class_images")]
    pub num_class_images: u32,
    /// Negative prompt for generating class images (AUTOMATIC1111's
    /// "Classification Image Negative Prompt"); empty: `sampling.negative_prompt`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub class_negative_prompt: String,
    /// CFG scale for generating class images; unset: `sampling.guidance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_guidance_scale: Option<f64>,
    /// Sampler steps for generating class images; unset: `sampling.steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_infer_steps: Option<usize>,
    #[serde(default = "one")]
    pub prior_loss_weight: f64,
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Held-out photos of the subject, never trained on: their denoising loss at
    /// fixed timesteps and noise is logged every `training.validate_every_n_epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_data_dir: Option<PathBuf>,
    /// Without a validation_data_dir: this share of the concept's own photos
    /// (0.2: one in five, at least one) is held out of training for the
    /// validation loss, drawn from the run's seed, as kohya's `validation_split`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub validation_split: f64,
    /// With `training.masked_loss`: a mask per instance image, same file stem
    /// (white: learn, black: ignore, grey: a weight in between).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Constant,
    ConstantWithWarmup,
    LinearWithWarmup,
    Polynomial,
    Cosine,
    /// Cosine decays to 0 `lr_cycles` times, each a hard restart at the top.
    CosineWithRestarts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Adamw,
    #[serde(rename = "adamw_8bit")]
    Adamw8bit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

/// Which layers a LoRA run puts adapters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraLayers {
    /// The attention projections (UNet to_q/to_k/to_v/to_out.0, CLIP q/k/v/out_proj):
    /// diffusers' DreamBooth LoRA.
    Attention,
    /// Every Linear of the transformer blocks: attention, feed-forward and
    /// proj_in/proj_out (CLIP: attention and MLP), as kohya's plain LoRA.
    Transformer,
    /// Those and the resnet and resampler convolutions (kohya's LoCon, the
    /// extension's "Use Lora Extended").
    All,
}

pub use crate::model::attention::AttentionBackend;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Training {
    /// "Epochs": total steps = epochs × images ÷ batch.
    pub steps_per_image: u32,
    pub batch_size: u32,
    pub gradient_accumulation_steps: u32,
    pub learning_rate: f64,
    pub lr_scheduler: LrScheduler,
    pub lr_warmup_steps: u32,
    /// Polynomial degree.
    pub lr_power: f64,
    /// Polynomial decay's final learning rate (diffusers' `lr_end`).
    pub lr_end: f64,
    /// Cosine with restarts: the number of cycles (the extension's `lr_cycles`).
    pub lr_cycles: u32,
    pub train_unet: bool,
    /// Fraction of the steps that also train the text encoder (0.7 faces, 0.2 styles).
    pub text_encoder_train_ratio: f64,
    /// The text encoder's own learning rate (full weights or its LoRA), scheduled
    /// like `learning_rate`; unset: `learning_rate` (the extension's "Lora Text
    /// Encoder Learning Rate", kohya's `text_encoder_lr`).
    pub text_encoder_learning_rate: Option<f64>,
    pub use_lora: bool,
    pub lora_rank: u32,
    pub lora_alpha: f64,
    /// The text encoder's adapters' own rank and alpha (the extension's
    /// `lora_txt_rank`); unset: `lora_rank` / `lora_alpha`.
    pub lora_text_encoder_rank: Option<u32>,
    pub lora_text_encoder_alpha: Option<f64>,
    pub lora_layers: LoraLayers,
    pub train_imagic_only: bool,
    pub use_ema: bool,
    pub ema_decay: f64,
    pub optimizer: Optimizer,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    /// Gradient clipping by global norm; 0 = off.
    pub max_grad_norm: f64,
    pub mixed_precision: MixedPrecision,
    pub attention: AttentionBackend,
    pub gradient_checkpointing: bool,
    /// Update each trained tensor as soon as its gradient is complete in the
    /// backward pass and free that gradient at once (kohya's fused backward
    /// pass): the whole set of gradients never exists.
    pub fused_backward: bool,
    /// Start even when the memory estimate is above what the device has (the
    /// fit check before the first large allocation; `--force` does the same once).
    pub skip_fit_check: bool,
    pub set_grads_to_none: bool,
    pub cache_latents: bool,
    pub offset_noise: f64,
    /// Min-SNR loss weighting gamma; 0 = off.
    pub min_snr_gamma: f64,
    pub freeze_clip_normalization: bool,
    pub clip_skip: i64,
    pub random_flip: bool,
    /// Train each image in the aspect-ratio bucket nearest its shape (frames of
    /// about `resolution`² pixels, as the AUTOMATIC1111 extension buckets)
    /// instead of the centre `resolution`² square.
    pub aspect_ratio_bucketing: bool,
    /// Shuffle a prompt's comma-separated tags after the first, each time an
    /// image is drawn (AUTOMATIC1111's "Shuffle Tags"; for tag captions).
    pub shuffle_tags: bool,
    /// Tokens of a prompt the text encoder reads: 75 (one CLIP window), 150 or
    /// 225 (windows joined as kohya's trainers do; AUTOMATIC1111's "Max Token Length").
    pub max_token_length: u32,
    pub pause_after_n_epochs: u32,
    pub pause_seconds: u64,
    pub save_model_every_n_epochs: u32,
    pub save_preview_every_n_epochs: u32,
    /// Draw the previews once before the first step too (what the source model
    /// makes of the prompts), so the change can be seen from step 0.
    pub sample_before_training: bool,
    /// Validation loss (held-out photos, class images) every n epochs; 0 = off.
    pub validate_every_n_epochs: u32,
    /// Fixed timesteps the validation loss is averaged over, spread evenly over
    /// the schedule (kohya's 4: 200, 400, 600, 800 of 1000).
    pub validation_timesteps: u32,
    /// Checkpoints kept on disk (older ones are deleted); 0 = keep all.
    pub keep_last_checkpoints: u32,
    /// Weight each instance image's loss by its mask (`concepts[].mask_dir`),
    /// as kohya's `--masked_loss` and OneTrainer's masked training.
    pub masked_loss: bool,
    /// The least weight a masked-out region keeps (OneTrainer's
    /// `unmasked_weight`): 0 ignores the background, 0.1 learns a little of it.
    pub unmasked_weight: f64,
}

impl Default for Training {
    fn default() -> Self {
        Training {
            steps_per_image: 175,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            learning_rate: 1.0e-6,
            lr_scheduler: LrScheduler::ConstantWithWarmup,
            lr_warmup_steps: 0,
            lr_power: 1.0,
            lr_end: 1.0e-7,
            lr_cycles: 1,
            train_unet: true,
            text_encoder_train_ratio: 0.0,
            text_encoder_learning_rate: None,
            use_lora: false,
            lora_rank: 4,
            lora_alpha: 4.0,
            lora_text_encoder_rank: None,
            lora_text_encoder_alpha: None,
            lora_layers: LoraLayers::Attention,
            train_imagic_only: false,
            use_ema: false,
            ema_decay: 0.9999,
            optimizer: Optimizer::Adamw,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            mixed_precision: MixedPrecision::Bf16,
            attention: AttentionBackend::Default,
            gradient_checkpointing: false,
            fused_backward: false,
            skip_fit_check: false,
            set_grads_to_none: true,
            cache_latents: true,
            offset_noise: 0.0,
            min_snr_gamma: 0.0,
            freeze_clip_normalization: false,
            clip_skip: 1,
            random_flip: false,
            aspect_ratio_bucketing: false,
            shuffle_tags: false,
            max_token_length: 75,
            pause_after_n_epochs: 0,
            pause_seconds: 0,
            save_model_every_n_epochs: 25,
            save_preview_every_n_epochs: 5,
            sample_before_training: false,
            validate_every_n_epochs: 0,
            validation_timesteps: 4,
            keep_last_checkpoints: 3,
            masked_loss: false,
            unmasked_weight: 0.0,
        }
    }
}

impl Training {
    /// Rank and alpha of the text encoder's LoRA adapters: their own, else the UNet's.
    pub fn text_encoder_lora(&self) -> (u32, f64) {
        (self.lora_text_encoder_rank.unwrap_or(self.lora_rank), self.lora_text_encoder_alpha.unwrap_or(self.lora_alpha))
    }

    /// The text encoder's base learning rate: its own, else the UNet's.
    pub fn text_encoder_lr(&self) -> f64 {
        self.text_encoder_learning_rate.unwrap_or(self.learning_rate)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    pub scheduler: String,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub negative_prompt: String,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { scheduler: "ddim".into(), steps: 30, guidance: 7.5, seed: 42, negative_prompt: String::new() }
    }
}

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_device() -> String {
    "auto".into()
}
fn default_seed() -> u64 {
    1234
}
fn default_resolution() -> i64 {
    512
}
fn default_num_class_images() -> u32 {
    200
}
fn one() -> f64 {
    1.0
}
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
