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
    if let Some(n) = given {
        return n;
    }
    if block_size < SIDE_MIN_BLOCK {
        return 0;
    }
    let cores = crate::process::cores();
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
    /// thread claimed it (kept: a cluster's redirected command is packed
    /// again). A claimed one is at most one value's hashing away; waiting
    /// for it ends at once if its thread is gone (`gone()`), then it is
    /// computed here.
    pub(super) fn take(
        &self,
        i: usize,
        compute: &dyn Fn(usize) -> [u8; HEADER_MAC],
        gone: &dyn Fn() -> bool,
    ) -> [u8; HEADER_MAC] {
        if !self.claimed[i].swap(true, Ordering::AcqRel) {
            return *self.done[i].get_or_init(|| compute(i));
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

#[cfg(test)]
mod tests {
    use super::{Heads, HEADER_MAC};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn head(i: usize) -> [u8; HEADER_MAC] {
        [i as u8; HEADER_MAC]
    }

    #[test]
    fn every_header_is_computed_once_by_whoever_claims_it() {
        let n = 200;
        let heads = Heads::new(n);
        let calls = AtomicUsize::new(0);
        let compute = |i: usize| {
            calls.fetch_add(1, Ordering::Relaxed);
            head(i)
        };
        std::thread::scope(|sc| {
            let workers: Vec<_> = (0..3)
                .map(|t| {
                    let (heads, compute) = (&heads, &compute);
                    sc.spawn(move || heads.work(t, 3, compute))
                })
                .collect();
            for i in 0..n {
                assert_eq!(
                    heads.take(i, &compute, &|| workers[i % 3].is_finished()),
                    head(i)
                );
            }
            // a value taken again (a redirected command) gets the same header, at once
            for i in [0, n / 2, n - 1] {
                assert_eq!(heads.take(i, &compute, &|| false), head(i));
            }
        });
        assert_eq!(calls.load(Ordering::Relaxed), n);
    }

    #[test]
    fn a_stopped_batch_leaves_the_rest_to_the_sender() {
        let heads = Heads::new(10);
        heads.stop();
        heads.work(0, 1, &head); // stops at once: claims nothing
        for i in 0..10 {
            assert_eq!(heads.take(i, &head, &|| true), head(i));
        }
    }
}
