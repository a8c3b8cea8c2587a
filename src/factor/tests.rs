//! The decompositions against matrices of known spectrum, built in f64
//! from random orthonormal bases: the optimal rank-r error is
//! `sqrt(sum of the tail s^2)` (Eckart-Young), independent of any SVD code.

use super::*;

/// A dense matrix as a row source.
struct Dense {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl RowSource for Dense {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn read_rows(&self, first: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.data[first * self.cols..first * self.cols + out.len()]);
    }
}

/// `U diag(s) V^T` with orthonormal U, V from Gram-Schmidt in f64 on
/// seeded uniform noise; returns the matrix and `s`.
fn known(rows: usize, cols: usize, s: impl Fn(usize) -> f64, seed: u64) -> (Dense, Vec<f64>) {
    let k = rows.min(cols);
    let basis = |n: usize, salt: u64| -> Vec<Vec<f64>> {
        let mut out: Vec<Vec<f64>> = Vec::with_capacity(k);
        for j in 0..k {
            let mut v: Vec<f64> = (0..n)
                .map(|i| f64::from(crate::rng::uniform(seed ^ salt, (j * n + i) as u64)) - 0.5)
                .collect();
            for _ in 0..2 {
                for b in &out {
                    let d: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
                    v.iter_mut().zip(b).for_each(|(x, y)| *x -= d * y);
                }
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            out.push(v);
        }
        out
    };
    let (u, v) = (basis(rows, 1), basis(cols, 2));
    let sv: Vec<f64> = (0..k).map(&s).collect();
    let mut data = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let x: f64 = (0..k).map(|t| u[t][i] * sv[t] * v[t][j]).sum();
            data[i * cols + j] = x as f32;
        }
    }
    (Dense { rows, cols, data }, sv)
}

/// `||D - U_r diag(s_r) V_r^T||_F`, in f64.
fn residual(d: &Dense, t: &Truncated, rank: usize) -> f64 {
    let mut e = 0f64;
    for i in 0..d.rows {
        for j in 0..d.cols {
            let approx: f64 =
                (0..rank).map(|k| f64::from(t.u[(i, k)]) * f64::from(t.s[k]) * f64::from(t.v[(j, k)])).sum();
            e += (f64::from(d.data[i * d.cols + j]) - approx).powi(2);
        }
    }
    e.sqrt()
}

fn optimal(sv: &[f64], rank: usize) -> f64 {
    sv[rank..].iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn small_matrices_are_decomposed_exactly_to_the_eckart_young_error() {
    let (d, sv) = known(40, 70, |i| 1.0 / (1.0 + i as f64), 7);
    let t = truncated_svd(&d, 8, 1, false).unwrap();
    assert_eq!(t.method, Method::Exact);
    for (got, want) in t.s.iter().zip(&sv) {
        assert!((f64::from(*got) - want).abs() < 1e-5 * sv[0], "{got} vs {want}");
    }
    let (r, o) = (residual(&d, &t, 8), optimal(&sv, 8));
    assert!((r - o).abs() < 1e-5 * sv[0], "residual {r}, optimal {o}");
    let total: f64 = sv.iter().map(|x| x * x).sum();
    assert!((t.energy - total).abs() < 1e-5 * total);
    let kept: f64 = sv[..8].iter().map(|x| x * x).sum::<f64>() / total;
    assert!((t.kept(8) - kept).abs() < 1e-6, "{} vs {kept}", t.kept(8));
}

#[test]
fn large_matrices_go_randomized_and_keep_within_a_tenth_of_a_percent_of_the_optimal_energy() {
    // Slow decay, the hard case for randomized methods (a chat vector's
    // spectrum is about this flat), and a fast one.
    for (decay, seed) in [(0.15, 3u64), (1.0, 4)] {
        let (d, sv) = known(600, 640, |i| (1.0 + i as f64).powf(-decay), seed);
        let t = truncated_svd(&d, 16, 9, false).unwrap();
        assert!(matches!(t.method, Method::Randomized { .. }), "{:?}", t.method);
        let total: f64 = sv.iter().map(|x| x * x).sum();
        let best: f64 = sv[..16].iter().map(|x| x * x).sum::<f64>() / total;
        assert!(t.kept(16) > best * (1.0 - 1e-3), "decay {decay}: kept {} of an optimal {best}", t.kept(16));
        let (r, o) = (residual(&d, &t, 16), optimal(&sv, 16));
        assert!(r < o * (1.0 + 1e-3), "decay {decay}: residual {r}, optimal {o}");
    }
}

#[test]
fn the_same_seed_gives_the_same_factors_and_a_zero_matrix_keeps_everything() {
    let (d, _) = known(600, 520, |i| (1.0 + i as f64).powf(-0.5), 5);
    let (a, b) = (truncated_svd(&d, 4, 2, false).unwrap(), truncated_svd(&d, 4, 2, false).unwrap());
    assert_eq!(a.s, b.s);
    assert_eq!(a.u, b.u);
    let zero = Dense { rows: 600, cols: 520, data: vec![0.0; 600 * 520] };
    let t = truncated_svd(&zero, 4, 2, false).unwrap();
    assert_eq!(t.energy, 0.0);
    assert_eq!(t.kept(0), 1.0);
}

#[test]
fn exact_on_request_reaches_the_optimum_on_a_large_flat_spectrum() {
    let (d, sv) = known(600, 640, |i| (1.0 + i as f64).powf(-0.1), 6);
    let t = truncated_svd(&d, 16, 9, true).unwrap();
    assert_eq!(t.method, Method::Exact);
    let (r, o) = (residual(&d, &t, 16), optimal(&sv, 16));
    assert!((r - o).abs() < 1e-5 * sv[0], "residual {r}, optimal {o}");
}
