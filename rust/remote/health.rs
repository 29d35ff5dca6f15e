//! The tier's health: down (connections fail, every call skips the tier)
//! and refusing writes (the server answers, writes skip it), each a
//! backoff of 250 ms doubling to 10 s, with one warning per change of state.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::conn::{Deadline, Failure};
use super::RemoteTier;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Health {
    /// Connections fail: every call skips the tier during the backoff.
    pub(super) down: Backoff,
    /// The server answers but refuses writes (OOM at `maxmemory`, a
    /// read-only replica, ...): writes skip it during the backoff, reads go on.
    pub(super) refusing: Backoff,
}

/// A state entered on failure and left on the next success, skipped for a
/// backoff of 250 ms doubling to 10 s while failures go on.
#[derive(Default)]
pub(super) struct Backoff {
    pub(super) on: bool,
    pub(super) until: Option<Instant>,
    pub(super) step: Duration,
}

impl Backoff {
    /// A failure: (re)start the backoff; true when the state begins now.
    fn fail(&mut self) -> bool {
        self.step = if self.on {
            (self.step * 2).min(BACKOFF_MAX)
        } else {
            BACKOFF_MIN
        };
        self.until = Some(Instant::now() + self.step);
        !std::mem::replace(&mut self.on, true)
    }

    /// A success: true when the state ends now.
    fn clear(&mut self) -> bool {
        std::mem::take(self).on
    }

    /// Whether calls skip now.
    fn active(&self) -> bool {
        self.on && self.until.is_some_and(|u| Instant::now() < u)
    }
}

impl RemoteTier {
    /// Calls skip the tier now (it is down, within its backoff).
    pub(super) fn skipped_now(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down
            .active()
    }

    /// Writes are skipped now: the tier is down or refusing them.
    pub(super) fn writes_paused(&self) -> bool {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.down.active() || h.refusing.active()
    }

    /// The server answered a write with an error: skip writes for a backoff
    /// (250 ms, doubling to 10 s while it keeps refusing); one warning.
    pub(super) fn refused(&self, why: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.refusing.fail() {
            self.warnings.push(format!(
                "remote tier {} refuses writes ({}): blocks are not sent there for a while \
                     (retried with backoff); reads go on. A server used as a cache wants \
                     `maxmemory-policy allkeys-lru` (or remote_ttl_s with a volatile-* policy)",
                self.shown,
                self.scrub(&why)
            ));
        }
    }

    pub(super) fn accepted(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.refusing.clear() {
            self.warnings
                .push(format!("remote tier {} accepts writes again", self.shown));
        }
    }

    /// A call's remote work failed: a failed connection or a missed
    /// deadline of the tier's own marks the tier down (counted, one
    /// warning); a caller's shorter deadline missed is only counted; an
    /// oversized reply is counted and warned about.
    pub(super) fn failed(&self, e: &Failure, d: &Deadline) {
        match e {
            Failure::Io { timed_out, .. } => {
                if *timed_out {
                    self.stats.deadline_missed.fetch_add(1, Ordering::Relaxed);
                    if !d.is_own() {
                        return;
                    }
                }
                self.went_down(e);
            }
            Failure::Oversized { .. } => {
                self.stats.oversized.fetch_add(1, Ordering::Relaxed);
                self.warnings.push(format!(
                    "remote tier {} sent a reply longer than a block's value ({} bytes): \
                     refused while reading it, connection dropped",
                    self.shown,
                    self.value_len()
                ));
            }
        }
    }

    pub(super) fn went_down(&self, e: &dyn std::fmt::Display) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.down.fail() {
            self.net
                .pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            // A server that moved gets its name resolved again.
            self.net
                .addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.warnings.push(format!(
                "remote tier {} is unavailable ({}): the local tiers keep serving; \
                     retrying with backoff",
                self.shown,
                self.scrub(e)
            ));
        }
    }

    pub(super) fn came_up(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.down.clear() {
            self.warnings
                .push(format!("remote tier {} is reachable again", self.shown));
        }
    }

    /// Whether the tier is marked down (calls skip it until the backoff ends).
    pub fn is_down(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down
            .on
    }

    /// Whether the server refused the last writes (see [`Self::store`]).
    pub fn is_refusing_writes(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refusing
            .on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_clears_once() {
        let mut b = Backoff::default();
        assert!(!b.active() && !b.clear());
        assert!(b.fail()); // the state begins
        assert!(b.active() && b.step == BACKOFF_MIN);
        assert!(!b.fail()); // already on: no second start
        assert_eq!(b.step, BACKOFF_MIN * 2);
        for _ in 0..10 {
            b.fail();
        }
        assert_eq!(b.step, BACKOFF_MAX);
        assert!(b.clear()); // ends once
        assert!(!b.on && !b.active() && !b.clear());
        assert!(b.fail() && b.step == BACKOFF_MIN); // a new start begins small again
    }
}
