//! `dreambooth bench`: training speed and peak memory as one JSON line.

use std::path::Path;

pub fn bench_command(_model: &Path, _config: Option<&Path>, _steps: Option<u64>, _device: Option<&str>) -> anyhow::Result<()> {
    anyhow::bail!("bench is not available in this build yet")
}
