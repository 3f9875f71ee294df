//! Single-file checkpoints in the original latent-diffusion layout (what
//! AUTOMATIC1111 and most model sites use): `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD 1.x, a
//! transformers CLIP) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP); SDXL's
//! Stability-AI (`sgm`) layout keeps the UNet and VAE there and its two text
//! encoders under `conditioner.embedders.0.transformer.*` (transformers CLIP)
//! and `conditioner.embedders.1.model.*` (OpenCLIP bigG with its projection).
//!
//! Two jobs: read the architecture off the tensor shapes (the family's
//! conventions fill in what shapes cannot say: SD 1.x uses 8 heads, SD 2.x,
//! SDXL and CLIP a head size of 64), and map every key to its diffusers name.
//! The mapping follows the file's own block structure, so it does not depend on
//! the config and works the same when a sidecar or `--model-config` overrides it.

use std::collections::BTreeSet;

use anyhow::{bail, Context};

use super::ldm_names::{added_embedding_blocks, unet_blocks, vae_blocks, Inner, Naming, Table, UnetLayout};
use super::source::TensorSource;
use super::Architecture;
use crate::model::config::{ClipConfig, PerBlock, UNetConfig, VaeConfig};

pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
pub const HF_CLIP: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (CLIP ViT-L, transformers keys).
pub const SGM_HF_CLIP: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP bigG).
pub const SGM_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// What an SDXL refiner keeps its only text encoder (OpenCLIP bigG) under.
const SGM_REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";

/// How a stored tensor becomes the diffusers one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Same,
    /// LDM's VAE attention uses 1×1 convolutions where diffusers has linear layers.
    Conv1x1ToLinear,
    /// One third (0 = q, 1 = k, 2 = v) of OpenCLIP's fused `in_proj` along dim 0.
    ThirdOf(i64),
    /// A matrix transposed: OpenCLIP applies its `text_projection` as `x @ P`
    /// (`[width, projection]`), transformers' Linear as `x @ Wᵀ`.
    Transpose,
}

/// One diffusers tensor and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub target: String,
    pub source: String,
    pub transform: Transform,
}

/// How a text encoder's keys are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKeys {
    /// transformers' CLIPTextModel keys (`text_model.` optional).
    HfClip,
    /// OpenCLIP's text tower (`transformer.resblocks.N`, q/k/v fused in `in_proj`).
    OpenClip,
}

/// Token ids a text encoder's config carries (transformers pools at the first
/// `eos_token_id`, or at the highest id when it is the legacy 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenIds {
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
}

/// Where and how a single file keeps one of the family's text encoders.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextLayout {
    pub keys: TextKeys,
    /// Key prefix of the encoder in the file.
    pub prefix: &'static str,
    /// The diffusers encoder stops one block short of the stored tower (SD 2
    /// conditions on OpenCLIP's penultimate layer; diffusers drops the last).
    pub drops_last_block: bool,
    /// OpenCLIP's `text_projection` belongs to the encoder (SDXL's pooled output).
    pub projection: bool,
    /// The ids the family's hub configs carry.
    pub ids: TokenIds,
}

impl TextLayout {
    /// SD 1.x: OpenAI CLIP ViT-L, padding with `<|endoftext|>`.
    pub const SD1: TextLayout = TextLayout {
        keys: TextKeys::HfClip,
        prefix: HF_CLIP,
        drops_last_block: false,
        projection: false,
        ids: TokenIds { bos: 49406, eos: 49407, pad: 49407 },
    };
    /// SD 2.x: OpenCLIP ViT-H without its last block, padding with "!".
    pub const SD2: TextLayout = TextLayout {
        keys: TextKeys::OpenClip,
        prefix: OPEN_CLIP,
        drops_last_block: true,
        projection: false,
        ids: TokenIds { bos: 49406, eos: 49407, pad: 0 },
    };
    /// SDXL's first encoder, every layer kept (the pipeline picks the penultimate
    /// at run time); the legacy ids of SDXL's hub configs.
    pub const SDXL_1: TextLayout = TextLayout {
        keys: TextKeys::HfClip,
        prefix: SGM_HF_CLIP,
        drops_last_block: false,
        projection: false,
        ids: TokenIds { bos: 0, eos: 2, pad: 1 },
    };
    /// SDXL's second encoder: every block kept (the pooled output needs the last)
    /// and the projection.
    pub const SDXL_2: TextLayout = TextLayout {
        keys: TextKeys::OpenClip,
        prefix: SGM_OPEN_CLIP,
        drops_last_block: false,
        projection: true,
        ids: TokenIds { bos: 0, eos: 2, pad: 1 },
    };
}

/// What the file's keys alone say about it (cheap: no shapes needed beyond a few).
pub fn detect(src: &dyn TensorSource) -> Architecture {
    let has_prefix = |p: &str| src.index().range(p.to_string()..).next().is_some_and(|(k, _)| k.starts_with(p));
    if has_prefix("conditioner.embedders.") {
        return detect_sgm(has_prefix);
    }
    if !has_prefix(UNET) && (has_prefix("lora_unet_") || has_prefix("lora_te")) {
        return Architecture::Unknown("a LoRA (kohya keys), not a model: apply it with `generate --lora` over its base model".into());
    }
    if !has_prefix(UNET) && src.index().contains_key("encoder.conv_in.weight") && src.index().contains_key("decoder.conv_in.weight") {
        return Architecture::Unknown("a VAE, not a model: use it with a run config's `vae` or `generate --vae`".into());
    }
    if !has_prefix(UNET) {
        return Architecture::Unknown("no Stable Diffusion UNet (`model.diffusion_model.*`) in it".into());
    }
    if has_prefix(&format!("{UNET}label_emb.")) {
        return Architecture::Unknown("a class-conditioned UNet (upscaler or unCLIP; not supported)".into());
    }
    if has_prefix(OPEN_CLIP) {
        Architecture::Sd2
    } else if has_prefix(HF_CLIP) {
        Architecture::Sd1
    } else {
        Architecture::Unknown("no text encoder (`cond_stage_model.*`) in it".into())
    }
}

/// A Stability-AI (`sgm`) file: SDXL base when it has both of its text encoders.
fn detect_sgm(has_prefix: impl Fn(&str) -> bool) -> Architecture {
    let unknown = |what: &str| Architecture::Unknown(what.into());
    if !has_prefix(UNET) {
        return unknown("no UNet (`model.diffusion_model.*`) in it");
    }
    if has_prefix(SGM_HF_CLIP) && has_prefix(SGM_OPEN_CLIP) {
        Architecture::Sdxl
    } else if has_prefix(SGM_REFINER_OPEN_CLIP) && !has_prefix(SGM_HF_CLIP) {
        unknown("an SDXL refiner (its only text encoder is OpenCLIP bigG; not supported)")
    } else {
        unknown("a Stability-AI model without SDXL's two text encoders (`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`; not supported)")
    }
}

/// Where the family keeps its text encoders, in the order of `Architecture::text_encoders`.
pub fn text_layouts(arch: &Architecture) -> &'static [TextLayout] {
    match arch {
        Architecture::Sd2 => &[TextLayout::SD2],
        Architecture::Sdxl => &[TextLayout::SDXL_1, TextLayout::SDXL_2],
        _ => &[TextLayout::SD1],
    }
}

/// The family's first (for SD 1.x/2.x, only) text encoder layout.
pub fn text_layout(arch: &Architecture) -> TextLayout {
    text_layouts(arch)[0]
}

// ----------------------------------------------------------------------------
// Structure
// ----------------------------------------------------------------------------

/// Numbers that follow `prefix` in the file's keys (`input_blocks.` → 0, 1, 2, ...).
fn indices(src: &dyn TensorSource, prefix: &str) -> BTreeSet<usize> {
    src.index()
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .filter_map(|(k, _)| k[prefix.len()..].split('.').next()?.parse().ok())
        .collect()
}

fn shape<'a>(src: &'a dyn TensorSource, key: &str) -> anyhow::Result<&'a [i64]> {
    src.shape(key).with_context(|| format!("{} has no tensor `{key}`", src.path().display()))
}

fn dim(src: &dyn TensorSource, key: &str, i: usize) -> anyhow::Result<i64> {
    let s = shape(src, key)?;
    s.get(i).copied().with_context(|| format!("tensor `{key}` of {} has shape {s:?}, too few dimensions", src.path().display()))
}

/// Checks that block numbers run 0..n without gaps.
fn contiguous(src: &dyn TensorSource, set: &BTreeSet<usize>, what: &str) -> anyhow::Result<usize> {
    let n = set.len();
    if set.iter().enumerate().any(|(i, &b)| i != b) {
        bail!("{} has a gap in its {what} numbering ({set:?})", src.path().display());
    }
    Ok(n)
}

#[derive(Debug, Clone)]
struct Level {
    channels: i64,
    resnets: usize,
    /// Transformer depth of the level's attentions, 0 when it has none.
    depth: usize,
}

/// The UNet's block structure as stored.
#[derive(Debug, Clone)]
struct UnetStructure {
    levels: Vec<Level>,
    layers_per_block: usize,
    mid_depth: usize,
    up_attention: Vec<bool>,
    /// Where each input block goes: `None` for a downsampler of the level, `Some(j)` for resnet j.
    input_blocks: Vec<(usize, Option<usize>)>,
}

fn transformer_depth(src: &dyn TensorSource, block: &str) -> usize {
    indices(src, &format!("{block}transformer_blocks.")).len()
}

fn unet_structure(src: &dyn TensorSource) -> anyhow::Result<UnetStructure> {
    let shown = src.path().display();
    let n_in = contiguous(src, &indices(src, &format!("{UNET}input_blocks.")), "UNet input_blocks")?;
    let mut levels = vec![Level { channels: 0, resnets: 0, depth: 0 }];
    let mut input_blocks = vec![(0, Some(0))];
    for k in 1..n_in {
        let p = format!("{UNET}input_blocks.{k}.");
        let level = levels.len() - 1;
        if src.has(&format!("{p}0.op.weight")) {
            input_blocks.push((level, None));
            levels.push(Level { channels: 0, resnets: 0, depth: 0 });
        } else if src.has(&format!("{p}0.in_layers.2.weight")) {
            let lv = levels.last_mut().expect("levels is never empty");
            lv.channels = dim(src, &format!("{p}0.out_layers.3.weight"), 0)?;
            let depth = transformer_depth(src, &format!("{p}1."));
            if lv.resnets > 0 && depth != lv.depth {
                bail!("{shown}: UNet input block {k} has {depth} transformer blocks, its level's others {}", lv.depth);
            }
            lv.depth = depth;
            input_blocks.push((level, Some(lv.resnets)));
            lv.resnets += 1;
        } else {
            bail!("{shown}: UNet input block {k} is neither a resnet nor a downsampler (not an SD 1.x/2.x UNet?)");
        }
    }
    if levels.iter().any(|l| l.resnets == 0) {
        bail!("{shown}: a UNet level has no resnets (not an SD 1.x/2.x UNet?)");
    }
    let layers_per_block = levels[0].resnets;
    if levels.iter().any(|l| l.resnets != layers_per_block) {
        bail!("{shown}: UNet levels have different numbers of resnets, which is not supported");
    }
    let n_out = contiguous(src, &indices(src, &format!("{UNET}output_blocks.")), "UNet output_blocks")?;
    if n_out != levels.len() * (layers_per_block + 1) {
        bail!(
            "{shown}: the UNet has {n_out} output blocks, expected {} for {} levels of {layers_per_block} resnets",
            levels.len() * (layers_per_block + 1),
            levels.len()
        );
    }
    let up_attention = (0..levels.len())
        .map(|i| src.has(&format!("{UNET}output_blocks.{}.1.norm.weight", i * (layers_per_block + 1))))
        .collect();
    let mid_depth = transformer_depth(src, &format!("{UNET}middle_block.1."));
    Ok(UnetStructure { levels, layers_per_block, mid_depth, up_attention, input_blocks })
}

// ----------------------------------------------------------------------------
// Configs from shapes
// ----------------------------------------------------------------------------

/// The architecture the shapes and the family's conventions give.
#[derive(Debug, Clone)]
pub struct Inferred {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    /// The first (for SD 1.x/2.x, only) text encoder.
    pub text: ClipConfig,
    /// Text encoder blocks stored in the file (the config may use fewer: SD 2's penultimate layer).
    pub stored_text_layers: i64,
    /// SDXL's second text encoder (every stored block).
    pub text_2: Option<ClipConfig>,
}

impl Inferred {
    /// The text encoder configs in the family's order.
    pub fn text_encoders(&self) -> Vec<&ClipConfig> {
        std::iter::once(&self.text).chain(&self.text_2).collect()
    }
}

/// The family's head width, which no shape tells: SDXL's and SD 2's UNets
/// and every CLIP use heads 64 wide (SD 1.x's UNet has 8 heads at every width).
const HEAD_WIDTH: i64 = 64;

pub fn infer(src: &dyn TensorSource, arch: &Architecture) -> anyhow::Result<Inferred> {
    let mut inferred = infer_shapes(src, arch)?;
    set_conventional_heads(src, arch, &mut inferred)?;
    Ok(inferred)
}

/// Everything `infer` gives but the head counts (1 everywhere): what the shapes
/// say and the family's defaults. For looking at a model whose widths break
/// the family's head convention (tiny test models); not for building one.
pub fn infer_shapes(src: &dyn TensorSource, arch: &Architecture) -> anyhow::Result<Inferred> {
    let layouts = text_layouts(arch);
    let (text, stored_text_layers) = infer_text(src, layouts[0])?;
    let text_2 = match layouts.get(1) {
        Some(layout) => Some(infer_text(src, *layout)?.0),
        None => None,
    };
    // SDXL's added embedding takes the projected pooled output of its second encoder.
    let pooled_width = text_2.as_ref().map(|t| t.projection_dim);
    let unet = infer_unet(src, arch, pooled_width)?;
    let mut vae = infer_vae(src)?;
    if *arch == Architecture::Sdxl {
        // SDXL's VAE config (`stabilityai/sdxl-vae`).
        vae.scaling_factor = 0.13025;
        vae.sample_size = 1024;
    }
    Ok(Inferred { unet, vae, text, stored_text_layers, text_2 })
}

/// Head counts by the family's convention; a width the convention does not
/// divide is refused (the configs must then come from `--model-config`).
fn set_conventional_heads(src: &dyn TensorSource, arch: &Architecture, inferred: &mut Inferred) -> anyhow::Result<()> {
    let shown = src.path().display();
    let unet = &mut inferred.unet;
    let channels = &unet.block_out_channels;
    // diffusers' `attention_head_dim` holds the number of heads for SD 1.x/2.x and SDXL.
    unet.attention_head_dim = match arch {
        Architecture::Sd2 => {
            for c in channels {
                if c % HEAD_WIDTH != 0 {
                    bail!("{shown}: UNet width {c} is not a multiple of SD 2's head size 64; give a sidecar .yaml or --model-config");
                }
            }
            PerBlock::Each(channels.iter().map(|c| c / HEAD_WIDTH).collect())
        }
        Architecture::Sdxl => {
            // Only levels with attention have heads (SDXL's first level has none).
            let attention = |i: usize| unet.down_block_types.get(i).is_some_and(|t| t.starts_with("CrossAttn"));
            for (i, c) in channels.iter().enumerate() {
                if attention(i) && c % HEAD_WIDTH != 0 {
                    bail!("{shown}: UNet width {c} is not a multiple of SDXL's head width 64; give --model-config");
                }
            }
            PerBlock::Each(channels.iter().map(|c| (c / HEAD_WIDTH).max(1)).collect())
        }
        _ => PerBlock::One(8),
    };
    let texts = std::iter::once(&mut inferred.text).chain(inferred.text_2.as_mut());
    for text in texts {
        let hidden = text.hidden_size;
        if hidden % HEAD_WIDTH != 0 {
            bail!("{shown}: text encoder width {hidden} is not a multiple of CLIP's head size 64; give --model-config");
        }
        text.num_attention_heads = hidden / HEAD_WIDTH;
    }
    Ok(())
}

fn infer_unet(src: &dyn TensorSource, arch: &Architecture, pooled_width: Option<i64>) -> anyhow::Result<UNetConfig> {
    let s = unet_structure(src)?;
    let block_out_channels: Vec<i64> = s.levels.iter().map(|l| l.channels).collect();
    let down_block_types =
        s.levels.iter().map(|l| if l.depth > 0 { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string()).collect();
    let up_block_types =
        s.up_attention.iter().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string()).collect();

    // The first attention tells the projection kind and the context width.
    let first_attn = s
        .input_blocks
        .iter()
        .enumerate()
        .find(|(k, _)| src.has(&format!("{UNET}input_blocks.{k}.1.proj_in.weight")))
        .map(|(k, _)| format!("{UNET}input_blocks.{k}.1."))
        .unwrap_or_else(|| format!("{UNET}middle_block.1."));
    let proj_in = shape(src, &format!("{first_attn}proj_in.weight"))
        .context("the UNet has no attention layers (not an SD UNet?)")?;
    let use_linear_projection = proj_in.len() == 2;
    let cross_attention_dim = dim(src, &format!("{first_attn}transformer_blocks.0.attn2.to_k.weight"), 1)?;

    let depths: BTreeSet<usize> = s.levels.iter().map(|l| l.depth).chain([s.mid_depth]).filter(|&d| d > 0).collect();
    let transformer_layers_per_block = match depths.len() {
        0 | 1 => PerBlock::One(depths.first().copied().unwrap_or(1) as i64),
        _ => PerBlock::Each(s.levels.iter().map(|l| l.depth.max(1) as i64).collect()),
    };

    let added = match (arch, pooled_width) {
        (Architecture::Sdxl, Some(pooled)) => Some(added_embedding(src, pooled)?),
        _ => None,
    };

    Ok(UNetConfig {
        in_channels: dim(src, &format!("{UNET}input_blocks.0.0.weight"), 1)?,
        out_channels: dim(src, &format!("{UNET}out.2.weight"), 0)?,
        sample_size: if *arch == Architecture::Sdxl { 128 } else { 64 },
        down_block_types,
        mid_block_type: Some(if s.mid_depth > 0 { "UNetMidBlock2DCrossAttn" } else { "UNetMidBlock2D" }.into()),
        up_block_types,
        block_out_channels,
        layers_per_block: PerBlock::One(s.layers_per_block as i64),
        cross_attention_dim: PerBlock::One(cross_attention_dim),
        transformer_layers_per_block,
        attention_head_dim: PerBlock::One(1),
        num_attention_heads: None,
        use_linear_projection,
        // The original SD 2 code computes attention scores in float32.
        upcast_attention: *arch == Architecture::Sd2,
        addition_embed_type: added.map(|_| "text_time".to_string()),
        addition_time_embed_dim: added.map(|(time, _)| time),
        projection_class_embeddings_input_dim: added.map(|(_, input)| input),
        ..UNetConfig::default()
    })
}

/// SDXL's added embedding: (channels per size id, input width). Its input is the
/// pooled text embedding and six size/crop ids of one sinusoidal width each.
fn added_embedding(src: &dyn TensorSource, pooled: i64) -> anyhow::Result<(i64, i64)> {
    let input = dim(src, &format!("{UNET}label_emb.0.0.weight"), 1)?;
    let ids = input - pooled;
    if ids <= 0 || ids % 6 != 0 {
        bail!(
            "{}: the UNet's added embedding takes {input} values, not the pooled text width {pooled} plus six size ids of one width",
            src.path().display()
        );
    }
    Ok((ids / 6, input))
}

fn infer_vae(src: &dyn TensorSource) -> anyhow::Result<VaeConfig> {
    let shown = src.path().display();
    let n = contiguous(src, &indices(src, &format!("{VAE}encoder.down.")), "VAE encoder.down")?;
    if n == 0 {
        bail!("{shown} has no VAE (`first_stage_model.*`) weights");
    }
    let block_out_channels =
        (0..n).map(|i| dim(src, &format!("{VAE}encoder.down.{i}.block.0.conv2.weight"), 0)).collect::<anyhow::Result<Vec<_>>>()?;
    let layers_per_block = indices(src, &format!("{VAE}encoder.down.0.block.")).len() as i64;
    Ok(VaeConfig {
        in_channels: dim(src, &format!("{VAE}encoder.conv_in.weight"), 1)?,
        out_channels: dim(src, &format!("{VAE}decoder.conv_out.weight"), 0)?,
        down_block_types: vec!["DownEncoderBlock2D".into(); n],
        up_block_types: vec!["UpDecoderBlock2D".into(); n],
        block_out_channels,
        layers_per_block,
        latent_channels: dim(src, &format!("{VAE}decoder.conv_in.weight"), 1)?,
        use_quant_conv: src.has(&format!("{VAE}quant_conv.weight")),
        use_post_quant_conv: src.has(&format!("{VAE}post_quant_conv.weight")),
        mid_block_add_attention: src.has(&format!("{VAE}encoder.mid.attn_1.q.weight")),
        ..VaeConfig::default()
    })
}

/// `<prefix>text_model.` or, in older files, `<prefix>` alone.
fn hf_clip_prefix(src: &dyn TensorSource, prefix: &str) -> String {
    let with = format!("{prefix}text_model.");
    if src.has(&format!("{with}embeddings.token_embedding.weight")) {
        with
    } else {
        prefix.to_string()
    }
}

/// The encoder's config from its shapes (heads: 1, set by the convention later)
/// and the blocks stored.
fn infer_text(src: &dyn TensorSource, layout: TextLayout) -> anyhow::Result<(ClipConfig, i64)> {
    let shown = src.path().display();
    let (token, position, layers, fc1, act, projection_dim) = match layout.keys {
        TextKeys::HfClip => {
            let p = hf_clip_prefix(src, layout.prefix);
            (
                format!("{p}embeddings.token_embedding.weight"),
                format!("{p}embeddings.position_embedding.weight"),
                contiguous(src, &indices(src, &format!("{p}encoder.layers.")), "text encoder layers")?,
                format!("{p}encoder.layers.0.mlp.fc1.weight"),
                "quick_gelu",
                None,
            )
        }
        TextKeys::OpenClip => {
            let p = layout.prefix;
            (
                format!("{p}token_embedding.weight"),
                format!("{p}positional_embedding"),
                contiguous(src, &indices(src, &format!("{p}transformer.resblocks.")), "OpenCLIP resblocks")?,
                format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
                "gelu",
                src.shape(&format!("{p}text_projection")).and_then(|s| s.get(1).copied()),
            )
        }
    };
    if layers == 0 {
        bail!("{shown} has no text encoder layers");
    }
    if layout.projection && projection_dim.is_none() {
        bail!("{shown} has no `{}text_projection` (the pooled text embedding needs it)", layout.prefix);
    }
    let hidden = dim(src, &token, 1)?;
    let used_layers = if layout.drops_last_block { layers as i64 - 1 } else { layers as i64 };
    let config = ClipConfig {
        vocab_size: dim(src, &token, 0)?,
        hidden_size: hidden,
        intermediate_size: dim(src, &fc1, 0)?,
        num_hidden_layers: used_layers,
        num_attention_heads: 1,
        max_position_embeddings: dim(src, &position, 0)?,
        hidden_act: act.into(),
        projection_dim: projection_dim.unwrap_or(hidden),
        pad_token_id: layout.ids.pad,
        bos_token_id: layout.ids.bos,
        eos_token_id: layout.ids.eos,
        ..ClipConfig::default()
    };
    Ok((config, layers as i64))
}

// ----------------------------------------------------------------------------
// Key mapping
// ----------------------------------------------------------------------------

/// Diffusers UNet keys for every `model.diffusion_model.*` tensor.
pub fn unet_plan(src: &dyn TensorSource) -> anyhow::Result<Vec<Mapped>> {
    let s = unet_structure(src)?;
    let layout = UnetLayout {
        down_resnets: vec![s.layers_per_block; s.levels.len()],
        up_attention: s.up_attention.clone(),
        mid_attention: s.mid_depth > 0,
    };
    let mut blocks = unet_blocks(&layout);
    blocks.extend(added_embedding_blocks());
    let table = Table::new(blocks, Naming::Ldm);
    let mut plan = Vec::new();
    for key in src.index().keys().filter(|k| k.starts_with(UNET)) {
        let (target, _) = table.rename(&key[UNET.len()..]).ok_or_else(|| {
            anyhow::anyhow!(
                "{} has a UNet tensor `{key}` that SD 1.x/2.x and SDXL UNets do not have (an unsupported model type?)",
                src.path().display()
            )
        })?;
        plan.push(Mapped { target, source: key.clone(), transform: Transform::Same });
    }
    Ok(plan)
}

/// Diffusers VAE keys for every `first_stage_model.*` tensor.
pub fn vae_plan(src: &dyn TensorSource) -> anyhow::Result<Vec<Mapped>> {
    vae_plan_under(src, VAE)
}

/// Diffusers VAE keys for every tensor under `prefix` (empty for a VAE file of its
/// own, as AUTOMATIC1111's `vae-ft-mse-840000-ema-pruned.safetensors`).
pub fn vae_plan_under(src: &dyn TensorSource, prefix: &str) -> anyhow::Result<Vec<Mapped>> {
    let levels = indices(src, &format!("{prefix}decoder.up.")).len();
    let resnets = (0..levels)
        .flat_map(|i| [format!("{prefix}encoder.down.{i}.block."), format!("{prefix}decoder.up.{i}.block.")])
        .map(|p| indices(src, &p).len())
        .max()
        .unwrap_or(0);
    let table = Table::new(vae_blocks(levels, resnets), Naming::Ldm);
    let mut plan = Vec::new();
    for key in src.index().keys().filter(|k| k.starts_with(prefix)) {
        let rest = &key[prefix.len()..];
        if rest.starts_with("loss.") {
            continue; // training-time discriminator some VAE checkpoints carry
        }
        let (target, inner) = table.rename(rest).ok_or_else(|| {
            anyhow::anyhow!("{} has a VAE tensor `{key}` that SD's VAE does not have", src.path().display())
        })?;
        let conv = src.shape(key).is_some_and(|s| s.len() == 4);
        let transform = if inner == Inner::VaeAttention && conv { Transform::Conv1x1ToLinear } else { Transform::Same };
        plan.push(Mapped { target, source: key.clone(), transform });
    }
    Ok(plan)
}

/// The first of `renames` that `rest` starts with: (its new name, the rest after it).
fn rename_first<'a>(rest: &'a str, renames: &[(&str, &'a str)]) -> Option<(&'a str, &'a str)> {
    renames.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|tail| (*to, tail)))
}

/// transformers CLIPTextModel keys (without `text_model.`; a projected encoder's
/// `text_projection.weight` as it is) for the text encoder's tensors, keeping
/// the first `layers` blocks.
pub fn text_plan(src: &dyn TensorSource, layout: TextLayout, layers: i64) -> anyhow::Result<Vec<Mapped>> {
    let mut plan = Vec::new();
    let layer_of = |rest: &str, prefix: &str| -> Option<i64> { rest.strip_prefix(prefix)?.split('.').next()?.parse().ok() };
    match layout.keys {
        TextKeys::HfClip => {
            let p = hf_clip_prefix(src, layout.prefix);
            for key in src.index().keys().filter(|k| k.starts_with(&p)) {
                let rest = &key[p.len()..];
                let keep = match layer_of(rest, "encoder.layers.") {
                    Some(i) => i < layers,
                    None => {
                        (rest.starts_with("embeddings.") && rest != "embeddings.position_ids")
                            || rest.starts_with("final_layer_norm.")
                    }
                };
                if keep {
                    plan.push(Mapped { target: rest.to_string(), source: key.clone(), transform: Transform::Same });
                }
            }
        }
        TextKeys::OpenClip => {
            let prefix = layout.prefix;
            let fixed = [
                ("token_embedding.weight", "embeddings.token_embedding.weight"),
                ("positional_embedding", "embeddings.position_embedding.weight"),
                ("ln_final.weight", "final_layer_norm.weight"),
                ("ln_final.bias", "final_layer_norm.bias"),
            ];
            let block = [
                ("attn.out_proj.", "self_attn.out_proj."),
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ];
            for key in src.index().keys().filter(|k| k.starts_with(prefix)) {
                let rest = &key[prefix.len()..];
                if let Some((_, to)) = fixed.iter().find(|(from, _)| *from == rest) {
                    plan.push(Mapped { target: to.to_string(), source: key.clone(), transform: Transform::Same });
                    continue;
                }
                if layout.projection && rest == "text_projection" {
                    let target = "text_projection.weight".to_string();
                    plan.push(Mapped { target, source: key.clone(), transform: Transform::Transpose });
                    continue;
                }
                let Some(i) = layer_of(rest, "transformer.resblocks.") else {
                    continue; // logit_scale, attn_mask (and SD 2's unused text_projection): not part of the encoder
                };
                if i >= layers {
                    continue;
                }
                let inner = rest.splitn(4, '.').nth(3).unwrap_or("");
                let to = format!("encoder.layers.{i}.");
                if let Some(wb) = inner.strip_prefix("attn.in_proj_") {
                    for (t, name) in ["q", "k", "v"].iter().enumerate() {
                        plan.push(Mapped {
                            target: format!("{to}self_attn.{name}_proj.{wb}"),
                            source: key.clone(),
                            transform: Transform::ThirdOf(t as i64),
                        });
                    }
                } else if let Some((renamed, tail)) = rename_first(inner, &block) {
                    plan.push(Mapped { target: format!("{to}{renamed}{tail}"), source: key.clone(), transform: Transform::Same });
                } else {
                    bail!("{} has an OpenCLIP tensor `{key}` this program does not know", src.path().display());
                }
            }
        }
    }
    if plan.is_empty() {
        bail!("{} has no text encoder weights", src.path().display());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::Read;
    use std::path::{Path, PathBuf};

    use tch::{Kind, Tensor};

    use super::*;
    use crate::checkpoint::source::TensorInfo;

    /// A checkpoint known only by its keys and shapes.
    struct IndexOnly {
        path: PathBuf,
        index: BTreeMap<String, TensorInfo>,
    }

    impl TensorSource for IndexOnly {
        fn path(&self) -> &Path {
            &self.path
        }
        fn index(&self) -> &BTreeMap<String, TensorInfo> {
            &self.index
        }
        fn load(&self, key: &str) -> anyhow::Result<Tensor> {
            anyhow::bail!("no data for {key}")
        }
    }

    /// Full-size SD 1.5 / SD 2.1 layouts (testdata/make_ldm_shapes.py).
    fn real_layout(name: &str) -> (IndexOnly, serde_json::Value) {
        layout_from(include_bytes!("testdata/ldm_shapes.json.gz"), name)
    }

    /// Full-size SDXL base 1.0 in Stability-AI's layout (testdata/make_sdxl_shapes.py).
    fn real_sdxl_layout() -> (IndexOnly, serde_json::Value) {
        layout_from(include_bytes!("testdata/sdxl_shapes.json.gz"), "sdxl")
    }

    fn layout_from(gz: &[u8], name: &str) -> (IndexOnly, serde_json::Value) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz).read_to_string(&mut text).unwrap();
        let all: serde_json::Value = serde_json::from_str(&text).unwrap();
        let index = all[name]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shape = v.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                (k.clone(), TensorInfo { shape, kind: Kind::Half })
            })
            .collect();
        (IndexOnly { path: format!("{name}.safetensors").into(), index }, all[format!("{name}_diffusers")].clone())
    }

    fn targets(plan: &[Mapped]) -> BTreeSet<String> {
        let t: BTreeSet<String> = plan.iter().map(|m| m.target.clone()).collect();
        assert_eq!(t.len(), plan.len(), "two tensors map to one key");
        t
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect()
    }

    fn same_unet(got: &UNetConfig, want: &UNetConfig) {
        assert_eq!(got.block_out_channels, want.block_out_channels);
        assert_eq!(got.down_block_types, want.down_block_types);
        assert_eq!(got.up_block_types, want.up_block_types);
        assert_eq!(got.mid_block_type, want.mid_block_type);
        for i in 0..4 {
            assert_eq!(got.heads(i), want.heads(i), "heads of block {i}");
            assert_eq!(got.layers_per_block.at(i), want.layers_per_block.at(i));
            assert_eq!(got.cross_attention_dim.at(i), want.cross_attention_dim.at(i));
            assert_eq!(got.transformer_layers_per_block.at(i), want.transformer_layers_per_block.at(i));
        }
        assert_eq!(got.use_linear_projection, want.use_linear_projection);
        assert_eq!(got.upcast_attention, want.upcast_attention);
        assert_eq!((got.in_channels, got.out_channels), (want.in_channels, want.out_channels));
    }

    fn same_text(got: &ClipConfig, want: &ClipConfig) {
        assert_eq!(got.hidden_size, want.hidden_size);
        assert_eq!(got.intermediate_size, want.intermediate_size);
        assert_eq!(got.num_hidden_layers, want.num_hidden_layers);
        assert_eq!(got.num_attention_heads, want.num_attention_heads);
        assert_eq!(got.hidden_act, want.hidden_act);
        assert_eq!(got.vocab_size, want.vocab_size);
        assert_eq!(got.max_position_embeddings, want.max_position_embeddings);
    }

    fn same_vae(got: &VaeConfig, want: &VaeConfig) {
        assert_eq!(got.block_out_channels, want.block_out_channels);
        assert_eq!(got.layers_per_block, want.layers_per_block);
        assert_eq!(got.latent_channels, want.latent_channels);
        assert_eq!(got.down_block_types, want.down_block_types);
    }

    #[test]
    fn full_size_sd15_is_recognised_and_mapped() {
        let (src, diffusers) = real_layout("sd15");
        let arch = detect(&src);
        assert_eq!(arch, Architecture::Sd1);
        let inferred = infer(&src, &arch).unwrap();
        same_unet(&inferred.unet, &UNetConfig::sd_v1_5());
        same_vae(&inferred.vae, &VaeConfig::default());
        same_text(&inferred.text, &ClipConfig::sd_v1());
        assert_eq!(targets(&unet_plan(&src).unwrap()), keys(&diffusers["unet"]));
        assert_eq!(targets(&vae_plan(&src).unwrap()), keys(&diffusers["vae"]));
        let text = text_plan(&src, TextLayout::SD1, inferred.text.num_hidden_layers).unwrap();
        assert_eq!(targets(&text), keys(&diffusers["text_encoder"]));
    }

    #[test]
    fn full_size_sd21_is_recognised_and_mapped() {
        let (src, diffusers) = real_layout("sd21");
        let arch = detect(&src);
        assert_eq!(arch, Architecture::Sd2);
        let inferred = infer(&src, &arch).unwrap();
        same_unet(&inferred.unet, &UNetConfig::sd_v2_1());
        same_vae(&inferred.vae, &VaeConfig::default());
        same_text(&inferred.text, &ClipConfig::sd_v2());
        assert_eq!(inferred.stored_text_layers, 24);
        assert_eq!(targets(&unet_plan(&src).unwrap()), keys(&diffusers["unet"]));
        let vae = vae_plan(&src).unwrap();
        assert_eq!(targets(&vae), keys(&diffusers["vae"]));
        assert_eq!(vae.iter().filter(|m| m.transform == Transform::Conv1x1ToLinear).count(), 8); // q, k, v, proj_out of two mid blocks
        let text = text_plan(&src, TextLayout::SD2, inferred.text.num_hidden_layers).unwrap();
        assert_eq!(targets(&text), keys(&diffusers["text_encoder"]));
    }

    #[test]
    fn full_size_sdxl_is_recognised_and_mapped() {
        let (src, diffusers) = real_sdxl_layout();
        let arch = detect(&src);
        assert_eq!(arch, Architecture::Sdxl);
        let inferred = infer(&src, &arch).unwrap();
        let want = UNetConfig::sdxl();
        same_unet(&inferred.unet, &want);
        assert_eq!(inferred.unet.addition_embed_type, want.addition_embed_type);
        assert_eq!(inferred.unet.addition_time_embed_dim, want.addition_time_embed_dim);
        assert_eq!(inferred.unet.projection_class_embeddings_input_dim, want.projection_class_embeddings_input_dim);
        assert_eq!(inferred.unet.sample_size, 128);
        same_vae(&inferred.vae, &VaeConfig::default());
        assert_eq!(inferred.vae.scaling_factor, 0.13025);
        same_text(&inferred.text, &ClipConfig::sd_v1());
        let text_2 = inferred.text_2.as_ref().unwrap();
        same_text(text_2, &ClipConfig::sdxl_g());
        assert_eq!(text_2.projection_dim, 1280);
        for t in [&inferred.text, text_2] {
            assert_eq!((t.bos_token_id, t.eos_token_id, t.pad_token_id), (0, 2, 1), "SDXL's hub configs' ids");
        }
        assert_eq!(targets(&unet_plan(&src).unwrap()), keys(&diffusers["unet"]));
        assert_eq!(targets(&vae_plan(&src).unwrap()), keys(&diffusers["vae"]));
        let text = text_plan(&src, TextLayout::SDXL_1, inferred.text.num_hidden_layers).unwrap();
        assert_eq!(targets(&text), keys(&diffusers["text_encoder"]));
        let text_2_plan = text_plan(&src, TextLayout::SDXL_2, text_2.num_hidden_layers).unwrap();
        assert_eq!(targets(&text_2_plan), keys(&diffusers["text_encoder_2"]));
        assert_eq!(text_2_plan.iter().filter(|m| m.transform == Transform::Transpose).count(), 1, "text_projection");
        assert_eq!(text_2_plan.iter().filter(|m| matches!(m.transform, Transform::ThirdOf(_))).count(), 32 * 6);
    }

    #[test]
    fn an_sdxl_refiner_is_named_and_refused() {
        let (mut src, _) = real_sdxl_layout();
        let refiner: BTreeMap<String, TensorInfo> = std::mem::take(&mut src.index)
            .into_iter()
            .filter(|(k, _)| !k.starts_with("conditioner."))
            .chain([(format!("{SGM_REFINER_OPEN_CLIP}token_embedding.weight"), TensorInfo { shape: vec![49408, 1280], kind: Kind::Half })])
            .collect();
        src.index = refiner;
        let Architecture::Unknown(what) = detect(&src) else { panic!("a refiner is not loadable") };
        assert!(what.contains("SDXL refiner"), "{what}");
    }

    #[test]
    fn an_unknown_unet_key_is_named() {
        let (mut src, _) = real_layout("sd15");
        src.index.insert(format!("{UNET}input_blocks.1.0.extra.weight"), TensorInfo { shape: vec![1], kind: Kind::Float });
        let e = unet_plan(&src).unwrap_err().to_string();
        assert!(e.contains("`model.diffusion_model.input_blocks.1.0.extra.weight`"), "{e}");
    }
}
