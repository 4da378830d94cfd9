//! Passive outlier detection: the decision rules, kept pure.
//!
//! Follows Envoy's outlier detection (`consecutive_5xx`, `base_ejection_time`,
//! `max_ejection_time`, `max_ejection_percent`): a backend whose consecutive failures reach
//! the threshold is ejected for `base_ejection_time × (recent ejections + 1)`, capped, as
//! long as no more than `max_ejection_percent` of the pool would then be ejected. The data
//! plane counts failures ([`crate::InFlightGuard::failure`]), asks [`OutlierPolicy::should_eject`]
//! and [`OutlierPolicy::within_budget`], then calls [`crate::LiveBackend::eject`]; a periodic
//! sweep re-admits backends whose ejection time has passed
//! ([`crate::LiveBackend::uneject_if_due`]).

use std::time::Duration;

/// A pool's outlier detection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive failed attempts (connect error, reset, timeout, 5xx) that eject a
    /// backend; 0 disables outlier detection.
    pub consecutive_failures: u32,
    /// Ejection time of a first ejection; later ones are multiples of it.
    pub base_ejection_time: Duration,
    /// Upper bound of one ejection (at least `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// Most backends of the pool that may be ejected at once, in percent (0..=100). At
    /// least one backend may always be ejected unless this is 0.
    pub max_ejection_percent: u8,
}

impl Default for OutlierPolicy {
    /// Envoy's defaults: 5 consecutive failures, 30 s base, 300 s max, 10 %.
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

impl OutlierPolicy {
    /// Whether `consecutive` failures call for an ejection.
    pub fn should_eject(&self, consecutive: u32) -> bool {
        self.consecutive_failures > 0 && consecutive >= self.consecutive_failures
    }

    /// Whether one more backend may be ejected from a pool of `total` backends of which
    /// `ejected` already are.
    pub fn within_budget(&self, total: usize, ejected: usize) -> bool {
        if self.max_ejection_percent == 0 || ejected >= total {
            return false;
        }
        ejected == 0 || (ejected + 1) * 100 <= usize::from(self.max_ejection_percent) * total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn disabled_never_ejects() {
        let p = OutlierPolicy {
            consecutive_failures: 0,
            ..OutlierPolicy::default()
        };
        assert!(!p.should_eject(1_000));
    }

    #[test]
    fn budget_allows_at_least_one() {
        let p = OutlierPolicy {
            max_ejection_percent: 10,
            ..OutlierPolicy::default()
        };
        assert!(p.within_budget(3, 0));
        assert!(!p.within_budget(3, 1));
        let half = OutlierPolicy {
            max_ejection_percent: 50,
            ..OutlierPolicy::default()
        };
        assert!(half.within_budget(4, 1));
        assert!(!half.within_budget(4, 2));
        assert!(!half.within_budget(1, 1));
    }

    proptest! {
        #[test]
        fn budget_never_exceeds_percent(total in 1usize..200, percent in 1u8..=100) {
            let p = OutlierPolicy { max_ejection_percent: percent, ..OutlierPolicy::default() };
            let mut ejected = 0;
            while p.within_budget(total, ejected) {
                ejected += 1;
            }
            prop_assert!(ejected >= 1);
            prop_assert!(ejected <= total);
            if ejected > 1 {
                prop_assert!(ejected * 100 <= usize::from(percent) * total);
            }
        }
    }
}
