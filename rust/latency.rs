//! Latency histograms of the calls an engine waits on (lookups, loads,
//! stores): fixed buckets of atomic counters, recorded without a lock and
//! read whenever metrics are scraped.
//!
//! One call in [`SAMPLE`], chosen at random (a per-thread xorshift), is
//! timed: two clock reads and two atomic adds cost about 60 ns here, 20% of
//! a 300 ns `match`; sampled, the cost is a few ns on average. The
//! histograms' counts and sums are those of the sampled calls; their
//! distribution is the calls' distribution.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One call in this many is timed.
pub const SAMPLE: u64 = 32;

/// Seeds of the threads' dice: each thread takes the next.
static SEEDS: AtomicU64 = AtomicU64::new(0x2545_F491_4F6C_DD1D);

thread_local! {
    /// This thread's xorshift64 state (0 until its first use: then seeded).
    static DICE: Cell<u64> = const { Cell::new(0) };
}

/// Whether to time this call: true one time in [`SAMPLE`], at random.
fn sampled() -> bool {
    DICE.with(|d| {
        let mut x = d.get();
        if x == 0 {
            x = SEEDS.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.set(x);
        x % SAMPLE == 0
    })
}

/// Upper bounds of the buckets, in microseconds (the last bucket, past
/// these, is `+Inf`): 50 us to 10 s, roughly 1-2.5-5 per decade.
pub const BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// One histogram: a count per bucket and the sum of every duration.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// For a sampled call (see the module docs), a timer that records its
    /// lifetime here when dropped.
    pub fn time(&self) -> Option<Timer<'_>> {
        sampled().then(|| Timer {
            h: self,
            start: Instant::now(),
        })
    }

    /// (count per bucket, the last past every bound; sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let counts = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        (counts, self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// See [`Histogram::time`].
pub struct Timer<'a> {
    h: &'a Histogram,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.h.record(self.start.elapsed());
    }
}

/// The manager's histograms.
#[derive(Default)]
pub struct Latencies {
    /// `lookup` and `match`.
    pub lookup: Histogram,
    /// `get` (with its remote fetch) and a lease's load.
    pub load: Histogram,
    /// `put` (with a synchronous remote write).
    pub store: Histogram,
}

impl Latencies {
    pub fn all(&self) -> [(&'static str, &Histogram); 3] {
        [
            ("lookup", &self.lookup),
            ("load", &self.load),
            ("store", &self.store),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_bucket() {
        let h = Histogram::default();
        h.record(Duration::from_micros(10)); // <= 50 us
        h.record(Duration::from_micros(50)); // <= 50 us (bounds are inclusive)
        h.record(Duration::from_micros(51)); // <= 100 us
        h.record(Duration::from_secs(60)); // +Inf
        let (c, sum) = h.snapshot();
        assert_eq!((c[0], c[1], c[BOUNDS_US.len()]), (2, 1, 1));
        assert_eq!(c.iter().sum::<u64>(), 4);
        assert!((sum - 60.000111).abs() < 1e-9);
    }

    #[test]
    fn about_one_call_in_sample_is_timed() {
        let h = Histogram::default();
        let n = 64_000;
        for _ in 0..n {
            drop(h.time());
        }
        let timed: u64 = h.snapshot().0.iter().sum();
        let want = n / SAMPLE;
        assert!(
            timed > want * 8 / 10 && timed < want * 12 / 10,
            "{timed} of {n}"
        );
    }
}
