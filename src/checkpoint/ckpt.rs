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

        if let Ok(order) = read_entry(&mut archive, &format!("{prefix}byteorder")) {
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
    if t.size.contains(&0) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Protocol-2 pickle pieces, as `torch.save` writes them.
    fn s(out: &mut Vec<u8>, text: &str) {
        out.push(b'X');
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }

    fn int_tuple(out: &mut Vec<u8>, v: &[i64]) {
        out.push(b'(');
        for &i in v {
            out.push(b'J');
            out.extend_from_slice(&(i as i32).to_le_bytes());
        }
        out.push(b't');
    }

    fn tensor(out: &mut Vec<u8>, storage: &str, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) {
        out.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        out.push(b'(');
        s(out, "storage");
        out.extend_from_slice(format!("ctorch\n{storage}\n").as_bytes());
        s(out, key);
        s(out, "cpu");
        out.push(b'J');
        out.extend_from_slice(&(numel as i32).to_le_bytes());
        out.extend_from_slice(b"tQ");
        out.push(b'J');
        out.extend_from_slice(&(offset as i32).to_le_bytes());
        int_tuple(out, size);
        int_tuple(out, stride);
        out.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    }

    fn write_ckpt(path: &Path, pkl: &[u8], storages: &[(&str, Vec<u8>)]) {
        let mut z = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pkl).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(b"little").unwrap();
        for (key, bytes) in storages {
            z.start_file(format!("archive/data/{key}"), opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }

    #[test]
    fn views_offsets_and_strides_are_honoured() {
        let mut p = vec![0x80, 2, b'}', b'('];
        s(&mut p, "state_dict");
        p.extend_from_slice(b"}(");
        s(&mut p, "view");
        // storage 0..6 as f32; offset 1, size [2, 2], stride [1, 2] -> [[1, 3], [2, 4]]
        tensor(&mut p, "FloatStorage", "0", 6, 1, &[2, 2], &[1, 2]);
        s(&mut p, "whole");
        tensor(&mut p, "LongStorage", "1", 3, 0, &[3], &[1]);
        s(&mut p, "global_step");
        p.extend_from_slice(b"K\x05u");
        s(&mut p, "epoch");
        p.extend_from_slice(b"K\x01u.");
        let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let longs: Vec<u8> = [7i64, -8, 9].iter().flat_map(|i| i.to_le_bytes()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.ckpt");
        write_ckpt(&path, &p, &[("0", floats), ("1", longs)]);

        let f = TorchZipFile::open(&path).unwrap();
        assert_eq!(f.index().keys().collect::<Vec<_>>(), ["view", "whole"]);
        let view = f.load("view").unwrap();
        assert_eq!(Vec::<f32>::try_from(view.flatten(0, -1)).unwrap(), [1.0, 3.0, 2.0, 4.0]);
        assert_eq!(Vec::<i64>::try_from(f.load("whole").unwrap()).unwrap(), [7, -8, 9]);
    }

    #[test]
    fn a_tensor_outside_its_storage_is_refused() {
        let mut p = vec![0x80, 2, b'}', b'('];
        s(&mut p, "bad");
        tensor(&mut p, "FloatStorage", "0", 4, 2, &[4], &[1]);
        p.extend_from_slice(b"u.");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.ckpt");
        write_ckpt(&path, &p, &[("0", vec![0u8; 16])]);
        let e = TorchZipFile::open(&path).err().expect("out-of-bounds tensor accepted").to_string();
        assert!(e.contains("bad.ckpt is not a valid PyTorch checkpoint (tensor `bad` reaches element 5"), "{e}");
    }
}
