//! The output side of the executor: finished jobs' pieces appended to their
//! shard files, and each file hashed as it grows.
//!
//! Every open output file has a thread of its own that copies each piece
//! into the file's direct-I/O staging buffers (whose own disk thread does
//! the `pwrite`s) and computes its sha256 right behind. A router thread
//! hands each batch's pieces to the files they belong to, opens a shard's
//! files at its header and closes them after its last job. So a sweep's
//! candidates, and the several shards the schedule fills side by side
//! (`jobs::schedule`), are written and hashed on as many cores: one sha256
//! stream (about 1.5 GB/s) no longer gates the run.

use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::jobs::{Piece, Schedule};
use crate::error::{Error, Result};
use crate::hash::hex;
use crate::output::dir::OutputDir;
use crate::output::files::{SyncedFile, WrittenFile};
use crate::plan::Plan;

/// A batch of jobs' pieces, one per variant, by job index.
pub(crate) type Batch<'a> = Vec<(usize, Vec<Piece<'a>>)>;

/// What the writers produced: per variant, each shard written (in shard
/// order), and how long the last files took to finish after the last
/// piece was handed to them.
pub(crate) struct Written {
    pub files: Vec<Vec<WrittenFile>>,
    pub tail: Duration,
}

/// One open output file: where its pieces go, the pieces of the current
/// batch, and its writer thread.
struct OpenFile<'scope, 'a> {
    tx: SyncSender<Vec<Piece<'a>>>,
    pending: Vec<Piece<'a>>,
    thread: ScopedJoinHandle<'scope, Result<WrittenFile>>,
}

/// The router: sends each piece of each batch to the file of its shard and
/// variant, opening a shard's files (one per directory in `dirs`) at its
/// header and closing them after its last job; then waits for every file.
/// Buffers go back through `free` once hashed.
pub(crate) fn write_batches<'scope, 'a: 'scope>(
    scope: &'scope Scope<'scope, '_>,
    plan: &'a Plan,
    dirs: &[&OutputDir],
    sched: &Schedule,
    rx: Receiver<Batch<'a>>,
    free: &Sender<Vec<u8>>,
    bar: &ProgressBar,
) -> Result<Written> {
    let mut open: Vec<(usize, Vec<OpenFile<'scope, 'a>>)> = Vec::new();
    let mut closed: Vec<(usize, Vec<ScopedJoinHandle<'scope, Result<WrittenFile>>>)> = Vec::new();
    let mut routed = Ok(());
    'batches: for batch in rx {
        let mut ending = Vec::new();
        for (ji, pieces) in batch {
            let si = sched.shard[ji];
            if matches!(sched.jobs[ji], super::jobs::Job::Header(_)) {
                let mut files = Vec::with_capacity(dirs.len());
                for dir in dirs {
                    match open_file(scope, plan, dir, si, free) {
                        Ok(f) => files.push(f),
                        Err(e) => {
                            routed = Err(e);
                            break 'batches;
                        }
                    }
                }
                open.push((si, files));
            }
            let Some((_, files)) = open.iter_mut().find(|(s, _)| *s == si) else {
                routed = Err(Error::Internal(format!("shard {si}'s bytes came before its header")));
                break 'batches;
            };
            for (f, piece) in files.iter_mut().zip(pieces) {
                bar.inc(piece.bytes().len() as u64);
                f.pending.push(piece);
            }
            if sched.last_of_shard[si] == ji {
                ending.push(si);
            }
        }
        for (_, files) in &mut open {
            for f in files.iter_mut().filter(|f| !f.pending.is_empty()) {
                if f.tx.send(std::mem::take(&mut f.pending)).is_err() {
                    // The file's thread stopped: its error is reported below.
                    routed = Err(Error::Internal("an output writer stopped".into()));
                    break 'batches;
                }
            }
        }
        for si in ending {
            if let Some(at) = open.iter().position(|(s, _)| *s == si) {
                let (si, files) = open.swap_remove(at);
                closed.push((si, files.into_iter().map(|f| f.thread).collect()));
            }
        }
    }
    let last_piece = Instant::now();
    // Files the producer stopped in the middle of are finished as they are;
    // fewer or shorter shards than planned mean the run failed, and the
    // caller reports why.
    closed.extend(open.into_iter().map(|(si, files)| (si, files.into_iter().map(|f| f.thread).collect())));
    closed.sort_by_key(|(si, _)| *si);
    let mut files: Vec<Vec<WrittenFile>> = dirs.iter().map(|_| Vec::new()).collect();
    let mut failed = None;
    for (_, threads) in closed {
        for (k, t) in threads.into_iter().enumerate() {
            match t.join().unwrap_or_else(|_| Err(Error::Internal("an output writer panicked".into()))) {
                Ok(w) => files[k].push(w),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
    }
    // A file's own error says more than the router's "stopped".
    if let Some(e) = failed {
        return Err(e);
    }
    routed?;
    Ok(Written { files, tail: last_piece.elapsed() })
}

/// Creates shard `si`'s file in `dir` and starts its writer thread.
fn open_file<'scope, 'a: 'scope>(
    scope: &'scope Scope<'scope, '_>,
    plan: &Plan,
    dir: &OutputDir,
    si: usize,
    free: &Sender<Vec<u8>>,
) -> Result<OpenFile<'scope, 'a>> {
    let file = dir.create_shard(&plan.shards[si].file_name)?;
    let (tx, rx) = sync_channel::<Vec<Piece<'a>>>(1);
    let free = free.clone();
    let thread = scope.spawn(move || write_file(file, rx, free));
    Ok(OpenFile { tx, pending: Vec::new(), thread })
}

/// Bytes written and then hashed at a time: the hash then reads what the
/// copy just brought into the cache. Copy and hash together ran at 1.7
/// GB/s on the bench VM (blocks of 16 KiB to 256 KiB alike), the hash
/// alone over the same bytes from memory at 1.4. Large enough that a
/// buffered file's `write` calls stay few.
const HASH_BLOCK: usize = 256 << 10;

/// A file's writer thread: appends the pieces as they come and hashes them
/// right behind, block by block; when they stop, fsyncs the file. Each
/// buffer then goes back for reuse.
fn write_file(mut file: SyncedFile, rx: Receiver<Vec<Piece>>, free: Sender<Vec<u8>>) -> Result<WrittenFile> {
    let mut h = Sha256::new();
    for pieces in rx {
        for piece in pieces {
            for block in piece.bytes().chunks(HASH_BLOCK) {
                file.write(block)?;
                h.update(block);
            }
            if let Some(v) = piece.into_buffer() {
                let _ = free.send(v);
            }
        }
    }
    let (name, bytes) = file.finish()?;
    Ok(WrittenFile { file: name, bytes, sha256: hex(&h.finalize()) })
}
