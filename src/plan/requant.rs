//! `apply --out-dtype fp8|mxfp4`: the weights the base stores quantized
//! are written quantized again, in the base's scheme, layout and tensor
//! names, each followed by its scales (`Op::QuantScales`); every other
//! tensor is as without it. See `arith::requant` for the arithmetic.
//!
//! - FP8: block-scaled E4M3 weights in the base's blocks, with f32
//!   `weight_scale_inv`. A weight whose shape the block does not divide
//!   stays bf16, as transformers' quantizer passes such tensors through.
//! - MXFP4 (gpt-oss): the fused experts `[E, cols, rows]` as `*_blocks`
//!   `[E, rows, cols / 32, 16]` and E8M0 `*_scales` `[E, rows, cols / 32]`.

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::tensor::{Quant, Scheme, Tensor};
use crate::plan::shards::assign_shards;
use crate::plan::{Op, OutTensor, Plan, Requantized, Source};

/// What one computed output tensor becomes: the weight (renamed,
/// retyped, reshaped as stored), how it is quantized, and its scales
/// tensor's name, dtype and shape.
struct Quantized {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    how: Requantized,
    scales: (String, DType, Vec<u64>),
}

/// Rewrites `plan` so the base's FP8 weights are written as FP8 again;
/// shards laid out anew (`shard_size` data bytes at most).
pub(crate) fn requantize_fp8(plan: &mut Plan, shard_size: u64) -> Result<()> {
    // DeepSeek-V3.1's `scale_fmt: ue8m0` rounds each inverse scale up to a
    // power of two before quantizing.
    let fmt = plan.inputs[0]
        .ckpt
        .config
        .as_ref()
        .and_then(|c| c.raw.get("quantization_config")?.get("scale_fmt")?.as_str().map(str::to_string));
    let pow2 = match fmt.as_deref() {
        None | Some("float") => false,
        Some("ue8m0") => true,
        Some(f) => {
            return Err(Error::Usage(format!(
                "--out-dtype fp8: the base's quantization_config has scale_fmt '{f}'; chatvec writes 'float' and 'ue8m0' scales"
            )));
        }
    };
    let mut skipped = Vec::new();
    rewrite(plan, "fp8", shard_size, |plan, t| {
        let Some(bt) = quantized_base(plan, t, "fp8")? else { return Ok(None) };
        let Some(Quant { scheme: Scheme::Fp8Block { block }, scales }) = bt.quant.as_deref() else {
            return Ok(None);
        };
        let block = *block;
        // E8M0 bytes hold the power-of-two scales of ue8m0 only.
        let e8m0 = matches!(scales.dtype, DType::F8E8M0 | DType::U8);
        if bt.dtype != DType::F8E4M3 || !(scales.dtype == DType::F32 || pow2 && e8m0) {
            return Err(Error::Usage(format!(
                "--out-dtype fp8: '{}' is {} with {} scales; F8_E4M3 with F32 scales (or E8M0 ones under scale_fmt ue8m0) is what is written back",
                bt.name, bt.dtype, scales.dtype
            )));
        }
        let [.., rows, cols] = t.shape[..] else { unreachable!("folding checked FP8 matrices") };
        if t.shape.len() != 2 || rows % block[0] != 0 || cols % block[1] != 0 {
            skipped.push(t.name.clone());
            return Ok(None);
        }
        Ok(Some(Quantized {
            name: t.name.clone(),
            dtype: DType::F8E4M3,
            shape: t.shape.clone(),
            how: Requantized::Fp8 { block, pow2 },
            scales: (scales.name.clone(), scales.dtype, vec![rows / block[0], cols / block[1]]),
        }))
    })?;
    if !skipped.is_empty() {
        plan.warnings.push(format!(
            "{} FP8 weight(s) whose shape the block does not divide stay bf16 (as transformers leaves them), e.g. '{}'",
            skipped.len(),
            skipped[0]
        ));
    }
    Ok(())
}

/// Rewrites `plan` so the base's MXFP4 experts are written as MXFP4 again,
/// under their `_blocks` and `_scales` names; shards laid out anew.
pub(crate) fn requantize_mxfp4(plan: &mut Plan, shard_size: u64) -> Result<()> {
    rewrite(plan, "mxfp4", shard_size, |plan, t| {
        let Some(bt) = quantized_base(plan, t, "mxfp4")? else { return Ok(None) };
        let Some(q) = bt.quant.as_ref() else { return Ok(None) };
        let [experts, cols, rows] = bt.shape[..] else { unreachable!("folding checked MXFP4 experts") };
        if t.shape != bt.shape {
            return Err(Error::Usage(format!(
                "--out-dtype mxfp4: '{}' is written as {:?} but the base stores it as MXFP4 experts {:?}; only the base's own layout is written as MXFP4",
                t.name, t.shape, bt.shape
            ))
            .with_hint("leave out --expert-layout, or write bf16"));
        }
        let groups = cols / 32;
        Ok(Some(Quantized {
            name: format!("{}_blocks", t.name),
            dtype: DType::U8,
            shape: vec![experts, rows, groups, 16],
            how: Requantized::Mxfp4 { experts, cols, rows },
            scales: (format!("{}_scales", t.name), q.scales.dtype, vec![experts, rows, groups]),
        }))
    })
}

/// Replaces each tensor of `plan` that `quantize` maps by its quantized
/// weight and its scales tensor right after it, keeps the others, remaps
/// the per-variant scales and lays the shards out anew. Refused when no
/// tensor is mapped (`flag`, the `--out-dtype` value, names the cause).
fn rewrite(
    plan: &mut Plan,
    flag: &str,
    shard_size: u64,
    mut quantize: impl FnMut(&Plan, &OutTensor) -> Result<Option<Quantized>>,
) -> Result<()> {
    if !plan.groups.is_empty() {
        return Err(Error::Usage(format!(
            "--out-dtype {flag} with mixture-of-experts weights assembled into the fused layout is not supported yet"
        ))
        .with_hint(format!("write the base's own layout, or leave out --out-dtype {flag} for a bf16 output")));
    }
    let old = std::mem::take(&mut plan.tensors);
    let mut tensors: Vec<OutTensor> = Vec::with_capacity(old.len());
    // Old tensor index -> new one, for the per-variant scales.
    let mut moved = Vec::with_capacity(old.len());
    for mut t in old {
        let q = match quantize(plan, &t) {
            Ok(q) => q,
            Err(e) => {
                // The plan stays whole for whoever reports the error.
                plan.tensors = tensors;
                return Err(e);
            }
        };
        moved.push(tensors.len());
        let Some(q) = q else {
            tensors.push(t);
            continue;
        };
        let at = tensors.len();
        (t.name, t.dtype, t.shape) = (q.name, q.dtype, q.shape);
        plan.requant.weights.insert(at, q.how);
        tensors.push(t);
        let (name, dtype, shape) = q.scales;
        tensors.push(OutTensor { name, dtype, shape, op: Op::QuantScales(at) });
    }
    plan.tensors = tensors;
    if plan.requant.weights.is_empty() {
        let (scheme, like) = match flag {
            "fp8" => ("block-scaled FP8 E4M3", "DeepSeek-V3, Qwen3 -FP8"),
            _ => ("MXFP4", "gpt-oss"),
        };
        return Err(Error::Usage(format!(
            "--out-dtype {flag}: {} has no {scheme} weights to write as {} again",
            plan.inputs[0].ckpt.dir.display(),
            flag.to_uppercase()
        ))
        .with_hint(format!(
            "--out-dtype {flag} requantizes a base stored so ({like}); leave it out for bf16"
        )));
    }
    for variant in &mut plan.scales {
        let mut v = vec![None; plan.tensors.len()];
        for (old, s) in variant.iter().enumerate() {
            v[moved[old]] = *s;
        }
        *variant = v;
    }
    plan.shards = assign_shards(&plan.tensors, &plan.groups, shard_size);
    Ok(())
}

/// The base tensor output tensor `t` is computed or converted from, when
/// the base stores it quantized in the scheme `flag` names. A base tensor
/// in the other scheme is refused.
fn quantized_base<'p>(plan: &'p Plan, t: &OutTensor, flag: &str) -> Result<Option<&'p Tensor>> {
    let base: Source = match &t.op {
        Op::Convert(s) => *s,
        Op::Arith { formula, .. } => formula.base(),
        Op::AddVectors(v) => v.base,
        _ => return Ok(None),
    };
    if base.input != 0 {
        return Ok(None);
    }
    let bt = plan.input_tensor(base);
    let Some(q) = bt.quant.as_ref() else { return Ok(None) };
    match (&q.scheme, flag) {
        (Scheme::Fp8Block { .. }, "fp8") | (Scheme::Mxfp4, "mxfp4") => Ok(Some(bt)),
        _ => Err(Error::Usage(format!(
            "--out-dtype {flag}: '{}' is {} in the base; each quantized weight is written in its own scheme only",
            bt.name,
            q.scheme.describe(bt.dtype)
        ))),
    }
}
