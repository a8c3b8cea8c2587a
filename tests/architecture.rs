//! The layout keeps the design's promise: imports only run downward. Each
//! room of the library (a top-level module of src/, a folder per design
//! box) may import only rooms listed below it in `LAYERS`, and no module
//! (file) imports itself back through others. The binary (src/main.rs,
//! src/cli/) sees only the library's public API, so it is not checked here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's rooms, lowest first; a room may import rooms of lower
/// layers only. Rooms in one layer do not import each other.
const LAYERS: &[&[&str]] = &[
    &["units"],
    &["error", "ui"],
    &["interrupt", "json", "scratch", "rng", "svg"],
    &["hash", "python"],
    &["model"],
    &["params", "resolve", "arith", "factor"],
    &["merge"],
    &["plan"],
    &["output"],
    &["cuda"],
    &["exec"],
    &["sft", "analyze", "publish"],
    &["eval"],
    &["recipe"],
    &["job", "fuzzing"],
];

fn layer_of(room: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&room))
}

/// Every library source file, as (module path, file).
fn modules() -> Vec<(Vec<String>, PathBuf)> {
    fn walk(dir: &Path, prefix: &[String], out: &mut Vec<(Vec<String>, PathBuf)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if prefix.is_empty() && name == "cli" {
                    continue;
                }
                let mut next = prefix.to_vec();
                next.push(name);
                walk(&p, &next, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                if prefix.is_empty() && (name == "main" || name == "lib") {
                    continue;
                }
                let mut m = prefix.to_vec();
                if name != "mod" {
                    m.push(name);
                }
                out.push((m, p));
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &[], &mut out);
    out
}

/// The module paths `text` (the source of module `me`) refers to through
/// `crate::` and `super::`, without its tests.
fn references(me: &[String], text: &str) -> Vec<Vec<String>> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    let word = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').count();
    for (i, _) in code.match_indices("crate::") {
        let mut path = Vec::new();
        let mut rest = &code[i + "crate::".len()..];
        loop {
            let n = word(rest);
            if n == 0 {
                break;
            }
            path.push(rest[..n].to_string());
            match rest[n..].strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        out.push(path);
    }
    for (i, _) in code.match_indices("super::") {
        if code[..i].ends_with("super::") {
            continue; // counted with the first `super::` of the run
        }
        // Each `super` goes one module up (a folder's mod.rs is the folder).
        let mut base: Vec<String> = me.to_vec();
        let mut rest = &code[i..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        let n = word(rest);
        if n > 0 {
            base.push(rest[..n].to_string());
        }
        out.push(base);
    }
    out
}

#[test]
fn rooms_import_only_rooms_below_them() {
    let mut bad = BTreeSet::new();
    for (m, file) in modules() {
        let room = &m[0];
        let Some(mine) = layer_of(room) else {
            panic!("{} is in room '{room}', which LAYERS does not place", file.display());
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for r in references(&m, &text) {
            let Some(target) = r.first() else { continue };
            if target == room {
                continue;
            }
            match layer_of(target) {
                Some(l) if l < mine => {}
                _ => {
                    bad.insert(format!("{} ({room}) imports crate::{}", file.display(), r.join("::")));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that run upward or sideways:\n{}",
        bad.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_module_imports_itself_back() {
    let mods = modules();
    let known: BTreeSet<Vec<String>> = mods.iter().map(|(m, _)| m.clone()).collect();
    // Module -> the longest known module prefix of each path it refers to.
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        let edges = graph.entry(m.clone()).or_default();
        for r in references(m, &text) {
            let target = (1..=r.len()).rev().map(|n| r[..n].to_vec()).find(|p| known.contains(p));
            if let Some(t) = target.filter(|t| t != m) {
                edges.insert(t);
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        n: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut cycle = stack[at..].to_vec();
                cycle.push(n.clone());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, &graph, &mut state, &mut Vec::new()) {
            let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            panic!("import circle: {}", names.join(" -> "));
        }
    }
}

/// Helpers that moved to the room they belong to are imported from there
/// only: layer naming from `model::layers`, selections and scales from
/// `params`, where and how to write from `output::Destination` and
/// `exec::RunOptions`.
#[test]
fn moved_helpers_are_imported_from_their_rooms() {
    const GONE: &[(&str, &str)] = &[
        ("merge::params::layer_index", "model::layers::layer_index"),
        ("merge::params::layer_position", "model::layers::layer_position"),
        ("merge::params::interpolate", "model::layers::interpolate"),
        ("plan::checks::layers_of", "model::layers::layers_of"),
        ("plan::select", "params::select"),
        ("plan::EmbeddingPolicy", "params::embeddings::EmbeddingPolicy"),
        ("plan::vocab::EmbeddingPolicy", "params::embeddings::EmbeddingPolicy"),
        ("WriteOptions", "output::Destination and exec::RunOptions"),
        ("ScaleOverride", "plan::Plan::scales"),
        ("with_probes", "resolve::Fetch::probes, passed down"),
        ("merge::rng", "rng"),
        ("analyze::plot::xml", "svg::xml"),
        ("set_silent", "ui::hushed, scoped to a call"),
        ("static PROBING", "resolve::Fetch"),
    ];
    let mut bad = Vec::new();
    for (_, file) in modules() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (old, new) in GONE {
            if text.contains(old) {
                bad.push(format!("{} names {old}; use {new}", file.display()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Only `output/` writes into an output directory: the executor streams
/// shards through the files `OutputDir::create_shard` hands it, and the
/// job room creates, finishes and commits directories through `output`'s
/// API, never by path.
#[test]
fn only_output_writes_into_output_directories() {
    let mut bad = Vec::new();
    for (m, file) in modules() {
        if m[0] == "output" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
        for needle in
            ["SyncedFile::create", "INDEX_FILE, &", "MANIFEST_FILE, &", "\"sweep.json\"", "OutputDir::path"]
        {
            if code.contains(needle) {
                bad.push(format!("{} writes `{needle}` itself", file.display()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The code of every source file of the crate, the binary's included,
/// without tests and line comments: where option defaults could be
/// written.
fn code_files() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
                let code: Vec<&str> = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
                out.push((p, code.join("\n")));
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

/// Each option default is written once, where its type defines it: the
/// command line, recipes and specs read it from there. (The 5 GB shard
/// size was once written three times.)
#[test]
fn no_option_default_is_written_twice() {
    let once: &[(&str, &str)] = &[
        (r#""5GB"|5_000_000_000|\b5000000000\b|5e9"#, "src/params/apply.rs"),
        (r"lr: \d", "src/sft/options.rs"),
        (r"warmup_ratio: \d", "src/sft/options.rs"),
        (r#"scheduler: ""#, "src/sft/options.rs"),
        (r"master_port: \d", "src/sft/options.rs"),
        (r"grad_accum: \d", "src/sft/options.rs"),
        (r"max_new_tokens: \d", "src/eval/mod.rs"),
        (r"\bsamples: \d", "src/eval/mod.rs"),
        (r"bench_samples: \d", "src/eval/mod.rs"),
        (r"judge_concurrency: \d", "src/eval/mod.rs"),
        (r#"judge_key_env: ""#, "src/eval/mod.rs"),
        (r"ANSWER_TOKENS: u64 = \d", "src/eval/bench.rs"),
        (r#"engine: "auto""#, "src/eval/mod.rs"),
        (r"chunk_elems: DEFAULT_CHUNK_ELEMS", "src/exec/mod.rs"),
    ];
    let never = [r#"default_value = "auto""#, r"default_value_t = \d", r"unwrap_or\(128\)"];
    let files = code_files();
    let mut bad = Vec::new();
    for (pattern, home) in once {
        let re = regex::Regex::new(pattern).unwrap();
        let found: Vec<String> = files
            .iter()
            .flat_map(|(p, code)| re.find_iter(code).map(move |_| p.display().to_string()))
            .collect();
        if found.len() != 1 || !found[0].ends_with(home) {
            bad.push(format!("{pattern}: written in {found:?}, expected once in {home}"));
        }
    }
    for pattern in never {
        let re = regex::Regex::new(pattern).unwrap();
        for (p, code) in &files {
            if re.is_match(code) {
                bad.push(format!("{}: a default written in place ({pattern})", p.display()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The CUDA kernels' comments name the CPU code each must match bit for
/// bit (`src/merge/lanes.rs LANES`); after files move into rooms those
/// names must follow, or whoever checks a kernel reads the wrong code.
/// Every `src/...rs` or `kernels/...` path named in a kernel or in
/// `src/cuda/`, and every item named right after one, exists.
#[test]
fn every_file_a_kernel_comment_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
        .unwrap()
        .chain(std::fs::read_dir(root.join("src/cuda")).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut named = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines().filter(|l| l.trim_start().starts_with("//")) {
            let words: Vec<&str> = line
                .split(|c: char| c.is_whitespace() || "(),;:`".contains(c))
                .filter(|w| !w.is_empty())
                .collect();
            for (i, w) in words.iter().enumerate() {
                let w = w.trim_end_matches('.');
                let source = w.starts_with("src/") && w.ends_with(".rs");
                let kernel = w.starts_with("kernels/") && !w.contains('*');
                if !(source || kernel) {
                    continue;
                }
                let path = root.join(w);
                named += 1;
                assert!(path.exists(), "{}: names {w}, which does not exist", f.display());
                // An item named right after the file (`src/merge/lanes.rs LANES`).
                if let Some(item) =
                    words.get(i + 1).filter(|n| n.chars().all(|c| c.is_alphanumeric() || c == '_'))
                    && item.contains('_') | item.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                {
                    let src = std::fs::read_to_string(&path).unwrap();
                    assert!(
                        src.contains(*item),
                        "{}: names {w} {item}, which {w} does not hold",
                        f.display()
                    );
                }
            }
        }
    }
    assert!(named >= 10, "only {named} paths named: the scan is not reading the comments");
}
