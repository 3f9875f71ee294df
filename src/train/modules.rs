//! Which tensors train: the UNet (`train_unet`), the text encoder for the first
//! `text_encoder_train_ratio` of the steps (without its layer norms when
//! `freeze_clip_normalization`). Optimizer keys carry the network as a prefix
//! (`unet.conv_in.weight`, `text_encoder.encoder.layers.0.mlp.fc1.weight`). A
//! LoRA run (`use_lora`) trains adapters on the attention projections instead,
//! keyed by their kohya names (`lora_unet_….lora_down.weight`, `lora_te_…`).

use tch::{Kind, Tensor};

use crate::config::schema::{MixedPrecision, Training};
use crate::model::lora::{self, LoraNetwork, LoraSpec, LoraTargets};
use crate::pipeline::{ModelParameters, StableDiffusion};
use crate::rng::CpuRng;

pub const UNET_PREFIX: &str = "unet.";
/// What every text encoder's optimizer prefix starts with (`text_encoder.`, `text_encoder_2.`).
pub const TEXT_PREFIX_STEM: &str = "text_encoder";

/// CLIP's normalisation layers (layer_norm1/2 of each layer, final_layer_norm).
pub fn is_clip_norm(key: &str) -> bool {
    key.contains("layer_norm")
}

/// Number of optimizer steps during which the text encoder trains.
pub fn text_encoder_steps(training: &Training, total_steps: u64) -> u64 {
    if training.train_imagic_only {
        return 0;
    }
    (training.text_encoder_train_ratio * total_steps as f64).ceil() as u64
}

/// Which networks are stored in the autocast dtype (bf16/fp16) rather than
/// float32: under mixed precision, those whose own weights never train and are
/// never saved, as diffusers stores them (`weight_dtype`): a LoRA run's base
/// UNet, and a text encoder that never trains (or trains only through
/// adapters). Trained weights stay float32 masters; the VAE stays float32 (its
/// latents are cached and it decodes previews); Imagic trains in float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HalfStorage {
    pub unet: bool,
    pub text_encoder: bool,
}

pub fn half_storage(training: &Training) -> HalfStorage {
    if training.mixed_precision == MixedPrecision::No || training.train_imagic_only {
        return HalfStorage::default();
    }
    HalfStorage {
        unet: training.use_lora,
        text_encoder: training.use_lora || training.text_encoder_train_ratio <= 0.0,
    }
}

/// Whether an optimizer key belongs to the text encoder (full weights or adapters).
pub fn is_text_encoder_key(key: &str) -> bool {
    key.starts_with(TEXT_PREFIX_STEM) || key.starts_with(lora::TEXT_PREFIX_STEM)
}

/// What a run trains: the optimizer's tensors by key, and the adapters they
/// belong to in a LoRA run (saved as the checkpoint's `lora.safetensors`).
pub struct TrainableSet {
    pub params: Vec<(String, Tensor)>,
    pub lora: Option<LoraNetwork>,
}

/// The trainable parameter set, by optimizer key. This is the one place that
/// chooses it: the networks' own weights for a full fine-tune; for a LoRA run,
/// fresh adapters (down from a generator seeded with `seed`, up at zero) attached
/// to the UNet (`train_unet`) and the text encoder (when it trains).
pub fn choose_trainable_parameters(
    training: &Training,
    sd: &mut StableDiffusion,
    params: &ModelParameters,
    seed: u64,
) -> anyhow::Result<TrainableSet> {
    if training.use_lora {
        let spec = LoraSpec {
            rank: i64::from(training.lora_rank),
            alpha: training.lora_alpha,
            targets: LoraTargets::of(training.lora_layers),
            kind: Kind::Float,
        };
        let mut rng = CpuRng::new(seed);
        let mut net = LoraNetwork::for_family(&sd.architecture);
        if training.train_unet {
            net.extend(lora::attach_unet_lora(&mut sd.unet, &sd.architecture, &spec, &mut rng)?);
        }
        if training.text_encoder_train_ratio > 0.0 && !training.train_imagic_only {
            let (rank, alpha) = training.text_encoder_lora();
            let text_spec = LoraSpec { rank: i64::from(rank), alpha, ..spec };
            for encoder in &mut sd.text.encoders {
                net.extend(lora::attach_text_lora(&mut encoder.model, encoder.role.kohya_prefix, &text_spec, &mut rng)?);
            }
        }
        if net.modules.is_empty() {
            return Err(crate::error::usage(
                "`training.use_lora` with `train_unet: false` and `text_encoder_train_ratio: 0` leaves nothing to train",
            ));
        }
        return Ok(TrainableSet { params: net.trainable(), lora: Some(net) });
    }
    let mut out = Vec::new();
    if training.train_unet {
        out.extend(params.unet.iter().map(|(k, t)| (format!("{UNET_PREFIX}{k}"), t.shallow_clone())));
    }
    // Imagic optimises the prompt embedding itself, never the text encoder.
    if training.text_encoder_train_ratio > 0.0 && !training.train_imagic_only {
        out.extend(
            params
                .text_tensors()
                .filter(|(_, (k, _))| !(training.freeze_clip_normalization && is_clip_norm(k)))
                .map(|(name, (k, t))| (format!("{name}.{k}"), t.shallow_clone())),
        );
    }
    Ok(TrainableSet { params: out, lora: None })
}

/// Turns gradients on for `trainable` and off for everything else in `params`.
pub fn set_trainable(params: &ModelParameters, trainable: &[(String, Tensor)]) {
    let keys: std::collections::HashSet<&str> = trainable.iter().map(|(k, _)| k.as_str()).collect();
    let texts = params.text_encoders.iter().map(|(name, list)| (format!("{name}."), list));
    let lists = [(UNET_PREFIX.to_string(), &params.unet), ("vae.".to_string(), &params.vae)].into_iter().chain(texts);
    for (prefix, list) in lists {
        for (k, t) in list.iter() {
            let on = keys.contains(format!("{prefix}{k}").as_str());
            let _ = t.set_requires_grad(on);
        }
    }
}
