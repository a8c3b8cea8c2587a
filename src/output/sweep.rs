//! A sweep's root directory (`-o DIR`): one complete output per candidate
//! under it, and `sweep.json`, the summary, written last.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::json::to_pretty;
use crate::output::Destination;
use crate::output::dir::refuse_replacing;
use crate::output::files::write_atomically;

/// The summary every sweep root holds; `--force` replaces only a directory
/// that has one (or an empty directory).
const SWEEP_SUMMARY: &str = "sweep.json";

/// A sweep's root, checked and created (unless a dry run).
pub(crate) struct SweepRoot {
    dest: Destination,
    /// Whether this run created it (and so removes it when nothing was
    /// committed under it).
    created: bool,
}

impl SweepRoot {
    /// Checks that `dest` may hold a sweep (a new directory, or with
    /// `force` an earlier sweep's or an empty one) and creates it.
    pub(crate) fn create(dest: &Destination) -> Result<SweepRoot> {
        let root = &dest.output;
        if dest.dry_run {
            return Ok(SweepRoot { dest: dest.clone(), created: false });
        }
        if root.exists() && !dest.force {
            return Err(Error::OutputExists(root.clone()));
        }
        if root.exists()
            && let Some(why) = refuse_replacing(root, SWEEP_SUMMARY)
        {
            return Err(Error::Usage(format!(
                "--force replaces only an earlier `chatvec sweep` directory or an empty directory, and {} is neither: {why}",
                root.display()
            ))
            .with_hint("remove it yourself, or choose another output directory"));
        }
        let created = !root.exists();
        std::fs::create_dir_all(root).map_err(|e| Error::io("creating", root, e))?;
        Ok(SweepRoot { dest: dest.clone(), created })
    }

    /// The root's path, as given.
    pub(crate) fn path(&self) -> &PathBuf {
        &self.dest.output
    }

    /// Where candidate `name` goes: `ROOT/name`, replaced as the root is.
    pub(crate) fn candidate(&self, name: &str) -> Destination {
        Destination { output: self.dest.output.join(name), ..self.dest.clone() }
    }

    /// Nothing was committed: a root this run created is removed, so no
    /// empty sweep is left behind.
    pub(crate) fn abandon(self) {
        if self.created {
            let _ = std::fs::remove_dir(&self.dest.output);
        }
    }

    /// Writes the summary (not on a dry run).
    pub(crate) fn finish(self, summary: &impl Serialize) -> Result<()> {
        if self.dest.dry_run {
            return Ok(());
        }
        write_atomically(&self.dest.output.join(SWEEP_SUMMARY), &to_pretty(summary))
    }
}
