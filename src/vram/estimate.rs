//! The peak-memory model of one training run: what stays on the device for the
//! whole run (weights, optimizer state, EMA, kept gradients) plus the largest
//! of the transient phases (the training step's forward and backward, the
//! optimizer step, the per-step VAE encode, preview sampling).
//!
//! Assumptions, as our trainer trains: trained weights are float32 masters; under mixed
//! precision autocast caches a half-precision copy of each through the forward
//! pass, after which only the copies autograd saved (layers not checkpointed)
//! remain; networks that never train are stored in the half dtype under mixed
//! precision (a LoRA run's base UNet, frozen text encoders), float32 otherwise;
//! gradients are float32; prior preservation doubles the batch; frozen text
//! encoders' output is cached per prompt.
//! The backward pass is simulated layer by layer in reverse: each layer's saved
//! activations are freed as its parameters' gradients appear (and, with
//! `fused_backward`, each gradient is applied and freed at once).

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
    /// `training.fused_backward`: each tensor is updated as its gradient is
    /// ready and the gradient freed, so the whole set never exists at once.
    pub fused_backward: bool,
    /// Prompts whose frozen text-encoder output the trainer keeps on the device.
    pub cached_prompts: i64,
    /// Prior preservation: class images may be generated before the first step.
    pub class_images: bool,
}

/// The most prompts whose frozen text states the trainer keeps (its cache's cap).
const MAX_CACHED_PROMPTS: i64 = 512;

/// Distinct prompts a run conditions on: each concept's instance prompt and
/// (with prior preservation) class prompt, or the cache's cap where
/// `[filewords]` gives each image words of its own.
fn cached_prompt_count(c: &RunConfig) -> i64 {
    let prompts = |p: &str| if p.contains("[filewords]") { MAX_CACHED_PROMPTS } else { 1 };
    let n: i64 = c
        .concepts
        .iter()
        .map(|k| prompts(&k.instance_prompt) + if k.class_prompt.trim().is_empty() { 0 } else { prompts(&k.class_prompt) })
        .sum();
    n.min(MAX_CACHED_PROMPTS)
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
            previews: t.save_preview_every_n_epochs > 0 || t.sample_before_training,
            half_storage: half_storage(t),
            token_windows: (i64::from(t.max_token_length) / 75).max(1),
            // Imagic's stages step as usual.
            fused_backward: t.fused_backward && !t.train_imagic_only,
            cached_prompts: cached_prompt_count(c),
            class_images: prior && !t.train_imagic_only,
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

/// Bytes of the optimizer's working copies while it updates `numel` elements at once.
fn update_temporaries(opt: Optimizer, numel: u64) -> u64 {
    match opt {
        // The moments' new values and the update, float32.
        Optimizer::Adamw => 3 * 4 * numel,
        // The gathered gradients and weights, both dequantised moments and the
        // update's temporaries: ~7 float32 copies.
        Optimizer::Adamw8bit => 7 * 4 * numel,
    }
}

/// A layer of the training step's forward pass, with what training it costs.
struct StepLayer<'a> {
    layer: &'a Layer,
    /// Bytes of its trained tensors' gradients (fp32).
    grads: u64,
    /// Elements of its largest trained tensor.
    largest: u64,
    /// Bytes of autocast's half-precision copies of its trained float32 weights.
    cast: u64,
}

impl<'a> StepLayer<'a> {
    fn new(layer: &'a Layer, trained: &[Param], casts: bool) -> Self {
        StepLayer {
            layer,
            grads: numel(trained) * 4,
            largest: trained.iter().map(Param::numel).max().unwrap_or(0),
            cast: if casts { numel(trained) * 2 } else { 0 },
        }
    }
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
    // Every text encoder of the family trains when the text encoder does.
    let text_trained: Vec<Vec<Vec<Param>>> = m
        .text_encoders
        .iter()
        .map(|e| {
            if plan.train_text_encoder {
                trained_by_layer(&e.layers, plan, plan.lora_text_encoder_rank)
            } else {
                vec![Vec::new(); e.layers.len()]
            }
        })
        .collect();
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
    let mut text_n = 0u64;
    for e in &m.text_encoders {
        let n: u64 = e.layers.iter().map(|l| numel(&l.params)).sum();
        text_n += n;
        let b = n * text_weight_bytes;
        resident += b;
        push(&mut rows, "resident", e.label(), format!("{:.1} M params, {text_dtype}", n as f64 / 1e6), b);
    }
    let vae_n: u64 = m.vae_encoder.iter().chain(&m.vae_decoder).map(|l| numel(&l.params)).sum();
    let vae_bytes = vae_n * 4;
    if plan.cache_latents {
        push(&mut rows, "resident", "VAE".into(), "off the device (cache_latents)".into(), 0);
    } else {
        resident += vae_bytes;
        push(&mut rows, "resident", "VAE".into(), format!("{:.1} M params, fp32", vae_n as f64 / 1e6), vae_bytes);
    }
    // Frozen text encoders: the trainer encodes each prompt once and keeps its
    // states (and SDXL's pooled embedding) on the device.
    let context_len = m
        .unet
        .iter()
        .find_map(|l| match l.kind {
            LayerKind::TransformerBlock { context_len, .. } => Some(context_len),
            _ => None,
        })
        .unwrap_or(77);
    if !plan.train_text_encoder && plan.cached_prompts > 0 {
        let width: i64 = m.text_encoders.iter().map(|e| e.hidden_size()).sum();
        let pooled: i64 = m.text_encoders.iter().filter_map(|e| e.pooled_width()).sum();
        let per_prompt = (context_len * width + pooled) as u64 * text_weight_bytes;
        let b = per_prompt * plan.cached_prompts as u64;
        resident += b;
        let what = if pooled > 0 { "text states + pooled embedding" } else { "text states" };
        let prompts = if plan.cached_prompts == 1 { "1 prompt's".to_string() } else { format!("{} prompts'", plan.cached_prompts) };
        let detail = format!("{prompts} frozen encoder output, {text_dtype}");
        push(&mut rows, "resident", format!("cached {what}"), detail, b);
    }

    let trained: Vec<&Param> = unet_trained.iter().chain(text_trained.iter().flatten()).flatten().collect();
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
    // float32 UNet and (when they train) text encoders; the EMA; the optimizer state.
    let unet_n: u64 = m.unet.iter().map(|l| numel(&l.params)).sum();
    let saved_weights = if plan.use_lora {
        trained_n * 4
    } else {
        unet_n * 4 + if plan.train_text_encoder { text_n * 4 } else { 0 }
    };
    let checkpoint_bytes = saved_weights + ema + opt;

    // --- the training step: text encoders then UNet forward, backward in reverse.
    // The layers that keep activations: the text encoders' only when they train
    // (and only those they run), the UNet's when anything trains through it.
    // Under autocast each trained float32 weight gets a half-precision copy (a
    // LoRA run's base is stored in the half dtype already; its adapters are small).
    let casts = plan.half() && !plan.use_lora;
    let step_layer = |layer, trained: &[Param]| StepLayer::new(layer, trained, casts);
    let mut seq: Vec<StepLayer> = Vec::new();
    if plan.train_text_encoder {
        for (e, trained) in m.text_encoders.iter().zip(&text_trained) {
            for (i, (l, t)) in e.layers.iter().zip(trained).enumerate() {
                if e.runs(i) {
                    seq.push(step_layer(l, t));
                }
            }
        }
    }
    if plan.train_unet || plan.train_text_encoder {
        for (l, t) in m.unet.iter().zip(&unet_trained) {
            seq.push(step_layer(l, t));
        }
    }
    // Tensors that never run get no gradient.
    let grads_total: u64 = seq.iter().map(|s| s.grads).sum();
    if !plan.set_grads_to_none && !plan.fused_backward {
        resident += grads_total;
        push(&mut rows, "resident", "gradients".into(), "fp32, kept between steps (set_grads_to_none: false)".into(), grads_total);
    }

    let latent = plan.resolution / m.vae_factor.max(1);
    let act = ActSettings {
        batch: plan.batch,
        height: latent,
        width: latent,
        mixed: plan.half(),
        sdpa: plan.attention != AttentionBackend::Explicit,
    };
    let ckpt = plan.gradient_checkpointing;
    let checkpointed_layer = |l: &Layer| ckpt && l.checkpointable;
    let kept = |l: &Layer| if checkpointed_layer(l) { checkpointed(&l.kind, &act) } else { saved(&l.kind, &act) };
    let activations: u64 = seq.iter().map(|s| kept(s.layer)).sum();
    let no_attn = ActSettings { sdpa: true, ..act };
    let attention_part: u64 = if act.sdpa {
        0
    } else {
        // Summed before subtracting: at 8×8 latents SDPA's own output copy
        // outweighs the small score matrices, so a layer's difference can be negative.
        let kept_layers = || seq.iter().filter(|s| !checkpointed_layer(s.layer));
        let explicit: u64 = kept_layers().map(|s| saved(&s.layer.kind, &act)).sum();
        let fused: u64 = kept_layers().map(|s| saved(&s.layer.kind, &no_attn)).sum();
        explicit.saturating_sub(fused)
    };
    // A fused step updates one tensor at a time, inside the backward pass.
    let fused_update = |s: &StepLayer| 4 * s.largest + update_temporaries(plan.optimizer, s.largest);
    // The end of the forward pass: every kept activation, and autocast's cache
    // holding every weight copy (it is cleared when the forward pass leaves autocast).
    let cast_copies: u64 = seq.iter().map(|s| s.cast).sum();
    let mut peak_step = activations + cast_copies;
    // Walk backward: at layer i the earlier layers' activations are still held,
    // and so are the weight copies of the layers not checkpointed (autograd saved
    // them; a checkpointed layer casts its weights again when it recomputes);
    // later layers' gradients already exist (set_grads_to_none; a fused step has
    // applied and freed them), and layer i needs its own activations
    // (recomputed when checkpointed) and working buffers.
    let mut held = activations;
    let mut held_casts: u64 = seq.iter().filter(|s| !checkpointed_layer(s.layer)).map(|s| s.cast).sum();
    let mut grads_made = 0u64;
    let mut largest_update = 0u64;
    for s in seq.iter().rev() {
        let l = s.layer;
        let recompute = if checkpointed_layer(l) { saved(&l.kind, &act) + s.cast } else { 0 };
        let work = 2 * largest_tensor(&l.kind, &act) + output(&l.kind, &act);
        let fresh_grads = if plan.fused_backward {
            fused_update(s)
        } else if plan.set_grads_to_none {
            grads_made + s.grads
        } else {
            0
        };
        largest_update = largest_update.max(fused_update(s));
        peak_step = peak_step.max(held + held_casts + recompute + work + fresh_grads);
        held -= kept(l);
        if !checkpointed_layer(l) {
            held_casts -= s.cast;
        }
        grads_made += s.grads;
    }
    let grads_live = if plan.set_grads_to_none && !plan.fused_backward { grads_total } else { 0 };
    peak_step = peak_step.max(grads_live);

    let mut step_rows = Vec::new();
    if cast_copies > 0 {
        let detail = format!("{dt} copies of the fp32 trained weights, cached through the forward pass");
        step_rows.push(("autocast weight copies".to_string(), detail, cast_copies));
    }
    let what_ckpt = if ckpt { "gradient checkpointing on" } else { "no checkpointing" };
    step_rows.push((
        "activations saved for backward".into(),
        format!("{what_ckpt}, batch {}, {}×{} latents", plan.batch, latent, latent),
        activations - attention_part,
    ));
    if !act.sdpa {
        step_rows.push(("attention score matrices".into(), "explicit back end (softmax of q kᵀ)".into(), attention_part));
    } else {
        step_rows.push(("attention score matrices".into(), "none kept (SDPA back end)".into(), 0));
    }
    if plan.fused_backward {
        let detail = "fused_backward: one tensor's fp32 gradient and update at a time".to_string();
        step_rows.push(("gradient + optimizer update".into(), detail, largest_update));
    } else if plan.set_grads_to_none {
        step_rows.push(("gradients".into(), "fp32, made during backward, freed after the step".into(), grads_total));
    }
    let listed: u64 = step_rows.iter().map(|r| r.2).sum::<u64>();
    let step_total = peak_step;
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
            "activations and weight copies freed as gradients appear".into()
        },
        bytes: balance,
    });
    let mut phases = vec![("training step", step_total)];

    // --- optimizer step: all gradients plus per-tensor temporaries (a fused step has none).
    if !plan.fused_backward {
        let largest = trained.iter().map(|p| p.numel()).max().unwrap_or(0);
        let (group, unit_name) = match plan.optimizer {
            Optimizer::Adamw => (largest, "largest tensor's working copies"),
            // On CUDA the 8-bit update runs on flat groups of parameters.
            Optimizer::Adamw8bit => {
                ((crate::train::adamw8bit::GROUP_NUMEL as u64).min(trained_n).max(largest), "a parameter group's working copies")
            }
        };
        let opt_step = grads_live + update_temporaries(plan.optimizer, group);
        push(&mut rows, "optimizer step", "gradients + update temporaries".into(), unit_name.into(), opt_step);
        phases.push(("optimizer step", opt_step));
    }

    // --- VAE encode each step (latents not cached): no grad, a few live tensors.
    let pixel = ActSettings { height: plan.resolution, width: plan.resolution, ..act };
    if !plan.cache_latents {
        let enc = inference_peak(&m.vae_encoder, &pixel);
        push(&mut rows, "VAE encode", "encoder activations".into(), "no grad, each step".into(), enc);
        phases.push(("VAE encode", enc));
    }
    // --- previews and class images: classifier-free guidance runs the UNet at
    // batch 2, then the VAE decodes.
    if plan.previews || plan.class_images {
        let unet_peak = unet_inference_peak(m, &ActSettings { batch: 2, ..act });
        let dec = inference_peak(&m.vae_decoder, &ActSettings { batch: 1, ..pixel });
        let vae_back = if plan.cache_latents { vae_bytes } else { 0 };
        let b = vae_back + unet_peak.max(dec);
        let what = match (plan.previews, plan.class_images) {
            (true, true) => "previews, class images",
            (false, true) => "class images",
            _ => "previews",
        };
        let detail = format!(
            "{what}: UNet batch 2 (guidance), VAE decode{}",
            if plan.cache_latents { ", VAE back on the device" } else { "" }
        );
        push(&mut rows, "preview", "sampling".into(), detail, b);
        // Grads are freed before previews when set to none.
        phases.push(("preview", b));
    }
    let (peak_phase, worst) = phases.iter().copied().max_by_key(|(_, b)| *b).unwrap_or(("training step", 0));
    Estimate { rows, resident, phases, peak: resident + worst, peak_phase, trained_params: trained_n, checkpoint_bytes }
}

/// The largest of a network's layers run without grad: two of its largest
/// tensors (an input and a result being made) and its output.
fn inference_peak(layers: &[Layer], s: &ActSettings) -> u64 {
    layers.iter().map(|l| 2 * largest_tensor(&l.kind, s) + output(&l.kind, s)).max().unwrap_or(0)
}

/// A UNet forward pass without grad: the down blocks' outputs wait as skips for
/// the up blocks, on top of the largest layer's working tensors.
fn unet_inference_peak(m: &ModelShapes, s: &ActSettings) -> u64 {
    let skips: u64 = m
        .unet
        .iter()
        .filter(|l| l.name.starts_with("down_blocks") && !matches!(l.kind, LayerKind::TransformerBlock { .. }))
        .map(|l| output(&l.kind, s))
        .sum();
    skips + inference_peak(&m.unet, s)
}

/// What `generate` draws with: the size, the images a UNet pass (2 with
/// classifier-free guidance), the weights' dtype and the attention.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingPlan {
    pub width: i64,
    pub height: i64,
    /// Images a UNet pass: 2 with classifier-free guidance (the prompt and the negative one).
    pub batch: i64,
    /// The UNet and text encoders in fp16 (`generate` on CUDA); the VAE stays float32.
    pub half: bool,
    pub attention: AttentionBackend,
}

/// The peak memory of drawing one image: the model's weights in their dtypes,
/// then the larger of the denoising UNet pass and the VAE decode at the asked size.
pub fn estimate_sampling(m: &ModelShapes, plan: &SamplingPlan) -> Estimate {
    let wb: u64 = if plan.half { 2 } else { 4 };
    let dt = if plan.half { "fp16" } else { "fp32" };
    let mut rows = Vec::new();
    let mut row = |phase, what: &str, detail: String, bytes: u64| {
        rows.push(Row { phase, what: what.to_string(), detail, bytes: bytes as i64 })
    };
    let unet_n = count_layers(&m.unet);
    let text_n: u64 = m.text_encoders.iter().map(|e| count_layers(&e.layers)).sum();
    let vae_n = count_layers(&m.vae_encoder) + count_layers(&m.vae_decoder);
    row("resident", "UNet", format!("{:.1} M params, {dt}", unet_n as f64 / 1e6), unet_n * wb);
    row("resident", "text encoders", format!("{:.1} M params, {dt}", text_n as f64 / 1e6), text_n * wb);
    row("resident", "VAE", format!("{:.1} M params, fp32", vae_n as f64 / 1e6), vae_n * 4);
    let resident = (unet_n + text_n) * wb + vae_n * 4;
    let f = m.vae_factor.max(1);
    let act = ActSettings {
        batch: plan.batch.max(1),
        height: plan.height / f,
        width: plan.width / f,
        mixed: plan.half,
        sdpa: plan.attention != AttentionBackend::Explicit,
    };
    let unet = unet_inference_peak(m, &act);
    let detail = format!("batch {}, {}×{} latents", act.batch, act.width, act.height);
    row("denoising", "UNet activations", detail, unet);
    let pixel = ActSettings { batch: 1, height: plan.height, width: plan.width, mixed: false, ..act };
    let decode = inference_peak(&m.vae_decoder, &pixel);
    row("VAE decode", "decoder activations", format!("{}×{} pixels, fp32", plan.width, plan.height), decode);
    let phases = vec![("denoising", unet), ("VAE decode", decode)];
    let (peak_phase, worst) = phases.iter().copied().max_by_key(|(_, b)| *b).unwrap_or(("denoising", 0));
    Estimate { rows, resident, phases, peak: resident + worst, peak_phase, trained_params: 0, checkpoint_bytes: 0 }
}

fn count_layers(layers: &[Layer]) -> u64 {
    layers.iter().map(|l| numel(&l.params)).sum()
}
