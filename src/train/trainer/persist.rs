//! The trainer's checkpoints: everything a bit-identical resume needs (weights,
//! optimizer, LR schedule, loss scaler, RNGs, data order, Imagic's stage),
//! written atomically into checkpoints/step-NNNNNN/ and read back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::Tensor;

use super::Trainer;
use crate::run::events::Event;
use crate::train::checkpoint::{self as ckpt, CheckpointContents, TrainState};

impl Trainer {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.optimizer.state_tensors().into_iter().map(|(k, t)| (format!("optimizer.{k}"), t)).collect();
        out.push(("rng.noise".into(), self.noise_rng.state()));
        out.push(("rng.data".into(), self.data_rng.state()));
        if let Some(progress) = &self.imagic_progress {
            out.extend(progress.state_tensors());
        }
        out
    }

    /// Bytes one checkpoint takes: the weights it holds (UNet and text encoder
    /// of a full run, or the LoRA adapters), the EMA, and the optimizer's
    /// state, as `checkpoint` writes them.
    pub fn checkpoint_bytes(&self) -> u64 {
        let bytes = |v: &[(String, Tensor)]| -> u64 { v.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum() };
        let weights = match &self.lora {
            Some(lora) => bytes(&lora.trainable()),
            None => {
                let text =
                    if self.text_encoder_steps > 0 { self.params.text_encoders.iter().map(|(_, list)| bytes(list)).sum() } else { 0 };
                bytes(&self.params.unet) + text
            }
        };
        let ema = self.ema.as_ref().map_or(0, |e| bytes(&e.shadow));
        let kind = self.optimizer.kind();
        let optimizer: u64 =
            self.optimizer.params().iter().map(|(_, p)| crate::train::optimizer::Optimizer::state_bytes_for(kind, p.numel() as i64)).sum();
        weights + ema + optimizer
    }

    /// Writes a checkpoint of the current step (once per step); returns its folder.
    pub fn checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        self.flush_step_record()?;
        let dir = self.run_dir.join("checkpoints").join(ckpt::step_dir_name(self.step));
        if self.last_checkpoint_step == Some(self.step) && dir.is_dir() {
            return Ok(dir);
        }
        // Every rank holds the same weights and state: rank 0 alone writes them.
        if !crate::dist::is_writer() {
            self.last_checkpoint_step = Some(self.step);
            return Ok(dir);
        }
        let state = TrainState {
            step: self.step,
            total_steps: self.total_steps,
            optimizer_step: self.optimizer.step_count(),
            micro_batches: self.micro_batches,
            data: self.data_state.clone(),
            loss_scaler: self.scaler.as_ref().map(|s| (s.scale, s.growth_tracker)),
            ema_step: self.ema.as_ref().map(|e| e.optimization_step),
            lr: self.last_lr,
            batch_size: Some(self.config.training.batch_size),
            world_size: crate::dist::world_size(),
        };
        let copy = |v: &[(String, Tensor)]| v.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect::<Vec<_>>();
        let full = self.lora.is_none();
        let contents = CheckpointContents {
            unet: full.then(|| copy(&self.params.unet)),
            text_encoders: if full && self.text_encoder_steps > 0 {
                self.params.text_encoders.iter().map(|(name, list)| (*name, copy(list))).collect()
            } else {
                Vec::new()
            },
            lora: self.lora.as_ref(),
            ema_unet: self.ema.as_ref().map(|e| copy(&e.shadow)),
            imagic: self.imagic.as_ref().map(|(target, optimized)| (target, optimized, self.config.concepts[0].instance_prompt.as_str())),
            state_tensors: self.state_tensors(),
            state: &state,
        };
        let path = ckpt::write_checkpoint(&self.run_dir, &contents)?;
        ckpt::prune_checkpoints(&self.run_dir, self.config.training.keep_last_checkpoints);
        self.last_checkpoint_step = Some(self.step);
        let rel = path.strip_prefix(&self.run_dir).unwrap_or(&path).display().to_string();
        self.events.write(&Event::named("checkpoint", serde_json::json!({ "step": self.step, "path": rel })))?;
        self.events.sync()?;
        self.log.line(&format!("checkpoint {}", path.display()));
        Ok(path)
    }

    /// Restores the checkpoint in `dir`, made when the run had `expected_total`
    /// steps (the run's own total, unless `resume` is extending it).
    pub(super) fn load_checkpoint(&mut self, dir: &Path, expected_total: u64) -> anyhow::Result<()> {
        let state = ckpt::read_state(dir)?;
        if let Some(lora) = &self.lora {
            // The adapters attached at start are overwritten in place: the optimizer holds them.
            let path = dir.join(ckpt::LORA_FILE);
            ckpt::load_into(&lora.trainable(), &ckpt::read_tensors(&path)?, &path)?;
        } else {
            let unet_path = dir.join("unet.safetensors");
            ckpt::load_into(&self.params.unet, &ckpt::read_tensors(&unet_path)?, &unet_path)?;
        }
        for (name, list) in &self.params.text_encoders {
            let te_path = dir.join(format!("{name}.safetensors"));
            if te_path.is_file() {
                ckpt::load_into(list, &ckpt::read_tensors(&te_path)?, &te_path)?;
                self.frozen_text_states.clear();
            }
        }
        if let Some(ema) = &mut self.ema {
            let path = dir.join("ema_unet.safetensors");
            ckpt::load_into(&ema.shadow, &ckpt::read_tensors(&path)?, &path)?;
            ema.optimization_step = state.ema_step.unwrap_or(0);
        }
        let state_path = dir.join("state.safetensors");
        let tensors = ckpt::read_tensors(&state_path)?;
        let optimizer: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("optimizer.").map(|k| (k.to_string(), t.shallow_clone())))
            .collect();
        self.optimizer.load_state(&optimizer, state.optimizer_step).with_context(|| format!("{}", state_path.display()))?;
        let rng = |name: &str| {
            tensors.get(name).ok_or_else(|| anyhow::anyhow!("{} has no `{name}`", state_path.display()))
        };
        self.noise_rng.set_state(rng("rng.noise")?)?;
        self.data_rng.set_state(rng("rng.data")?)?;
        // Another world size re-plans the steps for the new global batch (below).
        let world = crate::dist::world_size();
        let same_world = state.world_size == world;
        // A checkpoint from before an out-of-memory split the micro-batch was
        // planned at the old size: its total need not match (trainer/oom.rs).
        let same_batch = state.batch_size.is_none_or(|b| b == self.config.training.batch_size);
        if same_world && same_batch && state.total_steps != expected_total {
            anyhow::bail!(
                "{}: the checkpoint was made for {} steps but the run now has {} (did the images or config change?)",
                dir.display(),
                state.total_steps,
                expected_total
            );
        }
        self.step = state.step;
        self.micro_batches = state.micro_batches;
        if same_world {
            self.adopt_checkpoint_batch_size(state.batch_size);
        } else {
            let old_global = state.batch_size.unwrap_or(self.config.training.batch_size).max(1) as u64 * state.world_size.max(1) as u64;
            self.adopt_checkpoint_world_size(old_global, state.world_size);
        }
        self.data_state = state.data;
        self.last_lr = state.lr;
        if let (Some(s), Some((scale, tracker))) = (&mut self.scaler, state.loss_scaler) {
            s.scale = scale;
            s.growth_tracker = tracker;
        }
        self.load_imagic_checkpoint(dir, &tensors)?;
        self.last_checkpoint_step = Some(self.step);
        Ok(())
    }
}

impl Trainer {
    /// A checkpoint of another world size: its whole epochs stay whole and the
    /// epoch under way keeps its place in the data order (the instance images'
    /// shuffled order and position are per epoch, not per batch), so the run goes
    /// on with the same next images in global batches of the new size; the step
    /// count and learning-rate schedule are those of the new global batch, from
    /// the step that many micro-batches make.
    fn adopt_checkpoint_world_size(&mut self, old_global: u64, old_world: usize) {
        let accumulation = u64::from(self.config.training.gradient_accumulation_steps.max(1));
        let old_per_epoch = self.data.batches_per_epoch(old_global as u32).max(1);
        let new_global = super::global_batch(&self.config.training) as u64;
        let new_per_epoch = self.batches_per_epoch.max(1);
        let epochs = self.micro_batches / old_per_epoch;
        let within = (self.micro_batches % old_per_epoch) * old_global / new_global.max(1);
        let micro_batches = epochs * new_per_epoch + within.min(new_per_epoch - 1);
        // Resume on a step boundary of the new plan.
        self.micro_batches = micro_batches - micro_batches % accumulation;
        let old_step = self.step;
        self.step = self.micro_batches / accumulation;
        self.log.line(&format!(
            "resuming with {} processes where the checkpoint had {old_world}: its step {old_step} of global batch {old_global} \
             (epoch {epochs} and its place in the data order) is step {} of global batch {new_global}; steps re-planned for the new batch",
            crate::dist::world_size(),
            self.step
        ));
    }
}
