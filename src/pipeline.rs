//! Text-to-image sampling (previews, class images, `generate`), step for step as
//! diffusers' `StableDiffusionPipeline` and `StableDiffusionXLPipeline`: encode
//! the prompt and the negative prompt (the family's conditioner), draw the
//! initial latents from the CPU generator seeded with the seed, run the sampler
//! with classifier-free guidance, decode with the VAE.

use std::path::Path;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_model, Architecture, LoadedModel};
use crate::conditioning::{PromptEmbeds, SizeIds, TextConditioner};
use crate::error::usage;
use crate::model::attention::AttentionBackend;
use crate::model::config::{UNetConfig, VaeConfig};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::model::weights::Weights;
use crate::rng::CpuRng;
use crate::scheduler::config::SchedulerConfig;
use crate::scheduler::build_sampler;

/// A loaded Stable Diffusion model (any family), ready to sample.
pub struct StableDiffusion {
    /// The family's tokenizers and text encoders.
    pub text: TextConditioner,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    pub architecture: Architecture,
    pub device: Device,
    /// Kind of the UNet and text encoders; the VAE stays in float32 (SD's VAE
    /// overflows in fp16, diffusers' `force_upcast`).
    pub kind: Kind,
}

/// The tensors of each network by checkpoint key (diffusers names; the text
/// encoders' without `text_model.`), shared with the modules that use them.
pub struct ModelParameters {
    pub unet: Vec<(String, Tensor)>,
    /// Each text encoder's, under its role's name (`text_encoder`, `text_encoder_2`), in the family's order.
    pub text_encoders: Vec<(&'static str, Vec<(String, Tensor)>)>,
    pub vae: Vec<(String, Tensor)>,
}

impl ModelParameters {
    /// The tensors of the text encoder called `name` (empty when the model has none).
    pub fn text_encoder(&self, name: &str) -> &[(String, Tensor)] {
        self.text_encoders.iter().find(|(n, _)| *n == name).map_or(&[], |(_, list)| list.as_slice())
    }

    /// Every text encoder's tensors, with the encoder's name.
    pub fn text_tensors(&self) -> impl Iterator<Item = (&'static str, &(String, Tensor))> {
        self.text_encoders.iter().flat_map(|(name, list)| list.iter().map(move |p| (*name, p)))
    }
}

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub steps: usize,
    pub sampler: String,
    pub guidance: f64,
    pub width: i64,
    pub height: i64,
    /// A1111's clip skip: 1 = last layer.
    pub clip_skip: i64,
}

/// Builds a module's weights and refuses checkpoints carrying tensors the model
/// would silently ignore (a sign of a wrong architecture guess).
fn check_all_used(w: &Weights, component: &str, source: &Path) -> anyhow::Result<()> {
    let unused = w.unused_keys();
    if let Some(first) = unused.first() {
        anyhow::bail!(
            "{}: the {component} has {} tensor(s) the model config does not use (first: `{first}`); the architecture does not match the file",
            source.display(),
            unused.len()
        );
    }
    w.release();
    Ok(())
}

impl StableDiffusion {
    pub fn load(path: &Path, model_config: Option<&Path>, device: Device, attention: AttentionBackend) -> anyhow::Result<Self> {
        let loaded = load_model(path, model_config)?;
        let kind = if device.is_cuda() { Kind::Half } else { Kind::Float };
        Self::from_loaded(loaded, device, kind, attention)
    }

    pub fn from_loaded(m: LoadedModel, device: Device, kind: Kind, attention: AttentionBackend) -> anyhow::Result<Self> {
        Self::from_loaded_with_parameters(m, device, kind, attention).map(|(sd, _)| sd)
    }

    /// Like [`from_loaded`](Self::from_loaded), also handing back the tensors the
    /// modules hold, by checkpoint key: what training updates and saves.
    pub fn from_loaded_with_parameters(
        m: LoadedModel,
        device: Device,
        kind: Kind,
        attention: AttentionBackend,
    ) -> anyhow::Result<(Self, ModelParameters)> {
        let source = m.source.clone();
        let uses_text_time = m.architecture.uses_text_time();
        let (text, text_stores) =
            TextConditioner::build(m.text_encoders, uses_text_time, m.force_zeros_for_empty_prompt, device, kind, &source)?;
        let mut text_encoders = Vec::with_capacity(text_stores.len());
        for (encoder, w) in text.encoders.iter().zip(&text_stores) {
            check_all_used(w, &encoder.role.name.replace('_', " "), &source)?;
            text_encoders.push((encoder.role.name, w.parameters()));
        }
        let unet_w = Weights::new("UNet", m.unet, device, kind);
        let unet = UNet2DConditionModel::new(&unet_w, &m.unet_config, attention)
            .with_context(|| format!("{}: cannot build the UNet", source.display()))?;
        check_all_used(&unet_w, "UNet", &source)?;
        if uses_text_time != unet.added.is_some() {
            anyhow::bail!(
                "{}: the UNet config {} SDXL's added conditions, which a {} model {}",
                source.display(),
                if unet.added.is_some() { "has" } else { "lacks" },
                m.architecture,
                if uses_text_time { "needs" } else { "does not have" }
            );
        }
        let vae_w = Weights::new("VAE", m.vae, device, Kind::Float);
        let vae = AutoencoderKL::new(&vae_w, &m.vae_config)
            .with_context(|| format!("{}: cannot build the VAE", source.display()))?;
        check_all_used(&vae_w, "VAE", &source)?;
        let parameters = ModelParameters { unet: unet_w.parameters(), text_encoders, vae: vae_w.parameters() };
        let sd = StableDiffusion {
            text,
            unet,
            vae,
            unet_config: m.unet_config,
            vae_config: m.vae_config,
            scheduler_config: m.scheduler_config,
            architecture: m.architecture,
            device,
            kind,
        };
        Ok((sd, parameters))
    }

    /// Adds a kohya LoRA file into the UNet and text-encoder weights (`scale` 1 =
    /// the file's own strength); returns the number of layers it changed.
    pub fn merge_lora(&mut self, path: &Path, scale: f64) -> anyhow::Result<usize> {
        let mut texts = self.text.lora_targets();
        crate::model::lora::merge_lora(&mut self.unet, &self.architecture, &mut texts, path, scale)
    }

    /// Attaches adapters holding a kohya file's values, unmerged (to resume a LoRA
    /// run); returns them, requiring grad, in `kind`.
    pub fn attach_lora_file(&mut self, path: &Path, kind: Kind) -> anyhow::Result<crate::model::lora::LoraNetwork> {
        let mut texts = self.text.lora_targets();
        crate::model::lora::attach_lora_file(&mut self.unet, &self.architecture, &mut texts, path, kind)
    }

    /// Pixels per latent: the VAE's factor.
    pub fn vae_factor(&self) -> i64 {
        self.vae_config.downsampling_factor()
    }

    /// Image sides must be a multiple of this: the VAE factor times the UNet's downsampling.
    pub fn size_multiple(&self) -> i64 {
        self.unet_config.size_multiple(&self.vae_config)
    }

    /// The model's native image side (diffusers' default height/width).
    pub fn default_size(&self) -> i64 {
        self.unet_config.sample_size * self.vae_factor()
    }

    pub fn check_size(&self, width: i64, height: i64) -> anyhow::Result<()> {
        let m = self.size_multiple();
        for (flag, v) in [("--width", width), ("--height", height)] {
            if v <= 0 || v % m != 0 {
                return Err(usage(format!(
                    "{flag} {v} is not a positive multiple of {m} (this model's VAE factor {} times its UNet downsampling {})",
                    self.vae_factor(),
                    m / self.vae_factor()
                )));
            }
        }
        Ok(())
    }

    /// What a prompt loses to the text encoder's reach, in words, or `None` when
    /// it is read whole (diffusers' pipeline warns the same way).
    pub fn cut_prompt_warning(&self, what: &str, prompt: &str, read_more: &str) -> Option<String> {
        self.text.cut_prompt_warning(what, prompt, read_more)
    }

    /// A prompt's text conditioning `[1, 77, width]` as the pipeline feeds the UNet
    /// (`[1, 2 + max_token_length, width]` past one window), in the UNet's dtype
    /// (a trainer may keep a frozen text encoder in half precision).
    pub fn encode_prompt(&self, prompt: &str, clip_skip: i64) -> PromptEmbeds {
        self.text.encode_prompt(prompt, clip_skip, self.device, self.kind)
    }

    /// Runs the sampler; returns the image as float32 `[H, W, 3]` in [0, 1] on the CPU.
    /// `on_step(i, n)` is called after each denoising step.
    pub fn text_to_image(&self, req: &SampleRequest, on_step: impl FnMut(usize, usize)) -> anyhow::Result<Tensor> {
        let cond = tch::no_grad(|| self.encode_prompt(&req.prompt, req.clip_skip));
        self.text_to_image_with_embeddings(req, &cond, SizeIds::plain(req.height, req.width), on_step)
    }

    /// [`text_to_image`](Self::text_to_image) conditioned on given prompt embeddings
    /// (Imagic's interpolated one) instead of `req.prompt`, and SDXL's size ids
    /// `sizes`; the negative prompt is still encoded from `req.negative`.
    pub fn text_to_image_with_embeddings(
        &self,
        req: &SampleRequest,
        cond: &PromptEmbeds,
        sizes: SizeIds,
        mut on_step: impl FnMut(usize, usize),
    ) -> anyhow::Result<Tensor> {
        self.check_size(req.width, req.height)?;
        let mut sampler = build_sampler(&req.sampler, &self.scheduler_config, req.steps)?;
        let _guard = tch::no_grad_guard();
        let cond = cond.map(|t| t.to_device(self.device).to_kind(self.kind));
        let guided = req.guidance > 1.0;
        let text = if guided {
            let uncond = self.text.encode_negative(&req.negative, req.clip_skip, &cond);
            PromptEmbeds::cat(&[uncond, cond])
        } else {
            cond
        };
        let context = self.text.conditioning(&text, &[sizes]);

        // The first randn draw of a CPU generator seeded with the seed, as diffusers
        // with torch.Generator("cpu").manual_seed(seed): exact on any device. The
        // same generator feeds the sampler's own noise (euler-a).
        let mut rng = CpuRng::new(req.seed);
        let f = self.vae_factor();
        let shape = [1, self.unet_config.in_channels, req.height / f, req.width / f];
        let mut latents = rng.randn_on(&shape, self.device) * sampler.init_noise_sigma();

        let timesteps = sampler.timesteps().to_vec();
        let n = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = if guided { Tensor::cat(&[&latents, &latents], 0) } else { latents.shallow_clone() };
            let model_in = sampler.scale_model_input(&model_in, i);
            let t_batch = Tensor::from_slice(&[t as f32]).to_device(self.device).expand([model_in.size()[0]], false);
            let out = self.unet.forward(&model_in.to_kind(self.kind), &t_batch, &context).to_kind(Kind::Float);
            let noise_pred = if guided {
                let parts = out.chunk(2, 0);
                &parts[0] + (&parts[1] - &parts[0]) * req.guidance
            } else {
                out
            };
            latents = sampler.step(&noise_pred, i, &latents, &mut rng);
            on_step(i + 1, n);
        }
        let image = self.decode_latents(&latents);
        if image.isnan().any().int64_value(&[]) != 0 {
            anyhow::bail!(
                "the VAE decoded NaN pixels (the latents hold {}): the model or its VAE overflowed; an fp16 VAE of SDXL needs an fp16-safe VAE (`--vae`)",
                if latents.isnan().any().int64_value(&[]) != 0 { "NaN values too" } else { "finite values" }
            );
        }
        Ok(image)
    }

    /// Latents to an image `[H, W, 3]` in [0, 1], float32 on the CPU (first of the batch).
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let z = latents.to_kind(Kind::Float) / self.vae_config.scaling_factor;
        let image = self.vae.decode(&z);
        (image / 2.0 + 0.5).clamp(0.0, 1.0).get(0).permute([1, 2, 0]).to_device(Device::Cpu)
    }
}

/// `[H, W, 3]` float in [0, 1] to 8-bit RGB, rounding as diffusers' `numpy_to_pil`.
pub fn to_rgb8(image: &Tensor) -> anyhow::Result<image::RgbImage> {
    let size = image.size();
    let (h, w) = (size[0] as u32, size[1] as u32);
    let bytes = (image * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).contiguous();
    let len = (h * w * 3) as usize;
    let mut data = vec![0u8; len];
    bytes.f_copy_data(&mut data, len)?;
    image::RgbImage::from_raw(w, h, data).context("image buffer has the wrong size")
}

/// Writes a PNG atomically (temporary name, then rename).
pub fn save_png(image: &Tensor, path: &Path) -> anyhow::Result<()> {
    let rgb = to_rgb8(image)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(usage(format!("cannot write {}: the folder {} does not exist", path.display(), dir.display())));
    }
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let written = rgb
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if written.is_err() {
        // A full disk leaves no half image behind, not even under the temporary name.
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (logs stay clean).
pub fn progress_bar(len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
