//! `--embeddings` (a chat_vector recipe's `parameters.embeddings`): what
//! happens to vocabulary-indexed matrices when the base's vocabulary
//! differs from the vector's; `plan::vocab` carries it out.

use std::fmt;

/// `--embeddings`: how vocabulary-indexed matrices (embed_tokens, lm_head)
/// are treated when the base's vocabulary differs from the vector's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingPolicy {
    /// `full` when shapes match, else `align` when both tokenizers are
    /// present, else `prefix` (with a warning).
    Auto,
    /// Every row; the shapes must match.
    Full,
    /// No row: embeddings are copied from the base.
    Skip,
    /// Row i gets vector row i, for the rows both have.
    Prefix,
    /// Rows are matched by token string through each model's tokenizer.json.
    Align,
}

impl EmbeddingPolicy {
    /// Every policy, in the order `--help` lists them.
    pub const ALL: [EmbeddingPolicy; 5] = [
        EmbeddingPolicy::Auto,
        EmbeddingPolicy::Full,
        EmbeddingPolicy::Skip,
        EmbeddingPolicy::Prefix,
        EmbeddingPolicy::Align,
    ];

    /// The name the command line and recipes use.
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingPolicy::Auto => "auto",
            EmbeddingPolicy::Full => "full",
            EmbeddingPolicy::Skip => "skip",
            EmbeddingPolicy::Prefix => "prefix",
            EmbeddingPolicy::Align => "align",
        }
    }
}

impl fmt::Display for EmbeddingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EmbeddingPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<EmbeddingPolicy, String> {
        EmbeddingPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("'{s}' is not one of auto, full, skip, prefix, align"))
    }
}
