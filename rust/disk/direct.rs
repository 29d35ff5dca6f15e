//! The O_DIRECT state of one file: whether direct I/O is on, whether a
//! direct I/O has succeeded yet ("proven"), and why it is off. The one place
//! that decides about the buffered fallback:
//! - at open, a filesystem that refuses the O_DIRECT flag (EINVAL or
//!   EOPNOTSUPP from `fcntl`) falls back at once;
//! - later, an EINVAL from a direct I/O *before any direct I/O worked* means
//!   the filesystem's real requirements differ from what it reported: the
//!   file switches to buffered I/O and the I/O is retried;
//! - once a direct I/O has worked, EINVAL is an ordinary error.
//!
//! With [`ODirect::Require`] there is no fallback: the same situations raise
//! [`Error::ODirectUnavailable`].

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::os::set_o_direct;
use crate::error::{errno_name, Error, Result};
use crate::settings::ODirect;

pub(crate) struct DirectIo {
    mode: ODirect,
    on: AtomicBool,
    proven: AtomicBool,
    reason: Mutex<Option<String>>,
    /// "the ext4 filesystem at /path", for messages.
    place: String,
    /// "alignment 512 from statx", for messages.
    alignment: String,
}

impl DirectIo {
    pub(crate) fn new(
        mode: ODirect,
        on: bool,
        reason: Option<String>,
        place: String,
        alignment: String,
    ) -> Self {
        DirectIo {
            mode,
            on: AtomicBool::new(on),
            proven: AtomicBool::new(false),
            reason: Mutex::new(reason),
            place,
            alignment,
        }
    }

    pub(crate) fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(crate) fn proven(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
    }

    /// A direct I/O worked: from now on EINVAL is an ordinary error.
    pub(crate) fn mark_proven(&self) {
        if self.on() && !self.proven() {
            self.proven.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// EINVAL from direct I/O before any direct I/O has worked.
    pub(crate) fn refused(&self, err: &std::io::Error) -> bool {
        err.raw_os_error() == Some(libc::EINVAL) && self.on() && !self.proven()
    }

    /// Whether `err` should switch the file to buffered I/O (and retry).
    pub(crate) fn should_fall_back(&self, err: &std::io::Error) -> bool {
        self.mode == ODirect::Auto && self.refused(err)
    }

    pub(crate) fn require_error(&self, what: &str) -> Error {
        Error::ODirectUnavailable(format!(
            "the first direct {what} on {} failed with EINVAL ({}); o_direct=\"require\" was \
             asked, so there is no buffered fallback",
            self.place, self.alignment
        ))
    }

    /// Turn O_DIRECT off on `fd` and record why. Returns the warning to log,
    /// or None when another worker already switched.
    pub(crate) fn fall_back(
        &self,
        fd: RawFd,
        path: &std::path::Path,
        what: &str,
        err: &std::io::Error,
    ) -> Result<Option<String>> {
        let reason = format!(
            "the first direct {what} on {} failed with {} ({})",
            self.place,
            errno_name(err.raw_os_error().unwrap_or(0)),
            self.alignment
        );
        self.switch_off(fd, path, reason)
    }

    /// Turn O_DIRECT off for `reason` (e.g. the store's layout does not fit
    /// this filesystem's alignment). Returns the warning to log, or None
    /// when it was already off.
    pub(crate) fn switch_off(
        &self,
        fd: RawFd,
        path: &std::path::Path,
        reason: String,
    ) -> Result<Option<String>> {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if !self.on() {
            return Ok(None);
        }
        if let Err(e) = set_o_direct(fd, false) {
            return Err(Error::io(
                "fcntl(clear O_DIRECT)",
                path,
                0,
                0,
                std::io::Error::from_raw_os_error(e),
            ));
        }
        self.on.store(false, Ordering::Relaxed);
        let warning = format!("{reason}; falling back to buffered I/O for this storage");
        *r = Some(reason);
        Ok(Some(warning))
    }
}
