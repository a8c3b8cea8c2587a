//! A plan cut into jobs, and what one job does: a shard header to write,
//! a byte range of an input to copy, or an element range of an output
//! tensor to compute (on the CPU here, or through the GPU's slots). Every
//! job is a pure function of the plan, so the bytes never depend on how
//! many run at once or where.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bumpalo::Bump;

use crate::arith::formulas::Rounding;
use crate::arith::requant::{Fp8Tiles, QuantError, mxfp4_band, quantize_band};
use crate::arith::rows::{RowRun, stretches};
use crate::cuda::{Gpu, GpuPasses};
use crate::error::{Error, Result};
use crate::exec::input_hash::Touch;
use crate::merge::{
    element,
    stats::{self, TensorStats},
};
use crate::model::dtype::{FloatType, any_nonfinite, nonfinite};
use crate::plan::{Formula, Op, OutTensor, Plan, Requantized, Role, Source};

/// Bytes per plain copy job.
const COPY_CHUNK_BYTES: u64 = 16 << 20;

/// The most scale bytes codes jobs keep for their scales jobs
/// (`Plan::requant`'s stash): MXFP4's scales are a sixteenth of its
/// blocks, so a gpt-oss-120b expert tensor's would be 63 MiB.
const STASH_BYTES: usize = 16 << 20;

#[derive(Clone)]
pub(crate) enum Job {
    /// Start shard `n`: its header bytes.
    Header(usize),
    /// Copy `bytes` of an input tensor.
    Copy { src: Source, bytes: Range<u64> },
    /// Compute elements `elems` of output tensor `tensor`.
    Compute { tensor: usize, elems: Range<u64> },
}

/// A job's output bytes: borrowed from the plan or an input map, or
/// computed into a buffer that is recycled after writing, or one buffer
/// that several outputs (a sweep's candidates) write alike.
pub(crate) enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

impl<'a> Piece<'a> {
    /// The same piece for another output: a borrowed or shared one is
    /// shared, an owned one's bytes are copied.
    pub(crate) fn borrowed(&self) -> Piece<'a> {
        match self {
            Piece::Borrowed(b) => Piece::Borrowed(b),
            Piece::Owned(v) => Piece::Owned(v.clone()),
            Piece::Shared(a) => Piece::Shared(a.clone()),
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Piece::Borrowed(b) => b,
            Piece::Owned(v) => v,
            Piece::Shared(a) => a,
        }
    }

    /// The buffer to recycle once the piece is written: an owned one, or
    /// a shared one's by whichever output writes it last.
    pub(crate) fn into_buffer(self) -> Option<Vec<u8>> {
        match self {
            Piece::Borrowed(_) => None,
            Piece::Owned(v) => Some(v),
            Piece::Shared(a) => Arc::try_unwrap(a).ok(),
        }
    }
}

/// The plan's jobs in the order they run, and the output shard of each.
pub(crate) struct Schedule {
    pub jobs: Vec<Job>,
    /// The output shard each job writes into.
    pub shard: Vec<usize>,
    /// Per output shard, the index of its last job.
    pub last_of_shard: Vec<usize>,
    /// Per output tensor, the index of its last job (0 for none).
    last_of_tensor: Vec<usize>,
}

impl Schedule {
    /// Whether tensor `t` has jobs at or after job `index`.
    pub(crate) fn tensor_ahead(&self, t: usize, index: usize) -> bool {
        self.last_of_tensor.get(t).is_some_and(|&last| last >= index)
    }
}

/// The plan's jobs, with `lanes` output shards filled side by side (so as
/// many output files are written and hashed at once: one sha256 stream per
/// file would otherwise gate the run). Each shard's own jobs keep their
/// order (its header, then per tensor copies of `COPY_CHUNK_BYTES` or
/// computations of `chunk_elems`), so its bytes do not depend on `lanes`.
/// The next job always comes from the open shard with the fewest bytes
/// handed out, so the files grow at the same pace; when one is done the
/// next shard opens in its place.
pub(crate) fn schedule(plan: &Plan, chunk_elems: u64, lanes: usize) -> Schedule {
    let per_shard: Vec<Vec<Job>> = (0..plan.shards.len()).map(|si| cut(plan, si, chunk_elems)).collect();
    let total: usize = per_shard.iter().map(Vec::len).sum();
    let mut sched = Schedule {
        jobs: Vec::with_capacity(total),
        shard: Vec::with_capacity(total),
        last_of_shard: vec![0; plan.shards.len()],
        last_of_tensor: vec![0; plan.tensors.len()],
    };
    let mut queued = per_shard.into_iter().map(|jobs| jobs.into_iter()).enumerate();
    // Open shards: (bytes handed out, shard, its remaining jobs).
    let mut open: Vec<(u64, usize, std::vec::IntoIter<Job>)> = Vec::new();
    loop {
        while open.len() < lanes.max(1)
            && let Some((si, jobs)) = queued.next()
        {
            // Level with the slowest open shard, so it does not take every
            // turn until it has caught up.
            let level = open.iter().map(|o| o.0).min().unwrap_or(0);
            open.push((level, si, jobs));
        }
        let Some(at) = (0..open.len()).min_by_key(|&i| (open[i].0, open[i].1)) else { break };
        let (bytes, si, jobs) = &mut open[at];
        match jobs.next() {
            Some(job) => {
                *bytes += job_bytes(plan, &job);
                let index = sched.jobs.len();
                if let Job::Compute { tensor, .. } = job {
                    sched.last_of_tensor[tensor] = index;
                }
                sched.last_of_shard[*si] = index;
                sched.shard.push(*si);
                sched.jobs.push(job);
            }
            None => {
                open.swap_remove(at);
            }
        }
    }
    sched
}

/// About the output bytes `job` writes (for pacing the shards only).
fn job_bytes(plan: &Plan, job: &Job) -> u64 {
    match job {
        Job::Header(si) => plan.shards[*si].header.len() as u64,
        Job::Copy { bytes, .. } => bytes.end - bytes.start,
        Job::Compute { tensor, elems } => {
            let t = &plan.tensors[*tensor];
            t.bytes() * (elems.end - elems.start) / t.numel().max(1)
        }
    }
}

/// Output shard `si`'s jobs in order: its header, then per tensor copies
/// of `COPY_CHUNK_BYTES` or computations of `chunk_elems`.
fn cut(plan: &Plan, si: usize, chunk_elems: u64) -> Vec<Job> {
    let pieces = |len: u64, step: u64| {
        (0..len.div_ceil(step.max(1))).map(move |i| i * step..((i + 1) * step).min(len))
    };
    let mut jobs = vec![Job::Header(si)];
    for ti in plan.shards[si].tensors.clone() {
        let t = &plan.tensors[ti];
        match &t.op {
            Op::Copy(src) => {
                jobs.extend(pieces(t.bytes(), COPY_CHUNK_BYTES).map(|bytes| Job::Copy { src: *src, bytes }))
            }
            Op::Convert(_) | Op::Arith { .. } | Op::Merge(_) | Op::AddVectors(_) => {
                // An FP8 weight in whole bands of block rows, so each
                // block's amax is inside one job.
                let step = match plan.requant.weights.get(&ti) {
                    Some(Requantized::Fp8 { block, .. }) => {
                        let band = block[0] * t.shape[1];
                        (chunk_elems / band).max(1) * band
                    }
                    Some(&Requantized::Mxfp4 { experts, cols, rows }) => {
                        jobs.extend(mxfp4_bands(ti, [experts, cols, rows], false, chunk_elems));
                        continue;
                    }
                    None => chunk_elems,
                };
                jobs.extend(pieces(t.numel(), step).map(|elems| Job::Compute { tensor: ti, elems }))
            }
            Op::QuantScales(w) => match plan.requant.weights.get(w) {
                Some(&Requantized::Mxfp4 { experts, cols, rows }) => {
                    jobs.extend(mxfp4_bands(ti, [experts, cols, rows], true, chunk_elems))
                }
                // Small; computed band by band inside the job.
                _ => jobs.push(Job::Compute { tensor: ti, elems: 0..t.numel() }),
            },
        }
    }
    jobs
}

/// The jobs of an MXFP4 weight `[experts, cols, rows]` written as output
/// tensor `tensor`: bands of whole block rows (every group of a row in one
/// job) inside one expert, about `chunk_elems` values each, as byte ranges
/// of its blocks (or, with `scales`, of its scales).
fn mxfp4_bands(tensor: usize, [experts, cols, rows]: [u64; 3], scales: bool, chunk_elems: u64) -> Vec<Job> {
    let per_row = Requantized::mxfp4_row_bytes(cols, scales);
    let band = (chunk_elems / cols.max(1)).max(1);
    let mut jobs = Vec::new();
    for e in 0..experts {
        for r0 in (0..rows).step_by(band as usize) {
            let r1 = (r0 + band).min(rows);
            jobs.push(Job::Compute { tensor, elems: (e * rows + r0) * per_row..(e * rows + r1) * per_row });
        }
    }
    jobs
}

/// Statistics of the merged tensors being computed, by tensor index.
pub(crate) type StatsMap = HashMap<usize, Arc<TensorStats>>;

/// Runs `job` on the CPU; a computed job fills `buf` (recycled).
pub(crate) fn run<'a>(plan: &'a Plan, stats: &StatsMap, job: &Job, mut buf: Vec<u8>) -> Result<Piece<'a>> {
    match job {
        Job::Header(si) => Ok(Piece::Borrowed(&plan.shards[*si].header)),
        Job::Copy { src, bytes } => {
            let piece = &plan.input_bytes(*src)[bytes.start as usize..bytes.end as usize];
            check_adapter_copy(plan, *src, piece)?;
            Ok(Piece::Borrowed(piece))
        }
        Job::Compute { tensor, elems } => {
            let t = &plan.tensors[*tensor];
            match plan.requant.weights.get(tensor) {
                Some(&Requantized::Fp8 { block, pow2 }) => {
                    return fp8_codes(plan, *tensor, block, pow2, elems, buf);
                }
                Some(&Requantized::Mxfp4 { cols, rows, .. }) => {
                    return mxfp4_piece(plan, *tensor, [cols, rows], elems, false, buf);
                }
                None => {}
            }
            if let Op::QuantScales(weight) = t.op {
                return match plan.requant.weights.get(&weight) {
                    Some(&Requantized::Mxfp4 { cols, rows, .. }) => {
                        mxfp4_piece(plan, weight, [cols, rows], elems, true, buf)
                    }
                    _ => fp8_scales(plan, weight, buf),
                };
            }
            let out_ty = float_out(t)?;
            sized(&mut buf, (elems.end - elems.start) as usize * out_ty.size());
            let at = |p: u64| ((p - elems.start) as usize) * out_ty.size();
            match &t.op {
                Op::Merge(m) => {
                    let st = stats.get(tensor).ok_or_else(|| missing_stats(t))?;
                    m.with_inputs(plan, |inputs| {
                        element::compute(inputs, &m.merge, st, out_ty, elems.clone(), &mut buf)
                    });
                }
                _ => {
                    let arena = Bump::new();
                    for (r, seg) in plan.segments(*tensor, elems, 0, &arena) {
                        seg.compute(out_ty, &mut buf[at(r.start)..at(r.end)]);
                    }
                }
            }
            check_finite(plan, t, &buf)?;
            Ok(Piece::Owned(buf))
        }
    }
}

/// Elements `elems` of output tensor `tensor` (a Convert, Arith or
/// AddVectors op) as f32 values, checked finite: what an FP8 weight is
/// quantized from.
fn f32_values(plan: &Plan, tensor: usize, elems: &Range<u64>) -> Result<Vec<f32>> {
    let n = (elems.end - elems.start) as usize;
    let mut bytes = vec![0u8; n * 4];
    let arena = Bump::new();
    for (r, seg) in plan.segments(tensor, elems, 0, &arena) {
        let at = |p: u64| ((p - elems.start) as usize) * 4;
        seg.compute(FloatType::F32, &mut bytes[at(r.start)..at(r.end)]);
    }
    check_finite_as(plan, &plan.tensors[tensor], FloatType::F32, &bytes)?;
    let mut values = vec![0f32; n];
    crate::model::dtype::decode(FloatType::F32, &bytes, &mut values);
    Ok(values)
}

/// The FP8 codes of elements `elems` (whole bands of block rows) of
/// weight `tensor`, quantized again in `block`s (`arith::requant`).
fn fp8_codes<'a>(
    plan: &'a Plan,
    tensor: usize,
    block: [u64; 2],
    pow2: bool,
    elems: &Range<u64>,
    mut buf: Vec<u8>,
) -> Result<Piece<'a>> {
    let cols = plan.tensors[tensor].shape[1] as usize;
    let values = f32_values(plan, tensor, elems)?;
    sized(&mut buf, values.len());
    let tiles = Fp8Tiles { block: [block[0] as usize, block[1] as usize], pow2 };
    // Band by band of block rows, each band's scales and error kept for
    // the scales job.
    let band = tiles.block[0] * cols;
    let mut inv = vec![0f32; cols / tiles.block[1]];
    // `plan::requant` puts each weight's scales right after it.
    let scales_dtype = plan.tensors[tensor + 1].dtype;
    for (k, (x, codes)) in values.chunks(band).zip(buf.chunks_mut(band)).enumerate() {
        let mut err = QuantError::default();
        quantize_band(x, cols, tiles, codes, &mut inv, Some(&mut err));
        let mut bytes = Vec::new();
        push_inv(&inv, scales_dtype, &mut bytes);
        stash_put(plan, tensor, elems.start + (k * band) as u64, bytes, err)?;
    }
    Ok(Piece::Owned(buf))
}

/// Appends inverse scales as `dtype` stores them: f32, or for E8M0 the
/// exponent byte of each (a power of two under ue8m0, so exact).
fn push_inv(inv: &[f32], dtype: crate::model::dtype::DType, out: &mut Vec<u8>) {
    if dtype == crate::model::dtype::DType::F32 {
        let at = out.len();
        out.resize(at + inv.len() * 4, 0);
        crate::model::dtype::encode(FloatType::F32, inv, &mut out[at..]);
    } else {
        out.extend(inv.iter().map(|v| (v.to_bits() >> 23) as u8));
    }
}

/// Keeps a band's scales and error for its scales job, unless the stash
/// is full.
fn stash_put(plan: &Plan, weight: usize, band: u64, scales: Vec<u8>, err: QuantError) -> Result<()> {
    let mut stash = plan.requant.stash.lock().map_err(|_| Error::Internal("scale stash poisoned".into()))?;
    if stash.missed.remove(&(weight, band)) {
        return Ok(());
    }
    if stash.bytes + scales.len() <= STASH_BYTES {
        stash.bytes += scales.len();
        stash.bands.insert((weight, band), (scales, err));
    }
    Ok(())
}

/// A band's scales and error a codes job kept, taken out of the stash.
fn stash_take(plan: &Plan, weight: usize, band: u64) -> Result<Option<(Vec<u8>, QuantError)>> {
    let mut stash = plan.requant.stash.lock().map_err(|_| Error::Internal("scale stash poisoned".into()))?;
    let found = stash.bands.remove(&(weight, band));
    match &found {
        Some((s, _)) => stash.bytes -= s.len(),
        None => {
            stash.missed.insert((weight, band));
        }
    }
    Ok(found)
}

/// The inverse scales of FP8 weight `weight`, band of block rows by
/// band: kept by its codes jobs, or computed again from the same f32
/// values and function. Adds the quantization error to
/// `plan.requant.error`.
fn fp8_scales<'a>(plan: &'a Plan, weight: usize, mut buf: Vec<u8>) -> Result<Piece<'a>> {
    let w = &plan.tensors[weight];
    let Some(&Requantized::Fp8 { block, pow2 }) = plan.requant.weights.get(&weight) else {
        return Err(Error::Internal(format!("scales of '{}', which is not written as FP8", w.name)));
    };
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let tiles = Fp8Tiles { block: [block[0] as usize, block[1] as usize], pow2 };
    let band = block[0] * cols;
    let mut inv = vec![0f32; cols as usize / tiles.block[1]];
    let scales_dtype = plan.tensors[weight + 1].dtype;
    let mut codes = Vec::new();
    buf.clear();
    for start in (0..rows * cols).step_by(band as usize) {
        if let Some((bytes, e)) = stash_take(plan, weight, start)? {
            buf.extend_from_slice(&bytes);
            add_error(plan, weight, start, e)?;
            continue;
        }
        let values = f32_values(plan, weight, &(start..start + band))?;
        codes.resize(values.len(), 0);
        let mut err = QuantError::default();
        quantize_band(&values, cols as usize, tiles, &mut codes, &mut inv, Some(&mut err));
        add_error(plan, weight, start, err)?;
        push_inv(&inv, scales_dtype, &mut buf);
    }
    Ok(Piece::Owned(buf))
}

/// Records band `band`'s quantization error of weight `weight`.
fn add_error(plan: &Plan, weight: usize, band: u64, mut err: QuantError) -> Result<()> {
    err.worst_tensor.clone_from(&plan.tensors[weight].name);
    plan.requant
        .error
        .lock()
        .map_err(|_| Error::Internal("quantization error sums poisoned".into()))?
        .insert((weight, band), err);
    Ok(())
}

/// One band of MXFP4 weight `weight` (the float tensor `[experts, cols,
/// rows]`): `elems`, a byte range of its blocks (or with `scales`, of its
/// scales, adding the band's error to the plan's sums), covers whole rows
/// of one expert. Its f32 values are computed column by column (a row of
/// the blocks is a column of the float tensor) and quantized by
/// `arith::requant::mxfp4_band`, the same for both tensors.
fn mxfp4_piece<'a>(
    plan: &'a Plan,
    weight: usize,
    [cols, rows]: [u64; 2],
    elems: &Range<u64>,
    scales: bool,
    mut buf: Vec<u8>,
) -> Result<Piece<'a>> {
    let per_row = Requantized::mxfp4_row_bytes(cols, scales);
    let (first, band) = (elems.start / per_row, (elems.end - elems.start) / per_row);
    let (e, r0) = (first / rows, first % rows);
    let n = band as usize;
    if scales && let Some((bytes, err)) = stash_take(plan, weight, first)? {
        add_error(plan, weight, first, err)?;
        buf.clear();
        buf.extend_from_slice(&bytes);
        return Ok(Piece::Owned(buf));
    }
    let mut bytes = vec![0u8; cols as usize * n * 4];
    let mut arena = Bump::new();
    for (c, out) in bytes.chunks_exact_mut(n * 4).enumerate() {
        let at = (e * cols + c as u64) * rows + r0;
        for (r, seg) in plan.segments(weight, &(at..at + band), 0, &arena) {
            seg.compute(FloatType::F32, &mut out[(r.start - at) as usize * 4..(r.end - at) as usize * 4]);
        }
        arena.reset();
    }
    check_finite_as(plan, &plan.tensors[weight], FloatType::F32, &bytes)?;
    let mut values = vec![0f32; cols as usize * n];
    crate::model::dtype::decode(FloatType::F32, &bytes, &mut values);
    drop(bytes);
    let mut sc = vec![0u8; n * cols as usize / 32];
    let mut blocks = if scales { vec![0u8; n * cols as usize / 2] } else { std::mem::take(&mut buf) };
    sized(&mut blocks, n * cols as usize / 2);
    let mut err = QuantError::default();
    mxfp4_band(&values, n, &mut blocks, &mut sc, Some(&mut err));
    if !scales {
        stash_put(plan, weight, first, sc, err)?;
        return Ok(Piece::Owned(blocks));
    }
    add_error(plan, weight, first, err)?;
    buf.clear();
    buf.extend_from_slice(&sc);
    Ok(Piece::Owned(buf))
}

/// Makes a recycled buffer `len` bytes long without zeroing what it
/// already holds: every computed job overwrites its whole buffer, and
/// clearing 2 bytes per output element cost 4% of a CPU-bound apply.
fn sized(buf: &mut Vec<u8>, len: usize) {
    buf.truncate(len);
    buf.resize(len, 0);
}

/// Runs `job` once per variant of the plan (a sweep's candidates), one
/// piece each: the operands of an arithmetic job are decoded once for all
/// of them; other jobs are the same for every variant. Each piece equals
/// what `run` gives on a plan with only that variant's scales; with each,
/// what rounding did to the vector's change (counted as it is computed).
pub(crate) fn run_many<'a>(
    plan: &'a Plan,
    stats: &StatsMap,
    job: &Job,
    mut bufs: Vec<Vec<u8>>,
) -> Result<(Vec<Piece<'a>>, Vec<Rounding>)> {
    let n = plan.variants();
    let none = vec![Rounding::default(); n];
    let Job::Compute { tensor, elems } = job else {
        let one = run(plan, stats, job, Vec::new())?;
        return Ok(((0..n).map(|_| one.borrowed()).collect(), none));
    };
    let t = &plan.tensors[*tensor];
    let requantized = plan.requant.weights.contains_key(tensor);
    let (Op::Arith { .. } | Op::AddVectors(_), false) = (&t.op, requantized) else {
        // No scale: computed once, the same bytes for every variant,
        // written by each from one shared buffer.
        let one = match run(plan, stats, job, bufs.pop().unwrap_or_default())? {
            Piece::Owned(v) if n > 1 => Piece::Shared(Arc::new(v)),
            other => other,
        };
        return Ok(((0..n).map(|_| one.borrowed()).collect(), none));
    };
    let scales: Vec<f32> = (0..n).map(|k| plan.scale(k, *tensor).unwrap_or(1.0)).collect();
    let out_ty = float_out(t)?;
    let len = (elems.end - elems.start) as usize * out_ty.size();
    bufs.resize_with(n, Vec::new);
    for b in &mut bufs {
        sized(b, len);
    }
    let at = |p: u64| ((p - elems.start) as usize) * out_ty.size();
    let mut rounding = none;
    let mut bad = vec![false; n];
    let arena = Bump::new();
    for (r, seg) in plan.segments(*tensor, elems, 0, &arena) {
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[at(r.start)..at(r.end)]).collect();
        seg.compute_scales(out_ty, &mut outs, &scales, &mut rounding, &mut bad, r.start);
    }
    // Checked block by block as computed; an output with a NaN or infinity
    // is then looked at whole (are the inputs to blame?).
    for (b, _) in bufs.iter().zip(&bad).filter(|(_, bad)| **bad) {
        check_finite(plan, t, b)?;
    }
    Ok((bufs.into_iter().map(Piece::Owned).collect(), rounding))
}

/// What rounding did to the vector's change in `job`'s output `piece`
/// computed on the GPU, counted from its bytes on the CPU as `run_many`
/// counts while it computes (see `Segment::rounding`).
pub(crate) fn gpu_rounding(plan: &Plan, job: &Job, piece: &Piece<'_>) -> Rounding {
    let Job::Compute { tensor, elems } = job else { return Rounding::default() };
    let t = &plan.tensors[*tensor];
    let (Op::Arith { .. }, Some(out_ty)) = (&t.op, t.dtype.float()) else { return Rounding::default() };
    let at = |p: u64| ((p - elems.start) as usize) * out_ty.size();
    let mut total = Rounding::default();
    let arena = Bump::new();
    for (r, seg) in plan.segments(*tensor, elems, 0, &arena) {
        total += seg.rounding(out_ty, &piece.bytes()[at(r.start)..at(r.end)], r.start);
    }
    total
}

/// The input tensors an op reads.
fn sources(op: &Op) -> Vec<Source> {
    match op {
        Op::Copy(s) | Op::Convert(s) => vec![*s],
        Op::Arith { formula, .. } => {
            std::iter::once(formula.base()).chain(formula.vector_sources()).collect()
        }
        Op::Merge(m) => {
            m.base.iter().chain(&m.models).chain(m.union.iter().flat_map(|u| &u.sources)).copied().collect()
        }
        Op::AddVectors(v) => std::iter::once(v.base).chain(v.vector_sources()).collect(),
        // Its weight's (read through it).
        Op::QuantScales(_) => Vec::new(),
    }
}

/// Fails when the computed `out` (elements of tensor `t`) holds NaN or
/// infinity although no input of `t` holds any: an overflow (a weight,
/// scale or lambda too large for f32) would otherwise write a broken model
/// with exit 0. Inputs are only scanned when the output has such values.
pub(crate) fn check_finite(plan: &Plan, t: &OutTensor, out: &[u8]) -> Result<()> {
    check_finite_as(plan, t, float_out(t)?, out)
}

/// `check_finite` of `out` read as `ty` (an FP8 weight's f32 values).
fn check_finite_as(plan: &Plan, t: &OutTensor, ty: FloatType, out: &[u8]) -> Result<()> {
    if !any_nonfinite(ty, out) {
        return Ok(());
    }
    let bad = nonfinite(ty, out);
    let dirty = |s: Source| match plan.input_tensor(s).dtype.float() {
        Some(ity) => any_nonfinite(ity, plan.input_bytes(s)),
        None => false,
    };
    let op = match &t.op {
        Op::QuantScales(w) => &plan.tensors[*w].op,
        op => op,
    };
    let mut srcs = sources(op);
    // A `model+lora` input is read with its adapter's tensors.
    let patches: Vec<Source> = srcs.iter().flat_map(|s| plan.patch_sources(*s)).collect();
    srcs.extend(patches);
    // A base with NaN stays the user's model; an adapter's NaN never
    // passes into it.
    if let Some(&s) = srcs.iter().find(|&&s| plan.inputs[s.input].role == Role::Adapter && dirty(s)) {
        return Err(adapter_nonfinite(plan, s, &t.name, bad));
    }
    if srcs.iter().any(|&s| dirty(s)) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "tensor '{}': the output has {bad} NaN or infinite value(s) in one chunk, and its inputs have none: \
         a weight, scale or lambda overflows f32",
        t.name
    ))
    .with_hint("use smaller parameters; nothing was written"))
}

/// The error for NaN or infinity of the adapter's tensor `s` reaching
/// output tensor `name` (`bad` values in the chunk).
fn adapter_nonfinite(plan: &Plan, s: Source, name: &str, bad: usize) -> Error {
    Error::Usage(format!(
        "tensor '{name}': {bad} NaN or infinite value(s) in one chunk come from the adapter's tensor '{}' ({}), which holds such values",
        plan.input_tensor(s).name,
        plan.inputs[s.input].ckpt.dir.display()
    ))
    .with_hint("the adapter is broken (a diverged training run?); nothing was written")
}

/// Fails when a chunk copied whole from an adapter (`modules_to_save`, a
/// saved layer) holds NaN or infinity.
fn check_adapter_copy(plan: &Plan, src: Source, bytes: &[u8]) -> Result<()> {
    if plan.inputs[src.input].role != Role::Adapter {
        return Ok(());
    }
    match plan.input_tensor(src).dtype.float() {
        Some(ty) if any_nonfinite(ty, bytes) => {
            Err(adapter_nonfinite(plan, src, &plan.input_tensor(src).name, nonfinite(ty, bytes)))
        }
        _ => Ok(()),
    }
}

/// The float dtype of a computed output (planning only computes floats).
fn float_out(t: &OutTensor) -> Result<FloatType> {
    t.dtype
        .float()
        .ok_or_else(|| Error::Internal(format!("tensor '{}' is computed but is {}", t.name, t.dtype)))
}

fn missing_stats(t: &OutTensor) -> Error {
    Error::Internal(format!("merged tensor '{}' reached the element pass without its statistics", t.name))
}

/// The float elements a compute job reads: its own range, or for an MXFP4
/// band (a byte range of the blocks), what it has read of its weight once
/// done: a band reads a run of every column of its expert, so what lies
/// before the expert is read, and the expert too once its last band is.
fn logical_elems(plan: &Plan, tensor: usize, elems: &Range<u64>) -> Range<u64> {
    let Some(&Requantized::Mxfp4 { cols, rows, .. }) = plan.requant.weights.get(&tensor) else {
        return elems.clone();
    };
    let per_row = Requantized::mxfp4_row_bytes(cols, false);
    let (first, last) = (elems.start / per_row, elems.end / per_row);
    let e = first / rows;
    let end = if last == (e + 1) * rows { e + 1 } else { e } * cols * rows;
    e * cols * rows..end
}

/// The end of the input bytes `job` reads, per source: `(input, touch)`.
pub(crate) fn touches(plan: &Plan, job: &Job, mut f: impl FnMut(usize, Touch)) {
    let mut report = |src: Source, end_elem: u64, size: u64| {
        let t = plan.input_tensor(src);
        // A quantized tensor holds fewer bytes than elements (its scales
        // are elsewhere): the share of its bytes read so far.
        let end = match &t.quant {
            Some(_) => t.len * end_elem.min(t.numel()) / t.numel().max(1),
            None => (end_elem * size).min(t.len),
        };
        f(src.input, Touch { shard: t.shard, end: t.start + end });
    };
    let size = |s: Source| plan.input_tensor(s).dtype.float().map_or(1, |t| t.size() as u64);
    match job {
        Job::Header(_) => {}
        Job::Copy { src, bytes } => report(*src, bytes.end, 1),
        Job::Compute { tensor, elems } => {
            let elems = &logical_elems(plan, *tensor, elems);
            match &plan.tensors[*tensor].op {
                // Its weight's jobs report what both read.
                Op::Copy(_) | Op::QuantScales(_) => {}
                Op::Convert(src) => report(*src, elems.end, size(*src)),
                Op::Merge(m) => {
                    // Inputs with other vocabularies have other sizes; the
                    // hasher reads whatever was not reported at the end.
                    for &s in m.base.iter().chain(&m.models) {
                        report(s, elems.end.min(plan.input_tensor(s).numel()), size(s));
                    }
                }
                Op::Arith { formula: Formula::AddLowRank { base, a, b, .. }, .. } => {
                    report(*base, elems.end, size(*base));
                    // Every chunk reads the factors whole.
                    for f in [*a, *b] {
                        report(f, plan.input_tensor(f).numel(), size(f));
                    }
                }
                Op::Arith { formula, runs, row_len } => {
                    let base = formula.base();
                    report(base, elems.end, size(base));
                    if let Some(v_end) = vector_end(runs, *row_len, elems) {
                        for vs in formula.vector_sources() {
                            report(vs, v_end, size(vs));
                        }
                    }
                }
                Op::AddVectors(v) => {
                    report(v.base, elems.end, size(v.base));
                    for t in &v.terms {
                        if let Some(v_end) = vector_end(&t.runs, t.row_len, elems) {
                            for vs in std::iter::once(t.x).chain(t.pre) {
                                report(vs, v_end, size(vs));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The furthest vector element a chunk over `elems` reads through `runs`.
fn vector_end(runs: &[RowRun], row_len: u64, elems: &Range<u64>) -> Option<u64> {
    stretches(runs, row_len, elems.clone())
        .filter_map(|s| s.vector.map(|v| v + (s.range.end - s.range.start)))
        .max()
}

/// Whether `prepare_stats` has statistics to compute for `group`.
pub(crate) fn needs_stats(plan: &Plan, group: &[Job], stats: &StatsMap) -> bool {
    group.iter().any(|job| {
        matches!(job, Job::Compute { tensor, .. }
            if matches!(plan.tensors[*tensor].op, Op::Merge(_)) && !stats.contains_key(tensor))
    })
}

/// Computes the statistics of the merged tensors `group` (the jobs from
/// index `first` of `sched`) computes, before their first chunk, and drops
/// those of tensors with no job left.
pub(crate) fn prepare_stats(
    plan: &Plan,
    sched: &Schedule,
    first: usize,
    group: &[Job],
    stats: &mut StatsMap,
    gpu: Option<&Gpu>,
) -> Result<()> {
    stats.retain(|&t, _| sched.tensor_ahead(t, first));
    for job in group {
        let Job::Compute { tensor, .. } = job else { continue };
        let t = &plan.tensors[*tensor];
        if let Op::Merge(m) = &t.op
            && !stats.contains_key(tensor)
        {
            let n = t.numel();
            let row_len = if t.shape.len() >= 2 { n / t.shape[0].max(1) } else { n.max(1) };
            let st = m.with_inputs(plan, |inputs| match gpu {
                Some(gpu) => {
                    let passes = GpuPasses { gpu, inputs, n, row_len };
                    stats::compute_with(&passes, &t.name, n, row_len, &m.merge)
                }
                None => stats::compute(inputs, &t.name, n, row_len, &m.merge),
            })?;
            stats.insert(*tensor, Arc::new(st));
        }
    }
    Ok(())
}

/// `check_finite` for a compute job's output.
pub(crate) fn check_computed(plan: &Plan, job: &Job, out: &[u8]) -> Result<()> {
    match job {
        Job::Compute { tensor, .. } => check_finite(plan, &plan.tensors[*tensor], out),
        _ => Ok(()),
    }
}

/// The most models any merged tensor of the plan reads (sizes GPU chunks).
pub(crate) fn max_models(plan: &Plan) -> usize {
    plan.tensors
        .iter()
        .map(|t| match &t.op {
            Op::Merge(m) => m.models.len(),
            _ => 2,
        })
        .max()
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::select::{Scale, Selection, Spelling};

    /// Writes an f32 safetensors model of `names` (each 2 x 4) whose
    /// values come from `seed`, with a config of `layers` layers.
    fn write_model(dir: &std::path::Path, names: &[&str], seed: f32, layers: u64) {
        std::fs::create_dir_all(dir).unwrap();
        let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
        for (k, name) in names.iter().enumerate() {
            let start = data.len();
            for i in 0..8 {
                data.extend_from_slice(&(seed * (k as f32 + 1.0) + 0.125 * i as f32).to_le_bytes());
            }
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": [2, 4], "data_offsets": [start, data.len()]}),
            );
        }
        let text = serde_json::to_vec(&header).unwrap();
        let mut file = (text.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&text);
        file.extend_from_slice(&data);
        std::fs::write(dir.join("model.safetensors"), file).unwrap();
        let config = serde_json::json!({"model_type": "llama", "num_hidden_layers": layers});
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }

    /// The tensors of the small models `small_apply` writes.
    const SMALL_MODEL: [&str; 6] = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight",
    ];

    /// The plan of a streaming apply over three small f32 models written
    /// into `root` (base, chat and pre, of seeds 1, 1.5 and 0.75), with
    /// these candidates, `--scale-for` rules and shard size.
    fn small_apply(
        root: &std::path::Path,
        candidates: Vec<Scale>,
        rules: Vec<String>,
        shard_size: u64,
    ) -> Plan {
        use crate::model::checkpoint::Checkpoint;
        use crate::plan::chat_vector::{ApplyOptions, Common, VectorSide, plan_apply};
        for (dir, seed) in [("base", 1.0), ("chat", 1.5), ("pre", 0.75)] {
            write_model(&root.join(dir), &SMALL_MODEL, seed, 2);
        }
        let open = |d: &str| Checkpoint::open(&root.join(d)).unwrap();
        let selection = Selection::new(&[], &[], &Scale::Constant(1.0), &rules, Spelling::Cli).unwrap();
        let opts = ApplyOptions {
            common: Common { selection, shard_size, allow_mismatch: false, expert_layout: None },
            embeddings: crate::params::embeddings::EmbeddingPolicy::Auto,
            out_dtype: None,
            candidates,
            vector_scales: Vec::new(),
        };
        let side = VectorSide::Streaming { chat: Box::new(open("chat")), pretrained: Box::new(open("pre")) };
        plan_apply(open("base"), vec![side], &opts).unwrap()
    }

    /// The GPU is handed `plan.segments(tensor, elems, 0)` of a
    /// one-variant plan; the CPU computes every variant of a sweep from
    /// the same plan. Both must take each tensor's scale from the plan's
    /// one record of it (`Plan::scales`), so per tensor and per candidate:
    /// the segments' scale is the one an independent reading of the
    /// candidate, its layer gradient and the `--scale-for` rule gives, and
    /// the CPU's piece equals those segments computed alone and an f64
    /// reference of `base + scale * (chat - pre)`.
    #[test]
    fn cpu_and_gpu_dispatch_read_each_candidates_scale_from_the_plan() {
        let root = tempfile::tempdir().unwrap();
        let names = SMALL_MODEL;
        let candidates = vec![Scale::Constant(0.5), Scale::Layers(vec![0.2, 1.0]), Scale::Constant(-1.5)];
        let plan = small_apply(root.path(), candidates.clone(), vec!["self_attn=0.25".to_string()], 1 << 30);
        assert_eq!(plan.variants(), 3);
        // The scale an independent reading gives: the rule for attention,
        // else the candidate, a gradient read at the layer's position
        // (embeddings first, lm_head last, layer i of 2 at i).
        let expected = |k: usize, name: &str| -> f64 {
            if name.contains("self_attn") {
                return 0.25;
            }
            match &candidates[k] {
                Scale::Constant(v) => f64::from(*v),
                Scale::Layers(a) => {
                    let t = if name.contains("layers.1.") || name.starts_with("lm_head") { 1.0 } else { 0.0 };
                    f64::from(a[0]) + t * (f64::from(a[1]) - f64::from(a[0]))
                }
            }
        };
        let stats = StatsMap::new();
        let mut checked = 0;
        for (i, t) in plan.tensors.iter().enumerate() {
            let elems = 0..t.numel();
            let job = Job::Compute { tensor: i, elems: elems.clone() };
            let (pieces, _) = run_many(&plan, &stats, &job, Vec::new()).unwrap();
            for (k, piece) in pieces.iter().enumerate() {
                let want = expected(k, &t.name);
                assert_eq!(
                    plan.scale(k, i).map(f64::from),
                    Some(want as f32 as f64),
                    "{} candidate {k}",
                    t.name
                );
                let arena = Bump::new();
                let segs = plan.segments(i, &elems, k, &arena);
                let mut alone = vec![0u8; t.numel() as usize * 4];
                for (r, seg) in &segs {
                    assert_eq!(
                        seg.scale().map(f64::from),
                        Some(want as f32 as f64),
                        "{} candidate {k}",
                        t.name
                    );
                    seg.compute(FloatType::F32, &mut alone[r.start as usize * 4..r.end as usize * 4]);
                }
                assert!(
                    piece.bytes() == alone.as_slice(),
                    "{} candidate {k}: CPU and segments differ",
                    t.name
                );
                let [b, c, p] = [1.0, 1.5, 0.75].map(|seed: f32| seed * (i as f32 + 1.0));
                for (e, got) in piece.bytes().chunks(4).enumerate() {
                    let x = |s: f32| f64::from(s + 0.125 * e as f32);
                    let reference = x(b) + want * (x(c) - x(p));
                    let got = f64::from(f32::from_le_bytes(got.try_into().unwrap()));
                    assert!(
                        (got - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                        "{} [{e}] candidate {k}: {got} vs {reference}",
                        t.name
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, names.len() * 3);
    }

    /// A job as comparable text.
    fn show(job: &Job) -> String {
        match job {
            Job::Header(si) => format!("header {si}"),
            Job::Copy { src, bytes } => format!("copy {src:?} {bytes:?}"),
            Job::Compute { tensor, elems } => format!("compute {tensor} {elems:?}"),
        }
    }

    /// The schedule with 1 to 4 shards side by side: every shard's jobs,
    /// each once and in its own order (so its bytes are the same), at most
    /// `lanes` shards open at any point and, from 2 lanes on, the second
    /// shard begun before the first is done; the indices it gives (each
    /// job's shard, each shard's last job, the tensors still ahead) agree
    /// with the order.
    #[test]
    fn a_schedule_fills_shards_side_by_side_each_in_its_own_order() {
        let root = tempfile::tempdir().unwrap();
        // Two 32-byte tensors per shard.
        let plan = small_apply(root.path(), vec![Scale::Constant(1.0)], Vec::new(), 64);
        let shards = plan.shards.len();
        assert_eq!(shards, 3);
        // Three jobs per tensor: headers, and computes of 3 elements.
        let chunk = 3;
        let own: Vec<Vec<String>> =
            (0..shards).map(|si| cut(&plan, si, chunk).iter().map(show).collect()).collect();
        for lanes in 1..=4 {
            let sched = schedule(&plan, chunk, lanes);
            assert_eq!(sched.jobs.len(), own.iter().map(Vec::len).sum::<usize>(), "{lanes} lanes");
            let mut seen: Vec<Vec<String>> = vec![Vec::new(); shards];
            let mut max_open = 0;
            for (i, job) in sched.jobs.iter().enumerate() {
                let si = sched.shard[i];
                seen[si].push(show(job));
                let open_now =
                    (0..shards).filter(|&s| !seen[s].is_empty() && seen[s].len() < own[s].len()).count();
                max_open = max_open.max(open_now);
                if let Job::Compute { tensor, .. } = job {
                    assert!(sched.tensor_ahead(*tensor, i), "{lanes} lanes: tensor {tensor} at job {i}");
                    let later = sched.jobs[i + 1..]
                        .iter()
                        .any(|j| matches!(j, Job::Compute { tensor: t, .. } if t == tensor));
                    assert_eq!(sched.tensor_ahead(*tensor, i + 1), later, "{lanes} lanes: tensor {tensor}");
                }
            }
            assert_eq!(seen, own, "{lanes} lanes: each shard's jobs in order");
            for (si, &last) in sched.last_of_shard.iter().enumerate() {
                assert_eq!(sched.shard[last], si);
                assert!(
                    sched.shard[last + 1..].iter().all(|&s| s != si),
                    "{lanes} lanes: shard {si} after its last"
                );
            }
            assert!(max_open <= lanes.min(shards), "{lanes} lanes: {max_open} open at once");
            let first_end = sched.last_of_shard[0];
            let second_start = sched.shard.iter().position(|&s| s == 1).unwrap();
            assert_eq!(
                second_start < first_end,
                lanes > 1,
                "{lanes} lanes: shard 1 begun before shard 0 ended"
            );
        }
    }
}
