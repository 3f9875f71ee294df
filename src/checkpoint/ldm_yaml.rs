//! The sidecar `<file>.yaml` next to a single-file model, in the original
//! latent-diffusion config format (`v1-inference.yaml`, `v2-inference-v.yaml`),
//! as AUTOMATIC1111 reads it. What it states overrides what the shapes suggest;
//! what it leaves out keeps the inferred value.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_yaml::Value;

use crate::model::config::{ClipConfig, PerBlock, UNetConfig, VaeConfig};
use crate::scheduler::config::SchedulerConfig;

/// `model.ckpt` → `model.yaml`.
pub fn sidecar_path(model: &Path) -> PathBuf {
    model.with_extension("yaml")
}

pub struct LdmYaml {
    path: PathBuf,
    root: Value,
}

impl LdmYaml {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let root: Value =
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not valid YAML ({e})", path.display()))?;
        if root.get("model").and_then(|m| m.get("params")).is_none() {
            anyhow::bail!("{} is not a latent-diffusion config (it has no `model.params`)", path.display());
        }
        Ok(LdmYaml { path: path.to_path_buf(), root })
    }

    fn params(&self) -> &Value {
        &self.root["model"]["params"]
    }

    fn unet_params(&self) -> &Value {
        &self.params()["unet_config"]["params"]
    }

    fn ddconfig(&self) -> &Value {
        &self.params()["first_stage_config"]["params"]["ddconfig"]
    }

    fn int(&self, v: &Value, key: &str) -> anyhow::Result<Option<i64>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_i64().map(Some).with_context(|| format!("{}: `{key}` is not an integer", self.path.display())),
        }
    }

    fn float(&self, v: &Value, key: &str) -> anyhow::Result<Option<f64>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).with_context(|| format!("{}: `{key}` is not a number", self.path.display())),
        }
    }

    fn ints(&self, v: &Value, key: &str) -> anyhow::Result<Option<Vec<i64>>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Sequence(s)) => s
                .iter()
                .map(|x| x.as_i64().with_context(|| format!("{}: `{key}` is not a list of integers", self.path.display())))
                .collect::<anyhow::Result<Vec<_>>>()
                .map(Some),
            Some(x) => x
                .as_i64()
                .map(|i| Some(vec![i]))
                .with_context(|| format!("{}: `{key}` is not a list of integers", self.path.display())),
        }
    }

    /// Whether the text encoder is OpenCLIP (SD 2.x), when the file says.
    pub fn open_clip(&self) -> Option<bool> {
        let target = self.params()["cond_stage_config"]["target"].as_str()?;
        Some(target.contains("OpenCLIP"))
    }

    /// `cond_stage_config.params.layer`: `penultimate` (SD 2) or `last`.
    pub fn text_layer(&self) -> Option<&str> {
        self.params()["cond_stage_config"]["params"]["layer"].as_str()
    }

    pub fn apply_unet(&self, c: &mut UNetConfig) -> anyhow::Result<()> {
        let p = self.unet_params();
        if let Some(v) = self.int(p, "in_channels")? {
            c.in_channels = v;
        }
        if let Some(v) = self.int(p, "out_channels")? {
            c.out_channels = v;
        }
        if let Some(v) = self.int(self.params(), "image_size")? {
            c.sample_size = v; // LatentDiffusion's image_size is the latent size
        }
        if let (Some(ch), Some(mult)) = (self.int(p, "model_channels")?, self.ints(p, "channel_mult")?) {
            c.block_out_channels = mult.iter().map(|m| ch * m).collect();
        }
        let levels = c.block_out_channels.len();
        if let Some(v) = self.ints(p, "num_res_blocks")? {
            c.layers_per_block = if v.len() == 1 { PerBlock::One(v[0]) } else { PerBlock::Each(v) };
        }
        if let Some(res) = self.ints(p, "attention_resolutions")? {
            // A level has attention when its downsampling factor is listed.
            let has = |level: usize| res.contains(&(1i64 << level));
            c.down_block_types =
                (0..levels).map(|l| if has(l) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.into()).collect();
            c.up_block_types = (0..levels)
                .rev()
                .map(|l| if has(l) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.into())
                .collect();
        }
        let heads = self.int(p, "num_heads")?.filter(|&h| h > 0);
        let head_channels = self.int(p, "num_head_channels")?.filter(|&h| h > 0);
        match (heads, head_channels) {
            (Some(h), _) => c.attention_head_dim = PerBlock::One(h),
            (None, Some(hc)) => {
                c.attention_head_dim = PerBlock::Each(c.block_out_channels.iter().map(|ch| (ch / hc).max(1)).collect())
            }
            (None, None) => {}
        }
        c.num_attention_heads = None;
        if let Some(v) = p.get("use_linear_in_transformer").and_then(Value::as_bool) {
            c.use_linear_projection = v;
        }
        if let Some(v) = self.ints(p, "context_dim")? {
            c.cross_attention_dim = PerBlock::One(v[0]);
        }
        if let Some(v) = self.ints(p, "transformer_depth")? {
            c.transformer_layers_per_block = if v.len() == 1 { PerBlock::One(v[0]) } else { PerBlock::Each(v) };
        }
        Ok(())
    }

    pub fn apply_vae(&self, c: &mut VaeConfig) -> anyhow::Result<()> {
        let d = self.ddconfig();
        if let (Some(ch), Some(mult)) = (self.int(d, "ch")?, self.ints(d, "ch_mult")?) {
            c.block_out_channels = mult.iter().map(|m| ch * m).collect();
            c.down_block_types = vec!["DownEncoderBlock2D".into(); mult.len()];
            c.up_block_types = vec!["UpDecoderBlock2D".into(); mult.len()];
        }
        if let Some(v) = self.int(d, "num_res_blocks")? {
            c.layers_per_block = v;
        }
        if let Some(v) = self.int(d, "z_channels")? {
            c.latent_channels = v;
        }
        if let Some(v) = self.int(d, "in_channels")? {
            c.in_channels = v;
        }
        if let Some(v) = self.int(d, "out_ch")? {
            c.out_channels = v;
        }
        if let Some(v) = self.int(d, "resolution")? {
            c.sample_size = v;
        }
        if let Some(v) = self.float(self.params(), "scale_factor")? {
            c.scaling_factor = v;
        }
        Ok(())
    }

    /// SD 2's text encoder stops at the penultimate OpenCLIP block; `layer: last` keeps all.
    pub fn apply_text(&self, c: &mut ClipConfig, stored_layers: i64) {
        match self.text_layer() {
            Some("penultimate") => c.num_hidden_layers = stored_layers - 1,
            Some("last") => c.num_hidden_layers = stored_layers,
            _ => {}
        }
    }

    pub fn apply_scheduler(&self, c: &mut SchedulerConfig) -> anyhow::Result<()> {
        let p = self.params();
        match p.get("parameterization").and_then(Value::as_str) {
            Some("v") => c.prediction_type = "v_prediction".into(),
            Some("eps") => c.prediction_type = "epsilon".into(),
            Some("x0") => c.prediction_type = "sample".into(),
            Some(other) => anyhow::bail!("{}: parameterization `{other}` is not supported", self.path.display()),
            None => {}
        }
        if let Some(v) = self.float(p, "linear_start")? {
            c.beta_start = v;
        }
        if let Some(v) = self.float(p, "linear_end")? {
            c.beta_end = v;
        }
        if let Some(v) = self.int(p, "timesteps")? {
            c.num_train_timesteps = v;
        }
        Ok(())
    }
}

/// The latent-diffusion config of a model, in the layout of Stability's
/// `v2-inference-v.yaml` / `v1-inference.yaml`: what a single file needs beside
/// it when its shapes do not say everything (SD 2's v-prediction above all), for
/// AUTOMATIC1111 and for this program's loader alike.
pub fn ldm_config_yaml(unet: &UNetConfig, vae: &VaeConfig, scheduler: &SchedulerConfig, open_clip: bool) -> String {
    // A block-style YAML list under a key indented by `indent` spaces.
    let list = |v: &[i64], indent: usize| v.iter().map(|x| format!("\n{:indent$}- {x}", "")).collect::<String>();
    let per_block = |p: &PerBlock<i64>, n: usize| match p {
        PerBlock::One(v) => v.to_string(),
        PerBlock::Each(_) => format!("[{}]", (0..n).map(|i| p.at(i).to_string()).collect::<Vec<_>>().join(", ")),
    };
    let channels = &unet.block_out_channels;
    let levels = channels.len();
    let base = channels.first().copied().unwrap_or(320).max(1);
    let mult: Vec<i64> = channels.iter().map(|c| c / base).collect();
    let attention_levels: Vec<usize> = (0..levels).filter(|&i| unet.down_block_types.get(i).is_some_and(|t| t.starts_with("CrossAttn"))).collect();
    let resolutions: Vec<i64> = attention_levels.iter().map(|&i| 1i64 << i).collect();
    // diffusers' `attention_head_dim` counts heads (its SD 1/2 naming quirk); LDM gives a
    // head size (SD 2) or a head count (SD 1) for all levels.
    let heads: Vec<i64> = attention_levels.iter().map(|&i| unet.heads(i)).collect();
    let head_sizes: Vec<i64> = attention_levels.iter().zip(&heads).map(|(&i, h)| channels[i] / h.max(&1)).collect();
    let attention = if heads.windows(2).all(|w| w[0] == w[1]) && !heads.is_empty() {
        format!("num_heads: {}", heads[0])
    } else {
        format!("num_head_channels: {}", head_sizes.first().copied().unwrap_or(64))
    };
    let parameterization = match scheduler.prediction_type.as_str() {
        "v_prediction" => "v",
        "sample" => "x0",
        _ => "eps",
    };
    let vae_base = vae.block_out_channels.first().copied().unwrap_or(128).max(1);
    let vae_mult: Vec<i64> = vae.block_out_channels.iter().map(|c| c / vae_base).collect();
    let cond_stage = if open_clip {
        "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n      params:\n        freeze: true\n        layer: penultimate\n"
    } else {
        "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
    };
    format!(
        "# Written by dreambooth's export: the model's latent-diffusion config (its sampler\n\
         # settings and architecture), read by AUTOMATIC1111 beside the file of the same name.\n\
         model:\n  base_learning_rate: 1.0e-04\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n\
         \x20   parameterization: {parameterization}\n    linear_start: {}\n    linear_end: {}\n    num_timesteps_cond: 1\n\
         \x20   log_every_t: 200\n    timesteps: {}\n    first_stage_key: jpg\n    cond_stage_key: txt\n    image_size: {}\n\
         \x20   channels: {}\n    cond_stage_trainable: false\n    conditioning_key: crossattn\n    monitor: val/loss_simple_ema\n\
         \x20   scale_factor: {}\n    use_ema: false\n\
         \x20   unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n      params:\n\
         \x20       use_checkpoint: true\n        use_fp16: true\n        image_size: 32\n        in_channels: {}\n\
         \x20       out_channels: {}\n        model_channels: {base}\n        attention_resolutions:{}\n\
         \x20       num_res_blocks: {}\n        channel_mult:{}\n        {attention}\n        use_spatial_transformer: true\n\
         \x20       use_linear_in_transformer: {}\n        transformer_depth: {}\n        context_dim: {}\n        legacy: false\n\
         \x20   first_stage_config:\n      target: ldm.models.autoencoder.AutoencoderKL\n      params:\n        embed_dim: {}\n\
         \x20       monitor: val/rec_loss\n        ddconfig:\n          double_z: true\n          z_channels: {}\n\
         \x20         resolution: {}\n          in_channels: {}\n          out_ch: {}\n          ch: {vae_base}\n          ch_mult:{}\n\
         \x20         num_res_blocks: {}\n          attn_resolutions: []\n          dropout: 0.0\n\
         \x20       lossconfig:\n          target: torch.nn.Identity\n    cond_stage_config:\n{cond_stage}",
        scheduler.beta_start,
        scheduler.beta_end,
        scheduler.num_train_timesteps,
        unet.sample_size,
        unet.in_channels,
        vae.scaling_factor,
        unet.in_channels,
        unet.out_channels,
        list(&resolutions, 8),
        per_block(&unet.layers_per_block, levels),
        list(&mult, 8),
        unet.use_linear_projection,
        per_block(&unet.transformer_layers_per_block, levels),
        unet.cross_attention_dim.at(0),
        vae.latent_channels,
        vae.latent_channels,
        vae.sample_size,
        vae.in_channels,
        vae.out_channels,
        list(&vae_mult, 10),
        vae.layers_per_block,
    )
}
