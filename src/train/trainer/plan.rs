//! What a trainer says when it starts. Warnings the config and the instance
//! images settle (Imagic's unused keys, settings the user chose that the run's
//! other settings leave without effect, files that are not read, a GPU libtorch
//! cannot use, a source model replaced since the run began) come before the class images are made, which can take minutes,
//! so a mistake shows at once (and on the terminal of a `train --detach`, whose
//! output moves to train.log when class images begin). The plan (images,
//! epochs, steps, buckets, checkpoint sizes) and the warnings that need the
//! prepared data (uneven batches, cut preview prompts, disk room) follow.

use std::collections::BTreeSet;

use super::Trainer;
use crate::config::schema::{LrScheduler, MixedPrecision, RunConfig, Training};
use crate::data::images::skipped_files_note;
use crate::train::checkpoint as ckpt;

/// The `training` keys that are the user's own choice: neither the default nor their
/// preset's value (the 6gb/8gb presets set `text_encoder_learning_rate` for concepts
/// that train the text encoder, and a run that does not should not be warned about
/// a value it never chose).
fn keys_chosen_by_user(config: &RunConfig) -> BTreeSet<String> {
    let mapping = |t: &Training| match serde_yaml::to_value(t) {
        Ok(serde_yaml::Value::Mapping(m)) => m,
        _ => serde_yaml::Mapping::new(),
    };
    let defaults = mapping(&Training::default());
    let preset = config.preset.as_deref().and_then(|p| crate::config::presets::training_values(p));
    let same = |a: &serde_yaml::Value, b: Option<&serde_yaml::Value>| match (a.as_f64(), b.and_then(serde_yaml::Value::as_f64)) {
        (Some(x), Some(y)) => x == y,
        _ => b == Some(a),
    };
    mapping(&config.training)
        .into_iter()
        .filter(|(k, v)| !same(v, defaults.get(k)) && !same(v, preset.as_ref().and_then(|p| p.get(k))))
        .filter_map(|(k, _)| k.as_str().map(str::to_string))
        .collect()
}

/// Settings the user chose that this run's other settings leave without effect:
/// one warning each, so no key is silently ignored.
fn settings_without_effect(t: &Training, chosen_by_user: &BTreeSet<String>) -> Vec<String> {
    let chosen = |keys: &[&str]| -> Vec<String> {
        keys.iter().filter(|k| chosen_by_user.contains(**k)).map(|k| format!("`{k}`")).collect()
    };
    let mut warnings = Vec::new();
    let mut unless = |keys: Vec<String>, applies: bool, only: &str| {
        if !keys.is_empty() && !applies {
            let verb = if keys.len() == 1 { "applies" } else { "apply" };
            warnings.push(format!("{} {verb} to {only} only", keys.join(" and ")));
        }
    };
    unless(chosen(&["lr_cycles"]), t.lr_scheduler == LrScheduler::CosineWithRestarts, "`lr_scheduler: cosine_with_restarts`");
    unless(chosen(&["lr_power", "lr_end"]), t.lr_scheduler == LrScheduler::Polynomial, "`lr_scheduler: polynomial`");
    // diffusers' `constant` has no warm-up (`constant_with_warmup` has).
    unless(chosen(&["lr_warmup_steps"]), t.lr_scheduler != LrScheduler::Constant, "schedulers with a warm-up (not `constant`)");
    unless(
        chosen(&["lora_rank", "lora_alpha", "lora_text_encoder_rank", "lora_text_encoder_alpha", "lora_layers"]),
        t.use_lora,
        "LoRA runs (`use_lora: true`)",
    );
    unless(chosen(&["ema_decay"]), t.use_ema, "runs with `use_ema: true`");
    unless(chosen(&["unmasked_weight"]), t.masked_loss, "runs with `masked_loss: true`");
    // Only a fully trained text encoder has normalization layers that could move
    // (its steps are the ratio's share, rounded up: any ratio above 0 trains it).
    let full_text_encoder = t.text_encoder_train_ratio > 0.0 && !t.use_lora && !t.train_imagic_only;
    unless(chosen(&["freeze_clip_normalization"]), full_text_encoder, "runs that fine-tune the text encoder's weights");
    warnings
}

/// The warnings `config` and its instance images settle, before any class image
/// is made. `device` is where the run trains.
pub(super) fn early_warnings(config: &RunConfig, run_dir: &std::path::Path, instance_images: usize, device: tch::Device) -> Vec<String> {
    let t = &config.training;
    let chosen_by_user = keys_chosen_by_user(config);
    // A resumed run whose source was replaced since it started.
    let mut warnings = crate::run::source::changed_since_start(run_dir, config);
    for (i, c) in config.concepts.iter().enumerate() {
        let dirs = [(Some(&c.instance_data_dir), "instance_data_dir"), (c.class_data_dir.as_ref(), "class_data_dir")];
        for (dir, key) in dirs {
            warnings.extend(dir.and_then(|d| skipped_files_note(d, &format!("concepts[{i}].{key}"))));
        }
    }
    if config.device == "auto" && device == tch::Device::Cpu {
        if let Some(why) = crate::device::unusable_gpu() {
            warnings.push(format!("`device: auto` trains on the CPU, because {why}"));
        }
    }
    if t.train_imagic_only {
        if instance_images > 1 {
            warnings.push(format!(
                "Imagic trains on a single image: only the first of the {instance_images} images of concepts[0] is used"
            ));
        }
        if t.text_encoder_train_ratio > 0.0 {
            warnings.push("Imagic optimises the prompt embedding, not the text encoder: `text_encoder_train_ratio` does not apply to it".into());
        }
        if chosen_by_user.contains("text_encoder_learning_rate") {
            warnings.push("Imagic optimises the prompt embedding, not the text encoder: `text_encoder_learning_rate` does not apply to it".into());
        }
        if t.mixed_precision != MixedPrecision::No {
            warnings.push("Imagic trains in float32: `mixed_precision` does not apply to it".into());
        }
        // Imagic's stages take one sample of the one image a step, with the paper's plain loss.
        let unused: Vec<String> = ["batch_size", "gradient_accumulation_steps", "offset_noise", "min_snr_gamma",
            "random_flip", "aspect_ratio_bucketing", "shuffle_tags", "masked_loss"]
            .into_iter()
            .filter(|key| chosen_by_user.contains(*key))
            .map(|key| format!("`{key}`"))
            .collect();
        if !unused.is_empty() {
            warnings.push(format!(
                "Imagic trains on one sample of one image a step with the paper's loss: {} {} not apply to it",
                unused.join(", "),
                if unused.len() == 1 { "does" } else { "do" }
            ));
        }
        warnings.extend(settings_without_effect(t, &chosen_by_user));
        if config.concepts.iter().any(|c| !c.class_prompt.trim().is_empty()) {
            warnings.push("Imagic has no prior preservation: the class prompt is not used and no class images are made".into());
        }
        return warnings;
    }
    warnings.extend(settings_without_effect(t, &chosen_by_user));
    warnings.extend(crate::data::masks::warnings(config));
    if chosen_by_user.contains("text_encoder_learning_rate") && t.text_encoder_train_ratio <= 0.0 {
        warnings.push("`text_encoder_learning_rate` is set but the text encoder does not train (`text_encoder_train_ratio` is 0)".into());
    }
    warnings
}

impl Trainer {
    pub(super) fn describe_plan(&mut self) {
        let t = self.config.training.clone();
        let images = self.data.instances.len() as u64;
        if let Some(plan) = self.imagic_plan {
            self.log.line(&format!(
                "Imagic: {} embedding steps, then {} UNet steps on one image, target text {:?}",
                plan.embedding_steps, plan.unet_steps, self.data.instances[0].prompt
            ));
            return;
        }
        // Previews are drawn with the training's reach; a cut one would mislead.
        let previews: Vec<String> = self.config.concepts.iter().flat_map(super::samples::sample_prompts).collect();
        for prompt in previews {
            let what = format!("the preview prompt {prompt:?}");
            if let Some(warning) = self.sd.cut_prompt_warning(&what, &prompt, "`training.max_token_length: 150` or 225") {
                self.warn(&warning);
            }
        }
        let frames = self.data.frame_counts();
        if frames.len() > 1 {
            let list: Vec<String> =
                frames.iter().map(|((w, h), i, c)| format!("{w}×{h}: {i} instance, {c} class")).collect();
            self.log.line(&format!("aspect-ratio buckets (width×height: images): {}", list.join("; ")));
        }
        let unpaired = self.data.instances_without_class_frame();
        if unpaired > 0 {
            self.warn(&format!(
                "{unpaired} instance images have no class image in their aspect-ratio bucket and train without the prior term; \
                 add class images of those shapes, or point class_data_dir at an empty folder to have them generated in every bucket"
            ));
        }
        let per_step = u64::from(t.batch_size) * u64::from(t.gradient_accumulation_steps);
        // Every frame's images fill whole batches, and those fill whole steps.
        let uneven = frames.iter().any(|(_, i, _)| !(*i as u64).is_multiple_of(u64::from(t.batch_size.max(1))))
            || !self.batches_per_epoch.is_multiple_of(u64::from(t.gradient_accumulation_steps.max(1)));
        if uneven {
            let what = if frames.len() > 1 {
                format!("the {images} instance images fall into {} aspect-ratio buckets, batched apart, that are not all multiples of batch_size × gradient_accumulation_steps = {per_step}", frames.len())
            } else {
                format!("{images} instance images are not a multiple of batch_size × gradient_accumulation_steps = {per_step}")
            };
            let left_over = u64::from(t.steps_per_image) * self.batches_per_epoch - self.total_steps * u64::from(t.gradient_accumulation_steps);
            self.warn(&format!(
                "{what}: {} is smaller{}{}",
                if frames.len() > 1 { "each bucket's last batch of an epoch" } else { "the last batch of each epoch" },
                if t.gradient_accumulation_steps > 1 { " and accumulation carries across epoch boundaries" } else { "" },
                if left_over > 0 { format!(", and {left_over} left-over micro-batches at the end are not trained") } else { String::new() }
            ));
        }
        if t.masked_loss {
            let masked = self.data.instances.iter().filter(|e| e.mask.is_some()).count();
            self.log.line(&format!(
                "masked loss: {masked} of {images} instance images have a mask (the rest and the class images count every pixel); unmasked_weight {}",
                t.unmasked_weight
            ));
        }
        self.check_disk_room();
        let class_count: usize = self.data.classes.iter().map(Vec::len).sum();
        let text_encoder_lr = if self.text_encoder_steps > 0 && t.text_encoder_lr() != t.learning_rate {
            format!(" at learning rate {:e}", t.text_encoder_lr())
        } else {
            String::new()
        };
        // With several processes the batch is per process; steps count global batches.
        let world = crate::dist::world_size();
        let batch = match world {
            1 => format!("{}", t.batch_size),
            _ => format!("{} per process × {world} processes = {}", t.batch_size, t.batch_size as usize * world),
        };
        self.log.line(&format!(
            "{} instance images, {} class images, {} epochs, {} steps (batch {batch}, accumulation {}); text encoder trains for {} steps{}",
            images, class_count, t.steps_per_image, self.total_steps, t.gradient_accumulation_steps, self.text_encoder_steps,
            text_encoder_lr
        ));
    }

    /// Logs what the checkpoints will take on disk, and warns when the run
    /// directory's file system has less free.
    fn check_disk_room(&mut self) {
        use crate::run::disk;
        let t = &self.config.training;
        let each = self.checkpoint_bytes();
        let saves = disk::checkpoint_saves(u64::from(t.steps_per_image), t.save_model_every_n_epochs);
        let at_once = disk::checkpoints_on_disk(saves, t.keep_last_checkpoints);
        // Checkpoints already written (a resumed run) are part of what stays.
        let written = ckpt::list_checkpoints(&self.run_dir).len() as u64;
        let to_write = at_once.saturating_sub(written.min(at_once));
        let needed = to_write * each;
        self.log.line(&format!("each checkpoint takes about {}; up to {at_once} on disk at once", disk::size(each)));
        let free = disk::free_bytes(&self.run_dir);
        if let Some(warning) = free.and_then(|free| disk::shortfall_warning(needed, each, at_once, free, &self.run_dir)) {
            self.warn(&warning);
        }
    }
}
