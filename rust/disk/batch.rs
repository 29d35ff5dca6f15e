//! The batch engine of the disk tier: a batch is validated, sorted into
//! file order, cut into operations (adjacent slots coalesced, even when their
//! memory is apart: vectored I/O), and run with `io_depth` operations in
//! flight: direct I/O in place on an io_uring ring the calling thread drives
//! (`super::uring`) where the storage has one, otherwise on the storage's
//! worker pool; buffered writes by one writer. Memory that O_DIRECT cannot
//! use as it is (unaligned, or slots padded to the alignment) goes through a
//! per-worker aligned bounce buffer.
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use super::os::{pread_all, pwrite_all, transfer_all, Dir};
use super::DiskStorage;
use crate::align::{is_aligned, AlignedBuf, DEFAULT_ALIGNMENT};
use crate::error::{Error, Result};
use crate::io::{self, Op};

/// A failed system call inside a batch: which call, where, how long.
struct IoFail {
    call: &'static str,
    err: std::io::Error,
    off: u64,
    len: u64,
}

impl IoFail {
    fn new(call: &'static str, err: std::io::Error, off: u64, len: usize) -> Self {
        IoFail {
            call,
            err,
            off,
            len: len as u64,
        }
    }
}

/// What one worker holds while a batch runs.
pub(super) struct Worker<'a> {
    storage: &'a DiskStorage,
    bounce: Option<AlignedBuf>,
    /// Buffered writes of a one-writer batch: write-back is started every
    /// [`WRITEBACK_EVERY`] bytes (by `starter` where the batch has one), not
    /// per I/O.
    defer_writeback: bool,
    /// The batch's write-back starter, running on another thread.
    starter: Option<&'a Starter>,
    /// Bytes written since write-back was last started.
    unflushed: usize,
}

/// A one-writer buffered batch starts the file's write-back every this many
/// bytes it wrote, so that the device writes while the writer copies into
/// the page cache (and the next `fdatasync` finds little left to do).
/// Started from a second thread ([`Starter`]): `sync_file_range` submits the
/// dirty pages and waits for room in the device's queue, which on the
/// writer's own thread costs what it overlaps (a batch of random 64 KiB
/// blocks took as long as copying and then syncing). Measured against a
/// Python `pwrite` loop then `fdatasync`, 128 MiB of random slots (2-core
/// VM, ext4 on virtio): 64 KiB blocks 0.98x started on the writer, 1.5x
/// from a second thread; 256 KiB and 2 MiB 1.5-1.7x either way; every 2, 4,
/// 8 or 16 MiB within noise of each other.
const WRITEBACK_EVERY: usize = 8 << 20;
/// Without a second thread (a storage with no worker pool), only blocks
/// this large start write-back on the writer's thread; smaller ones leave
/// it to the kernel (see [`WRITEBACK_EVERY`]).
const WRITEBACK_MIN_BLOCK: usize = 256 << 10;

/// Starts a file's write-back when a buffered batch's writer asks, on a
/// thread other than the writer's; ends when the writer is done (without
/// starting the rest: that is left to the kernel or the next sync).
#[derive(Default)]
pub(super) struct Starter {
    state: std::sync::Mutex<StarterState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct StarterState {
    asked: bool,
    done: bool,
    /// A thread serves requests (it may join after the writer started).
    serving: bool,
}

impl Starter {
    fn lock(&self) -> std::sync::MutexGuard<'_, StarterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer: start write-back of what was written so far; false when
    /// no thread serves (yet).
    fn ask(&self) -> bool {
        let mut s = self.lock();
        if !s.serving {
            return false;
        }
        s.asked = true;
        drop(s);
        self.wake.notify_one();
        true
    }

    /// The writer ended (also on an error or a panic: see [`StarterDone`]).
    fn finish(&self) {
        self.lock().done = true;
        self.wake.notify_one();
    }

    /// The starter's thread: serve requests until the writer is done.
    fn serve(&self, fd: RawFd) {
        let mut s = self.lock();
        s.serving = true;
        loop {
            if s.done {
                return;
            }
            if std::mem::take(&mut s.asked) {
                drop(s);
                // SAFETY: an advisory call on the batch's descriptor (held
                // open by the batch); a failure only leaves write-back to
                // the kernel.
                unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
                s = self.lock();
                continue;
            }
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Tells the starter the writer ended however it ends.
struct StarterDone<'a>(&'a Starter);

impl Drop for StarterDone<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.bounce.take() {
            self.storage
                .bounce
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(b);
        }
    }
}

impl<'a> Worker<'a> {
    pub(super) fn new(storage: &'a DiskStorage) -> Self {
        Worker {
            storage,
            bounce: None,
            defer_writeback: false,
            starter: None,
            unflushed: 0,
        }
    }

    /// After a buffered write of `len` bytes at `off`: start its write-back
    /// and drop its pages; in a one-writer batch, start write-back of the
    /// file every [`WRITEBACK_EVERY`] bytes: by the batch's [`Starter`], or
    /// on this thread for large blocks where none serves.
    pub(super) fn wrote_buffered(&mut self, fd: RawFd, off: u64, len: usize) {
        if !self.defer_writeback {
            self.storage.drop_cache(fd, off, len as u64);
            return;
        }
        self.unflushed += len;
        if self.unflushed < WRITEBACK_EVERY {
            return;
        }
        self.unflushed = 0;
        if self.starter.is_some_and(|st| st.ask()) || self.storage.block_size < WRITEBACK_MIN_BLOCK
        {
            return;
        }
        // SAFETY: an advisory call on our own descriptor; a failure only
        // leaves write-back to the kernel.
        unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }

    fn bounce(&mut self) -> Result<&mut AlignedBuf> {
        if self.bounce.is_none() {
            let pooled = self
                .storage
                .bounce
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            self.bounce = Some(match pooled {
                Some(b) => b,
                None => AlignedBuf::new(
                    self.storage.bounce_len(),
                    self.storage.align.mem.max(DEFAULT_ALIGNMENT),
                )?,
            });
        }
        Ok(self.bounce.as_mut().expect("set above"))
    }
}

/// What a batch's caller does with each block's bytes, on the I/O workers
/// (checksums are computed here, overlapping other workers' I/O).
#[derive(Clone, Copy)]
pub struct Hook<'a> {
    /// Called with the block's index in the batch and its memory address:
    /// before a write is issued, after a read succeeded.
    pub each: &'a (dyn Fn(usize, usize) + Sync),
    /// For a block that goes through a bounce buffer (memory direct I/O
    /// cannot use in place), in place of `each`: called with its index and
    /// the CRC32C of its bytes, summed while they were copied to or from
    /// the bounce buffer (one pass over them instead of two).
    pub sums: &'a (dyn Fn(usize, u32) + Sync),
}

/// A group's blocks whose bytes are summed on their way through the bounce
/// buffer: the hook's `sums` and the batch's file order.
#[derive(Clone, Copy)]
pub(super) struct Fused<'a> {
    sums: &'a (dyn Fn(usize, u32) + Sync),
    order: &'a [usize],
}

impl DiskStorage {
    /// Byte offset of a slot in the file: the one place this is computed.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.data_offset + slot * self.stride as u64
    }

    /// Whether a block at `addr` is written and read in place (no bounce
    /// copy): always for buffered I/O; for direct I/O when slots are not
    /// padded and `addr` has the direct I/O's memory alignment.
    pub fn in_place(&self, addr: usize) -> bool {
        self.in_place_for(addr, self.direct.on())
    }

    /// [`Self::in_place`] for I/O that is `direct` or not (a batch that
    /// falls back to buffered I/O decides again).
    fn in_place_for(&self, addr: usize, direct: bool) -> bool {
        self.stride == self.block_size && (!direct || is_aligned(addr as *const u8, self.align.mem))
    }

    fn max_slots_per_io(&self) -> usize {
        (self.max_io_bytes / self.stride).max(1)
    }

    /// Check a batch's sizes and slot ids before any byte moves (duplicate
    /// slots in a write batch are refused in `run_batch`, also before I/O).
    fn validate(&self, slots: &[u64], buf_len: usize) -> Result<()> {
        crate::error::check_batch_len("buffer", buf_len, slots.len(), "slots", self.block_size)?;
        for (i, &s) in slots.iter().enumerate() {
            if s >= self.num_blocks {
                return Err(Error::Index(format!(
                    "slot id {s} at position {i} is out of range: this storage has slots \
                     0..{}",
                    self.num_blocks
                )));
            }
        }
        Ok(())
    }

    pub(super) fn bounce_len(&self) -> usize {
        crate::align::round_up(self.max_io_bytes, self.align.offset)
    }

    /// Validate, run, count: the one path every batch takes.
    ///
    /// # Safety
    /// `addr_of(i)` is valid for block i (see the public callers).
    pub(super) unsafe fn batch(
        &self,
        slots: &[u64],
        len: usize,
        addr_of: impl Fn(usize) -> usize,
        dir: Dir,
        hook: Option<Hook<'_>>,
    ) -> Result<()> {
        self.validate(slots, len)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.run_batch(slots, addr_of, dir, hook) }?;
        let counter = if dir == Dir::Write {
            &self.bytes_written
        } else {
            &self.bytes_read
        };
        counter.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// # Safety
    /// `addr_of(i)` is valid for block i for the batch (see the callers);
    /// slots are validated.
    unsafe fn run_batch(
        &self,
        slots: &[u64],
        addr_of: impl Fn(usize) -> usize,
        dir: Dir,
        hook: Option<Hook<'_>>,
    ) -> Result<()> {
        let (_guard, fd) = self.raw_fd()?;
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner());
        // Visit slots in file order: runs of adjacent slots become one I/O
        // even when their blocks sit apart in memory (vectored I/O).
        let mut order: Vec<usize> = (0..slots.len()).collect();
        order.sort_by_key(|&i| slots[i]);
        let sorted: Vec<u64> = order.iter().map(|&i| slots[i]).collect();
        // Checked here, on the order the batch needs anyway, before any I/O.
        if dir == Dir::Write {
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::InvalidArgument(format!(
                    "slot id {} appears more than once in one write batch; \
                     each slot may be written once per call",
                    w[0]
                )));
            }
        }
        let ops = io::coalesce(
            &sorted,
            |k| addr_of(order[k]),
            self.block_size,
            self.max_slots_per_io(),
        );
        let groups = self.group_ops(&ops);
        if let Some(rings) = &self.rings {
            // The ring carries direct I/O straight to the caller's memory;
            // one group needs no queue (it runs on this thread below) unless
            // memory is registered (the ring moves it without pinning).
            let in_place = ops.iter().all(|op| self.in_place(op.addr));
            let worth = groups.len() > 1 || (groups.len() == 1 && rings.any_registered());
            if worth && in_place && self.direct.on() {
                // SAFETY: forwarded from the caller; the ops are in place.
                if unsafe {
                    self.run_ring(rings, pool.as_ref(), fd, &ops, &groups, dir, hook, &order)
                }? {
                    return Ok(());
                }
            }
        }
        let run_group = |g: usize, w: &mut Worker| {
            let group = &ops[groups[g].clone()];
            // A group that goes through the bounce buffer has its blocks
            // summed there, when the hook takes sums.
            let fused = hook
                .filter(|_| self.direct.on() && !group.iter().all(|op| self.in_place(op.addr)))
                .map(|h| Fused {
                    sums: h.sums,
                    order: &order,
                });
            let run_hook = || {
                if fused.is_none() {
                    self.hook_group(hook, group, &order)
                }
            };
            // Writes: checksum first, so the device reads bytes the CPU
            // just pulled into cache. Reads: after the data arrived.
            if dir == Dir::Write {
                run_hook();
            }
            // SAFETY: each op covers its own disjoint memory.
            unsafe { self.do_group(fd, group, dir, w, fused) }?;
            if dir == Dir::Read {
                run_hook();
            }
            Ok(())
        };
        if dir == Dir::Write && !self.direct.on() {
            let bytes = slots.len() * self.block_size;
            return self.write_buffered(pool.as_ref(), fd, groups.len(), bytes, run_group);
        }
        io::run_on(
            pool.as_ref(),
            groups.len(),
            self.io_depth,
            || Ok(Worker::new(self)),
            run_group,
        )
    }

    /// A buffered write batch: one writer, since parallel buffered writes
    /// to one file queue on its inode lock; write-back is not started per
    /// I/O (every block became its own device write, and each writer waited
    /// for each submission) but every [`WRITEBACK_EVERY`] bytes, by a pool
    /// thread when one is free (it joins while the writer runs, see
    /// [`io::Pool::help`]). `POSIX_FADV_DONTNEED` would start write-back
    /// too, so pages are not dropped here: clean pages stay cached until the
    /// kernel needs the memory, as for any buffered file.
    pub(super) fn write_buffered(
        &self,
        pool: Option<&io::Pool>,
        fd: RawFd,
        groups: usize,
        bytes: usize,
        run_group: impl Fn(usize, &mut Worker) -> Result<()> + Sync,
    ) -> Result<()> {
        let write = |starter: Option<&Starter>| {
            let mut w = Worker::new(self);
            w.defer_writeback = true;
            w.starter = starter;
            (0..groups).try_for_each(|g| run_group(g, &mut w))
        };
        let pool = match pool {
            // Fewer bytes than one start of write-back, or one I/O: no
            // write-back to start while the writer runs. A pool of one
            // thread stays free for other callers' batches (reads).
            Some(p) if groups > 1 && bytes > WRITEBACK_EVERY && self.io_depth > 1 => p,
            _ => return write(None),
        };
        let starter = Starter::default();
        let caller = std::thread::current().id();
        let result: std::sync::Mutex<Option<Result<()>>> = std::sync::Mutex::new(None);
        // The calling thread writes (as every batch's only writer did), a
        // pool thread starts write-back until the writer is done; without a
        // free pool thread the caller writes alone (and starts write-back
        // itself as if there were no pool: [`Worker::wrote_buffered`]).
        pool.help(1, &|| {
            if std::thread::current().id() != caller {
                starter.serve(fd);
            } else {
                let _done = StarterDone(&starter);
                let r = write(Some(&starter));
                *result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
        });
        result
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .expect("the writer ran")
    }

    /// `hook` on every block of `group` (its index in the batch, its memory).
    pub(super) fn hook_group(&self, hook: Option<Hook<'_>>, group: &[Op], order: &[usize]) {
        if let Some(h) = hook {
            self.blocks_of(group, order)
                .for_each(|(i, addr)| (h.each)(i, addr));
        }
    }

    /// `fused`'s sums of a group's blocks from their memory (the group did
    /// not go through the bounce buffer after all: the file fell back to
    /// buffered I/O).
    fn sum_group(&self, fused: Option<Fused<'_>>, group: &[Op]) {
        if let Some(f) = fused {
            for (i, addr) in self.blocks_of(group, f.order) {
                // SAFETY: the block's memory, valid for the batch (the
                // callers' promise), not written by anyone meanwhile.
                let bytes =
                    unsafe { std::slice::from_raw_parts(addr as *const u8, self.block_size) };
                (f.sums)(i, crate::checksum::crc32c(bytes));
            }
        }
    }

    /// The blocks of `group`: (index in the batch, address).
    pub(super) fn blocks_of<'a>(
        &'a self,
        group: &'a [Op],
        order: &'a [usize],
    ) -> impl Iterator<Item = (usize, usize)> + 'a {
        group.iter().flat_map(move |op| {
            (0..op.count).map(move |k| (order[op.first + k], op.addr + k * self.block_size))
        })
    }

    /// One segment per op: its memory, its blocks' bytes.
    pub(super) fn iovecs(&self, ops: &[Op]) -> Vec<libc::iovec> {
        ops.iter()
            .map(|op| libc::iovec {
                iov_base: op.addr as *mut libc::c_void,
                iov_len: op.count * self.block_size,
            })
            .collect()
    }

    /// Runs of ops whose slots follow each other, up to `max_io_bytes` and
    /// IOV_MAX segments: each run becomes one vectored I/O.
    fn group_ops(&self, ops: &[Op]) -> Vec<std::ops::Range<usize>> {
        const IOV_MAX: usize = 1024;
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        let mut bytes = 0usize;
        for (i, op) in ops.iter().enumerate() {
            let len = op.count * self.stride;
            if let Some(last) = out.last_mut() {
                let prev = &ops[last.end - 1];
                if prev.slot + prev.count as u64 == op.slot
                    && bytes + len <= self.max_io_bytes
                    && last.len() < IOV_MAX
                {
                    last.end = i + 1;
                    bytes += len;
                    continue;
                }
            }
            out.push(i..i + 1);
            bytes = len;
        }
        out
    }

    /// Run one group (adjacent slots), switching to buffered I/O and
    /// retrying when the first direct I/O is refused: the one place that
    /// decides about the fallback.
    ///
    /// # Safety
    /// Every op's memory is valid for op.count blocks and owned by this call.
    pub(super) unsafe fn do_group(
        &self,
        fd: RawFd,
        group: &[Op],
        dir: Dir,
        w: &mut Worker,
        fused: Option<Fused<'_>>,
    ) -> Result<()> {
        loop {
            let direct = self.direct.on();
            // SAFETY: forwarded.
            match unsafe { self.try_group(fd, group, dir, direct, w, fused) } {
                Ok(()) => {
                    if direct {
                        self.direct.mark_proven();
                    }
                    return Ok(());
                }
                Err(f) => {
                    let what = if dir == Dir::Read { "read" } else { "write" };
                    if direct && self.direct.should_fall_back(&f.err) {
                        if let Some(w) = self.direct.fall_back(fd, &self.path, what, &f.err)? {
                            self.warnings.push(w);
                        }
                        continue;
                    }
                    if direct && self.direct.refused(&f.err) {
                        return Err(self.direct.require_error(what));
                    }
                    return Err(Error::io(f.call, &self.path, f.off, f.len, f.err));
                }
            }
        }
    }

    /// One vectored I/O straight to or from the caller's memory when every
    /// op of the group allows it (aligned memory for direct I/O, unpadded
    /// slots); otherwise op by op through [`Self::try_copying`].
    ///
    /// # Safety
    /// As `do_group`.
    unsafe fn try_group(
        &self,
        fd: RawFd,
        group: &[Op],
        dir: Dir,
        direct: bool,
        w: &mut Worker,
        fused: Option<Fused<'_>>,
    ) -> std::result::Result<(), IoFail> {
        if group.iter().all(|op| self.in_place_for(op.addr, direct)) {
            // SAFETY: forwarded.
            unsafe { self.vectored(fd, group, dir) }?;
            if dir == Dir::Write && !direct {
                let len = group.iter().map(|op| op.count * self.stride).sum::<usize>();
                w.wrote_buffered(fd, self.slot_offset(group[0].slot), len);
            }
            self.sum_group(fused, group);
            return Ok(());
        }
        for op in group {
            // SAFETY: forwarded.
            unsafe { self.try_copying(fd, op, dir, direct, w, fused) }?;
        }
        Ok(())
    }

    /// `preadv`/`pwritev` of a group's segments; a short transfer is
    /// finished segment by segment.
    ///
    /// # Safety
    /// Every op's memory is valid for op.count blocks and owned by the call.
    unsafe fn vectored(
        &self,
        fd: RawFd,
        group: &[Op],
        dir: Dir,
    ) -> std::result::Result<(), IoFail> {
        let call = if dir == Dir::Read {
            "preadv"
        } else {
            "pwritev"
        };
        let file_off = self.slot_offset(group[0].slot);
        let iov = self.iovecs(group);
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let n = loop {
            // SAFETY: the iovecs point at memory owned by this call.
            let n = unsafe {
                match dir {
                    Dir::Read => {
                        libc::preadv(fd, iov.as_ptr(), iov.len() as i32, file_off as libc::off_t)
                    }
                    Dir::Write => {
                        libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, file_off as libc::off_t)
                    }
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(IoFail::new(call, e, file_off, total));
            }
            break n as usize;
        };
        if n == total {
            return Ok(());
        }
        // Finish what a short transfer left, segment by segment.
        let mut done = n;
        let mut off = file_off;
        for v in &iov {
            let len = v.iov_len;
            if done >= len {
                done -= len;
            } else {
                let p = (v.iov_base as *mut u8).wrapping_add(done);
                // SAFETY: the rest of this segment, inside the caller's memory.
                unsafe { transfer_all(fd, p, len - done, off + done as u64, dir) }
                    .map_err(|e| IoFail::new(call, e, off + done as u64, len - done))?;
                done = 0;
            }
            off += len as u64;
        }
        Ok(())
    }

    /// An op that cannot go straight to the caller's memory: padded slots
    /// (buffered: block by block; direct: through the worker's aligned
    /// bounce buffer) or unaligned memory under O_DIRECT.
    ///
    /// # Safety
    /// `op.addr` is valid for op.count blocks, owned by this op.
    unsafe fn try_copying(
        &self,
        fd: RawFd,
        op: &Op,
        dir: Dir,
        direct: bool,
        w: &mut Worker,
        fused: Option<Fused<'_>>,
    ) -> std::result::Result<(), IoFail> {
        let bs = self.block_size;
        let stride = self.stride;
        let file_off = self.slot_offset(op.slot);
        let user = op.addr as *mut u8;
        let call = if dir == Dir::Read { "pread" } else { "pwrite" };
        let fail = |e, off, len| IoFail::new(call, e, off, len);
        if !direct {
            // Buffered, padded slots: one call per block, straight from the
            // caller's memory.
            for k in 0..op.count {
                let off = file_off + (k * stride) as u64;
                // SAFETY: block k of this op is inside the op's range.
                let p = unsafe { user.add(k * bs) };
                // SAFETY: p..p+bs lies inside this op's memory.
                let r = unsafe {
                    match dir {
                        Dir::Write => pwrite_all(fd, p, bs, off),
                        Dir::Read => pread_all(fd, p, bs, off),
                    }
                };
                r.map_err(|e| fail(e, off, bs))?;
            }
            if dir == Dir::Write {
                w.wrote_buffered(fd, file_off, op.count * stride);
            }
            self.sum_group(fused, std::slice::from_ref(op));
            return Ok(());
        }
        // Direct I/O through the worker's aligned bounce buffer; with
        // `fused`, each block is summed as it is copied.
        let copy = |from: *const u8, to: *mut u8, k: usize| match fused {
            Some(f) => {
                // SAFETY: the callers' ranges below: bs bytes each, disjoint.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(from, bs),
                        std::slice::from_raw_parts_mut(to, bs),
                    )
                };
                (f.sums)(f.order[op.first + k], crate::checksum::copy_crc32c(a, b));
            }
            // SAFETY: as above.
            None => unsafe { std::ptr::copy_nonoverlapping(from, to, bs) },
        };
        let bounce = w
            .bounce()
            .map_err(|e| fail(std::io::Error::other(e.to_string()), file_off, 0))?;
        let io_len = op.count * stride;
        debug_assert!(io_len <= bounce.len());
        let bp = bounce.as_mut_ptr();
        match dir {
            Dir::Write => {
                for k in 0..op.count {
                    // SAFETY: bounce has room for count strides; user block k is ours.
                    unsafe {
                        copy(user.add(k * bs), bp.add(k * stride), k);
                        std::ptr::write_bytes(bp.add(k * stride + bs), 0, stride - bs);
                    }
                }
                // SAFETY: bounce is valid for io_len bytes.
                unsafe { pwrite_all(fd, bp, io_len, file_off) }
                    .map_err(|e| fail(e, file_off, io_len))
            }
            Dir::Read => {
                // SAFETY: bounce is valid for io_len bytes.
                unsafe { pread_all(fd, bp, io_len, file_off) }
                    .map_err(|e| fail(e, file_off, io_len))?;
                for k in 0..op.count {
                    // SAFETY: as above, in the other direction.
                    copy(
                        unsafe { bp.add(k * stride) },
                        unsafe { user.add(k * bs) },
                        k,
                    );
                }
                Ok(())
            }
        }
    }

    /// Buffered writes: start write-back and drop the pages, so a large
    /// disk tier does not fill the page cache.
    pub(super) fn drop_cache(&self, fd: RawFd, off: u64, len: u64) {
        // SAFETY: advisory calls on our own descriptor; failures are harmless.
        unsafe {
            libc::sync_file_range(
                fd,
                off as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
            libc::posix_fadvise(
                fd,
                off as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}
