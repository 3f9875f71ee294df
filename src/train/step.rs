//! One DreamBooth denoising step, as diffusers' `train_dreambooth.py`: noise and
//! timesteps drawn from a private generator, the DDPM forward process from the
//! model's scheduler config, the UNet's prediction compared (MSE) with the noise
//! (epsilon) or the velocity (v-prediction), optional min-SNR weighting, and
//! prior preservation as a weighted second term over the class examples.

use tch::{Kind, Tensor};

use crate::model::unet::{Conditioning, UNet2DConditionModel};
use crate::rng::CpuRng;
use crate::scheduler::{NoiseSchedule, SchedulerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

impl PredictionType {
    pub fn from_config(config: &SchedulerConfig) -> anyhow::Result<Self> {
        match config.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            other => Err(crate::error::usage(format!(
                "the model's scheduler config has prediction_type {other:?}; training supports epsilon and v_prediction"
            ))),
        }
    }
}

/// The random part of a step: noise like the latents and one timestep per example.
pub struct StepNoise {
    pub noise: Tensor,
    pub timesteps: Tensor,
}

/// Draws the noise (plus `offset_noise` × a per-channel constant, which lets the
/// model learn to change an image's mean brightness) and the timesteps, in a fixed
/// order from `rng`, on the CPU.
pub fn draw_noise(rng: &mut CpuRng, latent_shape: &[i64], num_train_timesteps: i64, offset_noise: f64) -> StepNoise {
    let mut noise = rng.randn(latent_shape);
    if offset_noise != 0.0 {
        let offset = rng.randn(&[latent_shape[0], latent_shape[1], 1, 1]);
        noise += offset * offset_noise;
    }
    let timesteps = rng.randint(0, num_train_timesteps, &[latent_shape[0]]);
    StepNoise { noise, timesteps }
}

/// How each example of a batch counts in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleWeights {
    /// `None`: an instance example; `Some(w)`: a class (prior) example with its concept's prior_loss_weight.
    pub prior: Vec<Option<f64>>,
}

impl ExampleWeights {
    pub fn all_instance(n: usize) -> Self {
        ExampleWeights { prior: vec![None; n] }
    }

    /// Coefficients c so that loss = Σ c_i × loss_i = mean(instance) + mean(w × class),
    /// as a float32 CPU tensor (the loss moves it to the device).
    pub fn coefficients_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.coefficients())
    }

    fn coefficients(&self) -> Vec<f32> {
        let n_inst = self.prior.iter().filter(|p| p.is_none()).count().max(1) as f64;
        let n_class = self.prior.iter().filter(|p| p.is_some()).count().max(1) as f64;
        self.prior
            .iter()
            .map(|p| match p {
                None => (1.0 / n_inst) as f32,
                Some(w) => (w / n_class) as f32,
            })
            .collect()
    }
}

/// Everything a loss computation needs besides the UNet.
pub struct LossInputs<'a> {
    pub latents: &'a Tensor,
    pub noise: &'a Tensor,
    pub timesteps: &'a Tensor,
    /// What the UNet is conditioned on (text states, SDXL's added conditions).
    pub conditioning: &'a Conditioning,
    /// Per-example loss coefficients (`ExampleWeights::coefficients_tensor`).
    pub coefficients: &'a Tensor,
}

pub struct LossOutput {
    /// 0-d float32: what backward runs on.
    pub loss: Tensor,
    pub model_pred: Tensor,
    pub target: Tensor,
}

/// The denoising loss. `min_snr_gamma` > 0 weights each example by
/// min(SNR, γ)/SNR (epsilon) or min(SNR, γ)/(SNR+1) (v), as diffusers' scripts.
/// `autocast` wraps the UNet call (mixed precision); the loss is float32.
pub fn denoising_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    min_snr_gamma: f64,
    inputs: &LossInputs,
    autocast: &dyn Fn(&dyn Fn() -> Tensor) -> Tensor,
) -> LossOutput {
    masked_denoising_loss(unet, schedule, prediction, min_snr_gamma, inputs, None, autocast)
}

/// [`denoising_loss`] with each latent cell's squared error weighted by
/// `loss_weights` (`[B, 1, h, w]`, the masked loss: data/masks.rs) before the
/// per-example mean, as kohya's `apply_masked_loss`; the mean stays over every
/// cell (not divided by the mask's area). Weights of exactly 1 change no bit.
pub fn masked_denoising_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    min_snr_gamma: f64,
    inputs: &LossInputs,
    loss_weights: Option<&Tensor>,
    autocast: &dyn Fn(&dyn Fn() -> Tensor) -> Tensor,
) -> LossOutput {
    let device = inputs.latents.device();
    let timesteps = inputs.timesteps.to_device(device);
    let noise = inputs.noise.to_device(device);
    let noisy = schedule.add_noise(inputs.latents, &noise, &timesteps);
    let target = match prediction {
        PredictionType::Epsilon => noise.shallow_clone(),
        PredictionType::VPrediction => schedule.velocity(inputs.latents, &noise, &timesteps),
    };
    let model_pred =
        autocast(&|| unet.forward(&noisy, &timesteps, inputs.conditioning)).to_kind(Kind::Float);
    let squared = (&model_pred - &target).square();
    let squared = match loss_weights {
        Some(w) => squared * w.to_device(device),
        None => squared,
    };
    let per_example = squared.mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
    let per_example = if min_snr_gamma > 0.0 {
        let snr = schedule.snr(&timesteps);
        let clipped = snr.clamp_max(min_snr_gamma);
        let weight = match prediction {
            PredictionType::Epsilon => clipped / &snr,
            PredictionType::VPrediction => clipped / (snr + 1.0),
        };
        per_example * weight
    } else {
        per_example
    };
    let coefficients = inputs.coefficients.to_device(device);
    let loss = (per_example * coefficients).sum(Kind::Float);
    LossOutput { loss, model_pred, target }
}
