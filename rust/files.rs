//! Store-file safety, shared by the disk tier's data file and the index:
//! files are created exclusively and private (0600, no symlink followed),
//! an existing one must be a regular file of this user with no group or
//! other permissions (checked on the open descriptor), its directory must
//! not let others swap it, and new store ids come from the kernel.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `p` as a C string for the syscalls.
pub(crate) fn cpath(p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("path {} contains a NUL byte", p.display())))
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The calling thread's errno.
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Refuse a directory that others could use to swap our files: world-
/// writable without the sticky bit, or owned by another (non-root) user.
pub(crate) fn check_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let md = std::fs::metadata(&parent).map_err(|e| Error::io("stat", &parent, 0, 0, e))?;
    let mode = md.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} is world-writable without the sticky bit; a persistent store there could be \
             replaced by another user. Use a private directory (chmod o-w or chmod +t)",
            parent.display()
        )));
    }
    use std::os::unix::fs::MetadataExt;
    let me = euid();
    if md.uid() != me && md.uid() != 0 {
        return Err(Error::InvalidArgument(format!(
            "{} is owned by uid {}, not by this process (uid {me}); a persistent store must live in \
             a directory owned by its user or root",
            parent.display(),
            md.uid()
        )));
    }
    Ok(())
}

/// File identity and size from `fstat`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub uid: u32,
    pub mode: u32,
}

pub(crate) fn fstat(fd: RawFd, path: &Path) -> Result<FileStat> {
    // SAFETY: fstat into a zeroed buffer on our stack.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable stat buffer on our stack.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(Error::last_os("fstat", path, 0, 0));
    }
    Ok(FileStat {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        uid: st.st_uid,
        mode: st.st_mode,
    })
}

/// An existing store file must be a regular file private to this user:
/// owned by the effective uid, with no group or other permissions. Checked
/// on the opened descriptor, so a file swapped in after a path check is
/// caught too. In a sticky world-writable directory (`/tmp`) another user
/// could otherwise plant the files first and read or forge the cache.
pub(crate) fn check_private_file(fd: RawFd, path: &Path, what: &str) -> Result<FileStat> {
    let st = fstat(fd, path)?;
    if st.mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not a regular file",
            path.display()
        )));
    }
    let me = euid();
    if st.uid != me {
        return Err(Error::InvalidArgument(format!(
            "the {what} {} is owned by uid {}, not by this process (uid {me}); dynblock does \
             not use store files that another user could have written or can read. Delete it \
             (or choose another path) if it is not yours",
            path.display(),
            st.uid
        )));
    }
    if st.mode & 0o077 != 0 {
        return Err(Error::InvalidArgument(format!(
            "the {what} {} has permissions {:04o}, which let other users read or write it; \
             dynblock keeps store files private (0600). If it is yours, `chmod 600` it",
            path.display(),
            st.mode & 0o7777
        )));
    }
    Ok(st)
}

/// Create `path` exclusively (0600, no symlink following) or open the
/// existing regular file, which must be private to this user
/// ([`check_private_file`]). Returns (fd, created).
pub(crate) fn open_named(path: &Path) -> Result<(OwnedFd, bool)> {
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
        return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, true));
    }
    if errno() != libc::EEXIST {
        return Err(Error::last_os("open", path, 0, 0));
    }
    // SAFETY: c is a valid C string. O_NONBLOCK: a FIFO planted at the path
    // must not block the open (it is refused just below).
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
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
    check_private_file(owned.as_raw_fd(), path, "store data file")?;
    // SAFETY: clear O_NONBLOCK again on our own descriptor (a regular file).
    unsafe {
        let fl = libc::fcntl(owned.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(owned.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok((owned, false))
}

/// Remove `path` if it is still the file `st` describes (a file this call
/// created; never one that replaced it meanwhile).
pub(crate) fn remove_if_same(path: &Path, st: &FileStat) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.dev() == st.dev && md.ino() == st.ino {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// 16 random bytes from the kernel (`getrandom`).
pub(crate) fn random_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    let mut got = 0usize;
    while got < id.len() {
        // SAFETY: writes at most 16 - got bytes into our buffer.
        let n = unsafe { libc::getrandom(id[got..].as_mut_ptr().cast(), id.len() - got, 0) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(Error::last_os("getrandom", Path::new("<kernel>"), 0, 16));
        }
        got += n as usize;
    }
    Ok(id)
}

/// A store id as 32 hex digits, for messages.
pub(crate) fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Open (or create, 0600) the index file, never following a symlink.
pub(crate) fn open_private(path: &Path, create: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
    if create {
        o.create_new(true);
    }
    o.open(path)
}

/// A fresh name beside `path` for a file that is written, synced and then
/// renamed over `path`: `<path>.<tag>-<12 random hex digits>`.
pub(crate) fn temp_beside(path: &Path, tag: &str) -> PathBuf {
    let suffix = random_id()
        .map(|id| id_hex(&id)[..12].to_string())
        .unwrap_or_else(|_| std::process::id().to_string());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{tag}-{suffix}"));
    PathBuf::from(name)
}

/// Remove what [`temp_beside`]`(path, tag)` names were left by a process that
/// died before its rename (regular files of this user only). For an opener
/// that holds the store exclusively: a reader must not, a writer may be
/// mid-rename.
pub(crate) fn remove_temps_beside(path: &Path, tag: &str) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.{tag}-", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let me = euid();
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            if let Ok(md) = e.path().symlink_metadata() {
                if md.is_file() && md.uid() == me {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// fsync the directory holding `path` (a rename or a new file in it).
pub(crate) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
