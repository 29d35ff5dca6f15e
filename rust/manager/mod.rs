//! The block manager: sequence hash -> slot in the host and/or disk tier,
//! LRU per tier, offload (host -> disk) and onboard (disk -> host).
//!
//! # Policy (the default, mirrored by the Python model in the tests)
//! - A block lives in the host tier, the disk tier, or both (identical bytes:
//!   a block's content never changes for its hash).
//! - **Touch** refreshes a block in every tier that holds it.
//! - **put**: blocks of the batch already stored are touched first (so the
//!   batch's new blocks never evict them); then new ones go to the host tier
//!   (or straight to disk when there is no host tier), in the order given.
//! - **Host full**: the host LRU block leaves the host tier; if it has no disk
//!   copy it is inserted into the disk tier (the offload), else it just keeps
//!   its disk copy; with no disk tier it is dropped.
//! - **Disk full**: the disk LRU block loses its disk copy (dropped if that
//!   was its only copy).
//! - **get**: the longest stored prefix is read from where each block is at
//!   the start of the call (host preferred); then the blocks are touched in
//!   order; then blocks that were disk-only are promoted into the host tier
//!   in order (keeping their disk copy). The reads run with the lock
//!   released, the slots they read pinned (so other calls go on meanwhile);
//!   a block removed by another thread during its read is not promoted.
//! - **match** is a query: it changes no recency.
//! - **Leases**: `lookup` pins the slots of the longest stored prefix (the
//!   host slot where a block has one, else its disk slot). Eviction takes the
//!   least recent *unpinned* block; when every candidate is pinned, the new
//!   block is not stored and is counted (`rejected_full`); a host victim
//!   whose disk tier is all pinned is dropped. A block removed while pinned
//!   keeps its slot out of use until the last unpin. `get_lease` reads the
//!   pinned blocks (the prefix rules of `get` apply) and releases the pins.
//!
//! - **Write-behind** (optional, on by default with both tiers): a background
//!   step writes host-only blocks among the least recent half of the host
//!   tier to disk (pinning at most a quarter of it); while a block is being written its host slot is pinned,
//!   so an eviction at that moment takes the next unpinned block instead.
//!   The policy above (and the model test) is the one without write-behind.
//! - **Unreadable blocks**: a disk block that fails its checksum or whose
//!   read fails (EIO) is a miss: dropped, counted (`corrupt_blocks`,
//!   `io_errors`), logged; `get` returns the prefix before it.
//!
//! Data movement is planned on the metadata first and then executed as one
//! batched disk write (victims and direct-to-disk blocks, sorted by slot so
//! adjacent slots coalesce) followed by one parallel copy into host slots.
//! The lock is held to plan and to commit, not while bytes move: the slots a
//! plan fills are `filling` and pinned until its commit, and the slots a
//! `get` reads are pinned until it is done. Lookups (`match`, `contains`,
//! `lookup`) see a block from the moment it is registered and never wait; a
//! `get` that meets a block whose bytes are still arriving (a put or an
//! offload of another call) waits for that commit, so a get after a put of
//! the same block always sees it. Commits record PUTs only for blocks still
//! registered in the slots written.
//! A failed disk write registers nothing from the batch: every disk slot
//! assigned and every host slot filled by the batch is released, and blocks
//! left with no copy are dropped. No block is ever registered whose bytes are
//! not where the registry says.
//!
//! # The persistent index and memory
//! The index is changed before memory: `remove` appends its DEL records and
//! `clear` rewrites the index empty *before* the registry changes, so a
//! failure changes nothing. When an append fails in the middle of a batch
//! (after planning has freed slots in memory), the index is marked dirty and
//! no data is written into any slot until it has been rewritten from memory
//! (done before the next batch is planned): a slot is never overwritten
//! while the durable index still names another block in it.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::disk::DiskStorage;
use crate::error::{Error, Result};
use crate::host::{HostStorage, Region};
use crate::index::{Geometry, IndexLog, Live, Record};
use crate::process::ForkGuard;
use crate::remote::{Deadline, LocalSource, RemoteTier, RemoteWrite};

mod policy;
pub use policy::Stats;
use policy::{capacity, Copy, Entry, Map, Pinned, Plan, Src, State, Tier, NIL};

/// What a get's disk reads found, for the commit under the lock: per block,
/// whether it failed its checksum; and the first block that could not be
/// read, with the error.
type DiskOutcome = (Vec<AtomicBool>, Option<(usize, Error)>);

/// The tiers' state behind one lock; see the module docs for the policy.
pub struct BlockManager {
    state: Mutex<State>,
    host: Option<Arc<HostStorage>>,
    disk: Option<Arc<DiskStorage>>,
    block_size: usize,
    opts: ManagerOptions,
    geometry: Option<Geometry>,
    fork: ForkGuard,
    writer: Arc<Writer>,
    /// Held by a write-behind step for its whole duration: steps (the
    /// background thread's and `flush()`'s) run one at a time, so `flush`
    /// also waits for a step in flight.
    cleaning: Mutex<()>,
    /// Notified at every commit (or rollback) of a plan: reads waiting for
    /// bytes in flight look again.
    committed: std::sync::Condvar,
    /// The remote tier below host and disk, if any, and how puts reach it.
    remote: std::sync::OnceLock<(Arc<RemoteTier>, RemoteWrite)>,
}

/// The write-behind thread's controls: woken after puts, stopped by close.
#[derive(Default)]
struct Writer {
    wake: Mutex<bool>,
    cv: std::sync::Condvar,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How the manager treats the disk tier.
#[derive(Debug, Clone, Default)]
pub struct ManagerOptions {
    /// Verify a CRC32C of (hash, bytes) on every disk read.
    pub checksums: bool,
    /// put() also writes new blocks to the disk tier, so they survive a
    /// crash of the process even while they are in the host tier.
    pub write_through: bool,
    /// The persistent store's index file (with a persistent disk tier).
    pub index_path: Option<std::path::PathBuf>,
    /// fdatasync data and index at every batch (survives power loss), not
    /// only process death.
    pub sync: bool,
    /// Fingerprint of the KV layout, checked on reopen.
    pub layout: u64,
    /// Keep the least recent host-only blocks written to disk ahead of their
    /// eviction (see [`BlockManager::clean_some`]), so a put into a full host
    /// tier does not wait for disk writes.
    pub write_behind: bool,
}

pub use crate::checksum::block_crc;

impl BlockManager {
    pub fn new(
        block_size: usize,
        host: Option<Arc<HostStorage>>,
        disk: Option<Arc<DiskStorage>>,
        opts: ManagerOptions,
    ) -> Result<Self> {
        if host.is_none() && disk.is_none() {
            return Err(Error::InvalidArgument(
                "a block manager needs a host tier, a disk tier or both (both sizes are 0)".into(),
            ));
        }
        if let Some(h) = &host {
            if h.block_size() != block_size {
                return Err(Error::InvalidArgument(format!(
                    "host tier block_size {} differs from the manager's {block_size}",
                    h.block_size()
                )));
            }
        }
        if let Some(d) = &disk {
            if d.block_size() != block_size {
                return Err(Error::InvalidArgument(format!(
                    "disk tier block_size {} differs from the manager's {block_size}",
                    d.block_size()
                )));
            }
        }
        let host_tier = match &host {
            Some(h) => Some(Tier::new(capacity(h.num_blocks(), "host")?)),
            None => None,
        };
        let mut disk_tier = match &disk {
            Some(d) => Some(Tier::new(capacity(d.num_blocks(), "disk")?)),
            None => None,
        };
        let mut map = Map::default();
        let mut stats = Stats::default();
        let mut warnings = Vec::new();
        let mut index = None;
        let mut geometry = None;
        if let Some(path) = &opts.index_path {
            let d = disk.as_ref().ok_or_else(|| {
                Error::InvalidArgument(
                    "a persistent store needs a disk tier (disk_blocks > 0)".into(),
                )
            })?;
            let store_id = d.store_id().ok_or_else(|| {
                Error::InvalidArgument(
                    "a persistent store needs a persistent disk tier (persist=True)".into(),
                )
            })?;
            let g = Geometry {
                block_size: block_size as u64,
                num_blocks: d.num_blocks(),
                layout: opts.layout,
                checksums: opts.checksums,
                store_id,
            };
            let (log, rec) = IndexLog::open(path, &g, opts.sync, d.created())?;
            let tier = disk_tier.as_mut().expect("disk tier");
            tier.load(&rec.live);
            for l in &rec.live {
                map.insert(
                    l.hash,
                    Entry {
                        host: NIL,
                        disk: l.slot,
                    },
                );
            }
            stats.recovered_blocks = rec.live.len() as u64;
            stats.index_torn_bytes = rec.torn_bytes;
            stats.index_bad_records = rec.bad_records;
            if let Some(why) = rec.reset {
                warnings.push(why);
            }
            if rec.bad_records > 0 {
                warnings.push(format!(
                    "the index {} held {} damaged records (failed checksums) among intact ones; \
                     they were skipped, the {} blocks of the intact records recovered, and the \
                     index rewritten without them",
                    path.display(),
                    rec.bad_records,
                    rec.live.len()
                ));
            }
            if rec.torn_bytes > 0 {
                warnings.push(format!(
                    "the index {} ended in {} bytes of an interrupted record; they were cut \
                     off and the {} complete blocks before them recovered",
                    path.display(),
                    rec.torn_bytes,
                    rec.live.len()
                ));
            }
            index = Some(log);
            geometry = Some(g);
        }
        Ok(BlockManager {
            state: Mutex::new(State {
                map,
                host: host_tier,
                disk: disk_tier,
                stats,
                warnings,
                index,
                closed: false,
                io_error_logged: false,
                leases: Map::default(),
                next_lease: 1,
            }),
            host,
            disk,
            block_size,
            opts,
            geometry,
            fork: ForkGuard::new("BlockManager"),
            writer: Arc::new(Writer::default()),
            cleaning: Mutex::new(()),
            committed: std::sync::Condvar::new(),
            remote: std::sync::OnceLock::new(),
        })
    }

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
                    while !w.stop.load(Ordering::Relaxed) {
                        if m.clean_some(32) == 0 {
                            break;
                        }
                    }
                }
            });
        if let Ok(h) = spawned {
            // Running at its nice value before any work reaches it.
            let _ = started.recv_timeout(std::time::Duration::from_secs(5));
            *self.writer.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
    }

    /// Wake the write-behind thread (after host blocks arrived).
    fn nudge(&self) {
        if self.opts.write_behind {
            *self.writer.wake.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.writer.cv.notify_one();
        }
    }

    /// Stop the write-behind thread and wait for it (not in a forked child,
    /// where it does not exist).
    fn stop_write_behind(&self) {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for a call that may use the manager: refused after
    /// `close()` and in a forked child.
    fn open_state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.fork.check()?;
        let st = self.lock();
        if st.closed {
            return Err(Error::Closed("BlockManager"));
        }
        Ok(st)
    }

    /// Rewrite a dirty index from memory (see the module docs) before a
    /// batch is planned.
    fn settle_index(&self, st: &mut State) -> Result<()> {
        if !st.index.as_ref().is_some_and(IndexLog::dirty) {
            return Ok(());
        }
        let live = Self::live_disk(st);
        let g = self.geometry.expect("persistent store");
        st.index.as_mut().expect("checked").compact(&g, &live)?;
        st.stats.index_compactions += 1;
        Ok(())
    }

    /// How many of the least recent host blocks write-behind keeps clean
    /// (with a disk copy): half the host tier (none under 4 blocks). A step
    /// pins at most a quarter of the tier (and at most its batch), so a put
    /// always finds most of the tier evictable (eviction skips the blocks
    /// being written behind).
    fn clean_depth(host_cap: usize) -> usize {
        if host_cap < 4 {
            0
        } else {
            host_cap / 2
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
        let (Some(host), Some(_)) = (st.host.as_ref(), st.disk.as_ref()) else {
            return 0;
        };
        let depth = Self::clean_depth(host.hash_of.len());
        let max = max.min(host.hash_of.len() / 4);
        let mut pick: Vec<(u64, u32)> = Vec::new();
        let mut c = host.lru.head;
        let mut seen = 0;
        while c != NIL && seen < depth && pick.len() < max {
            let s = c as usize;
            let h = host.hash_of[s];
            if host.pins[s] == 0
                && !host.filling[s]
                && st.map.get(&h).is_some_and(|e| e.disk == NIL)
            {
                pick.push((h, c));
            }
            seen += 1;
            c = host.lru.next[s];
        }
        if pick.is_empty() {
            return 0;
        }
        if self.settle_index(&mut st).is_err() {
            return 0;
        }
        let Ok(region) = self.region() else {
            return 0;
        };
        for &(_, s) in &pick {
            st.host.as_mut().expect("host tier").pin(s);
        }
        let mut plan = Plan::default();
        let mut n = 0;
        for &(h, s) in &pick {
            if !st.disk_insert(h, Src::HostSlot(s), true, &mut plan) {
                break; // the rest of the disk tier is leased
            }
            n += 1;
        }
        let (mut st, r) = self.execute(st, &plan, region.as_deref());
        for &(_, s) in &pick {
            st.host.as_mut().expect("host tier").unpin(s);
        }
        match r {
            Ok(()) => {
                st.stats.written_behind += n as u64;
                n
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

    /// Wait for write-behind: write every host-only block within the clean
    /// depth to disk now.
    pub fn flush(&self) -> Result<()> {
        drop(self.open_state()?);
        while self.clean_some(64) > 0 {}
        if let Some((r, _)) = self.remote.get() {
            r.flush(std::time::Duration::from_secs(60));
        }
        Ok(())
    }

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
    fn worker_nice(&self) -> u32 {
        match (&self.disk, &self.host) {
            (Some(d), _) => d.worker_nice(),
            (None, Some(h)) => h.worker_nice(),
            (None, None) => 0,
        }
    }

    pub fn remote(&self) -> Option<&Arc<RemoteTier>> {
        self.remote.get().map(|(r, _)| r)
    }

    /// Close: with `flush`, a persistent store first writes the blocks that
    /// live only in the host tier to disk (see [`Self::flush_host`]); then
    /// the index file is released at once. Later calls raise "closed". In a
    /// forked child nothing is written. Returns how many blocks were
    /// written; a failure to write them is returned after closing anyway.
    pub fn close(&self, flush: bool) -> Result<usize> {
        self.stop_write_behind();
        if let Some((r, _)) = self.remote.get() {
            // Queued remote writes get a few seconds; what is left is counted as skipped.
            r.close(std::time::Duration::from_secs(if flush { 10 } else { 0 }));
        }
        let st = self.lock();
        if st.closed {
            return Ok(0);
        }
        let (mut st, written) = if flush && self.persistent() && !self.fork.forked() {
            self.flush_host(st)
        } else {
            (st, Ok(0))
        };
        st.closed = true;
        st.index = None;
        written
    }

    /// Write the blocks that live only in the host tier to the disk tier,
    /// most recent first, as many as the disk tier holds (older disk blocks
    /// make room, as in any offload): what a restart of a persistent store
    /// should find. The host copies stay.
    fn flush_host<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> (MutexGuard<'a, State>, Result<usize>) {
        let (Some(host), Some(disk)) = (st.host.as_ref(), st.disk.as_ref()) else {
            return (st, Ok(0));
        };
        let cap = disk.hash_of.len();
        // Host LRU order, least recent first; keep the most recent `cap`.
        let host_only: Vec<(u64, u32)> = host
            .lru
            .order()
            .into_iter()
            .filter(|&s| !host.filling[s as usize]) // bytes still arriving
            .map(|s| (host.hash_of[s as usize], s))
            .filter(|(h, _)| st.map.get(h).is_some_and(|e| e.disk == NIL))
            .collect();
        let keep = &host_only[host_only.len().saturating_sub(cap)..];
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
            if !st.disk_insert(h, Src::HostSlot(slot), true, &mut plan) {
                break; // the rest of the disk tier is leased
            }
        }
        let n = keep.len();
        let (st, r) = self.execute(st, &plan, region.as_deref());
        (st, r.map(|()| n))
    }

    fn region(&self) -> Result<Option<Arc<Region>>> {
        match &self.host {
            Some(h) => Ok(Some(h.region()?)),
            None => Ok(None),
        }
    }

    /// The address of each block of a batch in the caller's buffer
    /// `base..base+len`: back to back, or at `rows[i] * block_size` when rows
    /// are given (the buffer seen as `[n_rows, block_size]` bytes). Every
    /// check runs here, before any byte moves: sizes, row bounds, distinct
    /// destination rows (`distinct`), and no overlap with the host tier's own
    /// memory (a copy between a slot and itself would corrupt the cache).
    fn block_addrs(
        &self,
        n: usize,
        (base, len): (usize, usize),
        rows: Option<&[u64]>,
        name: &str,
        distinct: bool,
        region: Option<&Region>,
    ) -> Result<Vec<usize>> {
        let bs = self.block_size;
        if let Some(r) = region {
            let (lo, hi) = (r.ptr() as usize, r.ptr() as usize + r.len());
            if len > 0 && base < hi && lo < base.saturating_add(len) {
                return Err(Error::Buffer(format!(
                    "{name} overlaps the host tier's own memory; pass a buffer of your own \
                     (views of BlockManager.host are the cache itself)"
                )));
            }
        }
        let Some(rows) = rows else {
            crate::error::check_batch_len(name, len, n, "blocks", bs)?;
            return Ok((0..n).map(|i| base + i * bs).collect());
        };
        if rows.len() != n {
            return Err(Error::InvalidArgument(format!(
                "rows has {} entries but hashes has {n}: give one row per hash",
                rows.len()
            )));
        }
        if len % bs != 0 {
            return Err(Error::Buffer(format!(
                "{name} holds {len} bytes, not a whole number of rows of block_size {bs}"
            )));
        }
        let n_rows = (len / bs) as u64;
        if let Some((i, &r)) = rows.iter().enumerate().find(|(_, &r)| r >= n_rows) {
            return Err(Error::Index(format!(
                "rows[{i}] is {r}, out of range: {name} holds {n_rows} rows of block_size {bs}"
            )));
        }
        if distinct {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_unstable_by_key(|&i| rows[i]);
            if let Some(w) = order.windows(2).find(|w| rows[w[0]] == rows[w[1]]) {
                let (a, b) = (w[0].min(w[1]), w[0].max(w[1]));
                return Err(Error::InvalidArgument(format!(
                    "rows[{a}] and rows[{b}] are both {}: each block needs its own row of {name}",
                    rows[a]
                )));
            }
        }
        Ok(rows.iter().map(|&r| base + r as usize * bs).collect())
    }

    /// Run a plan in three steps. Under the lock: the DEL records of reused
    /// disk slots, and every slot the plan fills marked `filling` (invisible
    /// to lookups) and pinned (never evicted nor reused by another call).
    /// Without the lock: one batched disk write (checksummed on the I/O
    /// workers), then one parallel copy into host slots. Under the lock
    /// again: PUT records and checksums for the blocks still registered in
    /// the slots written (another thread may have removed some meanwhile),
    /// then the slots are released to lookups; on a failure the plan is
    /// rolled back. Takes the guard and gives it back.
    fn execute<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        plan: &Plan,
        region: Option<&Region>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        if st.index.as_ref().is_some_and(IndexLog::dirty) {
            // An append failed earlier in this call: no slot may be written
            // until the index is rewritten (at the start of the next call).
            st.roll_back(plan);
            return (
                st,
                Err(Error::InvalidArgument(
                    "the store's index could not be updated earlier in this call; nothing was \
                     written, and the index is rewritten at the next call"
                        .into(),
                )),
            );
        }
        let mut writes: Vec<(u64, usize, bool, u64)> = plan
            .writes
            .iter()
            .filter(|w| w.live)
            .map(|w| {
                let addr = match w.src {
                    Src::Addr(a) => a,
                    Src::HostSlot(s) => {
                        let (h, r) = (self.host.as_ref().expect("host"), region.expect("region"));
                        h.slot_ptr(r, s as u64) as usize
                    }
                };
                (w.disk_slot as u64, addr, w.victim, w.hash)
            })
            .collect();
        writes.sort_unstable_by_key(|w| w.0);
        let copies: Vec<&Copy> = plan.copies.iter().filter(|c| c.live).collect();
        if let Some(ix) = st.index.as_mut() {
            let dels: Vec<Record> = plan
                .disk_evicted
                .iter()
                .map(|&(h, t)| Record::del(h, t))
                .collect();
            if let Err(e) = ix.append(&dels) {
                st.roll_back(plan);
                return (st, Err(e));
            }
        }
        if writes.is_empty() && copies.is_empty() {
            return (st, Ok(()));
        }
        let hold = |st: &mut State, on: bool| {
            for w in &writes {
                let t = st.disk.as_mut().expect("disk tier");
                t.filling[w.0 as usize] = on;
                if on {
                    t.pin(w.0 as u32);
                } else {
                    t.unpin(w.0 as u32);
                }
            }
            for c in &copies {
                let t = st.host.as_mut().expect("host tier");
                t.filling[c.host_slot as usize] = on;
                if on {
                    t.pin(c.host_slot);
                } else {
                    t.unpin(c.host_slot);
                }
            }
        };
        hold(&mut st, true);
        drop(st);

        // Bytes move with the lock released.
        let crcs: Vec<AtomicU32> = (0..writes.len()).map(|_| AtomicU32::new(0)).collect();
        let mut r = Ok(());
        if !writes.is_empty() {
            let slots: Vec<u64> = writes.iter().map(|w| w.0).collect();
            let addrs: Vec<usize> = writes.iter().map(|w| w.1).collect();
            let bs = self.block_size;
            let hook = |i: usize, addr: usize| {
                // SAFETY: addr is block i's source, valid for bs bytes (see below).
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, bs) };
                crcs[i].store(block_crc(writes[i].3, bytes), Ordering::Relaxed);
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
            let slots: Vec<u64> = copies.iter().map(|c| c.host_slot as u64).collect();
            // SAFETY: slots are in range and pinned by this plan (nobody else
            // writes them); each addr is a block of the caller's buffer held
            // for this call; host slots are distinct (one live copy per slot).
            // Victims' bytes left these slots in the disk write above.
            unsafe { host.copy_slots(region.expect("region"), &slots, |i| copies[i].addr, true) };
        }

        let mut st = self.lock();
        hold(&mut st, false);
        self.committed.notify_all();
        // Only blocks still registered in the slots written are recorded.
        let current: Vec<bool> = writes
            .iter()
            .map(|w| st.map.get(&w.3).is_some_and(|e| e.disk == w.0 as u32))
            .collect();
        let r = r.and_then(|()| {
            if let Some(tier) = st.disk.as_mut() {
                for (i, w) in writes.iter().enumerate() {
                    if current[i] {
                        tier.crc[w.0 as usize] = crcs[i].load(Ordering::Relaxed);
                    }
                }
            }
            match st.index.as_mut() {
                Some(ix) => {
                    let puts: Vec<Record> = writes
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| current[*i])
                        .map(|(i, w)| Record::put(w.3, w.0 as u32, crcs[i].load(Ordering::Relaxed)))
                        .collect();
                    ix.append(&puts)
                }
                None => Ok(()),
            }
        });
        if let Err(e) = r {
            st.stats.failed_writes += writes.len() as u64;
            st.roll_back(plan);
            return (st, Err(e));
        }
        if !writes.is_empty() {
            st.stats.offloaded_blocks += writes.iter().filter(|w| w.2).count() as u64;
            self.maybe_compact(&mut st);
        }
        (st, Ok(()))
    }

    /// Live disk entries in LRU order (oldest first).
    fn live_disk(st: &State) -> Vec<Live> {
        let Some(t) = st.disk.as_ref() else {
            return Vec::new();
        };
        t.lru
            .order()
            .into_iter()
            .filter(|&s| !t.filling[s as usize])
            .map(|s| Live {
                hash: t.hash_of[s as usize],
                slot: s,
                crc: t.crc[s as usize],
            })
            .collect()
    }

    /// Rewrite the index when it holds far more records than live blocks.
    fn maybe_compact(&self, st: &mut State) {
        let live_n = st.disk.as_ref().map_or(0, Tier::used) as u64;
        let needs = st
            .index
            .as_ref()
            .is_some_and(|ix| ix.records() > 4 * live_n + 4096);
        if !needs {
            return;
        }
        let live = Self::live_disk(st);
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

    #[cfg(test)] // a convenience of the unit tests
    /// Store blocks `hashes[i]` from `src + i * block_size`. Returns how many
    /// were new.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn put_raw(&self, hashes: &[u64], src: *const u8, len: usize) -> Result<usize> {
        // SAFETY: forwarded.
        unsafe { self.put_rows(hashes, src, len, None) }
    }

    /// Store blocks `hashes[i]` from row `rows[i]` of `src` (seen as rows of
    /// block_size bytes), or back to back without rows. Returns how many
    /// were new.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn put_rows(
        &self,
        hashes: &[u64],
        src: *const u8,
        len: usize,
        rows: Option<&[u64]>,
    ) -> Result<usize> {
        let region = self.region()?;
        let addrs = self.block_addrs(
            hashes.len(),
            (src as usize, len),
            rows,
            "src",
            false,
            region.as_deref(),
        )?;
        // SAFETY: forwarded from the caller; the addresses were checked.
        unsafe { self.put_addrs(hashes, &addrs, region.as_deref(), true) }
    }

    /// `put` of blocks at checked addresses; `to_remote`: also send the new
    /// ones to the remote tier (not for blocks that came from it).
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for reads of block_size bytes for the call.
    unsafe fn put_addrs(
        &self,
        hashes: &[u64],
        addrs: &[usize],
        region: Option<&Region>,
        to_remote: bool,
    ) -> Result<usize> {
        let mut st = self.open_state()?;
        self.settle_index(&mut st)?;
        let mut plan = Plan::default();
        // The blocks a remote tier gets: tracked only when there is one to send to.
        let send = to_remote
            && self
                .remote
                .get()
                .is_some_and(|(_, w)| *w != RemoteWrite::Off);
        let mut unseen: Vec<usize> = Vec::new();
        // Refresh the batch's stored blocks first, so its new blocks never
        // evict them (`put([3, 1])` into a full tier holding 1 keeps 1).
        for h in hashes {
            if let Some(&e) = st.map.get(h) {
                st.touch(e);
            }
        }
        let mut new = 0usize;
        let mut rejected = 0u64;
        for (i, &h) in hashes.iter().enumerate() {
            if let Some(&e) = st.map.get(&h) {
                st.touch(e);
                continue;
            }
            if send {
                unseen.push(i);
            }
            let addr = addrs[i];
            let stored = if st.host.is_some() {
                let ok = st.host_insert(h, addr, &mut plan);
                if ok && self.opts.write_through && st.disk.is_some() {
                    // Best effort: a pinned-full disk tier leaves it host-only.
                    st.disk_insert(h, Src::Addr(addr), false, &mut plan);
                }
                ok
            } else {
                st.disk_insert(h, Src::Addr(addr), false, &mut plan)
            };
            if stored {
                new += 1;
            } else {
                rejected += 1; // every slot it could take is leased
            }
        }
        let (mut st, r) = self.execute(st, &plan, region);
        r?;
        st.stats.put_blocks += hashes.len() as u64;
        st.stats.put_new += new as u64;
        st.stats.rejected_full += rejected;
        drop(st);
        if new > 0 {
            self.nudge();
        }
        match self.remote.get() {
            Some((r, w)) if !unseen.is_empty() => {
                let hs: Vec<u64> = unseen.iter().map(|&i| hashes[i]).collect();
                if *w == RemoteWrite::Sync {
                    let src: Vec<usize> = unseen.iter().map(|&i| addrs[i]).collect();
                    // SAFETY: forwarded from the caller.
                    unsafe { r.store(&hs, &src, r.deadline()) };
                } else {
                    // The writer reads them back from the local tiers.
                    r.enqueue(&hs);
                }
            }
            _ => {}
        }
        Ok(new)
    }

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
        let n = unsafe { self.get_locked(st, hashes, &addrs, region.as_deref(), true) }?;
        let Some(r) = self.remote().filter(|_| n < hashes.len()) else {
            return Ok(n);
        };
        let d = r.deadline();
        // SAFETY: forwarded from the caller; the addresses were checked (distinct).
        Ok(n + unsafe { self.fetch_remote(&hashes[n..], &addrs[n..], region.as_deref(), d) })
    }

    /// What the local tiers missed, from the remote tier: the longest
    /// prefix of `hashes` it holds, verified, into `addrs`, then stored in
    /// the local tiers (promoted; not sent back). Returns its length.
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for writes of block_size bytes, distinct,
    /// and untouched by others for the whole call.
    unsafe fn fetch_remote(
        &self,
        hashes: &[u64],
        addrs: &[usize],
        region: Option<&Region>,
        d: Deadline,
    ) -> usize {
        let Some((r, _)) = self.remote.get() else {
            return 0;
        };
        if hashes.is_empty() {
            return 0;
        }
        // SAFETY: forwarded from the caller.
        let k = unsafe { r.fetch(hashes, addrs, d) };
        if k > 0 {
            // SAFETY: the k blocks were just written there and stay the caller's.
            if let Err(e) = unsafe { self.put_addrs(&hashes[..k], &addrs[..k], region, false) } {
                self.lock().warnings.push(format!(
                    "keeping {k} blocks fetched from the remote tier in the local tiers failed: {e}"
                ));
            }
        }
        k
    }

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
        hashes: &[u64],
        budget: Option<std::time::Duration>,
    ) -> Result<(u64, usize)> {
        let mut st = self.open_state()?;
        let pins = Self::pin_prefix(&mut st, hashes);
        let n = pins.len();
        let id = st.next_lease;
        st.next_lease += 1;
        st.leases.insert(id, pins);
        st.stats.leases += 1;
        drop(st);
        let Some((remote, _)) = self.remote.get().filter(|_| n < hashes.len()) else {
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
        for chunk in hashes[n..].chunks(piece) {
            let base = buf.as_mut_ptr() as usize;
            let addrs: Vec<usize> = (0..chunk.len()).map(|i| base + i * bs).collect();
            // SAFETY: `buf` is ours, at least chunk.len() blocks long, alive
            // for the call.
            let got = unsafe { self.fetch_remote(chunk, &addrs, region.as_deref(), d) };
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
    fn pin_prefix(st: &mut State, hashes: &[u64]) -> Vec<Pinned> {
        let n = st.prefix(hashes);
        let mut pins = Vec::with_capacity(n);
        for &h in &hashes[..n] {
            let (host, slot) = st.lease_copy(h);
            let tier = if host {
                st.host.as_mut()
            } else {
                st.disk.as_mut()
            };
            tier.expect("a registered block's tier").pin(slot);
            pins.push(Pinned {
                hash: h,
                host,
                slot,
            });
        }
        pins
    }

    fn unpin_all(st: &mut State, pins: &[Pinned]) {
        for p in pins {
            let tier = if p.host {
                st.host.as_mut()
            } else {
                st.disk.as_mut()
            };
            tier.expect("a pinned block's tier").unpin(p.slot);
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
        let hashes: Vec<u64> = pins.iter().map(|p| p.hash).collect();
        // SAFETY: forwarded from the caller.
        let r = unsafe { self.get_locked(st, &hashes, &addrs, region.as_deref(), true) };
        Self::unpin_all(&mut self.lock(), &pins);
        r
    }

    /// `get` with the state locked and the destinations checked.
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for writes of block_size bytes, distinct,
    /// for the whole call.
    ///
    /// `side_effects: false` reads only (no recency change, no promotion,
    /// no hit counters): the remote tier's background writer reading back
    /// the blocks it sends.
    unsafe fn get_locked(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        hashes: &[u64],
        addrs: &[usize],
        region: Option<&Region>,
        side_effects: bool,
    ) -> Result<usize> {
        if let Err(e) = self.settle_index(&mut st) {
            // Reads still work; promotions wait for the rewrite.
            st.warnings
                .push(format!("rewriting the store's index failed: {e}"));
        }
        if side_effects {
            st.stats.get_calls += 1;
        }
        let mut n = st.prefix(hashes);
        // Blocks whose bytes are still arriving (another call's put or
        // offload, without the lock): wait for that commit, then look again.
        while n > 0 && st.in_flight(&hashes[..n]) {
            st = self
                .committed
                .wait_timeout(st, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if st.closed {
                return Ok(0);
            }
            n = st.prefix(hashes);
        }
        let bs = self.block_size;
        let addr = |i: usize| addrs[i];
        // Phase A: read every block from where it is now.
        let mut host_slots = Vec::new();
        let mut host_idx = Vec::new();
        let mut disk_reads: Vec<(u64, usize)> = Vec::new();
        let mut promote = Vec::new();
        for (i, &h) in hashes[..n].iter().enumerate() {
            match st.readable(h).expect("in the prefix") {
                (true, s) => {
                    host_slots.push(s as u64);
                    host_idx.push(i);
                }
                (false, t) => {
                    disk_reads.push((t as u64, i));
                    promote.push(i);
                }
            }
        }
        // Pin what is read, then read with the lock released: the slots can
        // be neither evicted nor reused meanwhile, and other threads' calls
        // (lookups, other reads, puts into other slots) go on.
        for &s in &host_slots {
            st.host.as_mut().expect("host tier").pin(s as u32);
        }
        for r in &disk_reads {
            st.disk.as_mut().expect("disk tier").pin(r.0 as u32);
        }
        let expect: Vec<u32> = match st.disk.as_ref() {
            Some(tier) => disk_reads.iter().map(|r| tier.crc[r.0 as usize]).collect(),
            None => Vec::new(),
        };
        drop(st);
        let unpin = |st: &mut State| {
            for &s in &host_slots {
                st.host.as_mut().expect("host tier").unpin(s as u32);
            }
            for r in &disk_reads {
                st.disk.as_mut().expect("disk tier").unpin(r.0 as u32);
            }
        };
        if !host_slots.is_empty() {
            let host = self.host.as_ref().expect("host tier");
            // SAFETY: slots registered in range; dst blocks are the caller's.
            unsafe {
                host.copy_slots(
                    region.expect("region"),
                    &host_slots,
                    |k| addr(host_idx[k]),
                    false,
                )
            };
        }
        let mut disk_outcome: Option<DiskOutcome> = None;
        if !disk_reads.is_empty() {
            let disk = self.disk.as_ref().expect("disk tier");
            let slots: Vec<u64> = disk_reads.iter().map(|r| r.0).collect();
            let dsts: Vec<usize> = disk_reads.iter().map(|r| addr(r.1)).collect();
            let seeds: Vec<u64> = disk_reads.iter().map(|r| hashes[r.1]).collect();
            let bad: Vec<AtomicBool> = (0..slots.len()).map(|_| AtomicBool::new(false)).collect();
            let hook = |i: usize, a: usize| {
                // SAFETY: `a` is block i's destination, just filled, bs bytes.
                let bytes = unsafe { std::slice::from_raw_parts(a as *const u8, bs) };
                if block_crc(seeds[i], bytes) != expect[i] {
                    bad[i].store(true, Ordering::Relaxed);
                }
            };
            // A block may appear twice in `hashes`; reading one slot into two
            // places is fine.
            // SAFETY: distinct blocks of the caller's dst.
            let r = unsafe {
                disk.read_blocks_into(&slots, &dsts, self.opts.checksums.then_some(&hook as _))
            };
            // A failed read (EIO, a bad sector): find the first block that
            // cannot be read, block by block in request order; it is
            // dropped like a corrupt block and the prefix ends before it.
            let mut unreadable: Option<(usize, Error)> = None;
            if let Err(e) = r {
                if !matches!(e, Error::Io { .. }) {
                    unpin(&mut self.lock());
                    return Err(e);
                }
                for k in 0..slots.len() {
                    let one = |_: usize, a: usize| hook(k, a);
                    // SAFETY: as above, one block.
                    let r = unsafe {
                        disk.read_blocks_into(
                            &slots[k..k + 1],
                            &dsts[k..k + 1],
                            self.opts.checksums.then_some(&one as _),
                        )
                    };
                    match r {
                        Ok(()) => {}
                        Err(e @ Error::Io { .. }) => {
                            unreadable = Some((k, e));
                            break;
                        }
                        Err(e) => {
                            unpin(&mut self.lock());
                            return Err(e);
                        }
                    }
                }
            }
            if let Some((k, _)) = &unreadable {
                bad[*k].store(true, Ordering::Relaxed);
            }
            disk_outcome = Some((bad, unreadable));
        }
        // Commit under the lock again.
        let mut st = self.lock();
        unpin(&mut st);
        if st.closed {
            return Ok(n); // the bytes were read while the store was open
        }
        if let Some((bad, unreadable)) = disk_outcome {
            // A block that fails its checksum is a miss: dropped, counted,
            // never returned; the prefix ends before it.
            let mut dels = Vec::new();
            for (k, r) in disk_reads.iter().enumerate() {
                if !bad[k].load(Ordering::Relaxed) {
                    continue;
                }
                let (t, h) = (r.0 as u32, hashes[r.1]);
                n = n.min(r.1);
                if st.map.get(&h).is_some_and(|e| e.disk == t) {
                    st.disk.as_mut().expect("disk tier").release(t);
                    let e = st.map.get_mut(&h).expect("checked");
                    e.disk = NIL;
                    if e.host == NIL {
                        st.map.remove(&h);
                    }
                    dels.push(Record::del(h, t));
                    match &unreadable {
                        Some((uk, e)) if *uk == k => {
                            st.stats.io_errors += 1;
                            if !st.io_error_logged {
                                st.io_error_logged = true;
                                st.warnings.push(format!(
                                    "block {h:#018x} in disk slot {t} could not be read ({e}); it \
                                     was dropped and counted as a miss. Later read errors are \
                                     counted in stats()[\"io_errors\"] without a warning"
                                ));
                            }
                        }
                        _ => {
                            st.stats.corrupt_blocks += 1;
                            st.warnings.push(format!(
                                "block {h:#018x} in disk slot {t} failed its checksum (torn \
                                 write or corruption on disk); it was dropped and counted as a \
                                 miss"
                            ));
                        }
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
        if !side_effects {
            return Ok(n);
        }
        st.stats.host_hits += host_idx.iter().filter(|&&i| i < n).count() as u64;
        st.stats.disk_hits += disk_reads.iter().filter(|r| r.1 < n).count() as u64;
        st.stats.misses += (hashes.len() - n) as u64;
        promote.retain(|&i| i < n);
        // Phase B: touch in order, then promote disk-only blocks in order.
        for h in &hashes[..n] {
            if let Some(&e) = st.map.get(h) {
                st.touch(e);
            }
        }
        if st.host.is_some() && !promote.is_empty() {
            let mut plan = Plan::default();
            let mut promoted = 0u64;
            // Still disk-only now that the lock is held again: a block
            // removed by another thread while it was read is not promoted.
            let eligible: std::collections::HashSet<u64> = promote
                .iter()
                .map(|&i| hashes[i])
                .filter(|h| st.map.get(h).is_some_and(|e| e.host == NIL))
                .collect();
            for &i in &promote {
                let h = hashes[i];
                if !eligible.contains(&h) || st.map.get(&h).is_some_and(|e| e.host != NIL) {
                    // Removed meanwhile, or listed twice and already promoted.
                    continue;
                }
                // A block this loop's own offloads pushed out of a full disk
                // tier is gone from the map, but its bytes are in the
                // caller's buffer: it is promoted all the same, not lost.
                if st.host_insert(h, addr(i), &mut plan) {
                    promoted += 1;
                }
            }
            let (g, r) = self.execute(st, &plan, region);
            st = g;
            match r {
                Ok(()) => st.stats.onboarded_blocks += promoted,
                Err(e) => {
                    // The caller's data is complete; only the promotion (and
                    // the offload it caused) failed and was rolled back.
                    st.warnings.push(format!(
                        "promoting {promoted} blocks into the host tier failed and was undone: {e}"
                    ));
                }
            }
        }
        Ok(n)
    }

    #[cfg(test)] // a convenience of the unit tests
    /// [`Self::get_lease`] into a slice.
    pub fn get_lease_into(&self, id: u64, dst: &mut [u8]) -> Result<usize> {
        // SAFETY: a valid exclusive slice.
        unsafe { self.get_lease(id, dst.as_mut_ptr(), dst.len(), None) }
    }

    #[cfg(test)] // a convenience of the unit tests
    pub fn put(&self, hashes: &[u64], src: &[u8]) -> Result<usize> {
        // SAFETY: a valid slice.
        unsafe { self.put_raw(hashes, src.as_ptr(), src.len()) }
    }

    #[cfg(test)] // a convenience of the unit tests
    pub fn get(&self, hashes: &[u64], dst: &mut [u8]) -> Result<usize> {
        // SAFETY: a valid exclusive slice.
        unsafe { self.get_raw(hashes, dst.as_mut_ptr(), dst.len()) }
    }

    /// Length of the longest stored prefix (changes no recency).
    pub fn match_prefix(&self, hashes: &[u64]) -> Result<usize> {
        let n = self.open_state()?.prefix(hashes);
        Ok(match self.remote.get() {
            Some((r, _)) if n < hashes.len() => n + r.count_prefix(&hashes[n..], r.deadline()),
            _ => n,
        })
    }

    /// Mark the stored blocks among `hashes` as the most recently used, in
    /// the order given (the last one is the newest), in every tier that
    /// holds them; takes no I/O. Returns how many were stored.
    pub fn touch(&self, hashes: &[u64]) -> Result<usize> {
        let mut st = self.open_state()?;
        let mut n = 0;
        for h in hashes {
            if let Some(&e) = st.map.get(h) {
                st.touch(e);
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn contains(&self, h: u64) -> Result<bool> {
        Ok(self.open_state()?.map.contains_key(&h))
    }

    pub fn len(&self) -> Result<usize> {
        Ok(self.open_state()?.map.len())
    }

    /// Forget blocks; returns how many were stored. The index records the
    /// removal before memory forgets it: on an error nothing changed.
    pub fn remove(&self, hashes: &[u64]) -> Result<usize> {
        let mut st = self.open_state()?;
        self.settle_index(&mut st)?;
        let mut seen = std::collections::HashSet::new();
        let mut gone = Vec::new();
        let mut dels = Vec::new();
        for &h in hashes {
            if let Some(&e) = st.map.get(&h) {
                if seen.insert(h) {
                    gone.push((h, e));
                    if e.disk != NIL {
                        dels.push(Record::del(h, e.disk));
                    }
                }
            }
        }
        if let Some(ix) = st.index.as_mut() {
            ix.append(&dels)?;
        }
        for &(h, e) in &gone {
            st.map.remove(&h);
            if e.host != NIL {
                st.host.as_mut().expect("host tier").release(e.host);
            }
            if e.disk != NIL {
                st.disk.as_mut().expect("disk tier").release(e.disk);
            }
        }
        Ok(gone.len())
    }

    /// Forget every block. A persistent store's index is rewritten empty
    /// first: on an error nothing changed.
    pub fn clear(&self) -> Result<()> {
        let mut st = self.open_state()?;
        if let (Some(ix), Some(g)) = (st.index.as_mut(), self.geometry) {
            ix.compact(&g, &[])?;
        }
        st.map.clear();
        if let Some(t) = st.host.as_mut() {
            t.reset();
        }
        if let Some(t) = st.disk.as_mut() {
            t.reset();
        }
        Ok(())
    }

    /// Make everything written so far durable against power loss:
    /// fdatasync the data file, then the index.
    pub fn sync(&self) -> Result<()> {
        let st = self.open_state()?;
        if let Some(d) = &self.disk {
            d.sync()?;
        }
        if let Some(ix) = st.index.as_ref() {
            ix.sync()?;
        }
        Ok(())
    }

    /// Compact the index now (it is also compacted automatically).
    pub fn compact_index(&self) -> Result<()> {
        let mut st = self.open_state()?;
        let live = Self::live_disk(&st);
        if let (Some(ix), Some(g)) = (st.index.as_mut(), self.geometry) {
            ix.compact(&g, &live)?;
            st.stats.index_compactions += 1;
        }
        Ok(())
    }

    pub fn persistent(&self) -> bool {
        self.geometry.is_some()
    }

    /// Counters and (blocks in host, blocks on disk), read together.
    pub fn stats(&self) -> Result<(Stats, (usize, usize))> {
        let st = self.open_state()?;
        Ok((
            st.stats.clone(),
            (
                st.host.as_ref().map_or(0, Tier::used),
                st.disk.as_ref().map_or(0, Tier::used),
            ),
        ))
    }

    /// Hashes in LRU order (least recent first) for the host and disk tiers:
    /// for tests and debugging.
    pub fn lru_order(&self) -> Result<(Vec<u64>, Vec<u64>)> {
        let st = self.open_state()?;
        let order = |t: &Option<Tier>| {
            t.as_ref().map_or_else(Vec::new, |t| {
                t.lru
                    .order()
                    .into_iter()
                    .map(|s| t.hash_of[s as usize])
                    .collect()
            })
        };
        Ok((order(&st.host), order(&st.disk)))
    }

    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().warnings)
    }

    /// What the tiers themselves have to say (host, disk): a disk tier that
    /// falls back to buffered I/O in the middle of one of this manager's
    /// batches says so here (nobody else drains it).
    pub fn take_tier_warnings(&self) -> (Vec<String>, Vec<String>) {
        (
            self.host
                .as_ref()
                .map(|h| h.take_warnings())
                .unwrap_or_default(),
            self.disk
                .as_ref()
                .map(|d| d.take_warnings())
                .unwrap_or_default(),
        )
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
}

impl LocalSource for BlockManager {
    fn with_local(&self, h: u64, scratch: &mut Vec<u8>, f: &mut dyn FnMut(&[u8])) -> bool {
        let (Ok(region), Ok(mut st)) = (self.region(), self.open_state()) else {
            return false;
        };
        if let (Some(region), Some((true, slot))) = (region.as_deref(), st.readable(h)) {
            // In the host tier: read in place, the slot pinned meanwhile.
            st.host.as_mut().expect("host tier").pin(slot);
            drop(st);
            let host = self.host.as_ref().expect("host tier");
            // SAFETY: the slot holds h's bytes, in place (readable: not
            // filling); pinned, it is neither evicted nor reused (nor written)
            // until unpinned below; `region` (held) maps it.
            let bytes = unsafe {
                std::slice::from_raw_parts(host.slot_ptr(region, slot as u64), self.block_size)
            };
            f(bytes);
            self.lock().host.as_mut().expect("host tier").unpin(slot);
            return true;
        }
        scratch.resize(self.block_size, 0);
        let addr = [scratch.as_mut_ptr() as usize];
        // SAFETY: `scratch` is this call's exclusive buffer of block_size bytes.
        let r = unsafe { self.get_locked(st, &[h], &addr, region.as_deref(), false) };
        if matches!(r, Ok(1)) {
            f(scratch);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;
    use crate::host::{HostOptions, Pin};

    fn mgr(host: u64, disk: u64, bs: usize, dir: &std::path::Path) -> BlockManager {
        let h = (host > 0).then(|| {
            Arc::new(
                HostStorage::new(
                    host,
                    bs,
                    &HostOptions {
                        pin: Pin::Off,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        });
        let d = (disk > 0)
            .then(|| Arc::new(DiskStorage::open(dir, disk, bs, &DiskOptions::default()).unwrap()));
        BlockManager::new(
            bs,
            h,
            d,
            ManagerOptions {
                checksums: true,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn block(h: u64, bs: usize) -> Vec<u8> {
        (0..bs).map(|i| (h as usize * 131 + i) as u8).collect()
    }

    #[test]
    fn leased_blocks_are_never_evicted_and_a_full_pinned_tier_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let m = mgr(2, 0, bs, dir.path()); // host only, 2 slots
        m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
            .unwrap();
        let (lease, n) = m.lookup(&[1, 9], None).unwrap();
        assert_eq!(n, 1);
        // 1 is pinned: new blocks evict 2, then each other, never 1.
        for h in 10..20u64 {
            assert_eq!(m.put(&[h], &block(h, bs)).unwrap(), 1);
        }
        let (lease2, n2) = m.lookup(&[19], None).unwrap();
        assert_eq!(n2, 1);
        // Both slots pinned: a new block is rejected, counted, not an error.
        assert_eq!(m.put(&[30], &block(30, bs)).unwrap(), 0);
        let (s, _) = m.stats().unwrap();
        assert_eq!((s.rejected_full, s.leases), (1, 2));
        let mut out = vec![0u8; bs];
        assert_eq!(m.get_lease_into(lease, &mut out).unwrap(), 1);
        assert_eq!(out, block(1, bs));
        assert!(m.release_lease(lease2));
        assert!(!m.release_lease(lease2)); // once
        assert!(m.get_lease_into(lease, &mut out).is_err()); // used
        assert_eq!(m.put(&[30], &block(30, bs)).unwrap(), 1); // room again
    }

    #[test]
    fn a_block_removed_while_leased_frees_its_slot_at_release() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let m = mgr(2, 0, bs, dir.path());
        m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
            .unwrap();
        let (lease, _) = m.lookup(&[1, 2], None).unwrap();
        assert_eq!(m.remove(&[1]).unwrap(), 1);
        m.clear().unwrap();
        // Both slots still leased: nothing fits.
        assert_eq!(m.put(&[5], &block(5, bs)).unwrap(), 0);
        let mut out = vec![0u8; 2 * bs];
        assert_eq!(m.get_lease_into(lease, &mut out).unwrap(), 0);
        assert_eq!(
            m.put(&[5, 6], &[block(5, bs), block(6, bs)].concat())
                .unwrap(),
            2
        );
    }

    #[test]
    fn a_batch_never_evicts_its_own_stored_blocks() {
        // Disk-only, 2 slots holding [1, 2]: put([3, 1]) refreshes 1, and 3
        // evicts the LRU block 2. One new block.
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let m = mgr(0, 2, bs, dir.path());
        m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
            .unwrap();
        let n = m
            .put(&[3, 1], &[block(3, bs), block(1, bs)].concat())
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(m.lru_order().unwrap().1, vec![3, 1]); // the batch order is the recency order
        let mut one = vec![0u8; bs];
        assert_eq!(m.get(&[1], &mut one).unwrap(), 1);
        assert_eq!(one, block(1, bs));
    }

    #[test]
    fn offload_and_onboard_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let m = mgr(2, 4, bs, dir.path());
        for h in 0..5u64 {
            assert_eq!(m.put(&[h], &block(h, bs)).unwrap(), 1);
        }
        // host holds 3,4; disk holds 0,1,2 (offloaded in order)
        assert_eq!(m.lru_order().unwrap(), (vec![3, 4], vec![0, 1, 2]));
        let mut out = vec![0u8; 3 * bs];
        assert_eq!(m.get(&[0, 1, 9], &mut out).unwrap(), 2);
        assert_eq!(&out[..bs], &block(0, bs)[..]);
        assert_eq!(&out[bs..2 * bs], &block(1, bs)[..]);
        // 0 and 1 promoted; 3 and 4 offloaded; the disk was full, so its LRU block 2 was dropped
        let (host, disk) = m.lru_order().unwrap();
        assert_eq!(host, vec![0, 1]);
        assert_eq!(disk, vec![0, 1, 3, 4]);
        assert!(!m.contains(2).unwrap());
        let s = m.stats().unwrap().0;
        assert_eq!((s.disk_hits, s.onboarded_blocks, s.misses), (2, 2, 1));
        let mut one = vec![0u8; bs];
        for h in [0u64, 1, 3, 4] {
            assert_eq!(m.get(&[h], &mut one).unwrap(), 1, "block {h}");
            assert_eq!(one, block(h, bs));
        }
    }
}
