//! Reading untrusted JSON files: a size cap, and objects whose duplicate keys
//! are an error instead of silently keeping the last value (serde_json's
//! default), because a header or index that names a tensor twice is corrupt.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::error::{Error, Result};

/// The entries of a JSON object in file order, keys checked to be unique.
#[derive(Debug, Default)]
pub(crate) struct Entries(pub(crate) Vec<(String, Value)>);

impl<'de> de::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate key '{key}'")));
                    }
                    out.push((key, map.next_value::<Value>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads a whole (small) file, refusing anything larger than `cap` bytes.
pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
    if meta.len() > cap {
        return Err(Error::bad_file(
            path,
            format!("file is {} bytes; the limit for this kind of file is {cap}", meta.len()),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io("reading", path, e))
}

/// Reads and parses a JSON file of at most `cap` bytes into a `Value`.
pub(crate) fn read_value(path: &Path, cap: u64) -> Result<Value> {
    let bytes = read_capped(path, cap)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

/// Parses TOML text into a JSON value (the form the recipe and alias
/// readers work on); `file` is only used in messages.
pub(crate) fn toml_to_json(text: &str, file: &Path) -> Result<Value> {
    let table: toml::Table = toml::from_str(text).map_err(|e| Error::bad_file(file, e.to_string()))?;
    serde_json::to_value(table).map_err(|e| Error::bad_file(file, e.to_string()))
}

/// Writes `v` as pretty JSON with a trailing newline (the way transformers
/// writes its side files, so diffs against Python-written files stay small).
pub(crate) fn to_pretty(v: &impl serde::Serialize) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("JSON values always serialize");
    s.push(b'\n');
    s
}
