//! Noise schedules: the training schedule (DDPM forward process) and the
//! samplers, each numerically equal to its diffusers 0.42 class built with
//! `Class.from_config(model_scheduler_config)`.
//!
//! Scalars follow diffusers' dtypes: schedule arithmetic diffusers does on
//! float32 tensors is done here in `f32` (same IEEE ops, so the same bits), and
//! what it does in numpy float64 is done in `f64`. Tensor ops then multiply by
//! those scalars, which libtorch applies in float32 exactly as it does for a
//! 0-d float32 tensor.

pub mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lms;
mod noise;
mod pndm;
mod schedule;

use anyhow::Result;
use tch::Tensor;

pub use config::SchedulerConfig;
pub use noise::NoiseSchedule;

/// A sampler set up for a fixed number of inference steps. The pipeline calls
/// `scale_model_input` and `step` once per entry of `timesteps`, in order.
pub trait Sampler: Send {
    /// Timesteps to pass to the UNet, in order (floats: LMS/Euler may interpolate).
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial noise (1 for DDIM/PNDM/DPM; the largest sigma, or
    /// sqrt(sigma^2 + 1), for the sigma-based samplers).
    fn init_noise_sigma(&self) -> f64;
    /// Scales the denoising input at step `i` (Euler/LMS divide by sqrt(sigma^2+1)); identity for others.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor;
    /// One step from the model output at step index `i`; returns the previous sample.
    /// Samplers that add noise (euler-a) draw it from `rng` (float32 on the CPU, sample's
    /// shape) and move it to the sample's device, as diffusers with a CPU generator.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, rng: &mut crate::rng::CpuRng) -> Tensor;
    /// The sigmas of the sigma-based samplers (one more than the timesteps, ending
    /// at the final sigma), float32 as diffusers keeps them; `None` for the others.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

pub const SAMPLER_NAMES: [&str; 6] = ["ddim", "pndm", "lms", "euler", "euler-a", "dpmpp-2m"];

/// Builds a sampler by name for `steps` inference steps; unknown name => a usage error
/// (crate::error::usage) listing the valid names.
pub fn build_sampler(name: &str, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Sampler>> {
    schedule::check_steps(steps, config)?;
    Ok(match name {
        "ddim" => Box::new(ddim::Ddim::new(config, steps)?),
        "pndm" => Box::new(pndm::Pndm::new(config, steps)?),
        "lms" => Box::new(lms::Lms::new(config, steps)?),
        "euler" => Box::new(euler::Euler::new(config, steps)?),
        "euler-a" => Box::new(euler_ancestral::EulerAncestral::new(config, steps)?),
        "dpmpp-2m" => Box::new(dpm_solver::DpmSolverMultistep::new(config, steps)?),
        other => {
            return Err(crate::error::usage(format!(
                "unknown sampler \"{other}\"; valid samplers are {}",
                SAMPLER_NAMES.join(", ")
            )))
        }
    })
}

/// Rejects a boolean config key set to a value this program does not implement.
fn reject_flag(value: Option<bool>, key: &str, sampler: &str) -> Result<()> {
    if value == Some(true) {
        crate::bail_usage!("scheduler config key {key} = true is not supported by the {sampler} sampler");
    }
    Ok(())
}
