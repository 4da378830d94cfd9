//! Per-second request counts, recorded lock-free on the request path and read by the
//! pool's background analysis task (see [`crate::anomaly::RateAnalyzer`]).
//!
//! A ring of one-second buckets, each a single `AtomicU64` holding the second it counts
//! (high 32 bits) and the count (low 32 bits). Recording into the current second is one
//! load and one `fetch_add`; the first record of a new second swaps in `(second, 1)` with a
//! compare-and-swap, so resetting a stale bucket and counting into it are one atomic step
//! and no count is lost or leaked between seconds (unlike a separate stamp and counter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Shortest horizon: 10 s.
pub const MIN_HORIZON_SECS: u64 = 10;
/// Longest horizon: 3600 s.
pub const MAX_HORIZON_SECS: u64 = 3600;

const NS_PER_SEC: u64 = 1_000_000_000;

/// A lock-free counter of events per second over a sliding horizon, shared between
/// threads.
///
/// Seconds are whole seconds of [`crate::clock::now_ns`] (`now_ns / 10^9`). Each bucket
/// counts up to 2^32 − 1 events per second. Memory: 8 bytes per second of horizon.
#[derive(Debug)]
pub struct RateCounter {
    buckets: Box<[AtomicU64]>,
    horizon_secs: u64,
}

impl RateCounter {
    /// A counter remembering the last `horizon` of complete seconds (clamped to
    /// [`MIN_HORIZON_SECS`]..=[`MAX_HORIZON_SECS`], rounded down to whole seconds). Never
    /// fails.
    pub fn new(horizon: Duration) -> Self {
        let horizon_secs = horizon.as_secs().clamp(MIN_HORIZON_SECS, MAX_HORIZON_SECS);
        // One bucket for the second in progress, one spare so the oldest complete second
        // is never the one being reset by a concurrent record.
        let len = horizon_secs as usize + 2;
        Self {
            buckets: (0..len).map(|_| AtomicU64::new(0)).collect(),
            horizon_secs,
        }
    }

    /// The horizon in whole seconds, after clamping.
    pub fn horizon_secs(&self) -> u64 {
        self.horizon_secs
    }

    /// Counts one event at `now_ns`. Lock-free; in the common case one load and one
    /// `fetch_add`.
    #[inline]
    pub fn record(&self, now_ns: u64) {
        let second = now_ns / NS_PER_SEC;
        let bucket = self.bucket(second);
        let stamp = stamp_of(second);
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            // A bucket stamped with this second, or (from a thread whose clock read is
            // stale by a whole horizon) a later one, is counted into as it is.
            if stamp_of_word(current) >= stamp {
                bucket.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match bucket.compare_exchange_weak(
                current,
                pack(stamp, 1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Counts of the complete seconds after `since_second` (exclusive) up to the second
    /// before the one containing `now_ns`, as `(second, count)` in increasing order;
    /// seconds without events have count 0. Seconds older than the horizon are not
    /// returned, so the result has at most `horizon_secs` entries (pass the last second
    /// already received; `0` initially, which skips only second 0 of the process epoch).
    pub fn completed_seconds(&self, since_second: u64, now_ns: u64) -> Vec<(u64, u64)> {
        let current = now_ns / NS_PER_SEC;
        let first = since_second
            .saturating_add(1)
            .max(current.saturating_sub(self.horizon_secs));
        (first..current)
            .map(|second| (second, self.count_of(second)))
            .collect()
    }

    /// Events in the second containing `now_ns` plus the `seconds` complete seconds
    /// before it (at most the horizon): a sliding-window total, without allocating.
    pub fn recent_total(&self, seconds: u64, now_ns: u64) -> u64 {
        let current = now_ns / NS_PER_SEC;
        let first = current.saturating_sub(seconds.min(self.horizon_secs));
        (first..=current).map(|second| self.count_of(second)).sum()
    }

    /// The count of `second`, 0 if its bucket holds another second.
    #[inline]
    fn count_of(&self, second: u64) -> u64 {
        let word = self.bucket(second).load(Ordering::Relaxed);
        if stamp_of_word(word) == stamp_of(second) {
            word & COUNT_MASK
        } else {
            0
        }
    }

    #[inline]
    fn bucket(&self, second: u64) -> &AtomicU64 {
        &self.buckets[(second % self.buckets.len() as u64) as usize]
    }
}

const COUNT_MASK: u64 = u32::MAX as u64;

/// Seconds are stamped in 32 bits: 136 years of process uptime.
#[inline]
fn stamp_of(second: u64) -> u32 {
    second as u32
}

#[inline]
fn stamp_of_word(word: u64) -> u32 {
    (word >> 32) as u32
}

#[inline]
fn pack(stamp: u32, count: u64) -> u64 {
    (u64::from(stamp) << 32) | count
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = NS_PER_SEC;

    #[test]
    fn counts_complete_seconds_with_gaps_as_zero() {
        let c = RateCounter::new(Duration::from_secs(10));
        for _ in 0..3 {
            c.record(5 * SEC + 1);
        }
        c.record(7 * SEC);
        c.record(8 * SEC); // incomplete at now = 8.5 s
        assert_eq!(
            c.completed_seconds(3, 8 * SEC + SEC / 2),
            [(4, 0), (5, 3), (6, 0), (7, 1)]
        );
        assert_eq!(c.completed_seconds(7, 8 * SEC + SEC / 2), []);
        assert_eq!(c.completed_seconds(7, 9 * SEC), [(8, 1)]);
    }

    #[test]
    fn recent_total_sums_the_current_and_the_last_seconds() {
        let c = RateCounter::new(Duration::from_secs(10));
        c.record(2 * SEC); // outside a 3-s window at 6.5 s
        for _ in 0..3 {
            c.record(4 * SEC);
        }
        c.record(6 * SEC + 1); // the second in progress
        assert_eq!(c.recent_total(3, 6 * SEC + SEC / 2), 4);
        assert_eq!(c.recent_total(4, 6 * SEC + SEC / 2), 5);
        assert_eq!(c.recent_total(0, 6 * SEC + SEC / 2), 1);
        // Beyond the horizon is capped, and stale buckets count 0.
        assert_eq!(c.recent_total(100, 6 * SEC), 5);
        assert_eq!(c.recent_total(10, 40 * SEC), 0);
    }

    #[test]
    fn old_buckets_reset_and_horizon_bounds_output() {
        let c = RateCounter::new(Duration::from_secs(10));
        assert_eq!(c.horizon_secs(), 10);
        c.record(SEC);
        // Second 1 + 12 shares second 1's bucket (12 buckets).
        c.record(13 * SEC);
        let out = c.completed_seconds(0, 30 * SEC);
        assert_eq!(out.len(), 10);
        assert_eq!(out.first(), Some(&(20, 0)));
        let out = c.completed_seconds(0, 14 * SEC);
        assert_eq!(out.len(), 10);
        assert_eq!(out.iter().map(|&(_, n)| n).sum::<u64>(), 1);
        assert_eq!(out.last(), Some(&(13, 1)));
    }

    #[test]
    fn horizon_is_clamped() {
        assert_eq!(RateCounter::new(Duration::ZERO).horizon_secs(), 10);
        assert_eq!(
            RateCounter::new(Duration::from_secs(100_000)).horizon_secs(),
            3600
        );
    }

    #[test]
    fn concurrent_records_are_counted() {
        use std::sync::Arc;
        let c = Arc::new(RateCounter::new(Duration::from_secs(60)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        // Four seconds, crossing second boundaries while others record.
                        c.record(2 * SEC + i * (SEC / 5_000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recorder thread panicked");
        }
        let out = c.completed_seconds(0, 10 * SEC);
        let total: u64 = out.iter().map(|&(_, n)| n).sum();
        assert_eq!(total, 80_000);
        assert_eq!(out.iter().find(|&&(s, _)| s == 3), Some(&(3, 20_000)));
    }

    proptest! {
        #[test]
        fn counts_match_a_reference(
            events in proptest::collection::vec(0u64..40_000, 0..300),
        ) {
            // Events in ms over 40 s, recorded in time order.
            let mut events = events;
            events.sort_unstable();
            let c = RateCounter::new(Duration::from_secs(10));
            for &ms in &events {
                c.record(ms * 1_000_000);
            }
            let now = 40 * SEC;
            let out = c.completed_seconds(0, now);
            prop_assert_eq!(out.len(), 10);
            for (second, count) in out {
                let expected = events.iter().filter(|&&ms| ms / 1_000 == second).count();
                prop_assert_eq!(count, expected as u64, "second {}", second);
            }
        }
    }
}
