//! The non-weight files of an output: config, generation config and
//! tokenizer from the base, and, when the chat model is known, its chat
//! template and generation eos ids (Llama-3 base models have no chat
//! template and leave `<|eot_id|>` untrained, so a chat-vector model without
//! them does not stop where it should).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::{RawObject, read_capped, read_value};
use crate::model::dtype::FloatType;
use crate::model::tokenizer::Vocab;
use crate::model::{SIDE_FILES, side_file};
use crate::output::files::{WrittenFile, write_file};
use crate::plan::{Plan, VocabUnion};

/// Largest side file copied (tokenizer.json of large vocabularies is ~35 MB).
const MAX_SIDE_BYTES: u64 = 256 << 20;

/// The side files of an output, read, checked and edited before any weight
/// is written (a broken input side file must fail the run before its long
/// part), and written at the end.
#[derive(Default)]
pub(crate) struct SideFiles {
    pending: Vec<(String, Vec<u8>)>,
    /// Human-readable notes, also printed.
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

impl SideFiles {
    /// A prepared file's bytes.
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.pending.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
    }

    /// A prepared JSON file as an object whose values keep their text, so
    /// an edit changes only the key it sets.
    pub(crate) fn json(&self, name: &str) -> Result<Option<RawObject>> {
        self.get(name).map(|bytes| RawObject::parse(bytes, Path::new(name))).transpose()
    }

    /// Adds a generated file (e.g. the model card), replacing one of that name.
    pub(crate) fn add(&mut self, name: &str, bytes: Vec<u8>) {
        self.pending.retain(|(n, _)| n != name);
        self.pending.push((name.to_string(), bytes));
    }

    /// Drops a prepared file.
    pub(crate) fn remove(&mut self, name: &str) {
        self.pending.retain(|(n, _)| n != name);
    }

    /// Writes the files into `out`, durably.
    pub(crate) fn write(self, out: &Path) -> Result<Vec<WrittenFile>> {
        self.pending.iter().map(|(name, bytes)| write_file(out, name, bytes)).collect()
    }
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    match read_value(path, MAX_SIDE_BYTES)? {
        Value::Object(m) => Ok(m),
        _ => Err(Error::bad_file(path, "expected a JSON object")),
    }
}

/// A chat template found in a model directory.
enum Template {
    /// From `chat_template.jinja`.
    File(String),
    /// The `chat_template` value of tokenizer_config.json or chat_template.json
    /// (a string, or a list of named templates).
    Value(Value),
}

fn find_template(dir: &Path) -> Result<Option<Template>> {
    if let Some(jinja) = side_file(dir, "chat_template.jinja")? {
        let bytes = read_capped(&jinja, MAX_SIDE_BYTES)?;
        let s = String::from_utf8(bytes).map_err(|_| Error::bad_file(&jinja, "is not UTF-8"))?;
        return Ok(Some(Template::File(s)));
    }
    for name in ["tokenizer_config.json", "chat_template.json"] {
        if let Some(p) = side_file(dir, name)?
            && let Some(v) = read_json_object(&p)?.remove("chat_template")
            && !v.is_null()
        {
            return Ok(Some(Template::Value(v)));
        }
    }
    Ok(None)
}

/// The text of the chat template in `dir`, if there is one: the
/// `chat_template.jinja` file, or the `chat_template` string (or, for a list
/// of named templates, the one named `default`, else the first).
pub(crate) fn chat_template_text(dir: &Path) -> Result<Option<String>> {
    Ok(match find_template(dir)? {
        None => None,
        Some(Template::File(s)) => Some(s),
        Some(Template::Value(Value::String(s))) => Some(s),
        Some(Template::Value(Value::Array(list))) => {
            let named = |n: &Value| n.get("name").and_then(Value::as_str) == Some("default");
            list.iter()
                .find(|t| named(t))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }
        Some(Template::Value(_)) => None,
    })
}

/// Reads the side files of `from` that exist, to be copied byte for byte;
/// JSON ones must parse. Links that lead out of the model are skipped
/// (`model::side_file`).
pub(crate) fn read_side_files(from: &Path) -> Result<SideFiles> {
    let mut side = SideFiles::default();
    for name in SIDE_FILES {
        if let Some(p) = side_file(from, name)? {
            let bytes = read_capped(&p, MAX_SIDE_BYTES)?;
            if name.ends_with(".json") {
                serde_json::from_slice::<Value>(&bytes)
                    .map_err(|e| Error::bad_file(&p, format!("invalid JSON: {e}")))?;
            }
            side.pending.push((name.to_string(), bytes));
        }
    }
    Ok(side)
}

/// What the output of `apply` takes from the chat model.
pub(crate) struct ChatSide<'a> {
    /// Directory holding the chat model's tokenizer/template/generation files
    /// (the chat model itself, or a vector made by `extract`).
    pub dir: &'a Path,
    pub keep_base_template: bool,
}

/// Prepares the side files of an applied model: the base's, with
/// `torch_dtype` following `--out-dtype`, and the chat model's template and
/// eos ids.
pub(crate) fn model_side_files(
    base: &Path,
    chat: Option<ChatSide<'_>>,
    out_dtype: Option<FloatType>,
) -> Result<SideFiles> {
    let mut side = read_side_files(base)?;
    if let Some(ty) = out_dtype
        && let Some(mut cfg) = side.json("config.json")?
    {
        let key = if cfg.contains("dtype") { "dtype" } else { "torch_dtype" };
        cfg.set(key, &ty.torch_name())?;
        side.add("config.json", cfg.to_bytes());
    }
    if let Some(chat) = chat.filter(|c| !c.keep_base_template) {
        take_chat_template(base, chat.dir, &mut side)?;
        take_eos_ids(base, chat.dir, &mut side)?;
    }
    Ok(side)
}

fn set_pending(pending: &mut Vec<(String, Vec<u8>)>, name: &str, bytes: Vec<u8>) {
    match pending.iter_mut().find(|(n, _)| n == name) {
        Some(e) => e.1 = bytes,
        None => pending.push((name.to_string(), bytes)),
    }
}

fn take_chat_template(base: &Path, chat: &Path, side: &mut SideFiles) -> Result<()> {
    let Some(tpl) = find_template(chat)? else {
        return Ok(());
    };
    let had = if find_template(base)?.is_some() { "replacing the base's" } else { "the base had none" };
    let (as_value, file) = match &tpl {
        Template::File(s) => (Value::String(s.clone()), true),
        Template::Value(v) => (v.clone(), false),
    };
    set_template(side, &as_value, file)?;
    side.notes.push(format!("chat template: taken from {} ({had})", chat.display()));
    Ok(())
}

/// Makes `template` the output's chat template: tokenizer_config.json's
/// `chat_template`, and `chat_template.jinja` when the template came as a
/// file, the output already has one, or there is no tokenizer_config.json
/// (transformers prefers the .jinja, so a stale one must not survive).
fn set_template(side: &mut SideFiles, template: &Value, file: bool) -> Result<()> {
    let base_config = side.json("tokenizer_config.json")?;
    let has_config = base_config.is_some();
    let had_jinja = side.get("chat_template.jinja").is_some();
    let pending = &mut side.pending;
    if let Some(mut cfg) = base_config {
        cfg.set("chat_template", template)?;
        set_pending(pending, "tokenizer_config.json", cfg.to_bytes());
    }
    if let Value::String(s) = template
        && (file || had_jinja || !has_config)
    {
        set_pending(pending, "chat_template.jinja", s.clone().into_bytes());
    }
    pending.retain(|(n, _)| n != "chat_template.json");
    Ok(())
}

/// Installs the Jinja `text` as the output's chat template, with `note`.
pub(crate) fn install_template(side: &mut SideFiles, text: &str, note: &str) -> Result<()> {
    set_template(side, &Value::String(text.to_string()), false)?;
    side.notes.push(note.to_string());
    Ok(())
}

fn take_eos_ids(base: &Path, chat: &Path, side: &mut SideFiles) -> Result<()> {
    let Some(gp) = side_file(chat, "generation_config.json")? else {
        return Ok(());
    };
    let Some(eos) = read_json_object(&gp)?.remove("eos_token_id").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let ids: Vec<u64> = match &eos {
        Value::Number(n) => n.as_u64().into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    };
    // Ids are only meaningful in the chat model's vocabulary: carry them over
    // by token string when both tokenizers are known.
    let (bt, ct) = (side_file(base, "tokenizer.json")?, side_file(chat, "tokenizer.json")?);
    let mapped: Option<Vec<u64>> = if let (Some(bt), Some(ct)) = (bt, ct) {
        let (bv, cv) = (Vocab::read(&bt)?, Vocab::read(&ct)?);
        ids.iter().map(|&i| cv.token(i).and_then(|t| bv.id(t)).map(u64::from)).collect()
    } else {
        side.warnings.push(format!(
            "tokenizer.json missing for the base or the chat model; eos ids {ids:?} copied as numbers, unchecked"
        ));
        Some(ids.clone())
    };
    let Some(mapped) = mapped else {
        side.warnings.push(format!(
            "the chat model's eos ids {ids:?} are not all tokens of the base vocabulary; generation_config.json left as in the base"
        ));
        return Ok(());
    };
    let mut gen_cfg = match side.json("generation_config.json")? {
        Some(c) => c,
        None => RawObject::parse(b"{}", Path::new("generation_config.json"))?,
    };
    let before = gen_cfg.get("eos_token_id").unwrap_or(Value::Null);
    let new: Value = if mapped.len() == 1 && eos.is_number() { mapped[0].into() } else { mapped.into() };
    if before != new {
        side.notes.push(format!("generation eos_token_id: {new} from the chat model (base had {before})"));
    }
    gen_cfg.set("eos_token_id", &new)?;
    set_pending(&mut side.pending, "generation_config.json", gen_cfg.to_bytes());
    Ok(())
}

/// Writes a union vocabulary into the side files: the new tokens as added
/// tokens of tokenizer.json (flags from the tokenizer that has them) and of
/// tokenizer_config.json's added_tokens_decoder, and config.json's
/// vocab_size, as mergekit's union tokenizer does.
pub(crate) fn add_union_tokens(side: &mut SideFiles, plan: &Plan, u: &VocabUnion) -> Result<()> {
    if u.added.is_empty() {
        return Ok(());
    }
    // The added-token flags each source tokenizer gives a token.
    // Each source tokenizer once (the plan already parsed it; a read error
    // now is an error, not default flags).
    let mut sources: std::collections::HashMap<usize, serde_json::Value> = std::collections::HashMap::new();
    for (_, _, input) in &u.added {
        if !sources.contains_key(input) {
            let p = plan.inputs[*input].ckpt.dir.join("tokenizer.json");
            sources.insert(*input, crate::json::read_value(&p, 1 << 30)?);
        }
    }
    let flag_of = |input: usize, tok: &str| -> serde_json::Value {
        let found = sources[&input].get("added_tokens").and_then(serde_json::Value::as_array).and_then(|a| {
            a.iter().find(|t| t.get("content").and_then(serde_json::Value::as_str) == Some(tok))
        });
        let get =
            |k: &str, d: bool| found.and_then(|f| f.get(k)).and_then(serde_json::Value::as_bool).unwrap_or(d);
        serde_json::json!({
            "content": tok, "single_word": get("single_word", false), "lstrip": get("lstrip", false),
            "rstrip": get("rstrip", false), "normalized": get("normalized", true), "special": get("special", false),
        })
    };
    let entries: Vec<(u64, serde_json::Value)> =
        u.added.iter().map(|(id, tok, input)| (*id, flag_of(*input, tok))).collect();
    if let Some(mut v) = side.json("tokenizer.json")? {
        let mut list = v
            .get("added_tokens")
            .and_then(|l| l.as_array().cloned())
            .ok_or_else(|| Error::Usage("the base's tokenizer.json has no added_tokens list".into()))?;
        for (id, e) in &entries {
            let mut e = e.clone();
            e["id"] = (*id).into();
            list.push(e);
        }
        v.set("added_tokens", &list)?;
        side.add("tokenizer.json", v.to_bytes());
    }
    if let Some(mut v) = side.json("tokenizer_config.json")?
        && let Some(mut dec) = v.get("added_tokens_decoder").and_then(|d| d.as_object().cloned())
    {
        for (id, e) in &entries {
            dec.insert(id.to_string(), e.clone());
        }
        v.set("added_tokens_decoder", &dec)?;
        side.add("tokenizer_config.json", v.to_bytes());
    }
    if let Some(mut v) = side.json("config.json")? {
        v.set("vocab_size", &(u.base_rows + u.added.len() as u64))?;
        side.add("config.json", v.to_bytes());
    }
    Ok(())
}

/// `tokenizer_source: MODEL`: the output's tokenizer files are that
/// model's (the base's are dropped, so none is left over), and
/// config.json's `vocab_size` is the output's embedding rows.
pub(crate) fn take_tokenizer(side: &mut SideFiles, from: &Path, plan: &Plan) -> Result<()> {
    let source = read_side_files(from)?;
    // Every side file but the model's own configs makes the tokenizer
    // (and the template it carries).
    let tokenizer_files =
        crate::model::SIDE_FILES.iter().filter(|n| !matches!(**n, "config.json" | "generation_config.json"));
    for &name in tokenizer_files {
        side.remove(name);
        if let Some(bytes) = source.get(name) {
            side.add(name, bytes.to_vec());
        }
    }
    set_vocab_size(side, plan)?;
    side.notes.push(format!("tokenizer files from {}", from.display()));
    Ok(())
}

/// config.json's `vocab_size` set to the output's embedding rows (a
/// vocabulary taken from another model, or padded).
pub(crate) fn set_vocab_size(side: &mut SideFiles, plan: &Plan) -> Result<()> {
    let rows = plan
        .tensors
        .iter()
        .find(|t| crate::model::checkpoint::is_embedding(&t.name))
        .and_then(|t| t.shape.first().copied());
    if let (Some(rows), Some(mut cfg)) = (rows, side.json("config.json")?) {
        cfg.set("vocab_size", &rows)?;
        side.add("config.json", cfg.to_bytes());
    }
    Ok(())
}

/// A slices merge's config.json: `num_hidden_layers` is the output's, and
/// every per-layer list (one entry per layer of the reference, such as
/// `layer_types`) is rebuilt from the layer each output layer comes from
/// (`map`: input, layer), read from that input's own config where it has
/// the list.
pub(crate) fn relayer_config(side: &mut SideFiles, plan: &Plan, map: &[(usize, u64)]) -> Result<()> {
    let Some(mut cfg) = side.json("config.json")? else { return Ok(()) };
    let Some(layers) = cfg.get("num_hidden_layers").and_then(|v| v.as_u64()) else { return Ok(()) };
    let mut configs: std::collections::HashMap<usize, Option<serde_json::Map<String, Value>>> =
        std::collections::HashMap::new();
    for key in cfg.keys() {
        let Some(Value::Array(list)) = cfg.get(&key) else { continue };
        if list.len() as u64 != layers || layers == 0 {
            continue;
        }
        let mut out = Vec::with_capacity(map.len());
        for (input, layer) in map {
            let own = configs
                .entry(*input)
                .or_insert_with(|| read_json_object(&plan.inputs[*input].ckpt.dir.join("config.json")).ok());
            let value = own
                .as_ref()
                .and_then(|c| c.get(&key))
                .and_then(Value::as_array)
                .and_then(|a| a.get(*layer as usize))
                .or_else(|| list.get(*layer as usize))
                .cloned()
                .unwrap_or(Value::Null);
            out.push(value);
        }
        cfg.set(&key, &out)?;
    }
    cfg.set("num_hidden_layers", &(map.len() as u64))?;
    side.add("config.json", cfg.to_bytes());
    Ok(())
}
