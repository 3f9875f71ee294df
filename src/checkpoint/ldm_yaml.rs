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
