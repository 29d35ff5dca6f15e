//! The remote tier below the local ones: attaching it, fetching what the
//! local tiers miss (kept in them afterwards), sending a put's new blocks to
//! it, and the [`LocalSource`] its background writer reads blocks back from.
#![allow(unsafe_code)]

use std::sync::Arc;

use super::{BlockManager, Key, Keys};
use crate::error::{Error, Result};
use crate::host::Region;
use crate::remote::{Deadline, LocalSource, RemoteTier, RemoteWrite, Space};

impl BlockManager {
    /// Put a remote tier below the local ones (once): gets and lookups
    /// fetch what the local tiers miss from it, `match` counts it, and puts
    /// send their new blocks to it as `write` says.
    pub fn attach_remote(
        self: &Arc<Self>,
        remote: Arc<RemoteTier>,
        write: RemoteWrite,
    ) -> Result<()> {
        let weak: std::sync::Weak<dyn LocalSource> = Arc::downgrade(self) as _;
        remote.set_source(weak);
        let nice = self.worker_nice();
        // Nobody waits for the remote writer (unlike copies and I/O, which a
        // caller waits for): it yields to those too.
        remote.set_writer_nice((nice + 5).min(19));
        self.remote
            .set((remote, write))
            .map_err(|_| Error::InvalidArgument("this manager already has a remote tier".into()))
    }

    /// The nice value the tiers' background threads run at (see
    /// `io::lower_priority`).
    pub(super) fn worker_nice(&self) -> u32 {
        match (&self.disk, &self.host) {
            (Some(d), _) => d.worker_nice(),
            (None, Some(h)) => h.worker_nice(),
            (None, None) => 0,
        }
    }

    pub fn remote(&self) -> Option<&Arc<RemoteTier>> {
        self.remote.get().map(|(r, _)| r)
    }

    /// The remote tier and the keys namespace `ns` has there: None without
    /// a remote tier, or for a namespace with no name here (blocks whose
    /// table lost their names stay local).
    pub(super) fn remote_space(&self, ns: u32) -> Option<(&Arc<RemoteTier>, Space)> {
        let r = self.remote()?;
        if ns == 0 {
            return Some((r, Space::SHARED));
        }
        let name = self.namespace_name(ns)?;
        Some((r, r.space(Some(&name))))
    }

    /// Send the blocks `hashes[i]` for `i` in `new` (new to the local
    /// tiers) to the remote tier: now with `remote_write="sync"`, else
    /// queued for its writer (which reads them back from the local tiers).
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for reads of block_size bytes for the call.
    pub(super) unsafe fn send_remote(&self, hashes: Keys<'_>, addrs: &[usize], new: &[usize]) {
        let Some(&(_, w)) = self.remote.get() else {
            return;
        };
        if w == RemoteWrite::Off {
            return;
        }
        let Some((r, space)) = self.remote_space(hashes.ns()) else {
            return;
        };
        let hs: Vec<u64> = new.iter().map(|&i| hashes.hashes()[i]).collect();
        match w {
            RemoteWrite::Off => {}
            RemoteWrite::Sync => {
                let src: Vec<usize> = new.iter().map(|&i| addrs[i]).collect();
                // SAFETY: forwarded from the caller.
                unsafe { r.store(&space, &hs, &src, r.deadline()) };
            }
            RemoteWrite::Async => {
                r.enqueue(&space, hashes.ns(), &hs);
            }
        }
    }

    /// What the local tiers missed, from remote tier `r` (where the keys of
    /// `hashes`' namespace are `space`'s, see [`Self::remote_space`]): the
    /// longest prefix of `hashes` it holds, verified, into `addrs`, then
    /// stored in the local tiers (promoted; not sent back). Returns its
    /// length.
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for writes of block_size bytes, distinct,
    /// and untouched by others for the whole call.
    pub(super) unsafe fn fetch_remote(
        &self,
        (r, space): (&RemoteTier, &Space),
        hashes: Keys<'_>,
        addrs: &[usize],
        region: Option<&Region>,
        d: Deadline,
    ) -> usize {
        if hashes.is_empty() {
            return 0;
        }
        // SAFETY: forwarded from the caller.
        let k = unsafe { r.fetch(space, hashes.hashes(), addrs, d) };
        if k > 0 && hashes.ns() != 0 {
            // The shared namespace's are the tier's total less the others' (see `namespace_stats`).
            self.lock()
                .ns_counts
                .entry(hashes.ns())
                .or_default()
                .remote_hits += k as u64;
        }
        if k > 0 {
            // SAFETY: the k blocks were just written there and stay the caller's.
            if let Err(e) = unsafe { self.put_addrs(hashes.sub(..k), &addrs[..k], region, false) } {
                self.lock().warnings.push(format!(
                    "keeping {k} blocks fetched from the remote tier in the local tiers failed: {e}"
                ));
            }
        }
        k
    }
}

impl LocalSource for BlockManager {
    fn with_local(
        &self,
        h: Key,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8], Option<u32>),
    ) -> bool {
        let (Ok(region), Ok(mut st)) = (self.region(), self.open_state()) else {
            return false;
        };
        let at = st.reg.readable(h);
        if let (Some(region), Some(at)) = (
            region.as_deref(),
            at.filter(|a| a.kind == super::policy::TierKind::Host),
        ) {
            // In the host tier: read in place, the slot pinned meanwhile,
            // with the checksum taken when its bytes were copied in.
            st.reg.pin(at);
            let crc = st.reg.host_crc(at.slot);
            drop(st);
            let host = self.host.as_ref().expect("host tier");
            // SAFETY: the slot holds h's bytes, in place (readable: not
            // filling); pinned, it is neither evicted nor reused (nor written)
            // until unpinned below; `region` (held) maps it.
            let bytes = unsafe {
                std::slice::from_raw_parts(host.slot_ptr(region, at.slot as u64), self.block_size)
            };
            f(bytes, crc);
            self.lock().reg.unpin(at);
            return true;
        }
        scratch.resize(self.block_size, 0);
        let addr = [scratch.as_mut_ptr() as usize];
        // SAFETY: `scratch` is this call's exclusive buffer of block_size bytes.
        let r = unsafe {
            self.read_prefix(
                st,
                Keys::new(std::slice::from_ref(&h.hash), h.ns),
                &addr,
                region.as_deref(),
            )
        };
        match r {
            Ok((st, read)) if read.n == 1 => {
                drop(st);
                // Read from disk and checked against its recorded checksum
                // (with checksums on): that checksum is the block's.
                let crc = read.disk_crc(0).filter(|_| self.opts.checksums);
                f(scratch, crc);
                true
            }
            _ => false,
        }
    }
}
