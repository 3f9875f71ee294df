//! The basic layers, holding their tensors under checkpoint key names
//! (`weight`, `bias`). Forward passes are plain libtorch ops.

use tch::Tensor;

use super::lora::LoraAdapter;
use super::weights::{WeightError, Weights};

#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A low-rank update added to the output (see [`super::lora`]).
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(w: &Weights, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self, WeightError> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(w.get("bias", &[out_dim])?) } else { None };
        Ok(Linear { weight, bias, lora: None })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(lora) => y + lora.forward_linear(x),
            None => y,
        }
    }
}

#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    /// A low-rank update added to the output (see [`super::lora`]).
    pub lora: Option<LoraAdapter>,
}

impl Conv2d {
    pub fn new(
        w: &Weights,
        in_ch: i64,
        out_ch: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self, WeightError> {
        let weight = w.get("weight", &[out_ch, in_ch, kernel, kernel])?;
        let bias = Some(w.get("bias", &[out_ch])?);
        Ok(Conv2d { weight, bias, stride, padding, lora: None })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(&self.weight, self.bias.as_ref(), [self.stride], [self.padding], [1], 1);
        match &self.lora {
            Some(lora) => y + lora.forward_conv(x, self.stride, self.padding),
            None => y,
        }
    }
}

#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(w: &Weights, groups: i64, channels: i64, eps: f64) -> Result<Self, WeightError> {
        Ok(GroupNorm { weight: w.get("weight", &[channels])?, bias: w.get("bias", &[channels])?, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(w: &Weights, dim: i64, eps: f64) -> Result<Self, WeightError> {
        Ok(LayerNorm { weight: w.get("weight", &[dim])?, bias: w.get("bias", &[dim])?, dim, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(w: &Weights, count: i64, dim: i64) -> Result<Self, WeightError> {
        Ok(Embedding { weight: w.get("weight", &[count, dim])? })
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// The activation functions diffusers and transformers configs name (`act_fn`, `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, transformers' `gelu`.
    Gelu,
    /// OpenAI CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    Mish,
    Relu,
}

impl Activation {
    /// Reads a config's activation name; `what` names the config field for the error.
    pub fn parse(name: &str, what: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            "mish" => Activation::Mish,
            "relu" => Activation::Relu,
            other => anyhow::bail!("{what} `{other}` is not supported (expected silu, gelu, quick_gelu, mish or relu)"),
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu("none"),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Mish => x.mish(),
            Activation::Relu => x.relu(),
        }
    }
}
