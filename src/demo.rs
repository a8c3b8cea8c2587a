//! `chatvec demo`: the main job on tiny synthetic models, no download.
//!
//! Builds a Llama-shaped pretrained model, its chat model, and a
//! continued-pretrained model with an expanded vocabulary (as original
//! Swallow grew Llama 2's), then extracts the chat vector, applies it both
//! ways, and shows that the two outputs are the same bytes.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::dtype::FloatType;
use crate::embeddings::EmbeddingPolicy;
use crate::error::{Error, Result};
use crate::execute::ExecOptions;
use crate::inspect;
use crate::job::{OutputSettings, SelectionArgs, Summary, VectorArgs, apply, extract};
use crate::synth::{Component, LlamaShape, ModelFiles, tokens, write_model};

const VOCAB: u64 = 256;
const EXTRA: u64 = 64;

/// Runs the demo in `dir` (a fresh temporary directory when `None`, removed
/// afterwards unless `keep`). Returns the text to print.
pub fn run(
    dir: Option<&Path>,
    keep: bool,
    threads: usize,
    device: crate::cuda::DeviceChoice,
) -> Result<String> {
    let root: PathBuf = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("chatvec-demo-{}", std::process::id())),
    };
    if root.exists() && std::fs::read_dir(&root).map(|mut r| r.next().is_some()).unwrap_or(true) {
        return Err(Error::Usage(format!("demo directory {} is not empty", root.display())));
    }
    let result = steps(&root, threads, device);
    if dir.is_none() && !keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

fn steps(root: &Path, threads: usize, device: crate::cuda::DeviceChoice) -> Result<String> {
    let mut out = String::new();
    let p = Component { seed: 1, amplitude: 0.05 };
    let c = Component { seed: 2, amplitude: 0.004 };
    let k = Component { seed: 3, amplitude: 0.01 };
    let small = LlamaShape::tiny(VOCAB);
    let grown = LlamaShape::tiny(VOCAB + EXTRA);
    let (pre, chat, base) =
        (root.join("llama-pretrained"), root.join("llama-chat"), root.join("swallow-like"));
    let toks = tokens(VOCAB, 0);
    let grown_toks = tokens(VOCAB, EXTRA);
    write_model(
        &pre,
        &small,
        FloatType::BF16,
        &[p],
        u64::MAX,
        &ModelFiles { tokens: Some(&toks), chat: false },
    )?;
    write_model(
        &chat,
        &small,
        FloatType::BF16,
        &[p, c],
        u64::MAX,
        &ModelFiles { tokens: Some(&toks), chat: true },
    )?;
    // Small shards so the demo exercises sharded checkpoints.
    write_model(
        &base,
        &grown,
        FloatType::BF16,
        &[p, k],
        200_000,
        &ModelFiles { tokens: Some(&grown_toks), chat: false },
    )?;
    out.push_str(&format!("demo models in {}:\n", root.display()));
    out.push_str("  llama-pretrained  the English base (vocab 256)\n");
    out.push_str("  llama-chat        its chat model\n");
    out.push_str(
        "  swallow-like      continued pretraining of the base, vocabulary grown to 320, sharded\n\n",
    );

    out.push_str("$ chatvec inspect swallow-like\n");
    let report = inspect::render(&inspect::report(&Checkpoint::open(&base)?)?);
    out.push_str(&report.lines().take_while(|l| !l.starts_with("  tensors:")).collect::<Vec<_>>().join("\n"));
    out.push_str("\n  ...\n\n");

    let sel = SelectionArgs {
        include: vec![],
        exclude: vec![],
        scale: 1.0,
        scale_for: vec![],
        shard_size: 5_000_000_000,
        allow_mismatch: false,
    };
    let settings = |o: &Path| OutputSettings {
        out: o.to_path_buf(),
        force: false,
        dry_run: false,
        exec: ExecOptions {
            threads,
            chunk_elems: crate::execute::DEFAULT_CHUNK_ELEMS,
            progress: false,
            // Demo models are new every run; caching their hashes would only
            // leave entries behind.
            hash_cache: crate::hash_cache::HashCache::disabled(),
            device,
            gpu_memory: None,
            quiet: true,
        },
        recipe: None,
    };
    let s = |p: &Path| p.display().to_string();
    let vector = root.join("chat-vector");
    out.push_str(
        "$ chatvec extract --chat llama-chat --pretrained llama-pretrained --dtype f32 -o chat-vector\n",
    );
    let sx = extract(&s(&chat), &s(&pre), Some(FloatType::F32), &sel, &settings(&vector))?;
    out.push_str(&describe(&sx));

    let a = root.join("swallow-like-cv");
    out.push_str("$ chatvec apply --base swallow-like --vector chat-vector -o swallow-like-cv\n");
    let sa = apply(
        &s(&base),
        VectorArgs::Stored(&s(&vector)),
        EmbeddingPolicy::Auto,
        None,
        false,
        &sel,
        &settings(&a),
    )?;
    out.push_str(&describe(&sa));

    let b = root.join("swallow-like-cv-streamed");
    out.push_str("$ chatvec apply --base swallow-like --chat llama-chat --pretrained llama-pretrained -o swallow-like-cv-streamed\n");
    let sb = apply(
        &s(&base),
        VectorArgs::Streaming { chat: &s(&chat), pretrained: &s(&pre) },
        EmbeddingPolicy::Auto,
        None,
        false,
        &sel,
        &settings(&b),
    )?;
    out.push_str(&describe(&sb));

    let same = sa.shards.iter().zip(&sb.shards).all(|(x, y)| x.sha256 == y.sha256)
        && sa.shards.len() == sb.shards.len();
    if !same {
        return Err(Error::Internal("the stored-vector and streaming outputs differ".into()));
    }
    out.push_str("the stored f32 vector and the streaming form gave byte-identical shards:\n");
    for sh in &sa.shards {
        out.push_str(&format!("  {}  sha256 {}\n", sh.file, sh.sha256));
    }
    Ok(out)
}

fn describe(s: &Summary) -> String {
    let mut t = format!(
        "  wrote {} ({} tensors, {} computed, {} in {} shard(s))\n",
        s.output.as_deref().unwrap_or("-"),
        s.tensors,
        s.computed_tensors,
        inspect::human_bytes(s.bytes),
        s.shards.len()
    );
    for n in &s.notes {
        t.push_str(&format!("  {n}\n"));
    }
    for w in &s.warnings {
        t.push_str(&format!("  warning: {w}\n"));
    }
    t.push('\n');
    t
}
