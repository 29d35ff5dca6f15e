//! Operating-system helpers of the disk tier: filesystem names, free space,
//! the O_DIRECT flag, whole-buffer `pread`/`pwrite`, and opening the file
//! (anonymous, or a named file that must be private to this user).
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
pub(crate) use crate::files::{cpath, errno};

/// Direction of a transfer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Dir {
    Read,
    Write,
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
pub(crate) fn set_o_direct(fd: RawFd, on: bool) -> std::result::Result<(), i32> {
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
pub(crate) unsafe fn transfer_all(
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
pub(crate) unsafe fn pwrite_all(
    fd: RawFd,
    buf: *const u8,
    len: usize,
    offset: u64,
) -> std::io::Result<()> {
    // SAFETY: forwarded; a write only reads `buf`.
    unsafe { transfer_all(fd, buf as *mut u8, len, offset, Dir::Write) }
}

/// # Safety
/// As [`transfer_all`] for reads.
pub(crate) unsafe fn pread_all(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    offset: u64,
) -> std::io::Result<()> {
    // SAFETY: forwarded.
    unsafe { transfer_all(fd, buf, len, offset, Dir::Read) }
}

pub(crate) fn check_space(dir: &Path, need: u64, target: &Path) -> Result<()> {
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
pub(crate) fn open_anonymous(dir: &Path) -> Result<OwnedFd> {
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

/// The request queue depth of the block device holding filesystem `dev`
/// (`/sys/dev/block/MAJ:MIN/queue/nr_requests`, or its parent's for a
/// partition). None where there is no such device (tmpfs, overlay, NFS).
pub(crate) fn device_queue_depth(dev: u64) -> Option<usize> {
    let base = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    ["queue/nr_requests", "../queue/nr_requests"]
        .iter()
        .find_map(|rel| std::fs::read_to_string(format!("{base}/{rel}")).ok())
        .and_then(|s| s.trim().parse().ok())
}
