//! A lock-free, sliding-window latency histogram with bounded relative error.
//!
//! Values are bucketed log-linearly, as in HdrHistogram (Gil Tene): each power-of-two
//! range ("octave") of microseconds is split into [`SUB_BUCKETS`] equal sub-buckets, so a
//! value is known to within one sub-bucket, a relative width of at most `1/16`; quantiles
//! report the bucket midpoint, so the relative error is at most ≈3.1 %. Bucket indexes
//! come from integer bit arithmetic (leading zeros and the next four bits), with no
//! floating point on the recording path.
//!
//! The window slides in steps: it is divided into `slots` sub-windows of
//! `window / slots` each, stamped with the epoch (time ÷ slot length) they hold. A record
//! into a slot whose epoch is stale first resets it (whoever wins a compare-and-swap on the
//! epoch clears the counters). A quantile merges the slots whose epoch lies within the last
//! `slots` epochs, so it covers between `window × (slots-1)/slots` and `window` of history.
//! Records that race with a reset may be lost or counted in the new epoch; this is a
//! statistics window, not an audit log.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::duration_ns;

/// Sub-buckets per octave (power of two): 16, so bucket width ≤ 1/16 of its values.
pub const SUB_BUCKETS: usize = 16;
const SUB_BITS: u32 = SUB_BUCKETS.trailing_zeros();
/// Octaves tracked: octave 0 holds 0..16 µs exactly, octave k ≥ 1 holds
/// [2^(k+3), 2^(k+4)) µs, so 33 octaves reach 2^36 µs (≈19 h); larger values saturate.
const OCTAVES: usize = 33;
/// Buckets per slot.
pub const BUCKETS: usize = OCTAVES * SUB_BUCKETS;
const MAX_US: u64 = (1 << (OCTAVES as u32 + SUB_BITS - 1)) - 1;

/// Bucket index for a value in microseconds.
#[inline]
fn bucket_of(us: u64) -> usize {
    let us = us.min(MAX_US);
    if us < SUB_BUCKETS as u64 {
        return us as usize;
    }
    // Octave k (≥1) holds [16·2^(k-1), 16·2^k); within it, the four bits below the top one
    // select the sub-bucket.
    let top = 63 - us.leading_zeros(); // ≥ SUB_BITS
    let octave = (top - SUB_BITS + 1) as usize;
    let sub = ((us >> (top - SUB_BITS)) as usize) & (SUB_BUCKETS - 1);
    octave * SUB_BUCKETS + sub
}

/// Lower bound and width of a bucket, in microseconds.
#[inline]
fn bucket_range(index: usize) -> (u64, u64) {
    let octave = index / SUB_BUCKETS;
    let sub = (index % SUB_BUCKETS) as u64;
    if octave == 0 {
        return (sub, 1);
    }
    let width = 1u64 << (octave - 1);
    let low = (SUB_BUCKETS as u64 + sub) << (octave - 1);
    (low, width)
}

struct Slot {
    /// The epoch (time ÷ slot length) this slot's counts belong to; `u64::MAX` when empty.
    epoch: AtomicU64,
    counts: Box<[AtomicU32]>,
}

impl Slot {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(u64::MAX),
            counts: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// A latency histogram over a sliding time window, shared between threads.
///
/// Memory: `slots × BUCKETS × 4` bytes (2.1 KiB per slot).
pub struct WindowedHistogram {
    slots: Box<[Slot]>,
    slot_ns: u64,
}

impl std::fmt::Debug for WindowedHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowedHistogram")
            .field("slots", &self.slots.len())
            .field("slot_ns", &self.slot_ns)
            .finish()
    }
}

/// A merged, point-in-time copy of a window's counts, for computing several quantiles
/// without merging the slots again.
#[derive(Clone, Debug)]
pub struct Snapshot {
    counts: Vec<u64>,
    total: u64,
}

impl WindowedHistogram {
    /// A histogram covering the last `window`, sliding in `slots` steps (`slots` ≥ 2
    /// recommended; 0 is treated as 1; a zero window as 1 ms).
    pub fn new(window: Duration, slots: usize) -> Self {
        let slots = slots.max(1);
        let window_ns = duration_ns(window).max(1_000_000);
        Self {
            slots: (0..slots).map(|_| Slot::new()).collect(),
            slot_ns: (window_ns / slots as u64).max(1),
        }
    }

    /// Records one value of `value_ns` nanoseconds observed at `now_ns`.
    #[inline]
    pub fn record(&self, value_ns: u64, now_ns: u64) {
        let epoch = now_ns / self.slot_ns;
        let slot = &self.slots[(epoch % self.slots.len() as u64) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        // A stale slot is reset by whoever wins the epoch swap. A slot already in a newer
        // epoch (this thread's clock read is late) is counted into as it is. A never-used
        // slot (`u64::MAX`) holds only zeros: it is claimed without clearing, which could
        // only erase the counts of threads that already saw the new epoch.
        if seen == u64::MAX {
            let _ = slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire);
        } else if seen < epoch
            && slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for c in slot.counts.iter() {
                c.store(0, Ordering::Relaxed);
            }
        }
        slot.counts[bucket_of(value_ns / 1_000)].fetch_add(1, Ordering::Relaxed);
    }

    /// Merges the slots that lie within the window ending at `now_ns`.
    pub fn snapshot(&self, now_ns: u64) -> Snapshot {
        self.snapshot_recent(now_ns, self.slots.len())
    }

    /// Merges the `slots` most recent slots of the window ending at `now_ns` (the current
    /// one, partly filled, and the `slots − 1` before it; clamped to 1..=all): the
    /// recent part of the window, `(slots − 1) × window / slot count` to
    /// `slots × window / slot count` long.
    pub fn snapshot_recent(&self, now_ns: u64, slots: usize) -> Snapshot {
        let slots = slots.clamp(1, self.slots.len());
        let current = now_ns / self.slot_ns;
        let oldest = current.saturating_sub(slots as u64 - 1);
        let mut counts = vec![0u64; BUCKETS];
        let mut total = 0;
        for slot in self.slots.iter() {
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch == u64::MAX || epoch < oldest || epoch > current {
                continue;
            }
            for (sum, c) in counts.iter_mut().zip(slot.counts.iter()) {
                let c = u64::from(c.load(Ordering::Relaxed));
                *sum += c;
                total += c;
            }
        }
        Snapshot { counts, total }
    }

    /// The `q`-quantile (clamped to 0..=1) of the values recorded within the window, in
    /// nanoseconds (bucket midpoint, ≤ 3.1 % relative error); `None` if the window is empty.
    pub fn quantile(&self, q: f64, now_ns: u64) -> Option<u64> {
        self.snapshot(now_ns).quantile(q)
    }

    /// Number of values recorded within the window.
    pub fn count(&self, now_ns: u64) -> u64 {
        self.snapshot(now_ns).count()
    }
}

impl Snapshot {
    /// Number of values in the snapshot.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (clamped to 0..=1) in nanoseconds, by the nearest-rank method over
    /// buckets, reporting the bucket midpoint; `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                // Midpoint in ns; width-1 buckets are exact microseconds.
                let mid_ns = low * 1_000 + width * 1_000 / 2;
                return Some(if width == 1 { low * 1_000 } else { mid_ns });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn buckets_are_contiguous_and_increasing() {
        let mut expected_low = 0;
        for i in 0..BUCKETS {
            let (low, width) = bucket_range(i);
            assert_eq!(low, expected_low, "bucket {i}");
            assert_eq!(bucket_of(low), i);
            assert_eq!(bucket_of(low + width - 1), i);
            expected_low = low + width;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_uniform_values() {
        let h = WindowedHistogram::new(Duration::from_secs(60), 6);
        for v in 1..=1000u64 {
            h.record(v * MS, 0);
        }
        let p50 = h.quantile(0.5, 0).expect("non-empty") as f64 / MS as f64;
        let p99 = h.quantile(0.99, 0).expect("non-empty") as f64 / MS as f64;
        assert!((p50 - 500.0).abs() / 500.0 < 0.035, "p50 {p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.035, "p99 {p99}");
        assert_eq!(h.count(0), 1000);
    }

    #[test]
    fn empty_window_has_no_quantile() {
        let h = WindowedHistogram::new(Duration::from_secs(10), 2);
        assert_eq!(h.quantile(0.5, 0), None);
    }

    #[test]
    fn old_values_slide_out() {
        let h = WindowedHistogram::new(Duration::from_secs(60), 6);
        h.record(900 * MS, 0);
        let s = 1_000 * MS;
        for i in 0..100 {
            h.record(5 * MS, 30 * s + i);
        }
        assert_eq!(h.count(30 * s), 101);
        // 60 s later the first record is out of the window, the others still in.
        assert_eq!(h.count(61 * s), 100);
        let p100 = h.quantile(1.0, 61 * s).expect("non-empty");
        assert!(p100 < 6 * MS, "p100 {p100}");
        // Everything gone after two windows.
        assert_eq!(h.count(200 * s), 0);
        // A slot reused after a long gap starts from zero.
        h.record(7 * MS, 200 * s);
        assert_eq!(h.count(200 * s), 1);
    }

    #[test]
    fn concurrent_records_are_counted() {
        use std::sync::Arc;
        let h = Arc::new(WindowedHistogram::new(Duration::from_secs(60), 6));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        h.record(3 * MS, 5);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recorder thread panicked");
        }
        assert_eq!(h.count(5), 40_000);
    }

    proptest! {
        #[test]
        fn quantile_relative_error_is_bounded(
            mut values in proptest::collection::vec(1u64..100_000_000, 1..500),
            q in 0.0f64..=1.0,
        ) {
            let h = WindowedHistogram::new(Duration::from_secs(60), 4);
            for &v in &values {
                h.record(v * 1_000, 0); // microseconds → ns
            }
            values.sort_unstable();
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            let exact = values[rank - 1] as f64;
            let got = h.quantile(q, 0).expect("non-empty") as f64 / 1_000.0;
            let err = (got - exact).abs() / exact;
            prop_assert!(err <= 0.032 || (got - exact).abs() <= 1.0,
                "q {} exact {} got {} err {}", q, exact, got, err);
        }
    }
}
