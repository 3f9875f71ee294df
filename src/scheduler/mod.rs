//! Noise schedules: the training schedule and the samplers.

pub mod config;
