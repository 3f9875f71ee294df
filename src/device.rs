//! Device selection for `--device cpu|cuda|cuda:N|auto`.

use tch::Device;

use crate::error::usage;

pub fn parse_device(name: &str, from_config: bool) -> anyhow::Result<Device> {
    // Errors name where the choice came from: the flag or the config key.
    let asked = if from_config { format!("`device: {name}`") } else { format!("--device {name}") };
    let no_cuda = || match unusable_gpu() {
        Some(why) => usage(format!("{asked} was asked for but {why}")),
        None => usage(format!("{asked} was asked for but no CUDA device is available (auto or cpu trains on the CPU)")),
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(no_cuda())
            }
        }
        other => {
            if let Some(n) = other.strip_prefix("cuda:") {
                let n: usize = n.parse().map_err(|_| usage(format!("{asked}: the CUDA index is not a number")))?;
                if !tch::Cuda::is_available() {
                    return Err(no_cuda());
                }
                let count = tch::Cuda::device_count() as usize;
                if n >= count {
                    return Err(usage(format!("{asked}: there are only {count} CUDA devices")));
                }
                Ok(Device::Cuda(n))
            } else {
                Err(usage(format!("{asked} is not one of cpu, cuda, cuda:N, auto")))
            }
        }
    }
}

/// Why an NVIDIA GPU that the driver reports is out of libtorch's reach, or `None`
/// (no GPU, or CUDA works). On a rented machine this is most often a driver older
/// than the CUDA that PyTorch's wheels are built for: `auto` then trains on the
/// CPU, which at SD sizes takes days, so it is said loudly.
pub fn unusable_gpu() -> Option<String> {
    if tch::Cuda::is_available() {
        return None;
    }
    // GPUs hidden on purpose (`CUDA_VISIBLE_DEVICES=` or -1) are not a fault.
    if std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| v.trim().is_empty() || v.trim() == "-1") {
        return None;
    }
    let gpu = crate::vram::probe()?;
    Some(unusable_gpu_sentence(&gpu.name, crate::vram::probe::driver_versions(), libtorch_cuda()))
}

/// The CUDA runtime this libtorch was built with (13000 for PyPI's 2.11.0), 0
/// when it has none. The runtime's own version needs no driver to read.
fn libtorch_cuda() -> i64 {
    // A libtorch without CUDA throws instead of answering (a panic message on stderr).
    if !cfg!(libtorch_cuda) {
        return 0;
    }
    std::panic::catch_unwind(tch::utils::version_cudart).unwrap_or(0)
}

/// The oldest Linux driver of each CUDA major version (NVIDIA's release notes;
/// later minor versions run on it through minor-version compatibility).
fn oldest_driver(cuda_major: i64) -> Option<&'static str> {
    match cuda_major {
        11 => Some("450"),
        12 => Some("525"),
        13 => Some("580"),
        _ => None,
    }
}

fn unusable_gpu_sentence(name: &str, driver: Option<(String, i32)>, libtorch_cuda: i64) -> String {
    let cuda = |v: i64| format!("{}.{}", v / 1000, (v % 1000) / 10);
    let see = "(README, \"A GPU the trainer does not use\")";
    match driver {
        _ if libtorch_cuda <= 0 => format!("the {name} is out of libtorch's reach: this libtorch is built without CUDA {see}"),
        Some((version, supported)) if i64::from(supported) / 1000 < libtorch_cuda / 1000 => {
            let update = oldest_driver(libtorch_cuda / 1000).map_or(String::new(), |d| format!(" to {d} or newer"));
            format!(
                "the {name} is out of libtorch's reach: its driver {version} supports CUDA {} and this libtorch is built \
                 for CUDA {}; update the driver{update}, or build against a torch 2.11.0 for CUDA {} {see}",
                cuda(i64::from(supported)),
                cuda(libtorch_cuda),
                cuda(i64::from(supported))
            )
        }
        Some((version, _)) => format!(
            "the {name} (driver {version}) is out of libtorch's reach: its CUDA {} libraries do not load or see no device {see}",
            cuda(libtorch_cuda)
        ),
        None => format!("the {name} is out of libtorch's reach {see}"),
    }
}

/// libtorch's CPU tensors come from glibc malloc, which hands every block above
/// its mmap threshold straight back to the kernel on free; sampling and training
/// allocate the same large buffers (attention scores, activations) every step, so
/// each step page-faults them in again: on a 2-core box that was more system time
/// than compute (64×64 tiny-model generate: 18 s sys → 0.5 s). Keeping freed memory
/// in the heap makes the allocator reuse it. Peak memory is unchanged; it is just
/// not returned to the kernel between steps.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_MMAP_MAX = 0: no block is served by its own mmap; M_TRIM_THRESHOLD: never trim.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The CUDA caching allocator's figures for one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct CudaMemory {
    pub allocated: i64,
    pub allocated_peak: i64,
    pub reserved: i64,
    pub reserved_peak: i64,
}

mod ffi {
    extern "C" {
        pub fn dbt_cuda_memory(device: i32, allocated: *mut i64, allocated_peak: *mut i64, reserved: *mut i64, reserved_peak: *mut i64) -> i32;
        pub fn dbt_cuda_reset_peak(device: i32) -> i32;
        pub fn dbt_pin_memory(t: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
        pub fn dbt_cuda_empty_cache() -> i32;
    }
}

/// Allocator figures for `device` (what torch.cuda.memory_allocated and friends
/// report); None on the CPU or where this build has no CUDA.
pub fn cuda_memory(device: Device) -> Option<CudaMemory> {
    let Device::Cuda(index) = device else { return None };
    let mut m = CudaMemory::default();
    let rc = unsafe { ffi::dbt_cuda_memory(index as i32, &mut m.allocated, &mut m.allocated_peak, &mut m.reserved, &mut m.reserved_peak) };
    (rc == 0).then_some(m)
}

/// Starts a new peak window (torch.cuda.reset_peak_memory_stats).
pub fn reset_cuda_peak(device: Device) {
    if let Device::Cuda(index) = device {
        unsafe { ffi::dbt_cuda_reset_peak(index as i32) };
    }
}

/// Hands the CUDA caching allocator's unused blocks back to the driver
/// (torch.cuda.empty_cache), so that a retry after an out-of-memory starts
/// from unfragmented memory; nothing to do on the CPU.
pub fn release_cached_memory(device: Device) {
    if device.is_cuda() {
        unsafe { ffi::dbt_cuda_empty_cache() };
    }
}

/// Memory a run holds now and at its peak, in bytes, for the dashboard's gauge:
/// the CUDA caching allocator's reserved bytes on a GPU; on the CPU (or a build
/// without CUDA figures) the process's resident set (`VmRSS`, peak `VmHWM` of
/// /proc/self/status), 0 where neither is known.
pub fn memory_in_use(device: Device) -> (u64, u64) {
    if let Some(m) = cuda_memory(device) {
        return (m.reserved.max(0) as u64, m.reserved_peak.max(0) as u64);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
}

/// `t` on `device`. A CPU tensor bound for a CUDA device goes through pinned
/// memory as an asynchronous copy: a copy from ordinary memory makes the CPU
/// wait until the GPU has finished all the work queued before it, so the CPU
/// could never queue a step ahead. (libtorch's pinned-memory cache keeps each
/// buffer until its copy has run.)
pub fn upload(t: &tch::Tensor, device: Device) -> tch::Tensor {
    if !device.is_cuda() || t.device() == device {
        return t.to_device(device);
    }
    // SAFETY: a live tensor in; a new tensor we own out (null on failure).
    let pinned = unsafe { ffi::dbt_pin_memory(t.as_ptr()) };
    if pinned.is_null() {
        return t.to_device(device);
    }
    // SAFETY: the shim returned a fresh tensor.
    let pinned = unsafe { tch::Tensor::from_ptr(pinned) };
    pinned.to_device_(device, t.kind(), true, false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_old_driver_is_named_with_what_the_wheel_needs() {
        let why = super::unusable_gpu_sentence("NVIDIA H100 80GB HBM3", Some(("535.104.05".into(), 12020)), 13000);
        assert_eq!(
            why,
            "the NVIDIA H100 80GB HBM3 is out of libtorch's reach: its driver 535.104.05 supports CUDA 12.2 and this \
             libtorch is built for CUDA 13.0; update the driver to 580 or newer, or build against a torch 2.11.0 for \
             CUDA 12.2 (README, \"A GPU the trainer does not use\")"
        );
        // A 12.2 driver runs a CUDA 12.6 build (minor-version compatibility): another cause.
        let why = super::unusable_gpu_sentence("NVIDIA A10", Some(("535.104.05".into(), 12020)), 12060);
        assert!(why.contains("its CUDA 12.6 libraries do not load or see no device"), "{why}");
        let why = super::unusable_gpu_sentence("NVIDIA A10", Some(("580.65.06".into(), 13000)), 0);
        assert!(why.contains("this libtorch is built without CUDA"), "{why}");
        // This build's own runtime is read without a driver (PyPI's 2.11.0: CUDA 13.0).
        assert_eq!(super::libtorch_cuda() > 0, cfg!(libtorch_cuda));
    }
}
