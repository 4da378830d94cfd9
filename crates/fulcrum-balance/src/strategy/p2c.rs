//! `p2c`: power of two choices on requests in flight.
//!
//! Draw two distinct backends uniformly at random and send the request to the less loaded
//! one (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS
//! 12(10), 2001). With `n` requests over `n` backends the most loaded backend gets about
//! `ln n / ln ln n` of them with one random choice but only `ln ln n / ln 2 + O(1)` with
//! two: an exponential improvement for two load reads per pick instead of a scan. Unlike
//! least connections, concurrent pickers (other threads, other nodes) do not all herd onto
//! the same least-loaded backend.
//!
//! This is tower's `balance::p2c` as used by linkerd2-proxy, with the load of backend `i`
//!
//! ```text
//! load_i = in_flight_i / weight_i
//! ```
//!
//! compared exactly in integers (see the `least_connections` module). Dividing by weight
//! follows the intent of Envoy's least-request balancer, which, when weights differ,
//! schedules by `weight / (active_requests + 1)^bias`; here the weight scales the load
//! inside the two-way comparison instead.
//!
//! The pair is drawn from the whole pool. If one of the two is ineligible the other is
//! taken; if both are, another pair is drawn, up to `MAX_PAIR_DRAWS` pairs, after which the
//! pick falls back to an O(n) scan for the least-loaded eligible backend, so a pool with
//! few eligible backends still gets a correct answer in bounded time.
//!
//! [`distinct_pair`] and [`power_of_two_choices`] (generic over the load) are shared with
//! `peak_ewma` and `tail_aware`, which differ only in their load; `duration_class` draws
//! its pairs among a subset of the pool with [`distinct_pair`] and `MAX_PAIR_DRAWS`.

use super::least_connections::{InFlightPerWeight, least_loaded};
use super::{BackendId, PoolView, RequestInfo, Strategy};

/// Pairs drawn before falling back to a scan. With a fraction `f` of the pool ineligible,
/// a pair is wholly ineligible with probability about `f²`, so the scan runs for a share
/// of about `f^6` of picks (one in 64 with half the pool down).
pub(super) const MAX_PAIR_DRAWS: usize = 3;

/// Power of two choices on in-flight requests per unit of weight. Lock-free and
/// write-free: two random draws and two atomic loads per pick.
#[derive(Debug, Default)]
pub struct PowerOfTwoChoices;

impl PowerOfTwoChoices {
    /// The strategy (stateless: everything it reads is the pool's live state).
    pub fn new() -> Self {
        Self
    }
}

impl Strategy for PowerOfTwoChoices {
    fn name(&self) -> &'static str {
        "p2c"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        power_of_two_choices(pool, |i| InFlightPerWeight::of(pool, i))
    }
}

/// Two distinct indices in `0..n`, uniformly distributed over ordered pairs, from two
/// draws where `draw(bound)` returns a value uniform in `0..bound`.
///
/// As tower and linkerd2-proxy do it: `a` is drawn from `0..n` and `b` from `0..n-1`, then
/// `b` is shifted past `a`, so the pair is distinct without rejection sampling.
/// Requires `n ≥ 2`.
#[inline]
pub(super) fn distinct_pair(n: usize, mut draw: impl FnMut(usize) -> usize) -> (usize, usize) {
    debug_assert!(n >= 2, "a distinct pair needs two backends, got {n}");
    let a = draw(n);
    let b = draw(n - 1);
    let b = if b >= a { b + 1 } else { b };
    debug_assert!(a != b && a < n && b < n, "pair ({a}, {b}) of {n}");
    (a, b)
}

/// Power of two choices over the eligible backends of `pool`: the less loaded of a random
/// distinct pair by `load` (`a` on a tie, which is random since the pair's order is), the
/// eligible one of a half-eligible pair, or after `MAX_PAIR_DRAWS` wholly ineligible pairs
/// the [`least_loaded`] eligible backend. `None` only when no backend is eligible.
pub(super) fn power_of_two_choices<L: PartialOrd>(
    pool: &PoolView<'_>,
    load: impl Fn(usize) -> L,
) -> Option<BackendId> {
    let n = pool.len();
    if n < 2 {
        return (n == 1 && pool.is_eligible(0)).then_some(BackendId(0));
    }
    for _ in 0..MAX_PAIR_DRAWS {
        let (a, b) = distinct_pair(n, |bound| fastrand::usize(..bound));
        match (pool.is_eligible(a), pool.is_eligible(b)) {
            (true, true) => return Some(BackendId(if load(b) < load(a) { b } else { a })),
            (true, false) => return Some(BackendId(a)),
            (false, true) => return Some(BackendId(b)),
            (false, false) => {}
        }
    }
    least_loaded(pool, load)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendFlags, InFlightGuard};
    use crate::strategy::testing::backends;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_ne, proptest};

    fn pick(view: &PoolView<'_>) -> Option<usize> {
        PowerOfTwoChoices::new()
            .pick(&RequestInfo::new(0), view)
            .map(|id| id.0)
    }

    /// Holds `counts[i]` requests in flight on backend `i` until the guards are dropped.
    fn load(b: &[Backend], counts: &[u64]) -> Vec<InFlightGuard> {
        b.iter()
            .zip(counts)
            .flat_map(|(b, &n)| (0..n).map(|_| b.live.begin(0)))
            .collect()
    }

    #[test]
    fn prefers_idle_over_loaded() {
        let b = backends(&[1, 1]);
        let _guards = load(&b, &[5, 0]);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(pick(&view), Some(1));
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_three() {
        let b = backends(&[1, 1, 1]);
        let _guards = load(&b, &[3, 1, 0]);
        let view = PoolView::new(&b, &[], false);
        let mut counts = [0usize; 3];
        for _ in 0..3_000 {
            counts[pick(&view).expect("eligible")] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        // Backend 1 wins only the pair {0, 1}: a third of the picks.
        assert!(counts[1] > 800 && counts[2] > 1_800, "{counts:?}");
    }

    #[test]
    fn divides_by_weight() {
        let b = backends(&[1, 4]);
        let _guards = load(&b, &[1, 3]);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(
                pick(&view),
                Some(1),
                "3/4 in flight per weight is less than 1/1"
            );
        }
    }

    #[test]
    fn single_backend() {
        let b = backends(&[7]);
        let _guards = load(&b, &[9]);
        assert_eq!(pick(&PoolView::new(&b, &[], false)), Some(0));
        assert_eq!(pick(&PoolView::new(&b, &[BackendId(0)], false)), None);
        assert_eq!(pick(&PoolView::new(&[], &[], false)), None);
    }

    #[test]
    fn takes_the_eligible_one_of_a_pair() {
        let b = backends(&[1, 1]);
        let _guards = load(&b, &[0, 4]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        assert_eq!(pick(&PoolView::new(&b, &[], false)), Some(1));
        assert_eq!(pick(&PoolView::new(&b, &[BackendId(1)], false)), None);
    }

    #[test]
    fn few_eligible_in_a_large_pool_still_picked() {
        // 1 eligible backend out of 200: almost every pair draw misses, so the scan answers.
        let b = backends(&[1; 200]);
        for (i, backend) in b.iter().enumerate() {
            if i != 137 {
                backend.live.set_flag(BackendFlags::DISABLED);
            }
        }
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(pick(&view), Some(137));
        }
    }

    proptest! {
        #[test]
        fn pair_is_distinct_and_in_range(
            n in 2usize..10_000,
            draws in (any::<usize>(), any::<usize>()),
        ) {
            // Arbitrary draws reduced into range cover every (a, b) combination, including
            // the equal draws the shift must separate.
            let mut next = [draws.0, draws.1].into_iter();
            let (a, b) = distinct_pair(n, |bound| next.next().expect("two draws") % bound);
            prop_assert!(a != b);
            prop_assert!(a < n && b < n);
        }

        #[test]
        fn pair_from_rng_is_distinct_and_in_range(n in 2usize..64, seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..100 {
                let (a, b) = distinct_pair(n, |bound| rng.usize(..bound));
                prop_assert!(a != b);
                prop_assert!(a < n && b < n);
            }
        }

        /// A backend strictly more loaded than every other loses every pair it is in.
        #[test]
        fn strictly_most_loaded_is_never_picked(
            mut loads in prop::collection::vec(0u64..20, 2..10),
            worst in any::<prop::sample::Index>(),
        ) {
            let worst = worst.index(loads.len());
            loads[worst] = loads.iter().max().expect("two or more backends") + 1;
            let b = backends(&vec![1; loads.len()]);
            let _guards = load(&b, &loads);
            let view = PoolView::new(&b, &[], false);
            for _ in 0..200 {
                prop_assert_ne!(pick(&view), Some(worst));
            }
        }
    }

    #[test]
    fn pair_draws_cover_every_ordered_pair() {
        let n = 4;
        let mut seen = [[false; 4]; 4];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            let (a, b) = distinct_pair(n, |bound| rng.usize(..bound));
            seen[a][b] = true;
        }
        for (a, row) in seen.iter().enumerate() {
            for (b, &hit) in row.iter().enumerate() {
                assert_eq!(hit, a != b, "pair ({a}, {b})");
            }
        }
    }
}
