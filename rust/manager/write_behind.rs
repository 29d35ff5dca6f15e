//! Write-behind: a background thread that keeps the least recent host-only
//! blocks written to disk ahead of their eviction, so a put into a full host
//! tier does not wait for disk writes; `flush` (one step after another until
//! nothing is left, then the remote tier's queue); and the flush of a closing
//! persistent store (every host-only block the disk tier can hold).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::policy::Plan;
use super::{BlockManager, State};
use crate::error::Result;
use crate::index::Record;

/// The write-behind thread's controls: woken after puts, stopped by close.
#[derive(Default)]
pub(super) struct Writer {
    wake: Mutex<bool>,
    cv: std::sync::Condvar,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl BlockManager {
    /// Start the write-behind thread (with a host and a disk tier and
    /// `write_behind` on). It holds only a weak reference: it ends with the
    /// manager, or at `close()`.
    pub fn start_write_behind(self: &Arc<Self>) {
        if !self.opts.write_behind || self.host.is_none() || self.disk.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        let w = self.writer.clone();
        let nice = self.worker_nice();
        let (ready, started) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("dynblock-writeback".into())
            .spawn(move || {
                crate::io::lower_priority(nice);
                let _ = ready.send(());
                loop {
                    // Work only when a put woke the thread; the timeout only
                    // notices a manager that went away.
                    let woken = {
                        let g = w.wake.lock().unwrap_or_else(|p| p.into_inner());
                        let (mut g, _) = w
                            .cv
                            .wait_timeout_while(g, std::time::Duration::from_millis(200), |woken| {
                                !*woken && !w.stop.load(Ordering::Relaxed)
                            })
                            .unwrap_or_else(|p| p.into_inner());
                        std::mem::replace(&mut *g, false)
                    };
                    if w.stop.load(Ordering::Relaxed) || weak.strong_count() == 0 {
                        return;
                    }
                    if !woken {
                        continue;
                    }
                    let Some(m) = weak.upgrade() else {
                        return;
                    };
                    m.clean_round(32, &|| w.stop.load(Ordering::Relaxed));
                }
            });
        if let Ok(h) = spawned {
            // Running at its nice value before any work reaches it.
            let _ = started.recv_timeout(std::time::Duration::from_secs(5));
            *self.writer.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
    }

    /// Wake the write-behind thread (after host blocks arrived).
    pub(super) fn nudge(&self) {
        if self.opts.write_behind {
            *self.writer.wake.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.writer.cv.notify_one();
        }
    }

    /// Stop the write-behind thread and wait for it (not in a forked child,
    /// where it does not exist).
    pub(super) fn stop_write_behind(&self) {
        self.writer.stop.store(true, Ordering::Relaxed);
        self.writer.cv.notify_all();
        let h = self
            .writer
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = h {
            if !self.fork.forked() && h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// How many of the least recent host blocks write-behind keeps clean
    /// (with a disk copy): half the host tier (none under 4 blocks), and at
    /// most half the disk tier, which must hold those copies besides its
    /// own blocks (more would evict the copies just written). A step pins
    /// at most a quarter of the tier (and at most its batch), so a put
    /// always finds most of the tier evictable (eviction skips the blocks
    /// being written behind).
    fn clean_depth(host_cap: usize, disk_cap: usize) -> usize {
        if host_cap < 4 {
            0
        } else {
            (host_cap / 2).min(disk_cap / 2)
        }
    }

    /// The most blocks one round of write-behind (a wake-up of its thread,
    /// or a `flush`) writes: the clean depth. Each step's writes evict disk
    /// blocks, possibly the copies an earlier step wrote (an S3-FIFO disk
    /// tier evicts its newest blocks first); the budget ends a round that
    /// would otherwise rewrite them in turn forever.
    fn clean_budget(&self) -> usize {
        let Ok(st) = self.open_state() else {
            return 0;
        };
        Self::clean_depth(st.reg.host_cap(), st.reg.disk_cap())
    }

    /// One round of write-behind: steps of at most `step` blocks until
    /// nothing is left, the budget is spent, or `stop` says so.
    fn clean_round(&self, step: usize, stop: &dyn Fn() -> bool) {
        let mut budget = self.clean_budget();
        while budget > 0 && !stop() {
            let n = self.clean_some(step.min(budget));
            if n == 0 {
                break;
            }
            budget = budget.saturating_sub(n);
        }
    }

    /// One step of write-behind: write up to `max` of the least recent
    /// host-only blocks (within the clean depth) to the disk tier, their host
    /// slots pinned meanwhile: they stay readable from the host tier until
    /// their disk copy is committed, and evicting them later needs no write.
    /// Returns how many were written. A failed write is counted and logged;
    /// the blocks stay in the host tier.
    pub fn clean_some(&self, max: usize) -> usize {
        if !self.opts.write_behind || self.fork.forked() {
            return 0;
        }
        let _one_at_a_time = self.cleaning.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(mut st) = self.open_state() else {
            return 0;
        };
        if !st.reg.has_host() || !st.reg.has_disk() {
            return 0;
        }
        let cap = st.reg.host_cap();
        let depth = Self::clean_depth(cap, st.reg.disk_cap());
        let pick = st.reg.clean_candidates(depth, max.min(cap / 4));
        if pick.is_empty() {
            return 0;
        }
        if self.settle_index(&mut st).is_err() {
            return 0;
        }
        let Ok(region) = self.region() else {
            return 0;
        };
        let held: Vec<_> = pick
            .iter()
            .map(|&(_, s)| super::policy::TierSlot::host(s))
            .collect();
        for &at in &held {
            st.reg.pin(at);
        }
        let mut plan = Plan::default();
        let mut n: usize = 0;
        for &(h, s) in &pick {
            if !st.reg.offload(h, s, &mut plan) {
                break; // the rest of the disk tier is leased
            }
            n += 1;
        }
        // Copies of blocks still in the host tier that these writes evict:
        // those blocks are host-only again (no progress for them).
        let undone = plan
            .disk_evicted
            .iter()
            .filter(|&&(h, _, _)| st.reg.in_host(h))
            .count();
        let (mut st, r) = self.execute(st, &plan, region.as_deref());
        for &at in &held {
            st.reg.unpin(at);
        }
        match r {
            Ok(()) => {
                st.stats.written_behind += n as u64;
                // Counted as done when the step made no progress, so that
                // the round ends.
                n.saturating_sub(undone)
            }
            Err(e) => {
                st.stats.failed_write_behind += 1;
                if st.stats.failed_write_behind == 1 {
                    st.warnings.push(format!(
                        "writing {n} host blocks to disk ahead of eviction failed: {e}; they stay \
                         in the host tier (later failures are counted in \
                         stats()[\"failed_write_behind\"])"
                    ));
                }
                0
            }
        }
    }

    /// Wait for write-behind (write every host-only block within the clean
    /// depth to disk now, at most a clean depth's worth of writes), then for
    /// the remote tier's write queue (up to 60 s).
    pub fn flush(&self) -> Result<()> {
        drop(self.open_state()?);
        self.clean_round(64, &|| false);
        if let Some((r, _)) = self.remote.get() {
            r.flush(std::time::Duration::from_secs(60));
        }
        Ok(())
    }

    /// Write the blocks that live only in the host tier to the disk tier,
    /// most recent first, as many as the disk tier holds (older disk blocks
    /// make room, as in any offload): what a restart of a persistent store
    /// should find. The host copies stay.
    pub(super) fn flush_host<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> (MutexGuard<'a, State>, Result<usize>) {
        if !st.reg.has_host() || !st.reg.has_disk() {
            return (st, Ok(0));
        }
        // What admission would not write leaves with the process: remembered
        // as turned away, so its second sighting after a restart is known.
        // Best effort: a failed append is cut back and marks the index for
        // the rewrite below (which writes the ghost from memory).
        let turned = st.reg.turn_away_host_only();
        let recs: Vec<Record> = turned.iter().map(|&h| Record::ghost(h)).collect();
        let _ = st.log(&recs);
        // Host LRU order, least recent first; keep the most recent `cap`.
        let host_only = st.reg.host_only();
        let keep = &host_only[host_only.len().saturating_sub(st.reg.disk_cap())..];
        if keep.is_empty() {
            return (st, Ok(0));
        }
        if let Err(e) = self.settle_index(&mut st) {
            return (st, Err(e));
        }
        let region = match self.region() {
            Ok(r) => r,
            Err(e) => return (st, Err(e)),
        };
        let mut plan = Plan::default();
        // Least recent first, so the disk tier's LRU order follows the host's.
        for &(h, slot) in keep {
            if !st.reg.offload(h, slot, &mut plan) {
                break; // the rest of the disk tier is leased
            }
        }
        let n = keep.len();
        let (st, r) = self.execute(st, &plan, region.as_deref());
        (st, r.map(|()| n))
    }
}
