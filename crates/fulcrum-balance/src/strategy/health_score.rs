//! `health_score`: the eligible backend with the highest health score, from its load and
//! its recent failures (seed 002's HS-BS, "Health Score Based").
//!
//! Each backend has a score in `0..=1`:
//!
//! ```text
//! score_i   = (1 − load_i) × success_i
//! load_i    = in_flight_i / (in_flight_i + ŵ_i)          ŵ_i = w_i / mean_j w_j
//! success_i = ratio_i × 0.5^(consecutive_failures_i − forgiven_i)
//! ```
//!
//! * `load_i` saturates: 0 when idle, ½ when a backend holds as many requests as its
//!   relative effective weight `ŵ_i`, toward 1 beyond. Seed 002 divides by the pool's
//!   largest in-flight count instead; that needs a pass over the pool on every pick,
//!   while this form reads one backend only, lets weights (and slow start) scale
//!   capacity, and with equal weights ranks idle-vs-busy exactly as least connections.
//! * `ratio_i` is an exponentially weighted moving average, over ticks, of each tick
//!   interval's success ratio (`Δsuccesses / Δrequests` from the backend's counters),
//!   starting at 1: `ratio ← (1 − α)·ratio + α·(interval ratio)`, α = 0.1 per 100 ms tick
//!   (time constant ≈ 1 s). An interval without any outcome counts as a success ratio of 1
//!   — no news is good news — so a backend that stopped receiving traffic drifts back.
//! * The consecutive-failure penalty halves the score per failure since the last
//!   success, read live so a backend that starts failing loses traffic before the next
//!   tick. Each tick without any outcome forgives one of those failures
//!   (`forgiven_i`, reset by any outcome), so a backend that lost all its traffic after
//!   `k` failures is tried again within about `k` ticks instead of never: linear back-off.
//!
//! The pick maximises the score: pools of up to 64 backends are scanned (ties broken
//! uniformly at random); larger ones take the best of `⌈log₂ n⌉ + 1` random eligible
//! backends (power of d choices, as in `least_connections`), so a pick is O(log n) and
//! writes nothing. [`Strategy::tick`] (O(n), off the request path) updates the ratios;
//! picks read them from atomics. Figures: each backend's `health_score`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::least_connections::{EXACT_MAX, choice_count, least_loaded, least_loaded_sampled};
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy};
use crate::backend::Backend;

/// Weight of one tick interval's success ratio in the moving average.
const ALPHA: f64 = 0.1;

/// Highest health score, with failure history smoothed over ticks.
#[derive(Debug)]
pub struct HealthScore {
    /// Per backend: the smoothed success ratio, as `f64` bits.
    ratio: Box<[AtomicU64]>,
    /// Per backend: consecutive failures forgiven by idle ticks.
    forgiven: Box<[AtomicU32]>,
    /// Mean effective weight of the pool, as `f64` bits (refreshed by ticks).
    mean_weight: AtomicU64,
    /// Per backend: `(requests, failures)` counters at the last tick. Tick-only.
    seen: Mutex<Box<[(u64, u64)]>>,
}

impl HealthScore {
    /// Scores for `backends`, every success ratio starting at 1.
    pub fn new(backends: &[Backend]) -> Self {
        let view = PoolView::new(backends, &[], false);
        Self {
            ratio: backends
                .iter()
                .map(|_| AtomicU64::new(1f64.to_bits()))
                .collect(),
            forgiven: backends.iter().map(|_| AtomicU32::new(0)).collect(),
            mean_weight: AtomicU64::new(mean_weight(&view).to_bits()),
            seen: Mutex::new(
                backends
                    .iter()
                    .map(|b| (b.live.requests(), b.live.failures()))
                    .collect(),
            ),
        }
    }

    /// The health score of backend `i` of `pool` now, in `0..=1`.
    fn score(&self, pool: &PoolView<'_>, i: usize) -> f64 {
        let live = &pool.backends()[i].live;
        let relative_weight =
            pool.effective_weight(i) / f64::from_bits(self.mean_weight.load(Ordering::Relaxed));
        let in_flight = live.in_flight() as f64;
        let load = in_flight / (in_flight + relative_weight);
        let unforgiven = live
            .consecutive_failures()
            .saturating_sub(self.forgiven[i].load(Ordering::Relaxed));
        let penalty = 0.5f64.powi(i32::try_from(unforgiven).unwrap_or(i32::MAX));
        let ratio = f64::from_bits(self.ratio[i].load(Ordering::Relaxed));
        ((1.0 - load) * ratio * penalty).clamp(0.0, 1.0)
    }
}

/// The mean effective weight of `pool` (1 for an empty pool).
fn mean_weight(pool: &PoolView<'_>) -> f64 {
    if pool.is_empty() {
        return 1.0;
    }
    (0..pool.len())
        .map(|i| pool.effective_weight(i))
        .sum::<f64>()
        / pool.len() as f64
}

impl Strategy for HealthScore {
    fn name(&self) -> &'static str {
        "health_score"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        debug_assert_eq!(self.ratio.len(), pool.len(), "another backend list");
        // Least "unhealthiness" = highest score.
        let unhealth = |i| -self.score(pool, i);
        if pool.len() <= EXACT_MAX {
            least_loaded(pool, unhealth)
        } else {
            least_loaded_sampled(pool, choice_count(pool.len()), unhealth)
        }
    }

    fn tick(&self, pool: &PoolView<'_>, _now_ns: u64) {
        self.mean_weight
            .store(mean_weight(pool).to_bits(), Ordering::Relaxed);
        let mut seen = self.seen.lock();
        for (i, (b, seen)) in pool.backends().iter().zip(seen.iter_mut()).enumerate() {
            let (requests, failures) = (b.live.requests(), b.live.failures());
            let outcomes = requests.saturating_sub(seen.0);
            let failed = failures.saturating_sub(seen.1).min(outcomes);
            *seen = (requests, failures);
            let interval_ratio = if outcomes == 0 {
                let forgiven = &self.forgiven[i];
                let next =
                    (forgiven.load(Ordering::Relaxed) + 1).min(b.live.consecutive_failures());
                forgiven.store(next, Ordering::Relaxed);
                1.0
            } else {
                self.forgiven[i].store(0, Ordering::Relaxed);
                (outcomes - failed) as f64 / outcomes as f64
            };
            let ratio = f64::from_bits(self.ratio[i].load(Ordering::Relaxed));
            let next = ((1.0 - ALPHA) * ratio + ALPHA * interval_ratio).clamp(0.0, 1.0);
            self.ratio[i].store(next.to_bits(), Ordering::Relaxed);
        }
    }

    fn figures(&self, pool: &PoolView<'_>, _now_ns: u64) -> Vec<Figure> {
        (0..pool.len())
            .map(|i| Figure::backend("health_score", i, self.score(pool, i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::testing::backends;
    use proptest::prelude::{any, prop, prop_assert, proptest};

    const MS: u64 = 1_000_000;

    fn pick(s: &HealthScore, view: &PoolView<'_>) -> usize {
        s.pick(&RequestInfo::new(0), view).expect("eligible").0
    }

    /// Records `successes` and `failures` outcomes on backend `i`.
    fn outcomes(b: &[Backend], i: usize, successes: usize, failures: usize) {
        for _ in 0..successes {
            b[i].live.begin(0).success(MS);
        }
        for _ in 0..failures {
            b[i].live.begin(0).failure(MS);
        }
    }

    #[test]
    fn fresh_idle_backends_score_one() {
        let b = backends(&[1, 3]);
        let hs = HealthScore::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(hs.score(&view, 0), 1.0);
        assert_eq!(hs.score(&view, 1), 1.0);
    }

    #[test]
    fn load_lowers_the_score_relative_to_weight() {
        let b = backends(&[1, 3]);
        let hs = HealthScore::new(&b);
        let view = PoolView::new(&b, &[], false);
        // Mean weight 2: relative weights ½ and 3⁄2.
        let _g0 = b[0].live.begin(0);
        let _g1 = b[1].live.begin(0);
        assert!((hs.score(&view, 0) - 1.0 / 3.0).abs() < 1e-9);
        assert!((hs.score(&view, 1) - 0.6).abs() < 1e-9);
        for _ in 0..50 {
            assert_eq!(pick(&hs, &view), 1);
        }
    }

    #[test]
    fn failing_backend_drops_then_recovers() {
        let b = backends(&[1, 1]);
        let hs = HealthScore::new(&b);
        let view = PoolView::new(&b, &[], false);
        // Backend 0 fails three times in a row: the penalty bites before any tick.
        outcomes(&b, 0, 0, 3);
        assert!((hs.score(&view, 0) - 0.125).abs() < 1e-9);
        assert_eq!(pick(&hs, &view), 1);
        // A tick folds the interval (100 % failures) into the ratio.
        hs.tick(&view, 0);
        assert!((f64::from_bits(hs.ratio[0].load(Ordering::Relaxed)) - 0.9).abs() < 1e-9);
        // Idle ticks forgive one failure each: after three the penalty is gone and the
        // backend beats a peer holding one request (score ½).
        let mut ticks = 0;
        while hs.score(&view, 0) < 0.5 {
            hs.tick(&view, 0);
            ticks += 1;
        }
        assert_eq!(ticks, 3, "score {}", hs.score(&view, 0));
        let _busy = b[1].live.begin(0);
        assert_eq!(pick(&hs, &view), 0);
        // Successes restore it fully over the following ticks.
        for _ in 0..40 {
            outcomes(&b, 0, 10, 0);
            hs.tick(&view, 0);
        }
        assert!(hs.score(&view, 0) > 0.98, "{}", hs.score(&view, 0));
    }

    #[test]
    fn partly_failing_backend_settles_at_its_success_ratio() {
        let b = backends(&[1]);
        let hs = HealthScore::new(&b);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            // 30 % failures, the interval ending on a success.
            outcomes(&b, 0, 0, 3);
            outcomes(&b, 0, 7, 0);
            hs.tick(&view, 0);
        }
        assert!(
            (hs.score(&view, 0) - 0.7).abs() < 0.01,
            "{}",
            hs.score(&view, 0)
        );
        let figures = hs.figures(&view, 0);
        assert_eq!(figures.len(), 1);
        assert_eq!(figures[0].name, "health_score");
    }

    #[test]
    fn large_pool_prefers_healthy_backends() {
        let b = backends(&vec![1; 200]);
        let hs = HealthScore::new(&b);
        // Half the pool fails.
        for i in (0..200).step_by(2) {
            outcomes(&b, i, 0, 2);
        }
        b[1].live.set_flag(BackendFlags::DRAINING);
        let view = PoolView::new(&b, &[], false);
        let mut failing = 0;
        for _ in 0..1_000 {
            let i = pick(&hs, &view);
            assert!(view.is_eligible(i));
            failing += usize::from(i.is_multiple_of(2));
        }
        // Only a sample of 9 with no healthy backend yields a failing one: 2⁻⁹.
        assert!(failing < 20, "{failing}");
    }

    proptest! {
        /// Whatever the outcomes, loads and ticks, every score stays within 0..=1 and a
        /// backend with only failures never outscores an idle one without any.
        #[test]
        fn scores_stay_within_bounds(
            steps in prop::collection::vec(
                (0usize..4, 0usize..20, 0usize..20, 0usize..5, any::<bool>()),
                1..40,
            ),
        ) {
            let b = backends(&[1, 2, 3, 4]);
            let hs = HealthScore::new(&b);
            let view = PoolView::new(&b, &[], false);
            let mut guards = Vec::new();
            for &(i, ok, failed, hold, tick) in &steps {
                outcomes(&b, i, ok, failed);
                guards.extend((0..hold).map(|_| b[i].live.begin(0)));
                if tick {
                    hs.tick(&view, 0);
                }
                for j in 0..4 {
                    let s = hs.score(&view, j);
                    prop_assert!((0.0..=1.0).contains(&s), "score {s} of {j}");
                }
            }
        }
    }
}
