//! The disk tier: a fixed number of equal-size block slots in one file,
//! read and written with O_DIRECT through aligned memory, falling back to
//! buffered I/O (and saying why) where the filesystem refuses O_DIRECT.
//!
//! - [`os`]: the operating-system helpers (opening, free space, the flag);
//! - [`direct`]: the O_DIRECT/fallback state, the one place that decides;
//! - [`batch`]: the batch engine (sorted, coalesced, vectored, `io_depth`
//!   operations in flight on a per-storage worker pool);
//! - [`uring`]: the io_uring engine the batch engine hands direct I/O to
//!   where the kernel allows it (`disk_engine`);
//! - [`header`]: a persistent file's header (geometry and store id);
//! - this module: [`DiskStorage`], opening, reserving space, the probe.
//!
//! A file is anonymous (`O_TMPFILE`, gone with the process) or, with
//! `persist`, a named file that starts with a header; slot `i` lives at
//! `data_offset + i * slot_stride`. A reopened store keeps the layout its
//! header records, so a store moved to a filesystem with another direct-I/O
//! alignment still opens (buffered, saying why, where its slots do not fit).
#![allow(unsafe_code)]

mod batch;
mod direct;
pub mod header;
pub(crate) mod os;
mod uring;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::align::{AlignedBuf, Alignment, DEFAULT_ALIGNMENT};
use crate::error::{errno_name, Error, Result};
use crate::files::FileStat;
use crate::process::{ForkGuard, OpenStore};
use crate::settings;
use direct::DirectIo;
use header::DataHeader;
use os::{pread_all, pwrite_all, Dir};

pub use batch::Hook;
#[cfg(feature = "python")] // the bindings' `fs_type` of a path
pub use os::fs_type_of_path;
pub use settings::{DiskEngine, ODirect, Prealloc};

#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub o_direct: ODirect,
    pub persist: bool,
    pub prealloc: Prealloc,
    /// Operations in flight per batch (None: [`settings::auto_io_depth`]).
    pub io_depth: Option<usize>,
    /// Largest single I/O after coalescing adjacent slots.
    pub max_io_bytes: usize,
    /// Replace the discovered alignment (tests and unusual filesystems).
    pub alignment: Option<Alignment>,
    /// Take an exclusive flock on a persistent file (default). Off only for
    /// tools that deliberately open one file twice (the bench).
    pub lock: bool,
    /// Nice value of the I/O threads.
    pub worker_nice: u32,
    /// Which engine runs direct I/O batches.
    pub engine: DiskEngine,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            o_direct: ODirect::Auto,
            persist: false,
            prealloc: Prealloc::Auto,
            io_depth: None,
            max_io_bytes: settings::default_int("max_io_bytes") as usize,
            alignment: None,
            lock: true,
            worker_nice: settings::default_int("worker_nice") as u32,
            engine: DiskEngine::Auto,
        }
    }
}

/// One file of `num_blocks` slots, each `slot_stride` bytes apart, after a
/// `data_offset`-byte header (persistent files only).
pub struct DiskStorage {
    fd: RwLock<Option<OwnedFd>>,
    path: PathBuf,
    anonymous: bool,
    /// This open created the file (so a failed open removes it).
    created: bool,
    file: FileStat,
    num_blocks: u64,
    block_size: usize,
    stride: usize,
    data_offset: u64,
    align: Alignment,
    io_depth: usize,
    worker_nice: u32,
    max_io_bytes: usize,
    fs_type: String,
    direct: DirectIo,
    warnings: crate::error::Warnings,
    bounce: Mutex<Vec<AlignedBuf>>,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    preallocation: Mutex<&'static str>,
    pool: RwLock<Option<crate::io::Pool>>,
    /// io_uring rings (None: the worker pool runs every batch).
    rings: Option<uring::Rings>,
    store_id: Option<[u8; 16]>,
    registration: Mutex<Option<OpenStore>>,
    fork: ForkGuard,
}

/// Check the arguments, then open (persistent) or create (anonymous) the
/// data file after an estimate of its size was checked against the free
/// space: (its directory, the estimate, the descriptor, created?).
fn open_file(
    path: &Path,
    num_blocks: u64,
    block_size: usize,
    opts: &DiskOptions,
) -> Result<(PathBuf, u64, OwnedFd, bool)> {
    settings::check_int("num_blocks", num_blocks)?;
    settings::check_int("block_size", block_size as u64)?;
    if let Some(d) = opts.io_depth {
        settings::check_usize("io_depth", d)?;
    }
    settings::check_int("worker_nice", opts.worker_nice as u64)?;
    settings::check_usize("max_io_bytes", opts.max_io_bytes)?;
    let dir = store_dir(path, opts.persist)?;
    // Capacity check before anything is created. The exact stride needs
    // the file's alignment; estimate with the common 4096 and check again
    // once the file is open.
    let est_stride = crate::align::round_up_checked(block_size, DEFAULT_ALIGNMENT)?;
    let header_room = if opts.persist { header::MIN_REGION } else { 0 };
    let est_size = settings::check_tier(num_blocks, block_size, est_stride)? + header_room as u64;
    let existing = opts.persist && std::fs::symlink_metadata(path).is_ok();
    if !existing {
        os::check_space(&dir, est_size, path)?;
    }
    if opts.persist {
        crate::files::check_parent(path)?;
    }
    let (fd, created) = if opts.persist {
        crate::files::open_named(path)?
    } else {
        (os::open_anonymous(&dir)?, false)
    };
    Ok((dir, est_size, fd, created))
}

/// The directory a storage lives in: `path` itself for an anonymous file,
/// the parent of `path` for a persistent one; checked to exist.
fn store_dir(path: &Path, persist: bool) -> Result<PathBuf> {
    let is_dir = path.is_dir();
    if persist && is_dir {
        return Err(Error::InvalidArgument(format!(
            "persist=True needs a file path, but {} is a directory",
            path.display()
        )));
    }
    if !persist && !is_dir {
        return Err(Error::InvalidArgument(format!(
            "{} is not a directory: an anonymous storage needs an existing directory \
             (or pass persist=True to keep a named file there)",
            path.display()
        )));
    }
    let dir = if is_dir {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "directory {} does not exist",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The io_uring rings `engine` asks for, of room for `depth` I/Os: none for
/// `Threads`, none where the kernel refuses io_uring under `Auto` or where
/// the file does buffered I/O (`direct` off: a ring carries direct I/O only);
/// an error saying why under `IoUring` (checked also for a buffered file, so
/// it fails where it would).
fn open_rings(engine: DiskEngine, depth: usize, direct: bool) -> Result<Option<uring::Rings>> {
    match engine {
        DiskEngine::Threads => Ok(None),
        DiskEngine::Auto if !direct => Ok(None),
        DiskEngine::Auto => Ok(uring::Rings::new(depth).ok()),
        DiskEngine::IoUring => match uring::Rings::new(depth) {
            Ok(r) => Ok(Some(r).filter(|_| direct)),
            Err(e) => Err(Error::Unsupported(format!(
                "disk_engine=\"io_uring\" but this kernel refuses io_uring ({}: {e}; \
                 kernel.io_uring_disabled, a seccomp filter or a kernel before 5.6); \
                 use disk_engine=\"auto\" or \"threads\"",
                e.raw_os_error().map(errno_name).unwrap_or("error")
            ))),
        },
    }
}

/// One open of a persistent store at a time: once per process (the
/// registration) and across processes (`flock`, released with `fd`). A
/// second open is refused, not corrupted.
#[allow(unsafe_code)]
fn lock_store(fd: RawFd, path: &Path, file: &FileStat) -> Result<OpenStore> {
    let registration = OpenStore::register(file.dev, file.ino).ok_or_else(|| {
        Error::Locked(format!(
            "the store {} is already open in this process; close the BlockManager or \
             DiskStorage that holds it first (one process may open a store once)",
            path.display()
        ))
    })?;
    // SAFETY: flock on a descriptor the caller owns; released when it closes.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = os::errno();
        if e == libc::EWOULDBLOCK {
            return Err(Error::Locked(format!(
                "the store {} is open in another process (it holds the file lock); \
                 close it there first, or give this process its own path",
                path.display()
            )));
        }
        return Err(Error::io(
            "flock",
            path,
            0,
            0,
            std::io::Error::from_raw_os_error(e),
        ));
    }
    Ok(registration)
}

/// Turn O_DIRECT on as `mode` asks: (on?, why not). A filesystem that
/// refuses it is a fallback to buffered I/O (a warning in `warnings`), or
/// an error with `"require"`.
fn set_o_direct(
    fd: RawFd,
    mode: ODirect,
    place: &str,
    shown: &Path,
    warnings: &mut Vec<String>,
) -> Result<(bool, Option<String>)> {
    if mode == ODirect::Off {
        return Ok((
            false,
            Some("O_DIRECT disabled by configuration".to_string()),
        ));
    }
    match os::set_o_direct(fd, true) {
        Ok(()) => Ok((true, None)),
        Err(e) if e == libc::EINVAL || e == libc::EOPNOTSUPP => {
            let why = format!(
                "{place} refused O_DIRECT ({} from fcntl(F_SETFL, O_DIRECT))",
                errno_name(e)
            );
            if mode == ODirect::Require {
                return Err(Error::ODirectUnavailable(format!(
                    "{why}; o_direct=\"require\" was asked. Use a filesystem that \
                     supports direct I/O (ext4, xfs) or allow the buffered fallback"
                )));
            }
            warnings.push(format!(
                "{why}; falling back to buffered I/O for this storage"
            ));
            Ok((false, Some(why)))
        }
        Err(e) => Err(Error::io(
            "fcntl(O_DIRECT)",
            shown,
            0,
            0,
            std::io::Error::from_raw_os_error(e),
        )),
    }
}

/// A store laid out on a filesystem with a smaller alignment: its slots do
/// not fit this one's direct I/O, so it is read buffered (O_DIRECT turned
/// off again); returns why, or an error with `"require"`.
fn layout_misfit(
    fd: RawFd,
    (stride, data_offset): (usize, u64),
    align: &Alignment,
    place: &str,
    mode: ODirect,
    path: &Path,
) -> Result<String> {
    let why = format!(
        "the store's slots ({stride}-byte stride after a {data_offset}-byte header) were \
         laid out for another filesystem and do not fit the {}-byte direct-I/O \
         alignment of {place}",
        align.offset
    );
    if mode == ODirect::Require {
        return Err(Error::ODirectUnavailable(format!(
            "{why}; o_direct=\"require\" was asked"
        )));
    }
    if let Err(e) = os::set_o_direct(fd, false) {
        return Err(Error::io(
            "fcntl(clear O_DIRECT)",
            path,
            0,
            0,
            std::io::Error::from_raw_os_error(e),
        ));
    }
    Ok(why)
}

/// (slot stride, data offset, store id): a reopened store's from its
/// header, a new one's from the file's alignment (a persistent one gets a
/// header region and a fresh random id).
fn layout(
    found: Option<&DataHeader>,
    align: &Alignment,
    block_size: usize,
    persist: bool,
) -> Result<(usize, u64, Option<[u8; 16]>)> {
    if let Some(h) = found {
        return Ok((h.stride as usize, h.data_offset, Some(h.store_id)));
    }
    let stride = align.round_up_checked(block_size)?;
    if !persist {
        return Ok((stride, 0, None));
    }
    let off = header::MIN_REGION.max(align.offset) as u64;
    Ok((stride, off, Some(crate::files::random_id()?)))
}

impl DiskStorage {
    /// Open (create) a storage. `path` is a directory for an anonymous file,
    /// or a file path with `opts.persist`.
    pub fn open(
        path: &Path,
        num_blocks: u64,
        block_size: usize,
        opts: &DiskOptions,
    ) -> Result<Self> {
        let (dir, est_size, fd, created) = open_file(path, num_blocks, block_size, opts)?;
        let file = crate::files::fstat(fd.as_raw_fd(), path)?;
        // From here on, a failure must remove a file we created.
        let cleanup = |e: Error| -> Error {
            if created {
                crate::files::remove_if_same(path, &file);
            }
            e
        };
        let registration = if opts.persist && opts.lock {
            Some(lock_store(fd.as_raw_fd(), path, &file).map_err(cleanup)?)
        } else {
            None
        };
        let found = if opts.persist && !created {
            read_header(fd.as_raw_fd(), path, &file)?
        } else {
            None
        };
        if let Some(h) = &found {
            check_reopen(path, h, &file, num_blocks, block_size)?;
        }
        let display_path = if opts.persist {
            path.to_path_buf()
        } else {
            dir.join("<anonymous>")
        };

        let fs_type = os::fs_type_of_fd(fd.as_raw_fd());
        let place = format!("the {fs_type} filesystem at {}", dir.display());
        let mut warnings = Vec::new();
        let (mut on, mut reason) = set_o_direct(
            fd.as_raw_fd(),
            opts.o_direct,
            &place,
            &display_path,
            &mut warnings,
        )
        .map_err(cleanup)?;

        let align = opts
            .alignment
            .unwrap_or_else(|| Alignment::discover(fd.as_raw_fd()));
        let (stride, data_offset, store_id) =
            layout(found.as_ref(), &align, block_size, opts.persist).map_err(cleanup)?;
        let size = settings::check_tier(num_blocks, block_size, stride)
            .map_err(cleanup)?
            .checked_add(data_offset)
            .ok_or_else(|| cleanup(Error::InvalidArgument("disk tier too large".into())))?;
        if on && (stride % align.offset != 0 || data_offset % align.offset as u64 != 0) {
            let why = layout_misfit(
                fd.as_raw_fd(),
                (stride, data_offset),
                &align,
                &place,
                opts.o_direct,
                path,
            )
            .map_err(cleanup)?;
            warnings.push(format!(
                "{why}; falling back to buffered I/O for this storage"
            ));
            on = false;
            reason = Some(why);
        }
        let direct = DirectIo::new(
            opts.o_direct,
            on,
            reason,
            place,
            format!("alignment {} from {}", align.offset, align.source.as_str()),
        );

        // A ring is sized for the depth it runs at; without one (refused, or
        // buffered I/O, which never uses one) the pool's depth applies.
        let queue = os::device_queue_depth(file.dev);
        let depth_for = |ring| {
            opts.io_depth
                .unwrap_or_else(|| settings::auto_io_depth(block_size, ring, queue))
        };
        let rings = open_rings(opts.engine, depth_for(true), on).map_err(cleanup)?;
        let io_depth = depth_for(rings.is_some());
        let storage = DiskStorage {
            fd: RwLock::new(Some(fd)),
            path: display_path,
            anonymous: !opts.persist,
            created,
            file,
            num_blocks,
            block_size,
            stride,
            data_offset,
            align,
            io_depth,
            worker_nice: opts.worker_nice,
            max_io_bytes: opts.max_io_bytes.max(stride),
            fs_type,
            direct,
            warnings: crate::error::Warnings::new(warnings),
            bounce: Mutex::new(Vec::new()),
            bytes_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            preallocation: Mutex::new("existing"),
            pool: RwLock::new(crate::io::pool(io_depth, "dynblock-io", opts.worker_nice)),
            rings,
            store_id,
            registration: Mutex::new(registration),
            fork: ForkGuard::new("DiskStorage"),
        };
        storage
            .initialise(
                found.is_none(),
                (size, est_size),
                (&dir, path),
                opts.prealloc,
            )
            .map_err(cleanup)?;
        Ok(storage)
    }

    /// The last steps of `open`: a new file gets its space checked again at
    /// its exact size, its header (persistent: first, so a crash from there
    /// on leaves a file that is recognisably ours) and its space reserved;
    /// every file is probed; a new persistent one is synced.
    fn initialise(
        &self,
        new: bool,
        (size, est_size): (u64, u64),
        (dir, path): (&Path, &Path),
        prealloc: Prealloc,
    ) -> Result<()> {
        if new {
            if size > est_size {
                os::check_space(dir, size, path)?;
            }
            if let Some(id) = self.store_id {
                let h = DataHeader {
                    store_id: id,
                    block_size: self.block_size as u64,
                    stride: self.stride as u64,
                    num_blocks: self.num_blocks,
                    data_offset: self.data_offset,
                };
                self.write_header(&h)?;
            }
            self.preallocate(size, prealloc)?;
        }
        self.probe()?;
        if self.store_id.is_some() && new {
            self.sync()?;
        }
        Ok(())
    }

    fn raw_fd(&self) -> Result<(std::sync::RwLockReadGuard<'_, Option<OwnedFd>>, RawFd)> {
        self.fork.check()?;
        let g = self.fd.read().unwrap_or_else(|p| p.into_inner());
        let fd = g
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or(Error::Closed("DiskStorage"))?;
        Ok((g, fd))
    }

    /// Write `len` bytes of aligned memory at `off` outside a batch (header,
    /// zero-fill, probe), with the same fallback rules as batches.
    fn write_aligned(
        &self,
        fd: RawFd,
        buf: &AlignedBuf,
        len: usize,
        off: u64,
        call: &'static str,
    ) -> Result<()> {
        loop {
            // SAFETY: buf is valid for len <= buf.len() bytes.
            match unsafe { pwrite_all(fd, buf.as_ptr(), len.min(buf.len()), off) } {
                Ok(()) => {
                    self.direct.mark_proven();
                    return Ok(());
                }
                Err(err) if self.direct.should_fall_back(&err) => {
                    if let Some(w) = self.direct.fall_back(fd, &self.path, "write", &err)? {
                        self.warnings.push(w);
                    }
                }
                Err(err) if self.direct.refused(&err) => {
                    return Err(self.direct.require_error("write"))
                }
                Err(err) => return Err(Error::io(call, &self.path, off, len as u64, err)),
            }
        }
    }

    fn write_header(&self, h: &DataHeader) -> Result<()> {
        let (_g, fd) = self.raw_fd()?;
        let n = self.data_offset as usize;
        let mut buf = AlignedBuf::new(n, self.align.mem.max(DEFAULT_ALIGNMENT))?;
        buf.as_mut_slice()[..header::LEN].copy_from_slice(&h.encode());
        self.write_aligned(fd, &buf, n, 0, "pwrite(header)")
    }

    /// Reserve the file's `size` bytes: fallocate, else zero-fill the slots
    /// (or leave a sparse file).
    fn preallocate(&self, size: u64, mode: Prealloc) -> Result<()> {
        let (_g, fd) = self.raw_fd()?;
        let mut why = "was asked not to reserve space".to_string();
        if matches!(mode, Prealloc::Auto | Prealloc::SparseFallback) {
            // SAFETY: fallocate on our own descriptor.
            let rc = unsafe { libc::fallocate(fd, 0, 0, size as libc::off_t) };
            if rc == 0 {
                self.set_preallocation("fallocate");
                return Ok(());
            }
            let e = os::errno();
            if e != libc::EOPNOTSUPP && e != libc::ENOSYS {
                return Err(Error::io(
                    "fallocate",
                    &self.path,
                    0,
                    size,
                    std::io::Error::from_raw_os_error(e),
                ));
            }
            why = format!(
                "found that the {} filesystem does not support fallocate",
                self.fs_type
            );
        }
        if matches!(mode, Prealloc::SparseFallback | Prealloc::Sparse) {
            // SAFETY: ftruncate on our own descriptor.
            if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
                return Err(Error::last_os("ftruncate", &self.path, 0, size));
            }
            self.set_preallocation("sparse");
            self.warnings.push(format!(
                "the disk tier {why}: {} is a sparse file of {size} bytes, so running out \
                 of space (ENOSPC) can happen later, during writes",
                self.path.display()
            ));
            return Ok(());
        }
        // Zero-fill the slots (the header, if any, is already written) with
        // aligned writes, 8 MiB at a time.
        let chunk = (8usize << 20).max(self.stride);
        let chunk = crate::align::round_up(chunk, self.align.offset);
        let zeros = AlignedBuf::new(chunk, self.align.mem.max(DEFAULT_ALIGNMENT))?;
        let mut off = self.data_offset;
        while off < size {
            let n = chunk.min((size - off) as usize);
            self.write_aligned(fd, &zeros, n, off, "pwrite(zero-fill)")?;
            off += n as u64;
        }
        self.set_preallocation("zero-fill");
        Ok(())
    }

    /// One small direct read and write at open (the first alignment unit,
    /// written back unchanged), so a filesystem that accepts the O_DIRECT
    /// flag but fails the I/O is found now rather than mid-batch. Both are
    /// needed: a read of never-written space does not reach the device.
    fn probe(&self) -> Result<()> {
        if !self.direct.on() || self.direct.proven() {
            return Ok(());
        }
        let (_g, fd) = self.raw_fd()?;
        let n = self.align.offset;
        let mut buf = AlignedBuf::new(n, self.align.mem.max(DEFAULT_ALIGNMENT))?;
        // SAFETY: buf is valid for n bytes.
        match unsafe { pread_all(fd, buf.as_mut_ptr(), n, 0) } {
            Ok(()) => {}
            Err(err) if self.direct.should_fall_back(&err) => {
                if let Some(w) = self.direct.fall_back(fd, &self.path, "read", &err)? {
                    self.warnings.push(w);
                }
                return Ok(());
            }
            Err(err) if self.direct.refused(&err) => return Err(self.direct.require_error("read")),
            Err(err) => return Err(Error::io("pread(probe)", &self.path, 0, n as u64, err)),
        }
        self.write_aligned(fd, &buf, n, 0, "pwrite(probe)")
    }

    fn set_preallocation(&self, how: &'static str) {
        *self.preallocation.lock().unwrap_or_else(|p| p.into_inner()) = how;
    }

    /// How the file's space was reserved: "fallocate", "zero-fill",
    /// "sparse", or "existing" (a persistent file reopened).
    pub fn preallocation(&self) -> &'static str {
        *self.preallocation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Warnings produced since the last call (the Python layer logs them).
    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings.take()
    }

    /// Write `slots.len()` blocks from `src` (block after block).
    pub fn write_blocks(&self, slots: &[u64], src: &[u8]) -> Result<()> {
        // SAFETY: src is a valid slice for its length.
        unsafe { self.write_blocks_raw(slots, src.as_ptr(), src.len()) }
    }

    /// Read `slots.len()` blocks into `dst` (block after block).
    pub fn read_blocks(&self, slots: &[u64], dst: &mut [u8]) -> Result<()> {
        // SAFETY: dst is a valid exclusive slice for its length.
        unsafe { self.read_blocks_raw(slots, dst.as_mut_ptr(), dst.len()) }
    }

    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn write_blocks_raw(&self, slots: &[u64], src: *const u8, len: usize) -> Result<()> {
        let base = src as usize;
        // SAFETY: forwarded from the caller.
        unsafe { self.batch(slots, len, |i| base + i * self.block_size, Dir::Write, None) }
    }

    /// # Safety
    /// `dst` must be valid for writes of `len` bytes for the whole call and
    /// not be read or written by anyone else meanwhile.
    pub unsafe fn read_blocks_raw(&self, slots: &[u64], dst: *mut u8, len: usize) -> Result<()> {
        let base = dst as usize;
        // SAFETY: forwarded from the caller.
        unsafe { self.batch(slots, len, |i| base + i * self.block_size, Dir::Read, None) }
    }

    /// Write block `i` of the batch from address `srcs[i]` (block_size
    /// bytes each) to `slots[i]`: a gather write for callers whose blocks are
    /// not back to back (the block manager's host slots).
    ///
    /// # Safety
    /// Every `srcs[i]` must be valid for reads of block_size bytes for the
    /// whole call.
    pub unsafe fn write_blocks_from(
        &self,
        slots: &[u64],
        srcs: &[usize],
        hook: Option<Hook<'_>>,
    ) -> Result<()> {
        self.same_count(slots, srcs)?;
        // SAFETY: forwarded from the caller.
        unsafe {
            self.batch(
                slots,
                slots.len() * self.block_size,
                |i| srcs[i],
                Dir::Write,
                hook,
            )
        }
    }

    /// Read `slots[i]` into address `dsts[i]` (block_size bytes each).
    ///
    /// # Safety
    /// Every `dsts[i]` must be valid for writes of block_size bytes, the
    /// ranges must not overlap, and nobody else may touch them meanwhile.
    pub unsafe fn read_blocks_into(
        &self,
        slots: &[u64],
        dsts: &[usize],
        hook: Option<Hook<'_>>,
    ) -> Result<()> {
        self.same_count(slots, dsts)?;
        // SAFETY: forwarded from the caller.
        unsafe {
            self.batch(
                slots,
                slots.len() * self.block_size,
                |i| dsts[i],
                Dir::Read,
                hook,
            )
        }
    }

    fn same_count(&self, slots: &[u64], addrs: &[usize]) -> Result<()> {
        if slots.len() != addrs.len() {
            return Err(Error::InvalidArgument(format!(
                "{} slot ids but {} buffers",
                slots.len(),
                addrs.len()
            )));
        }
        Ok(())
    }

    /// Flush written data to the device (`fdatasync`).
    pub fn sync(&self) -> Result<()> {
        let (_g, fd) = self.raw_fd()?;
        // SAFETY: fdatasync on our own descriptor.
        if unsafe { libc::fdatasync(fd) } != 0 {
            return Err(Error::last_os("fdatasync", &self.path, 0, 0));
        }
        Ok(())
    }

    /// Drop this file's pages from the page cache (for cold-read benchmarks).
    pub fn drop_page_cache(&self) -> Result<()> {
        let (_g, fd) = self.raw_fd()?;
        // SAFETY: advisory calls on our own descriptor.
        unsafe {
            libc::fdatasync(fd);
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        Ok(())
    }

    /// Close the file and stop the worker threads at once. Waits for
    /// batches in flight; idempotent.
    pub fn close(&self) {
        let mut g = self.fd.write().unwrap_or_else(|p| p.into_inner());
        g.take();
        self.pool.write().unwrap_or_else(|p| p.into_inner()).take();
        self.registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.bounce
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Close, and remove the file if this open created it: for an open that
    /// fails after the storage was made (the block manager's index).
    pub fn abandon(&self) {
        self.close();
        if self.created && !self.fork.forked() {
            crate::files::remove_if_same(&self.path, &self.file);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.fd.read().unwrap_or_else(|p| p.into_inner()).is_none()
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
    /// Bytes before slot 0 (the header of a persistent file; 0 otherwise).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    pub fn alignment(&self) -> Alignment {
        self.align
    }
    pub fn o_direct(&self) -> bool {
        self.direct.on()
    }
    pub fn fallback_reason(&self) -> Option<String> {
        self.direct.reason()
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn anonymous(&self) -> bool {
        self.anonymous
    }
    /// Whether this open created the file (a new store).
    pub fn created(&self) -> bool {
        self.created
    }
    /// Aligned bounce buffers made so far (idle ones are pooled): none
    /// while every direct I/O ran on the caller's memory in place.
    #[cfg(test)]
    pub(crate) fn bounce_buffers(&self) -> usize {
        self.bounce.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// The random id a persistent file's header carries (None: anonymous).
    pub fn store_id(&self) -> Option<[u8; 16]> {
        self.store_id
    }
    pub fn fs_type(&self) -> &str {
        &self.fs_type
    }
    pub fn io_depth(&self) -> usize {
        self.io_depth
    }
    /// Register `len` bytes at `addr` with the io_uring engine, which then
    /// moves direct I/O of blocks inside it without pinning its pages for
    /// every operation; its id for [`Self::unregister_memory`]. None: no
    /// io_uring engine here (nothing to register with), or memory on huge
    /// pages (where pinning per I/O is cheap and registering measured
    /// costlier), with the reason in [`Self::registration`]. A kernel that
    /// refuses the registration (`RLIMIT_MEMLOCK`) leaves the I/O as it was
    /// and says why there too.
    ///
    /// # Safety
    /// The memory stays mapped, and is not moved, until
    /// `unregister_memory(id)` returns.
    pub unsafe fn register_memory(&self, addr: usize, len: usize) -> Option<u64> {
        let rings = self.rings.as_ref()?;
        // SAFETY: forwarded from the caller.
        unsafe { rings.register(addr, len, self.block_size) }
    }

    /// Forget registrations (all at once: the rings are brought up to date
    /// once); how many of `ids` were registrations.
    pub fn unregister_memory(&self, ids: &[u64]) -> usize {
        self.rings.as_ref().map_or(0, |r| r.unregister(ids))
    }

    /// Bytes registered, direct I/Os that used registered memory, and why
    /// a buffer was left unregistered or the kernel refused one (None:
    /// neither happened).
    pub fn registration(&self) -> (u64, u64, Option<String>) {
        self.rings.as_ref().map_or((0, 0, None), |r| r.registered())
    }

    /// The engine that runs direct I/O batches: `"io_uring"` or `"threads"`.
    pub fn engine(&self) -> &'static str {
        if self.rings.is_some() {
            "io_uring"
        } else {
            "threads"
        }
    }
    /// Nice value of the I/O threads (and of a manager's write-behind thread).
    pub fn worker_nice(&self) -> u32 {
        self.worker_nice
    }
    pub fn file_size(&self) -> u64 {
        self.data_offset + self.num_blocks * self.stride as u64
    }
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

/// The header of the persistent data file at `path`, read without opening
/// it for writing (the store tool's `info`). None: an empty file from a
/// creation that died early.
pub fn inspect_data_file(path: &Path) -> Result<Option<DataHeader>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, 0, 0, e))?;
    let st = crate::files::fstat(f.as_raw_fd(), path)?;
    read_header(f.as_raw_fd(), path, &st)
}

/// Read and parse an existing persistent file's header (buffered, before
/// O_DIRECT is set). None: an empty file from a creation that died early.
fn read_header(fd: RawFd, path: &Path, st: &FileStat) -> Result<Option<DataHeader>> {
    let n = (st.size as usize).min(header::MIN_REGION);
    let mut buf = vec![0u8; n];
    // SAFETY: buf is valid for n bytes.
    unsafe { pread_all(fd, buf.as_mut_ptr(), n, 0) }
        .map_err(|e| Error::io("pread(header)", path, 0, n as u64, e))?;
    DataHeader::decode(path, &buf[..n.min(header::LEN)])
}

/// A reopened store must be opened with the geometry it was made with; its
/// file must still have the size the header says.
fn check_reopen(
    path: &Path,
    h: &DataHeader,
    st: &FileStat,
    num_blocks: u64,
    block_size: usize,
) -> Result<()> {
    if h.block_size != block_size as u64 || h.num_blocks != num_blocks {
        return Err(Error::InvalidArgument(format!(
            "the store {} was made with block_size {} and {} blocks; this open asks for \
             block_size {block_size} and {num_blocks} blocks. Open it with its own geometry, \
             or delete it (data file and index) to start over",
            path.display(),
            h.block_size,
            h.num_blocks
        )));
    }
    let want = h.file_size().unwrap_or(u64::MAX);
    if st.size != want {
        return Err(Error::InvalidArgument(format!(
            "the store {} holds {} bytes, but its header says {} slots of {} bytes after a \
             {}-byte header ({want} bytes): the file was truncated or extended. Restore it, or \
             delete it (data file and index) to start over",
            path.display(),
            st.size,
            h.num_blocks,
            h.stride,
            h.data_offset
        )));
    }
    Ok(())
}

impl Drop for DiskStorage {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn round_trip_direct_and_buffered() {
        let dir = tempfile::tempdir().unwrap();
        for od in [ODirect::Auto, ODirect::Off] {
            for bs in [4096usize, 5000, 65536] {
                let opts = DiskOptions {
                    o_direct: od,
                    io_depth: Some(4),
                    ..Default::default()
                };
                let s = DiskStorage::open(dir.path(), 16, bs, &opts).unwrap();
                assert_eq!(s.slot_stride() % s.alignment().offset, 0);
                let slots = [3u64, 4, 5, 9, 0, 15];
                let src = pattern(bs * slots.len(), bs as u8);
                s.write_blocks(&slots, &src).unwrap();
                let mut dst = vec![0u8; src.len()];
                s.read_blocks(&slots, &mut dst).unwrap();
                assert_eq!(src, dst);
                // read back in another order
                let mut one = vec![0u8; bs];
                s.read_blocks(&[9], &mut one).unwrap();
                assert_eq!(&one[..], &src[3 * bs..4 * bs]);
            }
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// `n` bytes of [`pattern`] in page-aligned memory (what the ring takes).
    fn aligned_pattern(n: usize, seed: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(n, 4096).unwrap();
        b.as_mut_slice().copy_from_slice(&pattern(n, seed));
        b
    }

    /// A storage on `engine`, or None where the kernel refuses io_uring.
    fn open_on(
        dir: &Path,
        n: u64,
        bs: usize,
        engine: DiskEngine,
        persist: bool,
    ) -> Option<DiskStorage> {
        let opts = DiskOptions {
            engine,
            persist,
            io_depth: Some(3),
            ..Default::default()
        };
        match DiskStorage::open(dir, n, bs, &opts) {
            Err(Error::Unsupported(why)) => {
                eprintln!("skipped: {why}");
                None
            }
            r => Some(r.unwrap()),
        }
    }

    #[test]
    fn the_ring_and_the_pool_write_and_read_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 8192;
        let Some(ring) = open_on(dir.path(), 64, bs, DiskEngine::IoUring, false) else {
            return;
        };
        let pool = open_on(dir.path(), 64, bs, DiskEngine::Threads, false).unwrap();
        assert_eq!((ring.engine(), pool.engine()), ("io_uring", "threads"));
        // Runs of adjacent slots (vectored ops) and lone slots, more than io_depth of them.
        let slots: Vec<u64> = vec![40, 3, 4, 5, 17, 63, 0, 1, 30, 31, 32, 9, 50];
        let src = aligned_pattern(slots.len() * bs, 7);
        for (w, r) in [(&ring, &pool), (&pool, &ring)] {
            // Same bytes through each engine, read back through the other's file
            // layout (each file read by its own storage, compared across).
            w.write_blocks(&slots, src.as_slice()).unwrap();
            r.write_blocks(&slots, src.as_slice()).unwrap();
            let mut a = AlignedBuf::new(slots.len() * bs, 4096).unwrap();
            let mut b = AlignedBuf::new(slots.len() * bs, 4096).unwrap();
            w.read_blocks(&slots, a.as_mut_slice()).unwrap();
            r.read_blocks(&slots, b.as_mut_slice()).unwrap();
            assert_eq!(a.as_slice(), src.as_slice());
            assert_eq!(b.as_slice(), src.as_slice());
        }
        assert!(ring.o_direct());
    }

    #[test]
    fn batches_from_several_threads_each_get_a_ring() {
        // Four threads at once, each writing and reading back its own slots
        // in batches of runs and lone slots: each batch takes a ring of its
        // own (one is made when none is idle), and no batch sees another's bytes.
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let Some(s) = open_on(dir.path(), 256, bs, DiskEngine::IoUring, false) else {
            return;
        };
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let s = &s;
                scope.spawn(move || {
                    let slots: Vec<u64> =
                        (0..64).filter(|i| i % 3 != 1).map(|i| t * 64 + i).collect();
                    for round in 0..20u8 {
                        let src = aligned_pattern(slots.len() * bs, round ^ t as u8);
                        s.write_blocks(&slots, src.as_slice()).unwrap();
                        let mut dst = AlignedBuf::new(slots.len() * bs, 4096).unwrap();
                        s.read_blocks(&slots, dst.as_mut_slice()).unwrap();
                        assert_eq!(dst.as_slice(), src.as_slice(), "thread {t} round {round}");
                    }
                });
            }
        });
        assert_eq!(s.engine(), "io_uring");
    }

    #[test]
    fn what_the_ring_cuts_short_is_finished_or_reported_like_the_pool() {
        // A file cut shorter under the storage: reads of slots past its end come
        // back short from the kernel. Both engines give the same error; reads
        // before the cut still work.
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096;
        let mut msgs = Vec::new();
        for engine in [DiskEngine::IoUring, DiskEngine::Threads] {
            let path = dir.path().join(format!("{engine:?}.bin"));
            let Some(s) = open_on(&path, 16, bs, engine, true) else {
                return;
            };
            let src = aligned_pattern(16 * bs, 3);
            let all: Vec<u64> = (0..16).collect();
            s.write_blocks(&all, src.as_slice()).unwrap();
            let cut = s.slot_offset(10);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let mut dst = AlignedBuf::new(4 * bs, 4096).unwrap();
            let e = s
                .read_blocks(&[1, 5, 12, 14], dst.as_mut_slice())
                .unwrap_err();
            msgs.push(e.to_string().replace(&format!("{engine:?}"), "ENGINE"));
            s.read_blocks(&[1, 5, 7, 9], dst.as_mut_slice()).unwrap();
            for (k, slot) in [1usize, 5, 7, 9].into_iter().enumerate() {
                assert_eq!(
                    dst.as_slice()[k * bs..(k + 1) * bs],
                    src.as_slice()[slot * bs..(slot + 1) * bs]
                );
            }
        }
        assert_eq!(msgs[0], msgs[1]);
        assert!(msgs[0].contains("truncated"), "{}", msgs[0]);
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path(), 4, 4096, &DiskOptions::default()).unwrap();
        assert!(matches!(
            s.write_blocks(&[4], &[0u8; 4096]),
            Err(Error::Index(_))
        ));
        assert!(matches!(
            s.write_blocks(&[1], &[0u8; 10]),
            Err(Error::Buffer(_))
        ));
        assert!(matches!(
            s.write_blocks(&[1, 1], &[0u8; 8192]),
            Err(Error::InvalidArgument(_))
        ));
        s.close();
        assert!(matches!(
            s.read_blocks(&[1], &mut [0u8; 4096]),
            Err(Error::Closed(_))
        ));
    }

    #[test]
    fn a_buffered_batch_ends_with_its_writers_error_or_panic() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DiskOptions {
            o_direct: ODirect::Off,
            io_depth: Some(2),
            ..Default::default()
        };
        let bs = 65536;
        let s = DiskStorage::open(dir.path(), 16, bs, &opts).unwrap();
        let (_g, fd) = s.raw_fd().unwrap();
        let pool = s.pool.read().unwrap();
        let pool = pool.as_ref().expect("a pool");
        // Each group asks for write-back, so the starter is busy or waiting
        // whenever the writer stops.
        let fail_at = |bad: usize, panics: bool| {
            move |g: usize, w: &mut batch::Worker| {
                w.wrote_buffered(fd, 0, 8 << 20);
                std::thread::sleep(std::time::Duration::from_millis(1));
                match (g == bad, panics) {
                    (true, true) => panic!("group {g}"),
                    (true, false) => Err(Error::InvalidArgument(format!("group {g}"))),
                    _ => Ok(()),
                }
            }
        };
        let r = s.write_buffered(Some(pool), fd, 20, 64 << 20, fail_at(10, false));
        assert!(
            matches!(r, Err(Error::InvalidArgument(ref m)) if m == "group 10"),
            "{r:?}"
        );
        assert!(s
            .write_buffered(Some(pool), fd, 20, 64 << 20, fail_at(99, false))
            .is_ok());
        let hit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.write_buffered(Some(pool), fd, 20, 64 << 20, fail_at(3, true))
        }));
        assert!(hit.is_err(), "the writer's panic reaches the caller");
        drop(_g);
        // The pool is free again: a real batch after them.
        let src = pattern(bs * 16, 7);
        let slots: Vec<u64> = (0..16).rev().collect();
        s.write_blocks(&slots, &src).unwrap();
        let mut dst = vec![0u8; src.len()];
        s.read_blocks(&slots, &mut dst).unwrap();
        assert_eq!(src, dst);
    }

    #[test]
    fn blocks_through_the_bounce_buffer_are_summed_as_they_are_copied() {
        use std::collections::BTreeMap;
        use std::sync::Mutex;
        let dir = tempfile::tempdir().unwrap();
        let bs = 64 << 10;
        let s = DiskStorage::open(dir.path(), 8, bs, &DiskOptions::default()).unwrap();
        if !s.o_direct() {
            eprintln!("skipped: no direct I/O on {}", s.fs_type());
            return;
        }
        // Blocks 0 and 2 aligned (written in place), 1 and 3 one byte past
        // a page (through the bounce buffer), in slots apart.
        let mut mem = AlignedBuf::new(8 * bs + 4096, 4096).unwrap();
        let at = |i: usize| 2 * i * bs + (i % 2);
        let want: Vec<Vec<u8>> = (0..4).map(|i| pattern(bs, 40 + i as u8)).collect();
        for (i, w) in want.iter().enumerate() {
            mem.as_mut_slice()[at(i)..at(i) + bs].copy_from_slice(w);
        }
        let base = mem.as_ptr() as usize;
        let addrs: Vec<usize> = (0..4).map(|i| base + at(i)).collect();
        let slots = [6u64, 0, 3, 1]; // 0 and 1 adjacent: one group, both bounced
        let seen_each = Mutex::new(Vec::new());
        let seen_sums = Mutex::new(BTreeMap::new());
        let each = |i: usize, _: usize| seen_each.lock().unwrap().push(i);
        let sums = |i: usize, crc: u32| {
            seen_sums.lock().unwrap().insert(i, crc);
        };
        let hook = Hook {
            each: &each,
            sums: &sums,
        };
        // SAFETY: every address is bs bytes inside `mem`, which outlives the call.
        unsafe { s.write_blocks_from(&slots, &addrs, Some(hook)) }.unwrap();
        let mut e = std::mem::take(&mut *seen_each.lock().unwrap());
        e.sort();
        assert_eq!(e, vec![0, 2]);
        let summed = std::mem::take(&mut *seen_sums.lock().unwrap());
        let crc = |i: usize| crate::checksum::crc32c(&want[i]);
        assert_eq!(summed, BTreeMap::from([(1, crc(1)), (3, crc(3))]));
        // Read back into the other layout (aligned and unaligned swapped).
        let mut out = AlignedBuf::new(8 * bs + 4096, 4096).unwrap();
        let back = |i: usize| 2 * i * bs + ((i + 1) % 2);
        let ob = out.as_mut_ptr() as usize;
        let dsts: Vec<usize> = (0..4).map(|i| ob + back(i)).collect();
        // SAFETY: as above, inside `out`, distinct.
        unsafe { s.read_blocks_into(&slots, &dsts, Some(hook)) }.unwrap();
        let mut e = std::mem::take(&mut *seen_each.lock().unwrap());
        e.sort();
        assert_eq!(e, vec![1, 3]);
        let summed = std::mem::take(&mut *seen_sums.lock().unwrap());
        assert_eq!(summed, BTreeMap::from([(0, crc(0)), (2, crc(2))]));
        for (i, w) in want.iter().enumerate() {
            assert!(out.as_slice()[back(i)..back(i) + bs] == w[..], "block {i}");
        }
    }
}
