//! VRAM estimator and NVML probe.

use std::path::Path;

pub fn vram_command(_config: &Path) -> anyhow::Result<()> {
    anyhow::bail!("the VRAM estimator is not available in this build yet")
}

pub fn presets_command() -> anyhow::Result<()> {
    anyhow::bail!("the preset list is not available in this build yet")
}
