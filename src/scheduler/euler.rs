//! Euler's method over sigmas (Karras et al. 2022, Algorithm 2 without churn),
//! as diffusers' EulerDiscreteScheduler.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::SchedulerConfig;
use super::schedule::{self, torch_sqrt, Prediction, Spacing, ZeroSnr};
use super::Sampler;
use crate::bail_usage;

pub(crate) struct Euler {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl Euler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = Prediction::from_config(config)?;
        let spacing = Spacing::from_config(config, Spacing::Linspace)?;
        if let Some(kind) = config.timestep_type.as_deref() {
            if kind != "discrete" {
                bail_usage!("scheduler config key timestep_type is \"{kind}\"; the euler sampler supports only discrete");
            }
        }
        let alphas_cumprod = schedule::alphas_cumprod(config, ZeroSnr::RescaleWithFloor)?;
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let float_timesteps = schedule::float_timesteps(spacing, steps, config);
        let mut timesteps: Vec<f64> = float_timesteps.iter().map(|&t| t as f64).collect();

        let mut sigmas: Vec<f64> = match config.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => timesteps.iter().map(|&t| schedule::np_interp(t, &train_sigmas)).collect(),
            // As diffusers: steps + 1 float32 sigmas log-spaced from the largest
            // training sigma down to the smallest.
            "log_linear" => {
                let start = train_sigmas[train_sigmas.len() - 1].ln() as f64;
                let end = train_sigmas[0].ln() as f64;
                let spaced = Tensor::linspace(start, end, steps as i64 + 1, (Kind::Float, tch::Device::Cpu)).exp();
                Vec::<f32>::try_from(&spaced)?.into_iter().map(f64::from).collect()
            }
            other => bail_usage!(
                "scheduler config key interpolation_type is \"{other}\"; expected linear or log_linear"
            ),
        };
        if config.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas = schedule::ln_f32(&train_sigmas);
            sigmas = schedule::karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], steps);
            timesteps = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let sigma_last = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => 0.0,
            "sigma_min" => train_sigmas[0] as f64,
            other => bail_usage!("scheduler config key final_sigmas_type is \"{other}\"; expected zero or sigma_min"),
        };
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        Ok(Euler { init_noise_sigma: schedule::sigma_init_noise(&sigmas, spacing), sigmas, timesteps, prediction })
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        let sigma = self.sigmas[i];
        sample / torch_sqrt(sigma * sigma + 1.0) as f64
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _rng: &mut crate::rng::CpuRng) -> Tensor {
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.sigmas[i];
        // No churn (s_churn = 0), so sigma_hat = sigma.
        let sigma_hat = sigma;
        let pred_original_sample = match self.prediction {
            Prediction::Sample => model_output.shallow_clone(),
            Prediction::Epsilon => &sample - model_output * sigma_hat as f64,
            Prediction::Velocity => {
                let var = sigma * sigma + 1.0;
                model_output * (-sigma / torch_sqrt(var)) as f64 + &sample / var as f64
            }
        };
        let derivative = (&sample - pred_original_sample) / sigma_hat as f64;
        let dt = self.sigmas[i + 1] - sigma_hat;
        (sample + derivative * dt as f64).to_kind(model_output.kind())
    }
}
