//! What a storage must know about the process that owns it.
//!
//! - **fork()**: a child inherits the storages' memory but none of their I/O
//!   threads (a batch that waits for a worker never returns), and it shares
//!   the parent's file descriptors and file lock, so both would write one
//!   file with separate slot maps. A `pthread_atfork` child handler bumps a
//!   generation counter; every storage remembers the generation it was made
//!   in ([`ForkGuard`]) and refuses to work in another one.
//! - **One open per store per process**: `flock` cannot tell two opens of one
//!   file in the same process from an open in another process, so open
//!   persistent stores are also registered here by (device, inode).
//! - **Cores**: how many the process may run on, for work split across threads.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use crate::error::{Error, Result};

/// Cores this process may run on (CPU affinity and cgroup quota), read once.
pub fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

static FORKS: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Only an atomic add: async-signal-safe, as a fork handler must be.
    FORKS.fetch_add(1, Ordering::SeqCst);
}

/// How many times this process image has been the child of a fork since the
/// handler was installed (installed by the first call).
pub fn fork_generation() -> u64 {
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic; no
        // prepare/parent handlers.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    FORKS.load(Ordering::SeqCst)
}

/// Remembers the process a storage was made in.
#[derive(Debug)]
pub struct ForkGuard {
    generation: u64,
    pid: u32,
    what: &'static str,
}

impl ForkGuard {
    pub fn new(what: &'static str) -> Self {
        ForkGuard {
            generation: fork_generation(),
            pid: std::process::id(),
            what,
        }
    }

    /// Ok in the process that made the storage; a clear error in a forked child.
    pub fn check(&self) -> Result<()> {
        if FORKS.load(Ordering::SeqCst) == self.generation {
            return Ok(());
        }
        Err(Error::Forked(format!(
            "this {} was opened in process {} and cannot be used in a child made by fork() \
             (process {}): the child has none of its I/O threads and would share its file with \
             the parent. Open the store in the child after forking, or start worker processes \
             with multiprocessing's \"spawn\" or \"forkserver\" start method",
            self.what,
            self.pid,
            std::process::id()
        )))
    }

    /// True in a forked child (where nothing may be written on the parent's behalf).
    pub fn forked(&self) -> bool {
        self.check().is_err()
    }
}

fn open_stores() -> std::sync::MutexGuard<'static, BTreeSet<(u64, u64)>> {
    static OPEN: Mutex<BTreeSet<(u64, u64)>> = Mutex::new(BTreeSet::new());
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds a persistent file's registration while it is open in this process.
#[derive(Debug)]
pub struct OpenStore {
    key: (u64, u64),
}

impl OpenStore {
    /// Register `(dev, ino)`; false when it is already open in this process.
    pub fn register(dev: u64, ino: u64) -> Option<OpenStore> {
        let inserted = open_stores().insert((dev, ino));
        inserted.then(|| OpenStore { key: (dev, ino) })
    }
}

impl Drop for OpenStore {
    fn drop(&mut self) {
        open_stores().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_registers_once_until_dropped() {
        let a = OpenStore::register(u64::MAX, 7).expect("first");
        assert!(OpenStore::register(u64::MAX, 7).is_none());
        drop(a);
        assert!(OpenStore::register(u64::MAX, 7).is_some());
    }

    #[test]
    fn the_guard_passes_in_its_own_process() {
        let g = ForkGuard::new("test storage");
        assert!(g.check().is_ok() && !g.forked());
    }
}
