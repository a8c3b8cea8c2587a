//! PyTorch `.bin` checkpoints (the zip format `torch.save` has written
//! since 1.6), read without running pickle code and without copying.
//!
//! candle-core's pickle reader interprets `data.pkl` as data (it knows the
//! few reduce calls a state dict uses and never imports or calls anything)
//! and yields each tensor's dtype, shape, strides and storage entry. The
//! storages are zip entries stored uncompressed, so a tensor's bytes sit at
//! a fixed offset of the file: chatvec maps the file and points at them,
//! exactly as for safetensors. Outputs are always safetensors.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::dtype::DType;

fn dtype_of(d: candle_core::DType) -> Option<DType> {
    DType::parse(&d.as_str().to_ascii_uppercase())
}

/// One tensor of a `.bin` file: `start..start + len` is its absolute byte
/// range in the file.
pub(crate) struct BinTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub start: u64,
    pub len: u64,
}

/// Reads the tensor table of the `.bin` file at `path` (of `file_len`
/// bytes), in file order.
pub(crate) fn read_bin(path: &Path, file_len: u64) -> Result<Vec<BinTensor>> {
    let bad = |m: String| Error::format(path, m);
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(|e| {
        bad(format!(
            "is not a PyTorch zip checkpoint ({e}); files saved by torch < 1.6 must be re-saved with a current torch"
        ))
    })?;
    if infos.is_empty() {
        return Err(bad("holds no tensors (data.pkl is not a state dict)".into()));
    }
    let file = crate::json::open_regular(path)?;
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
        // Every sum and product below comes from the untrusted pickle and
        // zip directory, so each is checked, as for safetensors headers.
        let bits = shape
            .iter()
            .try_fold(dtype.bits(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor '{name}': shape {shape:?} x {dtype} overflows 64 bits")))?;
        if bits % 8 != 0 {
            return Err(bad(format!(
                "tensor '{name}': {dtype} shape {shape:?} is not a whole number of bytes"
            )));
        }
        let len = bits / 8;
        // candle keeps the storage offset in bytes.
        let offset = info.layout.start_offset() as u64;
        let inside_storage = offset.checked_add(len).is_some_and(|e| e <= entry_size);
        let start = data_start.checked_add(offset);
        let inside_file = start.and_then(|s| s.checked_add(len)).is_some_and(|e| e <= file_len);
        let (true, true, Some(start)) = (inside_storage, inside_file, start) else {
            return Err(bad(format!(
                "tensor '{name}' ({dtype} x {shape:?}, {len} bytes at offset {offset}) runs past its storage {} of {entry_size} bytes or the end of the file",
                info.path
            )));
        };
        out.push(BinTensor { name, dtype, shape, start, len });
    }
    out.sort_by_key(|t| (t.start, t.name.clone()));
    Ok(out)
}
