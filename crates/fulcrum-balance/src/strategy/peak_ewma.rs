//! `peak_ewma`: power of two choices on latency-weighted load.
//!
//! Finagle's P2C + Peak EWMA balancer (Twitter Finagle, "Load Balancing: Power of Two
//! Choices (P2C) + Peak EWMA"), as ported to tower's `load::PeakEwma` and used by Linkerd
//! ("Beyond Round Robin: Load Balancing for Latency", 2016). Two distinct backends are
//! drawn at random and the request goes to the one with the lower cost
//!
//! ```text
//! cost_i = latency_estimate_i(now) × (in_flight_i + 1) / weight_i
//! ```
//!
//! where `latency_estimate_i` is the backend's peak-EWMA latency in nanoseconds
//! ([`crate::LiveBackend::latency_estimate_ns`], at the request's clock `now_ns`): it jumps
//! to a slower observation at once and decays toward faster ones, so a backend that turns
//! slow loses traffic immediately. Fulcrum reads it as
//! [`crate::LiveBackend::expected_latency_ns`]: at least the age of the backend's oldest
//! request in flight, so a backend that stops answering, or a new one whose first answers
//! are slow, is charged for it before any response comes back (a new backend's estimate
//! starts at an optimistic 1 ms; without this a slow newcomer drew dozens of requests in
//! its first hundreds of milliseconds). The `+ 1` counts the request being placed, so an idle
//! backend is still charged its latency. Failures raise the cost too: a failure is a peak of
//! at least 1 ms (`fulcrum_stats::PeakEwma::penalize`), so a backend that fails fast does
//! not look fast, and the cost is divided by 1 − its recent failure ratio, the expected
//! attempts per success ([`crate::LiveBackend::latency_estimate_ns`]).
//! Dividing by weight lets an operator's weights scale capacity as in the other strategies.
//!
//! The pair draw, the eligibility handling and the O(n) fallback are `p2c`'s, shared
//! rather than copied; only the cost differs.

use super::p2c::power_of_two_choices;
use super::{BackendId, PoolView, RequestInfo, Strategy};

/// Power of two choices on peak-EWMA latency × (in-flight + 1) / weight. Lock-free and
/// write-free: two random draws and, for each of the pair, two atomic loads.
#[derive(Debug, Default)]
pub struct PeakEwmaStrategy;

impl PeakEwmaStrategy {
    /// The strategy (stateless: everything it reads is the pool's live state).
    pub fn new() -> Self {
        Self
    }
}

impl Strategy for PeakEwmaStrategy {
    fn name(&self) -> &'static str {
        "peak_ewma"
    }

    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        power_of_two_choices(pool, |i| cost(pool, i, req.now_ns))
    }
}

/// The cost of sending one more request to backend `i` of `pool` at `now_ns`, in
/// nanoseconds per unit of weight: `expected latency × (in_flight + 1) / weight`.
#[inline]
fn cost(pool: &PoolView<'_>, i: usize, now_ns: u64) -> f64 {
    let live = &pool.backends()[i].live;
    let placed = live.in_flight().saturating_add(1) as f64;
    live.expected_latency_ns(now_ns) * placed / pool.weight(i) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendFlags};
    use crate::strategy::testing::backends;

    const MS: u64 = 1_000_000;

    fn pick(view: &PoolView<'_>, now_ns: u64) -> usize {
        PeakEwmaStrategy::new()
            .pick(&RequestInfo::new(now_ns), view)
            .expect("eligible")
            .0
    }

    /// Sends `requests` requests one after another (a closed loop: each starts when the
    /// previous one is answered), backend `i` answering after `respond(i)` = (latency in
    /// ms, succeeded); returns how many requests each backend received.
    fn simulate(
        b: &[Backend],
        requests: usize,
        respond: impl Fn(usize) -> (u64, bool),
    ) -> Vec<usize> {
        let view = PoolView::new(b, &[], false);
        let mut counts = vec![0; b.len()];
        let mut now = 0;
        for _ in 0..requests {
            let i = pick(&view, now);
            counts[i] += 1;
            let guard = b[i].live.begin(now);
            let (latency_ms, ok) = respond(i);
            now += latency_ms * MS;
            if ok {
                guard.success(now);
            } else {
                guard.failure(now);
            }
        }
        counts
    }

    #[test]
    fn slow_backend_gets_clearly_less_traffic() {
        let b = backends(&[1, 1, 1]);
        let counts = simulate(&b, 3_000, |i| (if i == 0 { 500 } else { 10 }, true));
        // Once backend 0 has shown 500 ms it loses every pair against a 10 ms peer until
        // its estimate decays below 10 ms (ln 50 × τ ≈ 39 s, beyond this 30 s run).
        assert!(counts[0] < 150, "{counts:?}");
        assert!(counts[1] > 1_000 && counts[2] > 1_000, "{counts:?}");
    }

    #[test]
    fn fast_failing_backend_loses_traffic() {
        let b = backends(&[1, 1, 1]);
        let counts = simulate(&b, 3_000, |i| if i == 0 { (1, false) } else { (10, true) });
        // Answering in 1 ms would win every pair by latency alone; the failure penalty
        // must outweigh that.
        assert!(counts[0] < 150, "{counts:?}");
    }

    #[test]
    fn in_flight_multiplies_latency() {
        // Same latency; backend 0 has 3 requests in flight: cost 4 × against 1 ×.
        let b = backends(&[1, 1]);
        let _guards: Vec<_> = (0..3).map(|_| b[0].live.begin(0)).collect();
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(pick(&view, 0), 1);
        }
    }

    #[test]
    fn weight_divides_cost() {
        // Backend 1 is twice as slow but has four times the weight.
        let b = backends(&[1, 4]);
        b[0].live.begin(0).success(10 * MS);
        b[1].live.begin(0).success(20 * MS);
        let view = PoolView::new(&b, &[], false);
        let now = 20 * MS;
        assert!(cost(&view, 1, now) < cost(&view, 0, now));
        for _ in 0..100 {
            assert_eq!(pick(&view, now), 1);
        }
    }

    #[test]
    fn ineligible_partner_is_skipped() {
        let b = backends(&[1, 1]);
        b[0].live.begin(0).success(500 * MS);
        b[1].live.set_flag(BackendFlags::UNHEALTHY);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(
            pick(&view, 500 * MS),
            0,
            "slow but the only eligible backend"
        );
    }

    /// A backend never measured (its estimate the optimistic initial 1 ms) whose first
    /// requests have waited 50 ms is priced by that wait, not by the 1 ms: it loses to
    /// backends measured at 20 ms. (Priced at 1 ms it won every pair until it held about
    /// twenty requests.)
    #[test]
    fn requests_in_flight_bound_an_unmeasured_backends_latency() {
        let b = backends(&[1, 1, 1]);
        for measured in &b[..2] {
            measured.live.begin(0).success(20 * MS);
        }
        let now = 100 * MS;
        let _waiting: Vec<_> = (0..3).map(|_| b[2].live.begin(now - 50 * MS)).collect();
        let _busy: Vec<_> = (0..2).map(|i| b[i].live.begin(now)).collect();
        let view = PoolView::new(&b, &[], false);
        for _ in 0..200 {
            assert_ne!(pick(&view, now), 2);
        }
    }
}
