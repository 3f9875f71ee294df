//! A model with diffusers key names written back in the original latent-diffusion
//! layout (what AUTOMATIC1111 and ComfyUI load as one `.safetensors`), as diffusers'
//! `convert_diffusers_to_original_stable_diffusion.py` does: the UNet under
//! `model.diffusion_model.`, the VAE under `first_stage_model.` (attention as
//! 1×1 convolutions), the text encoder under `cond_stage_model.transformer.`
//! (SD 1.x) or as OpenCLIP's text tower under `cond_stage_model.model.` (SD 2.x,
//! q/k/v fused into `in_proj`). The inverse of `ldm.rs`'s plans; the block
//! numbering follows the model's own structure, so tiny models map like real ones.

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use tch::{Kind, Tensor};

use super::ldm::{HF_CLIP, OPEN_CLIP, UNET, VAE};
use super::{Architecture, LoadedModel};

/// diffusers prefix → LDM prefix, and whether the block is a resnet (whose inner names change too).
type PrefixTable = HashMap<String, (String, bool)>;

/// Every tensor of `m` under its LDM key.
pub fn to_ldm(m: &LoadedModel) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut out = unet_to_ldm(&m.unet, m.unet_config.block_out_channels.len(), |level| {
        m.unet_config.layers_per_block.at(level) as usize
    })?;
    out.extend(vae_to_ldm(&m.vae, m.vae_config.block_out_channels.len())?);
    out.extend(match m.architecture {
        Architecture::Sd2 => text_to_open_clip(&m.text_encoder)?,
        _ => text_to_hf_clip(&m.text_encoder, m.text_config.max_position_embeddings),
    });
    Ok(out)
}

fn has_prefix(keys: &HashMap<String, Tensor>, prefix: &str) -> bool {
    keys.keys().any(|k| k.starts_with(prefix))
}

/// The longest prefix of `key` in `table`.
fn longest<'a, V>(table: &'a HashMap<String, V>, key: &str) -> Option<(&'a str, &'a V)> {
    key.match_indices('.').rev().find_map(|(i, _)| table.get_key_value(&key[..=i]).map(|(k, v)| (k.as_str(), v)))
}

const RESNET: &[(&str, &str)] = &[
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
];

fn unet_to_ldm(unet: &HashMap<String, Tensor>, levels: usize, layers: impl Fn(usize) -> usize) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut table = PrefixTable::new();
    let mut put = |from: String, to: String, resnet: bool| {
        table.insert(from, (to, resnet));
    };
    put("time_embedding.linear_1.".into(), "time_embed.0.".into(), false);
    put("time_embedding.linear_2.".into(), "time_embed.2.".into(), false);
    put("conv_in.".into(), "input_blocks.0.0.".into(), false);
    put("conv_norm_out.".into(), "out.0.".into(), false);
    put("conv_out.".into(), "out.2.".into(), false);
    let mut k = 1;
    for level in 0..levels {
        for j in 0..layers(level) {
            put(format!("down_blocks.{level}.resnets.{j}."), format!("input_blocks.{k}.0."), true);
            put(format!("down_blocks.{level}.attentions.{j}."), format!("input_blocks.{k}.1."), false);
            k += 1;
        }
        if level + 1 < levels {
            put(format!("down_blocks.{level}.downsamplers.0.conv."), format!("input_blocks.{k}.0.op."), false);
            k += 1;
        }
    }
    put("mid_block.resnets.0.".into(), "middle_block.0.".into(), true);
    if has_prefix(unet, "mid_block.attentions.0.") {
        put("mid_block.attentions.0.".into(), "middle_block.1.".into(), false);
        put("mid_block.resnets.1.".into(), "middle_block.2.".into(), true);
    } else {
        put("mid_block.resnets.1.".into(), "middle_block.1.".into(), true);
    }
    let mut k = 0;
    for level in 0..levels {
        // Up blocks mirror the down blocks: diffusers' up_blocks.0 is the lowest resolution.
        let per_level = layers(levels - 1 - level) + 1;
        let attention = has_prefix(unet, &format!("up_blocks.{level}.attentions."));
        for j in 0..per_level {
            put(format!("up_blocks.{level}.resnets.{j}."), format!("output_blocks.{k}.0."), true);
            put(format!("up_blocks.{level}.attentions.{j}."), format!("output_blocks.{k}.1."), false);
            if j + 1 == per_level && level + 1 < levels {
                let slot = if attention { 2 } else { 1 };
                put(format!("up_blocks.{level}.upsamplers.0.conv."), format!("output_blocks.{k}.{slot}.conv."), false);
            }
            k += 1;
        }
    }
    let mut out = Vec::with_capacity(unet.len());
    for (key, t) in sorted(unet) {
        let unknown = || anyhow::anyhow!("the UNet tensor `{key}` has no place in an SD 1.x/2.x LDM checkpoint");
        let (prefix, (to, resnet)) = longest(&table, key).ok_or_else(unknown)?;
        let tail = &key[prefix.len()..];
        let tail = if *resnet {
            let (from, renamed) = RESNET.iter().find(|(from, _)| tail.starts_with(from)).ok_or_else(unknown)?;
            format!("{renamed}{}", &tail[from.len()..])
        } else {
            tail.to_string()
        };
        out.push((format!("{UNET}{to}{tail}"), t.shallow_clone()));
    }
    Ok(out)
}

const VAE_ATTENTION: &[(&str, &str)] =
    &[("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")];

fn vae_to_ldm(vae: &HashMap<String, Tensor>, levels: usize) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut table: HashMap<String, (String, &str)> = HashMap::new();
    let mut put = |from: String, to: String, kind: &'static str| {
        table.insert(from, (to, kind));
    };
    for side in ["encoder", "decoder"] {
        put(format!("{side}.conv_in."), format!("{side}.conv_in."), "");
        put(format!("{side}.conv_out."), format!("{side}.conv_out."), "");
        put(format!("{side}.conv_norm_out."), format!("{side}.norm_out."), "");
        put(format!("{side}.mid_block.resnets.0."), format!("{side}.mid.block_1."), "resnet");
        put(format!("{side}.mid_block.resnets.1."), format!("{side}.mid.block_2."), "resnet");
        put(format!("{side}.mid_block.attentions.0."), format!("{side}.mid.attn_1."), "attention");
    }
    put("quant_conv.".into(), "quant_conv.".into(), "");
    put("post_quant_conv.".into(), "post_quant_conv.".into(), "");
    for i in 0..levels {
        // LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        let d = levels - 1 - i;
        put(format!("encoder.down_blocks.{i}.downsamplers.0.conv."), format!("encoder.down.{i}.downsample.conv."), "");
        put(format!("decoder.up_blocks.{i}.upsamplers.0.conv."), format!("decoder.up.{d}.upsample.conv."), "");
        let blocks = vae.keys().filter_map(|k| {
            let rest = k.strip_prefix(&format!("decoder.up_blocks.{i}.resnets."))
                .or_else(|| k.strip_prefix(&format!("encoder.down_blocks.{i}.resnets.")))?;
            rest.split('.').next()?.parse::<usize>().ok()
        });
        for j in 0..=blocks.max().unwrap_or(0) {
            put(format!("encoder.down_blocks.{i}.resnets.{j}."), format!("encoder.down.{i}.block.{j}."), "resnet");
            put(format!("decoder.up_blocks.{i}.resnets.{j}."), format!("decoder.up.{d}.block.{j}."), "resnet");
        }
    }
    let mut out = Vec::with_capacity(vae.len());
    for (key, t) in sorted(vae) {
        let unknown = || anyhow::anyhow!("the VAE tensor `{key}` has no place in an SD LDM checkpoint");
        let (prefix, (to, kind)) = longest(&table, key).ok_or_else(unknown)?;
        let tail = &key[prefix.len()..];
        let (tail, tensor) = match *kind {
            "resnet" => match tail.strip_prefix("conv_shortcut.") {
                Some(rest) => (format!("nin_shortcut.{rest}"), t.shallow_clone()),
                None => (tail.to_string(), t.shallow_clone()),
            },
            "attention" => {
                let (from, renamed) = VAE_ATTENTION.iter().find(|(from, _)| tail.starts_with(from)).ok_or_else(unknown)?;
                // LDM's VAE attention projections are 1×1 convolutions.
                let tensor = if t.dim() == 2 { t.unsqueeze(-1).unsqueeze(-1) } else { t.shallow_clone() };
                (format!("{renamed}{}", &tail[from.len()..]), tensor)
            }
            _ => (tail.to_string(), t.shallow_clone()),
        };
        out.push((format!("{VAE}{to}{tail}"), tensor));
    }
    Ok(out)
}

/// SD 1.x: transformers' CLIPTextModel keys as they are, with the
/// `position_ids` buffer real SD 1.x checkpoints carry.
fn text_to_hf_clip(text: &HashMap<String, Tensor>, positions: i64) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> =
        sorted(text).map(|(k, t)| (format!("{HF_CLIP}text_model.{k}"), t.shallow_clone())).collect();
    out.push((format!("{HF_CLIP}text_model.embeddings.position_ids"), Tensor::arange(positions, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0)));
    out
}

/// SD 2.x: OpenCLIP's text tower. diffusers keeps only the layers SD 2 uses
/// (the penultimate cut), so the tower is written with those; the loaders
/// (and the reference converter) run without the last block and the projection.
fn text_to_open_clip(text: &HashMap<String, Tensor>) -> anyhow::Result<Vec<(String, Tensor)>> {
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
            out.push((format!("{OPEN_CLIP}{to}"), t.shallow_clone()));
            continue;
        }
        let unknown = || anyhow::anyhow!("the text encoder tensor `{key}` has no place in an SD 2.x OpenCLIP text tower");
        let rest = key.strip_prefix("encoder.layers.").ok_or_else(unknown)?;
        let (layer, inner) = rest.split_once('.').ok_or_else(unknown)?;
        let block = format!("{OPEN_CLIP}transformer.resblocks.{layer}.");
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
    use crate::checkpoint::{load_model, open_single_file, ModelFormat};
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
    }

    /// The fixture single files were written from the diffusers folders by the
    /// fixture script and checked with diffusers' `from_single_file`; converting
    /// the folder must give the same keys and the same tensors.
    fn matches_reference(folder: &str, single: &str, extra_in_reference: impl Fn(&str) -> bool) {
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
            assert!(a.to_kind(b.kind()).equal(&b), "{k} differs");
        }
    }

    #[test]
    fn sd1_folder_converts_to_the_reference_single_file() {
        // The reference also carries a few LatentDiffusion schedule buffers, which loaders ignore.
        matches_reference("tiny-sd1", "tiny-sd1.safetensors", |k| !k.contains('.'));
    }

    #[test]
    fn sd2_folder_converts_to_the_reference_open_clip_layout() {
        // The reference tower has one more (unused) block and the projection
        // head that diffusers folders do not keep.
        let m = load_model(&fixture("tiny-sd2"), None).unwrap();
        let layers = m.text_config.num_hidden_layers;
        let last = format!("{OPEN_CLIP}transformer.resblocks.{layers}.");
        matches_reference("tiny-sd2", "tiny-sd2.safetensors", |k| {
            !k.contains('.') || k.starts_with(&last) || k.ends_with("text_projection") || k.ends_with("logit_scale")
        });
    }
}
