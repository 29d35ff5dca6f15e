//! The disk tier: a fixed number of equal-size block slots in one file,
//! read and written with O_DIRECT through aligned memory, falling back to
//! buffered I/O (and saying why) where the filesystem refuses O_DIRECT.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::align::{is_aligned, AlignedBuf, Alignment, DEFAULT_ALIGNMENT};
use crate::error::{errno_name, Error, Result};
use crate::io::{self, Op};

/// Whether to use O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ODirect {
    /// Buffered I/O only.
    Off,
    /// O_DIRECT, falling back to buffered I/O where the filesystem refuses.
    Auto,
    /// O_DIRECT or an error.
    Require,
}

/// How to reserve the file's space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// `fallocate`, else zero-fill with aligned writes.
    Auto,
    /// `fallocate`, else a sparse file (a warning says ENOSPC may come later).
    SparseFallback,
    /// Always zero-fill (no `fallocate`).
    Zero,
    /// Reserve nothing: a sparse file (a warning says ENOSPC may come later).
    Sparse,
}

#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub o_direct: ODirect,
    pub persist: bool,
    pub prealloc: Prealloc,
    /// Operations in flight per batch.
    pub io_depth: usize,
    /// Largest single I/O after coalescing adjacent slots.
    pub max_io_bytes: usize,
    /// Replace the discovered alignment (tests and unusual filesystems).
    pub alignment: Option<Alignment>,
    /// Take an exclusive flock on a persistent file (default). Off only for
    /// tools that deliberately open one file twice (the bench).
    pub lock: bool,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            o_direct: ODirect::Auto,
            persist: false,
            prealloc: Prealloc::Auto,
            io_depth: 16,
            max_io_bytes: 4 << 20,
            alignment: None,
            lock: true,
        }
    }
}

/// One file of `num_blocks` slots, each `slot_stride` bytes apart.
pub struct DiskStorage {
    fd: RwLock<Option<OwnedFd>>,
    path: PathBuf,
    anonymous: bool,
    num_blocks: u64,
    block_size: usize,
    stride: usize,
    align: Alignment,
    io_depth: usize,
    max_io_bytes: usize,
    fs_type: String,
    mode: ODirect,
    direct: AtomicBool,
    direct_proven: AtomicBool,
    fallback_reason: Mutex<Option<String>>,
    warnings: Mutex<Vec<String>>,
    bounce: Mutex<Vec<AlignedBuf>>,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    preallocation: Mutex<&'static str>,
    pool: Option<rayon::ThreadPool>,
}

/// Name of the filesystem type behind `fd` (from `fstatfs`).
pub fn fs_type_of_fd(fd: RawFd) -> String {
    // SAFETY: fstatfs writes into the zeroed buffer on our stack.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable statfs buffer on our stack.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return "unknown".into();
    }
    fs_type_name(st.f_type as i64)
}

/// Name of the filesystem holding `path`.
pub fn fs_type_of_path(path: &Path) -> String {
    let Ok(c) = cpath(path) else {
        return "unknown".into();
    };
    // SAFETY: c is a valid C string; st is zeroed on our stack.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string; `st` a writable buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    fs_type_name(st.f_type as i64)
}

/// Filesystem magic numbers (linux/magic.h) to names.
pub fn fs_type_name(magic: i64) -> String {
    let m = magic as u32;
    match m {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x9123_683e => "btrfs",
        0x0BD0_0BD0 => "lustre",
        0x6573_5546 => "fuse",
        0x2fc1_2fc1 => "zfs",
        0xFF53_4D42 => "cifs",
        0x0027_e0eb => "cgroup",
        0x6165_676c => "pstorefs",
        0x7366_7362 => "sysfs",
        0x9fa0 => "proc",
        0x0187 => "autofs",
        0x5346_544e => "ntfs",
        0x4d44 => "vfat",
        0xf2f5_2010 => "f2fs",
        0x0000_9123 => "btrfs",
        0x47504653 => "gpfs",
        0x0BAD_1DEA => "futexfs",
        0x6E66_7364 => "nfsd",
        0x5345_4c46 => "selinuxfs",
        0x01021997 => "v9fs",
        0x1373 => "devfs",
        0x6a656a63 => "fakeowner",
        _ => return format!("unknown(0x{m:x})"),
    }
    .into()
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("path {} contains a NUL byte", p.display())))
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Free bytes available to unprivileged users on the filesystem of `path`;
/// `None` where the filesystem reports no capacity at all (ramfs).
pub fn free_bytes(path: &Path) -> Result<Option<u64>> {
    let c = cpath(path)?;
    // SAFETY: c is a valid C string; st is zeroed on our stack.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string; `st` a writable buffer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::last_os("statvfs", path, 0, 0));
    }
    if st.f_blocks == 0 {
        return Ok(None);
    }
    Ok(Some(st.f_bavail as u64 * st.f_frsize as u64))
}

/// Try to switch O_DIRECT on (or off) for an open file with `fcntl(F_SETFL)`.
/// The kernel applies the same check as `open(O_DIRECT)`: a filesystem
/// without direct I/O support answers EINVAL.
fn set_o_direct(fd: RawFd, on: bool) -> std::result::Result<(), i32> {
    // SAFETY: plain fcntl calls on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno());
    }
    let new = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `pread`/`pwrite` until every byte has moved, retrying short transfers
/// and EINTR. A read that meets the end of the file, or a write that moves
/// nothing, is an error.
///
/// # Safety
/// `buf` must be valid for `len` bytes: writable for reads, readable for
/// writes.
unsafe fn transfer_all(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    offset: u64,
    dir: Dir,
) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let off = (offset + done as u64) as libc::off_t;
        // SAFETY: buf + done .. buf + len is inside the caller's range.
        let n = unsafe {
            match dir {
                Dir::Read => libc::pread(fd, buf.add(done).cast(), len - done, off),
                Dir::Write => libc::pwrite(fd, buf.add(done).cast(), len - done, off),
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(match dir {
                Dir::Write => std::io::Error::from_raw_os_error(libc::ENOSPC),
                Dir::Read => std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file ended before the slot did (was it truncated?)",
                ),
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// # Safety
/// As [`transfer_all`] for writes.
unsafe fn pwrite_all(fd: RawFd, buf: *const u8, len: usize, offset: u64) -> std::io::Result<()> {
    // SAFETY: forwarded; a write only reads `buf`.
    unsafe { transfer_all(fd, buf as *mut u8, len, offset, Dir::Write) }
}

/// # Safety
/// As [`transfer_all`] for reads.
unsafe fn pread_all(fd: RawFd, buf: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    // SAFETY: forwarded.
    unsafe { transfer_all(fd, buf, len, offset, Dir::Read) }
}

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
struct Worker<'a> {
    storage: &'a DiskStorage,
    bounce: Option<AlignedBuf>,
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

impl Worker<'_> {
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

/// Called on the I/O worker for each block of a batch, with the block's
/// index in the batch and its memory address: before a write is issued,
/// after a read succeeded (checksums are computed here, overlapping other
/// workers' I/O).
pub type Hook<'a> = &'a (dyn Fn(usize, usize) + Sync);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
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
        crate::error::check_sizes(num_blocks, block_size)?;
        if opts.io_depth == 0 || opts.io_depth > 1024 {
            return Err(Error::InvalidArgument(format!(
                "io_depth must be between 1 and 1024, got {}",
                opts.io_depth
            )));
        }
        let is_dir = path.is_dir();
        if opts.persist && is_dir {
            return Err(Error::InvalidArgument(format!(
                "persist=True needs a file path, but {} is a directory",
                path.display()
            )));
        }
        if !opts.persist && !is_dir {
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
        // Capacity check before anything is created. The exact stride needs
        // the file's alignment; estimate with the common 4096 and check again
        // once the file is open.
        let est_stride = crate::align::round_up(block_size, DEFAULT_ALIGNMENT);
        let est_size = (est_stride as u64).checked_mul(num_blocks).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "num_blocks * block_size overflows: {num_blocks} * {block_size}"
            ))
        })?;

        let existing = opts.persist && path.exists();
        if !existing {
            check_space(&dir, est_size, path)?;
        }

        let (fd, anonymous, created) = if opts.persist {
            crate::index::check_parent(path)?;
            let (fd, anon, created) = open_named(path)?;
            // One process per store: a second open is refused, not corrupted.
            // SAFETY: flock on a descriptor we own; released when it closes.
            let lock = || unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if opts.lock && lock() != 0 {
                let e = errno();
                if created {
                    let _ = std::fs::remove_file(path);
                }
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
            (fd, anon, created)
        } else {
            (open_anonymous(&dir)?, true, false)
        };
        let display_path = if anonymous {
            dir.join("<anonymous>")
        } else {
            path.to_path_buf()
        };
        // From here on, a failure must remove a file we created.
        let cleanup = |e: Error| -> Error {
            if created {
                let _ = std::fs::remove_file(path);
            }
            e
        };

        let fs_type = fs_type_of_fd(fd.as_raw_fd());
        let mut fallback_reason = None;
        let mut warnings = Vec::new();
        let mut direct = false;
        match opts.o_direct {
            ODirect::Off => {
                fallback_reason = Some("O_DIRECT disabled by configuration".to_string());
            }
            ODirect::Auto | ODirect::Require => match set_o_direct(fd.as_raw_fd(), true) {
                Ok(()) => direct = true,
                Err(e) if e == libc::EINVAL || e == libc::EOPNOTSUPP => {
                    let reason = format!(
                        "the {fs_type} filesystem at {} refused O_DIRECT ({} from fcntl(F_SETFL, O_DIRECT))",
                        dir.display(),
                        errno_name(e)
                    );
                    if opts.o_direct == ODirect::Require {
                        return Err(cleanup(Error::ODirectUnavailable(format!(
                            "{reason}; o_direct=\"require\" was asked. Use a filesystem that \
                             supports direct I/O (ext4, xfs) or allow the buffered fallback"
                        ))));
                    }
                    warnings.push(format!(
                        "{reason}; falling back to buffered I/O for this storage"
                    ));
                    fallback_reason = Some(reason);
                }
                Err(e) => {
                    return Err(cleanup(Error::io(
                        "fcntl(O_DIRECT)",
                        &display_path,
                        0,
                        0,
                        std::io::Error::from_raw_os_error(e),
                    )))
                }
            },
        }

        let align = opts
            .alignment
            .unwrap_or_else(|| Alignment::discover(fd.as_raw_fd()));
        let stride = align.round_up(block_size);
        let size = (stride as u64).checked_mul(num_blocks).ok_or_else(|| {
            cleanup(Error::InvalidArgument(format!(
                "num_blocks * slot_stride overflows: {num_blocks} * {stride}"
            )))
        })?;

        let storage = DiskStorage {
            fd: RwLock::new(Some(fd)),
            path: display_path,
            anonymous,
            num_blocks,
            block_size,
            stride,
            align,
            io_depth: opts.io_depth,
            max_io_bytes: opts.max_io_bytes.max(stride),
            fs_type,
            mode: opts.o_direct,
            direct: AtomicBool::new(direct),
            direct_proven: AtomicBool::new(false),
            fallback_reason: Mutex::new(fallback_reason),
            warnings: Mutex::new(warnings),
            bounce: Mutex::new(Vec::new()),
            bytes_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            preallocation: Mutex::new("existing"),
            pool: io::pool(opts.io_depth, "dynblock-io"),
        };

        let cur_len = storage.file_len().map_err(cleanup)?;
        if existing && !created {
            if cur_len != size {
                return Err(Error::InvalidArgument(format!(
                    "{} holds {cur_len} bytes but {num_blocks} slots of {stride} bytes \
                     (block_size {block_size}) need {size}: it was made with another \
                     geometry; delete it or open it with the geometry it was made with",
                    path.display()
                )));
            }
        } else {
            if size > est_size {
                check_space(&dir, size, path).map_err(cleanup)?;
            }
            storage.preallocate(size, opts.prealloc).map_err(cleanup)?;
        }
        storage.probe().map_err(cleanup)?;
        Ok(storage)
    }

    fn raw_fd(&self) -> Result<(std::sync::RwLockReadGuard<'_, Option<OwnedFd>>, RawFd)> {
        let g = self.fd.read().unwrap_or_else(|p| p.into_inner());
        let fd = g
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or(Error::Closed("DiskStorage"))?;
        Ok((g, fd))
    }

    fn file_len(&self) -> Result<u64> {
        let (_g, fd) = self.raw_fd()?;
        // SAFETY: fstat into a zeroed buffer on our stack.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a writable stat buffer on our stack.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(Error::last_os("fstat", &self.path, 0, 0));
        }
        Ok(st.st_size as u64)
    }

    /// Reserve `size` bytes: fallocate, else zero-fill (or sparse).
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
            let e = errno();
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
            self.warn(format!(
                "the disk tier {why}: {} is a sparse file of {size} bytes, so running out \
                 of space (ENOSPC) can happen later, during writes",
                self.path.display()
            ));
            return Ok(());
        }
        // Zero-fill with aligned writes, 8 MiB at a time.
        let chunk = (8usize << 20).max(self.stride);
        let chunk = crate::align::round_up(chunk, self.align.offset);
        let zeros = AlignedBuf::new(chunk, self.align.mem.max(DEFAULT_ALIGNMENT))?;
        let mut off = 0u64;
        while off < size {
            let n = chunk.min((size - off) as usize);
            // SAFETY: zeros is valid for chunk >= n bytes.
            let r = unsafe { pwrite_all(fd, zeros.as_ptr(), n, off) };
            match r {
                Ok(()) => {
                    if self.direct.load(Ordering::Relaxed) {
                        self.direct_proven.store(true, Ordering::Relaxed);
                    }
                    off += n as u64
                }
                Err(err) if self.should_fall_back(&err) => {
                    self.fall_back(fd, "write", &err)?;
                }
                Err(err) if self.direct_refused(&err) => return Err(self.require_error("write")),
                Err(err) => {
                    return Err(Error::io(
                        "pwrite(zero-fill)",
                        &self.path,
                        off,
                        n as u64,
                        err,
                    ))
                }
            }
        }
        self.set_preallocation("zero-fill");
        Ok(())
    }

    /// One small direct read and write at open (the first alignment unit,
    /// written back unchanged), so a filesystem that accepts the O_DIRECT
    /// flag but fails the I/O is found now rather than mid-batch. Both are
    /// needed: a read of never-written space does not reach the device.
    fn probe(&self) -> Result<()> {
        if !self.direct.load(Ordering::Relaxed) || self.direct_proven.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (_g, fd) = self.raw_fd()?;
        let n = self.align.offset;
        let mut buf = AlignedBuf::new(n, self.align.mem.max(DEFAULT_ALIGNMENT))?;
        // SAFETY: buf is valid for n bytes (both calls).
        let r = unsafe { pread_all(fd, buf.as_mut_ptr(), n, 0) }
            .map_err(|e| ("read", e))
            .and_then(|()| unsafe { pwrite_all(fd, buf.as_ptr(), n, 0) }.map_err(|e| ("write", e)));
        match r {
            Ok(()) => {
                self.direct_proven.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err((what, err)) if self.should_fall_back(&err) => self.fall_back(fd, what, &err),
            Err((what, err)) if self.direct_refused(&err) => Err(self.require_error(what)),
            Err((what, err)) => Err(Error::io(
                if what == "read" {
                    "pread(probe)"
                } else {
                    "pwrite(probe)"
                },
                &self.path,
                0,
                n as u64,
                err,
            )),
        }
    }

    /// EINVAL from direct I/O before any direct I/O has worked means the
    /// filesystem's real requirements differ from what it told us.
    fn should_fall_back(&self, err: &std::io::Error) -> bool {
        self.mode == ODirect::Auto && self.direct_refused(err)
    }

    fn direct_refused(&self, err: &std::io::Error) -> bool {
        err.raw_os_error() == Some(libc::EINVAL)
            && self.direct.load(Ordering::Relaxed)
            && !self.direct_proven.load(Ordering::Relaxed)
    }

    fn require_error(&self, what: &str) -> Error {
        Error::ODirectUnavailable(format!(
            "the first direct {what} on the {} filesystem at {} failed with EINVAL \
             (alignment {} from {}); o_direct=\"require\" was asked, so there is no \
             buffered fallback",
            self.fs_type,
            self.path.display(),
            self.align.offset,
            self.align.source.as_str()
        ))
    }

    fn fall_back(&self, fd: RawFd, what: &str, err: &std::io::Error) -> Result<()> {
        let mut reason = self
            .fallback_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.direct.load(Ordering::Relaxed) {
            return Ok(()); // another worker already switched
        }
        if let Err(e) = set_o_direct(fd, false) {
            return Err(Error::io(
                "fcntl(clear O_DIRECT)",
                &self.path,
                0,
                0,
                std::io::Error::from_raw_os_error(e),
            ));
        }
        self.direct.store(false, Ordering::Relaxed);
        let r = format!(
            "the first direct {what} on the {} filesystem at {} failed with {} \
             (alignment {} from {})",
            self.fs_type,
            self.path.display(),
            errno_name(err.raw_os_error().unwrap_or(0)),
            self.align.offset,
            self.align.source.as_str()
        );
        self.warn(format!(
            "{r}; falling back to buffered I/O for this storage"
        ));
        *reason = Some(r);
        Ok(())
    }

    fn set_preallocation(&self, how: &'static str) {
        *self.preallocation.lock().unwrap_or_else(|p| p.into_inner()) = how;
    }

    /// How the file's space was reserved: "fallocate", "zero-fill",
    /// "sparse", or "existing" (a persistent file reopened).
    pub fn preallocation(&self) -> &'static str {
        *self.preallocation.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn warn(&self, msg: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
    }

    /// Warnings produced since the last call (the Python layer logs them).
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn bounce_len(&self) -> usize {
        crate::align::round_up(self.max_io_bytes, self.align.offset)
    }

    /// Byte offset of a slot in the file: the one place this is computed.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        slot * self.stride as u64
    }

    fn max_slots_per_io(&self) -> usize {
        (self.max_io_bytes / self.stride).max(1)
    }

    /// Check a batch's sizes and slot ids before any byte moves (duplicate
    /// slots in a write batch are refused in `run_batch`, also before I/O).
    fn validate(&self, slots: &[u64], buf_len: usize) -> Result<()> {
        let want = slots.len().saturating_mul(self.block_size);
        if buf_len != want {
            return Err(Error::Buffer(format!(
                "buffer holds {buf_len} bytes but {} slots of block_size {} need exactly {want}",
                slots.len(),
                self.block_size
            )));
        }
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

    /// Validate, run, count: the one path every batch takes.
    ///
    /// # Safety
    /// `addr_of(i)` is valid for block i (see the public callers).
    unsafe fn batch(
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
        io::run_on(
            self.pool.as_ref(),
            groups.len(),
            self.io_depth,
            || {
                Ok(Worker {
                    storage: self,
                    bounce: None,
                })
            },
            |g, w| {
                let group = &ops[groups[g].clone()];
                let run_hook = || {
                    if let Some(h) = hook {
                        for op in group {
                            for k in 0..op.count {
                                h(order[op.first + k], op.addr + k * self.block_size);
                            }
                        }
                    }
                };
                // Writes: checksum first, so the device reads bytes the CPU
                // just pulled into cache. Reads: after the data arrived.
                if dir == Dir::Write {
                    run_hook();
                }
                // SAFETY: each op covers its own disjoint memory.
                unsafe { self.do_group(fd, group, dir, w) }?;
                if dir == Dir::Read {
                    run_hook();
                }
                Ok(())
            },
        )
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
    unsafe fn do_group(&self, fd: RawFd, group: &[Op], dir: Dir, w: &mut Worker) -> Result<()> {
        loop {
            let direct = self.direct.load(Ordering::Relaxed);
            // SAFETY: forwarded.
            match unsafe { self.try_group(fd, group, dir, direct, w) } {
                Ok(()) => {
                    if direct && !self.direct_proven.load(Ordering::Relaxed) {
                        self.direct_proven.store(true, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(f) => {
                    let what = if dir == Dir::Read { "read" } else { "write" };
                    if direct && self.should_fall_back(&f.err) {
                        self.fall_back(fd, what, &f.err)?;
                        continue;
                    }
                    if direct && self.direct_refused(&f.err) {
                        return Err(self.require_error(what));
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
    ) -> std::result::Result<(), IoFail> {
        let in_place = self.stride == self.block_size
            && (!direct
                || group
                    .iter()
                    .all(|op| is_aligned(op.addr as *const u8, self.align.mem)));
        if in_place {
            // SAFETY: forwarded.
            unsafe { self.vectored(fd, group, dir) }?;
            if dir == Dir::Write && !direct {
                let len = group.iter().map(|op| op.count * self.stride).sum::<usize>();
                self.drop_cache(fd, self.slot_offset(group[0].slot), len as u64);
            }
            return Ok(());
        }
        for op in group {
            // SAFETY: forwarded.
            unsafe { self.try_copying(fd, op, dir, direct, w) }?;
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
        let bs = self.block_size;
        let file_off = self.slot_offset(group[0].slot);
        let iov: Vec<libc::iovec> = group
            .iter()
            .map(|op| libc::iovec {
                iov_base: op.addr as *mut libc::c_void,
                iov_len: op.count * bs,
            })
            .collect();
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
                self.drop_cache(fd, file_off, (op.count * stride) as u64);
            }
            return Ok(());
        }
        // Direct I/O through the worker's aligned bounce buffer.
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
                        std::ptr::copy_nonoverlapping(user.add(k * bs), bp.add(k * stride), bs);
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
                    unsafe {
                        std::ptr::copy_nonoverlapping(bp.add(k * stride), user.add(k * bs), bs)
                    };
                }
                Ok(())
            }
        }
    }

    /// Buffered writes: start write-back and drop the pages, so a large
    /// disk tier does not fill the page cache.
    fn drop_cache(&self, fd: RawFd, off: u64, len: u64) {
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

    /// Close the file. Waits for batches in flight; idempotent.
    pub fn close(&self) {
        let mut g = self.fd.write().unwrap_or_else(|p| p.into_inner());
        g.take();
        self.bounce
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn is_closed(&self) -> bool {
        self.fd.read().unwrap_or_else(|p| p.into_inner()).is_none()
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
    pub fn alignment(&self) -> Alignment {
        self.align
    }
    pub fn o_direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn anonymous(&self) -> bool {
        self.anonymous
    }
    pub fn fs_type(&self) -> &str {
        &self.fs_type
    }
    pub fn io_depth(&self) -> usize {
        self.io_depth
    }
    pub fn file_size(&self) -> u64 {
        self.num_blocks * self.stride as u64
    }
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

fn check_space(dir: &Path, need: u64, target: &Path) -> Result<()> {
    let Some(avail) = free_bytes(dir)? else {
        return Ok(()); // no capacity reported (ramfs): nothing to compare with
    };
    if need > avail {
        return Err(Error::Capacity(format!(
            "not enough free space for the disk tier at {}: need {need} bytes ({:.2} GiB), \
             the filesystem has {avail} bytes ({:.2} GiB) available; \
             free space, choose another directory, or use fewer blocks",
            target.display(),
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// `O_TMPFILE` in `dir`; where unsupported, a uniquely named file that is
/// unlinked at once. Either way nothing is left behind, even after kill -9
/// (except in the instant between create and unlink on the fallback path).
fn open_anonymous(dir: &Path) -> Result<OwnedFd> {
    let c = cpath(dir)?;
    // SAFETY: c is a valid C string; the returned fd is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just returned by open and is owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let e = errno();
    if !matches!(
        e,
        libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT
    ) {
        return Err(Error::io(
            "open(O_TMPFILE)",
            dir,
            0,
            0,
            std::io::Error::from_raw_os_error(e),
        ));
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            ".dynblock-{}-{}-{:x}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        let p = dir.join(name);
        let cp = cpath(&p)?;
        // SAFETY: cp is a valid C string.
        let fd = unsafe {
            libc::open(
                cp.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            if errno() == libc::EEXIST {
                continue;
            }
            return Err(Error::last_os("open", &p, 0, 0));
        }
        // SAFETY: fresh fd from open.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: cp is a valid C string.
        if unsafe { libc::unlink(cp.as_ptr()) } != 0 {
            return Err(Error::last_os("unlink", &p, 0, 0));
        }
        return Ok(owned);
    }
    Err(Error::InvalidArgument(format!(
        "could not create a unique temporary file in {}",
        dir.display()
    )))
}

/// Create `path` exclusively (0600, no symlink following) or open the
/// existing regular file. Returns (fd, anonymous=false, created).
fn open_named(path: &Path) -> Result<(OwnedFd, bool, bool)> {
    let c = cpath(path)?;
    // SAFETY: c is a valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: fresh fd from open.
        return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, false, true));
    }
    if errno() != libc::EEXIST {
        return Err(Error::last_os("open", path, 0, 0));
    }
    // SAFETY: c is a valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = errno();
        let mut err = Error::io("open", path, 0, 0, std::io::Error::from_raw_os_error(e));
        if e == libc::ELOOP {
            err = Error::InvalidArgument(format!(
                "{} is a symbolic link; dynblock does not follow links for its cache file",
                path.display()
            ));
        }
        return Err(err);
    }
    // SAFETY: fresh fd from open.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat into a zeroed buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable stat buffer on our stack.
    if unsafe { libc::fstat(owned.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::last_os("fstat", path, 0, 0));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not a regular file",
            path.display()
        )));
    }
    Ok((owned, false, false))
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
                    io_depth: 4,
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
}
