//! diffusers' `UNet2DConditionModel` as Stable Diffusion 1.x, 2.x and XL use it.
//! Every struct spells a level of the checkpoint key tree
//! (`down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn1.to_q`), and each
//! block has its own `forward`, so gradient checkpointing per block and LoRA on
//! the `Linear` layers can wrap them later.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::attention::{attention, AttentionBackend};
use super::checkpointing;
use super::config::{PerBlock, UNetConfig};
use super::nn::{Activation, Conv2d, GroupNorm, LayerNorm, Linear};
use super::resnet::{check_groups, Downsample2D, ResnetBlock2D, ResnetSpec, TimeEmbeddingNorm, Upsample2D};
use super::weights::Weights;

/// Sinusoidal embedding of the timesteps (`time_proj`, no weights).
#[derive(Debug, Clone)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    /// `t`: float32 `[batch]`. Returns float32 `[batch, num_channels]`.
    pub fn forward(&self, t: &Tensor) -> Tensor {
        let half = self.num_channels / 2;
        // Same op order as diffusers' get_timestep_embedding, so float32 rounding matches.
        let exponent = Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()));
        let freqs = (exponent / (half as f64 - self.freq_shift)).exp();
        let args = t.unsqueeze(1) * freqs.unsqueeze(0);
        let (sin, cos) = (args.sin(), args.cos());
        let emb = if self.flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
        if self.num_channels % 2 == 1 { emb.constant_pad_nd([0, 1]) } else { emb }
    }
}

/// `time_embedding`: two Linear layers with the activation between.
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub act: Activation,
}

impl TimestepEmbedding {
    pub fn new(w: &Weights, in_dim: i64, dim: i64, act: Activation) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(&w.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::new(&w.pp("linear_2"), dim, dim, true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.act.forward(&self.linear_1.forward(x)))
    }
}

/// SDXL's added conditions (`addition_embed_type: text_time`).
#[derive(Debug)]
pub struct TextTime {
    /// The second text encoder's pooled, projected embedding `[batch, projection_dim]` (`text_embeds`).
    pub text_embeds: Tensor,
    /// Original height and width, crop top and left, target height and width, `[batch, 6]` (`time_ids`).
    pub time_ids: Tensor,
}

/// What the UNet is conditioned on besides the sample and the timestep: the
/// text encoders' states and, for SDXL, the added conditions.
#[derive(Debug)]
pub struct Conditioning {
    /// `[batch, seq, cross_attention_dim]`
    pub encoder_hidden_states: Tensor,
    pub text_time: Option<TextTime>,
}

impl Conditioning {
    /// Text states alone (SD 1.x and 2.x).
    pub fn text(encoder_hidden_states: Tensor) -> Self {
        Conditioning { encoder_hidden_states, text_time: None }
    }

    pub fn shallow_clone(&self) -> Self {
        self.map(Tensor::shallow_clone)
    }

    /// Each tensor through `f` (a device move, a cast, a detach).
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Conditioning {
            encoder_hidden_states: f(&self.encoder_hidden_states),
            text_time: self.text_time.as_ref().map(|tt| TextTime { text_embeds: f(&tt.text_embeds), time_ids: f(&tt.time_ids) }),
        }
    }

    /// The batches one after another (classifier-free guidance's [negative, prompt]).
    pub fn cat(parts: &[&Conditioning]) -> Self {
        let states: Vec<&Tensor> = parts.iter().map(|c| &c.encoder_hidden_states).collect();
        let text_time = parts.iter().map(|c| c.text_time.as_ref()).collect::<Option<Vec<_>>>().map(|tts| TextTime {
            text_embeds: Tensor::cat(&tts.iter().map(|t| &t.text_embeds).collect::<Vec<_>>(), 0),
            time_ids: Tensor::cat(&tts.iter().map(|t| &t.time_ids).collect::<Vec<_>>(), 0),
        });
        Conditioning { encoder_hidden_states: Tensor::cat(&states, 0), text_time }
    }
}

/// `add_time_proj` and `add_embedding`: SDXL's pooled text and size/crop ids,
/// embedded and added to the time embedding.
#[derive(Debug)]
pub struct AddedEmbedding {
    pub add_time_proj: Timesteps,
    pub add_embedding: TimestepEmbedding,
}

impl AddedEmbedding {
    /// `[batch, time_embed_dim]` in `like`'s dtype.
    pub fn forward(&self, tt: &TextTime, like: &Tensor) -> Tensor {
        let batch = tt.text_embeds.size()[0];
        let time_embeds = self.add_time_proj.forward(&tt.time_ids.to_kind(Kind::Float).reshape([-1])).reshape([batch, -1]);
        let add_embeds = Tensor::cat(&[tt.text_embeds.to_kind(time_embeds.kind()), time_embeds], -1).to_kind(like.kind());
        self.add_embedding.forward(&add_embeds)
    }
}

/// diffusers' `Attention` as the transformer blocks use it: no bias on the
/// projections in, a bias on `to_out.0`.
#[derive(Debug)]
pub struct CrossAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0` (`to_out.1` is dropout, which has no weights).
    pub to_out: Linear,
    pub heads: i64,
    pub upcast: bool,
    pub backend: AttentionBackend,
}

impl CrossAttention {
    /// `context_dim`: width of the keys' source (the query width for self-attention).
    pub fn new(
        w: &Weights,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        upcast: bool,
        backend: AttentionBackend,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(CrossAttention {
            to_q: Linear::new(&w.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(&w.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(&w.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(&w.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            upcast,
            backend,
        })
    }

    /// `x`: `[batch, seq, query_dim]`; `context`: `[batch, seq_k, context_dim]` or
    /// `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(x);
        let split = |t: Tensor| {
            let (b, n, inner) = t.size3().expect("attention projections are [batch, seq, dim]");
            t.view([b, n, self.heads, inner / self.heads]).transpose(1, 2)
        };
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(context));
        let v = split(self.to_v.forward(context));
        let out = attention(&q, &k, &v, self.backend, self.upcast);
        let (b, h, n, d) = out.size4().expect("attention output is [batch, heads, seq, head_dim]");
        self.to_out.forward(&out.transpose(1, 2).reshape([b, n, h * d]))
    }
}

/// `ff`: GEGLU (`net.0.proj`, twice the inner width, half gating the other half
/// through exact GELU) then `net.2`.
#[derive(Debug)]
pub struct FeedForward {
    pub geglu_proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn new(w: &Weights, dim: i64, inner: i64) -> Result<Self> {
        Ok(FeedForward {
            geglu_proj: Linear::new(&w.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::new(&w.pp("net").pp(2), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let parts = self.geglu_proj.forward(x).chunk(2, -1);
        self.out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}

#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    /// Self-attention, or cross-attention when `only_cross_attention`.
    pub attn1: CrossAttention,
    pub norm2: LayerNorm,
    pub attn2: CrossAttention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    pub only_cross_attention: bool,
}

/// Settings shared by all transformer blocks of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub heads: i64,
    pub head_dim: i64,
    pub cross_attention_dim: i64,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
    pub backend: AttentionBackend,
}

impl BasicTransformerBlock {
    pub fn new(w: &Weights, dim: i64, s: &TransformerSpec) -> Result<Self> {
        // diffusers' LayerNorm default inside the blocks; not the UNet's norm_eps.
        let eps = 1e-5;
        let attn1_context = if s.only_cross_attention { s.cross_attention_dim } else { dim };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, eps)?,
            attn1: CrossAttention::new(&w.pp("attn1"), dim, attn1_context, s.heads, s.head_dim, s.upcast_attention, s.backend)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, eps)?,
            attn2: CrossAttention::new(
                &w.pp("attn2"),
                dim,
                s.cross_attention_dim,
                s.heads,
                s.head_dim,
                s.upcast_attention,
                s.backend,
            )?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, eps)?,
            ff: FeedForward::new(&w.pp("ff"), dim, dim * 4)?,
            only_cross_attention: s.only_cross_attention,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let attn1_context = if self.only_cross_attention { Some(context) } else { None };
        let x = self.attn1.forward(&self.norm1.forward(x), attn1_context) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// `proj_in` / `proj_out`: a 1×1 convolution (SD 1.x) or a Linear layer
/// (`use_linear_projection`, SD 2.x).
#[derive(Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(w: &Weights, in_dim: i64, out_dim: i64, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(w, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(Conv2d::new(w, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

/// `Transformer2DModel` over an image-shaped feature map, with a residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(
        w: &Weights,
        channels: i64,
        layers: i64,
        groups: i64,
        use_linear_projection: bool,
        s: &TransformerSpec,
    ) -> Result<Self> {
        check_groups(w, "norm", groups, channels)?;
        let inner = s.heads * s.head_dim;
        let transformer_blocks = (0..layers)
            .map(|k| BasicTransformerBlock::new(&w.pp("transformer_blocks").pp(k), inner, s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: GroupNorm::new(&w.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Projection::new(&w.pp("proj_in"), channels, inner, use_linear_projection)?,
            transformer_blocks,
            proj_out: Projection::new(&w.pp("proj_out"), inner, channels, use_linear_projection)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("Transformer2DModel input is [batch, channels, height, width]");
        let normed = self.norm.forward(x);
        let tokens = |t: Tensor| {
            let d = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, d])
        };
        let mut hidden = match &self.proj_in {
            Projection::Conv(conv) => tokens(conv.forward(&normed)),
            Projection::Linear(lin) => lin.forward(&tokens(normed)),
        };
        for block in &self.transformer_blocks {
            hidden = block.forward(&hidden, context);
        }
        let image = |t: Tensor| {
            let d = *t.size().last().expect("tokens have a width");
            t.reshape([b, h, w, d]).permute([0, 3, 1, 2]).contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&image(hidden)),
            Projection::Linear(lin) => image(lin.forward(&hidden)),
        };
        debug_assert_eq!(out.size()[1], c);
        out + x
    }
}

/// `down_blocks.{i}`: `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D`
/// (without). Returns its output and the skip connections it leaves.
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for `DownBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
    /// Recompute each resnet's and transformer's activations in the backward pass.
    pub gradient_checkpointing: bool,
}

impl DownBlock {
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let ckpt = self.gradient_checkpointing;
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = checkpointing::resnet(resnet, &h, temb, ckpt);
            if let Some(attn) = self.attentions.get(j) {
                h = checkpointing::transformer(attn, &h, context, ckpt);
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h);
            skips.push(h.shallow_clone());
        }
        (h, skips)
    }
}

/// `mid_block`: `UNetMidBlock2DCrossAttn`, a resnet then (attention, resnet) pairs.
#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    /// Recompute each resnet's and transformer's activations in the backward pass.
    pub gradient_checkpointing: bool,
}

impl MidBlock {
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let ckpt = self.gradient_checkpointing;
        let mut h = checkpointing::resnet(&self.resnets[0], x, temb, ckpt);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            let a = checkpointing::transformer(attn, &h, context, ckpt);
            h = checkpointing::resnet(resnet, &a, temb, ckpt);
        }
        h
    }
}

/// `up_blocks.{i}`: `UpBlock2D` or `CrossAttnUpBlock2D`; each resnet takes one
/// skip connection, concatenated on the channels.
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for `UpBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
    /// Recompute each resnet's and transformer's activations in the backward pass.
    pub gradient_checkpointing: bool,
}

impl UpBlock {
    /// `skips`: this block's skip connections in the order the down path made them
    /// (the last is used first). `upsample_size`: where the upsampler must land.
    pub fn forward(
        &self,
        x: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(i64, i64)>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        let ckpt = self.gradient_checkpointing;
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet hands each up block one skip per resnet");
            h = checkpointing::resnet(resnet, &Tensor::cat(&[h, skip], 1), temb, ckpt);
            if let Some(attn) = self.attentions.get(j) {
                h = checkpointing::transformer(attn, &h, context, ckpt);
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, upsample_size);
        }
        h
    }
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's added embedding (`addition_embed_type: text_time`).
    pub added: Option<AddedEmbedding>,
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub act: Activation,
    pub center_input_sample: bool,
}

/// Reads a per-block config value, refusing a list of the wrong length as diffusers does.
fn per_block<T: Clone>(value: &PerBlock<T>, field: &str, blocks: usize) -> Result<Vec<T>> {
    match value {
        PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
        PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
        PerBlock::Each(v) => {
            anyhow::bail!("the UNet config gives {} values of `{field}` for {blocks} down blocks", v.len())
        }
    }
}

impl UNet2DConditionModel {
    pub fn new(w: &Weights, cfg: &UNetConfig, backend: AttentionBackend) -> Result<Self> {
        Self::build(w, cfg, backend).context("cannot build the UNet")
    }

    fn build(w: &Weights, cfg: &UNetConfig, backend: AttentionBackend) -> Result<Self> {
        if let Some(t) = &cfg.class_embed_type {
            anyhow::bail!("class_embed_type `{t}` is not supported (Stable Diffusion 1.x, 2.x and XL have none)");
        }
        let n = cfg.down_block_types.len();
        if n == 0 || cfg.block_out_channels.len() != n || cfg.up_block_types.len() != n {
            anyhow::bail!(
                "the UNet config has {} down block types, {} up block types and {} block_out_channels; they must be equal and non-zero",
                n,
                cfg.up_block_types.len(),
                cfg.block_out_channels.len()
            );
        }
        let act = Activation::parse(&cfg.act_fn, "act_fn")?;
        let time_norm = TimeEmbeddingNorm::parse(&cfg.resnet_time_scale_shift)?;
        let channels = &cfg.block_out_channels;
        let heads = match &cfg.num_attention_heads {
            Some(h) => per_block(h, "num_attention_heads", n)?,
            None => per_block(&cfg.attention_head_dim, "attention_head_dim", n)?,
        };
        let layers = per_block(&cfg.layers_per_block, "layers_per_block", n)?;
        let cross_dims = per_block(&cfg.cross_attention_dim, "cross_attention_dim", n)?;
        let transformer_layers = per_block(&cfg.transformer_layers_per_block, "transformer_layers_per_block", n)?;
        let only_cross = per_block(&cfg.only_cross_attention, "only_cross_attention", n)?;
        let groups = cfg.norm_num_groups;
        let temb_dim = channels[0] * 4;

        let resnet = |cin: i64, cout: i64, scale: f64| ResnetSpec {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(temb_dim),
            groups,
            eps: cfg.norm_eps,
            act,
            time_embedding_norm: time_norm,
            output_scale_factor: scale,
        };
        // diffusers passes `channels // heads` as the head width.
        let transformer = |w: &Weights, ch: i64, heads: i64, layers: i64, cross: i64, only_cross: bool| {
            if heads <= 0 || heads > ch {
                anyhow::bail!("the UNet config asks for {heads} attention heads at `{}` with {ch} channels", w.key("attentions"));
            }
            let spec = TransformerSpec {
                heads,
                head_dim: ch / heads,
                cross_attention_dim: cross,
                only_cross_attention: only_cross,
                upcast_attention: cfg.upcast_attention,
                backend,
            };
            Transformer2DModel::new(w, ch, layers, groups, cfg.use_linear_projection, &spec)
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = channels[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let wb = w.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = channels[i];
            let with_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => anyhow::bail!("down block type `{other}` is not supported (expected CrossAttnDownBlock2D or DownBlock2D)"),
            };
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let cin = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::new(&wb.pp("resnets").pp(j), &resnet(cin, out_ch, 1.0))?);
                if with_attention {
                    attentions.push(transformer(
                        &wb.pp("attentions").pp(j),
                        out_ch,
                        heads[i],
                        transformer_layers[i],
                        cross_dims[i],
                        only_cross[i],
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(&wb.pp("downsamplers").pp(0), out_ch, cfg.downsample_padding)?)
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, attentions, downsampler, gradient_checkpointing: false });
        }

        let last = channels[n - 1];
        let mid_block = match cfg.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let wm = w.pp("mid_block");
                let scale = cfg.mid_block_scale_factor;
                // diffusers builds the mid block from the last down block's values;
                // its attention never uses only_cross_attention.
                Some(MidBlock {
                    resnets: vec![
                        ResnetBlock2D::new(&wm.pp("resnets").pp(0), &resnet(last, last, scale))?,
                        ResnetBlock2D::new(&wm.pp("resnets").pp(1), &resnet(last, last, scale))?,
                    ],
                    attentions: vec![transformer(
                        &wm.pp("attentions").pp(0),
                        last,
                        heads[n - 1],
                        transformer_layers[n - 1],
                        cross_dims[n - 1],
                        false,
                    )?],
                    gradient_checkpointing: false,
                })
            }
            Some(other) => anyhow::bail!("mid block type `{other}` is not supported (expected UNetMidBlock2DCrossAttn)"),
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = last;
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let r = n - 1 - i; // the down block this up block mirrors
            let wb = w.pp("up_blocks").pp(i);
            let out_ch = channels[r];
            let skip_in = channels[r.saturating_sub(1)];
            let with_attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => anyhow::bail!("up block type `{other}` is not supported (expected CrossAttnUpBlock2D or UpBlock2D)"),
            };
            let count = layers[r] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..count {
                let skip_ch = if j == count - 1 { skip_in } else { out_ch };
                let cin = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::new(&wb.pp("resnets").pp(j), &resnet(cin + skip_ch, out_ch, 1.0))?);
                if with_attention {
                    attentions.push(transformer(
                        &wb.pp("attentions").pp(j),
                        out_ch,
                        heads[r],
                        transformer_layers[r],
                        cross_dims[r],
                        only_cross[r],
                    )?);
                }
            }
            let upsampler = if i + 1 < n { Some(Upsample2D::new(&wb.pp("upsamplers").pp(0), out_ch)?) } else { None };
            up_blocks.push(UpBlock { resnets, attentions, upsampler, gradient_checkpointing: false });
            prev_out = out_ch;
        }

        let added = match cfg.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(time_dim), Some(in_dim)) = (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) else {
                    anyhow::bail!("addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim in the UNet config");
                };
                Some(AddedEmbedding {
                    add_time_proj: Timesteps { num_channels: time_dim, flip_sin_to_cos: cfg.flip_sin_to_cos, freq_shift: cfg.freq_shift },
                    add_embedding: TimestepEmbedding::new(&w.pp("add_embedding"), in_dim, temb_dim, act)?,
                })
            }
            Some(other) => anyhow::bail!("addition_embed_type `{other}` is not supported (SDXL's is text_time)"),
        };

        check_groups(w, "conv_norm_out", groups, channels[0])?;
        Ok(UNet2DConditionModel {
            time_proj: Timesteps { num_channels: channels[0], flip_sin_to_cos: cfg.flip_sin_to_cos, freq_shift: cfg.freq_shift },
            time_embedding: TimestepEmbedding::new(&w.pp("time_embedding"), channels[0], temb_dim, act)?,
            added,
            conv_in: Conv2d::new(&w.pp("conv_in"), cfg.in_channels, channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, channels[0], cfg.norm_eps)?,
            conv_out: Conv2d::new(&w.pp("conv_out"), channels[0], cfg.out_channels, 3, 1, 1)?,
            act,
            center_input_sample: cfg.center_input_sample,
        })
    }

    /// Recompute the activations of every resnet and transformer in the backward
    /// pass instead of keeping them (see [`checkpointing`] for the contract).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.down_blocks.iter_mut().for_each(|b| b.gradient_checkpointing = on);
        if let Some(mid) = &mut self.mid_block {
            mid.gradient_checkpointing = on;
        }
        self.up_blocks.iter_mut().for_each(|b| b.gradient_checkpointing = on);
    }

    /// The time embedding `[batch, 4 * block_out_channels[0]]` in the sample's dtype.
    /// `timestep`: a scalar or `[batch]`, integer or float.
    pub fn time_embedding_for(&self, timestep: &Tensor, batch: i64, like: &Tensor) -> Tensor {
        let t = timestep.to_device(like.device()).to_kind(Kind::Float).reshape([-1]);
        let t = if t.size()[0] == batch { t } else { t.expand([batch], false) };
        let emb = self.time_proj.forward(&t).to_kind(like.kind());
        self.time_embedding.forward(&emb)
    }

    /// Predicts the noise (or v) for `sample` `[batch, in_channels, h, w]` at
    /// `timestep`, conditioned on `cond` (text states `[batch, seq, cross_dim]`,
    /// and SDXL's added conditions, which an SDXL UNet cannot do without).
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor, cond: &Conditioning) -> Tensor {
        let batch = sample.size()[0];
        let encoder_hidden_states = &cond.encoder_hidden_states;
        let mut temb = self.time_embedding_for(timestep, batch, sample);
        if let Some(added) = &self.added {
            let tt = cond.text_time.as_ref().expect("an SDXL UNet is always given its pooled text and size ids");
            temb = temb + added.forward(tt, sample);
        }
        let sample = if self.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };

        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, &temb, encoder_hidden_states);
            h = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &temb, encoder_hidden_states);
        }
        for block in &self.up_blocks {
            let block_skips = skips.split_off(skips.len() - block.resnets.len());
            let upsample_size = skips.last().map(|s| {
                let size = s.size();
                (size[2], size[3])
            });
            h = block.forward(&h, block_skips, &temb, encoder_hidden_states, upsample_size);
        }
        self.conv_out.forward(&self.act.forward(&self.conv_norm_out.forward(&h)))
    }
}
