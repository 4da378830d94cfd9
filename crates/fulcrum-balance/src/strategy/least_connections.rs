//! `least_connections`: the eligible backend with the fewest requests in flight per unit
//! of weight.
//!
//! HAProxy's `balance leastconn` and nginx's `least_conn`
//! (`src/http/modules/ngx_http_upstream_least_conn_module.c`), both weight-aware. The pick
//! minimises
//!
//! ```text
//! load_i = in_flight_i / weight_i
//! ```
//!
//! compared, as nginx does, by cross-multiplying in integers
//! (`in_flight_a · weight_b < in_flight_b · weight_a`), so there is no rounding and no
//! float. Where nginx breaks a tie with weighted round robin among the tied peers, Fulcrum
//! picks uniformly at random among them by reservoir sampling during the same O(n) scan:
//! no allocation, and no shared state written by the pick, so concurrent picks on
//! different threads do not contend on a rotation counter.
//!
//! The scan is [`least_loaded`], which `p2c` and `peak_ewma` reuse as their fallback.

use std::cmp::Ordering;

use super::{BackendId, PoolView, RequestInfo, Strategy};

/// Least connections, weight-aware, with random tie-break. An O(n) scan per pick; no
/// state of its own.
#[derive(Debug, Default)]
pub struct LeastConnections;

impl LeastConnections {
    /// The strategy (stateless: everything it reads is the pool's live state).
    pub fn new() -> Self {
        Self
    }
}

impl Strategy for LeastConnections {
    fn name(&self) -> &'static str {
        "least_connections"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        least_loaded(pool, |i| InFlightPerWeight::of(pool, i))
    }
}

/// A backend's requests in flight per unit of weight, kept as the exact fraction
/// `in_flight / weight` and ordered by cross-multiplication, so `1/2 == 2/4`.
#[derive(Clone, Copy, Debug)]
pub(super) struct InFlightPerWeight {
    in_flight: u64,
    weight: u64,
}

impl InFlightPerWeight {
    /// The load of backend `i` of `pool` now.
    #[inline]
    pub(super) fn of(pool: &PoolView<'_>, i: usize) -> Self {
        Self {
            in_flight: pool.backends()[i].live.in_flight(),
            weight: pool.weight(i),
        }
    }
}

impl Ord for InFlightPerWeight {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        // u64 × u64 always fits in u128: no overflow whatever the counts.
        let lhs = u128::from(self.in_flight) * u128::from(other.weight);
        let rhs = u128::from(other.in_flight) * u128::from(self.weight);
        lhs.cmp(&rhs)
    }
}

impl PartialOrd for InFlightPerWeight {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for InFlightPerWeight {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for InFlightPerWeight {}

/// The eligible backend of `pool` with the lowest `load`, chosen uniformly at random among
/// those tied for lowest; `None` only when no backend is eligible. One O(n) pass, no
/// allocation. Loads that do not compare (a NaN) never displace a comparable best.
pub(super) fn least_loaded<L: PartialOrd>(
    pool: &PoolView<'_>,
    load: impl Fn(usize) -> L,
) -> Option<BackendId> {
    let mut best: Option<(usize, L)> = None;
    // How many eligible backends seen so far share the best load. Replacing the kept one
    // with probability 1/ties (reservoir sampling with a reservoir of one) leaves each tied
    // backend kept with probability 1/ties at the end.
    let mut ties = 0usize;
    for i in 0..pool.len() {
        if !pool.is_eligible(i) {
            continue;
        }
        let candidate = load(i);
        let ordering = match &best {
            None => Some(Ordering::Less),
            Some((_, lowest)) => candidate.partial_cmp(lowest),
        };
        match ordering {
            Some(Ordering::Less) => {
                best = Some((i, candidate));
                ties = 1;
            }
            Some(Ordering::Equal) => {
                ties += 1;
                if fastrand::usize(..ties) == 0 {
                    best = Some((i, candidate));
                }
            }
            Some(Ordering::Greater) | None => {}
        }
    }
    best.map(|(i, _)| BackendId(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendFlags, InFlightGuard};
    use crate::strategy::testing::backends;
    use proptest::prelude::{prop, prop_assert_eq, proptest};

    fn pick(view: &PoolView<'_>) -> Option<usize> {
        LeastConnections::new()
            .pick(&RequestInfo::new(0), view)
            .map(|id| id.0)
    }

    /// Holds `counts[i]` requests in flight on backend `i` until the guards are dropped.
    fn load(b: &[crate::Backend], counts: &[usize]) -> Vec<InFlightGuard> {
        b.iter()
            .zip(counts)
            .flat_map(|(b, &n)| (0..n).map(|_| b.live.begin(0)))
            .collect()
    }

    #[test]
    fn prefers_fewer_in_flight() {
        let b = backends(&[1, 1, 1]);
        let _guards = load(&b, &[2, 1, 0]);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(pick(&view), Some(2));
        }
    }

    #[test]
    fn divides_by_weight() {
        // 1/1 against 2/3: the heavier backend is less loaded per unit of weight.
        let b = backends(&[1, 3]);
        let _guards = load(&b, &[1, 2]);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(pick(&view), Some(1));
        // 1/1 against 3/3: a tie, so both are picked.
        let _more = load(&b, &[0, 1]);
        let mut seen = [false; 2];
        for _ in 0..200 {
            seen[pick(&view).expect("eligible")] = true;
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn ties_are_broken_randomly() {
        let b = backends(&[1, 1, 1, 1, 1]);
        let _guards = load(&b, &[1, 0, 1, 0, 0]);
        let view = PoolView::new(&b, &[], false);
        let mut counts = [0usize; 5];
        for _ in 0..3_000 {
            counts[pick(&view).expect("eligible")] += 1;
        }
        assert_eq!((counts[0], counts[2]), (0, 0), "{counts:?}");
        // Each of the three tied backends expects 1000; far from it means bias.
        for i in [1, 3, 4] {
            assert!(counts[i] > 800, "{counts:?}");
        }
    }

    #[test]
    fn skips_ineligible_and_excluded() {
        let b = backends(&[1, 1, 1]);
        let _guards = load(&b, &[3, 2, 0]);
        b[2].live.set_flag(BackendFlags::EJECTED);
        let excluded = [BackendId(1)];
        assert_eq!(pick(&PoolView::new(&b, &excluded, false)), Some(0));
        assert_eq!(
            pick(&PoolView::new(&b, &excluded, true)),
            Some(2),
            "panic ignores ejection"
        );
        b[0].live.set_flag(BackendFlags::DRAINING);
        assert_eq!(pick(&PoolView::new(&b, &excluded, false)), None);
    }

    #[test]
    fn in_flight_per_weight_orders_fractions() {
        let f = |in_flight, weight| InFlightPerWeight { in_flight, weight };
        assert_eq!(f(1, 2), f(2, 4));
        assert!(f(1, 3) < f(1, 2));
        assert!(f(u64::MAX, u64::MAX) == f(1, 1));
        assert!(f(u64::MAX, 1) > f(u64::MAX - 1, 1));
    }

    proptest! {
        /// Holding every request open, least connections fills backends like water: after
        /// `k · Σ weight` picks each backend has exactly `k · weight` in flight.
        #[test]
        fn in_flight_becomes_proportional_to_weight(
            weights in prop::collection::vec(1u32..8, 1..8),
            rounds in 1usize..4,
        ) {
            let b = backends(&weights);
            let view = PoolView::new(&b, &[], false);
            let total: u32 = weights.iter().sum();
            let mut guards = Vec::new();
            for round in 1..=rounds {
                for _ in 0..total {
                    let i = pick(&view).expect("eligible");
                    guards.push(b[i].live.begin(0));
                }
                for (backend, &w) in b.iter().zip(&weights) {
                    prop_assert_eq!(backend.live.in_flight(), (round as u64) * u64::from(w));
                }
            }
        }
    }
}
