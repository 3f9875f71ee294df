//! Linear multistep (order 4) over sigmas, as diffusers' LMSDiscreteScheduler.
//! Each step integrates the Lagrange polynomial through the last few
//! derivatives exactly (diffusers uses adaptive quadrature to the same end).

use anyhow::Result;
use tch::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{self, torch_sqrt, Prediction, Spacing, ZeroSnr};
use super::Sampler;

const ORDER: usize = 4;

pub(crate) struct Lms {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last `ORDER` derivatives dx/dsigma, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = Prediction::from_config(config)?;
        let spacing = Spacing::from_config(config, Spacing::Linspace)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, ZeroSnr::Ignored)?;
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let timesteps = schedule::float_timesteps(spacing, steps, config);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule::np_interp(t as f64, &train_sigmas)).collect();
        let mut timesteps: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        if config.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas = schedule::ln_f32(&train_sigmas);
            sigmas = schedule::karras_sigmas(sigmas[steps - 1], sigmas[0], steps);
            // Timesteps go to the UNet as float32.
            timesteps = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        sigmas.push(0.0);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        Ok(Lms {
            init_noise_sigma: schedule::sigma_init_noise(&sigmas, spacing),
            sigmas,
            timesteps,
            prediction,
            derivatives: Vec::new(),
        })
    }

    /// The weight of the derivative `current` steps back in the step from sigma[i]
    /// to sigma[i+1]: the integral of its Lagrange basis polynomial over the sigmas
    /// of the last `order` steps. Degree < 4, so 3-point Gauss-Legendre is exact.
    fn coefficient(&self, order: usize, i: usize, current: usize) -> f64 {
        let s = |k: usize| self.sigmas[i - k] as f64;
        let basis = |tau: f64| {
            (0..order).filter(|&k| k != current).map(|k| (tau - s(k)) / (s(current) - s(k))).product::<f64>()
        };
        let (a, b) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
        let half = (b - a) / 2.0;
        let mid = (a + b) / 2.0;
        let node = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * node) + 8.0 / 9.0 * basis(mid) + 5.0 / 9.0 * basis(mid + half * node))
    }
}

impl Sampler for Lms {
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
        let sigma = self.sigmas[i];
        let pred_original_sample = match self.prediction {
            Prediction::Epsilon => sample - model_output * sigma as f64,
            Prediction::Velocity => {
                let var = sigma * sigma + 1.0;
                model_output * (-sigma / torch_sqrt(var)) as f64 + sample / var as f64
            }
            Prediction::Sample => model_output.shallow_clone(),
        };
        let derivative = (sample - pred_original_sample) / sigma as f64;
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            drop(self.derivatives.remove(0));
        }
        let order = (i + 1).min(ORDER);
        // Newest derivative pairs with the coefficient for 0 steps back.
        let mut update: Option<Tensor> = None;
        for (current, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = derivative * self.coefficient(order, i, current);
            update = Some(match update {
                None => term,
                Some(acc) => acc + term,
            });
        }
        match update {
            Some(update) => sample + update,
            None => sample.shallow_clone(),
        }
    }
}
