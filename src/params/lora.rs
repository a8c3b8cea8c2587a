//! `extract --rank`: what makes `extract` write a PEFT LoRA adapter (the
//! chat vector's low-rank factors) instead of the whole vector, as
//! mergekit-extract-lora does, and the checked form those options take.

use clap::Args;
use regex::Regex;
use serde::Serialize;

use crate::error::{Error, Result};

/// The rank cap when only `--keep` or `--rank-for` is given: mergekit-extract-lora's
/// default `--max-rank`.
pub(crate) const DEFAULT_MAX_RANK: usize = 128;

/// The LoRA options of `extract`, as the user wrote them.
#[derive(Args, Serialize, Clone, Debug, Default, PartialEq)]
pub struct LoraParams {
    /// Write a PEFT LoRA adapter of this rank (the vector's leading singular directions) instead
    /// of the whole vector; with --keep, the largest rank allowed. mergekit: --max-rank.
    #[arg(long, value_name = "R", visible_alias = "max-rank")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,

    /// The rank for modules whose name matches REGEX, e.g. 'mlp\.=32' (repeatable; the first
    /// match wins; others take --rank).
    #[arg(long, value_name = "REGEX=R")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rank_for: Vec<String>,

    /// Per module, the smallest rank that keeps this fraction of the vector's energy (squared
    /// norm), up to --rank (default 128), e.g. 0.9.
    #[arg(long, value_name = "FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<f64>,

    /// Decompose the embeddings and lm_head too (default: saved whole from the chat model as
    /// modules_to_save, as mergekit does).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub embed_lora: bool,

    /// Save modules of this name at full rank from the chat model (repeatable), e.g. lm_head.
    #[arg(long, value_name = "MODULE")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub save_module: Vec<String>,

    /// Drop singular values at or below this (mergekit's --sv-epsilon).
    #[arg(long, value_name = "EPS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sv_epsilon: Option<f64>,

    /// Leave out modules that have no low-rank form (norms) instead of saving them whole.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skip_undecomposable: bool,

    /// Decompose every matrix exactly (a full SVD, as mergekit-extract-lora does): the optimal
    /// error, at its cost and rows x cols floats of memory per thread. Default: exact for small
    /// matrices, randomized (within about 0.01% of the optimal error) for large ones.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exact: bool,
}

/// The LoRA options, checked.
#[derive(Clone, Debug)]
pub(crate) struct LoraSpec {
    /// The rank of modules no rule names, and the cap under `keep`.
    pub rank: usize,
    /// `(pattern, rank)`, first match wins (searched in the module name).
    pub rules: Vec<(Regex, usize)>,
    pub keep: Option<f64>,
    pub embed_lora: bool,
    pub save_modules: Vec<String>,
    pub sv_epsilon: f64,
    pub skip_undecomposable: bool,
    /// Every SVD exact.
    pub exact: bool,
}

impl LoraParams {
    /// Whether any option asks for an adapter.
    pub fn wanted(&self) -> bool {
        self.rank.is_some() || self.keep.is_some() || !self.rank_for.is_empty()
    }

    /// The checked spec, or `None` when no adapter is asked for (then the
    /// adapter-only flags are refused by name).
    pub(crate) fn validate(&self) -> Result<Option<LoraSpec>> {
        if !self.wanted() {
            let stray = [
                (self.embed_lora, "--embed-lora"),
                (!self.save_module.is_empty(), "--save-module"),
                (self.sv_epsilon.is_some(), "--sv-epsilon"),
                (self.skip_undecomposable, "--skip-undecomposable"),
                (self.exact, "--exact"),
            ];
            if let Some((_, flag)) = stray.iter().find(|(set, _)| *set) {
                return Err(Error::Usage(format!(
                    "{flag} shapes a LoRA adapter: give --rank R (or --keep F) to extract one"
                )));
            }
            return Ok(None);
        }
        let rank = self.rank.unwrap_or(DEFAULT_MAX_RANK);
        if rank == 0 {
            return Err(Error::Usage("--rank must be at least 1".into()));
        }
        let rules = self.rank_for.iter().map(|r| parse_rule(r)).collect::<Result<Vec<_>>>()?;
        if let Some(k) = self.keep
            && !(k > 0.0 && k <= 1.0)
        {
            return Err(Error::Usage(format!(
                "--keep {k}: give the fraction of each module's energy to keep, above 0 and at most 1 (e.g. 0.9)"
            )));
        }
        let sv_epsilon = self.sv_epsilon.unwrap_or(0.0);
        if !(sv_epsilon.is_finite() && sv_epsilon >= 0.0) {
            return Err(Error::Usage(format!("--sv-epsilon {sv_epsilon}: expected a number >= 0")));
        }
        for m in &self.save_module {
            if m.is_empty() || m.contains(char::is_whitespace) {
                return Err(Error::Usage(format!(
                    "--save-module '{m}': expected a module name such as lm_head or embed_tokens"
                )));
            }
        }
        Ok(Some(LoraSpec {
            rank,
            rules,
            keep: self.keep,
            embed_lora: self.embed_lora,
            save_modules: self.save_module.clone(),
            sv_epsilon,
            skip_undecomposable: self.skip_undecomposable,
            exact: self.exact,
        }))
    }
}

/// `REGEX=R`: split at the last `=`, so the pattern may hold one.
fn parse_rule(text: &str) -> Result<(Regex, usize)> {
    let bad = |why: String| {
        Error::Usage(format!("--rank-for '{text}': {why} (expected REGEX=R, e.g. 'mlp\\.=32')"))
    };
    let (pat, r) = text.rsplit_once('=').ok_or_else(|| bad("no '='".into()))?;
    let rank: usize = r.trim().parse().map_err(|_| bad(format!("'{r}' is not a rank")))?;
    if rank == 0 {
        return Err(bad("a rank must be at least 1".into()));
    }
    let re = regex::RegexBuilder::new(pat)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| bad(format!("invalid regex: {e}")))?;
    Ok((re, rank))
}

impl LoraSpec {
    /// The rank cap of module `name` (without `.weight`).
    pub(crate) fn rank_of(&self, name: &str) -> usize {
        self.rules.iter().find(|(re, _)| re.is_match(name)).map_or(self.rank, |(_, r)| *r)
    }

    /// Whether module `name` is to be saved whole: its full name or its
    /// last component is listed (as mergekit and PEFT match them).
    pub(crate) fn saved_whole(&self, name: &str) -> bool {
        let last = name.rsplit('.').next().unwrap_or(name);
        self.save_modules.iter().any(|m| m == name || m == last)
    }

    /// The rank kept from singular values `s` (nonincreasing) of a matrix
    /// of squared norm `energy`, under cap `cap`: at most the cap, none at
    /// or below `sv_epsilon`, and under `keep` the fewest holding that
    /// fraction of the energy. None for a zero matrix, else at least 1.
    pub(crate) fn choose(&self, s: &[f32], energy: f64, cap: usize) -> usize {
        if energy == 0.0 {
            return 0;
        }
        let mut r = cap.min(s.len());
        if self.sv_epsilon > 0.0 {
            r = r.min(s.iter().filter(|&&x| f64::from(x) > self.sv_epsilon).count());
        }
        if let Some(keep) = self.keep {
            let goal = keep * energy;
            let mut acc = 0f64;
            for (i, &x) in s[..r].iter().enumerate() {
                acc += f64::from(x) * f64::from(x);
                if acc >= goal * (1.0 - 1e-12) {
                    r = i + 1;
                    break;
                }
            }
        }
        r.max(usize::from(!s.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(keep: Option<f64>, eps: f64) -> LoraSpec {
        LoraParams { rank: Some(8), keep, sv_epsilon: Some(eps), ..LoraParams::default() }
            .validate()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn the_rank_is_the_cap_or_the_fewest_values_holding_the_energy_asked() {
        let s = [4.0f32, 2.0, 1.0, 1.0];
        let e = 16.0 + 4.0 + 1.0 + 1.0;
        assert_eq!(spec(None, 0.0).choose(&s, e, 3), 3);
        // 16/22 = 0.73, 20/22 = 0.91.
        assert_eq!(spec(Some(0.9), 0.0).choose(&s, e, 4), 2);
        assert_eq!(spec(Some(0.7), 0.0).choose(&s, e, 4), 1);
        // Not reachable under the cap: the cap.
        assert_eq!(spec(Some(0.99), 0.0).choose(&s, e, 2), 2);
        assert_eq!(spec(None, 1.5).choose(&s, e, 4), 2);
        assert_eq!(spec(None, 0.0).choose(&[0.0; 4], 0.0, 4), 0);
    }

    #[test]
    fn rules_match_first_and_bad_ones_are_refused_by_text() {
        let p = LoraParams { rank_for: vec!["mlp\\.=4".into(), "proj=2".into()], ..LoraParams::default() };
        let s = p.validate().unwrap().unwrap();
        assert_eq!(s.rank, DEFAULT_MAX_RANK);
        assert_eq!(s.rank_of("model.layers.0.mlp.down_proj"), 4);
        assert_eq!(s.rank_of("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(s.rank_of("lm_head"), DEFAULT_MAX_RANK);
        for (bad, needle) in
            [("mlp", "no '='"), ("mlp=x", "not a rank"), ("(=3", "invalid regex"), ("a=0", "at least 1")]
        {
            let e =
                LoraParams { rank_for: vec![bad.into()], ..LoraParams::default() }.validate().unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
        let e =
            LoraParams { rank: Some(4), keep: Some(1.5), ..LoraParams::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("--keep 1.5"), "{e}");
        let e = LoraParams { embed_lora: true, ..LoraParams::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("--embed-lora") && e.to_string().contains("--rank"), "{e}");
    }
}
