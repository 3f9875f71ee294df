//! What the samplers and the training schedule share: betas and their cumulative
//! alpha product (float32 torch ops, exactly as diffusers computes them), the
//! config's enumerated keys, and numpy's spacing / interpolation / rounding rules
//! in float64 so timesteps and sigmas come out bit for bit.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::config::SchedulerConfig;
use crate::bail_usage;

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    /// `v_prediction`: v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0.
    Velocity,
    Sample,
}

impl Prediction {
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        Ok(match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::Velocity,
            "sample" => Prediction::Sample,
            other => bail_usage!(
                "scheduler config key prediction_type is \"{other}\"; expected epsilon, v_prediction or sample"
            ),
        })
    }
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    /// The config's value, or `class_default` when the file does not say.
    pub fn from_config(config: &SchedulerConfig, class_default: Spacing) -> Result<Self> {
        Ok(match config.timestep_spacing.as_deref() {
            None => class_default,
            Some("leading") => Spacing::Leading,
            Some("trailing") => Spacing::Trailing,
            Some("linspace") => Spacing::Linspace,
            Some(other) => bail_usage!(
                "scheduler config key timestep_spacing is \"{other}\"; expected leading, trailing or linspace"
            ),
        })
    }
}

/// How a sampler class treats `rescale_betas_zero_snr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroSnr {
    /// The class has no such option (PNDM, LMS): the key is ignored.
    Ignored,
    /// Rescale the betas (DDIM, DDPM).
    Rescale,
    /// Rescale, then floor the last alpha product at 2^-24 so its sigma is finite
    /// (Euler, Euler ancestral, DPM-Solver).
    RescaleWithFloor,
}

/// The training betas as a float32 CPU tensor.
pub(crate) fn betas(config: &SchedulerConfig) -> Result<Tensor> {
    let n = config.num_train_timesteps;
    if n < 1 {
        bail_usage!("scheduler config key num_train_timesteps is {n}; it must be at least 1");
    }
    if let Some(trained) = &config.trained_betas {
        if trained.len() as i64 != n {
            bail_usage!(
                "scheduler config key trained_betas has {} values but num_train_timesteps is {n}",
                trained.len()
            );
        }
        return Ok(Tensor::from_slice(trained).to_kind(Kind::Float));
    }
    let cpu_f32 = (Kind::Float, tch::Device::Cpu);
    Ok(match config.beta_schedule.as_str() {
        "linear" => Tensor::linspace(config.beta_start, config.beta_end, n, cpu_f32),
        "scaled_linear" => {
            Tensor::linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n, cpu_f32).pow_tensor_scalar(2)
        }
        "squaredcos_cap_v2" => Tensor::from_slice(&cosine_betas(n as usize)),
        other => bail_usage!(
            "scheduler config key beta_schedule is \"{other}\"; expected linear, scaled_linear or squaredcos_cap_v2"
        ),
    })
}

/// The "squaredcos_cap_v2" schedule: betas from a cosine alpha-bar curve, capped
/// at 0.999, computed in float64 and stored as float32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas: Tensor = 1.0 - betas;
    let alphas_cumprod = alphas.cumprod(0, None);
    let sqrt_ab = alphas_cumprod.sqrt();
    let first = sqrt_ab.get(0);
    let last = sqrt_ab.get(-1);
    let shifted = &sqrt_ab - &last;
    let scaled = shifted * (&first / (&first - &last));
    let alphas_bar = scaled.pow_tensor_scalar(2);
    let n = alphas_bar.size()[0];
    let alphas = alphas_bar.narrow(0, 1, n - 1) / alphas_bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[alphas_bar.narrow(0, 0, 1), alphas], 0);
    1.0 - alphas
}

/// The cumulative product of (1 - beta), float32, as the sampler class computes it.
pub(crate) fn alphas_cumprod(config: &SchedulerConfig, zero_snr: ZeroSnr) -> Result<Vec<f32>> {
    let mut betas = betas(config)?;
    let rescale = config.rescale_betas_zero_snr && zero_snr != ZeroSnr::Ignored;
    if rescale {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas: Tensor = 1.0 - betas;
    let alphas_cumprod = alphas.cumprod(0, None);
    let mut values = Vec::<f32>::try_from(&alphas_cumprod)?;
    if rescale && zero_snr == ZeroSnr::RescaleWithFloor {
        if let Some(last) = values.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(values)
}

/// The noise level of each training timestep, sqrt((1 - a) / a), in float32
/// through libtorch as diffusers computes it.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    let ratios: Vec<f32> = alphas_cumprod.iter().map(|&a| (1.0 - a) / a).collect();
    Vec::<f32>::try_from(&Tensor::from_slice(&ratios).sqrt()).expect("a float32 tensor reads back as f32")
}

/// Checks an inference step count against the training range.
pub(crate) fn check_steps(steps: usize, config: &SchedulerConfig) -> Result<()> {
    if steps == 0 {
        bail_usage!("the number of sampling steps must be at least 1");
    }
    if steps as i64 > config.num_train_timesteps {
        bail_usage!(
            "{steps} sampling steps is more than the scheduler's num_train_timesteps ({})",
            config.num_train_timesteps
        );
    }
    Ok(())
}

/// numpy's `linspace(start, stop, num)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// numpy's `arange(start, 0, -step)` for a float step: the second value is
/// `start - step`, the rest `start + i * delta` with delta re-derived from the
/// first two, as numpy fills float ranges.
pub(crate) fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil().max(0.0) as usize;
    let second = start - step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy's `interp(x, arange(len(fp)), fp)` for increasing x grid 0, 1, 2, ...
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// Timesteps spaced as DDIM / PNDM / DPM-Solver lay them out in integers, descending:
/// `leading` (multiples of T // n plus `steps_offset`), `trailing` (from T down) or
/// `linspace` (evenly over 0..T-1, rounded half to even as numpy does).
pub(crate) fn integer_timesteps(spacing: Spacing, steps: usize, config: &SchedulerConfig) -> Vec<i64> {
    let train = config.num_train_timesteps;
    match spacing {
        Spacing::Leading => {
            let ratio = train / steps as i64;
            (0..steps as i64).rev().map(|i| i * ratio + config.steps_offset).collect()
        }
        Spacing::Trailing => np_arange_down(train as f64, train as f64 / steps as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
    }
}

/// Timesteps as LMS / Euler / Euler ancestral lay them out in float32, descending.
pub(crate) fn float_timesteps(spacing: Spacing, steps: usize, config: &SchedulerConfig) -> Vec<f32> {
    let train = config.num_train_timesteps;
    match spacing {
        Spacing::Leading => {
            let ratio = train / steps as i64;
            (0..steps as i64)
                .rev()
                .map(|i| (i * ratio) as f32 + config.steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => np_arange_down(train as f64, train as f64 / steps as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
    }
}

/// The initial noise scale of the sigma-based samplers: the largest sigma, or
/// sqrt(sigma^2 + 1) for `leading` spacing (float32 as diffusers).
pub(crate) fn sigma_init_noise(sigmas: &[f32], spacing: Spacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max as f64,
        Spacing::Leading => torch_sqrt(max * max + 1.0) as f64,
    }
}

/// Karras et al. (2022) sigmas between the ends of `in_sigmas` (rho = 7), float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating
/// log-sigmas linearly between neighbours (diffusers' `_sigma_to_t`; the
/// log-sigmas are float32 there, and so is the difference of two of them).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log-sigma is <= log_sigma, clipped to leave a neighbour.
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l as f64 >= 0.0).count();
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let low = log_sigmas[low_idx];
    let high = log_sigmas[low_idx + 1];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Natural logs of float32 values, in float32 (numpy's `np.log` of a float32 array).
pub(crate) fn ln_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v.ln()).collect()
}

/// A float32 square root through libtorch. Its float kernels are not always
/// correctly rounded (1 ulp off at times), and diffusers takes these roots on
/// float32 tensors, so matching bits means taking them the same way.
pub(crate) fn torch_sqrt(x: f32) -> f32 {
    Tensor::from_slice(&[x]).sqrt().double_value(&[0]) as f32
}

/// A float32 scalar through libtorch's own log, so results match torch bit for bit.
pub(crate) fn torch_ln(x: f32) -> f32 {
    Tensor::from_slice(&[x]).log().double_value(&[0]) as f32
}

/// A float32 scalar through libtorch's own exp.
pub(crate) fn torch_exp(x: f32) -> f32 {
    Tensor::from_slice(&[x]).exp().double_value(&[0]) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_rounds_half_to_even() {
        let config = SchedulerConfig::default();
        // 999 * 4 / 8 = 499.5 rounds to 500, as numpy does.
        let ts = np_linspace(0.0, 999.0, 9);
        assert_eq!(ts[4], 499.5);
        let rounded: Vec<i64> = ts.iter().map(|t| t.round_ties_even() as i64).collect();
        assert_eq!(rounded[4], 500);
        assert_eq!(integer_timesteps(Spacing::Trailing, 8, &config), vec![999, 874, 749, 624, 499, 374, 249, 124]);
    }

    #[test]
    fn interp_matches_grid_points() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp(0.0, &fp), 1.0);
        assert_eq!(np_interp(1.5, &fp), 3.0);
        assert_eq!(np_interp(2.0, &fp), 4.0);
        assert_eq!(np_interp(7.0, &fp), 4.0);
    }

    #[test]
    fn unknown_beta_schedule_names_the_key() {
        let config = SchedulerConfig { beta_schedule: "sigmoidal".into(), ..Default::default() };
        let err = betas(&config).unwrap_err().to_string();
        assert!(err.contains("beta_schedule"), "{err}");
    }
}
