//! Prompts to what the UNet is conditioned on, the same way for every model
//! family: each of the family's text encoders (one for SD 1.x/2.x, two for
//! SDXL) reads the prompt with its own tokenizer, their hidden states (taken
//! by the family's rule) are concatenated along the width, the pooled
//! embedding comes from the encoder the family names, and SDXL's size and
//! crop ids join it as the UNet's added conditions.

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{LoadedTextEncoder, TextEncoderRole, TokenizerSource};
use crate::model::clip::ClipTextTransformer;
use crate::model::config::ClipConfig;
use crate::model::unet::{Conditioning, TextTime};
use crate::model::weights::Weights;
use crate::tokenizer::ClipTokenizer;

/// One text encoder with its tokenizer, in its family's role.
pub struct TextEncoder {
    pub role: TextEncoderRole,
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextTransformer,
    pub config: ClipConfig,
}

/// The text side of the conditioning: hidden states `[batch, seq, width]`
/// (every encoder's, joined) and SDXL's pooled embedding `[batch, projection]`.
#[derive(Debug)]
pub struct PromptEmbeds {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    pub fn shallow_clone(&self) -> Self {
        self.map(Tensor::shallow_clone)
    }

    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        PromptEmbeds { hidden: f(&self.hidden), pooled: self.pooled.as_ref().map(&f) }
    }

    /// The rows of several, one batch after another.
    pub fn cat(parts: &[PromptEmbeds]) -> Self {
        let hidden = Tensor::cat(&parts.iter().map(|p| &p.hidden).collect::<Vec<_>>(), 0);
        let pooled = parts.iter().map(|p| p.pooled.as_ref()).collect::<Option<Vec<_>>>().map(|v| Tensor::cat(&v, 0));
        PromptEmbeds { hidden, pooled }
    }
}

/// SDXL's micro-conditioning of one image: the size it had before it was
/// resized, where the crop began, and the size the model is asked for
/// (diffusers' `original_size`, `crops_coords_top_left`, `target_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeIds {
    pub original: (i64, i64),
    pub crop_top_left: (i64, i64),
    pub target: (i64, i64),
}

impl SizeIds {
    /// An image drawn at `height` × `width` from nothing (generation's defaults).
    pub fn plain(height: i64, width: i64) -> Self {
        SizeIds { original: (height, width), crop_top_left: (0, 0), target: (height, width) }
    }

    /// `[n, 6]` float32: original h, w, crop top, left, target h, w per row.
    pub fn tensor(rows: &[SizeIds]) -> Tensor {
        let flat: Vec<f32> = rows
            .iter()
            .flat_map(|s| [s.original.0, s.original.1, s.crop_top_left.0, s.crop_top_left.1, s.target.0, s.target.1])
            .map(|v| v as f32)
            .collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 6])
    }
}

fn build_tokenizer(source: &TokenizerSource) -> anyhow::Result<ClipTokenizer> {
    match source {
        TokenizerSource::Folder(dir) => ClipTokenizer::from_folder(dir),
        TokenizerSource::OpenAi { pad_token } => ClipTokenizer::openai()?.with_pad_token(pad_token),
    }
}

/// A family's text encoders and how their output conditions the UNet.
pub struct TextConditioner {
    pub encoders: Vec<TextEncoder>,
    /// Whether the UNet takes the pooled embedding and size ids (SDXL).
    pub uses_text_time: bool,
    /// An empty negative prompt conditions on zeros (SDXL's `force_zeros_for_empty_prompt`).
    pub zero_empty_negative: bool,
    /// Prompt tokens each encoder reads (`training.max_token_length`; 75 = one
    /// window, as diffusers).
    pub max_token_length: usize,
}

impl TextConditioner {
    /// Builds each encoder from its tensors on `device` in `kind`; returns the
    /// conditioner and each encoder's weight store (to check for unused tensors
    /// and to hand out its parameters).
    pub fn build(
        loaded: Vec<LoadedTextEncoder>,
        uses_text_time: bool,
        zero_empty_negative: bool,
        device: Device,
        kind: Kind,
        source: &std::path::Path,
    ) -> anyhow::Result<(Self, Vec<Weights>)> {
        let mut encoders = Vec::with_capacity(loaded.len());
        let mut stores = Vec::with_capacity(loaded.len());
        for t in loaded {
            let what = t.role.name.replace('_', " ");
            let tokenizer = build_tokenizer(&t.tokenizer)?;
            if tokenizer.vocab_size() as i64 > t.config.vocab_size {
                anyhow::bail!(
                    "{}: the tokenizer has {} tokens but the {what} only {}",
                    source.display(),
                    tokenizer.vocab_size(),
                    t.config.vocab_size
                );
            }
            let mut tensors = t.tensors;
            if !t.role.pooled {
                // A CLIPTextModelWithProjection's projection where no pooled output is used.
                tensors.retain(|k, _| !k.starts_with("text_projection."));
            }
            let w = Weights::new(&what, tensors, device, kind);
            let model = ClipTextTransformer::new(&w, &t.config, t.role.pooled)
                .with_context(|| format!("{}: cannot build the {what}", source.display()))?;
            encoders.push(TextEncoder { role: t.role, tokenizer, model, config: t.config });
            stores.push(w);
        }
        let conditioner = TextConditioner { encoders, uses_text_time, zero_empty_negative, max_token_length: 75 };
        Ok((conditioner, stores))
    }

    /// The first encoder's (every family has one).
    pub fn first(&self) -> &TextEncoder {
        &self.encoders[0]
    }

    /// The encoder called `name`.
    pub fn encoder_mut(&mut self, name: &str) -> Option<&mut TextEncoder> {
        self.encoders.iter_mut().find(|e| e.role.name == name)
    }

    /// Positions one window of the text encoders holds (77).
    pub fn window(&self) -> usize {
        self.first().config.max_position_embeddings as usize
    }

    /// The most layers a clip skip may go back over: the shallowest encoder's.
    pub fn layers(&self) -> i64 {
        self.encoders.iter().map(|e| e.config.num_hidden_layers).min().unwrap_or(0)
    }

    /// The prompt's token ids as [`encode_ids`](Self::encode_ids) reads them:
    /// every encoder's ids (windows of `max_token_length`) one after another.
    pub fn tokenize(&self, prompt: &str) -> Vec<i64> {
        let window = self.window();
        self.encoders.iter().flat_map(|e| e.tokenizer.encode_chunked(prompt, self.max_token_length, window)).collect()
    }

    /// Whether the prompt has more tokens than the encoders read.
    pub fn is_cut(&self, prompt: &str) -> bool {
        let readable = self.max_token_length.max(self.window().saturating_sub(2)) + 2;
        self.first().tokenizer.encode(prompt).len() > readable
    }

    /// The text conditioning of token ids laid out by [`tokenize`](Self::tokenize)
    /// (`[batch, encoders × len]`), on the ids' device, in the encoders' dtype.
    pub fn encode_ids(&self, ids: &Tensor, clip_skip: i64) -> PromptEmbeds {
        let (batch, len) = ids.size2().expect("token ids are [batch, seq]");
        let per = len / self.encoders.len() as i64;
        let window = self.window() as i64;
        let mut hidden = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (i, e) in self.encoders.iter().enumerate() {
            let part = ids.narrow(1, i as i64 * per, per);
            let states = e.model.encode_chunks(&part, e.role.hidden, clip_skip, e.role.pooled, window);
            debug_assert_eq!(states.hidden.size()[0], batch);
            hidden.push(states.hidden);
            pooled = pooled.or(states.pooled);
        }
        let hidden = if hidden.len() == 1 { hidden.pop().expect("one encoder") } else { Tensor::cat(&hidden, -1) };
        PromptEmbeds { hidden, pooled }
    }

    /// One prompt's conditioning `[1, …]` on `device` in `kind`.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: i64, device: Device, kind: Kind) -> PromptEmbeds {
        let ids = Tensor::from_slice(&self.tokenize(prompt)).view([1, -1]).to_device(device);
        self.encode_ids(&ids, clip_skip).map(|t| t.to_kind(kind))
    }

    /// A negative prompt's conditioning, shaped like `prompt`'s: zeros for an
    /// empty one where the model asks for that (SDXL), else its encoding.
    pub fn encode_negative(&self, negative: &str, clip_skip: i64, prompt: &PromptEmbeds) -> PromptEmbeds {
        if negative.is_empty() && self.zero_empty_negative {
            return prompt.map(Tensor::zeros_like);
        }
        self.encode_prompt(negative, clip_skip, prompt.hidden.device(), prompt.hidden.kind())
    }

    /// What the UNet takes: the text conditioning, with SDXL's pooled embedding
    /// and `sizes` (one row per batch row) as its added conditions.
    pub fn conditioning(&self, text: &PromptEmbeds, sizes: &[SizeIds]) -> Conditioning {
        self.conditioning_with_ids(text, &SizeIds::tensor(sizes))
    }

    /// [`conditioning`](Self::conditioning) with the size ids as a `[batch or 1, 6]`
    /// tensor (a training batch's, already on the device).
    pub fn conditioning_with_ids(&self, text: &PromptEmbeds, time_ids: &Tensor) -> Conditioning {
        let text_time = self.uses_text_time.then(|| {
            let pooled = text.pooled.as_ref().expect("an SDXL conditioner pools its second encoder");
            let batch = pooled.size()[0];
            // Float32 whatever the encoders' dtype: bf16 would round a size like 1917.
            let ids = time_ids.to_device(pooled.device()).to_kind(Kind::Float);
            let time_ids = if ids.size()[0] == batch { ids } else { ids.expand([batch, 6], false).contiguous() };
            TextTime { text_embeds: pooled.shallow_clone(), time_ids }
        });
        Conditioning { encoder_hidden_states: text.hidden.shallow_clone(), text_time }
    }

    /// What a prompt loses to the text encoders' reach, in words, or `None` when
    /// it is read whole (diffusers' pipeline warns the same way).
    /// `read_more` says how to raise the limit where it can be.
    pub fn cut_prompt_warning(&self, what: &str, prompt: &str, read_more: &str) -> Option<String> {
        let readable = self.max_token_length.max(self.window().saturating_sub(2));
        let tokens = self.first().tokenizer.encode(prompt).len().saturating_sub(2);
        (tokens > readable).then(|| {
            let longer = if readable < 225 { format!("; {read_more} reads more") } else { String::new() };
            format!("{what} has {tokens} tokens and the text encoder reads {readable}: the rest is cut{longer}")
        })
    }

    /// Each encoder with its kohya LoRA prefix, for adapters.
    pub fn lora_targets(&mut self) -> Vec<(&'static str, &mut ClipTextTransformer)> {
        self.encoders.iter_mut().map(|e| (e.role.kohya_prefix, &mut e.model)).collect()
    }

    /// Recompute each encoder layer's activations in the backward pass.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.encoders.iter_mut().for_each(|e| e.model.set_gradient_checkpointing(on));
    }
}
