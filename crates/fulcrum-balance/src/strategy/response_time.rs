//! `response_time`: the eligible backend with the lowest response time, with exploration
//! (seed 002's RRT-BS, "Response Time Based").
//!
//! The response time of backend `i` is its peak-EWMA latency estimate
//! ([`crate::LiveBackend::latency_estimate_ns`]: Finagle's peak EWMA, which jumps to a
//! slower observation at once, decays toward faster ones, and doubles on a failure so a
//! backend that fails fast does not look fast). The pick minimises
//!
//! ```text
//! cost_i = latency_estimate_i(now) / w_i        then, on a tie, in_flight_i
//! ```
//!
//! with `w_i` the effective weight, so that, as in `peak_ewma`, weights scale a backend's
//! capacity and slow start holds back a freshly (re)joined backend, whose estimate is the
//! optimistic initial one. Unlike `peak_ewma` the load does not multiply the cost: this is
//! seed 002's greedy "fastest wins", which concentrates traffic on the fastest backend
//! until its own estimate rises; prefer `peak_ewma` when the backends' latency depends on
//! how loaded they are.
//!
//! **Exploration.** A greedy choice never re-measures a backend that once looked slow
//! (the estimate of a backend that receives nothing also decays, but only with decay time
//! τ = 10 s). With probability ε = `exploration` (0..=0.5, default 0.05) a pick goes to a
//! uniformly random eligible backend instead: the ε-greedy rule of multi-armed bandits
//! (Sutton and Barto, *Reinforcement Learning: An Introduction*, 2nd ed., 2018, §2.2),
//! which bounds how stale any backend's estimate can get at a cost of ε of the traffic.
//!
//! **Cost.** Pools of up to 64 backends are scanned (O(n), ties broken uniformly at
//! random); larger ones take the best of `⌈log₂ n⌉ + 1` random eligible backends, Envoy's
//! least-request sampling (see `least_connections` for the trade-off), so a pick is
//! O(log n), lock-free and write-free.

use super::least_connections::{
    EXACT_MAX, choice_count, least_loaded, least_loaded_sampled, random_eligible,
};
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy};

/// Lowest peak-EWMA response time per unit of weight, with ε-greedy exploration.
#[derive(Debug)]
pub struct ResponseTime {
    exploration: f64,
}

impl ResponseTime {
    /// The strategy exploring a share `exploration` of picks (clamped to 0..=0.5; a NaN
    /// counts as 0).
    pub fn new(exploration: f64) -> Self {
        let exploration = if exploration.is_nan() {
            0.0
        } else {
            exploration.clamp(0.0, 0.5)
        };
        Self { exploration }
    }
}

impl Strategy for ResponseTime {
    fn name(&self) -> &'static str {
        "response_time"
    }

    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        if self.exploration > 0.0 && fastrand::f64() < self.exploration {
            return random_eligible(pool);
        }
        let cost = |i: usize| {
            let live = &pool.backends()[i].live;
            let cost = live.latency_estimate_ns(req.now_ns) / pool.effective_weight(i);
            (cost, live.in_flight())
        };
        if pool.len() <= EXACT_MAX {
            least_loaded(pool, cost)
        } else {
            least_loaded_sampled(pool, choice_count(pool.len()), cost)
        }
    }

    fn figures(&self, pool: &PoolView<'_>, now_ns: u64) -> Vec<Figure> {
        pool.backends()
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Figure::backend(
                    "response_time_ms",
                    i,
                    b.live.latency_estimate_ns(now_ns) / 1e6,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendFlags};
    use crate::strategy::testing::backends;
    use proptest::prelude::{ProptestConfig, prop_assert, proptest};

    const MS: u64 = 1_000_000;

    /// Sends `requests` requests one after another, backend `i` answering after
    /// `latency_ms(i)`; returns how many requests each backend received.
    fn simulate(
        strategy: &ResponseTime,
        b: &[Backend],
        requests: usize,
        latency_ms: impl Fn(usize) -> u64,
    ) -> Vec<usize> {
        let view = PoolView::new(b, &[], false);
        let mut counts = vec![0; b.len()];
        let mut now = 0;
        for _ in 0..requests {
            let i = strategy
                .pick(&RequestInfo::new(now), &view)
                .expect("eligible")
                .0;
            counts[i] += 1;
            let guard = b[i].live.begin(now);
            now += latency_ms(i) * MS;
            guard.success(now);
        }
        counts
    }

    #[test]
    fn picks_the_fastest() {
        let b = backends(&[1, 1, 1]);
        b[0].live.begin(0).success(30 * MS);
        b[1].live.begin(0).success(10 * MS);
        b[2].live.begin(0).success(20 * MS);
        let view = PoolView::new(&b, &[], false);
        let greedy = ResponseTime::new(0.0);
        for _ in 0..100 {
            assert_eq!(
                greedy.pick(&RequestInfo::new(30 * MS), &view),
                Some(BackendId(1))
            );
        }
    }

    #[test]
    fn tie_goes_to_fewer_in_flight() {
        let b = backends(&[1, 1]);
        let _busy = b[0].live.begin(0);
        let view = PoolView::new(&b, &[], false);
        let greedy = ResponseTime::new(0.0);
        for _ in 0..100 {
            assert_eq!(greedy.pick(&RequestInfo::new(0), &view), Some(BackendId(1)));
        }
    }

    #[test]
    fn slow_backend_is_avoided_but_explored() {
        let b = backends(&[1, 1, 1]);
        let strategy = ResponseTime::new(0.1);
        let requests = 6_000;
        let counts = simulate(&strategy, &b, requests, |i| if i == 0 { 200 } else { 5 });
        // Greedy picks never go to the slow backend once it has been measured; random
        // exploration sends it about ε/3 of the traffic: 200 of 6,000.
        let explored = counts[0] as f64 / requests as f64;
        assert!(
            (0.02..0.06).contains(&explored),
            "slow backend got {counts:?}"
        );
        assert!(counts[1] > 2_000 || counts[2] > 2_000, "{counts:?}");
    }

    #[test]
    fn explored_backend_that_recovered_wins_again() {
        let b = backends(&[1, 1]);
        let strategy = ResponseTime::new(0.05);
        // Backend 0 was slow once.
        b[0].live.begin(0).success(50 * MS);
        // Now both answer in 5 ms. Exploration re-measures backend 0, whose estimate
        // converges back toward 5 ms with time constant τ = 10 s; once within the decay
        // of the other's estimate between observations (about a minute here) the two
        // alternate in greedy picks. 40,000 requests last 200 s; exploration alone would
        // send backend 0 about 1,000.
        let counts = simulate(&strategy, &b, 40_000, |_| 5);
        assert!(counts[0] > 8_000, "{counts:?}");
    }

    #[test]
    fn weight_scales_response_time() {
        let b = backends(&[1, 4]);
        b[0].live.begin(0).success(10 * MS);
        b[1].live.begin(0).success(20 * MS);
        let view = PoolView::new(&b, &[], false);
        let greedy = ResponseTime::new(0.0);
        assert_eq!(
            greedy.pick(&RequestInfo::new(20 * MS), &view),
            Some(BackendId(1))
        );
        // Slow start holds backend 1 at a tenth of its weight.
        b[1].live.set_effective_weight(0.4);
        assert_eq!(
            greedy.pick(&RequestInfo::new(20 * MS), &view),
            Some(BackendId(0))
        );
    }

    #[test]
    fn large_pool_samples_and_skips_ineligible() {
        let b = backends(&vec![1; 300]);
        for (i, backend) in b.iter().enumerate() {
            if i % 3 != 0 {
                backend.live.set_flag(BackendFlags::EJECTED);
            }
        }
        let view = PoolView::new(&b, &[BackendId(0)], false);
        let strategy = ResponseTime::new(0.5);
        for _ in 0..500 {
            let i = strategy
                .pick(&RequestInfo::new(0), &view)
                .expect("eligible")
                .0;
            assert!(view.is_eligible(i), "{i}");
        }
    }

    #[test]
    fn exploration_is_clamped() {
        assert_eq!(ResponseTime::new(2.0).exploration, 0.5);
        assert_eq!(ResponseTime::new(-1.0).exploration, 0.0);
        assert_eq!(ResponseTime::new(f64::NAN).exploration, 0.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// The share of traffic an always-slow backend gets is the exploration rate's
        /// share of it: ε / (eligible backends), within sampling noise.
        #[test]
        fn slow_backend_share_is_the_exploration_rate(
            exploration in 0.02f64..0.5,
            n in 2usize..6,
        ) {
            let b = backends(&vec![1; n]);
            let strategy = ResponseTime::new(exploration);
            let requests = 4_000;
            let counts = simulate(&strategy, &b, requests, |i| if i == 0 { 400 } else { 4 });
            let share = counts[0] as f64 / requests as f64;
            let expected = exploration / n as f64;
            prop_assert!(
                (share - expected).abs() < 0.02 + 0.25 * expected,
                "slow share {share:.4}, expected {expected:.4}"
            );
        }
    }
}
