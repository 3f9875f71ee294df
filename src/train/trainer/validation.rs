//! Validation loss (`training.validate_every_n_epochs`), as kohya's trainers
//! measure it: the denoising loss of images the run does not train on — each
//! concept's held-out photos (`concepts[].validation_data_dir`) with its
//! instance prompt, and with prior preservation a fixed few of the class images
//! the source model made before training, with their class prompts (a language-
//! drift signal) — at `validation_timesteps` fixed timesteps spread evenly over
//! the schedule (kohya's linspace without its ends: 200, 400, 600, 800 of 1000),
//! with noise drawn once from generators of its own, and averaged over images and
//! timesteps. Every pass sees the same latents, noise and timesteps, so the
//! values follow only the weights: a falling curve that turns up is the model
//! starting to reproduce the training photos instead of the subject.
//!
//! A pass never changes training: it runs without gradients, under the run's
//! autocast, on the weights previews use (the EMA's when kept, copied back
//! after); it never draws from the trainer's noise or data generators, never
//! fills the frozen text encoders' cache, and gives back the VAE's place.
//! The plain MSE against the model's target is measured (no offset noise, no
//! min-SNR weighting: the loss at each timestep as it is), on the posterior mean
//! of each image's latents. With `masked_loss`, a held-out photo whose file name
//! has a mask in its concept's `mask_dir` is weighted by it as training weights
//! its photos (kohya validates with the training loss, masks included); class
//! images, as in training, count every pixel.

use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use super::{move_parameters, Trainer};
use crate::conditioning::{PromptEmbeds, SizeIds};
use crate::config::schema::RunConfig;
use crate::data::buckets::Buckets;
use crate::data::dataset;
use crate::data::images::{list_images, load_rgb};
use crate::data::masks::{self, MaskFolder};
use crate::error::usage;
use crate::rng::CpuRng;
use crate::run::events::Event;
use crate::train::step::{denoising_loss, ExampleWeights, LossInputs};

/// Class images of a concept measured for drift: its first ones, in file order.
pub const CLASS_IMAGES: usize = 4;

/// Where the validation generators' seeds start from the run's `seed` (apart
/// from the trainer's own generators, seed and seed + 1 and + 2).
const SEED_OFFSET: u64 = 1 << 20;

/// The fixed timesteps: `n` spread evenly over `0..num_train_timesteps` without
/// the ends, as kohya's `np.linspace(0, T, n + 2, dtype=int)[1:-1]`.
pub fn spread_timesteps(n: u32, num_train_timesteps: i64) -> Vec<i64> {
    let n = i64::from(n.max(1));
    (1..=n).map(|k| (k * num_train_timesteps / (n + 1)).min(num_train_timesteps - 1)).collect()
}

/// The config's validation settings checked before anything is written: the
/// held-out folders exist and hold images that decode, and there is something
/// to validate on.
pub fn check(config: &RunConfig) -> anyhow::Result<()> {
    if config.training.validate_every_n_epochs == 0 {
        return Ok(());
    }
    for (i, c) in config.concepts.iter().enumerate() {
        let Some(dir) = &c.validation_data_dir else { continue };
        let what = format!("concepts[{i}].validation_data_dir");
        let files = list_images(dir, &what)?;
        if files.is_empty() {
            return Err(usage(format!(
                "{what} {} holds no images ({})",
                dir.display(),
                crate::data::images::IMAGE_EXTENSIONS.join(", ")
            )));
        }
        for f in &files {
            load_rgb(&f.path)?;
        }
    }
    let anything = config
        .concepts
        .iter()
        .any(|c| c.validation_data_dir.is_some() || c.validation_split > 0.0 || !c.class_prompt.trim().is_empty());
    if !anything && !config.training.train_imagic_only {
        return Err(usage(
            "`training.validate_every_n_epochs` is set but no concept has a `validation_data_dir` or `validation_split` (held-out photos) \
             or a `class_prompt` (class images): there is nothing to validate on",
        ));
    }
    Ok(())
}

/// What a run validates on and when it last did.
#[derive(Default)]
pub(super) struct Validation {
    /// Filled at the first pass.
    sets: Option<Vec<Set>>,
    timesteps: Vec<i64>,
    /// The step of the last pass.
    last_step: Option<u64>,
}

/// One concept's held-out photos, or its class images.
struct Set {
    concept: usize,
    class: bool,
    items: Vec<Item>,
}

struct Item {
    /// `[1, C, h, w]`, scaled, float32 on the training device.
    latents: Tensor,
    ids: Vec<i64>,
    sizes: SizeIds,
    /// One `[1, C, h, w]` draw per timestep, on the training device.
    noise: Vec<Tensor>,
    /// `masked_loss`: a held-out photo's mask as loss weights `[1, 1, h, w]`
    /// on the training device, as training weights its photos (data/masks.rs).
    weights: Option<Tensor>,
}

/// The losses of one pass: per set, the mean over its images and timesteps.
struct Pass {
    sets: Vec<(usize, bool, usize, f64)>,
    /// Held-out photos pooled, and per timestep; class images pooled.
    held_out: Option<f64>,
    per_timestep: Vec<f64>,
    class: Option<f64>,
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

impl Trainer {
    fn validation_on(&self) -> bool {
        self.config.training.validate_every_n_epochs > 0 && self.imagic_plan.is_none()
    }

    /// Logs what validation will measure, and settings that make it measure nothing.
    pub(super) fn describe_validation(&mut self) {
        let t = self.config.training.clone();
        let held_out: Vec<usize> = (0..self.config.concepts.len())
            .filter(|&i| self.config.concepts[i].validation_data_dir.is_some() || self.config.concepts[i].validation_split > 0.0)
            .collect();
        if t.validate_every_n_epochs == 0 {
            if self.config.concepts.iter().any(|c| c.validation_split > 0.0) {
                self.warn(
                    "validation_split holds photos out of training but `training.validate_every_n_epochs` is 0: they are neither trained on nor measured",
                );
            } else if !held_out.is_empty() {
                self.log.line(
                    "validation_data_dir is set but `training.validate_every_n_epochs` is 0: no validation loss is measured",
                );
            }
            return;
        }
        if self.imagic_plan.is_some() {
            self.log.line(
                "`training.validate_every_n_epochs` does not apply to Imagic, which trains on one image: no validation loss is measured",
            );
            return;
        }
        for &i in &held_out {
            let c = &self.config.concepts[i];
            let held = c.validation_data_dir.as_deref().and_then(|d| d.canonicalize().ok());
            if held.is_some() && held == c.instance_data_dir.canonicalize().ok() {
                self.warn(&format!(
                    "concepts[{i}].validation_data_dir is its instance_data_dir: those photos are trained on, so their loss is not a held-out one"
                ));
            }
        }
        match crate::data::holdout::held_out_paths(&self.config) {
            Ok(split) => {
                for (i, paths) in split {
                    let names: Vec<String> =
                        paths.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
                    self.log.line(&format!("concept {} holds out of training for validation: {}", i + 1, names.join(", ")));
                }
            }
            Err(e) => self.warn(&crate::error::one_line(&e)),
        }
        let timesteps = spread_timesteps(t.validation_timesteps, self.schedule.num_train_timesteps());
        let mut what: Vec<String> = held_out.iter().map(|i| format!("concept {}'s held-out photos", i + 1)).collect();
        for (c, classes) in self.data.classes.iter().enumerate().filter(|(_, k)| !k.is_empty()) {
            what.push(format!("{} of concept {}'s class images", classes.len().min(CLASS_IMAGES), c + 1));
        }
        let list: Vec<String> = timesteps.iter().map(i64::to_string).collect();
        self.log.line(&format!(
            "validation every {} epochs and at the start and end: {} at timesteps {}",
            t.validate_every_n_epochs,
            what.join(", "),
            list.join(", ")
        ));
    }

    /// The baseline before the first step (the source model's loss).
    pub(super) fn validate_before_training(&mut self) -> anyhow::Result<()> {
        if self.validation_on() && self.step == 0 {
            self.validate()?;
        }
        Ok(())
    }

    /// Epoch `epoch` ended: a pass when it is a multiple of `validate_every_n_epochs`,
    /// or the run's last (before its final checkpoint, so a finished run has it).
    pub(super) fn validate_if_due(&mut self, epoch: u64) -> anyhow::Result<()> {
        let every = u64::from(self.config.training.validate_every_n_epochs);
        let due = epoch.is_multiple_of(every) || self.step >= self.total_steps;
        if self.validation_on() && due && self.validation.last_step != Some(self.step) {
            self.validate()?;
        }
        Ok(())
    }

    /// The run's last step (where it ends inside an epoch): a pass unless one was made there.
    pub(super) fn validate_at_end(&mut self) -> anyhow::Result<()> {
        if self.validation_on() && self.validation.last_step != Some(self.step) {
            self.validate()?;
        }
        Ok(())
    }

    /// One validation pass at the current step: a `validation` event and a log line.
    fn validate(&mut self) -> anyhow::Result<()> {
        self.flush_step_record()?;
        // Rank 0 of several measures and reports the held-out loss.
        if !crate::dist::is_writer() {
            return Ok(());
        }
        let started = Instant::now();
        if self.validation.sets.is_none() {
            self.validation.timesteps =
                spread_timesteps(self.config.training.validation_timesteps, self.schedule.num_train_timesteps());
            let sets = self.validation_sets()?;
            self.validation.sets = Some(sets);
        }
        let pass = self.with_preview_weights(|t| t.validation_pass());
        self.validation.last_step = Some(self.step);
        let seconds = started.elapsed().as_secs_f64();
        let concepts = |class: bool| -> Vec<serde_json::Value> {
            pass.sets
                .iter()
                .filter(|s| s.1 == class)
                .map(|&(concept, _, images, loss)| serde_json::json!({ "concept": concept, "loss": loss, "images": images }))
                .collect()
        };
        let mut fields = serde_json::json!({ "step": self.step, "epoch": self.epochs_done() });
        let map = fields.as_object_mut().context("a JSON object")?;
        if let Some(loss) = pass.held_out {
            map.insert("loss".into(), serde_json::json!(loss));
            map.insert("concepts".into(), serde_json::json!(concepts(false)));
        }
        if let Some(loss) = pass.class {
            map.insert("class_loss".into(), serde_json::json!(loss));
            map.insert("class_concepts".into(), serde_json::json!(concepts(true)));
        }
        map.insert("timesteps".into(), serde_json::json!(self.validation.timesteps));
        if pass.held_out.is_some() {
            map.insert("timestep_losses".into(), serde_json::json!(pass.per_timestep));
        }
        map.insert("seconds".into(), serde_json::json!(seconds));
        self.events.write(&Event::named("validation", fields))?;
        let mut parts = Vec::new();
        let several = self.config.concepts.len() > 1;
        for (class, pooled, name) in [(false, pass.held_out, "loss"), (true, pass.class, "class images")] {
            let Some(pooled) = pooled else { continue };
            let mut part = format!("{name} {pooled:.6}");
            if several {
                let each: Vec<String> = pass
                    .sets
                    .iter()
                    .filter(|s| s.1 == class)
                    .map(|&(c, _, _, l)| format!("concept {} {l:.6}", c + 1))
                    .collect();
                part.push_str(&format!(" ({})", each.join(", ")));
            }
            parts.push(part);
        }
        self.log.line(&format!(
            "validation at step {} (epoch {}): {} · {seconds:.2} s",
            self.step,
            self.epochs_done(),
            parts.join(" · ")
        ));
        Ok(())
    }

    /// Runs `f` on the weights previews and exports use: the EMA's, when kept,
    /// copied into the UNet and the trained ones copied back after.
    fn with_preview_weights<T>(&mut self, f: impl FnOnce(&Self) -> T) -> T {
        let _guard = tch::no_grad_guard();
        let raw = self.ema.as_ref().map(|ema| {
            let backup: Vec<Tensor> = self.params.unet.iter().map(|(_, p)| p.detach().copy()).collect();
            for ((_, p), (_, s)) in self.params.unet.iter().zip(&ema.shadow) {
                p.shallow_clone().copy_(s);
            }
            backup
        });
        let out = f(self);
        if let Some(backup) = raw {
            for ((_, p), b) in self.params.unet.iter().zip(&backup) {
                p.shallow_clone().copy_(b);
            }
        }
        out
    }

    /// Loads the held-out photos, takes the class images, encodes their latents
    /// (the VAE brought to the device for it when it was moved off) and draws
    /// their noise.
    fn validation_sets(&mut self) -> anyhow::Result<Vec<Set>> {
        let _guard = tch::no_grad_guard();
        let vae_device = self.params.vae.first().map_or(self.device, |(_, p)| p.device());
        let moved = vae_device != self.device;
        if moved {
            move_parameters(&self.params.vae, self.device);
        }
        let sets = self.encode_validation_sets();
        if moved {
            move_parameters(&self.params.vae, vae_device);
        }
        sets
    }

    fn encode_validation_sets(&self) -> anyhow::Result<Vec<Set>> {
        let device = self.device;
        let scaling = self.sd.vae_config.scaling_factor;
        let encode = |pixels: &Tensor| self.sd.vae.encode(&pixels.unsqueeze(0).to_device(device)).mean.to_kind(Kind::Float) * scaling;
        let buckets = Buckets::for_run(&self.config, self.sd.size_multiple());
        let mut sets = Vec::new();
        for (c, concept) in self.config.concepts.iter().enumerate() {
            // Held-out photos: a folder of their own, else the concept's split.
            let files = match (&concept.validation_data_dir, concept.validation_split > 0.0) {
                (Some(dir), _) => list_images(dir, &format!("concepts[{c}].validation_data_dir"))?,
                (None, true) => {
                    crate::data::holdout::split_photos(concept, c, self.config.seed, &format!("concepts[{c}].instance_data_dir"))?.1
                }
                (None, false) => continue,
            };
            // Masked training is measured masked: a held-out photo's mask is the
            // one of its file name in the concept's mask_dir (kohya validates
            // with the training loss, masks included).
            let masks = match (&concept.mask_dir, self.config.training.masked_loss) {
                (Some(dir), true) => Some(MaskFolder::read(dir, &format!("concepts[{c}].mask_dir"))?),
                _ => None,
            };
            let examples =
                dataset::load_files_with_masks(files, |f| dataset::instance_prompt(concept, f), c, &buckets, masks.as_ref())?;
            let items = examples
                .iter()
                .map(|e| {
                    let latents = encode(&e.pixels);
                    let size = latents.size();
                    let weights = e.mask.as_ref().map(|m| {
                        let w = masks::loss_weights([(Some(m), false)], (size[2], size[3]), self.config.training.unmasked_weight);
                        w.to_device(device)
                    });
                    (latents, self.sd.text.tokenize(&e.prompt), e.size_ids(false), weights)
                })
                .collect();
            sets.push(self.draw_noise_for(c, false, items));
        }
        for (c, classes) in self.data.classes.iter().enumerate() {
            if classes.is_empty() {
                continue;
            }
            let items = classes
                .iter()
                .take(CLASS_IMAGES)
                .map(|e| {
                    let latents = match &e.cached {
                        Some([(mean, _), _]) => mean.to_device(device).to_kind(Kind::Float) * scaling,
                        None => encode(&e.pixels),
                    };
                    (latents, e.ids.clone(), e.size_ids(false), None)
                })
                .collect();
            sets.push(self.draw_noise_for(c, true, items));
        }
        Ok(sets)
    }

    /// A set with each image's noise, one draw per timestep from the set's own generator.
    fn draw_noise_for(&self, concept: usize, class: bool, items: Vec<(Tensor, Vec<i64>, SizeIds, Option<Tensor>)>) -> Set {
        let seed = self.config.seed.wrapping_add(SEED_OFFSET + 2 * concept as u64 + u64::from(class));
        self.draw_noise_seeded(seed, concept, class, items)
    }

    fn draw_noise_seeded(&self, seed: u64, concept: usize, class: bool, items: Vec<(Tensor, Vec<i64>, SizeIds, Option<Tensor>)>) -> Set {
        let mut rng = CpuRng::new(seed);
        let items = items
            .into_iter()
            .map(|(latents, ids, sizes, weights)| {
                let noise = self
                    .validation
                    .timesteps
                    .iter()
                    .map(|_| crate::device::upload(&rng.randn(&latents.size()), self.device))
                    .collect();
                Item { latents, ids, sizes, noise, weights }
            })
            .collect();
        Set { concept, class, items }
    }

    /// The loss of each row of `chunk` ((image, timestep) pairs of `set`, one
    /// latent shape), in one UNet call under the run's autocast.
    fn chunk_losses(&self, set: &Set, states: &[PromptEmbeds], chunk: &[(usize, usize)]) -> Vec<f64> {
        let each = |f: &dyn Fn(usize, usize) -> Tensor| chunk.iter().map(|&(i, k)| f(i, k)).collect::<Vec<_>>();
        let latents = Tensor::cat(&each(&|i, _| set.items[i].latents.shallow_clone()), 0);
        let noise = Tensor::cat(&each(&|i, k| set.items[i].noise[k].shallow_clone()), 0);
        let timesteps: Vec<i64> = chunk.iter().map(|&(_, k)| self.validation.timesteps[k]).collect();
        let timesteps = crate::device::upload(&Tensor::from_slice(&timesteps), self.device);
        let text = PromptEmbeds::cat(&chunk.iter().map(|&(i, _)| states[i].shallow_clone()).collect::<Vec<_>>());
        let sizes: Vec<SizeIds> = chunk.iter().map(|&(i, _)| set.items[i].sizes).collect();
        let time_ids = crate::device::upload(&SizeIds::tensor(&sizes), self.device);
        let conditioning = self.sd.text.conditioning_with_ids(&text, &time_ids);
        let coefficients = ExampleWeights::all_instance(chunk.len()).coefficients_tensor();
        let inputs =
            LossInputs { latents: &latents, noise: &noise, timesteps: &timesteps, conditioning: &conditioning, coefficients: &coefficients };
        let precision = self.precision;
        let out = denoising_loss(&self.sd.unet, &self.schedule, self.prediction, 0.0, &inputs, &|f| precision.autocast(f));
        let squared = (&out.model_pred - &out.target).square();
        // Photos without a mask weigh 1 everywhere; a set without masks skips the product.
        let squared = if chunk.iter().any(|&(i, _)| set.items[i].weights.is_some()) {
            let weight = |i: usize| match &set.items[i].weights {
                Some(w) => w.shallow_clone(),
                None => set.items[i].latents.ones_like().narrow(1, 0, 1),
            };
            squared * Tensor::cat(&each(&|i, _| weight(i)), 0)
        } else {
            squared
        };
        let per_row = squared.mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        Vec::<f64>::try_from(&per_row.to_kind(Kind::Double).to_device(Device::Cpu)).expect("a 1-d float64 tensor")
    }

    /// The loss of every (image, timestep) pair of `set` under the current
    /// weights, as (timestep index, loss), in batches no larger than a training
    /// micro-batch.
    fn set_losses(&self, set: &Set) -> Vec<(usize, f64)> {
        let t = &self.config.training;
        let rows_max = t.batch_size.max(1) as usize * if self.data.has_prior() { 2 } else { 1 };
        let te_training = self.text_encoder_training() && t.text_encoder_train_ratio > 0.0;
        let precision = self.precision;
        // Each prompt encoded once a pass, as the training step encodes it.
        let states: Vec<PromptEmbeds> = set
            .items
            .iter()
            .map(|item| {
                let ids = crate::device::upload(&Tensor::from_slice(&item.ids).view([1, -1]), self.device);
                if te_training {
                    precision.autocast(|| self.sd.text.encode_ids(&ids, t.clip_skip)).map(|s| s.to_kind(Kind::Float))
                } else {
                    self.sd.text.encode_ids(&ids, t.clip_skip)
                }
            })
            .collect();
        let rows: Vec<(usize, usize)> =
            (0..set.items.len()).flat_map(|i| (0..self.validation.timesteps.len()).map(move |k| (i, k))).collect();
        let mut out = Vec::with_capacity(rows.len());
        let mut start = 0;
        while start < rows.len() {
            let shape = set.items[rows[start].0].latents.size();
            let mut end = start + 1;
            while end < rows.len() && end - start < rows_max && set.items[rows[end].0].latents.size() == shape {
                end += 1;
            }
            let chunk = &rows[start..end];
            let values = self.chunk_losses(set, &states, chunk);
            out.extend(chunk.iter().zip(values).map(|(&(_, k), v)| (k, v)));
            start = end;
        }
        out
    }

    /// The denoising loss of the images in `dir` (each with `prompt_of` it),
    /// measured as a validation pass measures held-out photos (the same fixed
    /// timesteps, noise from a generator seeded with `seed`), under the current
    /// weights; for comparing a model before and after training (the demo's
    /// summary). Changes nothing training uses.
    pub fn loss_on_folder(
        &mut self,
        dir: &std::path::Path,
        prompt_of: impl Fn(&crate::data::images::ImageFile) -> String,
        seed: u64,
    ) -> anyhow::Result<f64> {
        let _guard = tch::no_grad_guard();
        if self.validation.timesteps.is_empty() {
            self.validation.timesteps =
                spread_timesteps(self.config.training.validation_timesteps, self.schedule.num_train_timesteps());
        }
        let vae_device = self.params.vae.first().map_or(self.device, |(_, p)| p.device());
        let moved = vae_device != self.device;
        if moved {
            move_parameters(&self.params.vae, self.device);
        }
        let buckets = Buckets::for_run(&self.config, self.sd.size_multiple());
        let examples = dataset::load_folder(dir, &dir.display().to_string(), prompt_of, 0, &buckets, None);
        let items: Option<Vec<_>> = examples.as_ref().ok().map(|examples| {
            examples
                .iter()
                .map(|e| {
                    let latents = self.sd.vae.encode(&e.pixels.unsqueeze(0).to_device(self.device)).mean.to_kind(Kind::Float)
                        * self.sd.vae_config.scaling_factor;
                    // Unmasked: a folder measured as a whole (the demo's pictures).
                    (latents, self.sd.text.tokenize(&e.prompt), e.size_ids(false), None)
                })
                .collect()
        });
        if moved {
            move_parameters(&self.params.vae, vae_device);
        }
        examples?;
        let set = self.draw_noise_seeded(seed, 0, false, items.unwrap_or_default());
        if set.items.is_empty() {
            return Err(usage(format!("{} holds no images to measure a loss on", dir.display())));
        }
        let rows = self.with_preview_weights(|t| t.set_losses(&set));
        let losses: Vec<f64> = rows.iter().map(|&(_, v)| v).collect();
        Ok(mean(&losses).unwrap_or(f64::NAN))
    }

    /// The losses of every set under the current weights, each (image, timestep)
    /// pair a row, in batches no larger than a training micro-batch.
    fn validation_pass(&self) -> Pass {
        let sets = self.validation.sets.as_deref().unwrap_or_default();
        let timesteps = &self.validation.timesteps;
        let mut out = Pass { sets: Vec::new(), held_out: None, per_timestep: Vec::new(), class: None };
        let (mut held_out, mut class) = (Vec::new(), Vec::new());
        let mut per_timestep = vec![Vec::new(); timesteps.len()];
        for set in sets {
            let rows = self.set_losses(set);
            if !set.class {
                for &(k, v) in &rows {
                    per_timestep[k].push(v);
                }
            }
            let losses: Vec<f64> = rows.iter().map(|&(_, v)| v).collect();
            let set_mean = mean(&losses).unwrap_or(f64::NAN);
            out.sets.push((set.concept, set.class, set.items.len(), set_mean));
            if set.class { class.extend(losses) } else { held_out.extend(losses) }
        }
        out.held_out = mean(&held_out);
        out.class = mean(&class);
        if out.held_out.is_some() {
            out.per_timestep = per_timestep.iter().map(|v| mean(v).unwrap_or(f64::NAN)).collect();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::spread_timesteps;

    #[test]
    fn timesteps_are_kohyas_linspace_without_its_ends() {
        assert_eq!(spread_timesteps(4, 1000), [200, 400, 600, 800]);
        assert_eq!(spread_timesteps(2, 1000), [333, 666]);
        assert_eq!(spread_timesteps(5, 1000), [166, 333, 500, 666, 833]);
        assert_eq!(spread_timesteps(1, 1000), [500]);
        assert!(spread_timesteps(100, 1000).iter().all(|&t| (0..1000).contains(&t)));
    }
}
