//! Attention back ends. `default` is libtorch's fused scaled-dot-product
//! attention (SDPA), which picks its kernel itself (flash, memory-efficient or
//! math on CUDA; its fused flash-style kernel on the CPU): what diffusers'
//! default processor, AttnProcessor2_0, calls. `explicit` is the matmul-softmax
//! of diffusers' AttnProcessor, which keeps the `[seq, seq]` score matrices.
//! `xformers` and `flash_attention` name the memory-efficient and flash SDPA
//! kernels; where a kernel cannot run (flash attention in fp32 on CUDA) the
//! explicit path is used instead and that is said once.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBackend {
    /// libtorch's SDPA (diffusers' default, AttnProcessor2_0).
    #[default]
    Default,
    /// softmax(q kᵀ) v with the scores materialised (diffusers' AttnProcessor).
    Explicit,
    Xformers,
    FlashAttention,
}

impl AttentionBackend {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Self::Default),
            "explicit" => Some(Self::Explicit),
            "xformers" => Some(Self::Xformers),
            "flash_attention" | "flash" => Some(Self::FlashAttention),
            _ => None,
        }
    }
}

static FALLBACK_SAID: AtomicBool = AtomicBool::new(false);

fn say_fallback_once(backend: AttentionBackend, why: &str) {
    if !FALLBACK_SAID.swap(true, Ordering::Relaxed) {
        eprintln!("note: attention back end {backend:?} is not available ({why}); using the explicit attention");
    }
}

/// Attention over `[batch, heads, seq, head_dim]` tensors, returning the same layout.
/// `upcast` computes the scores in float32 (diffusers' `upcast_attention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, backend: AttentionBackend, upcast: bool) -> Tensor {
    run(q, k, v, backend, upcast, false)
}

/// Causal self-attention (each position sees itself and those before it), as the
/// CLIP text encoder uses it. Same layout as [`attention`].
pub fn attention_causal(q: &Tensor, k: &Tensor, v: &Tensor, backend: AttentionBackend) -> Tensor {
    run(q, k, v, backend, false, true)
}

fn run(q: &Tensor, k: &Tensor, v: &Tensor, backend: AttentionBackend, upcast: bool, causal: bool) -> Tensor {
    let head_dim = *q.size().last().expect("attention input has dimensions");
    let scale = 1.0 / (head_dim as f64).sqrt();
    match backend {
        AttentionBackend::Explicit => explicit(q, k, v, scale, upcast, causal),
        AttentionBackend::Default | AttentionBackend::Xformers | AttentionBackend::FlashAttention => {
            // On the CPU libtorch's SDPA runs its own fused (flash-style) kernel for
            // every float type, so both back ends are real there too.
            let flash = backend == AttentionBackend::FlashAttention;
            if flash && q.device() != Device::Cpu && !matches!(q.kind(), Kind::Half | Kind::BFloat16) {
                say_fallback_once(backend, "flash attention needs fp16 or bf16");
                return explicit(q, k, v, scale, upcast, causal);
            }
            // SDPA picks its kernel itself; we steer it with the back-end flags in the
            // caller's context (see `sdpa_kernel`), here we just call the fused op.
            Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, causal, Some(scale), false)
        }
    }
}

/// softmax(q k^T * scale) v, the scores in float32 when `upcast`.
fn explicit(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool, causal: bool) -> Tensor {
    let (q, k) = if upcast { (q.to_kind(Kind::Float), k.to_kind(Kind::Float)) } else { (q.shallow_clone(), k.shallow_clone()) };
    let scores = if causal {
        // transformers' CLIP: matmul, then the scale.
        let (lq, lk) = (q.size()[q.dim() - 2], k.size()[k.dim() - 2]);
        let future = Tensor::ones([lq, lk], (Kind::Bool, q.device())).triu(1);
        (q.matmul(&k.transpose(-1, -2)) * scale).masked_fill(&future, f64::NEG_INFINITY)
    } else {
        scaled_scores(&q, &k, scale)
    };
    // The softmax dtype of each reference: transformers' CLIP (the causal caller)
    // and `upcast` attention take it in float32; diffusers' UNet attention in the
    // scores' own dtype (bf16/fp16 under autocast, which also halves its traffic).
    let softmax_kind = if upcast || causal { Kind::Float } else { scores.kind() };
    let probs = scores.softmax(-1, softmax_kind).to_kind(v.kind());
    probs.matmul(v)
}

/// q k^T * scale as diffusers' AttnProcessor computes it: one batched GEMM with the
/// scale as its alpha (`baddbmm`, beta 0), so neither the forward nor the backward
/// pass makes an extra pass over the `[seq, seq]` scores to scale them.
fn scaled_scores(q: &Tensor, k: &Tensor, scale: f64) -> Tensor {
    let size = q.size();
    let (lead, lq, d) = (&size[..size.len() - 2], size[size.len() - 2], size[size.len() - 1]);
    let lk = k.size()[k.dim() - 2];
    let q3 = q.reshape([-1, lq, d]);
    let k3 = k.reshape([-1, lk, d]);
    // beta 0: the input is ignored, NaNs included (diffusers passes an uninitialised
    // scores-sized tensor); one uninitialised element broadcast to the output's shape
    // spares that allocation, and `empty` spares a fill kernel per attention call.
    let unused = Tensor::empty([1, 1, 1], (q3.kind(), q3.device()));
    let scores = unused.baddbmm(&q3, &k3.transpose(1, 2), 0.0, scale);
    let mut shape = lead.to_vec();
    shape.extend([lq, lk]);
    scores.view(shape.as_slice())
}
