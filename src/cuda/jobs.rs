//! Plan jobs on the GPU: the chat-vector formulas (one fused kernel per
//! run of rows) and the merge methods' element pass (decode, delta, mask,
//! combine, encode), each enqueued in a slot and collected later.

use std::ops::Range;

use super::engine::{Gpu, Result, stage, ty_code};
use crate::arith::Operand;
use crate::dtype::FloatType;
use crate::launch;
use crate::merge_stats::{Keep, ModelStats, STAT_BLOCK, TensorStats};
use crate::methods::Method;
use crate::plan::{Formula, MergeOp, Op, OutTensor, Plan};

/// One run of output elements and what computes it.
enum Seg<'a> {
    Convert(Operand<'a>),
    Diff(Operand<'a>, Operand<'a>),
    AddDiff(Operand<'a>, Operand<'a>, Operand<'a>, f32),
    AddScaled(Operand<'a>, Operand<'a>, f32),
}

impl<'a> Seg<'a> {
    fn operands(&self) -> Vec<Operand<'a>> {
        match *self {
            Seg::Convert(a) => vec![a],
            Seg::Diff(c, p) => vec![c, p],
            Seg::AddDiff(b, c, p, _) => vec![b, c, p],
            Seg::AddScaled(b, v, _) => vec![b, v],
        }
    }
}

fn suffix(t: FloatType) -> &'static str {
    match t {
        FloatType::BF16 => "bf16",
        FloatType::F16 => "f16",
        FloatType::F32 => "f32",
    }
}

/// The segments of elements `elems` of an Arith or Convert tensor, the way
/// `execute::compute` cuts them: rows outside the vector's runs are the
/// base converted, rows inside run the formula on the vector's rows.
fn segments<'a>(plan: &'a Plan, op: &'a Op, elems: &Range<u64>) -> Vec<(u64, u64, Seg<'a>)> {
    let mut out = Vec::new();
    match op {
        Op::Convert(src) => {
            let n = (elems.end - elems.start) as usize;
            out.push((
                elems.start,
                elems.end,
                Seg::Convert(plan.operand(*src).slice(elems.start as usize, n)),
            ));
        }
        Op::Arith { formula, runs, row_len } => {
            let l = *row_len;
            let base = plan.operand(formula.base());
            let mut p = elems.start;
            let mut ri = runs.partition_point(|r| (r.base_row + r.rows) * l <= p);
            while p < elems.end {
                if !(ri < runs.len() && runs[ri].base_row * l <= p) {
                    let next =
                        if ri < runs.len() { (runs[ri].base_row * l).min(elems.end) } else { elems.end };
                    out.push((p, next, Seg::Convert(base.slice(p as usize, (next - p) as usize))));
                    p = next;
                    continue;
                }
                let r = runs[ri];
                let run_end = (r.base_row + r.rows) * l;
                let end = run_end.min(elems.end);
                let n = (end - p) as usize;
                let v = (r.vector_row * l + (p - r.base_row * l)) as usize;
                let b = base.slice(p as usize, n);
                let seg = match *formula {
                    Formula::Diff { chat, pre } => {
                        Seg::Diff(plan.operand(chat).slice(v, n), plan.operand(pre).slice(v, n))
                    }
                    Formula::AddDiff { chat, pre, scale, .. } => {
                        Seg::AddDiff(b, plan.operand(chat).slice(v, n), plan.operand(pre).slice(v, n), scale)
                    }
                    Formula::AddScaled { vector, scale, .. } => {
                        Seg::AddScaled(b, plan.operand(vector).slice(v, n), scale)
                    }
                };
                out.push((p, end, seg));
                p = end;
                if end == run_end {
                    ri += 1;
                }
            }
        }
        Op::Copy(_) | Op::Merge(_) => unreachable!("not an arithmetic op"),
    }
    out
}

impl Gpu {
    /// Enqueues elements `elems` of tensor `t` in slot `slot`; `collect`
    /// returns the output bytes.
    pub fn enqueue(
        &self,
        slot: usize,
        plan: &Plan,
        t: &OutTensor,
        stats: Option<&TensorStats>,
        elems: Range<u64>,
    ) -> Result<()> {
        let out_ty = t.dtype.float().expect("plan checked float dtypes");
        match &t.op {
            Op::Merge(m) => self.enqueue_merge(
                slot,
                plan,
                m,
                stats.expect("stats before chunks"),
                out_ty,
                t.numel(),
                elems,
            ),
            op => self.enqueue_arith(slot, plan, op, out_ty, elems),
        }
    }

    fn enqueue_arith(
        &self,
        slot: usize,
        plan: &Plan,
        op: &Op,
        out_ty: FloatType,
        elems: Range<u64>,
    ) -> Result<()> {
        let segs = segments(plan, op, &elems);
        let ops: Vec<Vec<Operand>> = segs.iter().map(|(_, _, s)| s.operands()).collect();
        let parts: Vec<&[u8]> = ops.iter().flatten().map(|o| o.bytes).collect();
        let os = out_ty.size();
        let len = (elems.end - elems.start) as usize * os;
        let offsets = self.upload(slot, &parts, 0, len)?;
        let (inp, _, out) = self.slot_ptrs(slot);
        let mut at = offsets.iter().map(|o| inp + *o as u64);
        let sfx = suffix(out_ty);
        for ((a, b, seg), o) in segs.iter().zip(&ops) {
            let n = b - a;
            let dst = out + (a - elems.start) * os as u64;
            let cfg = self.grid(n);
            let mut next = || (at.next().expect("one offset per operand"), 0);
            let mut operand = |k: usize| {
                let (p, _) = next();
                (p, ty_code(o[k].ty))
            };
            match *seg {
                Seg::Convert(_) => {
                    let (x, tx) = operand(0);
                    launch!(self, &format!("convert_{sfx}"), cfg, [dst, x, tx, n])?
                }
                Seg::Diff(..) => {
                    let ((c, tc), (p, tp)) = (operand(0), operand(1));
                    launch!(self, &format!("diff_{sfx}"), cfg, [dst, c, tc, p, tp, n])?
                }
                Seg::AddDiff(_, _, _, scale) => {
                    let ((bb, tb), (c, tc), (p, tp)) = (operand(0), operand(1), operand(2));
                    launch!(self, &format!("add_diff_{sfx}"), cfg, [dst, bb, tb, c, tc, p, tp, scale, n])?
                }
                Seg::AddScaled(_, _, scale) => {
                    let ((bb, tb), (v, tv)) = (operand(0), operand(1));
                    launch!(self, &format!("add_scaled_{sfx}"), cfg, [dst, bb, tb, v, tv, scale, n])?
                }
            }
        }
        self.download(slot, 0, len)
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue_merge(
        &self,
        slot: usize,
        plan: &Plan,
        m: &MergeOp,
        st: &TensorStats,
        out_ty: FloatType,
        numel: u64,
        elems: Range<u64>,
    ) -> Result<()> {
        let p = &m.params;
        let k = m.models.len();
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
        let base = m.base_view(plan);
        let mut staged = Vec::new();
        if let Some(b) = base {
            staged.push(stage(b, range.start, n as usize));
        }
        for i in 0..k {
            staged.push(stage(m.view(plan, i), range.start, n as usize));
        }
        let parts: Vec<&[u8]> = staged.iter().map(|s| &s.bytes[..]).collect();
        let os = out_ty.size();
        let f = 4 * n;
        let offsets = self.upload(slot, &parts, ((k + 2) as u64 * f) as usize, n as usize * os)?;
        let (inp, work, out) = self.slot_ptrs(slot);
        let (b_ptr, x_ptr, r_ptr) = (work, |i: usize| work + (1 + i as u64) * f, work + (k as u64 + 1) * f);
        let cfg = self.grid(n);
        // Operand j goes to f32 slot j (base first) or j + 1 (no base).
        let first = if base.is_some() { 0 } else { 1 };
        for (j, (s, off)) in staged.iter().zip(&offsets).enumerate() {
            let dst = work + (first + j) as u64 * f;
            launch!(self, "decode_f32", cfg, [dst, inp + *off as u64, ty_code(s.ty), n])?;
        }
        let weights: Vec<f32> = p.models.iter().map(|mp| mp.weight as f32).collect();
        let weight_sum = weights.iter().fold(0f32, |a, w| a + w);
        let w_dev = self.small(&weights)?;
        let w_ptr = self.ptr(&w_dev);
        let ki = k as i32;
        let mut _keep_alive = Vec::new();
        match m.method {
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
                let t = self.small(&st.stock_t)?;
                let t_ptr = self.ptr(&t);
                _keep_alive.push(t);
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
                let (consensus, normalize) = (m.method.consensus() as i32, p.normalize as i32);
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
        self.download(slot, 0, len as usize * os)?;
        // Parameter buffers are freed in stream order after the kernels.
        drop(w_dev);
        Ok(())
    }

    /// Masks, rescales and weights one model's deltas at `x` (elements
    /// `start..start + n` of the tensor), as `merge_compute::sparsify_block`.
    pub fn sparsify(
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
                assert_eq!(start % STAT_BLOCK, 0, "rank masks start on a stats block");
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
    pub fn della_ranks(&self, d: u64, n: u64, row_len: u64) -> Result<cudarc::driver::CudaSlice<u32>> {
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
