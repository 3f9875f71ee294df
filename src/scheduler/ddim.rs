//! DDIM (Song et al. 2021), deterministic (eta = 0), as diffusers' DDIMScheduler.

use anyhow::Result;
use tch::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{self, torch_sqrt, Prediction, Spacing, ZeroSnr};
use super::Sampler;

pub(crate) struct Ddim {
    alphas_cumprod: Vec<f32>,
    /// Alpha product "before" the first training step: 1 or alphas_cumprod[0].
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    /// T // n: how far each step jumps back.
    step_ratio: i64,
    prediction: Prediction,
    /// Clip x0 to +-this (DDIM's `clip_sample`, on by default).
    clip_range: Option<f64>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        super::reject_flag(config.thresholding, "thresholding", "ddim")?;
        let prediction = Prediction::from_config(config)?;
        let spacing = Spacing::from_config(config, Spacing::Leading)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, ZeroSnr::Rescale)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let timesteps = schedule::integer_timesteps(spacing, steps, config);
        let clip_range = config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Ddim {
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_ratio: config.num_train_timesteps / steps as i64,
            prediction,
            clip_range,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 { self.alphas_cumprod[t as usize] } else { self.final_alpha_cumprod }
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _rng: &mut crate::rng::CpuRng) -> Tensor {
        let t = self.timesteps[i];
        let alpha_prod_t = self.alpha_at(t);
        let alpha_prod_t_prev = self.alpha_at(t - self.step_ratio);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let sqrt_alpha = torch_sqrt(alpha_prod_t) as f64;
        let sqrt_beta = torch_sqrt(beta_prod_t) as f64;

        let (pred_original_sample, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => ((sample - model_output * sqrt_beta) / sqrt_alpha, model_output.shallow_clone()),
            Prediction::Sample => {
                let x0 = model_output.shallow_clone();
                let eps = (sample - &x0 * sqrt_alpha) / sqrt_beta;
                (x0, eps)
            }
            Prediction::Velocity => (
                sample * sqrt_alpha - model_output * sqrt_beta,
                model_output * sqrt_alpha + sample * sqrt_beta,
            ),
        };
        let pred_original_sample = match self.clip_range {
            Some(range) => pred_original_sample.clamp(-range, range),
            None => pred_original_sample,
        };
        // eta = 0: no variance term, so the direction keeps all of 1 - alpha_prev.
        let direction_coeff = torch_sqrt(1.0 - alpha_prod_t_prev - 0.0f32) as f64;
        pred_original_sample * torch_sqrt(alpha_prod_t_prev) as f64 + pred_epsilon * direction_coeff
    }
}
