//! Element types of safetensors files, and the f32 decode/encode that
//! contract 1 (numerics) rests on.
//!
//! Every safetensors dtype is known by name and width so that headers can be
//! validated (`dtype x shape = bytes`) whatever they hold; arithmetic is only
//! done on the three float types LLM checkpoints use: BF16, F16 and F32.
//! Decoding to f32 is exact for all three; encoding rounds once,
//! round-to-nearest-even, with NaN kept a (quiet) NaN.

use std::fmt;

/// A safetensors element type, spelled as in the format's JSON header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// Booleans, one byte each.
    Bool,
    /// Unsigned 8-bit integers.
    U8,
    /// Signed 8-bit integers.
    I8,
    /// 8-bit float, 5 exponent and 2 mantissa bits.
    F8E5M2,
    /// 8-bit float, 4 exponent and 3 mantissa bits.
    F8E4M3,
    /// 8-bit scale factor (exponent only).
    F8E8M0,
    /// 4-bit float.
    F4,
    /// 6-bit float, 2 exponent and 3 mantissa bits.
    F6E2M3,
    /// 6-bit float, 3 exponent and 2 mantissa bits.
    F6E3M2,
    /// Signed 16-bit integers.
    I16,
    /// Unsigned 16-bit integers.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// Signed 32-bit integers.
    I32,
    /// Unsigned 32-bit integers.
    U32,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integers.
    I64,
    /// Unsigned 64-bit integers.
    U64,
    /// Complex numbers of two f32.
    C64,
}

const ALL: [(DType, &str, u64); 20] = [
    (DType::Bool, "BOOL", 8),
    (DType::U8, "U8", 8),
    (DType::I8, "I8", 8),
    (DType::F8E5M2, "F8_E5M2", 8),
    (DType::F8E4M3, "F8_E4M3", 8),
    (DType::F8E8M0, "F8_E8M0", 8),
    (DType::F4, "F4", 4),
    (DType::F6E2M3, "F6_E2M3", 6),
    (DType::F6E3M2, "F6_E3M2", 6),
    (DType::I16, "I16", 16),
    (DType::U16, "U16", 16),
    (DType::F16, "F16", 16),
    (DType::BF16, "BF16", 16),
    (DType::I32, "I32", 32),
    (DType::U32, "U32", 32),
    (DType::F32, "F32", 32),
    (DType::F64, "F64", 64),
    (DType::I64, "I64", 64),
    (DType::U64, "U64", 64),
    (DType::C64, "C64", 64),
];

impl DType {
    /// Parses a header dtype string (`"BF16"`, `"F8_E4M3"`, ...).
    pub fn parse(name: &str) -> Option<DType> {
        ALL.iter().find(|(_, n, _)| *n == name).map(|(d, _, _)| *d)
    }

    /// The header spelling.
    pub fn name(self) -> &'static str {
        ALL.iter().find(|(d, _, _)| *d == self).map(|e| e.1).unwrap()
    }

    /// Width of one element in bits (sub-byte float formats exist).
    pub fn bits(self) -> u64 {
        ALL.iter().find(|(d, _, _)| *d == self).map(|e| e.2).unwrap()
    }

    /// The float type chatvec computes with, if this is one.
    pub fn float(self) -> Option<FloatType> {
        match self {
            DType::BF16 => Some(FloatType::BF16),
            DType::F16 => Some(FloatType::F16),
            DType::F32 => Some(FloatType::F32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The dtypes chatvec does arithmetic on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatType {
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::BF16 | FloatType::F16 => 2,
            FloatType::F32 => 4,
        }
    }

    /// The safetensors dtype of this float type.
    pub fn dtype(self) -> DType {
        match self {
            FloatType::BF16 => DType::BF16,
            FloatType::F16 => DType::F16,
            FloatType::F32 => DType::F32,
        }
    }

    /// Parses the command-line spelling (`bf16`, `f16`, `f32`, also the
    /// torch names `bfloat16`, `float16`, `float32`).
    pub fn parse_cli(s: &str) -> Option<FloatType> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(FloatType::BF16),
            "f16" | "fp16" | "float16" | "half" => Some(FloatType::F16),
            "f32" | "fp32" | "float32" | "float" => Some(FloatType::F32),
            _ => None,
        }
    }

    /// The name transformers writes as `torch_dtype` in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::BF16 => "bfloat16",
            FloatType::F16 => "float16",
            FloatType::F32 => "float32",
        }
    }
}

/// bf16 bits to f32: exact (bf16 is the top half of an f32).
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to bf16 bits, round-to-nearest-even. NaN stays NaN (quieted, sign
/// kept); overflow rounds to infinity as IEEE requires. Written out by hand
/// (rather than through a library) because the CUDA kernels must do exactly
/// the same thing on the same bits.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        return ((b >> 16) | 0x0040) as u16;
    }
    let lsb = (b >> 16) & 1;
    ((b + 0x7fff + lsb) >> 16) as u16
}

/// f16 bits to f32: exact.
#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// f32 to f16 bits, round-to-nearest-even (IEEE conversion as implemented by
/// `half`, which matches the hardware F16C instruction and CUDA's `__float2half_rn`).
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// FP8 E4M3 (OCP `e4m3fn`: no infinities, `S.1111.111` is NaN) bits to
/// f32: exact.
pub(crate) fn f8e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 0xf), f32::from(b & 7));
    match e {
        0xf if m == 7.0 => f32::NAN,
        0 => sign * m * 2f32.powi(-9),
        _ => sign * (1.0 + m / 8.0) * 2f32.powi(e - 7),
    }
}

/// The largest finite FP8 E4M3 value (`S.1111.110`).
pub(crate) const F8E4M3_MAX: f32 = 448.0;

/// f32 to FP8 E4M3 bits, round to nearest, ties to even, as torch's
/// `.to(torch.float8_e4m3fn)`. Normal results (from 2^-6) round the f32
/// mantissa to 3 bits on the bit pattern; below, the value is a multiple
/// of 2^-9 and `|x| * 512` (exact) is rounded to an integer, ties to even
/// (8 is the first normal code, so both ranges meet). Branch-light: it runs
/// once per element of every weight written as FP8. Magnitudes past the
/// largest finite value saturate to it (callers clamp first, as the
/// reference does); NaN is `0x7f`.
#[inline(always)]
pub(crate) fn f32_to_f8e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(F8E4M3_MAX);
    // 2^-6, the least normal value.
    let code = if a < 1.0 / 64.0 {
        // |x| * 512 < 8: adding 2^23 rounds it to an integer, ties to
        // even, in f32's own rounding (no libm call).
        const SHIFT: f32 = 8_388_608.0;
        ((a * 512.0 + SHIFT) - SHIFT) as u8
    } else {
        let bits = a.to_bits();
        // Round to nearest even at mantissa bit 20, then drop 20 bits.
        let rounded = (bits + 0x7_ffff + ((bits >> 20) & 1)) >> 20;
        // f32's exponent bias is 127, E4M3's 7.
        (rounded - ((127 - 7) << 3)).min(0x7e) as u8
    };
    sign | code
}

/// FP8 E5M2 bits to f32: exact (E5M2 is the top byte of an IEEE half).
pub(crate) fn f8e5m2_to_f32(b: u8) -> f32 {
    f16_to_f32(u16::from(b) << 8)
}

/// An E8M0 scale byte (OCP MX: a biased power of two) as its exponent,
/// `b - 127`. `0xff`, NaN in the specification, gives 128 as it does in
/// transformers' dequantizers (`scales - 127`), which chatvec matches.
pub(crate) fn e8m0_exponent(b: u8) -> i32 {
    i32::from(b) - 127
}

/// `x * 2^e` rounded once, for `e` in `-127..=128` (an E8M0 scale): as
/// `torch.ldexp`, exact unless the result leaves f32's range.
#[inline(always)]
pub(crate) fn ldexp(x: f32, e: i32) -> f32 {
    match e {
        128 => x * f32::from_bits(254 << 23) * 2.0,
        -127 => x * f32::from_bits(1 << 22),
        _ => x * f32::from_bits(((e + 127) as u32) << 23),
    }
}

/// The FP4 E2M1 values of the 16 codes (sign in the top bit), as the OCP
/// MX specification and gpt-oss's checkpoints define them.
pub(crate) const FP4_E2M1: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Whether this CPU has AVX2, for the hot loops that have a copy compiled
/// for it (`#[target_feature]` wrappers around the same `#[inline(always)]`
/// code): 8 lanes instead of the baseline's 4 made a CPU-bound apply 12%
/// faster. The operations are the same IEEE ones lane for lane (no FMA is
/// enabled, and Rust never contracts), so the bytes do not change.
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Decodes little-endian `src` of type `ty` into `dst` (one f32 per element).
/// `src` must hold exactly `dst.len()` elements; no alignment is assumed.
#[inline(always)]
pub(crate) fn decode(ty: FloatType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * ty.size());
    match ty {
        FloatType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        FloatType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        FloatType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Encodes `src` into little-endian `dst` of type `ty`, rounding once.
#[inline(always)]
pub(crate) fn encode(ty: FloatType, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * ty.size());
    match ty {
        FloatType::BF16 => {
            for (s, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
                c.copy_from_slice(&f32_to_bf16(*s).to_le_bytes());
            }
        }
        FloatType::F16 => {
            for (s, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
                c.copy_from_slice(&f32_to_f16(*s).to_le_bytes());
            }
        }
        FloatType::F32 => {
            for (s, c) in src.iter().zip(dst.chunks_exact_mut(4)) {
                c.copy_from_slice(&s.to_le_bytes());
            }
        }
    }
}

/// Whether any value of the little-endian `bytes` of `ty` is NaN or
/// infinite, eight bytes at a time: with `t = (x & E) ^ E` (`E` the
/// exponent bits of each lane), a lane is non-finite exactly when it is 0,
/// and `(t - 1s) & !t & high bits` is non-zero exactly when some lane is.
/// A pass over every output chunk, so it must cost next to nothing.
pub(crate) fn any_nonfinite(ty: FloatType, bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { any_nonfinite_avx2(ty, bytes) };
    }
    any_nonfinite_portable(ty, bytes)
}

/// `any_nonfinite` compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn any_nonfinite_avx2(ty: FloatType, bytes: &[u8]) -> bool {
    any_nonfinite_portable(ty, bytes)
}

/// `any_nonfinite` in plain Rust, inlined into each compiled copy (and
/// into the arithmetic's own AVX2 loop, which checks each block it
/// encodes while the block is in cache).
#[inline(always)]
pub(crate) fn any_nonfinite_portable(ty: FloatType, bytes: &[u8]) -> bool {
    let (e, ones, high): (u64, u64, u64) = match ty {
        FloatType::BF16 => (0x7f80_7f80_7f80_7f80, 0x0001_0001_0001_0001, 0x8000_8000_8000_8000),
        FloatType::F16 => (0x7c00_7c00_7c00_7c00, 0x0001_0001_0001_0001, 0x8000_8000_8000_8000),
        FloatType::F32 => (0x7f80_0000_7f80_0000, 0x0000_0001_0000_0001, 0x8000_0000_8000_0000),
    };
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    // A plain loop, not a closure, so the AVX2 copy vectorizes it.
    let mut found = 0u64;
    for w in words {
        let x = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        let t = (x & e) ^ e;
        found |= t.wrapping_sub(ones) & !t & high;
    }
    found != 0 || nonfinite(ty, tail) > 0
}

/// How many values of the little-endian `bytes` of `ty` are NaN or
/// infinite (every exponent bit set).
pub(crate) fn nonfinite(ty: FloatType, bytes: &[u8]) -> usize {
    match ty {
        FloatType::BF16 => {
            bytes.chunks_exact(2).filter(|c| c[1] & 0x7f == 0x7f && c[0] & 0x80 == 0x80).count()
        }
        FloatType::F16 => bytes.chunks_exact(2).filter(|c| c[1] & 0x7c == 0x7c).count(),
        FloatType::F32 => {
            bytes.chunks_exact(4).filter(|c| c[3] & 0x7f == 0x7f && c[2] & 0x80 == 0x80).count()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time test against a value-by-value reference, for
    /// every bf16 and f16 bit pattern in every lane, and f32 specials.
    #[test]
    fn nonfinite_values_are_found_in_any_lane() {
        for ty in [FloatType::BF16, FloatType::F16] {
            for bits in 0..=u16::MAX {
                let v = match ty {
                    FloatType::BF16 => f32::from_bits((bits as u32) << 16),
                    _ => half::f16::from_bits(bits).to_f32(),
                };
                for lane in 0..5 {
                    let mut bytes = vec![0u8; 10];
                    bytes[lane * 2..lane * 2 + 2].copy_from_slice(&bits.to_le_bytes());
                    assert_eq!(any_nonfinite(ty, &bytes), !v.is_finite(), "{ty:?} {bits:#x} lane {lane}");
                    assert_eq!(any_nonfinite_portable(ty, &bytes), !v.is_finite(), "baseline copy");
                }
            }
        }
        for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, -0.0, 1.0] {
            for lane in 0..3 {
                let mut bytes = vec![0u8; 12];
                bytes[lane * 4..lane * 4 + 4].copy_from_slice(&v.to_le_bytes());
                assert_eq!(any_nonfinite(FloatType::F32, &bytes), !v.is_finite(), "{v} lane {lane}");
                assert_eq!(any_nonfinite_portable(FloatType::F32, &bytes), !v.is_finite(), "baseline copy");
            }
        }
    }

    /// Every finite code comes back as itself; values between two codes go
    /// to the nearer, midpoints to the even code, checked in f64; past 448
    /// saturates; NaN is 0x7f; the sign is kept (also of zero).
    #[test]
    fn f32_to_f8e4m3_rounds_to_nearest_even_over_every_code() {
        let codes: Vec<u8> = (0..=0x7eu8).collect();
        for &c in &codes {
            for sign in [0u8, 0x80] {
                assert_eq!(f32_to_f8e4m3(f8e4m3_to_f32(sign | c)), sign | c, "{:#x}", sign | c);
            }
        }
        for w in codes.windows(2) {
            let (a, b) = (f64::from(f8e4m3_to_f32(w[0])), f64::from(f8e4m3_to_f32(w[1])));
            let mid = (a + b) / 2.0;
            let even = if w[0] & 1 == 0 { w[0] } else { w[1] };
            assert_eq!(f32_to_f8e4m3(mid as f32), even, "midpoint of {:#x} {:#x}", w[0], w[1]);
            assert_eq!(f32_to_f8e4m3((a + (b - a) * 0.25) as f32), w[0]);
            assert_eq!(f32_to_f8e4m3((a + (b - a) * 0.75) as f32), w[1]);
            assert_eq!(f32_to_f8e4m3(-(a + (b - a) * 0.75) as f32), 0x80 | w[1]);
        }
        assert_eq!(f32_to_f8e4m3(1e9), 0x7e);
        assert_eq!(f32_to_f8e4m3(-465.0), 0xfe);
        assert_eq!(f32_to_f8e4m3(f32::NAN), 0x7f);
        assert_eq!(f32_to_f8e4m3(-0.0), 0x80);
        assert_eq!(f32_to_f8e4m3(2f32.powi(-11)), 0, "under half the least subnormal");
    }

    #[test]
    fn names_round_trip() {
        for (d, n, _) in ALL {
            assert_eq!(DType::parse(n), Some(d));
            assert_eq!(d.name(), n);
        }
        assert_eq!(DType::parse("bf16"), None);
    }

    /// bf16 rounding checked against an f64 reference: the chosen bf16 is
    /// the nearest, ties to even mantissa.
    #[test]
    fn bf16_rounding_is_nearest_even() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let x = f32::from_bits((seed >> 32) as u32);
            if !x.is_finite() {
                continue;
            }
            let r = f32_to_bf16(x);
            let got = bf16_to_f32(r) as f64;
            let lo = bf16_to_f32(r.wrapping_sub(1)) as f64;
            let hi = bf16_to_f32(r.wrapping_add(1)) as f64;
            let xe = x as f64;
            if got.is_infinite() {
                continue;
            }
            let d = (got - xe).abs();
            assert!(d <= (lo - xe).abs() || lo.is_nan(), "{x} -> {got}");
            assert!(d <= (hi - xe).abs() || hi.is_nan(), "{x} -> {got}");
            if d == (hi - xe).abs().min((lo - xe).abs()) && d != 0.0 {
                // a tie: even mantissa wins
                let alt = if (hi - xe).abs() == d { hi } else { lo };
                if alt != got && (alt - xe).abs() == d {
                    assert_eq!(r & 1, 0, "tie for {x} must go to even");
                }
            }
        }
    }

    #[test]
    fn bf16_special_values() {
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        // a NaN whose payload sits only in the low bits must not become inf
        assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        // largest finite f32 rounds up to infinity
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        // exact tie 1 + 2^-8 goes to even (1.0)
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // tie 1 + 3*2^-8 goes up to even
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    }

    #[test]
    fn decode_encode_round_trip_every_bf16_and_f16() {
        for bits in 0..=u16::MAX {
            let x = bf16_to_f32(bits);
            if !x.is_nan() {
                assert_eq!(f32_to_bf16(x), bits);
            }
            let y = f16_to_f32(bits);
            if !y.is_nan() {
                assert_eq!(f32_to_f16(y), bits);
            }
        }
    }

    /// FP8 codes against their definition in f64: E4M3 bias 7 (subnormals
    /// m * 2^-9, max 448), E5M2 bias 15 (max 57344, infinities).
    #[test]
    fn fp8_codes_decode_to_their_values() {
        for b in 0..=255u8 {
            let (s, e, m) = (if b & 0x80 != 0 { -1.0 } else { 1.0 }, (b >> 3) & 0xf, f64::from(b & 7));
            let want = if e == 0 {
                s * m / 8.0 * 2f64.powi(-6)
            } else {
                s * (1.0 + m / 8.0) * 2f64.powi(i32::from(e) - 7)
            };
            let got = f8e4m3_to_f32(b);
            if b & 0x7f == 0x7f {
                assert!(got.is_nan());
            } else {
                assert_eq!(f64::from(got), want, "e4m3 {b:#x}");
            }
            let (e, m) = ((b >> 2) & 0x1f, f64::from(b & 3));
            let want = match e {
                0 => s * m / 4.0 * 2f64.powi(-14),
                31 if m == 0.0 => s * f64::INFINITY,
                31 => f64::NAN,
                _ => s * (1.0 + m / 4.0) * 2f64.powi(i32::from(e) - 15),
            };
            let got = f64::from(f8e5m2_to_f32(b));
            assert!(got == want || (got.is_nan() && want.is_nan()), "e5m2 {b:#x}: {got} vs {want}");
        }
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e5m2_to_f32(0x7b), 57344.0);
    }

    #[test]
    fn ldexp_is_exact_over_the_e8m0_range() {
        for b in 0..=255u8 {
            let e = e8m0_exponent(b);
            for x in FP4_E2M1 {
                let want = f64::from(x) * 2f64.powi(e);
                let got = f64::from(ldexp(x, e));
                let fits = want.abs() <= f64::from(f32::MAX);
                assert!(if fits { got == want } else { got.is_infinite() }, "{x} * 2^{e}: {got} vs {want}");
            }
        }
        assert_eq!(ldexp(0.5, 128), 2f32.powi(127));
    }

    #[test]
    fn slices_decode_unaligned() {
        let vals = [1.5f32, -2.25, 0.0, 1e-3];
        let mut bytes = [0u8; 1 + 16];
        encode(FloatType::F32, &vals, &mut bytes[1..]);
        let mut out = [0f32; 4];
        decode(FloatType::F32, &bytes[1..], &mut out);
        assert_eq!(out, vals);
    }
}
