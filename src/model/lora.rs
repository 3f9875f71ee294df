//! LoRA adapters on linear layers: attach, train, save and load with kohya key names, merge.
//!
//! An adapter adds `(alpha / rank) · up(down(x))` to a layer's output: `down` maps the
//! input to `rank` features, `up` maps them back to the output width. For a Conv2d,
//! `down` is a convolution with the layer's kernel, stride and padding and `up` a 1×1
//! convolution (kohya's LoCon layout). `down` starts kaiming-uniform and `up` at zero,
//! as peft and kohya do, so a freshly attached adapter leaves the model unchanged.
//!
//! Files use kohya's names, which AUTOMATIC1111, ComfyUI and diffusers read: the
//! module path with dots turned into underscores behind `lora_unet_` or the text
//! encoder's prefix, each with `.lora_down.weight`, `.lora_up.weight` and a scalar
//! `.alpha` (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha`);
//! the UNet path is the one the model's family uses in kohya's files (`lora_names`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tch::{Kind, Tensor};

use super::clip::{ClipAttention, ClipTextTransformer};
use super::family::Architecture;
pub use super::lora_names::{kohya_name, UNET_PREFIX};
use super::lora_names::{families_naming, UnetNamer};
use super::nn::{Conv2d, Linear};
use super::resnet::ResnetBlock2D;
use super::unet::{CrossAttention, Projection, Transformer2DModel, UNet2DConditionModel};
use crate::checkpoint::safetensors_file::SafetensorsFile;
use crate::checkpoint::source::TensorSource;
use crate::checkpoint::write::write_safetensors;
use crate::rng::CpuRng;

/// What every text encoder's kohya prefix starts with (`lora_te_`, SDXL's `lora_te1_` / `lora_te2_`).
pub const TEXT_PREFIX_STEM: &str = "lora_te";

/// The text encoders a LoRA may adapt: each with its kohya prefix.
pub type TextEncoders<'a> = [(&'static str, &'a mut ClipTextTransformer)];

/// The low-rank update of one layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[rank, in]`, or `[rank, in, k, k]` on a convolution.
    pub down: Tensor,
    /// `[out, rank]`, or `[out, rank, 1, 1]` on a convolution.
    pub up: Tensor,
    pub alpha: f64,
}

impl LoraAdapter {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// `alpha / rank`, the factor on `up(down(x))`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// The update for a Linear layer's input. The input is cast to the adapter's kind
    /// and the result back, so float32 adapters can sit on bf16/fp16 weights.
    pub fn forward_linear(&self, x: &Tensor) -> Tensor {
        let h = x.to_kind(self.down.kind()).linear(&self.down, None::<&Tensor>).linear(&self.up, None::<&Tensor>);
        (h * self.scale()).to_kind(x.kind())
    }

    /// The update for a Conv2d layer's input (`stride`, `padding`: the layer's own).
    pub fn forward_conv(&self, x: &Tensor, stride: i64, padding: i64) -> Tensor {
        let h = x
            .to_kind(self.down.kind())
            .conv2d(&self.down, None::<&Tensor>, [stride], [padding], [1], 1)
            .conv2d(&self.up, None::<&Tensor>, [1], [0], [1], 1);
        (h * self.scale()).to_kind(x.kind())
    }

    /// `scale · alpha/rank · up·down` in the layout of `weight`, float32.
    fn delta(&self, weight_shape: &[i64], scale: f64) -> Tensor {
        let up = self.up.to_kind(Kind::Float).flatten(1, -1);
        let down = self.down.to_kind(Kind::Float).flatten(1, -1);
        (up.matmul(&down) * (scale * self.scale())).reshape(weight_shape)
    }
}

/// A layer LoRA can sit on, borrowed from a model.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl LayerMut<'_> {
    fn weight(&self) -> &Tensor {
        match self {
            LayerMut::Linear(l) => &l.weight,
            LayerMut::Conv(c) => &c.weight,
        }
    }

    fn set_lora(&mut self, lora: LoraAdapter) {
        match self {
            LayerMut::Linear(l) => l.lora = Some(lora),
            LayerMut::Conv(c) => c.lora = Some(lora),
        }
    }

    /// Shapes of `down` and `up` for `rank` on this layer.
    fn adapter_shapes(&self, rank: i64) -> (Vec<i64>, Vec<i64>) {
        let w = self.weight().size();
        match self {
            LayerMut::Linear(_) => (vec![rank, w[1]], vec![w[0], rank]),
            LayerMut::Conv(_) => (vec![rank, w[1], w[2], w[3]], vec![w[0], rank, 1, 1]),
        }
    }
}

/// Which layers get adapters when training. Attention is what the config's
/// `use_lora` trains; the others are kohya's wider choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraTargets {
    /// UNet `to_q`, `to_k`, `to_v`, `to_out.0`; text encoder `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    pub attention: bool,
    /// UNet `ff.net.0.proj`, `ff.net.2`; text encoder `mlp.fc1`, `mlp.fc2`.
    pub feed_forward: bool,
    /// UNet `proj_in`, `proj_out` (1×1 convolutions in SD 1.x, Linear in SD 2.x).
    pub proj_in_out: bool,
    /// UNet resnet and resampler convolutions (kohya's LoCon).
    pub convs: bool,
}

impl LoraTargets {
    pub const ATTENTION: LoraTargets = LoraTargets { attention: true, feed_forward: false, proj_in_out: false, convs: false };

    /// The targets of the config's `training.lora_layers`.
    pub fn of(layers: crate::config::schema::LoraLayers) -> LoraTargets {
        use crate::config::schema::LoraLayers;
        let wide = layers != LoraLayers::Attention;
        LoraTargets { attention: true, feed_forward: wide, proj_in_out: wide, convs: layers == LoraLayers::All }
    }

    /// Whether the layer at diffusers / transformers module path `path` gets an adapter.
    pub fn wants_path(&self, path: &str) -> bool {
        self.wants(role_of(path))
    }

    fn wants(&self, kind: LayerRole) -> bool {
        match kind {
            LayerRole::Attention => self.attention,
            LayerRole::FeedForward => self.feed_forward,
            LayerRole::ProjInOut => self.proj_in_out,
            LayerRole::Conv => self.convs,
            LayerRole::Other => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerRole {
    Attention,
    FeedForward,
    ProjInOut,
    Conv,
    Other,
}

/// What a layer is, from its diffusers / transformers module path.
fn role_of(path: &str) -> LayerRole {
    let last = path.rsplit('.').next().unwrap_or(path);
    if path.contains(".attn1.") || path.contains(".attn2.") || path.contains(".self_attn.") {
        LayerRole::Attention
    } else if path.contains(".ff.") || path.contains(".mlp.") {
        LayerRole::FeedForward
    } else if last == "proj_in" || last == "proj_out" {
        LayerRole::ProjInOut
    } else if path.contains(".resnets.") || path.contains("samplers.") {
        LayerRole::Conv
    } else {
        LayerRole::Other
    }
}

/// Rank, alpha and targets of adapters to attach for training.
#[derive(Debug, Clone, Copy)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    pub targets: LoraTargets,
    /// Kind of the adapter tensors (float32 also on half-precision weights).
    pub kind: Kind,
}

/// One adapter as trained and saved: its kohya module name and the tensors the
/// layer holds (shared storage and autograd state).
#[derive(Debug)]
pub struct LoraModule {
    pub name: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

/// The adapters attached to a model: what a LoRA run trains and saves.
#[derive(Debug, Default)]
pub struct LoraNetwork {
    pub modules: Vec<LoraModule>,
    /// kohya's `ss_base_model_version` of the model they sit on (`sd_v1`, `sdxl_base_v1-0`).
    pub base_model_version: Option<&'static str>,
}

impl LoraNetwork {
    /// No adapters yet, for a model of `family`.
    pub fn for_family(family: &Architecture) -> LoraNetwork {
        LoraNetwork { modules: Vec::new(), base_model_version: Some(family.kohya_lora().base_model_version) }
    }

    /// The trainable tensors by kohya key (`….lora_down.weight`, `….lora_up.weight`).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    (format!("{}.lora_down.weight", m.name), m.down.shallow_clone()),
                    (format!("{}.lora_up.weight", m.name), m.up.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Everything a kohya file holds: the trainable tensors and each module's `.alpha`.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = self.trainable();
        for m in &self.modules {
            out.push((format!("{}.alpha", m.name), Tensor::from(m.alpha as f32)));
        }
        out
    }

    /// Writes the kohya file atomically, with kohya's `ss_network_*` metadata so
    /// A1111's and ComfyUI's loaders see a plain LoRA, and `ss_base_model_version`
    /// so they can warn when it is applied to another family's model.
    pub fn save(&self, path: &Path, extra_metadata: &BTreeMap<String, String>) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
        if let Some(version) = self.base_model_version {
            meta.insert("ss_base_model_version".to_string(), version.to_string());
        }
        if let Some(m) = self.modules.first() {
            meta.insert("ss_network_dim".to_string(), m.down.size()[0].to_string());
            meta.insert("ss_network_alpha".to_string(), m.alpha.to_string());
        }
        // kohya marks LoCon files (adapters on k×k convolutions) by their conv rank and alpha.
        if let Some(m) = self.modules.iter().find(|m| m.down.dim() == 4 && m.down.size()[2] > 1) {
            let args = serde_json::json!({ "conv_dim": m.down.size()[0].to_string(), "conv_alpha": m.alpha.to_string() });
            meta.insert("ss_network_args".to_string(), args.to_string());
        }
        meta.extend(extra_metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        write_safetensors(path, &self.state_dict(), Some(&meta))
    }

    pub fn extend(&mut self, other: LoraNetwork) {
        self.modules.extend(other.modules);
        self.base_model_version = self.base_model_version.or(other.base_model_version);
    }
}

// ---- Walking the models' layers by module path -----------------------------------

type Layers<'a> = Vec<(String, LayerMut<'a>)>;

fn push_linear<'a>(out: &mut Layers<'a>, path: String, l: &'a mut Linear) {
    out.push((path, LayerMut::Linear(l)));
}

fn push_conv<'a>(out: &mut Layers<'a>, path: String, c: &'a mut Conv2d) {
    out.push((path, LayerMut::Conv(c)));
}

fn resnet_layers<'a>(out: &mut Layers<'a>, p: &str, r: &'a mut ResnetBlock2D) {
    push_conv(out, format!("{p}.conv1"), &mut r.conv1);
    if let Some(t) = &mut r.time_emb_proj {
        push_linear(out, format!("{p}.time_emb_proj"), t);
    }
    push_conv(out, format!("{p}.conv2"), &mut r.conv2);
    if let Some(c) = &mut r.conv_shortcut {
        push_conv(out, format!("{p}.conv_shortcut"), c);
    }
}

fn projection_layers<'a>(out: &mut Layers<'a>, path: String, proj: &'a mut Projection) {
    match proj {
        Projection::Conv(c) => push_conv(out, path, c),
        Projection::Linear(l) => push_linear(out, path, l),
    }
}

fn cross_attention_layers<'a>(out: &mut Layers<'a>, p: &str, a: &'a mut CrossAttention) {
    push_linear(out, format!("{p}.to_q"), &mut a.to_q);
    push_linear(out, format!("{p}.to_k"), &mut a.to_k);
    push_linear(out, format!("{p}.to_v"), &mut a.to_v);
    push_linear(out, format!("{p}.to_out.0"), &mut a.to_out);
}

fn transformer_layers<'a>(out: &mut Layers<'a>, p: &str, t: &'a mut Transformer2DModel) {
    projection_layers(out, format!("{p}.proj_in"), &mut t.proj_in);
    for (k, block) in t.transformer_blocks.iter_mut().enumerate() {
        let b = format!("{p}.transformer_blocks.{k}");
        cross_attention_layers(out, &format!("{b}.attn1"), &mut block.attn1);
        cross_attention_layers(out, &format!("{b}.attn2"), &mut block.attn2);
        push_linear(out, format!("{b}.ff.net.0.proj"), &mut block.ff.geglu_proj);
        push_linear(out, format!("{b}.ff.net.2"), &mut block.ff.out);
    }
    projection_layers(out, format!("{p}.proj_out"), &mut t.proj_out);
}

/// Every Linear and Conv2d of the UNet with its diffusers module path.
pub fn unet_layers(unet: &mut UNet2DConditionModel) -> Layers<'_> {
    let mut out = Vec::new();
    push_linear(&mut out, "time_embedding.linear_1".into(), &mut unet.time_embedding.linear_1);
    push_linear(&mut out, "time_embedding.linear_2".into(), &mut unet.time_embedding.linear_2);
    push_conv(&mut out, "conv_in".into(), &mut unet.conv_in);
    for (i, block) in unet.down_blocks.iter_mut().enumerate() {
        let p = format!("down_blocks.{i}");
        for (j, r) in block.resnets.iter_mut().enumerate() {
            resnet_layers(&mut out, &format!("{p}.resnets.{j}"), r);
        }
        for (j, a) in block.attentions.iter_mut().enumerate() {
            transformer_layers(&mut out, &format!("{p}.attentions.{j}"), a);
        }
        if let Some(d) = &mut block.downsampler {
            push_conv(&mut out, format!("{p}.downsamplers.0.conv"), &mut d.conv);
        }
    }
    if let Some(mid) = &mut unet.mid_block {
        for (j, r) in mid.resnets.iter_mut().enumerate() {
            resnet_layers(&mut out, &format!("mid_block.resnets.{j}"), r);
        }
        for (j, a) in mid.attentions.iter_mut().enumerate() {
            transformer_layers(&mut out, &format!("mid_block.attentions.{j}"), a);
        }
    }
    for (i, block) in unet.up_blocks.iter_mut().enumerate() {
        let p = format!("up_blocks.{i}");
        for (j, r) in block.resnets.iter_mut().enumerate() {
            resnet_layers(&mut out, &format!("{p}.resnets.{j}"), r);
        }
        for (j, a) in block.attentions.iter_mut().enumerate() {
            transformer_layers(&mut out, &format!("{p}.attentions.{j}"), a);
        }
        if let Some(u) = &mut block.upsampler {
            push_conv(&mut out, format!("{p}.upsamplers.0.conv"), &mut u.conv);
        }
    }
    push_conv(&mut out, "conv_out".into(), &mut unet.conv_out);
    out
}

fn clip_attention_layers<'a>(out: &mut Layers<'a>, p: &str, a: &'a mut ClipAttention) {
    push_linear(out, format!("{p}.q_proj"), &mut a.q_proj);
    push_linear(out, format!("{p}.k_proj"), &mut a.k_proj);
    push_linear(out, format!("{p}.v_proj"), &mut a.v_proj);
    push_linear(out, format!("{p}.out_proj"), &mut a.out_proj);
}

/// Every Linear of the text encoder with its transformers module path (`text_model.…`).
pub fn clip_layers(clip: &mut ClipTextTransformer) -> Layers<'_> {
    let mut out = Vec::new();
    for (i, layer) in clip.layers.iter_mut().enumerate() {
        let p = format!("text_model.encoder.layers.{i}");
        clip_attention_layers(&mut out, &format!("{p}.self_attn"), &mut layer.self_attn);
        push_linear(&mut out, format!("{p}.mlp.fc1"), &mut layer.mlp.fc1);
        push_linear(&mut out, format!("{p}.mlp.fc2"), &mut layer.mlp.fc2);
    }
    out
}

// ---- kohya's names for the layers ------------------------------------------------

/// A layer with its module path (which says what the layer is) and its kohya name.
struct NamedLayer<'a> {
    path: String,
    name: String,
    layer: LayerMut<'a>,
}

/// Every layer of the UNet with the name `family`'s kohya files give it.
fn unet_named_layers<'a>(unet: &'a mut UNet2DConditionModel, family: &Architecture) -> Result<Vec<NamedLayer<'a>>> {
    let namer = UnetNamer::new(family.kohya_lora().unet_naming, unet);
    unet_layers(unet)
        .into_iter()
        .map(|(path, layer)| {
            let name = namer
                .name(&path)
                .ok_or_else(|| anyhow!("the UNet layer `{path}` has no name in {family} LoRA files"))?;
            Ok(NamedLayer { path, name, layer })
        })
        .collect()
}

/// Every layer of a text encoder with its kohya name behind `prefix`.
fn clip_named_layers<'a>(clip: &'a mut ClipTextTransformer, prefix: &str) -> Vec<NamedLayer<'a>> {
    clip_layers(clip)
        .into_iter()
        .map(|(path, layer)| NamedLayer { name: kohya_name(prefix, &path), path, layer })
        .collect()
}

// ---- Attaching fresh adapters for training -----------------------------------------

fn attach(layers: Vec<NamedLayer<'_>>, spec: &LoraSpec, rng: &mut CpuRng) -> Result<LoraNetwork> {
    if spec.rank <= 0 {
        bail!("the LoRA rank must be positive, not {}", spec.rank);
    }
    let mut net = LoraNetwork::default();
    for NamedLayer { path, name, mut layer } in layers {
        if !spec.targets.wants(role_of(&path)) {
            continue;
        }
        let (down_shape, up_shape) = layer.adapter_shapes(spec.rank);
        let device = layer.weight().device();
        // kaiming_uniform_(a=√5), as peft and kohya: U(-1/√fan_in, 1/√fan_in).
        let fan_in: i64 = down_shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let down = (rng.rand(&down_shape) * (2.0 * bound) - bound).to_kind(spec.kind).to_device(device).set_requires_grad(true);
        let up = Tensor::zeros(up_shape.as_slice(), (spec.kind, device)).set_requires_grad(true);
        net.modules.push(LoraModule {
            name,
            down: down.shallow_clone(),
            up: up.shallow_clone(),
            alpha: spec.alpha,
        });
        layer.set_lora(LoraAdapter { down, up, alpha: spec.alpha });
    }
    Ok(net)
}

/// Puts fresh adapters on the UNet layers `spec.targets` names, named as
/// `family`'s kohya files name them; returns them, requiring grad, for the
/// optimizer (the base weights are left as they are).
pub fn attach_unet_lora(
    unet: &mut UNet2DConditionModel,
    family: &Architecture,
    spec: &LoraSpec,
    rng: &mut CpuRng,
) -> Result<LoraNetwork> {
    let mut net = attach(unet_named_layers(unet, family)?, spec, rng)?;
    net.base_model_version = Some(family.kohya_lora().base_model_version);
    Ok(net)
}

/// Puts fresh adapters on a text encoder's attention projections (and MLP with
/// `feed_forward`), named behind its kohya `prefix`; returns them, requiring grad.
pub fn attach_text_lora(clip: &mut ClipTextTransformer, prefix: &str, spec: &LoraSpec, rng: &mut CpuRng) -> Result<LoraNetwork> {
    attach(clip_named_layers(clip, prefix), spec, rng)
}

// ---- Reading kohya files -----------------------------------------------------------

/// One module of a LoRA file, float32 on the CPU.
struct FileModule {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// The modules of a kohya LoRA file by module name; any key that is not
/// `<module>.lora_down.weight`, `.lora_up.weight` or `.alpha` is refused.
fn read_kohya(path: &Path) -> Result<BTreeMap<String, FileModule>> {
    let file = SafetensorsFile::open(path)?;
    let mut modules: BTreeMap<String, FileModule> = BTreeMap::new();
    for key in file.index().keys() {
        let (module, part) = match key.split_once('.') {
            Some(split) => split,
            None => bail!("{}: tensor `{key}` is not a kohya LoRA key (expected `<layer>.lora_down.weight`, `.lora_up.weight` or `.alpha`)", path.display()),
        };
        let entry = modules.entry(module.to_string()).or_insert(FileModule { down: None, up: None, alpha: None });
        let t = file.load(key)?;
        match part {
            "lora_down.weight" => entry.down = Some(t.to_kind(Kind::Float)),
            "lora_up.weight" => entry.up = Some(t.to_kind(Kind::Float)),
            "alpha" if t.numel() == 1 => entry.alpha = Some(t.to_kind(Kind::Double).reshape([-1]).double_value(&[0])),
            "alpha" => bail!("{}: `{key}` should be a single number but has shape {:?}", path.display(), t.size()),
            _ => bail!(
                "{}: tensor `{key}` is not part of a plain kohya LoRA (expected `<layer>.lora_down.weight`, `.lora_up.weight` or `.alpha`; LyCORIS/DoRA variants are not supported)",
                path.display()
            ),
        }
    }
    if modules.is_empty() {
        bail!("{} holds no LoRA tensors", path.display());
    }
    Ok(modules)
}

/// A file module checked against the layer it names, as an adapter.
fn adapter_for(path: &Path, name: &str, m: &FileModule, layer: &LayerMut<'_>) -> Result<LoraAdapter> {
    let (down, up) = match (&m.down, &m.up) {
        (Some(d), Some(u)) => (d, u),
        (None, _) => bail!("{}: `{name}` has no `{name}.lora_down.weight`", path.display()),
        (_, None) => bail!("{}: `{name}` has no `{name}.lora_up.weight`", path.display()),
    };
    let rank = down.size()[0];
    let (want_down, want_up) = layer.adapter_shapes(rank);
    if down.size() != want_down || up.size() != want_up {
        bail!(
            "{}: `{name}` has lora_down {:?} and lora_up {:?}, but the layer's weight {:?} needs {want_down:?} and {want_up:?}",
            path.display(),
            down.size(),
            up.size(),
            layer.weight().size()
        );
    }
    // kohya's convention: no `.alpha` means alpha = rank (scale 1).
    let alpha = m.alpha.unwrap_or(rank as f64);
    Ok(LoraAdapter { down: down.shallow_clone(), up: up.shallow_clone(), alpha })
}

/// Why no layer of a `family` model is called `name`: a name in another
/// family's style says which, otherwise the file is for some other model.
fn unknown_module(path: &Path, name: &str, family: &Architecture) -> anyhow::Error {
    let ours = family.kohya_lora().unet_naming.families();
    match families_naming(name) {
        Some(theirs) if theirs != ours => anyhow!(
            "{}: `{name}` is named as in an {theirs} LoRA and names no layer of this {family} model (a LoRA for another model family?)",
            path.display()
        ),
        _ => anyhow!(
            "{}: `{name}` names no layer of this model's UNet or text encoders (a LoRA for another architecture?)",
            path.display()
        ),
    }
}

/// Matches each module of a kohya file to its layer (named as `family`'s files
/// name them); calls `apply` on each pair.
fn for_each_module(
    unet: &mut UNet2DConditionModel,
    family: &Architecture,
    texts: &mut TextEncoders<'_>,
    path: &Path,
    mut apply: impl FnMut(&str, LoraAdapter, &mut LayerMut<'_>) -> Result<()>,
) -> Result<usize> {
    let modules = read_kohya(path)?;
    let mut layers: HashMap<String, LayerMut<'_>> = HashMap::new();
    let text_layers = texts.iter_mut().flat_map(|(prefix, clip)| clip_named_layers(clip, prefix));
    for named in unet_named_layers(unet, family)?.into_iter().chain(text_layers) {
        layers.insert(named.name, named.layer);
    }
    for (name, m) in &modules {
        let layer = layers.get_mut(name).ok_or_else(|| unknown_module(path, name, family))?;
        let adapter = adapter_for(path, name, m, layer)?;
        apply(name, adapter, layer)?;
    }
    Ok(modules.len())
}

/// Adds a kohya LoRA file into the model's weights, `scale` times its own
/// strength: sampling then runs at the base model's speed. Returns the number of
/// layers changed. The file is checked completely before any weight changes.
pub fn merge_lora(
    unet: &mut UNet2DConditionModel,
    family: &Architecture,
    texts: &mut TextEncoders<'_>,
    path: &Path,
    scale: f64,
) -> Result<usize> {
    let mut deltas: Vec<(Tensor, Tensor)> = Vec::new();
    let count = for_each_module(unet, family, texts, path, |_, adapter, layer| {
        let w = layer.weight();
        deltas.push((w.shallow_clone(), adapter.delta(&w.size(), scale)));
        Ok(())
    })?;
    let _guard = tch::no_grad_guard();
    for (mut w, delta) in deltas {
        let merged = (w.to_kind(Kind::Float) + delta.to_device(w.device())).to_kind(w.kind());
        w.copy_(&merged);
    }
    Ok(count)
}

/// Attaches adapters holding a kohya file's values (to resume a LoRA run, or to
/// run a LoRA unmerged); returns them, requiring grad, in `kind`.
pub fn attach_lora_file(
    unet: &mut UNet2DConditionModel,
    family: &Architecture,
    texts: &mut TextEncoders<'_>,
    path: &Path,
    kind: Kind,
) -> Result<LoraNetwork> {
    let mut net = LoraNetwork::for_family(family);
    for_each_module(unet, family, texts, path, |name, adapter, layer| {
        let device = layer.weight().device();
        let down = adapter.down.to_kind(kind).to_device(device).set_requires_grad(true);
        let up = adapter.up.to_kind(kind).to_device(device).set_requires_grad(true);
        net.modules.push(LoraModule {
            name: name.to_string(),
            down: down.shallow_clone(),
            up: up.shallow_clone(),
            alpha: adapter.alpha,
        });
        layer.set_lora(LoraAdapter { down, up, alpha: adapter.alpha });
        Ok(())
    })?;
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_module_paths() {
        assert_eq!(role_of("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), LayerRole::Attention);
        assert_eq!(role_of("text_model.encoder.layers.0.self_attn.out_proj"), LayerRole::Attention);
        assert_eq!(role_of("mid_block.attentions.0.transformer_blocks.0.ff.net.2"), LayerRole::FeedForward);
        assert_eq!(role_of("text_model.encoder.layers.1.mlp.fc1"), LayerRole::FeedForward);
        assert_eq!(role_of("up_blocks.1.attentions.2.proj_in"), LayerRole::ProjInOut);
        assert_eq!(role_of("up_blocks.1.resnets.2.conv1"), LayerRole::Conv);
        assert_eq!(role_of("down_blocks.0.downsamplers.0.conv"), LayerRole::Conv);
        assert_eq!(role_of("conv_in"), LayerRole::Other);
        assert_eq!(role_of("time_embedding.linear_1"), LayerRole::Other);
    }

    #[test]
    fn kohya_names_replace_dots() {
        assert_eq!(
            kohya_name(UNET_PREFIX, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
        );
        assert_eq!(
            kohya_name("lora_te_", "text_model.encoder.layers.0.self_attn.q_proj"),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        );
    }
}
