//! `dreambooth export`: a run checkpoint's trained weights (the EMA UNet when
//! the run kept one) merged over the source model, written as a diffusers folder
//! or, for runs whose source is an LDM single file, as an LDM `.safetensors` with
//! the source file's own key layout (each trained tensor put back under the LDM
//! key it was read from); a run over a diffusers folder exports to the standard
//! SD layout (`checkpoint/to_ldm.rs`). A LoRA run exports its kohya file as it is (`lora`)
//! or merged into the source model (`diffusers`, `ldm`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use super::checkpoint::{find_checkpoint, read_tensors, LORA_FILE};
use crate::checkpoint::export_diffusers::write_diffusers_folder;
use crate::checkpoint::ldm::{self, Transform};
use crate::checkpoint::safetensors_file::SafetensorsFile;
use crate::checkpoint::write::write_safetensors;
use crate::checkpoint::{format_of, load_model, open_single_file, LoadedModel, ModelFormat};
use crate::config::RunConfig;
use crate::error::usage;
use crate::model::attention::AttentionBackend;
use crate::pipeline::StableDiffusion;

type TensorMap = HashMap<String, Tensor>;

/// What a checkpoint trained, by diffusers key: the UNet (EMA when present) and
/// each text encoder that trained, by the encoder's name.
struct TrainedWeights {
    unet: TensorMap,
    text_encoders: Vec<(String, TensorMap)>,
}

/// The trained weights of a checkpoint. A LoRA run's adapters are merged
/// (strength 1) into the source model's UNet and text encoders, which are
/// returned whole.
fn trained_weights(config: &RunConfig, dir: &Path) -> anyhow::Result<TrainedWeights> {
    let lora = dir.join(LORA_FILE);
    let map = |v: Vec<(String, Tensor)>| v.into_iter().collect::<HashMap<_, _>>();
    if config.training.use_lora {
        let loaded = load_model(&config.source_checkpoint, None)?;
        let (mut sd, params) =
            StableDiffusion::from_loaded_with_parameters(loaded, Device::Cpu, Kind::Float, AttentionBackend::Default)?;
        sd.merge_lora(&lora, 1.0)?;
        let text_encoders = params.text_encoders.into_iter().map(|(name, v)| (name.to_string(), map(v))).collect();
        return Ok(TrainedWeights { unet: map(params.unet), text_encoders });
    }
    let ema = dir.join("ema_unet.safetensors");
    let unet = if ema.is_file() { read_tensors(&ema)? } else { read_tensors(&dir.join("unet.safetensors"))? };
    let mut text_encoders = Vec::new();
    for role in crate::checkpoint::Architecture::all_text_encoder_names() {
        let file = dir.join(format!("{role}.safetensors"));
        if file.is_file() {
            text_encoders.push((role.to_string(), read_tensors(&file)?));
        }
    }
    Ok(TrainedWeights { unet, text_encoders })
}

/// The run's config (from its `config.yaml`).
fn run_config(run_dir: &Path) -> anyhow::Result<RunConfig> {
    crate::run::require_run_dir(run_dir)?;
    crate::config::load_run_config(&run_dir.join("config.yaml"))
}

/// Whether `path` is a run directory (what `generate --model` treats as one).
pub fn is_run_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.yaml").is_file() && path.join("checkpoints").is_dir()
}

/// The source model of a run with a checkpoint's trained weights in place (the
/// newest complete one, or `step`'s): what export writes and `generate --model
/// RUN_DIR` samples from.
pub fn load_run_model(run_dir: &Path, step: Option<u64>) -> anyhow::Result<LoadedModel> {
    let config = run_config(run_dir)?;
    let (_, dir) = find_checkpoint(run_dir, step)?;
    let trained = trained_weights(&config, &dir)?;
    let mut m = crate::checkpoint::vae::load_model_with_vae(&config.source_checkpoint, config.vae.as_deref())?;
    merge_into(&mut m.unet, trained.unet, "UNet")?;
    for (name, t) in trained.text_encoders {
        let Some(base) = m.text_encoder_mut(&name) else {
            anyhow::bail!("the checkpoint has a {name}, which the source model does not");
        };
        merge_into(&mut base.tensors, t, &name.replace('_', " "))?;
    }
    Ok(m)
}

/// `half`: float tensors are written as float16 (integer buffers stay as they are).
pub fn export(run_dir: &Path, format: &str, out: &Path, step: Option<u64>, half: bool) -> anyhow::Result<PathBuf> {
    if !matches!(format, "diffusers" | "ldm" | "lora") {
        return Err(usage(format!("--format {format} is not one of ldm, diffusers, lora")));
    }
    let config = run_config(run_dir)?;
    for warning in crate::run::source::changed_since_start(run_dir, &config) {
        eprintln!("warning: {warning}");
    }
    if format == "lora" && !config.training.use_lora {
        return Err(usage(format!(
            "{} is a full fine-tune; --format lora needs a run trained with use_lora (export it as diffusers or ldm)",
            run_dir.display()
        )));
    }
    if out.exists() {
        return Err(usage(format!("{} already exists; choose a new path", out.display())));
    }
    // The files are safetensors: a `.ckpt` name would make AUTOMATIC1111 unpickle them.
    let single_file = matches!(format, "ldm" | "lora");
    if single_file && !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        return Err(usage(format!(
            "--out {}: --format {format} writes a safetensors file; give a name ending in .safetensors",
            out.display()
        )));
    }
    // A single file's config sidecar (`out.yaml`) is written beside it when the model needs one;
    // a file of that name is refused only then (people keep their run config under it).
    let sidecar = crate::checkpoint::ldm_yaml::sidecar_path(out);
    if format == "ldm" && sidecar.exists() && ldm_export_writes_sidecar(&config)? {
        return Err(usage(format!(
            "{} already exists, and this model's exported file needs its config there (AUTOMATIC1111 reads it); \
             give --out another name, or move that file",
            sidecar.display()
        )));
    }
    let (_, dir) = find_checkpoint(run_dir, step)?;
    match format {
        "lora" => {
            create_parent(out)?;
            let from = dir.join(LORA_FILE);
            if half {
                let file = SafetensorsFile::open(&from)?;
                let list = to_half(file.load_all()?.into_iter().collect());
                write_safetensors(out, &list, Some(&file.metadata()))?;
            } else {
                std::fs::copy(&from, out)
                    .with_context(|| format!("cannot copy {} to {}", from.display(), out.display()))?;
            }
        }
        "diffusers" => {
            let mut m = load_run_model(run_dir, step)?;
            if half {
                let texts = m.text_encoders.iter_mut().map(|t| &mut t.tensors);
                for part in [&mut m.unet, &mut m.vae].into_iter().chain(texts) {
                    *part = to_half(part.drain().collect()).into_iter().collect();
                }
            }
            export_diffusers(m, out)?
        }
        _ if format_of(&config.source_checkpoint)? == ModelFormat::Diffusers => {
            // No LDM file to take the layout from: the standard SD layout, written whole.
            let model = load_run_model(run_dir, step)?;
            let list = crate::checkpoint::to_ldm::to_ldm(&model)?;
            create_parent(out)?;
            write_safetensors(out, &if half { to_half(list) } else { list }, None)?;
            // SD 2 (v-prediction above all) cannot be told from a single file's tensors.
            let sd2 = model.architecture == crate::checkpoint::Architecture::Sd2;
            if ldm_export_writes_sidecar(&config)? {
                let yaml = crate::checkpoint::ldm_yaml::ldm_config_yaml(
                    &model.unet_config,
                    &model.vae_config,
                    &model.scheduler_config,
                    sd2,
                );
                std::fs::write(&sidecar, yaml).with_context(|| format!("cannot write {}", sidecar.display()))?;
            }
        }
        _ => {
            let trained = trained_weights(&config, &dir)?;
            // The run's own VAE, when it had one, replaces the file's.
            let vae = config.vae.as_deref().map(|v| crate::checkpoint::vae::load_vae(v, &Default::default())).transpose()?;
            export_ldm(&config.source_checkpoint, trained, vae.map(|(_, t)| t), out, half)?;
            // The source's own config goes with the copy of its layout.
            let source_sidecar = crate::checkpoint::ldm_yaml::sidecar_path(&config.source_checkpoint);
            if source_sidecar.is_file() {
                std::fs::copy(&source_sidecar, &sidecar)
                    .with_context(|| format!("cannot copy {} to {}", source_sidecar.display(), sidecar.display()))?;
            }
        }
    }
    Ok(out.to_path_buf())
}

/// Whether `export --format ldm` of a run writes a config sidecar beside the file:
/// over a single file, when the source has one (it is copied); over a diffusers
/// folder, for SD 2 and any SD 1.x/2.x model not predicting epsilon, whose
/// schedule a single file's tensors cannot say. SDXL's LDM config format is
/// another (sgm), which is not written: an SDXL export carries none.
fn ldm_export_writes_sidecar(config: &RunConfig) -> anyhow::Result<bool> {
    let source = &config.source_checkpoint;
    if format_of(source)? != ModelFormat::Diffusers {
        return Ok(crate::checkpoint::ldm_yaml::sidecar_path(source).is_file());
    }
    let configs = crate::checkpoint::diffusers::read_configs(source)?;
    let (Some(unet), Some(text)) = (&configs.unet, &configs.text) else { return Ok(false) };
    let arch = crate::checkpoint::diffusers::architecture_of(source, unet, text);
    let v_prediction = configs.scheduler.as_ref().is_some_and(|s| s.prediction_type != "epsilon");
    Ok(match arch {
        crate::checkpoint::Architecture::Sd2 => true,
        crate::checkpoint::Architecture::Sd1 => v_prediction,
        _ => false,
    })
}

fn merge_into(base: &mut HashMap<String, Tensor>, trained: HashMap<String, Tensor>, what: &str) -> anyhow::Result<()> {
    for (k, t) in trained {
        let Some(old) = base.get(&k) else {
            anyhow::bail!("the checkpoint's {what} has `{k}`, which the source model does not");
        };
        let t = t.to_kind(old.kind());
        base.insert(k, t);
    }
    Ok(())
}

fn export_diffusers(m: LoadedModel, out: &Path) -> anyhow::Result<()> {
    write_diffusers_folder(out, &m)
}

/// Float tensors as float16; integer buffers (`position_ids`) unchanged.
fn to_half(list: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    list.into_iter()
        .map(|(k, t)| {
            let t = if t.is_floating_point() { t.to_kind(Kind::Half) } else { t };
            (k, t)
        })
        .collect()
}

fn export_ldm(
    source: &Path,
    trained: TrainedWeights,
    vae: Option<HashMap<String, Tensor>>,
    out: &Path,
    half: bool,
) -> anyhow::Result<()> {
    let format = format_of(source)?;
    let src = open_single_file(source, format)?;
    let src = src.as_ref();
    let arch = ldm::detect(src);
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for key in src.index().keys() {
        tensors.insert(key.clone(), src.load(key)?);
    }
    // The run's own VAE replaces every VAE tensor of the file, each with one of its shape.
    let vae_plan = match &vae {
        None => None,
        Some(vae) => {
            let plan = ldm::vae_plan(src)?;
            for m in &plan {
                let fits = vae.get(&m.target).is_some_and(|t| t.numel() == tensors.get(&m.source).map_or(0, Tensor::numel));
                if !fits {
                    return Err(usage(format!(
                        "the run's VAE does not fit {}'s VAE layout (`{}`); export it with --format diffusers",
                        source.display(),
                        m.source
                    )));
                }
            }
            Some(plan)
        }
    };
    let mut put = |plan: Vec<ldm::Mapped>, trained: &HashMap<String, Tensor>| -> anyhow::Result<()> {
        // OpenCLIP's fused in_proj: q, k, v parts concatenated back in order.
        let mut fused: BTreeMap<String, Vec<(i64, Tensor)>> = BTreeMap::new();
        for m in plan {
            let Some(t) = trained.get(&m.target) else { continue };
            let kind = tensors.get(&m.source).map(|o| o.kind()).unwrap_or(t.kind());
            match m.transform {
                Transform::Same => {
                    tensors.insert(m.source.clone(), t.to_kind(kind));
                }
                Transform::Conv1x1ToLinear => {
                    let s = t.size();
                    tensors.insert(m.source.clone(), t.reshape([s[0], s[1], 1, 1]).to_kind(kind));
                }
                Transform::Transpose => {
                    tensors.insert(m.source.clone(), t.tr().contiguous().to_kind(kind));
                }
                Transform::ThirdOf(part) => fused.entry(m.source.clone()).or_default().push((part, t.to_kind(kind))),
            }
        }
        for (key, mut parts) in fused {
            parts.sort_by_key(|(p, _)| *p);
            if parts.len() == 3 {
                let list: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
                tensors.insert(key, Tensor::cat(&list, 0));
            }
        }
        Ok(())
    };
    if let (Some(vae), Some(plan)) = (&vae, vae_plan) {
        put(plan, vae)?;
    }
    put(ldm::unet_plan(src)?, &trained.unet)?;
    // Each trained encoder goes back where the file keeps it (SDXL's second in OpenCLIP's layout).
    let layouts = arch.text_encoders().iter().map(|role| role.name).zip(ldm::text_layouts(&arch));
    let layouts: HashMap<&str, ldm::TextLayout> = layouts.map(|(name, layout)| (name, *layout)).collect();
    for (name, text) in &trained.text_encoders {
        let Some(layout) = layouts.get(name.as_str()) else {
            anyhow::bail!("the checkpoint has a trained {name}, which {} does not have", source.display());
        };
        let layers = text.keys().filter(|k| k.ends_with("self_attn.q_proj.weight")).count() as i64;
        put(ldm::text_plan(src, *layout, layers)?, text)?;
    }
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let list = if half { to_half(list) } else { list };
    create_parent(out)?;
    write_safetensors(out, &list, None)
}

fn create_parent(out: &Path) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| usage(format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(())
}
