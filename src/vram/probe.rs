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
        memory_of(&nvml.device_by_index(0).ok()?)
    })
    .ok()
    .flatten()
}

/// The GPU that CUDA calls device `index`, or `None` where it cannot be told
/// (no driver; a MIG slice, whose memory NVML does not give per process).
/// `CUDA_VISIBLE_DEVICES` renumbers the devices CUDA sees: its `index`-th entry
/// is an NVML index or a GPU's UUID. Without it CUDA's order is taken to be
/// NVML's (the PCI order, as on machines of one kind of card).
pub fn probe_cuda(index: usize) -> Option<GpuMemory> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let entry = match &visible {
        Some(list) => Some(list.split(',').map(str::trim).nth(index)?.to_string()),
        None => None,
    };
    std::panic::catch_unwind(|| {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let device = match entry.as_deref() {
            None => nvml.device_by_index(index as u32).ok()?,
            Some(e) if e.starts_with("GPU-") => nvml.device_by_uuid(e).ok()?,
            Some(e) => nvml.device_by_index(e.parse::<u32>().ok()?).ok()?,
        };
        memory_of(&device)
    })
    .ok()
    .flatten()
}

/// What NVML says of one device's memory.
fn memory_of(device: &nvml_wrapper::Device) -> Option<GpuMemory> {
    let memory = device.memory_info().ok()?;
    Some(GpuMemory {
        name: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
        total_bytes: memory.total,
        used_bytes: memory.used,
    })
}

/// The NVIDIA driver's version ("535.104.05") and the newest CUDA it supports
/// (12.2 as 12020), or `None` without a driver.
pub fn driver_versions() -> Option<(String, i32)> {
    std::panic::catch_unwind(|| {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        Some((nvml.sys_driver_version().ok()?, nvml.sys_cuda_driver_version().ok()?))
    })
    .ok()
    .flatten()
}

/// Samples the first GPU's busy share while it lives: NVML's utilisation, the
/// share of each sample period (1/6 s to 1 s) in which a kernel ran. Well under
/// 100 % while training means the GPU waits for the CPU to queue work.
pub struct BusySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u32>>,
}

impl BusySampler {
    /// `None` without a usable NVIDIA driver.
    pub fn start() -> Option<BusySampler> {
        probe()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let read = std::panic::catch_unwind(|| nvml_wrapper::Nvml::init().ok()).ok().flatten();
            let Some(nvml) = read else { return samples };
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let busy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    nvml.device_by_index(0).ok()?.utilization_rates().ok().map(|u| u.gpu)
                }));
                if let Ok(Some(percent)) = busy {
                    samples.push(percent);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            samples
        });
        Some(BusySampler { stop, thread })
    }

    /// The mean of the samples taken (`None` when there were none).
    pub fn finish(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.thread.join().ok()?;
        (!samples.is_empty()).then(|| samples.iter().map(|&s| f64::from(s)).sum::<f64>() / samples.len() as f64)
    }
}
