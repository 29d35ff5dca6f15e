//! The batched parallel I/O engine's building blocks: cutting a batch into
//! operations (adjacent slots coalesced), a long-lived worker pool per
//! storage (threads cost tens of microseconds each to create, so they are
//! made once, at open, and dropped at `close()`), running a batch on that
//! pool with at most `depth` operations in flight (scoped threads when there
//! is no pool), and streaming copies for large host transfers.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A raw pointer that may cross into the worker threads of one batch.
/// The batch's caller guarantees the memory outlives the batch and that
/// workers touch disjoint ranges.
#[derive(Clone, Copy, Debug)]
pub struct SendPtr(pub *mut u8);
// SAFETY: see the type's contract above; upheld by every caller of `run`.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. (A method, so closures capture the whole `SendPtr`.)
    pub fn get(self) -> *mut u8 {
        self.0
    }
}

/// One I/O: `count` consecutive slots starting at `slot`, whose bytes sit
/// block after block in memory from address `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub slot: u64,
    pub count: usize,
    pub addr: usize,
    /// Index in the batch of the op's first block.
    pub first: usize,
}

/// Cut a batch into operations: block `i` goes to `slots[i]` from memory at
/// `addr_of(i)`. Runs of consecutive slot ids whose memory is also
/// consecutive become one operation of at most `max_slots` slots.
pub fn coalesce(
    slots: &[u64],
    addr_of: impl Fn(usize) -> usize,
    block_size: usize,
    max_slots: usize,
) -> Vec<Op> {
    let max_slots = max_slots.max(1);
    let mut ops: Vec<Op> = Vec::with_capacity(slots.len());
    for (i, &s) in slots.iter().enumerate() {
        let a = addr_of(i);
        if let Some(last) = ops.last_mut() {
            if last.count < max_slots
                && last.slot + last.count as u64 == s
                && last.addr + last.count * block_size == a
            {
                last.count += 1;
                continue;
            }
        }
        ops.push(Op {
            slot: s,
            count: 1,
            addr: a,
            first: i,
        });
    }
    ops
}

/// A pool of long-lived worker threads for one storage, so a batch does not
/// pay for creating threads (tens of microseconds each), every thread
/// running at nice value `nice` (see [`lower_priority`]) before the pool is
/// handed out. Dropping it joins its threads (rayon's own pool only asks
/// them to stop), so a closed storage leaves no thread behind.
pub struct Pool {
    inner: Option<rayon::ThreadPool>,
    live: std::sync::Arc<Live>,
}

/// Threads of a [`Pool`] that have started (at their nice value) and that
/// have not yet ended.
#[derive(Default)]
struct Live {
    counts: Mutex<(usize, usize)>,
    cv: std::sync::Condvar,
}

impl Live {
    /// Wait (up to `limit`) until `done(started, alive)`.
    fn wait(&self, limit: std::time::Duration, done: impl Fn(usize, usize) -> bool) {
        let g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .cv
            .wait_timeout_while(g, limit, |c| !done(c.0, c.1))
            .unwrap_or_else(|p| p.into_inner());
    }

    fn change(&self, f: impl FnOnce(&mut (usize, usize))) {
        f(&mut self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        self.cv.notify_all();
    }
}

/// How long starting or joining a pool's threads is waited for (a thread
/// that has not started or ended by then is left to the OS).
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl std::ops::Deref for Pool {
    type Target = rayon::ThreadPool;
    fn deref(&self) -> &rayon::ThreadPool {
        self.inner
            .as_ref()
            .expect("a pool is used only until it is dropped")
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let Some(p) = self.inner.take() else { return };
        // A pool thread cannot wait for itself to end.
        let on_pool = p.current_thread_index().is_some();
        drop(p);
        if !on_pool {
            self.live.wait(POOL_WAIT, |_, alive| alive == 0);
        }
    }
}

/// A [`Pool`] of `threads` threads named `{name}-{i}` at nice `nice`
/// (None when the OS refuses the threads: batches then use scoped threads).
pub fn pool(threads: usize, name: &str, nice: u32) -> Option<Pool> {
    let name = name.to_string();
    let threads = threads.max(1);
    let live = std::sync::Arc::new(Live::default());
    let (on_start, on_exit) = (live.clone(), live.clone());
    let inner = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |_| {
            lower_priority(nice);
            on_start.change(|c| {
                c.0 += 1;
                c.1 += 1;
            });
        })
        .exit_handler(move |_| on_exit.change(|c| c.1 -= 1))
        .build()
        .ok()?;
    // Handed out only once every thread runs at its nice value.
    live.wait(POOL_WAIT, |started, _| started >= threads);
    Some(Pool {
        inner: Some(inner),
        live,
    })
}

/// Raise the calling thread's nice value to `nice` (never lower it: that
/// would need privileges and would take CPU from the caller's threads). On
/// Linux nice is per thread. Best effort: a failure leaves the priority as
/// it was, which changes only who wins a busy CPU.
pub fn lower_priority(nice: u32) {
    // SAFETY: gettid and get/setpriority on the calling thread take no pointers.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 && now < nice as i32 {
            libc::setpriority(libc::PRIO_PROCESS, tid, nice as i32);
        }
    }
}

/// Run `work(op_index, worker_state)` for every index in `0..n` on up to
/// `depth` threads of `pool` (scoped threads when there is no pool). Each
/// worker owns one `S` made by `init` (e.g. a bounce buffer). Stops handing
/// out work at the first error and returns it.
pub fn run_on<S, I, F>(
    pool: Option<&rayon::ThreadPool>,
    n: usize,
    depth: usize,
    init: I,
    work: F,
) -> Result<()>
where
    I: Fn() -> Result<S> + Sync,
    F: Fn(usize, &mut S) -> Result<()> + Sync,
{
    let workers = depth.max(1).min(n);
    if workers == 0 {
        return Ok(());
    }
    if workers == 1 {
        let mut s = init()?;
        for i in 0..n {
            work(i, &mut s)?;
        }
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let worker = || {
        let fail = |e: Error| {
            failed.store(true, Ordering::Relaxed);
            let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e);
            }
        };
        let mut s = match init() {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            if let Err(e) = work(i, &mut s) {
                return fail(e);
            }
        }
    };
    match pool {
        Some(p) => p.scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|_| worker());
            }
        }),
        None => std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(worker);
            }
        }),
    }
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Copy `len` bytes with non-temporal (streaming) stores where that pays:
/// large copies on x86-64. Regular stores would first read every
/// destination line into the cache (50% more memory traffic); glibc's
/// memcpy only streams above a threshold of several MiB, which the 1 MiB
/// pieces of a batched copy never reach.
///
/// # Safety
/// `src` valid for reads and `dst` for writes of `len` bytes; no overlap.
#[inline]
pub unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        if len >= 64 << 10 {
            // Head: bring dst to 16-byte alignment.
            let head = dst.align_offset(16).min(len);
            // SAFETY: inside both ranges (caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
            let body = (len - head) & !63;
            let mut off = head;
            // SAFETY: SSE2 is part of x86-64; dst + off is 16-byte aligned and
            // every access stays inside [0, head + body) of both ranges.
            unsafe {
                while off < head + body {
                    let s = src.add(off) as *const __m128i;
                    let d = dst.add(off) as *mut __m128i;
                    let a = _mm_loadu_si128(s);
                    let b = _mm_loadu_si128(s.add(1));
                    let c = _mm_loadu_si128(s.add(2));
                    let e = _mm_loadu_si128(s.add(3));
                    _mm_stream_si128(d, a);
                    _mm_stream_si128(d.add(1), b);
                    _mm_stream_si128(d.add(2), c);
                    _mm_stream_si128(d.add(3), e);
                    off += 64;
                }
                _mm_sfence();
                std::ptr::copy_nonoverlapping(src.add(off), dst.add(off), len - off);
            }
            return;
        }
    }
    // SAFETY: caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn coalesce_covers_every_slot_once(slots in proptest::collection::vec(0u64..64, 0..200), max in 1usize..10) {
            let ops = coalesce(&slots, |i| 1000 + i * 7, 7, max);
            let mut flat = Vec::new();
            for op in &ops {
                prop_assert!(op.count >= 1 && op.count <= max);
                prop_assert_eq!((op.addr - 1000) % 7, 0);
                prop_assert_eq!(op.addr, 1000 + op.first * 7);
                for k in 0..op.count {
                    flat.push((op.slot + k as u64, (op.addr - 1000) / 7 + k));
                }
            }
            let expect: Vec<(u64, usize)> = slots.iter().enumerate().map(|(i, &s)| (s, i)).collect();
            prop_assert_eq!(flat, expect);
        }
    }

    #[test]
    fn coalesce_needs_adjacent_memory_too() {
        // slots adjacent, memory not: two ops
        let ops = coalesce(&[4, 5], |i| [0, 100][i], 10, 8);
        assert_eq!(ops.len(), 2);
        let ops = coalesce(&[4, 5, 9], |i| i * 10, 10, 8);
        assert_eq!(
            ops,
            vec![
                Op {
                    slot: 4,
                    count: 2,
                    addr: 0,
                    first: 0
                },
                Op {
                    slot: 9,
                    count: 1,
                    addr: 20,
                    first: 2
                }
            ]
        );
    }

    #[test]
    fn run_reports_the_first_error_and_stops() {
        let p = pool(4, "test", 0);
        for on in [p.as_ref(), None] {
            let done = AtomicUsize::new(0);
            let r = run_on(
                on.map(|p| &**p),
                1000,
                4,
                || Ok(()),
                |i, _| {
                    done.fetch_add(1, Ordering::Relaxed);
                    if i == 10 {
                        Err(Error::InvalidArgument("boom".into()))
                    } else {
                        Ok(())
                    }
                },
            );
            assert!(matches!(r, Err(Error::InvalidArgument(_))));
            assert!(done.load(Ordering::Relaxed) < 1000);
        }
    }

    #[test]
    fn stream_copy_copies_any_alignment_and_length() {
        let src: Vec<u8> = (0..(300 << 10)).map(|i| (i * 7 % 251) as u8).collect();
        for (so, d_o, len) in [
            (0, 0, 300 << 10),
            (3, 5, (200 << 10) + 13),
            (1, 0, 70_000),
            (0, 9, 100),
        ] {
            let mut dst = vec![0u8; (300 << 10) + 64];
            // SAFETY: both ranges lie inside their vectors and do not overlap.
            unsafe { stream_copy(dst.as_mut_ptr().add(d_o), src.as_ptr().add(so), len) };
            assert_eq!(&dst[d_o..d_o + len], &src[so..so + len]);
            assert!(dst[..d_o].iter().all(|&x| x == 0));
            assert!(dst[d_o + len..].iter().all(|&x| x == 0));
        }
    }
}
