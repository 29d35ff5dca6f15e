//! Running a plan made by the policy: the index's DEL records first, the
//! slots it fills held, then one batched disk write and one parallel copy
//! into host slots with the lock released, then the commit (checksums, PUT
//! records) or, on a failure, the roll-back. Also keeps the index in step
//! with memory: a dirty index rewritten before the next batch, a long one
//! compacted.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::MutexGuard;

use super::policy::{Plan, Src};
use super::{block_crc, BlockManager, State};
use crate::error::{Error, Result};
use crate::host::Region;
use crate::index::{IndexLog, Record};

/// One disk write of a plan, resolved: (disk slot, source address, an
/// offload?, hash).
struct Write {
    slot: u64,
    addr: usize,
    victim: bool,
    hash: u64,
}

impl BlockManager {
    /// Rewrite a dirty index from memory (see the module docs) before a
    /// batch is planned.
    pub(super) fn settle_index(&self, st: &mut State) -> Result<()> {
        if !st.index.as_ref().is_some_and(IndexLog::dirty) {
            return Ok(());
        }
        let live = st.reg.live_disk();
        let g = self.geometry.expect("persistent store");
        st.index.as_mut().expect("checked").compact(&g, &live)?;
        st.stats.index_compactions += 1;
        Ok(())
    }

    /// Run a plan in three steps. Under the lock: the DEL records of reused
    /// disk slots, and every slot the plan fills marked `filling` (invisible
    /// to reads) and pinned (never evicted nor reused by another call).
    /// Without the lock: one batched disk write (checksummed on the I/O
    /// workers), then one parallel copy into host slots. Under the lock
    /// again: PUT records and checksums for the blocks still registered in
    /// the slots written (another thread may have removed some meanwhile),
    /// then the slots are released to reads; on a failure the plan is
    /// rolled back. Takes the guard and gives it back.
    pub(super) fn execute<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        plan: &Plan,
        region: Option<&Region>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        if st.index.as_ref().is_some_and(IndexLog::dirty) {
            // An append failed earlier in this call: no slot may be written
            // until the index is rewritten (at the start of the next call).
            st.reg.roll_back(plan);
            return (
                st,
                Err(Error::InvalidArgument(
                    "the store's index could not be updated earlier in this call; nothing was \
                     written, and the index is rewritten at the next call"
                        .into(),
                )),
            );
        }
        let mut writes: Vec<Write> = plan
            .live_writes()
            .map(|w| Write {
                slot: w.disk_slot as u64,
                addr: match w.src {
                    Src::Addr(a) => a,
                    Src::HostSlot(s) => {
                        let (h, r) = (self.host.as_ref().expect("host"), region.expect("region"));
                        h.slot_ptr(r, s as u64) as usize
                    }
                },
                victim: w.victim,
                hash: w.hash,
            })
            .collect();
        writes.sort_unstable_by_key(|w| w.slot);
        let copies: Vec<(u64, usize)> = plan
            .live_copies()
            .map(|c| (c.host_slot as u64, c.addr))
            .collect();
        if let Some(ix) = st.index.as_mut() {
            let dels: Vec<Record> = plan
                .disk_evicted
                .iter()
                .map(|&(h, t)| Record::del(h, t))
                .collect();
            if let Err(e) = ix.append(&dels) {
                st.reg.roll_back(plan);
                return (st, Err(e));
            }
        }
        if writes.is_empty() && copies.is_empty() {
            return (st, Ok(()));
        }
        st.reg.hold(plan, true);
        drop(st);

        // Bytes move with the lock released.
        let crcs: Vec<AtomicU32> = (0..writes.len()).map(|_| AtomicU32::new(0)).collect();
        let mut r = Ok(());
        if !writes.is_empty() {
            let slots: Vec<u64> = writes.iter().map(|w| w.slot).collect();
            let addrs: Vec<usize> = writes.iter().map(|w| w.addr).collect();
            let bs = self.block_size;
            let hook = |i: usize, addr: usize| {
                // SAFETY: addr is block i's source, valid for bs bytes (see below).
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, bs) };
                crcs[i].store(block_crc(writes[i].hash, bytes), Ordering::Relaxed);
            };
            let disk = self.disk.as_ref().expect("disk tier");
            // SAFETY: every address is a host slot pinned by this plan (region
            // held) or a block of the caller's buffer, held for this call.
            r = unsafe {
                disk.write_blocks_from(&slots, &addrs, self.opts.checksums.then_some(&hook as _))
            };
            r = r.and_then(|()| if self.opts.sync { disk.sync() } else { Ok(()) });
        }
        if r.is_ok() && !copies.is_empty() {
            let host = self.host.as_ref().expect("host tier");
            let slots: Vec<u64> = copies.iter().map(|c| c.0).collect();
            // SAFETY: slots are in range and pinned by this plan (nobody else
            // writes them); each addr is a block of the caller's buffer held
            // for this call; host slots are distinct (one live copy per slot).
            // Victims' bytes left these slots in the disk write above.
            unsafe { host.copy_slots(region.expect("region"), &slots, |i| copies[i].1, true) };
        }

        let mut st = self.lock();
        st.reg.hold(plan, false);
        self.committed.notify_all();
        let r = r.and_then(|()| {
            // Only blocks still registered in the slots written are recorded.
            let mut puts = Vec::new();
            for (i, w) in writes.iter().enumerate() {
                let crc = crcs[i].load(Ordering::Relaxed);
                if st.reg.commit_write(w.hash, w.slot as u32, crc) {
                    puts.push(Record::put(w.hash, w.slot as u32, crc));
                }
            }
            st.index.as_mut().map_or(Ok(()), |ix| ix.append(&puts))
        });
        if let Err(e) = r {
            st.stats.failed_writes += writes.len() as u64;
            st.reg.roll_back(plan);
            return (st, Err(e));
        }
        if !writes.is_empty() {
            st.stats.offloaded_blocks += writes.iter().filter(|w| w.victim).count() as u64;
            self.maybe_compact(&mut st);
        }
        (st, Ok(()))
    }

    /// Rewrite the index when it holds far more records than live blocks.
    fn maybe_compact(&self, st: &mut State) {
        let live_n = st.reg.used().1 as u64;
        let needs = st
            .index
            .as_ref()
            .is_some_and(|ix| ix.records() > 4 * live_n + 4096);
        if !needs {
            return;
        }
        let live = st.reg.live_disk();
        let g = self.geometry.expect("persistent store");
        if let Some(ix) = st.index.as_mut() {
            match ix.compact(&g, &live) {
                Ok(()) => st.stats.index_compactions += 1,
                Err(e) => st.warnings.push(format!(
                    "compacting the index failed (it keeps growing): {e}"
                )),
            }
        }
    }
}
