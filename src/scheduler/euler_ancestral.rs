//! Euler ancestral over sigmas: each step goes down to a lower sigma
//! deterministically, then adds fresh noise back up to the next sigma, as
//! diffusers' EulerAncestralDiscreteScheduler.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::SchedulerConfig;
use super::schedule::{self, torch_sqrt, Prediction, Spacing, ZeroSnr};
use super::Sampler;
use crate::bail_usage;

pub(crate) struct EulerAncestral {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = Prediction::from_config(config)?;
        if prediction == Prediction::Sample {
            bail_usage!("scheduler config key prediction_type \"sample\" is not supported by the euler-a sampler");
        }
        let spacing = Spacing::from_config(config, Spacing::Linspace)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, ZeroSnr::RescaleWithFloor)?;
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let timesteps: Vec<f64> =
            schedule::float_timesteps(spacing, steps, config).into_iter().map(f64::from).collect();
        let mut sigmas: Vec<f32> =
            timesteps.iter().map(|&t| schedule::np_interp(t, &train_sigmas) as f32).collect();
        sigmas.push(0.0);
        Ok(EulerAncestral {
            init_noise_sigma: schedule::sigma_init_noise(&sigmas, spacing),
            sigmas,
            timesteps,
            prediction,
        })
    }
}

impl Sampler for EulerAncestral {
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

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, rng: &mut crate::rng::CpuRng) -> Tensor {
        let sigma = self.sigmas[i];
        let sample = sample.to_kind(Kind::Float);
        let pred_original_sample = match self.prediction {
            Prediction::Velocity => {
                let var = sigma * sigma + 1.0;
                model_output * (-sigma / torch_sqrt(var)) as f64 + &sample / var as f64
            }
            _ => &sample - model_output * sigma as f64,
        };
        let (sigma_from, sigma_to) = (sigma, self.sigmas[i + 1]);
        let sigma_up = torch_sqrt(
            sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from),
        );
        let sigma_down = torch_sqrt(sigma_to * sigma_to - sigma_up * sigma_up);
        let derivative = (&sample - pred_original_sample) / sigma as f64;
        let dt = sigma_down - sigma;
        let prev_sample = sample + derivative * dt as f64;
        // diffusers with a CPU generator: float32 normal draws on the CPU, then moved.
        let noise = rng.randn(&model_output.size())
            .to_device(model_output.device())
            .to_kind(model_output.kind());
        (prev_sample + noise * sigma_up as f64).to_kind(model_output.kind())
    }
}
