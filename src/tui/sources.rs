//! What the wizard offers, from the rest of the program: checkpoints found on
//! disk. Presets with VRAM estimates and the GPU probe come with the estimator.

use std::path::PathBuf;

use crate::checkpoint::models::scan;
use crate::config::RunConfig;
use crate::tui::widgets::format_gib;
use crate::tui::wizard::{GpuInfo, ModelChoice, PresetChoice, Sources};

/// Looks in the working directory and `./models`.
pub struct DiskSources {
    pub dirs: Vec<PathBuf>,
}

impl Default for DiskSources {
    fn default() -> Self {
        DiskSources { dirs: vec![PathBuf::from("."), PathBuf::from("models")] }
    }
}

impl Sources for DiskSources {
    fn models(&self) -> Vec<ModelChoice> {
        scan(&self.dirs)
            .into_iter()
            .filter_map(|m| {
                let architecture = m.architecture.ok()?.to_string();
                Some(ModelChoice {
                    path: m.path.display().to_string(),
                    architecture,
                    size: format_gib(m.size_bytes),
                    format: m.format.to_string(),
                })
            })
            .collect()
    }

    fn presets(&self, _config: &RunConfig) -> Vec<PresetChoice> {
        Vec::new()
    }

    fn gpu(&self) -> Option<GpuInfo> {
        None
    }
}
