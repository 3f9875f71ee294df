//! Training: LR schedules, optimizers, the loop.

pub mod lr_schedule;
pub mod adamw;
