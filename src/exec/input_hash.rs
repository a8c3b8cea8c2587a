//! Sha256 of every input shard for the manifest, computed while the job
//! streams, so inputs larger than the page cache are read from disk once.
//!
//! The executor reports each byte range of an input it has just read, in job
//! order; one thread per input hashes each shard sequentially up to the end
//! of the newest range reported. When the job reads an input in file order
//! (the usual case: the same architecture has the same tensor order) the
//! hasher follows right behind the compute on pages still in cache. Any other
//! order is still hashed correctly: a range ahead of the hashed prefix makes
//! the hasher read up to it, and whatever was never reported is hashed at
//! the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;
use crate::interrupt;
use crate::model::checkpoint::Checkpoint;
use crate::model::hash_cache::HashCache;
use crate::output::files::WrittenFile;

/// Bytes hashed between checks for an interrupt or an abandoned job.
const PIECE: usize = 16 << 20;

/// A byte range of one input shard that was read (absolute file offsets).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Touch {
    pub shard: usize,
    pub end: u64,
}

/// Hashes the shards of `ck` as `touches` arrive; stops early with an error
/// when `stop` is set (the job failed or was interrupted). Shards whose hash
/// `cache` knows are not read; new hashes are added to it.
pub(crate) fn hash_following(
    ck: &Checkpoint,
    cache: &HashCache,
    touches: Receiver<Touch>,
    stop: &AtomicBool,
) -> Result<Vec<WrittenFile>> {
    let known: Vec<Option<String>> = ck.shards.iter().map(|s| cache.get(&s.stamp)).collect();
    // A known shard counts as already hashed to its end.
    let mut states: Vec<(Sha256, u64)> = ck
        .shards
        .iter()
        .zip(&known)
        .map(|(s, k)| (Sha256::new(), if k.is_some() { s.map.len() as u64 } else { 0 }))
        .collect();
    let advance = |state: &mut (Sha256, u64), map: &[u8], end: u64| -> Result<()> {
        while state.1 < end {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            interrupt::check()?;
            let to = end.min(state.1 + PIECE as u64);
            state.0.update(&map[state.1 as usize..to as usize]);
            state.1 = to;
        }
        Ok(())
    };
    for t in touches {
        advance(&mut states[t.shard], &ck.shards[t.shard].map, t.end)?;
    }
    let mut out = Vec::with_capacity(states.len());
    for ((state, shard), known) in states.iter_mut().zip(&ck.shards).zip(known) {
        let sha256 = match known {
            Some(h) => h,
            None => {
                advance(state, &shard.map, shard.map.len() as u64)?;
                // A shard truncated while read hashed zeros: no hash of it.
                ck.check_intact()?;
                let h = hex(&std::mem::take(&mut state.0).finalize());
                cache.put(&shard.stamp, &h);
                h
            }
        };
        out.push(WrittenFile { file: shard.file_name.clone(), bytes: shard.map.len() as u64, sha256 });
    }
    Ok(out)
}
