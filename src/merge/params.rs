//! Merge parameters that vary by tensor: a plain value, a layer gradient, or
//! a list of rules whose first matching filter wins - mergekit's parameter
//! language, so its configs mean the same here.
//!
//! - `0.5`: every tensor.
//! - `[0.0, 0.5, 1.0]`: a gradient over the layers. Layer `i` of `L` sits at
//!   `t = i / (L - 1)` and gets the piecewise-linear interpolation of the
//!   list at `t * (len - 1)`; tensors outside the layers (embeddings, final
//!   norm, lm_head) sit at `t = 0`.
//! - `[{filter = "self_attn", value = ...}, {value = ...}]`: the first rule
//!   whose filter matches the tensor name gives the value; a rule without
//!   a filter (or with filter `*`) matches everything. A mergekit `filter`
//!   is a plain substring; a chatvec recipe may say `pattern` for a regex.

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::layers::interpolate;

/// A scalar parameter value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scalar {
    Num(f64),
    Bool(bool),
}

impl Scalar {
    fn describe(self) -> String {
        match self {
            Scalar::Num(v) => v.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// How a rule picks tensors.
#[derive(Clone, Debug)]
pub(crate) enum Filter {
    /// Any tensor.
    All,
    /// Tensors whose name contains this string (mergekit's `filter`).
    Substring(String),
    /// Tensors whose name matches this regex (a recipe's `pattern`).
    Regex(Regex),
}

impl Filter {
    fn matches(&self, name: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Substring(s) => name.contains(s.as_str()),
            Filter::Regex(r) => r.is_match(name),
        }
    }
}

/// One parameter's setting, as written.
#[derive(Clone, Debug)]
pub(crate) enum Setting {
    Scalar(Scalar),
    /// Values spread over the layers.
    Gradient(Vec<Scalar>),
    /// First matching rule wins.
    Rules(Vec<(Filter, Setting)>),
}

fn scalar(v: &Value) -> Option<Scalar> {
    match v {
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::Number(n) => n.as_f64().filter(|x| x.is_finite()).map(Scalar::Num),
        // YAML writes 1e-5 without a dot as a string; mergekit reads it as a number.
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|x| x.is_finite()).map(Scalar::Num),
        _ => None,
    }
}

impl Setting {
    /// Parses a setting; `at` names it in errors (e.g. `parameters.density`).
    pub(crate) fn parse(v: &Value, at: &str) -> Result<Setting> {
        let bad = |what: &str| Error::Usage(format!("{at}: {what}"));
        if let Some(s) = scalar(v) {
            return Ok(Setting::Scalar(s));
        }
        match v {
            Value::Array(items) if items.is_empty() => Err(bad("an empty list sets nothing")),
            Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
                let vals: Option<Vec<Scalar>> = items.iter().map(scalar).collect();
                vals.map(Setting::Gradient).ok_or_else(|| bad("a gradient must be a list of numbers"))
            }
            Value::Array(items) => {
                let rules = items
                    .iter()
                    .enumerate()
                    .map(|(i, r)| rule(r, &format!("{at}[{i}]")))
                    .collect::<Result<_>>()?;
                Ok(Setting::Rules(rules))
            }
            Value::Object(_) => Ok(Setting::Rules(vec![rule(v, at)?])),
            _ => Err(bad(&format!("expected a number, true/false, a list or rules, not {v}"))),
        }
    }

    /// The value for tensor `name` at layer position `t`, if a rule matches.
    pub(crate) fn eval(&self, name: &str, t: f64) -> Option<Scalar> {
        match self {
            Setting::Scalar(s) => Some(*s),
            Setting::Gradient(vals) => Some(gradient(vals, t)),
            Setting::Rules(rules) => {
                rules.iter().find(|(f, _)| f.matches(name)).and_then(|(_, s)| s.eval(name, t))
            }
        }
    }
}

/// `{filter|pattern, value}`.
fn rule(v: &Value, at: &str) -> Result<(Filter, Setting)> {
    let Value::Object(m) = v else {
        return Err(Error::Usage(format!("{at}: expected {{filter, value}}, not {v}")));
    };
    for k in m.keys() {
        if !matches!(k.as_str(), "filter" | "pattern" | "value") {
            return Err(Error::Usage(format!(
                "{at}: unknown key '{k}' in a parameter rule (expected filter, pattern, value)"
            )));
        }
    }
    let text = |k: &str| -> Result<Option<String>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Error::Usage(format!("{at}.{k}: expected a string, not {other}"))),
        }
    };
    let filter = match (text("filter")?, text("pattern")?) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(format!("{at}: give either filter (substring) or pattern (regex)")));
        }
        (Some(f), None) if f == "*" => Filter::All,
        (Some(f), None) => Filter::Substring(f),
        (None, Some(p)) => Filter::Regex(
            Regex::new(&p)
                .map_err(|e| Error::Usage(format!("{at}.pattern '{p}' is not a valid regex: {e}")))?,
        ),
        (None, None) => Filter::All,
    };
    let value = m.get("value").ok_or_else(|| Error::Usage(format!("{at}: a rule needs a value")))?;
    Ok((filter, Setting::parse(value, &format!("{at}.value"))?))
}

/// Piecewise-linear interpolation of `vals` at `t` in `[0, 1]`, as mergekit
/// does it; lists of true/false pick the nearest lower entry instead.
fn gradient(vals: &[Scalar], t: f64) -> Scalar {
    let nums: Option<Vec<f64>> = vals
        .iter()
        .map(|v| match v {
            Scalar::Num(x) => Some(*x),
            Scalar::Bool(_) => None,
        })
        .collect();
    let scaled = t * (vals.len() - 1) as f64;
    let i0 = (scaled as usize).min(vals.len() - 1);
    let Some(nums) = nums else {
        return vals[i0];
    };
    Scalar::Num(interpolate(&nums, t))
}

/// Reads a setting's value for a tensor as a number.
pub(crate) fn number(setting: &Setting, name: &str, t: f64, what: &str) -> Result<Option<f64>> {
    match setting.eval(name, t) {
        None => Ok(None),
        Some(Scalar::Num(v)) => Ok(Some(v)),
        Some(s) => Err(Error::Usage(format!("{what} must be a number, not {}", s.describe()))),
    }
}

/// Reads a setting's value for a tensor as true/false (numbers 0/1 allowed,
/// as YAML writers sometimes produce).
pub(crate) fn boolean(setting: &Setting, name: &str, t: f64, what: &str) -> Result<Option<bool>> {
    match setting.eval(name, t) {
        None => Ok(None),
        Some(Scalar::Bool(b)) => Ok(Some(b)),
        Some(Scalar::Num(v)) if v == 0.0 || v == 1.0 => Ok(Some(v == 1.0)),
        Some(s) => Err(Error::Usage(format!("{what} must be true or false, not {}", s.describe()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(s: &Setting, name: &str, t: f64) -> Option<f64> {
        number(s, name, t, "x").unwrap()
    }

    #[test]
    fn gradients_interpolate_like_mergekit() {
        use crate::model::layers::layer_position;
        let s = Setting::parse(&json!([0.0, 0.5, 1.0]), "t").unwrap();
        assert_eq!(num(&s, "a", 0.0), Some(0.0));
        assert_eq!(num(&s, "a", 0.25), Some(0.25));
        assert_eq!(num(&s, "a", 0.75), Some(0.75));
        assert_eq!(num(&s, "a", 1.0), Some(1.0));
        assert_eq!(layer_position("model.layers.3.mlp.up_proj.weight", 7), 0.5);
        assert_eq!(layer_position("model.embed_tokens.weight", 7), 0.0);
        assert_eq!(layer_position("model.layers.0.x", 1), 1.0);
    }

    #[test]
    fn first_matching_rule_wins() {
        let s = Setting::parse(
            &json!([{"filter": "self_attn", "value": 0.1}, {"pattern": "mlp\\.(up|down)", "value": [0, 1]}, {"value": 0.9}]),
            "p",
        )
        .unwrap();
        assert_eq!(num(&s, "model.layers.0.self_attn.q_proj.weight", 0.0), Some(0.1));
        assert_eq!(num(&s, "model.layers.0.mlp.up_proj.weight", 0.5), Some(0.5));
        assert_eq!(num(&s, "model.layers.0.mlp.gate_proj.weight", 0.5), Some(0.9));
        let only = Setting::parse(&json!([{"filter": "mlp", "value": 1}]), "p").unwrap();
        assert_eq!(num(&only, "model.norm.weight", 0.0), None);
        assert_eq!(num(&Setting::parse(&json!("1e-5"), "p").unwrap(), "x", 0.0), Some(1e-5));
    }

    #[test]
    fn bad_settings_name_where_they_are() {
        let e = Setting::parse(&json!([{"filter": "a", "valu": 1}]), "parameters.weight").unwrap_err();
        assert!(e.to_string().contains("parameters.weight[0]: unknown key 'valu'"), "{e}");
        let e = Setting::parse(&json!({"pattern": "(", "value": 1}), "p").unwrap_err();
        assert!(e.to_string().contains("not a valid regex"), "{e}");
        let e = Setting::parse(&json!("abc"), "p").unwrap_err();
        assert!(e.to_string().contains("expected a number"), "{e}");
        let e = boolean(&Setting::parse(&json!(0.5), "p").unwrap(), "x", 0.0, "normalize").unwrap_err();
        assert!(e.to_string().contains("normalize must be true or false"), "{e}");
    }
}
