//! The per-step records (events.jsonl, train.log, the progress bar). On CUDA a
//! step's loss is read only once the next step is queued
//! (`Trainer::defer_loss_readback`): its record waits as a `PendingStep`, and
//! whatever else writes events flushes it first, so the log keeps its order.

use std::io::Write;
use std::time::Instant;

use tch::Tensor;

use super::Trainer;
use crate::run::events::{now, Event, StepRecord};

/// A step done on the device whose record waits for its loss.
pub(super) struct PendingStep {
    pub(super) step: u64,
    pub(super) epoch: u64,
    pub(super) lr: f64,
    /// 0-d float32 on the training device.
    pub(super) loss: Tensor,
    pub(super) started: Instant,
}

impl Trainer {
    /// Writes the record of the step just done (its loss already read).
    pub(super) fn record_step(&mut self, loss: f64, seconds: f64) -> anyhow::Result<()> {
        self.flush_step_record()?;
        self.write_step_record(self.step, self.epochs_done(), loss, self.last_lr, seconds)
    }

    /// Reads the pending step's loss (waiting for the device) and writes its
    /// record. Everything else that writes events calls this first, so the
    /// records stay in order.
    pub(super) fn flush_step_record(&mut self) -> anyhow::Result<()> {
        let Some(p) = self.pending_step.take() else {
            return Ok(());
        };
        let loss = p.loss.double_value(&[]);
        // Deferred, the previous record was written while this step ran: the
        // time between the two records is this step's (the CPU ran ahead).
        let since = match self.last_record_at {
            Some(t) if t > p.started => t,
            _ => p.started,
        };
        self.write_step_record(p.step, p.epoch, loss, p.lr, since.elapsed().as_secs_f64())
    }

    fn write_step_record(&mut self, step: u64, epoch: u64, loss: f64, lr: f64, seconds: f64) -> anyhow::Result<()> {
        self.last_record_at = Some(Instant::now());
        let record = StepRecord {
            step,
            epoch,
            loss,
            lr,
            it_s: if seconds > 0.0 { 1.0 / seconds } else { 0.0 },
            vram_bytes: crate::device::memory_in_use(self.device).0,
            time: now(),
        };
        self.events.write(&Event::Step(record.clone()))?;
        // Several processes: each rank's memory, when the step gathered it.
        if let Some(memory) = self.rank_memory.take() {
            self.events.write(&Event::named("ranks", serde_json::json!({ "step": step, "memory_bytes": memory })))?;
        }
        let line = format!(
            "step {}/{} epoch {} loss {:.6} lr {:.3e} {:.2} it/s",
            record.step, self.total_steps, record.epoch, record.loss, record.lr, record.it_s
        );
        let _ = writeln!(self.log.file, "{line}");
        // Quiet (detached) runs have stdout on train.log already: one line, not two.
        if self.options.plain && !self.options.quiet {
            println!("{line}");
        } else if let Some(bar) = &self.progress {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        }
        Ok(())
    }

}
