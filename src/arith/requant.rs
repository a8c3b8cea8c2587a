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

use crate::model::dtype::{F8E4M3_MAX, f8e4m3_to_f32, f32_to_f8e4m3};

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
/// element's dequantized code.
pub(crate) fn quantize_band(
    x: &[f32],
    cols: usize,
    block: [usize; 2],
    codes: &mut [u8],
    inv: &mut [f32],
    mut err: Option<&mut Fp8Error>,
) {
    let [bm, bn] = block;
    let tiles_per_row = cols / bn;
    for (tr, band) in x.chunks(bm * cols).enumerate() {
        for tc in 0..tiles_per_row {
            let cells =
                || (0..band.len() / cols).map(move |r| r * cols + tc * bn).flat_map(move |a| a..a + bn);
            // torch's amax propagates NaN, which f32::max would drop.
            let amax = cells().fold(0f32, |m, i| {
                if band[i].is_nan() || m.is_nan() { f32::NAN } else { m.max(band[i].abs()) }
            });
            let (scale, inv_s) = tile_scales(amax);
            inv[tr * tiles_per_row + tc] = inv_s;
            let base = tr * bm * cols;
            let mut tile_worst = 0f64;
            for i in cells() {
                let q = f32_to_f8e4m3((band[i] * scale).clamp(-F8E4M3_MAX, F8E4M3_MAX));
                codes[base + i] = q;
                if let Some(e) = err.as_deref_mut() {
                    let back = f64::from(f8e4m3_to_f32(q)) * f64::from(inv_s);
                    let d = f64::from(band[i]) - back;
                    e.sq_err += d * d;
                    e.sq += f64::from(band[i]) * f64::from(band[i]);
                    e.elements += 1;
                    tile_worst = tile_worst.max(d.abs());
                }
            }
            if let Some(e) = err.as_deref_mut()
                && amax > 0.0
            {
                e.worst = e.worst.max(tile_worst / f64::from(amax));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
