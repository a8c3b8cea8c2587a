//! Tensor selection (`--include`, `--exclude`) and per-pattern scales
//! (`--scale-for REGEX=S`), named in errors the way the user wrote them:
//! as flags, or as a recipe's `parameters` keys.

use regex::Regex;

use crate::error::{Error, Result};

/// Where a selection was written, so errors name the flag or recipe key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spelling {
    /// `--include`, `--exclude`, `--scale`, `--scale-for`.
    Cli,
    /// A chat_vector recipe's `parameters.include`, `.exclude`, `.scale`.
    Recipe,
}

impl Spelling {
    fn include(self) -> &'static str {
        if self == Spelling::Cli { "--include" } else { "parameters.include" }
    }
    fn exclude(self) -> &'static str {
        if self == Spelling::Cli { "--exclude" } else { "parameters.exclude" }
    }
    fn scale(self) -> &'static str {
        if self == Spelling::Cli { "--scale" } else { "parameters.scale" }
    }
    fn scale_for(self) -> &'static str {
        if self == Spelling::Cli { "--scale-for" } else { "parameters.scale (a rule)" }
    }
}

/// Which tensors an operation touches, and with what scale.
#[derive(Clone, Debug)]
pub struct Selection {
    spelling: Spelling,
    include: Vec<Regex>,
    exclude: Vec<Regex>,
    scale: f32,
    scale_for: Vec<(Regex, f32)>,
}

fn compile(flag: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern)
        .map_err(|e| Error::Usage(format!("{flag} '{pattern}' is not a valid regular expression: {e}")))
}

impl Selection {
    /// Builds a selection. `scale_for` entries are `REGEX=VALUE`, split at the
    /// last `=` (a regex may itself contain `=`).
    pub fn new(
        include: &[String],
        exclude: &[String],
        scale: f32,
        scale_for: &[String],
        spelling: Spelling,
    ) -> Result<Selection> {
        if !scale.is_finite() {
            return Err(Error::Usage(format!("{} {scale} is not a finite number", spelling.scale())));
        }
        let flag = spelling.scale_for();
        let mut sf = Vec::new();
        for item in scale_for {
            let Some((pat, val)) = item.rsplit_once('=') else {
                return Err(Error::Usage(format!(
                    "{flag} '{item}' must look like REGEX=VALUE, e.g. 'mlp\\.=0.5'"
                )));
            };
            let v: f32 =
                val.trim().parse().ok().filter(|v: &f32| v.is_finite()).ok_or_else(|| {
                    Error::Usage(format!("{flag} '{item}': '{val}' is not a finite number"))
                })?;
            sf.push((compile(flag, pat)?, v));
        }
        Ok(Selection {
            spelling,
            include: include.iter().map(|p| compile(spelling.include(), p)).collect::<Result<_>>()?,
            exclude: exclude.iter().map(|p| compile(spelling.exclude(), p)).collect::<Result<_>>()?,
            scale,
            scale_for: sf,
        })
    }

    /// Fails naming every pattern that matches none of `names` (the tensors
    /// of the job's models): a pattern that selects nothing would silently
    /// write an unchanged copy, or a vector without the tensors meant.
    pub fn check_all_match<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        let sp = self.spelling;
        let patterns = self
            .include
            .iter()
            .map(|r| (sp.include(), r))
            .chain(self.exclude.iter().map(|r| (sp.exclude(), r)))
            .chain(self.scale_for.iter().map(|(r, _)| (sp.scale_for(), r)));
        let unmatched: Vec<String> = patterns
            .filter(|(_, r)| !names.clone().any(|n| r.is_match(n)))
            .map(|(flag, r)| format!("{flag} '{}' matches no tensor", r.as_str()))
            .collect();
        if unmatched.is_empty() {
            return Ok(());
        }
        Err(Error::Mismatch { what: "a tensor pattern selects nothing".into(), problems: unmatched }
            .with_hint("`chatvec inspect MODEL` lists the tensor names"))
    }

    /// Whether the tensor named `name` is operated on (else it is copied).
    /// A name is selected when it matches some `--include` (or none was
    /// given) and no `--exclude`.
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
            && !self.exclude.iter().any(|r| r.is_match(name))
    }

    /// The scale for `name`: the first matching `--scale-for`, else `--scale`.
    pub fn scale(&self, name: &str) -> f32 {
        self.scale_for.iter().find(|(r, _)| r.is_match(name)).map_or(self.scale, |(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn include_exclude_and_first_scale_wins() {
        let sel = Selection::new(
            &s(&["layers"]),
            &s(&["norm"]),
            0.8,
            &s(&["mlp\\.=0.5", "layers=0.25"]),
            Spelling::Cli,
        )
        .unwrap();
        assert!(sel.selects("model.layers.0.mlp.up_proj.weight"));
        assert!(!sel.selects("model.layers.0.input_layernorm.weight"));
        assert!(!sel.selects("model.embed_tokens.weight"));
        assert_eq!(sel.scale("model.layers.0.mlp.up_proj.weight"), 0.5);
        assert_eq!(sel.scale("model.layers.0.self_attn.q_proj.weight"), 0.25);
        assert_eq!(sel.scale("lm_head.weight"), 0.8);
    }

    #[test]
    fn bad_patterns_and_values_are_usage_errors() {
        let cli = Spelling::Cli;
        assert!(
            Selection::new(&s(&["("]), &[], 1.0, &[], cli).unwrap_err().to_string().contains("--include '('")
        );
        assert!(
            Selection::new(&[], &[], 1.0, &s(&["mlp"]), cli).unwrap_err().to_string().contains("REGEX=VALUE")
        );
        assert!(Selection::new(&[], &[], 1.0, &s(&["mlp=x"]), cli).is_err());
        assert!(Selection::new(&[], &[], f32::NAN, &[], cli).is_err());
        // A recipe's bad regex names the recipe key, not a flag.
        let e = Selection::new(&s(&["("]), &[], 1.0, &[], Spelling::Recipe).unwrap_err().to_string();
        assert!(e.contains("parameters.include '('"), "{e}");
    }

    #[test]
    fn patterns_that_select_nothing_are_named() {
        let sel =
            Selection::new(&s(&["mlp"]), &s(&["^lm_head"]), 1.0, &s(&["atten=0.5"]), Spelling::Cli).unwrap();
        let names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"];
        let e = sel.check_all_match(names.iter().copied()).unwrap_err().to_string();
        assert!(e.contains("--exclude '^lm_head' matches no tensor"), "{e}");
        assert!(e.contains("--scale-for 'atten' matches no tensor"), "{e}");
        assert!(!e.contains("--include"), "{e}");
    }
}
