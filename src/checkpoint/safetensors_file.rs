//! `.safetensors` files, memory-mapped: the header is checked once (offsets
//! inside the file, sizes matching shapes), then tensors are copied out on demand.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensorError};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use super::source::{tensor_from_bytes, TensorInfo, TensorSource};

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    index: BTreeMap<String, TensorInfo>,
    /// Byte range of each tensor's data within the file.
    ranges: BTreeMap<String, (usize, usize)>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
        if len < 8 {
            bail!("{} is not a valid safetensors file (it is only {len} bytes long)", path.display());
        }
        // SAFETY: the map is read-only; like every safetensors reader we assume the file
        // is not truncated by another process while we read it.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {} into memory", path.display()))?;
        let (index, ranges) = read_index(&mmap)
            .map_err(|why| anyhow::anyhow!("{} is not a valid safetensors file ({why})", path.display()))?;
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, index, ranges })
    }

    /// The header's `__metadata__` strings (empty when absent or unreadable).
    pub fn metadata(&self) -> BTreeMap<String, String> {
        SafeTensors::read_metadata(&self.mmap)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default()
    }

    /// Reads every tensor.
    pub fn load_all(&self) -> anyhow::Result<BTreeMap<String, Tensor>> {
        self.index.keys().map(|k| Ok((k.clone(), self.load(k)?))).collect()
    }
}

type Index = (BTreeMap<String, TensorInfo>, BTreeMap<String, (usize, usize)>);

/// The header's tensors, or why the file cannot be read.
fn read_index(bytes: &[u8]) -> Result<Index, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| describe(&e))?;
    let base = bytes.as_ptr() as usize;
    let mut index = BTreeMap::new();
    let mut ranges = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| format!("tensor `{name}` has dtype {:?}, which is not supported", view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let start = view.data().as_ptr() as usize - base;
        ranges.insert(name.clone(), (start, start + view.data().len()));
        index.insert(name, TensorInfo { shape, kind });
    }
    Ok((index, ranges))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The library's error in words a user can act on.
fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
            "its header length does not fit the file: truncated or not safetensors".into()
        }
        SafeTensorError::HeaderTooLarge => "its header length is implausibly large: not safetensors".into(),
        SafeTensorError::InvalidHeader
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization
        | SafeTensorError::JsonError(_) => "its header is not valid JSON".into(),
        SafeTensorError::MetadataIncompleteBuffer => "the file is shorter or longer than its header says: truncated?".into(),
        SafeTensorError::InvalidOffset(name) => format!("tensor `{name}` has data offsets outside the file"),
        SafeTensorError::TensorInvalidInfo | SafeTensorError::InvalidTensorView(..) => {
            "a tensor's size does not match its shape and dtype".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        SafeTensorError::TensorNotFound(name) => format!("tensor `{name}` is missing"),
        SafeTensorError::IoError(e) => e.to_string(),
    }
}

impl TensorSource for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn index(&self) -> &BTreeMap<String, TensorInfo> {
        &self.index
    }

    fn load(&self, key: &str) -> anyhow::Result<Tensor> {
        let (info, (start, end)) = match (self.index.get(key), self.ranges.get(key)) {
            (Some(i), Some(r)) => (i, *r),
            _ => bail!("{} has no tensor `{key}`", self.path.display()),
        };
        tensor_from_bytes(&self.mmap[start..end], &info.shape, info.kind)
            .with_context(|| format!("cannot read tensor `{key}` of {}", self.path.display()))
    }
}
