//! diffusers' `AutoencoderKL`: images to a diagonal Gaussian over latents and
//! latents back to images. The latent `scaling_factor` is the caller's business.

use anyhow::{Context, Result};
use tch::Tensor;

use super::config::VaeConfig;
use super::nn::{Activation, Conv2d, GroupNorm, Linear};
use super::resnet::{check_groups, Downsample2D, ResnetBlock2D, ResnetSpec, TimeEmbeddingNorm, Upsample2D};
use super::weights::Weights;

/// diffusers' fixed epsilon for every normalisation in the VAE.
const VAE_NORM_EPS: f64 = 1e-6;

/// Single-head self-attention over the pixels of the mid block, with its own
/// group norm and a residual (`mid_block.attentions.0`).
#[derive(Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0`
    pub to_out: Linear,
}

impl VaeAttention {
    pub fn new(w: &Weights, channels: i64, groups: i64) -> Result<Self> {
        check_groups(w, "group_norm", groups, channels)?;
        Ok(VaeAttention {
            group_norm: GroupNorm::new(&w.pp("group_norm"), groups, channels, VAE_NORM_EPS)?,
            to_q: Linear::new(&w.pp("to_q"), channels, channels, true)?,
            to_k: Linear::new(&w.pp("to_k"), channels, channels, true)?,
            to_v: Linear::new(&w.pp("to_v"), channels, channels, true)?,
            to_out: Linear::new(&w.pp("to_out").pp(0), channels, channels, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input is [batch, channels, height, width]");
        let tokens = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2).unsqueeze(1);
        let q = self.to_q.forward(&tokens);
        let k = self.to_k.forward(&tokens);
        let v = self.to_v.forward(&tokens);
        // One head, through SDPA as diffusers' default processor runs it (no
        // [pixels, pixels] score matrix: 16 GiB of them for a 2048² decode).
        let out = super::attention::attention(&q, &k, &v, super::attention::AttentionBackend::Default, true);
        let out = self.to_out.forward(&out.squeeze_dim(1));
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `mid_block` of encoder and decoder: resnet, optional attention, resnet.
#[derive(Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn new(w: &Weights, channels: i64, groups: i64, act: Activation, add_attention: bool) -> Result<Self> {
        let spec = resnet_spec(channels, channels, groups, act);
        Ok(VaeMidBlock {
            resnets: vec![
                ResnetBlock2D::new(&w.pp("resnets").pp(0), &spec)?,
                ResnetBlock2D::new(&w.pp("resnets").pp(1), &spec)?,
            ],
            attention: if add_attention { Some(VaeAttention::new(&w.pp("attentions").pp(0), channels, groups)?) } else { None },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(attn) = &self.attention {
            h = attn.forward(&h);
        }
        self.resnets[1].forward(&h, None)
    }
}

fn resnet_spec(cin: i64, cout: i64, groups: i64, act: Activation) -> ResnetSpec {
    ResnetSpec {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: VAE_NORM_EPS,
        act,
        time_embedding_norm: TimeEmbeddingNorm::Default,
        output_scale_factor: 1.0,
    }
}

/// `encoder.down_blocks.{i}` (`DownEncoderBlock2D`).
#[derive(Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

impl EncoderBlock {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None);
        }
        match &self.downsampler {
            Some(d) => d.forward(&h),
            None => h,
        }
    }
}

/// `decoder.up_blocks.{i}` (`UpDecoderBlock2D`).
#[derive(Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}

impl DecoderBlock {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None);
        }
        match &self.upsampler {
            Some(u) => u.forward(&h, None),
            None => h,
        }
    }
}

#[derive(Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub act: Activation,
}

impl Encoder {
    fn new(w: &Weights, cfg: &VaeConfig, act: Activation) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            if kind != "DownEncoderBlock2D" {
                anyhow::bail!("VAE down block type `{kind}` is not supported (expected DownEncoderBlock2D)");
            }
            let wb = w.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = ch[i];
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(&wb.pp("resnets").pp(j), &resnet_spec(cin, out_ch, groups, act))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n { Some(Downsample2D::new(&wb.pp("downsamplers").pp(0), out_ch, 0)?) } else { None };
            down_blocks.push(EncoderBlock { resnets, downsampler });
        }
        let last = ch[n - 1];
        check_groups(w, "conv_norm_out", groups, last)?;
        Ok(Encoder {
            conv_in: Conv2d::new(&w.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(&w.pp("mid_block"), last, groups, act, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, last, VAE_NORM_EPS)?,
            // mean and log-variance, stacked on the channels
            conv_out: Conv2d::new(&w.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for b in &self.down_blocks {
            h = b.forward(&h);
        }
        h = self.mid_block.forward(&h);
        self.conv_out.forward(&self.act.forward(&self.conv_norm_out.forward(&h)))
    }
}

#[derive(Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub act: Activation,
}

impl Decoder {
    fn new(w: &Weights, cfg: &VaeConfig, act: Activation) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let n = ch.len();
        let last = ch[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = last;
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            if kind != "UpDecoderBlock2D" {
                anyhow::bail!("VAE up block type `{kind}` is not supported (expected UpDecoderBlock2D)");
            }
            let wb = w.pp("up_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = ch[n - 1 - i];
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(&wb.pp("resnets").pp(j), &resnet_spec(cin, out_ch, groups, act))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n { Some(Upsample2D::new(&wb.pp("upsamplers").pp(0), out_ch)?) } else { None };
            up_blocks.push(DecoderBlock { resnets, upsampler });
        }
        check_groups(w, "conv_norm_out", groups, ch[0])?;
        Ok(Decoder {
            conv_in: Conv2d::new(&w.pp("conv_in"), cfg.latent_channels, last, 3, 1, 1)?,
            mid_block: VaeMidBlock::new(&w.pp("mid_block"), last, groups, act, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, ch[0], VAE_NORM_EPS)?,
            conv_out: Conv2d::new(&w.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            act,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z));
        for b in &self.up_blocks {
            h = b.forward(&h);
        }
        self.conv_out.forward(&self.act.forward(&self.conv_norm_out.forward(&h)))
    }
}

/// The encoder's output distribution (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `moments`: mean and log-variance stacked on dimension 1.
    pub fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        let mean = parts[0].shallow_clone();
        let logvar = parts[1].clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        DiagonalGaussian { mean, logvar, std }
    }

    /// `mean + std * eps`, with `eps` drawn from `rng` on the CPU and moved to the
    /// mean's device and dtype, as diffusers' sample does with a CPU generator.
    pub fn sample(&self, rng: &mut crate::rng::CpuRng) -> Tensor {
        let eps = crate::device::upload(&rng.randn(&self.mean.size()).to_kind(self.mean.kind()), self.mean.device());
        &self.mean + &self.std * eps
    }

    /// The most likely latents (the mean).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        Self::build(w, cfg).context("cannot build the VAE")
    }

    fn build(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let n = cfg.block_out_channels.len();
        if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            anyhow::bail!(
                "the VAE config has {} down block types, {} up block types and {} block_out_channels; they must be equal and non-zero",
                cfg.down_block_types.len(),
                cfg.up_block_types.len(),
                n
            );
        }
        let act = Activation::parse(&cfg.act_fn, "act_fn")?;
        let latent2 = 2 * cfg.latent_channels;
        Ok(AutoencoderKL {
            encoder: Encoder::new(&w.pp("encoder"), cfg, act)?,
            decoder: Decoder::new(&w.pp("decoder"), cfg, act)?,
            quant_conv: if cfg.use_quant_conv { Some(Conv2d::new(&w.pp("quant_conv"), latent2, latent2, 1, 1, 0)?) } else { None },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(&w.pp("post_quant_conv"), cfg.latent_channels, cfg.latent_channels, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `x`: images `[batch, in_channels, h, w]` in [-1, 1].
    pub fn encode(&self, x: &Tensor) -> DiagonalGaussian {
        let h = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&h),
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// `z`: unscaled latents `[batch, latent_channels, h, w]`; returns images in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z),
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }
}
