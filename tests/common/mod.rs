//! Test fixtures written independently of chatvec's own writer: tiny
//! Llama-shaped checkpoints with values from closed-form functions, a
//! safetensors writer of our own, the `safetensors` crate as an independent
//! reader, and a helper that runs the real binary.
#![allow(dead_code)]

pub(crate) mod hub;
pub(crate) mod hub_write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub(crate) const HIDDEN: u64 = 8;
pub(crate) const INTER: u64 = 12;
pub(crate) const LAYERS: u64 = 2;

/// Element type of a fixture tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Ty {
    BF16,
    F16,
    F32,
    I64,
    /// Bytes of a type the fixtures only store (FP8 codes, U8 blocks):
    /// its safetensors name and element size.
    Raw(&'static str, usize),
}

impl Ty {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ty::BF16 => "BF16",
            Ty::F16 => "F16",
            Ty::F32 => "F32",
            Ty::I64 => "I64",
            Ty::Raw(name, _) => name,
        }
    }
    pub(crate) fn size(self) -> usize {
        match self {
            Ty::BF16 | Ty::F16 => 2,
            Ty::F32 => 4,
            Ty::I64 => 8,
            Ty::Raw(_, size) => size,
        }
    }
    /// Encodes with the `half` crate's conversions (round to nearest even).
    pub(crate) fn encode(self, v: f32) -> Vec<u8> {
        match self {
            Ty::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            Ty::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            Ty::F32 => v.to_le_bytes().to_vec(),
            Ty::I64 => (v as i64).to_le_bytes().to_vec(),
            Ty::Raw(name, _) => panic!("{name} values are written as raw bytes"),
        }
    }
    pub(crate) fn decode(self, b: &[u8]) -> f32 {
        match self {
            Ty::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Ty::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Ty::F32 => f32::from_le_bytes(b.try_into().unwrap()),
            Ty::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f32,
            Ty::Raw(name, _) => panic!("{name} bytes are decoded by the test that wrote them"),
        }
    }
    pub(crate) fn from_name(n: &str) -> Ty {
        match n {
            "BF16" => Ty::BF16,
            "F16" => Ty::F16,
            "F32" => Ty::F32,
            "I64" => Ty::I64,
            _ => panic!("{n}"),
        }
    }
}

/// A fixture tensor: name, dtype, shape, raw little-endian bytes.
#[derive(Clone, Debug)]
pub(crate) struct T {
    pub name: String,
    pub ty: Ty,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl T {
    pub(crate) fn numel(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }
    /// Element i decoded to f32.
    pub(crate) fn get(&self, i: usize) -> f32 {
        let s = self.ty.size();
        self.ty.decode(&self.data[i * s..(i + 1) * s])
    }
}

/// A value that differs per model (`seed`), tensor and element, of varied
/// magnitude so rounding is exercised.
pub(crate) fn val(seed: u32, name: &str, i: usize) -> f32 {
    let h =
        name.bytes().fold(seed.wrapping_mul(2654435761), |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    let x = ((h as usize).wrapping_add(i * 7919)) % 10007;
    let scale = [0.01f32, 0.1, 1.0, 3.0][(i + seed as usize) % 4];
    ((x as f32) / 10007.0 - 0.5) * scale
}

/// Names and shapes of a tiny Llama, in transformers' order.
pub(crate) fn llama_shapes(vocab: u64, tied: bool) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![vocab, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTER]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![INTER, HIDDEN]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![INTER, HIDDEN]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![HIDDEN / 2, HIDDEN]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![HIDDEN / 2, HIDDEN]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]));
    }
    v.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    if !tied {
        v.push(("lm_head.weight".to_string(), vec![vocab, HIDDEN]));
    }
    v
}

/// A tiny Llama's tensors with values `val(seed, ..)` in dtype `ty`.
pub(crate) fn llama(seed: u32, vocab: u64, tied: bool, ty: Ty) -> Vec<T> {
    llama_shapes(vocab, tied)
        .into_iter()
        .map(|(name, shape)| {
            let n: u64 = shape.iter().product();
            let data = (0..n as usize).flat_map(|i| ty.encode(val(seed, &name, i))).collect();
            T { name, ty, shape, data }
        })
        .collect()
}

/// Writes one safetensors file (header built here with serde_json, not by chatvec).
pub(crate) fn write_safetensors(path: &Path, tensors: &[T]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.ty.name(), "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let h = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    for t in tensors {
        bytes.extend_from_slice(&t.data);
    }
    std::fs::write(path, bytes).unwrap();
}

pub(crate) fn config(vocab: u64, tied: bool, layers: u64) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 500000.0,
        "vocab_size": vocab, "tie_word_embeddings": tied, "torch_dtype": "bfloat16"
    })
}

/// Writes a model directory: `shards` files (tensors split evenly, with an
/// index when more than one), config.json, and optional tokenizer.json.
pub(crate) fn write_model(
    dir: &Path,
    tensors: &[T],
    shards: usize,
    config: &Value,
    tokens: Option<&[String]>,
) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    if shards == 1 {
        write_safetensors(&dir.join("model.safetensors"), tensors);
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut wm = BTreeMap::new();
        for (i, chunk) in tensors.chunks(per).enumerate() {
            let f = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
            write_safetensors(&dir.join(&f), chunk);
            for t in chunk {
                wm.insert(t.name.clone(), f.clone());
            }
        }
        let total: usize = tensors.iter().map(|t| t.data.len()).sum();
        let idx = json!({"metadata": {"total_size": total}, "weight_map": wm});
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    if let Some(toks) = tokens {
        write_tokenizer(dir, toks);
    }
}

pub(crate) fn write_tokenizer(dir: &Path, toks: &[String]) {
    let vocab: serde_json::Map<String, Value> =
        toks.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let tj =
        json!({"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": vocab, "merges": []}});
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
}

pub(crate) fn tokens(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i}")).collect()
}

/// Reads every tensor of an output directory with the `safetensors` crate.
pub(crate) fn read_model(dir: &Path) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let ty = Ty::from_name(&format!("{:?}", view.dtype()));
                out.insert(
                    name.clone(),
                    T {
                        name,
                        ty,
                        shape: view.shape().iter().map(|&d| d as u64).collect(),
                        data: view.data().to_vec(),
                    },
                );
            }
        }
    }
    out
}

/// Tensor names in file order across the output's shards (sorted file names).
pub(crate) fn names_in_order(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut v: Vec<(u64, String)> = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, x)| (x["data_offsets"][0].as_u64().unwrap(), k.clone()))
            .collect();
        v.sort();
        names.extend(v.into_iter().map(|(_, k)| k));
    }
    names
}

pub(crate) fn sha256_file(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of every safetensors file of a directory, by file name.
pub(crate) fn shard_hashes(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), sha256_file(&p)))
        .collect()
}

/// Runs the chatvec binary.
pub(crate) fn chatvec(args: &[&str]) -> Output {
    command().args(args).output().unwrap()
}

/// The chatvec binary with its hash cache kept inside the build tree.
/// A test binary carried to another machine (the GPU check,
/// scripts/gpu-check.sh) is told where chatvec is by `CHATVEC_BIN`, and
/// keeps the cache in the temporary directory when the build tree is not
/// there.
pub(crate) fn command() -> Command {
    let bin = std::env::var_os("CHATVEC_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_chatvec").into());
    let mut c = Command::new(bin);
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let tmp = if tmp.is_dir() { tmp.to_path_buf() } else { std::env::temp_dir().join("chatvec-tests") };
    c.env("CHATVEC_CACHE_DIR", tmp.join("hash-cache"));
    c
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts success, printing stderr otherwise.
pub(crate) fn ok(o: &Output) {
    assert!(o.status.success(), "chatvec failed ({:?}):\n{}", o.status.code(), stderr(o));
}

/// The entries of a directory, for "nothing was left behind" checks.
pub(crate) fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A standard trio in `root`: pretrained (seed 1), chat (seed 2), base (seed 3).
pub(crate) struct Trio {
    pub pre: PathBuf,
    pub chat: PathBuf,
    pub base: PathBuf,
}

pub(crate) fn trio(root: &Path, ty: Ty, base_shards: usize) -> Trio {
    let vocab = 16;
    let t = Trio { pre: root.join("pre"), chat: root.join("chat"), base: root.join("base") };
    write_model(&t.pre, &llama(1, vocab, false, ty), 1, &config(vocab, false, LAYERS), Some(&tokens(16)));
    write_model(&t.chat, &llama(2, vocab, false, ty), 2, &config(vocab, false, LAYERS), Some(&tokens(16)));
    write_model(
        &t.base,
        &llama(3, vocab, false, ty),
        base_shards,
        &config(vocab, false, LAYERS),
        Some(&tokens(16)),
    );
    t
}

/// Checks every sha256 the output's manifest records, inputs and outputs,
/// against the files themselves.
pub(crate) fn check_manifest_hashes(out: &Path) {
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    for inp in m["inputs"].as_array().unwrap() {
        let dir = Path::new(inp["path"].as_str().unwrap());
        for sh in inp["shards"].as_array().unwrap() {
            assert_eq!(sh["sha256"], sha256_file(&dir.join(sh["file"].as_str().unwrap())), "{sh}");
        }
    }
    for o in m["outputs"].as_array().unwrap().iter().chain(m["files"].as_array().unwrap()) {
        assert_eq!(o["sha256"], sha256_file(&out.join(o["file"].as_str().unwrap())), "{o}");
    }
}

/// A trio whose models tie lm_head to the embeddings as given.
pub(crate) fn tied_trio(root: &Path, pre_tied: bool, chat_tied: bool, base_tied: bool) -> Trio {
    let t = Trio { pre: root.join("pre"), chat: root.join("chat"), base: root.join("base") };
    for (dir, seed, tied) in [(&t.pre, 1, pre_tied), (&t.chat, 2, chat_tied), (&t.base, 3, base_tied)] {
        write_model(dir, &llama(seed, 16, tied, Ty::BF16), 1, &config(16, tied, LAYERS), None);
    }
    t
}

/// `chatvec apply` in its streaming form on a trio, into `out`, with more
/// arguments after.
pub(crate) fn apply_streaming(t: &Trio, out: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre), "-o", s(out)];
    args.extend(extra);
    chatvec(&args)
}

/// `chatvec extract` from a trio's chat and pretrained models into `out`,
/// with more arguments after.
pub(crate) fn extract(t: &Trio, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["extract", "--chat", s(&t.chat), "--pretrained", s(&t.pre), "-o", s(out)];
    args.extend(extra);
    chatvec(&args)
}

/// A PyTorch state-dict pickle (protocol 2, the layout `torch.save`
/// writes), built opcode by opcode; tensor i's storage is entry `i`.
fn state_dict_pickle(tensors: &[T]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    fn global(p: &mut Vec<u8>, m: &str, n: &str) {
        p.push(b'c');
        p.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
    }
    fn text(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: u64) {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    }
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(b")R(");
    for (i, t) in tensors.iter().enumerate() {
        text(&mut p, &t.name);
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.extend_from_slice(b"((");
        text(&mut p, "storage");
        let class = match t.ty {
            Ty::BF16 => "BFloat16Storage",
            Ty::F16 => "HalfStorage",
            Ty::F32 => "FloatStorage",
            Ty::I64 => "LongStorage",
            Ty::Raw(name, _) => panic!("no torch storage class for {name} here"),
        };
        global(&mut p, "torch", class);
        text(&mut p, &i.to_string());
        text(&mut p, "cpu");
        // Wrapping, so tests can write hostile shapes whose size overflows.
        let elems = |dims: &[u64]| dims.iter().fold(1u64, |a, &d| a.wrapping_mul(d));
        int(&mut p, elems(&t.shape));
        p.extend_from_slice(b"tQ");
        int(&mut p, 0);
        p.push(b'(');
        for d in &t.shape {
            int(&mut p, *d);
        }
        p.push(b't');
        p.push(b'(');
        for k in 0..t.shape.len() {
            int(&mut p, elems(&t.shape[k + 1..]));
        }
        p.push(b't');
        p.push(0x89);
        global(&mut p, "collections", "OrderedDict");
        p.extend_from_slice(b")Rt");
        p.push(b'R');
    }
    p.extend_from_slice(b"u.");
    p
}

/// Writes `tensors` as a PyTorch zip checkpoint (`torch.save` format, stored
/// entries), without torch.
pub(crate) fn write_torch_bin(path: &Path, tensors: &[T]) {
    write_torch_bin_with(path, tensors, |p| p);
}

/// `write_torch_bin` with its `data.pkl` rewritten by `edit` first (a
/// hostile pickle).
pub(crate) fn write_torch_bin_with(path: &Path, tensors: &[T], edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(&edit(state_dict_pickle(tensors))).unwrap();
    for (i, t) in tensors.iter().enumerate() {
        z.start_file(format!("archive/data/{i}"), opts).unwrap();
        z.write_all(&t.data).unwrap();
    }
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

/// A chat_vector recipe (TOML) applying `t`'s chat - pretrained to its
/// base, with `extra` appended (sections or parameters).
pub(crate) fn chat_vector_recipe(t: &Trio, extra: &str) -> String {
    format!(
        "merge_method = \"chat_vector\"\nbase_model = \"{}\"\nchat = \"{}\"\npretrained = \"{}\"\n{extra}",
        t.base.display(),
        t.chat.display(),
        t.pre.display()
    )
}

/// The largest distance between `a` and `b` in bf16 ulps (`u32::MAX` for
/// a sign change).
pub(crate) fn bf16_ulps(a: &T, b: &T) -> u32 {
    (0..a.numel())
        .map(|i| {
            let (x, y) = (a.get(i), b.get(i));
            let (xb, yb) =
                (half::bf16::from_f32(x).to_bits() as i32, half::bf16::from_f32(y).to_bits() as i32);
            if (x < 0.0) != (y < 0.0) && x != y { u32::MAX } else { (xb - yb).unsigned_abs() }
        })
        .max()
        .unwrap_or(0)
}
