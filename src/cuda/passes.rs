//! The merge statistics on the GPU: `merge_stats::Passes` over chunks of
//! whole statistics blocks streamed through the engine's slots. Histograms
//! and counts accumulate on the device; per-block partials come back and
//! are combined on the host by the same code as the CPU's.

use std::ops::Range;

use super::engine::{Gpu, SLOTS, launch};
use crate::arith::View;
use crate::error::{Error, Result};
use crate::merge::Inputs;
use crate::merge::stats::{self, Keep, L1Ranks, Passes, STAT_BLOCK, gram_pairs, masked_blocks};

/// The passes of one tensor of a merge.
pub(crate) struct GpuPasses<'a> {
    pub gpu: &'a Gpu,
    pub inputs: &'a Inputs<'a>,
    pub n: u64,
    pub row_len: u64,
}

/// A chunk: its element range and the indices of the blocks it holds.
struct Chunk {
    range: Range<u64>,
    blocks: Range<usize>,
}

/// Groups consecutive `blocks` into chunks of at most `cap` elements.
fn chunks(blocks: &[(u64, Range<u64>)], cap: u64) -> Result<Vec<Chunk>> {
    let mut out: Vec<Chunk> = Vec::new();
    for (i, (_, r)) in blocks.iter().enumerate() {
        if r.end - r.start > cap {
            return Err(Error::Usage(format!(
                "a statistics block of {} elements (a whole row) does not fit the GPU chunk of {cap}; \
                 give --gpu-memory more or use --device cpu",
                r.end - r.start
            )));
        }
        match out.last_mut() {
            Some(c) if r.end - c.range.start <= cap => {
                c.range.end = r.end;
                c.blocks.end = i + 1;
            }
            _ => out.push(Chunk { range: r.clone(), blocks: i..i + 1 }),
        }
    }
    Ok(out)
}

impl GpuPasses<'_> {
    /// Streams the chunks of `blocks` with the base and models `models`
    /// decoded to f32 in the slot's work buffer (base at 0, model j at
    /// j + 1), as deltas from the base when `delta`, and calls `f(chunk,
    /// work, elements)` to launch the pass's kernels on them.
    fn stream(
        &self,
        blocks: &[(u64, Range<u64>)],
        models: &[usize],
        delta: bool,
        mut f: impl FnMut(&Chunk, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let g = self.gpu;
        let cap = g.chunk_elems(models.len());
        let xs: Vec<View> = models.iter().map(|&k| self.inputs.models[k]).collect();
        for (ci, c) in chunks(blocks, cap)?.iter().enumerate() {
            let slot = ci % SLOTS;
            let n = c.range.end - c.range.start;
            let fb = 4 * n;
            let mut run = || -> Result<()> {
                let work =
                    g.upload_f32(slot, self.inputs.base, &xs, c.range.start, n, models.len() + 1, 0)?;
                if delta {
                    for j in 0..models.len() {
                        launch!(g, "sub_base", g.grid(n), [work + (j as u64 + 1) * fb, work, n])?;
                    }
                }
                f(c, work, n)?;
                g.computed(slot)
            };
            run()?;
            crate::interrupt::check()?;
        }
        Ok(())
    }

    fn whole_blocks(&self) -> Vec<(u64, Range<u64>)> {
        stats::blocks(self.n, self.n.max(1))
    }

    /// Histograms of `|d_k|` for each model of `ks`, all in one stream of
    /// the tensor: the high 16 bits, or with `low` the low 16 bits inside
    /// each model's two high bins.
    fn histograms(&self, ks: &[usize], bins: usize, low: Option<&[(u32, u32)]>) -> Result<Vec<Vec<u64>>> {
        let g = self.gpu;
        let hists = ks.iter().map(|_| g.zeros::<u64>(bins)).collect::<Result<Vec<_>>>()?;
        self.stream(&self.whole_blocks(), ks, true, |_, work, n| {
            for (j, hist) in hists.iter().enumerate() {
                let (d, h) = (work + 4 * n * (j as u64 + 1), g.ptr(hist));
                match low {
                    None => launch!(g, "hist_high", g.grid(n), [d, n, h])?,
                    Some(b) => launch!(g, "hist_low", g.grid(n), [d, n, b[j].0, b[j].1, h])?,
                }
            }
            Ok(())
        })?;
        hists.iter().map(|h| g.fetch(h, bins)).collect()
    }
}

impl Passes for GpuPasses<'_> {
    fn hist_high(&self, ks: &[usize]) -> Result<Vec<Vec<u64>>> {
        self.histograms(ks, 1 << 15, None)
    }

    fn hist_low(&self, ks: &[usize], bins: &[(u32, u32)]) -> Result<Vec<Vec<u64>>> {
        self.histograms(ks, 2 << 16, Some(bins))
    }

    fn eq_counts(&self, ks: &[usize], vals: &[(u32, u32)]) -> Result<Vec<Vec<(u64, u64)>>> {
        let g = self.gpu;
        let blocks = self.whole_blocks();
        let outs = ks.iter().map(|_| g.zeros::<u64>(2 * blocks.len())).collect::<Result<Vec<_>>>()?;
        self.stream(&blocks, ks, true, |c, work, n| {
            for (j, out) in outs.iter().enumerate() {
                let (d, at) = (work + 4 * n * (j as u64 + 1), g.ptr(out) + 16 * c.blocks.start as u64);
                let (lo, hi) = vals[j];
                launch!(g, "eq_counts", g.per_block(n.div_ceil(STAT_BLOCK)), [d, n, lo, hi, at])?;
            }
            Ok(())
        })?;
        outs.iter()
            .map(|out| Ok(g.fetch(out, 2 * blocks.len())?.chunks_exact(2).map(|p| (p[0], p[1])).collect()))
            .collect()
    }

    fn l1_ranks(&self, ks: &[usize], vals: &[(u32, u32)]) -> Result<Vec<Vec<L1Ranks>>> {
        let g = self.gpu;
        let blocks = self.whole_blocks();
        let sums = ks.iter().map(|_| g.zeros::<f64>(2 * blocks.len())).collect::<Result<Vec<_>>>()?;
        let counts = ks.iter().map(|_| g.zeros::<u64>(2 * blocks.len())).collect::<Result<Vec<_>>>()?;
        self.stream(&blocks, ks, true, |c, work, n| {
            let at = 16 * c.blocks.start as u64;
            for (j, (s, cn)) in sums.iter().zip(&counts).enumerate() {
                let d = work + 4 * n * (j as u64 + 1);
                let (lo, hi) = vals[j];
                launch!(
                    g,
                    "l1_ranks",
                    g.per_block(n.div_ceil(STAT_BLOCK)),
                    [d, n, lo, hi, g.ptr(s) + at, g.ptr(cn) + at]
                )?;
            }
            Ok(())
        })?;
        sums.iter()
            .zip(&counts)
            .map(|(s, c)| {
                let s = g.fetch(s, 2 * blocks.len())?;
                let c = g.fetch(c, 2 * blocks.len())?;
                Ok((0..blocks.len()).map(|b| (s[2 * b], s[2 * b + 1], c[2 * b], c[2 * b + 1])).collect())
            })
            .collect()
    }

    fn l1_masked(&self, k: usize, keep: &Keep, stream: u64) -> Result<Vec<[f64; 2]>> {
        let g = self.gpu;
        let rl = self.row_len.max(1);
        let blocks = masked_blocks(keep, self.n, rl);
        let out = g.zeros::<f64>(2 * blocks.len())?;
        let o = g.ptr(&out);
        self.stream(&blocks, &[k], true, |c, work, n| {
            let bounds: Vec<u64> =
                blocks[c.blocks.clone()].iter().map(|(_, r)| r.start - c.range.start).chain([n]).collect();
            let bd = g.small(&bounds)?;
            let d = work + 4 * n;
            let (prob, density, epsilon, ranks) = match keep {
                Keep::Random(p) => (*p, 0.0, 0.0, None),
                Keep::Della { density, epsilon } => (0.0, *density, *epsilon, Some(g.della_ranks(d, n, rl)?)),
                other => {
                    return Err(Error::Internal(format!("l1_masked called for a {other:?} mask")));
                }
            };
            let r = ranks.as_ref().map_or(0, |r| g.ptr(r));
            let at = o + 16 * c.blocks.start as u64;
            let nb = c.blocks.len() as u64;
            launch!(
                g,
                "l1_masked",
                g.per_block(nb),
                [d, n, g.ptr(&bd), c.range.start, stream, prob, r, rl, density, epsilon, at]
            )
        })?;
        let v = g.fetch(&out, 2 * blocks.len())?;
        Ok(v.chunks_exact(2).map(|p| [p[0], p[1]]).collect())
    }

    fn slerp_sums(&self) -> Result<Vec<[f64; 3]>> {
        let g = self.gpu;
        let blocks = self.whole_blocks();
        let out = g.zeros::<f64>(3 * blocks.len())?;
        let o = g.ptr(&out);
        self.stream(&blocks, &[0], false, |c, work, n| {
            let at = o + 24 * c.blocks.start as u64;
            launch!(g, "slerp_sums", g.per_block(n.div_ceil(STAT_BLOCK)), [work, work + 4 * n, n, at])
        })?;
        let v = g.fetch(&out, 3 * blocks.len())?;
        Ok(v.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect())
    }

    fn gram(&self, row_len: u64) -> Result<Vec<(u64, Vec<f64>)>> {
        let g = self.gpu;
        let k = self.inputs.models.len();
        let np = gram_pairs(k).len();
        let blocks = stats::blocks(self.n, row_len);
        let out = g.zeros::<f64>(np * blocks.len())?;
        let o = g.ptr(&out);
        let models: Vec<usize> = (0..k).collect();
        self.stream(&blocks, &models, true, |c, work, n| {
            let bounds: Vec<u64> =
                blocks[c.blocks.clone()].iter().map(|(_, r)| r.start - c.range.start).chain([n]).collect();
            let bd = g.small(&bounds)?;
            let at = o + 8 * (np * c.blocks.start) as u64;
            launch!(
                g,
                "gram_sums",
                g.per_block(c.blocks.len() as u64),
                [work + 4 * n, k as i32, n, g.ptr(&bd), at]
            )
        })?;
        let v = g.fetch(&out, np * blocks.len())?;
        Ok(blocks.iter().zip(v.chunks_exact(np.max(1))).map(|((row, _), p)| (*row, p.to_vec())).collect())
    }
}
