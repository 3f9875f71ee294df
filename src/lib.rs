//! dreambooth: DreamBooth fine-tuning of Stable Diffusion on libtorch.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod model;
pub mod pipeline;
pub mod run;
pub mod scheduler;
pub mod tokenizer;
pub mod train;
pub mod tui;
