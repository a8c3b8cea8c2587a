//! The report: every tensor's figures, the same aggregated per layer and per
//! module kind (sums added in file order, then turned into figures, so a
//! layer's relative norm is `sqrt(sum ||v||^2) / sqrt(sum ||W||^2)`, not a
//! mean of ratios), the findings, and a readable table.

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::TensorResult;
use super::figures::{Figures, Present, Sums};
use super::findings::Finding;
use crate::model::checkpoint::{is_embedding, is_lm_head};
use crate::model::layers::layer_index;

/// What a tensor is in a transformer block, by its name.
pub(crate) fn module_kind(name: &str) -> &'static str {
    if is_embedding(name) {
        return "embed";
    }
    if is_lm_head(name) {
        return "lm_head";
    }
    const KINDS: [(&str, &str); 11] = [
        ("q_proj", "q"),
        ("k_proj", "k"),
        ("v_proj", "v"),
        ("o_proj", "o"),
        ("gate_proj", "gate"),
        ("up_proj", "up"),
        ("down_proj", "down"),
        ("gate_up_proj", "gate"),
        ("qkv_proj", "q"),
        ("dense_h_to_4h", "up"),
        ("dense_4h_to_h", "down"),
    ];
    let module = name.rsplit('.').nth(1).unwrap_or(name);
    if let Some((_, k)) = KINDS.iter().find(|(m, _)| *m == module) {
        return k;
    }
    if name.contains("norm") { "norm" } else { "other" }
}

/// The order module kinds are shown in.
pub(crate) const KIND_ORDER: [&str; 11] =
    ["embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head", "other"];

/// One tensor's figures.
#[derive(Clone, Debug, Serialize)]
pub struct TensorFigures {
    /// The tensor's name.
    pub name: String,
    /// Its decoder layer, if it is in one.
    pub layer: Option<u64>,
    /// Its module kind: embed, q, k, v, o, gate, up, down, norm, lm_head, other.
    pub kind: &'static str,
    /// Its shape in the vector.
    pub shape: Vec<u64>,
    /// The figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// The figures of a group of tensors (a layer, a module kind, everything).
#[derive(Clone, Debug, Serialize)]
pub struct GroupFigures {
    /// The group: a layer number, `embed`, `head` (final norm and
    /// lm_head), `other`, a module kind, or `all`.
    pub group: String,
    /// Tensors in the group.
    pub tensors: usize,
    /// The figures over all of them.
    #[serde(flatten)]
    pub figures: Figures,
}

/// A tensor the vector has but that could not be read as one, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// The tensor.
    pub name: String,
    /// Why.
    pub why: String,
}

/// What `chatvec analyze` found; `--json` prints it as is, `Display` as
/// tables.
#[derive(Clone, Debug, Serialize)]
pub struct AnalyzeReport {
    /// The vector, as given.
    pub vector: String,
    /// The vector compared with, as given.
    pub against: Option<String>,
    /// The model the vector would be applied to.
    pub base: Option<String>,
    /// An output of `apply` whose effective scale was measured.
    pub applied: Option<String>,
    /// Per decoder layer (and embed / head / other), in model order.
    pub layers: Vec<GroupFigures>,
    /// Per module kind.
    pub kinds: Vec<GroupFigures>,
    /// Over the whole vector.
    pub overall: GroupFigures,
    /// Every tensor, in file order.
    pub tensors: Vec<TensorFigures>,
    /// Tensors left out, with why.
    pub skipped: Vec<Skipped>,
    /// With `--against`: the modules of each layer where the two vectors
    /// pull apart (see `conflicts`), in model order.
    pub conflicts: Vec<Conflict>,
    /// Pair checks, worst first.
    pub findings: Vec<Finding>,
    /// Wall time of the pass, in seconds.
    pub seconds: f64,
}

/// The layer group of a tensor: its layer number, or embed / head / other.
fn layer_group(name: &str) -> String {
    match layer_index(name) {
        Some(i) => i.to_string(),
        None if is_embedding(name) => "embed".into(),
        None if is_lm_head(name) || name.contains("norm") => "head".into(),
        None => "other".into(),
    }
}

/// Where a layer group is shown: embed, the layers by number, head, other.
fn layer_rank(g: &str) -> (u8, u64) {
    match g {
        "embed" => (0, 0),
        "head" => (2, 0),
        "other" => (3, 0),
        n => (1, n.parse::<u64>().unwrap_or(0)),
    }
}

/// Sums of a group, and which comparisons any of its tensors had.
#[derive(Clone, Default)]
pub(crate) struct Group {
    sums: Sums,
    present: Option<Present>,
    tensors: usize,
}

impl Group {
    pub(crate) fn add(&mut self, r: &TensorResult) {
        self.sums.add(&r.sums);
        let p = self.present.get_or_insert(r.present);
        // A figure is shown for the group when any of its tensors had it.
        p.pre |= r.present.pre;
        p.base |= r.present.base;
        p.against |= r.present.against;
        p.applied |= r.present.applied;
        self.tensors += 1;
    }

    /// The group's figures, if it has a tensor.
    pub(crate) fn sum_figures(&self) -> Option<Figures> {
        (self.tensors > 0).then(|| Figures::from_sums(&self.sums, self.present.unwrap_or_default()))
    }

    fn figures(&self, group: String) -> GroupFigures {
        GroupFigures {
            group,
            tensors: self.tensors,
            figures: Figures::from_sums(&self.sums, self.present.unwrap_or_default()),
        }
    }
}

/// Adds `r` to the group `key` of `groups`, opening it at the end (the
/// order results come in) when it is new.
fn add_to<K: PartialEq>(groups: &mut Vec<(K, Group)>, key: K, r: &TensorResult) {
    match groups.iter_mut().find(|(k, _)| *k == key) {
        Some((_, g)) => g.add(r),
        None => {
            let mut g = Group::default();
            g.add(r);
            groups.push((key, g));
        }
    }
}

/// Groups `results` per layer and per kind.
pub(crate) fn aggregate(results: &[TensorResult]) -> (Vec<GroupFigures>, Vec<GroupFigures>, GroupFigures) {
    let mut layers: Vec<(String, Group)> = Vec::new();
    let mut kinds: Vec<(&str, Group)> = KIND_ORDER.iter().map(|k| (*k, Group::default())).collect();
    let mut all = Group::default();
    for r in results {
        add_to(&mut layers, layer_group(&r.name), r);
        let kind = module_kind(&r.name);
        if let Some((_, grp)) = kinds.iter_mut().find(|(k, _)| *k == kind) {
            grp.add(r);
        }
        all.add(r);
    }
    layers.sort_by_key(|(g, _)| layer_rank(g));
    (
        layers.iter().map(|(g, grp)| grp.figures(g.clone())).collect(),
        kinds.iter().filter(|(_, g)| g.tensors > 0).map(|(k, g)| g.figures(k.to_string())).collect(),
        all.figures("all".into()),
    )
}

/// Below this cosine two vectors pull a module apart: added together,
/// each undoes part of the other there.
pub(crate) const CONFLICT_COSINE: f64 = 0.0;
/// Below this share of agreeing signs (among elements both change), the
/// vectors disagree on more elements than they agree on.
pub(crate) const CONFLICT_SIGNS: f64 = 0.5;

/// One module kind of one layer where the vector and `--against` conflict.
#[derive(Clone, Debug, Serialize)]
pub struct Conflict {
    /// The layer group (a layer number, embed, head or other).
    pub layer: String,
    /// The module kind (q, k, v, o, gate, up, down, norm, ...).
    pub kind: &'static str,
    /// Tensors in the cell.
    pub tensors: usize,
    /// Cosine of the two vectors over the cell.
    pub cosine: f64,
    /// Share of agreeing signs over the cell.
    pub sign_agreement: f64,
    /// Each vector's norm over the cell's shared rows, this one's then
    /// `--against`'s: which would win if both were added at scale 1.
    pub norms: [f64; 2],
}

/// The (layer, module kind) cells where the two vectors conflict: a
/// cosine below `CONFLICT_COSINE` or signs agreeing on under
/// `CONFLICT_SIGNS` of the elements both change. A user applying both in
/// one pass lowers one vector's scale there (`--scale-for`, or a layer
/// gradient).
pub(crate) fn conflicts(results: &[TensorResult]) -> Vec<Conflict> {
    let mut cells: Vec<((String, &'static str), Group)> = Vec::new();
    for r in results.iter().filter(|r| r.present.against) {
        add_to(&mut cells, (layer_group(&r.name), module_kind(&r.name)), r);
    }
    let kind_rank = |k: &str| KIND_ORDER.iter().position(|x| *x == k).unwrap_or(KIND_ORDER.len());
    cells.sort_by_key(|((layer, kind), _)| (layer_rank(layer), kind_rank(kind)));
    cells
        .into_iter()
        .filter_map(|((layer, kind), g)| {
            let f = g.sum_figures()?;
            let (cosine, signs) = (f.cosine?, f.sign_agreement?);
            (cosine < CONFLICT_COSINE || signs < CONFLICT_SIGNS).then_some(Conflict {
                layer,
                kind,
                tensors: g.tensors,
                cosine,
                sign_agreement: signs,
                norms: [g.sums.vv_u.sqrt(), g.sums.uu.sqrt()],
            })
        })
        .collect()
}

/// Each tensor's figures.
pub(crate) fn tensor_figures(results: &[TensorResult]) -> Vec<TensorFigures> {
    results
        .iter()
        .map(|r| TensorFigures {
            name: r.name.clone(),
            layer: layer_index(&r.name),
            kind: module_kind(&r.name),
            shape: r.shape.clone(),
            figures: Figures::from_sums(&r.sums, r.present),
        })
        .collect()
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or("-".into(), f)
}

/// A table of groups: one row each, the columns the report has figures for.
fn table(out: &mut String, title: &str, rows: &[&GroupFigures]) {
    let any = |f: fn(&Figures) -> Option<f64>| rows.iter().any(|r| f(&r.figures).is_some());
    let (pre, base) = (any(|f| f.rel_norm_pretrained), any(|f| f.rel_norm_base));
    let (cos, eff) = (any(|f| f.cosine), any(|f| f.effective_scale));
    let mut head = format!("{title:<8} {:>5} {:>11} {:>10}", "tens", "||v||", "max|v|");
    if pre {
        head += &format!(" {:>10}", "/||W_pre||");
    }
    if base {
        head += &format!(" {:>11}", "/||W_base||");
    }
    head += &format!(" {:>7}", "zeros");
    if cos {
        head += &format!(" {:>7} {:>6}", "cosine", "signs");
    }
    if eff {
        head += &format!(" {:>9}", "eff.scale");
    }
    let _ = writeln!(out, "{head}");
    for r in rows {
        let f = &r.figures;
        let mut line = format!("{:<8} {:>5} {:>11.4e} {:>10.3e}", r.group, r.tensors, f.norm, f.max_abs);
        if pre {
            line += &format!(" {:>10}", opt(f.rel_norm_pretrained, |x| format!("{:.3}%", 100.0 * x)));
        }
        if base {
            line += &format!(" {:>11}", opt(f.rel_norm_base, |x| format!("{:.3}%", 100.0 * x)));
        }
        line += &format!(" {:>6.2}%", 100.0 * f.zero_fraction);
        if cos {
            line += &format!(
                " {:>7} {:>6}",
                opt(f.cosine, |x| format!("{x:.3}")),
                opt(f.sign_agreement, |x| format!("{:.1}%", 100.0 * x))
            );
        }
        if eff {
            line += &format!(" {:>9}", opt(f.effective_scale, |x| format!("{x:.4}")));
        }
        let _ = writeln!(out, "{line}");
    }
}

impl fmt::Display for AnalyzeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = format!("vector: {}\n", self.vector);
        if let Some(a) = &self.against {
            let _ = writeln!(out, "against: {a}");
        }
        if let Some(b) = &self.base {
            let _ = writeln!(out, "base: {b}");
        }
        if let Some(a) = &self.applied {
            let _ = writeln!(out, "applied: {a}");
        }
        out.push('\n');
        let mut rows: Vec<&GroupFigures> = self.layers.iter().collect();
        rows.push(&self.overall);
        table(&mut out, "layer", &rows);
        out.push('\n');
        table(&mut out, "kind", &self.kinds.iter().collect::<Vec<_>>());
        if self.against.is_some() {
            if self.conflicts.is_empty() {
                out.push_str("\nconflicts: none (every layer's modules: cosine >= 0 and signs agree on at least half)\n");
            } else {
                out.push_str("\nconflicts (cosine < 0 or signs agree on under half; lower one vector's scale there):\n");
                let _ = writeln!(
                    out,
                    "{:<8} {:<8} {:>5} {:>7} {:>6} {:>11} {:>11}",
                    "layer", "kind", "tens", "cosine", "signs", "||v||", "||against||"
                );
                for c in &self.conflicts {
                    let _ = writeln!(
                        out,
                        "{:<8} {:<8} {:>5} {:>7.3} {:>5.1}% {:>11.4e} {:>11.4e}",
                        c.layer,
                        c.kind,
                        c.tensors,
                        c.cosine,
                        100.0 * c.sign_agreement,
                        c.norms[0],
                        c.norms[1]
                    );
                }
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "\nskipped {}: {}", s.name, s.why);
        }
        if self.findings.is_empty() {
            out.push_str("\nfindings: none (the pair looks like an instruct model and its own base)\n");
        } else {
            out.push_str("\nfindings:\n");
            for x in &self.findings {
                let _ = writeln!(out, "  {}: {}\n    why: {}", x.severity, x.what, x.why);
            }
        }
        f.write_str(&out)
    }
}
