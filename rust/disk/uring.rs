//! The disk tier's io_uring engine: the calling thread keeps `io_depth`
//! operations in flight through one ring and reaps their completions itself,
//! so a batch of small blocks costs one system call per handful of I/Os and
//! no thread wake-ups (the worker pool pays a wake-up and a context switch
//! per I/O, which is most of its CPU at 64 KiB).
//!
//! It carries only what it is fastest at: direct I/O straight between the
//! caller's aligned memory and unpadded slots. Anything else, and any
//! operation the kernel did not finish whole (an error, a short transfer, a
//! refused O_DIRECT), goes through the batch engine's synchronous path
//! ([`DiskStorage::do_group`]), which owns the fallback and the error
//! messages. Before the call returns, every operation it submitted has
//! completed: the kernel never touches the caller's memory afterwards.
#![allow(unsafe_code)]

use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, squeue, types, IoUring};

use super::batch::{Hook, Worker};
use super::os::Dir;
use super::DiskStorage;
use crate::error::Result;
use crate::io::Op;

/// Rings kept for the next batch (one per batch running at once, at most
/// [`Rings::KEEP`] kept idle), and the memory registered with them.
pub(super) struct Rings {
    entries: u32,
    idle: Mutex<Vec<Held>>,
    regs: Mutex<Regs>,
    /// A ring used for no I/O that holds the registrations (of the
    /// generation given): the others clone its buffer table (Linux 6.12),
    /// which shares the pinned pages instead of pinning them again.
    source: Mutex<Option<(IoUring, u64)>>,
    /// The kernel has `READV_FIXED`/`WRITEV_FIXED` (Linux 6.15): a run of
    /// adjacent slots in registered memory is one fixed vectored I/O.
    vectored_fixed: bool,
    /// I/Os that went through registered buffers.
    fixed_ios: AtomicU64,
    /// Some memory is registered (read without the lock, per batch).
    any: std::sync::atomic::AtomicBool,
}

/// Memory registered with the rings ([`Rings::register`]).
#[derive(Default)]
struct Regs {
    /// Changes with every registration and removal.
    gen: u64,
    next_id: u64,
    /// (id, its pieces as (address, length)): each piece one buffer of
    /// every ring's table.
    regions: Vec<(u64, Vec<(usize, usize)>)>,
    /// Why the last buffer left unregistered was (huge pages, or the
    /// kernel refused to pin it).
    skipped: Option<String>,
}

impl Regs {
    /// The regions changed: a new generation, and `any` says whether some
    /// memory is registered.
    fn changed(&mut self, any: &std::sync::atomic::AtomicBool) {
        self.gen += 1;
        any.store(!self.regions.is_empty(), Ordering::Relaxed);
    }

    fn table(&self) -> Vec<(usize, usize)> {
        let mut t: Vec<(usize, usize)> = self
            .regions
            .iter()
            .flat_map(|r| r.1.iter().copied())
            .collect();
        t.truncate(MAX_BUFFERS);
        t
    }
}

/// A ring and the buffers it has registered (their indices are its table's).
struct Held {
    ring: IoUring,
    /// The registrations' generation the table is of (None: never synced).
    gen: Option<u64>,
    table: Vec<(usize, usize)>,
}

/// Buffers one ring may register (the kernel's limit).
const MAX_BUFFERS: usize = 1 << 14;
/// Bytes of one registered buffer at most (the kernel's limit).
const MAX_BUFFER_BYTES: usize = 1 << 30;

impl Rings {
    const KEEP: usize = 4;

    /// Rings of room for `depth` operations in flight. Err: the kernel
    /// refuses io_uring (too old, `kernel.io_uring_disabled`, a seccomp
    /// filter), with its reason; one ring is made to find out and kept.
    pub(super) fn new(depth: usize) -> std::io::Result<Self> {
        let entries = (depth.clamp(1, 4096) as u32).next_power_of_two();
        let first = IoUring::new(entries)?;
        let mut probe = io_uring::Probe::new();
        let vectored_fixed = first.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        Ok(Rings {
            entries,
            idle: Mutex::new(vec![Held {
                ring: first,
                gen: None,
                table: Vec::new(),
            }]),
            regs: Mutex::new(Regs::default()),
            source: Mutex::new(None),
            vectored_fixed,
            fixed_ios: AtomicU64::new(0),
            any: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn take(&self) -> std::io::Result<Held> {
        let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut h = match kept {
            Some(h) => h,
            None => Held {
                ring: IoUring::new(self.entries)?,
                gen: None,
                table: Vec::new(),
            },
        };
        self.sync(&mut h);
        Ok(h)
    }

    fn give(&self, mut h: Held) {
        // A ring back from a batch drops registrations removed meanwhile
        // now, rather than keep their pages pinned until its next batch.
        self.sync(&mut h);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < Self::KEEP {
            idle.push(h);
        }
    }

    /// Bring `h`'s registered buffers up to date with the registrations.
    fn sync(&self, h: &mut Held) {
        let (gen, table) = {
            let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
            if h.gen == Some(r.gen) {
                return;
            }
            (r.gen, r.table())
        };
        if !h.table.is_empty() || h.gen.is_none() {
            // ENXIO when it has none: nothing to undo.
            let _ = h.ring.submitter().unregister_buffers();
        }
        h.table.clear();
        if !table.is_empty() {
            match self.clone_into(&h.ring, gen, &table) {
                Ok(()) => h.table = table,
                Err(e) => {
                    let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
                    r.skipped = Some(format!("the kernel refused to register: {e}"));
                }
            }
        }
        h.gen = Some(gen);
    }

    /// Give `ring` (with no buffers registered) the buffers of `table`
    /// (generation `gen`): cloned from the source ring, registered there
    /// first when it is of another generation; registered on `ring` itself
    /// where the kernel cannot clone (before 6.12).
    fn clone_into(
        &self,
        ring: &IoUring,
        gen: u64,
        table: &[(usize, usize)],
    ) -> std::io::Result<()> {
        let iov = iovecs(table);
        let src = self.source_at(gen, &iov)?;
        let (s, _) = src.as_ref().expect("source_at sets it");
        match ring.submitter().register_buffers_clone(s.as_raw_fd()) {
            Ok(()) => Ok(()),
            // SAFETY: the pieces stay mapped while registered (see `source_at`).
            Err(_) => unsafe { ring.submitter().register_buffers(&iov) },
        }
    }

    /// The source ring, holding `iov` (generation `gen`) registered: made
    /// or registered again when it is of another generation.
    fn source_at(
        &self,
        gen: u64,
        iov: &[libc::iovec],
    ) -> std::io::Result<std::sync::MutexGuard<'_, Option<(IoUring, u64)>>> {
        // Every registration of these pieces: each is memory a caller of
        // `register` promised stays mapped until its `unregister`, which
        // syncs the source and the idle rings (a ring in use syncs when it
        // comes back) before it returns; the kernel pins the pages meanwhile.
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(src.as_ref(), Some(s) if s.1 == gen) {
            let fresh = match src.take() {
                Some((r, _)) => {
                    let _ = r.submitter().unregister_buffers();
                    r
                }
                None => IoUring::new(1)?,
            };
            // SAFETY: the pieces stay mapped while registered (see above).
            unsafe { fresh.submitter().register_buffers(iov) }?;
            *src = Some((fresh, gen));
        }
        Ok(src)
    }

    /// Register `len` bytes at `addr` with every ring (in pieces of whole
    /// `unit`s, each at most 1 GiB); its id for [`Self::unregister`]. None
    /// for memory on huge pages ([`huge_pages_in`]), left as it is, and
    /// where the kernel refuses to pin it; the reason is kept either way.
    ///
    /// # Safety
    /// The memory stays mapped (and is not moved) until `unregister(id)`
    /// returns.
    pub(super) unsafe fn register(&self, addr: usize, len: usize, unit: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        if let Some(why) = huge_pages_in(addr, len, &smaps) {
            let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
            r.skipped = Some(format!("a buffer of {len} bytes is not registered: {why}"));
            return None;
        }
        let unit = unit.max(1);
        let piece = (MAX_BUFFER_BYTES / unit).max(1) * unit;
        let pieces: Vec<(usize, usize)> = (0..len)
            .step_by(piece)
            .map(|o| (addr + o, piece.min(len - o)))
            .collect();
        let (id, gen, table) = {
            let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
            r.next_id += 1;
            let id = r.next_id;
            r.regions.push((id, pieces));
            r.changed(&self.any);
            (id, r.gen, r.table())
        };
        // The kernel pins the pages now, on the source ring: a refusal
        // (RLIMIT_MEMLOCK without CAP_IPC_LOCK) takes the registration back.
        let refused = self.source_at(gen, &iovecs(&table)).err();
        if let Some(e) = refused {
            let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
            r.regions.retain(|x| x.0 != id);
            r.changed(&self.any);
            r.skipped = Some(format!(
                "the kernel refused to register a buffer of {len} bytes: {e}"
            ));
            drop(r);
            self.sync_idle();
            return None;
        }
        self.sync_idle();
        Some(id)
    }

    /// Forget registrations `ids` (one new generation for them all); how
    /// many there were. No ring uses them once this returns, except a batch
    /// running now (whose memory the caller still holds).
    pub(super) fn unregister(&self, ids: &[u64]) -> usize {
        let found = {
            let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
            let before = r.regions.len();
            r.regions.retain(|x| !ids.contains(&x.0));
            let found = before - r.regions.len();
            if found > 0 {
                r.changed(&self.any);
            }
            found
        };
        if found > 0 {
            self.sync_idle();
        }
        found
    }

    fn sync_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for h in idle.iter_mut() {
            self.sync(h);
        }
        drop(idle);
        // The source lets go of pages no registration holds any more.
        let gen = self.regs.lock().unwrap_or_else(|p| p.into_inner()).gen;
        let mut src = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if src.as_ref().is_some_and(|s| s.1 != gen) {
            *src = None; // dropping the ring unregisters its buffers
        }
    }

    /// Whether any memory is registered.
    pub(super) fn any_registered(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Bytes registered, I/Os through registered buffers, and why a buffer
    /// was left unregistered or the kernel refused one (None: neither).
    pub(super) fn registered(&self) -> (u64, u64, Option<String>) {
        let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = r
            .regions
            .iter()
            .flat_map(|x| x.1.iter())
            .map(|p| p.1 as u64)
            .sum();
        (
            bytes,
            self.fixed_ios.load(Ordering::Relaxed),
            r.skipped.clone(),
        )
    }
}

/// Why memory at `addr..addr + len` is better left unregistered (None: it
/// is on small pages, where registering pays): from `/proc/self/smaps`,
/// a mapping of it on huge pages (`KernelPageSize` over 4 kB: hugetlbfs)
/// or that may get transparent huge pages (`THPeligible: 1`). Pinning large
/// folios per I/O is cheap, and registering them measured costlier here
/// (see ARCHITECTURE).
pub(super) fn huge_pages_in(addr: usize, len: usize, smaps: &str) -> Option<String> {
    let end = addr.saturating_add(len);
    let mut overlaps = false;
    let mut seen = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                overlaps = a < end && addr < b;
                seen |= overlaps;
                continue;
            }
        }
        if !overlaps {
            continue;
        }
        let mut kv = line.split_whitespace();
        match (kv.next(), kv.next()) {
            (Some("KernelPageSize:"), Some(kb)) if kb != "4" => {
                return Some(format!("it is on {kb} kB pages"));
            }
            (Some("THPeligible:"), Some("1")) => {
                return Some("it may be on transparent huge pages (THPeligible)".into());
            }
            _ => {}
        }
    }
    (!seen).then(|| "it is not mapped in this process".to_string())
}

/// `table`'s pieces as the kernel takes them.
fn iovecs(table: &[(usize, usize)]) -> Vec<libc::iovec> {
    table
        .iter()
        .map(|&(a, l)| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: l,
        })
        .collect()
}

/// The index of the buffer in `table` that holds every segment of `iov`.
fn fixed_index(table: &[(usize, usize)], iov: &[libc::iovec]) -> Option<u16> {
    table
        .iter()
        .position(|&(a, l)| {
            iov.iter().all(|v| {
                let b = v.iov_base as usize;
                b >= a && b + v.iov_len <= a + l
            })
        })
        .and_then(|i| u16::try_from(i).ok())
}

/// A ring taken for one batch. Dropped, also while unwinding, it first
/// waits for every operation in flight, so the kernel never touches the
/// caller's memory once the call is gone; then a healthy ring goes back.
struct Flight<'r> {
    rings: &'r Rings,
    /// Always Some until the drop gives it back.
    ring: Option<Held>,
    /// Operations pushed and not yet reaped.
    inflight: usize,
    /// `io_uring_enter` failed other than "try again": push nothing more,
    /// drop the ring at the end.
    broken: bool,
    /// Such failures in a row.
    failures: u32,
}

impl Flight<'_> {
    /// Such failures in a row after which the process stops (10 s): the
    /// kernel would not take the operations already pushed, and returning
    /// would leave it free to write into memory the caller reuses.
    const GIVE_UP: u32 = 10_000;

    fn ring(&mut self) -> &mut IoUring {
        &mut self.ring.as_mut().expect("held until dropped").ring
    }

    /// Hand what was pushed to the kernel; with `wait`, also wait for at
    /// least one completion.
    fn submit(&mut self, wait: bool) {
        let r = if wait {
            self.ring().submit_and_wait(1)
        } else {
            self.ring().submit()
        };
        match r {
            Ok(_) => self.failures = 0,
            Err(e) if transient(&e) => {}
            Err(e) => {
                // What the kernel took still completes and is posted whatever
                // this call said; look again shortly.
                self.broken = true;
                self.failures += 1;
                if self.failures >= Self::GIVE_UP {
                    eprintln!(
                        "dynblock: io_uring_enter keeps failing ({e}) with disk I/O in flight; \
                         stopping the process rather than return while the kernel may still \
                         write into the caller's memory"
                    );
                    std::process::abort();
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// What completed since the last look: (group, result).
    fn reap(&mut self) -> Vec<(usize, i32)> {
        let done: Vec<(usize, i32)> = self
            .ring()
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        self.inflight -= done.len();
        done
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        while self.inflight > 0 {
            self.submit(true);
            self.reap();
        }
        if let (false, Some(ring)) = (self.broken, self.ring.take()) {
            self.rings.give(ring);
        }
    }
}

/// Bytes of verified reads in flight at most (at least two operations): the
/// reads that complete last are checked after the device is done, so what is
/// in flight then is the call's tail. Measured (2 MiB blocks, 32 MiB
/// batches, 16 in flight): 0.86x of unverified reads with the whole batch in
/// flight, 0.92-0.95x with 8 MiB (4 and 16 MiB: no better), whose tail of
/// four blocks the free cores sum together ([`DiskStorage::verify`]). That
/// disk (virtio) shares its rate among the I/Os in flight, so a window's
/// reads complete together, in waves; its rate is the same with 2 to 16 in
/// flight, and the last wave's sum (~0.45 ms of a 19 ms batch) is the cost
/// left.
const VERIFY_WINDOW: usize = 8 << 20;

/// Bytes of completed reads worth waking pool threads to check alongside
/// the caller (a wake-up costs tens of microseconds; CRC32C reads about a
/// MiB in a hundred).
const SHARE_FROM: usize = 1 << 20;

/// Whether `e` from `io_uring_enter` only asks to try again.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

impl DiskStorage {
    /// Run a sorted, grouped batch through a ring. False: no ring could be
    /// had (nothing was done; the caller runs the batch on the pool).
    ///
    /// # Safety
    /// Every op's memory is valid for op.count blocks and owned by this
    /// call; the ops are in place (aligned memory, unpadded slots).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run_ring(
        &self,
        rings: &Rings,
        pool: Option<&crate::io::Pool>,
        fd: RawFd,
        ops: &[Op],
        groups: &[Range<usize>],
        dir: Dir,
        hook: Option<Hook<'_>>,
        order: &[usize],
    ) -> Result<bool> {
        let Ok(ring) = rings.take() else {
            return Ok(false);
        };
        // Every group's segments, built before the first submission and
        // kept until the last completion (the kernel reads them at issue).
        let iov = self.iovecs(ops);
        let want = |g: usize| {
            iov[groups[g].clone()]
                .iter()
                .map(|v| v.iov_len)
                .sum::<usize>()
        };
        let run_hook = |g: usize| self.hook_group(hook, &ops[groups[g].clone()], order);
        let depth = self.io_depth; // the rings were sized for it
        let file = types::Fd(fd);
        // Declared after `iov`: dropped before it, waiting for what is in flight.
        let mut flight = Flight {
            rings,
            ring: Some(ring),
            inflight: 0,
            broken: false,
            failures: 0,
        };
        let mut redo: Vec<usize> = Vec::new();
        let mut next = 0usize;
        let mut done: Vec<(usize, i32)> = Vec::new();
        let window = match (dir, hook) {
            (Dir::Read, Some(_)) => VERIFY_WINDOW,
            _ => usize::MAX,
        };
        let mut moving = 0usize; // bytes in flight
        let mut fresh: Vec<usize> = Vec::new();
        let mut arrived: Vec<usize> = Vec::new();
        loop {
            // Keep the device busy first: push up to `depth` (verified
            // reads: up to the window).
            while !flight.broken
                && flight.inflight < depth
                && (moving < window || flight.inflight < 2)
                && next < groups.len()
                && !flight.ring().submission().is_full()
            {
                let g = next;
                let r = groups[g].clone();
                let off = self.slot_offset(ops[r.start].slot);
                let len = u32::try_from(want(g)).expect("a group is at most max_io_bytes");
                let table = &flight.ring.as_ref().expect("held until dropped").table;
                let fixed = fixed_index(table, &iov[r.clone()])
                    .filter(|_| r.len() == 1 || rings.vectored_fixed);
                if fixed.is_some() {
                    rings.fixed_ios.fetch_add(1, Ordering::Relaxed);
                }
                let sqe = match (dir, r.len(), fixed) {
                    (Dir::Write, 1, Some(i)) => {
                        opcode::WriteFixed::new(file, iov[r.start].iov_base as *const u8, len, i)
                            .offset(off)
                            .build()
                    }
                    (Dir::Read, 1, Some(i)) => {
                        opcode::ReadFixed::new(file, iov[r.start].iov_base as *mut u8, len, i)
                            .offset(off)
                            .build()
                    }
                    (Dir::Write, n, Some(i)) => {
                        opcode::WritevFixed::new(file, iov[r.start..].as_ptr(), n as u32, i)
                            .offset(off)
                            .build()
                    }
                    (Dir::Read, n, Some(i)) => {
                        opcode::ReadvFixed::new(file, iov[r.start..].as_ptr(), n as u32, i)
                            .offset(off)
                            .build()
                    }
                    _ => match (dir, r.len()) {
                        (Dir::Write, 1) => {
                            opcode::Write::new(file, iov[r.start].iov_base as *const u8, len)
                                .offset(off)
                                .build()
                        }
                        (Dir::Read, 1) => {
                            opcode::Read::new(file, iov[r.start].iov_base as *mut u8, len)
                                .offset(off)
                                .build()
                        }
                        (Dir::Write, n) => {
                            opcode::Writev::new(file, iov[r.start..].as_ptr(), n as u32)
                                .offset(off)
                                .build()
                        }
                        (Dir::Read, n) => {
                            opcode::Readv::new(file, iov[r.start..].as_ptr(), n as u32)
                                .offset(off)
                                .build()
                        }
                    },
                };
                let sqe: squeue::Entry = sqe.user_data(g as u64);
                // SAFETY: the memory and iovecs the entry points at outlive
                // its completion: `iov` and the caller's buffers live through
                // this call, and `flight` waits for every operation in flight
                // before it is dropped (also while unwinding), which happens
                // before `iov` is. A fixed entry's buffer index is of this
                // ring's table, which changes only between batches, and its
                // segments lie inside that buffer. The queue was checked not full.
                unsafe { flight.ring().submission().push(&sqe) }.expect("checked not full");
                next += 1;
                flight.inflight += 1;
                moving += len as usize;
                fresh.push(g);
            }
            // Checksums are computed while the device moves what was just
            // handed to it (writes: the bytes it is reading, which do not
            // change; reads: what completed last time). Without checksum
            // work the wait below submits in the same call.
            for (g, res) in done.drain(..) {
                if usize::try_from(res).ok() == Some(want(g)) {
                    arrived.push(g);
                } else {
                    redo.push(g); // an error or a short transfer: done again, synchronously
                }
            }
            if hook.is_some() && !fresh.is_empty() {
                if dir == Dir::Write || !arrived.is_empty() {
                    flight.submit(false);
                }
                if dir == Dir::Write {
                    fresh.iter().for_each(|&g| run_hook(g));
                }
            }
            fresh.clear();
            if let (Dir::Read, Some(h)) = (dir, hook) {
                self.verify(pool, h, &arrived, (ops, groups, order));
            }
            arrived.clear();
            if flight.inflight == 0 {
                break; // all done, or broken with nothing in flight
            }
            flight.submit(true);
            done = flight.reap();
            // What completed leaves the window now, so that the refill at
            // the top of the loop hands the device a whole window before
            // the caller sums what arrived.
            moving -= done.iter().map(|&(g, _)| want(g)).sum::<usize>();
        }
        drop(flight); // nothing in flight: the ring goes back unless it broke

        // What the ring did not finish, and what it never submitted, goes the
        // synchronous way: fallback to buffered I/O and errors are decided there.
        let submitted = next;
        redo.extend(next..groups.len());
        if redo.is_empty() {
            return Ok(true);
        }
        redo.sort_unstable();
        let mut w = Worker::new(self);
        for g in redo {
            if dir == Dir::Write && g >= submitted {
                run_hook(g); // never submitted: its checksum is not computed yet
            }
            let group = &ops[groups[g].clone()];
            // SAFETY: forwarded; no ring operation is in flight any more.
            unsafe { self.do_group(fd, group, dir, &mut w, None) }?;
            if dir == Dir::Read {
                run_hook(g);
            }
        }
        Ok(true)
    }
}

impl DiskStorage {
    /// Check the blocks of the read groups that `arrived` (`hook` on each):
    /// on this thread and, when they are worth it, on free pool threads too,
    /// one per other core at most, each taking the next block.
    fn verify(
        &self,
        pool: Option<&crate::io::Pool>,
        hook: Hook<'_>,
        arrived: &[usize],
        (ops, groups, order): (&[Op], &[Range<usize>], &[usize]),
    ) {
        let count: usize = arrived
            .iter()
            .flat_map(|&g| &ops[groups[g].clone()])
            .map(|op| op.count)
            .sum();
        let helpers = (crate::process::cores() - 1).min(count.saturating_sub(1));
        match pool {
            Some(p) if helpers > 0 && count * self.block_size >= SHARE_FROM => {
                let blocks: Vec<(usize, usize)> = arrived
                    .iter()
                    .flat_map(|&g| self.blocks_of(&ops[groups[g].clone()], order))
                    .collect();
                let next = AtomicUsize::new(0);
                p.help(helpers, &|| {
                    while let Some(&(i, addr)) = blocks.get(next.fetch_add(1, Ordering::Relaxed)) {
                        (hook.each)(i, addr);
                    }
                });
            }
            _ => arrived
                .iter()
                .for_each(|&g| self.hook_group(Some(hook), &ops[groups[g].clone()], order)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixed_index, huge_pages_in};

    const SMAPS: &str = "\
7f0000000000-7f0000400000 rw-s 00000000 00:1b 1488 /dev/shm/x
Size:               4096 kB
KernelPageSize:        4 kB
THPeligible:           0
7f0000400000-7f0000800000 rw-p 00000000 00:00 0
Size:               4096 kB
KernelPageSize:        4 kB
THPeligible:           1
7f0000800000-7f0000c00000 rw-s 00000000 00:1c 7 /mnt/huge/y
Size:               4096 kB
KernelPageSize:     2048 kB
THPeligible:           0
";

    #[test]
    fn only_small_page_memory_is_registered() {
        let base = 0x7f00_0000_0000usize;
        assert_eq!(huge_pages_in(base + 4096, 1 << 20, SMAPS), None);
        let thp = huge_pages_in(base + (4 << 20) - 4096, 8192, SMAPS);
        assert!(thp.is_some_and(|w| w.contains("THPeligible")));
        let hugetlb = huge_pages_in(base + (8 << 20), 4096, SMAPS);
        assert!(hugetlb.is_some_and(|w| w.contains("2048 kB")));
        let unmapped = huge_pages_in(base + (12 << 20), 4096, SMAPS);
        assert!(unmapped.is_some_and(|w| w.contains("not mapped")));
    }

    #[test]
    fn a_fixed_io_needs_every_segment_in_one_buffer() {
        let iov = |a: usize, l: usize| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: l,
        };
        let table = [(1000, 100), (5000, 1000)];
        assert_eq!(
            fixed_index(&table, &[iov(5000, 10), iov(5990, 10)]),
            Some(1)
        );
        assert_eq!(fixed_index(&table, &[iov(5000, 10), iov(5995, 10)]), None);
        assert_eq!(fixed_index(&table, &[iov(1000, 10), iov(5000, 10)]), None);
        assert_eq!(fixed_index(&table, &[iov(1050, 50)]), Some(0));
    }
}
