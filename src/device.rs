//! Device selection for `--device cpu|cuda|cuda:N|auto`.

use tch::Device;

use crate::error::usage;

pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(usage("--device cuda was asked for but no CUDA device is available"))
            }
        }
        other => {
            if let Some(n) = other.strip_prefix("cuda:") {
                let n: usize = n.parse().map_err(|_| usage(format!("--device {other}: the CUDA index is not a number")))?;
                let count = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
                if n >= count {
                    return Err(usage(format!("--device {other}: there are only {count} CUDA devices")));
                }
                Ok(Device::Cuda(n))
            } else {
                Err(usage(format!("--device {other} is not one of cpu, cuda, cuda:N, auto")))
            }
        }
    }
}
