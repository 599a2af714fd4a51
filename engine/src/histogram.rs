//! Latency histograms cheap enough for the read path: a fixed set of
//! buckets of relaxed atomic counters, no lock and no floating point when a
//! value is observed (docs/statistics.md, "Latency histograms").
//!
//! # Buckets
//! Upper bounds are powers of two of nanoseconds, from 2^10 ns (1.024 µs)
//! to 2^36 ns (68.7 s), 27 bounds, then an overflow bucket (+Inf): a value
//! of `ns` nanoseconds goes to the first bucket whose bound is `>= ns`, as
//! Prometheus' `le` ("less or equal") wants. Powers of two make the bucket
//! one `leading_zeros`; each bucket is twice as wide as the one before, so
//! any quantile read off them is within a factor of two, over the range
//! from a page cache hit to a stalled device.
//!
//! # Cost
//! [`Histogram::observe_ns`] is two relaxed `fetch_add`s (the bucket and the
//! sum); the count is the buckets' total, added up by
//! [`Histogram::snapshot`], so the `+Inf` bucket and `_count` always agree.
//! A [`Stopwatch`] reads the clock only while [`stats_enabled`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// log2 of the first bucket's upper bound in nanoseconds (1.024 µs).
const FIRST_BOUND_LOG2: u32 = 10;
/// log2 of the last finite upper bound in nanoseconds (68.7 s).
const LAST_BOUND_LOG2: u32 = 36;
/// Buckets: one per finite bound, and the overflow bucket.
pub const HISTOGRAM_BUCKETS: usize = (LAST_BOUND_LOG2 - FIRST_BOUND_LOG2 + 2) as usize;

static STATS_ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether the engine and the FUSE front time what they do (default on).
/// Callers check it before reading the clock; while it is off no histogram
/// of the engine or the front is observed.
pub fn stats_enabled() -> bool {
    STATS_ENABLED.load(Ordering::Relaxed)
}

/// Turns statistics collection on the hot paths on or off, process-wide.
pub fn set_stats_enabled(enabled: bool) {
    STATS_ENABLED.store(enabled, Ordering::Relaxed);
}

/// A fixed-bucket latency histogram (see the module docs for the buckets).
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Histogram")
            .field("count", &s.count)
            .field("sum_seconds", &s.sum_seconds)
            .finish()
    }
}

/// The bucket of a value of `ns` nanoseconds.
fn bucket_of(ns: u64) -> usize {
    // ceil(log2(ns)) for ns >= 2: the bits of ns - 1. A bound 2^k holds
    // values up to and including 2^k.
    let log2_ceiling = u64::BITS - ns.saturating_sub(1).leading_zeros();
    (log2_ceiling.saturating_sub(FIRST_BOUND_LOG2) as usize).min(HISTOGRAM_BUCKETS - 1)
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; HISTOGRAM_BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one value.
    pub fn observe(&self, elapsed: Duration) {
        self.observe_ns(elapsed.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Counts one value of `ns` nanoseconds.
    pub fn observe_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        // Wraps after 584 years of summed latency.
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The upper bounds of the buckets in seconds, the last `f64::INFINITY`.
    pub fn bounds_seconds() -> Vec<f64> {
        (FIRST_BOUND_LOG2..=LAST_BOUND_LOG2)
            .map(|k| (1u64 << k) as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY))
            .collect()
    }

    /// The counts so far. Observations made while it is taken may be in the
    /// buckets and not yet in the sum, or the other way round.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            bounds_seconds: Histogram::bounds_seconds(),
            count: counts.iter().sum(),
            counts,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram's counts at one moment, for exporters.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Each bucket's upper bound (inclusive) in seconds; the last is +Inf.
    pub bounds_seconds: Vec<f64>,
    /// Values in each bucket alone (not cumulative), one per bound.
    pub counts: Vec<u64>,
    /// Values observed: the sum of `counts`.
    pub count: u64,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Values at or below each bound (Prometheus' `_bucket{le=...}`).
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |total, c| {
                *total += c;
                Some(*total)
            })
            .collect()
    }
}

/// A start time, taken only while [`stats_enabled`]: timing costs one
/// relaxed load when statistics are off.
#[derive(Clone, Copy, Debug)]
#[must_use = "a stopwatch times nothing until it is recorded"]
pub struct Stopwatch(Option<Instant>);

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch(stats_enabled().then(Instant::now))
    }

    /// Observes the time since [`Stopwatch::start`] in `histogram` (nothing
    /// when statistics were off at the start).
    pub fn record(self, histogram: &Histogram) {
        if let Some(start) = self.0 {
            histogram.observe(start.elapsed());
        }
    }
}

/// The engine's latency histograms ([`crate::Engine::latencies`]).
#[derive(Debug, Default)]
pub struct Latencies {
    /// Device reads: each `read_at`, and each `submit` batch of reads, from
    /// the engine's call to the last read's completion.
    pub device_read: Histogram,
    /// Device writes, timed the same way (a batch holding any write counts
    /// here).
    pub device_write: Histogram,
    /// Device cache flushes (fdatasync or FLUSH), kept apart so that write
    /// latency is the writes' own.
    pub device_flush: Histogram,
    /// Applying one pulled image layer ([`crate::Engine::record_apply`]).
    pub apply: Histogram,
    /// Start-ups: from a layer's creation to its first read.
    pub startup: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bucket_edges_are_inclusive_upper_bounds() {
        let bounds = Histogram::bounds_seconds();
        assert_eq!(bounds.len(), HISTOGRAM_BUCKETS);
        assert_eq!(bounds[0], 1.024e-6);
        assert_eq!(*bounds.last().unwrap(), f64::INFINITY);
        assert_eq!(bounds[HISTOGRAM_BUCKETS - 2], (1u64 << 36) as f64 / 1e9);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(1024), 0);
        assert_eq!(bucket_of(1025), 1);
        assert_eq!(bucket_of(2048), 1);
        assert_eq!(bucket_of(2049), 2);
        // Every bound holds itself, and the next nanosecond is one bucket up.
        for (i, k) in (FIRST_BOUND_LOG2..=LAST_BOUND_LOG2).enumerate() {
            assert_eq!(bucket_of(1 << k), i, "2^{k}");
            assert_eq!(bucket_of((1 << k) + 1), i + 1, "2^{k} + 1");
            assert!((1u64 << k) as f64 / 1e9 == bounds[i]);
        }
    }

    #[test]
    fn values_past_the_last_bound_overflow() {
        let h = Histogram::new();
        h.observe_ns((1 << LAST_BOUND_LOG2) + 1);
        h.observe_ns(u64::MAX);
        h.observe(Duration::from_secs(1 << 40));
        let s = h.snapshot();
        assert_eq!(s.counts[HISTOGRAM_BUCKETS - 1], 3);
        assert_eq!(s.count, 3);
        assert_eq!(*s.cumulative().last().unwrap(), 3);
        assert_eq!(s.cumulative()[HISTOGRAM_BUCKETS - 2], 0);
    }

    #[test]
    fn snapshot_counts_sums_and_accumulates() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(1));
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_millis(1));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert!(
            (s.sum_seconds - 0.001004).abs() < 1e-12,
            "{}",
            s.sum_seconds
        );
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[2], 1); // 3 µs <= 4.096 µs
        assert_eq!(s.counts[10], 1); // 1 ms <= 2^20 ns
        let c = s.cumulative();
        assert_eq!((c[0], c[1], c[2], c[9], c[10]), (1, 1, 2, 2, 3));
    }

    #[test]
    fn concurrent_observers_lose_nothing() {
        let h = Arc::new(Histogram::new());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe_ns((t * 10_000 + i) * 997);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.count, 40_000);
        let want: u64 = (0..40_000u64).map(|v| v * 997).sum();
        assert_eq!(s.sum_seconds, want as f64 / 1e9);
        let mut one_by_one = [0u64; HISTOGRAM_BUCKETS];
        for v in 0..40_000u64 {
            one_by_one[bucket_of(v * 997)] += 1;
        }
        assert_eq!(s.counts, one_by_one.to_vec());
    }

    #[test]
    fn a_stopwatch_started_while_off_records_nothing() {
        // What Stopwatch::start gives while statistics are off (the switch
        // itself is process-wide; tests/latency_histograms.rs turns it).
        let h = Histogram::new();
        Stopwatch(None).record(&h);
        assert_eq!(h.snapshot().count, 0);
        Stopwatch::start().record(&h);
        assert_eq!(h.snapshot().count, 1);
    }
}
