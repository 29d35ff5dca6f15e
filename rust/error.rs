//! One error type for the whole engine. The Python layer converts it once
//! (`python/mod.rs`), so every failure reaches users with the same shape.

use std::io;
use std::path::PathBuf;

/// Every failure the engine can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed. Carries what we were doing, on which
    /// file, where, how many bytes, and the errno (inside `source`).
    #[error("{op} failed on {path} (offset {offset}, length {len}): {source}{hint}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
        hint: String,
    },
    /// A caller argument is outside what the call accepts.
    #[error("{0}")]
    InvalidArgument(String),
    /// A slot or block index is out of range.
    #[error("{0}")]
    Index(String),
    /// A caller buffer has the wrong size, layout or is not writable.
    #[error("{0}")]
    Buffer(String),
    /// Not enough space (disk or memory) for what was asked.
    #[error("{0}")]
    Capacity(String),
    /// The storage was closed.
    #[error("{0} is closed")]
    Closed(&'static str),
    /// O_DIRECT was required but the filesystem refuses it.
    #[error("{0}")]
    ODirectUnavailable(String),
    /// Alignment cannot be satisfied.
    #[error("{0}")]
    Alignment(String),
    /// NUMA placement failed where it was required.
    #[error("{0}")]
    Numa(String),
    /// Pinning (mlock) failed where it was required.
    #[error("{0}")]
    Pin(String),
    /// A persistent store is open elsewhere (another process, or another
    /// storage object of this process).
    #[error("{0}")]
    Locked(String),
    /// A storage made before fork() was used in the child.
    #[error("{0}")]
    Forked(String),
    /// The remote tier (Redis/Valkey) refused or could not be reached at open.
    #[error("{0}")]
    Remote(String),
    /// The kernel refuses a facility a setting requires (io_uring).
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Build an I/O error from the current errno.
    pub fn last_os(op: &'static str, path: &std::path::Path, offset: u64, len: u64) -> Self {
        Self::io(op, path, offset, len, io::Error::last_os_error())
    }

    pub fn io(
        op: &'static str,
        path: &std::path::Path,
        offset: u64,
        len: u64,
        source: io::Error,
    ) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::ENOSPC) => {
                "; the filesystem is full: free space or use a smaller disk tier".to_string()
            }
            Some(libc::EDQUOT) => "; disk quota exceeded".to_string(),
            _ => String::new(),
        };
        Error::Io {
            op,
            path: path.to_path_buf(),
            offset,
            len,
            source,
            hint,
        }
    }

    /// The errno of an OS error, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A batch's buffer must hold exactly `n` units (blocks or slots) of
/// `block_size` bytes: the one check and message, wherever a batch enters.
pub fn check_batch_len(
    name: &str,
    len: usize,
    n: usize,
    unit: &str,
    block_size: usize,
) -> Result<()> {
    let want = n.saturating_mul(block_size);
    if len != want {
        return Err(Error::Buffer(format!(
            "{name} holds {len} bytes but {n} {unit} of block_size {block_size} need exactly {want}"
        )));
    }
    Ok(())
}

/// Name of an errno value (`EINVAL`), for messages.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOSPC => "ENOSPC",
        libc::EIO => "EIO",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::EISDIR => "EISDIR",
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ELOOP => "ELOOP",
        libc::ENOSYS => "ENOSYS",
        libc::EFAULT => "EFAULT",
        libc::EXDEV => "EXDEV",
        _ => "errno",
    }
}

/// Warnings a tier gathered (a fallback taken, a state change), kept until
/// the Python layer takes and logs them.
#[derive(Default)]
pub struct Warnings(std::sync::Mutex<Vec<String>>);

impl Warnings {
    pub fn new(first: Vec<String>) -> Self {
        Warnings(std::sync::Mutex::new(first))
    }

    pub fn push(&self, msg: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(msg);
    }

    /// The warnings since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
