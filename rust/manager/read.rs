//! The read path of `get` (and of `get_lease`), in steps:
//! 1. **plan** (lock held): wait for bytes in flight; the longest stored
//!    prefix and where each block is read from (host preferred); the prefix
//!    touched in order and its disk hits promoted into the host tier, on
//!    metadata, exactly as the policy orders it after a read (so the plan
//!    sees the read's slots unpinned, as the policy does); then the read's
//!    slots pinned and the promotion plan's slots held.
//! 2. **move** (lock released): host hits copied out; disk hits read, most
//!    straight into the host slot they are promoted to and copied out from
//!    there (one read, one copy, the checksum checked during the copy), the
//!    rest into the caller's buffer first, checked as they arrive (see
//!    [`BlockManager::get_prefix`] for which); the promotion's offloads
//!    written in between.
//! 3. **commit** (lock held): pins released, the plan committed (or rolled
//!    back), blocks that failed their checksum or read dropped (a miss,
//!    counted, in the index) with any host copy they were promoted to, the
//!    prefix cut before the first of them.
//!
//! [`BlockManager::read_prefix`] is the same read without the promotion,
//! recency or hit counts: the remote tier's writer reads blocks back
//! through it.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;

use super::execute::Moves;
use super::policy::{Plan, Src, TierKind, TierSlot};
use super::{block_crc, BlockManager, Keys, State};
use crate::checksum::block_crc_of;
use crate::disk::Hook;
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
    /// The recorded checksum that block `i` of the prefix was read from disk
    /// against (checked when checksums are on); None for a host hit or a
    /// block past the prefix.
    pub(super) fn disk_crc(&self, i: usize) -> Option<u32> {
        (i < self.n)
            .then(|| self.disk.iter().find(|r| r.1 == i).map(|r| r.2))
            .flatten()
    }

    fn slots(&self) -> impl Iterator<Item = TierSlot> + '_ {
        let host = self.host.iter().map(|r| TierSlot::host(r.0));
        host.chain(self.disk.iter().map(|r| TierSlot::disk(r.0)))
    }
}

/// Why a disk hit is not served.
enum Failure {
    /// Its bytes failed their checksum.
    Checksum,
    /// Its read failed (EIO, a bad sector).
    Unreadable(Error),
    /// Not read: an earlier block of its batch could not be read.
    Skipped,
}

/// One disk read of a batch: (disk slot, destination, hash, recorded checksum).
type DiskRead = (u32, usize, u64, u32);

impl BlockManager {
    #[cfg(test)] // a convenience of the unit tests
    /// Copy the longest stored prefix of `hashes` into `dst`; returns its
    /// length.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes for the whole call and
    /// untouched by others meanwhile.
    pub unsafe fn get_raw(&self, hashes: Keys<'_>, dst: *mut u8, len: usize) -> Result<usize> {
        // SAFETY: forwarded.
        unsafe { self.get_rows(hashes, dst, len, None) }
    }

    #[cfg(test)] // a convenience of the unit tests
    pub fn get(&self, hashes: Keys<'_>, dst: &mut [u8]) -> Result<usize> {
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
        hashes: Keys<'_>,
        dst: *mut u8,
        len: usize,
        rows: Option<&[u64]>,
    ) -> Result<usize> {
        let _timer = self.latency.load.time();
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
        if n == hashes.len() {
            return Ok(n);
        }
        let Some((r, space)) = self.remote_space(hashes.ns()) else {
            return Ok(n);
        };
        let (d, rest) = (r.deadline(), hashes.sub(n..));
        // SAFETY: forwarded from the caller; the addresses were checked (distinct).
        Ok(n + unsafe { self.fetch_remote((r, &space), rest, &addrs[n..], region.as_deref(), d) })
    }

    /// `get` of checked destinations from the local tiers (see the module
    /// docs for the steps).
    ///
    /// A disk hit is read straight into the host slot it is promoted to
    /// ("direct") unless that would overwrite bytes still needed: when its
    /// disk slot is one the promotion's offloads write, or its host slot is
    /// the source of one of those offloads, or its promotion did not stay in
    /// the plan. Those are read into the caller's buffer before the offloads
    /// are written, and copied into their host slot after. The order: host
    /// hits out, reads into the buffer, offload writes, direct reads, copies.
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for writes of block_size bytes, distinct,
    /// for the whole call.
    pub(super) unsafe fn get_prefix(
        &self,
        mut st: MutexGuard<'_, State>,
        hashes: Keys<'_>,
        addrs: &[usize],
        region: Option<&Region>,
    ) -> Result<usize> {
        st.stats.get_calls += 1;
        let (mut st, mut read) = self.plan_read(st, hashes);
        for h in hashes.sub(..read.n).iter() {
            st.reg.touch(h);
        }
        let mut plan = Plan::default();
        if st.reg.has_host() {
            for &(_, i, _) in &read.disk {
                st.reg.promote(hashes.at(i), addrs[i], &mut plan);
            }
        }
        for at in read.slots() {
            st.reg.pin(at);
        }
        let mut moves = match self.begin(&mut st, &plan, region) {
            Ok(mut m) => {
                m.promotions();
                Some(m)
            }
            Err(e) => {
                Self::promotion_undone(&mut st, &plan, &e);
                None
            }
        };
        // The host slot each disk hit is promoted to (its promotion stayed
        // in the plan), and which of them are read straight into it (see above).
        let mut promoted_to: Vec<Option<u32>> = vec![None; read.disk.len()];
        let mut direct: Vec<Option<u32>> = vec![None; read.disk.len()];
        if let (Some(m), false) = (moves.as_mut(), read.disk.is_empty()) {
            let written: HashSet<u32> = plan.live_writes().map(|w| w.disk_slot).collect();
            let sources: HashSet<u32> = plan
                .live_writes()
                .filter_map(|w| match w.src {
                    Src::HostSlot(s) => Some(s),
                    Src::Addr(_) => None,
                })
                .collect();
            let copy_at: std::collections::HashMap<usize, u32> =
                plan.live_copies().map(|c| (c.addr, c.host_slot)).collect();
            for (k, &(t, i, _)) in read.disk.iter().enumerate() {
                promoted_to[k] = copy_at.get(&addrs[i]).copied();
                direct[k] =
                    promoted_to[k].filter(|s| !sources.contains(s) && !written.contains(&t));
            }
            let skip: HashSet<u64> = direct.iter().flatten().map(|&s| s as u64).collect();
            m.skip_copies(|s| skip.contains(&s));
        }
        drop(st);

        // SAFETY: forwarded from the caller; every slot read is pinned and
        // every slot written is held by the plan; the order above keeps each
        // read of a slot before any write into it.
        let (failures, r_read, r_write) =
            unsafe { self.move_read(&read, &direct, hashes, addrs, region, moves.as_ref()) };

        let mut st = self.lock();
        for at in read.slots() {
            st.reg.unpin(at);
        }
        // A read that failed for another reason than the device fails the
        // call: the promotion (whose host copies are not all filled) is
        // rolled back.
        let r_write = match &r_read {
            Ok(()) => r_write,
            Err(e) => Err(Error::InvalidArgument(format!("the read failed: {e}"))),
        };
        if let Some(Err(e)) = moves
            .as_ref()
            .map(|m| self.finish(&mut st, &plan, m, r_write))
        {
            Self::promotion_undone(&mut st, &plan, &e);
            promoted_to.fill(None);
        }
        r_read?;
        if st.closed {
            return Ok(read.n); // the bytes were read while the store was open
        }
        let undone = self.commit_read(&mut st, hashes, &mut read, failures, &promoted_to);
        let n = read.n;
        st.stats.host_hits += read.host.iter().filter(|r| r.1 < n).count() as u64;
        st.stats.disk_hits += read.disk.iter().filter(|r| r.1 < n).count() as u64;
        st.stats.misses += (hashes.len() - n) as u64;
        // The shared namespace's are the totals less the others' (see `namespace_stats`).
        if !hashes.is_empty() && hashes.ns() != 0 {
            let (host, disk) = (
                read.host.iter().filter(|r| r.1 < n).count() as u64,
                read.disk.iter().filter(|r| r.1 < n).count() as u64,
            );
            let c = st.ns_counts.entry(hashes.ns()).or_default();
            c.host_hits += host;
            c.disk_hits += disk;
            c.misses += (hashes.len() - n) as u64;
        }
        st.stats.onboarded_blocks += (promoted_to.iter().flatten().count() - undone) as u64;
        Ok(n)
    }

    /// A get's promotion failed (to start, or to commit) and was rolled back:
    /// the caller's data is complete; only the promotion is lost. Logged.
    fn promotion_undone(st: &mut State, plan: &Plan, e: &Error) {
        st.warnings.push(format!(
            "promoting {} blocks into the host tier failed and was undone: {e}",
            plan.live_copies().count()
        ));
    }

    /// Step 2 of a `get`, without the lock. Returns each disk hit's failure
    /// (if any), the first error that is not a device's, and the result of
    /// the promotion's offload writes.
    ///
    /// # Safety
    /// As [`Self::get_prefix`].
    unsafe fn move_read(
        &self,
        read: &Read,
        direct: &[Option<u32>],
        hashes: Keys<'_>,
        addrs: &[usize],
        region: Option<&Region>,
        moves: Option<&Moves>,
    ) -> (Vec<Option<Failure>>, Result<()>, Result<()>) {
        let mut failures: Vec<Option<Failure>> = (0..read.disk.len()).map(|_| None).collect();
        // SAFETY: forwarded; host hits are pinned.
        unsafe { self.copy_host_hits(read, addrs, region) };
        let slot_addr = |s: u32| {
            let (h, r) = (self.host.as_ref().expect("host"), region.expect("region"));
            h.slot_ptr(r, s as u64) as usize
        };
        let batch = |ks: &[usize], into_slot: bool| -> Vec<DiskRead> {
            ks.iter()
                .map(|&k| {
                    let (t, i, crc) = read.disk[k];
                    let dst = match direct[k] {
                        Some(s) if into_slot => slot_addr(s),
                        _ => addrs[i],
                    };
                    (t, dst, hashes.hashes()[i], crc)
                })
                .collect()
        };
        let (first, later): (Vec<usize>, Vec<usize>) =
            (0..read.disk.len()).partition(|&k| direct[k].is_none());
        let check = self.opts.checksums;
        // SAFETY: forwarded; the destinations are the caller's blocks.
        let mut r_read =
            unsafe { self.read_disk(&batch(&first, false), &first, &mut failures, check) };
        let mut r_write = Ok(());
        if let Some(m) = moves.filter(|_| r_read.is_ok()) {
            // SAFETY: the plan holds its slots; sources are held host slots
            // or the caller's blocks (read above when they are disk hits).
            r_write = unsafe { self.write_disk(m) };
        }
        if r_read.is_ok() {
            // With the offloads written, the direct reads may fill their host
            // slots; without, they go to the caller's buffer. Read into their
            // slots, they are checked while copied out to the caller (one
            // pass over bytes the device just wrote to memory, not two).
            let into_slot = r_write.is_ok();
            let b = batch(&later, into_slot);
            // SAFETY: destinations are held host slots or the caller's blocks.
            r_read = unsafe { self.read_disk(&b, &later, &mut failures, check && !into_slot) };
            if into_slot && r_read.is_ok() {
                if let Some(m) = moves {
                    // SAFETY: the copies' sources are the caller's blocks,
                    // read above; their slots are held.
                    unsafe { self.copy_into_host(m, region) };
                }
                // SAFETY: the slots are held by the plan and were just filled;
                // the destinations are the caller's blocks.
                unsafe {
                    self.copy_out_read(&later, &b, direct, addrs, read, region, &mut failures)
                };
            }
        }
        (failures, r_read, r_write)
    }

    /// The disk hits `ks` that were read straight into their host slots
    /// (`direct`; `reads` in the order of `ks`), copied out to the caller's
    /// blocks; with checksums on, each checked during its copy (a mismatch is
    /// a failure, its bytes in the caller's block unspecified). Blocks whose
    /// read failed are not copied.
    ///
    /// # Safety
    /// The reads' host slots are held and filled; `addrs` are the caller's
    /// blocks, valid for writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn copy_out_read(
        &self,
        ks: &[usize],
        reads: &[DiskRead],
        direct: &[Option<u32>],
        addrs: &[usize],
        read: &Read,
        region: Option<&Region>,
        failures: &mut [Option<Failure>],
    ) {
        let out: Vec<usize> = (0..ks.len())
            .filter(|&j| failures[ks[j]].is_none())
            .collect();
        if out.is_empty() {
            return;
        }
        let (host, region) = (self.host.as_ref().expect("host"), region.expect("region"));
        let slots: Vec<u64> = out
            .iter()
            .map(|&j| direct[ks[j]].expect("read into its host slot") as u64)
            .collect();
        let dst = |x: usize| addrs[read.disk[ks[out[x]]].1];
        if !self.opts.checksums {
            // SAFETY: forwarded from the caller.
            unsafe { host.copy_slots(region, &slots, dst, false) };
            return;
        }
        // SAFETY: forwarded from the caller.
        let sums =
            unsafe { host.copy_slots_summed(region, &slots, dst, false, |x| reads[out[x]].2) };
        for (x, sum) in sums.into_iter().enumerate() {
            if sum != reads[out[x]].3 {
                failures[ks[out[x]]] = Some(Failure::Checksum);
            }
        }
    }

    /// Steps 1-3 without promotion (see the module docs): the longest stored
    /// prefix of `hashes` into `addrs`, read from where each block is,
    /// checked. Changes no recency and counts no hit. Returns the guard and
    /// the read.
    ///
    /// # Safety
    /// As [`Self::get_prefix`].
    pub(super) unsafe fn read_prefix<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        hashes: Keys<'_>,
        addrs: &[usize],
        region: Option<&Region>,
    ) -> Result<(MutexGuard<'a, State>, Read)> {
        let (mut st, mut read) = self.plan_read(st, hashes);
        for at in read.slots() {
            st.reg.pin(at);
        }
        drop(st);
        let mut failures: Vec<Option<Failure>> = (0..read.disk.len()).map(|_| None).collect();
        // SAFETY: forwarded from the caller; the slots are pinned.
        unsafe { self.copy_host_hits(&read, addrs, region) };
        let reads: Vec<DiskRead> = read
            .disk
            .iter()
            .map(|&(t, i, crc)| (t, addrs[i], hashes.hashes()[i], crc))
            .collect();
        let all: Vec<usize> = (0..reads.len()).collect();
        // SAFETY: as above.
        let r = unsafe { self.read_disk(&reads, &all, &mut failures, self.opts.checksums) };
        let mut st = self.lock();
        for at in read.slots() {
            st.reg.unpin(at);
        }
        r?;
        let none = vec![None; read.disk.len()];
        self.commit_read(&mut st, hashes, &mut read, failures, &none);
        Ok((st, read))
    }

    /// Wait until no block of the prefix has bytes in flight (another call's
    /// put or offload), then choose where each is read from.
    fn plan_read<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        hashes: Keys<'_>,
    ) -> (MutexGuard<'a, State>, Read) {
        if let Err(e) = self.settle_index(&mut st) {
            // Reads still work; promotions wait for the rewrite.
            st.warnings
                .push(format!("rewriting the store's index failed: {e}"));
        }
        let mut n = st.reg.prefix(hashes);
        while n > 0 && st.reg.in_flight(hashes.sub(..n)) {
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
        for (i, h) in hashes.sub(..n).iter().enumerate() {
            let at = st.reg.readable(h).expect("in the prefix");
            match at.kind {
                TierKind::Host => read.host.push((at.slot, i)),
                TierKind::Disk => read.disk.push((at.slot, i, st.reg.disk_crc(at.slot))),
            }
        }
        (st, read)
    }

    /// The host hits of a read, copied out of their (pinned) slots.
    ///
    /// # Safety
    /// As [`Self::get_prefix`]; the slots are pinned.
    unsafe fn copy_host_hits(&self, read: &Read, addrs: &[usize], region: Option<&Region>) {
        if read.host.is_empty() {
            return;
        }
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

    /// One batch of disk reads (`ks[j]` is read `j`'s index among the read's
    /// disk hits, for `failures`), checked against their checksums when
    /// `check` (else the caller checks them, or checksums are off). A failed
    /// read is bisected, block by block in order, to the first block that
    /// cannot be read; the blocks after it are not read. Errors other than a
    /// device's are returned.
    ///
    /// # Safety
    /// Every destination is valid for writes of block_size bytes, distinct,
    /// and untouched by others meanwhile; the disk slots are pinned.
    unsafe fn read_disk(
        &self,
        reads: &[DiskRead],
        ks: &[usize],
        failures: &mut [Option<Failure>],
        check: bool,
    ) -> Result<()> {
        if reads.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let disk = self.disk.as_ref().expect("disk tier");
        let slots: Vec<u64> = reads.iter().map(|r| r.0 as u64).collect();
        let dsts: Vec<usize> = reads.iter().map(|r| r.1).collect();
        let bad: Vec<AtomicBool> = (0..reads.len()).map(|_| AtomicBool::new(false)).collect();
        let check_crc = |j: usize, crc: u32| {
            if crc != reads[j].3 {
                bad[j].store(true, Ordering::Relaxed);
            }
        };
        let each = |j: usize, a: usize| {
            // SAFETY: `a` is read j's destination, just filled, bs bytes.
            let bytes = unsafe { std::slice::from_raw_parts(a as *const u8, bs) };
            check_crc(j, block_crc(reads[j].2, bytes));
        };
        // Blocks read through a bounce buffer (an unaligned destination) are
        // summed while copied out of it.
        let sums = |j: usize, crc: u32| check_crc(j, block_crc_of(reads[j].2, crc, bs));
        let hook = Hook {
            each: &each,
            sums: &sums,
        };
        // A block may appear twice in a request; reading one slot into two
        // places is fine.
        // SAFETY: forwarded from the caller.
        let r = unsafe { disk.read_blocks_into(&slots, &dsts, check.then_some(hook)) };
        match r {
            Ok(()) => {}
            Err(Error::Io { .. }) => {
                for j in 0..reads.len() {
                    let one_each = |_: usize, a: usize| each(j, a);
                    let one_sums = |_: usize, crc: u32| sums(j, crc);
                    let one = Hook {
                        each: &one_each,
                        sums: &one_sums,
                    };
                    // SAFETY: as above, one block.
                    let r = unsafe {
                        disk.read_blocks_into(
                            &slots[j..j + 1],
                            &dsts[j..j + 1],
                            check.then_some(one),
                        )
                    };
                    match r {
                        Ok(()) => {}
                        Err(e @ Error::Io { .. }) => {
                            failures[ks[j]] = Some(Failure::Unreadable(e));
                            for &k in &ks[j + 1..] {
                                failures[k] = Some(Failure::Skipped);
                            }
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        for (j, b) in bad.iter().enumerate() {
            if b.load(Ordering::Relaxed) && failures[ks[j]].is_none() {
                failures[ks[j]] = Some(Failure::Checksum);
            }
        }
        Ok(())
    }

    /// Step 3's drops: a block that failed its checksum or read is a miss:
    /// dropped (its DEL in the index) with the host copy it was promoted to
    /// (`promoted_to`, per disk hit, from a committed plan), counted, never
    /// returned; the prefix ends before it. A block that was not read keeps
    /// its disk copy but not its promotion. Returns how many promotions were
    /// undone.
    fn commit_read(
        &self,
        st: &mut State,
        hashes: Keys<'_>,
        read: &mut Read,
        failures: Vec<Option<Failure>>,
        promoted_to: &[Option<u32>],
    ) -> usize {
        let mut dels = Vec::new();
        let mut undone = 0;
        for (k, f) in failures.into_iter().enumerate() {
            let Some(f) = f else {
                // Read whole and checked: the host copy it was promoted to
                // has its recorded checksum.
                if let (Some(s), true) = (promoted_to[k], self.opts.checksums) {
                    let (_, i, crc) = read.disk[k];
                    st.reg.commit_copy(hashes.at(i), s, crc);
                }
                continue;
            };
            let (t, i, _) = read.disk[k];
            let h = hashes.at(i);
            read.n = read.n.min(i);
            let host_dropped = promoted_to[k].is_some_and(|s| st.reg.drop_host_copy(h, s));
            undone += host_dropped as usize;
            if matches!(f, Failure::Skipped) {
                continue; // not read: its disk copy stays
            }
            if st.reg.drop_disk_copy(h, t) {
                dels.push(Record::del(h, t));
            } else if !host_dropped {
                continue; // removed or moved meanwhile
            }
            match f {
                Failure::Unreadable(e) => {
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
        if let Err(e) = st.log(&dels) {
            st.warnings.push(format!(
                "recording dropped corrupt blocks in the index failed: {e}"
            ));
        }
        undone
    }
}
