//! Inputs whose mixture-of-experts layers are stored in different layouts
//! (`model::experts`), lined up by meaning: a chat pair published with one
//! tensor per expert and a continued-pretrained model saved fused by
//! transformers 5 are read alike, expert by expert.
//!
//! `line_up` runs before planning: when the inputs' layouts differ, or the
//! output is asked for in another one, every fused input is read as a
//! per-expert one (byte ranges of its fused tensors, nothing copied), so
//! planners see one set of names. `regroup` runs after planning: when the
//! output is to be fused, each layer's expert matrices are put one after
//! another in the fused tensor's order and written as one stored tensor
//! (`Plan::groups`). Values are untouched either way; only names, bounds
//! and the order of the output's tensors change.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::experts::{ExpertLayout, Family, Fused, Part, split_fused};
use crate::plan::shards::assign_shards;
use crate::plan::{Group, Plan};

/// How a job's experts were lined up.
#[derive(Clone, Debug)]
pub(crate) struct ExpertPlan {
    pub family: &'static Family,
    /// Per input, in plan order: how it stores its experts (`None`: it has
    /// none), and how many fused tensors were read per expert.
    pub inputs: Vec<(Option<ExpertLayout>, usize)>,
    /// The layout the output is written in.
    pub output: ExpertLayout,
    /// Whether `output` was asked for (`--expert-layout`) rather than the
    /// reference model's.
    pub requested: bool,
}

/// Lines up the experts of `cks` (input `reference` is the model whose
/// layout the output keeps unless `requested` names one). Returns `None`
/// when there is nothing to do: no experts, or one layout throughout.
pub(crate) fn line_up(
    cks: &mut [&mut Checkpoint],
    reference: usize,
    requested: Option<ExpertLayout>,
) -> Result<Option<ExpertPlan>> {
    let family = std::iter::once(reference).chain(0..cks.len()).find_map(|i| Family::of(cks[i]));
    let Some(family) = family else {
        return match requested {
            None => Ok(None),
            Some(l) => Err(Error::Usage(format!(
                "--expert-layout {}: {} has no mixture-of-experts layers chatvec knows how to store another way",
                l.name(),
                cks[reference].dir.display()
            ))),
        };
    };
    let stored = cks.iter().map(|ck| family.layout_of(ck)).collect::<Result<Vec<_>>>()?;
    let Some(own) = stored[reference] else {
        return match requested {
            None => Ok(None),
            Some(l) => Err(Error::Usage(format!(
                "--expert-layout {}: {} stores no experts",
                l.name(),
                cks[reference].dir.display()
            ))),
        };
    };
    let output = requested.unwrap_or(own);
    if stored.iter().flatten().all(|l| *l == output) {
        return Ok(None);
    }
    let mut inputs = Vec::with_capacity(cks.len());
    for (ck, layout) in cks.iter_mut().zip(&stored) {
        let split = match layout {
            Some(ExpertLayout::Fused) => split_fused(ck, family)?,
            _ => 0,
        };
        inputs.push((*layout, split));
    }
    Ok(Some(ExpertPlan { family, inputs, output, requested: requested.is_some() }))
}

/// `line_up` over a plan's inputs.
pub(crate) fn line_up_inputs(
    inputs: &mut [crate::plan::Input],
    reference: usize,
    requested: Option<ExpertLayout>,
) -> Result<Option<ExpertPlan>> {
    let mut cks: Vec<&mut Checkpoint> = inputs.iter_mut().map(|i| &mut i.ckpt).collect();
    line_up(&mut cks, reference, requested)
}

/// Sets how the plan's experts were lined up, and writes them in that
/// output layout (`regroup`).
pub(crate) fn finish(plan: &mut Plan, experts: Option<ExpertPlan>, shard_size: u64) -> Result<()> {
    plan.experts = experts;
    regroup(plan, shard_size)
}

/// One fused tensor being gathered: its experts' pieces by (expert, part).
struct Gathering<'a> {
    prefix: &'a str,
    kind: Fused,
    pieces: Vec<(u64, Part, usize)>,
}

/// Writes the plan's experts in `plan.experts`'s output layout: for the
/// fused layout, each layer's expert matrices in the fused tensor's order,
/// stored as one tensor, and the block's other tensors under their fused
/// names; shards laid out again (`shard_size` data bytes at most). A layer
/// whose experts are not all there, or differ in shape or dtype, is
/// refused naming them.
pub(crate) fn regroup(plan: &mut Plan, shard_size: u64) -> Result<()> {
    let Some(ep) = &plan.experts else { return Ok(()) };
    if ep.output != ExpertLayout::Fused {
        return Ok(());
    }
    let family = ep.family;
    let mut gathers: Vec<Gathering> = Vec::new();
    let mut of_tensor: Vec<Option<usize>> = vec![None; plan.tensors.len()];
    let mut by_key: HashMap<(&str, bool), usize> = HashMap::new();
    for (i, t) in plan.tensors.iter().enumerate() {
        let Some((prefix, e, part)) = family.piece(&t.name) else { continue };
        let kind = if part == Part::Down { Fused::Down } else { Fused::GateUp };
        let g = *by_key.entry((prefix, kind == Fused::Down)).or_insert_with(|| {
            gathers.push(Gathering { prefix, kind, pieces: Vec::new() });
            gathers.len() - 1
        });
        gathers[g].pieces.push((e, part, i));
        of_tensor[i] = Some(g);
    }
    // Each gathering in the fused order, checked.
    let mut shapes = Vec::with_capacity(gathers.len());
    for g in &mut gathers {
        g.pieces.sort_by_key(|&(e, part, _)| (e, part == Part::Up));
        shapes.push(check_gathering(plan, family, g)?);
    }
    // The new order: a gathering where its first piece was.
    let mut order = Vec::with_capacity(plan.tensors.len());
    let mut groups = Vec::with_capacity(gathers.len());
    let mut placed = vec![false; gathers.len()];
    for (i, g) in of_tensor.iter().enumerate() {
        match g {
            None => order.push(i),
            Some(g) if !placed[*g] => {
                placed[*g] = true;
                let start = order.len();
                order.extend(gathers[*g].pieces.iter().map(|p| p.2));
                groups.push(Group {
                    name: family.fused_name(gathers[*g].prefix, gathers[*g].kind),
                    shape: shapes[*g].clone(),
                    tensors: start..order.len(),
                });
            }
            Some(_) => {}
        }
    }
    let mut old: Vec<Option<crate::plan::OutTensor>> =
        std::mem::take(&mut plan.tensors).into_iter().map(Some).collect();
    plan.tensors = order.iter().map(|&i| old[i].take().expect("each tensor placed once")).collect();
    for variant in &mut plan.scales {
        *variant = order.iter().map(|&i| variant.get(i).copied().flatten()).collect();
    }
    let in_group: Vec<bool> = {
        let mut v = vec![false; plan.tensors.len()];
        groups.iter().for_each(|g| v[g.tensors.clone()].iter_mut().for_each(|x| *x = true));
        v
    };
    for (t, grouped) in plan.tensors.iter_mut().zip(in_group) {
        if !grouped {
            t.name = family.to_fused(&t.name);
        }
    }
    plan.groups = groups;
    plan.shards = assign_shards(&plan.tensors, &plan.groups, shard_size);
    Ok(())
}

/// The fused shape of a gathering, after checking that it holds every
/// expert from 0 with each of its kind's parts once, all of one shape and
/// dtype (gate and up alike).
fn check_gathering(plan: &Plan, family: &Family, g: &Gathering) -> Result<Vec<u64>> {
    let fused = family.fused_name(g.prefix, g.kind);
    let refuse = |what: String| {
        Err(Error::Usage(format!("cannot write {fused} fused: {what}"))
            .with_hint("pass --expert-layout per-expert to write one tensor per expert"))
    };
    let parts = g.kind.parts();
    let experts = g.pieces.len() as u64 / parts.len() as u64;
    let first = &plan.tensors[g.pieces[0].2];
    for (k, &(e, part, i)) in g.pieces.iter().enumerate() {
        let want_e = k as u64 / parts.len() as u64;
        let want_part = parts[k % parts.len()];
        let t = &plan.tensors[i];
        if e != want_e || part != want_part || !g.pieces.len().is_multiple_of(parts.len()) {
            let missing = family.piece_name(g.prefix, want_e, want_part);
            return refuse(format!("'{missing}' is not in the output"));
        }
        if t.shape != first.shape || t.dtype != first.dtype || t.shape.len() != 2 {
            return refuse(format!(
                "'{}' is {} {:?} but '{}' is {} {:?}",
                t.name, t.dtype, t.shape, first.name, first.dtype, first.shape
            ));
        }
    }
    Ok(vec![experts, first.shape[0] * parts.len() as u64, first.shape[1]])
}

impl ExpertPlan {
    /// The `--dry-run` lines: each input's layout, and the output's.
    pub(crate) fn describe(&self, labels: &[&str]) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "experts ({} layout family):", self.family.name);
        for ((layout, split), label) in self.inputs.iter().zip(labels) {
            match layout {
                None => {}
                Some(ExpertLayout::Fused) => {
                    let _ = writeln!(
                        out,
                        "  {label}: fused; {split} fused tensor(s) read expert by expert, as {}",
                        self.family.piece_name("model.layers.N", 0, Part::Gate).replacen(".0.", ".E.", 1)
                    );
                }
                Some(ExpertLayout::PerExpert) => {
                    let _ = writeln!(out, "  {label}: per-expert");
                }
            }
        }
        let why = if self.requested { "--expert-layout" } else { "the reference model's" };
        let _ = writeln!(out, "  output: {} ({why})", self.output.name());
        out
    }
}
