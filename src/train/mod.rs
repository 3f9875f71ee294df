//! Training: LR schedules, optimizers, the step, precision, the loop.

pub mod lr_schedule;
pub mod adamw;
pub mod adamw8bit;
pub mod foreach;
pub mod fused;
pub mod cuda_graph;
pub mod commands;
pub mod optimizer;
pub mod imagic;
pub mod precision;
pub mod step;
pub mod checkpoint;
pub mod ema;
pub mod modules;
pub mod trainer;
pub mod export;
