//! `chatvec analyze`: opens the vector (stored, or a pair given as `apply`
//! takes it), the optional `--against` vector, base and applied output,
//! runs the analysis pass, and writes the picture when asked.

use std::path::PathBuf;
use std::time::Instant;

use crate::analyze::findings::findings;
use crate::analyze::report::{AnalyzeReport, Skipped, aggregate, conflicts, tensor_figures};
use crate::analyze::{Inputs, Side, plot, run};
use crate::error::{Error, Result};
use crate::job::chat_vector::{VectorRefs, resolve_vector};
use crate::model::checkpoint::Checkpoint;
use crate::params::apply::VectorSource;
use crate::plan::checks::read_vocab;
use crate::plan::experts::line_up;
use crate::resolve::open_model;

/// What to analyze.
#[derive(Clone, Debug)]
pub struct AnalyzeSpec {
    /// The vector: stored (or a vector alias), or a (chat, pretrained) pair.
    pub vector: VectorSource,
    /// A second vector to compare with (cosine, sign agreement).
    pub against: Option<VectorSource>,
    /// The model the vector would be applied to (relative norms against it).
    pub base: Option<String>,
    /// An output of `apply` on `base`: its effective scale per tensor.
    pub applied: Option<String>,
    /// Write the picture (SVG) here.
    pub plot: Option<PathBuf>,
    /// Replace an existing picture.
    pub force: bool,
    /// Threads (`None`: one per core). The figures do not depend on it.
    pub threads: Option<usize>,
}

/// The checkpoints of a vector source, opened.
enum Opened {
    Stored(Box<Checkpoint>),
    Pair(Box<Checkpoint>, Box<Checkpoint>),
}

impl Opened {
    fn open(v: &VectorSource) -> Result<(Opened, String)> {
        let pair = |c: &str, p: &str| -> Result<(Opened, String)> {
            Ok((Opened::Pair(Box::new(open_model(c)?), Box::new(open_model(p)?)), format!("{c} - {p}")))
        };
        match resolve_vector(v)? {
            VectorRefs::Pair { chat, pretrained, alias: None } => pair(&chat, &pretrained),
            VectorRefs::Pair { chat, pretrained, alias: Some(s) } => {
                pair(&chat, &pretrained).map(|(o, d)| (o, format!("{s} = {d}")))
            }
            VectorRefs::Stored(s) => Ok((Opened::Stored(Box::new(open_model(&s)?)), s)),
            VectorRefs::Lora(a) => {
                Err(Error::Usage(format!("--lora {a}: analyze reads chat vectors, not LoRA adapters")))
            }
        }
    }

    /// Its checkpoints, to line their experts up.
    fn checkpoints(&mut self) -> Vec<&mut Checkpoint> {
        match self {
            Opened::Stored(v) => vec![&mut **v],
            Opened::Pair(c, p) => vec![&mut **c, &mut **p],
        }
    }

    fn side(&self) -> Side<'_> {
        match self {
            Opened::Stored(v) => Side::Stored(v),
            Opened::Pair(c, p) => Side::Pair { chat: c, pre: p },
        }
    }
}

/// Analyzes a chat vector: per tensor, layer and module kind, with pair
/// checks; writes the picture when `spec.plot` is set.
pub fn analyze(spec: &AnalyzeSpec) -> Result<AnalyzeReport> {
    if spec.applied.is_some() && spec.base.is_none() {
        return Err(Error::Usage(
            "--applied needs --base: the effective scale is ((out - base) . v) / ||v||^2".into(),
        ));
    }
    if let Some(p) = &spec.plot {
        crate::output::files::check_picture_target(p, spec.force)?;
    }
    let (mut vector, vector_label) = Opened::open(&spec.vector)?;
    let mut against = spec.against.as_ref().map(Opened::open).transpose()?;
    let mut base = spec.base.as_deref().map(open_model).transpose()?;
    let mut applied = spec.applied.as_deref().map(open_model).transpose()?;
    // Experts stored in different layouts are compared expert by expert.
    {
        let mut cks = vector.checkpoints();
        if let Some((a, _)) = against.as_mut() {
            cks.extend(a.checkpoints());
        }
        cks.extend(base.iter_mut().chain(applied.iter_mut()));
        line_up(&mut cks, 0, None)?;
    }
    let inputs = Inputs {
        vector: vector.side(),
        against: against.as_ref().map(|(o, _)| o.side()),
        base: base.as_ref(),
        applied: applied.as_ref(),
    };
    let threads = crate::exec::default_threads(spec.threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("starting {threads} threads: {e}")))?;
    let start = Instant::now();
    let mut skipped = Vec::new();
    let results = pool.install(|| run(&inputs, &mut skipped))?;
    let (layers, kinds, overall) = aggregate(&results);
    let vocab = read_vocab(inputs.vector.primary())?;
    let found = findings(&inputs, &results, &overall.figures, &skipped, vocab.as_ref());
    let against_label = against.as_ref().map(|(_, l)| l.clone());
    if let Some(p) = &spec.plot {
        let text = plot::svg(&results, &vector_label, against_label.as_deref());
        crate::output::files::write_atomically(p, text.as_bytes())?;
    }
    Ok(AnalyzeReport {
        vector: vector_label,
        against: against_label,
        base: spec.base.clone(),
        applied: spec.applied.clone(),
        layers,
        kinds,
        overall,
        tensors: tensor_figures(&results),
        conflicts: conflicts(&results),
        skipped: skipped.into_iter().map(|(name, why)| Skipped { name, why }).collect(),
        findings: found,
        seconds: start.elapsed().as_secs_f64(),
    })
}
