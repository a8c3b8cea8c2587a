//! The GPU engine: a context, three streams (upload, compute, download),
//! the compiled kernels, and buffer slots in rotation.
//!
//! A job goes through a slot: its operands are copied from the mapped
//! shards into the slot's pinned input buffer, uploaded on the upload
//! stream, computed on the compute stream, downloaded on the download
//! stream into the slot's pinned output buffer, and only then copied out.
//! With `SLOTS` slots, the host gathers job i + 3 while job i + 2 uploads,
//! job i + 1 computes and job i downloads; the executor keeps the slots
//! full across its batches (`exec::pipeline`). Events order the streams; cudarc's own
//! event tracking is switched off, so the only waits are the ones here.
//! Device memory is bounded by `--gpu-memory`: the chunk size is chosen so
//! that all slots fit.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::result as drv;
use cudarc::driver::sys::{CUdevice_attribute, CUdeviceptr};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::arith::{Src, View};
use crate::error::{Error, GpuError, Result};
use crate::merge::stats::STAT_BLOCK;
use crate::model::dtype::FloatType;

/// Buffer slots in rotation: one job per stream while the host gathers
/// the next.
pub(crate) const SLOTS: usize = 4;
/// Threads per block (the reduction kernels assume exactly this).
pub(super) const THREADS: u32 = 256;
/// Largest chunk: bounds the pinned host memory (`SLOTS` x chunk x bytes
/// per element) whatever the card.
const MAX_CHUNK: u64 = 1 << 22;
/// Operands start on this alignment inside a slot's input buffer.
const ALIGN: usize = 256;
/// Pinned buffers small copies go through, in rotation (see `Gpu::small`).
const SMALL_RING: usize = 8;

/// A driver call's failure as chatvec's error, naming what was being done.
fn err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Gpu(GpuError::Driver { call: what.into(), detail: format!("{e:?}") })
}

/// A kernel that could not be loaded or launched.
fn kernel_error(kernel: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Gpu(GpuError::Kernel { kernel: kernel.into(), detail: format!("{e:?}") })
}

/// The dtype code the kernels use (kernels/common.cuh).
pub(super) fn ty_code(t: FloatType) -> i32 {
    match t {
        FloatType::BF16 => 0,
        FloatType::F16 => 1,
        FloatType::F32 => 2,
    }
}

/// One operand of a job, as host bytes and their dtype: mapped bytes as
/// they are, or a vocabulary-aligned view decoded to f32 (exact).
pub(super) struct Staged<'a> {
    pub ty: FloatType,
    pub bytes: Cow<'a, [u8]>,
}

/// Elements `start..start + n` of `view`.
pub(super) fn stage<'a>(view: View<'a>, start: u64, n: usize) -> Staged<'a> {
    match view {
        View::Direct(Src::Plain(op)) => {
            Staged { ty: op.ty, bytes: Cow::Borrowed(op.slice(start as usize, n).bytes) }
        }
        other => {
            let mut v = vec![0f32; n];
            other.decode_at(start, &mut v);
            Staged { ty: FloatType::F32, bytes: Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()) }
        }
    }
}

/// A slot's buffers and the events that order their reuse.
pub(super) struct Slot {
    pin_in: PinnedHostSlice<u8>,
    pub dev_in: CudaSlice<u8>,
    pub work: CudaSlice<u8>,
    pub dev_out: CudaSlice<u8>,
    pin_out: PinnedHostSlice<u8>,
    uploaded: CudaEvent,
    computed: CudaEvent,
    downloaded: CudaEvent,
    /// Bytes of the last download still to be collected.
    pending: Option<usize>,
}

/// A pinned buffer for small copies, and the event after its last one.
type SmallBuffer = (PinnedHostSlice<u8>, CudaEvent);

/// An open GPU.
pub(crate) struct Gpu {
    ctx: Arc<CudaContext>,
    up: Arc<CudaStream>,
    pub compute: Arc<CudaStream>,
    down: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    name: String,
    ordinal: usize,
    budget: u64,
    pub multiprocessors: u32,
    slots: RefCell<Vec<Slot>>,
    /// Pinned buffers for small copies and the event after each one's
    /// last upload, used in turn (`small`).
    small_ring: RefCell<(usize, Vec<Option<SmallBuffer>>)>,
    /// The threads that copy a job's operands into its pinned slot: the
    /// executor's workers (`stage_on`), else a pool made at first use.
    stage_pool: RefCell<Option<Arc<rayon::ThreadPool>>>,
}

/// Every kernel the engine launches (kernels/*.cu).
const KERNELS: &[&str] = &[
    "convert_bf16",
    "convert_f16",
    "convert_f32",
    "diff_bf16",
    "diff_f16",
    "diff_f32",
    "add_diff_bf16",
    "add_diff_f16",
    "add_diff_f32",
    "add_scaled_bf16",
    "add_scaled_f16",
    "add_scaled_f32",
    "decode_f32",
    "encode_out",
    "sub_base",
    "fill_zero",
    "mul_scalar",
    "mask_random",
    "mask_della",
    "mask_ranks",
    "della_keys",
    "bitonic_step",
    "della_ranks",
    "combine_linear",
    "combine_slerp",
    "combine_stock",
    "combine_task",
    "hist_high",
    "hist_low",
    "eq_counts",
    "l1_ranks",
    "slerp_sums",
    "gram_sums",
    "l1_masked",
];

impl Gpu {
    /// Opens device `ordinal` (the libraries must be loaded).
    pub(super) fn open(ordinal: usize, budget: Option<u64>) -> Result<Gpu> {
        let count = CudaContext::device_count().map_err(err("counting devices"))?;
        if count <= 0 {
            return Err(Error::Gpu(GpuError::NoGpu));
        }
        if ordinal >= count as usize {
            return Err(Error::Gpu(GpuError::NoSuchGpu { ordinal, count }));
        }
        let ctx = CudaContext::new(ordinal).map_err(err("creating a context"))?;
        // Streams are ordered by this engine's own events.
        // SAFETY: cudarc's tracking only adds waits; with it off, every
        // buffer's reuse is ordered by the per-slot events below, and
        // nothing is freed while a stream may use it (`Drop` syncs).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(err("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(err("reading the compute capability"))?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(err("reading the multiprocessor count"))? as u32;
        let (free, _) = ctx.mem_get_info().map_err(err("reading free memory"))?;
        let budget = budget.unwrap_or((free as u64 / 2).min(8 << 30));
        let cubin = super::kernels::compile_cubin(major, minor)?;
        let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(err("loading the kernels"))?;
        let mut funcs = HashMap::new();
        for k in KERNELS {
            funcs.insert(k.to_string(), module.load_function(k).map_err(|e| kernel_error(k, e))?);
        }
        let up = ctx.new_stream().map_err(err("creating a stream"))?;
        let compute = ctx.new_stream().map_err(err("creating a stream"))?;
        let down = ctx.new_stream().map_err(err("creating a stream"))?;
        Ok(Gpu {
            ctx,
            up,
            compute,
            down,
            funcs,
            name,
            ordinal,
            budget,
            multiprocessors,
            slots: RefCell::new(Vec::new()),
            small_ring: RefCell::new((0, (0..SMALL_RING).map(|_| None).collect())),
            stage_pool: RefCell::new(None),
        })
    }

    /// "cuda:0 (NVIDIA H100 80GB HBM3, 8.0 GiB budget)".
    pub(crate) fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, {:.1} GiB budget)",
            self.ordinal,
            self.name,
            self.budget as f64 / (1u64 << 30) as f64
        )
    }

    /// Elements per chunk for jobs with up to `models` inputs besides the
    /// base: a multiple of `STAT_BLOCK` such that `SLOTS` slots fit the
    /// budget (inputs up to f32, f32 work buffers for every operand and the
    /// result, the output, and DELLA's sort keys and ranks).
    pub(crate) fn chunk_elems(&self, models: usize) -> u64 {
        let per_elem = 8 * models as u64 + 36;
        let c = self.budget / (SLOTS as u64 * per_elem);
        (c / STAT_BLOCK * STAT_BLOCK).clamp(STAT_BLOCK, MAX_CHUNK)
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| Error::Internal(format!("no kernel named {name}")))
    }

    /// A launch over `n` elements (grid-stride kernels).
    pub(crate) fn grid(&self, n: u64) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as u64).clamp(1, self.multiprocessors as u64 * 16);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// A launch with one 256-thread block per `blocks` item.
    pub(crate) fn per_block(&self, blocks: u64) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks.max(1) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(crate) fn ptr<T>(&self, s: &CudaSlice<T>) -> CUdeviceptr {
        s.device_ptr(&self.compute).0
    }

    /// A zeroed device buffer of `len` elements, on the compute stream.
    pub(crate) fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.compute.alloc_zeros::<T>(len.max(1)).map_err(err("allocating device memory"))
    }

    /// A device copy of a small host array, on the compute stream,
    /// through one of `SMALL_RING` pinned buffers in turn: a copy from
    /// pageable memory may make the driver wait for the stream, which
    /// would drain the slots' overlap at every merge job. A buffer is
    /// rewritten only after its previous copy is done (its event).
    pub(crate) fn small<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        let d = self.zeros::<T>(data.len())?;
        if data.is_empty() {
            return Ok(d);
        }
        let len = std::mem::size_of_val(data);
        // SAFETY: `DeviceRepr` types are plain data the driver copies
        // byte for byte; the slice covers exactly `data`'s bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), len) };
        let mut ring = self.small_ring.borrow_mut();
        let (next, buffers) = &mut *ring;
        let entry = &mut buffers[*next];
        *next = (*next + 1) % SMALL_RING;
        if let Some((_, done)) = entry.as_ref() {
            done.synchronize().map_err(err("waiting for a parameter upload"))?;
        }
        if entry.as_ref().is_none_or(|(pin, _)| pin.len() < len) {
            let pin = self.pinned((len.max(64 << 10)).next_power_of_two(), true)?;
            let done = self.ctx.new_event(None).map_err(err("creating an event"))?;
            *entry = Some((pin, done));
        }
        let Some((pin, done)) = entry.as_mut() else { unreachable!("filled just above") };
        let host = pin.as_mut_slice().map_err(err("mapping pinned memory"))?;
        host[..len].copy_from_slice(bytes);
        // SAFETY: `d` holds `len` bytes; the pinned `host` is not written
        // again before `done` (recorded after this copy) completes, nor
        // freed before (`Drop` waits for every stream).
        unsafe { drv::memcpy_htod_async(self.ptr(&d), &host[..len], self.compute.cu_stream()) }
            .map_err(err("uploading parameters"))?;
        done.record(&self.compute).map_err(err("recording an event"))?;
        Ok(d)
    }

    /// A pinned host buffer of `len` bytes, zeroed (so every byte a copy
    /// sends was written, alignment padding included); write-combined
    /// when the host only writes it.
    fn pinned(&self, len: usize, write_combined: bool) -> Result<PinnedHostSlice<u8>> {
        let flags = if write_combined { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: the bytes are written (zeroed) below before anything
        // reads them; the buffer is freed only after the copies using it
        // completed (its users' events, and `Drop`).
        let mut pin = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len.max(1), flags) }
            .map_err(err("allocating pinned memory"))?;
        pin.as_mut_slice().map_err(err("mapping pinned memory"))?.fill(0);
        Ok(pin)
    }

    /// Has `pool`'s threads (the executor's workers, idle while the GPU
    /// computes) copy each job's operands into its pinned slot.
    pub(crate) fn stage_on(&self, pool: Arc<rayon::ThreadPool>) {
        *self.stage_pool.borrow_mut() = Some(pool);
    }

    /// The pool that stages jobs: the one `stage_on` gave, else one thread
    /// per core, made once.
    fn stage_pool(&self) -> Result<Arc<rayon::ThreadPool>> {
        let mut p = self.stage_pool.borrow_mut();
        if let Some(pool) = &*p {
            return Ok(pool.clone());
        }
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .build()
                .map_err(|e| Error::Internal(format!("starting the staging threads: {e}")))?,
        );
        *p = Some(pool.clone());
        Ok(pool)
    }

    /// Copies a device buffer back (waits for the compute stream).
    pub(crate) fn fetch<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut v = vec![T::default(); len];
        if len > 0 {
            // SAFETY: `s` holds at least `len` elements, and the stream is
            // synchronized below before `v` is read or dropped.
            unsafe { drv::memcpy_dtoh_async(&mut v, self.ptr(s), self.compute.cu_stream()) }
                .map_err(err("downloading results"))?;
        }
        self.compute.synchronize().map_err(err("waiting for the GPU"))?;
        Ok(v)
    }

    /// Makes sure slot `i` exists with at least these capacities (waiting
    /// for its work before reallocating).
    fn ensure_slot(&self, i: usize, input: usize, work: usize, out: usize) -> Result<()> {
        let mut slots = self.slots.borrow_mut();
        let fits = slots
            .get(i)
            .is_some_and(|s| s.pin_in.len() >= input && s.work.len() >= work && s.dev_out.len() >= out);
        if fits {
            return Ok(());
        }
        if let Some(s) = slots.get(i) {
            for e in [&s.uploaded, &s.computed, &s.downloaded] {
                e.synchronize().map_err(err("waiting for the GPU"))?;
            }
        }
        let old = slots.get(i);
        let input = input.max(old.map_or(0, |s| s.pin_in.len()));
        let work = work.max(old.map_or(0, |s| s.work.len()));
        let out = out.max(old.map_or(0, |s| s.dev_out.len()));
        let ev = || self.ctx.new_event(None).map_err(err("creating an event"));
        let slot = Slot {
            // Write-combined for the host's writes; plain for its reads.
            // Both zeroed at allocation, and freed only after their slot's
            // events completed.
            pin_in: self.pinned(input, true)?,
            dev_in: self.zeros::<u8>(input)?,
            work: self.zeros::<u8>(work)?,
            dev_out: self.zeros::<u8>(out)?,
            pin_out: self.pinned(out, false)?,
            uploaded: ev()?,
            computed: ev()?,
            downloaded: ev()?,
            pending: None,
        };
        // Every event is recorded once, so the first waits return at once.
        for e in [&slot.uploaded, &slot.computed, &slot.downloaded] {
            e.record(&self.compute).map_err(err("recording an event"))?;
        }
        if i < slots.len() {
            slots[i] = slot;
        } else {
            slots.push(slot);
        }
        Ok(())
    }

    /// Uploads `parts` into slot `i` (growing it to hold `work` and `out`
    /// bytes too) and returns each part's byte offset in `dev_in`. The
    /// compute stream is made to wait for the upload and for the slot's
    /// previous download.
    pub(crate) fn upload(&self, i: usize, parts: &[&[u8]], work: usize, out: usize) -> Result<Vec<usize>> {
        let mut offsets = Vec::with_capacity(parts.len());
        let mut total = 0;
        for p in parts {
            offsets.push(total);
            total = (total + p.len()).next_multiple_of(ALIGN);
        }
        self.ensure_slot(i, total, work, out)?;
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[i];
        // The pinned buffer is free once its last upload is done, and the
        // device input once the slot's last compute is.
        s.uploaded.synchronize().map_err(err("waiting for an upload"))?;
        let host = s.pin_in.as_mut_slice().map_err(err("mapping pinned memory"))?;
        // The padding between parts stays as it was: zeroed at allocation
        // or a previous job's bytes, never uninitialized memory.
        let pool = self.stage_pool()?;
        super::staging::stage_into(host, parts, &offsets, &pool);
        self.up.wait(&s.computed).map_err(err("ordering streams"))?;
        let dst = s.dev_in.device_ptr(&self.up).0;
        // SAFETY: `dev_in` and the pinned `host` hold at least `total`
        // bytes; the pinned buffer is not written again before `uploaded`
        // completes (waited for above), nor freed before (`ensure_slot`).
        unsafe { drv::memcpy_htod_async(dst, &host[..total], self.up.cu_stream()) }
            .map_err(err("uploading"))?;
        s.uploaded.record(&self.up).map_err(err("recording an event"))?;
        self.compute.wait(&s.uploaded).map_err(err("ordering streams"))?;
        self.compute.wait(&s.downloaded).map_err(err("ordering streams"))?;
        Ok(offsets)
    }

    /// Uploads elements `start..start + n` of `base` (if any) and `models`
    /// into slot `i` and decodes them to f32 in its work buffer, which holds
    /// `arrays` arrays of `n` f32: the base in array 0, model j in array
    /// j + 1. The slot's output buffer holds at least `out` bytes. Returns
    /// the work buffer's address.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn upload_f32(
        &self,
        i: usize,
        base: Option<View>,
        models: &[View],
        start: u64,
        n: u64,
        arrays: usize,
        out: usize,
    ) -> Result<CUdeviceptr> {
        let staged: Vec<Staged> = base.iter().chain(models).map(|v| stage(*v, start, n as usize)).collect();
        let parts: Vec<&[u8]> = staged.iter().map(|s| &s.bytes[..]).collect();
        let f = 4 * n;
        let offsets = self.upload(i, &parts, (arrays as u64 * f) as usize, out)?;
        let (inp, work, _) = self.slot_ptrs(i);
        let first = if base.is_some() { 0 } else { 1 };
        for (j, (s, off)) in staged.iter().zip(&offsets).enumerate() {
            let dst = work + (first + j) as u64 * f;
            launch!(self, "decode_f32", self.grid(n), [dst, inp + *off as u64, ty_code(s.ty), n])?;
        }
        Ok(work)
    }

    /// Device addresses of slot `i`'s input, work and output buffers.
    pub(crate) fn slot_ptrs(&self, i: usize) -> (CUdeviceptr, CUdeviceptr, CUdeviceptr) {
        let slots = self.slots.borrow();
        let s = &slots[i];
        (self.ptr(&s.dev_in), self.ptr(&s.work), self.ptr(&s.dev_out))
    }

    /// Marks slot `i`'s kernels as enqueued.
    pub(crate) fn computed(&self, i: usize) -> Result<()> {
        let slots = self.slots.borrow();
        slots[i].computed.record(&self.compute).map_err(err("recording an event"))
    }

    /// Downloads `len` bytes from `offset` of slot `i`'s output after its
    /// kernels; `collect` returns them.
    pub(crate) fn download(&self, i: usize, offset: usize, len: usize) -> Result<()> {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[i];
        s.computed.record(&self.compute).map_err(err("recording an event"))?;
        self.down.wait(&s.computed).map_err(err("ordering streams"))?;
        let src = s.dev_out.device_ptr(&self.down).0 + offset as u64;
        let host = s.pin_out.as_mut_slice().map_err(err("mapping pinned memory"))?;
        // SAFETY: `dev_out` holds the `offset + len` bytes the kernels
        // wrote; the pinned `host` is read only after `downloaded`
        // completes (`collect`), and not freed before.
        unsafe { drv::memcpy_dtoh_async(&mut host[..len], src, self.down.cu_stream()) }
            .map_err(err("downloading"))?;
        s.downloaded.record(&self.down).map_err(err("recording an event"))?;
        s.pending = Some(len);
        Ok(())
    }

    /// Waits for slot `i`'s download and copies it into `out`.
    pub(crate) fn collect(&self, i: usize, out: &mut Vec<u8>) -> Result<()> {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[i];
        let len = s
            .pending
            .take()
            .ok_or_else(|| Error::Internal(format!("slot {i} collected without a download")))?;
        s.downloaded.synchronize().map_err(err("waiting for a download"))?;
        let host = s.pin_out.as_slice().map_err(err("mapping pinned memory"))?;
        out.clear();
        out.resize(len, 0);
        // Over the staging threads too: one thread would copy out at a
        // fraction of the bus's speed.
        let pool = self.stage_pool()?;
        super::staging::stage_into(out, &[&host[..len]], &[0], &pool);
        Ok(())
    }

    /// Waits for everything enqueued.
    pub(crate) fn sync(&self) -> Result<()> {
        for s in [&self.up, &self.compute, &self.down] {
            s.synchronize().map_err(err("waiting for the GPU"))?;
        }
        Ok(())
    }
}

impl Drop for Gpu {
    /// Waits for every stream before the slots' buffers are freed, so an
    /// error path never frees pinned memory under a running copy.
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

/// A kernel argument (every kernel takes device addresses as u64 and
/// scalars of these types).
pub(crate) enum KArg {
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
    F64(f64),
}

macro_rules! karg_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for KArg {
            fn from(x: $t) -> KArg {
                KArg::$v(x)
            }
        }
    )*};
}
karg_from!(u64 => U64, u32 => U32, i32 => I32, f32 => F32, f64 => F64);

impl Gpu {
    /// Launches kernel `name` on the compute stream. The arguments live in
    /// `args` until the launch has copied them.
    pub(crate) fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        let mut b = self.compute.launch_builder(self.func(name)?);
        for a in args {
            match a {
                KArg::U64(x) => b.arg(x),
                KArg::U32(x) => b.arg(x),
                KArg::I32(x) => b.arg(x),
                KArg::F32(x) => b.arg(x),
                KArg::F64(x) => b.arg(x),
            };
        }
        // SAFETY: every kernel takes device addresses (u64) and scalars of
        // the types pushed here, in this order (kernels/*.cu), and the
        // addresses point into buffers of this engine sized for `n`.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| kernel_error(name, e))
    }
}

/// `launch!(gpu, "name", cfg, [a, b, ...])`: `Gpu::launch` with each
/// argument converted to a `KArg`.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {
        $gpu.launch($name, $cfg, &[$($crate::cuda::KArg::from($arg)),*])
    };
}
pub(crate) use launch;
