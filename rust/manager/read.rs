//! The read path of `get` (and of `get_lease`), in steps:
//! 1. **plan** (lock held): wait for bytes in flight, then the longest stored
//!    prefix and where each block is read from (host preferred), pinned;
//! 2. **read** (lock released): host slots copied out, disk slots read (one
//!    batch, checksums on the I/O workers; a failed read bisected to the
//!    first block that cannot be read);
//! 3. **commit** (lock held): pins released, blocks that failed their
//!    checksum or read dropped (a miss, counted, in the index), the prefix
//!    cut before the first of them;
//! 4. **promote**: hits counted, the prefix touched in order, disk-only
//!    blocks promoted into the host tier (a plan run by the executor).
//!
//! Steps 1-3 are [`BlockManager::read_prefix`], which changes no recency and
//! counts no hit: the remote tier's writer reads blocks back through it.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;

use super::policy::{Plan, TierKind, TierSlot};
use super::{block_crc, BlockManager, State};
use crate::error::{Error, Result};
use crate::host::Region;
use crate::index::Record;

/// A read in progress: where each block of the prefix is read from.
pub(super) struct Read {
    /// Length of the prefix (cut before a block that failed its checksum or
    /// read, once committed).
    pub(super) n: usize,
    /// (host slot, index in the request)
    host: Vec<(u32, usize)>,
    /// (disk slot, index in the request, recorded checksum)
    disk: Vec<(u32, usize, u32)>,
}

impl Read {
    fn slots(&self) -> impl Iterator<Item = TierSlot> + '_ {
        let host = self.host.iter().map(|r| TierSlot::host(r.0));
        host.chain(self.disk.iter().map(|r| TierSlot::disk(r.0)))
    }
}

/// What a read's disk reads found: per disk block, whether it failed its
/// checksum (or its read); and the first block that could not be read, with
/// the error.
struct DiskOutcome {
    bad: Vec<AtomicBool>,
    unreadable: Option<(usize, Error)>,
}

impl BlockManager {
    #[cfg(test)] // a convenience of the unit tests
    /// Copy the longest stored prefix of `hashes` into `dst`; returns its
    /// length.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes for the whole call and
    /// untouched by others meanwhile.
    pub unsafe fn get_raw(&self, hashes: &[u64], dst: *mut u8, len: usize) -> Result<usize> {
        // SAFETY: forwarded.
        unsafe { self.get_rows(hashes, dst, len, None) }
    }

    #[cfg(test)] // a convenience of the unit tests
    pub fn get(&self, hashes: &[u64], dst: &mut [u8]) -> Result<usize> {
        // SAFETY: a valid exclusive slice.
        unsafe { self.get_raw(hashes, dst.as_mut_ptr(), dst.len()) }
    }

    /// Copy the longest stored prefix of `hashes` into row `rows[i]` of
    /// `dst` (distinct rows), or back to back without rows; returns its
    /// length.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes for the whole call and
    /// untouched by others meanwhile.
    pub unsafe fn get_rows(
        &self,
        hashes: &[u64],
        dst: *mut u8,
        len: usize,
        rows: Option<&[u64]>,
    ) -> Result<usize> {
        let region = self.region()?;
        let addrs = self.block_addrs(
            hashes.len(),
            (dst as usize, len),
            rows,
            "dst",
            true,
            region.as_deref(),
        )?;
        let st = self.open_state()?;
        // SAFETY: forwarded from the caller.
        let n = unsafe { self.get_prefix(st, hashes, &addrs, region.as_deref()) }?;
        let Some(r) = self.remote().filter(|_| n < hashes.len()) else {
            return Ok(n);
        };
        let d = r.deadline();
        // SAFETY: forwarded from the caller; the addresses were checked (distinct).
        Ok(n + unsafe { self.fetch_remote(&hashes[n..], &addrs[n..], region.as_deref(), d) })
    }

    /// `get` of checked destinations from the local tiers: read the prefix,
    /// then count the hits, touch it in order and promote its disk hits.
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for writes of block_size bytes, distinct,
    /// for the whole call.
    pub(super) unsafe fn get_prefix(
        &self,
        mut st: MutexGuard<'_, State>,
        hashes: &[u64],
        addrs: &[usize],
        region: Option<&Region>,
    ) -> Result<usize> {
        st.stats.get_calls += 1;
        // SAFETY: forwarded from the caller.
        let (mut st, read) = unsafe { self.read_prefix(st, hashes, addrs, region) }?;
        let n = read.n;
        if st.closed {
            return Ok(n); // the bytes were read while the store was open
        }
        st.stats.host_hits += read.host.iter().filter(|r| r.1 < n).count() as u64;
        st.stats.disk_hits += read.disk.iter().filter(|r| r.1 < n).count() as u64;
        st.stats.misses += (hashes.len() - n) as u64;
        for &h in &hashes[..n] {
            st.reg.touch(h);
        }
        self.promote(st, hashes, addrs, &read, region);
        Ok(n)
    }

    /// Steps 1-3 (see the module docs): the longest stored prefix of
    /// `hashes` into `addrs`, read from where each block is, checked. Changes
    /// no recency and counts no hit. Returns the guard and the read.
    ///
    /// # Safety
    /// As [`Self::get_prefix`].
    pub(super) unsafe fn read_prefix<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        hashes: &[u64],
        addrs: &[usize],
        region: Option<&Region>,
    ) -> Result<(MutexGuard<'a, State>, Read)> {
        let (mut st, mut read) = self.plan_read(st, hashes);
        // Pinned, the slots can be neither evicted nor reused while they are
        // read without the lock; other threads' calls go on meanwhile.
        for at in read.slots() {
            st.reg.pin(at);
        }
        drop(st);
        // SAFETY: forwarded from the caller; the slots are pinned.
        let outcome = unsafe { self.read_slots(&read, hashes, addrs, region) };
        let mut st = self.lock();
        for at in read.slots() {
            st.reg.unpin(at);
        }
        if let Some(o) = outcome? {
            self.commit_read(&mut st, hashes, &mut read, o);
        }
        Ok((st, read))
    }

    /// Step 1: wait until no block of the prefix has bytes in flight
    /// (another call's put or offload), then choose where each is read from.
    fn plan_read<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        hashes: &[u64],
    ) -> (MutexGuard<'a, State>, Read) {
        if let Err(e) = self.settle_index(&mut st) {
            // Reads still work; promotions wait for the rewrite.
            st.warnings
                .push(format!("rewriting the store's index failed: {e}"));
        }
        let mut n = st.reg.prefix(hashes);
        while n > 0 && st.reg.in_flight(&hashes[..n]) {
            st = self
                .committed
                .wait_timeout(st, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            n = if st.closed { 0 } else { st.reg.prefix(hashes) };
        }
        let mut read = Read {
            n,
            host: Vec::new(),
            disk: Vec::new(),
        };
        for (i, &h) in hashes[..n].iter().enumerate() {
            let at = st.reg.readable(h).expect("in the prefix");
            match at.kind {
                TierKind::Host => read.host.push((at.slot, i)),
                TierKind::Disk => read.disk.push((at.slot, i, st.reg.disk_crc(at.slot))),
            }
        }
        (st, read)
    }

    /// Step 2, without the lock: host slots copied out, disk slots read.
    /// `Ok(None)` without disk reads. Errors other than a failed read of a
    /// block (which the outcome reports) are returned.
    ///
    /// # Safety
    /// As [`Self::get_prefix`]; the read's slots are pinned.
    unsafe fn read_slots(
        &self,
        read: &Read,
        hashes: &[u64],
        addrs: &[usize],
        region: Option<&Region>,
    ) -> Result<Option<DiskOutcome>> {
        if !read.host.is_empty() {
            let host = self.host.as_ref().expect("host tier");
            let slots: Vec<u64> = read.host.iter().map(|r| r.0 as u64).collect();
            // SAFETY: slots registered, in range, pinned; dst blocks are the caller's.
            unsafe {
                host.copy_slots(
                    region.expect("region"),
                    &slots,
                    |k| addrs[read.host[k].1],
                    false,
                )
            };
        }
        if read.disk.is_empty() {
            return Ok(None);
        }
        let bs = self.block_size;
        let disk = self.disk.as_ref().expect("disk tier");
        let slots: Vec<u64> = read.disk.iter().map(|r| r.0 as u64).collect();
        let dsts: Vec<usize> = read.disk.iter().map(|r| addrs[r.1]).collect();
        let bad: Vec<AtomicBool> = (0..slots.len()).map(|_| AtomicBool::new(false)).collect();
        let hook = |i: usize, a: usize| {
            // SAFETY: `a` is block i's destination, just filled, bs bytes.
            let bytes = unsafe { std::slice::from_raw_parts(a as *const u8, bs) };
            let (_, idx, crc) = read.disk[i];
            if block_crc(hashes[idx], bytes) != crc {
                bad[i].store(true, Ordering::Relaxed);
            }
        };
        let check = self.opts.checksums;
        // A block may appear twice in `hashes`; reading one slot into two
        // places is fine.
        // SAFETY: distinct blocks of the caller's dst.
        let r = unsafe { disk.read_blocks_into(&slots, &dsts, check.then_some(&hook as _)) };
        // A failed read (EIO, a bad sector): find the first block that
        // cannot be read, block by block in request order; it is dropped
        // like a corrupt block and the prefix ends before it.
        let mut unreadable: Option<(usize, Error)> = None;
        match r {
            Ok(()) => {}
            Err(Error::Io { .. }) => {
                for k in 0..slots.len() {
                    let one = |_: usize, a: usize| hook(k, a);
                    // SAFETY: as above, one block.
                    let r = unsafe {
                        disk.read_blocks_into(
                            &slots[k..k + 1],
                            &dsts[k..k + 1],
                            check.then_some(&one as _),
                        )
                    };
                    match r {
                        Ok(()) => {}
                        Err(e @ Error::Io { .. }) => {
                            bad[k].store(true, Ordering::Relaxed);
                            unreadable = Some((k, e));
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Some(DiskOutcome { bad, unreadable }))
    }

    /// Step 3: a block that failed its checksum or read is a miss: dropped
    /// (its DEL in the index), counted, never returned; the prefix ends
    /// before it.
    fn commit_read(&self, st: &mut State, hashes: &[u64], read: &mut Read, o: DiskOutcome) {
        let mut dels = Vec::new();
        for (k, &(t, i, _)) in read.disk.iter().enumerate() {
            if !o.bad[k].load(Ordering::Relaxed) {
                continue;
            }
            let h = hashes[i];
            read.n = read.n.min(i);
            if !st.reg.drop_disk_copy(h, t) {
                continue; // removed or moved meanwhile
            }
            dels.push(Record::del(h, t));
            match &o.unreadable {
                Some((uk, e)) if *uk == k => {
                    st.stats.io_errors += 1;
                    if !st.io_error_logged {
                        st.io_error_logged = true;
                        st.warnings.push(format!(
                            "block {h:#018x} in disk slot {t} could not be read ({e}); it was \
                             dropped and counted as a miss. Later read errors are counted in \
                             stats()[\"io_errors\"] without a warning"
                        ));
                    }
                }
                _ => {
                    st.stats.corrupt_blocks += 1;
                    st.warnings.push(format!(
                        "block {h:#018x} in disk slot {t} failed its checksum (torn write or \
                         corruption on disk); it was dropped and counted as a miss"
                    ));
                }
            }
        }
        if let Some(ix) = st.index.as_mut() {
            if let Err(e) = ix.append(&dels) {
                st.warnings.push(format!(
                    "recording dropped corrupt blocks in the index failed: {e}"
                ));
            }
        }
    }

    /// Step 4's promotion: the prefix's disk hits that are still disk-only
    /// (a block removed by another thread while it was read is not), in
    /// order, into the host tier from the caller's copy.
    fn promote(
        &self,
        mut st: MutexGuard<'_, State>,
        hashes: &[u64],
        addrs: &[usize],
        read: &Read,
        region: Option<&Region>,
    ) {
        let hits: Vec<usize> = read
            .disk
            .iter()
            .map(|r| r.1)
            .filter(|&i| i < read.n)
            .collect();
        if !st.reg.has_host() || hits.is_empty() {
            return;
        }
        let eligible: std::collections::HashSet<u64> = hits
            .iter()
            .map(|&i| hashes[i])
            .filter(|&h| st.reg.disk_only(h))
            .collect();
        let mut plan = Plan::default();
        let mut promoted = 0u64;
        for &i in &hits {
            if eligible.contains(&hashes[i]) && st.reg.promote(hashes[i], addrs[i], &mut plan) {
                promoted += 1;
            }
        }
        let (mut st, r) = self.execute(st, &plan, region);
        match r {
            Ok(()) => st.stats.onboarded_blocks += promoted,
            Err(e) => {
                // The caller's data is complete; only the promotion (and the
                // offload it caused) failed and was rolled back.
                st.warnings.push(format!(
                    "promoting {promoted} blocks into the host tier failed and was undone: {e}"
                ));
            }
        }
    }
}
