//! Leases: `lookup` pins the longest stored prefix of a request (fetching
//! what the local tiers miss from the remote tier, within a budget), and
//! `get_lease` reads it and lets go; `release_lease` lets go without reading.
//! A leased block is never evicted nor its slot reused.
#![allow(unsafe_code)]

use super::policy::TierSlot;
use super::{BlockManager, Key, Keys, State};
use crate::error::{Error, Result};
use crate::remote::Deadline;

/// One block a lease holds: its host slot or, when it had none, its disk slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pinned {
    pub(super) hash: Key,
    pub(super) at: TierSlot,
}

impl BlockManager {
    /// Pin the longest stored prefix of `hashes` so that no eviction or
    /// slot reuse touches it until the lease is used ([`Self::get_lease`])
    /// or released. Returns (lease id, prefix length).
    ///
    /// With a remote tier, what the local tiers miss is fetched from it
    /// (one batched round trip), kept in the local tiers, and leased too;
    /// that remote work ends within `remote_timeout_ms`, or within `budget`
    /// when that is sooner (a caller that stops waiting then, such as an
    /// engine's scheduler).
    pub fn lookup(
        &self,
        hashes: Keys<'_>,
        budget: Option<std::time::Duration>,
    ) -> Result<(u64, usize)> {
        let _timer = self.latency.lookup.time();
        let mut st = self.open_state()?;
        let pins = Self::pin_prefix(&mut st, hashes);
        let n = pins.len();
        let id = st.next_lease;
        st.next_lease += 1;
        st.leases.insert(id, pins);
        st.stats.leases += 1;
        drop(st);
        if n == hashes.len() {
            return Ok((id, n));
        }
        let Some((remote, space)) = self.remote_space(hashes.ns()) else {
            return Ok((id, n));
        };
        // Fetched through a bounded buffer, one step of the remote's fetch at
        // a time (stored locally as they come), never one sized for the whole
        // remainder. Allocated zeroed by the OS (no pass over it): the fetch
        // writes every block it reports.
        let bs = self.block_size;
        let region = self.region()?;
        let piece = remote.fetch_piece();
        let d = match budget {
            Some(b) => remote.deadline().min(Deadline::after(b)),
            None => remote.deadline(),
        };
        let mut buf = vec![0u8; piece.min(hashes.len() - n) * bs];
        let mut k = 0;
        for chunk in hashes.hashes()[n..].chunks(piece) {
            let base = buf.as_mut_ptr() as usize;
            let addrs: Vec<usize> = (0..chunk.len()).map(|i| base + i * bs).collect();
            // SAFETY: `buf` is ours, at least chunk.len() blocks long, alive
            // for the call.
            let got = unsafe {
                let keys = Keys::new(chunk, hashes.ns());
                self.fetch_remote((remote, &space), keys, &addrs, region.as_deref(), d)
            };
            k += got;
            if got < chunk.len() || d.left().is_err() {
                break;
            }
        }
        drop(buf);
        if k == 0 {
            return Ok((id, n));
        }
        // Re-pin the whole prefix under one lock: the lease never lets go of
        // the local part meanwhile.
        let mut st = self.lock();
        let Some(old) = st.leases.remove(&id) else {
            return Ok((id, n)); // released by another thread meanwhile
        };
        let pins = Self::pin_prefix(&mut st, hashes);
        Self::unpin_all(&mut st, &old);
        let count = pins.len();
        st.leases.insert(id, pins);
        Ok((id, count))
    }

    /// Pin the longest stored prefix of `hashes` (the slot each block is
    /// read from).
    fn pin_prefix(st: &mut State, hashes: Keys<'_>) -> Vec<Pinned> {
        let n = st.reg.prefix(hashes);
        hashes
            .sub(..n)
            .iter()
            .map(|hash| {
                let at = st.reg.lease_copy(hash);
                st.reg.pin(at);
                Pinned { hash, at }
            })
            .collect()
    }

    fn unpin_all(st: &mut State, pins: &[Pinned]) {
        for p in pins {
            st.reg.unpin(p.at);
        }
    }

    /// Release a lease without reading it; false when it was already used
    /// or released.
    pub fn release_lease(&self, id: u64) -> bool {
        let mut st = self.lock();
        match st.leases.remove(&id) {
            Some(pins) => {
                Self::unpin_all(&mut st, &pins);
                true
            }
            None => false,
        }
    }

    /// Read a lease's blocks into `dst` (back to back, or at `rows`) and
    /// release it. Returns the lease's count: its blocks could not be
    /// evicted meanwhile (only an explicit `remove`/`clear`, or a block that
    /// fails its checksum or read, ends the prefix early).
    ///
    /// # Safety
    /// As [`Self::get_rows`].
    pub unsafe fn get_lease(
        &self,
        id: u64,
        dst: *mut u8,
        len: usize,
        rows: Option<&[u64]>,
    ) -> Result<usize> {
        let _timer = self.latency.load.time();
        let region = self.region()?;
        let mut st = self.open_state()?;
        let n = st.leases.get(&id).map(Vec::len).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "lease {id} was already used or released: take a new one with lookup()"
            ))
        })?;
        // Checked before the lease is used: bad input changes nothing.
        let addrs =
            self.block_addrs(n, (dst as usize, len), rows, "dst", true, region.as_deref())?;
        let pins = st.leases.remove(&id).expect("checked above");
        // One lookup's blocks: one namespace.
        let hashes: Vec<u64> = pins.iter().map(|p| p.hash.hash).collect();
        let ns = pins.first().map_or(0, |p| p.hash.ns);
        // SAFETY: forwarded from the caller.
        let r = unsafe { self.get_prefix(st, Keys::new(&hashes, ns), &addrs, region.as_deref()) };
        Self::unpin_all(&mut self.lock(), &pins);
        r
    }

    #[cfg(test)] // a convenience of the unit tests
    /// [`Self::get_lease`] into a slice.
    pub fn get_lease_into(&self, id: u64, dst: &mut [u8]) -> Result<usize> {
        // SAFETY: a valid exclusive slice.
        unsafe { self.get_lease(id, dst.as_mut_ptr(), dst.len(), None) }
    }
}
