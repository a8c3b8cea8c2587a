//! Truncated singular value decompositions of a weight difference read
//! row block by row block (decoded from memory-mapped checkpoints), for
//! LoRA extraction: `D ~= U diag(s) V^T` with the `want` largest singular
//! values.
//!
//! Two methods, chosen by shape:
//! - **exact**, when the smaller side is short (at most `EXACT_BELOW`, or
//!   about the randomized method's own working width): `D` is formed whole
//!   (at most `EXACT_BELOW` x the longer side) and given to faer's thin
//!   SVD, as mergekit-extract-lora gives every matrix to `torch.linalg.svd`;
//! - **randomized** subspace iteration (Halko, Martinsson and Tropp 2011,
//!   algorithm 4.4), for everything larger: `D` is never formed. Each pass
//!   streams its rows once (`Y = D X` or `Z = D^T Q`), so memory is
//!   `(rows + cols) x width` floats plus one row block, whatever the
//!   matrix. Power iterations continue until the energy of the top `want`
//!   singular values stops growing (`TOLERANCE`), so slowly decaying
//!   spectra, which chat vectors have, get the iterations they need and
//!   fast-decaying ones stop early.
//!
//! Every product runs on one thread (`Par::Seq`): callers run one matrix
//! per thread, so the factors do not depend on the thread count. The test
//! matrix is a pure function of the seed and the tensor name (`rng`).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use crate::error::{Error, Result};

/// A matrix given by its rows.
pub(crate) trait RowSource: Sync {
    /// Rows and columns.
    fn shape(&self) -> (usize, usize);
    /// Rows `first..first + out.len() / cols`, row-major, into `out`.
    fn read_rows(&self, first: usize, out: &mut [f32]);
}

/// Smaller sides up to this many are decomposed exactly.
const EXACT_BELOW: usize = 512;
/// Elements per row block of a streaming pass (4 MiB of f32).
const BLOCK_ELEMENTS: usize = 1 << 20;
/// Power iterations always run at least this many times ...
const MIN_ITERATIONS: usize = 2;
/// ... and at most this many.
const MAX_ITERATIONS: usize = 12;
/// Iteration stops when the kept energy grew by less than this fraction.
const TOLERANCE: f64 = 1e-5;

/// How a decomposition was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Exact,
    /// Randomized, with this many power iterations.
    Randomized {
        iterations: usize,
    },
}

/// The leading singular triplets of a matrix `D` (rows x cols).
pub(crate) struct Truncated {
    /// Left singular vectors, rows x k.
    pub u: Mat<f32>,
    /// Singular values, nonincreasing, k of them.
    pub s: Vec<f32>,
    /// Right singular vectors, cols x k.
    pub v: Mat<f32>,
    /// `||D||_F^2`, summed in f64.
    pub energy: f64,
    pub method: Method,
}

impl Truncated {
    /// The fraction of `||D||_F^2` the first `rank` triplets hold.
    pub(crate) fn kept(&self, rank: usize) -> f64 {
        if self.energy == 0.0 {
            return 1.0;
        }
        let e: f64 = self.s[..rank].iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        (e / self.energy).min(1.0)
    }
}

/// The `want` largest singular triplets of `src` (fewer when the matrix
/// is smaller), exactly when `exact` or the matrix is small. `seed` picks
/// the randomized method's test matrix.
pub(crate) fn truncated_svd(
    src: &dyn RowSource,
    want: usize,
    seed: u64,
    exact_always: bool,
) -> Result<Truncated> {
    let (m, n) = src.shape();
    let want = want.min(m).min(n);
    let width = (want + oversampling(want)).min(m).min(n);
    if exact_always || m.min(n) <= EXACT_BELOW.max(2 * width) {
        return exact(src, want);
    }
    randomized(src, want, width, seed)
}

/// Extra columns of the randomized method's subspace: the leading `want`
/// converge at the rate of `(s[width] / s[want])^(2 q)`. Twice `want`: on
/// the flattest spectra (a random matrix, the bench's synthetic vector)
/// the kept error came within 0.005% of the optimum at rank 64, against
/// 0.04% with `want / 2` extra columns, for 1.5x the time.
fn oversampling(want: usize) -> usize {
    (2 * want).max(16)
}

fn svd_error(what: &str, e: faer::linalg::svd::SvdError) -> Error {
    Error::Internal(format!("the SVD of {what} did not converge ({e:?})"))
}

fn exact(src: &dyn RowSource, want: usize) -> Result<Truncated> {
    let (m, n) = src.shape();
    let mut buf = vec![0f32; m * n];
    read_blocks(src, |first, rows| {
        buf[first * n..first * n + rows.len()].copy_from_slice(rows);
        Ok(())
    })?;
    let energy = buf.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let d = MatRef::from_row_major_slice(&buf, m, n);
    let svd = d.thin_svd().map_err(|e| svd_error("a difference", e))?;
    let s: Vec<f32> = (0..want).map(|i| svd.S()[i]).collect();
    let u = svd.U().subcols(0, want).to_owned();
    let v = svd.V().subcols(0, want).to_owned();
    Ok(Truncated { u, s, v, energy, method: Method::Exact })
}

/// Calls `f(first_row, rows)` for consecutive blocks of rows of `src`.
fn read_blocks(src: &dyn RowSource, mut f: impl FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
    let (m, n) = src.shape();
    let per = (BLOCK_ELEMENTS / n.max(1)).max(1);
    let mut buf = vec![0f32; per.min(m) * n];
    let mut first = 0;
    while first < m {
        crate::interrupt::check()?;
        let rows = per.min(m - first);
        let block = &mut buf[..rows * n];
        src.read_rows(first, block);
        f(first, block)?;
        first += rows;
    }
    Ok(())
}

/// `D X` (rows x c) for `X` cols x c, and `||D||_F^2`.
fn times(src: &dyn RowSource, x: MatRef<f32>) -> Result<(Mat<f32>, f64)> {
    let (m, n) = src.shape();
    let mut y = Mat::<f32>::zeros(m, x.ncols());
    let mut energy = 0f64;
    read_blocks(src, |first, rows| {
        let b = rows.len() / n;
        energy += rows.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        let d = MatRef::from_row_major_slice(rows, b, n);
        matmul(y.as_mut().subrows_mut(first, b), Accum::Replace, d, x, 1.0, Par::Seq);
        Ok(())
    })?;
    Ok((y, energy))
}

/// `D^T Q` (cols x c) for `Q` rows x c.
fn times_transposed(src: &dyn RowSource, q: MatRef<f32>) -> Result<Mat<f32>> {
    let (_, n) = src.shape();
    let mut z = Mat::<f32>::zeros(n, q.ncols());
    read_blocks(src, |first, rows| {
        let b = rows.len() / n;
        let d = MatRef::from_row_major_slice(rows, b, n);
        matmul(z.as_mut(), Accum::Add, d.transpose(), q.subrows(first, b), 1.0, Par::Seq);
        Ok(())
    })?;
    Ok(z)
}

/// An orthonormal basis of the columns of `y` (thin Q of its QR).
fn orthonormal(y: &Mat<f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// The test matrix: cols x width, uniform in [-1, 1).
fn test_matrix(n: usize, width: usize, seed: u64) -> Mat<f32> {
    Mat::from_fn(n, width, |i, j| 2.0 * crate::rng::uniform(seed, (i * width + j) as u64) - 1.0)
}

fn randomized(src: &dyn RowSource, want: usize, width: usize, seed: u64) -> Result<Truncated> {
    let (_, n) = src.shape();
    let (y, energy) = times(src, test_matrix(n, width, seed).as_ref())?;
    let mut q = orthonormal(&y);
    let mut before = -1f64;
    let mut iterations = 0;
    loop {
        // Z = D^T Q: its SVD is that of Q^T D, the projection of D on the
        // current subspace, so its top `want` energy is what that subspace
        // keeps.
        let z = times_transposed(src, q.as_ref())?;
        let svd = z.thin_svd().map_err(|e| svd_error("a projection", e))?;
        let kept: f64 = (0..want).map(|i| f64::from(svd.S()[i]).powi(2)).sum();
        let settled = iterations >= MIN_ITERATIONS && kept - before <= TOLERANCE * kept;
        if settled || iterations == MAX_ITERATIONS || energy == 0.0 {
            // D ~= Q Q^T D = Q Z^T = (Q Vz) Sz Uz^T.
            let mut u = Mat::<f32>::zeros(q.nrows(), want);
            matmul(u.as_mut(), Accum::Replace, q.as_ref(), svd.V().subcols(0, want), 1.0, Par::Seq);
            let s = (0..want).map(|i| svd.S()[i]).collect();
            let v = svd.U().subcols(0, want).to_owned();
            return Ok(Truncated { u, s, v, energy, method: Method::Randomized { iterations } });
        }
        before = kept;
        let w = orthonormal(&z);
        let (y, _) = times(src, w.as_ref())?;
        q = orthonormal(&y);
        iterations += 1;
    }
}

#[cfg(test)]
mod tests;
