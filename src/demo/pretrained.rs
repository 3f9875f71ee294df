//! The demo's pretrained model: the demo layout's UNet trained (v-prediction)
//! on drawn, captioned pictures of circles, squares and triangles in eight
//! colours, and a VAE trained to reconstruct drawn pictures
//! (scripts/pretrain_demo_model.py), both built into the binary (float16, about
//! 2 MB), with the demo's random text encoder, rebuilt from its seed, that the
//! UNet was trained against.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::ensure_demo_model;

/// (file under the model folder, its bytes).
const FILES: [(&str, &[u8]); 5] = [
    ("scheduler/scheduler_config.json", include_bytes!("../../assets/demo-model/scheduler/scheduler_config.json")),
    ("unet/config.json", include_bytes!("../../assets/demo-model/unet/config.json")),
    ("unet/diffusion_pytorch_model.safetensors", include_bytes!("../../assets/demo-model/unet/diffusion_pytorch_model.safetensors")),
    ("vae/config.json", include_bytes!("../../assets/demo-model/vae/config.json")),
    ("vae/diffusion_pytorch_model.safetensors", include_bytes!("../../assets/demo-model/vae/diffusion_pytorch_model.safetensors")),
];

/// The CRC-32 (hex) of the text encoder file the UNet was trained against, as
/// the pretraining script recorded it in the UNet file's metadata.
pub fn trained_against_text_encoder_crc() -> Option<String> {
    let (_, unet) = FILES[2];
    let (_, metadata) = safetensors::SafeTensors::read_metadata(unet).ok()?;
    metadata.metadata().as_ref()?.get("text_encoder_crc32").cloned()
}

/// CRC-32 (hex) of a file's bytes.
pub fn file_crc(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:08x}", crc32fast::hash(&bytes)))
}

/// Writes the pretrained demo model to `dir`: the random demo model's text
/// encoder, tokenizer and scheduler (from their seed), the built-in UNet and VAE.
/// Returns a warning when the rebuilt text encoder is not the one the UNet was
/// trained against (a libtorch that draws other random numbers): the demo then
/// runs, but its model knows no words.
pub fn ensure_pretrained_demo_model(dir: &Path) -> anyhow::Result<(PathBuf, Option<String>)> {
    ensure_demo_model(dir)?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|on_disk| on_disk == bytes) {
            continue;
        }
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let rebuilt = file_crc(&dir.join("text_encoder").join("model.safetensors"))?;
    let warning = match trained_against_text_encoder_crc() {
        Some(expected) if expected == rebuilt => None,
        expected => Some(format!(
            "the demo's text encoder, rebuilt from its seed, is not the one its UNet was pretrained against \
             (CRC-32 {rebuilt}, expected {}): its previews will not follow the prompt",
            expected.as_deref().unwrap_or("unrecorded")
        )),
    };
    Ok((dir.to_path_buf(), warning))
}
