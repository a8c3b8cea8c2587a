//! Synthetic Llama-shaped checkpoints for the demo and the benchmark: real
//! safetensors layouts (sharded, with index, config, tokenizer and chat
//! template files) filled with deterministic pseudo-random weights.
//!
//! A model's weights are a sum of components, each a pure function of
//! `(seed, tensor name, element index)`: the pretrained model is `[p]`, its
//! chat model `[p, c]`, a continued-pretrained model `[p, k]`, so the chat
//! vector really is the `c` component.

use std::io::Write;
use std::path::Path;

use chatvec::{Error, FloatType, Result};
use rayon::prelude::*;
use serde_json::json;

/// The shape of a Llama-architecture model.
#[derive(Clone, Debug)]
pub(crate) struct LlamaShape {
    pub vocab: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub tied: bool,
}

impl LlamaShape {
    /// A model small enough to build in milliseconds.
    pub(crate) fn tiny(vocab: u64) -> LlamaShape {
        LlamaShape { vocab, hidden: 64, intermediate: 176, layers: 2, heads: 4, kv_heads: 2, tied: false }
    }

    /// Tensor names and shapes, in transformers' order.
    pub(crate) fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let kv = h / self.heads * self.kv_heads;
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            v.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        v
    }

    fn config(&self, dtype: FloatType) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": dtype.torch_name(),
        })
    }
}

/// One weight component: amplitude and seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Component {
    pub seed: u64,
    pub amplitude: f32,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Element `i` of tensor `name` for a model made of `parts`: a uniform value
/// in `[-amplitude, amplitude)` per component, summed in f32.
pub(crate) fn value(parts: &[Component], name: &str, i: u64) -> f32 {
    let k = name_key(name);
    parts.iter().fold(0.0f32, |acc, c| {
        let h = splitmix(c.seed ^ k ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93));
        let u = (h >> 40) as f32 / (1u64 << 24) as f32;
        acc + (u * 2.0 - 1.0) * c.amplitude
    })
}

/// Vocabulary of a synthetic model: three specials, `<|eot_id|>`, then
/// plain tokens; `extra` tokens are appended, as a vocabulary expansion does.
pub(crate) fn tokens(vocab: u64, extra: u64) -> Vec<String> {
    let mut t: Vec<String> = ["<unk>", "<s>", "</s>", "<|eot_id|>"].iter().map(|s| s.to_string()).collect();
    t.extend((4..vocab).map(|i| format!("tok{i}")));
    t.extend((0..extra).map(|i| format!("ja{i}")));
    t
}

/// A minimal chat template (Llama-3 style turn markers).
pub(crate) const CHAT_TEMPLATE: &str = "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}";

/// What to write besides the weights.
pub(crate) struct ModelFiles<'a> {
    /// Vocabulary for tokenizer.json (its length should equal the vocab size).
    pub tokens: Option<&'a [String]>,
    /// Whether this is a chat model: adds a chat template and eos ids [2, 3].
    pub chat: bool,
}

/// `v` as the little-endian bytes of `ty`, rounded to nearest even.
fn encode(ty: FloatType, v: &[f32]) -> Vec<u8> {
    match ty {
        FloatType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        FloatType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        FloatType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The tensors in order, cut into shards of at most `max` data bytes (a
/// larger tensor gets a shard of its own), as transformers cuts them.
fn shard_ranges(bytes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, b) in bytes.iter().enumerate() {
        if i > start && size + b > max {
            ranges.push(start..i);
            (start, size) = (i, 0);
        }
        size += b;
    }
    ranges.push(start..bytes.len());
    ranges
}

/// A safetensors header for `tensors` (name, shape) of `dtype`: the JSON
/// padded with spaces to 8 bytes, as the reference writer does.
fn header(tensors: &[(String, Vec<u64>)], dtype: FloatType) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<u64>() * dtype.size() as u64;
        obj.insert(
            name.clone(),
            json!({"dtype": dtype.dtype().name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(obj).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    let path = dir.join(name);
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    text.push('\n');
    std::fs::write(&path, text).map_err(|e| Error::Io { op: "writing", path, source: e })
}

/// Writes a synthetic model into `dir` (created if needed).
pub(crate) fn write_model(
    dir: &Path,
    shape: &LlamaShape,
    dtype: FloatType,
    parts: &[Component],
    shard_size: u64,
    files: &ModelFiles<'_>,
) -> Result<()> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::Io { op, path, source: e }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tensors = shape.tensors();
    let sizes: Vec<u64> =
        tensors.iter().map(|(_, s)| s.iter().product::<u64>() * dtype.size() as u64).collect();
    let ranges = shard_ranges(&sizes, shard_size);
    let n = ranges.len();
    let chunk = 8u64 << 20;
    let mut weight_map = serde_json::Map::new();
    for (i, r) in ranges.into_iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let path = dir.join(&name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io("creating", &path))?);
        f.write_all(&header(&tensors[r.clone()], dtype)).map_err(io("writing", &path))?;
        for (tname, shp) in &tensors[r] {
            weight_map.insert(tname.clone(), name.clone().into());
            let count: u64 = shp.iter().product();
            let mut start = 0u64;
            while start < count {
                let end = (start + chunk).min(count);
                let vals: Vec<f32> = (start..end).into_par_iter().map(|i| value(parts, tname, i)).collect();
                f.write_all(&encode(dtype, &vals)).map_err(io("writing", &path))?;
                start = end;
            }
        }
        f.flush().map_err(io("writing", &path))?;
    }
    if n > 1 {
        let total: u64 = sizes.iter().sum();
        write_json(
            dir,
            "model.safetensors.index.json",
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    write_json(dir, "config.json", &shape.config(dtype))?;
    let eos = if files.chat { json!([2, 3]) } else { json!(2) };
    write_json(dir, "generation_config.json", &json!({"bos_token_id": 1, "eos_token_id": eos}))?;
    if let Some(toks) = files.tokens {
        let vocab: serde_json::Map<String, serde_json::Value> =
            toks.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<_> = toks
            .iter()
            .take(4)
            .enumerate()
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        // Every field the `tokenizers` library requires, so transformers
        // loads the demo's models (`chatvec eval` runs on them): words
        // split at whitespace, each a token of the word-level vocabulary.
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        write_json(dir, "tokenizer.json", &tj)?;
        let mut tc =
            json!({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"});
        if files.chat {
            tc["chat_template"] = CHAT_TEMPLATE.into();
            tc["eos_token"] = "<|eot_id|>".into();
        }
        write_json(dir, "tokenizer_config.json", &tc)?;
    }
    Ok(())
}

/// Writes a PEFT LoRA adapter of rank `rank` over every projection of
/// `shape` into `dir`, as `PeftModel.save_pretrained` lays it out:
/// `adapter_config.json` and `adapter_model.safetensors` with
/// `base_model.model.M.lora_A.weight` (`r x in`) and `lora_B.weight`
/// (`out x r`), values from `parts`.
#[cfg(feature = "bench")]
pub(crate) fn write_lora_adapter(
    dir: &Path,
    shape: &LlamaShape,
    rank: u64,
    parts: &[Component],
) -> Result<()> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::Io { op, path, source: e }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let dtype = FloatType::BF16;
    let mut tensors = Vec::new();
    for (name, s) in shape.tensors() {
        if let Some(module) = name.strip_suffix("_proj.weight") {
            let m = format!("base_model.model.{module}_proj");
            tensors.push((format!("{m}.lora_A.weight"), vec![rank, s[1]]));
            tensors.push((format!("{m}.lora_B.weight"), vec![s[0], rank]));
        }
    }
    let path = dir.join("adapter_model.safetensors");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io("creating", &path))?);
    f.write_all(&header(&tensors, dtype)).map_err(io("writing", &path))?;
    for (tname, shp) in &tensors {
        let count: u64 = shp.iter().product();
        let vals: Vec<f32> = (0..count).into_par_iter().map(|i| value(parts, tname, i)).collect();
        f.write_all(&encode(dtype, &vals)).map_err(io("writing", &path))?;
    }
    f.flush().map_err(io("writing", &path))?;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    write_json(
        dir,
        "adapter_config.json",
        &json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": false,
                "fan_in_fan_out": false, "use_dora": false}),
    )
}
