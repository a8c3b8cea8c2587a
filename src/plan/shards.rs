//! Output shard files: tensors in order, at most `shard_size` data bytes
//! each, named and headed as transformers writes them.

use std::ops::Range;

use crate::model::safetensors::{OutTensorSpec, build_header};
use crate::plan::{Group, OutShard, OutTensor};

/// A tensor as the output files store it: one output tensor, or a group
/// of them (`tensors`) stored as one.
pub(crate) struct Stored<'a> {
    pub spec: OutTensorSpec<'a>,
    pub tensors: Range<usize>,
}

/// The stored tensors of `tensors` with `groups` (consecutive ranges) each
/// stored as one, in order.
pub(crate) fn stored<'a>(tensors: &'a [OutTensor], groups: &'a [Group]) -> Vec<Stored<'a>> {
    let mut out = Vec::with_capacity(tensors.len());
    let mut groups = groups.iter().peekable();
    let mut i = 0;
    while i < tensors.len() {
        if let Some(g) = groups.next_if(|g| g.tensors.start == i) {
            let dtype = tensors[i].dtype;
            out.push(Stored {
                spec: OutTensorSpec { name: &g.name, dtype, shape: &g.shape },
                tensors: g.tensors.clone(),
            });
            i = g.tensors.end;
            continue;
        }
        let t = &tensors[i];
        out.push(Stored {
            spec: OutTensorSpec { name: &t.name, dtype: t.dtype, shape: &t.shape },
            tensors: i..i + 1,
        });
        i += 1;
    }
    out
}

/// Splits tensors into shards of at most `max` bytes of data each (a tensor
/// larger than `max` gets a shard of its own), as transformers does; a
/// group is stored as one tensor, never split between shards.
pub(crate) fn assign_shards(tensors: &[OutTensor], groups: &[Group], max: u64) -> Vec<OutShard> {
    let items = stored(tensors, groups);
    let specs: Vec<OutTensorSpec> = items.iter().map(|s| s.spec).collect();
    let mut shards = layout_shards(&specs, max);
    for sh in &mut shards {
        let (a, b) = (sh.tensors.start, sh.tensors.end);
        sh.tensors = items[a].tensors.start..items.get(b).map_or(tensors.len(), |s| s.tensors.start);
    }
    shards
}

/// Lays out shard files for `specs` in order, at most `max` data bytes each,
/// named `model.safetensors` or `model-0000i-of-0000n.safetensors`; each
/// shard's `tensors` indexes `specs`.
fn layout_shards(specs: &[OutTensorSpec<'_>], max: u64) -> Vec<OutShard> {
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
