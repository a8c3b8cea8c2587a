//! Checks shared by every plan: problems listed together, float dtypes,
//! architectures compared through config.json, and tokenizer vocabularies.

use crate::error::{Error, Result};
use crate::model::checkpoint::is_embedding;
use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::config::{architecture_differences, shape_problems};
use crate::model::dtype::FloatType;
use crate::model::layers::layers_of;
use crate::model::tokenizer::Vocab;

/// How many problems a mismatch error lists before summarizing the rest.
const MAX_LISTED: usize = 10;

/// Collects problems and turns them into one error listing the first few.
pub(crate) struct Problems {
    what: &'static str,
    list: Vec<String>,
}

impl Problems {
    pub(crate) fn new(what: &'static str) -> Problems {
        Problems { what, list: Vec::new() }
    }
    pub(crate) fn push(&mut self, p: String) {
        self.list.push(p);
    }
    pub(crate) fn into_result(self) -> Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        let n = self.list.len();
        let mut problems: Vec<String> = self.list.into_iter().take(MAX_LISTED).collect();
        if n > MAX_LISTED {
            problems.push(format!("... and {} more", n - MAX_LISTED));
        }
        Err(Error::Mismatch { what: self.what.to_string(), problems })
    }
}

pub(crate) fn float_of(ck: &Checkpoint, t: &Tensor, hint_flag: &str) -> Result<FloatType> {
    t.float().ok_or_else(|| {
        Error::UnsupportedDtype {
            file: ck.file_of(t).to_path_buf(),
            tensor: t.name.clone(),
            dtype: t.dtype.name().to_string(),
        }
        .with_hint(format!("leave it out with {hint_flag} '^{}$'", regex::escape(&t.name)))
    })
}

/// Compares architectures; differences are errors unless `allow`.
pub(crate) fn check_configs(
    a: &Checkpoint,
    b: &Checkpoint,
    allow: bool,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let (Some(ca), Some(cb)) = (&a.config, &b.config) else {
        for ck in [a, b] {
            if ck.config.is_none() {
                warnings.push(format!(
                    "{} has no config.json; architectures were not compared",
                    ck.dir.display()
                ));
            }
        }
        return Ok(());
    };
    let diffs = architecture_differences(ca, cb);
    if diffs.is_empty() {
        return Ok(());
    }
    if allow {
        warnings.extend(diffs.into_iter().map(|d| format!("--allow-mismatch: {d}")));
        return Ok(());
    }
    let mut p = Problems::new("the models' architectures differ");
    diffs.into_iter().for_each(|d| p.push(d));
    // --allow-mismatch helps only where the weights do line up (a config
    // that says something else): tensors of other shapes it cannot change.
    let unlike = a.tensors.iter().find_map(|t| {
        let u = b.get(&t.name)?;
        (u.shape != t.shape && !crate::model::checkpoint::is_vocab_matrix(&t.name)).then_some((t, u))
    });
    let hint = match unlike {
        None => "pass --allow-mismatch if you are sure the weights line up".to_string(),
        Some((t, u)) => format!(
            "'{}' is {:?} in {} and {:?} in {}: tensors of other shapes do not line up, which --allow-mismatch cannot change; use models of one architecture",
            t.name,
            t.shape,
            a.dir.display(),
            u.shape,
            b.dir.display()
        ),
    };
    p.into_result().map_err(|e| e.with_hint(hint))
}

pub(crate) fn read_vocab(ck: &Checkpoint) -> Result<Option<Vocab>> {
    match crate::model::side_file(&ck.dir, "tokenizer.json")? {
        Some(p) => Vocab::read(&p).map(Some),
        None => Ok(None),
    }
}

/// Fails (or, with `allow`, warns) when `problems` is not empty: a
/// config.json that does not describe its weights makes a model
/// transformers cannot load.
fn config_verdict(problems: Vec<String>, allow: bool, warnings: &mut Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    if allow {
        warnings.extend(problems.into_iter().map(|p| format!("--allow-mismatch: {p}")));
        return Ok(());
    }
    let mut p = Problems::new("config.json does not describe the weights beside it");
    problems.into_iter().for_each(|x| p.push(x));
    p.into_result().map_err(|e| {
        e.with_hint(
            "transformers could not load this; fix config.json, or pass --allow-mismatch if you are sure",
        )
    })
}

/// Checks an input's config.json against its weights (see `shape_problems`).
pub(crate) fn check_fits(ck: &Checkpoint, allow: bool, warnings: &mut Vec<String>) -> Result<()> {
    let Some(cfg) = &ck.config else { return Ok(()) };
    let embedding = ck.embedding().map(|t| t.shape.as_slice());
    let layers = layers_of(ck.tensors.iter().map(|t| t.name.as_str()));
    config_verdict(shape_problems(|k| cfg.raw.get(k).cloned(), embedding, layers, &cfg.path), allow, warnings)
}

/// Checks the config.json an output will carry (`get` reads its keys)
/// against the output's tensors, as (name, shape).
pub(crate) fn check_output_fits<'a>(
    get: impl Fn(&str) -> Option<serde_json::Value>,
    tensors: impl Iterator<Item = (&'a str, &'a [u64])> + Clone,
    allow: bool,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let embedding = tensors.clone().find(|(n, _)| is_embedding(n)).map(|(_, s)| s);
    let layers = layers_of(tensors.map(|(n, _)| n));
    let file = std::path::Path::new("config.json (of the output)");
    config_verdict(shape_problems(get, embedding, layers, file), allow, warnings)
}

/// `||v|| / ||b||` (f64 sums) over up to four matrices that `vector` and
/// `base` share by name and shape, in the vector's file order: the largest
/// ratio, and its tensor. `None` when they share no matrix.
pub(crate) fn delta_ratio(base: &Checkpoint, vector: &Checkpoint) -> Option<(f64, String)> {
    use crate::arith::Operand;
    let norm = |ck: &Checkpoint, t: &Tensor| -> Option<f64> {
        let op = Operand { ty: t.dtype.float()?, bytes: ck.bytes(t) };
        let (mut sum, mut at, mut buf) = (0f64, 0u64, vec![0f32; 1 << 16]);
        let n = t.numel();
        while at < n {
            let m = (n - at).min(buf.len() as u64) as usize;
            op.decode_at(at, &mut buf[..m]);
            sum += buf[..m].iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            at += m as u64;
        }
        Some(sum.sqrt())
    };
    vector
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2)
        .filter_map(|t| base.get(&t.name).filter(|b| b.shape == t.shape).map(|b| (t, b)))
        .take(4)
        .filter_map(|(v, b)| {
            let (nv, nb) = (norm(vector, v)?, norm(base, b)?);
            (nb > 0.0).then(|| (nv / nb, v.name.clone()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}
