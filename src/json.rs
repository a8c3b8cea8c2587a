//! Reading untrusted files: regular files only (a FIFO would block
//! forever), a size cap, and JSON objects whose duplicate keys are an error
//! instead of silently keeping the last value (serde_json's default),
//! because a header or index that names a tensor twice is corrupt.

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
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

/// Opens `path` for reading if it is a regular file (after symlinks). It is
/// opened non-blocking, so a FIFO is refused instead of waiting forever for
/// a writer; reads from a regular file never block either way.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("opening", path, e))?;
    let meta = f.metadata().map_err(|e| Error::io("reading metadata of", path, e))?;
    if !meta.is_file() {
        return Err(Error::bad_file(
            path,
            "is not a regular file (a FIFO, socket, device or directory); chatvec reads regular files only",
        ));
    }
    Ok(f)
}

/// Reads a whole (small) regular file, refusing anything larger than `cap`
/// bytes.
pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut bytes = Vec::new();
    f.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io("reading", path, e))?;
    if bytes.len() as u64 > cap {
        return Err(Error::bad_file(
            path,
            format!("file is over {cap} bytes, the limit for this kind of file"),
        ));
    }
    Ok(bytes)
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
    let root = toml::Value::Table(table);
    refuse_non_finite(&root, file, &mut |v| match v {
        toml::Value::Float(x) => Walk::Number(*x),
        toml::Value::Table(t) => Walk::Map(t.iter().map(|(k, v)| (k.clone(), v)).collect()),
        toml::Value::Array(a) => Walk::List(a.iter().collect()),
        _ => Walk::Other,
    })?;
    serde_json::to_value(root).map_err(|e| Error::bad_file(file, e.to_string()))
}

/// A node of a TOML or YAML document, as `refuse_non_finite` walks it.
pub(crate) enum Walk<'a, T> {
    Number(f64),
    Map(Vec<(String, &'a T)>),
    List(Vec<&'a T>),
    Other,
}

/// Refuses a NaN or infinity anywhere in a document, naming its key path.
/// JSON has no such numbers: converted, they would become `null`, which a
/// default then fills (a `scale = nan` became 1.0), so they never get that
/// far.
pub(crate) fn refuse_non_finite<'a, T>(
    root: &'a T,
    file: &Path,
    node: &mut dyn FnMut(&'a T) -> Walk<'a, T>,
) -> Result<()> {
    let mut stack: Vec<(String, &'a T)> = vec![(String::new(), root)];
    while let Some((at, v)) = stack.pop() {
        let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
        match node(v) {
            Walk::Number(x) if !x.is_finite() => {
                return Err(Error::bad_file(
                    file,
                    format!("{at}: {x} is not a finite number (NaN and infinities are refused)"),
                ));
            }
            Walk::Map(entries) => stack.extend(entries.into_iter().rev().map(|(k, v)| (join(&k), v))),
            Walk::List(items) => {
                stack.extend(items.into_iter().enumerate().rev().map(|(i, v)| (format!("{at}[{i}]"), v)))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Writes `v` as pretty JSON with a trailing newline (the way transformers
/// writes its side files, so diffs against Python-written files stay small).
pub(crate) fn to_pretty(v: &impl serde::Serialize) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("JSON values always serialize");
    s.push(b'\n');
    s
}

/// A JSON object whose values keep their text exactly as written, so an
/// edit of one key leaves every other value, and every number in it, as it
/// was (serde_json's `Value` would turn a `model_max_length` of
/// 1000000000000000019884624838656 into `1e+30`). Keys stay in file order.
pub(crate) struct RawObject(Vec<(String, Box<serde_json::value::RawValue>)>);

impl RawObject {
    /// Parses a JSON object; `file` names it in errors.
    pub(crate) fn parse(bytes: &[u8], file: &Path) -> Result<RawObject> {
        let raw: raw_entries::RawEntries = serde_json::from_slice(bytes)
            .map_err(|e| Error::bad_file(file, format!("expected a JSON object: {e}")))?;
        Ok(RawObject(raw.0))
    }

    /// The value of `key`, parsed.
    pub(crate) fn get(&self, key: &str) -> Option<Value> {
        let (_, v) = self.0.iter().find(|(k, _)| k == key)?;
        serde_json::from_str(v.get()).ok()
    }

    /// Sets `key` to `value` (in place, or appended).
    pub(crate) fn set(&mut self, key: &str, value: &impl serde::Serialize) -> Result<()> {
        let raw = serde_json::value::to_raw_value(value).map_err(|e| Error::Internal(e.to_string()))?;
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = raw,
            None => self.0.push((key.to_string(), raw)),
        }
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub(crate) fn remove(&mut self, key: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(k, _)| k != key);
        self.0.len() != before
    }

    /// The keys, in the file's order.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.0.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Whether `key` is present.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// The object as JSON: one key per line, each value as it was written
    /// (or as set), and a trailing newline.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"{".to_vec();
        for (i, (k, v)) in self.0.iter().enumerate() {
            out.extend_from_slice(if i == 0 { b"\n  " } else { b",\n  " });
            out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.get().as_bytes());
        }
        out.extend_from_slice(if self.0.is_empty() { b"}\n" } else { b"\n}\n" });
        out
    }
}

mod raw_entries {
    //! The entries of a JSON object as raw text, in order.
    use std::fmt;

    use serde::de::{self, Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    pub(crate) struct RawEntries(pub Vec<(String, Box<RawValue>)>);

    impl<'de> de::Deserialize<'de> for RawEntries {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = RawEntries;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<RawEntries, A::Error> {
                    let mut out: Vec<(String, Box<RawValue>)> = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        if out.iter().any(|(k, _)| *k == key) {
                            return Err(de::Error::custom(format!("duplicate key '{key}'")));
                        }
                        out.push((key, map.next_value()?));
                    }
                    Ok(RawEntries(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}
