//! `apply --out-dtype fp8`: the weights the base stores as block-scaled FP8
//! E4M3 are written as FP8 again, in the base's blocks and under its scale
//! tensors' names, each followed by its scales (`Op::Fp8Scales`); every
//! other tensor is as without it. A weight whose shape the block does not
//! divide stays bf16, as transformers' quantizer passes such tensors
//! through. See `arith::requant` for the arithmetic.

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::tensor::Scheme;
use crate::plan::shards::assign_shards;
use crate::plan::{Op, OutTensor, Plan};

/// Rewrites `plan` so the base's FP8 weights are written as FP8 again;
/// shards laid out anew (`shard_size` data bytes at most).
pub(crate) fn requantize_fp8(plan: &mut Plan, shard_size: u64) -> Result<()> {
    if !plan.groups.is_empty() {
        return Err(Error::Usage(
            "--out-dtype fp8 with mixture-of-experts weights written fused is not supported yet".into(),
        )
        .with_hint("pass --expert-layout per-expert, or leave out --out-dtype fp8 for a bf16 output"));
    }
    // DeepSeek-V3.1's `scale_fmt: ue8m0` rounds each inverse scale up to a
    // power of two before quantizing; chatvec writes the f32 form only.
    let fmt = plan.inputs[0]
        .ckpt
        .config
        .as_ref()
        .and_then(|c| c.raw.get("quantization_config")?.get("scale_fmt")?.as_str().map(str::to_string));
    if let Some(f) = fmt.filter(|f| f != "float") {
        return Err(Error::Usage(format!(
            "--out-dtype fp8: the base's quantization_config has scale_fmt '{f}'; only f32 block scales are written back yet"
        )));
    }
    let old = std::mem::take(&mut plan.tensors);
    let mut tensors: Vec<OutTensor> = Vec::with_capacity(old.len());
    // Old tensor index -> new one, for the per-variant scales.
    let mut moved = Vec::with_capacity(old.len());
    let mut skipped = Vec::new();
    for mut t in old {
        let found = fp8_base(plan, &t)?;
        moved.push(tensors.len());
        let Some((block, scales_name)) = found else {
            tensors.push(t);
            continue;
        };
        let [.., rows, cols] = t.shape[..] else { unreachable!("fp8_base checked a matrix") };
        if t.shape.len() != 2 || rows % block[0] != 0 || cols % block[1] != 0 {
            skipped.push(t.name.clone());
            tensors.push(t);
            continue;
        }
        let at = tensors.len();
        t.dtype = DType::F8E4M3;
        plan.requant.blocks.insert(at, block);
        tensors.push(t);
        tensors.push(OutTensor {
            name: scales_name,
            dtype: DType::F32,
            shape: vec![rows / block[0], cols / block[1]],
            op: Op::Fp8Scales(at),
        });
    }
    if plan.requant.blocks.is_empty() {
        return Err(Error::Usage(format!(
            "--out-dtype fp8: {} has no block-scaled FP8 E4M3 weights to write as FP8 again",
            plan.inputs[0].ckpt.dir.display()
        ))
        .with_hint("--out-dtype fp8 requantizes an FP8 base (DeepSeek-V3, Qwen3 -FP8); use bf16 otherwise"));
    }
    if !skipped.is_empty() {
        plan.warnings.push(format!(
            "{} FP8 weight(s) whose shape the block does not divide stay bf16 (as transformers leaves them), e.g. '{}'",
            skipped.len(),
            skipped[0]
        ));
    }
    for variant in &mut plan.scales {
        let mut v = vec![None; tensors.len()];
        for (old, s) in variant.iter().enumerate() {
            v[moved[old]] = *s;
        }
        *variant = v;
    }
    plan.tensors = tensors;
    plan.shards = assign_shards(&plan.tensors, &plan.groups, shard_size);
    Ok(())
}

/// The block and scale tensor name of output tensor `t`'s base tensor,
/// when the base stores it as block-scaled FP8 E4M3 and `t` is computed
/// or converted from it. Refused for schemes this cannot write back yet.
fn fp8_base(plan: &Plan, t: &OutTensor) -> Result<Option<([u64; 2], String)>> {
    let base = match &t.op {
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
    match q.scheme {
        Scheme::Fp8Block { block } if bt.dtype == DType::F8E4M3 && q.scales.dtype == DType::F32 => {
            Ok(Some((block, q.scales.name.clone())))
        }
        Scheme::Fp8Block { .. } => Err(Error::Usage(format!(
            "--out-dtype fp8: '{}' is {} with {} scales; only F8_E4M3 with F32 scales is written back yet",
            bt.name, bt.dtype, q.scales.dtype
        ))),
        Scheme::Mxfp4 => Err(Error::Usage(format!(
            "--out-dtype fp8: '{}' is MXFP4; writing MXFP4 back is not supported yet",
            bt.name
        ))),
    }
}
