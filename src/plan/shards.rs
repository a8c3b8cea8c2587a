//! Output shard files: tensors in order, at most `shard_size` data bytes
//! each, named and headed as transformers writes them.

use std::ops::Range;

use crate::model::safetensors::{OutTensorSpec, build_header};
use crate::plan::{OutShard, OutTensor};

/// Splits tensors into shards of at most `max` bytes of data each (a tensor
/// larger than `max` gets a shard of its own), as transformers does.
pub(crate) fn assign_shards(tensors: &[OutTensor], max: u64) -> Vec<OutShard> {
    let specs: Vec<OutTensorSpec> =
        tensors.iter().map(|t| OutTensorSpec { name: &t.name, dtype: t.dtype, shape: &t.shape }).collect();
    layout_shards(&specs, max)
}

/// Lays out shard files for `specs` in order, at most `max` data bytes each,
/// named `model.safetensors` or `model-0000i-of-0000n.safetensors`.
pub(crate) fn layout_shards(specs: &[OutTensorSpec<'_>], max: u64) -> Vec<OutShard> {
    let bytes = |t: &OutTensorSpec| t.shape.iter().product::<u64>() * t.dtype.bits() / 8;
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, t) in specs.iter().enumerate() {
        if i > start && size + bytes(t) > max {
            ranges.push(start..i);
            start = i;
            size = 0;
        }
        size += bytes(t);
    }
    ranges.push(start..specs.len());
    let n = ranges.len();
    ranges
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (header, data) = build_header(&specs[r.clone()]);
            let file_name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let size = header.len() as u64 + data;
            OutShard { file_name, tensors: r, header, size }
        })
        .collect()
}
