//! A file of named tensors whose names and shapes can be read before any data:
//! architecture inference and key mapping look at the index, and only the
//! tensors a model needs are then read (an LDM file's EMA copy never is).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

/// Name-independent facts about one stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub shape: Vec<i64>,
    pub kind: Kind,
}

pub trait TensorSource {
    /// The file, for error messages.
    fn path(&self) -> &Path;
    /// Every tensor in the file, by key.
    fn index(&self) -> &BTreeMap<String, TensorInfo>;
    /// Reads one tensor (CPU, its stored dtype, owning its memory).
    fn load(&self, key: &str) -> anyhow::Result<Tensor>;

    fn shape(&self, key: &str) -> Option<&[i64]> {
        self.index().get(key).map(|i| i.shape.as_slice())
    }

    fn has(&self, key: &str) -> bool {
        self.index().contains_key(key)
    }
}

/// Bytes per element of the dtypes checkpoints store.
pub fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Bool | Kind::Uint8 | Kind::Int8 => 1,
        Kind::Int16 | Kind::Half | Kind::BFloat16 => 2,
        Kind::Int | Kind::Float => 4,
        Kind::Int64 | Kind::Double => 8,
        _ => 8,
    }
}

/// Number of elements of a shape, or `None` when a size is negative or the product overflows.
pub fn numel(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
}

/// An owned CPU tensor from little-endian bytes (the caller checked the length).
pub fn tensor_from_bytes(bytes: &[u8], shape: &[i64], kind: Kind) -> anyhow::Result<Tensor> {
    Ok(Tensor::f_from_data_size(bytes, shape, kind)?)
}
