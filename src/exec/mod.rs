//! The executor: streams a plan to disk, computing on the CPU or, through
//! `cuda`, on a GPU.
//!
//! The output is cut into jobs (`jobs`: a shard header, a byte range to
//! copy, or an element range to compute). Batches of jobs are computed in
//! parallel on a rayon pool (or through the GPU's slots); a writer thread
//! appends each finished batch to the shard files in order, an output
//! hasher thread hashes it right after, and one thread per input hashes that
//! input's shards right behind the compute (see `input_hash`). A sweep runs
//! one plan for several outputs (`execute_many`): every input chunk is
//! decoded once, each job yields one piece per output, and each output has
//! its own shard files and hasher. Buffers are recycled, so anonymous memory stays near
//! `4 x batch x chunk` whatever the model size (contract 3), and every job
//! is a pure function of the plan, so the bytes do not depend on thread
//! count or chunk size (contract 1).
//!
//! This room runs plans; only the job room above imports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel};

use rayon::prelude::*;

use crate::cuda::{self, DeviceChoice, Gpu};
use crate::error::{Error, Result};
use crate::interrupt;
use crate::merge::stats::STAT_BLOCK;
use crate::model::hash_cache::HashCache;
use crate::output::dir::OutputDir;
use crate::output::files::WrittenFile;
use crate::plan::Plan;
use input_hash::{Touch, hash_following};
use jobs::{Job, Piece, Schedule, StatsMap};
use pipeline::{InFlight, SlotDevice};
use writer::Batch;

pub(crate) use crate::arith::formulas::{ROUNDING_STRIDE, Rounding};

pub(crate) mod input_hash;
pub(crate) mod jobs;
pub(crate) mod pipeline;
pub(crate) mod writer;

/// Default elements per compute job: 4 MiB of f32 output at most.
pub(crate) const DEFAULT_CHUNK_ELEMS: u64 = 1 << 20;
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

/// Which input hashes a run may take from the hash cache
/// (`~/.cache/chatvec`, or `$CHATVEC_CACHE_DIR`), which is keyed by each
/// file's device, inode, size, mtime and ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InputHashes {
    /// Use cached hashes of unchanged files; record new ones.
    #[default]
    Cached,
    /// Hash every input again (`--rehash`); record the new hashes.
    Rehash,
    /// Hash every input and record nothing (throwaway inputs, e.g. the demo).
    Uncached,
}

/// How a job runs: threads, device, chunking and input hashing. None of
/// it changes an output byte (contract 1); where the output goes is
/// `output::Destination`'s business.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Compute threads (`None`: one per core).
    pub threads: Option<usize>,
    /// Elements per work chunk (for tests).
    pub chunk_elems: u64,
    /// Input hashes from the cache, or computed afresh.
    pub input_hashes: InputHashes,
    /// Where the arithmetic runs.
    pub device: DeviceChoice,
    /// Device memory chatvec may use, in bytes (`None`: half the free
    /// memory, at most 8 GiB).
    pub gpu_memory: Option<u64>,
}

impl Default for RunOptions {
    /// Every core, cached input hashes, a GPU when one works.
    fn default() -> RunOptions {
        RunOptions {
            threads: None,
            chunk_elems: DEFAULT_CHUNK_ELEMS,
            input_hashes: InputHashes::Cached,
            device: DeviceChoice::Auto,
            gpu_memory: None,
        }
    }
}

impl RunOptions {
    /// The executor's settings, the hash cache opened.
    pub(crate) fn exec(&self) -> ExecOptions {
        let hash_cache = match self.input_hashes {
            InputHashes::Cached => HashCache::from_env(false),
            InputHashes::Rehash => HashCache::from_env(true),
            InputHashes::Uncached => HashCache::disabled(),
        };
        ExecOptions {
            threads: default_threads(self.threads),
            chunk_elems: self.chunk_elems,
            hash_cache,
            device: self.device,
            gpu_memory: self.gpu_memory,
        }
    }
}

/// Compute threads: as given, else one per core. (On a 2-core machine one
/// thread was faster when the inputs sat in the page cache, two when they
/// streamed from disk, the case that matters at 8B-70B; see BENCHMARKS.md.)
pub fn default_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How to run, resolved for the executor.
#[derive(Clone, Debug)]
pub(crate) struct ExecOptions {
    pub threads: usize,
    pub chunk_elems: u64,
    /// Known input hashes (see `hash_cache`).
    pub hash_cache: HashCache,
    /// Where the arithmetic runs (`--device`).
    pub device: DeviceChoice,
    /// Device memory budget in bytes (`--gpu-memory`; default: half the free memory, at most 8 GiB).
    pub gpu_memory: Option<u64>,
}

/// What was written and read.
pub(crate) struct ExecResult {
    /// Output shards, in order.
    pub shards: Vec<WrittenFile>,
    /// Per input, per shard: file name, size, sha256.
    pub inputs: Vec<Vec<WrittenFile>>,
    /// What rounding to the output dtype did to the vector's change.
    pub rounding: Rounding,
    /// How long the output files took to finish (hashed, synced) after
    /// the last piece was handed to them: the run's tail behind the compute.
    pub tail: std::time::Duration,
}

/// Where the batches run.
enum Engine<'a, 'p> {
    Cpu(&'a rayon::ThreadPool),
    /// The GPU, the pool whose workers stage its jobs' inputs, and the jobs
    /// in its slots (kept across batches).
    Gpu(&'a Gpu, InFlight<'p, Job>),
}

/// The GPU's slots as the pipeline sees them: a compute job enqueued in a
/// slot, its output collected and checked.
struct GpuSlots<'a> {
    gpu: &'a Gpu,
    plan: &'a Plan,
    stats: &'a StatsMap,
}

impl SlotDevice<Job> for GpuSlots<'_> {
    fn start(&self, slot: usize, job: &Job) -> Result<()> {
        let Job::Compute { tensor, elems } = job else {
            return Err(Error::Internal("a header or copy was sent to the GPU".into()));
        };
        self.gpu.enqueue(slot, self.plan, *tensor, self.stats.get(tensor).map(|s| &**s), elems.clone())
    }

    fn finish(&self, slot: usize, job: &Job, out: &mut Vec<u8>) -> Result<()> {
        self.gpu.collect(slot, out)?;
        jobs::check_computed(self.plan, job, out)
    }
}

impl<'p> Engine<'_, 'p> {
    /// Computes the statistics `group` needs, then runs its jobs; returns
    /// the pieces (one per variant) of each job finished, in order, with
    /// its index in the whole job list, and per variant what rounding did
    /// in them. On the CPU every job of `group` is finished; on the GPU
    /// the last few may stay in its slots until the next batch or `finish`.
    fn run_batch(
        &mut self,
        plan: &'p Plan,
        sched: &Schedule,
        stats: &mut StatsMap,
        first: usize,
        group: &[Job],
        bufs: Vec<Vec<Vec<u8>>>,
    ) -> Result<(Batch<'p>, Vec<Rounding>)> {
        match self {
            Engine::Gpu(gpu, flight) => {
                // The statistics passes stream through the same slots.
                if jobs::needs_stats(plan, group, stats) {
                    flight.drain(&GpuSlots { gpu, plan, stats })?;
                }
                jobs::prepare_stats(plan, sched, first, group, stats, Some(gpu))?;
                flight.give_buffers(bufs.into_iter().filter_map(|mut b| b.pop()));
                let dev = GpuSlots { gpu, plan, stats };
                for (i, job) in group.iter().enumerate() {
                    let piece = match job {
                        Job::Compute { .. } => None,
                        _ => Some(jobs::run(plan, stats, job, Vec::new())?),
                    };
                    flight.push(&dev, first + i, job.clone(), piece)?;
                }
                Ok(gpu_batch(plan, flight.ready()))
            }
            Engine::Cpu(pool) => {
                let done = pool.install(|| {
                    jobs::prepare_stats(plan, sched, first, group, stats, None)?;
                    let stats = &*stats;
                    group
                        .par_iter()
                        .zip(bufs)
                        .map(|(job, buf)| jobs::run_many(plan, stats, job, buf))
                        .collect::<Result<Vec<_>>>()
                })?;
                let mut rounding = vec![Rounding::default(); plan.variants()];
                let mut batch = Vec::with_capacity(done.len());
                for (i, (pieces, r)) in done.into_iter().enumerate() {
                    for (total, one) in rounding.iter_mut().zip(r) {
                        *total += one;
                    }
                    batch.push((first + i, pieces));
                }
                Ok((batch, rounding))
            }
        }
    }

    /// The jobs still in the GPU's slots after the last batch (none on the
    /// CPU).
    fn finish(&mut self, plan: &'p Plan, stats: &StatsMap) -> Result<(Batch<'p>, Vec<Rounding>)> {
        match self {
            Engine::Gpu(gpu, flight) => {
                flight.drain(&GpuSlots { gpu, plan, stats })?;
                Ok(gpu_batch(plan, flight.ready()))
            }
            Engine::Cpu(_) => Ok((Vec::new(), vec![Rounding::default(); plan.variants()])),
        }
    }
}

/// The GPU's finished jobs as a batch (one variant), and what rounding did
/// in them.
fn gpu_batch<'p>(plan: &Plan, done: Vec<(usize, Job, Piece<'p>)>) -> (Batch<'p>, Vec<Rounding>) {
    let mut rounding = Rounding::default();
    let batch = done
        .into_iter()
        .map(|(index, job, piece)| {
            rounding += jobs::gpu_rounding(plan, &job, &piece);
            (index, vec![piece])
        })
        .collect();
    (batch, vec![rounding])
}

/// Why a plan of `variants` outputs runs on the CPU whatever `--device`
/// says, if it must: what `--device cuda` is refused with, and the note
/// `auto` gives. LoRA merges (a rank-r product per element) have no kernel
/// yet, and keep up with the disk on the CPU at the ranks users train.
fn cpu_only(plan: &Plan, variants: usize) -> Option<(String, String)> {
    let (what, note) = if variants > 1 {
        // The GPU engine computes one output per job.
        (
            "a sweep writes its candidates from one pass on the CPU",
            "a sweep computes its candidates in one pass on the CPU",
        )
    } else if plan.has_low_rank() {
        (
            "a LoRA merge runs on the CPU (no CUDA kernel for low-rank updates yet)",
            "LoRA merges run on the CPU",
        )
    } else if plan.has_vector_sum() {
        (
            "several vectors are added in one pass on the CPU (no CUDA kernel sums them yet)",
            "several vectors are added in one pass on the CPU",
        )
    } else if !plan.requant.weights.is_empty() {
        (
            "FP8 and MXFP4 output is quantized on the CPU (no CUDA kernel quantizes it yet)",
            "quantized output is computed on the CPU",
        )
    } else if plan.has_quantized() {
        (
            "FP8 and MXFP4 inputs are decoded on the CPU (no CUDA kernel decodes them yet)",
            "quantized inputs are decoded on the CPU",
        )
    } else {
        let method = plan.cpu_only_method()?;
        return Some((
            format!("merge method {method} runs on the CPU (the CUDA path has no kernels for it yet)"),
            format!("{method} runs on the CPU"),
        ));
    };
    Some((what.to_string(), note.to_string()))
}

/// Writes the shards of `plan` once per variant (a sweep's candidates,
/// with the scales `plan.scales` gives each) into `dirs[k]`, reading and
/// decoding every input once for all of them, and hashes the inputs.
/// Variant `k`'s bytes equal those of a plan with only its scales.
pub(crate) fn execute_many(plan: &Plan, dirs: &[&OutputDir], opts: &ExecOptions) -> Result<Vec<ExecResult>> {
    let n = plan.variants();
    if dirs.len() != n {
        return Err(Error::Internal(format!("{n} variants for {} directories", dirs.len())));
    }
    let threads = opts.threads.max(1);
    let pool = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Internal(format!("starting {threads} threads: {e}")))?,
    );
    let gpu = match cpu_only(plan, n) {
        Some((what, note)) => {
            if let DeviceChoice::Cuda(_) = opts.device {
                return Err(Error::Usage(format!("{what}; --device cuda cannot be used"))
                    .with_hint("leave out --device, or pass --device cpu"));
            }
            crate::ui::note(&format!("device: cpu ({note})"));
            None
        }
        None => cuda::select(opts.device, opts.gpu_memory)?,
    };
    let (mut engine, batch, chunk) = match &gpu {
        // Whole statistics blocks per job (rank masks scan from a block
        // start), sized so the engine's slots fit the device budget.
        Some(g) => {
            let requested = (opts.chunk_elems / STAT_BLOCK).max(1) * STAT_BLOCK;
            // The workers copy each job's inputs into its pinned slot.
            g.stage_on(pool.clone());
            let flight = InFlight::new(cuda::SLOTS);
            (Engine::Gpu(g, flight), 2 * cuda::SLOTS, g.chunk_elems(jobs::max_models(plan)).min(requested))
        }
        // Each job holds one buffer per variant.
        None => (Engine::Cpu(&pool), threads * 2, chunk_elems(opts.chunk_elems, threads * 2 * n)),
    };
    let sched = jobs::schedule(plan, chunk, open_shards(threads, n));
    let bar = crate::ui::bytes_bar("writing", plan.output_bytes() * n as u64);

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
        let (tx, rx) = sync_channel::<Batch>(1);
        let (free_tx, free_rx) = channel::<Vec<u8>>();
        let (sched, bar) = (&sched, &bar);
        let writer = s.spawn(move || writer::write_batches(s, plan, dirs, sched, rx, &free_tx, bar));
        let mut outcome = Ok(());
        let mut stats = StatsMap::new();
        let mut rounding = vec![Rounding::default(); n];
        for (bi, group) in sched.jobs.chunks(batch).enumerate() {
            let bufs: Vec<Vec<Vec<u8>>> = group
                .iter()
                .map(|_| (0..n).map(|_| free_rx.try_recv().unwrap_or_default()).collect())
                .collect();
            let pieces = interrupt::check()
                .and_then(|()| inputs_intact(plan))
                .and_then(|()| engine.run_batch(plan, sched, &mut stats, bi * batch, group, bufs));
            match pieces {
                Ok((p, r)) => {
                    for (total, one) in rounding.iter_mut().zip(r) {
                        *total += one;
                    }
                    if tx.send(p).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
            for job in group {
                jobs::touches(plan, job, |input, t| {
                    let _ = touch_tx[input].send(t);
                });
            }
        }
        if outcome.is_ok() {
            match engine.finish(plan, &stats) {
                Ok((p, r)) => {
                    for (total, one) in rounding.iter_mut().zip(r) {
                        *total += one;
                    }
                    let _ = tx.send(p); // a writer failure is reported below
                }
                Err(e) => outcome = Err(e),
            }
        }
        drop(tx);
        let written = writer.join().map_err(|_| Error::Internal("writer thread panicked".into()));
        if outcome.is_err() || !matches!(written, Ok(Ok(_))) {
            stop.store(true, Ordering::Relaxed);
        }
        drop(touch_tx);
        let hashes: Vec<Result<Vec<WrittenFile>>> = hashers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Internal("hash thread panicked".into()))))
            .collect();
        outcome?;
        let written = written??;
        interrupt::check()?;
        // Every byte was read and hashed: a truncated input shows now.
        inputs_intact(plan)?;
        bar.finish_and_clear();
        let inputs: Vec<Vec<WrittenFile>> = hashes.into_iter().collect::<Result<_>>()?;
        let tail = written.tail;
        Ok(written
            .files
            .into_iter()
            .zip(rounding)
            .map(|(shards, rounding)| ExecResult { shards, inputs: inputs.clone(), rounding, tail })
            .collect())
    })
}

/// Output shards filled side by side (see `jobs::schedule`): enough that
/// the outputs' sha256 streams, one per open file at about 1.5 GB/s each,
/// take about half the cores, and at most 4 per output (each open file
/// holds 12 MiB of staging buffers).
fn open_shards(threads: usize, variants: usize) -> usize {
    (threads / (2 * variants.max(1))).clamp(1, 4)
}

/// Fails if an input shard was truncated while mapped (see `model::mapped`).
fn inputs_intact(plan: &Plan) -> Result<()> {
    plan.inputs.iter().try_for_each(|i| i.ckpt.check_intact())
}
