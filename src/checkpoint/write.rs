//! Writing `.safetensors` files safely: streamed tensor by tensor (no second
//! copy of a multi-GB model in memory), to a temporary name in the same folder,
//! fsynced, then renamed, so a crash or a full disk never leaves a half file
//! under the final name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

fn dtype_name(kind: Kind) -> anyhow::Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        other => anyhow::bail!("tensors of kind {other:?} cannot be written to safetensors"),
    })
}

/// Writes `tensors` (sorted by name, as safetensors expects) with optional
/// string metadata to `path`, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
) -> anyhow::Result<()> {
    let mut sorted: Vec<(&String, Tensor)> =
        tensors.iter().map(|(k, t)| (k, t.detach().to_device(Device::Cpu).contiguous())).collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));

    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    }
    let mut offset = 0usize;
    for (name, t) in &sorted {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let shape: Vec<i64> = t.size();
        header.insert(
            (*name).clone(),
            serde_json::json!({"dtype": dtype_name(t.kind())?, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The data section starts 8-byte aligned, padded with spaces as the reference writer does.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }

    write_atomically(path, |out| {
        out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        out.write_all(&header_bytes)?;
        let mut buf: Vec<u8> = Vec::new();
        for (_, t) in &sorted {
            let n = t.numel() * t.kind().elt_size_in_bytes();
            buf.resize(n, 0);
            t.f_copy_data_u8(&mut buf, t.numel())?;
            out.write_all(&buf)?;
        }
        Ok(())
    })
}

/// Writes `path` whole or not at all: `fill` writes into a temporary file beside
/// it, which is synced and then renamed over `path` (a crash or a full disk
/// leaves the old file, never half a new one).
pub fn write_atomically(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        fill(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move the new file into place as {}", path.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
