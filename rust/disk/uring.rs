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
use std::os::fd::RawFd;
use std::sync::Mutex;

use io_uring::{opcode, squeue, types, IoUring};

use super::batch::{Hook, Worker};
use super::os::Dir;
use super::DiskStorage;
use crate::error::Result;
use crate::io::Op;

/// Rings kept for the next batch (one per batch running at once, at most
/// [`Rings::KEEP`] kept idle).
pub(super) struct Rings {
    entries: u32,
    idle: Mutex<Vec<IoUring>>,
}

impl Rings {
    const KEEP: usize = 4;

    /// Rings of room for `depth` operations in flight. Err: the kernel
    /// refuses io_uring (too old, `kernel.io_uring_disabled`, a seccomp
    /// filter), with its reason; one ring is made to find out and kept.
    pub(super) fn new(depth: usize) -> std::io::Result<Self> {
        let entries = (depth.clamp(1, 4096) as u32).next_power_of_two();
        let first = IoUring::new(entries)?;
        Ok(Rings {
            entries,
            idle: Mutex::new(vec![first]),
        })
    }

    fn take(&self) -> std::io::Result<IoUring> {
        let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match kept {
            Some(r) => Ok(r),
            None => IoUring::new(self.entries),
        }
    }

    fn give(&self, ring: IoUring) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < Self::KEEP {
            idle.push(ring);
        }
    }
}

/// A ring taken for one batch. Dropped, also while unwinding, it first
/// waits for every operation in flight, so the kernel never touches the
/// caller's memory once the call is gone; then a healthy ring goes back.
struct Flight<'r> {
    rings: &'r Rings,
    /// Always Some until the drop gives it back.
    ring: Option<IoUring>,
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
        self.ring.as_mut().expect("held until dropped")
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

/// Bytes of checksummed writes pushed before they are handed to the kernel.
const SUBMIT_EVERY: usize = 1 << 20;

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
        loop {
            // Keep the device busy first: push up to `depth`. When checksums
            // are computed between pushes, hand the kernel each MiB as it is
            // pushed (otherwise the first write would wait for every checksum).
            let mut pushed = false;
            let mut unsent = 0usize;
            while !flight.broken
                && flight.inflight < depth
                && next < groups.len()
                && !flight.ring().submission().is_full()
            {
                let g = next;
                let r = groups[g].clone();
                let off = self.slot_offset(ops[r.start].slot);
                if dir == Dir::Write {
                    run_hook(g); // the CRC reads bytes the device is about to read
                }
                let len = u32::try_from(want(g)).expect("a group is at most max_io_bytes");
                let sqe = match (dir, r.len()) {
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
                    (Dir::Write, n) => opcode::Writev::new(file, iov[r.start..].as_ptr(), n as u32)
                        .offset(off)
                        .build(),
                    (Dir::Read, n) => opcode::Readv::new(file, iov[r.start..].as_ptr(), n as u32)
                        .offset(off)
                        .build(),
                };
                let sqe: squeue::Entry = sqe.user_data(g as u64);
                // SAFETY: the memory and iovecs the entry points at outlive
                // its completion: `iov` and the caller's buffers live through
                // this call, and `flight` waits for every operation in flight
                // before it is dropped (also while unwinding), which happens
                // before `iov` is. The queue was checked not full.
                unsafe { flight.ring().submission().push(&sqe) }.expect("checked not full");
                next += 1;
                flight.inflight += 1;
                pushed = true;
                unsent += len as usize;
                if dir == Dir::Write && hook.is_some() && unsent >= SUBMIT_EVERY {
                    flight.submit(false);
                    unsent = 0;
                }
            }
            // Then check what completed last time (read checksums), while
            // the refilled queue moves: handed to the kernel first. Otherwise
            // the wait below submits it in the same call.
            if pushed && dir == Dir::Read && hook.is_some() && !done.is_empty() {
                flight.submit(false);
            }
            for (g, res) in done.drain(..) {
                if usize::try_from(res).ok() == Some(want(g)) {
                    if dir == Dir::Read {
                        run_hook(g);
                    }
                } else {
                    redo.push(g); // an error or a short transfer: done again, synchronously
                }
            }
            if flight.inflight == 0 {
                break; // all done, or broken with nothing in flight
            }
            flight.submit(true);
            done = flight.reap();
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
            unsafe { self.do_group(fd, group, dir, &mut w) }?;
            if dir == Dir::Read {
                run_hook(g);
            }
        }
        Ok(true)
    }
}
