//! Which embedding rows get the chat vector when the base model's vocabulary
//! differs from the vector's (e.g. original Swallow grew Llama 2's 32,000
//! tokens to 43,176). Rows for tokens the vector does not know stay as in
//! the base.

use crate::arith::rows::RowRun;
use crate::error::{Error, Result};
use crate::model::tokenizer::Vocab;
use crate::params::embeddings::EmbeddingPolicy;

/// How the rows of one vocabulary matrix were matched, as reported on
/// stderr, in `--json` and in the manifest.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EmbeddingReport {
    /// The matrix (with the model it came from, in merges).
    pub tensor: String,
    /// Rows of the output matrix.
    pub rows: u64,
    /// Rows that got the vector (or the model's rows).
    pub rows_with_vector: u64,
    /// The policy applied (never `auto`).
    pub policy: EmbeddingPolicy,
}

/// The outcome of matching rows for one matrix.
#[derive(Clone, Debug)]
pub(crate) struct RowMap {
    pub runs: Vec<RowRun>,
    /// The policy that was applied (never `auto`).
    pub how: EmbeddingPolicy,
    /// A warning to show the user, if the choice was a fallback.
    pub warning: Option<String>,
}

impl RowMap {
    /// Base rows that get a vector row.
    pub(crate) fn matched(&self) -> u64 {
        self.runs.iter().map(|r| r.rows).sum()
    }
}

/// Both sides' vocabularies, where tokenizer.json files exist.
pub(crate) struct Vocabs<'a> {
    pub base: Option<&'a Vocab>,
    pub vector: Option<&'a Vocab>,
}

/// Decides which rows of a `base_rows`-row base matrix get which of the
/// vector's `vector_rows` rows under `policy`. `tensor` is for messages.
pub(crate) fn match_rows(
    tensor: &str,
    policy: EmbeddingPolicy,
    base_rows: u64,
    vector_rows: u64,
    vocabs: &Vocabs<'_>,
) -> Result<RowMap> {
    let policy_used = match policy {
        EmbeddingPolicy::Auto if base_rows == vector_rows => EmbeddingPolicy::Full,
        EmbeddingPolicy::Auto if vocabs.base.is_some() && vocabs.vector.is_some() => EmbeddingPolicy::Align,
        EmbeddingPolicy::Auto => EmbeddingPolicy::Prefix,
        p => p,
    };
    let warning = (policy == EmbeddingPolicy::Auto && policy_used == EmbeddingPolicy::Prefix).then(|| {
        format!(
            "{tensor}: base has {base_rows} rows, vector {vector_rows}, and tokenizer.json is missing on one side; \
             matching rows by position (prefix). Check that the base vocabulary extends the vector's."
        )
    });
    let runs = match policy_used {
        EmbeddingPolicy::Full => {
            if base_rows != vector_rows {
                return Err(Error::Mismatch {
                    what: "--embeddings full needs the same vocabulary size".into(),
                    problems: vec![format!("{tensor}: base has {base_rows} rows, vector {vector_rows}")],
                }
                .with_hint("use --embeddings align (or prefix, or skip)"));
            }
            vec![RowRun { base_row: 0, vector_row: 0, rows: base_rows }]
        }
        EmbeddingPolicy::Skip => Vec::new(),
        // (`auto` was resolved to one of the others above.)
        EmbeddingPolicy::Prefix | EmbeddingPolicy::Auto => {
            vec![RowRun { base_row: 0, vector_row: 0, rows: base_rows.min(vector_rows) }]
        }
        EmbeddingPolicy::Align => {
            let (Some(bv), Some(vv)) = (vocabs.base, vocabs.vector) else {
                return Err(Error::Usage(format!(
                    "--embeddings align needs tokenizer.json for both the base and the vector's chat model ({tensor})"
                ))
                .with_hint("use --embeddings prefix if the base vocabulary extends the vector's"));
            };
            align_runs(base_rows, vector_rows, bv, vv)
        }
    };
    Ok(RowMap { runs: runs.into_iter().filter(|r| r.rows > 0).collect(), how: policy_used, warning })
}

/// Base row r takes vector row v when base token r's string is vector token
/// v and v is a row of the vector matrix. Consecutive pairs are merged into
/// runs so the executor can stream them.
fn align_runs(base_rows: u64, vector_rows: u64, base: &Vocab, vector: &Vocab) -> Vec<RowRun> {
    let mut runs: Vec<RowRun> = Vec::new();
    for r in 0..base_rows {
        let Some(v) = base.token(r).and_then(|t| vector.id(t)).map(u64::from) else {
            continue;
        };
        if v >= vector_rows {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.base_row + last.rows == r && last.vector_row + last.rows == v => {
                last.rows += 1
            }
            _ => runs.push(RowRun { base_row: r, vector_row: v, rows: 1 }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vocab(tokens: &[&str]) -> Vocab {
        Vocab {
            path: "t.json".into(),
            id_to_token: tokens.iter().map(|t| Some(t.to_string())).collect(),
            token_to_id: tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), i as u32))
                .collect::<HashMap<_, _>>(),
        }
    }

    #[test]
    fn auto_is_full_when_shapes_match() {
        let m = match_rows("e", EmbeddingPolicy::Auto, 5, 5, &Vocabs { base: None, vector: None }).unwrap();
        assert_eq!(m.how, EmbeddingPolicy::Full);
        assert_eq!(m.matched(), 5);
    }

    #[test]
    fn auto_falls_back_to_prefix_with_a_warning() {
        let m = match_rows("e", EmbeddingPolicy::Auto, 7, 5, &Vocabs { base: None, vector: None }).unwrap();
        assert_eq!(m.how, EmbeddingPolicy::Prefix);
        assert_eq!(m.runs, vec![RowRun { base_row: 0, vector_row: 0, rows: 5 }]);
        assert!(m.warning.is_some());
    }

    #[test]
    fn align_matches_by_string_and_merges_runs() {
        let b = vocab(&["a", "b", "new1", "c", "d", "new2"]);
        let v = vocab(&["a", "b", "c", "d", "e"]);
        let m = match_rows("e", EmbeddingPolicy::Auto, 6, 5, &Vocabs { base: Some(&b), vector: Some(&v) })
            .unwrap();
        assert_eq!(m.how, EmbeddingPolicy::Align);
        assert_eq!(
            m.runs,
            vec![
                RowRun { base_row: 0, vector_row: 0, rows: 2 },
                RowRun { base_row: 3, vector_row: 2, rows: 2 }
            ]
        );
        assert_eq!(m.matched(), 4);
    }

    #[test]
    fn align_ignores_tokens_beyond_the_vector_rows() {
        let b = vocab(&["a", "b"]);
        let v = vocab(&["x", "b", "a"]);
        let m = match_rows("e", EmbeddingPolicy::Align, 2, 2, &Vocabs { base: Some(&b), vector: Some(&v) })
            .unwrap();
        assert_eq!(m.runs, vec![RowRun { base_row: 1, vector_row: 1, rows: 1 }]);
    }

    #[test]
    fn full_refuses_different_sizes_and_align_needs_tokenizers() {
        let none = Vocabs { base: None, vector: None };
        assert!(match_rows("e", EmbeddingPolicy::Full, 6, 5, &none).is_err());
        assert!(match_rows("e", EmbeddingPolicy::Align, 6, 5, &none).is_err());
        assert!(match_rows("e", EmbeddingPolicy::Skip, 6, 5, &none).unwrap().runs.is_empty());
    }
}
