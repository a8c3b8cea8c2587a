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
//!
//! With `scale_fmt: ue8m0` (DeepSeek-V3.1), each `inv` is rounded up to a
//! power of two first and `scale` is its reciprocal (`Fp8Tiles::pow2`).
//!
//! MXFP4 (`mxfp4_band`) as transformers' `quantize_to_mxfp4` computes it
//! (the gpt-oss quantizer, triton_kernels' `downcast_to_mxfp_torch` with
//! its default `ROUND_UP` scales), per group of 32 along the contraction
//! axis: the values rounded to bf16 first (`w.to(torch.bfloat16)`);
//! `amax = max |x|`; the scale is `amax / 6` rounded up to a power of two
//! on its bits (`(bits + 0x7fffff) & 0x7f800000`, so 0 for an all-zero or
//! NaN group), its exponent byte the stored E8M0 scale; each `x / scale`
//! (a multiplication by the exact reciprocal) goes to the nearest FP4
//! E2M1 value with ties away from zero, saturating at 6 (NaN too), the
//! sign kept; two codes per byte, the even element in the low nibble.

use super::quant::{fp8_table, mxfp4_table};
use crate::model::dtype::{F8E4M3_MAX, bf16_to_f32, f32_to_bf16, f32_to_f8e4m3, ldexp};

/// The quantization error over some tiles, against the f32 values.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct QuantError {
    /// Elements counted.
    pub elements: u64,
    /// `sum (x - code * inv)^2` and `sum x^2`, in f64.
    pub sq_err: f64,
    pub sq: f64,
    /// The largest `|x - code * inv| / amax` of a tile, and its tensor.
    pub worst: f64,
    pub worst_tensor: String,
}

impl QuantError {
    /// Adds another tensor's (or band's) figures.
    pub(crate) fn add(&mut self, o: &QuantError) {
        self.elements += o.elements;
        self.sq_err += o.sq_err;
        self.sq += o.sq;
        if o.worst > self.worst {
            self.worst = o.worst;
            self.worst_tensor = o.worst_tensor.clone();
        }
    }
}

/// How an FP8 weight's tiles are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fp8Tiles {
    /// `[block_m, block_n]`.
    pub block: [usize; 2],
    /// `scale_fmt: ue8m0` (DeepSeek-V3.1): each inverse scale rounded up
    /// to a power of two before quantizing, as transformers computes it,
    /// `2^ceil(log2(max(inv, f32::MIN_POSITIVE)))` in f32, the forward
    /// scale its exact reciprocal.
    pub pow2: bool,
}

/// A tile's `(scale, inv)` from its `amax` (NaN when the tile holds one).
fn tile_scales(amax: f32, pow2: bool) -> (f32, f32) {
    let (scale, inv) = if amax > 0.0 {
        let r = 1.0 / amax;
        let scale = r * F8E4M3_MAX;
        (scale, 1.0 / scale)
    } else {
        (1.0, 1.0)
    };
    if !pow2 {
        return (scale, inv);
    }
    // torch's float32 log2 rounded to nearest (the f64 logarithm rounded
    // once to f32), then its ceiling: a power of two from 2^-126 up.
    let k = ((f64::from(inv.max(f32::MIN_POSITIVE))).log2() as f32).ceil() as i32;
    let inv = ldexp(1.0, k);
    (1.0 / inv, inv)
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
    tiles: Fp8Tiles,
    codes: &mut [u8],
    inv: &mut [f32],
    err: Option<&mut QuantError>,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::model::dtype::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { quantize_band_avx2(x, cols, tiles, codes, inv, err) };
    }
    quantize_band_portable(x, cols, tiles, codes, inv, err)
}

/// `quantize_band` compiled for AVX2 (the same IEEE operations lane for
/// lane, so the same bytes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_band_avx2(
    x: &[f32],
    cols: usize,
    tiles: Fp8Tiles,
    codes: &mut [u8],
    inv: &mut [f32],
    err: Option<&mut QuantError>,
) {
    quantize_band_portable(x, cols, tiles, codes, inv, err)
}

/// `quantize_band` in plain Rust, inlined into each compiled copy.
#[inline(always)]
fn quantize_band_portable(
    x: &[f32],
    cols: usize,
    tiles: Fp8Tiles,
    codes: &mut [u8],
    inv: &mut [f32],
    mut err: Option<&mut QuantError>,
) {
    let [bm, bn] = tiles.block;
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
            (*s, *i) = tile_scales(*a, tiles.pow2);
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

/// Values per MXFP4 scale.
pub(crate) const MXFP4_GROUP: usize = 32;

/// Quantizes a band of `rows` rows of an MXFP4 weight to its packed codes
/// and E8M0 scales (see the module's doc). `x` holds the band's f32 values
/// column by column (`x[c * rows + r]`, as the float tensor `[.., cols,
/// rows]` stores them); `blocks` gets `rows x cols / 2` bytes and `scales`
/// `rows x cols / 32`, row by row as the checkpoint stores them. With
/// `err`, adds each element's error against its f32 value.
pub(crate) fn mxfp4_band(
    x: &[f32],
    rows: usize,
    blocks: &mut [u8],
    scales: &mut [u8],
    err: Option<&mut QuantError>,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::model::dtype::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { mxfp4_band_avx2(x, rows, blocks, scales, err) };
    }
    mxfp4_band_portable(x, rows, blocks, scales, err)
}

/// `mxfp4_band` compiled for AVX2 (the same IEEE operations, so the same
/// bytes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mxfp4_band_avx2(
    x: &[f32],
    rows: usize,
    blocks: &mut [u8],
    scales: &mut [u8],
    err: Option<&mut QuantError>,
) {
    mxfp4_band_portable(x, rows, blocks, scales, err)
}

/// `mxfp4_band` in plain Rust, eight rows at a time: a group's 32 values
/// of 8 neighbouring rows are 32 loads of 8 contiguous floats (a row of
/// the blocks is a column of `x`), so each step works on 8 lanes, one per
/// row, with no transpose through memory.
#[inline(always)]
fn mxfp4_band_portable(
    x: &[f32],
    rows: usize,
    blocks: &mut [u8],
    scales: &mut [u8],
    mut err: Option<&mut QuantError>,
) {
    const LANES: usize = 8;
    let table = mxfp4_table();
    let cols = x.len() / rows.max(1);
    let groups = cols / MXFP4_GROUP;
    for g in 0..groups {
        let column = |k: usize| &x[(g * MXFP4_GROUP + k) * rows..(g * MXFP4_GROUP + k + 1) * rows];
        for r in (0..rows).step_by(LANES) {
            let n = (rows - r).min(LANES);
            // x[k][l]: value k of the group in row r + l; v: rounded to bf16.
            let mut xs = [[0f32; LANES]; MXFP4_GROUP];
            let mut v = [[0f32; LANES]; MXFP4_GROUP];
            for (k, (lanes, rounded)) in xs.iter_mut().zip(&mut v).enumerate() {
                for ((d, b), s) in lanes.iter_mut().zip(rounded.iter_mut()).zip(&column(k)[r..r + n]) {
                    *d = *s;
                    *b = bf16_to_f32(f32_to_bf16(*s));
                }
            }
            // torch's max propagates NaN, which f32::max drops: tracked apart.
            let (mut amax, mut nan) = ([0f32; LANES], [false; LANES]);
            for lanes in &v {
                for l in 0..LANES {
                    amax[l] = amax[l].max(lanes[l].abs());
                    nan[l] |= lanes[l].is_nan();
                }
            }
            let mut inv = [0f32; LANES];
            let mut bits = [0u32; LANES];
            for l in 0..LANES {
                let a = if nan[l] { f32::NAN } else { amax[l] };
                bits[l] = (a / 6.0).to_bits().wrapping_add(0x007f_ffff) & 0x7f80_0000;
                inv[l] = if bits[l] == 0 { 0.0 } else { 1.0 / f32::from_bits(bits[l]) };
            }
            let mut q = [[0u8; MXFP4_GROUP]; LANES];
            for (k, lanes) in v.iter().enumerate() {
                for l in 0..LANES {
                    q[l][k] = f32_to_e2m1(lanes[l] * inv[l]);
                }
            }
            for l in 0..n {
                let at = (r + l) * groups + g;
                scales[at] = (bits[l] >> 23) as u8;
                for (b, pair) in blocks[at * 16..at * 16 + 16].iter_mut().zip(q[l].chunks_exact(2)) {
                    *b = pair[0] | (pair[1] << 4);
                }
            }
            if let Some(e) = err.as_deref_mut() {
                // Per lane over the group, then the lanes in order.
                let (mut sq_err, mut sq, mut worst, mut amax) =
                    ([0f64; LANES], [0f64; LANES], [0f64; LANES], [0f64; LANES]);
                for (k, lanes) in xs.iter().enumerate() {
                    for l in 0..LANES {
                        let xv = f64::from(lanes[l]);
                        let d = xv - f64::from(table[(bits[l] >> 23) as usize][q[l][k] as usize]);
                        sq_err[l] += d * d;
                        sq[l] += xv * xv;
                        worst[l] = worst[l].max(d.abs());
                        amax[l] = amax[l].max(xv.abs());
                    }
                }
                for l in 0..n {
                    e.sq_err += sq_err[l];
                    e.sq += sq[l];
                    if amax[l] > 0.0 {
                        e.worst = e.worst.max(worst[l] / amax[l]);
                    }
                }
                e.elements += (MXFP4_GROUP * n) as u64;
            }
        }
    }
}

/// An f32 as its FP4 E2M1 code: the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6
/// with ties away from zero (the number of midpoints at or below `|q|`),
/// 6 for anything larger and for NaN, the sign bit kept (so -0.0 and tiny
/// negatives give the code of -0).
#[inline(always)]
pub(crate) fn f32_to_e2m1(q: f32) -> u8 {
    const MIDPOINTS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let a = q.abs();
    let m: u8 = if a.is_nan() { 7 } else { MIDPOINTS.iter().map(|t| u8::from(a >= *t)).sum() };
    ((q.to_bits() >> 28) as u8 & 8) | m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dtype::{FP4_E2M1, f8e4m3_to_f32};

    /// Two 2x2 tiles of a 2x4 band, computed by hand: the scale maps each
    /// tile's amax to 448, codes round to nearest even, and an all-zero
    /// tile keeps scale 1.
    #[test]
    fn a_band_is_quantized_tile_by_tile_as_the_reference() {
        let x = [1.0f32, -2.0, 0.0, 0.0, 0.5, 0.25, 0.0, 0.0];
        let (mut codes, mut inv) = ([0u8; 8], [0f32; 2]);
        let mut err = QuantError::default();
        quantize_band(&x, 4, Fp8Tiles { block: [2, 2], pow2: false }, &mut codes, &mut inv, Some(&mut err));
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
        quantize_band(&y, 2, Fp8Tiles { block: [1, 2], pow2: false }, &mut c, &mut i, None);
        assert_eq!(f8e4m3_to_f32(c[0]), 448.0);
        assert_eq!(f8e4m3_to_f32(c[1]), 416.0);
    }

    /// ue8m0: amax 2 gives inv 2 / 448 = 1/224, rounded up to 2^-7 (1/128),
    /// values scaled by 128; an inverse exactly a power of two stays; an
    /// all-zero tile keeps 1.
    #[test]
    fn ue8m0_rounds_each_inverse_scale_up_to_a_power_of_two() {
        let x = [2.0f32, -1.0, 0.0, 0.0, 448.0 / 64.0, 1.0, 0.0, 0.0];
        let (mut codes, mut inv) = ([0u8; 8], [0f32; 4]);
        quantize_band(&x, 2, Fp8Tiles { block: [1, 2], pow2: true }, &mut codes, &mut inv, None);
        assert_eq!(inv, [1.0 / 128.0, 1.0, 1.0 / 64.0, 1.0]);
        assert_eq!([f8e4m3_to_f32(codes[0]), f8e4m3_to_f32(codes[1])], [256.0, -128.0]);
        assert_eq!([f8e4m3_to_f32(codes[4]), f8e4m3_to_f32(codes[5])], [448.0, 64.0]);
        assert_eq!(tile_scales(f32::MIN_POSITIVE * 1e-3, true).1, f32::MIN_POSITIVE);
    }

    /// Every FP4 value and every midpoint between two, with the values just
    /// below and above it: ties go away from zero, the rest to the nearest;
    /// beyond 6 and NaN saturate; the sign is kept.
    #[test]
    fn e2m1_rounds_to_nearest_with_ties_away_from_zero() {
        for (code, v) in FP4_E2M1.iter().enumerate().take(8) {
            assert_eq!(f32_to_e2m1(*v), code as u8, "{v}");
            assert_eq!(f32_to_e2m1(-*v), code as u8 | 8, "-{v}");
        }
        for (lo, hi) in [(0u8, 1u8), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)] {
            let mid = (FP4_E2M1[lo as usize] + FP4_E2M1[hi as usize]) / 2.0;
            assert_eq!(f32_to_e2m1(mid), hi, "tie {mid}");
            assert_eq!(f32_to_e2m1(f32::from_bits(mid.to_bits() - 1)), lo, "below {mid}");
            assert_eq!(f32_to_e2m1(-f32::from_bits(mid.to_bits() + 1)), hi | 8, "above -{mid}");
        }
        for v in [6.5f32, 1e30, f32::INFINITY, f32::NAN] {
            assert_eq!(f32_to_e2m1(v), 7, "{v}");
        }
        assert_eq!(f32_to_e2m1(f32::NEG_INFINITY), 15);
        assert_eq!(f32_to_e2m1(-1e-30), 8);
        assert_eq!(f32_to_e2m1(0.2499), 0);
    }

    /// One row of two groups computed by hand: amax 3 gives 3 / 6 = 0.5, a
    /// power of two (scale byte 126, values doubled); amax 7 gives 7 / 6,
    /// rounded up to 2 (byte 128, values halved); an all-zero group has
    /// byte 0.
    #[test]
    fn an_mxfp4_band_is_scaled_and_packed_as_the_reference() {
        let mut x = vec![0f32; 96];
        x[0] = 3.0;
        x[1] = -0.5;
        x[2] = 0.3;
        x[32] = 7.0;
        x[33] = 2.5;
        x[34] = -1.0;
        let (mut blocks, mut scales) = ([0u8; 48], [0u8; 3]);
        let mut err = QuantError::default();
        mxfp4_band(&x, 1, &mut blocks, &mut scales, Some(&mut err));
        assert_eq!(scales, [126, 128, 0]);
        // 3 -> 6 (7), -0.5 -> -1 (10), 0.3 -> 0.6 -> 0.5 (1).
        assert_eq!(blocks[0], 7 | (10 << 4));
        assert_eq!(blocks[1], 1);
        // 7 -> 3.5, a tie, away: 4 (6); 2.5 -> 1.25, a tie: 1.5 (3); -1 -> -0.5 (9).
        assert_eq!(blocks[16], 6 | (3 << 4));
        assert_eq!(blocks[17], 9);
        assert!(blocks[32..].iter().all(|b| *b == 0));
        // Errors: 0.3 -> 0.25 (0.05), 7 -> 8 (1), 2.5 -> 3 (0.5).
        let sq_err = 0.05f64.powi(2) + 1.0 + 0.25;
        assert!((err.sq_err - sq_err).abs() < 1e-6, "{err:?}");
        assert!((err.worst - 1.0 / 7.0).abs() < 1e-9, "{err:?}");
        // A column-major band of two rows: element (c, r) at c * 2 + r.
        let y: Vec<f32> = (0..64).map(|i| if i % 2 == 0 { 1.0 } else { -4.0 }).collect();
        let (mut b2, mut s2) = ([0u8; 32], [0u8; 2]);
        mxfp4_band(&y, 2, &mut b2, &mut s2, None);
        // Row 0 all 1.0: 1 / 6 rounds up to 0.25 (byte 125), codes 4.0 (6);
        // row 1 all -4.0: 4 / 6 rounds up to 1 (byte 127), codes -4 (14).
        assert_eq!(s2, [125, 127]);
        assert!(b2[..16].iter().all(|b| *b == 0x66), "{b2:?}");
        assert!(b2[16..].iter().all(|b| *b == 0xee), "{b2:?}");
    }
}
