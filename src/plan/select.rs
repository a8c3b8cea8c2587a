//! Tensor selection (`--include`, `--exclude`) and per-pattern scales
//! (`--scale-for REGEX=S`).

use regex::Regex;

use crate::error::{Error, Result};

/// Which tensors an operation touches, and with what scale.
#[derive(Clone, Debug)]
pub struct Selection {
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
    ) -> Result<Selection> {
        if !scale.is_finite() {
            return Err(Error::Usage(format!("--scale {scale} is not a finite number")));
        }
        let mut sf = Vec::new();
        for item in scale_for {
            let Some((pat, val)) = item.rsplit_once('=') else {
                return Err(Error::Usage(format!(
                    "--scale-for '{item}' must look like REGEX=VALUE, e.g. 'mlp\\.=0.5'"
                )));
            };
            let v: f32 = val.trim().parse().ok().filter(|v: &f32| v.is_finite()).ok_or_else(|| {
                Error::Usage(format!("--scale-for '{item}': '{val}' is not a finite number"))
            })?;
            sf.push((compile("--scale-for", pat)?, v));
        }
        Ok(Selection {
            include: include.iter().map(|p| compile("--include", p)).collect::<Result<_>>()?,
            exclude: exclude.iter().map(|p| compile("--exclude", p)).collect::<Result<_>>()?,
            scale,
            scale_for: sf,
        })
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
        let sel =
            Selection::new(&s(&["layers"]), &s(&["norm"]), 0.8, &s(&["mlp\\.=0.5", "layers=0.25"])).unwrap();
        assert!(sel.selects("model.layers.0.mlp.up_proj.weight"));
        assert!(!sel.selects("model.layers.0.input_layernorm.weight"));
        assert!(!sel.selects("model.embed_tokens.weight"));
        assert_eq!(sel.scale("model.layers.0.mlp.up_proj.weight"), 0.5);
        assert_eq!(sel.scale("model.layers.0.self_attn.q_proj.weight"), 0.25);
        assert_eq!(sel.scale("lm_head.weight"), 0.8);
    }

    #[test]
    fn bad_patterns_and_values_are_usage_errors() {
        assert!(Selection::new(&s(&["("]), &[], 1.0, &[]).unwrap_err().to_string().contains("--include '('"));
        assert!(Selection::new(&[], &[], 1.0, &s(&["mlp"])).unwrap_err().to_string().contains("REGEX=VALUE"));
        assert!(Selection::new(&[], &[], 1.0, &s(&["mlp=x"])).is_err());
        assert!(Selection::new(&[], &[], f32::NAN, &[]).is_err());
    }
}
