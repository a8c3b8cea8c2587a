//! Quantized checkpoints read as the float models they stand for: FP8
//! block-scaled weights (DeepSeek-V3, Qwen3 `-FP8`, compressed-tensors'
//! block strategy: `F8_E4M3`/`F8_E5M2` values with a `weight_scale_inv`
//! or `weight_scale` per block) and gpt-oss's MXFP4 experts (`*_blocks`
//! of packed FP4 with `*_scales` of E8M0 exponents, one per 32 values).
//!
//! `fold` runs when a model is opened for a job (`resolve`): each quantized weight and its
//! scales become one tensor of the table under the weight's float name and
//! shape, carrying where its scales are (`Tensor::quant`); the scale
//! tensors leave the table. Nothing is decoded here: the arithmetic decodes
//! each chunk it reads (`arith::quant`), exactly as transformers'
//! dequantizers do, so a quantized model can be any input of a job, in
//! bounded memory.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::dtype::DType;
use crate::model::tensor::{Quant, Scheme, Tensor};

/// The names a block-scaled FP8 weight's scales go by.
const FP8_SCALE_SUFFIXES: [&str; 2] = ["_scale_inv", "_scale"];

/// Folds every quantized weight of `ck` with its scales into one tensor
/// (see the module's doc). A weight whose scales do not fit it is refused,
/// naming both.
pub(crate) fn fold(ck: &mut Checkpoint) -> Result<()> {
    let quantized =
        |t: &Tensor| matches!(t.dtype, DType::F8E4M3 | DType::F8E5M2) || t.name.ends_with("_blocks");
    if !ck.tensors.iter().any(quantized) {
        return Ok(());
    }
    let by_name: HashMap<&str, usize> =
        ck.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let config_block = config_block(ck);
    let mut folded: Vec<Option<Tensor>> = ck.tensors.iter().cloned().map(Some).collect();
    for (i, t) in ck.tensors.iter().enumerate() {
        if matches!(t.dtype, DType::F8E4M3 | DType::F8E5M2) {
            let Some(&si) =
                FP8_SCALE_SUFFIXES.iter().find_map(|s| by_name.get(format!("{}{s}", t.name).as_str()))
            else {
                continue;
            };
            let scales = ck.tensors[si].clone();
            let block = fp8_block(ck, t, &scales, config_block)?;
            folded[i] = Some(Tensor {
                quant: Some(Box::new(Quant { scheme: Scheme::Fp8Block { block }, scales })),
                ..t.clone()
            });
            folded[si] = None;
        } else if let Some(stem) = t.name.strip_suffix("_blocks") {
            let Some(&si) = by_name.get(format!("{stem}_scales").as_str()) else { continue };
            let scales = ck.tensors[si].clone();
            let shape = mxfp4_shape(ck, t, &scales)?;
            folded[i] = Some(Tensor {
                name: stem.to_string(),
                shape,
                quant: Some(Box::new(Quant { scheme: Scheme::Mxfp4, scales })),
                ..t.clone()
            });
            folded[si] = None;
        }
    }
    ck.retable(folded.into_iter().flatten().collect())
}

/// `quantization_config.weight_block_size` of the config, if given.
fn config_block(ck: &Checkpoint) -> Option<[u64; 2]> {
    let q = ck.config.as_ref()?.raw.get("quantization_config")?;
    let b = q.get("weight_block_size")?.as_array()?;
    match b[..] {
        [ref r, ref c] => Some([r.as_u64()?, c.as_u64()?]),
        _ => None,
    }
}

/// The block of an FP8 weight: the config's `weight_block_size` when the
/// scale grid is its ceiling (the block the quantizer used; DeepSeek-V3
/// stores sizes that are not multiples of 128 this way), else the block
/// the grid divides the matrix into (as transformers' `Fp8Dequantize`
/// derives it; the two agree wherever the block divides the matrix).
/// One scale for the whole matrix (`[]`, `[1]`) is a block of the whole.
fn fp8_block(ck: &Checkpoint, t: &Tensor, scales: &Tensor, config: Option<[u64; 2]>) -> Result<[u64; 2]> {
    let bad = |what: String| Err(Error::bad_tensor(ck.file_of(t), &t.name, what));
    if !matches!(scales.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::U8 | DType::F8E8M0) {
        return bad(format!(
            "has scales '{}' of {}; FP8 scales are F32, BF16, F16 or E8M0",
            scales.name, scales.dtype
        ));
    }
    let [.., rows, cols] = t.shape[..] else {
        return bad(format!(
            "is FP8 of shape {:?}; a scaled FP8 weight is a matrix (or a stack of them)",
            t.shape
        ));
    };
    let lead = &t.shape[..t.shape.len() - 2];
    let (sr, sc) = match scales.shape[..] {
        [] | [1] => return Ok([rows, cols]),
        [.., sr, sc] if scales.shape[..scales.shape.len() - 2] == *lead => (sr, sc),
        _ => {
            return bad(format!(
                "is FP8 {:?} but its scales '{}' are {:?}; expected [.., rows / block, columns / block]",
                t.shape, scales.name, scales.shape
            ));
        }
    };
    match config {
        Some([br, bc]) if br > 0 && bc > 0 && rows.div_ceil(br) == sr && cols.div_ceil(bc) == sc => {
            Ok([br, bc])
        }
        _ if sr > 0 && sc > 0 && rows % sr == 0 && cols % sc == 0 => Ok([rows / sr, cols / sc]),
        _ => bad(format!(
            "is FP8 {:?} with a {sr}x{sc} grid of scales ('{}'), which divides it into no whole blocks, and the config's weight_block_size does not fit it either",
            t.shape, scales.name
        )),
    }
}

/// The float shape of gpt-oss MXFP4 blocks `[.., rows, groups, 16]` with
/// scales `[.., rows, groups]`: `[.., groups * 32, rows]` when there is
/// one leading axis (the experts), as transformers' `convert_moe_packed_tensors`
/// gives it.
fn mxfp4_shape(ck: &Checkpoint, t: &Tensor, scales: &Tensor) -> Result<Vec<u64>> {
    let bad = |what: String| Err(Error::bad_tensor(ck.file_of(t), &t.name, what));
    if t.dtype != DType::U8 || !matches!(scales.dtype, DType::U8 | DType::F8E8M0) {
        return bad(format!(
            "is {} with scales '{}' of {}; MXFP4 blocks are U8 and their scales U8 (E8M0)",
            t.dtype, scales.name, scales.dtype
        ));
    }
    match t.shape[..] {
        [e, rows, groups, 16] if scales.shape == [e, rows, groups] => Ok(vec![e, groups * 32, rows]),
        _ => bad(format!(
            "is {:?} with scales '{}' {:?}; MXFP4 experts are [experts, rows, groups, 16] with scales [experts, rows, groups]",
            t.shape, scales.name, scales.shape
        )),
    }
}

/// The quantization of a model, for `inspect`: each scheme and how many
/// tensors use it (`None`: none is quantized).
pub(crate) fn summary(ck: &Checkpoint) -> Option<String> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for t in &ck.tensors {
        if let Some(q) = &t.quant {
            let d = q.scheme.describe(t.dtype);
            match seen.iter_mut().find(|(s, _)| *s == d) {
                Some(e) => e.1 += 1,
                None => seen.push((d, 1)),
            }
        }
    }
    let method = ck
        .config
        .as_ref()
        .and_then(|c| c.raw.get("quantization_config"))
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .map(|m| format!(" (quant_method {m})"))
        .unwrap_or_default();
    (!seen.is_empty()).then(|| {
        let parts: Vec<String> = seen.iter().map(|(d, n)| format!("{d}: {n} tensor(s)")).collect();
        format!("{}{method}", parts.join("; "))
    })
}
