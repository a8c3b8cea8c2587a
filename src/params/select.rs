//! Tensor selection (`--include`, `--exclude`) and scales: one number, or
//! a gradient over the layers (`[0.3, 1.0]`: LiNeS-style, small near the
//! input, full near the output), with per-pattern overrides (`--scale-for
//! REGEX=S`, S a number or a gradient). Errors name the flag or recipe key
//! the way the user wrote it.

use regex::Regex;

use crate::error::{Error, Result};
use crate::model::checkpoint::is_embedding;
use crate::model::layers::{interpolate, layer_index, layer_position};

/// A scale: one value, or values spread evenly over the decoder layers and
/// interpolated linearly between them (as mergekit's gradients are).
#[derive(Clone, Debug, PartialEq)]
pub enum Scale {
    /// The same scale for every tensor.
    Constant(f32),
    /// Anchors from the first layer to the last (at least two). The
    /// embeddings take the first value; tensors after the layers (final
    /// norm, lm_head) and outside them take the last.
    Layers(Vec<f32>),
}

impl From<f32> for Scale {
    fn from(v: f32) -> Scale {
        Scale::Constant(v)
    }
}

impl Scale {
    /// Parses `0.5`, `[0.3, 1.0]` or `0.3,1.0`; `what` names it in errors.
    pub fn parse(text: &str, what: &str) -> Result<Scale> {
        let t = text.trim();
        let inner = t.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(t);
        let vals: Vec<f32> = inner
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && v.abs() <= f32::MAX as f64)
                    .map(|v| v as f32)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{what} '{text}' is not a finite number or a list of them (e.g. 0.5 or [0.3, 1.0])"
                ))
            })?;
        Scale::from_values(vals, what)
    }

    /// One value is a constant, several a gradient.
    pub fn from_values(vals: Vec<f32>, what: &str) -> Result<Scale> {
        if let Some(v) = vals.iter().find(|v| !v.is_finite()) {
            return Err(Error::Usage(format!("{what} {v} is not a finite number")));
        }
        match vals.as_slice() {
            [] => Err(Error::Usage(format!("{what}: an empty list sets nothing"))),
            [v] => Ok(Scale::Constant(*v)),
            _ => Ok(Scale::Layers(vals)),
        }
    }

    /// The scale of tensor `name` in a model of `layers` decoder layers.
    pub fn at(&self, name: &str, layers: u64) -> f32 {
        match self {
            Scale::Constant(v) => *v,
            Scale::Layers(vals) => {
                let t = if layer_index(name).is_some() {
                    layer_position(name, layers)
                } else if is_embedding(name) {
                    0.0
                } else {
                    1.0
                };
                let anchors: Vec<f64> = vals.iter().map(|v| f64::from(*v)).collect();
                interpolate(&anchors, t) as f32
            }
        }
    }

    /// Every value it can take (its anchors).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Scale::Constant(v) => vec![*v],
            Scale::Layers(v) => v.clone(),
        }
    }
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scale::Constant(v) => write!(f, "{v}"),
            Scale::Layers(v) => {
                let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

impl serde::Serialize for Scale {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Scale::Constant(v) => s.serialize_f32(*v),
            Scale::Layers(v) => v.serialize(s),
        }
    }
}

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
    pub(crate) fn scale(self) -> &'static str {
        if self == Spelling::Cli { "--scale" } else { "parameters.scale" }
    }
    fn scale_for(self) -> &'static str {
        if self == Spelling::Cli { "--scale-for" } else { "parameters.scale (a rule)" }
    }
}

/// Which tensors an operation touches, and with what scale.
#[derive(Clone, Debug)]
pub(crate) struct Selection {
    spelling: Spelling,
    include: Vec<Regex>,
    exclude: Vec<Regex>,
    scale: Scale,
    scale_for: Vec<(Regex, Scale)>,
    /// Decoder layers of the model the scales apply to (for gradients).
    layers: u64,
}

fn compile(flag: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern)
        .map_err(|e| Error::Usage(format!("{flag} '{pattern}' is not a valid regular expression: {e}")))
}

impl Selection {
    /// Builds a selection. `scale_for` entries are `REGEX=VALUE`, split at the
    /// last `=` (a regex may itself contain `=`).
    pub(crate) fn new(
        include: &[String],
        exclude: &[String],
        scale: &Scale,
        scale_for: &[String],
        spelling: Spelling,
    ) -> Result<Selection> {
        Scale::from_values(scale.values(), spelling.scale())?;
        let flag = spelling.scale_for();
        let mut sf = Vec::new();
        for item in scale_for {
            let Some((pat, val)) = item.rsplit_once('=') else {
                return Err(Error::Usage(format!(
                    "{flag} '{item}' must look like REGEX=VALUE, e.g. 'mlp\\.=0.5' or 'self_attn=[0.3, 1.0]'"
                )));
            };
            let v = Scale::parse(val, &format!("{flag} '{item}':"))?;
            sf.push((compile(flag, pat)?, v));
        }
        Ok(Selection {
            spelling,
            include: include.iter().map(|p| compile(spelling.include(), p)).collect::<Result<_>>()?,
            exclude: exclude.iter().map(|p| compile(spelling.exclude(), p)).collect::<Result<_>>()?,
            scale: scale.clone(),
            scale_for: sf,
            layers: 0,
        })
    }

    /// The scale of tensors no `--scale-for` rule matches (`--scale`).
    pub(crate) fn default_scale(&self) -> &Scale {
        &self.scale
    }

    /// The same selection with `scale` for `--scale` (a sweep's candidate);
    /// the `--scale-for` rules still win.
    pub(crate) fn with_default_scale(&self, scale: &Scale) -> Selection {
        Selection { scale: scale.clone(), ..self.clone() }
    }

    /// Every value a tensor's scale is read from: the anchors of
    /// `--scale` and of each `--scale-for` rule, in order.
    pub(crate) fn scale_values(&self) -> Vec<f32> {
        let rules = self.scale_for.iter().flat_map(|(_, s)| s.values());
        self.scale.values().into_iter().chain(rules).collect()
    }

    /// Sets the layer count gradients spread over (the base model's).
    pub(crate) fn set_layers(&mut self, layers: u64) {
        self.layers = layers;
    }

    pub(crate) fn check_all_match<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
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
    pub(crate) fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
            && !self.exclude.iter().any(|r| r.is_match(name))
    }

    /// The scale for `name`: the first matching `--scale-for`, else `--scale`.
    pub(crate) fn scale(&self, name: &str) -> f32 {
        self.scale_with(name, &self.scale)
    }

    /// The scale for `name` with `default` standing for `--scale` (a
    /// sweep's candidate): the first matching `--scale-for`, else `default`.
    pub(crate) fn scale_with(&self, name: &str, default: &Scale) -> f32 {
        let s = self.scale_for.iter().find(|(r, _)| r.is_match(name)).map_or(default, |(_, s)| s);
        s.at(name, self.layers)
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
            &Scale::Constant(0.8),
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
            Selection::new(&s(&["("]), &[], &Scale::Constant(1.0), &[], cli)
                .unwrap_err()
                .to_string()
                .contains("--include '('")
        );
        assert!(
            Selection::new(&[], &[], &Scale::Constant(1.0), &s(&["mlp"]), cli)
                .unwrap_err()
                .to_string()
                .contains("REGEX=VALUE")
        );
        assert!(Selection::new(&[], &[], &Scale::Constant(1.0), &s(&["mlp=x"]), cli).is_err());
        assert!(Selection::new(&[], &[], &Scale::Constant(f32::NAN), &[], cli).is_err());
        // A recipe's bad regex names the recipe key, not a flag.
        let e = Selection::new(&s(&["("]), &[], &Scale::Constant(1.0), &[], Spelling::Recipe)
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameters.include '('"), "{e}");
    }

    #[test]
    fn patterns_that_select_nothing_are_named() {
        let sel = Selection::new(
            &s(&["mlp"]),
            &s(&["^lm_head"]),
            &Scale::Constant(1.0),
            &s(&["atten=0.5"]),
            Spelling::Cli,
        )
        .unwrap();
        let names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"];
        let e = sel.check_all_match(names.iter().copied()).unwrap_err().to_string();
        assert!(e.contains("--exclude '^lm_head' matches no tensor"), "{e}");
        assert!(e.contains("--scale-for 'atten' matches no tensor"), "{e}");
        assert!(!e.contains("--include"), "{e}");
    }
}
