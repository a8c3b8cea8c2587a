//! Streams a plan to disk on the CPU.
//!
//! The output is cut into jobs (a shard header, a byte range to copy, or an
//! element range to compute). Batches of jobs are computed in parallel on a
//! rayon pool; a writer thread appends each finished batch to the shard
//! files in order, an output hasher thread hashes it right after, and one
//! thread per input hashes that input's shards right behind the compute (see
//! `input_hash`). Buffers are recycled, so anonymous memory stays near
//! `4 x batch x chunk` whatever the model size (contract 3), and every job
//! is a pure function of the plan, so the bytes do not depend on thread
//! count or chunk size (contract 1).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::arith;
use crate::cuda::{self, DeviceChoice, Gpu, GpuPasses};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::hash_cache::HashCache;
use crate::input_hash::{Touch, hash_following};
use crate::interrupt;
use crate::merge_compute;
use crate::merge_stats::{self, STAT_BLOCK, TensorStats};
use crate::plan::{Formula, Op, OutTensor, Plan, Source};
use crate::writer::{SyncedFile, WrittenFile, hex};

/// Default elements per compute job: 4 MiB of f32 output at most.
pub const DEFAULT_CHUNK_ELEMS: u64 = 1 << 20;
/// Bound on the output buffers in flight (contract 3), whatever the thread
/// count: at most `IN_FLIGHT_BATCHES` batches exist at once (being computed,
/// queued for the writer, being written, queued for the hasher, being
/// hashed), each of `2 x threads` chunks of up to 4 bytes per element.
const BUFFER_BUDGET: u64 = 256 << 20;
const IN_FLIGHT_BATCHES: u64 = 5;

/// The chunk size to use: the requested one, made smaller when many threads
/// would otherwise put more than `BUFFER_BUDGET` in flight.
fn chunk_elems(requested: u64, batch: usize) -> u64 {
    let cap = BUFFER_BUDGET / (IN_FLIGHT_BATCHES * batch as u64 * 4);
    requested.min(cap).max(1)
}
/// Bytes per plain copy job.
const COPY_CHUNK_BYTES: u64 = 16 << 20;

/// How to run.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub threads: usize,
    pub chunk_elems: u64,
    pub progress: bool,
    /// Known input hashes (see `hash_cache`).
    pub hash_cache: HashCache,
    /// Where the arithmetic runs (`--device`).
    pub device: DeviceChoice,
    /// Device memory budget in bytes (`--gpu-memory`; default: half the free memory, at most 8 GiB).
    pub gpu_memory: Option<u64>,
    /// Print no notes (the device chosen by `auto`).
    pub quiet: bool,
}

/// What was written and read.
pub struct ExecResult {
    /// Output shards, in order.
    pub shards: Vec<WrittenFile>,
    /// Per input, per shard: file name, size, sha256.
    pub inputs: Vec<Vec<WrittenFile>>,
}

enum Job {
    /// Start shard `n`: its header bytes.
    Header(usize),
    /// Copy `bytes` of an input tensor.
    Copy { src: Source, bytes: Range<u64> },
    /// Compute elements `elems` of output tensor `tensor`.
    Compute { tensor: usize, elems: Range<u64> },
}

enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Piece<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Borrowed(b) => b,
            Piece::Owned(v) => v,
        }
    }
}

fn jobs(plan: &Plan, chunk_elems: u64) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (si, sh) in plan.shards.iter().enumerate() {
        jobs.push(Job::Header(si));
        for ti in sh.tensors.clone() {
            let t = &plan.tensors[ti];
            match &t.op {
                Op::Copy(src) => {
                    let len = t.bytes();
                    let mut a = 0;
                    while a < len {
                        let b = (a + COPY_CHUNK_BYTES).min(len);
                        jobs.push(Job::Copy { src: *src, bytes: a..b });
                        a = b;
                    }
                }
                Op::Convert(_) | Op::Arith { .. } | Op::Merge(_) => {
                    let n = t.numel();
                    let mut a = 0;
                    while a < n {
                        let b = (a + chunk_elems).min(n);
                        jobs.push(Job::Compute { tensor: ti, elems: a..b });
                        a = b;
                    }
                }
            }
        }
    }
    jobs
}

/// Statistics of the merged tensors being computed, by tensor index.
type StatsMap = HashMap<usize, Arc<TensorStats>>;

/// Computes elements `elems` of tensor `t` into `out`.
fn compute(plan: &Plan, t: &OutTensor, stats: Option<&TensorStats>, elems: Range<u64>, out: &mut [u8]) {
    let out_ty: FloatType = t.dtype.float().expect("plan checked float dtypes");
    let os = out_ty.size();
    let at = |p: u64| ((p - elems.start) as usize) * os;
    match &t.op {
        Op::Copy(_) => unreachable!("copies are not computed"),
        Op::Merge(m) => merge_compute::compute(
            plan,
            m,
            stats.expect("stats computed before the chunk"),
            out_ty,
            elems,
            out,
        ),
        op => {
            for (r, seg) in arith::segments(plan, op, &elems) {
                seg.compute(out_ty, &mut out[at(r.start)..at(r.end)]);
            }
        }
    }
}

/// The end of the input bytes `job` reads, per source: `(input, touch)`.
fn touches(plan: &Plan, job: &Job, mut f: impl FnMut(usize, Touch)) {
    let mut report = |src: Source, end_elem: u64, size: u64| {
        let t = plan.input_tensor(src);
        f(src.input, Touch { shard: t.shard, end: t.start + end_elem * size });
    };
    match job {
        Job::Header(_) => {}
        Job::Copy { src, bytes } => report(*src, bytes.end, 1),
        Job::Compute { tensor, elems } => {
            let size = |s: Source| plan.input_tensor(s).dtype.float().map_or(1, |t| t.size() as u64);
            match &plan.tensors[*tensor].op {
                Op::Copy(_) => {}
                Op::Convert(src) => report(*src, elems.end, size(*src)),
                Op::Merge(m) => {
                    // Inputs with other vocabularies have other sizes; the
                    // hasher reads whatever was not reported at the end.
                    for &s in m.base.iter().chain(&m.models) {
                        report(s, elems.end.min(plan.input_tensor(s).numel()), size(s));
                    }
                }
                Op::Arith { formula, runs, row_len } => {
                    let base = formula.base();
                    report(base, elems.end, size(base));
                    // The furthest vector element this chunk reads.
                    let l = *row_len;
                    let first = runs.partition_point(|r| (r.base_row + r.rows) * l <= elems.start);
                    let v_end = runs[first..]
                        .iter()
                        .take_while(|r| r.base_row * l < elems.end)
                        .map(|r| {
                            r.vector_row * l + ((r.base_row + r.rows) * l).min(elems.end) - r.base_row * l
                        })
                        .max();
                    if let Some(v_end) = v_end {
                        let vector_sources: &[Source] = match formula {
                            Formula::Diff { pre, .. } => &[*pre],
                            Formula::AddDiff { chat, pre, .. } => &[*chat, *pre],
                            Formula::AddScaled { vector, .. } => &[*vector],
                        };
                        for &vs in vector_sources {
                            report(vs, v_end, size(vs));
                        }
                    }
                }
            }
        }
    }
}

fn run_job<'a>(plan: &'a Plan, stats: &StatsMap, job: &Job, mut buf: Vec<u8>) -> Piece<'a> {
    match job {
        Job::Header(si) => Piece::Borrowed(&plan.shards[*si].header),
        Job::Copy { src, bytes } => {
            Piece::Borrowed(&plan.input_bytes(*src)[bytes.start as usize..bytes.end as usize])
        }
        Job::Compute { tensor, elems } => {
            let t = &plan.tensors[*tensor];
            let len = (elems.end - elems.start) as usize * t.dtype.float().unwrap().size();
            buf.clear();
            buf.resize(len, 0);
            compute(plan, t, stats.get(tensor).map(|s| &**s), elems.clone(), &mut buf);
            Piece::Owned(buf)
        }
    }
}

/// Writes the shards of `plan` into `dir` and hashes the inputs.
pub fn execute(plan: &Plan, dir: &Path, opts: &ExecOptions) -> Result<ExecResult> {
    let threads = opts.threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("starting {threads} threads: {e}")))?;
    let gpu = cuda::select(opts.device, opts.gpu_memory, opts.quiet)?;
    let (batch, chunk) = match &gpu {
        // Whole statistics blocks per job (rank masks scan from a block
        // start), sized so the engine's slots fit the device budget.
        Some(g) => {
            let requested = (opts.chunk_elems / STAT_BLOCK).max(1) * STAT_BLOCK;
            (2 * cuda::SLOTS, g.chunk_elems(max_models(plan)).min(requested))
        }
        None => (threads * 2, chunk_elems(opts.chunk_elems, threads * 2)),
    };
    let jobs = jobs(plan, chunk);
    let bar = progress_bar(opts.progress, plan.output_bytes());

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // One hasher per input, fed the ranges each batch read (bounded, so
        // it trails the compute by a few chunks and reads from cache).
        let mut touch_tx = Vec::new();
        let mut hashers = Vec::new();
        for input in &plan.inputs {
            let (ttx, trx) = sync_channel::<Touch>(256);
            touch_tx.push(ttx);
            let stop = &stop;
            hashers.push(s.spawn(move || hash_following(&input.ckpt, &opts.hash_cache, trx, stop)));
        }
        let (tx, rx) = sync_channel::<Vec<(usize, Piece)>>(1);
        let (free_tx, free_rx) = channel::<Vec<u8>>();
        let (htx, hrx) = sync_channel::<Vec<(usize, Piece)>>(1);
        let writer = s.spawn(|| write_pieces(plan, dir, &jobs, rx, htx, &bar));
        let out_hasher = s.spawn(|| hash_pieces(&jobs, hrx, free_tx));
        let mut outcome = Ok(());
        let mut stats = StatsMap::new();
        for (bi, group) in jobs.chunks(batch).enumerate() {
            if let Err(e) = interrupt::check() {
                outcome = Err(e);
                break;
            }
            let prepared = match &gpu {
                Some(g) => prepare_stats(plan, group, &mut stats, Some(g)),
                None => pool.install(|| prepare_stats(plan, group, &mut stats, None)),
            };
            if let Err(e) = prepared {
                outcome = Err(e);
                break;
            }
            let bufs: Vec<Vec<u8>> = group.iter().map(|_| free_rx.try_recv().unwrap_or_default()).collect();
            let pieces: Vec<(usize, Piece)> = match &gpu {
                Some(g) => match run_group_gpu(g, plan, &stats, group, bufs) {
                    Ok(p) => p.into_iter().enumerate().map(|(i, p)| (bi * batch + i, p)).collect(),
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                },
                None => pool.install(|| {
                    group
                        .par_iter()
                        .zip(bufs)
                        .enumerate()
                        .map(|(i, (job, buf))| (bi * batch + i, run_job(plan, &stats, job, buf)))
                        .collect()
                }),
            };
            if tx.send(pieces).is_err() {
                break; // the writer failed; its error is reported below
            }
            for job in group {
                touches(plan, job, |input, t| {
                    let _ = touch_tx[input].send(t);
                });
            }
        }
        drop(tx);
        let written = writer.join().map_err(|_| Error::Internal("writer thread panicked".into()));
        let out_hashes = out_hasher.join().map_err(|_| Error::Internal("hash thread panicked".into()))?;
        if outcome.is_err() || !matches!(written, Ok(Ok(_))) {
            stop.store(true, Ordering::Relaxed);
        }
        drop(touch_tx);
        let hashes: Vec<Result<Vec<WrittenFile>>> = hashers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Internal("hash thread panicked".into()))))
            .collect();
        outcome?;
        let shards = written??
            .into_iter()
            .zip(out_hashes)
            .map(|((file, bytes), sha256)| WrittenFile { file, bytes, sha256 })
            .collect();
        interrupt::check()?;
        bar.finish_and_clear();
        Ok(ExecResult { shards, inputs: hashes.into_iter().collect::<Result<_>>()? })
    })
}

/// Computes the statistics of the merged tensors `group` computes (before
/// their first chunk) and drops those of tensors already finished.
fn prepare_stats(plan: &Plan, group: &[Job], stats: &mut StatsMap, gpu: Option<&Gpu>) -> Result<()> {
    let Some(first) = group.iter().find_map(|j| match j {
        Job::Compute { tensor, .. } => Some(*tensor),
        _ => None,
    }) else {
        return Ok(());
    };
    stats.retain(|&t, _| t >= first);
    for job in group {
        let Job::Compute { tensor, .. } = job else { continue };
        let t = &plan.tensors[*tensor];
        if let Op::Merge(m) = &t.op
            && !stats.contains_key(tensor)
        {
            let n = t.numel();
            let row_len = if t.shape.len() >= 2 { n / t.shape[0].max(1) } else { n.max(1) };
            let st = match gpu {
                Some(g) => {
                    let passes = GpuPasses {
                        gpu: g,
                        base: m.base_view(plan),
                        xs: (0..m.models.len()).map(|k| m.view(plan, k)).collect(),
                        n,
                        row_len,
                    };
                    merge_stats::compute_with(&passes, &t.name, n, row_len, m)?
                }
                None => merge_stats::compute(plan, &t.name, n, row_len, m)?,
            };
            stats.insert(*tensor, Arc::new(st));
        }
    }
    Ok(())
}

/// The most models any merged tensor of the plan reads (sizes GPU chunks).
fn max_models(plan: &Plan) -> usize {
    plan.tensors
        .iter()
        .map(|t| match &t.op {
            Op::Merge(m) => m.models.len(),
            _ => 2,
        })
        .max()
        .unwrap_or(2)
}

/// Runs a batch of jobs on the GPU: compute jobs go through the engine's
/// slots in rotation (a slot's output is collected just before the slot is
/// reused, so gathering, transfers and kernels of neighbouring jobs
/// overlap); headers and copies are borrowed as on the CPU.
fn run_group_gpu<'a>(
    gpu: &Gpu,
    plan: &'a Plan,
    stats: &StatsMap,
    group: &[Job],
    bufs: Vec<Vec<u8>>,
) -> Result<Vec<Piece<'a>>> {
    let gpu_err = |e: String| Error::Internal(e);
    let mut pieces: Vec<Option<Piece>> = (0..group.len()).map(|_| None).collect();
    let mut owner: [Option<usize>; cuda::SLOTS] = [None; cuda::SLOTS];
    let mut bufs = bufs.into_iter();
    let mut slot = 0;
    for (i, job) in group.iter().enumerate() {
        let Job::Compute { tensor, elems } = job else {
            pieces[i] = Some(run_job(plan, stats, job, Vec::new()));
            continue;
        };
        if let Some(j) = owner[slot].take() {
            let mut b = bufs.next().unwrap_or_default();
            gpu.collect(slot, &mut b).map_err(gpu_err)?;
            pieces[j] = Some(Piece::Owned(b));
        }
        let t = &plan.tensors[*tensor];
        gpu.enqueue(slot, plan, t, stats.get(tensor).map(|s| &**s), elems.clone()).map_err(gpu_err)?;
        owner[slot] = Some(i);
        slot = (slot + 1) % cuda::SLOTS;
    }
    for (s, o) in owner.iter_mut().enumerate() {
        if let Some(j) = o.take() {
            let mut b = bufs.next().unwrap_or_default();
            gpu.collect(s, &mut b).map_err(gpu_err)?;
            pieces[j] = Some(Piece::Owned(b));
        }
    }
    Ok(pieces.into_iter().map(|p| p.expect("every job ran")).collect())
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} writing [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar
}

/// The writer thread: appends pieces in job order, switching shard files at
/// each header, then passes each batch on to the output hasher. Returns each
/// shard's file name and size.
fn write_pieces<'a>(
    plan: &Plan,
    dir: &Path,
    jobs: &[Job],
    rx: Receiver<Vec<(usize, Piece<'a>)>>,
    to_hasher: SyncSender<Vec<(usize, Piece<'a>)>>,
    bar: &ProgressBar,
) -> Result<Vec<(String, u64)>> {
    let mut done = Vec::with_capacity(plan.shards.len());
    let mut current: Option<SyncedFile> = None;
    for pieces in rx {
        for (ji, piece) in &pieces {
            if let Job::Header(si) = jobs[*ji] {
                if let Some(f) = current.take() {
                    done.push(f.finish()?);
                }
                current = Some(SyncedFile::create(&dir.join(&plan.shards[si].file_name))?);
            }
            let f = current.as_mut().expect("a header job starts every shard");
            f.write(piece.bytes())?;
            bar.inc(piece.bytes().len() as u64);
        }
        if to_hasher.send(pieces).is_err() {
            break;
        }
    }
    if let Some(f) = current.take() {
        done.push(f.finish()?);
    }
    // Fewer shards than planned means the producer stopped early; the caller
    // reports why.
    Ok(done)
}

/// The output hasher: sha256 of each shard from the pieces the writer has
/// written (in a thread of its own, so hashing overlaps writing), then the
/// buffers go back for reuse.
fn hash_pieces(jobs: &[Job], rx: Receiver<Vec<(usize, Piece)>>, free: Sender<Vec<u8>>) -> Vec<String> {
    let mut done = Vec::new();
    let mut current: Option<Sha256> = None;
    for pieces in rx {
        for (ji, piece) in pieces {
            if matches!(jobs[ji], Job::Header(_))
                && let Some(h) = current.replace(Sha256::new())
            {
                done.push(hex(&h.finalize()));
            }
            current.get_or_insert_with(Sha256::new).update(piece.bytes());
            if let Piece::Owned(v) = piece {
                let _ = free.send(v);
            }
        }
    }
    done.extend(current.map(|h| hex(&h.finalize())));
    done
}
