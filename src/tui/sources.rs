//! What the wizard offers, from the rest of the program: checkpoints found on
//! disk, the built-in presets with the estimated peak of this run under each,
//! and the GPU NVML reports.

use std::path::PathBuf;

use crate::checkpoint::models::scan;
use crate::config::RunConfig;
use crate::tui::widgets::format_gib;
use crate::vram::{probe, rate_presets, ModelShapes};
use crate::tui::wizard::{GpuInfo, ModelChoice, PresetChoice, Sources};

/// Looks in the working directory, `./models`, and where AUTOMATIC1111, ComfyUI
/// and the Hugging Face cache keep models on a rented machine.
pub struct DiskSources {
    pub dirs: Vec<PathBuf>,
}

impl Default for DiskSources {
    fn default() -> Self {
        DiskSources { dirs: crate::checkpoint::models::default_model_dirs() }
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

    /// Each preset's estimate for the chosen model; SD 1.5 shapes when its
    /// header cannot be read (the wizard validated the path already).
    fn presets(&self, config: &RunConfig) -> Vec<PresetChoice> {
        let shapes = ModelShapes::for_run(config).unwrap_or_else(|_| ModelShapes::sd15());
        rate_presets(config, &shapes)
            .into_iter()
            .map(|(name, estimated_bytes)| PresetChoice { name, estimated_bytes })
            .collect()
    }

    fn gpu(&self) -> Option<GpuInfo> {
        probe().map(|g| GpuInfo { name: g.name, total_bytes: g.total_bytes, unusable: crate::device::unusable_gpu() })
    }
}
