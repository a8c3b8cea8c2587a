//! `chatvec demo`: the main job on tiny synthetic models, no download.
//!
//! Builds a Llama-shaped pretrained model, its chat model, and a
//! continued-pretrained model with an expanded vocabulary (as original
//! Swallow grew Llama 2's), then extracts the chat vector, applies it both
//! ways, and shows that the two outputs are the same bytes.

use std::path::{Path, PathBuf};

use chatvec::{
    AnalyzeReport, AnalyzeSpec, ApplyParams, Destination, DeviceChoice, Error, ExtractParams, FloatType,
    InputHashes, Result, RunOptions, Summary, VectorSource, human_bytes,
};
use serde::Serialize;

use super::synth::{Component, LlamaShape, ModelFiles, tokens, write_model};
use super::{json_out, out};

const VOCAB: u64 = 256;
const EXTRA: u64 = 64;

/// What `demo --json` prints.
#[derive(Serialize)]
struct DemoReport {
    dir: String,
    extract: Summary,
    apply_stored: Summary,
    apply_streaming: Summary,
    identical: bool,
    analyze: AnalyzeReport,
}

/// Runs the demo in `dir` (a fresh temporary directory when `None`, removed
/// afterwards unless `keep`) and prints what it did.
pub(super) fn run(dir: Option<&Path>, keep: bool, device: DeviceChoice, json: bool) -> Result<()> {
    let root: PathBuf = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("chatvec-demo-{}", std::process::id())),
    };
    if root.exists() && std::fs::read_dir(&root).map(|mut r| r.next().is_some()).unwrap_or(true) {
        return Err(Error::Usage(format!("demo directory {} is not empty", root.display())));
    }
    let result = steps(&root, device);
    if dir.is_none() && !keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    let (text, report) = result?;
    if json { json_out(&report) } else { out(&text) }
}

fn steps(root: &Path, device: DeviceChoice) -> Result<(String, DemoReport)> {
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
    let bf16 = FloatType::BF16;
    write_model(&pre, &small, bf16, &[p], u64::MAX, &ModelFiles { tokens: Some(&toks), chat: false })?;
    write_model(&chat, &small, bf16, &[p, c], u64::MAX, &ModelFiles { tokens: Some(&toks), chat: true })?;
    // Small shards so the demo exercises sharded checkpoints.
    let files = ModelFiles { tokens: Some(&grown_toks), chat: false };
    write_model(&base, &grown, bf16, &[p, k], 200_000, &files)?;
    out.push_str(&format!("demo models in {}:\n", root.display()));
    out.push_str("  llama-pretrained  the English base (vocab 256)\n");
    out.push_str("  llama-chat        its chat model\n");
    out.push_str(
        "  swallow-like      continued pretraining of the base, vocabulary grown to 320, sharded\n\n",
    );

    out.push_str("$ chatvec inspect swallow-like\n");
    let report = chatvec::inspect(&base.display().to_string())?.to_string();
    out.push_str(&report.lines().take_while(|l| !l.starts_with("  tensors:")).collect::<Vec<_>>().join("\n"));
    out.push_str("\n  ...\n\n");

    // Demo models are new every run; caching their hashes would only
    // leave entries behind.
    let run = RunOptions { input_hashes: InputHashes::Uncached, device, ..RunOptions::default() };
    let s = |p: &Path| p.display().to_string();
    let vector = root.join("chat-vector");
    out.push_str(
        "$ chatvec extract --chat llama-chat --pretrained llama-pretrained --dtype f32 -o chat-vector\n",
    );
    let spec = ExtractParams { dtype: Some(FloatType::F32), ..ExtractParams::new(s(&chat), s(&pre)) };
    let sx = chatvec::extract(&spec.validate()?, &Destination::new(&vector), &run)?;
    out.push_str(&describe(&sx));

    let a = root.join("swallow-like-cv");
    out.push_str("$ chatvec apply --base swallow-like --vector chat-vector -o swallow-like-cv\n");
    let sa =
        chatvec::apply(&ApplyParams::new(s(&base), s(&vector)).validate()?, &Destination::new(&a), &run)?;
    out.push_str(&describe(&sa));

    let b = root.join("swallow-like-cv-streamed");
    out.push_str("$ chatvec apply --base swallow-like --chat llama-chat --pretrained llama-pretrained -o swallow-like-cv-streamed\n");
    let sb = chatvec::apply(
        &ApplyParams::pair(s(&base), s(&chat), s(&pre)).validate()?,
        &Destination::new(&b),
        &run,
    )?;
    out.push_str(&describe(&sb));

    let same = sa.shards.len() == sb.shards.len()
        && sa.shards.iter().zip(&sb.shards).all(|(x, y)| x.sha256 == y.sha256);
    if !same {
        return Err(Error::Internal("the stored-vector and streaming outputs differ".into()));
    }
    out.push_str("the stored f32 vector and the streaming form gave byte-identical shards:\n");
    for sh in &sa.shards {
        out.push_str(&format!("  {}  sha256 {}\n", sh.file, sh.sha256));
    }

    out.push_str("\n$ chatvec analyze --vector chat-vector --base swallow-like --applied swallow-like-cv\n");
    let spec = AnalyzeSpec {
        vector: VectorSource::Stored(s(&vector)),
        against: None,
        base: Some(s(&base)),
        applied: Some(s(&a)),
        plot: None,
        force: false,
        threads: None,
    };
    let analysis = chatvec::analyze(&spec)?;
    // The per-layer table and the findings; the per-kind table is in
    // `chatvec analyze` itself.
    let text = analysis.to_string();
    let mut parts = text.split("\n\n");
    let layers = parts.nth(1).unwrap_or_default();
    out.push_str(layers);
    out.push_str("\n\n");
    out.push_str(text.rsplit("\n\n").next().unwrap_or_default());
    let report = DemoReport {
        dir: s(root),
        extract: sx,
        apply_stored: sa,
        apply_streaming: sb,
        identical: same,
        analyze: analysis,
    };
    Ok((out, report))
}

fn describe(s: &Summary) -> String {
    let mut t = format!(
        "  wrote {} ({} tensors, {} computed, {} in {} shard(s))\n",
        s.output.as_deref().unwrap_or("-"),
        s.tensors,
        s.computed_tensors,
        human_bytes(s.bytes),
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
