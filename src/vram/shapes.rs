//! The networks' structure as the memory estimator needs it: every parameter
//! tensor (diffusers / transformers key and shape) and, per layer in forward
//! order, what the layer computes on (channels, spatial size, tokens). Derived
//! from the model configs exactly as src/model builds the modules, so a config
//! gives the same keys and shapes as a real checkpoint (tested against the
//! fixture model) without loading or generating any weights.

use crate::model::config::{ClipConfig, PerBlock, UNetConfig, VaeConfig};

/// One parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub key: String,
    pub shape: Vec<i64>,
}

impl Param {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product()
    }
}

/// What a layer computes on, for the activation formulas. Sizes are per sample;
/// `scale` is the layer's spatial downscaling relative to the latent (1, 2, 4, ...).
#[derive(Debug, Clone, PartialEq)]
pub enum LayerKind {
    /// conv_in, time embedding, conv_norm_out + conv_out, samplers: a convolution
    /// (with a norm + activation before it when `normed`) on `channels` at `scale`.
    Conv { channels: i64, scale: i64, normed: bool },
    /// `ResnetBlock2D`.
    Resnet { cin: i64, cout: i64, scale: i64 },
    /// `Transformer2DModel`'s norm, proj_in, proj_out (its blocks are separate layers).
    TransformerFrame { channels: i64, scale: i64 },
    /// One `BasicTransformerBlock`: self-attention (or cross-only), cross-attention, GEGLU.
    TransformerBlock { dim: i64, heads: i64, scale: i64, context_len: i64, context_dim: i64, only_cross: bool },
    /// The VAE's mid-block attention: one head over all pixels, no feed-forward.
    SelfAttention { dim: i64, scale: i64 },
    /// One CLIP encoder layer over `windows` sequences of `tokens` a prompt
    /// (several 75-token windows with `training.max_token_length` above 75).
    ClipLayer { hidden: i64, intermediate: i64, heads: i64, tokens: i64, windows: i64 },
    /// Embeddings / final norm: nothing worth counting is saved.
    Small,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Module path (`down_blocks.0.resnets.1`).
    pub name: String,
    pub kind: LayerKind,
    pub params: Vec<Param>,
    /// diffusers checkpoints this layer's activations as one segment when
    /// gradient checkpointing is on (resnets and transformer blocks).
    pub checkpointable: bool,
}

struct Builder {
    layers: Vec<Layer>,
}

impl Builder {
    fn layer(&mut self, name: &str, kind: LayerKind, checkpointable: bool) -> &mut Layer {
        self.layers.push(Layer { name: name.to_string(), kind, params: Vec::new(), checkpointable });
        self.layers.last_mut().expect("just pushed")
    }
}

impl Layer {
    fn p(&mut self, key: &str, shape: &[i64]) {
        let key = if key.is_empty() { self.name.clone() } else { format!("{}.{key}", self.name) };
        self.params.push(Param { key, shape: shape.to_vec() });
    }
    fn linear(&mut self, key: &str, i: i64, o: i64, bias: bool) {
        self.p(&format!("{key}.weight"), &[o, i]);
        if bias {
            self.p(&format!("{key}.bias"), &[o]);
        }
    }
    fn conv(&mut self, key: &str, i: i64, o: i64, k: i64) {
        self.p(&format!("{key}.weight"), &[o, i, k, k]);
        self.p(&format!("{key}.bias"), &[o]);
    }
    fn norm(&mut self, key: &str, c: i64) {
        self.p(&format!("{key}.weight"), &[c]);
        self.p(&format!("{key}.bias"), &[c]);
    }
    fn resnet(&mut self, cin: i64, cout: i64, temb: Option<i64>) {
        self.norm("norm1", cin);
        self.conv("conv1", cin, cout, 3);
        if let Some(t) = temb {
            self.linear("time_emb_proj", t, cout, true);
        }
        self.norm("norm2", cout);
        self.conv("conv2", cout, cout, 3);
        if cin != cout {
            self.conv("conv_shortcut", cin, cout, 1);
        }
    }
}

fn per_block<T: Clone>(v: &PerBlock<T>, n: usize) -> Vec<T> {
    (0..n).map(|i| v.at(i)).collect()
}

/// The UNet's layers in forward order (down, mid, up), as src/model/unet.rs builds them.
pub fn unet_layers(cfg: &UNetConfig) -> Vec<Layer> {
    let n = cfg.down_block_types.len();
    let ch = &cfg.block_out_channels;
    let heads = match &cfg.num_attention_heads {
        Some(h) => per_block(h, n),
        None => per_block(&cfg.attention_head_dim, n),
    };
    let layers = per_block(&cfg.layers_per_block, n);
    let cross = per_block(&cfg.cross_attention_dim, n);
    let tlayers = per_block(&cfg.transformer_layers_per_block, n);
    let only_cross = per_block(&cfg.only_cross_attention, n);
    let temb = ch[0] * 4;
    // scale_shift resnets project the time embedding to scale and shift (twice the width).
    let temb_out = |c: i64| if cfg.resnet_time_scale_shift == "scale_shift" { 2 * c } else { c };
    let mut b = Builder { layers: Vec::new() };

    let l = b.layer("conv_in", LayerKind::Conv { channels: cfg.in_channels, scale: 1, normed: false }, false);
    l.conv("", cfg.in_channels, ch[0], 3);
    fix_conv_keys(l);
    let l = b.layer("time_embedding", LayerKind::Small, false);
    l.linear("linear_1", ch[0], temb, true);
    l.linear("linear_2", temb, temb, true);
    // SDXL's added embedding: the pooled text embedding and six size/crop ids
    // (sinusoids without parameters) projected into the time embedding.
    if let (Some("text_time"), Some(input)) = (cfg.addition_embed_type.as_deref(), cfg.projection_class_embeddings_input_dim) {
        let l = b.layer("add_embedding", LayerKind::Small, false);
        l.linear("linear_1", input, temb, true);
        l.linear("linear_2", temb, temb, true);
    }

    let resnet = |b: &mut Builder, name: String, cin: i64, cout: i64, scale: i64| {
        let l = b.layer(&name, LayerKind::Resnet { cin, cout, scale }, true);
        l.resnet(cin, cout, None);
        // time_emb_proj goes between conv1 and norm2 in the key order; order does not matter here.
        l.linear("time_emb_proj", temb, temb_out(cout), true);
    };
    let transformer = |b: &mut Builder, name: String, c: i64, h: i64, tl: i64, cross: i64, oc: bool, scale: i64| {
        let l = b.layer(&name, LayerKind::TransformerFrame { channels: c, scale }, false);
        l.norm("norm", c);
        if cfg.use_linear_projection {
            l.linear("proj_in", c, c, true);
            l.linear("proj_out", c, c, true);
        } else {
            l.conv("proj_in", c, c, 1);
            l.conv("proj_out", c, c, 1);
        }
        for k in 0..tl {
            let kind = LayerKind::TransformerBlock {
                dim: c,
                heads: h,
                scale,
                context_len: 77,
                context_dim: cross,
                only_cross: oc,
            };
            let l = b.layer(&format!("{name}.transformer_blocks.{k}"), kind, true);
            let ctx1 = if oc { cross } else { c };
            l.norm("norm1", c);
            for (attn, ctx) in [("attn1", ctx1), ("attn2", cross)] {
                l.linear(&format!("{attn}.to_q"), c, c, false);
                l.linear(&format!("{attn}.to_k"), ctx, c, false);
                l.linear(&format!("{attn}.to_v"), ctx, c, false);
                l.linear(&format!("{attn}.to_out.0"), c, c, true);
            }
            l.norm("norm2", c);
            l.norm("norm3", c);
            l.linear("ff.net.0.proj", c, 8 * c, true);
            l.linear("ff.net.2", 4 * c, c, true);
        }
    };

    let mut out = ch[0];
    let mut scale = 1;
    for i in 0..n {
        let cin_block = out;
        out = ch[i];
        let attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
        for j in 0..layers[i] {
            let cin = if j == 0 { cin_block } else { out };
            resnet(&mut b, format!("down_blocks.{i}.resnets.{j}"), cin, out, scale);
            if attn {
                let name = format!("down_blocks.{i}.attentions.{j}");
                transformer(&mut b, name, out, heads[i], tlayers[i], cross[i], only_cross[i], scale);
            }
        }
        if i + 1 < n {
            let l = b.layer(&format!("down_blocks.{i}.downsamplers.0"), LayerKind::Conv { channels: out, scale, normed: false }, false);
            l.conv("conv", out, out, 3);
            scale *= 2;
        }
    }
    let last = ch[n - 1];
    if cfg.mid_block_type.is_some() {
        resnet(&mut b, "mid_block.resnets.0".into(), last, last, scale);
        transformer(&mut b, "mid_block.attentions.0".into(), last, heads[n - 1], tlayers[n - 1], cross[n - 1], false, scale);
        resnet(&mut b, "mid_block.resnets.1".into(), last, last, scale);
    }
    let mut prev = last;
    for i in 0..n {
        let r = n - 1 - i;
        let out = ch[r];
        let skip_in = ch[r.saturating_sub(1)];
        let attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
        let count = layers[r] + 1;
        for j in 0..count {
            let skip = if j == count - 1 { skip_in } else { out };
            let cin = if j == 0 { prev } else { out };
            resnet(&mut b, format!("up_blocks.{i}.resnets.{j}"), cin + skip, out, scale);
            if attn {
                let name = format!("up_blocks.{i}.attentions.{j}");
                transformer(&mut b, name, out, heads[r], tlayers[r], cross[r], only_cross[r], scale);
            }
        }
        if i + 1 < n {
            scale /= 2;
            // The conv runs after nearest upsampling, at the next finer scale.
            let l = b.layer(&format!("up_blocks.{i}.upsamplers.0"), LayerKind::Conv { channels: out, scale, normed: false }, false);
            l.conv("conv", out, out, 3);
        }
        prev = out;
    }
    let l = b.layer("conv_out", LayerKind::Conv { channels: ch[0], scale: 1, normed: true }, false);
    l.params.push(Param { key: "conv_norm_out.weight".into(), shape: vec![ch[0]] });
    l.params.push(Param { key: "conv_norm_out.bias".into(), shape: vec![ch[0]] });
    l.params.push(Param { key: "conv_out.weight".into(), shape: vec![cfg.out_channels, ch[0], 3, 3] });
    l.params.push(Param { key: "conv_out.bias".into(), shape: vec![cfg.out_channels] });
    b.layers
}

/// `conv("", ..)` on a layer named `conv_in` gives `conv_in..weight`; tidy to `conv_in.weight`.
fn fix_conv_keys(l: &mut Layer) {
    for p in &mut l.params {
        p.key = p.key.replace("..", ".");
    }
}

/// The VAE's layers: encoder (what `cache_latents: false` runs each step) then decoder.
pub fn vae_layers(cfg: &VaeConfig) -> (Vec<Layer>, Vec<Layer>) {
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let lat = cfg.latent_channels;
    let mut enc = Builder { layers: Vec::new() };
    let l = enc.layer("encoder.conv_in", LayerKind::Conv { channels: cfg.in_channels, scale: 1, normed: false }, false);
    l.conv("", cfg.in_channels, ch[0], 3);
    fix_conv_keys(l);
    let mut out = ch[0];
    let mut scale = 1;
    for i in 0..n {
        let cin_block = out;
        out = ch[i];
        for j in 0..cfg.layers_per_block {
            let cin = if j == 0 { cin_block } else { out };
            let l = enc.layer(&format!("encoder.down_blocks.{i}.resnets.{j}"), LayerKind::Resnet { cin, cout: out, scale }, true);
            l.resnet(cin, out, None);
        }
        if i + 1 < n {
            let l = enc.layer(&format!("encoder.down_blocks.{i}.downsamplers.0"), LayerKind::Conv { channels: out, scale, normed: false }, false);
            l.conv("conv", out, out, 3);
            scale *= 2;
        }
    }
    let last = ch[n - 1];
    vae_mid(&mut enc, "encoder.mid_block", last, scale, cfg.mid_block_add_attention);
    let l = enc.layer("encoder.conv_out", LayerKind::Conv { channels: last, scale, normed: true }, false);
    l.params.push(Param { key: "encoder.conv_norm_out.weight".into(), shape: vec![last] });
    l.params.push(Param { key: "encoder.conv_norm_out.bias".into(), shape: vec![last] });
    l.params.push(Param { key: "encoder.conv_out.weight".into(), shape: vec![2 * lat, last, 3, 3] });
    l.params.push(Param { key: "encoder.conv_out.bias".into(), shape: vec![2 * lat] });
    if cfg.use_quant_conv {
        let l = enc.layer("quant_conv", LayerKind::Small, false);
        l.conv("", 2 * lat, 2 * lat, 1);
        fix_conv_keys(l);
    }

    let mut dec = Builder { layers: Vec::new() };
    if cfg.use_post_quant_conv {
        let l = dec.layer("post_quant_conv", LayerKind::Small, false);
        l.conv("", lat, lat, 1);
        fix_conv_keys(l);
    }
    let l = dec.layer("decoder.conv_in", LayerKind::Conv { channels: lat, scale, normed: false }, false);
    l.conv("", lat, last, 3);
    fix_conv_keys(l);
    vae_mid(&mut dec, "decoder.mid_block", last, scale, cfg.mid_block_add_attention);
    let mut prev = last;
    for i in 0..n {
        let out = ch[n - 1 - i];
        for j in 0..=cfg.layers_per_block {
            let cin = if j == 0 { prev } else { out };
            let l = dec.layer(&format!("decoder.up_blocks.{i}.resnets.{j}"), LayerKind::Resnet { cin, cout: out, scale }, true);
            l.resnet(cin, out, None);
        }
        if i + 1 < n {
            scale /= 2;
            let l = dec.layer(&format!("decoder.up_blocks.{i}.upsamplers.0"), LayerKind::Conv { channels: out, scale, normed: false }, false);
            l.conv("conv", out, out, 3);
        }
        prev = out;
    }
    let l = dec.layer("decoder.conv_out", LayerKind::Conv { channels: ch[0], scale: 1, normed: true }, false);
    l.params.push(Param { key: "decoder.conv_norm_out.weight".into(), shape: vec![ch[0]] });
    l.params.push(Param { key: "decoder.conv_norm_out.bias".into(), shape: vec![ch[0]] });
    l.params.push(Param { key: "decoder.conv_out.weight".into(), shape: vec![cfg.out_channels, ch[0], 3, 3] });
    l.params.push(Param { key: "decoder.conv_out.bias".into(), shape: vec![cfg.out_channels] });
    (enc.layers, dec.layers)
}

fn vae_mid(b: &mut Builder, name: &str, c: i64, scale: i64, attention: bool) {
    let l = b.layer(&format!("{name}.resnets.0"), LayerKind::Resnet { cin: c, cout: c, scale }, true);
    l.resnet(c, c, None);
    if attention {
        let kind = LayerKind::SelfAttention { dim: c, scale };
        let l = b.layer(&format!("{name}.attentions.0"), kind, true);
        l.norm("group_norm", c);
        for k in ["to_q", "to_k", "to_v", "to_out.0"] {
            l.linear(k, c, c, true);
        }
    }
    let l = b.layer(&format!("{name}.resnets.1"), LayerKind::Resnet { cin: c, cout: c, scale }, true);
    l.resnet(c, c, None);
}

/// The CLIP text transformer's layers (keys without the `text_model.` prefix),
/// with `text_projection` (no bias) when `projected` (SDXL's second encoder,
/// whose projected pooled output is the UNet's `text_embeds`).
pub fn clip_layers(cfg: &ClipConfig, projected: bool) -> Vec<Layer> {
    let h = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let tokens = cfg.max_position_embeddings;
    let mut b = Builder { layers: Vec::new() };
    let l = b.layer("embeddings", LayerKind::Small, false);
    l.p("token_embedding.weight", &[cfg.vocab_size, h]);
    l.p("position_embedding.weight", &[cfg.max_position_embeddings, h]);
    for k in 0..cfg.num_hidden_layers {
        let kind = LayerKind::ClipLayer { hidden: h, intermediate: i, heads: cfg.num_attention_heads, tokens, windows: 1 };
        let l = b.layer(&format!("encoder.layers.{k}"), kind, true);
        l.norm("layer_norm1", h);
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            l.linear(&format!("self_attn.{p}"), h, h, true);
        }
        l.norm("layer_norm2", h);
        l.linear("mlp.fc1", h, i, true);
        l.linear("mlp.fc2", i, h, true);
    }
    let l = b.layer("final_layer_norm", LayerKind::Small, false);
    l.norm("", h);
    fix_conv_keys(l);
    if projected {
        let l = b.layer("text_projection", LayerKind::Small, false);
        l.linear("", h, cfg.projection_dim, false);
        fix_conv_keys(l);
    }
    b.layers
}

/// LoRA adapter tensors for one layer: for each adapted Linear `down` [rank, in]
/// and `up` [out, rank]; for each adapted convolution `down` [rank, in, k, k] and
/// `up` [out, rank, 1, 1] — the layers `targets` picks by module path, as the
/// LoRA helper attaches them.
pub fn lora_params(layer: &Layer, rank: i64, targets: &crate::model::lora::LoraTargets) -> Vec<Param> {
    layer
        .params
        .iter()
        .filter(|p| p.key.ends_with(".weight") && matches!(p.shape.len(), 2 | 4))
        .filter(|p| targets.wants_path(p.key.trim_end_matches(".weight")))
        .flat_map(|p| {
            let base = p.key.trim_end_matches(".weight");
            let (down, up) = match p.shape[..] {
                [o, i, k1, k2] => (vec![rank, i, k1, k2], vec![o, rank, 1, 1]),
                _ => (vec![rank, p.shape[1]], vec![p.shape[0], rank]),
            };
            [
                Param { key: format!("{base}.lora_down.weight"), shape: down },
                Param { key: format!("{base}.lora_up.weight"), shape: up },
            ]
        })
        .collect()
}
