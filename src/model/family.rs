//! The model families this program reads and trains, and what each one is made
//! of: which text encoders it has and how their hidden states condition the
//! UNet, what the UNet takes besides the text (SDXL's size and crop ids), the
//! kohya LoRA prefixes of its text encoders. Loaders, the sampling pipeline,
//! the trainer, LoRA and export ask the family instead of branching on it.

use std::fmt;

use super::lora_names::{KohyaLoraFormat, UnetLoraNaming};

#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    Sd1,
    Sd2,
    /// Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP bigG with
    /// a projection), a pooled text embedding and size/crop ids in the UNet's
    /// added embedding.
    Sdxl,
    /// Not something this program can load; says what it seems to be.
    Unknown(String),
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Architecture::Sd1 => write!(f, "SD 1.x"),
            Architecture::Sd2 => write!(f, "SD 2.x"),
            Architecture::Sdxl => write!(f, "SDXL"),
            Architecture::Unknown(what) => write!(f, "unknown ({what})"),
        }
    }
}

/// How a text encoder's hidden states become (its part of) the UNet's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenStates {
    /// The last layer's output through the final layer norm (SD 1.x, and SD 2.x
    /// whose encoder is built without its last layer); clip skip N takes the
    /// output N-1 layers earlier, through the final layer norm, as AUTOMATIC1111.
    LastNormed,
    /// The penultimate layer's output without the final layer norm, as SDXL's
    /// pipeline (`hidden_states[-2]`); clip skip N goes N-1 layers further back.
    Penultimate,
}

/// One text encoder of a family, as the files name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextEncoderRole {
    /// The diffusers subfolder and our checkpoint / optimizer prefix (`text_encoder_2`).
    pub name: &'static str,
    /// Its tokenizer's subfolder.
    pub tokenizer: &'static str,
    /// kohya's LoRA prefix for its modules (`lora_te_`, `lora_te1_`, `lora_te2_`).
    pub kohya_prefix: &'static str,
    pub hidden: HiddenStates,
    /// Whether its projected pooled output is the UNet's `text_embeds` (SDXL's second encoder).
    pub pooled: bool,
    /// Pad token of the OpenAI vocabulary when no tokenizer folder says it.
    pub pad_token: &'static str,
}

const SD1_TEXT: [TextEncoderRole; 1] = [TextEncoderRole {
    name: "text_encoder",
    tokenizer: "tokenizer",
    kohya_prefix: "lora_te_",
    hidden: HiddenStates::LastNormed,
    pooled: false,
    pad_token: "<|endoftext|>",
}];

const SD2_TEXT: [TextEncoderRole; 1] = [TextEncoderRole { pad_token: "!", ..SD1_TEXT[0] }];

const SDXL_TEXT: [TextEncoderRole; 2] = [
    TextEncoderRole {
        name: "text_encoder",
        tokenizer: "tokenizer",
        kohya_prefix: "lora_te1_",
        hidden: HiddenStates::Penultimate,
        pooled: false,
        pad_token: "<|endoftext|>",
    },
    TextEncoderRole {
        name: "text_encoder_2",
        tokenizer: "tokenizer_2",
        kohya_prefix: "lora_te2_",
        hidden: HiddenStates::Penultimate,
        pooled: true,
        pad_token: "!",
    },
];

impl Architecture {
    /// The family's text encoders, in the order their states are concatenated.
    pub fn text_encoders(&self) -> &'static [TextEncoderRole] {
        match self {
            Architecture::Sd2 => &SD2_TEXT,
            Architecture::Sdxl => &SDXL_TEXT,
            _ => &SD1_TEXT,
        }
    }

    /// The names of every family's text encoders (checkpoint files are named after them).
    pub fn all_text_encoder_names() -> [&'static str; 2] {
        [SDXL_TEXT[0].name, SDXL_TEXT[1].name]
    }

    /// Whether the UNet takes SDXL's added conditions (pooled text, size and crop ids).
    pub fn uses_text_time(&self) -> bool {
        *self == Architecture::Sdxl
    }

    /// The sampler and guidance scale `generate` uses unless told: what the
    /// family's diffusers pipeline does by default (SDXL's scheduler is Euler).
    pub fn default_sampling(&self) -> (&'static str, f64) {
        match self {
            Architecture::Sdxl => ("euler", 5.0),
            _ => ("ddim", 7.5),
        }
    }

    /// How kohya's LoRA files name this family's UNet modules, and the
    /// `ss_base_model_version` they carry.
    pub fn kohya_lora(&self) -> KohyaLoraFormat {
        let (unet_naming, base_model_version) = match self {
            Architecture::Sdxl => (UnetLoraNaming::Ldm, "sdxl_base_v1-0"),
            Architecture::Sd2 => (UnetLoraNaming::Diffusers, "sd_v2"),
            _ => (UnetLoraNaming::Diffusers, "sd_v1"),
        };
        KohyaLoraFormat { unet_naming, base_model_version }
    }

    /// The image side the family's models are made for, when nothing else says.
    pub fn default_resolution(&self) -> i64 {
        match self {
            Architecture::Sdxl => 1024,
            _ => 512,
        }
    }
}
