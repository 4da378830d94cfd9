//! `adaptive_weighted`: weighted round robin whose weights shrink with failures and grow
//! back with successes (seed 002's HF-WRR, "failure-adaptive weighted round robin").
//!
//! Each backend `i` carries a multiplier `m_i ∈ [0.1, 1]`, starting at 1, and is scheduled
//! with weight `w_i × m_i` (`w_i` its effective weight) by the same earliest-deadline-first
//! scheduler as `weighted_round_robin`, so a pick is O(log n) under a short lock.
//!
//! On every tick (≈ 100 ms) the interval's outcomes — `s` successes and `f` failures, from
//! the backend's counters — update the multiplier by additive increase, multiplicative
//! decrease (AIMD: Chiu and Jain, "Analysis of the Increase and Decrease Algorithms for
//! Congestion Avoidance in Computer Networks", 1989, the rule TCP congestion control
//! uses):
//!
//! ```text
//! r = f / (s + f)                                    interval failure ratio
//! m ← clamp(m · (1 − β·r) + α·(1 − r), 0.1, 1)       β = ½, α = 0.05
//! m ← min(1, m + α)                                  interval without outcomes
//! ```
//!
//! An interval of nothing but failures halves `m` (four such ticks take it from 1 to the
//! floor); clean intervals add 0.05 (1.8 s from the floor back to 1). Because the
//! decrease is in proportion to the failure *ratio*, not the count, the rule does not
//! depend on the request rate, and it is stable: for a steady failure ratio `r` it settles
//! at `m* = min(1, α(1 − r) / (β·r))` — 1 for `r ≤ 9 %`, 0.4 at 20 %, 0.1 from 50 % on —
//! instead of ratcheting down on occasional errors. The floor keeps a failing backend in
//! rotation at a tenth of its share, so its recovery is observed (health checks and
//! outlier ejection take it out entirely when it is down).
//!
//! The scheduler is rebuilt (keeping each backend's progress) when a scheduled weight moved
//! by more than 1 %. Figures: each backend's `adaptive_weight`, the weight it is scheduled
//! with (`w_i × m_i`).

use parking_lot::Mutex;

use super::weighted_round_robin::{EdfScheduler, scheduled_weights};
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy};
use crate::backend::Backend;

/// Smallest multiplier: a failing backend keeps a tenth of its share.
const FLOOR: f64 = 0.1;

/// Additive increase per clean tick (α).
const INCREASE: f64 = 0.05;

/// Multiplicative decrease of an all-failure tick (β): `m` is multiplied by `1 − β·r`.
const DECREASE: f64 = 0.5;

/// Failure-adaptive weighted round robin.
#[derive(Debug)]
pub struct AdaptiveWeighted {
    scheduler: EdfScheduler,
    /// Per backend: multiplier and counters at the last tick. Locked by ticks and figures.
    adaptive: Mutex<Box<[Adaptive]>>,
}

/// A backend's multiplier and the counters it was last updated from.
#[derive(Clone, Copy, Debug)]
struct Adaptive {
    multiplier: f64,
    requests: u64,
    failures: u64,
}

impl Adaptive {
    /// Folds an interval with `outcomes` outcomes of which `failed` failures into the
    /// multiplier.
    fn update(&mut self, outcomes: u64, failed: u64) {
        self.multiplier = if outcomes == 0 {
            (self.multiplier + INCREASE).min(1.0)
        } else {
            let r = failed.min(outcomes) as f64 / outcomes as f64;
            (self.multiplier * (1.0 - DECREASE * r) + INCREASE * (1.0 - r)).clamp(FLOOR, 1.0)
        };
    }
}

impl AdaptiveWeighted {
    /// The strategy over `backends`, every multiplier at 1 (plain weighted round robin on
    /// effective weights until failures are seen).
    pub fn new(backends: &[Backend]) -> Self {
        let view = PoolView::new(backends, &[], false);
        let weights: Vec<f64> = (0..view.len()).map(|i| view.effective_weight(i)).collect();
        Self {
            scheduler: EdfScheduler::new(&weights),
            adaptive: Mutex::new(
                backends
                    .iter()
                    .map(|b| Adaptive {
                        multiplier: 1.0,
                        requests: b.live.requests(),
                        failures: b.live.failures(),
                    })
                    .collect(),
            ),
        }
    }

    /// Each backend's multiplier.
    #[cfg(test)]
    fn multipliers(&self) -> Vec<f64> {
        self.adaptive.lock().iter().map(|a| a.multiplier).collect()
    }
}

impl Strategy for AdaptiveWeighted {
    fn name(&self) -> &'static str {
        "adaptive_weighted"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        self.scheduler.pick(pool)
    }

    fn pick_another(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        super::random_eligible(pool)
    }

    fn tick(&self, pool: &PoolView<'_>, _now_ns: u64) {
        let weights = {
            let mut adaptive = self.adaptive.lock();
            for (a, b) in adaptive.iter_mut().zip(pool.backends()) {
                let (requests, failures) = (b.live.requests(), b.live.failures());
                a.update(
                    requests.saturating_sub(a.requests),
                    failures.saturating_sub(a.failures),
                );
                (a.requests, a.failures) = (requests, failures);
            }
            scheduled_weights(pool, |i| pool.effective_weight(i) * adaptive[i].multiplier)
        };
        self.scheduler.reschedule(&weights);
    }

    fn figures(&self, pool: &PoolView<'_>, _now_ns: u64) -> Vec<Figure> {
        let adaptive = self.adaptive.lock();
        adaptive
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Figure::backend(
                    "adaptive_weight",
                    i,
                    pool.effective_weight(i) * a.multiplier,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::testing::backends;
    use proptest::prelude::{prop, prop_assert, proptest};

    const MS: u64 = 1_000_000;

    fn outcomes(b: &[Backend], i: usize, successes: usize, failures: usize) {
        for _ in 0..successes {
            b[i].live.begin(0).success(MS);
        }
        for _ in 0..failures {
            b[i].live.begin(0).failure(MS);
        }
    }

    fn counts(s: &AdaptiveWeighted, view: &PoolView<'_>, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; view.len()];
        for _ in 0..picks {
            counts[s.pick(&RequestInfo::new(0), view).expect("eligible").0] += 1;
        }
        counts
    }

    #[test]
    fn without_failures_it_is_weighted_round_robin() {
        let b = backends(&[3, 2, 1]);
        let s = AdaptiveWeighted::new(&b);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..5 {
            outcomes(&b, 0, 5, 0);
            s.tick(&view, 0);
            assert_eq!(counts(&s, &view, 6), vec![3, 2, 1]);
        }
    }

    #[test]
    fn failing_backend_loses_weight_then_recovers() {
        let b = backends(&[1, 1]);
        let s = AdaptiveWeighted::new(&b);
        let view = PoolView::new(&b, &[], false);
        // Backend 0 fails everything for four ticks: 1 → ½ → ¼ → ⅛ → floor.
        for _ in 0..4 {
            outcomes(&b, 0, 0, 10);
            outcomes(&b, 1, 10, 0);
            s.tick(&view, 0);
        }
        assert_eq!(s.multipliers(), vec![FLOOR, 1.0]);
        // Weights 0.1 : 1, within one pick (the rebuilds kept each backend's phase).
        let shares = counts(&s, &view, 1_100);
        assert!(shares[0].abs_diff(100) <= 1, "{shares:?}");
        let figures = s.figures(&view, 0);
        assert_eq!(figures[0].name, "adaptive_weight");
        assert!((figures[0].value - FLOOR).abs() < 1e-12);
        // Then it succeeds: +0.05 per tick, back to 1 in 18 ticks.
        let mut ticks = 0;
        while s.multipliers()[0] < 1.0 {
            outcomes(&b, 0, 10, 0);
            s.tick(&view, 0);
            ticks += 1;
            assert!(ticks <= 18, "{:?}", s.multipliers());
        }
        let shares = counts(&s, &view, 100);
        assert!(shares[0].abs_diff(50) <= 1, "{shares:?}");
    }

    #[test]
    fn occasional_failures_do_not_ratchet_down() {
        let b = backends(&[1]);
        let s = AdaptiveWeighted::new(&b);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..200 {
            // 5 % failures.
            outcomes(&b, 0, 19, 1);
            s.tick(&view, 0);
        }
        assert_eq!(s.multipliers(), vec![1.0]);
        for _ in 0..200 {
            // 20 % failures: settles at α(1 − r)/(β r) = 0.4.
            outcomes(&b, 0, 8, 2);
            s.tick(&view, 0);
        }
        assert!(
            (s.multipliers()[0] - 0.4).abs() < 1e-6,
            "{:?}",
            s.multipliers()
        );
    }

    #[test]
    fn ineligible_backends_are_skipped() {
        let b = backends(&[1, 1, 1]);
        let s = AdaptiveWeighted::new(&b);
        b[1].live.set_flag(BackendFlags::EJECTED);
        let view = PoolView::new(&b, &[BackendId(2)], false);
        assert_eq!(counts(&s, &view, 10), vec![10, 0, 0]);
        s.tick(&view, 0);
        assert_eq!(counts(&s, &view, 10), vec![10, 0, 0]);
    }

    proptest! {
        /// Whatever the outcomes, every multiplier stays within [0.1, 1].
        #[test]
        fn multipliers_stay_within_bounds(
            intervals in prop::collection::vec((0u64..1_000, 0u64..1_000), 1..100),
        ) {
            let mut a = Adaptive { multiplier: 1.0, requests: 0, failures: 0 };
            for &(successes, failures) in &intervals {
                a.update(successes + failures, failures);
                prop_assert!((FLOOR..=1.0).contains(&a.multiplier), "{}", a.multiplier);
            }
        }
    }
}
