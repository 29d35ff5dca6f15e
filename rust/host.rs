//! The host tier: one anonymous mapping of fixed-size slots, bound to a NUMA
//! node with `mbind`, populated by several threads pinned to that node's
//! CPUs, locked with `mlock`, and checked with `move_pages`.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::align::round_up;
use crate::error::{errno_name, Error, Result};
use crate::io::{self, SendPtr};
use crate::numa;

const HUGE: usize = 2 << 20;

pub use crate::settings::Pin;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Bind,
    Preferred,
    None,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Bind => "bind",
            Policy::Preferred => "preferred",
            Policy::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostOptions {
    pub numa_node: Option<usize>,
    pub pin: Pin,
    /// Threads that populate the pages (0: one per allowed CPU of the node).
    pub populate_threads: usize,
    /// Threads for copies in and out (0: one per allowed CPU).
    pub copy_threads: usize,
    /// Nice value of the copy threads.
    pub worker_nice: u32,
    pub huge_pages: bool,
    /// Slot alignment (a power of two, at least 64).
    pub alignment: usize,
    pub sysfs_root: PathBuf,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            numa_node: None,
            pin: Pin::Auto,
            populate_threads: 0,
            copy_threads: 0,
            worker_nice: crate::settings::default_int("worker_nice") as u32,
            huge_pages: true,
            alignment: 4096,
            sysfs_root: PathBuf::from("/sys"),
        }
    }
}

/// An anonymous mapping, unmapped when the last owner drops it. Views
/// exported to Python hold an `Arc<Region>`, so memory a live view points to
/// is never unmapped.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    locked: AtomicBool,
}

// SAFETY: the mapping is plain memory; synchronisation of its contents is the
// users' business (slots are handed out by the manager, one writer each).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map_aligned`; no
        // reference to it can outlive the last Arc<Region>.
        unsafe {
            if self.locked.load(Ordering::Relaxed) {
                libc::munlock(self.ptr.cast(), self.len);
            }
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// mmap `len` bytes whose start is aligned to `align` (trimming the excess).
fn map_aligned(len: usize, align: usize) -> Result<*mut u8> {
    let total = len + align;
    // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(Error::Capacity(format!(
            "cannot map {len} bytes for the host tier: {e}; use fewer host blocks"
        )));
    }
    let start = raw as usize;
    let aligned = round_up(start, align);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: trimming parts of our own fresh mapping.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned as *mut u8)
}

/// The pieces the copies between slots and the caller's memory are cut
/// into (one per worker at a time).
const COPY_PIECE: usize = 1 << 20;

/// Bytes copied then summed at a time by [`HostStorage::copy_slots_summed`]:
/// small enough to be still in the core's cache (L2) when summed, large
/// enough for the copy's streaming stores.
const SUM_RUN: usize = 64 << 10;

pub struct HostStorage {
    region: RwLock<Option<Arc<Region>>>,
    num_blocks: u64,
    block_size: usize,
    stride: usize,
    numa_node: Option<usize>,
    policy: Policy,
    pinned: bool,
    huge_pages: bool,
    populate_threads: usize,
    copy_threads: usize,
    worker_nice: u32,
    pool: RwLock<Option<crate::io::Pool>>,
    fork: crate::process::ForkGuard,
    warnings: crate::error::Warnings,
    pub populate_seconds: f64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

fn thp_available(sysfs: &std::path::Path) -> bool {
    std::fs::read_to_string(sysfs.join("kernel/mm/transparent_hugepage/enabled"))
        .map(|s| s.contains("[always]") || s.contains("[madvise]"))
        .unwrap_or(false)
}

/// Bind `ptr..ptr+len` to `node`: `MPOL_BIND`, else `MPOL_PREFERRED` (a
/// warning), else no policy (a warning saying why that may be).
///
/// # Safety
/// `ptr..ptr+len` is the caller's own mapping.
unsafe fn bind_to_node(
    ptr: *mut u8,
    len: usize,
    node: usize,
    warnings: &mut Vec<String>,
) -> Policy {
    // SAFETY: forwarded from the caller.
    let bind = unsafe { numa::mbind(ptr, len, numa::MPOL_BIND, node) };
    let Err(e1) = bind else {
        return Policy::Bind;
    };
    // SAFETY: as above; only tried when bind failed.
    match unsafe { numa::mbind(ptr, len, numa::MPOL_PREFERRED, node) } {
        Ok(()) => {
            warnings.push(format!(
                "mbind(MPOL_BIND, node {node}) failed with {}; using MPOL_PREFERRED",
                errno_name(e1)
            ));
            Policy::Preferred
        }
        Err(e2) => {
            warnings.push(format!(
                "mbind to node {node} failed ({} for bind, {} for preferred); \
                 the host tier has no NUMA policy (the container may lack CAP_SYS_NICE \
                 or block mbind with seccomp)",
                errno_name(e1),
                errno_name(e2)
            ));
            Policy::None
        }
    }
}

/// The CPUs that populate the tier: the allowed CPUs of its node, or every
/// allowed CPU (with a warning when the node has none in this cpuset).
fn populate_cpus(allowed: &[usize], opts: &HostOptions, warnings: &mut Vec<String>) -> Vec<usize> {
    let Some(n) = opts.numa_node else {
        return allowed.to_vec();
    };
    let nc = numa::node_cpus(&opts.sysfs_root, n);
    let cpus: Vec<usize> = allowed.iter().copied().filter(|c| nc.contains(c)).collect();
    if !cpus.is_empty() {
        return cpus;
    }
    warnings.push(format!(
        "no CPU of node {n} is in this process's cpuset; populating from the allowed \
         CPUs (pages still follow the memory policy)"
    ));
    allowed.to_vec()
}

/// `mlock` the region: true when pinned. When the limits forbid it, a
/// warning naming the limit, the size and the fix, or with
/// `pin="require"` an error.
fn pin_region(region: &Region, pin: Pin, warnings: &mut Vec<String>) -> Result<bool> {
    let (ptr, map_len) = (region.ptr, region.len);
    let (soft, _hard) = numa::memlock_limit();
    let cap = numa::has_capability(numa::CAP_IPC_LOCK);
    let fix = "run the container with --ulimit memlock=-1 (or `ulimit -l unlimited`), \
               or grant CAP_IPC_LOCK (--cap-add IPC_LOCK)";
    let problem = if !cap && soft != u64::MAX && (map_len as u64) > soft {
        format!(
            "cannot pin the host tier: it needs {map_len} bytes locked but \
             RLIMIT_MEMLOCK is {soft} bytes and the process lacks CAP_IPC_LOCK"
        )
    } else {
        // SAFETY: the region's own mapping.
        if unsafe { libc::mlock(ptr.cast(), map_len) } == 0 {
            region.locked.store(true, Ordering::Relaxed);
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        format!(
            "cannot pin the host tier: mlock of {map_len} bytes failed with {} ({e}); \
             RLIMIT_MEMLOCK is {}",
            errno_name(e.raw_os_error().unwrap_or(0)),
            if soft == u64::MAX {
                "unlimited".to_string()
            } else {
                format!("{soft} bytes")
            }
        )
    };
    if pin == Pin::Require {
        return Err(Error::Pin(format!(
            "{problem}; pin=\"require\" was asked. Fix: {fix}"
        )));
    }
    warnings.push(format!("{problem}; running unpinned. Fix: {fix}"));
    Ok(false)
}

impl HostStorage {
    /// Nice value of the copy threads.
    pub fn worker_nice(&self) -> u32 {
        self.worker_nice
    }

    pub fn new(num_blocks: u64, block_size: usize, opts: &HostOptions) -> Result<Self> {
        crate::settings::check_int("alignment", opts.alignment as u64)?;
        crate::settings::check_usize("populate_threads", opts.populate_threads)?;
        crate::settings::check_usize("copy_threads", opts.copy_threads)?;
        crate::settings::check_int("worker_nice", opts.worker_nice as u64)?;
        let stride = crate::align::round_up_checked(block_size, opts.alignment)?;
        let len = crate::settings::check_tier(num_blocks, block_size, stride)? as usize;
        let mut warnings = Vec::new();
        let nodes = numa::memory_nodes(&opts.sysfs_root)?;
        if let Some(n) = opts.numa_node {
            if !nodes.contains(&n) {
                return Err(Error::Numa(format!(
                    "NUMA node {n} does not exist or has no memory; nodes with memory: {nodes:?}"
                )));
            }
        }
        // Reserve-check against MemAvailable would be racy; mmap with
        // NORESERVE and let population report ENOMEM clearly.
        let use_huge = opts.huge_pages && len >= HUGE && thp_available(&opts.sysfs_root);
        // Slots are aligned to `alignment` only if the mapping's start is.
        let align = if use_huge {
            HUGE.max(opts.alignment)
        } else {
            opts.alignment.max(4096)
        };
        let map_len = round_up(len, if use_huge { HUGE } else { 4096 });
        let ptr = map_aligned(map_len, align)?;
        let region = Arc::new(Region {
            ptr,
            len: map_len,
            locked: AtomicBool::new(false),
        });
        if use_huge {
            // SAFETY: advisory call on our own mapping.
            unsafe { libc::madvise(ptr.cast(), map_len, libc::MADV_HUGEPAGE) };
        }

        let policy = match opts.numa_node {
            // SAFETY: `ptr..ptr+map_len` is our own fresh mapping.
            Some(node) => unsafe { bind_to_node(ptr, map_len, node, &mut warnings) },
            None => Policy::None,
        };

        // Populate with several threads pinned to the node's CPUs.
        let allowed = numa::allowed_cpus();
        let cpus = populate_cpus(&allowed, opts, &mut warnings);
        let threads = if opts.populate_threads == 0 {
            cpus.len().max(1)
        } else {
            opts.populate_threads
        };
        let t0 = std::time::Instant::now();
        populate(&region, threads, &cpus)?;
        let populate_seconds = t0.elapsed().as_secs_f64();

        let pinned = opts.pin != Pin::Off && pin_region(&region, opts.pin, &mut warnings)?;
        let copy_threads = if opts.copy_threads == 0 {
            allowed.len().max(1)
        } else {
            opts.copy_threads
        };
        Ok(HostStorage {
            region: RwLock::new(Some(region)),
            num_blocks,
            block_size,
            stride,
            numa_node: if policy == Policy::None {
                None
            } else {
                opts.numa_node
            },
            policy,
            pinned,
            huge_pages: use_huge,
            populate_threads: threads,
            copy_threads,
            worker_nice: opts.worker_nice,
            pool: RwLock::new(io::pool(copy_threads, "dynblock-copy", opts.worker_nice)),
            fork: crate::process::ForkGuard::new("HostStorage"),
            warnings: crate::error::Warnings::new(warnings),
            populate_seconds,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        })
    }

    /// The mapping (kept alive by the returned Arc), or Closed.
    pub fn region(&self) -> Result<Arc<Region>> {
        self.fork.check()?;
        self.region
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed("HostStorage"))
    }

    /// Address of a slot inside `region`.
    pub fn slot_ptr(&self, region: &Region, slot: u64) -> *mut u8 {
        debug_assert!(slot < self.num_blocks);
        // SAFETY: slot < num_blocks, so the offset is inside the mapping.
        unsafe { region.ptr().add(slot as usize * self.stride) }
    }

    pub fn slot_offset(&self, slot: u64) -> usize {
        slot as usize * self.stride
    }

    fn validate(&self, slots: &[u64], buf_len: usize) -> Result<()> {
        crate::error::check_batch_len("buffer", buf_len, slots.len(), "blocks", self.block_size)?;
        if let Some((i, s)) = slots
            .iter()
            .enumerate()
            .find(|(_, &s)| s >= self.num_blocks)
        {
            return Err(Error::Index(format!(
                "slot id {s} at position {i} is out of range: this storage has slots 0..{}",
                self.num_blocks
            )));
        }
        Ok(())
    }

    /// Copy blocks in (`into_slots`) or out, in parallel.
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes (reads when copying in, writes
    /// when copying out) and not overlap the host region.
    pub unsafe fn copy_raw(
        &self,
        slots: &[u64],
        buf: *mut u8,
        len: usize,
        into_slots: bool,
    ) -> Result<()> {
        self.validate(slots, len)?;
        if into_slots && slots.len() > 1 {
            let mut s = slots.to_vec();
            s.sort_unstable();
            if let Some(w) = s.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::InvalidArgument(format!(
                    "slot id {} appears more than once in one write batch",
                    w[0]
                )));
            }
        }
        let region = self.region()?;
        let bs = self.block_size;
        let base = buf as usize;
        // SAFETY: forwarded from the caller; slots validated.
        unsafe { self.copy_slots(&region, slots, |i| base + i * bs, into_slots) };
        let ctr = if into_slots {
            &self.bytes_in
        } else {
            &self.bytes_out
        };
        ctr.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Copy block `i` between slot `slots[i]` and memory at `addr_of(i)`,
    /// in parallel pieces of at most 1 MiB.
    ///
    /// # Safety
    /// Slots must be in range; every `addr_of(i)` must be valid for
    /// block_size bytes (read when `into_slots`, written otherwise), must not
    /// overlap the slots written, and destinations must not overlap each other.
    pub unsafe fn copy_slots(
        &self,
        region: &Region,
        slots: &[u64],
        addr_of: impl Fn(usize) -> usize + Sync,
        into_slots: bool,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_pieces(region, slots, &addr_of, into_slots, None) };
    }

    /// [`Self::copy_slots`], also returning each block's checksum
    /// ([`crate::checksum::block_crc`] with hash `hash_of(i)`), computed on
    /// the way: each piece is copied in runs of [`SUM_RUN`] bytes and each
    /// run summed right after its copy read it, while its bytes are in the
    /// CPU cache (a separate pass later would read them from memory again).
    ///
    /// # Safety
    /// As [`Self::copy_slots`].
    pub unsafe fn copy_slots_summed(
        &self,
        region: &Region,
        slots: &[u64],
        addr_of: impl Fn(usize) -> usize + Sync,
        into_slots: bool,
        hash_of: impl Fn(usize) -> u64 + Sync,
    ) -> Vec<u32> {
        let per_block = self.block_size.div_ceil(COPY_PIECE);
        let sums: Vec<AtomicU32> = (0..slots.len() * per_block)
            .map(|_| AtomicU32::new(0))
            .collect();
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_pieces(region, slots, &addr_of, into_slots, Some((&hash_of, &sums))) };
        let piece_len = |p: usize| COPY_PIECE.min(self.block_size - p * COPY_PIECE);
        (0..slots.len())
            .map(|b| {
                let of = |p: usize| sums[b * per_block + p].load(Ordering::Relaxed);
                (1..per_block).fold(of(0), |acc, p| {
                    crate::checksum::crc32c_combine(acc, of(p), piece_len(p))
                })
            })
            .collect()
    }

    /// The copy of [`Self::copy_slots`]; with `sums`, each piece's CRC32C
    /// (a block's first piece starts with its hash) stored at the piece's
    /// index.
    ///
    /// # Safety
    /// As [`Self::copy_slots`].
    #[allow(clippy::type_complexity)]
    unsafe fn copy_pieces(
        &self,
        region: &Region,
        slots: &[u64],
        addr_of: &(dyn Fn(usize) -> usize + Sync),
        into_slots: bool,
        sums: Option<(&(dyn Fn(usize) -> u64 + Sync), &[AtomicU32])>,
    ) {
        let bs = self.block_size;
        let per_block = bs.div_ceil(COPY_PIECE);
        let n = slots.len() * per_block;
        let total = slots.len() * bs;
        let threads = if total < (2 << 20) {
            1
        } else {
            self.copy_threads
        };
        let base = SendPtr(region.ptr());
        let stride = self.stride;
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner());
        let _ = io::run_on(
            pool.as_ref(),
            n,
            threads,
            || Ok(()),
            |i, _| {
                let (b, p) = (i / per_block, i % per_block);
                let off = p * COPY_PIECE;
                let cnt = COPY_PIECE.min(bs - off);
                // SAFETY: block b's piece p lies inside slot slots[b] and inside
                // the caller's memory at addr_of(b) (caller's contract); pieces
                // are disjoint.
                let h = unsafe { base.get().add(slots[b] as usize * stride + off) };
                let u = (addr_of(b) + off) as *mut u8;
                let Some((hash_of, out)) = sums else {
                    // SAFETY: as above.
                    unsafe {
                        if into_slots {
                            io::stream_copy(h, u, cnt);
                        } else {
                            io::stream_copy(u, h, cnt);
                        }
                    }
                    return Ok(());
                };
                let mut d = if p == 0 {
                    crate::checksum::block_crc_start(hash_of(b))
                } else {
                    crate::checksum::crc_start()
                };
                let (src, dst) = if into_slots {
                    (u as *const u8, h)
                } else {
                    (h as *const u8, u)
                };
                let mut at = 0;
                while at < cnt {
                    let run = SUM_RUN.min(cnt - at);
                    // SAFETY: as above, and the run lies inside the piece; the
                    // source is only read.
                    unsafe {
                        io::stream_copy(dst.add(at), src.add(at), run);
                        d.update(std::slice::from_raw_parts(src.add(at), run));
                    }
                    at += run;
                }
                out[i].store(d.finalize() as u32, Ordering::Relaxed);
                Ok(())
            },
        );
    }

    pub fn write_blocks(&self, slots: &[u64], src: &[u8]) -> Result<()> {
        // SAFETY: src is a valid slice; it is only read.
        unsafe { self.copy_raw(slots, src.as_ptr() as *mut u8, src.len(), true) }
    }

    pub fn read_blocks(&self, slots: &[u64], dst: &mut [u8]) -> Result<()> {
        // SAFETY: dst is a valid exclusive slice.
        unsafe { self.copy_raw(slots, dst.as_mut_ptr(), dst.len(), false) }
    }

    /// Pages per NUMA node as the kernel reports them (-1: not resident).
    pub fn placement(&self) -> Result<BTreeMap<i64, u64>> {
        let r = self.region()?;
        // SAFETY: page size query.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: our own mapping, alive through `r`.
        unsafe { numa::placement(r.ptr(), r.len(), page) }
    }

    /// Release the memory (once no view points to it) and stop the copy
    /// threads at once. Idempotent.
    pub fn close(&self) {
        self.region
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.pool.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn is_closed(&self) -> bool {
        self.region
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings.take()
    }
    /// The slots: how many, their block size, their stride.
    pub fn layout(&self) -> crate::align::SlotLayout {
        crate::align::SlotLayout {
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            stride: self.stride,
        }
    }
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn slot_stride(&self) -> usize {
        self.stride
    }
    pub fn numa_node(&self) -> Option<usize> {
        self.numa_node
    }
    pub fn policy(&self) -> Policy {
        self.policy
    }
    pub fn pinned(&self) -> bool {
        self.pinned
    }
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }
    pub fn populate_threads(&self) -> usize {
        self.populate_threads
    }
    pub fn nbytes(&self) -> usize {
        self.num_blocks as usize * self.stride
    }
}

/// Fault every page in, `threads` at once, each pinned to one of `cpus`.
/// Uses MADV_POPULATE_WRITE (Linux 5.14+) and falls back to touching pages.
fn populate(region: &Region, threads: usize, cpus: &[usize]) -> Result<()> {
    let len = region.len();
    let unit = HUGE;
    let chunks = len.div_ceil(unit);
    let per = chunks.div_ceil(threads.max(1));
    let base = SendPtr(region.ptr());
    let failed: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for t in 0..threads.max(1) {
            let (c0, c1) = (t * per, ((t + 1) * per).min(chunks));
            if c0 >= c1 {
                continue;
            }
            let cpu = cpus.get(t % cpus.len().max(1)).copied();
            let failed = &failed;
            s.spawn(move || {
                if let Some(c) = cpu {
                    numa::pin_thread_to(c);
                }
                let start = c0 * unit;
                let end = (c1 * unit).min(len);
                // SAFETY: start..end is inside our mapping.
                let p = unsafe { base.get().add(start) };
                const MADV_POPULATE_WRITE: i32 = 23;
                // SAFETY: advisory call on a range of our own mapping.
                let rc = unsafe { libc::madvise(p.cast(), end - start, MADV_POPULATE_WRITE) };
                if rc == 0 {
                    return;
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOMEM) || e.raw_os_error() == Some(libc::EFAULT)
                {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                        "cannot populate the host tier ({e}): not enough memory on this \
                         node/cgroup for {len} bytes; use fewer host blocks"
                    ));
                    return;
                }
                // Older kernels: touch one byte per page.
                let mut off = 0;
                while off < end - start {
                    // SAFETY: inside our mapping; writing a zero over zero.
                    unsafe { std::ptr::write_volatile(p.add(off), 0) };
                    off += 4096;
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(m) => Err(Error::Capacity(m)),
        None => Ok(()),
    }
}

/// Single-threaded first touch of a fresh mapping of `len` bytes with the
/// same huge-page advice: the bench's baseline for population.
pub fn single_thread_touch_seconds(len: usize, huge_pages: bool) -> Result<f64> {
    let use_huge = huge_pages && len >= HUGE;
    let map_len = round_up(len, if use_huge { HUGE } else { 4096 });
    let ptr = map_aligned(map_len, if use_huge { HUGE } else { 4096 })?;
    let region = Region {
        ptr,
        len: map_len,
        locked: AtomicBool::new(false),
    };
    if use_huge {
        // SAFETY: advisory call on our own mapping.
        unsafe { libc::madvise(ptr.cast(), map_len, libc::MADV_HUGEPAGE) };
    }
    let t0 = std::time::Instant::now();
    let mut off = 0;
    while off < map_len {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile(region.ptr().add(off), 0) };
        off += 4096;
    }
    Ok(t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_placement() {
        let h = HostStorage::new(
            8,
            5000,
            &HostOptions {
                numa_node: Some(0),
                pin: Pin::Off,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(h.slot_stride(), 8192);
        let src: Vec<u8> = (0..3 * 5000).map(|i| (i % 253) as u8).collect();
        h.write_blocks(&[7, 0, 3], &src).unwrap();
        let mut dst = vec![0u8; src.len()];
        h.read_blocks(&[7, 0, 3], &mut dst).unwrap();
        assert_eq!(src, dst);
        let p = h.placement().unwrap();
        assert!(p.get(&0).copied().unwrap_or(0) > 0, "{p:?}");
        assert!(matches!(
            h.read_blocks(&[8], &mut vec![0u8; 5000]),
            Err(Error::Index(_))
        ));
    }

    #[test]
    fn a_summed_copy_in_or_out_gives_each_blocks_checksum() {
        // One piece (a run and a part), and pieces of 1 MiB with a short last one.
        for (bs, threads) in [(5000, 1), ((2 << 20) + 8192, 2)] {
            let h = HostStorage::new(
                4,
                bs,
                &HostOptions {
                    pin: Pin::Off,
                    copy_threads: threads,
                    ..Default::default()
                },
            )
            .unwrap();
            let src: Vec<u8> = (0..3 * bs).map(|i| (i * 31 % 251) as u8).collect();
            let region = h.region().unwrap();
            let slots = [3u64, 0, 2];
            let base = src.as_ptr() as usize;
            // SAFETY: slots in range; src holds three blocks and is only read.
            let sums_in = unsafe {
                h.copy_slots_summed(&region, &slots, |i| base + i * bs, true, |i| 100 + i as u64)
            };
            let mut dst = vec![0u8; src.len()];
            let out = dst.as_mut_ptr() as usize;
            // SAFETY: slots in range; dst holds three blocks, written only here.
            let sums_out = unsafe {
                h.copy_slots_summed(&region, &slots, |i| out + i * bs, false, |i| 100 + i as u64)
            };
            assert_eq!(src, dst);
            for (i, (a, b)) in sums_in.iter().zip(&sums_out).enumerate() {
                let want = crate::checksum::block_crc(100 + i as u64, &src[i * bs..(i + 1) * bs]);
                assert_eq!((*a, *b), (want, want), "bs {bs} block {i}");
            }
        }
    }

    #[test]
    fn missing_node_is_refused() {
        let r = HostStorage::new(
            1,
            4096,
            &HostOptions {
                numa_node: Some(999),
                ..Default::default()
            },
        );
        assert!(matches!(r, Err(Error::Numa(_))));
    }
}
