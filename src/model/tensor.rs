//! One tensor of a checkpoint: where its bytes are, what they hold, and,
//! for a quantized weight, where its scales are. Its own module so that the
//! checkpoint's table and the quantized-weight folding (`model::quant`)
//! both build on it without importing each other.

use crate::model::dtype::{DType, FloatType};

/// One tensor of a checkpoint.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Its name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape (checked against its byte length when the shard was opened).
    pub shape: Vec<u64>,
    /// Index of its shard in the checkpoint.
    pub(crate) shard: usize,
    /// Absolute byte offset of its data in the shard.
    pub(crate) start: u64,
    /// Byte length of its data.
    pub(crate) len: u64,
    /// Where a tensor read through another layout is stored (an expert's
    /// matrix of a fused tensor: `...experts.gate_up_proj[3][0:768]`);
    /// `None` for a tensor stored under its own name.
    pub(crate) stored_as: Option<String>,
    /// For a quantized weight (FP8 block-scaled, MXFP4): its scales and
    /// scheme. Its dtype is then the stored one (`F8_E4M3`, `U8`), its
    /// shape the float tensor's it stands for.
    pub(crate) quant: Option<Box<Quant>>,
}

impl Tensor {
    /// How its values are stored, as `inspect` names it: the dtype, or
    /// `MXFP4` for packed FP4 blocks (whose bytes are U8).
    pub(crate) fn stored_type(&self) -> &str {
        match self.quant.as_deref() {
            Some(Quant { scheme: Scheme::Mxfp4, .. }) => "MXFP4",
            _ => self.dtype.name(),
        }
    }

    /// Bytes it takes in its shard, its scales included.
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.len + self.quant.as_ref().map_or(0, |q| q.scales.len)
    }

    /// Element count.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The float type its values are computed from: its own for BF16, F16
    /// and F32; for a quantized weight, BF16, the dtype its float model is
    /// written in (transformers' dequantizers give it too). `None`: not
    /// arithmetic data.
    pub(crate) fn float(&self) -> Option<FloatType> {
        match &self.quant {
            Some(_) => Some(FloatType::BF16),
            None => self.dtype.float(),
        }
    }
}

/// How a tensor is quantized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// FP8 values of `[.., rows, cols]` matrices, each `block` (rows x
    /// columns) multiplied by its scale.
    Fp8Block { block: [u64; 2] },
    /// gpt-oss's MXFP4: packed FP4 blocks `[.., rows, groups, 16]`, an E8M0
    /// exponent per 32 values; the tensor is `[.., groups * 32, rows]` (the
    /// last two axes swapped, as transformers loads it into the model).
    Mxfp4,
}

/// Where a quantized tensor's scales are, and how to apply them.
#[derive(Clone, Debug)]
pub(crate) struct Quant {
    pub scheme: Scheme,
    /// The scale tensor as stored.
    pub scales: Tensor,
}

impl Scheme {
    /// How `inspect` and messages name it.
    pub(crate) fn describe(&self, data: DType) -> String {
        match self {
            Scheme::Fp8Block { block } => format!("fp8 {data}, blocks of {}x{}", block[0], block[1]),
            Scheme::Mxfp4 => "mxfp4 (FP4 E2M1, E8M0 scale per 32)".to_string(),
        }
    }
}
