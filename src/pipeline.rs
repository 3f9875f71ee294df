//! Text-to-image sampling: previews, class images and `generate`.

use std::path::Path;

use crate::cli::GenerateArgs;

pub fn generate_command(_args: &GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("generate is not available in this build yet")
}

pub fn demo_command(_dir: &Path) -> anyhow::Result<()> {
    anyhow::bail!("demo is not available in this build yet")
}
