//! Checks shared by every plan: problems listed together, float dtypes,
//! architectures compared through config.json, and tokenizer vocabularies.

use crate::error::{Error, Result};
use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::config::architecture_differences;
use crate::model::dtype::FloatType;
use crate::model::tokenizer::Vocab;

/// How many problems a mismatch error lists before summarizing the rest.
const MAX_LISTED: usize = 10;

/// Collects problems and turns them into one error listing the first few.
pub(crate) struct Problems {
    what: &'static str,
    list: Vec<String>,
}

impl Problems {
    pub fn new(what: &'static str) -> Problems {
        Problems { what, list: Vec::new() }
    }
    pub fn push(&mut self, p: String) {
        self.list.push(p);
    }
    pub fn into_result(self) -> Result<()> {
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
    t.dtype.float().ok_or_else(|| {
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
    p.into_result().map_err(|e| e.with_hint("pass --allow-mismatch if you are sure the weights line up"))
}

pub(crate) fn read_vocab(ck: &Checkpoint) -> Result<Option<Vocab>> {
    match crate::model::side_file(&ck.dir, "tokenizer.json")? {
        Some(p) => Vocab::read(&p).map(Some),
        None => Ok(None),
    }
}
