//! The merge methods: their parameters (mergekit's language), the
//! statistics passes some of them need first (magnitude thresholds, L1
//! sums, norms), the element pass, the counter-based random masks, and the
//! fixed-order sums that make the statistics device-independent.
//!
//! `methods` holds every definition and default in one doc comment. This
//! room works on views of already-aligned inputs (`arith::View`); it knows
//! nothing of checkpoints or plans.

pub(crate) mod element;
pub(crate) mod fusion;
pub(crate) mod lanes;
pub(crate) mod methods;
pub(crate) mod params;
pub(crate) mod sce;
pub(crate) mod select;
pub(crate) mod spherical;
pub(crate) mod stats;

use crate::arith::View;
use methods::{Method, TensorParams};

/// The inputs of one merged tensor, in the output's element positions.
pub(crate) struct Inputs<'a> {
    /// The base model's tensor (every method but linear).
    pub base: Option<View<'a>>,
    /// The merged models' tensors, in parameter order.
    pub models: Vec<View<'a>>,
}

/// What one merged tensor is: the method, its parameters resolved for the
/// tensor, and the seed of its random masks (DARE, DELLA).
#[derive(Clone, Debug)]
pub(crate) struct TensorMerge {
    pub method: Method,
    pub params: TensorParams,
    pub seed: u64,
}
