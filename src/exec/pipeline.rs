//! The GPU's jobs in flight, across batches.
//!
//! A device job goes into the next of the device's slots in rotation; the
//! slot's previous job is finished (waited for, its output collected) just
//! before, so while the host gathers one job the slots' other jobs upload,
//! compute and download. Finished outputs are handed on in job order, with
//! the headers and copies between them, as soon as every job before them
//! is done. Nothing here waits at a batch's end: a batch's last jobs stay
//! in their slots while the next batch starts, and the pipeline drains
//! only when told to (`drain`: before a statistics pass, which uses the
//! same slots, and after the last batch).
//!
//! The device is a trait so that the ordering can be tested without one.

use std::collections::VecDeque;

use super::jobs::Piece;
use crate::error::{Error, Result};

/// A device whose jobs run in numbered slots. A job started in a slot is
/// finished before the slot starts another.
pub(crate) trait SlotDevice<J> {
    /// Starts `job` in `slot`, whose last job was finished.
    fn start(&self, slot: usize, job: &J) -> Result<()>;
    /// Waits for `job`, started in `slot`, and moves its output into `out`
    /// (checking it).
    fn finish(&self, slot: usize, job: &J, out: &mut Vec<u8>) -> Result<()>;
}

/// A job not yet handed on: its index in the whole job list, the job, and
/// its output once there is one.
struct Entry<'p, J> {
    index: usize,
    job: J,
    piece: Option<Piece<'p>>,
}

/// Jobs between the host and the writer, oldest first.
pub(crate) struct InFlight<'p, J> {
    queue: VecDeque<Entry<'p, J>>,
    /// Per slot, the index of the job it holds.
    held: Vec<Option<usize>>,
    /// The slot the next device job goes into.
    next: usize,
    /// Output buffers to reuse (recycled by the caller).
    spare: Vec<Vec<u8>>,
}

impl<'p, J> InFlight<'p, J> {
    /// An empty pipeline over `slots` slots.
    pub(crate) fn new(slots: usize) -> InFlight<'p, J> {
        InFlight { queue: VecDeque::new(), held: vec![None; slots.max(1)], next: 0, spare: Vec::new() }
    }

    /// Buffers for device outputs; at most a few are kept.
    pub(crate) fn give_buffers(&mut self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let keep = 2 * self.held.len();
        for b in bufs {
            if self.spare.len() >= keep {
                break;
            }
            self.spare.push(b);
        }
    }

    /// Adds job `index` (the one after the last added): `piece` is its
    /// output when it has one already (a header or a copy), else the job
    /// runs on `dev`.
    pub(crate) fn push(
        &mut self,
        dev: &impl SlotDevice<J>,
        index: usize,
        job: J,
        piece: Option<Piece<'p>>,
    ) -> Result<()> {
        if let Some(last) = self.queue.back()
            && last.index + 1 != index
        {
            return Err(Error::Internal(format!("job {index} queued after job {}", last.index)));
        }
        if piece.is_none() {
            let slot = self.next;
            self.finish_slot(dev, slot)?;
            dev.start(slot, &job)?;
            self.held[slot] = Some(index);
            self.next = (slot + 1) % self.held.len();
        }
        self.queue.push_back(Entry { index, job, piece });
        Ok(())
    }

    /// Finishes the job `slot` holds, if any.
    fn finish_slot(&mut self, dev: &impl SlotDevice<J>, slot: usize) -> Result<()> {
        let Some(index) = self.held[slot].take() else { return Ok(()) };
        let front = self.queue.front().map_or(index, |e| e.index);
        let entry = self
            .queue
            .get_mut(index.wrapping_sub(front))
            .ok_or_else(|| Error::Internal(format!("slot {slot} holds job {index}, which is not queued")))?;
        let mut out = self.spare.pop().unwrap_or_default();
        dev.finish(slot, &entry.job, &mut out)?;
        entry.piece = Some(Piece::Owned(out));
        Ok(())
    }

    /// The jobs whose outputs are ready with every job before them, in
    /// order, taken out of the pipeline.
    pub(crate) fn ready(&mut self) -> Vec<(usize, J, Piece<'p>)> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|e| e.piece.is_some()) {
            if let Some(Entry { index, job, piece: Some(p) }) = self.queue.pop_front() {
                out.push((index, job, p));
            }
        }
        out
    }

    /// Finishes every job on the device, oldest first, so that the slots
    /// are free for other work and `ready` returns every job.
    pub(crate) fn drain(&mut self, dev: &impl SlotDevice<J>) -> Result<()> {
        let n = self.held.len();
        for k in 0..n {
            self.finish_slot(dev, (self.next + k) % n)?;
        }
        Ok(())
    }

    /// Whether jobs are still on the device.
    #[cfg(test)]
    fn busy(&self) -> bool {
        self.held.iter().any(Option::is_some)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A device that logs each call and checks the slot discipline: a
    /// slot is started only when free and finished only when it holds
    /// that job. A job's output is its index as bytes.
    #[derive(Default)]
    struct Fake {
        slots: usize,
        holding: RefCell<Vec<Option<usize>>>,
        log: RefCell<Vec<String>>,
        fail_finish: Option<usize>,
    }

    impl SlotDevice<usize> for Fake {
        fn start(&self, slot: usize, job: &usize) -> Result<()> {
            let mut h = self.holding.borrow_mut();
            h.resize(self.slots, None);
            assert!(h[slot].is_none(), "slot {slot} started while holding {:?}", h[slot]);
            h[slot] = Some(*job);
            self.log.borrow_mut().push(format!("start {job}@{slot}"));
            Ok(())
        }
        fn finish(&self, slot: usize, job: &usize, out: &mut Vec<u8>) -> Result<()> {
            let mut h = self.holding.borrow_mut();
            assert_eq!(h[slot], Some(*job), "slot {slot} finished for the wrong job");
            h[slot] = None;
            self.log.borrow_mut().push(format!("finish {job}@{slot}"));
            if self.fail_finish == Some(*job) {
                return Err(Error::Internal(format!("job {job} failed")));
            }
            out.clear();
            out.extend_from_slice(&job.to_le_bytes());
            Ok(())
        }
    }

    /// Jobs 0..n, every `copy_every`-th a ready piece (a copy), in batches
    /// of `batch`; returns what came out of `ready` in order and the log.
    fn run(slots: usize, n: usize, batch: usize, copy_every: usize) -> (Vec<(usize, Vec<u8>)>, Vec<String>) {
        let dev = Fake { slots, ..Fake::default() };
        let mut p: InFlight<usize> = InFlight::new(slots);
        let copy = b"copy".to_vec();
        let mut out = Vec::new();
        let jobs: Vec<usize> = (0..n).collect();
        for group in jobs.chunks(batch) {
            for &i in group {
                let piece = ((i + 1) % copy_every == 0).then(|| Piece::Borrowed(&copy[..]));
                p.push(&dev, i, i, piece).unwrap();
            }
            for (index, job, piece) in p.ready() {
                assert_eq!(index, job);
                out.push((index, piece.bytes().to_vec()));
            }
        }
        p.drain(&dev).unwrap();
        assert!(!p.busy());
        for (index, _, piece) in p.ready() {
            out.push((index, piece.bytes().to_vec()));
        }
        let log = dev.log.into_inner();
        (out, log)
    }

    /// Every job comes out once, in order, with its own output, whatever
    /// the slots and batch size.
    #[test]
    fn outputs_come_out_in_job_order_once_each() {
        for (slots, batch, copy_every) in [(1, 1, 3), (3, 6, 4), (4, 6, 5), (4, 2, 2), (8, 5, 100)] {
            let (out, _) = run(slots, 41, batch, copy_every);
            let want: Vec<(usize, Vec<u8>)> = (0..41)
                .map(|i| {
                    (i, if (i + 1) % copy_every == 0 { b"copy".to_vec() } else { i.to_le_bytes().to_vec() })
                })
                .collect();
            assert_eq!(out, want, "{slots} slots, batches of {batch}");
        }
    }

    /// A batch's last jobs stay in flight while the next batch starts: no
    /// job is finished until its slot is wanted again, so with 4 slots
    /// and batches of 2 jobs, job 0 finishes only when job 4 starts.
    #[test]
    fn a_batch_end_does_not_drain_the_slots() {
        let (_, log) = run(4, 12, 2, usize::MAX);
        let finish0 = log.iter().position(|l| l == "finish 0@0").unwrap();
        let start4 = log.iter().position(|l| l == "start 4@0").unwrap();
        assert_eq!(finish0 + 1, start4, "{log:?}");
        let finishes_before_start4 = log[..start4].iter().filter(|l| l.starts_with("finish")).count();
        assert_eq!(finishes_before_start4, 1, "{log:?}");
    }

    /// A copy after an unfinished device job waits for it: `ready`
    /// returns nothing past the first job still on the device.
    #[test]
    fn ready_stops_at_the_first_job_still_on_the_device() {
        let dev = Fake { slots: 3, ..Fake::default() };
        let mut p: InFlight<usize> = InFlight::new(3);
        let copy = b"c".to_vec();
        p.push(&dev, 0, 0, Some(Piece::Borrowed(&copy[..]))).unwrap();
        p.push(&dev, 1, 1, None).unwrap();
        p.push(&dev, 2, 2, Some(Piece::Borrowed(&copy[..]))).unwrap();
        let got: Vec<usize> = p.ready().into_iter().map(|(i, ..)| i).collect();
        assert_eq!(got, [0]);
        assert!(p.busy());
        p.drain(&dev).unwrap();
        let got: Vec<usize> = p.ready().into_iter().map(|(i, ..)| i).collect();
        assert_eq!(got, [1, 2]);
    }

    /// A failed job's error comes back from the push that finishes it, and
    /// nothing after it is handed on.
    #[test]
    fn a_failed_job_stops_the_pipeline_with_its_error() {
        let dev = Fake { slots: 2, fail_finish: Some(1), ..Fake::default() };
        let mut p: InFlight<usize> = InFlight::new(2);
        p.push(&dev, 0, 0, None).unwrap();
        p.push(&dev, 1, 1, None).unwrap();
        p.push(&dev, 2, 2, None).unwrap();
        let err = p.push(&dev, 3, 3, None).unwrap_err();
        assert!(err.to_string().contains("job 1 failed"), "{err}");
        let got: Vec<usize> = p.ready().into_iter().map(|(i, ..)| i).collect();
        assert_eq!(got, [0]);
    }

    /// Jobs must be added in order.
    #[test]
    fn a_job_out_of_order_is_an_internal_error() {
        let dev = Fake { slots: 2, ..Fake::default() };
        let mut p: InFlight<usize> = InFlight::new(2);
        p.push(&dev, 0, 0, None).unwrap();
        assert!(p.push(&dev, 2, 2, None).is_err());
    }
}
