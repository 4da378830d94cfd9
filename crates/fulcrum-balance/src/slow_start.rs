//! Slow start: a backend that joins the pool, or comes back after failing its health
//! checks or an outlier ejection, gets a share of traffic that ramps up over a window
//! instead of its full weight at once, so that cold caches, JIT warm-up or a freshly
//! started process are not flooded.
//!
//! The ramp is Envoy's (`slow_start_config` of the round robin and least request load
//! balancers): during the window the weight is multiplied by
//!
//! ```text
//! factor(t) = max(min_weight, (t / window) ^ (1 / aggression))      0 ≤ t < window
//! factor(t) = 1                                                      t ≥ window
//! ```
//!
//! where `t` is the time since the backend (re)joined. `aggression` = 1 ramps linearly;
//! larger values ramp faster at the start. `min_weight` (a ratio 0..1) keeps a new backend
//! from being starved completely at `t ≈ 0`.
//!
//! The proxy applies the factor to every backend's *effective weight*
//! ([`crate::LiveBackend::set_effective_weight`]) on each periodic tick, together with the
//! dynamic-weight factor, through [`effective_weight`]; strategies read effective weights
//! through [`crate::PoolView::effective_weight`].

use std::time::Duration;

use fulcrum_stats::clock::duration_ns;

/// Slow-start parameters. `window` zero disables slow start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    /// How long the ramp lasts; zero = no slow start.
    pub window: Duration,
    /// Shape of the ramp (> 0): 1 linear, > 1 faster early on.
    pub aggression: f64,
    /// Smallest factor during the ramp, a ratio in (0, 1].
    pub min_weight: f64,
}

impl Default for SlowStart {
    /// Disabled (`window` 0), aggression 1, minimum weight 10 %.
    fn default() -> Self {
        Self {
            window: Duration::ZERO,
            aggression: 1.0,
            min_weight: 0.1,
        }
    }
}

impl SlowStart {
    /// Whether slow start is on.
    pub fn is_enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// The weight multiplier, in `[min_weight, 1]`, of a backend that (re)joined at
    /// `since_ns`, at `now_ns` (clock nanoseconds). Monotonically non-decreasing in
    /// `now_ns`; exactly 1 once the window has passed or when slow start is off.
    pub fn factor(&self, since_ns: u64, now_ns: u64) -> f64 {
        let window = duration_ns(self.window);
        if window == 0 {
            return 1.0;
        }
        let elapsed = now_ns.saturating_sub(since_ns);
        if elapsed >= window {
            return 1.0;
        }
        let aggression = if self.aggression.is_finite() && self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let min = self.min_weight.clamp(f64::MIN_POSITIVE, 1.0);
        let ratio = elapsed as f64 / window as f64;
        ratio.powf(1.0 / aggression).clamp(min, 1.0)
    }

    /// Progress of the ramp at `now_ns`, a ratio 0..=1 (1 = done or slow start off).
    pub fn progress(&self, since_ns: u64, now_ns: u64) -> f64 {
        let window = duration_ns(self.window);
        if window == 0 {
            return 1.0;
        }
        (now_ns.saturating_sub(since_ns) as f64 / window as f64).min(1.0)
    }
}

/// A backend's effective weight: `configured` (≥ 1) × `dynamic` (the dynamic-weight
/// factor, 1 when off; bounded to 0.1..=10 by its producer) × the slow-start factor.
/// Always > 0.
pub fn effective_weight(
    configured: u32,
    dynamic: f64,
    slow_start: &SlowStart,
    since_ns: u64,
    now_ns: u64,
) -> f64 {
    let dynamic = if dynamic.is_finite() && dynamic > 0.0 {
        dynamic
    } else {
        1.0
    };
    f64::from(configured.max(1)) * dynamic * slow_start.factor(since_ns, now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    fn ramp(window_s: u64, aggression: f64) -> SlowStart {
        SlowStart {
            window: Duration::from_secs(window_s),
            aggression,
            min_weight: 0.1,
        }
    }

    #[test]
    fn disabled_is_full_weight() {
        assert_eq!(SlowStart::default().factor(0, 0), 1.0);
        assert_eq!(effective_weight(3, 1.0, &SlowStart::default(), 0, 0), 3.0);
    }

    #[test]
    fn linear_ramp_matches_envoy_formula() {
        let s = ramp(10, 1.0);
        assert_eq!(s.factor(0, 0), 0.1, "floored at min_weight");
        assert!((s.factor(0, 5 * S) - 0.5).abs() < 1e-9);
        assert_eq!(s.factor(0, 10 * S), 1.0);
        assert_eq!(s.factor(0, 60 * S), 1.0);
        // aggression 2: sqrt ramp, faster at first.
        let fast = ramp(10, 2.0);
        assert!((fast.factor(0, 5 * S) - 0.5f64.sqrt()).abs() < 1e-9);
        assert!((s.progress(0, 5 * S) - 0.5).abs() < 1e-9);
    }

    proptest! {
        /// Slow start ramps monotonically from at least `min_weight` to exactly 1.
        #[test]
        fn ramp_is_monotonic(
            window_ms in 1u64..100_000,
            aggression in 0.1f64..10.0,
            min_weight in 0.01f64..1.0,
            steps in prop::collection::vec(0u64..200_000_000_000, 1..50),
        ) {
            let s = SlowStart { window: Duration::from_millis(window_ms), aggression, min_weight };
            let mut times = steps;
            times.sort_unstable();
            let mut last = 0.0;
            for t in times {
                let f = s.factor(0, t);
                prop_assert!(f >= last, "factor fell from {last} to {f} at {t}");
                prop_assert!(f >= min_weight.min(1.0) - 1e-12 && f <= 1.0);
                last = f;
            }
            prop_assert_eq!(s.factor(0, window_ms * 1_000_000), 1.0);
        }
    }
}
