//! Range and consistency checks of a parsed run config. Each failure is one
//! sentence naming the key. Checks that need the disk (folders, images) live
//! with the data loading, which knows the image counts.

use super::schema::RunConfig;

/// The largest `resolution` (and `generate` side) taken: 8192 is 16× SD 1.5's
/// own size and 64× its pixels; a typo past it would fill any machine's memory.
pub const MAX_RESOLUTION: i64 = 8192;

pub fn validate(c: &RunConfig) -> Result<(), String> {
    if c.name.trim().is_empty() {
        return Err("`name` is empty; it names the run directory".into());
    }
    if c.name.contains('/') || c.name.contains('\\') || c.name == "." || c.name == ".." {
        return Err(format!("`name` {:?} must be a plain folder name, without slashes", c.name));
    }
    if !matches!(c.device.as_str(), "auto" | "cpu" | "cuda") && !c.device.starts_with("cuda:") {
        return Err(format!("`device` {:?} is not one of auto, cpu, cuda, cuda:N", c.device));
    }
    if !(64..=MAX_RESOLUTION).contains(&c.resolution) || c.resolution % 8 != 0 {
        return Err(format!(
            "`resolution` {} must be a multiple of 8 from 64 to {MAX_RESOLUTION} (512 for SD 1.x, 768 for SD 2, 1024 for SDXL)",
            c.resolution
        ));
    }
    if c.concepts.is_empty() {
        return Err("`concepts` is empty; give at least one instance_data_dir and instance_prompt".into());
    }
    for (i, concept) in c.concepts.iter().enumerate() {
        if concept.instance_prompt.trim().is_empty() {
            return Err(format!("`concepts[{i}].instance_prompt` is empty"));
        }
        if concept.prior_loss_weight < 0.0 || !concept.prior_loss_weight.is_finite() {
            return Err(format!("`concepts[{i}].prior_loss_weight` must be 0 or more"));
        }
        if let Some(g) = concept.class_guidance_scale.filter(|g| !g.is_finite() || *g < 0.0) {
            return Err(format!("`concepts[{i}].class_guidance_scale` {g} must be 0 or more (7.5 is usual)"));
        }
        if concept.class_infer_steps == Some(0) {
            return Err(format!("`concepts[{i}].class_infer_steps` must be at least 1"));
        }
        if !concept.class_prompt.trim().is_empty() && concept.num_class_images == 0 {
            return Err(format!(
                "`concepts[{i}].num_class_images` is 0 but a class_prompt is set; prior preservation needs class images"
            ));
        }
    }
    let t = &c.training;
    let positive = [
        ("training.steps_per_image", t.steps_per_image),
        ("training.batch_size", t.batch_size),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("training.lora_rank", t.lora_rank),
        ("training.lora_text_encoder_rank", t.lora_text_encoder_rank.unwrap_or(1)),
    ];
    for (key, v) in positive {
        if v == 0 {
            return Err(format!("`{key}` must be at least 1"));
        }
    }
    if !(t.learning_rate > 0.0 && t.learning_rate <= 1.0) {
        return Err(format!("`training.learning_rate` {} must be above 0 and at most 1 (1e-6 to 2e-6 is typical)", t.learning_rate));
    }
    if let Some(lr) = t.text_encoder_learning_rate.filter(|lr| !(*lr > 0.0 && *lr <= 1.0)) {
        return Err(format!("`training.text_encoder_learning_rate` {lr} must be above 0 and at most 1 (or left out: `learning_rate`)"));
    }
    if !(0.0..=1.0).contains(&t.text_encoder_train_ratio) {
        return Err(format!("`training.text_encoder_train_ratio` {} must be between 0 and 1", t.text_encoder_train_ratio));
    }
    if !t.train_unet && t.text_encoder_train_ratio == 0.0 {
        return Err("`training.train_unet` is false and `training.text_encoder_train_ratio` is 0: nothing would train".into());
    }
    if !(t.ema_decay > 0.0 && t.ema_decay < 1.0) {
        return Err(format!("`training.ema_decay` {} must be between 0 and 1", t.ema_decay));
    }
    for (key, v) in [("training.adam_beta1", t.adam_beta1), ("training.adam_beta2", t.adam_beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(format!("`{key}` {v} must be at least 0 and below 1"));
        }
    }
    for (key, v) in [
        ("training.adam_epsilon", t.adam_epsilon),
        ("training.weight_decay", t.weight_decay),
        ("training.max_grad_norm", t.max_grad_norm),
        ("training.min_snr_gamma", t.min_snr_gamma),
        ("training.lr_power", t.lr_power),
        ("training.lr_end", t.lr_end),
        ("training.lora_alpha", t.lora_alpha),
        ("training.lora_text_encoder_alpha", t.lora_text_encoder_alpha.unwrap_or(0.0)),
    ] {
        if v < 0.0 || !v.is_finite() {
            return Err(format!("`{key}` {v} must be 0 or more"));
        }
    }
    if t.lr_end >= t.learning_rate && t.lr_scheduler == super::schema::LrScheduler::Polynomial {
        return Err(format!(
            "`training.lr_end` {} must be below `training.learning_rate` {} for the polynomial schedule",
            t.lr_end, t.learning_rate
        ));
    }
    if t.lr_cycles < 1 {
        return Err("`training.lr_cycles` must be at least 1 (1: one cosine decay, no restart)".into());
    }
    if !(-1.0..=1.0).contains(&t.offset_noise) {
        return Err(format!("`training.offset_noise` {} must be between -1 and 1 (0.05 to 0.1 is typical)", t.offset_noise));
    }
    if t.clip_skip < 1 {
        return Err(format!("`training.clip_skip` {} must be at least 1 (1 = the last layer)", t.clip_skip));
    }
    if ![75, 150, 225].contains(&t.max_token_length) {
        return Err(format!("`training.max_token_length` {} must be 75, 150 or 225", t.max_token_length));
    }
    if t.train_imagic_only && t.max_token_length != 75 {
        return Err("`training.max_token_length` applies to DreamBooth prompts; Imagic optimises one 77-token embedding".into());
    }
    if t.fused_backward && t.gradient_accumulation_steps > 1 {
        return Err("`training.fused_backward` updates the weights inside each backward pass, so it cannot accumulate gradients over micro-batches: set `gradient_accumulation_steps: 1`".into());
    }
    if t.fused_backward && t.max_grad_norm > 0.0 {
        return Err("`training.fused_backward` never holds all gradients at once, so it cannot clip their global norm: set `max_grad_norm: 0`".into());
    }
    if t.fused_backward && t.mixed_precision == super::schema::MixedPrecision::Fp16 {
        return Err("`training.fused_backward` cannot skip a step whose fp16 gradients overflowed (it has already applied them): use `mixed_precision: bf16` or 'no'".into());
    }
    if t.pause_after_n_epochs > 0 && t.pause_seconds == 0 {
        return Err("`training.pause_after_n_epochs` is set but `training.pause_seconds` is 0".into());
    }
    if !(1..=100).contains(&t.validation_timesteps) {
        return Err(format!("`training.validation_timesteps` {} must be between 1 and 100 (4 is usual)", t.validation_timesteps));
    }
    if !(0.0..=1.0).contains(&t.unmasked_weight) {
        return Err(format!(
            "`training.unmasked_weight` {} must be between 0 and 1 (0: the masked-out background is ignored; 0.1 keeps a little of it)",
            t.unmasked_weight
        ));
    }
    if t.masked_loss && !t.train_imagic_only && c.concepts.iter().all(|c| c.mask_dir.is_none()) {
        return Err("`training.masked_loss` is on but no concept has a `mask_dir` (a folder of masks named as its images): there is nothing to mask".into());
    }
    if t.train_imagic_only && c.concepts.len() != 1 {
        return Err("`training.train_imagic_only` trains on one image of one concept; give exactly one concept".into());
    }
    let s = &c.sampling;
    if !crate::scheduler::SAMPLER_NAMES.contains(&s.scheduler.as_str()) {
        return Err(format!(
            "`sampling.scheduler` {:?} is not one of {}",
            s.scheduler,
            crate::scheduler::SAMPLER_NAMES.join(", ")
        ));
    }
    if s.steps == 0 {
        return Err("`sampling.steps` must be at least 1".into());
    }
    if s.guidance < 0.0 {
        return Err("`sampling.guidance` must be 0 or more".into());
    }
    Ok(())
}
