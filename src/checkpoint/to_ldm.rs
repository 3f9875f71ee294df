//! A model with diffusers key names written back in the original latent-diffusion
//! layout (what AUTOMATIC1111 and ComfyUI load as one `.safetensors`), as diffusers'
//! `convert_diffusers_to_original_stable_diffusion.py` does: the UNet under
//! `model.diffusion_model.`, the VAE under `first_stage_model.` (attention as
//! 1×1 convolutions), the text encoder under `cond_stage_model.transformer.`
//! (SD 1.x) or as OpenCLIP's text tower under `cond_stage_model.model.` (SD 2.x,
//! q/k/v fused into `in_proj`). SDXL goes in Stability-AI's layout (as the
//! released `sd_xl_base_1.0.safetensors`): its added embedding as `label_emb.0`,
//! the first text encoder under `conditioner.embedders.0.transformer.`, the
//! second as OpenCLIP bigG under `conditioner.embedders.1.model.` with every
//! block and its projection. The inverse of `ldm.rs`'s plans (both read
//! `ldm_names.rs`, and the text layouts of `ldm::text_layouts`); the block
//! numbering follows the model's own structure, so tiny models map like real ones.

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use tch::{Kind, Tensor};

use super::ldm::{text_layouts, TextKeys, TextLayout, UNET, VAE};
use super::ldm_names::{added_embedding_blocks, unet_blocks, vae_blocks, Inner, Naming, Table, UnetLayout};
use super::{Architecture, LoadedModel};

/// Every tensor of `m` under its LDM key.
pub fn to_ldm(m: &LoadedModel) -> anyhow::Result<Vec<(String, Tensor)>> {
    if let Architecture::Unknown(what) = &m.architecture {
        bail!("a model that is {what} has no single-file layout");
    }
    let mut out = unet_to_ldm(&m.unet, m.unet_config.block_out_channels.len(), |level| {
        m.unet_config.layers_per_block.at(level) as usize
    })?;
    out.extend(vae_to_ldm(&m.vae, m.vae_config.block_out_channels.len())?);
    let layouts = text_layouts(&m.architecture);
    if layouts.len() != m.text_encoders.len() {
        bail!("a {} model has {} text encoders, not {}", m.architecture, layouts.len(), m.text_encoders.len());
    }
    for (layout, text) in layouts.iter().zip(&m.text_encoders) {
        out.extend(match layout.keys {
            TextKeys::HfClip => text_to_hf_clip(&text.tensors, layout.prefix, text.config.max_position_embeddings),
            TextKeys::OpenClip => text_to_open_clip(&text.tensors, layout)?,
        });
    }
    Ok(out)
}

fn has_prefix(keys: &HashMap<String, Tensor>, prefix: &str) -> bool {
    keys.keys().any(|k| k.starts_with(prefix))
}

fn unet_to_ldm(unet: &HashMap<String, Tensor>, levels: usize, layers: impl Fn(usize) -> usize) -> anyhow::Result<Vec<(String, Tensor)>> {
    let layout = UnetLayout {
        down_resnets: (0..levels).map(layers).collect(),
        up_attention: (0..levels).map(|level| has_prefix(unet, &format!("up_blocks.{level}.attentions."))).collect(),
        mid_attention: has_prefix(unet, "mid_block.attentions.0."),
    };
    let mut blocks = unet_blocks(&layout);
    blocks.extend(added_embedding_blocks());
    let table = Table::new(blocks, Naming::Diffusers);
    let mut out = Vec::with_capacity(unet.len());
    for (key, t) in sorted(unet) {
        let (name, _) = table
            .rename(key)
            .ok_or_else(|| anyhow::anyhow!("the UNet tensor `{key}` has no place in an SD 1.x/2.x or SDXL LDM checkpoint"))?;
        out.push((format!("{UNET}{name}"), t.shallow_clone()));
    }
    Ok(out)
}

fn vae_to_ldm(vae: &HashMap<String, Tensor>, levels: usize) -> anyhow::Result<Vec<(String, Tensor)>> {
    let resnets = vae
        .keys()
        .filter_map(|k| {
            let (_, rest) = k.split_once(".resnets.").filter(|(block, _)| block.contains("_blocks."))?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |j| j + 1);
    let table = Table::new(vae_blocks(levels, resnets), Naming::Diffusers);
    let mut out = Vec::with_capacity(vae.len());
    for (key, t) in sorted(vae) {
        let (name, inner) = table
            .rename(key)
            .ok_or_else(|| anyhow::anyhow!("the VAE tensor `{key}` has no place in an SD LDM checkpoint"))?;
        // LDM's VAE attention projections are 1×1 convolutions.
        let tensor = if inner == Inner::VaeAttention && t.dim() == 2 { t.unsqueeze(-1).unsqueeze(-1) } else { t.shallow_clone() };
        out.push((format!("{VAE}{name}"), tensor));
    }
    Ok(out)
}

/// SD 1.x and SDXL's first encoder: transformers' CLIPTextModel keys as they
/// are under `prefix`, with the `position_ids` buffer real checkpoints carry.
fn text_to_hf_clip(text: &HashMap<String, Tensor>, prefix: &str, positions: i64) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> =
        sorted(text).map(|(k, t)| (format!("{prefix}text_model.{k}"), t.shallow_clone())).collect();
    out.push((format!("{prefix}text_model.embeddings.position_ids"), Tensor::arange(positions, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0)));
    out
}

/// OpenCLIP's `logit_scale` as OpenCLIP initialises it, ln(1/0.07): image-text
/// matching only, never read for conditioning, but part of the tower's keys.
const OPEN_CLIP_LOGIT_SCALE: f64 = 2.659_260_036_932_778_5;

/// OpenCLIP's text tower under `layout.prefix`.
///
/// SD 2.x (`drops_last_block`): diffusers keeps only the layers SD 2 uses (the
/// penultimate cut); SD 2's loaders run the file's tower without its last
/// block, so one more is written after them, all zeros: never run at the
/// penultimate layer, and an identity block (its norms give 0) if something
/// runs it. The projection head, which conditioning never uses, is left out.
///
/// SDXL (`projection`): every block as it is, and the projection head, whose
/// pooled output conditions the UNet: `text_projection` as OpenCLIP stores it
/// (`[width, projection]`, the transpose of transformers' Linear weight) and
/// its `logit_scale`.
fn text_to_open_clip(text: &HashMap<String, Tensor>, layout: &TextLayout) -> anyhow::Result<Vec<(String, Tensor)>> {
    let prefix = layout.prefix;
    const FIXED: [(&str, &str); 4] = [
        ("embeddings.token_embedding.weight", "token_embedding.weight"),
        ("embeddings.position_embedding.weight", "positional_embedding"),
        ("final_layer_norm.weight", "ln_final.weight"),
        ("final_layer_norm.bias", "ln_final.bias"),
    ];
    const BLOCK: [(&str, &str); 5] = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ];
    let mut out = Vec::new();
    let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, t) in sorted(text) {
        if let Some((_, to)) = FIXED.iter().find(|(from, _)| from == key) {
            out.push((format!("{prefix}{to}"), t.shallow_clone()));
            continue;
        }
        if layout.projection && key == "text_projection.weight" {
            out.push((format!("{prefix}text_projection"), t.tr().contiguous()));
            out.push((format!("{prefix}logit_scale"), Tensor::scalar_tensor(OPEN_CLIP_LOGIT_SCALE, (t.kind(), t.device()))));
            continue;
        }
        let unknown = || anyhow::anyhow!("the text encoder tensor `{key}` has no place in an OpenCLIP text tower");
        let rest = key.strip_prefix("encoder.layers.").ok_or_else(unknown)?;
        let (layer, inner) = rest.split_once('.').ok_or_else(unknown)?;
        let block = format!("{prefix}transformer.resblocks.{layer}.");
        if let Some((part, wb)) = ["q", "k", "v"].iter().enumerate().find_map(|(i, p)| {
            inner.strip_prefix(&format!("self_attn.{p}_proj.")).map(|wb| (i, wb))
        }) {
            fused.entry(format!("{block}attn.in_proj_{wb}")).or_default()[part] = Some(t.shallow_clone());
            continue;
        }
        let (from, to) = BLOCK.iter().find(|(from, _)| inner.starts_with(from)).ok_or_else(unknown)?;
        out.push((format!("{block}{to}{}", &inner[from.len()..]), t.shallow_clone()));
    }
    for (key, parts) in fused {
        let [Some(q), Some(k), Some(v)] = parts else {
            bail!("the text encoder lacks one of q/k/v for `{key}`");
        };
        out.push((key, Tensor::cat(&[q, k, v], 0)));
    }
    if layout.projection && !text.contains_key("text_projection.weight") {
        bail!("the text encoder has no `text_projection.weight`, which its OpenCLIP tower needs");
    }
    let resblocks = format!("{prefix}transformer.resblocks.");
    let layers = out
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(&resblocks)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |last| last + 1);
    if layout.drops_last_block && layers > 0 {
        let last = format!("{resblocks}{}.", layers - 1);
        let unused: Vec<(String, Tensor)> = out
            .iter()
            .filter_map(|(k, t)| Some((format!("{resblocks}{layers}.{}", k.strip_prefix(&last)?), t.zeros_like())))
            .collect();
        out.extend(unused);
    }
    Ok(out)
}

fn sorted(map: &HashMap<String, Tensor>) -> impl Iterator<Item = (&String, &Tensor)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ldm::OPEN_CLIP;
    use crate::checkpoint::{load_model, open_single_file, ModelFormat};
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
    }

    /// The fixture single files were written from the diffusers folders by the
    /// fixture script and checked with diffusers' `from_single_file`; converting
    /// the folder must give the same keys and the same tensors.
    /// Our conversion of `folder` has the keys and shapes of the reference file
    /// `single` but for `extra_in_reference`, and its values but for `zeros_in_ours`.
    fn matches_reference(folder: &str, single: &str, extra_in_reference: impl Fn(&str) -> bool, zeros_in_ours: impl Fn(&str) -> bool) {
        let m = load_model(&fixture(folder), None).unwrap();
        let ours: BTreeMap<String, Tensor> = to_ldm(&m).unwrap().into_iter().collect();
        let src = open_single_file(&fixture(single), ModelFormat::SingleFileSafetensors).unwrap();
        let reference: Vec<&String> = src.index().keys().filter(|k| !extra_in_reference(k)).collect();
        let missing: Vec<&&String> = reference.iter().filter(|k| !ours.contains_key(k.as_str())).collect();
        assert!(missing.is_empty(), "not written: {missing:?}");
        assert_eq!(ours.len(), reference.len(), "extra keys: {:?}", ours.keys().filter(|k| !src.has(k)).collect::<Vec<_>>());
        for k in reference {
            let (a, b) = (&ours[k.as_str()], src.load(k).unwrap());
            assert_eq!(a.size(), b.size(), "{k}");
            let want = if zeros_in_ours(k) { b.zeros_like() } else { b };
            assert!(a.to_kind(want.kind()).equal(&want), "{k} differs");
        }
    }

    #[test]
    fn sd1_folder_converts_to_the_reference_single_file() {
        // The reference also carries a few LatentDiffusion schedule buffers, which loaders ignore.
        matches_reference("tiny-sd1", "tiny-sd1.safetensors", |k| !k.contains('.'), |_| false);
    }

    #[test]
    fn sdxl_folder_converts_to_the_reference_stability_layout() {
        // Every key of the reference (verified with diffusers' from_single_file), every
        // value equal once rounded to its float16: the bigG tower whole, its projection
        // transposed, `logit_scale` and the first encoder's `position_ids` as written there.
        matches_reference("tiny-sdxl", "tiny-sdxl.safetensors", |_| false, |_| false);
    }

    #[test]
    fn sd2_folder_converts_to_the_reference_open_clip_layout() {
        // The reference tower's last block, which SD 2 never runs and diffusers
        // folders do not keep, is written as zeros; its projection head is left out.
        let m = load_model(&fixture("tiny-sd2"), None).unwrap();
        let layers = m.text_encoders[0].config.num_hidden_layers;
        let last = format!("{OPEN_CLIP}transformer.resblocks.{layers}.");
        matches_reference(
            "tiny-sd2",
            "tiny-sd2.safetensors",
            |k| !k.contains('.') || k.ends_with("text_projection") || k.ends_with("logit_scale"),
            |k| k.starts_with(&last),
        );
    }
}
