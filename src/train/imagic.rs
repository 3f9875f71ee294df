//! Imagic (Kawar et al. 2023): edit one image with a text prompt.
//!
//! (a) Optimise the target prompt's embedding e_tgt → e_opt so the frozen UNet
//!     denoises the image's latents well (Adam, lr ~1e-3, ~500 steps).
//! (b) Fine-tune the UNet with e_opt fixed (lr ~1e-6..5e-7), so e_opt now
//!     reconstructs the image faithfully.
//! (c) Generate from e = η·e_tgt + (1−η)·e_opt: η = 0 is the image, η = 1 the
//!     prompt, values between (paper: ~0.7) edit the image towards the prompt.
//!
//! Pure functions over our models; every random draw comes from the caller's
//! `CpuRng` (per step: the noise, then the timestep, as diffusers' training
//! scripts draw them), so a seed gives the same result on any run. The step
//! functions let a trainer run its own loop (checkpoints, pause, stop); the
//! `optimize_embedding` / `fine_tune_unet` loops are the simple way.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{bail, Context};
use tch::{Kind, Tensor};

use super::adamw::{AdamW, AdamWConfig};
use super::optimizer::Optimizer;
use crate::checkpoint::safetensors_file::SafetensorsFile;
use crate::checkpoint::write::write_safetensors;
use crate::model::unet::{Conditioning, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::rng::CpuRng;
use crate::scheduler::{NoiseSchedule, SchedulerConfig};

/// Key names in the embeddings file.
pub const TARGET_KEY: &str = "imagic.target_embedding";
pub const OPTIMIZED_KEY: &str = "imagic.optimized_embedding";

/// The paper's / diffusers community pipeline's settings at full scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImagicSettings {
    pub embedding_steps: usize,
    pub embedding_lr: f64,
    pub unet_steps: usize,
    pub unet_lr: f64,
}

impl Default for ImagicSettings {
    fn default() -> Self {
        ImagicSettings { embedding_steps: 500, embedding_lr: 1e-3, unet_steps: 1000, unet_lr: 1e-6 }
    }
}

/// What the UNet is trained to predict (`prediction_type` of the scheduler config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Epsilon,
    Velocity,
}

/// The frozen pieces of the denoising loss: the UNet, the training noise schedule
/// and what the UNet predicts.
pub struct Denoiser<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub schedule: &'a NoiseSchedule,
    pub target: Target,
}

impl<'a> Denoiser<'a> {
    /// `schedule` from the model's own scheduler config, which also says the target.
    pub fn new(unet: &'a UNet2DConditionModel, schedule: &'a NoiseSchedule, config: &SchedulerConfig) -> anyhow::Result<Self> {
        let target = match config.prediction_type.as_str() {
            "epsilon" => Target::Epsilon,
            "v_prediction" => Target::Velocity,
            other => bail!("Imagic trains on epsilon or v_prediction models; this scheduler config says prediction_type \"{other}\""),
        };
        Ok(Denoiser { unet, schedule, target })
    }

    /// Mean squared error of the UNet's prediction for `latents` noised with
    /// `noise` at `timesteps` (one per batch row), conditioned on `embedding`
    /// (`[1, 77, hidden]`, broadcast over the batch). Computed in float32 whatever
    /// the UNet's dtype; differentiable in the embedding and the UNet weights.
    pub fn loss_with(&self, latents: &Tensor, embedding: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let batch = noise.size()[0];
        let latents = latents.to_kind(Kind::Float).expand_as(noise);
        let noisy = self.schedule.add_noise(&latents, noise, timesteps);
        let target = match self.target {
            Target::Epsilon => noise.shallow_clone(),
            Target::Velocity => self.schedule.velocity(&latents, noise, timesteps),
        };
        let kind = self.unet_kind();
        let context = embedding.to_kind(kind).expand([batch, -1, -1], false);
        let prediction = self.unet.forward(&noisy.to_kind(kind), &timesteps.to_kind(Kind::Float), &Conditioning::text(context));
        prediction.to_kind(Kind::Float).mse_loss(&target, tch::Reduction::Mean)
    }

    /// One training sample's loss: noise then a timestep drawn from `rng`.
    pub fn loss(&self, latents: &Tensor, embedding: &Tensor, rng: &mut CpuRng) -> Tensor {
        let (noise, timesteps) = self.draw(latents, 1, rng);
        self.loss_with(latents, embedding, &noise, &timesteps)
    }

    /// `count` noise tensors (shaped like `latents`, batch `count`) and timesteps.
    pub fn draw(&self, latents: &Tensor, count: i64, rng: &mut CpuRng) -> (Tensor, Tensor) {
        let mut shape = latents.size();
        shape[0] = count;
        let noise = rng.randn_on(&shape, latents.device());
        let timesteps = rng.randint(0, self.schedule.num_train_timesteps(), &[count]).to_device(latents.device());
        (noise, timesteps)
    }

    /// The embedding's kind follows the UNet's weights (fp16/bf16 runs).
    fn unet_kind(&self) -> Kind {
        self.unet.conv_in.weight.kind()
    }
}

/// The image's latents: VAE-encode `image` (`[1, 3, H, W]` in [-1, 1]), sample
/// the posterior once with `rng`, scale by the VAE's `scaling_factor`. Fixed for
/// both stages, as in the paper's implementation.
pub fn encode_latents(vae: &AutoencoderKL, scaling_factor: f64, image: &Tensor, rng: &mut CpuRng) -> Tensor {
    let _guard = tch::no_grad_guard();
    vae.encode(&image.to_kind(Kind::Float)).sample(rng) * scaling_factor
}

/// Stage (a) in progress: the target embedding, the one being optimised and its
/// Adam state (AdamW without weight decay is Adam).
pub struct EmbeddingOptimization {
    pub target: Tensor,
    optimizer: AdamW,
}

impl EmbeddingOptimization {
    /// Starts from e_opt = e_tgt (a float32 copy that requires grad).
    pub fn new(target: &Tensor) -> Self {
        let target = target.detach().to_kind(Kind::Float);
        let optimized = target.copy().set_requires_grad(true);
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        EmbeddingOptimization { target, optimizer: AdamW::new(vec![(OPTIMIZED_KEY.to_string(), optimized)], config) }
    }

    /// e_opt as it stands (detached).
    pub fn optimized(&self) -> Tensor {
        self.optimizer.params()[0].1.detach()
    }

    pub fn steps_taken(&self) -> u64 {
        self.optimizer.step
    }

    /// One Adam step on the embedding; returns the sample's loss. The UNet's
    /// parameters must not require grad here (as loaded; `fine_tune_unet` turns it
    /// on only while it runs), so they collect no gradient.
    pub fn step(&mut self, denoiser: &Denoiser, latents: &Tensor, lr: f64, rng: &mut CpuRng) -> f64 {
        self.optimizer.zero_grad();
        let embedding = self.optimizer.params()[0].1.shallow_clone();
        let loss = denoiser.loss(latents, &embedding, rng);
        loss.backward();
        self.optimizer.step(lr);
        loss.double_value(&[])
    }

    /// Everything needed to resume stage (a) exactly (with the caller's RNG state).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(TARGET_KEY.to_string(), self.target.shallow_clone()), (OPTIMIZED_KEY.to_string(), self.optimized())];
        out.extend(self.optimizer.state_tensors());
        out
    }

    pub fn load_state(tensors: &HashMap<String, Tensor>, step: u64) -> anyhow::Result<Self> {
        let get = |k: &str| tensors.get(k).with_context(|| format!("the Imagic state has no `{k}`"));
        let mut me = Self::new(get(TARGET_KEY)?);
        let saved = get(OPTIMIZED_KEY)?;
        if saved.size() != me.target.size() {
            bail!("the Imagic state's `{OPTIMIZED_KEY}` has shape {:?}, the target embedding {:?}", saved.size(), me.target.size());
        }
        let _guard = tch::no_grad_guard();
        me.optimizer.params()[0].1.shallow_clone().copy_(saved);
        me.optimizer.load_state(tensors, step)?;
        Ok(me)
    }
}

/// Progress of a stage, for the caller's events and progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    Embedding,
    UNet,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub stage: Stage,
    /// 1-based.
    pub step: usize,
    pub total: usize,
    pub loss: f64,
}

/// Stage (a): `steps` Adam steps at `lr` from e_tgt; returns e_opt (float32,
/// detached). `on_step` may break off early (a stop request): e_opt as it then is.
pub fn optimize_embedding(
    denoiser: &Denoiser,
    latents: &Tensor,
    target: &Tensor,
    steps: usize,
    lr: f64,
    rng: &mut CpuRng,
    mut on_step: impl FnMut(Progress) -> ControlFlow<()>,
) -> Tensor {
    let mut stage = EmbeddingOptimization::new(target);
    for step in 1..=steps {
        let loss = stage.step(denoiser, latents, lr, rng);
        if on_step(Progress { stage: Stage::Embedding, step, total: steps, loss }).is_break() {
            break;
        }
    }
    stage.optimized()
}

/// One UNet step of stage (b) with e_opt fixed; returns the sample's loss.
/// `optimizer` holds the UNet parameters to train (they must require grad).
pub fn unet_step(
    denoiser: &Denoiser,
    latents: &Tensor,
    optimized: &Tensor,
    optimizer: &mut Optimizer,
    lr: f64,
    rng: &mut CpuRng,
) -> f64 {
    optimizer.zero_grad();
    let loss = denoiser.loss(latents, &optimized.detach(), rng);
    loss.backward();
    optimizer.step(lr);
    loss.double_value(&[])
}

#[allow(clippy::too_many_arguments)]
/// Stage (b): `steps` optimizer steps on the UNet at `lr` with e_opt fixed.
/// The optimizer's parameters require grad while it runs and not after, so a
/// later stage (a) or sampling does not collect UNet gradients.
pub fn fine_tune_unet(
    denoiser: &Denoiser,
    latents: &Tensor,
    optimized: &Tensor,
    optimizer: &mut Optimizer,
    steps: usize,
    lr: f64,
    rng: &mut CpuRng,
    mut on_step: impl FnMut(Progress) -> ControlFlow<()>,
) {
    let params: Vec<Tensor> = optimizer.params().iter().map(|(_, p)| p.shallow_clone()).collect();
    for p in &params {
        let _ = p.shallow_clone().requires_grad_(true);
    }
    for step in 1..=steps {
        let loss = unet_step(denoiser, latents, optimized, optimizer, lr, rng);
        if on_step(Progress { stage: Stage::UNet, step, total: steps, loss }).is_break() {
            break;
        }
    }
    for p in &params {
        crate::rng::set_grad_to_none(p);
        let _ = p.shallow_clone().requires_grad_(false);
    }
}

/// Stage (c)'s conditioning: η·e_tgt + (1−η)·e_opt (η = 1 gives e_tgt exactly,
/// η = 0 gives e_opt).
pub fn interpolate(target: &Tensor, optimized: &Tensor, eta: f64) -> Tensor {
    let optimized = optimized.to_kind(target.kind());
    target * eta + optimized * (1.0 - eta)
}

/// Writes e_tgt and e_opt (float32) with the prompt as metadata, for `generate`.
pub fn save_embeddings(path: &Path, target: &Tensor, optimized: &Tensor, prompt: &str) -> anyhow::Result<()> {
    if target.size() != optimized.size() {
        bail!("the Imagic embeddings differ in shape ({:?} vs {:?})", target.size(), optimized.size());
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("imagic.prompt".to_string(), prompt.to_string());
    let tensors = vec![
        (TARGET_KEY.to_string(), target.detach().to_kind(Kind::Float)),
        (OPTIMIZED_KEY.to_string(), optimized.detach().to_kind(Kind::Float)),
    ];
    write_safetensors(path, &tensors, Some(&metadata))
}

/// What `save_embeddings` wrote: (e_tgt, e_opt, prompt).
pub fn load_embeddings(path: &Path) -> anyhow::Result<(Tensor, Tensor, String)> {
    let file = SafetensorsFile::open(path)?;
    let mut tensors = file.load_all()?;
    let mut take = |key: &str| {
        tensors.remove(key).with_context(|| format!("{} has no tensor `{key}`; it is not an Imagic embeddings file", path.display()))
    };
    let target = take(TARGET_KEY)?;
    let optimized = take(OPTIMIZED_KEY)?;
    if target.size() != optimized.size() {
        bail!("{}: the Imagic embeddings differ in shape ({:?} vs {:?})", path.display(), target.size(), optimized.size());
    }
    let prompt = file.metadata().get("imagic.prompt").cloned().unwrap_or_default();
    Ok((target, optimized, prompt))
}
