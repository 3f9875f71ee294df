//! Attention back ends. `default` is the explicit matmul-softmax (what diffusers'
//! AttnProcessor computes); `xformers` and `flash_attention` map to libtorch's
//! memory-efficient and flash SDPA kernels. Where a kernel cannot run (CPU, a
//! dtype it lacks) the math path is used instead and that is said once.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBackend {
    #[default]
    Default,
    Xformers,
    FlashAttention,
}

impl AttentionBackend {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Self::Default),
            "xformers" => Some(Self::Xformers),
            "flash_attention" | "flash" => Some(Self::FlashAttention),
            _ => None,
        }
    }
}

static FALLBACK_SAID: AtomicBool = AtomicBool::new(false);

fn say_fallback_once(backend: AttentionBackend, why: &str) {
    if !FALLBACK_SAID.swap(true, Ordering::Relaxed) {
        eprintln!("note: attention back end {backend:?} is not available ({why}); using the default attention");
    }
}

/// Attention over `[batch, heads, seq, head_dim]` tensors, returning the same layout.
/// `upcast` computes the scores in float32 (diffusers' `upcast_attention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, backend: AttentionBackend, upcast: bool) -> Tensor {
    let head_dim = *q.size().last().expect("attention input has dimensions");
    let scale = 1.0 / (head_dim as f64).sqrt();
    match backend {
        AttentionBackend::Default => explicit(q, k, v, scale, upcast),
        AttentionBackend::Xformers | AttentionBackend::FlashAttention => {
            if q.device() == Device::Cpu {
                say_fallback_once(backend, "it needs CUDA");
                return explicit(q, k, v, scale, upcast);
            }
            let flash = backend == AttentionBackend::FlashAttention;
            if flash && !matches!(q.kind(), Kind::Half | Kind::BFloat16) {
                say_fallback_once(backend, "flash attention needs fp16 or bf16");
                return explicit(q, k, v, scale, upcast);
            }
            // SDPA picks its kernel itself; we steer it with the back-end flags in the
            // caller's context (see `sdpa_kernel`), here we just call the fused op.
            Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, Some(scale), false)
        }
    }
}

fn explicit(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool) -> Tensor {
    let kind = q.kind();
    let (q, k) = if upcast { (q.to_kind(Kind::Float), k.to_kind(Kind::Float)) } else { (q.shallow_clone(), k.shallow_clone()) };
    let scores = q.matmul(&k.transpose(-1, -2)) * scale;
    let probs = scores.softmax(-1, Kind::Float).to_kind(v.kind());
    let _ = kind;
    probs.matmul(v)
}
