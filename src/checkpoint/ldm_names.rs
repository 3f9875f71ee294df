//! Which LDM block is which diffusers block: one description of the
//! correspondence, read one way by `ldm.rs` (loading an AUTOMATIC1111 / LDM
//! file) and the other way by `to_ldm.rs` (exporting one), so the two can never
//! disagree. Prefixes end in a dot; a key's block is its longest listed prefix.

use std::collections::HashMap;

/// What happens to the key's tail after the block prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// The tail is kept as it is.
    Same,
    /// A UNet resnet: every tail starts with a name in `UNET_RESNET`.
    UnetResnet,
    /// A VAE resnet: its shortcut is renamed (`VAE_RESNET`), the rest kept.
    VaeResnet,
    /// The VAE's mid-block attention: every tail starts with a name in
    /// `VAE_ATTENTION` (projections are 1×1 convolutions in LDM, linear layers
    /// in diffusers).
    VaeAttention,
}

/// One block under both names.
#[derive(Debug, Clone)]
pub struct Block {
    pub ldm: String,
    pub diffusers: String,
    pub inner: Inner,
}

fn block(ldm: impl Into<String>, diffusers: impl Into<String>, inner: Inner) -> Block {
    Block { ldm: ldm.into(), diffusers: diffusers.into(), inner }
}

/// Renames inside a UNet resnet, (LDM, diffusers).
pub const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// Renames inside a VAE resnet, (LDM, diffusers); other tails are kept.
pub const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];

/// Renames inside the VAE's mid-block attention, (LDM, diffusers).
pub const VAE_ATTENTION: &[(&str, &str)] =
    &[("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];

/// An SD 1.x/2.x UNet's block structure, as far as names depend on it.
#[derive(Debug, Clone)]
pub struct UnetLayout {
    /// Resnets of each down level, highest resolution first (an up level has one more).
    pub down_resnets: Vec<usize>,
    /// Whether each up level (diffusers' order: lowest resolution first) has attentions.
    pub up_attention: Vec<bool>,
    pub mid_attention: bool,
}

/// Every UNet block of `layout` (prefixes without `model.diffusion_model.`).
/// LDM numbers input and output blocks in one run each: a level's resnets
/// (with their attentions in slot 1), then its down- or upsampler.
pub fn unet_blocks(layout: &UnetLayout) -> Vec<Block> {
    use Inner::{Same, UnetResnet as Resnet};
    let n = layout.down_resnets.len();
    let mut blocks = vec![
        block("time_embed.0.", "time_embedding.linear_1.", Same),
        block("time_embed.2.", "time_embedding.linear_2.", Same),
        block("input_blocks.0.0.", "conv_in.", Same),
        block("out.0.", "conv_norm_out.", Same),
        block("out.2.", "conv_out.", Same),
    ];
    let mut k = 1;
    for (level, &resnets) in layout.down_resnets.iter().enumerate() {
        for j in 0..resnets {
            blocks.push(block(format!("input_blocks.{k}.0."), format!("down_blocks.{level}.resnets.{j}."), Resnet));
            blocks.push(block(format!("input_blocks.{k}.1."), format!("down_blocks.{level}.attentions.{j}."), Same));
            k += 1;
        }
        if level + 1 < n {
            blocks.push(block(format!("input_blocks.{k}.0.op."), format!("down_blocks.{level}.downsamplers.0.conv."), Same));
            k += 1;
        }
    }
    blocks.push(block("middle_block.0.", "mid_block.resnets.0.", Resnet));
    if layout.mid_attention {
        blocks.push(block("middle_block.1.", "mid_block.attentions.0.", Same));
        blocks.push(block("middle_block.2.", "mid_block.resnets.1.", Resnet));
    } else {
        blocks.push(block("middle_block.1.", "mid_block.resnets.1.", Resnet));
    }
    let mut k = 0;
    for level in 0..n {
        // Up blocks mirror the down blocks: up level 0 is the lowest resolution.
        let per_level = layout.down_resnets[n - 1 - level] + 1;
        let attention = layout.up_attention.get(level).copied().unwrap_or(false);
        for j in 0..per_level {
            blocks.push(block(format!("output_blocks.{k}.0."), format!("up_blocks.{level}.resnets.{j}."), Resnet));
            let mut slot = 1;
            if attention {
                blocks.push(block(format!("output_blocks.{k}.1."), format!("up_blocks.{level}.attentions.{j}."), Same));
                slot = 2;
            }
            if j + 1 == per_level && level + 1 < n {
                blocks.push(block(
                    format!("output_blocks.{k}.{slot}.conv."),
                    format!("up_blocks.{level}.upsamplers.0.conv."),
                    Same,
                ));
            }
            k += 1;
        }
    }
    blocks
}

/// SDXL's added embedding (pooled text and size ids → time embedding), which
/// the Stability-AI layout keeps as a class-label embedding. Not part of
/// [`unet_blocks`], whose callers name SD 1.x/2.x blocks; no SD 1.x/2.x UNet has it.
pub fn added_embedding_blocks() -> Vec<Block> {
    vec![
        block("label_emb.0.0.", "add_embedding.linear_1.", Inner::Same),
        block("label_emb.0.2.", "add_embedding.linear_2.", Inner::Same),
    ]
}

/// Every VAE block (prefixes without `first_stage_model.`) for `levels`
/// levels of at most `resnets` resnets each, on either side.
pub fn vae_blocks(levels: usize, resnets: usize) -> Vec<Block> {
    use Inner::{Same, VaeAttention as Attention, VaeResnet as Resnet};
    let mut blocks = Vec::new();
    for side in ["encoder", "decoder"] {
        blocks.push(block(format!("{side}.conv_in."), format!("{side}.conv_in."), Same));
        blocks.push(block(format!("{side}.conv_out."), format!("{side}.conv_out."), Same));
        blocks.push(block(format!("{side}.norm_out."), format!("{side}.conv_norm_out."), Same));
        blocks.push(block(format!("{side}.mid.block_1."), format!("{side}.mid_block.resnets.0."), Resnet));
        blocks.push(block(format!("{side}.mid.block_2."), format!("{side}.mid_block.resnets.1."), Resnet));
        blocks.push(block(format!("{side}.mid.attn_1."), format!("{side}.mid_block.attentions.0."), Attention));
    }
    blocks.push(block("quant_conv.", "quant_conv.", Same));
    blocks.push(block("post_quant_conv.", "post_quant_conv.", Same));
    for i in 0..levels {
        // LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        let d = levels - 1 - i;
        for j in 0..resnets {
            blocks.push(block(format!("encoder.down.{i}.block.{j}."), format!("encoder.down_blocks.{i}.resnets.{j}."), Resnet));
            blocks.push(block(format!("decoder.up.{i}.block.{j}."), format!("decoder.up_blocks.{d}.resnets.{j}."), Resnet));
        }
        blocks.push(block(format!("encoder.down.{i}.downsample.conv."), format!("encoder.down_blocks.{i}.downsamplers.0.conv."), Same));
        blocks.push(block(format!("decoder.up.{i}.upsample.conv."), format!("decoder.up_blocks.{d}.upsamplers.0.conv."), Same));
    }
    blocks
}

/// Which name a table is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Ldm,
    Diffusers,
}

/// Block prefix in the `from` naming → (the other naming's prefix, inner renames).
pub struct Table {
    from: Naming,
    blocks: HashMap<String, (String, Inner)>,
}

impl Table {
    pub fn new(blocks: Vec<Block>, from: Naming) -> Table {
        let blocks = blocks
            .into_iter()
            .map(|b| match from {
                Naming::Ldm => (b.ldm, (b.diffusers, b.inner)),
                Naming::Diffusers => (b.diffusers, (b.ldm, b.inner)),
            })
            .collect();
        Table { from, blocks }
    }

    /// `key` (without the model's top prefix) under the other naming, and what
    /// its inner rename was; None when no listed block or inner name matches.
    pub fn rename(&self, key: &str) -> Option<(String, Inner)> {
        let (prefix, (to, inner)) = key
            .match_indices('.')
            .rev()
            .find_map(|(i, _)| self.blocks.get_key_value(&key[..=i]))?;
        let tail = &key[prefix.len()..];
        let (renames, tail_may_stay) = match inner {
            Inner::Same => return Some((format!("{to}{tail}"), *inner)),
            Inner::UnetResnet => (UNET_RESNET, false),
            Inner::VaeResnet => (VAE_RESNET, true),
            Inner::VaeAttention => (VAE_ATTENTION, false),
        };
        let renamed = renames.iter().find_map(|&(ldm, diffusers)| {
            let (from, into) = match self.from {
                Naming::Ldm => (ldm, diffusers),
                Naming::Diffusers => (diffusers, ldm),
            };
            tail.strip_prefix(from).map(|rest| format!("{to}{into}{rest}"))
        });
        renamed.or_else(|| tail_may_stay.then(|| format!("{to}{tail}"))).map(|name| (name, *inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UnetLayout {
        UnetLayout { down_resnets: vec![2; 4], up_attention: vec![false, true, true, true], mid_attention: true }
    }

    #[test]
    fn sd15_unet_names_go_both_ways() {
        let to_diffusers = Table::new(unet_blocks(&sd15()), Naming::Ldm);
        let to_ldm = Table::new(unet_blocks(&sd15()), Naming::Diffusers);
        for (ldm, diffusers) in [
            ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
            ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
            ("input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
            ("middle_block.2.skip_connection.weight", "mid_block.resnets.1.conv_shortcut.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
            ("output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
            ("out.2.bias", "conv_out.bias"),
        ] {
            assert_eq!(to_diffusers.rename(ldm).map(|r| r.0).as_deref(), Some(diffusers), "{ldm}");
            assert_eq!(to_ldm.rename(diffusers).map(|r| r.0).as_deref(), Some(ldm), "{diffusers}");
        }
        assert!(to_diffusers.rename("input_blocks.1.0.extra.weight").is_none(), "an unknown resnet tensor is refused");
    }

    #[test]
    fn vae_names_go_both_ways() {
        let to_diffusers = Table::new(vae_blocks(4, 3), Naming::Ldm);
        let to_ldm = Table::new(vae_blocks(4, 3), Naming::Diffusers);
        for (ldm, diffusers) in [
            ("decoder.up.0.block.2.nin_shortcut.weight", "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"),
            ("decoder.up.3.block.0.norm1.bias", "decoder.up_blocks.0.resnets.0.norm1.bias"),
            ("encoder.mid.attn_1.proj_out.weight", "encoder.mid_block.attentions.0.to_out.0.weight"),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
            ("encoder.down.1.downsample.conv.weight", "encoder.down_blocks.1.downsamplers.0.conv.weight"),
        ] {
            assert_eq!(to_diffusers.rename(ldm).map(|r| r.0).as_deref(), Some(diffusers), "{ldm}");
            assert_eq!(to_ldm.rename(diffusers).map(|r| r.0).as_deref(), Some(ldm), "{diffusers}");
        }
    }
}
