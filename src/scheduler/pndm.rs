//! PLMS, the linear multistep half of PNDM (Liu et al. 2022), as diffusers'
//! PNDMScheduler with `skip_prk_steps` (what Stable Diffusion ships): the first
//! step is taken twice (an Euler step, then a Heun-like correction), after which
//! up to four past model outputs are combined with Adams-Bashforth weights.
//! The Runge-Kutta warm-up of full PNDM is never used: `skip_prk_steps` is taken
//! as true whatever the config says (every Stable Diffusion config sets it).

use anyhow::Result;
use tch::Tensor;

use super::config::SchedulerConfig;
use super::schedule::{self, torch_sqrt, Prediction, Spacing, ZeroSnr};
use super::Sampler;
use crate::bail_usage;

pub(crate) struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    step_ratio: i64,
    prediction: Prediction,
    /// Past model outputs (at most 4), oldest first.
    ets: Vec<Tensor>,
    /// The sample of the first step, which its correction step starts from again.
    cur_sample: Option<Tensor>,
    counter: usize,
}

impl Pndm {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = Prediction::from_config(config)?;
        if prediction == Prediction::Sample {
            bail_usage!("scheduler config key prediction_type \"sample\" is not supported by the pndm sampler");
        }
        let spacing = Spacing::from_config(config, Spacing::Leading)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, ZeroSnr::Ignored)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        // The spaced timesteps descending; PLMS repeats the second one.
        let spaced = schedule::integer_timesteps(spacing, steps, config);
        let mut timesteps = Vec::with_capacity(steps + 1);
        timesteps.push(spaced[0]);
        if steps > 1 {
            timesteps.push(spaced[1]);
            timesteps.extend_from_slice(&spaced[1..]);
        }
        Ok(Pndm {
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_ratio: config.num_train_timesteps / steps as i64,
            prediction,
            ets: Vec::new(),
            cur_sample: None,
            counter: 0,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 { self.alphas_cumprod[t as usize] } else { self.final_alpha_cumprod }
    }

    /// x_{t_prev} from x_t and the (combined) noise prediction: formula (9) of the PNDM paper.
    fn prev_sample(&self, sample: &Tensor, t: i64, t_prev: i64, model_output: &Tensor) -> Tensor {
        let alpha_prod_t = self.alpha_at(t);
        let alpha_prod_t_prev = self.alpha_at(t_prev);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let eps = match self.prediction {
            Prediction::Velocity => {
                model_output * torch_sqrt(alpha_prod_t) as f64 + sample * torch_sqrt(beta_prod_t) as f64
            }
            _ => model_output.shallow_clone(),
        };
        let sample_coeff = torch_sqrt(alpha_prod_t_prev / alpha_prod_t);
        let denom = alpha_prod_t * torch_sqrt(beta_prod_t_prev) + torch_sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev);
        sample * sample_coeff as f64 - eps * (alpha_prod_t_prev - alpha_prod_t) as f64 / denom as f64
    }
}

impl Sampler for Pndm {
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
        let mut t = self.timesteps[i];
        let mut t_prev = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                drop(self.ets.remove(0));
            }
            self.ets.push(model_output.shallow_clone());
        } else {
            // The correction step re-runs the first step's interval.
            t_prev = t;
            t += self.step_ratio;
        }

        let ets = &self.ets;
        let n = ets.len();
        let mut start = sample.shallow_clone();
        let combined = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(first) = self.cur_sample.take() {
                start = first;
            }
            (model_output + &ets[n - 1]) / 2.0
        } else if n == 2 {
            (&ets[1] * 3.0 - &ets[0]) / 2.0
        } else if n == 3 {
            (&ets[2] * 23.0 - &ets[1] * 16.0 + &ets[0] * 5.0) / 12.0
        } else {
            (&ets[3] * 55.0 - &ets[2] * 59.0 + &ets[1] * 37.0 - &ets[0] * 9.0) * (1.0 / 24.0)
        };
        let prev = self.prev_sample(&start, t, t_prev, &combined);
        self.counter += 1;
        prev
    }
}
