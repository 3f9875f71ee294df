//! Model configs as diffusers writes them (`unet/config.json`, `vae/config.json`,
//! `text_encoder/config.json`). Every size the model code uses comes from here,
//! so tiny test models behave exactly like real ones. Unknown keys are ignored,
//! as diffusers does; missing keys take diffusers' defaults.

use serde::{Deserialize, Serialize};

/// A config value diffusers allows as one number or one per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for block `i` of `n`.
    pub fn at(&self, i: usize) -> T {
        match self {
            PerBlock::One(v) => v.clone(),
            PerBlock::Each(v) => v[i.min(v.len() - 1)].clone(),
        }
    }
}

/// A value a config may give as `null` (SDXL base's `"upcast_attention": null`):
/// read as the type's default, as diffusers reads it.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub sample_size: i64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<i64>,
    pub transformer_layers_per_block: PerBlock<i64>,
    /// diffusers reads this as the number of heads when `num_attention_heads` is
    /// absent (a historical naming quirk it keeps for SD 1.x and 2.x alike).
    pub attention_head_dim: PerBlock<i64>,
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(deserialize_with = "null_as_default")]
    pub use_linear_projection: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub center_input_sample: bool,
    pub class_embed_type: Option<String>,
    /// `text_time` for SDXL: a pooled text embedding and six size/crop ids enter the time embedding.
    pub addition_embed_type: Option<String>,
    /// Sinusoidal channels per time id (SDXL: 256).
    pub addition_time_embed_dim: Option<i64>,
    /// Width of `add_embedding`'s input: pooled text width + 6 × `addition_time_embed_dim` (SDXL: 2816).
    pub projection_class_embeddings_input_dim: Option<i64>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            sample_size: 64,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            center_input_sample: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
        }
    }
}

impl UNetConfig {
    /// Image sides must be a multiple of this: `vae`'s factor times the UNet's
    /// own downsampling (2^(levels-1)); 64 for SD.
    pub fn size_multiple(&self, vae: &VaeConfig) -> i64 {
        vae.downsampling_factor() * (1 << (self.block_out_channels.len() as i64 - 1))
    }

    /// Number of attention heads of down block `i` (diffusers' reading of the config).
    pub fn heads(&self, i: usize) -> i64 {
        match &self.num_attention_heads {
            Some(h) => h.at(i),
            None => self.attention_head_dim.at(i),
        }
    }

    /// Stable Diffusion 1.5's UNet.
    pub fn sd_v1_5() -> Self {
        UNetConfig { cross_attention_dim: PerBlock::One(768), ..Default::default() }
    }

    /// Stable Diffusion XL base 1.0's UNet.
    pub fn sdxl() -> Self {
        UNetConfig {
            sample_size: 128,
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            block_out_channels: vec![320, 640, 1280],
            cross_attention_dim: PerBlock::One(2048),
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Default::default()
        }
    }

    /// Stable Diffusion 2.1's UNet (768-v and 512-base share it).
    pub fn sd_v2_1() -> Self {
        UNetConfig {
            cross_attention_dim: PerBlock::One(1024),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            sample_size: 96,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: i64,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 512,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }
}

impl VaeConfig {
    /// Pixels per latent along each side: 2^(levels-1), 8 for SD.
    pub fn downsampling_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() as i64 - 1)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    /// `quick_gelu` (SD 1.x, OpenAI CLIP) or `gelu` (SD 2.x, OpenCLIP).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: i64,
    pub pad_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

impl ClipConfig {
    /// OpenAI CLIP ViT-L/14 text tower (SD 1.x).
    pub fn sd_v1() -> Self {
        ClipConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            projection_dim: 768,
            ..Default::default()
        }
    }

    /// OpenCLIP ViT-bigG/14 text tower with its projection, SDXL's second encoder (all 32 layers).
    pub fn sdxl_g() -> Self {
        ClipConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            projection_dim: 1280,
            ..Default::default()
        }
    }

    /// OpenCLIP ViT-H/14 text tower as SD 2.x uses it (its last layer dropped: 23 layers).
    pub fn sd_v2() -> Self {
        ClipConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            projection_dim: 512,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL base 1.0's unet/config.json says `"upcast_attention": null`.
    #[test]
    fn a_null_boolean_reads_as_false() {
        let c: UNetConfig = serde_json::from_str(r#"{"upcast_attention": null, "use_linear_projection": true}"#).unwrap();
        assert!(!c.upcast_attention && c.use_linear_projection);
    }
}
