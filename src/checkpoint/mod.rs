//! Reading the model files people have: diffusers folders, LDM single files, .ckpt.

use std::path::PathBuf;

pub mod ckpt;
pub mod pickle;
pub mod safetensors_file;
pub mod source;

pub fn models_command(_dirs: &[PathBuf]) -> anyhow::Result<()> {
    anyhow::bail!("models is not available in this build yet")
}
