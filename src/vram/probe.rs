//! The GPU as the driver reports it, through NVML. No driver, no NVML library or
//! no device all mean "no GPU": the caller then plans for the CPU. Nothing here
//! fails or panics.

/// The first GPU's name and memory.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuMemory {
    pub name: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// Device 0, or `None` without a usable NVIDIA driver.
pub fn probe() -> Option<GpuMemory> {
    // A broken driver install can make NVML panic rather than return an error;
    // catching it keeps "no GPU" the only outcome.
    std::panic::catch_unwind(|| {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let device = nvml.device_by_index(0).ok()?;
        let memory = device.memory_info().ok()?;
        Some(GpuMemory {
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
            total_bytes: memory.total,
            used_bytes: memory.used,
        })
    })
    .ok()
    .flatten()
}
