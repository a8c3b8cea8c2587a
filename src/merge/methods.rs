//! The merge methods: their names, parameters and defaults, in one place.
//! Definitions and defaults are mergekit's (checked against mergekit 0.1.5),
//! so a mergekit config means the same thing here; where chatvec differs it
//! is said below. Every formula runs in f32 over decoded inputs with no
//! fused multiply-add and rounds once to the output dtype (contract 1).
//!
//! Notation: `b` the base model's element, `x_i` model i's, `w_i` its
//! weight, `d_i = x_i - b` its delta (task vector).
//!
//! - **linear**: `sum_i w_i x_i`, divided by `sum_i w_i` when `normalize`
//!   (default true). The base model is one of the inputs when given.
//! - **task_arithmetic**, **ties**, **dare_linear**, **dare_ties**,
//!   **breadcrumbs**, **breadcrumbs_ties**, **della**, **della_linear** (the
//!   generalized task arithmetic family): each `d_i` is sparsified
//!   (below), optionally rescaled to keep its L1 norm (`rescale`), and
//!   weighted: `e_i = w_i * d_i`. With sign consensus (the `ties` variants
//!   and della) the majority sign is that of `sum_i e_i` (zero counts as
//!   positive) and only the `e_i` of that sign count: `m = sum_i e_i [sign
//!   agrees]`, `div = sum_i w_i [sign agrees]` (1 where 0); otherwise `m =
//!   sum_i e_i`, `div = sum_i w_i` (1 where below 1e-8). Then `m /= div`
//!   when `normalize`, `m *= lambda`, and `out = b + m`.
//!   - sparsification by magnitude (`ties`): keep the `max(1, floor(density
//!     * n))` largest `|d_i|` of the tensor.
//!   - random (`dare_*`): keep each element with probability `density`.
//!   - magnitude outliers (`breadcrumbs*`): drop the `floor(gamma * n)`
//!     largest `|d_i|`, keep the next `floor(density * n)`.
//!   - `della*`: within each row (dim 0), keep an element with probability
//!     `density - epsilon + 2 epsilon r / (len - 1)`, `r` its magnitude rank
//!     in the row (0 = smallest).
//!   - equal magnitudes are ranked by element index, so the kept set is
//!     exact and reproducible (mergekit's sort leaves that order open).
//!   - `density >= 1` leaves `d_i` as it is; `rescale` multiplies the kept
//!     elements by `sum |d_i| / sum |kept|` (skipped when either is below
//!     1e-7), both sums taken in f64.
//!   - Defaults: `lambda` 1, `density` 1, `gamma` 0.01, `epsilon` 0.15;
//!     `normalize` true for ties and della, false otherwise; `rescale` true
//!     for dare_* and della*, false otherwise.
//! - **slerp**: spherical interpolation from the base (`t = 0`) to the one
//!   other model (`t = 1`) over the whole tensor: with `a`, `b` the two
//!   tensors, `cos = (a . b) / (|a| |b|)` (norms below 1e-8 count as 1,
//!   clamped to [-1, 1]); when `|cos| > 0.9995` the coefficients are `1 - t`
//!   and `t`, else `sin((1 - t) theta) / sin theta` and `sin(t theta) / sin
//!   theta`. `out = ca * a + cb * b`.
//! - **model_stock**: base plus at least two models; `cos` is the mean over
//!   model pairs of the cosine between their deltas (per row when
//!   `filter_wise`), `t = n cos / (1 + (n - 1) cos)` (0 where the
//!   denominator is below 1e-6), `out = t * mean_i x_i + (1 - t) * b`.
//! - **passthrough**: exactly one input (the base or one model), `out = x *
//!   scale` (`scale` per input, default: unscaled). With slices, each
//!   slice's one source.
//! - **nearswap**: base and one model, `w = clamp(t / max(|b - x|, 1e-6), 0,
//!   1)`, `out = w * x + (1 - w) * b` (NaN propagates as in torch).
//! - **ram** (Reinforced Agent Merging): base and models; an element of
//!   `d_i` counts when `|d_i| > epsilon` (default 1e-5), `c` models count
//!   there; `out = b + sum_i (z_i [c = 1] + z_i [c > 1] / max(c, 1))` with
//!   `z_i = d_i [counts]`.
//! - **ramplus_tl**: as ram, the unique term of model i scaled by `lambda_i
//!   = 1 + r * clamp(rho_i, 0, alpha)`, `rho_i` = model i's counted
//!   elements shared with another model over its unique ones (the latter at
//!   least `epsilon`), over the tensor; `r` 0.1, `alpha` 0.2.
//! - **nuslerp**: two models (`weight` each, `t = w_1 / (w_0 + w_1)`, 0.5
//!   when the sum is below 1e-6) interpolated on the sphere, their deltas
//!   from the base when there is one: over the whole tensor
//!   (`nuslerp_flatten`, default true), else per row, or per column with
//!   `nuslerp_row_wise` (mergekit's naming: its vectors run along dim 0).
//!   Unit vectors divide by `max(|v|, 1e-7)`; colinear vectors (`1 - cos^2
//!   <= 1e-16`) interpolate linearly.
//! - **multislerp**: barycentric interpolation on the sphere of any number
//!   of models (`weight` each, divided by their sum when
//!   `normalize_weights`, default true), their deltas when there is a
//!   base; one model is returned as it is. The result is the weighted mean
//!   of the unit vectors (`v_i / (|v_i| + eps)`, `eps` 1e-8), normalized and
//!   scaled by `sum_i w_i |v_i|`: mergekit's tangent-space step is zero in
//!   exact arithmetic (the weighted mean of tangents at the weighted mean),
//!   so chatvec leaves out what is only its rounding. A weighted mean of
//!   norm below `eps` interpolates two models linearly and is an error for
//!   more, as in mergekit.
//! - **karcher**: the Riemannian (Karcher) mean on the unit sphere of every
//!   input, the base included, with equal weights, by at most `max_iter`
//!   (10) steps from the normalized Euclidean mean until the tangent's norm
//!   is below `tol` (1e-5; inputs of norm at most `tol` are left out),
//!   scaled by the mean of the inputs' norms.
//!
//! - **sce**: base and models; with `select_topk` below 1 (default 1) only
//!   the elements whose variance across the deltas is among the
//!   `floor(nonzero * select_topk)` largest keep them (ties by index); each
//!   model's weight is the mean of its kept deltas squared over their sum;
//!   a delta counts where its sign is the sign of the deltas' sum;
//!   `out = b + sum_i w_i d_i [counts] / max(sum_i w_i [counts], 1e-6)`.
//!   `int8_mask` is accepted and changes nothing (a mask's type, in
//!   mergekit).
//! - **arcee_fusion**: base and one model, no parameters; an element takes
//!   the model's change where `|x - b| * kl[row]` (the row's KL divergence
//!   of the model's softmax from the base's) reaches `median + 1.5 * IQR`
//!   of those scores, exact order statistics (see `fusion`).
//!
//! nuslerp, multislerp and karcher stay in the span of their inputs, so
//! chatvec computes them from the inputs' Gram matrix (one streaming pass,
//! f64) as per-tensor (or per-row, per-column) coefficients, then `out =
//! sum_i c_i v_i` (plus the base for deltas) in f32.
//!
//! Norms, dot products and sums are accumulated in f64 by streaming passes
//! over the inputs (see `stats`), so statistics never hold a tensor.
//! Random masks come from `rng` (contract 2): the same seed gives the same
//! model on any machine, but not mergekit's torch-generated masks.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::merge::params::{Scalar, Setting, boolean, number};

/// A merge method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Slerp,
    ModelStock,
    Passthrough,
    NearSwap,
    Ram,
    RamPlusTl,
    NuSlerp,
    MultiSlerp,
    Karcher,
    Sce,
    ArceeFusion,
}

/// What the base model is to a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BaseRole {
    /// The origin: the other models are taken as deltas from it (required).
    Origin,
    /// The origin when there is one (nuslerp, multislerp).
    OptionalOrigin,
    /// One of the inputs, merged like the others (linear, karcher,
    /// passthrough).
    Input,
}

/// How a task arithmetic method thins out each delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sparsify {
    Magnitude,
    Random,
    Outliers,
    Della,
}

/// Which inputs a parameter is given for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One value for the tensor.
    Shared,
    /// One value per input, the base included.
    Input,
    /// One value per input other than the base.
    NonBase,
}

/// A parameter a method takes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParamSpec {
    pub name: &'static str,
    pub scope: Scope,
    pub boolean: bool,
    /// None: required.
    pub default: Option<Scalar>,
}

const fn num(name: &'static str, scope: Scope, default: Option<f64>) -> ParamSpec {
    ParamSpec {
        name,
        scope,
        boolean: false,
        default: match default {
            Some(v) => Some(Scalar::Num(v)),
            None => None,
        },
    }
}

const fn flag(name: &'static str, default: bool) -> ParamSpec {
    ParamSpec { name, scope: Scope::Shared, boolean: true, default: Some(Scalar::Bool(default)) }
}

pub(crate) const ALL_METHODS: [Method; 20] = [
    Method::Linear,
    Method::TaskArithmetic,
    Method::Ties,
    Method::DareLinear,
    Method::DareTies,
    Method::Breadcrumbs,
    Method::BreadcrumbsTies,
    Method::Della,
    Method::DellaLinear,
    Method::Slerp,
    Method::ModelStock,
    Method::Passthrough,
    Method::NearSwap,
    Method::Ram,
    Method::RamPlusTl,
    Method::NuSlerp,
    Method::MultiSlerp,
    Method::Karcher,
    Method::Sce,
    Method::ArceeFusion,
];

impl Method {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
            Method::Slerp => "slerp",
            Method::ModelStock => "model_stock",
            Method::Passthrough => "passthrough",
            Method::NearSwap => "nearswap",
            Method::Ram => "ram",
            Method::RamPlusTl => "ramplus_tl",
            Method::NuSlerp => "nuslerp",
            Method::MultiSlerp => "multislerp",
            Method::Karcher => "karcher",
            Method::Sce => "sce",
            Method::ArceeFusion => "arcee_fusion",
        }
    }

    pub(crate) fn from_name(s: &str) -> Result<Method> {
        if let Some(why) = NOT_YET.iter().find(|(n, _)| *n == s).map(|(_, why)| why) {
            return Err(Error::Usage(format!("merge method '{s}' is not supported by chatvec yet: {why}")));
        }
        ALL_METHODS.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = ALL_METHODS.iter().map(|m| m.name()).collect();
            Error::Usage(format!(
                "unknown merge method '{s}' (chatvec knows chat_vector, {})",
                names.join(", ")
            ))
        })
    }

    /// Whether this is one of the task arithmetic family.
    pub(crate) fn is_task_arithmetic(self) -> bool {
        self.sparsify().is_some() || self == Method::TaskArithmetic
    }

    /// What the base model is to the method.
    pub(crate) fn base_role(self) -> BaseRole {
        match self {
            Method::Linear | Method::Karcher | Method::Passthrough => BaseRole::Input,
            Method::NuSlerp | Method::MultiSlerp => BaseRole::OptionalOrigin,
            _ => BaseRole::Origin,
        }
    }

    /// Whether the CUDA path has kernels for it (the others run on the CPU).
    pub(crate) fn on_gpu(self) -> bool {
        self.is_task_arithmetic() || matches!(self, Method::Linear | Method::Slerp | Method::ModelStock)
    }

    /// Whether the method is a weighted combination of its inputs (or their
    /// deltas) with coefficients from their Gram matrix.
    pub(crate) fn spherical(self) -> bool {
        matches!(self, Method::NuSlerp | Method::MultiSlerp | Method::Karcher)
    }

    pub(crate) fn sparsify(self) -> Option<Sparsify> {
        match self {
            Method::Ties => Some(Sparsify::Magnitude),
            Method::DareLinear | Method::DareTies => Some(Sparsify::Random),
            Method::Breadcrumbs | Method::BreadcrumbsTies => Some(Sparsify::Outliers),
            Method::Della | Method::DellaLinear => Some(Sparsify::Della),
            _ => None,
        }
    }

    /// Sign election (TIES) before summing the deltas.
    pub(crate) fn consensus(self) -> bool {
        matches!(self, Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della)
    }

    /// Whether a base model is required.
    pub(crate) fn needs_base(self) -> bool {
        self.base_role() == BaseRole::Origin
    }

    /// The fewest and most inputs it merges: besides the base where the base
    /// is the origin, all of them where it is an input.
    pub(crate) fn model_count(self) -> (usize, usize) {
        match self {
            Method::Slerp | Method::NearSwap | Method::ArceeFusion => (1, 1),
            Method::ModelStock => (2, usize::MAX),
            Method::NuSlerp => (2, 2),
            Method::Passthrough => (1, 1),
            _ => (1, usize::MAX),
        }
    }

    pub(crate) fn params(self) -> Vec<ParamSpec> {
        match self {
            Method::Linear => vec![num("weight", Scope::Input, None), flag("normalize", true)],
            Method::Slerp | Method::NearSwap => vec![num("t", Scope::Shared, None)],
            Method::ModelStock => vec![flag("filter_wise", false)],
            Method::Passthrough => vec![num("scale", Scope::Input, Some(1.0))],
            Method::Ram => vec![num("epsilon", Scope::Shared, Some(1e-5))],
            Method::RamPlusTl => vec![
                num("r", Scope::Shared, Some(0.1)),
                num("alpha", Scope::Shared, Some(0.2)),
                num("epsilon", Scope::Shared, Some(1e-5)),
            ],
            Method::NuSlerp => vec![
                num("weight", Scope::NonBase, None),
                flag("nuslerp_row_wise", false),
                flag("nuslerp_flatten", true),
            ],
            Method::MultiSlerp => vec![
                num("weight", Scope::NonBase, None),
                flag("normalize_weights", true),
                num("eps", Scope::Shared, Some(1e-8)),
            ],
            Method::Karcher => {
                vec![num("max_iter", Scope::Shared, Some(10.0)), num("tol", Scope::Shared, Some(1e-5))]
            }
            Method::Sce => vec![num("select_topk", Scope::Shared, Some(1.0)), flag("int8_mask", false)],
            Method::ArceeFusion => Vec::new(),
            m => {
                let normalize = matches!(m, Method::Ties | Method::Della);
                let rescale = matches!(m.sparsify(), Some(Sparsify::Random | Sparsify::Della));
                let mut p = vec![
                    flag("int8_mask", false),
                    flag("normalize", normalize),
                    flag("rescale", rescale),
                    num("lambda", Scope::Shared, Some(1.0)),
                    num("weight", Scope::NonBase, None),
                    num("density", Scope::NonBase, Some(1.0)),
                ];
                match m.sparsify() {
                    Some(Sparsify::Outliers) => p.push(num("gamma", Scope::NonBase, Some(0.01))),
                    Some(Sparsify::Della) => p.push(num("epsilon", Scope::NonBase, Some(0.15))),
                    _ => {}
                }
                p
            }
        }
    }
}

/// mergekit 0.1.5's methods chatvec does not run yet, and why.
const NOT_YET: &[(&str, &str)] = &[];

/// Parameters of one model for one tensor.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct ModelParams {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
    /// passthrough's `scale`.
    pub scale: f64,
}

/// The shared settings of the newer methods (ram, nuslerp, multislerp,
/// karcher), with their defaults where a method does not take them.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Shared {
    /// ram's and ramplus_tl's threshold.
    pub epsilon: f64,
    pub r: f64,
    pub alpha: f64,
    pub row_wise: bool,
    pub flatten: bool,
    /// multislerp's `normalize_weights` and `eps`.
    pub normalize_weights: bool,
    pub eps: f64,
    pub max_iter: f64,
    pub tol: f64,
    /// sce's share of elements selected by variance.
    pub select_topk: f64,
}

/// All parameters of one tensor, resolved.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct TensorParams {
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    pub t: f64,
    pub filter_wise: bool,
    pub shared: Shared,
    /// One per merged input (for linear, the base too when it is an input).
    pub models: Vec<ModelParams>,
}

/// Where a method's parameters come from: the global settings, and per
/// model its own settings (which take precedence).
pub(crate) struct ParamSources<'a> {
    pub global: &'a [(String, Setting)],
    /// One per merged input, in `TensorParams::models` order.
    pub models: Vec<&'a [(String, Setting)]>,
    /// Model labels for error messages.
    pub labels: Vec<String>,
}

fn lookup<'a>(settings: &[&'a [(String, Setting)]], name: &str) -> Vec<&'a Setting> {
    settings.iter().flat_map(|s| s.iter().filter(|(k, _)| k == name).map(|(_, v)| v)).collect()
}

/// Checks the parameter names in `settings` against `method`. A parameter
/// of another method (a `weight` on slerp) is ignored, as mergekit ignores
/// it, with a warning returned; a name no method takes (a misspelling) is
/// an error.
pub(crate) fn check_names(method: Method, settings: &[(String, Setting)], at: &str) -> Result<Vec<String>> {
    let specs = method.params();
    let mut warnings = Vec::new();
    for (k, _) in settings {
        if specs.iter().any(|p| p.name == k) {
            continue;
        }
        let names: Vec<&str> = specs.iter().map(|p| p.name).collect();
        let known = ALL_METHODS.iter().any(|m| m.params().iter().any(|p| p.name == k));
        if !known {
            return Err(Error::Usage(format!(
                "{at}: {} takes no parameter '{k}' (it takes {})",
                method.name(),
                names.join(", ")
            )));
        }
        warnings.push(format!("{at}: {} does not use '{k}'; ignored, as mergekit does", method.name()));
    }
    Ok(warnings)
}

/// Resolves the parameters of tensor `name` at layer position `t`.
pub(crate) fn resolve(method: Method, src: &ParamSources<'_>, name: &str, t: f64) -> Result<TensorParams> {
    let specs = method.params();
    let value = |spec: &ParamSpec, settings: &[&[(String, Setting)]], who: &str| -> Result<Scalar> {
        let what = format!("{}{}", spec.name, who);
        for s in lookup(settings, spec.name) {
            let v = if spec.boolean {
                boolean(s, name, t, &what)?.map(Scalar::Bool)
            } else {
                number(s, name, t, &what)?.map(Scalar::Num)
            };
            if let Some(v) = v {
                return Ok(v);
            }
        }
        spec.default.ok_or_else(|| {
            Error::Usage(format!(
                "{} needs parameter '{}'{who} for tensor '{name}'",
                method.name(),
                spec.name
            ))
        })
    };
    let as_num = |s: Scalar| match s {
        Scalar::Num(v) => v,
        Scalar::Bool(b) => b as u8 as f64,
    };
    let shared = |n: &str, dflt: Scalar| -> Result<Scalar> {
        match specs.iter().find(|p| p.name == n) {
            Some(p) => value(p, &[src.global], ""),
            None => Ok(dflt),
        }
    };
    let truth = |s: Scalar| matches!(s, Scalar::Bool(true));
    let mut models = Vec::with_capacity(src.models.len());
    for (own, label) in src.models.iter().zip(&src.labels) {
        let per = |n: &str, dflt: f64| -> Result<f64> {
            match specs.iter().find(|p| p.name == n) {
                Some(p) => value(p, &[own, src.global], &format!(" of {label}")).map(as_num),
                None => Ok(dflt),
            }
        };
        models.push(ModelParams {
            weight: per("weight", 1.0)?,
            density: per("density", 1.0)?,
            gamma: if specs.iter().any(|p| p.name == "gamma") { per("gamma", 0.0)? } else { 0.0 },
            epsilon: if method.sparsify() == Some(Sparsify::Della) { per("epsilon", 0.0)? } else { 0.0 },
            scale: per("scale", 1.0)?,
        });
    }
    let num = |n: &str, d: f64| shared(n, Scalar::Num(d)).map(as_num);
    let yes = |n: &str, d: bool| shared(n, Scalar::Bool(d)).map(truth);
    let shared_params = Shared {
        epsilon: if method.sparsify() == Some(Sparsify::Della) { 0.0 } else { num("epsilon", 1e-5)? },
        r: num("r", 0.1)?,
        alpha: num("alpha", 0.2)?,
        row_wise: yes("nuslerp_row_wise", false)?,
        flatten: yes("nuslerp_flatten", true)?,
        normalize_weights: yes("normalize_weights", true)?,
        eps: num("eps", 1e-8)?,
        max_iter: num("max_iter", 10.0)?,
        tol: num("tol", 1e-5)?,
        select_topk: num("select_topk", 1.0)?,
    };
    let p = TensorParams {
        normalize: truth(shared("normalize", Scalar::Bool(false))?),
        rescale: truth(shared("rescale", Scalar::Bool(false))?),
        lambda: as_num(shared("lambda", Scalar::Num(1.0))?),
        t: as_num(shared("t", Scalar::Num(0.0))?),
        filter_wise: truth(shared("filter_wise", Scalar::Bool(false))?),
        shared: shared_params,
        models,
    };
    validate(method, &p, name, &src.labels)?;
    Ok(p)
}

/// Rejects values a method cannot use, naming the tensor.
/// A number as a person would write it: 1e308, not 308 digits.
fn shown(x: f64) -> String {
    if x != 0.0 && (x.abs() >= 1e16 || x.abs() < 1e-5) { format!("{x:e}") } else { x.to_string() }
}

fn validate(method: Method, p: &TensorParams, name: &str, labels: &[String]) -> Result<()> {
    let bad = |msg: String| Err(Error::Usage(format!("tensor '{name}': {msg}")));
    // Every value is used as an f32: 1e308 is finite in f64 but inf in f32,
    // and would write a model of NaNs.
    let f32_finite = |x: f64| x.is_finite() && (x as f32).is_finite();
    let in_unit = |x: f64| (0.0..=1.0).contains(&x);
    for (m, label) in p.models.iter().zip(labels) {
        if !f32_finite(m.weight) {
            return bad(format!("{label}: weight {} is not a finite f32 number", shown(m.weight)));
        }
        if method.sparsify().is_some() && !in_unit(m.density) {
            return bad(format!("{label}: density {} must be in [0, 1]", m.density));
        }
        if method.sparsify() == Some(Sparsify::Della) && !(m.epsilon.is_finite() && m.epsilon >= 0.0) {
            return bad(format!("{label}: epsilon {} must be a number >= 0", m.epsilon));
        }
        if method.sparsify() == Some(Sparsify::Della) && m.density > 0.0 && m.density < 1.0 {
            let (lo, hi) = (m.density - m.epsilon, m.density + m.epsilon);
            if lo <= 0.0 || hi >= 1.0 {
                return bad(format!(
                    "{label}: density {} +/- epsilon {} must stay inside (0, 1)",
                    m.density, m.epsilon
                ));
            }
        }
        if !in_unit(m.gamma) {
            return bad(format!("{label}: gamma {} must be in [0, 1]", m.gamma));
        }
    }
    if !f32_finite(p.lambda) {
        return bad(format!("lambda {} is not a finite f32 number", shown(p.lambda)));
    }
    let sum: f64 = p.models.iter().map(|m| m.weight).sum();
    if !f32_finite(sum) {
        return bad(format!("the weights sum to {}, beyond what f32 holds", shown(sum)));
    }
    if method == Method::Linear && p.normalize {
        let sum: f32 = p.models.iter().map(|m| m.weight as f32).sum();
        if sum == 0.0 {
            return bad(
                "the linear weights sum to 0, so they cannot be normalized; set normalize = false".into()
            );
        }
    }
    // slerp outside [0, 1] extrapolates along the arc, as mergekit does.
    if matches!(method, Method::Slerp | Method::NearSwap) && !f32_finite(p.t) {
        return bad(format!("t = {} is not a finite f32 number", shown(p.t)));
    }
    let s = &p.shared;
    for (name, v, ok) in [
        ("epsilon", s.epsilon, s.epsilon >= 0.0),
        ("r", s.r, true),
        ("alpha", s.alpha, s.alpha >= 0.0),
        ("eps", s.eps, s.eps >= 0.0),
        ("tol", s.tol, s.tol >= 0.0),
        ("select_topk", s.select_topk, true),
    ] {
        if !f32_finite(v) || !ok {
            return bad(format!(
                "{name} = {} must be a finite number{}",
                shown(v),
                if ok { "" } else { " >= 0" }
            ));
        }
    }
    if !(s.max_iter >= 0.0 && s.max_iter <= 1e6 && s.max_iter.fract() == 0.0) {
        return bad(format!("max_iter = {} must be a whole number from 0 to 1000000", shown(s.max_iter)));
    }
    if method == Method::Passthrough {
        for (m, label) in p.models.iter().zip(labels) {
            if !f32_finite(m.scale) {
                return bad(format!("{label}: scale {} is not a finite f32 number", shown(m.scale)));
            }
        }
    }
    Ok(())
}
