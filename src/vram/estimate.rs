//! The peak-memory model of one training run: what stays on the device for the
//! whole run (weights, optimizer state, EMA, kept gradients) plus the largest
//! of the transient phases (the training step's forward and backward, the
//! optimizer step, the per-step VAE encode, preview sampling).
//!
//! Assumptions, as our trainer trains: trained weights are float32 masters; under mixed
//! precision autocast keeps one half-precision copy of each for the step;
//! networks that never train are stored in the half dtype under mixed
//! precision (a LoRA run's base UNet, a frozen text encoder), float32 otherwise;
//! gradients are float32; prior preservation doubles the batch.
//! The backward pass is simulated layer by layer in reverse: each layer's saved
//! activations are freed as its parameters' gradients appear.

use super::activations::{checkpointed, largest_tensor, output, saved, ActSettings};
use super::model::ModelShapes;
use super::shapes::{lora_params, Layer, LayerKind, Param};
use crate::config::schema::{MixedPrecision, Optimizer, RunConfig};
use crate::model::attention::AttentionBackend;
use crate::train::modules::{half_storage, HalfStorage};

/// The settings the estimate depends on (from a run config).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub resolution: i64,
    /// Images per UNet forward (the batch, doubled by prior preservation).
    pub batch: i64,
    pub mixed: MixedPrecision,
    pub attention: AttentionBackend,
    pub gradient_checkpointing: bool,
    pub optimizer: Optimizer,
    pub use_lora: bool,
    pub lora_rank: i64,
    /// The text encoder's adapters' rank.
    pub lora_text_encoder_rank: i64,
    pub lora_layers: crate::config::schema::LoraLayers,
    pub train_unet: bool,
    pub train_text_encoder: bool,
    pub use_ema: bool,
    pub cache_latents: bool,
    pub set_grads_to_none: bool,
    pub previews: bool,
    /// Networks the trainer stores in the half dtype (the trainer's own rule).
    pub half_storage: HalfStorage,
    /// 75-token windows a prompt is read in (`training.max_token_length` ÷ 75).
    pub token_windows: i64,
}

impl Plan {
    pub fn from_config(c: &RunConfig) -> Self {
        let t = &c.training;
        let prior = c.concepts.iter().any(|k| !k.class_prompt.trim().is_empty());
        Plan {
            resolution: c.resolution,
            batch: i64::from(t.batch_size) * if prior { 2 } else { 1 },
            // Imagic trains in float32 whatever the setting says.
            mixed: if t.train_imagic_only { MixedPrecision::No } else { t.mixed_precision },
            attention: t.attention,
            gradient_checkpointing: t.gradient_checkpointing,
            optimizer: t.optimizer,
            use_lora: t.use_lora,
            lora_rank: i64::from(t.lora_rank),
            lora_text_encoder_rank: i64::from(t.text_encoder_lora().0),
            lora_layers: t.lora_layers,
            train_unet: t.train_unet,
            train_text_encoder: t.text_encoder_train_ratio > 0.0,
            use_ema: t.use_ema,
            cache_latents: t.cache_latents,
            set_grads_to_none: t.set_grads_to_none,
            previews: t.save_preview_every_n_epochs > 0,
            half_storage: half_storage(t),
            token_windows: (i64::from(t.max_token_length) / 75).max(1),
        }
    }

    fn half(&self) -> bool {
        self.mixed != MixedPrecision::No
    }

    /// Bytes per element of frozen weights and of autocast copies.
    fn weight_bytes(&self) -> u64 {
        if self.half() { 2 } else { 4 }
    }

    fn dtype_name(&self) -> &'static str {
        match self.mixed {
            MixedPrecision::No => "fp32",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }
}

/// One line of the estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// "resident", "training step", "optimizer step", "VAE encode", "preview".
    pub phase: &'static str,
    pub what: String,
    pub detail: String,
    pub bytes: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub rows: Vec<Row>,
    /// Bytes on the device for the whole run.
    pub resident: u64,
    /// Transient bytes per phase on top of `resident`.
    pub phases: Vec<(&'static str, u64)>,
    /// resident + the largest phase: what the caching allocator's peak should read.
    pub peak: u64,
    pub peak_phase: &'static str,
    pub trained_params: u64,
    /// Bytes one checkpoint of the run takes on disk (weights, EMA, optimizer state).
    pub checkpoint_bytes: u64,
}

/// What CUDA needs beyond the allocator's figure: the context (kernels, cuBLAS
/// and cuDNN workspaces) and the caching allocator's rounding and fragmentation.
pub fn with_cuda_overhead(peak: u64) -> u64 {
    peak + peak / 20 + 600 * (1 << 20)
}

fn numel(params: &[Param]) -> u64 {
    params.iter().map(Param::numel).sum()
}

/// AdamW state bytes of one tensor: two float32 moments, or, for the 8-bit
/// optimizer, two uint8 codes plus one float32 absmax per 256-element block per
/// moment (tensors under 4096 elements keep float32 moments, as bitsandbytes does).
pub fn optimizer_bytes(opt: Optimizer, numel: u64) -> u64 {
    crate::train::optimizer::Optimizer::state_bytes_for(opt, numel as i64)
}

/// Display group of a module path: `down_blocks.0`, `mid_block`, `encoder.layers`...
fn group_of(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["down_blocks" | "up_blocks", i, ..] => format!("{}.{i}", parts[0]),
        ["encoder" | "decoder", "down_blocks" | "up_blocks", i, ..] => format!("{}.{}.{i}", parts[0], parts[1]),
        ["encoder", "layers", ..] => "encoder.layers".into(),
        [first, ..] => first.to_string(),
        [] => String::new(),
    }
}

fn grouped(layers: &[Layer]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for p in layers.iter().flat_map(|l| &l.params) {
        let g = group_of(&p.key);
        match out.iter_mut().find(|(k, _)| *k == g) {
            Some((_, n)) => *n += p.numel(),
            None => out.push((g, p.numel())),
        }
    }
    out
}

pub fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The trained tensors of a part, by layer (LoRA adapters of `lora_rank`, or all parameters).
fn trained_by_layer(layers: &[Layer], plan: &Plan, lora_rank: i64) -> Vec<Vec<Param>> {
    let targets = crate::model::lora::LoraTargets::of(plan.lora_layers);
    layers.iter().map(|l| if plan.use_lora { lora_params(l, lora_rank, &targets) } else { l.params.clone() }).collect()
}

pub fn estimate(m: &ModelShapes, plan: &Plan) -> Estimate {
    // A copy of the shapes only for long prompts: the wizard re-rates every preset on each change.
    let windowed;
    let m = if plan.token_windows > 1 {
        windowed = m.with_token_windows(plan.token_windows);
        &windowed
    } else {
        m
    };
    let wb = plan.weight_bytes();
    let dt = plan.dtype_name();
    let mut rows = Vec::new();
    let push = |rows: &mut Vec<Row>, phase, what: String, detail: String, bytes: u64| {
        rows.push(Row { phase, what, detail, bytes: bytes as i64 })
    };

    // --- which tensors train, and in which dtype each part is stored.
    let unet_trained: Vec<Vec<Param>> =
        if plan.train_unet { trained_by_layer(&m.unet, plan, plan.lora_rank) } else { vec![Vec::new(); m.unet.len()] };
    let text_trained: Vec<Vec<Param>> = if plan.train_text_encoder {
        trained_by_layer(&m.text, plan, plan.lora_text_encoder_rank)
    } else {
        vec![Vec::new(); m.text.len()]
    };
    // Trained weights are float32 masters; the networks that never train are stored
    // in the half dtype under mixed precision (train::modules::half_storage).
    let (unet_half, text_half) = (plan.half_storage.unet, plan.half_storage.text_encoder);
    let (unet_weight_bytes, text_weight_bytes) = (if unet_half { wb } else { 4 }, if text_half { wb } else { 4 });
    let (unet_dtype, text_dtype) = (if unet_half { dt } else { "fp32" }, if text_half { dt } else { "fp32" });

    let mut resident = 0u64;
    for (group, n) in grouped(&m.unet) {
        let b = n * unet_weight_bytes;
        resident += b;
        push(&mut rows, "resident", format!("UNet {group}"), format!("{:.1} M params, {unet_dtype}", n as f64 / 1e6), b);
    }
    let text_n: u64 = m.text.iter().map(|l| numel(&l.params)).sum();
    let b = text_n * text_weight_bytes;
    resident += b;
    push(&mut rows, "resident", "text encoder".into(), format!("{:.1} M params, {text_dtype}", text_n as f64 / 1e6), b);
    let vae_n: u64 = m.vae_encoder.iter().chain(&m.vae_decoder).map(|l| numel(&l.params)).sum();
    let vae_bytes = vae_n * 4;
    if plan.cache_latents {
        push(&mut rows, "resident", "VAE".into(), "off the device (cache_latents)".into(), 0);
    } else {
        resident += vae_bytes;
        push(&mut rows, "resident", "VAE".into(), format!("{:.1} M params, fp32", vae_n as f64 / 1e6), vae_bytes);
    }

    let trained: Vec<&Param> = unet_trained.iter().chain(&text_trained).flatten().collect();
    let trained_n: u64 = trained.iter().map(|p| p.numel()).sum();
    if plan.use_lora {
        let b = trained_n * 4;
        resident += b;
        let ranks = if plan.train_text_encoder && plan.lora_text_encoder_rank != plan.lora_rank {
            format!("rank {} (text encoder {})", plan.lora_rank, plan.lora_text_encoder_rank)
        } else {
            format!("rank {}", plan.lora_rank)
        };
        let layers = match plan.lora_layers {
            crate::config::schema::LoraLayers::Attention => "attention",
            crate::config::schema::LoraLayers::Transformer => "transformer layers",
            crate::config::schema::LoraLayers::All => "all layers (LoCon)",
        };
        push(
            &mut rows,
            "resident",
            "LoRA adapters".into(),
            format!("{ranks} on {layers}, {:.2} M params, fp32", trained_n as f64 / 1e6),
            b,
        );
    }
    let opt: u64 = trained.iter().map(|p| optimizer_bytes(plan.optimizer, p.numel())).sum();
    resident += opt;
    let opt_name = match plan.optimizer {
        Optimizer::Adamw => "AdamW, fp32 moments (8 B/param)",
        Optimizer::Adamw8bit => "8-bit AdamW (2 B/param + absmax per 256)",
    };
    push(&mut rows, "resident", "optimizer state".into(), opt_name.into(), opt);
    // The EMA follows the UNet only (the trainer's `Ema::new(&params.unet)`).
    let unet_trained_n: u64 = unet_trained.iter().flatten().map(|p| p.numel()).sum();
    let ema = if plan.use_ema { unet_trained_n * 4 } else { 0 };
    if plan.use_ema {
        resident += ema;
        push(&mut rows, "resident", "EMA copy".into(), "fp32 copy of the trained UNet weights".into(), ema);
    }
    // What `Trainer::checkpoint` writes: the adapters of a LoRA run, else the
    // float32 UNet and (when it trains) text encoder; the EMA; the optimizer state.
    let unet_n: u64 = m.unet.iter().map(|l| numel(&l.params)).sum();
    let saved_weights = if plan.use_lora {
        trained_n * 4
    } else {
        unet_n * 4 + if plan.train_text_encoder { text_n * 4 } else { 0 }
    };
    let checkpoint_bytes = saved_weights + ema + opt;
    let grads_total = trained_n * 4;
    if !plan.set_grads_to_none {
        resident += grads_total;
        push(&mut rows, "resident", "gradients".into(), "fp32, kept between steps (set_grads_to_none: false)".into(), grads_total);
    }

    // --- the training step: text encoder then UNet forward, backward in reverse.
    let latent = plan.resolution / m.vae_factor.max(1);
    let act = ActSettings {
        batch: plan.batch,
        height: latent,
        width: latent,
        mixed: plan.half(),
        sdpa: plan.attention != AttentionBackend::Default,
    };
    let mut step_rows = Vec::new();
    // Autocast's cached half copies of float32 trained weights, alive from forward to backward.
    let cast_copies = if plan.half() && !plan.use_lora { trained_n * 2 } else { 0 };
    if cast_copies > 0 {
        step_rows.push(("autocast weight copies".to_string(), format!("{dt} copies of the fp32 trained weights"), cast_copies));
    }
    // The sequence of layers that keep activations: the text encoder only when it trains.
    let mut seq: Vec<(&Layer, u64)> = Vec::new();
    if plan.train_text_encoder {
        for (l, t) in m.text.iter().zip(&text_trained) {
            seq.push((l, numel(t) * 4));
        }
    }
    let unet_has_grad = plan.train_unet || plan.train_text_encoder;
    if unet_has_grad {
        for (l, t) in m.unet.iter().zip(&unet_trained) {
            seq.push((l, numel(t) * 4));
        }
    }
    let ckpt = plan.gradient_checkpointing;
    let kept = |l: &Layer| if ckpt && l.checkpointable { checkpointed(&l.kind, &act) } else { saved(&l.kind, &act) };
    let activations: u64 = seq.iter().map(|(l, _)| kept(l)).sum();
    let no_attn = ActSettings { sdpa: true, ..act };
    let attention_part: u64 = if act.sdpa {
        0
    } else {
        // Summed before subtracting: at 8×8 latents SDPA's own output copy
        // outweighs the small score matrices, so a layer's difference can be negative.
        let kept_layers = || seq.iter().filter(|(l, _)| !(ckpt && l.checkpointable));
        let explicit: u64 = kept_layers().map(|(l, _)| saved(&l.kind, &act)).sum();
        let fused: u64 = kept_layers().map(|(l, _)| saved(&l.kind, &no_attn)).sum();
        explicit.saturating_sub(fused)
    };
    // Walk backward: at layer i the earlier layers' activations are still held,
    // later layers' gradients already exist (set_grads_to_none) and layer i
    // needs its own activations (recomputed when checkpointed) and working buffers.
    let mut peak_step = activations;
    let mut held = activations;
    let mut grads_made = 0u64;
    for (l, g) in seq.iter().rev() {
        let recompute = if ckpt && l.checkpointable { saved(&l.kind, &act) } else { 0 };
        let work = 2 * largest_tensor(&l.kind, &act) + output(&l.kind, &act);
        let fresh_grads = if plan.set_grads_to_none { grads_made + g } else { 0 };
        peak_step = peak_step.max(held + recompute + work + fresh_grads);
        held -= kept(l);
        grads_made += g;
    }
    let grads_live = if plan.set_grads_to_none { grads_total } else { 0 };
    peak_step = peak_step.max(grads_live);
    let what_ckpt = if ckpt { "gradient checkpointing on" } else { "no checkpointing" };
    step_rows.push((
        "activations saved for backward".into(),
        format!("{what_ckpt}, batch {}, {}×{} latents", plan.batch, latent, latent),
        activations - attention_part,
    ));
    if !act.sdpa {
        step_rows.push(("attention score matrices".into(), "default back end (explicit softmax)".into(), attention_part));
    } else {
        step_rows.push(("attention score matrices".into(), "none kept (SDPA back end)".into(), 0));
    }
    if plan.set_grads_to_none {
        step_rows.push(("gradients".into(), "fp32, made during backward, freed after the step".into(), grads_total));
    }
    let listed: u64 = step_rows.iter().map(|r| r.2).sum::<u64>();
    let step_total = cast_copies + peak_step;
    for (what, detail, b) in step_rows {
        push(&mut rows, "training step", what, detail, b);
    }
    let balance = step_total as i64 - listed as i64;
    rows.push(Row {
        phase: "training step",
        what: if balance >= 0 { "backward working memory".into() } else { "backward overlap".into() },
        detail: if balance >= 0 {
            "gradients of outputs, recomputed segments".into()
        } else {
            "activations freed as gradients appear".into()
        },
        bytes: balance,
    });

    // --- optimizer step: all gradients plus per-tensor temporaries.
    let largest = trained.iter().map(|p| p.numel()).max().unwrap_or(0);
    let (temps, unit_name) = match plan.optimizer {
        Optimizer::Adamw => (3 * 4 * largest, "largest tensor's working copies"),
        // On CUDA the 8-bit update runs on flat groups of parameters: the
        // gathered gradients and weights, both dequantised moments and the
        // update's temporaries, ~7 float32 copies of a group.
        Optimizer::Adamw8bit => {
            let group = (crate::train::adamw8bit::GROUP_NUMEL as u64).min(trained_n).max(largest);
            (7 * 4 * group, "a parameter group's working copies")
        }
    };
    let opt_step = grads_live + temps;
    push(&mut rows, "optimizer step", "gradients + update temporaries".into(), unit_name.into(), opt_step);

    // --- VAE encode each step (latents not cached): no grad, a few live tensors.
    let pixel = ActSettings { height: plan.resolution, width: plan.resolution, ..act };
    let inference_peak = |layers: &[Layer], s: &ActSettings| -> u64 {
        layers.iter().map(|l| 2 * largest_tensor(&l.kind, s) + output(&l.kind, s)).max().unwrap_or(0)
    };
    let mut phases = vec![("training step", step_total), ("optimizer step", opt_step)];
    if !plan.cache_latents {
        let enc = inference_peak(&m.vae_encoder, &pixel);
        push(&mut rows, "VAE encode", "encoder activations".into(), "no grad, each step".into(), enc);
        phases.push(("VAE encode", enc));
    }
    // --- previews: classifier-free guidance runs the UNet at batch 2, then the VAE decodes.
    if plan.previews {
        let p = ActSettings { batch: 2, ..act };
        let skips: u64 = m
            .unet
            .iter()
            .filter(|l| l.name.starts_with("down_blocks") && !matches!(l.kind, LayerKind::TransformerBlock { .. }))
            .map(|l| output(&l.kind, &p))
            .sum();
        let unet_peak = skips + inference_peak(&m.unet, &p);
        let dec = inference_peak(&m.vae_decoder, &ActSettings { batch: 1, ..pixel });
        let vae_back = if plan.cache_latents { vae_bytes } else { 0 };
        let b = vae_back + unet_peak.max(dec);
        let detail = format!("UNet batch 2 (guidance), VAE decode{}", if plan.cache_latents { ", VAE back on the device" } else { "" });
        push(&mut rows, "preview", "sampling".into(), detail, b);
        // Grads are freed before previews when set to none.
        phases.push(("preview", b));
    }
    let (peak_phase, worst) = phases.iter().copied().max_by_key(|(_, b)| *b).unwrap_or(("training step", 0));
    Estimate { rows, resident, phases, peak: resident + worst, peak_phase, trained_params: trained_n, checkpoint_bytes }
}
