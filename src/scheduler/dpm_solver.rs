//! DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in data (x0)
//! prediction with the midpoint rule, as diffusers' DPMSolverMultistepScheduler
//! with algorithm_type dpmsolver++, solver_order 2.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::SchedulerConfig;
use super::schedule::{self, torch_exp, torch_ln, torch_sqrt, Prediction, Spacing, ZeroSnr};
use super::Sampler;
use crate::bail_usage;

/// Below this many steps the last steps drop to lower order (diffusers' rule).
const LOWER_ORDER_BELOW_STEPS: usize = 15;

pub(crate) struct DpmSolverMultistep {
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    /// Whether the last step is first order: with `euler_at_final`, with
    /// `lower_order_final` (default true) under 15 steps, or when the final sigma is 0.
    first_order_final: bool,
    /// The previous step's x0 prediction.
    previous_x0: Option<Tensor>,
}

/// alpha_t and sigma_t of the VP process at noise level `sigma` (float32).
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / torch_sqrt(sigma * sigma + 1.0);
    (alpha, sigma * alpha)
}

/// Half log-SNR, log(alpha_t) - log(sigma_t).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    torch_ln(alpha) - torch_ln(sigma)
}

impl DpmSolverMultistep {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        super::reject_flag(config.thresholding, "thresholding", "dpmpp-2m")?;
        let prediction = Prediction::from_config(config)?;
        let spacing = Spacing::from_config(config, Spacing::Linspace)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, ZeroSnr::RescaleWithFloor)?;
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let train = config.num_train_timesteps;
        // lambda_min_clipped is -inf by default, so the whole range is used:
        // like the other integer samplers but with steps + 1 points, the last dropped.
        let mut timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, steps + 1)
                .into_iter()
                .rev()
                .take(steps)
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = train / (steps as i64 + 1);
                (1..=steps as i64).rev().map(|i| i * ratio + config.steps_offset).collect()
            }
            Spacing::Trailing => schedule::integer_timesteps(Spacing::Trailing, steps, config),
        };
        let mut sigmas: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas = schedule::ln_f32(&train_sigmas);
            let karras = schedule::karras_sigmas(train_sigmas[0] as f64, train_sigmas[train_sigmas.len() - 1] as f64, steps);
            let round = config.beta_schedule != "squaredcos_cap_v2";
            timesteps = karras
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    (if round { t.round_ties_even() } else { t }) as i64
                })
                .collect();
            karras
        } else {
            timesteps.iter().map(|&t| schedule::np_interp(t as f64, &train_sigmas)).collect()
        };
        let final_sigmas_type = config.final_sigmas_type.as_deref().unwrap_or("zero");
        let sigma_last = match final_sigmas_type {
            "zero" => 0.0,
            "sigma_min" => train_sigmas[0] as f64,
            other => bail_usage!("scheduler config key final_sigmas_type is \"{other}\"; expected zero or sigma_min"),
        };
        sigmas.push(sigma_last);
        let lower_order_final = config.lower_order_final.unwrap_or(true);
        let few_steps = timesteps.len() < LOWER_ORDER_BELOW_STEPS;
        Ok(DpmSolverMultistep {
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            prediction,
            first_order_final: config.euler_at_final.unwrap_or(false)
                || (lower_order_final && few_steps)
                || final_sigmas_type == "zero",
            previous_x0: None,
        })
    }

    /// The model output as a prediction of the clean sample x0.
    fn x0_prediction(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        match self.prediction {
            Prediction::Epsilon => (sample - model_output * sigma_t as f64) / alpha_t as f64,
            Prediction::Sample => model_output.shallow_clone(),
            Prediction::Velocity => sample * alpha_t as f64 - model_output * sigma_t as f64,
        }
    }

    /// DPM-Solver++ first order (equivalent to DDIM) from sigma[i] to sigma[i+1].
    fn first_order(&self, x0: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        sample * (sigma_t / sigma_s) as f64 - x0 * (alpha_t * (torch_exp(-h) - 1.0)) as f64
    }

    /// DPM-Solver++(2M) midpoint update using this and the previous x0 prediction.
    fn second_order(&self, x0: &Tensor, previous_x0: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d1 = (x0 - previous_x0) * (1.0 / r0) as f64;
        let phi = alpha_t * (torch_exp(-h) - 1.0);
        sample * (sigma_t / sigma_s0) as f64 - x0 * phi as f64 - d1 * (0.5 * phi) as f64
    }
}

impl Sampler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _rng: &mut crate::rng::CpuRng) -> Tensor {
        let n = self.timesteps.len();
        let first_order_last = i + 1 == n && self.first_order_final;
        let x0 = self.x0_prediction(model_output, i, sample);
        let sample = sample.to_kind(Kind::Float);
        // The first step has no history; with order 2, "lower order" on the
        // second-to-last step is still order 2.
        let prev_sample = match &self.previous_x0 {
            Some(previous_x0) if i > 0 && !first_order_last => self.second_order(&x0, previous_x0, i, &sample),
            _ => self.first_order(&x0, i, &sample),
        };
        self.previous_x0 = Some(x0);
        prev_sample.to_kind(model_output.kind())
    }
}
