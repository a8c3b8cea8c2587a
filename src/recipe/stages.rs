//! mergekit-multimerge's form: one YAML config holding several merges as
//! documents separated by `---`. A document's `name:` names its output, an
//! intermediate merge that later documents use as a model by that name;
//! at most one document has no name, the final merge. The merges run in
//! dependency order (documents in file order where none depends on
//! another), each an ordinary mergekit config once its names are replaced
//! by the intermediates' directories.
//!
//! Names are replaced where a model goes (`model`, `base_model`,
//! `tokenizer_source`, a tokenizer `source`, and the plain strings of a
//! `models` list, `NAME+lora` included), not in other keys, so a merge
//! named like a method (`linear`) does not rewrite `merge_method`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::error::{Error, Result};
use crate::recipe::{Recipe, parse_recipe};

/// One merge of a multi-document config.
pub struct Stage {
    /// Its `name:` (None for the final merge).
    pub name: Option<String>,
    /// The merge, names replaced by the intermediates' directories.
    pub recipe: Recipe,
    /// The names of the earlier merges it reads.
    pub needs: Vec<String>,
}

/// Keys whose string values name a model.
const MODEL_KEYS: &[&str] = &["model", "base_model", "tokenizer_source", "source"];

/// The documents of a YAML config, or None when it holds one (or the
/// file is not YAML).
pub(crate) fn documents(text: &str, path: &Path) -> Result<Option<Vec<Value>>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext != "yml" && ext != "yaml" {
        return Ok(None);
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de)
            .map_err(|e| Error::bad_file(path, format!("YAML document {}: {e}", i + 1)))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok((docs.len() > 1).then_some(docs))
}

/// The merges of a multi-document config at `path`, in the order they
/// run, and the directory the intermediates are read from and written to
/// (`intermediate`, else `default_intermediate_dir` of `out`); None when
/// the file holds a single merge.
pub fn load_stages(
    path: &Path,
    out: &Path,
    intermediate: Option<&Path>,
) -> Result<Option<(Vec<Stage>, PathBuf)>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = crate::json::read_capped(path, super::MAX_RECIPE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "is not UTF-8 text"))?;
    let Some(docs) = documents(&text, path)? else { return Ok(None) };
    let mut named: Vec<(Option<String>, Value)> = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        let Value::Mapping(m) = &mut doc else {
            return Err(Error::bad_file(
                path,
                format!("YAML document {} is not a mapping of merge keys", i + 1),
            ));
        };
        let name = match m.remove("name") {
            None => None,
            Some(Value::String(s)) if valid_name(&s) => Some(s),
            Some(v) => {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "document {}: name {v:?} must be a plain directory name (letters, digits, '-', '_', '.', not '.' or '..')",
                        i + 1
                    ),
                ));
            }
        };
        if named.iter().any(|(n, _)| *n == name) {
            return Err(Error::bad_file(
                path,
                match &name {
                    Some(n) => format!("two documents are named '{n}'"),
                    None => "more than one document has no name: only the final merge may be unnamed".into(),
                },
            ));
        }
        named.push((name, doc));
    }
    let names: Vec<String> = named.iter().filter_map(|(n, _)| n.clone()).collect();
    let has_final = names.len() < named.len();
    let intermediate_dir =
        intermediate.map_or_else(|| default_intermediate_dir(out, has_final), Path::to_path_buf);
    let intermediate_dir = intermediate_dir.as_path();
    let mut stages: Vec<Stage> = Vec::new();
    for (name, mut doc) in named {
        let mut needs = Vec::new();
        patch(&mut doc, &names, intermediate_dir, false, &mut needs);
        needs.sort();
        needs.dedup();
        if let Some(n) = &name
            && needs.contains(n)
        {
            return Err(Error::bad_file(path, format!("merge '{n}' uses its own output")));
        }
        let text = serde_yaml_ng::to_string(&doc).map_err(|e| Error::Internal(format!("YAML: {e}")))?;
        let label = name.as_deref().unwrap_or("the final merge");
        let recipe = parse_recipe(&text, path).map_err(|e| e.with_hint(format!("in {label}")))?;
        stages.push(Stage { name, recipe, needs });
    }
    Ok(Some((order(stages, path)?, intermediate_dir.to_path_buf())))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 255
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Replaces merge names in model positions by their directories,
/// recording the names used.
fn patch(v: &mut Value, names: &[String], dir: &Path, model_position: bool, used: &mut Vec<String>) {
    match v {
        Value::String(s) if model_position => {
            let (head, tail) = match s.split_once('+') {
                Some((h, t)) => (h.to_string(), format!("+{t}")),
                None => (s.clone(), String::new()),
            };
            if names.contains(&head) {
                used.push(head.clone());
                *s = format!("{}{tail}", dir.join(&head).display());
            }
        }
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                let key = k.as_str().unwrap_or("");
                let is_model = MODEL_KEYS.contains(&key);
                // A `models:` list may hold plain model strings.
                let list_of_models = key == "models";
                match val {
                    Value::Sequence(items) if list_of_models => {
                        for it in items {
                            patch(it, names, dir, true, used);
                        }
                    }
                    _ => patch(val, names, dir, is_model, used),
                }
            }
        }
        Value::Sequence(items) => {
            for it in items {
                patch(it, names, dir, false, used);
            }
        }
        Value::Tagged(t) => patch(&mut t.value, names, dir, model_position, used),
        _ => {}
    }
}

/// The stages in dependency order (file order among independent ones);
/// a cycle is an error naming it.
fn order(stages: Vec<Stage>, path: &Path) -> Result<Vec<Stage>> {
    let index: BTreeMap<String, usize> =
        stages.iter().enumerate().filter_map(|(i, s)| s.name.clone().map(|n| (n, i))).collect();
    let mut state = vec![0u8; stages.len()]; // 0 new, 1 on the path, 2 done
    let mut out = Vec::with_capacity(stages.len());
    fn visit(
        i: usize,
        stages: &[Stage],
        index: &BTreeMap<String, usize>,
        state: &mut [u8],
        out: &mut Vec<usize>,
        path: &Path,
        trail: &mut Vec<String>,
    ) -> Result<()> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                return Err(Error::bad_file(
                    path,
                    format!("the merges depend on each other in a circle: {}", trail.join(" -> ")),
                ));
            }
            _ => {}
        }
        state[i] = 1;
        for n in &stages[i].needs {
            trail.push(n.clone());
            visit(index[n], stages, index, state, out, path, trail)?;
            trail.pop();
        }
        state[i] = 2;
        out.push(i);
        Ok(())
    }
    for i in 0..stages.len() {
        let mut trail = vec![stages[i].name.clone().unwrap_or_else(|| "final".into())];
        visit(i, &stages, &index, &mut state, &mut out, path, &mut trail)?;
    }
    let mut slots: Vec<Option<Stage>> = stages.into_iter().map(Some).collect();
    Ok(out.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// Where the intermediates go unless `--intermediate-dir` says: beside the
/// final output as `OUT-intermediates`, or, when every merge is named
/// (none is final), in `OUT` itself.
fn default_intermediate_dir(out: &Path, has_final: bool) -> PathBuf {
    if !has_final {
        return out.to_path_buf();
    }
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}-intermediates"))
}
