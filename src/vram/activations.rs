//! Bytes a layer keeps for the backward pass (what autograd saves), and what it
//! needs briefly while it runs. Counted per consumer: each op saves its inputs
//! (conv, linear, matmul, norms, SiLU, GELU) or output (softmax), as PyTorch's
//! autograd formulas do. Under autocast (bf16 / fp16) matmuls and convolutions
//! save half-precision inputs while group/layer norms and softmax run in float32
//! and save float32 tensors, which is why mixed precision does not halve
//! activation memory.

use super::shapes::LayerKind;

/// What the activation formulas depend on besides the layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActSettings {
    pub batch: i64,
    /// Latent height and width (pixels ÷ the VAE's factor); for VAE layers, pixels.
    pub height: i64,
    pub width: i64,
    /// Autocast to fp16/bf16 (2-byte activations with float32 norms and softmax).
    pub mixed: bool,
    /// The UNet's attention through SDPA (`attention: default`, `xformers`,
    /// `flash_attention`) instead of the explicit softmax(q kᵀ) v.
    pub sdpa: bool,
}

impl ActSettings {
    /// Bytes of an activation that a matmul or convolution consumes.
    fn e(&self) -> u64 {
        if self.mixed { 2 } else { 4 }
    }
    /// Positions (batch × pixels) at a layer `scale` times coarser than the input.
    fn positions(&self, scale: i64) -> u64 {
        let s = scale.max(1);
        (self.batch * ((self.height + s - 1) / s) * ((self.width + s - 1) / s)) as u64
    }
    /// Bytes of the attention probabilities kept for backward: float32 softmax
    /// output, plus its half-precision copy under autocast (what `probs @ v` saves).
    fn probs(&self, heads: i64, rows: u64, cols: u64) -> u64 {
        if self.sdpa {
            // Only the log-sum-exp per row (float32).
            return heads as u64 * rows * 4;
        }
        heads as u64 * rows * cols * if self.mixed { 4 + 2 } else { 4 }
    }
}

const F32: u64 = 4;

/// Bytes saved for backward by the whole layer (no checkpointing).
pub fn saved(kind: &LayerKind, s: &ActSettings) -> u64 {
    let e = s.e();
    match *kind {
        LayerKind::Conv { channels, scale, normed } => {
            let n = s.positions(scale) * channels as u64;
            if normed {
                // group norm input + SiLU input (float32), conv input.
                (2 * F32 + e) * n
            } else {
                e * n
            }
        }
        LayerKind::Resnet { cin, cout, scale } => {
            let n = s.positions(scale);
            // Per norm → SiLU → conv stage: norm input, SiLU input (float32), conv input.
            let stages = (2 * F32 + e) * (cin + cout) as u64 * n;
            // Under autocast the 1×1 shortcut keeps the half-precision input as well
            // (in float32 it is the very tensor norm1 keeps).
            let shortcut = if s.mixed && cin != cout { e * cin as u64 * n } else { 0 };
            stages + shortcut
        }
        LayerKind::TransformerFrame { channels, scale } => {
            // norm input (float32), proj_in input, proj_out input.
            (F32 + 2 * e) * channels as u64 * s.positions(scale)
        }
        LayerKind::TransformerBlock { dim, heads, scale, context_len, context_dim, only_cross } => {
            let t = s.positions(scale);
            let c = dim as u64;
            let per_sample = t / s.batch.max(1) as u64;
            let ctx = (s.batch * context_len) as u64;
            let norms = 3 * F32 * c * t;
            // The three projections of a normed input each cast it under autocast;
            // in float32 they share the norm's output.
            let qkv_inputs = if s.mixed { 3 * e * c * t } else { F32 * c * t };
            let sdpa_out = if s.sdpa { e * c * t } else { 0 };
            let (self_kv_len, self_q_copies) = if only_cross { (context_len as u64, 1) } else { (per_sample, 3) };
            // q, k, v as the attention consumes them, the output's copy for to_out.
            let attn1 = qkv_inputs
                + self_q_copies * e * c * t
                + if only_cross { 2 * e * c * ctx } else { 0 }
                + s.probs(heads, t, self_kv_len)
                + sdpa_out
                + e * c * t;
            let attn2 = e * c * t // to_q input
                + 2 * e * context_dim as u64 * ctx // to_k/to_v inputs (the text states)
                + e * c * t + 2 * e * c * ctx // q, k, v
                + s.probs(heads, t, context_len as u64)
                + sdpa_out
                + e * c * t;
            // GEGLU: its input, the 8c projection (both halves), GELU output, product.
            let ff = e * c * t + 16 * e * c * t;
            norms + attn1 + attn2 + ff
        }
        LayerKind::SelfAttention { dim, scale } => {
            let t = s.positions(scale);
            let c = dim as u64;
            F32 * c * t + 3 * e * c * t + 3 * e * c * t + s.probs(1, t, t / s.batch.max(1) as u64) + 2 * e * c * t
        }
        LayerKind::ClipLayer { hidden, intermediate, heads, tokens, windows } => {
            let t = (s.batch * windows * tokens) as u64;
            let (h, i) = (hidden as u64, intermediate as u64);
            let qkv_inputs = if s.mixed { 3 * e * h * t } else { F32 * h * t };
            // CLIP's attention is always the explicit one (model/clip.rs).
            let probs = ActSettings { sdpa: false, ..*s }.probs(heads, t, tokens as u64);
            2 * F32 * h * t + qkv_inputs + 4 * e * h * t + probs + e * h * t + 3 * e * i * t
        }
        LayerKind::Small => 0,
    }
}

/// Bytes a checkpointed segment keeps between forward and backward: its input.
pub fn checkpointed(kind: &LayerKind, s: &ActSettings) -> u64 {
    let e = s.e();
    match *kind {
        LayerKind::Resnet { cin, scale, .. } => e * cin as u64 * s.positions(scale),
        LayerKind::TransformerBlock { dim, scale, .. } | LayerKind::SelfAttention { dim, scale } => {
            e * dim as u64 * s.positions(scale)
        }
        LayerKind::ClipLayer { hidden, tokens, windows, .. } => e * (hidden * tokens * windows * s.batch) as u64,
        _ => saved(kind, s),
    }
}

/// The largest single tensor the layer makes, in bytes (for transient buffers:
/// an output and its gradient, a score matrix before softmax).
pub fn largest_tensor(kind: &LayerKind, s: &ActSettings) -> u64 {
    let e = s.e();
    match *kind {
        LayerKind::Conv { channels, scale, .. } => F32 * channels as u64 * s.positions(scale),
        LayerKind::Resnet { cin, cout, scale } => F32 * cin.max(cout) as u64 * s.positions(scale),
        LayerKind::TransformerFrame { channels, scale } => F32 * channels as u64 * s.positions(scale),
        LayerKind::TransformerBlock { dim, heads, scale, .. } => {
            let t = s.positions(scale);
            let geglu = e * 8 * dim as u64 * t;
            let scores = if s.sdpa { 0 } else { F32 * heads as u64 * t * (t / s.batch.max(1) as u64) };
            geglu.max(scores)
        }
        // The VAE's attention always runs through SDPA (model/vae.rs): no score matrix.
        LayerKind::SelfAttention { dim, scale } => F32 * dim as u64 * s.positions(scale),
        LayerKind::ClipLayer { hidden, intermediate, heads, tokens, windows } => {
            let t = (s.batch * windows * tokens) as u64;
            (F32 * intermediate.max(hidden) as u64 * t).max(F32 * heads as u64 * t * tokens as u64)
        }
        LayerKind::Small => 0,
    }
}

/// The layer's output, in bytes (what flows to the next layer; kept when it is a skip).
pub fn output(kind: &LayerKind, s: &ActSettings) -> u64 {
    let e = s.e();
    match *kind {
        LayerKind::Conv { channels, scale, .. } => e * channels as u64 * s.positions(scale),
        LayerKind::Resnet { cout, scale, .. } => e * cout as u64 * s.positions(scale),
        LayerKind::TransformerFrame { channels, scale } => e * channels as u64 * s.positions(scale),
        LayerKind::TransformerBlock { dim, scale, .. } | LayerKind::SelfAttention { dim, scale } => {
            e * dim as u64 * s.positions(scale)
        }
        LayerKind::ClipLayer { hidden, tokens, windows, .. } => e * (hidden * tokens * windows * s.batch) as u64,
        LayerKind::Small => 0,
    }
}
