//! The CLIP text encoder (transformers' `CLIPTextModel`, and
//! `CLIPTextModelWithProjection` for SDXL's second encoder), with keys as the
//! checkpoint loader gives them: without the `text_model.` prefix.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::attention::{attention_causal, AttentionBackend};
use super::checkpointing;
use super::config::ClipConfig;
use super::family::HiddenStates;
use super::nn::{Activation, Embedding, LayerNorm, Linear};
use super::weights::Weights;

#[derive(Debug)]
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let seq = *input_ids.size().last().expect("input ids have a sequence dimension");
        let positions = Tensor::arange(seq, (Kind::Int64, input_ids.device()));
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions)
    }
}

#[derive(Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: i64,
    pub backend: AttentionBackend,
}

impl ClipAttention {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("CLIP hidden states are [batch, seq, hidden]");
        let split = |t: Tensor| t.view([b, n, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let out = attention_causal(&q, &k, &v, self.backend);
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, n, d]))
    }
}

#[derive(Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}

impl ClipMlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)))
    }
}

/// `encoder.layers.{i}`: pre-norm attention and MLP, each with a residual.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(w: &Weights, cfg: &ClipConfig, act: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let a = w.pp("self_attn");
        Ok(ClipEncoderLayer {
            self_attn: ClipAttention {
                q_proj: Linear::new(&a.pp("q_proj"), d, d, true)?,
                k_proj: Linear::new(&a.pp("k_proj"), d, d, true)?,
                v_proj: Linear::new(&a.pp("v_proj"), d, d, true)?,
                out_proj: Linear::new(&a.pp("out_proj"), d, d, true)?,
                heads: cfg.num_attention_heads,
                // transformers' eager CLIP attention (77 tokens: no memory to save).
                backend: AttentionBackend::Explicit,
            },
            layer_norm1: LayerNorm::new(&w.pp("layer_norm1"), d, eps)?,
            mlp: ClipMlp {
                fc1: Linear::new(&w.pp("mlp").pp("fc1"), d, cfg.intermediate_size, true)?,
                fc2: Linear::new(&w.pp("mlp").pp("fc2"), cfg.intermediate_size, d, true)?,
                act,
            },
            layer_norm2: LayerNorm::new(&w.pp("layer_norm2"), d, eps)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.self_attn.forward(&self.layer_norm1.forward(x)) + x;
        self.mlp.forward(&self.layer_norm2.forward(&x)) + x
    }
}

#[derive(Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    /// `encoder.layers`
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// `text_projection` (no bias): the pooled output's projection, when the
    /// encoder is a `CLIPTextModelWithProjection`.
    pub text_projection: Option<Linear>,
    /// Where the pooled output is read: the first `eos_token_id`, or the highest
    /// id when the config has transformers' legacy value 2.
    pub eos_token_id: i64,
    /// Recompute each encoder layer's activations in the backward pass.
    pub gradient_checkpointing: bool,
}

/// What a text encoder gives the UNet's conditioning.
#[derive(Debug)]
pub struct TextStates {
    /// `[batch, seq, hidden]`, as the family's [`HiddenStates`] rule takes them.
    pub hidden: Tensor,
    /// The projected pooled output `[batch, projection_dim]` (`text_embeds`), when asked for.
    pub pooled: Option<Tensor>,
}

impl ClipTextTransformer {
    /// `projected`: the encoder has a `text_projection` (SDXL's second encoder).
    pub fn new(w: &Weights, cfg: &ClipConfig, projected: bool) -> Result<Self> {
        Self::build(w, cfg, projected).context("cannot build the text encoder")
    }

    fn build(w: &Weights, cfg: &ClipConfig, projected: bool) -> Result<Self> {
        if cfg.num_attention_heads <= 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            anyhow::bail!(
                "the text encoder config has {} attention heads, which do not divide hidden_size {}",
                cfg.num_attention_heads,
                cfg.hidden_size
            );
        }
        let act = Activation::parse(&cfg.hidden_act, "hidden_act")?;
        let e = w.pp("embeddings");
        let embeddings = ClipTextEmbeddings {
            token_embedding: Embedding::new(&e.pp("token_embedding"), cfg.vocab_size, cfg.hidden_size)?,
            position_embedding: Embedding::new(&e.pp("position_embedding"), cfg.max_position_embeddings, cfg.hidden_size)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&w.pp("encoder").pp("layers").pp(i), cfg, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextTransformer {
            embeddings,
            layers,
            final_layer_norm: LayerNorm::new(&w.pp("final_layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            text_projection: if projected {
                Some(Linear::new(&w.pp("text_projection"), cfg.hidden_size, cfg.projection_dim, false)?)
            } else {
                None
            },
            eos_token_id: cfg.eos_token_id,
            gradient_checkpointing: false,
        })
    }

    /// Recompute each encoder layer's activations in the backward pass instead of
    /// keeping them (see [`checkpointing`] for the contract).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Hidden states `[batch, seq, hidden]` for token ids `[batch, seq]` (seq at most
    /// `max_position_embeddings`). `clip_skip` 1 is transformers' `last_hidden_state`;
    /// N > 1 takes `hidden_states[-N]` (the output N-1 layers before the last) through
    /// `final_layer_norm`, as AUTOMATIC1111 does. Values past the embeddings are clamped.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: i64) -> Tensor {
        self.encode(input_ids, HiddenStates::LastNormed, clip_skip, false).hidden
    }

    /// The hidden states `rule` takes (clip skip N going N-1 layers further back)
    /// and, with `pooled`, the projected pooled output of the last layer (which
    /// needs every layer run, whatever the skip).
    pub fn encode(&self, input_ids: &Tensor, rule: HiddenStates, clip_skip: i64, pooled: bool) -> TextStates {
        let skip = (clip_skip.max(1) - 1) as usize;
        let layers = self.layers.len();
        // Layers whose output the hidden states are: all of them, or one fewer for SDXL's penultimate.
        let keep_after = match rule {
            HiddenStates::LastNormed => layers.saturating_sub(skip),
            HiddenStates::Penultimate => layers.saturating_sub(1 + skip),
        };
        let run = if pooled { layers } else { keep_after };
        let mut h = self.embeddings.forward(input_ids);
        let mut kept = None;
        if keep_after == 0 {
            kept = Some(h.shallow_clone());
        }
        for (i, layer) in self.layers[..run].iter().enumerate() {
            h = checkpointing::clip_layer(layer, &h, self.gradient_checkpointing);
            if i + 1 == keep_after {
                kept = Some(h.shallow_clone());
            }
        }
        let kept = kept.expect("the kept layer is among those run");
        let hidden = match rule {
            HiddenStates::LastNormed => self.final_layer_norm.forward(&kept),
            HiddenStates::Penultimate => kept,
        };
        let pooled = pooled.then(|| {
            let last = self.final_layer_norm.forward(&h);
            let positions = if self.eos_token_id == 2 {
                input_ids.argmax(-1, false)
            } else {
                input_ids.eq(self.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
            };
            let batch = Tensor::arange(last.size()[0], (Kind::Int64, last.device()));
            let pooled = last.index(&[Some(batch), Some(positions)]);
            match &self.text_projection {
                Some(proj) => proj.forward(&pooled),
                None => pooled,
            }
        });
        TextStates { hidden, pooled }
    }

    /// Hidden states for prompts longer than one window, from ids laid out by
    /// [`ClipTokenizer::encode_chunked`](crate::tokenizer::ClipTokenizer::encode_chunked)
    /// (`[batch, k × window]`): each window is encoded on its own and the states are
    /// joined as kohya's trainers (and the AUTOMATIC1111 extension) join them: the
    /// first window's start token, every window's 75 inner positions, the last
    /// window's end position: `[batch, 2 + 75k, hidden]`. One window is [`forward`](Self::forward).
    pub fn forward_chunks(&self, input_ids: &Tensor, clip_skip: i64, window: i64) -> Tensor {
        self.encode_chunks(input_ids, HiddenStates::LastNormed, clip_skip, false, window).hidden
    }

    /// [`encode`](Self::encode) over windows joined as [`forward_chunks`](Self::forward_chunks)
    /// joins them; the pooled output is the first window's, as kohya's SDXL trainers take it.
    pub fn encode_chunks(&self, input_ids: &Tensor, rule: HiddenStates, clip_skip: i64, pooled: bool, window: i64) -> TextStates {
        let (batch, len) = input_ids.size2().expect("input ids are [batch, seq]");
        let k = len / window;
        if k <= 1 {
            return self.encode(input_ids, rule, clip_skip, pooled);
        }
        let out = self.encode(&input_ids.reshape([batch * k, window]), rule, clip_skip, pooled);
        let h = out.hidden;
        let hidden = h.size()[2];
        let h = h.reshape([batch, k, window, hidden]);
        let first = h.select(1, 0).narrow(1, 0, 1);
        let inner = h.narrow(2, 1, window - 2).reshape([batch, k * (window - 2), hidden]);
        let last = h.select(1, k - 1).narrow(1, window - 1, 1);
        let pooled = out.pooled.map(|p| {
            let width = p.size()[1];
            p.reshape([batch, k, width]).select(1, 0)
        });
        TextStates { hidden: Tensor::cat(&[first, inner, last], 1), pooled }
    }
}
