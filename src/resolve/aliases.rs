//! Model and chat-vector aliases: short names for Hub repos (`swallow-8b`)
//! and for (chat, pretrained) pairs (`llama3-instruct`). The built-in table
//! is `recipes/aliases.toml`, compiled in; a user file named by
//! `CHATVEC_ALIASES` (or `--aliases`) adds entries and replaces same-named
//! ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::{read_capped, toml_to_json};

const BUILTIN: &str = include_str!("../../recipes/aliases.toml");
pub(crate) const ALIASES_ENV: &str = "CHATVEC_ALIASES";
const MAX_ALIASES_BYTES: u64 = 1 << 20;

/// A model alias: a Hub repo and an optional revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ModelAlias {
    pub repo: String,
    pub revision: Option<String>,
}

impl ModelAlias {
    /// The Hub reference `repo[@revision]`.
    pub(crate) fn reference(&self) -> String {
        match &self.revision {
            Some(r) => format!("{}@{r}", self.repo),
            None => self.repo.clone(),
        }
    }
}

/// A chat vector alias: the models whose difference is the vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VectorAlias {
    pub chat: String,
    pub pretrained: String,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Aliases {
    pub models: BTreeMap<String, ModelAlias>,
    pub vectors: BTreeMap<String, VectorAlias>,
}

static USER_FILE: OnceLock<PathBuf> = OnceLock::new();
static LOADED: OnceLock<Aliases> = OnceLock::new();

/// Sets the user's aliases file (`--aliases`; default `$CHATVEC_ALIASES`),
/// before the first lookup.
pub fn set_user_file(p: PathBuf) {
    let _ = USER_FILE.set(p);
}

fn string(v: &Value, at: &str, file: &Path) -> Result<String> {
    v.as_str()
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
        .ok_or_else(|| Error::bad_file(file, format!("{at}: expected a non-empty string, not {v}")))
}

fn entries<'a>(
    root: &'a serde_json::Map<String, Value>,
    section: &str,
    keys: &[&str],
    file: &Path,
) -> Result<Vec<(&'a String, &'a serde_json::Map<String, Value>)>> {
    let Some(sec) = root.get(section) else { return Ok(Vec::new()) };
    let sec = sec.as_object().ok_or_else(|| Error::bad_file(file, format!("[{section}] must be a table")))?;
    let mut out = Vec::new();
    for (name, v) in sec {
        let m = v.as_object().ok_or_else(|| {
            Error::bad_file(
                file,
                format!("{section}.{name}: expected a table like {{ {} = \"...\" }}", keys[0]),
            )
        })?;
        if let Some(k) = m.keys().find(|k| !keys.contains(&k.as_str()) && k.as_str() != "note") {
            return Err(Error::bad_file(
                file,
                format!("{section}.{name}: unknown key '{k}' (expected {})", keys.join(", ")),
            ));
        }
        out.push((name, m));
    }
    Ok(out)
}

impl Aliases {
    /// Parses an aliases file's text.
    pub(crate) fn parse(text: &str, file: &Path) -> Result<Aliases> {
        let v = toml_to_json(text, file)?;
        let root = v.as_object().expect("a TOML document is a table");
        if let Some(k) = root.keys().find(|k| !matches!(k.as_str(), "models" | "vectors")) {
            return Err(Error::bad_file(
                file,
                format!("unknown section '{k}' (expected [models], [vectors])"),
            ));
        }
        let mut a = Aliases::default();
        for (name, m) in entries(root, "models", &["repo", "revision"], file)? {
            let repo = string(m.get("repo").unwrap_or(&Value::Null), &format!("models.{name}.repo"), file)?;
            if crate::resolve::hub_cache::parse_hub_id(&repo).is_none_or(|id| id.revision.is_some()) {
                return Err(Error::bad_file(
                    file,
                    format!("models.{name}.repo: '{repo}' is not a Hub repo id like org/name"),
                ));
            }
            let revision = match m.get("revision") {
                None => None,
                Some(r) => Some(string(r, &format!("models.{name}.revision"), file)?),
            };
            a.models.insert(name.clone(), ModelAlias { repo, revision });
        }
        for (name, m) in entries(root, "vectors", &["chat", "pretrained"], file)? {
            let get =
                |k: &str| string(m.get(k).unwrap_or(&Value::Null), &format!("vectors.{name}.{k}"), file);
            a.vectors
                .insert(name.clone(), VectorAlias { chat: get("chat")?, pretrained: get("pretrained")? });
        }
        Ok(a)
    }

    /// The built-in aliases, then the user's file over them.
    fn load() -> Result<Aliases> {
        let mut a = Aliases::parse(BUILTIN, Path::new("recipes/aliases.toml (built in)"))?;
        let user = USER_FILE.get().cloned().or_else(|| std::env::var_os(ALIASES_ENV).map(PathBuf::from));
        if let Some(p) = user {
            let text = read_capped(&p, MAX_ALIASES_BYTES)?;
            let text = String::from_utf8(text).map_err(|_| Error::bad_file(&p, "is not UTF-8"))?;
            let mine = Aliases::parse(&text, &p)?;
            a.models.extend(mine.models);
            a.vectors.extend(mine.vectors);
        }
        Ok(a)
    }

    /// The model and vector alias names closest to `name`, if any is a typo
    /// away (at most 2 edits, more for long names).
    pub(crate) fn closest(&self, name: &str) -> Vec<&str> {
        let mut scored: Vec<(usize, &str)> = self
            .models
            .keys()
            .chain(self.vectors.keys())
            .map(|k| (strsim::damerau_levenshtein(name, k), k.as_str()))
            .filter(|(d, k)| *d <= 2.max(k.len() / 5))
            .collect();
        scored.sort();
        let best = scored.first().map_or(0, |s| s.0);
        scored.into_iter().take_while(|(d, _)| *d == best).map(|(_, k)| k).collect()
    }

    /// The `n` aliases (model or vector) nearest to `name` by edit
    /// distance, however far.
    pub(crate) fn nearest(&self, name: &str, n: usize) -> Vec<&str> {
        let mut scored: Vec<(usize, &str)> = self
            .models
            .keys()
            .chain(self.vectors.keys())
            .map(|k| (strsim::damerau_levenshtein(name, k), k.as_str()))
            .collect();
        scored.sort();
        scored.into_iter().take(n).map(|(_, k)| k).collect()
    }

    /// The aliases in effect (loaded once).
    pub(crate) fn get() -> Result<&'static Aliases> {
        if let Some(a) = LOADED.get() {
            return Ok(a);
        }
        let a = Aliases::load()?;
        Ok(LOADED.get_or_init(|| a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_has_the_promised_names() {
        let a = Aliases::parse(BUILTIN, Path::new("aliases.toml")).unwrap();
        for m in [
            "swallow-8b",
            "swallow-70b",
            "swallow-7b",
            "llama3-8b",
            "llama3-8b-instruct",
            "llama3-70b",
            "llama3-70b-instruct",
            "llama2-70b",
            "llama2-70b-chat",
            "elyza-llama2-70b",
        ] {
            assert!(a.models.contains_key(m), "{m}");
        }
        for (v, pair) in &a.vectors {
            assert!(a.models.contains_key(&pair.chat) && a.models.contains_key(&pair.pretrained), "{v}");
        }
        assert_eq!(a.vectors["llama3-instruct"].chat, "llama3-8b-instruct");
        assert_eq!(a.models["swallow-8b"].reference(), "tokyotech-llm/Llama-3-Swallow-8B-v0.1");
    }

    #[test]
    fn bad_alias_files_name_the_entry() {
        let f = Path::new("mine.toml");
        let e = Aliases::parse("[models]\nx = { repo = \"a/b/c\" }\n", f).unwrap_err();
        assert!(e.to_string().contains("models.x.repo: 'a/b/c' is not a Hub repo id"), "{e}");
        let e = Aliases::parse("[vectors]\nv = { chat = \"a\" }\n", f).unwrap_err();
        assert!(e.to_string().contains("vectors.v.pretrained: expected a non-empty string"), "{e}");
        let e = Aliases::parse("[models]\nx = { repo = \"a/b\", rev = \"main\" }\n", f).unwrap_err();
        assert!(e.to_string().contains("unknown key 'rev'"), "{e}");
        let e = Aliases::parse("[model]\n", f).unwrap_err();
        assert!(e.to_string().contains("unknown section 'model'"), "{e}");
        let e = Aliases::parse("[models\n", f).unwrap_err();
        assert!(e.to_string().starts_with("mine.toml: "), "{e}");
    }

    #[test]
    fn typos_find_the_alias_meant() {
        let a = Aliases::parse(BUILTIN, Path::new("aliases.toml")).unwrap();
        assert_eq!(a.closest("swalow-8b"), vec!["swallow-8b"]);
        assert_eq!(a.closest("llama3-instrct"), vec!["llama3-instruct"]);
        assert!(a.closest("gpt2").is_empty());
    }
}
