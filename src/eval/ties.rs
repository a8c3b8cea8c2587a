//! How sure a ranking is: a 95% interval for each figure (a seeded
//! percentile bootstrap over the conversations or prompts it was measured
//! on), and which candidates the ranking cannot tell apart. Twelve prompts
//! cannot separate a loss of 2.3071 from 2.3072, and the report says so
//! instead of ranking on the fourth decimal.

use serde::Serialize;

/// Resamples of each bootstrap: enough for stable 2.5th/97.5th
/// percentiles of a mean, cheap next to loading a model.
const RESAMPLES: u64 = 2000;

/// The 95% interval of a figure, `[low, high]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Interval {
    /// The 2.5th percentile of the resampled figure.
    pub low: f64,
    /// The 97.5th percentile.
    pub high: f64,
}

impl Interval {
    /// Whether the two intervals share a point.
    pub(crate) fn overlaps(&self, other: &Interval) -> bool {
        self.low <= other.high && other.low <= self.high
    }
}

/// The percentile-bootstrap 95% interval of `sum(values) / sum(weights)`
/// over the items (each a `(value, weight)`), resampled with replacement,
/// seeded by `seed` so a report is the same every run. `None` without
/// items or weight.
pub(crate) fn ratio_interval(items: &[(f64, f64)], seed: u64) -> Option<Interval> {
    let n = items.len() as u64;
    if n == 0 || items.iter().map(|x| x.1).sum::<f64>() <= 0.0 {
        return None;
    }
    let mut stats: Vec<f64> = (0..RESAMPLES)
        .filter_map(|r| {
            let (mut v, mut w) = (0.0, 0.0);
            for k in 0..n {
                let i = crate::rng::mix(seed ^ crate::rng::mix(r * n + k)) % n;
                v += items[i as usize].0;
                w += items[i as usize].1;
            }
            (w > 0.0).then(|| v / w)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * (stats.len() - 1) as f64).round() as usize).min(stats.len() - 1)];
    Some(Interval { low: at(0.025), high: at(0.975) })
}

/// The interval of a share: the items are 1 (counted) or 0.
pub(crate) fn share_interval(hits: &[bool], seed: u64) -> Option<Interval> {
    let items: Vec<(f64, f64)> = hits.iter().map(|&h| (f64::from(u8::from(h)), 1.0)).collect();
    ratio_interval(&items, seed)
}

/// For models in rank order, each one's figures' intervals (`None` where a
/// figure was not measured): the rank of the best model it is tied with,
/// or `None`. A model is tied with the one ranked just above it when every
/// figure's intervals overlap (or neither has the figure); ties chain, so
/// a run of such models shares the first one's rank.
pub(crate) fn ties(figures: &[Vec<Option<Interval>>]) -> Vec<Option<usize>> {
    let mut out: Vec<Option<usize>> = vec![None; figures.len()];
    for i in 1..figures.len() {
        let close = figures[i].iter().zip(&figures[i - 1]).all(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => a.overlaps(b),
            (None, None) => true,
            _ => false,
        });
        if close {
            out[i] = Some(out[i - 1].unwrap_or(i));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interval holds the plain mean, is the same for the same seed,
    /// and narrows as items are added (about as 1/sqrt(n)).
    #[test]
    fn a_bootstrap_interval_holds_the_mean_and_narrows_with_more_items() {
        // Values 0..9, each with weight 1: mean 4.5, sd 2.87.
        let items: Vec<(f64, f64)> = (0..10).map(|v| (f64::from(v), 1.0)).collect();
        let i = ratio_interval(&items, 7).unwrap();
        assert!(i.low < 4.5 && 4.5 < i.high, "{i:?}");
        assert_eq!(ratio_interval(&items, 7), Some(i));
        // A normal approximation, computed independently: 4.5 +- 1.96 *
        // 2.87 / sqrt(10) = [2.72, 6.28]; the bootstrap's is close to it.
        let sd = ((0..10).map(|v| (f64::from(v) - 4.5).powi(2)).sum::<f64>() / 10.0).sqrt();
        let half = 1.96 * sd / 10f64.sqrt();
        assert!(
            (i.low - (4.5 - half)).abs() < 0.35 && (i.high - (4.5 + half)).abs() < 0.35,
            "{i:?} vs {half}"
        );
        let many: Vec<(f64, f64)> = (0..1000).map(|v| (f64::from(v % 10), 1.0)).collect();
        let j = ratio_interval(&many, 7).unwrap();
        assert!(j.high - j.low < (i.high - i.low) / 5.0, "{j:?} vs {i:?}");
        assert_eq!(ratio_interval(&[], 7), None);
    }

    /// A token-weighted loss: the ratio of sums, not the mean of ratios.
    #[test]
    fn a_ratio_is_weighted_by_its_items() {
        let items = [(10.0, 10.0), (1.0, 1.0), (10.0, 10.0)];
        let i = ratio_interval(&items, 1).unwrap();
        assert_eq!((i.low, i.high), (1.0, 1.0));
    }

    #[test]
    fn overlapping_candidates_are_tied_and_separated_ones_are_not() {
        let iv = |low, high| Some(Interval { low, high });
        let figures = vec![
            vec![iv(0.9, 1.0), iv(2.0, 2.2)],
            vec![iv(0.8, 0.95), iv(2.1, 2.4)],
            vec![iv(0.7, 0.92), iv(2.3, 2.5)],
            vec![iv(0.1, 0.2), iv(2.3, 2.5)],
            vec![iv(0.1, 0.2), None],
        ];
        // 2 overlaps 1; 3 overlaps 2 (so chains to 1); 4 is clear of 3; 5
        // lacks a figure 4 has.
        assert_eq!(ties(&figures), vec![None, Some(1), Some(1), None, None]);
        let shares = share_interval(&[true; 12], 3).unwrap();
        assert_eq!((shares.low, shares.high), (1.0, 1.0));
    }
}
