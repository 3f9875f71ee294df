//! The convolutional pieces the UNet and the VAE share (diffusers' `resnet.py`,
//! `downsampling.py`, `upsampling.py`): residual blocks and the ×2 resamplers.

use anyhow::Result;
use tch::Tensor;

use super::nn::{Activation, Conv2d, GroupNorm, Linear};
use super::weights::Weights;

/// How a resnet block mixes in the time embedding (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// Added to the features before `norm2`.
    Default,
    /// Split into scale and shift applied after `norm2`.
    ScaleShift,
}

impl TimeEmbeddingNorm {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            other => anyhow::bail!("resnet_time_scale_shift `{other}` is not supported (expected default or scale_shift)"),
        }
    }
}

/// Sizes and settings of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the time embedding; `None` for the VAE's blocks, which have none.
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1×1 projection of the input when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(w: &Weights, s: &ResnetSpec) -> Result<Self> {
        check_groups(w, "norm1", s.groups, s.in_channels)?;
        check_groups(w, "norm2", s.groups, s.out_channels)?;
        let time_out = match s.time_embedding_norm {
            TimeEmbeddingNorm::Default => s.out_channels,
            TimeEmbeddingNorm::ScaleShift => 2 * s.out_channels,
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(&w.pp("norm1"), s.groups, s.in_channels, s.eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), s.in_channels, s.out_channels, 3, 1, 1)?,
            time_emb_proj: match s.temb_channels {
                Some(t) => Some(Linear::new(&w.pp("time_emb_proj"), t, time_out, true)?),
                None => None,
            },
            norm2: GroupNorm::new(&w.pp("norm2"), s.groups, s.out_channels, s.eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), s.out_channels, s.out_channels, 3, 1, 1)?,
            conv_shortcut: if s.in_channels != s.out_channels {
                Some(Conv2d::new(&w.pp("conv_shortcut"), s.in_channels, s.out_channels, 1, 1, 0)?)
            } else {
                None
            },
            act: s.act,
            time_embedding_norm: s.time_embedding_norm,
            output_scale_factor: s.output_scale_factor,
        })
    }

    /// `temb`: the UNet's time embedding `[batch, temb_channels]` (before the activation).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.act.forward(&self.norm1.forward(x)));
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&self.act.forward(t)).unsqueeze(-1).unsqueeze(-1)),
            _ => None,
        };
        h = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(t)) => self.norm2.forward(&(h + t)),
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let parts = t.chunk(2, 1);
                self.norm2.forward(&h) * (&parts[0] + 1.0) + &parts[1]
            }
            (_, None) => self.norm2.forward(&h),
        };
        h = self.conv2.forward(&self.act.forward(&h));
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 { out } else { out / self.output_scale_factor }
    }
}

/// Stride-2 3×3 convolution. With `padding` 0 the input is padded on the right and
/// bottom only (the VAE's asymmetric padding), otherwise symmetrically.
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub asymmetric_pad: bool,
}

impl Downsample2D {
    /// `w` is the `downsamplers.0` view; the tensors live under `conv`.
    pub fn new(w: &Weights, channels: i64, padding: i64) -> Result<Self> {
        Ok(Downsample2D {
            conv: Conv2d::new(&w.pp("conv"), channels, channels, 3, 2, padding)?,
            asymmetric_pad: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour ×2 (or to a given size) then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    /// `w` is the `upsamplers.0` view; the tensors live under `conv`.
    pub fn new(w: &Weights, channels: i64) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::new(&w.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    /// `size`: the output's height and width; `None` doubles them. The UNet passes
    /// the next skip connection's size so odd latent sizes still line up.
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let size = size.unwrap_or_else(|| {
            let s = x.size();
            (s[2] * 2, s[3] * 2)
        });
        self.conv.forward(&x.upsample_nearest2d([size.0, size.1], None, None))
    }
}

/// libtorch aborts the forward pass on a group count that does not divide the
/// channels; we refuse such a config up front, naming the layer.
pub fn check_groups(w: &Weights, name: &str, groups: i64, channels: i64) -> Result<()> {
    if groups <= 0 || channels % groups != 0 {
        anyhow::bail!(
            "the model config asks for {groups} normalisation groups at `{}`, which does not divide its {channels} channels",
            w.key(name)
        );
    }
    Ok(())
}
