//! The block manager: sequence hash -> slot in the host and/or disk tier,
//! an eviction order per tier (LRU or S3-FIFO), offload (host -> disk) and
//! onboard (disk -> host).
//!
//! # Policy (the default, mirrored by the Python model in the tests)
//! - A block is a [`Key`]: its hash within a namespace (0, the shared one,
//!   unless a call names another; see `namespaces.rs`). Keys of different
//!   namespaces are different blocks, whatever their hashes; everything
//!   below holds for keys. The remote tier holds every namespace, each
//!   under keys of its own (see `remote/codec.rs`).
//! - A block lives in the host tier, the disk tier, or both (identical bytes:
//!   a block's content never changes for its key).
//! - **Eviction order**, per tier (`host_eviction`, `disk_eviction`):
//!   - `lru` (the default): a tier's victim is its least recently used
//!     block; a touch makes a block the most recent.
//!   - `s3fifo`: a tier keeps a small queue and a main queue (FIFO both) and
//!     a 0-3 count per block. A new block joins the small queue, or the main
//!     queue if its hash is in the tier's ghost; a touch adds one to its
//!     count (at most 3). The victim is sought in the small queue while it
//!     holds at least 60% of the tier's slots (or the main queue is empty),
//!     else in the main queue; failing that (all pinned), in the other one.
//!     The oldest unpinned block of that queue is the victim if its count is
//!     0 (one leaving the small queue is remembered in the ghost); otherwise
//!     it moves to the back of the main queue with its count reset to 0
//!     (from the small queue) or lowered by one (from the main queue), and
//!     the search starts again. The ghost remembers a hash while fewer than
//!     `window = slots - small share` others were added after it and no later
//!     one landed in its entry of a direct-mapped table of
//!     `next_power_of_two(2 * window)` entries (the entry: the low bits of the
//!     splitmix64 finaliser of the hash); a block that joins the main queue
//!     from it is forgotten.
//!
//!   A persistent store's disk tier keeps its order across a restart: each
//!   block's place (queue, position, count) and the S3-FIFO ghost, exactly
//!   after a clean `close()`, as of the last index write after `kill -9`
//!   (see `index.rs`).
//!
//!   `lru_order` lists a tier's blocks first to leave first: LRU's list, or
//!   the small queue then the main queue, each oldest first.
//! - **Touch** refreshes a block in every tier that holds it.
//! - **put**: blocks of the batch already stored are touched first (so the
//!   batch's new blocks never evict them); then new ones go to the host tier
//!   (or straight to disk when there is no host tier), in the order given.
//! - **Host full**: the host tier's victim leaves the host tier; if it has no disk
//!   copy it is inserted into the disk tier (the offload), else it just keeps
//!   its disk copy; with no disk tier it is dropped. With
//!   `disk_admission="reuse"` only a block asked for again since it entered
//!   the host tier (touched: a hit, a `touch`, a put of it) is offloaded, or
//!   one whose hash was turned away before (the last `host + disk` turned
//!   away are remembered, oldest forgotten first) and that was put again;
//!   another is dropped, counted as `disk_not_admitted`, and remembered.
//!   `clear` forgets what was turned away. A persistent store remembers it
//!   across a restart and `kill -9` (its index's `GHOST` records).
//! - **Disk full**: the disk tier's victim loses its disk copy (dropped if that
//!   was its only copy).
//! - **get**: the longest stored prefix is read from where each block is at
//!   the start of the call (host preferred); then the blocks are touched in
//!   order; then blocks that were disk-only are promoted into the host tier
//!   in order (keeping their disk copy). The promotion is planned when the
//!   call starts, exactly as it would be after the reads, so most disk hits
//!   are read straight into the host slot they are promoted to and copied
//!   out once (see `read.rs`). The reads run with the lock released, the
//!   slots they read pinned and the slots they fill held (so other calls go
//!   on meanwhile).
//! - **match** is a query: it changes no recency.
//! - **Leases**: `lookup` pins the slots of the longest stored prefix (the
//!   host slot where a block has one, else its disk slot). Eviction passes
//!   over pinned blocks; when every candidate is pinned, the new
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
//!   read fails (EIO) is a miss: dropped with the host copy it was promoted
//!   to, counted (`corrupt_blocks`, `io_errors`), logged; `get` returns the
//!   prefix before it (the blocks after it, read meanwhile, keep their
//!   recency and promotion).
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
//!
//! # The files
//! - `mod.rs` (this file): the facade: construction, the put path, queries,
//!   `remove`/`clear`/`sync`/`stats`, close.
//! - `policy.rs`: the registry and every decision about which block goes
//!   where, as named verbs over private fields (no I/O, no `unsafe`).
//! - `namespaces.rs`: the table of namespace names and its file.
//! - `recover.rs`: reopening a persistent store: the index replayed into the
//!   registry, and what recovery has to report.
//! - `execute.rs`: running a plan (disk write and host copies without the
//!   lock, commit or roll back under it) and keeping the index in step.
//! - `read.rs`: the read path of `get`: plan, read, commit, promote.
//! - `leases.rs`: `lookup`, `get_lease`, `release_lease`.
//! - `write_behind.rs`: the background thread that keeps the least recent
//!   host blocks written to disk, `flush`, and the flush of a closing store.
//! - `below.rs`: the remote tier under the local ones.
#![allow(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use crate::disk::DiskStorage;
use crate::error::{Error, Result};
use crate::host::{HostStorage, Region};
use crate::index::{Geometry, IndexLog, Record, Snapshot};
use crate::process::ForkGuard;
use crate::remote::{RemoteTier, RemoteWrite};

mod below;
mod execute;
mod leases;
pub(crate) mod namespaces;
mod policy;
mod read;
mod recover;
mod write_behind;

pub use crate::checksum::block_crc;
pub use crate::keys::{Key, Keys};
use leases::Pinned;
use namespaces::Namespaces;
pub use namespaces::{check_name, UNKNOWN as UNKNOWN_NAMESPACE};
pub use policy::TierEvent;
use policy::{capacity, Map, Plan, Registry, Rules, NO_QUOTA};
use write_behind::Writer;

/// Counters reported by `stats()`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub put_blocks: u64,
    pub put_new: u64,
    pub get_calls: u64,
    pub host_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub offloaded_blocks: u64,
    pub onboarded_blocks: u64,
    pub host_evictions: u64,
    pub disk_evictions: u64,
    pub dropped_blocks: u64,
    /// Host victims `disk_admission` kept off the disk (in `dropped_blocks` too).
    pub disk_not_admitted: u64,
    /// New blocks not stored because every slot they could take was pinned.
    pub rejected_full: u64,
    /// Leases taken by `lookup`.
    pub leases: u64,
    /// Leases taken and not yet used or released (a gauge).
    pub leases_held: u64,
    /// Host-only blocks written to disk ahead of eviction (write-behind).
    pub written_behind: u64,
    /// Write-behind batches that failed (their blocks stay in the host tier).
    pub failed_write_behind: u64,
    pub failed_writes: u64,
    pub corrupt_blocks: u64,
    pub io_errors: u64,
    pub recovered_blocks: u64,
    pub index_torn_bytes: u64,
    pub index_bad_records: u64,
    pub index_compactions: u64,
}

/// One namespace's part: what its calls counted and what it holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NamespaceStats {
    pub put_blocks: u64,
    pub put_new: u64,
    pub host_hits: u64,
    pub disk_hits: u64,
    /// Blocks its `get`s and `lookup`s fetched from the remote tier (also
    /// counted in `misses`: the local tiers did not hold them).
    pub remote_hits: u64,
    pub misses: u64,
    /// Slots its blocks take in the host and disk tiers (gauges).
    pub host_blocks: u64,
    pub disk_blocks: u64,
    /// Its quota in bytes of the host and disk tiers (None: none).
    pub quota: namespaces::Quota,
}

/// Everything behind the manager's one lock: the registry (the policy's),
/// and the executor's own bookkeeping around it.
struct State {
    reg: Registry,
    /// The executor's counters (the policy's own are in `reg`).
    stats: Stats,
    warnings: Vec<String>,
    index: Option<IndexLog>,
    closed: bool,
    io_error_logged: bool,
    /// Leases by id: the slots each pins.
    leases: Map<u64, Vec<Pinned>>,
    next_lease: u64,
    /// The namespaces' names.
    names: Namespaces,
    /// What each namespace's calls counted (the gauges are the registry's).
    ns_counts: Map<u32, NamespaceStats>,
}

impl State {
    /// Append `recs` to a persistent store's index (nothing without one, or
    /// with no records), then the disk tier's order changes since the last
    /// append (see [`Registry::order_records`]): they ride along.
    fn log(&mut self, recs: &[Record]) -> Result<()> {
        if self.index.is_none() || recs.is_empty() {
            return Ok(());
        }
        let mut all = recs.to_vec();
        all.extend(self.reg.order_records(&[]));
        self.index.as_mut().expect("checked").append(&all)
    }
}

/// The tiers' state behind one lock; see the module docs for the policy.
pub struct BlockManager {
    state: Mutex<State>,
    host: Option<Arc<HostStorage>>,
    disk: Option<Arc<DiskStorage>>,
    block_size: usize,
    opts: ManagerOptions,
    geometry: Option<Geometry>,
    fork: ForkGuard,
    /// How long lookups, loads and stores take (for metrics).
    pub latency: crate::latency::Latencies,
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
    /// Which host victims get a disk copy.
    pub disk_admission: crate::settings::DiskAdmission,
    /// How the host tier chooses its victims.
    pub host_eviction: crate::settings::Eviction,
    /// How the disk tier chooses its victims.
    pub disk_eviction: crate::settings::Eviction,
}

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
        for (what, size) in [
            ("host", host.as_ref().map(|h| h.block_size())),
            ("disk", disk.as_ref().map(|d| d.block_size())),
        ] {
            if let Some(size) = size.filter(|&s| s != block_size) {
                return Err(Error::InvalidArgument(format!(
                    "{what} tier block_size {size} differs from the manager's {block_size}"
                )));
            }
        }
        let mut reg = Registry::new(
            host.as_ref()
                .map_or(Ok(0), |h| capacity(h.num_blocks(), "host"))?,
            disk.as_ref()
                .map_or(Ok(0), |d| capacity(d.num_blocks(), "disk"))?,
            Rules {
                host_eviction: opts.host_eviction,
                disk_eviction: opts.disk_eviction,
                admission: opts.disk_admission,
            },
        );
        let mut stats = Stats::default();
        let mut warnings = Vec::new();
        let mut names = Namespaces::new();
        let (index, geometry) = match &opts.index_path {
            Some(path) => {
                names = Namespaces::open(path)?;
                let r = recover::recover(path, disk.as_deref(), block_size, &opts, &mut reg)?;
                stats.recovered_blocks = r.recovered;
                stats.index_torn_bytes = r.torn_bytes;
                stats.index_bad_records = r.bad_records;
                warnings = r.warnings;
                for (ns, q) in names.quotas() {
                    // Recorded only: blocks past a quota (lowered before a
                    // crash) leave at the namespace's next insertions.
                    reg.restore_quota(ns, quota_slots(q, block_size));
                }
                names.reserve(reg.top_namespace());
                let unnamed = reg.unnamed(|ns| names.name(ns).is_some());
                if unnamed > 0 {
                    warnings.push(format!(
                        "{unnamed} blocks recovered from {} are in namespaces its table \
                         (the .namespaces file beside it) does not name; nobody can ask for \
                         them, and they leave as the tiers evict",
                        path.display()
                    ));
                }
                (Some(r.index), Some(r.geometry))
            }
            None => (None, None),
        };
        Ok(BlockManager {
            state: Mutex::new(State {
                reg,
                stats,
                warnings,
                index,
                closed: false,
                io_error_logged: false,
                leases: Map::default(),
                next_lease: 1,
                names,
                ns_counts: Map::default(),
            }),
            host,
            disk,
            block_size,
            opts,
            geometry,
            fork: ForkGuard::new("BlockManager"),
            latency: Default::default(),
            writer: Arc::new(Writer::default()),
            cleaning: Mutex::new(()),
            committed: std::sync::Condvar::new(),
            remote: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for a call that may use the manager: refused after
    /// `close()` and in a forked child.
    fn open_state(&self) -> Result<MutexGuard<'_, State>> {
        self.fork.check()?;
        let st = self.lock();
        if st.closed {
            return Err(Error::Closed("BlockManager"));
        }
        Ok(st)
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
        if flush && written.is_ok() && !self.fork.forked() {
            // The disk tier's last order changes (nothing is being written
            // now, so all of them: the next open finds every block at its
            // place), then, after everything the close wrote: the store was
            // closed cleanly. Best effort: a failed append leaves the index
            // dirty, and a dirty index is not marked closed cleanly.
            let recs = st.reg.order_records(&[]);
            if let Some(ix) = st.index.as_mut().filter(|ix| !ix.dirty()) {
                let _ = ix.append(&recs);
            }
            if let Some(ix) = st.index.as_mut().filter(|ix| !ix.dirty()) {
                let _ = ix.mark(true);
            }
        }
        st.closed = true;
        st.index = None;
        written
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

    #[cfg(test)] // a convenience of the unit tests
    /// Store blocks `hashes[i]` from `src + i * block_size`. Returns how many
    /// were new.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn put_raw(&self, hashes: &[u64], src: *const u8, len: usize) -> Result<usize> {
        // SAFETY: forwarded.
        unsafe { self.put_in(None, hashes, src, len, None) }
    }

    /// Store blocks `hashes[i]` of namespace `namespace` (None: the shared
    /// one) from row `rows[i]` of `src` (seen as rows of block_size bytes),
    /// or back to back without rows. Returns how many were new. A name new
    /// to the store gets its id once the buffer and rows passed their checks.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn put_in(
        &self,
        namespace: Option<&str>,
        hashes: &[u64],
        src: *const u8,
        len: usize,
        rows: Option<&[u64]>,
    ) -> Result<usize> {
        let _timer = self.latency.store.time();
        let region = self.region()?;
        let addrs = self.block_addrs(
            hashes.len(),
            (src as usize, len),
            rows,
            "src",
            false,
            region.as_deref(),
        )?;
        let ns = self.namespace_id(namespace, !hashes.is_empty())?;
        // SAFETY: forwarded from the caller; the addresses were checked.
        unsafe { self.put_addrs(Keys::new(hashes, ns), &addrs, region.as_deref(), true) }
    }

    /// `put` of blocks at checked addresses; `to_remote`: also send the new
    /// ones to the remote tier (not for blocks that came from it).
    ///
    /// # Safety
    /// Every `addrs[i]` is valid for reads of block_size bytes for the call.
    unsafe fn put_addrs(
        &self,
        hashes: Keys<'_>,
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
        for h in hashes.iter() {
            st.reg.touch(h);
        }
        let mut new = 0usize;
        let mut rejected = 0u64;
        for (i, h) in hashes.iter().enumerate() {
            if st.reg.touch(h) {
                continue;
            }
            if send {
                unseen.push(i);
            }
            if st
                .reg
                .admit(h, addrs[i], self.opts.write_through, &mut plan)
            {
                new += 1;
            } else {
                rejected += 1; // every slot it could take is leased
            }
        }
        let (mut st, r) = self.execute(st, &plan, region);
        r?;
        st.stats.put_blocks += hashes.len() as u64;
        st.stats.put_new += new as u64;
        if !hashes.is_empty() && hashes.ns() != 0 {
            let c = st.ns_counts.entry(hashes.ns()).or_default();
            c.put_blocks += hashes.len() as u64;
            c.put_new += new as u64;
        }
        st.stats.rejected_full += rejected;
        drop(st);
        if new > 0 {
            self.nudge();
        }
        if !unseen.is_empty() {
            // SAFETY: forwarded from the caller.
            unsafe { self.send_remote(hashes, addrs, &unseen) };
        }
        Ok(new)
    }

    #[cfg(test)] // a convenience of the unit tests
    pub fn put(&self, hashes: &[u64], src: &[u8]) -> Result<usize> {
        // SAFETY: a valid slice.
        unsafe { self.put_raw(hashes, src.as_ptr(), src.len()) }
    }

    /// Length of the longest stored prefix (changes no recency).
    pub fn match_prefix(&self, hashes: Keys<'_>) -> Result<usize> {
        let _timer = self.latency.lookup.time();
        let n = self.open_state()?.reg.prefix(hashes);
        if n == hashes.len() {
            return Ok(n);
        }
        Ok(match self.remote_space(hashes.ns()) {
            Some((r, space)) => n + r.count_prefix(&space, &hashes.hashes()[n..], r.deadline()),
            None => n,
        })
    }

    /// Mark the stored blocks among `hashes` as the most recently used, in
    /// the order given (the last one is the newest), in every tier that
    /// holds them; takes no I/O. Returns how many were stored.
    pub fn touch(&self, hashes: Keys<'_>) -> Result<usize> {
        let mut st = self.open_state()?;
        Ok(hashes.iter().filter(|&h| st.reg.touch(h)).count())
    }

    pub fn contains(&self, h: Key) -> Result<bool> {
        Ok(self.open_state()?.reg.contains(h))
    }

    pub fn len(&self) -> Result<usize> {
        Ok(self.open_state()?.reg.len())
    }

    /// The id of namespace `name` (None: the shared one, 0). A name the
    /// store does not know is given an id (and a persistent store writes its
    /// table down) with `create`, as a put does; without it, it is
    /// [`UNKNOWN_NAMESPACE`], in which every query misses.
    pub fn namespace_id(&self, name: Option<&str>, create: bool) -> Result<u32> {
        let Some(n) = name else {
            return Ok(0); // the shared namespace: no lock to take
        };
        check_name(n)?;
        let mut st = self.open_state()?;
        if create {
            st.names.id(name)
        } else {
            Ok(st.names.find(name))
        }
    }

    /// The id of namespace `name` for a query that goes on to the remote
    /// tier (`get`, `lookup`, `match`): with a remote tier, an unseen name is
    /// given an id, as a put does (the remote tier may hold the namespace's
    /// blocks, and what the query fetches is kept locally under that id);
    /// without one, as [`Self::namespace_id`] without `create`.
    pub fn query_namespace_id(&self, name: Option<&str>) -> Result<u32> {
        self.namespace_id(name, self.remote.get().is_some())
    }

    /// The name of namespace `id` (None: the shared one, or unknown).
    pub fn namespace_name(&self, id: u32) -> Option<String> {
        self.lock().names.name(id).map(str::to_owned)
    }

    /// Every namespace the store has a name for, in the order they came.
    pub fn namespaces(&self) -> Result<Vec<String>> {
        let st = self.open_state()?;
        Ok(st.names.all().map(|(_, n)| n.to_owned()).collect())
    }

    /// Namespace `ns`'s counters (since this manager opened) and the slots
    /// its blocks hold now.
    pub fn namespace_stats(&self, ns: u32) -> Result<NamespaceStats> {
        let st = self.open_state()?;
        let (host_blocks, disk_blocks) = st.reg.used_by(ns);
        let counts = if ns == 0 {
            // Not counted per call (the common case pays nothing): the
            // totals less every other namespace's.
            let mut c = NamespaceStats {
                put_blocks: st.stats.put_blocks,
                put_new: st.stats.put_new,
                host_hits: st.stats.host_hits,
                disk_hits: st.stats.disk_hits,
                misses: st.stats.misses,
                remote_hits: self.remote().map_or(0, |r| {
                    r.stats.hits.load(std::sync::atomic::Ordering::Relaxed)
                }),
                ..Default::default()
            };
            for o in st.ns_counts.values() {
                c.remote_hits = c.remote_hits.saturating_sub(o.remote_hits);
                c.put_blocks = c.put_blocks.saturating_sub(o.put_blocks);
                c.put_new = c.put_new.saturating_sub(o.put_new);
                c.host_hits = c.host_hits.saturating_sub(o.host_hits);
                c.disk_hits = c.disk_hits.saturating_sub(o.disk_hits);
                c.misses = c.misses.saturating_sub(o.misses);
            }
            c
        } else if ns == UNKNOWN_NAMESPACE {
            NamespaceStats::default() // (its calls' misses are kept apart, under its id)
        } else {
            st.ns_counts.get(&ns).cloned().unwrap_or_default()
        };
        Ok(NamespaceStats {
            host_blocks: host_blocks as u64,
            disk_blocks: disk_blocks as u64,
            quota: st.names.quota(ns),
            ..counts
        })
    }

    /// Give namespace `namespace` a quota of `quota` bytes of the (host,
    /// disk) tiers (None: no quota in that tier), replacing its earlier one;
    /// a name new to the store gets its id. A quota is whole blocks (the
    /// bytes rounded down), at least one. A namespace at its quota in a tier
    /// makes room for a new block of its own by evicting its own victim
    /// there (see `policy.rs`); blocks past a lowered quota are evicted now
    /// (a host victim offloaded as an eviction would), pinned ones as their
    /// pins allow. A persistent store keeps quotas in its table of names.
    pub fn set_quota(&self, namespace: &str, quota: namespaces::Quota) -> Result<()> {
        check_name(namespace)?;
        let bs = self.block_size as u64;
        for (what, q) in ["host_bytes", "disk_bytes"].iter().zip(quota) {
            if let Some(b) = q.filter(|&b| b < bs) {
                return Err(Error::InvalidArgument(format!(
                    "{what} must be at least one block ({bs} bytes) or None (no quota), got {b}"
                )));
            }
        }
        let region = self.region()?;
        let mut st = self.open_state()?;
        self.settle_index(&mut st)?;
        let ns = st.names.id(Some(namespace))?;
        st.names.set_quota(ns, quota)?;
        let mut plan = Plan::default();
        st.reg
            .set_quota(ns, quota_slots(quota, self.block_size), &mut plan);
        let (_st, r) = self.execute(st, &plan, region.as_deref());
        r
    }

    /// Forget every block of namespace `ns` (its name stays known); returns
    /// how many there were. As `remove`: the index records the removal
    /// first, and on an error nothing changed.
    pub fn purge(&self, ns: u32) -> Result<usize> {
        let hashes = self.open_state()?.reg.hashes_of(ns);
        self.remove(Keys::new(&hashes, ns))
    }

    /// Forget blocks; returns how many were stored. The index records the
    /// removal before memory forgets it: on an error nothing changed.
    pub fn remove(&self, hashes: Keys<'_>) -> Result<usize> {
        let mut st = self.open_state()?;
        self.settle_index(&mut st)?;
        let dels: Vec<Record> = st
            .reg
            .disk_copies_of(hashes)
            .into_iter()
            .map(|(h, t)| Record::del(h, t))
            .collect();
        st.log(&dels)?;
        Ok(st.reg.forget(hashes))
    }

    /// Forget every block. A persistent store's index is rewritten empty
    /// first: on an error nothing changed.
    pub fn clear(&self) -> Result<()> {
        let mut st = self.open_state()?;
        if let (Some(ix), Some(g)) = (st.index.as_mut(), self.geometry) {
            ix.compact(&g, &Snapshot::default())?;
        }
        st.reg.reset();
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
        let snap = st.reg.snapshot();
        if let (Some(ix), Some(g)) = (st.index.as_mut(), self.geometry) {
            ix.compact(&g, &snap)?;
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
        let c = st.reg.counts();
        let s = Stats {
            host_evictions: c.host_evictions,
            disk_evictions: c.disk_evictions,
            dropped_blocks: c.dropped_blocks,
            disk_not_admitted: c.not_admitted,
            leases_held: st.leases.len() as u64,
            ..st.stats.clone()
        };
        Ok((s, st.reg.used()))
    }

    /// Hashes in LRU order (least recent first) for the host and disk tiers:
    /// for tests and debugging.
    pub fn lru_order(&self) -> Result<(Vec<Key>, Vec<Key>)> {
        Ok(self.open_state()?.reg.lru_order())
    }

    /// Record every change of what the host and disk tiers hold from now
    /// on (blocks stored into and removed from each), keeping at most `cap`
    /// not yet taken; 0 stops recording.
    pub fn watch_events(&self, cap: usize) -> Result<()> {
        self.open_state()?.reg.watch(cap);
        Ok(())
    }

    /// The changes recorded since the last call, oldest first, and how many
    /// were dropped meanwhile (more than `cap` waited).
    pub fn take_events(&self) -> Result<(Vec<TierEvent>, u64)> {
        Ok(self.open_state()?.reg.take_events())
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

/// A quota in bytes as whole slots of `block_size` bytes.
fn quota_slots(q: namespaces::Quota, block_size: usize) -> [u32; 2] {
    q.map(|b| {
        b.map_or(NO_QUOTA, |b| {
            (b / block_size as u64).min(NO_QUOTA as u64 - 1) as u32
        })
    })
}

#[cfg(test)]
mod tests;
