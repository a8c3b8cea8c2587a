//! SFT datasets: JSONL chat data validated line by line and converted to
//! the one form TRL reads natively, `{"messages": [{"role", "content"}]}`,
//! and several files mixed by weight into the run's train (and eval) files.
//!
//! Accepted records:
//! - `{"messages": [...]}` (TRL / OpenAI chat format);
//! - `{"conversation": [...]}` (Swallow-Instruct-v0.1) and
//!   `{"conversations": [...]}`, with `role`/`content` or ShareGPT's
//!   `from`/`value` (`human` -> user, `gpt` -> assistant);
//! - Alpaca `{"instruction", "input"?, "output", "system"?}`: an optional
//!   system turn, one user turn (instruction, then the input after a blank
//!   line) and one assistant turn;
//! - ichikara-instruction `{"text", "output"}` (with its `ID`): one user
//!   and one assistant turn;
//! - TRL's prompt/completion `{"prompt", "completion"}`, as strings (a user
//!   and an assistant turn) or as message lists (the prompt's turns, then the
//!   completion's).
//!
//! Every problem is an error naming the file and line: bad JSON, an unknown
//! record shape or role, empty content, no assistant turn, or tool calls,
//! which the converted records cannot carry. Nothing reaches the trainer
//! until every file has passed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;

/// Longest line accepted (a single example), against runaway files.
const MAX_LINE_BYTES: usize = 64 << 20;
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// What a dataset holds.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct DataStats {
    pub examples: u64,
    /// Messages over all examples.
    pub turns: u64,
    /// Unicode characters of all message contents.
    pub characters: u64,
    /// Examples per input format.
    pub messages_format: u64,
    pub conversation_format: u64,
    pub alpaca_format: u64,
    pub ichikara_format: u64,
    pub prompt_completion_format: u64,
    pub sha256: String,
}

/// One message after conversion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Message {
    pub role: String,
    pub content: String,
}

fn role_of(m: &Map<String, Value>, at: &str) -> std::result::Result<String, String> {
    let (key, raw) = match (m.get("role"), m.get("from")) {
        (Some(r), _) => ("role", r),
        (None, Some(f)) => ("from", f),
        (None, None) => return Err(format!("{at}: no 'role'")),
    };
    let s = raw.as_str().ok_or_else(|| format!("{at}: '{key}' is not a string"))?;
    let role = match (key, s) {
        ("from", "human") => "user",
        ("from", "gpt") => "assistant",
        (_, r) => r,
    };
    if !ROLES.contains(&role) {
        return Err(format!("{at}: role '{s}' is not one of system, user, assistant"));
    }
    Ok(role.to_string())
}

fn text_of(m: &Map<String, Value>, key: &str, at: &str) -> std::result::Result<String, String> {
    match m.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("{at}: '{key}' is empty")),
        Some(v) => Err(format!("{at}: '{key}' is not a string: {v}")),
        None => Err(format!("{at}: no '{key}'")),
    }
}

fn turns(list: &Value, key: &str) -> std::result::Result<Vec<Message>, String> {
    let arr = list.as_array().ok_or_else(|| format!("'{key}' is not a list"))?;
    if arr.is_empty() {
        return Err(format!("'{key}' is empty"));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("{key}[{i}]");
            let m = m.as_object().ok_or_else(|| format!("{at} is not an object"))?;
            no_tools(m, &at)?;
            let role = role_of(m, &at)?;
            let content = text_of(m, if m.contains_key("content") { "content" } else { "value" }, &at)?;
            Ok(Message { role, content })
        })
        .collect()
}

/// Tool calls and tool results need a template and records that carry
/// them; the converted records hold role and content only, so dropping them
/// would train a different conversation. Refused, naming where.
fn no_tools(m: &Map<String, Value>, at: &str) -> std::result::Result<(), String> {
    for key in ["tool_calls", "tools", "function_call"] {
        if m.get(key).is_some_and(|v| !v.is_null()) {
            return Err(format!(
                "{at}: '{key}' cannot be carried: chatvec trains on role/content turns only"
            ));
        }
    }
    if m.get("role").and_then(Value::as_str).is_some_and(|r| r == "tool" || r == "function") {
        return Err(format!(
            "{at}: tool results cannot be carried: chatvec trains on role/content turns only"
        ));
    }
    Ok(())
}

/// Which input format a record was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Messages,
    Conversation,
    Alpaca,
    Ichikara,
    PromptCompletion,
}

/// A prompt or completion of TRL's prompt/completion records: a string
/// (one turn of `role`) or a list of messages.
fn side(o: &Map<String, Value>, key: &str, role: &str) -> std::result::Result<Vec<Message>, String> {
    match o.get(key) {
        Some(Value::Array(_)) => turns(&o[key], key),
        Some(_) => {
            Ok(vec![Message { role: role.into(), content: text_of(o, key, "prompt/completion record")? }])
        }
        None => Err(format!("prompt/completion record: no '{key}'")),
    }
}

/// The turns of a `messages` or `conversation(s)` record, if it is one.
fn chat_turns(o: &Map<String, Value>) -> Option<std::result::Result<(Format, Vec<Message>), String>> {
    if let Some(l) = o.get("messages") {
        return Some(turns(l, "messages").map(|t| (Format::Messages, t)));
    }
    let (k, l) = ["conversation", "conversations"].iter().find_map(|k| o.get(*k).map(|l| (*k, l)))?;
    Some(turns(l, k).map(|t| (Format::Conversation, t)))
}

/// Converts one parsed record; errors are messages without the location.
pub(crate) fn convert(v: &Value) -> std::result::Result<(Format, Vec<Message>), String> {
    let o = v.as_object().ok_or("not a JSON object")?;
    no_tools(o, "record")?;
    let (format, msgs) = if let Some(chat) = chat_turns(o) {
        chat?
    } else if o.contains_key("text") && o.contains_key("output") && !o.contains_key("instruction") {
        // (tatsu-lab/alpaca also has a "text" column: the whole prompt.)
        let text = text_of(o, "text", "ichikara record")?;
        let output = text_of(o, "output", "ichikara record")?;
        (
            Format::Ichikara,
            vec![
                Message { role: "user".into(), content: text },
                Message { role: "assistant".into(), content: output },
            ],
        )
    } else if o.contains_key("instruction") || o.contains_key("output") {
        let instruction = text_of(o, "instruction", "alpaca record")?;
        let input = match o.get("input") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(format!("alpaca record: 'input' is not a string: {v}")),
        };
        let output = text_of(o, "output", "alpaca record")?;
        let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
        let mut msgs = Vec::new();
        match o.get("system") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.trim().is_empty() => {}
            Some(Value::String(s)) => msgs.push(Message { role: "system".into(), content: s.clone() }),
            Some(v) => return Err(format!("alpaca record: 'system' is not a string: {v}")),
        }
        msgs.push(Message { role: "user".into(), content: user });
        msgs.push(Message { role: "assistant".into(), content: output });
        (Format::Alpaca, msgs)
    } else if o.contains_key("prompt") || o.contains_key("completion") {
        let mut msgs = side(o, "prompt", "user")?;
        msgs.extend(side(o, "completion", "assistant")?);
        (Format::PromptCompletion, msgs)
    } else {
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        return Err(format!(
            "no 'messages', 'conversation', Alpaca 'instruction'/'output', ichikara 'text'/'output' or 'prompt'/'completion' key (keys: {})",
            keys.join(", ")
        ));
    };
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn: there is nothing to learn from".into());
    }
    Ok((format, msgs))
}

/// A prompt record for `eval`: a chat record (`messages` / `conversation`,
/// with or without replies) cut before its first assistant turn, which must
/// leave a user turn.
pub(crate) fn convert_prompt(v: &Value) -> std::result::Result<(Format, Vec<Message>), String> {
    let o = v.as_object().ok_or("not a JSON object")?;
    no_tools(o, "record")?;
    let (format, msgs) =
        chat_turns(o).ok_or("expected {\"prompt\": \"...\"} or a 'messages' / 'conversation' list")??;
    let cut: Vec<Message> = msgs.into_iter().take_while(|m| m.role != "assistant").collect();
    if !cut.iter().any(|m| m.role == "user") {
        return Err("no user turn before the first assistant turn".into());
    }
    Ok((format, cut))
}

/// Line `n` (from 1) of a JSONL file, `text`, as one JSON object. A UTF-8
/// byte-order mark and a JSON array (a `.json` file, or a JSONL file
/// wrapped in `[...]`) are named, not left to the parser's "expected value
/// at line 1 column 1".
pub(crate) fn parse_line(n: u64, text: &str) -> std::result::Result<Value, String> {
    const JSONL: &str = "JSONL holds one JSON object per line";
    if n == 1 && text.starts_with('\u{feff}') {
        return Err(format!(
            "starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 without one ({JSONL})"
        ));
    }
    let array = || {
        format!(
            "a JSON array, not an object: {JSONL} (a JSON array file converts with `jq -c '.[]' FILE.json > FILE.jsonl`)"
        )
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Ok(Value::Object(o)),
        Ok(Value::Array(_)) => Err(array()),
        Ok(other) => {
            Err(format!("{} is not a JSON object ({JSONL})", crate::ui::escaped(&other.to_string(), 80)))
        }
        Err(_) if text.trim_start().starts_with('[') => Err(array()),
        Err(e) => Err(format!("bad JSON: {e} ({JSONL})")),
    }
}

/// Validates the JSONL file at `path`, calling `each(line, messages)` for
/// every example. Fails at the first bad line, naming it; reads at most one
/// line (64 MB) into memory at a time.
fn each_example(path: &Path, mut each: impl FnMut(u64, &[Message]) -> Result<()>) -> Result<DataStats> {
    // A Hub dataset (`org/name[:split]`) is read from its JSONL copy.
    let local = super::hub_data::local(path)?;
    let path = local.as_path();
    let mut r = BufReader::new(crate::json::open_regular(path)?);
    let mut stats = DataStats::default();
    let mut hash = Sha256::new();
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        // At most one byte past the limit is read into memory, however
        // long the line (a one-line 1.5 GB file, /dev/zero behind a link).
        let got = (&mut r)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("reading", path, e))?;
        if got == 0 {
            break;
        }
        n += 1;
        let bad = |msg: String| Error::bad_file(path, format!("line {n}: {msg}"));
        if line.len() > MAX_LINE_BYTES {
            return Err(bad(format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        hash.update(&line);
        let text = std::str::from_utf8(&line).map_err(|_| bad("is not UTF-8".into()))?;
        if text.trim().is_empty() {
            continue;
        }
        let v = parse_line(n, text).map_err(bad)?;
        let (format, msgs) = convert(&v).map_err(bad)?;
        stats.examples += 1;
        stats.turns += msgs.len() as u64;
        stats.characters += msgs.iter().map(|m| m.content.chars().count() as u64).sum::<u64>();
        match format {
            Format::Messages => stats.messages_format += 1,
            Format::Conversation => stats.conversation_format += 1,
            Format::Alpaca => stats.alpaca_format += 1,
            Format::Ichikara => stats.ichikara_format += 1,
            Format::PromptCompletion => stats.prompt_completion_format += 1,
        }
        each(n, &msgs)?;
    }
    if stats.examples == 0 {
        return Err(Error::bad_file(path, "holds no examples"));
    }
    stats.sha256 = hex(&hash.finalize());
    Ok(stats)
}

/// Validates the JSONL file at `path` and counts what it holds.
pub(crate) fn process(path: &Path) -> Result<DataStats> {
    each_example(path, |_, _| Ok(()))
}

/// What one file gave the mixture.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct MixedFile {
    pub file: String,
    pub weight: f64,
    pub stats: DataStats,
    /// Examples written to the train file (repeats counted).
    pub train_examples: u64,
    /// Examples held out for evaluation.
    pub eval_examples: u64,
}

/// Where the mixture goes: the train file, and with `--eval-split` the eval
/// file with the fraction of examples held out for it.
pub(crate) struct MixOut<'a> {
    pub train: &'a mut dyn Write,
    pub eval: Option<(&'a mut dyn Write, f64)>,
}

fn write_example(w: &mut dyn Write, msgs: &[Message]) -> Result<()> {
    serde_json::to_writer(&mut *w, &json!({ "messages": msgs }))
        .map_err(|e| Error::Internal(e.to_string()))?;
    w.write_all(b"\n").map_err(|e| Error::io("writing", Path::new("train.jsonl"), e))
}

/// Writes the mixture of `files` (each `(path, weight)`) as messages
/// records, streaming. Each example is first held out for evaluation with
/// probability `split`, else written `weight` times: the whole part always,
/// the fractional part with that probability. Every draw is a pure function
/// of (seed, file, line), so a run is reproducible and a held-out example
/// never reaches the train file, even repeated.
pub(crate) fn write_mixture(files: &[(&Path, f64)], seed: u64, out: MixOut<'_>) -> Result<Vec<MixedFile>> {
    let MixOut { train, mut eval } = out;
    let mut report = Vec::new();
    for (k, &(path, weight)) in files.iter().enumerate() {
        let draw = crate::rng::mix(seed ^ 0x5f7d_c4a1_0e1b_2c3d ^ (k as u64).wrapping_mul(0x9e37));
        let (mut taken, mut held) = (0u64, 0u64);
        let stats = each_example(path, |line, msgs| {
            if let Some((w, split)) = eval.as_mut()
                && (crate::rng::uniform(draw, 2 * line) as f64) < *split
            {
                held += 1;
                return write_example(&mut **w, msgs);
            }
            let whole = weight.trunc() as u64;
            let extra = (crate::rng::uniform(draw, 2 * line + 1) as f64) < weight.fract();
            for _ in 0..whole + u64::from(extra) {
                write_example(&mut *train, msgs)?;
                taken += 1;
            }
            Ok(())
        })?;
        report.push(MixedFile {
            file: path.display().to_string(),
            weight,
            stats,
            train_examples: taken,
            eval_examples: held,
        });
    }
    if report.iter().map(|f| f.train_examples).sum::<u64>() == 0 {
        return Err(Error::Usage("the weights and the eval split leave no training example".into()));
    }
    if let Some((_, split)) = eval
        && report.iter().all(|f| f.eval_examples == 0)
    {
        return Err(Error::Usage(format!(
            "--eval-split {split} held out no example of this data; raise it, or give --eval-data"
        )));
    }
    Ok(report)
}

/// Converts the eval file `path` into `out` as messages records.
pub(crate) fn write_eval(path: &Path, out: &mut dyn Write) -> Result<DataStats> {
    each_example(path, |_, msgs| write_example(out, msgs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(lines: &str) -> Result<DataStats> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.jsonl");
        std::fs::write(&p, lines).unwrap();
        process(&p)
    }

    #[test]
    fn all_three_formats_convert_to_messages() {
        let m = |v: Value| convert(&v).unwrap();
        let (f, msgs) = m(
            json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        );
        assert_eq!((f, msgs.len()), (Format::Messages, 3));
        let (f, msgs) = m(
            json!({"conversation": [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "答え"}]}),
        );
        assert_eq!((f, msgs[1].content.as_str()), (Format::Conversation, "答え"));
        let (_, msgs) =
            m(json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}));
        assert_eq!(msgs[0], Message { role: "user".into(), content: "q".into() });
        let (f, msgs) = m(json!({"instruction": "Translate", "input": "cat", "output": "猫"}));
        assert_eq!(f, Format::Alpaca);
        assert_eq!(msgs[0].content, "Translate\n\ncat");
        assert_eq!(msgs[1], Message { role: "assistant".into(), content: "猫".into() });
        let (_, msgs) = m(json!({"instruction": "Say hi", "input": "", "output": "hi"}));
        assert_eq!(msgs[0].content, "Say hi");
    }

    #[test]
    fn ichikara_prompt_completion_and_alpaca_system_convert() {
        let m = |v: Value| convert(&v).unwrap();
        let (f, msgs) = m(
            json!({"ID": "ichikara-instruction-003-001-1.1", "text": "日本の首都は?", "output": "東京です。"}),
        );
        assert_eq!((f, msgs.len(), msgs[1].content.as_str()), (Format::Ichikara, 2, "東京です。"));
        let (f, msgs) = m(json!({"prompt": "The sky is", "completion": " blue."}));
        assert_eq!(
            (f, msgs[0].role.as_str(), msgs[1].role.as_str()),
            (Format::PromptCompletion, "user", "assistant")
        );
        let (_, msgs) = m(json!({
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}]
        }));
        assert_eq!(msgs.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["system", "user", "assistant"]);
        let (_, msgs) = m(json!({"system": "Be brief.", "instruction": "Say hi", "output": "hi"}));
        assert_eq!(msgs[0], Message { role: "system".into(), content: "Be brief.".into() });
        for bad in [
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": [{"id": 1}]}]}),
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]}),
            json!({"instruction": "q", "output": "a", "tool_calls": []}),
        ] {
            let e = convert(&bad).unwrap_err();
            assert!(e.contains("cannot be carried"), "{e}");
        }
    }

    #[test]
    fn mixtures_take_each_file_by_its_weight_and_hold_out_an_eval_split() {
        let d = tempfile::tempdir().unwrap();
        let line = |i: usize| format!("{{\"instruction\": \"q{i}\", \"output\": \"a{i}\"}}\n");
        let a = d.path().join("a.jsonl");
        let b = d.path().join("b.jsonl");
        std::fs::write(&a, (0..100).map(line).collect::<String>()).unwrap();
        std::fs::write(&b, (100..300).map(line).collect::<String>()).unwrap();
        let run = |split: Option<f64>, seed: u64| {
            let (mut train, mut eval) = (Vec::new(), Vec::new());
            let out = MixOut { train: &mut train, eval: split.map(|s| (&mut eval as &mut dyn Write, s)) };
            let r = write_mixture(&[(a.as_path(), 2.0), (b.as_path(), 0.5)], seed, out).unwrap();
            (r, String::from_utf8(train).unwrap(), String::from_utf8(eval).unwrap())
        };
        let (r, train, _) = run(None, 1);
        assert_eq!(r[0].train_examples, 200);
        assert_eq!(train.matches("\"q7\"").count(), 2);
        // A seeded half of b: near 100, and the same on every run.
        assert!((70..130).contains(&r[1].train_examples), "{}", r[1].train_examples);
        assert_eq!(run(None, 1).1, train);
        assert_ne!(run(None, 2).1, train);
        let (r, train, eval) = run(Some(0.1), 1);
        let held = r[0].eval_examples + r[1].eval_examples;
        assert_eq!(eval.lines().count() as u64, held);
        assert!((10..50).contains(&held), "{held}");
        // No held-out example is trained on.
        for l in eval.lines() {
            let q = &l[l.find("\"q").unwrap()..][..5];
            assert!(!train.contains(q), "{q} in both");
        }
    }

    #[test]
    fn counts_and_hash() {
        let text = "{\"messages\": [{\"role\": \"user\", \"content\": \"ab\"}, {\"role\": \"assistant\", \"content\": \"cde\"}]}\n\n{\"instruction\": \"x\", \"output\": \"y\"}\n";
        let s = check(text).unwrap();
        assert_eq!((s.examples, s.turns, s.characters), (2, 4, 7));
        assert_eq!((s.messages_format, s.alpaca_format), (1, 1));
        assert_eq!(s.sha256, hex(&Sha256::digest(text.as_bytes())));
    }

    #[test]
    fn each_bad_line_is_named() {
        let good = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n";
        let cases = [
            ("{\"messages\": [", "line 2: bad JSON"),
            ("[1, 2]", "line 2: a JSON array, not an object: JSONL holds one JSON object per line"),
            ("{\"txt\": \"x\"}", "line 2: no 'messages', 'conversation', Alpaca"),
            (
                "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
                "line 2: messages[0]: role 'bot' is not one of",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"  \"}, {\"role\": \"assistant\", \"content\": \"a\"}]}",
                "line 2: messages[0]: 'content' is empty",
            ),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}", "line 2: no assistant turn"),
            ("{\"messages\": []}", "line 2: 'messages' is empty"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": 3}]}",
                "line 2: messages[0]: 'content' is not a string",
            ),
            ("{\"instruction\": \"x\", \"output\": \"\"}", "line 2: alpaca record: 'output' is empty"),
            ("{\"conversation\": [{\"content\": \"x\"}]}", "line 2: conversation[0]: no 'role'"),
        ];
        for (bad, want) in cases {
            let e = check(&format!("{good}{bad}\n{good}")).unwrap_err().to_string();
            assert!(e.contains("data.jsonl: ") && e.contains(want), "{bad}\n  got {e}\n  want {want}");
        }
        assert!(check("\n\n").unwrap_err().to_string().contains("holds no examples"));
        // A BOM, and a JSON array file (one record per line or pretty).
        let e = check(&format!("\u{feff}{good}")).unwrap_err().to_string();
        assert!(e.contains("line 1: starts with a UTF-8 byte-order mark (BOM)"), "{e}");
        for array in [format!("[{}]\n", good.trim()), format!("[\n  {}\n]\n", good.trim())] {
            let e = check(&array).unwrap_err().to_string();
            assert!(
                e.contains("line 1: a JSON array, not an object: JSONL holds one JSON object per line"),
                "{e}"
            );
        }
        let e = check("\"text\"\n").unwrap_err().to_string();
        assert!(
            e.contains("line 1: \"text\" is not a JSON object (JSONL holds one JSON object per line)"),
            "{e}"
        );
        let mut invalid = good.as_bytes().to_vec();
        invalid.extend_from_slice(b"{\"messages\": \"\xff\"}\n");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.jsonl");
        std::fs::write(&p, invalid).unwrap();
        assert!(process(&p).unwrap_err().to_string().contains("line 2: is not UTF-8"));
    }
}
