//! PyTorch checkpoints (`.ckpt`, `.pt`, `.bin`) in the zip format `torch.save` has
//! written since 1.6: `<name>/data.pkl` (the object, a pickle) and
//! `<name>/data/<key>` (each storage's raw bytes). The pickle is read by our
//! restricted reader ([`super::pickle`]), which runs nothing from the file.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::{Device, Tensor};
use zip::ZipArchive;

use super::pickle::{self, PickleError, TensorRef, Value};
use super::source::{element_size, numel, tensor_from_bytes, TensorInfo, TensorSource};

pub struct TorchZipFile {
    path: PathBuf,
    archive: RefCell<ZipArchive<File>>,
    /// `<name>/`: the folder inside the archive that holds `data.pkl`.
    prefix: String,
    index: BTreeMap<String, TensorInfo>,
    tensors: BTreeMap<String, TensorRef>,
}

/// The first bytes of a zip archive.
pub const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

#[derive(Debug, thiserror::Error)]
#[error("{path} refuses to load: {source}")]
pub struct RefusedPickle {
    pub path: String,
    #[source]
    pub source: PickleError,
}

impl TorchZipFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        let mut file = File::open(path).with_context(|| format!("cannot open {shown}"))?;
        let mut head = [0u8; 4];
        let got = file.read(&mut head).with_context(|| format!("cannot read {shown}"))?;
        if got < 4 || head != ZIP_MAGIC {
            if got >= 2 && head[0] == 0x80 && head[1] <= 5 {
                bail!(
                    "{shown} is a legacy (pre-1.6) PyTorch file, which is not supported: re-save it with a newer torch \
                     (torch.save(torch.load(f), f2)) or convert it to .safetensors"
                );
            }
            bail!("{shown} is not a PyTorch checkpoint (not a zip archive)");
        }
        let file = File::open(path).with_context(|| format!("cannot open {shown}"))?;
        let mut archive =
            ZipArchive::new(file).map_err(|e| anyhow::anyhow!("{shown} is not a valid PyTorch checkpoint ({e})"))?;

        let pkl_name = archive
            .file_names()
            .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .min_by_key(|n| n.len())
            .map(str::to_string)
            .with_context(|| format!("{shown} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)"))?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();

        if let Some(order) = read_entry(&mut archive, &format!("{prefix}byteorder")).ok() {
            if order.trim_ascii() != b"little" {
                bail!("{shown} stores big-endian tensors, which are not supported");
            }
        }
        let pkl = read_entry(&mut archive, &pkl_name)
            .map_err(|e| anyhow::anyhow!("{shown} is not a valid PyTorch checkpoint ({e})"))?;
        let root = pickle::read(&pkl).map_err(|source| RefusedPickle { path: shown.to_string(), source })?;

        let mut tensors = BTreeMap::new();
        collect_tensors(state_dict(&root), &mut tensors);
        let mut storage_bytes: HashMap<String, u64> = HashMap::new();
        let mut index = BTreeMap::new();
        for (key, t) in &tensors {
            let bytes = match storage_bytes.get(&t.storage.key) {
                Some(b) => *b,
                None => {
                    let name = format!("{prefix}data/{}", t.storage.key);
                    let size = archive.by_name(&name).map(|f| f.size()).map_err(|_| {
                        anyhow::anyhow!("{shown} is not a valid PyTorch checkpoint (tensor `{key}` has no data entry)")
                    })?;
                    storage_bytes.insert(t.storage.key.clone(), size);
                    size
                }
            };
            check_bounds(t, bytes).map_err(|why| {
                anyhow::anyhow!("{shown} is not a valid PyTorch checkpoint (tensor `{key}` {why})")
            })?;
            index.insert(key.clone(), TensorInfo { shape: t.size.clone(), kind: t.storage.kind });
        }
        Ok(TorchZipFile { path: path.to_path_buf(), archive: RefCell::new(archive), prefix, index, tensors })
    }
}

fn read_entry(archive: &mut ZipArchive<File>, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut f = archive.by_name(name)?;
    let mut buf = Vec::with_capacity(f.size().min(1 << 32) as usize);
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// `torch.save(model.state_dict())` stores the dict itself; Lightning and the original
/// Stable Diffusion code store `{"state_dict": {...}, "global_step": ..., ...}`.
fn state_dict(root: &Value) -> &Value {
    if let Value::Dict(d) = root {
        for (k, v) in d.iter() {
            if matches!(k, Value::Str(s) if s == "state_dict") && matches!(v, Value::Dict(_)) {
                return v;
            }
        }
    }
    root
}

/// The dict's tensor entries; anything else (`global_step`, callbacks, `_metadata`) is skipped.
fn collect_tensors(dict: &Value, out: &mut BTreeMap<String, TensorRef>) {
    if let Value::Dict(d) = dict {
        for (k, v) in d.iter() {
            if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
                out.insert(name.clone(), t.clone());
            }
        }
    }
}

/// The tensor's elements must lie inside its storage.
fn check_bounds(t: &TensorRef, storage_bytes: u64) -> Result<(), String> {
    let elements = storage_bytes / element_size(t.storage.kind) as u64;
    if t.offset < 0 || t.size.iter().any(|&s| s < 0) || t.stride.iter().any(|&s| s < 0) {
        return Err("has a negative size, stride or offset".into());
    }
    if numel(&t.size).is_none() {
        return Err("has a shape that overflows".into());
    }
    if t.size.iter().any(|&s| s == 0) {
        return Ok(());
    }
    let mut last = t.offset as i128;
    for (&s, &st) in t.size.iter().zip(&t.stride) {
        last += (s as i128 - 1) * st as i128;
    }
    if last >= elements as i128 {
        return Err(format!("reaches element {last} of a storage of {elements}"));
    }
    Ok(())
}

impl TensorSource for TorchZipFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn index(&self) -> &BTreeMap<String, TensorInfo> {
        &self.index
    }

    fn load(&self, key: &str) -> anyhow::Result<Tensor> {
        let shown = self.path.display();
        let t = self.tensors.get(key).with_context(|| format!("{shown} has no tensor `{key}`"))?;
        let name = format!("{}data/{}", self.prefix, t.storage.key);
        let bytes = read_entry(&mut self.archive.borrow_mut(), &name)
            .with_context(|| format!("cannot read tensor `{key}` of {shown}"))?;
        let elements = bytes.len() / element_size(t.storage.kind);
        let storage = tensor_from_bytes(&bytes[..elements * element_size(t.storage.kind)], &[elements as i64], t.storage.kind)?;
        drop(bytes);
        let whole = t.offset == 0 && numel(&t.size) == Some(elements) && is_contiguous(&t.size, &t.stride);
        if whole {
            Ok(storage.f_view(t.size.as_slice())?)
        } else {
            // A view into a larger (maybe shared) storage: copy it out so the tensor owns
            // exactly its own memory.
            let view = storage.f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?;
            let mut owned = Tensor::f_empty(t.size.as_slice(), (t.storage.kind, Device::Cpu))?;
            owned.f_copy_(&view)?;
            Ok(owned)
        }
    }
}

fn is_contiguous(size: &[i64], stride: &[i64]) -> bool {
    let mut expected = 1i64;
    for (&s, &st) in size.iter().zip(stride).rev() {
        if s != 1 && st != expected {
            return false;
        }
        expected = expected.saturating_mul(s);
    }
    true
}
