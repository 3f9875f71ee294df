//! `train_imagic_only`: Imagic's two training stages inside the trainer, with the
//! normal loop's events, controls, previews and checkpoints. On one image (the
//! first of concepts[0]) with its instance prompt as the target text:
//! (a) optimise the prompt embedding with the UNet frozen, (b) fine-tune the UNet
//! with that embedding fixed. Previews sample the interpolation
//! η·e_tgt + (1−η)·e_opt; checkpoints add `imagic_embeddings.safetensors`, and
//! their state the encoded image and stage (a)'s optimiser, so a stopped or
//! killed Imagic run resumes exactly like any other.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tch::{Device, Tensor};

use super::{clip_grad_norm, Outcome, Trainer};
use crate::config::schema::Training;
use crate::rng::set_grad_to_none;
use crate::run::events::Event;
use crate::train::imagic::{self, Denoiser, EmbeddingOptimization, ImagicSettings};

/// η of the previews: the paper's usual edit strength.
pub const PREVIEW_ETA: f64 = 0.7;

/// How many steps each stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagicPlan {
    pub embedding_steps: u64,
    pub unet_steps: u64,
}

impl ImagicPlan {
    /// Stage (b) runs `steps_per_image` UNet steps (the one image's epochs) at the
    /// config's learning rate. Stage (a) keeps the paper's proportion: its 500
    /// embedding steps per 1000 UNet steps, so half as many (at least one), at the
    /// paper's fixed embedding learning rate 1e-3.
    pub fn from_training(t: &Training) -> ImagicPlan {
        let paper = ImagicSettings::default();
        let unet_steps = u64::from(t.steps_per_image).max(1);
        let embedding_steps = (unet_steps * paper.embedding_steps as u64).div_ceil(paper.unet_steps as u64).max(1);
        ImagicPlan { embedding_steps, unet_steps }
    }

    /// Steps of both stages.
    pub fn total(&self) -> u64 {
        self.embedding_steps + self.unet_steps
    }

    pub fn embedding_lr() -> f64 {
        ImagicSettings::default().embedding_lr
    }

    /// For the start event.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "embedding_steps": self.embedding_steps,
            "embedding_lr": Self::embedding_lr(),
            "unet_steps": self.unet_steps,
            "preview_eta": PREVIEW_ETA,
        })
    }
}

/// Keys of Imagic's resume state in a checkpoint's state.safetensors: the
/// encoded image (its posterior sample drew from the noise generator, so it is
/// kept rather than drawn again) and, during stage (a), the embedding
/// optimisation (embeddings and Adam moments) with its step count.
const LATENTS_KEY: &str = "imagic.latents";
const STAGE_A_PREFIX: &str = "imagic.stage_a.";
const STAGE_A_STEP_KEY: &str = "imagic.stage_a_step";

/// Where an Imagic run stands: what a checkpoint must hold to continue it.
pub(super) struct ImagicProgress {
    pub latents: Tensor,
    /// Stage (a)'s optimisation while it runs; None once stage (b) began.
    pub embedding: Option<EmbeddingOptimization>,
}

impl ImagicProgress {
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(LATENTS_KEY.to_string(), self.latents.shallow_clone())];
        if let Some(stage) = &self.embedding {
            out.extend(stage.state_tensors().into_iter().map(|(k, t)| (format!("{STAGE_A_PREFIX}{k}"), t)));
            out.push((STAGE_A_STEP_KEY.to_string(), Tensor::from(stage.steps_taken() as i64)));
        }
        out
    }

    /// The progress a checkpoint's state tensors saved at `step`, on `device`
    /// (`what`: the state file, for errors).
    pub fn from_state(
        tensors: &HashMap<String, Tensor>,
        plan: ImagicPlan,
        step: u64,
        device: Device,
        what: &Path,
    ) -> anyhow::Result<ImagicProgress> {
        let latents = tensors.get(LATENTS_KEY).with_context(|| format!("{} has no `{LATENTS_KEY}`", what.display()))?;
        let embedding = if step < plan.embedding_steps {
            let stage_a: HashMap<String, Tensor> = tensors
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(STAGE_A_PREFIX).map(|k| (k.to_string(), t.to_device(device))))
                .collect();
            let taken = tensors
                .get(STAGE_A_STEP_KEY)
                .with_context(|| format!("{} has no `{STAGE_A_STEP_KEY}`", what.display()))?
                .int64_value(&[]) as u64;
            let stage = EmbeddingOptimization::load_state(&stage_a, taken).with_context(|| what.display().to_string())?;
            Some(stage)
        } else {
            None
        };
        Ok(ImagicProgress { latents: latents.to_device(device), embedding })
    }
}

impl Trainer {
    /// Runs both stages to the end (or until stopped), from the start or from
    /// where a resumed checkpoint left them.
    pub(super) fn run_imagic(&mut self) -> anyhow::Result<Outcome> {
        let plan = self.imagic_plan.context("run_imagic without an Imagic plan")?;
        let t = self.config.training.clone();
        if self.imagic_progress.is_none() {
            let example = self.data.instances.iter().find(|e| e.concept == 0).context("concepts[0] has no image")?;
            let (pixels, prompt) = (example.pixels.unsqueeze(0), example.prompt.clone());
            let vae_device = self.params.vae.first().map(|(_, p)| p.device()).unwrap_or(self.device);
            let scaling = self.sd.vae_config.scaling_factor;
            let latents = imagic::encode_latents(&self.sd.vae, scaling, &pixels.to_device(vae_device), &mut self.noise_rng)
                .to_device(self.device);
            let target = tch::no_grad(|| self.sd.encode_prompt(&prompt, t.clip_skip)).hidden;
            let stage = EmbeddingOptimization::new(&target);
            self.imagic = Some((stage.target.shallow_clone(), stage.optimized()));
            self.imagic_progress = Some(ImagicProgress { latents, embedding: Some(stage) });
        }
        let latents = self.imagic_progress.as_ref().map(|p| p.latents.shallow_clone()).context("Imagic latents")?;

        // (a) The UNet stays frozen while the embedding moves.
        if self.step < plan.embedding_steps {
            self.set_unet_training(false);
            self.stage_event("embedding", plan.embedding_steps)?;
            let lr = ImagicPlan::embedding_lr();
            while self.step < plan.embedding_steps {
                if self.poll_controls()? {
                    return self.stop();
                }
                let started = Instant::now();
                let progress = self.imagic_progress.as_mut().context("Imagic progress")?;
                let stage = progress.embedding.as_mut().context("Imagic stage (a) state")?;
                let loss = {
                    let denoiser = Denoiser::new(&self.sd.unet, &self.schedule, &self.sd.scheduler_config)?;
                    stage.step(&denoiser, &latents, lr, &mut self.noise_rng)
                };
                self.imagic = Some((stage.target.shallow_clone(), stage.optimized()));
                self.step += 1;
                self.last_lr = lr;
                self.record_step(loss, started.elapsed().as_secs_f64())?;
            }
        }
        // Stage (a) is over: its optimiser is no longer part of the state.
        if let Some(progress) = &mut self.imagic_progress {
            progress.embedding = None;
        }
        let optimized = self.imagic.as_ref().map(|(_, o)| o.shallow_clone()).context("Imagic embeddings")?;

        // (b) The UNet learns to reconstruct the image from e_opt.
        self.set_unet_training(true);
        self.stage_event("unet", plan.unet_steps)?;
        for k in self.step - plan.embedding_steps..plan.unet_steps {
            if self.poll_controls()? {
                return self.stop();
            }
            let started = Instant::now();
            let lr = self.lr_schedule.lr_at(k);
            self.optimizer.zero_grad();
            let loss = {
                let denoiser = Denoiser::new(&self.sd.unet, &self.schedule, &self.sd.scheduler_config)?;
                denoiser.loss(&latents, &optimized, &mut self.noise_rng)
            };
            loss.backward();
            if t.max_grad_norm > 0.0 {
                clip_grad_norm(self.optimizer.params(), t.max_grad_norm);
            }
            self.optimizer.step(lr);
            if let Some(ema) = &mut self.ema {
                ema.update(&self.params.unet);
            }
            self.step += 1;
            self.micro_batches += 1;
            self.last_lr = lr;
            self.record_step(loss.double_value(&[]), started.elapsed().as_secs_f64())?;
            // Each UNet step is an epoch of the one image: previews, checkpoints and pauses as in DreamBooth.
            if self.end_of_epoch(k + 1)? {
                return self.stop();
            }
        }
        self.set_unet_training(false);
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        if self.last_sample_step != Some(self.step) && t.save_preview_every_n_epochs > 0 {
            self.previews()?;
        }
        self.checkpoint()?;
        self.events.write(&Event::named("done", serde_json::json!({ "step": self.step })))?;
        self.events.sync()?;
        self.log.line(&format!("done: Imagic, {} steps in {}", self.step, self.run_dir.display()));
        Ok(Outcome::Finished)
    }

    /// Restores Imagic's embeddings and stage state from checkpoint `dir`.
    pub(super) fn load_imagic_checkpoint(&mut self, dir: &Path, state: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let Some(plan) = self.imagic_plan else { return Ok(()) };
        let path = dir.join(crate::train::checkpoint::IMAGIC_FILE);
        let (target, optimized, _) = imagic::load_embeddings(&path)?;
        self.imagic = Some((target.to_device(self.device), optimized.to_device(self.device)));
        let what = dir.join("state.safetensors");
        self.imagic_progress = Some(ImagicProgress::from_state(state, plan, self.step, self.device, &what)?);
        Ok(())
    }

    /// Gradients on (stage b) or off (stage a, sampling) for the UNet's trained tensors.
    fn set_unet_training(&mut self, on: bool) {
        for (_, p) in self.optimizer.params() {
            if !on {
                set_grad_to_none(p);
            }
            let _ = p.shallow_clone().requires_grad_(on);
        }
    }

    fn stage_event(&mut self, stage: &str, steps: u64) -> anyhow::Result<()> {
        self.events.write(&Event::named("imagic_stage", serde_json::json!({ "step": self.step, "stage": stage, "steps": steps })))?;
        self.log.line(&format!("Imagic stage {stage}: {steps} steps"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_a_keeps_the_papers_proportion() {
        let plan = |steps_per_image| ImagicPlan::from_training(&Training { steps_per_image, ..Training::default() });
        assert_eq!(plan(1000), ImagicPlan { embedding_steps: 500, unet_steps: 1000 });
        assert_eq!(plan(3), ImagicPlan { embedding_steps: 2, unet_steps: 3 });
    }
}

