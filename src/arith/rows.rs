//! Rows of vocabulary matrices that come from other rows: the runs that
//! line a chat vector's (or a merged model's) rows up with the base's when
//! vocabularies differ, and the per-row tables of a union vocabulary.
//!
//! `stretches` is the one walk over row runs: the chat-vector formulas,
//! the aligned views of merged models, and the input hashing all cut an
//! element range with it.

use std::ops::Range;

/// A run of `rows` consecutive base rows starting at `base_row` that take
/// vector rows starting at `vector_row`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowRun {
    pub base_row: u64,
    pub vector_row: u64,
    pub rows: u64,
}

/// A stretch of output elements read in one piece: inside a run, from the
/// vector's element `vector`; between runs (`vector: None`), from the base
/// at the same positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stretch {
    pub range: Range<u64>,
    pub vector: Option<u64>,
}

/// Cuts `elems` of a matrix whose rows hold `row_len` elements into
/// stretches along `runs` (sorted by `base_row`, disjoint, none empty).
pub(crate) fn stretches(runs: &[RowRun], row_len: u64, elems: Range<u64>) -> Stretches<'_> {
    let first = runs.partition_point(|r| (r.base_row + r.rows) * row_len <= elems.start);
    Stretches { runs: &runs[first..], row_len, at: elems.start, end: elems.end }
}

/// The iterator of `stretches`.
pub(crate) struct Stretches<'a> {
    runs: &'a [RowRun],
    row_len: u64,
    at: u64,
    end: u64,
}

impl Iterator for Stretches<'_> {
    type Item = Stretch;

    fn next(&mut self) -> Option<Stretch> {
        if self.at >= self.end {
            return None;
        }
        let (l, p) = (self.row_len, self.at);
        let s = match self.runs.first() {
            Some(r) if r.base_row * l <= p => {
                let run_end = (r.base_row + r.rows) * l;
                let stop = run_end.min(self.end);
                if stop == run_end {
                    self.runs = &self.runs[1..];
                }
                Stretch { range: p..stop, vector: Some(r.vector_row * l + (p - r.base_row * l)) }
            }
            next => {
                let stop = next.map_or(self.end, |r| (r.base_row * l).min(self.end));
                Stretch { range: p..stop, vector: None }
            }
        };
        self.at = s.range.end;
        Some(s)
    }
}

/// Where one output row of a union-vocabulary matrix comes from, for one
/// input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowSrc {
    /// Row `row` of source `source`.
    Row { source: usize, row: u64 },
    /// The mean of the rows `RowTable::means[i]` lists (a token the input
    /// lacks that several other inputs have), as mergekit fills it.
    Mean(usize),
    /// Zeros (a `tokenizer.tokens` entry with `kind: zero`).
    Zero,
    /// A row `tokenizer.pad_to_multiple_of` adds: the mean of the table's
    /// first `rows` rows (the whole vocabulary), as mergekit fills it.
    Padding { rows: u64 },
}

/// A union-vocabulary matrix: for each involved input (the base, then the
/// models), which row of which source each output row reads.
#[derive(Clone, Debug)]
pub(crate) struct RowTable {
    pub row_len: u64,
    /// Per involved input, one entry per output row.
    pub tables: Vec<Vec<RowSrc>>,
    /// `(source, row)` lists for `RowSrc::Mean`.
    pub means: Vec<Vec<(usize, u64)>>,
    /// Per table, the mean of its rows before the first `RowSrc::Padding`
    /// row (`tokenizer.pad_to_multiple_of`), computed once when first read.
    pub padding: Vec<std::sync::OnceLock<Vec<f32>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(runs: &[RowRun], l: u64, r: Range<u64>) -> Vec<(Range<u64>, Option<u64>)> {
        stretches(runs, l, r).map(|s| (s.range, s.vector)).collect()
    }

    #[test]
    fn stretches_follow_runs_and_gaps() {
        // Base rows 0-1 take vector rows 0-1, rows 3-4 take 2-3; rows of 10.
        let runs =
            [RowRun { base_row: 0, vector_row: 0, rows: 2 }, RowRun { base_row: 3, vector_row: 2, rows: 2 }];
        assert_eq!(
            cut(&runs, 10, 0..60),
            vec![(0..20, Some(0)), (20..30, None), (30..50, Some(20)), (50..60, None)]
        );
        // A range starting inside a run and ending inside the next.
        assert_eq!(cut(&runs, 10, 15..35), vec![(15..20, Some(15)), (20..30, None), (30..35, Some(20))]);
        assert_eq!(cut(&runs, 10, 52..55), vec![(52..55, None)]);
        assert_eq!(cut(&[], 10, 0..5), vec![(0..5, None)]);
        assert!(cut(&runs, 10, 7..7).is_empty());
    }
}
