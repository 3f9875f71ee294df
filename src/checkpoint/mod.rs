//! Reading the model files people have — diffusers folders, LDM single files
//! (`.safetensors`, `.ckpt`) — into one structure with diffusers key names and
//! config structs. Tensors stay on the CPU in their stored dtype; the model
//! builder converts them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::Tensor;

use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::scheduler::config::SchedulerConfig;

pub mod ckpt;
pub mod diffusers;
pub mod export_diffusers;
pub mod ldm;
pub mod ldm_names;
pub mod ldm_yaml;
pub mod models;
pub mod pickle;
pub mod safetensors_file;
pub mod source;
pub mod to_ldm;
pub mod vae;
pub mod write;

pub use models::models_command;

use ldm::{Mapped, Transform};
use source::TensorSource;

/// Where the tokenizer's vocabulary comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// A diffusers `tokenizer/` folder (`vocab.json`, `merges.txt`, its special tokens).
    Folder(PathBuf),
    /// OpenAI's CLIP vocabulary with a pad token: `<|endoftext|>` (SD 1.x, SDXL's
    /// first encoder) or `!` (SD 2.x, SDXL's second).
    OpenAi { pad_token: String },
}

impl TokenizerSource {
    pub fn for_role(role: &TextEncoderRole) -> Self {
        TokenizerSource::OpenAi { pad_token: role.pad_token.into() }
    }
}

pub use crate::model::family::{Architecture, TextEncoderRole};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelFormat {
    Diffusers,
    SingleFileSafetensors,
    Ckpt,
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFormat::Diffusers => "diffusers",
            ModelFormat::SingleFileSafetensors => "safetensors",
            ModelFormat::Ckpt => "ckpt",
        })
    }
}

/// One text encoder of a model, with its tokenizer.
pub struct LoadedTextEncoder {
    pub role: TextEncoderRole,
    pub config: ClipConfig,
    pub tokenizer: TokenizerSource,
    /// transformers keys without the `text_model.` prefix (a projected encoder's
    /// `text_projection.weight` as it is).
    pub tensors: HashMap<String, Tensor>,
}

pub struct LoadedModel {
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// diffusers keys (`down_blocks.0.attentions.0...`)
    pub unet: HashMap<String, Tensor>,
    /// diffusers keys
    pub vae: HashMap<String, Tensor>,
    /// The family's text encoders, in its order (`Architecture::text_encoders`).
    pub text_encoders: Vec<LoadedTextEncoder>,
    /// SDXL's `force_zeros_for_empty_prompt` (`model_index.json`): an empty
    /// negative prompt conditions on zeros instead of its encoding.
    pub force_zeros_for_empty_prompt: bool,
    pub architecture: Architecture,
    pub source: PathBuf,
    pub format: ModelFormat,
}

impl LoadedModel {
    /// The text encoder of that name (`text_encoder`, `text_encoder_2`).
    pub fn text_encoder(&self, name: &str) -> Option<&LoadedTextEncoder> {
        self.text_encoders.iter().find(|t| t.role.name == name)
    }

    pub fn text_encoder_mut(&mut self, name: &str) -> Option<&mut LoadedTextEncoder> {
        self.text_encoders.iter_mut().find(|t| t.role.name == name)
    }
}

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModel")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("architecture", &self.architecture)
            .field("unet_tensors", &self.unet.len())
            .field("vae_tensors", &self.vae.len())
            .field("text_encoder_tensors", &self.text_encoders.iter().map(|t| t.tensors.len()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The noise schedule a single file gets when nothing says otherwise: diffusers'
/// default for single files (SD's PNDM config, `leading` spacing, epsilon).
/// SD 2's v-prediction can only come from a sidecar `.yaml` or `--model-config`.
pub fn single_file_scheduler() -> SchedulerConfig {
    SchedulerConfig { timestep_spacing: Some("leading".into()), ..SchedulerConfig::stable_diffusion() }
}

/// A single file's noise schedule when nothing says otherwise: SDXL base's
/// (`stabilityai/stable-diffusion-xl-base-1.0`'s `scheduler_config.json`:
/// Euler, SD's betas, `leading` spacing, epsilon), SD's otherwise.
pub fn single_file_scheduler_for(architecture: &Architecture) -> SchedulerConfig {
    match architecture {
        Architecture::Sdxl => SchedulerConfig {
            class_name: Some("EulerDiscreteScheduler".into()),
            interpolation_type: Some("linear".into()),
            use_karras_sigmas: Some(false),
            ..single_file_scheduler()
        },
        _ => single_file_scheduler(),
    }
}

/// The image size a model was made for (512 for SD 1.x and SD 2 base, 768 for
/// SD 2's v models, 1024 for SDXL), from what its config files state: a
/// diffusers folder's UNet and VAE configs, a single file's sidecar `.yaml`;
/// an SDXL single file (whose Stability-AI config states no size) is 1024.
/// None when nothing states it (a bare SD single file) or a config cannot be
/// read. Cheap: no weights.
pub fn native_resolution(source: &Path) -> Option<i64> {
    let (unet, vae) = if source.is_dir() {
        let configs = diffusers::read_configs(source).ok()?;
        (configs.unet?, configs.vae?)
    } else {
        let sdxl = format_of(source)
            .and_then(|format| open_single_file(source, format))
            .is_ok_and(|src| ldm::detect(src.as_ref()) == Architecture::Sdxl);
        if sdxl {
            return Some(Architecture::Sdxl.default_resolution());
        }
        let yaml = ldm_yaml::LdmYaml::read(&ldm_yaml::sidecar_path(source)).ok()?;
        let (mut unet, mut vae) = (UNetConfig::default(), VaeConfig::default());
        yaml.apply_unet(&mut unet).ok()?;
        yaml.apply_vae(&mut vae).ok()?;
        (unet, vae)
    };
    Some(unet.sample_size * vae.downsampling_factor()).filter(|&r| r > 0)
}

/// What kind of model file `path` is, from its contents (not only its name).
pub fn format_of(path: &Path) -> anyhow::Result<ModelFormat> {
    if path.is_dir() {
        return Ok(ModelFormat::Diffusers);
    }
    let mut head = [0u8; 4];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        f.read(&mut head).with_context(|| format!("cannot read {}", path.display()))?
    };
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    if n == 4 && head == *ckpt::ZIP_MAGIC {
        return Ok(ModelFormat::Ckpt);
    }
    match ext.as_str() {
        "safetensors" => Ok(ModelFormat::SingleFileSafetensors),
        "ckpt" | "pt" | "pth" | "bin" => Ok(ModelFormat::Ckpt),
        _ => bail!("{} is not a model file this program reads (.safetensors, .ckpt or a diffusers folder)", path.display()),
    }
}

/// Loads a diffusers folder, an LDM single file (`.safetensors` or `.ckpt`).
/// `model_config_dir` (a diffusers folder) overrides a single file's inferred configs.
pub fn load_model(path: &Path, model_config_dir: Option<&Path>) -> anyhow::Result<LoadedModel> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    match format_of(path)? {
        ModelFormat::Diffusers => diffusers::load(path, model_config_dir),
        format => load_single_file(path, format, model_config_dir),
    }
}

/// Opens a single file's tensor index.
pub fn open_single_file(path: &Path, format: ModelFormat) -> anyhow::Result<Box<dyn TensorSource>> {
    Ok(match format {
        ModelFormat::Ckpt => Box::new(ckpt::TorchZipFile::open(path)?),
        _ => Box::new(safetensors_file::SafetensorsFile::open(path)?),
    })
}

fn load_single_file(path: &Path, format: ModelFormat, model_config_dir: Option<&Path>) -> anyhow::Result<LoadedModel> {
    let shown = path.display();
    let src = open_single_file(path, format)?;
    let src = src.as_ref();
    let architecture = ldm::detect(src);
    if let Architecture::Unknown(what) = &architecture {
        bail!("{shown} is not a Stable Diffusion 1.x/2.x or SDXL checkpoint: {what}");
    }
    let roles = architecture.text_encoders();
    let layouts = ldm::text_layouts(&architecture);

    let overrides = match model_config_dir {
        Some(dir) => Some(diffusers::read_override_configs(dir)?),
        None => None,
    };
    let fully_given = overrides
        .as_ref()
        .is_some_and(|o| o.unet.is_some() && o.vae.is_some() && roles.iter().all(|r| given_text(o, r.name).0.is_some()));
    let inferred = match ldm::infer(src, &architecture) {
        Ok(i) => Some(i),
        // Shapes that break the family's conventions are fine when the configs are given.
        Err(_) if fully_given => None,
        Err(e) => return Err(e.context(format!("cannot infer the architecture of {shown}; give --model-config"))),
    };
    let (mut unet_config, mut vae_config) = match &inferred {
        Some(i) => (i.unet.clone(), i.vae.clone()),
        None => Default::default(),
    };
    let mut text_configs: Vec<ClipConfig> = match &inferred {
        Some(i) => i.text_encoders().into_iter().cloned().collect(),
        None => vec![ClipConfig::default(); roles.len()],
    };
    let mut scheduler_config = single_file_scheduler_for(&architecture);
    let mut tokenizers: Vec<TokenizerSource> = roles.iter().map(TokenizerSource::for_role).collect();

    let sidecar = ldm_yaml::sidecar_path(path);
    if sidecar.is_file() {
        let yaml = ldm_yaml::LdmYaml::read(&sidecar)?;
        yaml.apply_unet(&mut unet_config)?;
        yaml.apply_vae(&mut vae_config)?;
        // The latent-diffusion `cond_stage_config` describes SD 1.x/2.x's one encoder.
        if let (Some(i), false) = (&inferred, architecture == Architecture::Sdxl) {
            yaml.apply_text(&mut text_configs[0], i.stored_text_layers);
        }
        yaml.apply_scheduler(&mut scheduler_config)?;
    }
    let mut force_zeros_for_empty_prompt = architecture == Architecture::Sdxl;
    if let Some(o) = overrides {
        for (i, role) in roles.iter().enumerate() {
            let (config, tokenizer) = given_text(&o, role.name);
            if let Some(c) = config {
                text_configs[i] = c.clone();
            }
            if let Some(t) = tokenizer {
                tokenizers[i] = TokenizerSource::Folder(t.clone());
            }
        }
        unet_config = o.unet.unwrap_or(unet_config);
        vae_config = o.vae.unwrap_or(vae_config);
        scheduler_config = o.scheduler.unwrap_or(scheduler_config);
        force_zeros_for_empty_prompt = o.force_zeros_for_empty_prompt.unwrap_or(force_zeros_for_empty_prompt);
    }

    let unet = materialize(src, &ldm::unet_plan(src)?)?;
    let vae = materialize(src, &ldm::vae_plan(src)?)?;
    let mut text_encoders = Vec::with_capacity(roles.len());
    for ((role, layout), (config, tokenizer)) in roles.iter().zip(layouts).zip(text_configs.into_iter().zip(tokenizers)) {
        let tensors = materialize(src, &ldm::text_plan(src, *layout, config.num_hidden_layers)?)?;
        text_encoders.push(LoadedTextEncoder { role: *role, config, tokenizer, tensors });
    }
    Ok(LoadedModel {
        unet_config,
        vae_config,
        scheduler_config,
        unet,
        vae,
        text_encoders,
        force_zeros_for_empty_prompt,
        architecture,
        source: path.to_path_buf(),
        format,
    })
}

/// The config and tokenizer folder `--model-config` gives the text encoder called `name`.
fn given_text<'a>(o: &'a diffusers::FolderConfigs, name: &str) -> (Option<&'a ClipConfig>, Option<&'a PathBuf>) {
    match name {
        "text_encoder_2" => (o.text_2.as_ref(), o.tokenizer_2.as_ref()),
        _ => (o.text.as_ref(), o.tokenizer.as_ref()),
    }
}

/// Reads the planned tensors, each stored tensor once.
pub(super) fn materialize(src: &dyn TensorSource, plan: &[Mapped]) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut order: Vec<&Mapped> = plan.iter().collect();
    order.sort_by(|a, b| a.source.cmp(&b.source));
    let mut out = HashMap::with_capacity(plan.len());
    let mut last: Option<(&str, Tensor)> = None;
    for m in order {
        let t = match &last {
            Some((key, t)) if *key == m.source => t.shallow_clone(),
            _ => {
                let t = src.load(&m.source)?;
                last = Some((m.source.as_str(), t.shallow_clone()));
                t
            }
        };
        let bad = |why: &str| anyhow::anyhow!("tensor `{}` of {} {why}", m.source, src.path().display());
        let t = match m.transform {
            Transform::Same => t,
            Transform::Conv1x1ToLinear => match t.size().as_slice() {
                [o, i, 1, 1] => t.reshape([*o, *i]),
                _ => return Err(bad("is not a 1×1 convolution")),
            },
            Transform::Transpose => match t.size().as_slice() {
                [_, _] => t.tr().contiguous(),
                _ => return Err(bad("is not a matrix")),
            },
            Transform::ThirdOf(part) => {
                let n = t.size().first().copied().unwrap_or(0);
                if n % 3 != 0 {
                    return Err(bad("cannot be split into q, k and v"));
                }
                t.narrow(0, part * (n / 3), n / 3).copy()
            }
        };
        if out.insert(m.target.clone(), t).is_some() {
            bail!("{} maps two tensors to `{}`", src.path().display(), m.target);
        }
    }
    Ok(out)
}
