//! Waiting on the network without hanging: every blocking HTTP call and
//! every read of a response body runs on a thread of its own, and the
//! caller waits for it in short steps, so that
//!
//! - Ctrl-C is answered within a second whatever the server does (an
//!   abandoned call ends at its own timeout, or with the process);
//! - a body is read at most up to the size the Hub listed (`cap`), so a
//!   server that sends more never fills the disk;
//! - a server that trickles bytes (each read within the per-read timeout,
//!   but a few bytes a second) counts as a dropped connection and is
//!   retried, where the per-read timeout alone would wait forever.

use std::io::Read;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often a waiting caller looks for Ctrl-C.
const TICK: Duration = Duration::from_millis(50);

/// Bytes a body must bring in each stall window (unless it ends sooner):
/// 64 KiB in 30 s (the default window) is 2 KB/s, slower than any real
/// link but faster than a trickle meant to hold a connection open.
const MIN_BYTES_PER_WINDOW: u64 = 64 << 10;

/// Bytes one read hands over at most.
const CHUNK: usize = 512 << 10;

/// Runs the blocking `call` on a thread of its own and waits for it,
/// answering Ctrl-C within a tick.
pub(super) fn interruptible<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("chatvec-http".into())
        .spawn(move || {
            let _ = tx.send(call());
        })
        .map_err(|e| Error::Internal(format!("cannot start a network thread: {e}")))?;
    loop {
        crate::interrupt::check()?;
        match rx.recv_timeout(TICK) {
            Ok(v) => return Ok(v),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Internal("a network thread stopped without an answer".into()));
            }
        }
    }
}

/// What a body longer than its cap is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Overlong {
    /// An error: a whole file past the size the Hub lists.
    Refused,
    /// Left unread: a range answer that runs on past the range asked for.
    Cut,
}

/// What the reading thread hands over.
enum Piece {
    /// A buffer of `CHUNK` bytes, the first `n` of them read.
    Bytes(Vec<u8>, usize),
    End,
    Failed(std::io::Error),
}

/// A response body read on a thread of its own, chunk by chunk.
pub(super) struct BodyStream {
    pieces: Receiver<Piece>,
    /// Emptied buffers go back to the reader, so a long download allocates
    /// three, not one per chunk.
    spent: SyncSender<Vec<u8>>,
    cap: u64,
    got: u64,
    window: Duration,
    /// Time spent waiting for the server in this window: only waiting
    /// counts, so a caller slow to take the bytes (a busy disk) is never
    /// taken for a stalled server.
    window_waited: Duration,
    window_bytes: u64,
    /// What is being read, for errors ("download of X from URL").
    what: String,
    done: bool,
    /// The chunk the caller holds now.
    held: Vec<u8>,
}

impl BodyStream {
    /// Starts reading `reader` (a response body). At most `cap` bytes are
    /// handed over: past them the body is an error (`Overlong::Refused`,
    /// once byte `cap + 1` arrives) or left unread (`Overlong::Cut`).
    /// `stall` is the window in which some progress must be made.
    pub(super) fn start(
        reader: impl Read + Send + 'static,
        cap: u64,
        overlong: Overlong,
        stall: Duration,
        what: String,
    ) -> Result<BodyStream> {
        let (piece_tx, pieces) = sync_channel::<Piece>(1);
        let (spent, spent_rx) = sync_channel::<Vec<u8>>(2);
        let extra = u64::from(overlong == Overlong::Refused);
        let mut reader = reader.take(cap.saturating_add(extra));
        std::thread::Builder::new()
            .name("chatvec-body".into())
            .spawn(move || {
                loop {
                    // Buffers keep their full length, so a recycled one is
                    // never zeroed again.
                    let mut buf = spent_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
                    let piece = match reader.read(&mut buf) {
                        Ok(0) => Piece::End,
                        Ok(n) => Piece::Bytes(buf, n),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => Piece::Failed(e),
                    };
                    let last = !matches!(piece, Piece::Bytes(..));
                    // The reader has gone (done, failed or interrupted): stop.
                    if piece_tx.send(piece).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start a network thread: {e}")))?;
        Ok(BodyStream {
            pieces,
            spent,
            cap,
            got: 0,
            window: stall,
            window_waited: Duration::ZERO,
            window_bytes: 0,
            what,
            done: false,
            held: Vec::new(),
        })
    }

    /// The next chunk, or `None` at the end of the body. A broken, stalled
    /// or trickling transfer is a network error (worth a retry); a body
    /// longer than the cap is a Hub error.
    pub(super) fn next(&mut self) -> Result<Option<&[u8]>> {
        if self.done {
            return Ok(None);
        }
        loop {
            crate::interrupt::check()?;
            if self.window_waited >= self.window {
                if self.window_bytes < MIN_BYTES_PER_WINDOW {
                    return Err(Error::Network(format!(
                        "{} stalled: {} bytes in {:.0} s",
                        self.what,
                        self.window_bytes,
                        self.window.as_secs_f64()
                    ))
                    .with_hint("run the command again to resume where it stopped"));
                }
                self.window_waited = Duration::ZERO;
                self.window_bytes = 0;
            }
            let waiting = Instant::now();
            let piece = self.pieces.recv_timeout(TICK);
            self.window_waited += waiting.elapsed();
            match piece {
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Internal(format!("{}: the reading thread stopped", self.what)));
                }
                Ok(Piece::End) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Piece::Failed(e)) => {
                    return Err(Error::Network(format!("{} broke off: {e}", self.what))
                        .with_hint("run the command again to resume where it stopped"));
                }
                Ok(Piece::Bytes(buf, len)) => {
                    let n = len as u64;
                    self.got += n;
                    self.window_bytes += n;
                    if self.got > self.cap {
                        self.done = true;
                        return Err(Error::Hub(format!(
                            "{}: the server sent more than the {} bytes expected; what came was not kept",
                            self.what, self.cap
                        )));
                    }
                    return Ok(Some(self.hold(buf, len)));
                }
            }
        }
    }

    /// Hands the first `len` bytes of `buf` to the caller until the next
    /// call, then the buffer back to the reading thread for reuse.
    fn hold(&mut self, buf: Vec<u8>, len: usize) -> &[u8] {
        let old = std::mem::replace(&mut self.held, buf);
        if old.len() == CHUNK {
            let _ = self.spent.try_send(old);
        }
        &self.held[..len]
    }

    /// The whole body (at most `cap` bytes).
    pub(super) fn read_all(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = self.next()? {
            out.extend_from_slice(b);
        }
        Ok(out)
    }
}
