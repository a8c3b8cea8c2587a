//! `chatvec bench`: times `apply` (streaming form) on generated Llama-shaped
//! bf16 checkpoints and sets it against the machine's floor, measured in the
//! same run: the slower of durably writing the output's bytes and streaming
//! the inputs from memory. Peak anonymous memory (RssAnon) of the apply
//! process is sampled from /proc; mapped input pages are page cache, not
//! process memory. Optionally runs mergekit on the same inputs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chatvec::{
    Checkpoint, DType, DeviceChoice, Error, FloatType, Result, default_threads, human_count, sha256_file,
    stage_into,
};
use clap::Args;
use memmap2::Mmap;
use serde::Serialize;
use serde_json::json;

use super::synth::{Component, LlamaShape, ModelFiles, tokens, write_lora_adapter, write_model};

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

/// The shapes the benchmark generates (the demo's tiny one is `synth`'s).
impl LlamaShape {
    /// TinyLlama-1.1B's shape (1.10B parameters, 2.2 GB in bf16).
    pub(crate) fn b1() -> LlamaShape {
        LlamaShape {
            vocab: 32000,
            hidden: 2048,
            intermediate: 5632,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            tied: false,
        }
    }

    /// Llama-3-70B's tensor shapes (a 128256 x 8192 embedding, 8192 x
    /// 28672 MLP matrices, 8 KV heads) with one decoder layer, for GPU
    /// throughput on 70B-sized tensors in 18 GB of inputs.
    pub(crate) fn l70_layer() -> LlamaShape {
        LlamaShape {
            vocab: 128256,
            hidden: 8192,
            intermediate: 28672,
            layers: 1,
            heads: 64,
            kv_heads: 8,
            tied: false,
        }
    }

    /// Llama-2-7B's shape (6.74B parameters, 13.5 GB in bf16).
    pub(crate) fn b7() -> LlamaShape {
        LlamaShape {
            vocab: 32000,
            hidden: 4096,
            intermediate: 11008,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            tied: false,
        }
    }

    pub(crate) fn parameters(&self) -> u64 {
        self.tensors().iter().map(|(_, s)| s.iter().product::<u64>()).sum()
    }
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Model shape: tiny, 1b (TinyLlama-1.1B), 7b (Llama-2-7B) or 70b-layer
    /// (Llama-3-70B's tensors, one decoder layer).
    #[arg(long, default_value = "1b")]
    pub shape: String,

    /// Decoder layers instead of the shape's own (inputs go to
    /// `DIR/SHAPE-Nl`): a 7b with fewer layers has inputs larger than this
    /// machine's memory on a disk too small for the whole model.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub layers: Option<u64>,

    /// Time only the floors and the applies (no sweep, no analyze): the
    /// sweep writes three outputs, which a large shape may not have room
    /// for.
    #[arg(long)]
    pub apply_only: bool,

    /// Directory for generated checkpoints (kept and reused between runs).
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,

    /// Threads for apply (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Also run mergekit's task_arithmetic (the chat-vector merge) on the same
    /// inputs; needs `mergekit-yaml` on PATH.
    #[arg(long)]
    pub mergekit: bool,

    /// Also time this merge method (repeatable) through `chatvec merge` on a
    /// mergekit config over the same inputs; with --mergekit, run mergekit on
    /// the same config and compare the outputs in bf16 ulps.
    #[arg(long = "method", value_name = "METHOD")]
    pub methods: Vec<String>,

    /// The `dtype` (mergekit's compute dtype) of the --method configs: float32
    /// computes as chatvec does; bfloat16 rounds every intermediate.
    #[arg(long, default_value = "float32")]
    pub mergekit_dtype: String,

    /// Also time merging a LoRA adapter of this rank (repeatable) over every
    /// projection of the base with `chatvec apply --lora` (the adapter is
    /// generated and kept beside the inputs).
    #[arg(long = "lora", value_name = "RANK")]
    pub lora_ranks: Vec<u64>,

    /// With --lora: also merge each adapter with PEFT's merge_and_unload and
    /// save_pretrained in this Python (torch, transformers, peft), timed the
    /// same way, and compare the outputs in bf16 ulps.
    #[arg(long, value_name = "PYTHON")]
    pub peft: Option<PathBuf>,

    /// Also time `chatvec extract --rank R` (a LoRA adapter of the chat vector;
    /// repeatable); with --mergekit, also mergekit-extract-lora --max-rank R
    /// on the same models, and compare each module's reconstruction error
    /// with the Python beside mergekit-extract-lora (torch).
    #[arg(long = "extract-rank", value_name = "R")]
    pub extract_ranks: Vec<u64>,

    /// Also time downloading the base model from a Hub stand-in on 127.0.0.1
    /// into a fresh cache (four files at once, large files as parallel ranges).
    #[arg(long)]
    pub download: bool,

    /// With --download: also run huggingface_hub's `snapshot_download`
    /// (plain HTTP, Xet off) in this Python against the same stand-in under
    /// the same conditions, timed the same way, and check its files'
    /// sha256.
    #[arg(long, value_name = "PYTHON", requires = "download")]
    pub hf: Option<PathBuf>,

    /// Device for chatvec's apply and merges: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu", value_parser = DeviceChoice::parse)]
    pub device: DeviceChoice,
}

/// One merge method timed, and compared with mergekit.
#[derive(Serialize)]
pub(crate) struct MethodBench {
    pub method: String,
    pub chatvec: Measured,
    pub mergekit: Option<Measured>,
    /// Largest difference from mergekit's output, in bf16 ulps, over all
    /// elements (deterministic methods only).
    pub max_ulp: Option<u32>,
    /// Elements that differ by more than one ulp.
    pub over_one_ulp: Option<u64>,
}

/// One LoRA merge timed, and compared with PEFT's.
#[derive(Serialize)]
pub(crate) struct LoraBench {
    pub rank: u64,
    pub adapter_bytes: u64,
    pub chatvec: Measured,
    pub peft: Option<Measured>,
    /// Largest difference from PEFT's output, in bf16 ulps.
    pub max_ulp: Option<u32>,
    /// Elements that differ by more than one ulp.
    pub over_one_ulp: Option<u64>,
}

/// One LoRA extraction timed, and compared with mergekit-extract-lora's.
#[derive(Serialize)]
pub(crate) struct ExtractBench {
    pub rank: u64,
    pub chatvec: Measured,
    pub mergekit: Option<Measured>,
    /// Per module, chatvec's relative reconstruction error over mergekit's:
    /// the largest and the median.
    pub error_ratio_max: Option<f64>,
    pub error_ratio_median: Option<f64>,
    /// Mean relative error of each, over the modules.
    pub error_mean: Option<[f64; 2]>,
}

/// Each LoRA module's relative reconstruction error
/// `||(chat - pre) - scaling B A|| / ||chat - pre||` for two adapters, in
/// f64 with torch: prints `[[ours, theirs], ...]`.
const EXTRACT_ERRORS: &str = r#"
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
def tensors(d):
    import glob, os
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out
chat, pre, ours, theirs = sys.argv[1:5]
c, p = tensors(chat), tensors(pre)
def get(m, k):
    f, k = m[k]
    with safe_open(f, "pt") as h:
        return h.get_tensor(k).double()
def load(d):
    a = load_file(d + "/adapter_model.safetensors")
    cfg = json.load(open(d + "/adapter_config.json"))
    return a, cfg
(a1, c1), (a2, c2) = load(ours), load(theirs)
rows = []
for k in a1:
    if not k.endswith("lora_A.weight"):
        continue
    m = k[len("base_model.model."):-len(".lora_A.weight")]
    delta = get(c, m + ".weight") - get(p, m + ".weight")
    n = delta.norm().item()
    errs = []
    for a, cfg in ((a1, c1), (a2, c2)):
        r = a[k].shape[0]
        s = cfg["alpha_pattern"].get(m, cfg["lora_alpha"]) / r
        ba = a[k.replace("lora_A", "lora_B")].double() @ a[k].double() * s
        errs.append((delta - ba).norm().item() / n)
    rows.append(errs)
print(json.dumps(rows))
"#;

/// PEFT's merge as its users write it: the base in bf16, the adapter on
/// top, merge_and_unload, save_pretrained.
const PEFT_MERGE: &str = "import sys, torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\nm = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\nPeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])\n";

/// A measured child process.
#[derive(Serialize)]
pub(crate) struct Measured {
    pub seconds: f64,
    pub peak_rss_anon_mib: f64,
    pub peak_rss_mib: f64,
}

#[derive(Serialize)]
pub(crate) struct BenchReport {
    pub shape: String,
    pub parameters: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub threads: usize,
    /// The inputs are larger than this machine's memory: the read floor is
    /// a cold read from the disk, and each timed run starts with the inputs
    /// dropped from the page cache.
    pub inputs_exceed_memory: bool,
    /// `--device` of chatvec's runs.
    pub device: String,
    /// Durable write of the output's byte count (write + fdatasync), the
    /// fastest of the runs below.
    pub floor_write_seconds: f64,
    /// Through the page cache, before and after the apply runs.
    pub floor_write_runs: [f64; 2],
    /// With `O_DIRECT`, before and after the apply runs.
    pub floor_write_direct_runs: [f64; 2],
    /// Reading all inputs: from the (warm) page cache, or, when they exceed
    /// memory, from the disk while the output's bytes are written (see
    /// `cold_io_floor`).
    pub floor_read_seconds: f64,
    pub floor_seconds: f64,
    /// The GPU engine's host staging (`stage_into`) over the warm inputs,
    /// in GB/s: on `threads` threads, and on one (`None` when the inputs
    /// exceed memory: then the disk is the limit).
    pub stage_gb_per_s: Option<[f64; 2]>,
    /// Apply hashing every input shard (`--rehash`).
    pub apply: Measured,
    /// Apply with input hashes from the cache.
    pub apply_cached: Measured,
    pub apply_cached_ratio_to_floor: f64,
    /// The cached apply with `CHATVEC_WRITE=buffered` (through the page
    /// cache, as where direct I/O is refused).
    pub apply_buffered: Measured,
    /// `sweep --scales 0.5,0.75,1` over the same inputs (not with
    /// `--apply-only`).
    pub sweep3: Option<Measured>,
    /// Its time over the cached apply's.
    pub sweep3_ratio_to_apply: Option<f64>,
    /// `analyze --chat --pretrained --base` over the same inputs (not with
    /// `--apply-only`).
    pub analyze: Option<Measured>,
    /// Its time over the cached apply's.
    pub analyze_ratio_to_apply: Option<f64>,
    pub apply_output_gb_per_s: f64,
    pub apply_input_gb_per_s: f64,
    pub ratio_to_floor: f64,
    pub mergekit: Option<Measured>,
    pub methods: Vec<MethodBench>,
    pub lora: Vec<LoraBench>,
    pub extract: Vec<ExtractBench>,
    /// `inspect` of the base from the loopback Hub into a fresh cache, per
    /// condition (healthy, slow, dropping, corrupt once).
    pub download: Vec<DownloadBench>,
}

#[derive(Serialize)]
pub(crate) struct DownloadBench {
    /// What the loopback Hub did, and how chatvec fetched.
    pub condition: String,
    pub measured: Measured,
    /// Retries chatvec said it made (a transfer resumed or a file fetched
    /// again).
    pub retries: usize,
    /// huggingface_hub under the same condition (with `--hf`).
    pub huggingface_hub: Option<PeerDownload>,
}

#[derive(Serialize)]
pub(crate) struct PeerDownload {
    /// The run, when it exited 0.
    pub measured: Option<Measured>,
    /// Why it failed, when it did.
    pub failed: Option<String>,
    /// It exited 0 and every weight file in its snapshot has the source's
    /// sha256.
    pub intact: bool,
}

/// Times `chatvec inspect` of the base from the loopback Hub into a fresh
/// cache, healthy and under each fault, and once without ranges on the
/// slow link to show what parallel ranges give.
fn download_runs(exe: &Path, root: &Path, base: &Path, hf: Option<&Path>) -> Result<Vec<DownloadBench>> {
    use super::loopback_hub::Fault;
    const SLOW: u64 = 50_000_000;
    let runs: [(&str, Fault, bool); 5] = [
        ("healthy", Fault::Healthy, true),
        ("slow link: 50 MB/s per connection", Fault::Slow(SLOW), true),
        ("slow link: 50 MB/s per connection, one stream per file", Fault::Slow(SLOW), false),
        ("every connection dropped after 256 MiB", Fault::DropAfter(256 << 20), true),
        ("one range served corrupt once", Fault::CorruptOnce, true),
    ];
    let cache = root.join("dl-cache");
    let mut out = Vec::new();
    for (condition, fault, ranges) in runs {
        let port = super::loopback_hub::start(base, fault)?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let _ = std::fs::remove_dir_all(&cache);
        let mut cmd = Command::new(exe);
        cmd.arg("-q").arg("inspect").arg("bench/model").stdout(std::process::Stdio::null());
        let said = root.join("dl-stderr.txt");
        cmd.stderr(File::create(&said).map_err(io("creating", &said))?);
        cmd.env("HF_ENDPOINT", &endpoint).env("HF_HUB_CACHE", &cache);
        cmd.env("HF_HOME", cache.join("no-home")).env_remove("HF_HUB_OFFLINE").env_remove("HF_TOKEN");
        if !ranges {
            cmd.env("CHATVEC_RANGE_MIN", u64::MAX.to_string());
        }
        let measured = measure(&mut cmd)?;
        let _ = std::fs::remove_dir_all(&cache);
        let text = std::fs::read_to_string(&said).unwrap_or_default();
        let _ = std::fs::remove_file(&said);
        let retries = text.matches("retrying in").count() + text.matches("downloading it once more").count();
        // One huggingface_hub run per link condition (it has no ranges to
        // turn off).
        let huggingface_hub = match hf {
            Some(py) if ranges => Some(hf_download(py, base, &cache, &endpoint)?),
            _ => None,
        };
        let _ = std::fs::remove_dir_all(&cache);
        out.push(DownloadBench { condition: condition.into(), measured, retries, huggingface_hub });
    }
    Ok(out)
}

/// huggingface_hub's download of the stand-in's repository into `cache`.
const HF_SNAPSHOT: &str = "import sys\nfrom huggingface_hub import snapshot_download\nsnapshot_download('bench/model', cache_dir=sys.argv[1], endpoint=sys.argv[2])\n";

/// Times huggingface_hub's `snapshot_download` from the stand-in at
/// `endpoint` into a fresh `cache`; a failed run is recorded, not fatal.
/// Then checks every weight file it left in the snapshot against the
/// source's sha256.
fn hf_download(py: &Path, base: &Path, cache: &Path, endpoint: &str) -> Result<PeerDownload> {
    let _ = std::fs::remove_dir_all(cache);
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(HF_SNAPSHOT).arg(cache).arg(endpoint);
    cmd.env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1");
    cmd.env("HF_HOME", cache.join("no-home")).env_remove("HF_HUB_OFFLINE").env_remove("HF_TOKEN");
    let said = cache.with_extension("hf-stderr.txt");
    cmd.stdout(std::process::Stdio::null()).stderr(File::create(&said).map_err(io("creating", &said))?);
    let ran = measure(&mut cmd);
    let text = std::fs::read_to_string(&said).unwrap_or_default();
    let _ = std::fs::remove_file(&said);
    let (measured, failed) = match ran {
        Ok(m) => (Some(m), None),
        // Python's last line names the exception.
        Err(e) => {
            (None, Some(text.lines().rfind(|l| !l.trim().is_empty()).map_or(e.to_string(), str::to_string)))
        }
    };
    let snap = cache.join("models--bench--model").join("snapshots").join(super::loopback_hub::COMMIT);
    let mut intact = measured.is_some();
    for src in shard_paths(&[base])? {
        let Some(name) = src.file_name() else { continue };
        let got = snap.join(name);
        intact &= got.is_file() && sha256_file(&got)? == sha256_file(&src)?;
    }
    Ok(PeerDownload { measured, failed, intact })
}

/// A mergekit config for `method` over the bench inputs: the chat and base
/// models as task vectors over the pretrained one.
fn method_config(method: &str, compute: &str, pre: &Path, chat: &Path, base: &Path) -> Result<String> {
    let model =
        |p: &Path, params: serde_json::Value| json!({"model": p.display().to_string(), "parameters": params});
    let mut cfg = match method {
        "linear" => {
            json!({"models": [model(chat, json!({"weight": 0.5})), model(base, json!({"weight": 0.5}))]})
        }
        "slerp" => json!({
            "base_model": base.display().to_string(),
            "models": [model(chat, json!({}))],
            "parameters": {"t": 0.5},
        }),
        "model_stock" => json!({
            "base_model": pre.display().to_string(),
            "models": [model(chat, json!({})), model(base, json!({}))],
        }),
        "task_arithmetic" | "ties" | "dare_linear" | "dare_ties" | "breadcrumbs" | "breadcrumbs_ties"
        | "della" | "della_linear" => {
            let p = if method == "task_arithmetic" {
                json!({"weight": 1.0})
            } else {
                json!({"weight": 1.0, "density": 0.5})
            };
            json!({"base_model": pre.display().to_string(), "models": [model(chat, p.clone()), model(base, p)]})
        }
        "passthrough" => json!({"models": [model(chat, json!({"scale": 0.5}))]}),
        "nearswap" => json!({
            "base_model": pre.display().to_string(),
            "models": [model(chat, json!({}))],
            "parameters": {"t": 0.001},
        }),
        "ram" | "ramplus_tl" => json!({
            "base_model": pre.display().to_string(),
            "models": [model(chat, json!({})), model(base, json!({}))],
        }),
        "nuslerp" | "multislerp" => json!({
            "base_model": pre.display().to_string(),
            "models": [model(chat, json!({"weight": 0.5})), model(base, json!({"weight": 0.5}))],
        }),
        "karcher" => {
            json!({"models": [model(pre, json!({})), model(chat, json!({})), model(base, json!({}))]})
        }
        "sce" => json!({
            "base_model": pre.display().to_string(),
            "models": [model(chat, json!({})), model(base, json!({}))],
            "parameters": {"select_topk": 0.5},
        }),
        "arcee_fusion" => json!({
            "base_model": pre.display().to_string(),
            "models": [model(chat, json!({}))],
        }),
        _ => return Err(Error::Usage(format!("--method '{method}' is not a merge method"))),
    };
    // mergekit computes in `dtype`; float32 with bf16 output is the
    // computation chatvec does (f32, one rounding at the end), so the
    // outputs are comparable ulp for ulp. With `dtype: bfloat16` mergekit
    // rounds every intermediate to bf16 as well.
    cfg["merge_method"] = method.into();
    cfg["dtype"] = compute.into();
    cfg["out_dtype"] = "bfloat16".into();
    yaml(&cfg)
}

/// A config as YAML (mergekit reads YAML).
fn yaml(v: &serde_json::Value) -> Result<String> {
    serde_yaml_ng::to_string(v).map_err(|e| Error::Internal(format!("writing YAML: {e}")))
}

/// bf16 bits as an integer that orders like the value.
fn ordered(b: u16) -> i32 {
    if b & 0x8000 != 0 { -((b & 0x7fff) as i32) } else { b as i32 }
}

/// Largest ulp difference between two bf16 checkpoints, and how many
/// elements differ by more than one.
fn compare_bf16(a: &Path, b: &Path) -> Result<(u32, u64)> {
    let (ca, cb) = (Checkpoint::open(a)?, Checkpoint::open(b)?);
    let (mut max, mut over) = (0u32, 0u64);
    for t in ca.tensors() {
        let Some(u) = cb.get(&t.name) else {
            return Err(Error::Internal(format!("{} lacks {}", b.display(), t.name)));
        };
        let (x, y) = (ca.bytes(t), cb.bytes(u));
        if x.len() != y.len() || t.dtype != DType::BF16 {
            return Err(Error::Internal(format!("{}: outputs differ in dtype or size", t.name)));
        }
        for (p, q) in x.chunks_exact(2).zip(y.chunks_exact(2)) {
            let d =
                ordered(u16::from_le_bytes([p[0], p[1]])).abs_diff(ordered(u16::from_le_bytes([q[0], q[1]])));
            max = max.max(d);
            over += (d > 1) as u64;
        }
    }
    Ok((max, over))
}

fn shape_of(name: &str) -> Result<LlamaShape> {
    match name {
        "tiny" => Ok(LlamaShape::tiny(512)),
        "1b" => Ok(LlamaShape::b1()),
        "7b" => Ok(LlamaShape::b7()),
        "70b-layer" => Ok(LlamaShape::l70_layer()),
        _ => Err(Error::Usage(format!("--shape '{name}': use tiny, 1b, 7b or 70b-layer"))),
    }
}

/// Generates the three inputs unless a complete set is already there.
fn ensure_inputs(root: &Path, shape: &LlamaShape) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let p = Component { seed: 11, amplitude: 0.05 };
    let c = Component { seed: 12, amplitude: 0.004 };
    let k = Component { seed: 13, amplitude: 0.01 };
    let toks = tokens(shape.vocab, 0);
    let mut dirs = Vec::new();
    for (name, parts, chat) in
        [("pretrained", vec![p], false), ("chat", vec![p, c], true), ("base", vec![p, k], false)]
    {
        let d = root.join(name);
        let marker = d.join(".complete");
        if !marker.is_file() {
            eprintln!("generating {} ...", d.display());
            let _ = std::fs::remove_dir_all(&d);
            write_model(
                &d,
                shape,
                FloatType::BF16,
                &parts,
                2_000_000_000,
                &ModelFiles { tokens: Some(&toks), chat },
            )?;
            std::fs::write(&marker, b"").map_err(io("writing", &marker))?;
        }
        dirs.push(d);
    }
    Ok((dirs.remove(0), dirs.remove(0), dirs.remove(0)))
}

/// Bytes per operand of a staged job: the GPU engine's largest chunk
/// (4M elements) of bf16.
const STAGE_PART: usize = 8 << 20;

/// The GPU engine's host staging as it runs it (`chatvec::stage_into`):
/// the inputs' bytes, three operands of `STAGE_PART` per job, copied from
/// the warm page cache into one job-sized buffer (pinned memory on a GPU
/// machine, plain pre-faulted memory here), on `threads` threads and on
/// one. GB/s moved, the faster of two passes each.
fn stage_rate(dirs: &[&Path], threads: usize) -> Result<[f64; 2]> {
    let mut maps: Vec<Mmap> = Vec::new();
    for path in shard_paths(dirs)? {
        let f = File::open(&path).map_err(io("opening", &path))?;
        // SAFETY: as in `read_floor`.
        maps.push(unsafe { Mmap::map(&f) }.map_err(io("mapping", &path))?);
    }
    let pieces: Vec<&[u8]> = maps.iter().flat_map(|m| m.chunks(STAGE_PART)).collect();
    let offsets: Vec<usize> = (0..3).map(|k| k * STAGE_PART).collect();
    let mut host = vec![1u8; 3 * STAGE_PART];
    let bytes: usize = pieces.iter().map(|p| p.len()).sum();
    let mut rate = |threads: usize| -> Result<f64> {
        // The executor's pool, in which the GPU engine stages its jobs.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Internal(format!("starting {threads} threads: {e}")))?;
        let mut best = f64::MAX;
        for _ in 0..2 {
            let start = Instant::now();
            for job in pieces.chunks(3) {
                stage_into(&mut host, job, &offsets[..job.len()], &pool);
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        std::hint::black_box(&host);
        Ok(bytes as f64 / 1e9 / best)
    };
    Ok([rate(threads)?, rate(1)?])
}

/// Seconds to read every input shard from memory (after one warming pass).
fn read_floor(dirs: &[&Path]) -> Result<f64> {
    let mut maps: Vec<Mmap> = Vec::new();
    for path in shard_paths(dirs)? {
        let f = File::open(&path).map_err(io("opening", &path))?;
        // SAFETY: read-only map of a file this benchmark generated and
        // nobody else modifies, so it is never truncated under the map.
        maps.push(unsafe { Mmap::map(&f) }.map_err(io("mapping", &path))?);
    }
    let touch = |maps: &[Mmap]| -> u64 {
        maps.iter().map(|m| m.chunks(4096).map(|c| c[0] as u64 + c[c.len() - 1] as u64).sum::<u64>()).sum()
    };
    let warm = touch(&maps);
    let start = Instant::now();
    let sum: u64 =
        maps.iter().map(|m| m.chunks(8).map(|c| c[0] as u64).fold(0u64, |a, b| a.wrapping_add(b))).sum();
    let t = start.elapsed().as_secs_f64();
    std::hint::black_box((warm, sum));
    Ok(t)
}

/// Seconds to write `bytes` to a new file in `dir` and fdatasync it:
/// through the page cache, or with `direct` around it (`O_DIRECT`, aligned
/// 8 MiB writes, then cut to size), as `dd oflag=direct` would.
fn write_floor(dir: &Path, bytes: u64, direct: bool) -> Result<f64> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(".floor-write.tmp");
    const BLOCK: usize = 8 << 20;
    let mut raw: Vec<u8> = (0..BLOCK + 4096).map(|i| (i * 31 + 7) as u8).collect();
    let at = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[at..at + BLOCK];
    let start = Instant::now();
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    if direct {
        open.custom_flags(libc::O_DIRECT);
    }
    let mut f = open.open(&path).map_err(io("creating", &path))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        let n = if direct { n.div_ceil(4096) * 4096 } else { n };
        f.write_all(&buf[..n]).map_err(io("writing", &path))?;
        left = left.saturating_sub(n as u64);
    }
    f.set_len(bytes).map_err(io("writing", &path))?;
    f.sync_data().map_err(io("syncing", &path))?;
    let t = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(t)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cmd`, sampling its RssAnon every 2 ms and reading VmHWM at the end.
fn measure(cmd: &mut Command) -> Result<Measured> {
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(io("starting", Path::new(cmd.get_program())))?;
    let pid = child.id();
    let (mut anon, mut hwm) = (0u64, 0u64);
    let status = loop {
        anon = anon.max(status_kib(pid, "RssAnon:").unwrap_or(0));
        hwm = hwm.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        if let Some(st) = child.try_wait().map_err(io("waiting for", Path::new(cmd.get_program())))? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(Error::Internal(format!("{:?} failed with {status}", cmd.get_program())));
    }
    Ok(Measured { seconds, peak_rss_anon_mib: anon as f64 / 1024.0, peak_rss_mib: hwm as f64 / 1024.0 })
}

/// Three candidates from one read of the inputs (`sweep --scales
/// 0.5,0.75,1`), with the input hashes cached.
fn sweep_run(exe: &Path, root: &Path, [pre, chat, base]: [&Path; 3], threads: usize) -> Result<Measured> {
    let sweep_out = root.join("out-sweep");
    let _ = std::fs::remove_dir_all(&sweep_out);
    let mut sw = Command::new(exe);
    sw.arg("-q").arg("sweep").arg("--base").arg(base).arg("--chat").arg(chat).arg("--pretrained").arg(pre);
    sw.arg("--scales").arg("0.5,0.75,1").arg("-o").arg(&sweep_out).arg("--threads").arg(threads.to_string());
    sw.env("CHATVEC_CACHE_DIR", root.join("hash-cache")).stdout(std::process::Stdio::null());
    let m = measure(&mut sw)?;
    let _ = std::fs::remove_dir_all(&sweep_out);
    Ok(m)
}

/// The report over the same inputs: one read of each, nothing written.
fn analyze_run(exe: &Path, [pre, chat, base]: [&Path; 3], threads: usize) -> Result<Measured> {
    let mut an = Command::new(exe);
    an.arg("-q").arg("analyze").arg("--chat").arg(chat).arg("--pretrained").arg(pre).arg("--base").arg(base);
    an.arg("--threads").arg(threads.to_string()).stdout(std::process::Stdio::null());
    measure(&mut an)
}

/// This machine's memory in bytes (`MemTotal`).
fn memory_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1));
    kib.and_then(|k| k.parse::<u64>().ok()).map_or(u64::MAX, |k| k * 1024)
}

/// The safetensors shards of `dirs`.
fn shard_paths(dirs: &[&Path]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(d).map_err(io("listing", d))? {
            let path = e.map_err(io("listing", d))?.path();
            if path.extension().is_some_and(|x| x == "safetensors") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Drops `paths` from the page cache (clean pages only; nothing is
/// written), so the next reader starts from the disk.
fn evict(paths: &[PathBuf]) {
    use std::os::fd::AsRawFd;
    for p in paths {
        if let Ok(f) = File::open(p) {
            // SAFETY: a hint on a descriptor we own; failure only leaves
            // pages cached.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Seconds for the disk to move a cold apply's bytes: every input shard
/// read (dropped from the page cache first; one thread per model, each
/// reading its shards in order in 8 MiB reads, as apply reads the models
/// side by side) while the output's byte count is written beside them
/// (direct, then fdatasync). This virtual disk shares its bandwidth between
/// reads and writes, so neither alone bounds an apply whose inputs do not
/// fit in memory.
fn cold_io_floor(dirs: &[&Path], out_dir: &Path, out_bytes: u64) -> Result<f64> {
    use std::io::Read;
    let per_model: Vec<Vec<PathBuf>> = dirs.iter().map(|d| shard_paths(&[d])).collect::<Result<_>>()?;
    per_model.iter().for_each(|p| evict(p));
    let start = Instant::now();
    std::thread::scope(|s| {
        let mut workers: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>> = per_model
            .iter()
            .map(|paths| {
                s.spawn(move || {
                    let mut buf = vec![0u8; 8 << 20];
                    for p in paths {
                        let mut f = File::open(p).map_err(io("opening", p))?;
                        while f.read(&mut buf).map_err(io("reading", p))? > 0 {}
                    }
                    Ok(())
                })
            })
            .collect();
        workers.push(s.spawn(move || write_floor(out_dir, out_bytes, true).map(|_| ())));
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or_else(|_| Err(Error::Internal("a floor thread panicked".into())))
        })
    })?;
    Ok(start.elapsed().as_secs_f64())
}

pub(crate) fn run(a: &BenchArgs, json: bool) -> Result<()> {
    let mut shape = shape_of(&a.shape)?;
    let mut name = a.shape.clone();
    if let Some(n) = a.layers {
        shape.layers = n;
        name = format!("{}-{n}l", a.shape);
    }
    let root = a.dir.join(&name);
    std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
    let (pre, chat, base) = ensure_inputs(&root, &shape)?;
    let input_bytes: u64 = [&pre, &chat, &base]
        .iter()
        .map(|d| Checkpoint::open(d).map(|c| c.file_bytes()))
        .sum::<Result<u64>>()?;
    let output_bytes: u64 = Checkpoint::open(&base)?.file_bytes();
    let threads = default_threads(a.threads);

    // Inputs larger than memory are read from the disk whatever chatvec
    // does: then the floor is a cold read, and every timed run starts cold.
    let shards = shard_paths(&[&pre, &chat, &base])?;
    let cold = input_bytes > memory_bytes();
    let cool = || {
        if cold {
            evict(&shards);
        }
    };
    let floor_read = match cold {
        true => cold_io_floor(&[&pre, &chat, &base], &root, output_bytes)?,
        false => read_floor(&[&pre, &chat, &base])?,
    };
    let stage = if cold { None } else { Some(stage_rate(&[&pre, &chat, &base], threads)?) };
    let floor_write_before = write_floor(&root, output_bytes, false)?;
    let floor_direct_before = write_floor(&root, output_bytes, true)?;

    let out = root.join("out-chatvec");
    let exe = std::env::current_exe().map_err(io("locating", Path::new("chatvec")))?;
    let apply_cmd = |rehash: bool| {
        let mut cmd = Command::new(&exe);
        cmd.arg("-q")
            .arg("apply")
            .arg("--base")
            .arg(&base)
            .arg("--chat")
            .arg(&chat)
            .arg("--pretrained")
            .arg(&pre);
        cmd.arg("-o").arg(&out).arg("--force").arg("--threads").arg(threads.to_string());
        cmd.arg("--device").arg(a.device.to_string());
        cmd.env("CHATVEC_CACHE_DIR", root.join("hash-cache"));
        if rehash {
            cmd.arg("--rehash");
        }
        cmd
    };
    // First with every input hashed (a first run on new inputs), then with
    // the input hashes cached by that run (any later run on the same inputs).
    cool();
    let apply = measure(&mut apply_cmd(true))?;
    let _ = std::fs::remove_dir_all(&out);
    cool();
    let apply_cached = measure(&mut apply_cmd(false))?;
    let _ = std::fs::remove_dir_all(&out);
    // The same through the page cache, the write path used where the
    // filesystem refuses direct I/O.
    cool();
    let apply_buffered = measure(apply_cmd(false).env("CHATVEC_WRITE", "buffered"))?;
    let _ = std::fs::remove_dir_all(&out);
    let (sweep3, analyze) = match a.apply_only {
        true => (None, None),
        false => {
            cool();
            let s = sweep_run(&exe, &root, [&pre, &chat, &base], threads)?;
            cool();
            (Some(s), Some(analyze_run(&exe, [&pre, &chat, &base], threads)?))
        }
    };

    // This virtual disk's write speed varies from run to run: measure the
    // floor on both sides of the apply runs and hold them to the faster.
    let floor_write_after = write_floor(&root, output_bytes, false)?;
    let floor_direct_after = write_floor(&root, output_bytes, true)?;
    let floor_write =
        floor_write_before.min(floor_write_after).min(floor_direct_before).min(floor_direct_after);
    let floor = floor_read.max(floor_write);

    let mergekit = if a.mergekit {
        let cfg = root.join("mergekit-task-arithmetic.yml");
        let text = yaml(&json!({
            "merge_method": "task_arithmetic",
            "base_model": pre.display().to_string(),
            "models": [
                {"model": chat.display().to_string(), "parameters": {"weight": 1.0}},
                {"model": base.display().to_string(), "parameters": {"weight": 1.0}},
            ],
            "dtype": "bfloat16",
        }))?;
        std::fs::write(&cfg, text).map_err(io("writing", &cfg))?;
        let mout = root.join("out-mergekit");
        let _ = std::fs::remove_dir_all(&mout);
        let mut m = Command::new("mergekit-yaml");
        m.arg(&cfg).arg(&mout).arg("--copy-tokenizer");
        let r = measure(&mut m)?;
        let _ = std::fs::remove_dir_all(&mout);
        Some(r)
    } else {
        None
    };

    // Every config first, so a bad --method fails before the long runs.
    let mut configs = Vec::new();
    for method in &a.methods {
        configs.push(method_config(method, &a.mergekit_dtype, &pre, &chat, &base)?);
    }
    let mut methods = Vec::new();
    for (method, yaml) in a.methods.iter().zip(configs) {
        let cfg = root.join(format!("method-{method}.yml"));
        std::fs::write(&cfg, yaml).map_err(io("writing", &cfg))?;
        let cout = root.join(format!("out-{method}-chatvec"));
        let mut cmd = Command::new(&exe);
        cmd.arg("-q").arg("merge").arg(&cfg).arg("-o").arg(&cout).arg("--force");
        cmd.arg("--device").arg(a.device.to_string());
        cmd.arg("--threads").arg(threads.to_string()).env("CHATVEC_CACHE_DIR", root.join("hash-cache"));
        let chatvec = measure(&mut cmd)?;
        let (mut mergekit, mut max_ulp, mut over_one_ulp) = (None, None, None);
        if a.mergekit {
            let mout = root.join(format!("out-{method}-mergekit"));
            let _ = std::fs::remove_dir_all(&mout);
            let mut m = Command::new("mergekit-yaml");
            m.arg(&cfg).arg(&mout).arg("--copy-tokenizer");
            mergekit = Some(measure(&mut m)?);
            let random = method.starts_with("dare") || method.starts_with("della");
            if !random {
                let (mx, over) = compare_bf16(&cout, &mout)?;
                (max_ulp, over_one_ulp) = (Some(mx), Some(over));
            }
            let _ = std::fs::remove_dir_all(&mout);
        }
        let _ = std::fs::remove_dir_all(&cout);
        methods.push(MethodBench { method: method.clone(), chatvec, mergekit, max_ulp, over_one_ulp });
    }

    let mut lora = Vec::new();
    for &rank in &a.lora_ranks {
        let adapter = root.join(format!("lora-r{rank}"));
        if !adapter.join(".complete").is_file() {
            eprintln!("generating {} ...", adapter.display());
            let _ = std::fs::remove_dir_all(&adapter);
            write_lora_adapter(&adapter, &shape, rank, &[Component { seed: 14, amplitude: 0.01 }])?;
            File::create(adapter.join(".complete")).map_err(io("writing", &adapter))?;
        }
        let adapter_bytes = std::fs::metadata(adapter.join("adapter_model.safetensors"))
            .map_err(io("reading", &adapter))?
            .len();
        let cout = root.join(format!("out-lora-r{rank}-chatvec"));
        let mut cmd = Command::new(&exe);
        cmd.arg("-q").arg("apply").arg("--base").arg(&base).arg("--lora").arg(&adapter);
        cmd.arg("-o").arg(&cout).arg("--force").arg("--threads").arg(threads.to_string());
        cmd.env("CHATVEC_CACHE_DIR", root.join("hash-cache"));
        let chatvec = measure(&mut cmd)?;
        let (mut peft, mut max_ulp, mut over_one_ulp) = (None, None, None);
        if let Some(py) = &a.peft {
            let pout = root.join(format!("out-lora-r{rank}-peft"));
            let _ = std::fs::remove_dir_all(&pout);
            let mut m = Command::new(py);
            m.arg("-c").arg(PEFT_MERGE).arg(&base).arg(&adapter).arg(&pout);
            peft = Some(measure(&mut m)?);
            let (mx, over) = compare_bf16(&cout, &pout)?;
            (max_ulp, over_one_ulp) = (Some(mx), Some(over));
            let _ = std::fs::remove_dir_all(&pout);
        }
        let _ = std::fs::remove_dir_all(&cout);
        lora.push(LoraBench { rank, adapter_bytes, chatvec, peft, max_ulp, over_one_ulp });
    }

    let mut extract = Vec::new();
    for &rank in &a.extract_ranks {
        extract.push(extract_run(&exe, &root, [&pre, &chat], rank, threads, a.mergekit, &cool)?);
    }

    let download = if a.download { download_runs(&exe, &root, &base, a.hf.as_deref())? } else { Vec::new() };

    let gb = |b: u64, s: f64| b as f64 / 1e9 / s;
    let rep = BenchReport {
        shape: name.clone(),
        parameters: shape.parameters(),
        input_bytes,
        output_bytes,
        threads,
        device: a.device.to_string(),
        floor_write_seconds: floor_write,
        floor_write_runs: [floor_write_before, floor_write_after],
        floor_write_direct_runs: [floor_direct_before, floor_direct_after],
        floor_read_seconds: floor_read,
        stage_gb_per_s: stage,
        floor_seconds: floor,
        apply_output_gb_per_s: gb(output_bytes, apply.seconds),
        apply_input_gb_per_s: gb(input_bytes, apply.seconds),
        ratio_to_floor: apply.seconds / floor,
        apply_cached_ratio_to_floor: apply_cached.seconds / floor,
        analyze_ratio_to_apply: analyze.as_ref().map(|m| m.seconds / apply_cached.seconds),
        sweep3_ratio_to_apply: sweep3.as_ref().map(|m| m.seconds / apply_cached.seconds),
        inputs_exceed_memory: cold,
        sweep3,
        analyze,
        apply,
        apply_cached,
        apply_buffered,
        mergekit,
        methods,
        lora,
        extract,
        download,
    };
    if json {
        return super::json_out(&rep);
    }
    let mut t = format!(
        "shape {} ({} parameters, bf16), inputs {:.2} GB, output {:.2} GB, {} threads, device {}\n",
        rep.shape,
        human_count(rep.parameters),
        input_bytes as f64 / 1e9,
        output_bytes as f64 / 1e9,
        threads,
        rep.device
    );
    t += &format!(
        "floor: durable write {:.2} s (buffered {:.2} s before, {:.2} s after; direct {:.2} s before, {:.2} s after), inputs read {:.2} s ({}) -> {:.2} s\n",
        floor_write,
        floor_write_before,
        floor_write_after,
        floor_direct_before,
        floor_direct_after,
        floor_read,
        if cold {
            "from the disk while the output's bytes are written: the inputs exceed memory, and every run below starts cold"
        } else {
            "from the page cache"
        },
        floor
    );
    if let Some([many, one]) = rep.stage_gb_per_s {
        t += &format!(
            "GPU host staging (operands into a job's buffer, from the page cache): {many:.1} GB/s on {threads} threads, {one:.1} GB/s on one\n"
        );
    }
    t += &format!(
        "chatvec apply, hashing all inputs: {:.2} s ({:.2}x floor), {:.2} GB/s out, {:.2} GB/s in, peak RssAnon {:.0} MiB, peak RSS {:.0} MiB\n",
        rep.apply.seconds,
        rep.ratio_to_floor,
        rep.apply_output_gb_per_s,
        rep.apply_input_gb_per_s,
        rep.apply.peak_rss_anon_mib,
        rep.apply.peak_rss_mib
    );
    t += &format!(
        "chatvec apply, input hashes cached: {:.2} s ({:.2}x floor), {:.2} GB/s out, peak RssAnon {:.0} MiB\n",
        rep.apply_cached.seconds,
        rep.apply_cached_ratio_to_floor,
        gb(output_bytes, rep.apply_cached.seconds),
        rep.apply_cached.peak_rss_anon_mib
    );
    t += &format!(
        "chatvec apply, input hashes cached, CHATVEC_WRITE=buffered: {:.2} s ({:.2}x floor), peak RssAnon {:.0} MiB\n",
        rep.apply_buffered.seconds,
        rep.apply_buffered.seconds / floor,
        rep.apply_buffered.peak_rss_anon_mib
    );
    if let Some(m) = &rep.sweep3 {
        t += &format!(
            "chatvec sweep of 3 scales (one read): {:.2} s ({:.2}x the cached apply; 3 applies would be 3x), peak RssAnon {:.0} MiB\n",
            m.seconds,
            m.seconds / rep.apply_cached.seconds,
            m.peak_rss_anon_mib
        );
    }
    if let Some(m) = &rep.analyze {
        t += &format!(
            "chatvec analyze (same inputs, with --base): {:.2} s ({:.2}x the cached apply), peak RssAnon {:.0} MiB\n",
            m.seconds,
            m.seconds / rep.apply_cached.seconds,
            m.peak_rss_anon_mib
        );
    }
    if let Some(m) = &rep.mergekit {
        t += &format!(
            "mergekit task_arithmetic: {:.2} s ({:.2}x floor), peak RssAnon {:.0} MiB, peak RSS {:.0} MiB\n",
            m.seconds,
            m.seconds / floor,
            m.peak_rss_anon_mib,
            m.peak_rss_mib
        );
    }
    for mb in &rep.methods {
        t += &format!(
            "merge {}: chatvec {:.2} s, peak RssAnon {:.0} MiB",
            mb.method, mb.chatvec.seconds, mb.chatvec.peak_rss_anon_mib
        );
        if let Some(m) = &mb.mergekit {
            t += &format!("; mergekit {:.2} s, peak RssAnon {:.0} MiB", m.seconds, m.peak_rss_anon_mib);
        }
        if let (Some(u), Some(o)) = (mb.max_ulp, mb.over_one_ulp) {
            t += &format!("; max difference {u} bf16 ulp, {o} elements over 1 ulp");
        }
        t.push('\n');
    }
    for d in &rep.download {
        let m = &d.measured;
        t += &format!(
            "download of the base ({:.2} GB) from a loopback Hub into a fresh cache, {}: {:.2} s, {:.2} GB/s, peak RssAnon {:.0} MiB, {} retries\n",
            output_bytes as f64 / 1e9,
            d.condition,
            m.seconds,
            gb(output_bytes, m.seconds),
            m.peak_rss_anon_mib,
            d.retries
        );
        if let Some(p) = &d.huggingface_hub {
            t += &match (&p.measured, &p.failed) {
                (Some(m), _) => format!(
                    "  huggingface_hub snapshot_download, same condition: {:.2} s, {:.2} GB/s, peak RssAnon {:.0} MiB, files {}\n",
                    m.seconds,
                    gb(output_bytes, m.seconds),
                    m.peak_rss_anon_mib,
                    if p.intact { "intact" } else { "NOT intact (a weight file's sha256 differs)" }
                ),
                (None, e) => format!(
                    "  huggingface_hub snapshot_download, same condition: failed ({})\n",
                    e.as_deref().unwrap_or("")
                ),
            };
        }
    }
    for lb in &rep.lora {
        t += &format!(
            "apply --lora (rank {}, adapter {:.0} MB): chatvec {:.2} s, peak RssAnon {:.0} MiB",
            lb.rank,
            lb.adapter_bytes as f64 / 1e6,
            lb.chatvec.seconds,
            lb.chatvec.peak_rss_anon_mib
        );
        if let Some(m) = &lb.peft {
            t += &format!(
                "; PEFT merge_and_unload + save_pretrained {:.2} s, peak RssAnon {:.0} MiB",
                m.seconds, m.peak_rss_anon_mib
            );
        }
        if let (Some(u), Some(o)) = (lb.max_ulp, lb.over_one_ulp) {
            t += &format!("; max difference {u} bf16 ulp, {o} elements over 1 ulp");
        }
        t.push('\n');
    }
    for e in &rep.extract {
        t += &format!(
            "extract --rank {} (LoRA adapter): chatvec {:.2} s, peak RssAnon {:.0} MiB",
            e.rank, e.chatvec.seconds, e.chatvec.peak_rss_anon_mib
        );
        if let Some(m) = &e.mergekit {
            t += &format!(
                "; mergekit-extract-lora {:.2} s, peak RssAnon {:.0} MiB ({:.1}x)",
                m.seconds,
                m.peak_rss_anon_mib,
                m.seconds / e.chatvec.seconds
            );
        }
        if let (Some(mx), Some(md), Some([o, th])) = (e.error_ratio_max, e.error_ratio_median, e.error_mean) {
            t += &format!(
                "; relative error chatvec/mergekit per module: max {mx:.6}, median {md:.6} (mean error {o:.6} vs {th:.6})"
            );
        }
        t.push('\n');
    }
    super::out(&t)
}

/// `extract --rank` on the bench's chat and pretrained models, and with
/// `mergekit` mergekit-extract-lora on the same, errors compared.
fn extract_run(
    exe: &Path,
    root: &Path,
    [pre, chat]: [&Path; 2],
    rank: u64,
    threads: usize,
    mergekit: bool,
    cool: &dyn Fn(),
) -> Result<ExtractBench> {
    let ours = root.join(format!("out-extract-r{rank}-chatvec"));
    let mut cmd = Command::new(exe);
    cmd.arg("-q").arg("extract").arg("--chat").arg(chat).arg("--pretrained").arg(pre);
    cmd.arg("--rank").arg(rank.to_string()).arg("-o").arg(&ours).arg("--force");
    cmd.arg("--threads").arg(threads.to_string()).env("CHATVEC_CACHE_DIR", root.join("hash-cache"));
    cmd.stdout(std::process::Stdio::null());
    cool();
    let chatvec = measure(&mut cmd)?;
    let mut bench = ExtractBench {
        rank,
        chatvec,
        mergekit: None,
        error_ratio_max: None,
        error_ratio_median: None,
        error_mean: None,
    };
    if mergekit {
        let theirs = root.join(format!("out-extract-r{rank}-mergekit"));
        let _ = std::fs::remove_dir_all(&theirs);
        let mut m = Command::new("mergekit-extract-lora");
        m.arg("--model").arg(chat).arg("--base-model").arg(pre).arg("--out-path").arg(&theirs);
        m.arg("--max-rank").arg(rank.to_string());
        cool();
        bench.mergekit = Some(measure(&mut m)?);
        // The torch beside mergekit-extract-lora computes both errors.
        let python = which("mergekit-extract-lora")
            .and_then(|p| p.parent().map(|d| d.join("python")))
            .ok_or_else(|| Error::Usage("mergekit-extract-lora is not on PATH".into()))?;
        let o = Command::new(&python)
            .arg("-c")
            .arg(EXTRACT_ERRORS)
            .args([chat, pre, &ours, &theirs])
            .output()
            .map_err(io("starting", &python))?;
        if !o.status.success() {
            return Err(Error::Internal(format!(
                "comparing the adapters: {}",
                String::from_utf8_lossy(&o.stderr)
            )));
        }
        let rows: Vec<[f64; 2]> = serde_json::from_slice(&o.stdout)
            .map_err(|e| Error::Internal(format!("reading the error comparison: {e}")))?;
        let mut ratios: Vec<f64> = rows.iter().map(|[a, b]| a / b).collect();
        ratios.sort_by(f64::total_cmp);
        let n = rows.len().max(1) as f64;
        bench.error_ratio_max = ratios.last().copied();
        bench.error_ratio_median = ratios.get(ratios.len() / 2).copied();
        bench.error_mean =
            Some([rows.iter().map(|r| r[0]).sum::<f64>() / n, rows.iter().map(|r| r[1]).sum::<f64>() / n]);
        let _ = std::fs::remove_dir_all(&theirs);
    }
    let _ = std::fs::remove_dir_all(&ours);
    Ok(bench)
}

/// The first `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}
