//! Host staging: a GPU job's operands copied from the mapped shards into
//! its slot's pinned input buffer by the executor's worker threads,
//! straight from the map, with no copy in between (and its output copied
//! out of the pinned buffer the same way). One thread moves about 5-10 GB/s from the page cache, a PCIe 5
//! link about 50 GB/s, so a single copying thread would hold the GPU at a
//! fraction of the bus.

/// A copy: where to, from where.
type Piece<'a> = (&'a mut [u8], &'a [u8]);

/// Copies below this size are not split further: a thread's start costs
/// more than it saves.
const MIN_PIECE: usize = 1 << 20;

/// Threads that copy one job's operands at most: past this many, the
/// memory bus, not the threads, is the limit.
const MAX_THREADS: usize = 16;

/// Copies each of `parts` into `host` at its offset in `offsets`, on the
/// threads of `pool` (at most `MAX_THREADS`). The copies are cut
/// into pieces of about equal size, dealt out so that every thread moves
/// about as many bytes, so one large operand does not leave the other
/// threads idle. The bytes are the same whatever the thread count.
///
/// # Panics
///
/// When a part does not fit `host` at its offset, or parts overlap there.
pub fn stage_into(host: &mut [u8], parts: &[&[u8]], offsets: &[usize], pool: &rayon::ThreadPool) {
    assert_eq!(parts.len(), offsets.len(), "one offset per part");
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let threads = pool.current_num_threads().clamp(1, MAX_THREADS).min(total.div_ceil(MIN_PIECE).max(1));
    let piece = total.div_ceil(threads).max(1);
    // (destination, source) pieces, each at most `piece` bytes.
    let mut pieces: Vec<Piece> = Vec::new();
    let mut rest = host;
    let mut at = 0;
    for (p, &o) in parts.iter().zip(offsets) {
        assert!(o >= at, "part at {o} overlaps the one before (which ends at {at})");
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(o - at);
        let (dst, tail) = tail.split_at_mut(p.len());
        rest = tail;
        at = o + p.len();
        pieces.extend(dst.chunks_mut(piece).zip(p.chunks(piece)));
    }
    if threads == 1 {
        for (d, s) in pieces {
            d.copy_from_slice(s);
        }
        return;
    }
    // Each piece to the thread with the fewest bytes so far.
    let mut groups: Vec<(usize, Vec<Piece>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for (d, s) in pieces {
        let g = groups.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one thread");
        g.0 += s.len();
        g.1.push((d, s));
    }
    let copy = |group: Vec<Piece>| {
        for (d, s) in group {
            d.copy_from_slice(s);
        }
    };
    pool.scope(|scope| {
        let mut groups = groups.into_iter().map(|(_, g)| g);
        let mine = groups.next().unwrap_or_default();
        for g in groups {
            scope.spawn(move |_| copy(g));
        }
        copy(mine);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts of uneven sizes, one larger than all others together, at
    /// aligned offsets with gaps: the same bytes over 1 to 16 threads,
    /// the gaps untouched.
    #[test]
    fn staging_gives_the_same_bytes_over_any_number_of_threads() {
        let sizes = [5 << 20, 3, 1 << 20, 300_000];
        let parts: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 7 + k * 13) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let mut offsets = Vec::new();
        let mut at = 0;
        for p in &parts {
            offsets.push(at);
            at = (at + p.len()).next_multiple_of(256) + 256;
        }
        let mut want = vec![0xaa; at];
        for (p, &o) in parts.iter().zip(&offsets) {
            want[o..o + p.len()].copy_from_slice(p);
        }
        for threads in [1, 2, 3, 8, 16] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut host = vec![0xaa; at];
            stage_into(&mut host, &refs, &offsets, &pool);
            assert!(host == want, "{threads} threads");
        }
    }
}
