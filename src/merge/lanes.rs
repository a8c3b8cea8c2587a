//! Fixed-order f64 sums, so a sum has one value on every device.
//!
//! A block's sum is split over `LANES` lanes: element `j` of the block goes
//! to lane `j % LANES`, each lane adds its elements in order starting from
//! 0, and the lanes are then combined by a fixed tree (for `s` = 128, 64,
//! ..., 1: lane `i` += lane `i + s`). A CUDA block of `LANES` threads
//! computes exactly this (kernels/common.cuh `lane_tree`), so the SLERP,
//! model_stock and rescaling statistics, and thus the output bytes, are the
//! same on the CPU and the GPU. The lanes also let the CPU keep several
//! independent additions in flight.

/// Lanes per block (= threads per CUDA block in the reduction kernels).
pub(crate) const LANES: usize = 256;

/// `K` running sums over one block.
pub(crate) struct Lanes {
    k: usize,
    acc: Vec<f64>,
}

impl Lanes {
    pub(crate) fn new(k: usize) -> Lanes {
        Lanes { k, acc: vec![0.0; k * LANES] }
    }

    /// Adds `v` to sum `which` in the lane of block element `j`.
    #[inline(always)]
    pub(crate) fn add(&mut self, j: u64, which: usize, v: f64) {
        self.acc[(j as usize % LANES) * self.k + which] += v;
    }

    /// The `K` block sums, lanes combined in the fixed tree order.
    pub(crate) fn total(mut self) -> Vec<f64> {
        let k = self.k;
        let mut s = LANES / 2;
        while s > 0 {
            for lane in 0..s {
                for w in 0..k {
                    self.acc[lane * k + w] += self.acc[(lane + s) * k + w];
                }
            }
            s /= 2;
        }
        self.acc.truncate(k);
        self.acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_order_is_the_documented_one() {
        // 1e16 + 1 + ... : the order decides which small terms survive, so
        // compare against the order written out by hand.
        let vals: Vec<f64> =
            (0..1000).map(|i| if i % 300 == 0 { 1e16 } else { 1.0 + i as f64 * 1e-3 }).collect();
        let mut l = Lanes::new(1);
        for (j, v) in vals.iter().enumerate() {
            l.add(j as u64, 0, *v);
        }
        let mut lanes = [0f64; LANES];
        for (j, v) in vals.iter().enumerate() {
            lanes[j % LANES] += v;
        }
        let mut s = LANES / 2;
        while s > 0 {
            for i in 0..s {
                lanes[i] += lanes[i + s];
            }
            s /= 2;
        }
        assert_eq!(l.total()[0].to_bits(), lanes[0].to_bits());
    }
}
