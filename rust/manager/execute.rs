//! Running a plan made by the policy: the index's DEL records first, the
//! slots it fills held, then one batched disk write, one parallel copy into
//! host slots and the disk writes of blocks just copied (`write_through`
//! from an unaligned buffer) with the lock released, then the commit
//! (checksums, PUT records) or, on a failure, the roll-back. Also keeps the
//! index in step with memory: a dirty index rewritten before the next
//! batch, a long one compacted.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::MutexGuard;

use super::policy::{Plan, Src};
use super::{block_crc, BlockManager, Key, State};
use crate::checksum::block_crc_of;
use crate::disk::Hook;
use crate::error::{Error, Result};
use crate::host::Region;
use crate::index::{IndexLog, Record};

/// One disk write of a plan, resolved.
struct Write {
    slot: u64,
    /// Where its bytes are (a host slot's address, or the caller's block).
    addr: usize,
    /// An offload (not a new block).
    victim: bool,
    hash: Key,
    /// Its checksum where it is known already (a host slot's, computed
    /// when the bytes were copied in): the write does not compute it again.
    crc: Option<u32>,
    /// A new block that this plan also copies into a host slot (this index
    /// of `Moves::copies`): written from there once the copy ran (see
    /// [`BlockManager::execute`]), its checksum the copy's.
    after_copy: Option<usize>,
}

/// A plan's byte moves, resolved under the lock by [`BlockManager::begin`].
pub(super) struct Moves {
    /// Sorted by disk slot.
    writes: Vec<Write>,
    /// (host slot, source address, hash)
    copies: Vec<(u64, usize, Key)>,
    /// Each write's checksum, filled by the I/O workers (or known before).
    crcs: Vec<AtomicU32>,
    /// Each copy's checksum, computed during the copy (with checksums on).
    copy_crcs: std::sync::Mutex<Vec<u32>>,
    /// Whether `begin` held the plan's slots (`finish` releases them).
    held: bool,
    /// Whether the copies need their checksums computed (not when they are
    /// disk hits promoted by a read, whose checksums are recorded).
    sum_copies: bool,
}

impl Moves {
    fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.copies.is_empty()
    }

    /// The copies are a read's promotions of disk hits: their checksums are
    /// the recorded ones, not computed again while copying.
    pub(super) fn promotions(&mut self) {
        self.sum_copies = false;
    }

    /// Leave out the copies into the host slots `skip` names (a read fills
    /// those slots instead); they stay held by the plan.
    pub(super) fn skip_copies(&mut self, skip: impl Fn(u64) -> bool) {
        // (A read's plan writes no new block after a copy: no index to shift.)
        debug_assert!(self.writes.iter().all(|w| w.after_copy.is_none()));
        self.copies.retain(|c| !skip(c.0));
    }

    /// For each copy, the checksum its block's disk write computed from the
    /// same bytes (a new block put with `write_through` from a buffer the
    /// write used in place), once those writes ran.
    fn written_crcs(&self) -> Vec<Option<u32>> {
        let mut by_addr: Vec<(usize, usize)> = (self.writes.iter().enumerate())
            .filter(|(_, w)| !w.victim && w.after_copy.is_none())
            .map(|(j, w)| (w.addr, j))
            .collect();
        by_addr.sort_unstable();
        self.copies
            .iter()
            .map(|&(_, addr, hash)| {
                let k = by_addr.binary_search_by_key(&addr, |&(a, _)| a).ok()?;
                let j = by_addr[k].1;
                (self.writes[j].hash == hash).then(|| self.crcs[j].load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Each copy's (host slot, hash, checksum), once the copies ran with
    /// checksums on.
    fn summed_copies(&self) -> Vec<(u32, Key, u32)> {
        let crcs = self.copy_crcs.lock().unwrap_or_else(|p| p.into_inner());
        self.copies
            .iter()
            .zip(crcs.iter())
            .map(|(c, &crc)| (c.0 as u32, c.2, crc))
            .collect()
    }
}

impl BlockManager {
    /// Rewrite a dirty index from memory (see the module docs) before a
    /// batch is planned.
    pub(super) fn settle_index(&self, st: &mut State) -> Result<()> {
        if !st.index.as_ref().is_some_and(IndexLog::dirty) {
            return Ok(());
        }
        let snap = st.reg.snapshot();
        let g = self.geometry.expect("persistent store");
        st.index.as_mut().expect("checked").compact(&g, &snap)?;
        st.stats.index_compactions += 1;
        Ok(())
    }

    /// Run a plan in three steps. Under the lock ([`Self::begin`]): the DEL
    /// records of reused disk slots, and every slot the plan fills marked
    /// `filling` (invisible to reads) and pinned (never evicted nor reused by
    /// another call). Without the lock: one batched disk write (checksummed
    /// on the I/O workers), then one parallel copy into host slots, then one
    /// more disk write of the new blocks copied into the host tier too
    /// (`write_through`) from a caller's buffer that direct I/O cannot use in
    /// place (unaligned): from their host slots, with the checksums their
    /// copies computed, instead of through a bounce copy. Under the lock again
    /// ([`Self::finish`]): PUT records and checksums for the blocks still
    /// registered in the slots written (another thread may have removed some
    /// meanwhile), then the slots are released to reads; on a failure the
    /// plan is rolled back. Takes the guard and gives it back.
    pub(super) fn execute<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        plan: &Plan,
        region: Option<&Region>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        let moves = match self.begin(&mut st, plan, region) {
            Ok(m) => m,
            Err(e) => return (st, Err(e)),
        };
        if moves.is_empty() {
            return (st, Ok(()));
        }
        drop(st);
        // SAFETY: `begin` held the plan's slots; the sources are host slots
        // the plan holds or blocks of the caller's buffer, held for the call.
        let mut r = unsafe { self.write_disk(&moves) };
        if r.is_ok() {
            // SAFETY: as above; victims' bytes left these slots in the write.
            unsafe { self.copy_into_host(&moves, region) };
            // SAFETY: as above; the host slots were just filled.
            r = unsafe { self.write_copied(&moves) };
        }
        let mut st = self.lock();
        r = self.finish(&mut st, plan, &moves, r);
        (st, r)
    }

    /// A plan's first step, under the lock: refuse while the index is dirty,
    /// resolve the writes' sources, append the DEL records of the disk slots
    /// it takes, and hold the slots it fills. On an error the plan is rolled
    /// back (nothing held).
    pub(super) fn begin(
        &self,
        st: &mut State,
        plan: &Plan,
        region: Option<&Region>,
    ) -> Result<Moves> {
        if st.index.as_ref().is_some_and(IndexLog::dirty) {
            // An append failed earlier in this call: no slot may be written
            // until the index is rewritten (at the start of the next call).
            st.reg.roll_back(plan);
            return Err(Error::InvalidArgument(
                "the store's index could not be updated earlier in this call; nothing was \
                 written, and the index is rewritten at the next call"
                    .into(),
            ));
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
                crc: w.crc,
                after_copy: None,
            })
            .collect();
        writes.sort_unstable_by_key(|w| w.slot);
        let crcs = writes
            .iter()
            .map(|w| AtomicU32::new(w.crc.unwrap_or(0)))
            .collect();
        let copies: Vec<(u64, usize, Key)> = plan
            .live_copies()
            .map(|c| (c.host_slot as u64, c.addr, c.hash))
            .collect();
        if let (Some(h), Some(r), Some(d)) = (self.host.as_ref(), region, self.disk.as_ref()) {
            // New blocks copied into the host tier in this plan whose bytes
            // direct I/O cannot use in place (an unaligned caller buffer) are
            // written from their host slot after the copy (`write_through`).
            // The others are written first, from the caller's buffer: their
            // checksums are summed on the I/O workers while the device works.
            let mut by_src: Vec<(usize, Key, usize)> = (copies.iter().enumerate())
                .map(|(c, &(_, a, k))| (a, k, c))
                .collect();
            by_src.sort_unstable_by_key(|&(a, _, _)| a);
            let bounced = |w: &Write| !w.victim && !d.in_place(w.addr);
            for w in writes.iter_mut().filter(|w| bounced(w)) {
                let at = by_src.partition_point(|&(a, _, _)| a < w.addr);
                if let Some(&(_, _, c)) = by_src[at..]
                    .iter()
                    .take_while(|&&(a, _, _)| a == w.addr)
                    .find(|&&(_, k, _)| k == w.hash)
                {
                    let at = h.slot_ptr(r, copies[c].0) as usize;
                    if d.in_place(at) {
                        w.after_copy = Some(c);
                        w.addr = at;
                    }
                }
            }
        }
        if st.index.is_some() {
            let dels: Vec<Record> = plan
                .disk_evicted
                .iter()
                .map(|&(h, t, ghosted)| Record::evicted(h, t, ghosted))
                .collect();
            if let Err(e) = st.log(&dels) {
                st.reg.roll_back(plan);
                return Err(e);
            }
        }
        let mut moves = Moves {
            writes,
            copies,
            crcs,
            copy_crcs: Default::default(),
            held: false,
            sum_copies: true,
        };
        if !moves.is_empty() {
            st.reg.hold(plan, true);
            moves.held = true;
        }
        Ok(moves)
    }

    /// The plan's disk writes, as one batch, checksummed on the I/O workers
    /// (then fdatasync'd with `sync`).
    ///
    /// # Safety
    /// Every write's source address is valid for block_size bytes and not
    /// written meanwhile (a held host slot or the caller's block).
    pub(super) unsafe fn write_disk(&self, m: &Moves) -> Result<()> {
        let first: Vec<usize> = (0..m.writes.len())
            .filter(|&i| m.writes[i].after_copy.is_none())
            .collect();
        // SAFETY: forwarded from the caller.
        unsafe { self.write_some(m, &first) }
    }

    /// The plan's writes from host slots its copies just filled (see
    /// [`Self::execute`]), with the checksums the copies computed.
    ///
    /// # Safety
    /// As [`Self::write_disk`], after [`Self::copy_into_host`].
    unsafe fn write_copied(&self, m: &Moves) -> Result<()> {
        let later: Vec<usize> = (0..m.writes.len())
            .filter(|&i| m.writes[i].after_copy.is_some())
            .collect();
        if later.is_empty() {
            return Ok(());
        }
        // (Empty when checksums are off: nothing to record.)
        let copy_crcs = m.copy_crcs.lock().unwrap_or_else(|p| p.into_inner());
        for &i in &later {
            if let Some(&crc) = copy_crcs.get(m.writes[i].after_copy.expect("filtered")) {
                m.crcs[i].store(crc, Ordering::Relaxed);
            }
        }
        drop(copy_crcs);
        // SAFETY: forwarded from the caller.
        unsafe { self.write_some(m, &later) }
    }

    /// Writes `which` of the plan as one batch; a write whose checksum is
    /// not known already gets it computed on the I/O workers.
    ///
    /// # Safety
    /// As [`Self::write_disk`].
    unsafe fn write_some(&self, m: &Moves, which: &[usize]) -> Result<()> {
        if which.is_empty() {
            return Ok(());
        }
        let slots: Vec<u64> = which.iter().map(|&i| m.writes[i].slot).collect();
        let addrs: Vec<usize> = which.iter().map(|&i| m.writes[i].addr).collect();
        let bs = self.block_size;
        // The writes whose checksum is not known yet: a host slot's, or
        // (with checksums on, copies sum) the copy's of a write after it.
        let unknown = |k: usize| {
            let w = &m.writes[which[k]];
            (w.crc.is_none() && w.after_copy.is_none()).then_some(w.hash.hash)
        };
        let each = |k: usize, addr: usize| {
            if let Some(h) = unknown(k) {
                // SAFETY: addr is the block's source, valid for bs bytes (see above).
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, bs) };
                m.crcs[which[k]].store(block_crc(h, bytes), Ordering::Relaxed);
            }
        };
        // Blocks copied through a bounce buffer (an unaligned source) are
        // summed during that copy.
        let sums = |k: usize, crc: u32| {
            if let Some(h) = unknown(k) {
                m.crcs[which[k]].store(block_crc_of(h, crc, bs), Ordering::Relaxed);
            }
        };
        let hook = Hook {
            each: &each,
            sums: &sums,
        };
        let disk = self.disk.as_ref().expect("disk tier");
        // SAFETY: forwarded from the caller.
        unsafe { disk.write_blocks_from(&slots, &addrs, self.opts.checksums.then_some(hook)) }?;
        if self.opts.sync {
            disk.sync()?;
        }
        Ok(())
    }

    /// The plan's copies into host slots, in parallel; with checksums on and
    /// a disk tier, each block's checksum is computed during its copy (kept
    /// in `m` for [`Self::finish`]).
    ///
    /// # Safety
    /// Each copy's source is valid for block_size bytes; the host slots are
    /// held by the plan (distinct: one live copy per slot).
    pub(super) unsafe fn copy_into_host(&self, m: &Moves, region: Option<&Region>) {
        if m.copies.is_empty() {
            return;
        }
        let host = self.host.as_ref().expect("host tier");
        let region = region.expect("region");
        let addr_of = |i: usize| m.copies[i].1;
        if !self.opts.checksums || self.disk.is_none() || !m.sum_copies {
            // No disk write will need the checksum (or it is known).
            let slots: Vec<u64> = m.copies.iter().map(|c| c.0).collect();
            // SAFETY: forwarded from the caller.
            unsafe { host.copy_slots(region, &slots, addr_of, true) };
            return;
        }
        // A new block written to disk from the same bytes (`write_through`)
        // has its checksum from that write already: copied without summing.
        let known = m.written_crcs();
        let (plain, summed): (Vec<usize>, Vec<usize>) =
            (0..m.copies.len()).partition(|&i| known[i].is_some());
        let mut crcs: Vec<u32> = known.iter().map(|c| c.unwrap_or(0)).collect();
        if !plain.is_empty() {
            let slots: Vec<u64> = plain.iter().map(|&i| m.copies[i].0).collect();
            // SAFETY: forwarded from the caller.
            unsafe { host.copy_slots(region, &slots, |k| addr_of(plain[k]), true) };
        }
        if !summed.is_empty() {
            let slots: Vec<u64> = summed.iter().map(|&i| m.copies[i].0).collect();
            // SAFETY: forwarded from the caller.
            let got = unsafe {
                host.copy_slots_summed(
                    region,
                    &slots,
                    |k| addr_of(summed[k]),
                    true,
                    |k| m.copies[summed[k]].2.hash,
                )
            };
            for (k, crc) in got.into_iter().enumerate() {
                crcs[summed[k]] = crc;
            }
        }
        *m.copy_crcs.lock().unwrap_or_else(|p| p.into_inner()) = crcs;
    }

    /// A plan's last step, under the lock: release its slots to reads, then
    /// record what was written (checksums, PUT records) for the blocks still
    /// registered where they were written, or roll the plan back when `r` (or
    /// the index) failed.
    pub(super) fn finish(
        &self,
        st: &mut State,
        plan: &Plan,
        m: &Moves,
        r: Result<()>,
    ) -> Result<()> {
        if !m.held {
            return r;
        }
        st.reg.hold(plan, false);
        self.committed.notify_all();
        let r = r.and_then(|()| {
            // Only blocks still registered in the slots written are recorded
            // (PUT records, with the tier's other order changes in the order
            // they happened).
            let mut committed = Vec::new();
            for (i, w) in m.writes.iter().enumerate() {
                let crc = m.crcs[i].load(Ordering::Relaxed);
                if st.reg.commit_write(w.hash, w.slot as u32, crc) {
                    committed.push(w.slot as u32);
                }
            }
            for (s, h, crc) in m.summed_copies() {
                st.reg.commit_copy(h, s, crc);
            }
            let Some(ix) = st.index.as_mut() else {
                return Ok(());
            };
            let mut recs = st.reg.order_records(&committed);
            // What admission turned away, so its second sighting is known
            // after a restart.
            recs.extend(plan.turned_away.iter().map(|&h| Record::ghost(h)));
            ix.append(&recs)
        });
        if let Err(e) = r {
            st.stats.failed_writes += m.writes.len() as u64;
            st.reg.roll_back(plan);
            return Err(e);
        }
        st.stats.offloaded_blocks += m.writes.iter().filter(|w| w.victim).count() as u64;
        if !m.writes.is_empty() || !plan.turned_away.is_empty() {
            self.maybe_compact(st);
        }
        Ok(())
    }

    /// Rewrite the index when it holds far more records than live blocks
    /// and remembered ghosts.
    fn maybe_compact(&self, st: &mut State) {
        let kept = (st.reg.used().1 + st.reg.ghost_len()) as u64;
        let needs = st
            .index
            .as_ref()
            .is_some_and(|ix| ix.records() > 4 * kept + 4096);
        if !needs {
            return;
        }
        let snap = st.reg.snapshot();
        let g = self.geometry.expect("persistent store");
        if let Some(ix) = st.index.as_mut() {
            match ix.compact(&g, &snap) {
                Ok(()) => st.stats.index_compactions += 1,
                Err(e) => st.warnings.push(format!(
                    "compacting the index failed (it keeps growing): {e}"
                )),
            }
        }
    }
}
