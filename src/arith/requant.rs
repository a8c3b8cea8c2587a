//! f32 results quantized again to FP8 E4M3 with one scale per block, as
//! transformers' `Fp8Quantize` (the op `save_pretrained` runs on a
//! block-FP8 model) computes it, per `block_m x block_n` tile:
//! `amax = max |x|`; `scale = (1 / amax) * 448` and `inv = 1 / scale` in
//! f32 (torch evaluates `448.0 / tensor` as the tensor's reciprocal times
//! 448, two roundings, which a single division differs from in about a
//! quarter of tiles; 1 and 1 for an all-zero or NaN tile); `code = e4m3(clamp(x * scale,
//! -448, 448))` rounded to nearest even; `inv` is the stored
//! `weight_scale_inv`, so `code * inv` dequantizes.
//!
//! A tile spans `block_m` whole rows, so the engine hands over bands of
//! whole rows (`quantize_band`), and the codes and the scales, written
//! by separate jobs, come from the same function.

use super::quant::fp8_table;
use crate::model::dtype::{F8E4M3_MAX, f32_to_f8e4m3};

/// The quantization error over some tiles, against the f32 values.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Fp8Error {
    /// Elements counted.
    pub elements: u64,
    /// `sum (x - code * inv)^2` and `sum x^2`, in f64.
    pub sq_err: f64,
    pub sq: f64,
    /// The largest `|x - code * inv| / amax` of a tile, and its tensor.
    pub worst: f64,
    pub worst_tensor: String,
}

impl Fp8Error {
    /// Adds another tensor's (or band's) figures.
    pub(crate) fn add(&mut self, o: &Fp8Error) {
        self.elements += o.elements;
        self.sq_err += o.sq_err;
        self.sq += o.sq;
        if o.worst > self.worst {
            self.worst = o.worst;
            self.worst_tensor = o.worst_tensor.clone();
        }
    }
}

/// A tile's `(scale, inv)` from its `amax` (NaN when the tile holds one).
fn tile_scales(amax: f32) -> (f32, f32) {
    if amax > 0.0 {
        let r = 1.0 / amax;
        let scale = r * F8E4M3_MAX;
        (scale, 1.0 / scale)
    } else {
        (1.0, 1.0)
    }
}

/// Quantizes a band of whole rows (`x`, row-major, `cols` per row, its row
/// count a multiple of `block[0]`) into `codes` (one byte per element) and
/// the band's tiles' inverse scales into `inv` (row-major over the tiles,
/// `cols / block[1]` per tile row). With `err`, adds the error of each
/// element's dequantized code. Rows are walked in order (tile by tile
/// they would be strided).
pub(crate) fn quantize_band(
    x: &[f32],
    cols: usize,
    block: [usize; 2],
    codes: &mut [u8],
    inv: &mut [f32],
    err: Option<&mut Fp8Error>,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::model::dtype::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { quantize_band_avx2(x, cols, block, codes, inv, err) };
    }
    quantize_band_portable(x, cols, block, codes, inv, err)
}

/// `quantize_band` compiled for AVX2 (the same IEEE operations lane for
/// lane, so the same bytes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_band_avx2(
    x: &[f32],
    cols: usize,
    block: [usize; 2],
    codes: &mut [u8],
    inv: &mut [f32],
    err: Option<&mut Fp8Error>,
) {
    quantize_band_portable(x, cols, block, codes, inv, err)
}

/// `quantize_band` in plain Rust, inlined into each compiled copy.
#[inline(always)]
fn quantize_band_portable(
    x: &[f32],
    cols: usize,
    block: [usize; 2],
    codes: &mut [u8],
    inv: &mut [f32],
    mut err: Option<&mut Fp8Error>,
) {
    let [bm, bn] = block;
    let per_row = cols / bn;
    let table = fp8_table(false);
    let mut amax = vec![0f32; per_row];
    let mut scale = vec![0f32; per_row];
    let mut worst = vec![0f64; per_row];
    for (tr, band) in x.chunks(bm * cols).enumerate() {
        // Each tile's amax; torch's amax propagates NaN, which f32::max
        // would drop.
        amax.fill(0.0);
        for row in band.chunks(cols) {
            for (m, piece) in amax.iter_mut().zip(row.chunks(bn)) {
                let mx = piece.iter().fold(*m, |a, v| a.max(v.abs()));
                *m = if m.is_nan() || piece.iter().any(|v| v.is_nan()) { f32::NAN } else { mx };
            }
        }
        for ((s, i), a) in scale.iter_mut().zip(&mut inv[tr * per_row..(tr + 1) * per_row]).zip(&amax) {
            (*s, *i) = tile_scales(*a);
        }
        worst.fill(0.0);
        let at = tr * bm * cols;
        for (r, row) in band.chunks(cols).enumerate() {
            let out = &mut codes[at + r * cols..at + (r + 1) * cols];
            for (tc, (piece, dst)) in row.chunks(bn).zip(out.chunks_mut(bn)).enumerate() {
                let s = scale[tc];
                for (v, c) in piece.iter().zip(dst.iter_mut()) {
                    *c = f32_to_f8e4m3((v * s).clamp(-F8E4M3_MAX, F8E4M3_MAX));
                }
                if let Some(e) = err.as_deref_mut() {
                    let i = f64::from(inv[tr * per_row + tc]);
                    for (v, c) in piece.iter().zip(dst.iter()) {
                        let d = f64::from(*v) - f64::from(table[*c as usize]) * i;
                        e.sq_err += d * d;
                        e.sq += f64::from(*v) * f64::from(*v);
                        worst[tc] = worst[tc].max(d.abs());
                    }
                    e.elements += piece.len() as u64;
                }
            }
        }
        if let Some(e) = err.as_deref_mut() {
            for (w, a) in worst.iter().zip(&amax) {
                if *a > 0.0 {
                    e.worst = e.worst.max(w / f64::from(*a));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dtype::f8e4m3_to_f32;

    /// Two 2x2 tiles of a 2x4 band, computed by hand: the scale maps each
    /// tile's amax to 448, codes round to nearest even, and an all-zero
    /// tile keeps scale 1.
    #[test]
    fn a_band_is_quantized_tile_by_tile_as_the_reference() {
        let x = [1.0f32, -2.0, 0.0, 0.0, 0.5, 0.25, 0.0, 0.0];
        let (mut codes, mut inv) = ([0u8; 8], [0f32; 2]);
        let mut err = Fp8Error::default();
        quantize_band(&x, 4, [2, 2], &mut codes, &mut inv, Some(&mut err));
        // Tile 0: amax 2, scale 224, inv 1/224.
        assert_eq!(inv, [1.0 / 224.0, 1.0]);
        let want: Vec<u8> = [224.0f32, -448.0, 112.0, 56.0].iter().map(|v| f32_to_f8e4m3(*v)).collect();
        assert_eq!([codes[0], codes[1], codes[4], codes[5]], want[..]);
        assert_eq!([codes[2], codes[3], codes[6], codes[7]], [0; 4]);
        // Every value here is exact in E4M3 after scaling: the error is
        // only that of 1/224 in f32.
        assert_eq!(err.elements, 8);
        assert!(err.sq_err < 1e-12, "{err:?}");
        assert!((err.sq - (1.0 + 4.0 + 0.25 + 0.0625)).abs() < 1e-12);
        // A value between codes: 1.1 * 448 / 1.1 = 448, 1.0 * 448 / 1.1 = 407.27 -> 416 (codes 384, 416 around it).
        let y = [1.1f32, 1.0];
        let (mut c, mut i) = ([0u8; 2], [0f32; 1]);
        quantize_band(&y, 2, [1, 2], &mut c, &mut i, None);
        assert_eq!(f8e4m3_to_f32(c[0]), 448.0);
        assert_eq!(f8e4m3_to_f32(c[1]), 416.0);
    }
}
