//! The judged chat benchmarks the field reports (`--bench`): where each
//! one's questions, reference answers and judge prompts are published,
//! how they are read, and how an answer is graded. The files are the
//! benchmark's own, fetched through chatvec's downloader (`resolve::
//! published`) and recorded with their commit and sha256; `NAME=DIR` reads
//! the same files from a local directory, and a bare directory in
//! FastChat's `llm_judge` layout is a benchmark of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::resolve::published::{PublishedFile, hub_file, url_file};

/// Largest benchmark file read.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Where one file of a benchmark is published.
enum Source {
    /// A file of a Hub dataset repository.
    HubDataset { repo: &'static str, revision: &'static str, file: &'static str },
    /// A file at `{base}/{file}` (a repository's raw files at `revision`).
    Url { base: &'static str, revision: &'static str, file: &'static str },
}

impl Source {
    /// The file's name relative to the benchmark: how `NAME=DIR` finds it.
    fn file(&self) -> &'static str {
        match self {
            Source::HubDataset { file, .. } | Source::Url { file, .. } => file,
        }
    }

    fn fetch(&self, local: Option<&Path>) -> Result<PublishedFile> {
        if let Some(dir) = local {
            // The published layout under DIR, or a shorter tail of it
            // (`reference_answer/gpt-4.jsonl`, `question.jsonl`).
            let file = self.file();
            let tails = std::iter::once(file).chain(file.match_indices('/').map(|(i, _)| &file[i + 1..]));
            let found = tails.map(|t| dir.join(t)).find(|p| p.is_file());
            return local_file(&found.unwrap_or_else(|| dir.join(file)));
        }
        match self {
            Source::HubDataset { repo, revision, file } => hub_file(repo, revision, file, true),
            Source::Url { base, revision, file } => url_file(&format!("{base}/{file}"), revision),
        }
    }
}

/// A local benchmark file, recorded as it is.
fn local_file(path: &Path) -> Result<PublishedFile> {
    if !path.is_file() {
        return Err(Error::Usage(format!("benchmark file {} does not exist", path.display())));
    }
    Ok(PublishedFile {
        source: path.display().to_string(),
        revision: "local".into(),
        commit: None,
        sha256: crate::hash::sha256_file(path)?,
        path: path.to_path_buf(),
    })
}

/// How a benchmark's questions are written.
#[derive(Clone, Copy)]
enum Layout {
    /// FastChat `llm_judge`: `question.jsonl` with `turns`, reference
    /// answers as `{"question_id", "choices": [{"turns": [...]}]}`, judge
    /// prompts as `{"name", "system_prompt", "prompt_template"}`.
    FastChat,
    /// ELYZA-tasks-100's CSV: `input`, `output` (a model answer), `eval_aspect`.
    ElyzaCsv,
}

/// How answers are graded.
#[derive(Clone, Copy)]
enum Judging {
    /// MT-Bench's single-answer grading, 1-10 per turn: `single-v1` (or
    /// `single-math-v1` with the reference answer, for the categories that
    /// need one), `-multi-turn` for the second turn.
    MtBench,
    /// chatvec's rendering of ELYZA's published 5-point rubric: the
    /// question, its reference answer and its own grading notes.
    Elyza,
}

/// A benchmark chatvec knows by name.
struct Entry {
    name: &'static str,
    about: &'static str,
    questions: Source,
    references: Option<Source>,
    judge_prompts: Option<Source>,
    layout: Layout,
    judging: Judging,
    max_new_tokens: u64,
}

/// The longest answer per turn, in tokens, as FastChat's answer generation
/// allows it.
const ANSWER_TOKENS: u64 = 1024;

/// Stability AI's Japanese MT-Bench files, in their FastChat fork.
const JA_MT_BENCH: &str =
    "https://raw.githubusercontent.com/Stability-AI/FastChat/jp-stable/fastchat/llm_judge/data";

/// The catalog. Revisions are pinned to commits where the authors' files
/// have one to pin; the commit and sha256 actually read are recorded
/// either way.
fn catalog() -> [Entry; 3] {
    [
        Entry {
            name: "ja-mt-bench",
            about: "Japanese MT-Bench (Stability AI): 80 questions x 2 turns in 8 categories, each turn graded 1-10 by the judge with MT-Bench's Japanese judge prompts; math, reasoning and coding against the GPT-4 reference answers; FastChat's per-category temperatures",
            questions: Source::Url {
                base: JA_MT_BENCH,
                revision: "jp-stable",
                file: "japanese_mt_bench/question.jsonl",
            },
            references: Some(Source::Url {
                base: JA_MT_BENCH,
                revision: "jp-stable",
                file: "japanese_mt_bench/reference_answer/gpt-4.jsonl",
            }),
            judge_prompts: Some(Source::Url {
                base: JA_MT_BENCH,
                revision: "jp-stable",
                file: "judge_ja_prompts.jsonl",
            }),
            layout: Layout::FastChat,
            judging: Judging::MtBench,
            max_new_tokens: ANSWER_TOKENS,
        },
        Entry {
            name: "elyza-tasks-100",
            about: "ELYZA-tasks-100 (Hub dataset elyza/ELYZA-tasks-100): 100 Japanese instructions, one turn, greedy answers graded 1-5 against each task's reference answer and grading notes (chatvec's rendering of ELYZA's published rubric)",
            questions: Source::HubDataset {
                repo: "elyza/ELYZA-tasks-100",
                revision: "main",
                file: "test.csv",
            },
            references: None,
            judge_prompts: None,
            layout: Layout::ElyzaCsv,
            judging: Judging::Elyza,
            max_new_tokens: ANSWER_TOKENS,
        },
        Entry {
            name: "rakuda",
            about: "Rakuda v2 (YuzuAI): 40 questions on Japanese geography, politics, history and society, one turn, graded 1-10 with Japanese MT-Bench's single-answer judge prompt (the 10-point average reported for PLaMo and others)",
            questions: Source::Url {
                base: "https://raw.githubusercontent.com/yuzu-ai/japanese-llm-ranking/5ff3ca34b78f9f76ff83e67a1a02747b1dc98ba9/jrank/data",
                revision: "5ff3ca34b78f9f76ff83e67a1a02747b1dc98ba9",
                file: "rakuda_v2/questions.jsonl",
            },
            references: None,
            judge_prompts: Some(Source::Url {
                base: JA_MT_BENCH,
                revision: "jp-stable",
                file: "judge_ja_prompts.jsonl",
            }),
            layout: Layout::FastChat,
            judging: Judging::MtBench,
            max_new_tokens: ANSWER_TOKENS,
        },
    ]
}

/// `chatvec eval --list`: every benchmark by name, what it is and where
/// its files come from.
pub fn list() -> String {
    let mut out = String::from(
        "Judged benchmarks (chatvec eval --bench NAME[=DIR] --judge-url URL --judge-model NAME MODEL...):\n",
    );
    for e in catalog() {
        out.push_str(&format!("\n  {}\n    {}\n", e.name, e.about));
        for s in std::iter::once(&e.questions).chain(&e.references).chain(&e.judge_prompts) {
            let at = match s {
                Source::HubDataset { repo, revision, file } => {
                    format!("hf://datasets/{repo}/{file} @ {revision}")
                }
                Source::Url { base, file, .. } => format!("{base}/{file}"),
            };
            out.push_str(&format!("    file: {at}\n"));
        }
    }
    out.push_str(
        "\n  DIR (a directory): a benchmark in FastChat's llm_judge layout: question.jsonl, judge_prompts.jsonl\n    (or judge_ja_prompts.jsonl), reference_answer/*.jsonl when a category needs references; graded as MT-Bench.\n  NAME=DIR reads NAME's files from DIR under the names above (a mirror, or a copy for machines offline).\n",
    );
    out
}

/// One question.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Question {
    pub id: String,
    pub category: String,
    /// The user turns, in order.
    pub turns: Vec<String>,
    /// A reference answer per turn, where the benchmark has them.
    pub references: Vec<String>,
    /// The question's own grading notes (ELYZA's `eval_aspect`).
    pub aspect: Option<String>,
}

/// A judge prompt: a system message and a user template whose `{name}`
/// fields are filled (Python `str.format`: `{{` and `}}` are braces).
#[derive(Clone, Debug)]
pub(crate) struct JudgePrompt {
    pub name: String,
    pub system: String,
    pub template: String,
}

/// What a benchmark is made of, loaded.
pub(crate) struct Benchmark {
    pub name: String,
    pub questions: Vec<Question>,
    pub files: Vec<PublishedFile>,
    judging: Judging,
    prompts: BTreeMap<String, JudgePrompt>,
    pub max_new_tokens: u64,
}

/// The categories MT-Bench grades against a reference answer.
const REFERENCE_CATEGORIES: [&str; 3] = ["math", "reasoning", "coding"];

/// FastChat's sampling temperature per MT-Bench category (0 is greedy);
/// 0.7 for the rest.
pub(crate) fn temperature(category: &str) -> f64 {
    match category {
        "extraction" | "math" | "coding" | "reasoning" => 0.0,
        "stem" | "humanities" => 0.1,
        _ => 0.7,
    }
}

/// One request to the judge: what it is shown, and how its answer is read.
#[derive(Clone, Debug)]
pub(crate) struct JudgeRequest {
    pub system: String,
    pub user: String,
    /// The grades the judge may give.
    pub range: (f64, f64),
    pub grammar: ScoreGrammar,
}

/// How a judgment's score is written.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ScoreGrammar {
    /// `[[8]]` (else `[8]`), as MT-Bench asks.
    DoubleBrackets,
    /// A bare number, as ELYZA's rubric asks.
    BareNumber,
}

impl Benchmark {
    /// The highest grade.
    pub(crate) fn top(&self) -> f64 {
        match self.judging {
            Judging::MtBench => 10.0,
            Judging::Elyza => 5.0,
        }
    }

    /// The temperature answers to `q` are sampled at.
    pub(crate) fn temperature_of(&self, q: &Question) -> f64 {
        match self.judging {
            Judging::MtBench => temperature(&q.category),
            Judging::Elyza => 0.0,
        }
    }

    fn prompt(&self, name: &str) -> Result<&JudgePrompt> {
        self.prompts.get(name).ok_or_else(|| {
            Error::Usage(format!(
                "{}: the judge prompts have no '{name}' (they have {})",
                self.name,
                self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The request grading turn `turn` (0-based) of `answers` to `q`.
    pub(crate) fn judge_request(
        &self,
        q: &Question,
        answers: &[String],
        turn: usize,
    ) -> Result<JudgeRequest> {
        let mut fields: BTreeMap<&str, String> = BTreeMap::new();
        let (prompt, grammar, range) = match self.judging {
            Judging::MtBench => {
                let reference =
                    REFERENCE_CATEGORIES.contains(&q.category.as_str()) && !q.references.is_empty();
                let name = match (reference, turn) {
                    (false, 0) => "single-v1",
                    (true, 0) => "single-math-v1",
                    (false, _) => "single-v1-multi-turn",
                    (true, _) => "single-math-v1-multi-turn",
                };
                if turn == 0 {
                    fields.insert("question", q.turns[0].clone());
                    fields.insert("answer", answers[0].clone());
                    if reference {
                        fields.insert("ref_answer_1", q.references[0].clone());
                    }
                } else {
                    for (i, (t, a)) in q.turns.iter().zip(answers).enumerate().take(turn + 1) {
                        fields.insert(["question_1", "question_2", "question_3"][i.min(2)], t.clone());
                        fields.insert(["answer_1", "answer_2", "answer_3"][i.min(2)], a.clone());
                    }
                    if reference {
                        for (i, r) in q.references.iter().enumerate().take(turn + 1) {
                            fields.insert(
                                ["ref_answer_1", "ref_answer_2", "ref_answer_3"][i.min(2)],
                                r.clone(),
                            );
                        }
                    }
                }
                (self.prompt(name)?.clone(), ScoreGrammar::DoubleBrackets, (1.0, 10.0))
            }
            Judging::Elyza => {
                fields.insert("question", q.turns[0].clone());
                fields.insert("ref_answer_1", q.references.first().cloned().unwrap_or_default());
                fields.insert("eval_aspect", q.aspect.clone().unwrap_or_default());
                fields.insert("answer", answers[0].clone());
                (elyza_prompt(), ScoreGrammar::BareNumber, (1.0, 5.0))
            }
        };
        let user = fill(&prompt.template, &fields)
            .map_err(|why| Error::Usage(format!("{}: judge prompt '{}': {why}", self.name, prompt.name)))?;
        Ok(JudgeRequest { system: prompt.system, user, range, grammar })
    }
}

/// The score in a judgment, if it states one within `range`.
pub(crate) fn parse_score(text: &str, grammar: ScoreGrammar, range: (f64, f64)) -> Option<f64> {
    let patterns: &[&str] = match grammar {
        ScoreGrammar::DoubleBrackets => &[r"\[\[(\d+\.?\d*)\]\]", r"\[(\d+\.?\d*)\]"],
        ScoreGrammar::BareNumber => &[r"(?:^|[^0-9.])(\d+)(?:[^0-9.]|$)"],
    };
    for p in patterns {
        let re = Regex::new(p).ok()?;
        if let Some(c) = re.captures(text.trim()) {
            let v: f64 = c[1].parse().ok()?;
            return (range.0..=range.1).contains(&v).then_some(v);
        }
    }
    None
}

/// `template` with each `{name}` replaced by `fields[name]`; `{{` and
/// `}}` are literal braces. A field the template names that is not given
/// is an error.
fn fill(template: &str, fields: &BTreeMap<&str, String>) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push(tail.as_bytes()[0] as char);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err("a lone '}'".into());
        }
        let end = tail.find('}').ok_or("a '{' that is never closed")?;
        let name = &tail[1..end];
        let value =
            fields.get(name).ok_or_else(|| format!("names {{{name}}}, which this question does not have"))?;
        out.push_str(value);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// chatvec's judge prompt for ELYZA-tasks-100, written from ELYZA's
/// published rubric: a 1-5 grade, points off for unnatural Japanese, for
/// answering in another language, for factual slips, a grade of 2 for an
/// over-cautious refusal, and the task's own notes; the judge answers with
/// the number alone.
fn elyza_prompt() -> JudgePrompt {
    JudgePrompt {
        name: "chatvec-elyza-v1".into(),
        system: "あなたは日本語の回答を採点する公平な評価者です。".into(),
        template: "次の問題に対する言語モデルの回答を、正解例と採点基準に従って1から5の整数で採点してください。\n\n\
[問題]\n{question}\n\n[正解例]\n{ref_answer_1}\n\n\
[採点基準]\n\
- 5: 正しく、役に立つ\n- 4: 正しい\n- 3: 一部が正しく、一部が誤っている\n- 2: 誤っているが、方向は合っている\n- 1: 誤っている、または指示に従っていない\n\
減点: 日本語が不自然なら1点、日本語以外で答えていれば1点、事実と異なる内容を含めば1点を引く。安全を過度に気にして答えを拒んでいる場合は2点とする。回答が空なら1点とする。\n\n\
[この問題の採点基準]\n{eval_aspect}\n\n[言語モデルの回答]\n{answer}\n[回答ここまで]\n\n\
点数(1から5の整数)だけを出力してください。"
            .into(),
    }
}

/// A `--bench` argument: a catalog name, `NAME=DIR`, or a directory.
pub(crate) fn load(arg: &str) -> Result<Benchmark> {
    let (name, local) = match arg.split_once('=') {
        Some((n, d)) => (n, Some(PathBuf::from(d))),
        None => (arg, None),
    };
    if let Some(e) = catalog().into_iter().find(|e| e.name == name) {
        if let Some(d) = &local
            && !d.is_dir()
        {
            return Err(Error::Usage(format!("--bench {arg}: {} is not a directory", d.display())));
        }
        return load_entry(&e, local.as_deref());
    }
    let dir = Path::new(arg);
    if local.is_none() && dir.is_dir() {
        return load_dir(dir);
    }
    let names: Vec<&str> = catalog().iter().map(|e| e.name).collect();
    let near = names.iter().min_by_key(|n| strsim::levenshtein(n, name)).copied().unwrap_or("ja-mt-bench");
    Err(Error::Usage(format!("--bench {arg}: no such benchmark, and not a directory")).with_hint(format!(
        "did you mean {near}? `chatvec eval --list` shows them all ({})",
        names.join(", ")
    )))
}

fn load_entry(e: &Entry, local: Option<&Path>) -> Result<Benchmark> {
    let qf = e.questions.fetch(local)?;
    let mut files = vec![qf.clone()];
    let mut questions = match e.layout {
        Layout::FastChat => read_fastchat_questions(&qf.path)?,
        Layout::ElyzaCsv => read_elyza(&qf.path)?,
    };
    if let Some(r) = &e.references {
        let rf = r.fetch(local)?;
        attach_references(&mut questions, &rf.path)?;
        files.push(rf);
    }
    let prompts = match &e.judge_prompts {
        Some(p) => {
            let pf = p.fetch(local)?;
            let prompts = read_judge_prompts(&pf.path)?;
            files.push(pf);
            prompts
        }
        None => BTreeMap::new(),
    };
    let b = Benchmark {
        name: e.name.to_string(),
        questions,
        files,
        judging: e.judging,
        prompts,
        max_new_tokens: e.max_new_tokens,
    };
    b.check()?;
    Ok(b)
}

/// A directory in FastChat's `llm_judge` layout.
fn load_dir(dir: &Path) -> Result<Benchmark> {
    let qf = local_file(&dir.join("question.jsonl"))?;
    let mut questions = read_fastchat_questions(&qf.path)?;
    let mut files = vec![qf];
    let prompts_file = ["judge_prompts.jsonl", "judge_ja_prompts.jsonl"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Usage(format!(
                "benchmark directory {} has no judge_prompts.jsonl (or judge_ja_prompts.jsonl)",
                dir.display()
            ))
        })?;
    let pf = local_file(&prompts_file)?;
    let prompts = read_judge_prompts(&pf.path)?;
    files.push(pf);
    let refs = dir.join("reference_answer");
    if refs.is_dir() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&refs)
            .map_err(|e| Error::io("listing", &refs, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        found.sort();
        if let Some(first) = found.first() {
            let rf = local_file(first)?;
            attach_references(&mut questions, &rf.path)?;
            files.push(rf);
        }
    }
    let name = dir.file_name().map_or("benchmark".into(), |n| n.to_string_lossy().into_owned());
    let b = Benchmark {
        name,
        questions,
        files,
        judging: Judging::MtBench,
        prompts,
        max_new_tokens: ANSWER_TOKENS,
    };
    b.check()?;
    Ok(b)
}

impl Benchmark {
    /// Every question can be graded: the prompts it needs exist and name
    /// only fields it has (checked on a stand-in answer), before any model
    /// is loaded.
    fn check(&self) -> Result<()> {
        if self.questions.is_empty() {
            return Err(Error::Usage(format!("{}: the benchmark has no questions", self.name)));
        }
        for q in &self.questions {
            let answers = vec![String::new(); q.turns.len()];
            for t in 0..q.turns.len() {
                self.judge_request(q, &answers, t).map_err(|e| match e {
                    Error::Usage(m) => Error::Usage(format!("{m} (question {})", q.id)),
                    other => other,
                })?;
            }
        }
        Ok(())
    }
}

fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(crate::json::read_capped(path, MAX_FILE_BYTES)?)
        .map_err(|_| Error::bad_file(path, "is not UTF-8 text"))
}

/// JSON lines, each parsed, blank lines skipped; a bad one is named.
fn json_lines(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Value>(l)
                .map(|v| (i + 1, v))
                .map_err(|e| Error::bad_file(path, format!("line {}: bad JSON: {e}", i + 1)))
        })
        .collect()
}

/// A question id, written as a number or a string.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A list of non-empty strings.
fn strings(v: &Value) -> Option<Vec<String>> {
    let a = v.as_array()?;
    a.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().filter(|t| !t.is_empty())
}

fn read_fastchat_questions(path: &Path) -> Result<Vec<Question>> {
    let mut out: Vec<Question> = Vec::new();
    for (at, v) in json_lines(path)? {
        let bad = |why: &str| Error::bad_file(path, format!("line {at}: {why}"));
        let id = v.get("question_id").and_then(id_of).ok_or_else(|| bad("expected a question_id"))?;
        let turns = v
            .get("turns")
            .and_then(strings)
            .filter(|t| t.iter().all(|x| !x.trim().is_empty()))
            .ok_or_else(|| bad("expected \"turns\": a list of non-empty strings"))?;
        if turns.len() > 3 {
            return Err(bad("more than 3 turns"));
        }
        if out.iter().any(|q| q.id == id) {
            return Err(bad(&format!("question_id {id} appears twice")));
        }
        let category = v.get("category").and_then(Value::as_str).unwrap_or("general").to_string();
        let references = v.get("reference").and_then(strings).unwrap_or_default();
        out.push(Question { id, category, turns, references, aspect: None });
    }
    Ok(out)
}

/// Reference answers in FastChat's layout, joined to the questions by id.
fn attach_references(questions: &mut [Question], path: &Path) -> Result<()> {
    for (at, v) in json_lines(path)? {
        let bad = |why: &str| Error::bad_file(path, format!("line {at}: {why}"));
        let id = v.get("question_id").and_then(id_of).ok_or_else(|| bad("expected a question_id"))?;
        let turns = v
            .pointer("/choices/0/turns")
            .and_then(strings)
            .ok_or_else(|| bad("expected \"choices\": [{\"turns\": [...]}]"))?;
        if let Some(q) = questions.iter_mut().find(|q| q.id == id)
            && q.references.is_empty()
        {
            q.references = turns;
        }
    }
    Ok(())
}

fn read_judge_prompts(path: &Path) -> Result<BTreeMap<String, JudgePrompt>> {
    let mut out = BTreeMap::new();
    for (at, v) in json_lines(path)? {
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| Error::bad_file(path, format!("line {at}: expected a string \"{k}\"")))
        };
        let name = field("name")?;
        out.insert(
            name.clone(),
            JudgePrompt { name, system: field("system_prompt")?, template: field("prompt_template")? },
        );
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "holds no judge prompts"));
    }
    Ok(out)
}

/// ELYZA-tasks-100's `test.csv`: a header with `input`, `output` and
/// `eval_aspect`; questions are numbered from 1 in file order.
fn read_elyza(path: &Path) -> Result<Vec<Question>> {
    let text = read_text(path)?;
    let mut rd = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers = rd.headers().map_err(|e| Error::bad_file(path, format!("bad CSV header: {e}")))?.clone();
    let col = |name: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| {
            Error::bad_file(path, format!("has no '{name}' column (expected input, output, eval_aspect)"))
        })
    };
    let (input, output, aspect) = (col("input")?, col("output")?, col("eval_aspect")?);
    let mut out = Vec::new();
    for (i, rec) in rd.records().enumerate() {
        let rec = rec.map_err(|e| Error::bad_file(path, format!("record {}: {e}", i + 1)))?;
        let get = |c: usize| rec.get(c).unwrap_or_default().to_string();
        if get(input).trim().is_empty() {
            return Err(Error::bad_file(path, format!("record {}: empty input", i + 1)));
        }
        out.push(Question {
            id: (i + 1).to_string(),
            category: "tasks".into(),
            turns: vec![get(input)],
            references: vec![get(output)],
            aspect: Some(get(aspect)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_read_as_each_benchmark_writes_them_and_out_of_range_is_none() {
        let mt = ScoreGrammar::DoubleBrackets;
        assert_eq!(parse_score("良い回答です。評価: [[8]]", mt, (1.0, 10.0)), Some(8.0));
        assert_eq!(parse_score("Rating: [[7.5]]", mt, (1.0, 10.0)), Some(7.5));
        assert_eq!(parse_score("Rating: [6]", mt, (1.0, 10.0)), Some(6.0));
        assert_eq!(parse_score("Rating: [[11]]", mt, (1.0, 10.0)), None);
        assert_eq!(parse_score("no rating", mt, (1.0, 10.0)), None);
        let bare = ScoreGrammar::BareNumber;
        assert_eq!(parse_score("4", bare, (1.0, 5.0)), Some(4.0));
        assert_eq!(parse_score("4点", bare, (1.0, 5.0)), Some(4.0));
        assert_eq!(parse_score("評価: 3\n", bare, (1.0, 5.0)), Some(3.0));
        assert_eq!(parse_score("10", bare, (1.0, 5.0)), None);
        assert_eq!(parse_score("なし", bare, (1.0, 5.0)), None);
    }

    #[test]
    fn templates_fill_fields_keep_doubled_braces_and_name_a_missing_field() {
        let mut f = BTreeMap::new();
        f.insert("question", "Q".to_string());
        assert_eq!(fill("[{question}] {{x}}", &f).unwrap(), "[Q] {x}");
        let e = fill("{question} {answer}", &f).unwrap_err();
        assert!(e.contains("{answer}"), "{e}");
        assert!(fill("{question", &f).is_err());
    }

    #[test]
    fn fastchat_files_load_with_references_and_bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("mybench");
        std::fs::create_dir_all(dir.join("reference_answer")).unwrap();
        std::fs::write(
            dir.join("question.jsonl"),
            "{\"question_id\": 1, \"category\": \"math\", \"turns\": [\"1+1?\", \"2+2?\"]}\n{\"question_id\": 2, \"category\": \"writing\", \"turns\": [\"書いて\"]}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("reference_answer/gpt-4.jsonl"),
            "{\"question_id\": 1, \"choices\": [{\"index\": 0, \"turns\": [\"2\", \"4\"]}]}\n",
        )
        .unwrap();
        let prompts = [
            ("single-v1", "Q {question} A {answer}"),
            ("single-math-v1", "Q {question} R {ref_answer_1} A {answer}"),
            ("single-v1-multi-turn", "{question_1} {answer_1} {question_2} {answer_2}"),
            (
                "single-math-v1-multi-turn",
                "{question_1} {answer_1} {ref_answer_1} {question_2} {answer_2} {ref_answer_2}",
            ),
        ];
        let lines: Vec<String> = prompts
            .iter()
            .map(|(n, t)| {
                serde_json::json!({"name": n, "system_prompt": "S", "prompt_template": t}).to_string()
            })
            .collect();
        std::fs::write(dir.join("judge_prompts.jsonl"), lines.join("\n")).unwrap();
        let b = load(dir.to_str().unwrap()).unwrap();
        assert_eq!(b.name, "mybench");
        assert_eq!(b.questions[0].references, ["2", "4"]);
        assert_eq!(b.files.len(), 3);
        let a = vec!["two".to_string(), "four".to_string()];
        let r = b.judge_request(&b.questions[0], &a, 1).unwrap();
        assert_eq!(r.user, "1+1? two 2 2+2? four 4");
        let r = b.judge_request(&b.questions[1], &a, 0).unwrap();
        assert_eq!(r.user, "Q 書いて A two");
        std::fs::write(dir.join("question.jsonl"), "{\"question_id\": 1, \"turns\": []}\n").unwrap();
        let e = load(dir.to_str().unwrap()).err().unwrap().to_string();
        assert!(e.contains("question.jsonl") && e.contains("line 1") && e.contains("turns"), "{e}");
    }

    #[test]
    fn an_unknown_benchmark_says_the_nearest_name() {
        let e = load("ja-mt-bnch").err().unwrap();
        let text = format!("{e} {}", e.hint().unwrap_or_default());
        assert!(text.contains("did you mean ja-mt-bench"), "{text}");
    }

    #[test]
    fn elyza_csv_reads_quoted_multiline_fields() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::write(
            dir.join("test.csv"),
            "input,output,eval_aspect\n\"一行目\n二行目\",\"答え, です\",- 基準\n",
        )
        .unwrap();
        let b = load(&format!("elyza-tasks-100={}", dir.display())).unwrap();
        assert_eq!(b.questions[0].turns, ["一行目\n二行目"]);
        assert_eq!(b.questions[0].references, ["答え, です"]);
        let r = b.judge_request(&b.questions[0], &["x".to_string()], 0).unwrap();
        assert!(
            r.user.contains("答え, です") && r.user.contains("- 基準") && r.user.contains("\nx\n"),
            "{}",
            r.user
        );
        assert_eq!(b.files[0].revision, "local");
    }
}
