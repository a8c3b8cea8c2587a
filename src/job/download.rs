//! `chatvec download`: fills the shared Hugging Face cache with the models
//! a job will need, as the job itself would fetch them (or the files
//! matching `--include`), for login nodes whose compute nodes have no
//! network; `--dry-run` lists what would come and its size.

use serde::Serialize;

use crate::error::Result;
use crate::resolve::{Prefetch, prefetch};

/// What was fetched (or would be).
#[derive(Clone, Debug, Serialize)]
pub struct DownloadReport {
    /// Whether nothing was downloaded (`--dry-run`).
    pub dry_run: bool,
    /// Per model.
    pub models: Vec<Prefetch>,
}

/// Fetches each of `models` into the cache (see `resolve::prefetch`).
pub fn download(models: &[String], include: &[String], dry_run: bool) -> Result<DownloadReport> {
    let mut out = Vec::new();
    for m in models {
        out.extend(prefetch(m, include, dry_run)?);
    }
    Ok(DownloadReport { dry_run, models: out })
}

impl std::fmt::Display for DownloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for m in &self.models {
            let total: u64 = m.files.iter().map(|x| x.size).sum();
            let missing: u64 = m.files.iter().filter(|x| !x.cached).map(|x| x.size).sum();
            writeln!(
                f,
                "{} ({} @ {}): {} file(s), {:.2} GB; {:.2} GB {}",
                m.reference,
                m.repo,
                m.commit,
                m.files.len(),
                total as f64 / 1e9,
                missing as f64 / 1e9,
                if self.dry_run { "to download" } else { "downloaded, the rest was cached" }
            )?;
            for x in &m.files {
                writeln!(f, "  {:>12} {}{}", x.size, x.name, if x.cached { "  (cached)" } else { "" })?;
            }
        }
        Ok(())
    }
}
