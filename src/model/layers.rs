//! Where a tensor sits among a model's decoder layers (`model.layers.N.`),
//! and values spread over the layers (scale and merge-parameter
//! gradients, interpolated as mergekit's are): the naming plan, merge and
//! analyze all read tensors by.

/// Piecewise-linear interpolation of `vals` (evenly spread over `[0, 1]`)
/// at `t`, in f64, as mergekit's gradients.
pub(crate) fn interpolate(vals: &[f64], t: f64) -> f64 {
    if vals.is_empty() {
        return 0.0;
    }
    let scaled = t.clamp(0.0, 1.0) * (vals.len() - 1) as f64;
    let i0 = (scaled as usize).min(vals.len() - 1);
    let i1 = (i0 + 1).min(vals.len() - 1);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * vals[i0] + frac * vals[i1]
}

/// Where a tensor sits among the layers, for gradients: `t = i / (L - 1)`
/// for `model.layers.i.` (1 when there is one layer), 0 elsewhere.
pub(crate) fn layer_position(name: &str, layers: u64) -> f64 {
    let Some(i) = layer_index(name) else {
        return 0.0;
    };
    if layers <= 1 { 1.0 } else { i as f64 / (layers - 1) as f64 }
}

/// `i` in `...layers.i....`.
pub(crate) fn layer_index(name: &str) -> Option<u64> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let digits = rest.split('.').next()?;
    digits.parse().ok()
}

/// Layers numbered by `names` (`model.layers.N.`): the highest N plus one.
pub(crate) fn layers_of<'a>(names: impl Iterator<Item = &'a str>) -> u64 {
    names.filter_map(layer_index).max().map_or(0, |i| i + 1)
}
