//! `chatvec extract --rank R`: a chat vector written as a PEFT LoRA adapter
//! (`adapter_config.json` + `adapter_model.safetensors`), the way
//! mergekit-extract-lora writes one, with a report of the energy each
//! module keeps.
//!
//! Which tensors become what follows mergekit-extract-lora:
//! - every 2-D weight of a linear layer: `lora_A = sqrt(S) V^T`,
//!   `lora_B = U sqrt(S)` from the truncated SVD of `chat - pretrained`
//!   (computed in f32, written in the chat model's dtype or `--dtype`),
//!   with `lora_alpha = r` so PEFT's scaling is 1;
//! - the embeddings and lm_head: saved whole from the chat model
//!   (`modules_to_save`), or with `--embed-lora` decomposed
//!   (`lora_embedding_A/B` for the input embedding, transposed as PEFT
//!   stores it); whole whenever the two vocabularies differ;
//! - modules with no low-rank form (norms): saved whole, or left out with
//!   `--skip-undecomposable`;
//! - the bias of a decomposed layer: its difference as `lora_B.bias`
//!   (`lora_bias: true`, which PEFT merges as `bias + scaling * lora_B.bias`);
//! - `--include`/`--exclude` drop modules before any of this.
//!
//! A stored vector holds differences only, so its whole-saved modules would
//! be differences where PEFT expects weights: they are left out and said.
//!
//! Each module's SVD runs on one thread (`factor`), modules in parallel;
//! factors go to an unnamed scratch file on the output's file system as
//! they finish, and the adapter is then written in the model's tensor
//! order, so memory stays at a few row blocks per thread whatever the
//! model size, and the bytes do not depend on the thread count.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use crate::arith::Operand;
use crate::error::{Error, Result};
use crate::exec::RunOptions;
use crate::exec::input_hash::hash_following;
use crate::factor::{Method, RowSource, truncated_svd};
use crate::job::chat_vector::{VectorRefs, resolve_vector, to_value};
use crate::model::checkpoint::{Checkpoint, Tensor, is_lm_head, is_vocab_matrix};
use crate::model::dtype::{DType, FloatType, encode};
use crate::model::safetensors::{OutTensorSpec, build_header};
use crate::output::Destination;
use crate::output::dir::OutputDir;
use crate::output::files::WrittenFile;
use crate::output::manifest::{InputRecord, Manifest};
use crate::params::apply::ExtractSpec;
use crate::params::lora::LoraSpec;
use crate::plan::Role;
use crate::resolve::Fetch;

/// The prefix PEFT puts before a transformers model's module names.
const PREFIX: &str = "base_model.model.";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const ADAPTER_CONFIG: &str = "adapter_config.json";
const CARD: &str = "README.md";

/// What one module of the adapter is.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// `lora_A` / `lora_B` of a linear layer.
    Lora,
    /// `lora_embedding_A` / `lora_embedding_B` of an embedding.
    Embedding,
    /// Saved whole (`modules_to_save`).
    Whole,
}

/// One module's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleReport {
    /// The module (tensor name without `.weight`).
    pub name: String,
    /// Decomposed, or saved whole.
    pub kind: ModuleKind,
    /// The weight's shape.
    pub shape: Vec<u64>,
    /// The rank written (0 for a module saved whole).
    pub rank: usize,
    /// The fraction of `||chat - pretrained||^2` the rank keeps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_kept: Option<f64>,
    /// `||D - B A|| / ||D||` before rounding to the output dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_error: Option<f64>,
    /// How the SVD was computed: `exact`, or `randomized, N power iterations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// What `extract --rank` did.
#[derive(Clone, Debug, Serialize)]
pub struct LoraReport {
    /// The adapter directory, once written.
    pub output: Option<String>,
    /// Nothing was written.
    pub dry_run: bool,
    /// The largest rank written (the config's `r`).
    pub rank: usize,
    /// The decomposed modules and those saved whole, in model order.
    pub modules: Vec<ModuleReport>,
    /// Modules left out, with the reason.
    pub left_out: Vec<String>,
    /// Kept energy over every decomposed module (sum kept / sum total).
    pub energy_kept: Option<f64>,
    /// Bytes of adapter_model.safetensors.
    pub bytes: u64,
    /// Wall time, in seconds.
    pub seconds: f64,
    /// The files written, with their sha256.
    pub files: Vec<WrittenFile>,
    /// What chatvec did that the user should know.
    pub notes: Vec<String>,
    /// What looks wrong but did not stop the run.
    pub warnings: Vec<String>,
}

/// Where the difference comes from.
enum Inputs {
    Pair { chat: Box<Checkpoint>, pre: Box<Checkpoint>, labels: [String; 2] },
    Stored { vector: Box<Checkpoint>, label: String },
}

impl Inputs {
    fn primary(&self) -> &Checkpoint {
        match self {
            Inputs::Pair { chat, .. } => chat,
            Inputs::Stored { vector, .. } => vector,
        }
    }
}

/// What the adapter does with one module.
enum Action {
    /// Decompose `weight` (transposed: an embedding, stored as PEFT's
    /// `lora_embedding`), with `bias` as a difference when there is one.
    Factor { transposed: bool, bias: Option<usize>, cap: usize },
    /// Copy these tensors of the chat model.
    Whole(Vec<usize>),
}

struct Module {
    name: String,
    /// Index of the weight in the primary checkpoint.
    weight: usize,
    action: Action,
}

/// A finished decomposition, its bytes in the scratch file.
struct Done {
    rank: usize,
    /// Byte ranges in the scratch file: A, B, and the bias difference.
    a: (u64, u64),
    b: (u64, u64),
    bias: Option<(u64, u64, FloatType)>,
    /// The factors' dtype.
    dtype: FloatType,
    /// `||D||_F^2`.
    energy: f64,
    report: ModuleReport,
}

/// The difference `chat - pretrained` of one tensor (or a stored vector's
/// tensor) as rows of f32.
struct Diff<'a> {
    chat: Operand<'a>,
    pre: Option<Operand<'a>>,
    rows: usize,
    cols: usize,
}

impl RowSource for Diff<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn read_rows(&self, first: usize, out: &mut [f32]) {
        let start = (first * self.cols) as u64;
        self.chat.decode_at(start, out);
        if let Some(pre) = self.pre {
            // Through a block on the stack: a heap buffer per call (4 MiB,
            // thousands of calls per thread) grew glibc's per-thread arenas
            // to hundreds of MiB.
            let mut p = [0f32; crate::arith::BLOCK];
            for (k, piece) in out.chunks_mut(crate::arith::BLOCK).enumerate() {
                let at = start + (k * crate::arith::BLOCK) as u64;
                pre.decode_at(at, &mut p[..piece.len()]);
                piece.iter_mut().zip(&p).for_each(|(o, b)| *o -= *b);
            }
        }
    }
}

fn float_of(ck: &Checkpoint, t: &Tensor) -> Result<FloatType> {
    t.dtype.float().ok_or_else(|| {
        Error::bad_file(
            ck.file_of(t),
            format!(
                "tensor {} is {}, not a float dtype (bf16, f16, f32) a LoRA can be extracted from",
                t.name,
                t.dtype.name()
            ),
        )
    })
}

fn operand<'a>(ck: &'a Checkpoint, t: &Tensor) -> Result<Operand<'a>> {
    Ok(Operand { ty: float_of(ck, t)?, bytes: ck.bytes(t) })
}

/// Writes the adapter (or, on a dry run, says what it would hold).
pub fn extract_lora(spec: &ExtractSpec, out: &Destination, run: &RunOptions) -> Result<LoraReport> {
    crate::job::preflight_with(
        out,
        |o, fetch| extract_now(spec, o, run, fetch),
        |r: &mut LoraReport| r.notes.push(crate::job::HEADERS_ONLY.into()),
    )
}

fn open_inputs(spec: &ExtractSpec, fetch: &Fetch) -> Result<Inputs> {
    Ok(match resolve_vector(&spec.source)? {
        VectorRefs::Pair { chat, pretrained, .. } => Inputs::Pair {
            chat: Box::new(fetch.open_model(&chat)?),
            pre: Box::new(fetch.open_model(&pretrained)?),
            labels: [chat, pretrained],
        },
        VectorRefs::Stored(v) => Inputs::Stored { vector: Box::new(fetch.open_model(&v)?), label: v },
        VectorRefs::Lora(a) => {
            return Err(Error::Usage(format!("{a} is a LoRA adapter already; extract reads a chat vector")));
        }
    })
}

fn extract_now(spec: &ExtractSpec, out: &Destination, run: &RunOptions, fetch: &Fetch) -> Result<LoraReport> {
    let lora = spec.lora.as_ref().ok_or_else(|| Error::Internal("extract_lora without --rank".into()))?;
    let inputs = open_inputs(spec, fetch)?;
    let mut notes = Vec::new();
    let mut warnings = Vec::new();
    let mut left_out = Vec::new();
    let modules = plan_modules(spec, lora, &inputs, &mut notes, &mut left_out)?;
    if modules.is_empty() {
        return Err(Error::Usage(
            "no module is left to extract: every tensor was excluded or left out".into(),
        ));
    }
    let primary = inputs.primary();
    let mut report = LoraReport {
        output: None,
        dry_run: out.dry_run,
        rank: 0,
        modules: Vec::new(),
        left_out,
        energy_kept: None,
        bytes: 0,
        seconds: 0.0,
        files: Vec::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
    };
    if out.dry_run {
        report.modules = modules.iter().map(|m| planned(primary, m)).collect();
        report.rank = modules
            .iter()
            .filter_map(|m| match m.action {
                Action::Factor { cap, .. } => Some(cap),
                Action::Whole(_) => None,
            })
            .max()
            .unwrap_or(0);
        report.notes = notes;
        return Ok(report);
    }
    let start = Instant::now();
    let mut read: Vec<std::path::PathBuf> = Vec::new();
    for ck in checkpoints(&inputs) {
        read.push(ck.dir.clone());
        read.extend(ck.shards.iter().map(|s| s.path.clone()));
    }
    let estimate = estimate_bytes(primary, &modules, spec.dtype());
    let dir = OutputDir::create(&out.output, &read, out.force, estimate)?;
    let scratch = dir.scratch_file()?;
    let threads = crate::exec::default_threads(run.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("starting {threads} threads: {e}")))?;
    let spill = Mutex::new((scratch, 0u64));
    let results: Vec<Option<Done>> = pool.install(|| {
        modules.par_iter().map(|m| decompose(&inputs, lora, spec.dtype(), m, &spill)).collect::<Result<_>>()
    })?;
    for ck in checkpoints(&inputs) {
        ck.check_intact()?;
    }
    let (scratch, _) =
        spill.into_inner().map_err(|_| Error::Internal("a decomposition thread panicked".into()))?;
    let mut kept = (0f64, 0f64);
    let mut ranks = BTreeMap::new();
    let mut targets = std::collections::BTreeSet::new();
    let mut saved = Vec::new();
    let mut any_bias = false;
    for (m, done) in modules.iter().zip(&results) {
        match (&m.action, done) {
            (Action::Factor { .. }, Some(d)) => {
                if let Some(k) = d.report.energy_kept {
                    kept.0 += k * d.energy;
                    kept.1 += d.energy;
                }
                ranks.insert(m.name.clone(), d.rank);
                targets.insert(last(&m.name).to_string());
                any_bias |= d.bias.is_some();
                report.modules.push(d.report.clone());
            }
            (Action::Factor { .. }, None) => {
                report.left_out.push(format!(
                    "{}: chat and pretrained are identical here (no difference to keep)",
                    m.name
                ));
            }
            (Action::Whole(_), _) => {
                saved.push(last(&m.name).to_string());
                report.modules.push(planned(primary, m));
            }
        }
    }
    if ranks.is_empty() && saved.is_empty() {
        return Err(Error::Usage("the chat vector is zero everywhere: there is no adapter to write".into()));
    }
    let rank = ranks.values().copied().max().unwrap_or(1);
    report.rank = rank;
    report.energy_kept = (kept.1 > 0.0).then(|| kept.0 / kept.1);
    let weights = write_weights(&dir, primary, &modules, &results, &scratch)?;
    report.bytes = weights.bytes;
    saved.sort();
    saved.dedup();
    let config = adapter_config(&inputs, rank, &ranks, &targets, &saved, any_bias);
    let mut files = vec![dir.write_small(ADAPTER_CONFIG, &crate::json::to_pretty(&config))?];
    files.push(dir.write_small(CARD, card(&inputs, &report).as_bytes())?);
    let cache = run.exec().hash_cache;
    let mut records = Vec::new();
    for (role, ck, label) in labelled(&inputs) {
        let (tx, rx) = std::sync::mpsc::channel();
        drop(tx);
        let shards = hash_following(ck, &cache, rx, &AtomicBool::new(false))?;
        records.push(InputRecord::new(role, label, ck, shards));
    }
    let mut manifest = Manifest::bare("extract-lora", records, to_value(&spec.given())?);
    manifest.lora = Some(to_value(&report.modules)?);
    manifest.notes = notes.clone();
    manifest.outputs = vec![weights.clone()];
    manifest.files = files.clone();
    dir.write_manifest(&manifest)?;
    let path = dir.commit()?;
    report.output = Some(path.display().to_string());
    report.files = std::iter::once(weights).chain(files).collect();
    report.seconds = start.elapsed().as_secs_f64();
    if !saved.is_empty() {
        notes.push(format!(
            "saved whole from the chat model (modules_to_save, replacing the base's when applied): {}",
            saved.join(", ")
        ));
    }
    if matches!(inputs, Inputs::Stored { .. }) && report.left_out.iter().any(|l| l.contains("stored vector"))
    {
        warnings.push("a stored vector holds differences only: the modules it cannot decompose are not in the adapter (give --chat and --pretrained to save them whole)".into());
    }
    report.notes = notes;
    report.warnings = warnings;
    Ok(report)
}

fn checkpoints(inputs: &Inputs) -> Vec<&Checkpoint> {
    labelled(inputs).into_iter().map(|(_, c, _)| c).collect()
}

fn labelled(inputs: &Inputs) -> Vec<(Role, &Checkpoint, &str)> {
    match inputs {
        Inputs::Pair { chat, pre, labels } => {
            vec![(Role::Chat, chat, &labels[0]), (Role::Pretrained, pre, &labels[1])]
        }
        Inputs::Stored { vector, label } => vec![(Role::Vector, vector, label)],
    }
}

/// The last component of a module name (`q_proj`), as mergekit and PEFT
/// name targets and modules to save.
fn last(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// Whether a 2-D weight belongs to an embedding-like module (rows are
/// tokens or positions): the known vocabulary matrices, and modules named
/// like embeddings (`wte`, `wpe`, `embed_positions`, `*_embedding`).
fn embedding_like(name: &str) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let l = last(module);
    is_vocab_matrix(name) || l.contains("embed") || l == "wte" || l == "wpe"
}

/// Decides what each module becomes, in the primary checkpoint's order.
fn plan_modules(
    spec: &ExtractSpec,
    lora: &LoraSpec,
    inputs: &Inputs,
    notes: &mut Vec<String>,
    left_out: &mut Vec<String>,
) -> Result<Vec<Module>> {
    let primary = inputs.primary();
    spec.selection.check_all_match(primary.tensors.iter().map(|t| t.name.as_str()))?;
    let stored = matches!(inputs, Inputs::Stored { .. });
    let mut modules: Vec<Module> = Vec::new();
    let mut by_module: BTreeMap<String, usize> = BTreeMap::new();
    let mut vocab_note = false;
    // Weights first: they decide what their module is.
    for (i, t) in primary.tensors.iter().enumerate() {
        let Some(module) = t.name.strip_suffix(".weight") else { continue };
        if !spec.selection.selects(&t.name) {
            continue;
        }
        let whole = |why: &str, left_out: &mut Vec<String>| -> Option<Action> {
            if stored {
                left_out.push(format!("{module}: {why}, and a stored vector has no weights to save whole"));
                None
            } else {
                Some(Action::Whole(vec![i]))
            }
        };
        let action = if lora.saved_whole(module) {
            whole("--save-module", left_out)
        } else if t.shape.len() == 2 && embedding_like(&t.name) {
            let same_rows = match inputs {
                Inputs::Pair { pre, .. } => pre.get(&t.name).is_some_and(|p| p.shape == t.shape),
                Inputs::Stored { .. } => true,
            };
            if lora.embed_lora && !same_rows && !vocab_note {
                notes.push(format!(
                    "{}: the vocabularies differ, so the embeddings are saved whole (as mergekit does)",
                    t.name
                ));
                vocab_note = true;
            }
            if lora.embed_lora && same_rows {
                // PEFT: an nn.Embedding takes lora_embedding_*; lm_head is a Linear.
                let transposed = !is_lm_head(&t.name);
                Some(Action::Factor { transposed, bias: None, cap: lora.rank_of(module) })
            } else {
                whole("an embedding (saved whole unless --embed-lora)", left_out)
            }
        } else if t.shape.len() == 2 {
            Some(Action::Factor { transposed: false, bias: None, cap: lora.rank_of(module) })
        } else if lora.skip_undecomposable {
            left_out.push(format!("{module}: {}-D, no low-rank form (--skip-undecomposable)", t.shape.len()));
            None
        } else {
            whole("no low-rank form", left_out)
        };
        if let Some(action) = action {
            by_module.insert(module.to_string(), modules.len());
            modules.push(Module { name: module.to_string(), weight: i, action });
        }
    }
    // Then the rest: a decomposed layer's bias as a difference, anything of
    // a module saved whole with it.
    for (i, t) in primary.tensors.iter().enumerate() {
        if t.name.ends_with(".weight") || !spec.selection.selects(&t.name) {
            continue;
        }
        let (module, what) = t.name.rsplit_once('.').unwrap_or(("", t.name.as_str()));
        match by_module.get(module).map(|&k| &mut modules[k].action) {
            Some(Action::Factor { bias, transposed: false, .. }) if what == "bias" && t.shape.len() == 1 => {
                *bias = Some(i)
            }
            Some(Action::Whole(list)) => list.push(i),
            _ => left_out.push(format!("{}: not part of a module the adapter holds", t.name)),
        }
    }
    // The pair must line up where a difference is taken.
    if let Inputs::Pair { chat, pre, .. } = inputs {
        let mut problems = Vec::new();
        for m in &modules {
            let Action::Factor { bias, .. } = &m.action else { continue };
            for idx in std::iter::once(m.weight).chain(*bias) {
                let t = &chat.tensors[idx];
                match pre.get(&t.name) {
                    None => {
                        problems.push(format!("{}: in the chat model, not in the pretrained one", t.name))
                    }
                    Some(p) if p.shape != t.shape => problems.push(format!(
                        "{}: shape {:?} in the chat model, {:?} in the pretrained one",
                        t.name, t.shape, p.shape
                    )),
                    Some(p) => {
                        float_of(pre, p)?;
                    }
                }
                float_of(chat, t)?;
            }
        }
        if !problems.is_empty() {
            return Err(Error::Mismatch { what: "the chat and pretrained models do not line up".into(), problems }
                .with_hint("exclude those tensors with --exclude, or check that the pretrained model is the chat model's base"));
        }
    }
    Ok(modules)
}

/// A module's report before (or without) a decomposition.
fn planned(primary: &Checkpoint, m: &Module) -> ModuleReport {
    let (kind, rank) = match m.action {
        Action::Factor { transposed: true, cap, .. } => (ModuleKind::Embedding, cap),
        Action::Factor { transposed: false, cap, .. } => (ModuleKind::Lora, cap),
        Action::Whole(_) => (ModuleKind::Whole, 0),
    };
    ModuleReport {
        name: m.name.clone(),
        kind,
        shape: primary.tensors[m.weight].shape.clone(),
        rank: rank.min(primary.tensors[m.weight].shape.iter().copied().min().unwrap_or(0) as usize),
        energy_kept: None,
        relative_error: None,
        method: None,
    }
}

/// The adapter's size bound, for the free-space check.
fn estimate_bytes(primary: &Checkpoint, modules: &[Module], dtype: Option<FloatType>) -> u64 {
    modules
        .iter()
        .map(|m| {
            let t = &primary.tensors[m.weight];
            match &m.action {
                Action::Factor { cap, .. } => {
                    let size = dtype.map_or(t.dtype.bits() / 8, |d| d.size() as u64);
                    let (r, c) = (t.shape[0], t.shape[1]);
                    (*cap as u64).min(r.min(c)) * (r + c) * size + r * size
                }
                Action::Whole(list) => list.iter().map(|&i| primary.tensors[i].len).sum(),
            }
        })
        .sum()
}

/// Decomposes one module (none for a whole one), appending its factors to
/// the scratch file.
fn decompose(
    inputs: &Inputs,
    lora: &LoraSpec,
    dtype: Option<FloatType>,
    m: &Module,
    spill: &Mutex<(File, u64)>,
) -> Result<Option<Done>> {
    let Action::Factor { transposed, bias, cap } = m.action else { return Ok(None) };
    let primary = inputs.primary();
    let t = &primary.tensors[m.weight];
    let diff = |idx: usize| -> Result<Diff<'_>> {
        let t = &primary.tensors[idx];
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r as usize, c as usize),
            [n] => (1, n as usize),
            _ => return Err(Error::Internal(format!("{}: not 1-D or 2-D", t.name))),
        };
        let chat = operand(primary, t)?;
        let pre = match inputs {
            Inputs::Pair { pre, .. } => {
                let p = pre.get(&t.name).ok_or_else(|| Error::Internal(format!("{} vanished", t.name)))?;
                Some(operand(pre, p)?)
            }
            Inputs::Stored { .. } => None,
        };
        Ok(Diff { chat, pre, rows, cols })
    };
    let d = diff(m.weight)?;
    let seed = crate::rng::stream(0, &t.name, 0);
    let svd = truncated_svd(&d, cap, seed, lora.exact)?;
    let rank = lora.choose(&svd.s, svd.energy, cap);
    if rank == 0 {
        return Ok(None);
    }
    let ty = dtype.unwrap_or(d.chat.ty);
    let (m_rows, n_cols) = (d.rows, d.cols);
    let root: Vec<f32> = svd.s[..rank].iter().map(|s| s.sqrt()).collect();
    // Not transposed: A = sqrt(S) V^T (r x cols), B = U sqrt(S) (rows x r).
    // Transposed (PEFT's embedding layout, delta = (B A)^T): A = sqrt(S) U^T
    // (r x rows), B = V sqrt(S) (cols x r).
    let (left, right, a_len, b_rows) =
        if transposed { (&svd.v, &svd.u, m_rows, n_cols) } else { (&svd.u, &svd.v, n_cols, m_rows) };
    let mut a = vec![0f32; rank * a_len];
    for i in 0..rank {
        for j in 0..a_len {
            a[i * a_len + j] = root[i] * right[(j, i)];
        }
    }
    let mut b = vec![0f32; b_rows * rank];
    for i in 0..b_rows {
        for k in 0..rank {
            b[i * rank + k] = left[(i, k)] * root[k];
        }
    }
    let bias_delta = match bias {
        Some(bi) => {
            let bd = diff(bi)?;
            let mut v = vec![0f32; bd.cols];
            bd.read_rows(0, &mut v);
            v.iter().any(|x| *x != 0.0).then_some((v, dtype.unwrap_or(bd.chat.ty)))
        }
        None => None,
    };
    let encoded = |vals: &[f32], ty: FloatType| {
        let mut out = vec![0u8; vals.len() * ty.size()];
        encode(ty, vals, &mut out);
        out
    };
    let a_bytes = encoded(&a, ty);
    let b_bytes = encoded(&b, ty);
    let bias_bytes = bias_delta.as_ref().map(|(v, bty)| encoded(v, *bty));
    let (kept, energy, method) = (svd.kept(rank), svd.energy, svd.method);
    drop(svd);
    release_freed_memory();
    let mut guard =
        spill.lock().map_err(|_| Error::Internal("the scratch file's lock was poisoned".into()))?;
    let (file, at) = &mut *guard;
    let mut put = |bytes: &[u8]| -> Result<(u64, u64)> {
        file.write_all(bytes).map_err(|e| Error::Internal(format!("writing the scratch file: {e}")))?;
        let r = (*at, bytes.len() as u64);
        *at += bytes.len() as u64;
        Ok(r)
    };
    let a_at = put(&a_bytes)?;
    let b_at = put(&b_bytes)?;
    let bias_at = match (&bias_bytes, &bias_delta) {
        (Some(bytes), Some((_, bty))) => {
            let (at, len) = put(bytes)?;
            Some((at, len, *bty))
        }
        _ => None,
    };
    drop(guard);
    Ok(Some(Done {
        rank,
        a: a_at,
        b: b_at,
        bias: bias_at,
        dtype: ty,
        energy,
        report: ModuleReport {
            name: m.name.clone(),
            kind: if transposed { ModuleKind::Embedding } else { ModuleKind::Lora },
            shape: t.shape.clone(),
            rank,
            energy_kept: Some(kept),
            relative_error: Some((1.0 - kept).max(0.0).sqrt()),
            method: Some(match method {
                Method::Exact => "exact".into(),
                Method::Randomized { iterations } => format!("randomized, {iterations} power iterations"),
            }),
        },
    }))
}

/// Hands memory freed by a decomposition back to the system. Its matrices
/// (a few MiB each, new at every iteration) are above glibc's mmap
/// threshold only until the first is freed, which raises the threshold;
/// from then on they come from the threads' arenas, which kept growing
/// with fragments (460 MiB RssAnon over the 1b shape's 154 matrices on two
/// threads). `malloc_trim` returns the free pages of every arena.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's own
    // arenas to the system; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One tensor of the adapter file and where its bytes come from.
struct Piece<'a> {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    from: From<'a>,
}

enum From<'a> {
    /// `(offset, length)` in the scratch file.
    Scratch(u64, u64),
    /// Bytes of the chat model.
    Mapped(&'a [u8]),
}

/// Writes adapter_model.safetensors in the model's module order.
fn write_weights(
    dir: &OutputDir,
    primary: &Checkpoint,
    modules: &[Module],
    results: &[Option<Done>],
    scratch: &File,
) -> Result<WrittenFile> {
    let mut pieces = Vec::new();
    for (m, done) in modules.iter().zip(results) {
        match (&m.action, done) {
            (Action::Factor { transposed, .. }, Some(d)) => {
                let t = &primary.tensors[m.weight];
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let r = d.rank as u64;
                let (a_shape, b_shape, a_name, b_name) = if *transposed {
                    (vec![r, rows], vec![cols, r], "lora_embedding_A", "lora_embedding_B")
                } else {
                    (vec![r, cols], vec![rows, r], "lora_A.weight", "lora_B.weight")
                };
                pieces.push(Piece {
                    name: format!("{PREFIX}{}.{a_name}", m.name),
                    dtype: d.dtype.dtype(),
                    shape: a_shape,
                    from: From::Scratch(d.a.0, d.a.1),
                });
                pieces.push(Piece {
                    name: format!("{PREFIX}{}.{b_name}", m.name),
                    dtype: d.dtype.dtype(),
                    shape: b_shape,
                    from: From::Scratch(d.b.0, d.b.1),
                });
                if let Some((at, len, bty)) = d.bias {
                    pieces.push(Piece {
                        name: format!("{PREFIX}{}.lora_B.bias", m.name),
                        dtype: bty.dtype(),
                        shape: vec![rows],
                        from: From::Scratch(at, len),
                    });
                }
            }
            (Action::Whole(list), _) => {
                for &i in list {
                    let t = &primary.tensors[i];
                    pieces.push(Piece {
                        name: format!("{PREFIX}{}", t.name),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        from: From::Mapped(primary.bytes(t)),
                    });
                }
            }
            (Action::Factor { .. }, None) => {}
        }
    }
    let specs: Vec<OutTensorSpec> =
        pieces.iter().map(|p| OutTensorSpec { name: &p.name, dtype: p.dtype, shape: &p.shape }).collect();
    let (header, _) = build_header(&specs);
    let mut f = dir.create_hashed(ADAPTER_WEIGHTS)?;
    f.write(&header)?;
    let mut buf = vec![0u8; 1 << 20];
    for p in &pieces {
        crate::interrupt::check()?;
        match p.from {
            From::Mapped(bytes) => {
                for c in bytes.chunks(1 << 20) {
                    f.write(c)?;
                }
            }
            From::Scratch(mut at, len) => {
                let end = at + len;
                while at < end {
                    let n = ((end - at) as usize).min(buf.len());
                    scratch
                        .read_exact_at(&mut buf[..n], at)
                        .map_err(|e| Error::Internal(format!("reading the scratch file back: {e}")))?;
                    f.write(&buf[..n])?;
                    at += n as u64;
                }
            }
        }
    }
    primary.check_intact()?;
    f.finish()
}

/// The model the adapter is for: the pretrained model (for a stored
/// vector, the one its manifest names), as mergekit-extract-lora records
/// its `--base-model`.
fn base_model(inputs: &Inputs) -> Value {
    match inputs {
        Inputs::Pair { labels, .. } => Value::String(labels[1].clone()),
        Inputs::Stored { vector, .. } => {
            let path = vector.dir.join(crate::output::manifest::MANIFEST_FILE);
            crate::json::read_value(&path, crate::output::manifest::MAX_MANIFEST_BYTES)
                .ok()
                .and_then(|m| m.pointer("/parameters/pretrained").cloned())
                .filter(Value::is_string)
                .unwrap_or(Value::Null)
        }
    }
}

/// adapter_config.json as mergekit-extract-lora writes it: `r` and
/// `lora_alpha` the largest rank (scaling 1), other ranks in `rank_pattern`
/// and `alpha_pattern` by full module name.
fn adapter_config(
    inputs: &Inputs,
    rank: usize,
    ranks: &BTreeMap<String, usize>,
    targets: &std::collections::BTreeSet<String>,
    saved: &[String],
    lora_bias: bool,
) -> Value {
    let others: serde_json::Map<String, Value> =
        ranks.iter().filter(|(_, r)| **r != rank).map(|(k, r)| (k.clone(), json!(r))).collect();
    json!({
        "base_model_name_or_path": base_model(inputs),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": others,
        "alpha_pattern": others,
        "target_modules": targets.iter().collect::<Vec<_>>(),
        "modules_to_save": saved,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "use_rslora": false,
        "bias": "none",
        "lora_bias": lora_bias,
        "init_lora_weights": true,
        "inference_mode": true,
    })
}

/// A short model card: what the adapter is and how to use it.
fn card(inputs: &Inputs, report: &LoraReport) -> String {
    let base = base_model(inputs);
    let base = base.as_str().unwrap_or("the pretrained model");
    let source = match inputs {
        Inputs::Pair { labels, .. } => format!("`{}` minus `{}`", labels[0], labels[1]),
        Inputs::Stored { label, .. } => format!("the chat vector `{label}`"),
    };
    let kept = report.energy_kept.map_or(String::new(), |k| {
        format!(" It keeps {:.1}% of the vector's energy (squared norm).", 100.0 * k)
    });
    format!(
        "---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- chatvec\n- chat-vector\n- lora\n---\n\n# LoRA adapter extracted by chatvec\n\n\
         The chat vector {source} as a rank-{} LoRA adapter (truncated SVD of each linear layer's difference).{kept}\n\n\
         Apply it with PEFT (`PeftModel.from_pretrained(model, path).merge_and_unload()`) or\n`chatvec apply --base MODEL --lora PATH -o OUT`.\n\n\
         `chatvec-manifest.json` records the inputs' sha256 and each module's rank and kept energy.\n",
        report.rank
    )
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lora: Vec<&ModuleReport> = self.modules.iter().filter(|m| m.kind != ModuleKind::Whole).collect();
        let whole = self.modules.len() - lora.len();
        match &self.output {
            Some(o) => writeln!(
                f,
                "wrote LoRA adapter {o} (rank {}, {}) in {:.1} s",
                self.rank,
                crate::units::human_bytes(self.bytes),
                self.seconds
            )?,
            None => writeln!(f, "dry run: a LoRA adapter of rank up to {} (nothing written)", self.rank)?,
        }
        writeln!(
            f,
            "  {} modules decomposed, {whole} saved whole, {} left out",
            lora.len(),
            self.left_out.len()
        )?;
        if let Some(k) = self.energy_kept {
            writeln!(f, "  energy kept: {:.2}% overall", 100.0 * k)?;
        }
        // Per kind of module (q_proj, down_proj, ...): ranks and kept energy.
        let mut kinds: BTreeMap<&str, Vec<&ModuleReport>> = BTreeMap::new();
        for m in &lora {
            kinds.entry(last(&m.name)).or_default().push(m);
        }
        for (kind, ms) in &kinds {
            let (lo, hi) = ms.iter().fold((usize::MAX, 0), |(lo, hi), m| (lo.min(m.rank), hi.max(m.rank)));
            let ranks = if lo == hi { format!("rank {lo}") } else { format!("ranks {lo}-{hi}") };
            let kept: Vec<f64> = ms.iter().filter_map(|m| m.energy_kept).collect();
            let energy = if kept.is_empty() {
                String::new()
            } else {
                let min = kept.iter().copied().fold(f64::INFINITY, f64::min);
                let mean = kept.iter().sum::<f64>() / kept.len() as f64;
                format!(", energy kept {:.1}% mean, {:.1}% lowest", 100.0 * mean, 100.0 * min)
            };
            writeln!(f, "  {kind:<18} x{:<4} {ranks}{energy}", ms.len())?;
        }
        if self.output.is_some() && !lora.is_empty() {
            writeln!(f, "  (--json lists every module; chatvec-manifest.json records them)")?;
        }
        for l in &self.left_out {
            writeln!(f, "  left out: {l}")?;
        }
        Ok(())
    }
}
