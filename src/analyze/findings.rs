//! Pair checks: what makes a subtraction meaningless or a vector suspect,
//! stated as findings with a reason, from the configs and the sums of the
//! pass.
//!
//! - config differences between the chat and pretrained models (rope,
//!   vocabulary, shapes, tying): they were not tuned from one another;
//! - relative norms far outside what fine-tuning produces (a chat vector
//!   changes a matrix by about 0.1% to 5% of its norm; a whole model given
//!   as a vector is about 100%, two unrelated models about 140%);
//! - embedding and lm_head changes confined to, or concentrated on, a few
//!   rows, named by their tokens; rows untrained in the pretrained model
//!   (as Llama 3's `<|eot_id|>` is in the base) that the vector trains.

use serde::Serialize;

use super::figures::{Figures, Sums};
use super::{Inputs, Side, TensorResult};
use crate::model::checkpoint::{Checkpoint, is_vocab_matrix};
use crate::model::config::architecture_differences;
use crate::model::tokenizer::Vocab;

/// Above this `||v|| / ||W||` a vector is not a fine-tune's difference.
pub(crate) const WHOLE_MODEL_RATIO: f64 = 0.5;
/// A whole vector's relative norm above this (twice the top of what
/// fine-tuning gives, 0.1% to 5%) is unusual and said.
const UNUSUAL_RATIO: f64 = 0.10;
/// A row is untrained when its squared norm is below this share of the
/// median row's.
const UNTRAINED_SHARE: f64 = 1e-6;
/// Rows named in a finding, at most.
const SHOWN: usize = 8;

/// One pair check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// `error` (the vector is not what it should be), `warning` (apply
    /// with care) or `note`.
    pub severity: &'static str,
    /// What was found.
    pub what: String,
    /// Why it matters.
    pub why: String,
}

fn finding(severity: &'static str, what: String, why: &str) -> Finding {
    Finding { severity, what, why: why.to_string() }
}

/// Config differences between two checkpoints, as findings.
fn config_findings(
    a: &Checkpoint,
    b: &Checkpoint,
    severity: &'static str,
    why: &str,
    out: &mut Vec<Finding>,
) {
    if let (Some(ca), Some(cb)) = (&a.config, &b.config) {
        for d in architecture_differences(ca, cb) {
            out.push(finding(severity, d, why));
        }
    }
}

/// `name (id)` for each row, from the vocabulary when known.
fn tokens(rows: &[usize], vocab: Option<&Vocab>) -> String {
    let shown: Vec<String> = rows
        .iter()
        .take(SHOWN)
        .map(|&r| match vocab.and_then(|v| v.token(r as u64)) {
            Some(t) => format!("{} ({r})", crate::ui::escaped(t, 200)),
            None => format!("row {r}"),
        })
        .collect();
    let more = rows.len().saturating_sub(SHOWN);
    if more > 0 { format!("{} and {more} more", shown.join(", ")) } else { shown.join(", ") }
}

/// Checks of one vocabulary matrix's rows.
fn row_findings(r: &TensorResult, vocab: Option<&Vocab>, base_has_rows: bool, out: &mut Vec<Finding>) {
    let vv = &r.rows.vv;
    let total: f64 = vv.iter().sum();
    if vv.is_empty() || total <= 0.0 {
        return;
    }
    let changed: Vec<usize> = (0..vv.len()).filter(|&i| vv[i] > 0.0).collect();
    let one_percent = (vv.len() / 100).max(1);
    if changed.len() <= one_percent {
        out.push(finding(
            "note",
            format!(
                "'{}': only {} of {} rows differ: {}",
                r.name,
                changed.len(),
                vv.len(),
                tokens(&changed, vocab)
            ),
            "the chat model changed these tokens' rows and nothing else (added or special tokens); the rest of the matrix is the pretrained one",
        ));
    } else {
        let mut order: Vec<usize> = (0..vv.len()).collect();
        order.sort_by(|&a, &b| vv[b].total_cmp(&vv[a]).then(a.cmp(&b)));
        let top = &order[..one_percent];
        let share: f64 = top.iter().map(|&i| vv[i]).sum::<f64>() / total;
        if share > 0.5 {
            out.push(finding(
                "note",
                format!(
                    "'{}': {:.0}% of the change is in {} rows (1% of {}): {}",
                    r.name,
                    100.0 * share,
                    top.len(),
                    vv.len(),
                    tokens(top, vocab)
                ),
                "the change is concentrated on a few tokens, typically the chat template's special tokens; these rows decide whether the merged model ends its turns",
            ));
        }
    }
    // Rows the pretrained model never trained (norm about zero), which the
    // vector sets.
    if r.rows.pre.len() == vv.len() {
        let mut sorted: Vec<f64> = r.rows.pre.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let untrained: Vec<usize> =
            (0..vv.len()).filter(|&i| r.rows.pre[i] <= UNTRAINED_SHARE * median && vv[i] > 0.0).collect();
        if !untrained.is_empty() {
            let in_base = if base_has_rows {
                let b = &r.rows.base;
                let bm = {
                    let mut s = b.clone();
                    s.sort_by(f64::total_cmp);
                    s.get(s.len() / 2).copied().unwrap_or(0.0)
                };
                let also: Vec<usize> = untrained
                    .iter()
                    .copied()
                    .filter(|&i| b.get(i).is_some_and(|x| *x <= UNTRAINED_SHARE * bm))
                    .collect();
                format!("; in the base, {} of them are untrained too", also.len())
            } else {
                String::new()
            };
            out.push(finding(
                "note",
                format!(
                    "'{}': {} row(s) are untrained in the pretrained model and set by the vector: {}{in_base}",
                    r.name,
                    untrained.len(),
                    tokens(&untrained, vocab)
                ),
                "a base continued from the same pretrained model has these rows untrained as well (Llama 3's <|eot_id|>); applying the vector to lm_head and the embeddings is what gives it working turn ends",
            ));
        }
    }
}

/// Every finding, worst first.
pub(crate) fn findings(
    inp: &Inputs<'_>,
    results: &[TensorResult],
    overall: &Figures,
    skipped: &[(String, String)],
    vocab: Option<&Vocab>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Side::Pair { chat, pre } = inp.vector {
        config_findings(
            chat,
            pre,
            "error",
            "a chat vector is the difference between a model and its own fine-tune; models with other RoPE, vocabulary or shape settings were not tuned from one another, so their difference is not chat ability",
            &mut out,
        );
    }
    if let Some(Side::Pair { chat, pre }) = inp.against {
        config_findings(
            chat,
            pre,
            "error",
            "the --against pair was not tuned from one another either",
            &mut out,
        );
    }
    if let Some(b) = inp.base {
        config_findings(
            inp.vector.primary(),
            b,
            "warning",
            "the vector was taken on another architecture than the base; apply refuses this unless --allow-mismatch",
            &mut out,
        );
    }
    if results.iter().all(|r| r.sums.vv == 0.0) && !results.is_empty() {
        out.push(finding(
            "error",
            "the vector is zero in every tensor".into(),
            "the chat and pretrained models are the same weights; applying it changes nothing",
        ));
    }
    // Relative norms: the whole vector, and matrices one by one.
    let rel = overall.rel_norm_pretrained.map(|r| (r, "the pretrained model")).or_else(|| {
        matches!(inp.vector, Side::Stored(_))
            .then_some(overall.rel_norm_base.map(|r| (r, "the base")))
            .flatten()
    });
    if let Some((r, against)) = rel
        && r > WHOLE_MODEL_RATIO
    {
        out.push(finding(
            "error",
            format!("||v|| / ||W|| is {:.0}% over the whole vector, against {against}", 100.0 * r),
            "fine-tuning changes weights by about 0.1% to 5% of their norm; about 100% is a whole model given as a vector, about 140% two unrelated models",
        ));
    } else {
        if let Some((r, against)) = rel
            && r > UNUSUAL_RATIO
        {
            out.push(finding(
                "warning",
                format!(
                    "||v|| / ||W|| is {:.0}% over the whole vector, against {against}: well above the 0.1% to 5% fine-tuning gives",
                    100.0 * r
                ),
                "an instruct model differs from its own base by a few percent; this much is a long further training (another language, a merge) or a pair that is not a model and its fine-tune: check the pair, or apply it at a lower --scale",
            ));
        }
        let big: Vec<&TensorResult> = results
            .iter()
            .filter(|t| t.shape.len() == 2 && !is_vocab_matrix(&t.name))
            .filter(|t| rel_of(&t.sums, inp).is_some_and(|x| x > WHOLE_MODEL_RATIO))
            .collect();
        if let Some(first) = big.first() {
            out.push(finding(
                "warning",
                format!(
                    "{} matrices change by more than {:.0}% of their norm, e.g. '{}' by {:.0}%",
                    big.len(),
                    100.0 * WHOLE_MODEL_RATIO,
                    first.name,
                    100.0 * rel_of(&first.sums, inp).unwrap_or(0.0)
                ),
                "far outside what fine-tuning produces; those tensors were replaced or retrained, not tuned",
            ));
        }
    }
    for (name, why) in skipped {
        out.push(finding(
            if is_vocab_matrix(name) { "warning" } else { "error" },
            format!("'{name}' is left out: {why}"),
            if is_vocab_matrix(name) {
                "the vocabularies differ, so rows of this matrix do not correspond token for token"
            } else {
                "the models do not have the same tensors, so they are not one model and its fine-tune"
            },
        ));
    }
    for r in results.iter().filter(|r| is_vocab_matrix(&r.name)) {
        row_findings(r, vocab, r.present.base, &mut out);
    }
    let rank = |s: &str| match s {
        "error" => 0,
        "warning" => 1,
        _ => 2,
    };
    out.sort_by_key(|f| rank(f.severity));
    out
}

/// A tensor's relative norm against the pretrained model, or else the base.
fn rel_of(s: &Sums, inp: &Inputs<'_>) -> Option<f64> {
    let f = |num: f64, den: f64| (den > 0.0).then(|| (num / den).sqrt());
    match inp.vector {
        Side::Pair { .. } => f(s.vv, s.pre),
        Side::Stored(_) => f(s.vv_base, s.base),
    }
}
