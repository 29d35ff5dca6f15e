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
/// handed out. An idle thread sleeps on a condition variable: it takes no
/// CPU between batches (a work-stealing pool's idle threads spin in
/// `sched_yield` first, which cost most of the CPU of large disk batches).
/// Batches of several callers share the threads, first come first served.
/// Dropping it joins its threads, so a closed storage leaves none behind.
pub struct Pool {
    shared: std::sync::Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// A forked child has none of the threads (and may hold a copy of the
    /// queue's lock taken by one of them).
    fork: crate::process::ForkGuard,
}

/// A batch's request for workers: `tickets` more threads may run `f`.
struct Job {
    id: u64,
    /// The batch's worker function with its lifetime erased: valid until
    /// its caller saw every taken ticket finish, which it waits for before
    /// returning (see [`Pool::run`]).
    f: *const (dyn Fn() + Sync + 'static),
    tickets: usize,
    taken: usize,
    finished: usize,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

// SAFETY: `f` points to a `Sync` closure that outlives every use (see `Job`).
unsafe impl Send for Job {}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    next_id: u64,
    started: usize,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Work arrived (or the pool stops).
    work: std::sync::Condvar,
    /// A batch completed (or a thread started).
    done: std::sync::Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a job of `tickets` runs of `f` (see [`Job`]); its id.
    fn post(&self, f: *const (dyn Fn() + Sync + 'static), tickets: usize) -> u64 {
        let mut q = self.lock();
        let id = q.next_id;
        q.next_id += 1;
        q.jobs.push(Job {
            id,
            f,
            tickets,
            taken: 0,
            finished: 0,
            panic: None,
        });
        id
    }

    /// Wait until job `id` has no ticket left (`withdraw`: take back those
    /// not taken yet) and every taken one finished; remove it and hand back
    /// a run's panic.
    fn finish(&self, id: u64, withdraw: bool) -> Option<Box<dyn std::any::Any + Send>> {
        let mut q = self.lock();
        loop {
            let job = q.jobs.iter_mut().find(|j| j.id == id).expect("own job");
            if withdraw {
                job.tickets = 0;
            }
            if job.tickets == 0 && job.finished == job.taken {
                break;
            }
            q = self.done.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let at = q.jobs.iter().position(|j| j.id == id).expect("own job");
        q.jobs.remove(at).panic
    }

    /// A pool thread: take a ticket of the oldest job that has one, run it,
    /// report it; sleep while there is none; end when the pool stops.
    fn serve(&self) {
        let mut q = self.lock();
        loop {
            if q.stop {
                return;
            }
            let Some(job) = q.jobs.iter_mut().find(|j| j.tickets > 0) else {
                q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            job.tickets -= 1;
            job.taken += 1;
            let (id, f) = (job.id, job.f);
            drop(q);
            // SAFETY: the job's caller keeps `f` alive until this ticket is
            // reported finished below.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*f)() }));
            q = self.lock();
            if let Some(job) = q.jobs.iter_mut().find(|j| j.id == id) {
                job.finished += 1;
                if let Err(p) = r {
                    job.panic.get_or_insert(p);
                }
                // Its caller is woken once, when the batch is complete (not
                // at every ticket: a context switch each).
                if job.tickets == 0 && job.finished == job.taken {
                    self.done.notify_all();
                }
            }
        }
    }
}

impl Pool {
    /// Run `f` on `workers` of the pool's threads at once (as they become
    /// free) and wait for all of them; a panic in one is raised here. (The
    /// pool cannot stop meanwhile: dropping it needs it unborrowed.)
    pub fn run(&self, workers: usize, f: &(dyn Fn() + Sync)) {
        if self.fork.forked() {
            // A forked child: the threads are not there; the caller works.
            for _ in 0..workers {
                f();
            }
            return;
        }
        // SAFETY: only the lifetime is erased; this call does not return
        // before every ticket was taken and has finished running `f` (the
        // wait below).
        let f: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let id = self.shared.post(f, workers);
        self.shared.work.notify_all();
        if let Some(p) = self.shared.finish(id, false) {
            std::panic::resume_unwind(p);
        }
    }

    /// Run `f` on the calling thread and on at most `helpers` pool threads
    /// that take it up while the caller runs it (a free thread is woken for
    /// each); return once the caller's run and every helper's have ended,
    /// without waiting for threads that were busy elsewhere. `f` shares its
    /// work out itself and must return at once when none is left.
    pub fn help(&self, helpers: usize, f: &(dyn Fn() + Sync)) {
        if helpers == 0 || self.fork.forked() {
            f();
            return;
        }
        // SAFETY: only the lifetime is erased; `Helped` below does not let
        // this call end (returning or unwinding) before every ticket is
        // either withdrawn untaken or finished.
        let g: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let id = self.shared.post(g, helpers);
        for _ in 0..helpers {
            self.shared.work.notify_one();
        }
        let helped = Helped {
            shared: &self.shared,
            id,
        };
        f();
        if let Some(p) = helped.end() {
            std::panic::resume_unwind(p);
        }
    }

    fn on_pool_thread(&self) -> bool {
        let me = std::thread::current().id();
        self.threads.iter().any(|t| t.thread().id() == me)
    }
}

/// A [`Pool::help`] job while its caller runs: ending it (or dropping it,
/// when the caller's run panics) withdraws the tickets no thread took and
/// waits for the taken ones.
struct Helped<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Helped<'_> {
    /// Withdraw, wait, and hand back a helper's panic.
    fn end(self) -> Option<Box<dyn std::any::Any + Send>> {
        let p = self.shared.finish(self.id, true);
        std::mem::forget(self);
        p
    }
}

impl Drop for Helped<'_> {
    fn drop(&mut self) {
        let _ = self.shared.finish(self.id, true);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.fork.forked() {
            // A forked child: nothing to stop or join (and the lock may be
            // a copy of one a parent's thread held).
            std::mem::forget(std::mem::take(&mut self.threads));
            return;
        }
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        // A pool thread cannot wait for itself to end.
        if self.on_pool_thread() {
            return;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A [`Pool`] of `threads` threads named `{name}-{i}` at nice `nice`
/// (None when the OS refuses the threads: batches then use scoped threads).
pub fn pool(threads: usize, name: &str, nice: u32) -> Option<Pool> {
    let shared = std::sync::Arc::new(Shared::default());
    let mut p = Pool {
        shared: shared.clone(),
        threads: Vec::new(),
        fork: crate::process::ForkGuard::new("worker pool"),
    };
    for i in 0..threads.max(1) {
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                lower_priority(nice);
                s.lock().started += 1;
                s.done.notify_all();
                s.serve();
            })
            .ok()?; // dropping `p` stops and joins the threads made so far
        p.threads.push(t);
    }
    // Handed out only once every thread runs at its nice value.
    let q = shared.lock();
    let n = p.threads.len();
    let _ = shared
        .done
        .wait_timeout_while(q, POOL_WAIT, |q| q.started < n)
        .unwrap_or_else(|p| p.into_inner());
    Some(p)
}

/// How long starting a pool's threads is waited for.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Lower the calling thread's priority for background work: raise its nice
/// value to `nice` (never lower it: that would need privileges and would
/// take CPU from the caller's threads; on Linux nice is per thread) and, when
/// `nice` is above 0, ask for a long time slice ([`WORKER_SLICE`]). Best
/// effort: a failure leaves the priority as it was, which changes only who
/// wins a busy CPU.
///
/// Why the slice: with the EEVDF scheduler (Linux 6.6 and later) a thread
/// that wakes up on a busy core waits for the running thread's slice to end
/// (often until the next tick, 4 ms at HZ=250) unless its own slice is the
/// shorter one (Linux 6.12 and later, where a thread may set its slice). A
/// worker with a longer slice than the default one (0.7-3 ms) is preempted at
/// once by an engine thread that wakes (its scheduler loop, a ticking Python
/// thread); its share of the CPU is unchanged (that is the nice value's).
/// Earlier kernels ignore the setting.
pub fn lower_priority(nice: u32) {
    // SAFETY: gettid and get/setpriority on the calling thread take no pointers.
    let now = unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() != 0 {
            return;
        }
        if now < nice as i32 {
            libc::setpriority(libc::PRIO_PROCESS, tid, nice as i32);
        }
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    if nice > 0 {
        long_slice(now);
    }
}

/// The time slice worker threads ask for (see [`lower_priority`]).
pub const WORKER_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// `struct sched_attr` of `sched_setattr(2)` (its first version, 48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Set the calling thread's slice to [`WORKER_SLICE`], keeping its policy
/// (only the fair ones: normal and batch) and its nice value `nice`.
fn long_slice(nice: i32) {
    // SAFETY: sched_getscheduler on the calling thread takes no pointers.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return;
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: policy as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: WORKER_SLICE.as_nanos() as u64,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr(0, attr, 0) reads `attr` (a live, initialised
    // struct whose `size` says how much) for the calling thread only.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
}

/// Run `work(op_index, worker_state)` for every index in `0..n` on up to
/// `depth` threads of `pool` (scoped threads when there is no pool). Each
/// worker owns one `S` made by `init` (e.g. a bounce buffer). Stops handing
/// out work at the first error and returns the error of the lowest index
/// that failed: every index below a failed one was handed out before it and
/// runs, so that is the batch's first failure in order, whichever thread
/// failed first.
pub fn run_on<S, I, F>(pool: Option<&Pool>, n: usize, depth: usize, init: I, work: F) -> Result<()>
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
    // (index, error); a worker whose `init` failed reports usize::MAX.
    let first_err: Mutex<Option<(usize, Error)>> = Mutex::new(None);
    let worker = || {
        let fail = |i: usize, e: Error| {
            failed.store(true, Ordering::Relaxed);
            let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().map_or(true, |&(j, _)| i < j) {
                *slot = Some((i, e));
            }
        };
        let mut s = match init() {
            Ok(s) => s,
            Err(e) => return fail(usize::MAX, e),
        };
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            if let Err(e) = work(i, &mut s) {
                return fail(i, e);
            }
        }
    };
    match pool {
        Some(p) => p.run(workers, &worker),
        None => std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(worker);
            }
        }),
    }
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some((_, e)) => Err(e),
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
                on,
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
    fn run_reports_the_failure_of_the_lowest_index_whichever_thread_fails_first() {
        // Op 2 fails late, op 3 at once: the error is op 2's, as a serial
        // run's would be.
        let p = pool(4, "test-order", 0);
        for on in [p.as_ref(), None] {
            let r = run_on(
                on,
                8,
                4,
                || Ok(()),
                |i, _| match i {
                    2 => {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Err(Error::InvalidArgument("op 2".into()))
                    }
                    3 => Err(Error::InvalidArgument("op 3".into())),
                    _ => Ok(()),
                },
            );
            assert!(
                matches!(r, Err(Error::InvalidArgument(ref m)) if m == "op 2"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn help_shares_the_work_with_free_threads_and_each_item_runs_once() {
        let p = pool(2, "test-help", 0).unwrap();
        let seen: Vec<AtomicUsize> = (0..400).map(|_| AtomicUsize::new(0)).collect();
        let next = AtomicUsize::new(0);
        let me = std::thread::current().id();
        let others = AtomicUsize::new(0);
        p.help(2, &|| {
            while let Some(s) = seen.get(next.fetch_add(1, Ordering::Relaxed)) {
                s.fetch_add(1, Ordering::Relaxed);
                if std::thread::current().id() != me {
                    others.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        assert!(others.load(Ordering::Relaxed) > 0, "no pool thread helped");
        // Its job is gone: the pool's threads are free for the next caller.
        assert!(p.shared.lock().jobs.is_empty());
    }

    #[test]
    fn help_does_not_wait_for_busy_threads_and_passes_on_a_helpers_panic() {
        let p = pool(1, "test-help-busy", 0).unwrap();
        let release = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            // The pool's only thread is busy until the helped caller is done.
            s.spawn(|| {
                p.run(1, &|| {
                    release.wait();
                })
            });
            while p.shared.lock().jobs.first().map_or(true, |j| j.taken == 0) {
                std::thread::yield_now();
            }
            let ran = AtomicUsize::new(0);
            p.help(1, &|| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(ran.load(Ordering::Relaxed), 1, "only the caller ran it");
            release.wait();
        });
        let hit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let me = std::thread::current().id();
            p.help(1, &|| {
                if std::thread::current().id() != me {
                    panic!("helper failed");
                }
                // The caller waits here until the helper has taken its ticket.
                while p.shared.lock().jobs.iter().all(|j| j.taken == 0) {
                    std::thread::yield_now();
                }
            });
        }));
        assert!(hit.is_err(), "the helper's panic reaches the caller");
        assert!(p.shared.lock().jobs.is_empty());
    }

    #[test]
    fn batches_of_several_callers_share_a_pool_and_each_runs_every_op() {
        let p = pool(3, "test-share", 0).unwrap();
        std::thread::scope(|s| {
            for caller in 0..6usize {
                let p = &p;
                s.spawn(move || {
                    for round in 0..20usize {
                        let n = 50 + caller * 7 + round;
                        let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        run_on(
                            Some(p),
                            n,
                            4,
                            || Ok(()),
                            |i, _| {
                                seen[i].fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            },
                        )
                        .unwrap();
                        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panic_in_a_pool_worker_reaches_the_caller_and_the_pool_lives_on() {
        let p = pool(2, "test-panic", 0).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_on(
                Some(&p),
                10,
                2,
                || Ok(()),
                |i, _| {
                    assert!(i != 3, "op 3 panics");
                    Ok(())
                },
            )
        }));
        assert!(r.is_err());
        let done = AtomicUsize::new(0);
        run_on(
            Some(&p),
            10,
            2,
            || Ok(()),
            |_, _| {
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 10);
        drop(p); // joins its threads
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
