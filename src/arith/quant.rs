//! Quantized operands decoded to f32 block by block, as transformers'
//! dequantizers compute them, so that results match a model loaded with
//! `dequantize=True` bit for bit:
//!
//! - FP8 block-scaled: `f32(code) * f32(scale)`, one f32 multiplication
//!   (`Fp8Dequantize`); an E8M0 scale is `2^(b - 127)` in f32 first.
//! - MXFP4 (gpt-oss): `ldexp(fp4(code), b - 127)` (`convert_moe_packed_tensors`),
//!   exact in f32 wherever the result is finite, with the last two axes
//!   swapped (blocks `[E, R, G, 16]` read as the tensor `[E, G * 32, R]`).
//!
//! Decoding is a pure function of the element index, so it survives any
//! chunking (contract 1).

use crate::model::dtype::{
    FP4_E2M1, FloatType, decode, e8m0_exponent, f8e4m3_to_f32, f8e5m2_to_f32, f32_to_bf16, ldexp,
};

/// The element type of a quantized operand's scales.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ScaleType {
    Float(FloatType),
    /// A power-of-two exponent byte (OCP MX E8M0).
    E8m0,
}

/// A quantized tensor's bytes and how to decode them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Quantized<'a> {
    /// FP8 codes of `[.., rows, cols]` matrices (row-major), each
    /// `block` multiplied by its scale, scales `[.., ceil(rows / block[0]),
    /// ceil(cols / block[1])]` (one scale when `per_tensor`).
    Fp8 {
        e5m2: bool,
        codes: &'a [u8],
        rows: u64,
        cols: u64,
        block: [u64; 2],
        scales: &'a [u8],
        scale_type: ScaleType,
    },
    /// gpt-oss MXFP4: `blocks [E, rows, groups, 16]`, `scales [E, rows,
    /// groups]`, read as `[E, groups * 32, rows]`.
    Mxfp4 { blocks: &'a [u8], scales: &'a [u8], rows: u64, groups: u64 },
}

impl Quantized<'_> {
    /// Decodes elements `start..start + out.len()` into `out`.
    pub(crate) fn decode_at(&self, start: u64, out: &mut [f32]) {
        match *self {
            Quantized::Fp8 { e5m2, codes, rows, cols, block, scales, scale_type } => {
                let lut = fp8_table(e5m2);
                let scale_cols = cols.div_ceil(block[1]);
                let per_matrix = rows.div_ceil(block[0]) * scale_cols;
                let single = scales.len() == scale_width(scale_type);
                let mut p = start;
                let mut o = 0;
                while o < out.len() {
                    let (m, rc) = (p / (rows * cols), p % (rows * cols));
                    let (r, c) = (rc / cols, rc % cols);
                    // A run inside one row and one block shares its scale.
                    let end = ((c / block[1] + 1) * block[1]).min(cols);
                    let n = ((end - c) as usize).min(out.len() - o);
                    let at =
                        if single { 0 } else { m * per_matrix + (r / block[0]) * scale_cols + c / block[1] };
                    let s = scale(scales, scale_type, at as usize);
                    for (d, code) in out[o..o + n].iter_mut().zip(&codes[p as usize..p as usize + n]) {
                        *d = lut[*code as usize] * s;
                    }
                    o += n;
                    p += n as u64;
                }
            }
            Quantized::Mxfp4 { blocks, scales, rows, groups } => {
                mxfp4_into(blocks, scales, rows, groups, mxfp4_table(), start, out)
            }
        }
    }

    /// `decode_at` as bf16 bits, for MXFP4: every MXFP4 value (`fp4 *
    /// 2^e`, two significant bits, `e` in f32's range) is exact in bf16,
    /// so this is the same values at half the bytes, and the arithmetic
    /// takes its bf16 path. `false` (nothing written) for FP8, whose f32
    /// scales make values bf16 cannot hold.
    pub(crate) fn decode_bf16_at(&self, start: u64, out: &mut [u16]) -> bool {
        let Quantized::Mxfp4 { blocks, scales, rows, groups } = *self else { return false };
        mxfp4_into(blocks, scales, rows, groups, mxfp4_table_bf16(), start, out);
        true
    }
}

/// Rows of a decode tile: each column run written out is this many values.
const TILE_ROWS: usize = 64;

/// Elements `start..start + out.len()` of MXFP4 `blocks [E, rows, groups,
/// 16]` with `scales [E, rows, groups]`, read as `[E, groups * 32, rows]`,
/// each looked up in `table` (by scale byte, then code).
fn mxfp4_into<T: Decoded>(
    blocks: &[u8],
    scales: &[u8],
    rows: u64,
    groups: u64,
    table: &[[T; 16]; 256],
    start: u64,
    out: &mut [T],
) {
    let cols = groups * 32;
    let (stride, bstride) = (groups as usize, groups as usize * 16);
    let mut p = start;
    let mut o = 0;
    while o < out.len() {
        let (e, rc) = (p / (cols * rows), p % (cols * rows));
        // Element (c, r) of the tensor is (r, c) of the blocks: a
        // run along r steps one block row at a time.
        let (c, r) = (rc / rows, rc % rows);
        let whole = ((out.len() - o) as u64 / rows).min(cols - c);
        if r == 0 && whole > 0 {
            // Whole columns: read each block row once, left to
            // right, and scatter it down the columns (the lines
            // being written stay in cache).
            let n = (whole * rows) as usize;
            let dst = &mut out[o..o + n];
            let (rows, whole) = (rows as usize, whole as usize);
            // In tiles of 32 columns (a group when aligned) by 64
            // rows: each block row's bytes decoded in order into a
            // local tile, then written out a column run at a time.
            // Strided stores straight to `dst` (a page apart)
            // thrash the cache and the TLB.
            let mut tile = [[T::default(); 32]; TILE_ROWS];
            // The bytes of one block row this range covers.
            let span = (c as usize / 32 * 16)..((c as usize + whole).div_ceil(32) * 16);
            for r0 in (0..rows).step_by(TILE_ROWS) {
                let r1 = (r0 + TILE_ROWS).min(rows);
                // The next tile's rows are a block row apart (a page or
                // so): ask for them now, or each one stalls on its load.
                for r in r1..(r1 + TILE_ROWS).min(rows) {
                    let row = e as usize * rows + r;
                    for line in (span.start..span.end).step_by(64) {
                        prefetch(&blocks[row * bstride + line]);
                    }
                    prefetch(&scales[row * stride + span.start / 16]);
                }
                for k0 in (0..whole).step_by(32) {
                    let k1 = (k0 + 32).min(whole);
                    let c0 = c as usize + k0;
                    let aligned = c0.is_multiple_of(32) && k1 - k0 == 32;
                    for (r, t) in (r0..r1).zip(tile.iter_mut()) {
                        let row = e as usize * rows + r;
                        if aligned {
                            let g = row * stride + c0 / 32;
                            let values = &table[scales[g] as usize];
                            let bytes = &blocks[g * 16..g * 16 + 16];
                            for (pair, &b) in t.chunks_exact_mut(2).zip(bytes) {
                                pair[0] = values[(b & 0x0f) as usize];
                                pair[1] = values[(b >> 4) as usize];
                            }
                            continue;
                        }
                        for (k, v) in t[..k1 - k0].iter_mut().enumerate() {
                            let cc = c0 + k;
                            let g = row * stride + cc / 32;
                            let code = (blocks[g * 16 + (cc % 32) / 2] >> ((cc % 2) * 4)) & 0x0f;
                            *v = table[scales[g] as usize][code as usize];
                        }
                    }
                    for k in k0..k1 {
                        let column = &mut dst[k * rows + r0..k * rows + r1];
                        for (d, t) in column.iter_mut().zip(&tile) {
                            *d = t[k - k0];
                        }
                    }
                }
            }
            o += n;
            p += n as u64;
            continue;
        }
        let n = ((rows - r) as usize).min(out.len() - o);
        let mut g = ((e * rows + r) * groups + c / 32) as usize;
        let mut b = g * 16 + (c % 32) as usize / 2;
        let shift = if c % 2 == 0 { 0 } else { 4 };
        for d in &mut out[o..o + n] {
            let code = (blocks[b] >> shift) & 0x0f;
            *d = table[scales[g] as usize][code as usize];
            g += stride;
            b += bstride;
        }
        o += n;
        p += n as u64;
    }
}

/// A type MXFP4 decodes to: f32, or bf16 bits.
trait Decoded: Copy + Default {}

impl Decoded for f32 {}
impl Decoded for u16 {}

/// Asks the CPU to bring the cache line holding `x` in (a hint only).
#[inline(always)]
fn prefetch(x: &u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing; `x` is a valid
    // reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch(std::ptr::from_ref(x).cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Bytes of one scale.
fn scale_width(t: ScaleType) -> usize {
    match t {
        ScaleType::Float(f) => f.size(),
        ScaleType::E8m0 => 1,
    }
}

/// Scale `i` as f32: an E8M0 byte as `exp2(b - 127)` in f32, as
/// transformers' FP8 dequantizer computes it (`0xff` gives infinity).
#[inline]
fn scale(scales: &[u8], t: ScaleType, i: usize) -> f32 {
    match t {
        ScaleType::Float(f) => {
            let w = f.size();
            let mut v = [0f32];
            decode(f, &scales[i * w..(i + 1) * w], &mut v);
            v[0]
        }
        ScaleType::E8m0 => {
            let e = e8m0_exponent(scales[i]);
            if e > 127 { f32::INFINITY } else { ldexp(1.0, e) }
        }
    }
}

/// Every MXFP4 value: `ldexp(fp4(code), b - 127)` for each scale byte `b`
/// and code (16 KiB, so one load per element in the hot loop).
pub(crate) fn mxfp4_table() -> &'static [[f32; 16]; 256] {
    static TABLE: std::sync::OnceLock<Box<[[f32; 16]; 256]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        Box::new(std::array::from_fn(|b| std::array::from_fn(|c| ldexp(FP4_E2M1[c], e8m0_exponent(b as u8)))))
    })
}

/// `mxfp4_table` as bf16 bits (exact: see `Quantized::decode_bf16_at`).
fn mxfp4_table_bf16() -> &'static [[u16; 16]; 256] {
    static TABLE: std::sync::OnceLock<Box<[[u16; 16]; 256]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| Box::new(mxfp4_table().map(|row| row.map(f32_to_bf16))))
}

/// The 256 FP8 codes' values.
pub(crate) fn fp8_table(e5m2: bool) -> &'static [f32; 256] {
    static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    let (cell, f): (_, fn(u8) -> f32) = if e5m2 { (&E5M2, f8e5m2_to_f32) } else { (&E4M3, f8e4m3_to_f32) };
    cell.get_or_init(|| std::array::from_fn(|b| f(b as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FP8 with a ceil grid (rows and columns not multiples of the block),
    /// decoded over arbitrary ranges, against an f64 reference of
    /// code * scale (exact: both fit f32's significand).
    #[test]
    fn fp8_blocks_decode_over_any_range() {
        let (rows, cols, block) = (5u64, 7u64, [2u64, 3u64]);
        let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect();
        let grid = rows.div_ceil(2) * cols.div_ceil(3);
        let sv: Vec<f32> = (0..grid).map(|i| 0.5 + i as f32 * 0.25).collect();
        let scales: Vec<u8> = sv.iter().flat_map(|s| s.to_le_bytes()).collect();
        let q = Quantized::Fp8 {
            e5m2: false,
            codes: &codes,
            rows,
            cols,
            block,
            scales: &scales,
            scale_type: ScaleType::Float(FloatType::F32),
        };
        for start in 0..rows * cols {
            for len in [1, 2, 5, 13] {
                let len = len.min((rows * cols - start) as usize);
                let mut out = vec![0f32; len];
                q.decode_at(start, &mut out);
                for (k, v) in out.iter().enumerate() {
                    let p = start + k as u64;
                    let (r, c) = (p / cols, p % cols);
                    let s = f64::from(sv[((r / 2) * cols.div_ceil(3) + c / 3) as usize]);
                    let want = f64::from(f8e4m3_to_f32(codes[p as usize])) * s;
                    assert_eq!(f64::from(*v), want, "element {p}");
                }
            }
        }
    }

    /// Any range (whole columns, aligned or not, and partial ones) decodes
    /// to the same values as one decode of the whole tensor.
    #[test]
    fn mxfp4_decode_over_any_range_matches_the_whole() {
        let (experts, rows, groups) = (2u64, 70u64, 3u64);
        let blocks: Vec<u8> = (0..experts * rows * groups * 16).map(|i| (i * 131 + 7) as u8).collect();
        let scales: Vec<u8> = (0..experts * rows * groups).map(|i| 110 + (i % 30) as u8).collect();
        let q = Quantized::Mxfp4 { blocks: &blocks, scales: &scales, rows, groups };
        let total = (experts * groups * 32 * rows) as usize;
        let mut whole = vec![0f32; total];
        q.decode_at(0, &mut whole);
        for (start, len) in
            [(0, 70), (70, 140), (1, 5000), (69, 71), (70 * 31, 70 * 3), (4000, 9000), (0, total)]
        {
            let len = len.min(total - start);
            let mut part = vec![0f32; len];
            q.decode_at(start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "{start}+{len}");
        }
    }

    /// Every MXFP4 value (each scale byte, each code) is exact in bf16, so
    /// the bf16 decode is the f32 one, bit for bit, over any range.
    #[test]
    fn mxfp4_values_are_exact_in_bf16() {
        for (row, bf) in mxfp4_table().iter().zip(mxfp4_table_bf16()) {
            for (v, b) in row.iter().zip(bf) {
                assert_eq!(crate::model::dtype::bf16_to_f32(*b).to_bits(), v.to_bits(), "{v}");
            }
        }
        let (experts, rows, groups) = (2u64, 70u64, 3u64);
        let blocks: Vec<u8> = (0..experts * rows * groups * 16).map(|i| (i * 131 + 7) as u8).collect();
        let scales: Vec<u8> = (0..experts * rows * groups).map(|i| (i * 37 % 256) as u8).collect();
        let q = Quantized::Mxfp4 { blocks: &blocks, scales: &scales, rows, groups };
        let total = (experts * groups * 32 * rows) as usize;
        for (start, len) in [(0, total), (69, 5000), (70 * 31, 70 * 3)] {
            let (mut f, mut b) = (vec![0f32; len], vec![0u16; len]);
            q.decode_at(start as u64, &mut f);
            assert!(q.decode_bf16_at(start as u64, &mut b));
            for (x, y) in f.iter().zip(&b) {
                assert_eq!(crate::model::dtype::bf16_to_f32(*y).to_bits(), x.to_bits());
            }
        }
    }

    /// MXFP4 read transposed: element (e, c, r) is nibble c of row r.
    #[test]
    fn mxfp4_reads_the_swapped_axes() {
        let (experts, rows, groups) = (2u64, 3u64, 2u64);
        let blocks: Vec<u8> = (0..experts * rows * groups * 16).map(|i| (i * 29 + 3) as u8).collect();
        let scales: Vec<u8> = (0..experts * rows * groups).map(|i| 120 + i as u8).collect();
        let q = Quantized::Mxfp4 { blocks: &blocks, scales: &scales, rows, groups };
        let cols = groups * 32;
        let mut out = vec![0f32; (experts * cols * rows) as usize];
        q.decode_at(0, &mut out);
        for e in 0..experts {
            for c in 0..cols {
                for r in 0..rows {
                    let g = (e * rows + r) * groups + c / 32;
                    let byte = blocks[(g * 16 + (c % 32) / 2) as usize];
                    let code = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                    let want =
                        f64::from(FP4_E2M1[code as usize]) * 2f64.powi(i32::from(scales[g as usize]) - 127);
                    assert_eq!(f64::from(out[((e * cols + c) * rows + r) as usize]), want);
                }
            }
        }
    }
}
