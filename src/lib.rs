//! dreambooth: DreamBooth fine-tuning of Stable Diffusion on libtorch.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod conditioning;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod error;
pub mod model;
pub mod pipeline;
pub mod rng;
pub mod run;
pub mod scheduler;
pub mod tokenizer;
pub mod train;
pub mod tui;
pub mod vram;
