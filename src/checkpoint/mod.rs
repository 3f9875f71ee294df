//! Reading the model files people have: diffusers folders, LDM single files, .ckpt.

use std::path::PathBuf;

pub fn models_command(_dirs: &[PathBuf]) -> anyhow::Result<()> {
    anyhow::bail!("models is not available in this build yet")
}
