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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::ScopedJoinHandle;

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

/// The thread hashing one shard as it is read, and where its newest end
/// goes.
type Follower<'s> = (SyncSender<u64>, ScopedJoinHandle<'s, Result<String>>);

/// Hashes the shards of `ck` as `touches` arrive; stops early with an error
/// when `stop` is set (the job failed or was interrupted). Shards whose hash
/// `cache` knows are not read; new hashes are added to it.
///
/// Each shard being read has a thread of its own that hashes it up to the
/// newest end reported for it, so shards read side by side (the output
/// shards the schedule fills at once) are hashed on as many cores, not one
/// sha256 stream per input. A thread ends when its shard is hashed to the
/// end. Shards never reported are hashed at the end, on up to one thread
/// per core.
pub(crate) fn hash_following(
    ck: &Checkpoint,
    cache: &HashCache,
    touches: Receiver<Touch>,
    stop: &AtomicBool,
) -> Result<Vec<WrittenFile>> {
    let known: Vec<Option<String>> = ck.shards.iter().map(|s| cache.get(&s.stamp)).collect();
    let hash_shard = |i: usize, ends: Option<Receiver<u64>>| -> Result<String> {
        let map: &[u8] = &ck.shards[i].map;
        let mut state = (Sha256::new(), 0u64);
        for end in ends.into_iter().flatten() {
            advance(&mut state, map, end, stop)?;
            if state.1 == map.len() as u64 {
                break;
            }
        }
        advance(&mut state, map, map.len() as u64, stop)?;
        // A shard truncated while read hashed zeros: no hash of it.
        ck.check_intact()?;
        let h = hex(&state.0.finalize());
        cache.put(&ck.shards[i].stamp, &h);
        Ok(h)
    };
    let hash_shard = &hash_shard;
    let mut hashed: Vec<Option<Result<String>>> = std::thread::scope(|s| {
        let mut following: Vec<Option<Follower>> = ck.shards.iter().map(|_| None).collect();
        for t in touches {
            if known[t.shard].is_some() {
                continue;
            }
            let (tx, _) = following[t.shard].get_or_insert_with(|| {
                let (tx, rx) = sync_channel::<u64>(256);
                (tx, s.spawn(move || hash_shard(t.shard, Some(rx))))
            });
            // A thread that has hashed its shard to the end has stopped
            // listening.
            let _ = tx.send(t.end);
        }
        following
            .into_iter()
            .map(|f| {
                f.map(|(tx, handle)| {
                    drop(tx);
                    handle.join().unwrap_or_else(|_| Err(Error::Internal("a hash thread panicked".into())))
                })
            })
            .collect()
    });
    // The shards nobody read, shared out among the cores.
    let rest: Vec<usize> =
        (0..ck.shards.len()).filter(|&i| known[i].is_none() && hashed[i].is_none()).collect();
    let (next, mut panicked) = (AtomicUsize::new(0), false);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..cores.min(rest.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    while let Some(&i) = rest.get(next.fetch_add(1, Ordering::Relaxed)) {
                        done.push((i, hash_shard(i, None)));
                    }
                    done
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(done) => done.into_iter().for_each(|(i, h)| hashed[i] = Some(h)),
                Err(_) => panicked = true,
            }
        }
    });
    if panicked {
        return Err(Error::Internal("a hash thread panicked".into()));
    }
    let mut out = Vec::with_capacity(ck.shards.len());
    for (i, shard) in ck.shards.iter().enumerate() {
        let sha256 = match (&known[i], hashed.get_mut(i).and_then(Option::take)) {
            (Some(h), _) => h.clone(),
            (None, Some(h)) => h?,
            (None, None) => return Err(Error::Internal(format!("shard {} was not hashed", shard.file_name))),
        };
        out.push(WrittenFile { file: shard.file_name.clone(), bytes: shard.map.len() as u64, sha256 });
    }
    Ok(out)
}

/// Hashes `map` on from the state's offset up to `end`, in pieces, checking
/// between them for an interrupt or an abandoned job.
fn advance(state: &mut (Sha256, u64), map: &[u8], end: u64, stop: &AtomicBool) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use super::*;

    /// A checkpoint of three shards (one f32 tensor each, of different
    /// sizes) with its index; returns its directory.
    fn three_shards(root: &std::path::Path) -> std::path::PathBuf {
        let dir = root.join("m");
        std::fs::create_dir_all(&dir).unwrap();
        let mut weight_map = serde_json::Map::new();
        for (k, n) in [5000usize, 70_000, 300].into_iter().enumerate() {
            let name = format!("t{k}");
            let file = format!("model-0000{}-of-00003.safetensors", k + 1);
            let data: Vec<u8> = (0..n).flat_map(|i| ((i * 7 + k) as f32).to_le_bytes()).collect();
            let header = serde_json::json!({ name.clone(): {"dtype": "F32", "shape": [n], "data_offsets": [0, data.len()]} });
            let text = serde_json::to_vec(&header).unwrap();
            let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&text);
            bytes.extend_from_slice(&data);
            std::fs::write(dir.join(&file), bytes).unwrap();
            weight_map.insert(name, serde_json::Value::String(file));
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        dir
    }

    /// Touches that alternate between two shards (as when output shards
    /// are filled side by side), one shard never touched: every shard's
    /// hash is the sha256 of its file, computed here independently.
    #[test]
    fn shards_read_side_by_side_or_never_are_each_hashed_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = three_shards(root.path());
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.shards.len(), 3);
        let len = |i: usize| ck.shards[i].map.len() as u64;
        let (tx, rx) = sync_channel::<Touch>(4);
        let stop = AtomicBool::new(false);
        let got = std::thread::scope(|s| {
            let h = s.spawn(|| hash_following(&ck, &HashCache::disabled(), rx, &stop));
            for step in 1..=4u64 {
                for shard in [1, 0] {
                    tx.send(Touch { shard, end: len(shard) * step / 5 }).unwrap();
                }
            }
            tx.send(Touch { shard: 0, end: len(0) }).unwrap();
            drop(tx);
            h.join().unwrap().unwrap()
        });
        for (i, w) in got.iter().enumerate() {
            let bytes = std::fs::read(dir.join(&ck.shards[i].file_name)).unwrap();
            assert_eq!(w.file, ck.shards[i].file_name);
            assert_eq!(w.bytes, bytes.len() as u64);
            assert_eq!(w.sha256, hex(&Sha256::digest(&bytes)), "shard {i}");
        }
    }

    /// A job that stops takes its hashers with it: an error, not hashes.
    #[test]
    fn a_stopped_job_stops_its_hashers() {
        let root = tempfile::tempdir().unwrap();
        let ck = Checkpoint::open(&three_shards(root.path())).unwrap();
        let (tx, rx) = sync_channel::<Touch>(4);
        let stop = AtomicBool::new(true);
        tx.send(Touch { shard: 1, end: 10 }).unwrap();
        drop(tx);
        let e = hash_following(&ck, &HashCache::disabled(), rx, &stop).unwrap_err();
        assert!(matches!(e, Error::Interrupted), "{e}");
    }
}
