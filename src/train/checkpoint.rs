//! Run checkpoints, `checkpoints/step-NNNNNN/`: the trained weights under
//! diffusers key names (`unet.safetensors`, `text_encoder.safetensors` when the
//! text encoder trains, `ema_unet.safetensors` with EMA; a LoRA run's adapters
//! as `lora.safetensors` with kohya keys instead) and everything needed to
//! continue bit for bit (`state.safetensors`: optimizer moments, generator
//! states, the epoch's data order; `state.json`: counters, loss scaler, data
//! position). Written into a temporary folder, fsynced, then renamed, so a crash
//! never leaves a half checkpoint under a `step-` name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::Tensor;

use crate::checkpoint::write::write_safetensors;
use crate::data::dataset::DataState;

/// The counters and small state of a checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub total_steps: u64,
    pub optimizer_step: u64,
    pub micro_batches: u64,
    pub data: DataState,
    /// (scale, growth_tracker) of the fp16 loss scaler.
    pub loss_scaler: Option<(f64, u64)>,
    pub ema_step: Option<u64>,
    /// The learning rate of the last step (informative).
    pub lr: f64,
    /// The micro-batch size `micro_batches` counts in (it changes when an
    /// out-of-memory splits the micro-batch); absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// The processes that trained it (data parallel); checkpoints from before say nothing: one.
    #[serde(default = "one_process")]
    pub world_size: usize,
}

fn one_process() -> usize {
    1
}

/// The adapters of a LoRA run's checkpoint (kohya keys), in place of the networks' weights.
pub const LORA_FILE: &str = "lora.safetensors";

/// An Imagic run's target and optimised embeddings.
pub const IMAGIC_FILE: &str = "imagic_embeddings.safetensors";

/// What a checkpoint holds, to write.
pub struct CheckpointContents<'a> {
    /// The UNet's weights (a full fine-tune; a LoRA run saves `lora` instead).
    pub unet: Option<Vec<(String, Tensor)>>,
    pub lora: Option<&'a crate::model::lora::LoraNetwork>,
    /// Each trained text encoder's weights, by its name (`text_encoder`, `text_encoder_2`).
    pub text_encoders: Vec<(&'static str, Vec<(String, Tensor)>)>,
    pub ema_unet: Option<Vec<(String, Tensor)>>,
    /// Imagic's (target, optimised) embeddings and target text.
    pub imagic: Option<(&'a Tensor, &'a Tensor, &'a str)>,
    /// Optimizer moments, generator states, data order.
    pub state_tensors: Vec<(String, Tensor)>,
    pub state: &'a TrainState,
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `checkpoints/step-NNNNNN` under `run_dir`; returns its path. An
/// existing checkpoint of the same step is kept as it is.
pub fn write_checkpoint(run_dir: &Path, c: &CheckpointContents) -> anyhow::Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = step_dir_name(c.state.step);
    let dest = root.join(&name);
    if dest.join("state.json").is_file() {
        return Ok(dest);
    }
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> anyhow::Result<()> {
        if let Some(unet) = &c.unet {
            write_safetensors(&tmp.join("unet.safetensors"), unet, None)?;
        }
        if let Some(lora) = c.lora {
            lora.save(&tmp.join(LORA_FILE), &Default::default())?;
        }
        for (name, te) in &c.text_encoders {
            write_safetensors(&tmp.join(format!("{name}.safetensors")), te, None)?;
        }
        if let Some((target, optimized, prompt)) = c.imagic {
            super::imagic::save_embeddings(&tmp.join(IMAGIC_FILE), target, optimized, prompt)?;
        }
        if let Some(ema) = &c.ema_unet {
            write_safetensors(&tmp.join("ema_unet.safetensors"), ema, None)?;
        }
        write_safetensors(&tmp.join("state.safetensors"), &c.state_tensors, None)?;
        let json = serde_json::to_string_pretty(c.state)?;
        let path = tmp.join("state.json");
        let mut f = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        std::io::Write::write_all(&mut f, json.as_bytes())?;
        f.sync_all()?;
        sync_dir(&tmp);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write the checkpoint {}", dest.display())));
    }
    if dest.exists() {
        // A leftover without state.json (cannot normally happen: renames are atomic).
        let _ = std::fs::remove_dir_all(&dest);
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("cannot move the checkpoint into place as {}", dest.display()))?;
    sync_dir(&root);
    Ok(dest)
}

/// Complete checkpoints of a run, oldest first: (step, folder).
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let root = run_dir.join("checkpoints");
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| {
                    let name = p.file_name()?.to_str()?.to_string();
                    let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
                    p.join("state.json").is_file().then_some((step, p))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The newest complete checkpoint, or the one of `step`.
pub fn find_checkpoint(run_dir: &Path, step: Option<u64>) -> anyhow::Result<(u64, PathBuf)> {
    let all = list_checkpoints(run_dir);
    match step {
        None => all.last().cloned().ok_or_else(|| {
            crate::error::usage(format!("{} has no complete checkpoint yet", run_dir.display()))
        }),
        Some(s) => all.iter().find(|(n, _)| *n == s).cloned().ok_or_else(|| {
            let have: Vec<String> = all.iter().map(|(n, _)| n.to_string()).collect();
            crate::error::usage(format!(
                "{} has no checkpoint of step {s} (it has: {})",
                run_dir.display(),
                if have.is_empty() { "none".into() } else { have.join(", ") }
            ))
        }),
    }
}

/// Deletes the oldest checkpoints beyond `keep` (0 keeps all).
pub fn prune_checkpoints(run_dir: &Path, keep: u32) {
    if keep == 0 {
        return;
    }
    let all = list_checkpoints(run_dir);
    let excess = all.len().saturating_sub(keep as usize);
    for (_, dir) in all.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn read_state(dir: &Path) -> anyhow::Result<TrainState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid training state", path.display()))
}

pub fn read_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    // Our reader checks the header against the file and says what is wrong
    // (truncated, not safetensors) in words.
    let file = crate::checkpoint::safetensors_file::SafetensorsFile::open(path)?;
    Ok(file.load_all().with_context(|| format!("cannot read {}", path.display()))?.into_iter().collect())
}

/// Copies saved values into live tensors of the same keys (shapes must agree).
pub fn load_into(params: &[(String, Tensor)], saved: &HashMap<String, Tensor>, what: &Path) -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    for (key, p) in params {
        let t = saved
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("{} has no tensor `{key}`", what.display()))?;
        if t.size() != p.size() {
            anyhow::bail!("{}: `{key}` has shape {:?}, the model has {:?}", what.display(), t.size(), p.size());
        }
        let mut p = p.shallow_clone();
        p.copy_(t);
    }
    Ok(())
}
