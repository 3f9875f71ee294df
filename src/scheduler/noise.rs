//! The training noise schedule: the DDPM forward process q(x_t | x_0) as
//! diffusers' DDPMScheduler applies it (`add_noise`, `get_velocity`) and the
//! per-timestep SNR used by min-SNR loss weighting.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::SchedulerConfig;
use super::schedule::{self, ZeroSnr};

pub struct NoiseSchedule {
    /// float32, one per training timestep (on the CPU unless moved).
    alphas_cumprod: Tensor,
    num_train_timesteps: i64,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let values = schedule::alphas_cumprod(config, ZeroSnr::Rescale)?;
        Ok(NoiseSchedule { alphas_cumprod: Tensor::from_slice(&values), num_train_timesteps: config.num_train_timesteps })
    }

    /// The same schedule with its table on `device`: the trainer's steps then
    /// copy nothing from the host (each such copy waits for the GPU, and a CUDA
    /// graph capture forbids them).
    pub fn to_device(&self, device: tch::Device) -> NoiseSchedule {
        NoiseSchedule { alphas_cumprod: self.alphas_cumprod.to_device(device), num_train_timesteps: self.num_train_timesteps }
    }

    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    pub fn num_train_timesteps(&self) -> i64 {
        self.num_train_timesteps
    }

    /// sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) at `timesteps`, in `like`'s dtype
    /// and device, shaped to broadcast over a batch of `like`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let alphas_cumprod = self.alphas_cumprod.to_device(like.device()).to_kind(like.kind());
        let picked = alphas_cumprod.index_select(0, &timesteps.to_device(like.device()).to_kind(Kind::Int64).flatten(0, -1));
        let mut shape = vec![-1i64];
        shape.resize(like.dim().max(1), 1);
        let sqrt_alpha = picked.pow_tensor_scalar(0.5).reshape(shape.as_slice());
        let one_minus: Tensor = 1.0 - picked.shallow_clone();
        let sqrt_one_minus_alpha = one_minus.pow_tensor_scalar(0.5).reshape(shape.as_slice());
        (sqrt_alpha, sqrt_one_minus_alpha)
    }

    /// x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(timesteps, x0);
        sqrt_alpha * x0 + sqrt_one_minus_alpha * noise
    }

    /// The v-prediction target, sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(timesteps, x0);
        sqrt_alpha * noise - sqrt_one_minus_alpha * x0
    }

    /// Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per timestep, float32 on
    /// the timesteps' device (as diffusers' `compute_snr`).
    pub fn snr(&self, timesteps: &Tensor) -> Tensor {
        let device = timesteps.device();
        let index = timesteps.to_kind(Kind::Int64).flatten(0, -1);
        let alpha = self.alphas_cumprod.pow_tensor_scalar(0.5).to_device(device).index_select(0, &index);
        let one_minus: Tensor = 1.0 - &self.alphas_cumprod;
        let sigma = one_minus.pow_tensor_scalar(0.5).to_device(device).index_select(0, &index);
        (alpha / sigma).pow_tensor_scalar(2).reshape(timesteps.size())
    }
}
