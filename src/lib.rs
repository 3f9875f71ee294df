//! dreambooth: DreamBooth fine-tuning of Stable Diffusion on libtorch.

pub mod checkpoint;
pub mod cli;
pub mod device;
pub mod error;
pub mod model;
pub mod pipeline;
pub mod scheduler;
pub mod tokenizer;
