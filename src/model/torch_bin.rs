//! PyTorch `.bin` checkpoints (the zip format `torch.save` has written
//! since 1.6), read without running pickle code and without copying.
//!
//! candle-core's pickle reader interprets `data.pkl` as data (it knows the
//! few reduce calls a state dict uses and never imports or calls anything)
//! and yields each tensor's dtype, shape, strides and storage entry. The
//! storages are zip entries stored uncompressed, so a tensor's bytes sit at
//! a fixed offset of the file: chatvec maps the file and points at them,
//! exactly as for safetensors. Outputs are always safetensors.

use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::Context;
use candle_core::pickle::{Object, Stack, TensorInfo};

use crate::error::{Error, FormatError, Result};
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
    let file = std::fs::File::open(path).map_err(|e| not_pth(path, e.into()))?;
    let infos = pth_tensor_info(BufReader::new(file), path)?;
    let open = || Ok(BufReader::new(crate::json::open_regular(path)?));
    tensor_table(path, infos, open, file_len)
}

/// [`read_bin`] over a whole `.bin` file's bytes, `path` naming it in
/// errors: the same checks and messages, without the file (for the fuzz
/// target).
#[cfg(fuzzing)]
pub(crate) fn parse_bin(bytes: &[u8], path: &Path) -> Result<Vec<BinTensor>> {
    use std::io::Cursor;
    let infos = pth_tensor_info(Cursor::new(bytes), path)?;
    tensor_table(path, infos, || Ok(Cursor::new(bytes)), bytes.len() as u64)
}

/// The error for a file candle's pickle reader refuses.
fn not_pth(path: &Path, e: candle_core::Error) -> Error {
    Error::format(
        path,
        FormatError::Pickle(format!(
            "is not a PyTorch zip checkpoint ({e}); files saved by torch < 1.6 must be re-saved with a current torch"
        )),
    )
}

/// candle-core 0.11's `pickle::read_pth_tensor_info(file, false, None)`
/// over any reader (that one takes a path): the tensors of every
/// `*data.pkl` in the zip, each pickle read by candle's `Stack`. What
/// candle would panic on (or, without overflow checks, misread) is
/// refused first: a LONG1 integer of more than 8 bytes, and a tensor
/// entry with too few rebuild arguments or a negative offset (see
/// [`bad_rebuild`]).
fn pth_tensor_info<R: Read + Seek>(reader: R, path: &Path) -> Result<Vec<TensorInfo>> {
    let not_pth = |e: candle_core::Error| not_pth(path, e);
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| not_pth(e.into()))?;
    let zip_file_names = zip
        .file_names()
        .map(|f| f.map(|f| f.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| not_pth(e.into()))?;
    let mut tensor_infos = vec![];
    for file_name in zip_file_names.iter() {
        if !file_name.ends_with("data.pkl") {
            continue;
        }
        let dir_name = PathBuf::from(file_name.strip_suffix(".pkl").context("no .pkl").map_err(not_pth)?);
        let reader = zip.by_name(file_name).map_err(|e| not_pth(e.into()))?;
        let mut reader = Lookahead::new(reader);
        let mut stack = Stack::empty();
        loop {
            // candle shifts LONG1's bytes by 8 x their index, which
            // overflows past the 8 bytes of its i64. Its length byte is
            // looked at only after a LONG1 opcode, so the stream is read
            // no further than candle reads it.
            if reader.peek(1).map_err(|e| not_pth(e.into()))? == [LONG1]
                && let [_, n, ..] = *reader.peek(2).map_err(|e| not_pth(e.into()))?
                && n > 8
            {
                return Err(Error::format(
                    path,
                    FormatError::Pickle(format!(
                        "{file_name}: a LONG1 integer of {n} bytes; expected at most 8 (an int64)"
                    )),
                ));
            }
            if stack.read(&mut reader).map_err(not_pth)? {
                break;
            }
        }
        let obj = stack.finalize().map_err(not_pth)?;
        // A TorchScript archive's module: its state is the dict.
        let obj = match obj {
            Object::Build { callable, args } => match *callable {
                Object::Reduce { callable, args: _ } => match *callable {
                    Object::Class { module_name, class_name }
                        if module_name == "__torch__" && class_name == "Module" =>
                    {
                        *args
                    }
                    _ => continue,
                },
                _ => continue,
            },
            obj => obj,
        };
        if let Object::Dict(key_values) = obj {
            for (name, value) in key_values.into_iter() {
                if let (Object::Unicode(name), Some(why)) = (&name, bad_rebuild(&value)) {
                    return Err(Error::format(
                        path,
                        FormatError::Pickle(format!("{file_name}: tensor '{name}': {why}")),
                    ));
                }
                match value.into_tensor_info(name, &dir_name) {
                    Ok(Some(tensor_info)) => tensor_infos.push(tensor_info),
                    Ok(None) => {}
                    // As candle does, an entry it cannot read is skipped
                    // and said (through `ui`, which escapes what a hostile
                    // name could hide in it).
                    Err(err) => crate::ui::warn(&format!("{}: skipping: {err}", path.display())),
                }
            }
        }
    }
    Ok(tensor_infos)
}

/// The pickle opcode LONG1: a length byte, then that many bytes of a
/// little-endian integer.
const LONG1: u8 = 0x8a;

/// What is wrong with a state-dict value that candle's `into_tensor_info`
/// would panic on: it takes its arguments out of their tuples by position
/// (`Vec::remove`) without checking their number, and multiplies the
/// storage offset by the element size unchecked. `None` for a value it
/// reads, skips or refuses without panicking.
fn bad_rebuild(value: &Object) -> Option<String> {
    let is = |o: &Object, module: &str, class: &str| match o {
        Object::Class { module_name, class_name } => module_name == module && class_name == class,
        _ => false,
    };
    let Object::Reduce { callable, args } = value else { return None };
    let (callable, args) = match (&**callable, &**args) {
        (c, Object::Tuple(a)) if is(c, "torch._tensor", "_rebuild_from_type_v2") => match &a[..] {
            [func, _, args, ..] => (func, args),
            _ => {
                return Some(format!(
                    "torch._tensor._rebuild_from_type_v2 has {} arguments; expected at least 3 (function, type, arguments)",
                    a.len()
                ));
            }
        },
        (c, Object::Tuple(a)) if is(c, "torch._utils", "_rebuild_parameter") => match a.first() {
            Some(Object::Reduce { callable, args }) => (&**callable, &**args),
            Some(_) => return None,
            None => {
                return Some("torch._utils._rebuild_parameter has no arguments; expected the tensor".into());
            }
        },
        (c, a) => (c, a),
    };
    if !is(callable, "torch._utils", "_rebuild_tensor_v2") {
        return None;
    }
    let Object::Tuple(a) = args else { return None };
    let [storage, offset, _, _, ..] = &a[..] else {
        return Some(format!(
            "torch._utils._rebuild_tensor_v2 has {} arguments; expected at least 4 (storage, offset, size, stride)",
            a.len()
        ));
    };
    // Element offsets up to u64::MAX / 8 times the widest element (8
    // bytes) fit in 64 bits.
    let o = match offset {
        Object::Int(o) => *o as i64,
        Object::Long(o) => *o,
        _ => return None,
    };
    if !(0..=(u64::MAX / 8) as i64).contains(&o) {
        return Some(format!("storage offset {o}; expected a non-negative element offset"));
    }
    if let Object::PersistentLoad(id) = storage
        && let Object::Tuple(id) = &**id
        && id.len() < 5
    {
        return Some(format!(
            "its storage id has {} fields; expected 5 ('storage', storage type, key, location, size)",
            id.len()
        ));
    }
    None
}

/// A buffered reader that can show its next bytes without consuming them,
/// even across refills (a `BufReader` shows only what it holds).
struct Lookahead<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> Lookahead<R> {
    fn new(inner: R) -> Lookahead<R> {
        Lookahead { inner, buf: Vec::new(), pos: 0 }
    }

    /// The next `n` bytes, fewer only at the end of the stream.
    fn peek(&mut self, n: usize) -> std::io::Result<&[u8]> {
        while self.buf.len() - self.pos < n {
            self.buf.drain(..self.pos);
            self.pos = 0;
            let have = self.buf.len();
            self.buf.resize(have + 8192, 0);
            let got = loop {
                match self.inner.read(&mut self.buf[have..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => break r,
                }
            };
            self.buf.truncate(have + *got.as_ref().unwrap_or(&0));
            if got? == 0 {
                break;
            }
        }
        Ok(&self.buf[self.pos..self.buf.len().min(self.pos + n)])
    }
}

impl<R: Read> Read for Lookahead<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Lookahead<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.pos == self.buf.len() {
            self.peek(1)?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// The tensor table from the pickle's tensor list `infos` and the zip
/// opened by `open`, for a file of `file_len` bytes named `path`.
fn tensor_table<R: Read + Seek>(
    path: &Path,
    infos: Vec<TensorInfo>,
    open: impl FnOnce() -> Result<R>,
    file_len: u64,
) -> Result<Vec<BinTensor>> {
    let bad = |m: String| Error::format(path, FormatError::Pickle(m));
    if infos.is_empty() {
        return Err(bad("holds no tensors (data.pkl is not a state dict)".into()));
    }
    let mut zip =
        zip::ZipArchive::new(open()?).map_err(|e| bad(format!("is not a valid zip archive: {e}")))?;
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
