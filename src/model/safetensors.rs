//! The safetensors file format, as pure functions over bytes: validating a
//! header read from an untrusted file, and building the header of a file to
//! write. Nothing here touches the file system, so every rejection is tested
//! with byte literals.
//!
//! Layout: `u64 LE header length N`, `N bytes of JSON`, then the data
//! section. The JSON maps tensor names to `{dtype, shape, data_offsets}`
//! (offsets relative to the data section) plus an optional `__metadata__`
//! string map.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, FormatError, Result};
use crate::json::Entries;
use crate::model::dtype::DType;

/// Largest header accepted, as in the reference implementation (100 MB):
/// a 70B checkpoint's headers are well under 1 MB.
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor as described by a header. Offsets are relative to the data
/// section, already checked against it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A validated header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    /// Tensors in data-section order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Validates the start of a safetensors file. `bytes` is the whole file
/// (usually a memory map); `file` is only used in messages.
///
/// Checks, in order: the 8-byte prefix is there; the header length is under
/// the cap and inside the file; the header is UTF-8 JSON, an object without
/// duplicate names; each entry has exactly dtype/shape/data_offsets; the dtype
/// is known; `dtype x shape` (checked arithmetic) equals the byte range;
/// ranges are in order, contiguous from 0, and end exactly at end of file.
pub(crate) fn parse_header(bytes: &[u8], file: &Path) -> Result<Header> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::format(
            file,
            FormatError::Truncated(format!(
                "file is {file_len} bytes, too short for the 8-byte header length"
            )),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_HEADER_BYTES {
        return Err(Error::format(
            file,
            FormatError::Header(format!(
                "header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or not a safetensors file)"
            )),
        ));
    }
    let data_start = 8 + n;
    if data_start > file_len {
        return Err(Error::format(
            file,
            FormatError::Truncated(format!(
                "header length {n} runs past the end of the {file_len}-byte file (truncated?)"
            )),
        ));
    }
    let raw = &bytes[8..data_start as usize];
    let text = std::str::from_utf8(raw)
        .map_err(|e| Error::format(file, FormatError::Header(format!("header is not UTF-8: {e}"))))?;
    if !text.starts_with('{') {
        return Err(Error::format(
            file,
            FormatError::Header("header does not start with '{' (not a safetensors file?)".into()),
        ));
    }
    let Entries(entries) = serde_json::from_str(text)
        .map_err(|e| Error::format(file, FormatError::Header(format!("header is not valid JSON: {e}"))))?;

    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            let Entries(m) = serde_json::from_value(value)
                .map_err(|e| Error::format(file, FormatError::Header(format!("__metadata__: {e}"))))?;
            // Checked (the format says string -> string), not used.
            if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                return Err(Error::format(
                    file,
                    FormatError::Header(format!("__metadata__ value for '{k}' must be a string")),
                ));
            }
            continue;
        }
        let t: RawTensor = serde_json::from_value(value)
            .map_err(|e| Error::bad_tensor(file, &name, format!("bad header entry: {e}")))?;
        let dtype = DType::parse(&t.dtype)
            .ok_or_else(|| Error::bad_tensor(file, &name, format!("unknown dtype '{}'", t.dtype)))?;
        let (begin, end) = t.data_offsets;
        if begin > end {
            return Err(Error::bad_tensor(
                file,
                &name,
                format!("data_offsets [{begin}, {end}] end before they begin"),
            ));
        }
        let bits = t.shape.iter().try_fold(dtype.bits(), |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
            Error::bad_tensor(file, &name, format!("shape {:?} x {dtype} overflows 64 bits", t.shape))
        })?;
        if bits % 8 != 0 {
            return Err(Error::bad_tensor(
                file,
                &name,
                format!("{dtype} shape {:?} is not a whole number of bytes", t.shape),
            ));
        }
        let expected = bits / 8;
        if end - begin != expected {
            return Err(Error::bad_tensor(
                file,
                &name,
                format!(
                    "{dtype} shape {:?} needs {expected} bytes but data_offsets [{begin}, {end}] hold {}",
                    t.shape,
                    end - begin
                ),
            ));
        }
        tensors.push(TensorInfo { name, dtype, shape: t.shape, begin, end });
    }

    tensors.sort_by_key(|t| (t.begin, t.end));
    let data_len = file_len - data_start;
    let mut expected_begin = 0u64;
    for t in &tensors {
        if t.begin != expected_begin {
            let what = if t.begin > expected_begin {
                "leaves a gap before it"
            } else {
                "overlaps the tensor before it"
            };
            return Err(Error::bad_tensor(
                file,
                &t.name,
                format!(
                    "data_offsets [{}, {}] {what} (expected it to begin at {expected_begin})",
                    t.begin, t.end
                ),
            ));
        }
        expected_begin = t.end;
    }
    if expected_begin != data_len {
        let msg = if expected_begin > data_len {
            format!(
                "tensors need {expected_begin} bytes of data but the file has {data_len} after the header (truncated?)"
            )
        } else {
            format!(
                "file has {data_len} bytes of data but its tensors account for {expected_begin} (trailing bytes)"
            )
        };
        return Err(Error::format(file, FormatError::Truncated(msg)));
    }
    Ok(Header { tensors, data_start })
}

/// What the writer needs to know about one tensor to lay out a file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutTensorSpec<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
}

/// Builds the bytes that start a safetensors file holding `tensors` in the
/// given order, with `{"format": "pt"}` metadata (what transformers writes and
/// some loaders require). The JSON is padded with spaces to a multiple of 8
/// bytes so the data section is aligned, as the reference writer does.
/// Returns the bytes (prefix included) and the total data length.
pub(crate) fn build_header(tensors: &[OutTensorSpec<'_>]) -> (Vec<u8>, u64) {
    let mut obj = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    obj.insert("__metadata__".into(), meta.into());
    let mut offset = 0u64;
    for t in tensors {
        let bytes = t.shape.iter().product::<u64>() * t.dtype.bits() / 8;
        obj.insert(
            t.name.to_string(),
            serde_json::json!({
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&obj).expect("JSON values always serialize");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    (out, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(bytes, Path::new("x.safetensors")).unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_valid_file() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        let hd = parse_header(&file(h, 12), Path::new("x")).unwrap();
        assert_eq!(hd.tensors.len(), 2);
        assert_eq!(hd.tensors[0].name, "a");
        assert_eq!(hd.tensors[1].shape, vec![2]);
        assert_eq!(hd.data_start, 8 + h.len() as u64);
    }

    #[test]
    fn accepts_scalars_and_empty_tensors() {
        let h = r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"BF16","shape":[0,5],"data_offsets":[4,4]}}"#;
        assert_eq!(parse_header(&file(h, 4), Path::new("x")).unwrap().tensors.len(), 2);
    }

    fn kind(bytes: &[u8]) -> FormatError {
        match parse_header(bytes, Path::new("x.safetensors")).unwrap_err() {
            Error::Format { kind, .. } => kind,
            e => panic!("not a format error: {e:?}"),
        }
    }

    /// Callers match what is wrong by kind: a cut file, a bad header, or
    /// one tensor's entry, named.
    #[test]
    fn format_errors_say_their_kind_and_tensor() {
        assert!(matches!(kind(&[1, 2, 3]), FormatError::Truncated(_)));
        let mut past = 100u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(matches!(kind(&past), FormatError::Truncated(_)));
        assert!(matches!(kind(&file("[1,2]", 0)), FormatError::Header(_)));
        let h = r#"{"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(matches!(kind(&file(h, 4)), FormatError::Tensor { tensor, .. } if tensor == "w"));
        let short = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(matches!(kind(&file(short, 4)), FormatError::Truncated(_)));
    }

    #[test]
    fn rejects_too_short_file() {
        assert!(err(&[1, 2, 3]).contains("too short"));
    }

    #[test]
    fn rejects_header_over_cap() {
        let mut v = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(err(&v).contains("exceeds"));
    }

    #[test]
    fn rejects_header_past_end() {
        let mut v = 100u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(err(&v).contains("runs past the end"));
    }

    #[test]
    fn rejects_non_utf8() {
        let mut v = 3u64.to_le_bytes().to_vec();
        v.extend_from_slice(&[b'{', 0xff, b'}']);
        assert!(err(&v).contains("not UTF-8"));
    }

    #[test]
    fn rejects_non_object() {
        assert!(err(&file("[1,2]", 0)).contains("does not start with"));
        assert!(err(&file("{\"a\":", 0)).contains("not valid JSON"));
    }

    #[test]
    fn rejects_duplicate_names() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&file(h, 8)).contains("duplicate key 'a'"));
    }

    #[test]
    fn rejects_unknown_fields_and_missing_fields() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#;
        assert!(err(&file(h, 4)).contains("tensor 'a': bad header entry"));
        let h = r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#;
        assert!(err(&file(h, 4)).contains("missing field `shape`"));
    }

    #[test]
    fn rejects_unknown_dtype() {
        let h = r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#;
        assert!(err(&file(h, 16)).contains("unknown dtype 'F128'"));
    }

    #[test]
    fn rejects_negative_or_float_dims() {
        let h = r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#;
        assert!(err(&file(h, 4)).contains("tensor 'a'"));
    }

    #[test]
    fn rejects_reversed_offsets() {
        let h = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#;
        assert!(err(&file(h, 4)).contains("end before they begin"));
    }

    #[test]
    fn rejects_shape_overflow() {
        let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
        assert!(err(&file(h, 4)).contains("overflows"));
    }

    #[test]
    fn rejects_size_mismatch() {
        let h = r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#;
        let e = err(&file(h, 8));
        assert!(e.contains("needs 6 bytes") && e.contains("hold 8"), "{e}");
    }

    #[test]
    fn rejects_partial_bytes() {
        let h = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#;
        assert!(err(&file(h, 1)).contains("whole number of bytes"));
    }

    #[test]
    fn rejects_gap() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&file(h, 8)).contains("gap"));
    }

    #[test]
    fn rejects_overlap() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&file(h, 8)).contains("overlaps"));
    }

    #[test]
    fn rejects_truncated_data() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(err(&file(h, 5)).contains("truncated"));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err(&file(h, 9)).contains("trailing"));
    }

    #[test]
    fn rejects_non_string_metadata() {
        let h = r#"{"__metadata__":{"format":1}}"#;
        assert!(err(&file(h, 0)).contains("must be a string"));
    }

    const WHOLE_BYTE: [DType; 8] =
        [DType::BF16, DType::F16, DType::F32, DType::I64, DType::U8, DType::F64, DType::Bool, DType::I32];

    proptest::proptest! {
        /// Whatever `build_header` lays out, `parse_header` accepts and
        /// reads back: the same names (any Unicode), dtypes and shapes, in
        /// order, each tensor's bytes where the layout put them.
        #[test]
        fn built_headers_parse_back_to_the_same_tensors(
            tensors in proptest::collection::btree_map(
                "\\PC{1,12}",
                (0..WHOLE_BYTE.len(), proptest::collection::vec(0u64..6, 0..4)),
                0..10,
            )
        ) {
            let specs: Vec<OutTensorSpec> = tensors
                .iter()
                .filter(|(name, _)| name.as_str() != "__metadata__")
                .map(|(name, (d, shape))| OutTensorSpec { name, dtype: WHOLE_BYTE[*d], shape })
                .collect();
            let (head, data_len) = build_header(&specs);
            let mut f = head.clone();
            f.extend((0..data_len).map(|i| i as u8));
            let h = parse_header(&f, Path::new("x")).unwrap();
            // Zero-sized tensors share offsets, so compare as sets; then
            // check each tensor's byte range against the layout's order.
            let mut got: Vec<_> = h.tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
            let mut want: Vec<_> = specs.iter().map(|s| (s.name.to_string(), s.dtype, s.shape.to_vec())).collect();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            want.sort_by(|a, b| a.0.cmp(&b.0));
            proptest::prop_assert_eq!(got, want);
            let mut offset = 0;
            for s in &specs {
                let bytes = s.shape.iter().product::<u64>() * s.dtype.bits() / 8;
                let t = h.tensors.iter().find(|t| t.name == s.name).unwrap();
                proptest::prop_assert_eq!((t.begin, t.end), (offset, offset + bytes));
                offset += bytes;
            }
            proptest::prop_assert_eq!(h.data_start as usize, head.len());
        }
    }

    #[test]
    fn built_headers_parse_back() {
        let specs = [
            OutTensorSpec { name: "w", dtype: DType::BF16, shape: &[3, 5] },
            OutTensorSpec { name: "b", dtype: DType::F32, shape: &[7] },
        ];
        let (head, data_len) = build_header(&specs);
        assert_eq!(data_len, 30 + 28);
        assert_eq!((head.len() - 8) % 8, 0);
        let mut f = head.clone();
        f.extend(std::iter::repeat_n(0u8, data_len as usize));
        let h = parse_header(&f, Path::new("x")).unwrap();
        assert_eq!(h.tensors[0].name, "w");
        assert_eq!(h.tensors[1].begin, 30);
        assert_eq!(h.data_start as usize, head.len());
    }
}
