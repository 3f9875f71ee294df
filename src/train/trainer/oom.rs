//! Out-of-memory recovery: a step that runs out of memory while its
//! micro-batches run forward and backward is retried with the micro-batch
//! split (halved where it divides) and gradient accumulation multiplied by the
//! same factor, so the effective batch stays what the user asked for, as the
//! AUTOMATIC1111 extension does. The new sizes go into the run's config.yaml,
//! so `resume` keeps them.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use tch::Tensor;

use super::Trainer;
use crate::data::dataset::DataState;
use crate::run::events::Event;

/// The smaller micro-batch to retry with and the factor accumulation grows
/// by: the largest divisor of `batch` no more than half of it (4 → 2, 6 → 3,
/// 3 → 1), so batch × accumulation is unchanged. None at 1.
pub fn split_micro_batch(batch: u32) -> Option<(u32, u32)> {
    if batch <= 1 {
        return None;
    }
    let smaller = (1..=batch / 2).rev().find(|d| batch.is_multiple_of(*d)).unwrap_or(1);
    Some((smaller, batch / smaller))
}

/// Micro-batches counted at one batch size, converted to another's count:
/// whole epochs stay whole, the current epoch's progress scales by `factor`
/// (at most to the epoch's last micro-batch, with buckets whose batches do
/// not split evenly).
pub fn rescale_micro_batches(micro_batches: u64, old_per_epoch: u64, new_per_epoch: u64, factor: u64) -> u64 {
    let (old_per_epoch, new_per_epoch) = (old_per_epoch.max(1), new_per_epoch.max(1));
    let epochs = micro_batches / old_per_epoch;
    let within = (micro_batches % old_per_epoch) * factor;
    epochs * new_per_epoch + within.min(new_per_epoch - 1)
}

/// What a step changes before its optimizer update: restored before a retry.
struct StepStart {
    data_state: DataState,
    noise_rng: Tensor,
    data_rng: Tensor,
    micro_batches: u64,
}

impl Trainer {
    /// `queue_train_step`, retried with a smaller micro-batch after an
    /// out-of-memory in the micro-batches (not in the update, which may have
    /// changed some weights already, nor with `fused_backward`, which updates
    /// inside the backward pass and cannot accumulate).
    pub(super) fn train_step_recovering(&mut self) -> anyhow::Result<Tensor> {
        loop {
            let start = StepStart {
                data_state: self.data_state.clone(),
                noise_rng: self.noise_rng.state(),
                data_rng: self.data_rng.state(),
                micro_batches: self.micro_batches,
            };
            self.updating = false;
            // A failed step drops its captured graphs while unwinding; a fused one
            // also its hooks and the optimizer it held (so it is known from here).
            let graphs_on = self.graphs.is_some();
            let fused = self.fused.is_some();
            let payload = match catch_unwind(AssertUnwindSafe(|| self.queue_train_step())) {
                Ok(result) => return result,
                Err(payload) => payload,
            };
            let message = crate::error::torch_failure(&crate::error::panic_text(payload.as_ref()));
            let out_of_memory = message.as_deref().is_some_and(crate::error::is_out_of_memory);
            let split = split_micro_batch(self.config.training.batch_size);
            // With several processes the others are waiting in a collective: one
            // rank cannot change the batch alone.
            let alone = crate::dist::world_size() == 1;
            let (Some(message), true, Some((smaller, factor)), false, false, true) =
                (message, out_of_memory, split, self.updating, fused, alone)
            else {
                resume_unwind(payload);
            };
            self.restore_step_start(start)?;
            self.split_micro_batch(smaller, factor, &message)?;
            // Captured graphs hold the old micro-batch's shapes: captured anew.
            self.graphs = None;
            if graphs_on {
                self.start_cuda_graphs();
            }
        }
    }

    fn restore_step_start(&mut self, start: StepStart) -> anyhow::Result<()> {
        self.data_state = start.data_state;
        self.noise_rng.set_state(&start.noise_rng)?;
        self.data_rng.set_state(&start.data_rng)?;
        self.micro_batches = start.micro_batches;
        // The failed attempt's partial sums must not reach the retried step.
        self.optimizer.zero_grad();
        crate::device::release_cached_memory(self.device);
        Ok(())
    }

    /// Batch ÷ `factor`, accumulation × `factor`; the epoch count, the plan
    /// and config.yaml follow. Said in the log, the events and the dashboard.
    fn split_micro_batch(&mut self, smaller: u32, factor: u32, why: &str) -> anyhow::Result<()> {
        let t = &mut self.config.training;
        let (old_batch, old_accumulation) = (t.batch_size, t.gradient_accumulation_steps.max(1));
        t.batch_size = smaller;
        t.gradient_accumulation_steps = old_accumulation * factor;
        let new_per_epoch = self.data.batches_per_epoch(super::global_batch(t));
        self.micro_batches =
            rescale_micro_batches(self.micro_batches, self.batches_per_epoch, new_per_epoch, u64::from(factor));
        self.batches_per_epoch = new_per_epoch;
        let planned = self.total_steps;
        self.replan_total_steps();
        let config_path = self.run_dir.join("config.yaml");
        let yaml = serde_yaml::to_string(&self.config)?;
        crate::checkpoint::write::write_atomically(&config_path, |out| Ok(std::io::Write::write_all(out, yaml.as_bytes())?))?;
        let (batch, accumulation) = (self.config.training.batch_size, self.config.training.gradient_accumulation_steps);
        let total = if planned == self.total_steps {
            String::new()
        } else {
            format!("; the run now has {} steps instead of {planned} (its buckets batch differently)", self.total_steps)
        };
        self.warn(&format!(
            "out of memory at step {} ({why}): retrying with batch_size {} × gradient_accumulation_steps {} \
             instead of {old_batch} × {old_accumulation}, the same effective batch (written to config.yaml){total}",
            self.step + 1,
            batch,
            accumulation,
        ));
        self.events.write(&Event::named(
            "micro_batch_split",
            serde_json::json!({
                "step": self.step,
                "batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "total_steps": self.total_steps,
                "reason": why,
            }),
        ))?;
        Ok(())
    }
}

impl Trainer {
    /// The step count, LR schedule and text-encoder phase for the current
    /// batch size and accumulation (they change together, so the total
    /// changes only where buckets do not split evenly).
    fn replan_total_steps(&mut self) {
        let t = &self.config.training;
        let total = super::total_steps(t.steps_per_image, self.batches_per_epoch, t.gradient_accumulation_steps);
        if total != self.total_steps {
            self.total_steps = total;
            self.lr_schedule.total_steps = total;
            self.text_encoder_steps = crate::train::modules::text_encoder_steps(t, total);
        }
    }

    /// A checkpoint written before the micro-batch was split, read by a run
    /// whose config.yaml has the split sizes: its micro-batch count in the new
    /// size's units.
    pub(super) fn adopt_checkpoint_batch_size(&mut self, checkpoint_batch: Option<u32>) {
        let batch = self.config.training.batch_size.max(1);
        let Some(old) = checkpoint_batch.filter(|&b| b != batch && b > 0) else { return };
        let old_per_epoch = self.data.batches_per_epoch(old * crate::dist::world_size() as u32);
        let factor = u64::from(old.div_ceil(batch));
        self.micro_batches = rescale_micro_batches(self.micro_batches, old_per_epoch, self.batches_per_epoch, factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_keep_the_effective_batch() {
        assert_eq!(split_micro_batch(1), None);
        assert_eq!(split_micro_batch(2), Some((1, 2)));
        assert_eq!(split_micro_batch(4), Some((2, 2)));
        assert_eq!(split_micro_batch(6), Some((3, 2)));
        assert_eq!(split_micro_batch(3), Some((1, 3)));
        assert_eq!(split_micro_batch(9), Some((3, 3)));
    }

    #[test]
    fn micro_batches_keep_their_epoch() {
        // 3 epochs of 5 batches and 2 into the 4th; at half the batch: 10 a epoch.
        assert_eq!(rescale_micro_batches(17, 5, 10, 2), 34);
        // Buckets that do not split evenly: 4 a epoch become 7; progress stays inside the epoch.
        assert_eq!(rescale_micro_batches(4 + 3, 4, 7, 2), 7 + 6);
        assert_eq!(rescale_micro_batches(0, 4, 7, 2), 0);
    }
}
