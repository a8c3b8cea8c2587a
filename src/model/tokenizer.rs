//! Token vocabularies read from `tokenizer.json`, so embedding rows of two
//! models with different vocabularies can be matched by token string.
//!
//! Only the vocabulary is read (model.vocab and added_tokens); chatvec never
//! tokenizes text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::read_capped;

/// Largest tokenizer.json accepted (the largest common ones are ~35 MB).
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// Largest token id accepted: far beyond any real vocabulary (~256k), small
/// enough that the id table cannot exhaust memory.
const MAX_TOKEN_ID: u64 = 16 << 20;

/// A vocabulary: token id <-> token string.
#[derive(Debug)]
pub(crate) struct Vocab {
    pub path: PathBuf,
    pub id_to_token: Vec<Option<String>>,
    pub token_to_id: HashMap<String, u32>,
}

impl Vocab {
    /// Reads the vocabulary of the tokenizer.json at `path`.
    pub(crate) fn read(path: &Path) -> Result<Vocab> {
        let bytes = read_capped(path, MAX_TOKENIZER_BYTES)?;
        Vocab::parse(&bytes, path)
    }

    /// The vocabulary of a tokenizer.json's bytes, `path` naming it in
    /// errors (and in the result). Only `model.vocab` and `added_tokens`
    /// are built; the rest (BPE merges: most of a Llama 3 tokenizer's 9 MB)
    /// is skipped unparsed into values, which made reading the base's and
    /// the chat model's tokenizers a visible part of a small apply. A file
    /// of another shape is read whole, for the error to name what is wrong.
    pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<Vocab> {
        /// The two parts read; serde skips every other field.
        #[derive(serde::Deserialize)]
        struct Lean {
            model: Option<LeanModel>,
            added_tokens: Option<Value>,
        }
        #[derive(serde::Deserialize)]
        struct LeanModel {
            vocab: Option<Value>,
        }
        if let Ok(lean) = serde_json::from_slice::<Lean>(bytes) {
            let vocab = lean.model.and_then(|m| m.vocab);
            return Vocab::from_parts(path, vocab.as_ref(), lean.added_tokens.as_ref());
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        Vocab::from_parts(path, v.pointer("/model/vocab"), v.get("added_tokens"))
    }

    /// The vocabulary of a tokenizer.json's `model.vocab` and `added_tokens`.
    fn from_parts(path: &Path, vocab_part: Option<&Value>, added: Option<&Value>) -> Result<Vocab> {
        let mut vocab =
            Vocab { path: path.to_path_buf(), id_to_token: Vec::new(), token_to_id: HashMap::new() };
        match vocab_part {
            Some(Value::Object(m)) => {
                for (tok, id) in m {
                    let id = id.as_u64().ok_or_else(|| {
                        Error::bad_file(
                            path,
                            format!("model.vocab: id of token {tok:?} is not a non-negative integer"),
                        )
                    })?;
                    vocab.add(id, tok)?;
                }
            }
            // Unigram models list [token, score] pairs; the position is the id.
            Some(Value::Array(a)) => {
                for (id, entry) in a.iter().enumerate() {
                    let tok = entry.get(0).and_then(Value::as_str).ok_or_else(|| {
                        Error::bad_file(path, format!("model.vocab[{id}] is not a [token, score] pair"))
                    })?;
                    vocab.add(id as u64, tok)?;
                }
            }
            _ => return Err(Error::bad_file(path, "has no model.vocab object or list")),
        }
        if let Some(added) = added {
            let list = added.as_array().ok_or_else(|| Error::bad_file(path, "added_tokens is not a list"))?;
            for (i, t) in list.iter().enumerate() {
                let id = t.get("id").and_then(Value::as_u64);
                let content = t.get("content").and_then(Value::as_str);
                match (id, content) {
                    (Some(id), Some(c)) => vocab.add(id, c)?,
                    _ => {
                        return Err(Error::bad_file(
                            path,
                            format!("added_tokens[{i}] needs an integer 'id' and a string 'content'"),
                        ));
                    }
                }
            }
        }
        Ok(vocab)
    }

    fn add(&mut self, id: u64, token: &str) -> Result<()> {
        if id > MAX_TOKEN_ID {
            return Err(Error::bad_file(
                &self.path,
                format!("token {token:?} has id {id}, beyond the {MAX_TOKEN_ID} limit"),
            ));
        }
        let i = id as usize;
        if self.id_to_token.len() <= i {
            self.id_to_token.resize(i + 1, None);
        }
        match &self.id_to_token[i] {
            Some(prev) if prev != token => {
                return Err(Error::bad_file(
                    &self.path,
                    format!("token id {id} is given to both {prev:?} and {token:?}"),
                ));
            }
            _ => self.id_to_token[i] = Some(token.to_string()),
        }
        // The first id listed for a string wins: model.vocab before added_tokens.
        self.token_to_id.entry(token.to_string()).or_insert(id as u32);
        Ok(())
    }

    /// The token with id `id`.
    pub(crate) fn token(&self, id: u64) -> Option<&str> {
        self.id_to_token.get(id as usize).and_then(|t| t.as_deref())
    }

    /// The id of `token`.
    pub(crate) fn id(&self, token: &str) -> Option<u32> {
        self.token_to_id.get(token).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, v: Value) -> PathBuf {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    #[test]
    fn reads_bpe_and_added_tokens() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            serde_json::json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}},
                "added_tokens": [{"id": 5, "content": "<|eot_id|>"}]}),
        );
        let v = Vocab::read(&p).unwrap();
        assert_eq!(v.token(1), Some("b"));
        assert_eq!(v.token(3), None);
        assert_eq!(v.id("<|eot_id|>"), Some(5));
    }

    #[test]
    fn reads_unigram_lists() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            serde_json::json!({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["x", -1.5]]}}),
        );
        assert_eq!(Vocab::read(&p).unwrap().id("x"), Some(1));
    }

    #[test]
    fn rejects_conflicting_ids() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            serde_json::json!({"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 0, "content": "z"}]}),
        );
        let e = Vocab::read(&p).unwrap_err().to_string();
        assert!(e.contains("token id 0") && e.contains("tokenizer.json"), "{e}");
    }

    /// The parts around the vocabulary (merges, normalizer, decoder) are
    /// skipped, not lost: the ids are those of the file.
    #[test]
    fn reads_the_vocab_of_a_full_bpe_tokenizer() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            serde_json::json!({"version": "1.0", "truncation": null, "normalizer": {"type": "NFC"},
                "added_tokens": [{"id": 3, "content": "<s>", "special": true}],
                "decoder": {"type": "ByteLevel"},
                "model": {"type": "BPE", "dropout": null, "vocab": {"a": 0, "b": 1, "ab": 2},
                    "merges": [["a", "b"]], "ignore_merges": false}}),
        );
        let v = Vocab::read(&p).unwrap();
        assert_eq!((v.id("a"), v.id("b"), v.id("ab"), v.id("<s>")), (Some(0), Some(1), Some(2), Some(3)));
        assert_eq!(v.id_to_token.len(), 4);
    }

    #[test]
    fn rejects_missing_vocab_and_huge_ids() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), serde_json::json!({"model": {}}));
        assert!(Vocab::read(&p).unwrap_err().to_string().contains("no model.vocab"));
        // A model that is not an object at all: the same message.
        let p = write(d.path(), serde_json::json!({"model": "BPE"}));
        assert!(Vocab::read(&p).unwrap_err().to_string().contains("no model.vocab"));
        let p = write(d.path(), serde_json::json!({"model": {"vocab": {"a": 0}}, "added_tokens": {"id": 1}}));
        assert!(Vocab::read(&p).unwrap_err().to_string().contains("added_tokens is not a list"));
        let p = write(d.path(), serde_json::json!({"model": {"vocab": {"a": 99999999999u64}}}));
        assert!(Vocab::read(&p).unwrap_err().to_string().contains("limit"));
    }
}
