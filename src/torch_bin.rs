//! PyTorch `.bin` checkpoints (the zip format `torch.save` has written
//! since 1.6), read without running pickle code and without copying.
//!
//! candle-core's pickle reader interprets `data.pkl` as data (it knows the
//! few reduce calls a state dict uses and never imports or calls anything)
//! and yields each tensor's dtype, shape, strides and storage entry. The
//! storages are zip entries stored uncompressed, so a tensor's bytes sit at
//! a fixed offset of the file: chatvec maps the file and points at them,
//! exactly as for safetensors. Outputs are always safetensors.

use std::fs::File;
use std::path::Path;

use crate::checkpoint::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};

fn dtype_of(d: candle_core::DType) -> Option<DType> {
    DType::parse(&d.as_str().to_ascii_uppercase())
}

/// Reads the tensor table of the `.bin` file at `path` (of `file_len`
/// bytes), shard `shard` of its checkpoint: absolute byte ranges in the file.
pub fn read_bin(path: &Path, file_len: u64, shard: usize) -> Result<Vec<Tensor>> {
    let bad = |m: String| Error::format(path, m);
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(|e| {
        bad(format!(
            "is not a PyTorch zip checkpoint ({e}); files saved by torch < 1.6 must be re-saved with a current torch"
        ))
    })?;
    if infos.is_empty() {
        return Err(bad("holds no tensors (data.pkl is not a state dict)".into()));
    }
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("is not a valid zip archive: {e}")))?;
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let name = info.name.clone();
        let dtype = dtype_of(info.dtype).ok_or_else(|| {
            bad(format!("tensor '{name}' has dtype {:?}, which chatvec does not know", info.dtype))
        })?;
        if !info.layout.is_contiguous() {
            return Err(bad(format!(
                "tensor '{name}' is stored strided (e.g. transposed); chatvec reads contiguous tensors only"
            )));
        }
        let shape: Vec<u64> = info.layout.dims().iter().map(|&d| d as u64).collect();
        let elem = dtype.bits() / 8;
        let numel: u64 = shape.iter().product();
        let entry = zip
            .by_name(&info.path)
            .map_err(|e| bad(format!("tensor '{name}': storage {}: {e}", info.path)))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(bad(format!("tensor '{name}': storage {} is compressed", info.path)));
        }
        let data_start = entry
            .data_start()
            .ok_or_else(|| bad(format!("tensor '{name}': storage {} has no data offset", info.path)))?;
        let entry_size = entry.size();
        // candle keeps the storage offset in bytes.
        let offset = info.layout.start_offset() as u64;
        let len = numel.checked_mul(elem).ok_or_else(|| bad(format!("tensor '{name}': size overflows")))?;
        let end = offset.checked_add(len).filter(|&e| e <= entry_size);
        let start = data_start + offset;
        if end.is_none() || start + len > file_len {
            return Err(bad(format!(
                "tensor '{name}' ({} x {shape:?}) runs past its storage {} of {entry_size} bytes",
                dtype.name(),
                info.path
            )));
        }
        out.push(Tensor { name, dtype, shape, shard, start, len });
    }
    out.sort_by_key(|t| (t.start, t.name.clone()));
    Ok(out)
}
