//! One model on disk: its safetensors shards memory-mapped and validated, and
//! one table `name -> (shard, dtype, shape, byte range)` over all of them.
//!
//! Inputs are only ever mapped, never read whole (contract 3), so a 140 GB
//! checkpoint costs page cache, not process memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::json::{Entries, read_capped};
use crate::model::config::ModelConfig;
use crate::model::dtype::DType;
use crate::model::mapped::GuardedMap;
use crate::model::safetensors::parse_header;
use crate::model::torch_bin::read_bin;

pub use crate::model::tensor::Tensor;

/// The single-file weights name transformers uses.
pub(crate) const SINGLE_FILE: &str = "model.safetensors";
/// The sharded-checkpoint index name transformers uses.
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";
/// PyTorch's single-file name, read when a model has no safetensors.
pub(crate) const BIN_SINGLE_FILE: &str = "pytorch_model.bin";
/// PyTorch's sharded-checkpoint index name.
pub(crate) const BIN_INDEX_FILE: &str = "pytorch_model.bin.index.json";
/// Largest index file accepted (a 70B index is about 70 KB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Where a model came from on the Hugging Face Hub.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct HubOrigin {
    /// `org/name`.
    pub repo: String,
    /// The revision asked for (`main` when none was).
    pub revision: String,
    /// The commit sha it resolved to.
    pub commit: String,
}

/// Identity and state of an opened file, as the kernel reports them:
/// device, inode, size, and modification and change times in nanoseconds.
/// Rewriting a file changes its ctime, which no user can set, so a hash
/// recorded for one stamp never describes other bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub(crate) fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// A memory-mapped shard.
pub(crate) struct Shard {
    pub path: PathBuf,
    /// File name inside the checkpoint directory.
    pub file_name: String,
    pub map: GuardedMap,
    /// The mapped file's identity and state, for the hash cache.
    pub stamp: FileStamp,
}

/// A model directory opened for reading: its shards memory-mapped and
/// validated, and one table of every tensor. Nothing is read until asked
/// for, so opening a 140 GB model costs page cache, not memory.
pub struct Checkpoint {
    pub(crate) dir: PathBuf,
    pub(crate) shards: Vec<Shard>,
    /// All tensors in shard order, then data-offset order within a shard.
    pub(crate) tensors: Vec<Tensor>,
    by_name: HashMap<String, usize>,
    pub(crate) config: Option<ModelConfig>,
    /// Where the model came from on the Hub, when it was found in the cache.
    pub(crate) origin: Option<HubOrigin>,
}

/// Names the input embedding matrix goes by in common architectures.
const EMBED_NAMES: [&str; 4] = [
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
];
/// Names of the output projection that may be tied to the embeddings.
const LM_HEAD_NAMES: [&str; 2] = ["lm_head.weight", "embed_out.weight"];

/// Whether `name` is a vocabulary-indexed matrix (rows are tokens), so that
/// vocabulary expansion changes its row count.
pub(crate) fn is_vocab_matrix(name: &str) -> bool {
    EMBED_NAMES.contains(&name) || LM_HEAD_NAMES.contains(&name)
}

/// Whether `name` is the input embedding matrix.
pub(crate) fn is_embedding(name: &str) -> bool {
    EMBED_NAMES.contains(&name)
}

/// Whether `name` is an output projection that a tied model omits.
pub(crate) fn is_lm_head(name: &str) -> bool {
    LM_HEAD_NAMES.contains(&name)
}

impl Checkpoint {
    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor, in shard order, then data order within a shard.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// Total bytes of the weight files (headers included).
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }

    /// Opens a model directory: `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json` (else the `pytorch_model.bin`
    /// equivalents), plus `config.json` when present.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!("{} is not a directory", dir.display())));
        }
        // safetensors first; PyTorch .bin only when there is no safetensors.
        let layouts = [(INDEX_FILE, SINGLE_FILE, false), (BIN_INDEX_FILE, BIN_SINGLE_FILE, true)];
        let mut found = None;
        for (index, single, bin) in layouts {
            if dir.join(index).is_file() {
                let (files, map) = read_index(&dir.join(index))?;
                found = Some((dir.join(index), files, Some(map), bin));
                break;
            }
            if dir.join(single).is_file() {
                found = Some((dir.join(index), vec![single.to_string()], None, bin));
                break;
            }
        }
        let Some((index_path, files, weight_map, bin)) = found else {
            return Err(no_weights_error(dir));
        };
        let (shards, tensors, by_name) = open_shards(dir, &index_path, &files, weight_map.as_ref(), bin)?;
        let config = match crate::model::side_file(dir, "config.json")? {
            Some(p) => Some(ModelConfig::read(&p)?),
            None => None,
        };
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, tensors, by_name, config, origin: None })
    }

    /// Opens one weight file of `dir` on its own (a LoRA adapter's
    /// `adapter_model.safetensors`, or a PyTorch file when `bin`); no
    /// config.json is read, since an adapter's config is its own.
    pub(crate) fn open_file(dir: &Path, file: &str, bin: bool) -> Result<Checkpoint> {
        let files = [file.to_string()];
        let (shards, tensors, by_name) = open_shards(dir, &dir.join(file), &files, None, bin)?;
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, tensors, by_name, config: None, origin: None })
    }

    /// Replaces the tensor table with `tensors` (the same bytes read under
    /// other names and bounds: `experts::split_fused`). Every range must
    /// lie inside the stored tensors'; a name given twice is refused.
    pub(crate) fn retable(&mut self, tensors: Vec<Tensor>) -> Result<()> {
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if let Some(&j) = by_name.get(&t.name) {
                let first: &Tensor = &tensors[j];
                return Err(Error::bad_tensor(
                    self.file_of(t),
                    &t.name,
                    format!(
                        "is read from {} and also from {}; the model stores it twice, in two layouts",
                        t.stored_as.as_deref().unwrap_or(&t.name),
                        first.stored_as.as_deref().unwrap_or(&first.name)
                    ),
                ));
            }
            by_name.insert(t.name.clone(), i);
        }
        self.tensors = tensors;
        self.by_name = by_name;
        Ok(())
    }

    /// The tensor called `name`, if stored.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Index into `tensors` of the tensor that plays the role of `name`: the
    /// stored one, or for the output projection of a tied model, the
    /// embedding matrix it shares.
    pub(crate) fn logical_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied().or_else(|| {
            if is_lm_head(name) && self.is_tied() {
                EMBED_NAMES.iter().find_map(|n| self.by_name.get(*n).copied())
            } else {
                None
            }
        })
    }

    /// The tensor that plays the role of `name` (see `logical_index`).
    pub(crate) fn logical(&self, name: &str) -> Option<&Tensor> {
        self.logical_index(name).map(|i| &self.tensors[i])
    }

    /// The input embedding matrix, if the model has one under a known name.
    pub(crate) fn embedding(&self) -> Option<&Tensor> {
        EMBED_NAMES.iter().find_map(|n| self.get(n))
    }

    /// Whether the output projection is tied to the embeddings: there is an
    /// embedding matrix and no separate lm_head tensor. (The stored tensors
    /// decide, not `tie_word_embeddings`, whose default differs between
    /// architectures.)
    pub(crate) fn is_tied(&self) -> bool {
        self.embedding().is_some() && !LM_HEAD_NAMES.iter().any(|n| self.get(n).is_some())
    }

    /// The little-endian bytes of tensor `t` (a tensor of this checkpoint).
    pub fn bytes(&self, t: &Tensor) -> &[u8] {
        &self.shards[t.shard].map[t.start as usize..(t.start + t.len) as usize]
    }

    /// Fails, naming the file, once a shard was truncated while mapped (its
    /// lost pages read as zeros): called at every chunk boundary and before
    /// an output is committed, so such zeros never reach a finished model.
    pub(crate) fn check_intact(&self) -> Result<()> {
        match self.shards.iter().find(|s| !s.map.intact()) {
            Some(s) => Err(GuardedMap::lost_error(&s.path)),
            None => Ok(()),
        }
    }

    /// The file a tensor lives in, for messages.
    pub(crate) fn file_of(&self, t: &Tensor) -> &Path {
        &self.shards[t.shard].path
    }

    /// Total bytes of tensor data.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(Tensor::stored_bytes).sum()
    }

    /// Total parameter count.
    pub(crate) fn parameters(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel()).sum()
    }
}

/// Maps and validates the weight `files` of `dir` (safetensors, or
/// PyTorch `.bin` when `bin`), checking them against the index's
/// `weight_map` when there is one (`index_path` names it in messages).
#[allow(clippy::type_complexity)]
fn open_shards(
    dir: &Path,
    index_path: &Path,
    files: &[String],
    weight_map: Option<&HashMap<String, String>>,
    bin: bool,
) -> Result<(Vec<Shard>, Vec<Tensor>, HashMap<String, usize>)> {
    let mut shards = Vec::with_capacity(files.len());
    let mut tensors = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (si, file_name) in files.iter().enumerate() {
        let path = dir.join(file_name);
        if !path.is_file() {
            return Err(Error::bad_file(
                index_path,
                format!("names shard '{file_name}', which is not in {}", dir.display()),
            ));
        }
        let (map, stamp) = map_file(&path)?;
        // (name, dtype, shape, absolute start, length) of each stored tensor.
        let rows: Vec<(String, DType, Vec<u64>, u64, u64)> = if bin {
            let bin = read_bin(&path, map.len() as u64)?;
            bin.into_iter().map(|t| (t.name, t.dtype, t.shape, t.start, t.len)).collect()
        } else {
            let h = parse_header(&map, &path)?;
            h.tensors
                .into_iter()
                .map(|t| (t.name, t.dtype, t.shape, h.data_start + t.begin, t.end - t.begin))
                .collect()
        };
        let stored = rows.into_iter().map(|(name, dtype, shape, start, len)| Tensor {
            name,
            dtype,
            shape,
            shard: si,
            start,
            len,
            stored_as: None,
            quant: None,
        });
        for t in stored {
            if let Some(&prev) = by_name.get(&t.name) {
                let other: &Tensor = &tensors[prev];
                return Err(Error::bad_tensor(
                    &path,
                    &t.name,
                    format!("is also in {}; a name may appear in one shard only", files[other.shard]),
                ));
            }
            if let Some(map) = weight_map {
                match map.get(&t.name) {
                    Some(f) if f == file_name => {}
                    Some(f) => {
                        return Err(Error::bad_file(
                            index_path,
                            format!("maps tensor '{}' to {f}, but it is stored in {file_name}", t.name),
                        ));
                    }
                    None => {
                        return Err(Error::bad_file(
                            index_path,
                            format!("does not list tensor '{}', which is stored in {file_name}", t.name),
                        ));
                    }
                }
            }
            by_name.insert(t.name.clone(), tensors.len());
            tensors.push(t);
        }
        shards.push(Shard { path, file_name: file_name.clone(), map, stamp });
    }
    if let Some(map) = weight_map {
        let mut missing: Vec<_> = map.keys().filter(|k| !by_name.contains_key(*k)).collect();
        missing.sort();
        if let Some(name) = missing.first() {
            return Err(Error::bad_file(
                index_path,
                format!(
                    "lists tensor '{name}' in {}, but that shard does not hold it ({} such tensors)",
                    map[*name],
                    missing.len()
                ),
            ));
        }
    }
    Ok((shards, tensors, by_name))
}

fn no_weights_error(dir: &Path) -> Error {
    Error::Usage(format!(
        "{} holds no weights: no {SINGLE_FILE}, {INDEX_FILE}, {BIN_SINGLE_FILE} or {BIN_INDEX_FILE}",
        dir.display()
    ))
    .with_hint("point at a Hugging Face model directory (config.json + safetensors or PyTorch weights)")
}

/// Maps a file read-only (guarded against truncation, see `mapped`), with
/// the stamp of the file that was mapped.
fn map_file(path: &Path) -> Result<(GuardedMap, FileStamp)> {
    let f = crate::json::open_regular(path)?;
    let stamp = FileStamp::of(&f.metadata().map_err(|e| Error::io("reading metadata of", path, e))?);
    Ok((GuardedMap::new(&f, path)?, stamp))
}

/// The parts of `model.safetensors.index.json` chatvec reads; `Entries`
/// makes a tensor named twice an error.
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: Entries,
}

/// Reads `model.safetensors.index.json` (or the `.bin` one).
fn read_index(path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let bin = path.ends_with(BIN_INDEX_FILE);
    parse_index(&read_capped(path, MAX_INDEX_BYTES)?, bin, path)
}

/// Parses an index file's bytes: returns the shard files in order and the
/// tensor -> file map. Shard names must be plain file names ending in
/// `.safetensors` (`.bin` when `bin`). `path` is only used in messages.
pub(crate) fn parse_index(
    bytes: &[u8],
    bin: bool,
    path: &Path,
) -> Result<(Vec<String>, HashMap<String, String>)> {
    let ext = if bin { ".bin" } else { ".safetensors" };
    let index: IndexFile =
        serde_json::from_slice(bytes).map_err(|e| Error::bad_file(path, format!("invalid index: {e}")))?;
    let mut map = HashMap::with_capacity(index.weight_map.0.len());
    let mut files: Vec<String> = Vec::new();
    for (name, v) in index.weight_map.0 {
        let f = v.as_str().ok_or_else(|| {
            Error::bad_file(path, format!("weight_map entry for '{name}' is not a file name"))
        })?;
        if f.is_empty() || f.contains(['/', '\\', '\0']) || f == "." || f == ".." || !f.ends_with(ext) {
            return Err(Error::bad_file(
                path,
                format!("weight_map maps '{name}' to '{f}', which is not a plain {ext} file name"),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
        map.insert(name, f.to_string());
    }
    if files.is_empty() {
        return Err(Error::bad_file(path, "weight_map is empty"));
    }
    files.sort();
    Ok((files, map))
}
