//! kohya's names for LoRA modules, per model family.
//!
//! A module's name is its module path with `_` for `.` behind a prefix:
//! `lora_unet_` for the UNet, the text encoder's own (`lora_te_`, SDXL's
//! `lora_te1_` / `lora_te2_`). Which path differs by family: kohya's SD 1.x/2.x
//! scripts build diffusers' UNet and write its paths
//! (`down_blocks_1_attentions_0_…`); its SDXL scripts build the Stability-AI (sgm)
//! UNet and write the LDM paths (`input_blocks_4_1_…`, resnets `in_layers_2`,
//! downsamplers `op`). The block correspondence is `ldm_names`' table, the one
//! single-file loading and export use, so LoRA names cannot drift from it.

use super::unet::UNet2DConditionModel;
use crate::checkpoint::ldm_names::{unet_blocks, Naming, Table, UnetLayout};

/// Key prefix of UNet modules in a kohya file.
pub const UNET_PREFIX: &str = "lora_unet_";

/// Which module path a family's kohya files name UNet layers by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetLoraNaming {
    /// The diffusers path (SD 1.x and 2.x).
    Diffusers,
    /// The Stability-AI / LDM path (SDXL).
    Ldm,
}

/// What kohya's files say about one family: how UNet modules are named, and
/// `ss_base_model_version`, which AUTOMATIC1111 and ComfyUI check against the
/// model a LoRA is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KohyaLoraFormat {
    pub unet_naming: UnetLoraNaming,
    pub base_model_version: &'static str,
}

impl UnetLoraNaming {
    /// The families whose files use this naming, in words.
    pub fn families(&self) -> &'static str {
        match self {
            UnetLoraNaming::Diffusers => "SD 1.x/2.x",
            UnetLoraNaming::Ldm => "SDXL",
        }
    }

    /// Whether a UNet module name (after `lora_unet_`) starts with one of this
    /// naming's top-level blocks: tells which family a file was written for.
    fn has_block_of(&self, module: &str) -> bool {
        let blocks: &[&str] = match self {
            UnetLoraNaming::Diffusers => &["down_blocks_", "mid_block_", "up_blocks_", "time_embedding_", "conv_in", "conv_out"],
            UnetLoraNaming::Ldm => &["input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_"],
        };
        blocks.iter().any(|b| module.starts_with(b))
    }
}

/// kohya's module name for a module path: `prefix` + the path with `_` for `.`.
pub fn kohya_name(prefix: &str, path: &str) -> String {
    format!("{prefix}{}", path.replace('.', "_"))
}

/// Names the layers of one UNet as its family's kohya files do.
pub struct UnetNamer {
    /// diffusers → LDM block table, for the LDM naming.
    ldm: Option<Table>,
}

impl UnetNamer {
    pub fn new(naming: UnetLoraNaming, unet: &UNet2DConditionModel) -> UnetNamer {
        let ldm = match naming {
            UnetLoraNaming::Diffusers => None,
            UnetLoraNaming::Ldm => Some(Table::new(unet_blocks(&layout_of(unet)), Naming::Diffusers)),
        };
        UnetNamer { ldm }
    }

    /// The kohya name of the layer at diffusers module path `path`
    /// (`down_blocks.1.attentions.0.proj_in`); None where the LDM layout has no
    /// such layer.
    pub fn name(&self, path: &str) -> Option<String> {
        let Some(table) = &self.ldm else {
            return Some(kohya_name(UNET_PREFIX, path));
        };
        // The table renames key prefixes ending in a dot; a module path is one
        // with nothing behind it.
        let (ldm, _) = table.rename(&format!("{path}."))?;
        Some(kohya_name(UNET_PREFIX, ldm.trim_end_matches('.')))
    }
}

/// The block structure of a built UNet, as the LDM numbering needs it.
fn layout_of(unet: &UNet2DConditionModel) -> UnetLayout {
    UnetLayout {
        down_resnets: unet.down_blocks.iter().map(|b| b.resnets.len()).collect(),
        up_attention: unet.up_blocks.iter().map(|b| !b.attentions.is_empty()).collect(),
        mid_attention: unet.mid_block.as_ref().is_some_and(|m| !m.attentions.is_empty()),
    }
}

/// The families whose kohya files would name a module `name`, in words
/// ("SDXL", "SD 1.x/2.x"), from its text-encoder prefix or UNet block; None
/// when it looks like neither.
pub fn families_naming(name: &str) -> Option<&'static str> {
    use super::family::Architecture;
    if let Some(module) = name.strip_prefix(UNET_PREFIX) {
        return [UnetLoraNaming::Diffusers, UnetLoraNaming::Ldm].into_iter().find(|n| n.has_block_of(module)).map(|n| n.families());
    }
    [Architecture::Sd1, Architecture::Sdxl]
        .into_iter()
        .find(|family| family.text_encoders().iter().any(|role| name.starts_with(role.kohya_prefix)))
        .map(|family| family.kohya_lora().unet_naming.families())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tell_the_family_they_were_written_for() {
        assert_eq!(families_naming("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"), Some("SDXL"));
        assert_eq!(families_naming("lora_unet_out_2"), Some("SDXL"));
        assert_eq!(families_naming("lora_te2_text_model_encoder_layers_0_mlp_fc1"), Some("SDXL"));
        assert_eq!(families_naming("lora_unet_down_blocks_0_resnets_0_conv1"), Some("SD 1.x/2.x"));
        assert_eq!(families_naming("lora_unet_time_embedding_linear_1"), Some("SD 1.x/2.x"));
        assert_eq!(families_naming("lora_te_text_model_encoder_layers_0_mlp_fc1"), Some("SD 1.x/2.x"));
        assert_eq!(families_naming("lora_transformer_blocks_0_attn_to_q"), None);
    }
}
