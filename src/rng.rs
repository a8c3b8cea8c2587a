//! The counter-based generator behind DARE and DELLA masks (contract 2)
//! and the seeded split and weighting of SFT data.
//!
//! A mask bit is a pure function of `(seed, tensor name, input, element
//! index)`: no generator state is carried from one element to the next, so
//! the mask is the same whatever the chunking, the thread count or the
//! device. The generator is SplitMix64 evaluated directly at a counter
//! position, which needs only 64-bit adds, multiplies, shifts and xors, so
//! the CUDA kernels compute the same bits.

use sha2::{Digest, Sha256};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function.
#[inline(always)]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream of one input's tensor: the seed, the first 8 bytes of the
/// sha256 of the tensor name (little endian), and the input's position
/// among the merged models, mixed together.
pub(crate) fn stream(seed: u64, tensor: &str, input: usize) -> u64 {
    let h = Sha256::digest(tensor.as_bytes());
    let key = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    mix(mix(seed ^ key) ^ (input as u64))
}

/// A uniform number in `[0, 1)` with 24 random bits (exact in f32) for
/// element `index` of `stream`.
#[inline(always)]
pub(crate) fn uniform(stream: u64, index: u64) -> f32 {
    let u = mix(stream.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    (u >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 seeded with 0 yields these first outputs (the published
        // reference sequence), i.e. mix(k * GOLDEN) for k = 1, 2, 3.
        assert_eq!(mix(GOLDEN), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix(GOLDEN.wrapping_mul(2)), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(mix(GOLDEN.wrapping_mul(3)), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn uniform_is_a_fair_coin_and_depends_on_every_key_part() {
        let s = stream(7, "model.layers.0.mlp.up_proj.weight", 1);
        let n = 200_000;
        let below: usize = (0..n).filter(|&i| uniform(s, i) < 0.3).count();
        let frac = below as f64 / n as f64;
        assert!((frac - 0.3).abs() < 0.005, "{frac}");
        assert_ne!(s, stream(8, "model.layers.0.mlp.up_proj.weight", 1));
        assert_ne!(s, stream(7, "model.layers.1.mlp.up_proj.weight", 1));
        assert_ne!(s, stream(7, "model.layers.0.mlp.up_proj.weight", 2));
        assert!((0..1000).all(|i| (0.0..1.0).contains(&uniform(s, i))));
    }
}
