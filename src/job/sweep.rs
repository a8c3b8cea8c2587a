//! `chatvec sweep`: `apply` at several scales from one read of the inputs:
//! every input chunk is decoded once and each candidate's output computed
//! from it (`exec::execute_many`), each a complete model directory with its
//! own manifest under one parent, byte-identical to a plain `apply` with
//! that scale.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::exec::RunOptions;
use crate::job::chat_vector::apply_many;
use crate::job::{HEADERS_ONLY, Summary, preflight_with};
use crate::output::Destination;
use crate::output::manifest::RecipeRecord;
use crate::output::sweep::SweepRoot;
use crate::params::apply::ApplySpec;
use crate::params::select::Scale;
use crate::resolve::Fetch;

/// The record of a sweep, written as `sweep.json` in its directory.
#[derive(Debug, Serialize)]
pub struct SweepReport {
    /// The parent directory.
    pub output: String,
    /// Each candidate: its scale, directory and summary.
    pub candidates: Vec<Candidate>,
}

/// One candidate of a sweep.
#[derive(Debug, Serialize)]
pub struct Candidate {
    /// The scale it was applied with.
    pub scale: Scale,
    /// Its directory name under the sweep's.
    pub name: String,
    /// What its apply wrote.
    pub summary: Summary,
}

/// Longest candidate name written out in full.
const MAX_NAME: usize = 64;

/// The directory name of a candidate: `scale-0.5`, `scale-0.3-1` for a
/// gradient. A gradient too long to spell out (one value per layer of an
/// 80-layer model) is named by its ends, its length and a hash of every
/// value: `scale-0.3-to-1-80pts-1a2b3c4d`, short and unique.
pub(crate) fn candidate_name(s: &Scale) -> String {
    let vals: Vec<String> = s.values().iter().map(|v| v.to_string()).collect();
    let full = format!("scale-{}", vals.join("-"));
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = crate::hash::sha256_hex(vals.join(",").as_bytes());
    format!(
        "scale-{}-to-{}-{}pts-{}",
        vals.first().map_or("", String::as_str),
        vals.last().map_or("", String::as_str),
        vals.len(),
        &digest[..8]
    )
}

/// Writes `base + scale * vector` for every scale in `scales` into
/// `out.output/scale-S/`.
pub fn sweep(spec: &ApplySpec, scales: &[Scale], out: &Destination, run: &RunOptions) -> Result<SweepReport> {
    preflight_with(
        out,
        |o, fetch| sweep_recorded(spec, scales, o, run, fetch, None),
        |r: &mut SweepReport| r.candidates.iter_mut().for_each(|c| c.summary.notes.push(HEADERS_ONLY.into())),
    )
}

/// `sweep`, each candidate's manifest recording the recipe it came from.
pub(crate) fn sweep_recorded(
    spec: &ApplySpec,
    scales: &[Scale],
    out: &Destination,
    run: &RunOptions,
    fetch: &Fetch,
    recipe: Option<RecipeRecord>,
) -> Result<SweepReport> {
    if scales.is_empty() {
        return Err(Error::Usage("--scales gives no candidate".into()));
    }
    let mut names: Vec<String> = scales.iter().map(candidate_name).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::Usage("--scales lists a scale twice".into()));
    }
    let root = SweepRoot::create(out)?;
    let outs: Vec<(Scale, Destination)> =
        scales.iter().map(|s| (s.clone(), root.candidate(&candidate_name(s)))).collect();
    // One read of the inputs for every candidate.
    let summaries = match apply_many(spec, &outs, run, fetch, recipe) {
        Ok(s) => s,
        Err(e) => {
            root.abandon();
            return Err(e);
        }
    };
    let candidates = scales
        .iter()
        .zip(summaries)
        .map(|(s, summary)| Candidate { scale: s.clone(), name: candidate_name(s), summary })
        .collect();
    let report = SweepReport { output: root.path().display().to_string(), candidates };
    root.finish(&report)?;
    Ok(report)
}
