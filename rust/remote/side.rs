//! Side threads: on a machine with cores to spare, the checksums or MACs of
//! a batch's values are computed (puts) or checked (gets) on a few threads
//! beside the one that moves the bytes, so that a MAC (about a third of
//! CRC32C's speed) does not slow the transfer. With few cores they would
//! take the core the transfer (or a server on the same machine) needs, so
//! there are none and the work stays inline. A fetch that already runs
//! over several connections at once (blocks of 1 MiB and more) checks
//! inline on each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::codec::HEADER_MAC;

/// Blocks smaller than this are checked inline: a hand-off costs more than
/// the check.
const SIDE_MIN_BLOCK: usize = 128 << 10;
/// Side threads at most.
const SIDE_MAX: usize = 4;

/// Side threads for a batch of `block_size`-byte blocks: `given` (the
/// `remote_check_threads` setting) if set; else none under
/// [`SIDE_MIN_BLOCK`] or on a machine of fewer than 8 usable cores, and one
/// per two cores past the first four, at most [`SIDE_MAX`].
pub(super) fn side_threads(block_size: usize, given: Option<usize>) -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    if let Some(n) = given {
        return n;
    }
    if block_size < SIDE_MIN_BLOCK {
        return 0;
    }
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if cores < 8 {
        0
    } else {
        ((cores - 4) / 2).min(SIDE_MAX)
    }
}

/// The headers of one batch's values, each computed once: by a side thread
/// ([`Heads::work`]) or, if the sender gets to it first, by the sender
/// ([`Heads::take`]). Whoever claims a value computes its header.
pub(super) struct Heads {
    /// Set when the batch is over (sent, or failed): side threads stop.
    stop: AtomicBool,
    claimed: Vec<AtomicBool>,
    done: Vec<OnceLock<[u8; HEADER_MAC]>>,
}

impl Heads {
    pub(super) fn new(n: usize) -> Self {
        Heads {
            stop: AtomicBool::new(false),
            claimed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            done: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Side thread `t` of `of`: computes the headers of values `t`, `t +
    /// of`, ... that nobody claimed yet, in the order the sender needs them.
    pub(super) fn work(&self, t: usize, of: usize, compute: &dyn Fn(usize) -> [u8; HEADER_MAC]) {
        for i in (t..self.claimed.len()).step_by(of) {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if !self.claimed[i].swap(true, Ordering::AcqRel) {
                let _ = self.done[i].set(compute(i));
            }
        }
    }

    /// The batch is over: side threads stop at their next value.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Value `i`'s header: the side thread's, or computed here if no side
    /// thread claimed it. A claimed one is at most one value's hashing
    /// away; waiting for it ends at once if its thread is gone (`gone()`),
    /// then it is computed here.
    pub(super) fn take(
        &self,
        i: usize,
        compute: &dyn Fn(usize) -> [u8; HEADER_MAC],
        gone: &dyn Fn() -> bool,
    ) -> [u8; HEADER_MAC] {
        if !self.claimed[i].swap(true, Ordering::AcqRel) {
            return compute(i);
        }
        loop {
            if let Some(h) = self.done[i].get() {
                return *h;
            }
            if gone() {
                return compute(i);
            }
            std::thread::yield_now();
        }
    }
}
