//! Stable Diffusion's networks as tch modules whose fields spell checkpoint keys.

pub mod attention;
pub mod checkpointing;
pub mod clip;
pub mod config;
pub mod family;
pub mod init;
pub mod lora;
pub mod lora_names;
pub mod nn;
pub mod resnet;
pub mod unet;
pub mod vae;
pub mod weights;
