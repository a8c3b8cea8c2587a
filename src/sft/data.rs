//! SFT datasets: JSONL chat data validated line by line and converted to
//! the one form TRL reads natively, `{"messages": [{"role", "content"}]}`.
//!
//! Accepted records:
//! - `{"messages": [...]}` (TRL / OpenAI chat format);
//! - `{"conversation": [...]}` (Swallow-Instruct-v0.1) and
//!   `{"conversations": [...]}`, with `role`/`content` or ShareGPT's
//!   `from`/`value` (`human` -> user, `gpt` -> assistant);
//! - Alpaca `{"instruction", "input"?, "output"}`: one user turn
//!   (instruction, then the input after a blank line) and one assistant turn.
//!
//! Every problem is an error naming the file and line: bad JSON, an unknown
//! record shape or role, empty content, no assistant turn. Nothing reaches
//! the trainer until the whole file has passed.

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
pub struct DataStats {
    pub examples: u64,
    /// Messages over all examples.
    pub turns: u64,
    /// Unicode characters of all message contents.
    pub characters: u64,
    /// Examples per input format.
    pub messages_format: u64,
    pub conversation_format: u64,
    pub alpaca_format: u64,
    pub sha256: String,
}

/// One message after conversion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
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
            let role = role_of(m, &at)?;
            let content = text_of(m, if m.contains_key("content") { "content" } else { "value" }, &at)?;
            Ok(Message { role, content })
        })
        .collect()
}

/// Which input format a record was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Messages,
    Conversation,
    Alpaca,
}

/// Converts one parsed record; errors are messages without the location.
pub fn convert(v: &Value) -> std::result::Result<(Format, Vec<Message>), String> {
    let o = v.as_object().ok_or("not a JSON object")?;
    let (format, msgs) = if let Some(l) = o.get("messages") {
        (Format::Messages, turns(l, "messages")?)
    } else if let Some((k, l)) =
        ["conversation", "conversations"].iter().find_map(|k| o.get(*k).map(|l| (*k, l)))
    {
        (Format::Conversation, turns(l, k)?)
    } else if o.contains_key("instruction") || o.contains_key("output") {
        let instruction = text_of(o, "instruction", "alpaca record")?;
        let input = match o.get("input") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(format!("alpaca record: 'input' is not a string: {v}")),
        };
        let output = text_of(o, "output", "alpaca record")?;
        let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
        (
            Format::Alpaca,
            vec![
                Message { role: "user".into(), content: user },
                Message { role: "assistant".into(), content: output },
            ],
        )
    } else {
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        return Err(format!(
            "no 'messages', 'conversation' or Alpaca 'instruction'/'output' key (keys: {})",
            keys.join(", ")
        ));
    };
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn: there is nothing to learn from".into());
    }
    Ok((format, msgs))
}

/// Validates the JSONL file at `path`; with `out`, writes each example in
/// the messages format there. Fails at the first bad line, naming it.
pub fn process(path: &Path, mut out: Option<&mut dyn Write>) -> Result<DataStats> {
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
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("bad JSON: {e}")))?;
        let (format, msgs) = convert(&v).map_err(bad)?;
        stats.examples += 1;
        stats.turns += msgs.len() as u64;
        stats.characters += msgs.iter().map(|m| m.content.chars().count() as u64).sum::<u64>();
        match format {
            Format::Messages => stats.messages_format += 1,
            Format::Conversation => stats.conversation_format += 1,
            Format::Alpaca => stats.alpaca_format += 1,
        }
        if let Some(w) = out.as_deref_mut() {
            let rec = json!({ "messages": msgs });
            serde_json::to_writer(&mut *w, &rec).map_err(|e| Error::Internal(e.to_string()))?;
            w.write_all(b"\n").map_err(|e| Error::io("writing", Path::new("train.jsonl"), e))?;
        }
    }
    if stats.examples == 0 {
        return Err(Error::bad_file(path, "holds no examples"));
    }
    stats.sha256 = hex(&hash.finalize());
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(lines: &str) -> Result<DataStats> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.jsonl");
        std::fs::write(&p, lines).unwrap();
        process(&p, None)
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
            ("[1, 2]", "line 2: not a JSON object"),
            ("{\"text\": \"x\"}", "line 2: no 'messages', 'conversation' or Alpaca"),
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
        let mut invalid = good.as_bytes().to_vec();
        invalid.extend_from_slice(b"{\"messages\": \"\xff\"}\n");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.jsonl");
        std::fs::write(&p, invalid).unwrap();
        assert!(process(&p, None).unwrap_err().to_string().contains("line 2: is not UTF-8"));
    }
}
