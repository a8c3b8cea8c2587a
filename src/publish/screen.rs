//! What may leave the machine. Before anything is sent, every entry of the
//! directory to push is looked at: a credential (a `.env`, a key file, a
//! token written into a config), training state (optimizer, scheduler and
//! RNG state, `training_args.bin`, checkpoints) and anything that is not a
//! plain file of the model (a link, a folder) is refused by name, all in one
//! error, so a user fixes the directory once. The model's own files are
//! then checked against its manifest by `verify` (in `job::push`).

use std::path::Path;
use std::sync::LazyLock;

use regex::bytes::Regex;

use crate::error::{Error, Result};

/// The most bytes of a file that is not a weight shard read for secrets:
/// as much as chatvec reads of any side file.
const SCAN_CAP: u64 = 256 << 20;

/// Names that hold credentials, whatever their content.
const CREDENTIAL_NAMES: &[&str] = &[
    ".env",
    ".env.*",
    "*.env",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    "token",
    "*.token",
    "credentials*",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
];

/// Names of training state: what the Trainer, accelerate, FSDP and
/// DeepSpeed save beside a model so a run can resume, and which a model
/// repository must not carry (optimizer state is twice the model's size,
/// and `training_args.bin` is a pickle).
const TRAINING_STATE: &[&str] = &[
    "optimizer*",
    "scheduler*.pt",
    "scaler.pt",
    "rng_state*",
    "random_states_*.pkl",
    "training_args.bin",
    "trainer_state.json",
    "*.distcp",
    "global_step*",
    "latest",
    "zero_to_fp32.py",
    "checkpoint-*",
    "checkpoints",
    "pytorch_model_fsdp*",
];

/// Secrets by their shape: Hugging Face, OpenAI, GitHub, AWS and
/// Slack tokens, and PEM private keys.
static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"hf_[A-Za-z0-9]{30,}",
        r"|\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}",
        r"|\bgh[pousr]_[A-Za-z0-9]{36,}",
        r"|\bAKIA[0-9A-Z]{16}\b",
        r"|\bxox[abpr]-[A-Za-z0-9-]{10,}",
        r"|-----BEGIN [A-Z ]*PRIVATE KEY-----",
    ))
    .expect("a valid pattern")
});

/// Whether `name` matches the shell pattern `pat` (`*` any run, the rest
/// literal), as the lists above are written.
fn matches(pat: &str, name: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return name == pat;
    }
    if !name.starts_with(first) || !name[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

/// What is wrong with one entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A file whose name says it holds credentials.
    Credential,
    /// A file whose content has a token or key in it (what kind).
    Secret(&'static str),
    /// Optimizer, scheduler or RNG state, training arguments, checkpoints.
    TrainingState,
    /// A symbolic link: it could point anywhere on the machine.
    Link,
    /// A folder, or anything but a plain file: not part of a model chatvec
    /// writes.
    NotAFile,
}

impl Refusal {
    fn reason(&self) -> String {
        match self {
            Refusal::Credential => "a credentials file".into(),
            Refusal::Secret(kind) => format!("holds {kind}"),
            Refusal::TrainingState => "training state, not part of the model".into(),
            Refusal::Link => {
                "a symbolic link (push sends plain files only, never what a link points to)".into()
            }
            Refusal::NotAFile => "a folder or special file, not part of the model".into(),
        }
    }
}

/// What a match of `SECRET` is, for the message (never the secret itself).
fn secret_kind(found: &[u8]) -> &'static str {
    match found {
        [b'h', b'f', b'_', ..] => "a Hugging Face token",
        [b's', b'k', b'-', ..] => "an OpenAI API key",
        [b'g', b'h', ..] => "a GitHub token",
        [b'A', b'K', b'I', b'A', ..] => "an AWS access key",
        [b'x', b'o', b'x', ..] => "a Slack token",
        _ => "a private key",
    }
}

/// The bytes of `path` to look for secrets in: a weight shard's header
/// (its metadata is free text), any other file whole up to `SCAN_CAP`.
fn scanned_bytes(path: &Path, name: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    if name.ends_with(".safetensors") {
        let mut len = [0u8; 8];
        if f.read_exact(&mut len).is_err() {
            return Ok(Vec::new());
        }
        let n = u64::from_le_bytes(len).min(100 << 20);
        let mut header = Vec::new();
        f.take(n).read_to_end(&mut header).map_err(|e| Error::io("reading", path, e))?;
        return Ok(header);
    }
    let mut bytes = Vec::new();
    f.take(SCAN_CAP).read_to_end(&mut bytes).map_err(|e| Error::io("reading", path, e))?;
    Ok(bytes)
}

/// Looks at every entry of `dir` and returns what must not be pushed, by
/// name, with the reason; `token` is the user's own token, looked for
/// verbatim as well.
pub(crate) fn refusals(dir: &Path, token: Option<&str>) -> Result<Vec<(String, Refusal)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io("listing", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let kind = e.file_type().map_err(|err| Error::io("reading the type of", &path, err))?;
        let refusal = if CREDENTIAL_NAMES.iter().any(|p| matches(p, &name)) {
            Some(Refusal::Credential)
        } else if TRAINING_STATE.iter().any(|p| matches(p, &name)) {
            Some(Refusal::TrainingState)
        } else if kind.is_symlink() {
            Some(Refusal::Link)
        } else if !kind.is_file() {
            Some(Refusal::NotAFile)
        } else {
            let bytes = scanned_bytes(&path, &name)?;
            let own = token.filter(|t| t.len() >= 8).and_then(|t| {
                bytes.windows(t.len()).any(|w| w == t.as_bytes()).then_some("your Hugging Face token")
            });
            own.or_else(|| SECRET.find(&bytes).map(|m| secret_kind(m.as_bytes()))).map(Refusal::Secret)
        };
        if let Some(r) = refusal {
            out.push((name, r));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The one error that names every refused entry of `dir`.
pub(crate) fn refused(dir: &Path, found: &[(String, Refusal)]) -> Error {
    Error::Mismatch {
        what: format!("refusing to push {}: it holds what must not be published", dir.display()),
        problems: found.iter().map(|(n, r)| format!("{}: {}", crate::ui::escaped(n, 200), r.reason())).collect(),
    }
    .with_hint("push the model's own folder (for sft, RUN/model); remove credentials and training state from it first")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_patterns_match_as_written() {
        assert!(matches("optimizer*", "optimizer.pt"));
        assert!(matches("*.distcp", "__0_0.distcp"));
        assert!(matches(".env.*", ".env.local"));
        assert!(matches("random_states_*.pkl", "random_states_0.pkl"));
        assert!(!matches("*.key", "key"));
        assert!(!matches("token", "tokenizer.json"));
        assert!(!matches("checkpoint-*", "model.safetensors"));
    }

    /// Each kind of secret is found by its shape and named for what it is;
    /// a tokenizer's ordinary vocabulary is not taken for one.
    #[test]
    fn secrets_are_found_by_shape_and_named() {
        let d = tempfile::tempdir().unwrap();
        let hf = format!("{{\"note\": \"hf_{}\"}}", "aB3".repeat(12));
        std::fs::write(d.path().join("config.json"), hf).unwrap();
        std::fs::write(
            d.path().join("notes.txt"),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("tokenizer.json"),
            r#"{"vocab": {"hf_": 1, "sk-learn": 2, "token": 3}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("generation_config.json"), "{\"mine\": \"abc12345xyz\"}").unwrap();
        let found = refusals(d.path(), Some("abc12345xyz")).unwrap();
        assert_eq!(
            found,
            vec![
                ("config.json".into(), Refusal::Secret("a Hugging Face token")),
                ("generation_config.json".into(), Refusal::Secret("your Hugging Face token")),
                ("notes.txt".into(), Refusal::Secret("a private key")),
            ]
        );
    }
}
