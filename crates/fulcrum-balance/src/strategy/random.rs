//! `random`: weighted random.
//!
//! Each request goes to backend `i` with probability `weight_i / Σ weight` over the
//! eligible backends, independently of every other request: HAProxy's `balance random`
//! (which honours server weights) and Envoy's `RANDOM` load balancer (which ignores
//! them: its behaviour is the equal-weight case). No shared state is written, so
//! concurrent picks never contend.
//!
//! Sampling is by inverse transform over the cumulative weights, built once at
//! construction: with `prefix_i = Σ_{j ≤ i} weight_j` and `r` uniform in `0..prefix_{n-1}`,
//! the pick is the first `i` with `prefix_i > r`, found by binary search in O(log n).
//!
//! An ineligible draw is redrawn, up to `MAX_DRAWS` draws in all, after which the pick
//! falls back to one weighted draw over the eligible backends only (O(n)). Both paths
//! choose among the eligible backends in proportion to weight, so excluding some backends
//! leaves the others' relative shares exact; the fallback only bounds the time spent when
//! most of the weight is ineligible.

use super::{BackendId, PoolView, RequestInfo, Strategy, weight_of};
use crate::backend::Backend;

/// Draws over the whole pool before falling back to a draw over the eligible backends.
/// With a fraction `f` of the weight ineligible, the fallback runs for a share
/// `f^MAX_DRAWS` of picks (one in 81 when a third of the weight is down).
const MAX_DRAWS: usize = 4;

/// Weighted random over the eligible backends. Lock-free and write-free.
#[derive(Debug)]
pub struct WeightedRandom {
    /// `prefix[i]` = sum of the weights of backends `0..=i`; strictly increasing, since
    /// every weight counts as at least 1.
    prefix: Box<[u64]>,
}

impl WeightedRandom {
    /// Weighted random over `backends`, with their configured weights.
    pub fn new(backends: &[Backend]) -> Self {
        let prefix = backends
            .iter()
            .scan(0u64, |sum, b| {
                *sum += weight_of(b);
                Some(*sum)
            })
            .collect();
        Self { prefix }
    }

    /// The backend whose cumulative-weight interval holds `r`, for `r` in
    /// `0..total weight`.
    #[inline]
    fn backend_at(&self, r: u64) -> usize {
        self.prefix.partition_point(|&sum| sum <= r)
    }
}

impl Strategy for WeightedRandom {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        debug_assert_eq!(
            self.prefix.len(),
            pool.len(),
            "strategy built for another backend list"
        );
        let &total = self.prefix.last()?;
        for _ in 0..MAX_DRAWS {
            let i = self.backend_at(fastrand::u64(..total));
            if pool.is_eligible(i) {
                return Some(BackendId(i));
            }
        }
        weighted_draw_over_eligible(pool)
    }
}

/// One draw over the eligible backends of `pool` in proportion to weight: two O(n) passes,
/// no allocation.
fn weighted_draw_over_eligible(pool: &PoolView<'_>) -> Option<BackendId> {
    let eligible = |i: &usize| pool.is_eligible(*i);
    let total: u64 = (0..pool.len())
        .filter(eligible)
        .map(|i| pool.weight(i))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    // Another thread may change eligibility between the two passes (a drain, an
    // ejection), leaving `r` past the eligible weight the second pass sees; the last
    // eligible backend seen then takes it, so the result was eligible when read.
    let mut last = None;
    for i in (0..pool.len()).filter(eligible) {
        let w = pool.weight(i);
        if r < w {
            return Some(BackendId(i));
        }
        r -= w;
        last = Some(BackendId(i));
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::testing::backends;
    use proptest::prelude::{ProptestConfig, any, prop, prop_assert, proptest};

    const DRAWS: usize = 60_000;

    /// Picks `DRAWS` times and returns each backend's share of the picks.
    fn shares(strategy: &WeightedRandom, view: &PoolView<'_>) -> Vec<f64> {
        let mut counts = vec![0usize; view.len()];
        for _ in 0..DRAWS {
            let i = strategy
                .pick(&RequestInfo::new(0), view)
                .expect("eligible")
                .0;
            assert!(view.is_eligible(i), "picked ineligible backend {i}");
            counts[i] += 1;
        }
        counts
            .into_iter()
            .map(|c| c as f64 / DRAWS as f64)
            .collect()
    }

    /// Asserts every share is within 3 percentage points of `expected` (over 60k draws a
    /// share's standard deviation is at most 0.2 points, so this cannot flake).
    fn assert_close(actual: &[f64], expected: &[f64]) {
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() < 0.03,
                "backend {i}: share {a:.4}, expected {e:.4}"
            );
        }
    }

    #[test]
    fn prefix_search_maps_intervals_to_backends() {
        let b = backends(&[2, 1, 3]);
        let wr = WeightedRandom::new(&b);
        let owners: Vec<usize> = (0..6).map(|r| wr.backend_at(r)).collect();
        assert_eq!(owners, vec![0, 0, 1, 2, 2, 2]);
    }

    #[test]
    fn shares_follow_weights() {
        let b = backends(&[1, 2, 3, 4]);
        let wr = WeightedRandom::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_close(&shares(&wr, &view), &[0.1, 0.2, 0.3, 0.4]);
    }

    #[test]
    fn ineligible_weight_is_redistributed_by_weight() {
        // Backend 0 holds half the weight, so a share of picks takes the fallback path.
        let b = backends(&[5, 1, 2, 2]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let wr = WeightedRandom::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_close(&shares(&wr, &view), &[0.0, 0.2, 0.4, 0.4]);
    }

    #[test]
    fn fallback_alone_follows_weights() {
        let b = backends(&[1, 3]);
        let view = PoolView::new(&b, &[], false);
        let mut ones = 0;
        for _ in 0..DRAWS {
            ones += weighted_draw_over_eligible(&view).expect("eligible").0;
        }
        assert_close(&[ones as f64 / DRAWS as f64], &[0.75]);
    }

    #[test]
    fn none_only_when_nothing_is_eligible() {
        let b = backends(&[1, 1]);
        b[0].live.set_flag(BackendFlags::DRAINING);
        let wr = WeightedRandom::new(&b);
        let excluded = [BackendId(1)];
        assert_eq!(
            wr.pick(&RequestInfo::new(0), &PoolView::new(&b, &excluded, true)),
            None
        );
        assert_eq!(
            wr.pick(&RequestInfo::new(0), &PoolView::new(&b, &[], true)),
            Some(BackendId(1))
        );
        let empty = WeightedRandom::new(&[]);
        assert_eq!(
            empty.pick(&RequestInfo::new(0), &PoolView::new(&[], &[], false)),
            None
        );
    }

    proptest! {
        #[test]
        fn never_picks_ineligible_or_excluded(
            pool in prop::collection::vec((1u32..100, any::<bool>(), any::<bool>()), 1..30),
        ) {
            let weights: Vec<u32> = pool.iter().map(|&(w, _, _)| w).collect();
            let b = backends(&weights);
            let mut excluded = Vec::new();
            for (i, &(_, down, tried)) in pool.iter().enumerate() {
                if down {
                    b[i].live.set_flag(BackendFlags::UNHEALTHY);
                }
                if tried {
                    excluded.push(BackendId(i));
                }
            }
            let wr = WeightedRandom::new(&b);
            let view = PoolView::new(&b, &excluded, false);
            let any_eligible = (0..view.len()).any(|i| view.is_eligible(i));
            for _ in 0..50 {
                match wr.pick(&RequestInfo::new(0), &view) {
                    Some(BackendId(i)) => prop_assert!(view.is_eligible(i)),
                    None => prop_assert!(!any_eligible),
                }
            }
        }

    }

    proptest! {
        // Each case draws 60k times; a few dozen random pools are plenty.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn shares_within_tolerance_of_weights(weights in prop::collection::vec(1u32..100, 1..8)) {
            let b = backends(&weights);
            let wr = WeightedRandom::new(&b);
            let view = PoolView::new(&b, &[], false);
            let total: u32 = weights.iter().sum();
            let expected: Vec<f64> =
                weights.iter().map(|&w| f64::from(w) / f64::from(total)).collect();
            assert_close(&shares(&wr, &view), &expected);
        }
    }
}
