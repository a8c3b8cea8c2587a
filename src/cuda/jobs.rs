//! Plan jobs on the GPU: the chat-vector formulas (one fused kernel per
//! run of rows) and the merge methods' element pass (decode, delta, mask,
//! combine, encode), each enqueued in a slot and collected later.

use std::ops::Range;

use super::engine::{Gpu, launch, ty_code};
use crate::arith::Operand;
use crate::arith::formulas::Segment;
use crate::error::{Error, Result};
use crate::merge::methods::Method;
use crate::merge::stats::{Keep, ModelStats, STAT_BLOCK, TensorStats};
use crate::merge::{Inputs, TensorMerge};
use crate::model::dtype::FloatType;
use crate::plan::{Op, Plan};

fn suffix(t: FloatType) -> &'static str {
    match t {
        FloatType::BF16 => "bf16",
        FloatType::F16 => "f16",
        FloatType::F32 => "f32",
    }
}

impl Gpu {
    /// Enqueues elements `elems` of output tensor `tensor` in slot `slot`;
    /// `collect` returns the output bytes. Scales come from the plan's
    /// one variant, as the CPU's do (`Plan::segments`).
    pub(crate) fn enqueue(
        &self,
        slot: usize,
        plan: &Plan,
        tensor: usize,
        stats: Option<&TensorStats>,
        elems: Range<u64>,
    ) -> Result<()> {
        let t = &plan.tensors[tensor];
        let out_ty = t
            .dtype
            .float()
            .ok_or_else(|| Error::Internal(format!("tensor '{}' is computed but is {}", t.name, t.dtype)))?;
        match &t.op {
            Op::Merge(m) => {
                let st = stats.ok_or_else(|| {
                    Error::Internal(format!(
                        "merged tensor '{}' reached the GPU without its statistics",
                        t.name
                    ))
                })?;
                m.with_inputs(plan, |inputs| {
                    self.enqueue_merge(slot, inputs, &m.merge, st, out_ty, t.numel(), elems)
                })
            }
            _ => self.enqueue_arith(slot, plan, tensor, out_ty, elems),
        }
    }

    fn enqueue_arith(
        &self,
        slot: usize,
        plan: &Plan,
        tensor: usize,
        out_ty: FloatType,
        elems: Range<u64>,
    ) -> Result<()> {
        if plan.variants() != 1 {
            return Err(Error::Internal(format!(
                "a plan of {} variants reached the GPU, which computes one",
                plan.variants()
            )));
        }
        // Quantized inputs never reach the GPU (`Plan::has_quantized`), so
        // nothing is decoded into this arena.
        let arena = bumpalo::Bump::new();
        let segs = plan.segments(tensor, &elems, 0, &arena);
        let ops: Vec<Vec<Operand>> = segs.iter().map(|(_, seg)| seg.operands()).collect();
        let parts: Vec<&[u8]> = ops.iter().flatten().map(|o| o.bytes).collect();
        let os = out_ty.size();
        let len = (elems.end - elems.start) as usize * os;
        let offsets = self.upload(slot, &parts, 0, len)?;
        let (inp, _, out) = self.slot_ptrs(slot);
        // Each operand as (device address, dtype code), in upload order.
        // `upload` returns one offset per part, in order.
        let mut args = ops.iter().flatten().zip(&offsets).map(|(o, off)| (inp + *off as u64, ty_code(o.ty)));
        let mut arg = || args.next().unwrap_or((0, 0));
        let sfx = suffix(out_ty);
        for (r, seg) in &segs {
            let n = r.end - r.start;
            let dst = out + (r.start - elems.start) * os as u64;
            let cfg = self.grid(n);
            match *seg {
                Segment::Convert(_) => {
                    let (x, tx) = arg();
                    launch!(self, &format!("convert_{sfx}"), cfg, [dst, x, tx, n])?
                }
                Segment::Diff(..) => {
                    let ((c, tc), (p, tp)) = (arg(), arg());
                    launch!(self, &format!("diff_{sfx}"), cfg, [dst, c, tc, p, tp, n])?
                }
                Segment::AddDiff(_, _, _, scale) => {
                    let ((b, tb), (c, tc), (p, tp)) = (arg(), arg(), arg());
                    launch!(self, &format!("add_diff_{sfx}"), cfg, [dst, b, tb, c, tc, p, tp, scale, n])?
                }
                Segment::AddScaled(_, _, scale) => {
                    let ((b, tb), (v, tv)) = (arg(), arg());
                    launch!(self, &format!("add_scaled_{sfx}"), cfg, [dst, b, tb, v, tv, scale, n])?
                }
                Segment::AddLowRank { .. } => {
                    return Err(Error::Internal(
                        "a low-rank update reached the GPU; the executor runs them on the CPU".into(),
                    ));
                }
                Segment::AddTerms { .. } => {
                    return Err(Error::Internal(
                        "a sum of several vectors reached the GPU; the executor runs them on the CPU".into(),
                    ));
                }
            }
        }
        self.download(slot, 0, len)
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue_merge(
        &self,
        slot: usize,
        inputs: &Inputs,
        tm: &TensorMerge,
        st: &TensorStats,
        out_ty: FloatType,
        numel: u64,
        elems: Range<u64>,
    ) -> Result<()> {
        let p = &tm.params;
        let k = inputs.models.len();
        // DELLA ranks need whole rows: compute over the rows the chunk
        // touches, keep the chunk's part.
        let della = st.models.iter().any(|ms| matches!(ms.keep, Keep::Della { .. }));
        let rl = st.row_len.max(1);
        let range = if della {
            elems.start / rl * rl..(elems.end.div_ceil(rl) * rl).min(numel)
        } else {
            elems.clone()
        };
        let n = range.end - range.start;
        let os = out_ty.size();
        let f = 4 * n;
        let work =
            self.upload_f32(slot, inputs.base, &inputs.models, range.start, n, k + 2, n as usize * os)?;
        let (_, _, out) = self.slot_ptrs(slot);
        let (b_ptr, x_ptr, r_ptr) = (work, |i: usize| work + (1 + i as u64) * f, work + (k as u64 + 1) * f);
        let cfg = self.grid(n);
        let weights: Vec<f32> = p.models.iter().map(|mp| mp.weight as f32).collect();
        let weight_sum = weights.iter().fold(0f32, |a, w| a + w);
        let w_dev = self.small(&weights)?;
        let w_ptr = self.ptr(&w_dev);
        let ki = k as i32;
        // Parameter buffers (weights, model_stock's t) live until the end of
        // this function; their memory is freed in stream order, after the
        // kernels that read it.
        let stock_t = self.small(&st.stock_t)?;
        match tm.method {
            Method::Linear => launch!(
                self,
                "combine_linear",
                cfg,
                [r_ptr, x_ptr(0), ki, w_ptr, p.normalize as i32, weight_sum, n]
            )?,
            Method::Slerp => {
                let (ca, cb) = st.slerp;
                launch!(self, "combine_slerp", cfg, [r_ptr, b_ptr, x_ptr(0), ca, cb, n])?
            }
            Method::ModelStock => {
                let t_ptr = self.ptr(&stock_t);
                launch!(
                    self,
                    "combine_stock",
                    cfg,
                    [r_ptr, b_ptr, x_ptr(0), ki, t_ptr, range.start, st.row_len, n]
                )?
            }
            _ => {
                for (i, ms) in st.models.iter().enumerate() {
                    launch!(self, "sub_base", cfg, [x_ptr(i), b_ptr, n])?;
                    self.sparsify(ms, x_ptr(i), weights[i], range.start, n, st.row_len)?;
                }
                let div_all = if weight_sum.abs() < 1e-8 { 1.0f32 } else { weight_sum };
                let (consensus, normalize) = (tm.method.consensus() as i32, p.normalize as i32);
                let (use_lambda, lambda) = ((p.lambda != 1.0) as i32, p.lambda as f32);
                launch!(
                    self,
                    "combine_task",
                    cfg,
                    [r_ptr, b_ptr, x_ptr(0), ki, w_ptr, consensus, normalize, div_all, use_lambda, lambda, n]
                )?
            }
        }
        let skip = elems.start - range.start;
        let len = elems.end - elems.start;
        launch!(self, "encode_out", self.grid(len), [out, ty_code(out_ty), r_ptr + 4 * skip, len])?;
        self.download(slot, 0, len as usize * os)
    }

    /// Masks, rescales and weights one model's deltas at `x` (elements
    /// `start..start + n` of the tensor), as `merge_compute::sparsify_block`.
    pub(crate) fn sparsify(
        &self,
        ms: &ModelStats,
        x: u64,
        weight: f32,
        start: u64,
        n: u64,
        row_len: u64,
    ) -> Result<()> {
        let cfg = self.grid(n);
        match &ms.keep {
            Keep::All => {}
            Keep::Zero => launch!(self, "fill_zero", cfg, [x, n])?,
            Keep::None => launch!(self, "mul_scalar", cfg, [x, 0.0f32, n])?,
            Keep::Ranks(rk) => {
                if !start.is_multiple_of(STAT_BLOCK) {
                    return Err(Error::Internal(format!(
                        "a rank mask chunk starts at {start}, not on a statistics block"
                    )));
                }
                let b0 = (start / STAT_BLOCK) as usize;
                let nb = n.div_ceil(STAT_BLOCK) as usize;
                let lo = self.small(&rk.eq_lo[b0..b0 + nb])?;
                let hi = self.small(&rk.eq_hi[b0..b0 + nb])?;
                launch!(
                    self,
                    "mask_ranks",
                    self.per_block(nb as u64),
                    [
                        x,
                        n,
                        self.ptr(&lo),
                        self.ptr(&hi),
                        rk.lo_val,
                        rk.hi_val,
                        rk.less_lo,
                        rk.less_hi,
                        rk.lo,
                        rk.hi
                    ]
                )?;
            }
            Keep::Random(prob) => launch!(self, "mask_random", cfg, [x, n, start, ms.stream, *prob])?,
            Keep::Della { density, epsilon } => {
                let ranks = self.della_ranks(x, n, row_len)?;
                let r = self.ptr(&ranks);
                launch!(self, "mask_della", cfg, [x, r, n, start, row_len, *density, *epsilon, ms.stream])?;
            }
        }
        if let Some(f) = ms.rescale {
            launch!(self, "mul_scalar", cfg, [x, f, n])?;
        }
        launch!(self, "mul_scalar", cfg, [x, weight, n])
    }

    /// Stable ascending ranks of `|d|` within each row of `row_len` of the
    /// `n` deltas at `d` (whole rows): a bitonic sort of `|d| << 32 | index`
    /// keys per row, padded to a power of two.
    pub(crate) fn della_ranks(&self, d: u64, n: u64, row_len: u64) -> Result<cudarc::driver::CudaSlice<u32>> {
        let rows = n / row_len;
        let p = row_len.next_power_of_two();
        let total = rows * p;
        let keys = self.zeros::<u64>(total as usize)?;
        let kp = self.ptr(&keys);
        launch!(self, "della_keys", self.grid(total), [d, rows, row_len, p, kp])?;
        let mut k = 2;
        while k <= p {
            let mut j = k / 2;
            while j > 0 {
                launch!(self, "bitonic_step", self.grid(total), [kp, total, j, k, p])?;
                j /= 2;
            }
            k *= 2;
        }
        let ranks = self.zeros::<u32>(n as usize)?;
        launch!(self, "della_ranks", self.grid(total), [kp, rows, row_len, p, self.ptr(&ranks)])?;
        Ok(ranks)
    }
}
