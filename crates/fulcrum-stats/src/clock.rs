//! The monotonic clock every statistic in Fulcrum is stamped with.
//!
//! Timestamps are `u64` nanoseconds since the first call in this process (the epoch). They
//! never go backwards and do not depend on wall-clock time, so NTP steps cannot disturb
//! decay or window arithmetic.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds elapsed since the process epoch (the first call to this function).
///
/// Monotonic; wraps after ~584 years.
#[inline]
pub fn now_ns() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    duration_ns(epoch.elapsed())
}

/// Converts a [`Duration`] to whole nanoseconds, saturating at `u64::MAX`.
#[inline]
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }

    #[test]
    fn duration_saturates() {
        assert_eq!(duration_ns(Duration::MAX), u64::MAX);
        assert_eq!(duration_ns(Duration::from_millis(3)), 3_000_000);
    }
}
