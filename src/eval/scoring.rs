//! From benchmark questions to grades: which answers the worker generates
//! (each question's samples, one per question where the benchmark answers
//! greedily), which judgments they need (one per turn), and the figures a
//! model gets: the mean grade with a 95% interval bootstrapped over
//! questions, per category and per turn.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use super::bench::{Benchmark, JudgeRequest};
use super::judge::{Judge, scores};
use super::ties::{self, Interval};
use crate::error::Result;
use crate::resolve::published::PublishedFile;

/// Seed of the bootstrap over questions.
const QUESTION_SEED: u64 = 0x7175_6573;

/// One answer the worker generates: question `question` of benchmark
/// `bench`, sample `sample`.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub bench: usize,
    pub question: usize,
    pub sample: usize,
}

/// The answers to generate for `samples` per question: every sample of a
/// sampled question; one of a greedy question (its samples would all be
/// the same answer, so that one stands for each).
pub(crate) fn items(benches: &[Benchmark], samples: usize) -> Vec<Item> {
    let mut out = Vec::new();
    for (b, bench) in benches.iter().enumerate() {
        for (q, question) in bench.questions.iter().enumerate() {
            let n = if bench.temperature_of(question) > 0.0 { samples } else { 1 };
            out.extend((0..n).map(|sample| Item { bench: b, question: q, sample }));
        }
    }
    out
}

/// What the worker is given for `items`: each one's turns, temperature
/// and seed (from the benchmark, question and sample, so the same answer
/// comes back on every run).
pub(crate) fn worker_items(benches: &[Benchmark], items: &[Item]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|it| {
                let b = &benches[it.bench];
                let q = &b.questions[it.question];
                let key = format!("{}\0{}\0{}", b.name, q.id, it.sample);
                let seed =
                    crate::rng::mix(key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
                        (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
                    })) & 0x7fff_ffff;
                json!({"turns": q.turns, "temperature": b.temperature_of(q), "seed": seed})
            })
            .collect(),
    )
}

/// How one benchmark was run, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct BenchInfo {
    /// Its name (`--bench`).
    pub name: String,
    /// Every file it was read from, with commit and sha256.
    pub files: Vec<PublishedFile>,
    /// Questions asked.
    pub questions: usize,
    /// Answers per question (sampled questions; greedy ones have one);
    /// none for lm_eval.
    pub samples: Option<usize>,
    /// The highest grade (judged benchmarks).
    pub top: Option<f64>,
    /// `judged` (graded by a judge model) or `lm_eval` (a task metric of
    /// lm-evaluation-harness).
    pub kind: &'static str,
    /// The judge model.
    pub judge_model: Option<String>,
    /// Where the judge was asked.
    pub judge_url: Option<String>,
    /// The engine that computed it, with its version (lm_eval).
    pub engine: Option<String>,
}

/// One grade.
#[derive(Clone, Debug, Serialize)]
pub struct Grade {
    /// The question's id.
    pub question: String,
    /// Its category.
    pub category: String,
    /// The answer's sample (0-based).
    pub sample: usize,
    /// 1-based.
    pub turn: usize,
    /// The answer graded (this turn's).
    pub answer: String,
    /// The judge's grade.
    pub score: f64,
}

/// A model's figures on one benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct BenchScore {
    /// The benchmark's name.
    pub bench: String,
    /// Mean grade over every judged turn.
    pub score: f64,
    /// Its 95% interval (bootstrap over questions; lm_eval's standard
    /// error x 1.96).
    pub interval: Option<Interval>,
    /// Whether more is better (every judged grade; lm_eval says per metric).
    pub higher_is_better: bool,
    /// Mean grade per category.
    pub categories: BTreeMap<String, f64>,
    /// Mean grade per turn (MT-Bench reports the first and second apart).
    pub turns: Vec<f64>,
    /// Every grade.
    pub grades: Vec<Grade>,
}

/// One judgment to make: model `model`'s answer to `item`, turn `turn`.
struct Need {
    model: usize,
    item: usize,
    sample: usize,
    turn: usize,
    answer: String,
}

/// Judges every model's answers (`answers[model][item]`: the answer per
/// turn) and gives each model's figures per benchmark. `names` label a
/// judgment that cannot be read.
pub(crate) fn grade(
    judge: &Judge,
    benches: &[Benchmark],
    items: &[Item],
    samples: usize,
    answers: &[Vec<Vec<String>>],
    names: &[String],
) -> Result<Vec<Vec<BenchScore>>> {
    let mut needs = Vec::new();
    let mut requests: Vec<JudgeRequest> = Vec::new();
    for (m, per_item) in answers.iter().enumerate() {
        for (i, it) in items.iter().enumerate() {
            let b = &benches[it.bench];
            let q = &b.questions[it.question];
            let turns = per_item.get(i).cloned().unwrap_or_default();
            // A greedy answer stands for every sample.
            let copies = if b.temperature_of(q) > 0.0 { it.sample..it.sample + 1 } else { 0..samples };
            for t in 0..q.turns.len() {
                let mut given = turns.clone();
                given.resize(q.turns.len(), String::new());
                let r = b.judge_request(q, &given, t)?;
                for sample in copies.clone() {
                    needs.push(Need { model: m, item: i, sample, turn: t, answer: given[t].clone() });
                    requests.push(r.clone());
                }
            }
        }
    }
    let started = std::time::Instant::now();
    // A line at every tenth (and at the end), so a long judging is never
    // silent, in a terminal or a log.
    let progress = |done: usize, all: usize| {
        if done == all || done * 10 / all.max(1) != (done - 1) * 10 / all.max(1) {
            crate::ui::note(&format!("eval: judged {done}/{all} ({:.1} s)", started.elapsed().as_secs_f64()));
        }
    };
    let judgments = judge.judge_all(&requests, &progress)?;
    let label = |i: usize| {
        let n = &needs[i];
        let it = &items[n.item];
        let b = &benches[it.bench];
        format!(
            "{} question {} turn {} sample {}, model {}",
            b.name,
            b.questions[it.question].id,
            n.turn + 1,
            n.sample + 1,
            names[n.model]
        )
    };
    let grades = scores(&requests, &judgments, &label)?;
    let mut out: Vec<Vec<BenchScore>> = Vec::new();
    for m in 0..answers.len() {
        let mut per_bench = Vec::new();
        for (bi, b) in benches.iter().enumerate() {
            let mut list = Vec::new();
            for (n, g) in needs.iter().zip(&grades) {
                let it = &items[n.item];
                if n.model != m || it.bench != bi {
                    continue;
                }
                let q = &b.questions[it.question];
                list.push(Grade {
                    question: q.id.clone(),
                    category: q.category.clone(),
                    sample: n.sample,
                    turn: n.turn + 1,
                    answer: n.answer.clone(),
                    score: *g,
                });
            }
            per_bench.push(summarize(&b.name, list));
        }
        out.push(per_bench);
    }
    Ok(out)
}

/// The figures of one model's grades on one benchmark.
fn summarize(bench: &str, grades: Vec<Grade>) -> BenchScore {
    let mean = |xs: &[f64]| if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 };
    let all: Vec<f64> = grades.iter().map(|g| g.score).collect();
    // Per question: the sum of its grades and their count, so the
    // bootstrap resamples questions and weights each by its judgments.
    let mut per_question: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut per_category: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut per_turn: Vec<Vec<f64>> = Vec::new();
    for g in &grades {
        let e = per_question.entry(g.question.as_str()).or_default();
        e.0 += g.score;
        e.1 += 1.0;
        per_category.entry(g.category.clone()).or_default().push(g.score);
        if per_turn.len() < g.turn {
            per_turn.resize(g.turn, Vec::new());
        }
        per_turn[g.turn - 1].push(g.score);
    }
    let items: Vec<(f64, f64)> = per_question.values().copied().collect();
    BenchScore {
        bench: bench.to_string(),
        score: mean(&all),
        interval: ties::ratio_interval(&items, QUESTION_SEED),
        higher_is_better: true,
        categories: per_category.into_iter().map(|(k, v)| (k, mean(&v))).collect(),
        turns: per_turn.iter().map(|v| mean(v)).collect(),
        grades,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(q: &str, cat: &str, turn: usize, score: f64) -> Grade {
        Grade { question: q.into(), category: cat.into(), sample: 0, turn, answer: String::new(), score }
    }

    /// The mean is over every judged turn; categories and turns are their
    /// own means; the interval holds the mean and spans the questions'.
    #[test]
    fn a_benchmark_score_is_the_mean_of_its_grades_with_category_and_turn_means() {
        let s = summarize(
            "b",
            vec![
                g("1", "math", 1, 2.0),
                g("1", "math", 2, 4.0),
                g("2", "writing", 1, 9.0),
                g("2", "writing", 2, 7.0),
            ],
        );
        assert!((s.score - 5.5).abs() < 1e-12);
        assert_eq!(s.categories["math"], 3.0);
        assert_eq!(s.categories["writing"], 8.0);
        assert_eq!(s.turns, [5.5, 5.5]);
        let iv = s.interval.unwrap();
        assert!(iv.low <= 5.5 && 5.5 <= iv.high && iv.low >= 3.0 && iv.high <= 8.0, "{iv:?}");
    }
}
