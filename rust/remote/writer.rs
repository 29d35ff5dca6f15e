//! Writes: `store` (a sync put, from the caller's buffer) and the
//! background writer, which takes queued hashes (bounded by `queue_bytes`),
//! reads each block from the local tiers straight into its `SET` command
//! and streams pipelined batches, every batch bounded by its own deadline.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;

use super::conn::Deadline;
use super::side::{self, Heads};
use super::{LocalSource, RemoteTier, Space};
use crate::keys::Key;

#[derive(Default)]
pub(super) struct Queue {
    /// Blocks to send (their local key, and their namespace's keys on the
    /// server); the writer reads their bytes from the local tiers.
    pub(super) items: VecDeque<(Key, Space)>,
    pub(super) busy: bool,
    /// Batches the writer has finished (sent, or given up on).
    pub(super) done: u64,
    pub(super) stop: bool,
}

/// `read(i, f)`: hand block `i`'s bytes to `f`; false when it is gone.
type ReadBlock<'a> = dyn FnMut(usize, &mut dyn FnMut(&[u8], Option<u32>)) -> bool + 'a;

/// Buffers a storing thread reuses from batch to batch (no allocation or
/// page fault per block once they have grown).
#[derive(Default)]
pub(super) struct Writer {
    cmd: redis::Cmd,
    packed: Vec<u8>,
}

pub(super) fn writer_loop(weak: std::sync::Weak<RemoteTier>) {
    let mut w = Writer::default();
    let mut scratch = Vec::new();
    loop {
        let Some(t) = weak.upgrade() else { return };
        let batch: Vec<(Key, Space)> = {
            let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.stop {
                return;
            }
            if q.items.is_empty() {
                q.busy = false;
                t.queue_cv.notify_all();
                let (g, _) = t
                    .queue_cv
                    .wait_timeout(q, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner());
                drop(g);
                continue;
            }
            let n = q.items.len().min(t.chunk_len());
            q.busy = true;
            q.items.drain(..n).collect()
        };
        crate::io::lower_priority(t.writer_nice.load(Ordering::Relaxed));
        let source = t.source.get().and_then(|s| s.upgrade());
        // Each block goes from the local tiers straight into its command; a
        // block gone from them before its turn is skipped.
        let hashes: Vec<u64> = batch.iter().map(|(k, _)| k.hash).collect();
        let keys: Vec<String> = batch.iter().map(|(k, s)| t.key(s, k.hash)).collect();
        t.store_from(
            &mut w,
            &hashes,
            &keys,
            None,
            &mut |i, f| {
                source
                    .as_ref()
                    .is_some_and(|s| s.with_local(batch[i].0, &mut scratch, f))
            },
            t.deadline(),
        );
        drop(source);
        let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.busy = false;
        q.done += 1;
        drop(q);
        t.queue_cv.notify_all();
    }
}

impl RemoteTier {
    /// Nice value of the background writer thread (the manager's
    /// `worker_nice`), applied before its next batch.
    pub fn set_writer_nice(&self, nice: u32) {
        self.writer_nice.store(nice, Ordering::Relaxed);
    }

    /// Store blocks (in `space`) now (`remote_write="sync"`), in pipelined
    /// batches, all before the deadline; returns how many were stored (0
    /// when the remote is down).
    ///
    /// # Safety
    /// Every `src[i]` is valid for reads of `block_size` bytes.
    pub unsafe fn store(&self, space: &Space, hashes: &[u64], src: &[usize], d: Deadline) -> usize {
        let bs = self.opts.block_size;
        let mut w = Writer::default();
        let keys: Vec<String> = hashes.iter().map(|&h| self.key(space, h)).collect();
        self.store_from(
            &mut w,
            hashes,
            &keys,
            Some(src),
            &mut |i, f| {
                // SAFETY: forwarded from the caller.
                f(
                    unsafe { std::slice::from_raw_parts(src[i] as *const u8, bs) },
                    None,
                );
                true
            },
            d,
        )
    }

    /// Store `hashes` under `all_keys` in pipelined batches, block `i`'s bytes being what
    /// `read(i, f)` hands to `f` (false: the block is gone, skipped). Each
    /// value is built once, in the command that carries it; the commands
    /// stream out in ~1 MiB writes (a buffer that stays in cache) and the
    /// answers are read after each batch. With the blocks' addresses at
    /// hand (`src`, each valid for reads of `block_size` bytes) and cores to
    /// spare, their headers are computed on side threads meanwhile
    /// ([`super::side`]). Returns how many were stored; the rest are
    /// counted as skipped.
    pub(super) fn store_from(
        &self,
        w: &mut Writer,
        hashes: &[u64],
        all_keys: &[String],
        src: Option<&[usize]>,
        read: &mut ReadBlock<'_>,
        d: Deadline,
    ) -> usize {
        let mut stored = 0;
        let mut start = 0;
        let mut refusal = None;
        let bs = self.opts.block_size;
        let side = src.map_or(0, |_| side::side_threads(bs, self.opts.check_threads));
        let heads = Heads::new(if side > 0 { hashes.len() } else { 0 });
        // The header of block i (its place in `hashes`), from `src`.
        let compute = |i: usize| {
            let src = src.expect("side threads only with src");
            // SAFETY: `src` (given only by `store`) holds addresses its
            // caller guarantees are valid for reads of `block_size` bytes.
            let block = unsafe { std::slice::from_raw_parts(src[i] as *const u8, bs) };
            self.header(hashes[i], &all_keys[i], block)
        };
        std::thread::scope(|sc| {
            // The side threads work through the whole call, ahead of the sender.
            let workers: Vec<_> = (0..side)
                .map(|t| {
                    let (heads, compute) = (&heads, &compute);
                    sc.spawn(move || heads.work(t, side, compute))
                })
                .collect();
            for chunk in hashes.chunks(self.chunk_len()) {
                if self.writes_paused() {
                    break;
                }
                let keys = &all_keys[start..start + chunk.len()];
                let mut took = 0;
                let mut refused: Option<(usize, String)> = None;
                let Writer { cmd, packed } = &mut *w;
                let r = self.round_trip(
                    keys,
                    super::Replies::Parsed(1024),
                    &d,
                    packed,
                    &mut |i, b| {
                        read(start + i, &mut |block, crc| {
                            let at = start + i;
                            let head = if side > 0 {
                                Some(heads.take(at, &compute, &|| workers[at % side].is_finished()))
                            } else {
                                crc.and_then(|c| self.header_with_crc(chunk[i], c))
                            };
                            self.set_command(cmd, chunk[i], &keys[i], block, head.as_ref());
                            cmd.write_packed_command(b);
                        })
                    },
                    &mut |_, v| match v {
                        Value::ServerError(e) => {
                            let r = refused.get_or_insert((0, String::new()));
                            if r.0 == 0 {
                                r.1 = super::conn::describe(&e);
                            }
                            r.0 += 1;
                        }
                        _ => took += 1,
                    },
                );
                stored += took;
                if let Err(e) = r {
                    // Down (or went down now): the rest is skipped.
                    self.failed(&e, &d);
                    break;
                }
                self.came_up();
                start += chunk.len();
                if let Some((count, mut why)) = refused {
                    if count > 1 {
                        why.push_str(&format!(" (and {} more refused)", count - 1));
                    }
                    refusal = Some(why);
                    break;
                }
            }
            heads.stop();
        });
        match refusal {
            Some(why) => self.refused(&why),
            None if stored > 0 => self.accepted(),
            None => {}
        }
        let skipped = hashes.len() - stored;
        self.stats
            .stored
            .fetch_add(stored as u64, Ordering::Relaxed);
        self.stats
            .skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
        stored
    }

    /// Where the background writer reads queued blocks (set once).
    pub fn set_source(&self, source: std::sync::Weak<dyn LocalSource>) {
        let _ = self.source.set(source);
    }

    /// Queue blocks (`hashes` of local namespace `ns`, whose keys on the
    /// server are `space`'s) for the background writer, which reads their
    /// bytes back from the local tiers (the caller copies nothing and never
    /// waits for the network). Blocks that do not fit the queue
    /// (`queue_bytes`), or arrive while the tier is down, are skipped and
    /// counted.
    pub fn enqueue(&self, space: &Space, ns: u32, hashes: &[u64]) -> usize {
        if self.writes_paused() || self.source.get().is_none() {
            self.stats
                .skipped
                .fetch_add(hashes.len() as u64, Ordering::Relaxed);
            return 0;
        }
        let cap = self.opts.queue_bytes / self.value_len(); // >= 1: checked at open
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let room = cap.saturating_sub(q.items.len()).min(hashes.len());
        q.items.extend(
            hashes[..room]
                .iter()
                .map(|&h| (Key::new(h, ns), space.clone())),
        );
        drop(q);
        if room < hashes.len() {
            self.stats
                .skipped
                .fetch_add((hashes.len() - room) as u64, Ordering::Relaxed);
        }
        self.queue_cv.notify_all();
        room
    }

    /// Wait until the background queue is written (or given up on); false
    /// after `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while !q.items.is_empty() || q.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .queue_cv
                .wait_timeout(q, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Blocks waiting in the background queue.
    pub fn queued(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items
            .len()
    }
}
