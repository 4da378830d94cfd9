//! `least_connections`: the eligible backend with the fewest requests in flight per unit
//! of effective weight — exactly in small pools, by sampling in large ones.
//!
//! HAProxy's `balance leastconn` and nginx's `least_conn`
//! (`src/http/modules/ngx_http_upstream_least_conn_module.c`), both weight-aware. The pick
//! minimises
//!
//! ```text
//! load_i = in_flight_i / w_i          w_i = effective weight (configured × dynamic × slow start)
//! ```
//!
//! compared by cross-multiplication (`in_flight_a · w_b < in_flight_b · w_a`), exact for
//! integer weights.
//!
//! **Pools of up to [`EXACT_MAX`] backends** are scanned in full: O(n) with n ≤ 64 is a
//! few dozen nanoseconds. The scan starts at a rotating position (one relaxed
//! `fetch_add`) and keeps the first strict minimum, so ties go to the tied backends in
//! turn, as nginx resolves ties by round robin among the tied peers: an idle pool
//! (everything tied at 0) is served in exact rotation.
//!
//! **Larger pools** use Envoy's least-request algorithm (`LEAST_REQUEST` with
//! `choice_count`): the least loaded of `k` backends drawn at random, with
//!
//! ```text
//! k = ⌈log₂ n⌉ + 1          (15 at n = 10,000)
//! ```
//!
//! so a pick stays O(log n). This departs from exactness: the pick is the least loaded
//! of the sample, whose load rank lies in the best `1/(k+1)` of the pool on average, not
//! the global minimum. An exact minimum in O(log n) needs an ordered index of backends by
//! load, updated on every request start *and* finish on the hot path — HAProxy's
//! `leastconn` keeps servers in an elastic binary tree re-positioned under the
//! load-balancer lock at each connection change — and that lock would serialise every
//! request. Sampling reads `k` atomics and writes nothing, and, like P2C (Mitzenmacher
//! 2001), it keeps concurrent pickers from all herding onto the one least-loaded backend.
//! If no eligible backend turns up in `2k` draws, the pick falls back to a full scan.
//!
//! The sampling ([`least_loaded_sampled`]), the scan ([`least_loaded`]) and
//! [`random_eligible`] are shared with `p2c`, `peak_ewma`, `response_time` and
//! `health_score`, which differ only in their load.

use std::cmp::Ordering;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use super::{BackendId, PoolView, RequestInfo, Strategy};

/// Largest pool scanned exactly; larger pools are sampled (see the module docs).
pub(super) const EXACT_MAX: usize = 64;

/// Least connections per unit of effective weight: an exact scan up to 64 backends, the
/// least loaded of `⌈log₂ n⌉ + 1` random backends beyond.
#[derive(Debug, Default)]
pub struct LeastConnections {
    /// Where the next exact scan starts, so that ties rotate.
    next: AtomicUsize,
}

impl LeastConnections {
    /// The strategy (everything it reads is the pool's live state).
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for LeastConnections {
    fn name(&self) -> &'static str {
        "least_connections"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        let n = pool.len();
        let load = |i| InFlightPerWeight::of(pool, i);
        if n <= EXACT_MAX {
            let start = self.next.fetch_add(1, AtomicOrdering::Relaxed) % n.max(1);
            least_loaded_from(pool, start, load)
        } else {
            least_loaded_sampled(pool, choice_count(n), load)
        }
    }
}

/// Candidates sampled in a pool of `n` backends: `⌈log₂ n⌉ + 1`.
#[inline]
pub(super) fn choice_count(n: usize) -> usize {
    let ceil_log2 = usize::BITS - n.saturating_sub(1).leading_zeros();
    ceil_log2 as usize + 1
}

/// A backend's requests in flight per unit of effective weight, ordered by
/// cross-multiplication (`in_flight_a · w_b` against `in_flight_b · w_a`), so that
/// `1/2 == 2/4` exactly for integer weights.
#[derive(Clone, Copy, Debug)]
pub(super) struct InFlightPerWeight {
    in_flight: u64,
    weight: f64,
}

impl InFlightPerWeight {
    /// The load of backend `i` of `pool` now.
    #[inline]
    pub(super) fn of(pool: &PoolView<'_>, i: usize) -> Self {
        Self {
            in_flight: pool.backends()[i].live.in_flight(),
            weight: pool.effective_weight(i),
        }
    }
}

impl Ord for InFlightPerWeight {
    /// A total order: effective weights are positive and finite, and `total_cmp` orders
    /// whatever else could arise.
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        let lhs = self.in_flight as f64 * other.weight;
        let rhs = other.in_flight as f64 * self.weight;
        lhs.total_cmp(&rhs)
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

/// Whether `candidate` should replace `best` as the lowest load: strictly lower, or
/// `best` does not compare at all (a NaN) while `candidate` does.
#[inline]
fn lower<L: PartialOrd>(candidate: &L, best: &L) -> bool {
    match candidate.partial_cmp(best) {
        Some(ordering) => ordering == Ordering::Less,
        None => best.partial_cmp(best).is_none() && candidate.partial_cmp(candidate).is_some(),
    }
}

/// The eligible backend of `pool` with the lowest `load`, scanning from `start` and
/// wrapping around; the first one met wins a tie. `None` only when no backend is
/// eligible. One O(n) pass, no allocation.
fn least_loaded_from<L: PartialOrd>(
    pool: &PoolView<'_>,
    start: usize,
    load: impl Fn(usize) -> L,
) -> Option<BackendId> {
    let n = pool.len();
    let mut best: Option<(usize, L)> = None;
    for i in (0..n).map(|k| (start + k) % n) {
        if !pool.is_eligible(i) {
            continue;
        }
        let candidate = load(i);
        if best
            .as_ref()
            .is_none_or(|(_, lowest)| lower(&candidate, lowest))
        {
            best = Some((i, candidate));
        }
    }
    best.map(|(i, _)| BackendId(i))
}

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

/// The eligible backend with the lowest `load` among `choices` eligible backends drawn
/// uniformly at random (with replacement, as Envoy draws them; the first drawn wins a tie,
/// which is random), out of at most `2 · choices` draws; if none of those draws was
/// eligible, the [`least_loaded`] eligible backend. `None` only when no backend is
/// eligible. O(choices) unless the fallback runs.
pub(super) fn least_loaded_sampled<L: PartialOrd>(
    pool: &PoolView<'_>,
    choices: usize,
    load: impl Fn(usize) -> L,
) -> Option<BackendId> {
    let n = pool.len();
    if n == 0 {
        return None;
    }
    let mut best: Option<(usize, L)> = None;
    let mut found = 0;
    for _ in 0..2 * choices {
        let i = fastrand::usize(..n);
        if !pool.is_eligible(i) {
            continue;
        }
        let candidate = load(i);
        if best
            .as_ref()
            .is_none_or(|(_, lowest)| lower(&candidate, lowest))
        {
            best = Some((i, candidate));
        }
        found += 1;
        if found == choices {
            break;
        }
    }
    match best {
        Some((i, _)) => Some(BackendId(i)),
        None => least_loaded(pool, load),
    }
}

/// A uniformly random eligible backend of `pool`: up to four uniform draws, then the first
/// eligible backend after a random position (slightly favouring backends that follow
/// ineligible ones, only when most of the pool is ineligible). `None` only when no backend
/// is eligible.
pub(super) fn random_eligible(pool: &PoolView<'_>) -> Option<BackendId> {
    let n = pool.len();
    if n == 0 {
        return None;
    }
    for _ in 0..4 {
        let i = fastrand::usize(..n);
        if pool.is_eligible(i) {
            return Some(BackendId(i));
        }
    }
    pool.next_eligible_from(fastrand::usize(..n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendFlags, InFlightGuard};
    use crate::strategy::testing::backends;
    use proptest::prelude::{ProptestConfig, prop, prop_assert, prop_assert_eq, proptest};

    fn pick_with(lc: &LeastConnections, view: &PoolView<'_>) -> Option<usize> {
        lc.pick(&RequestInfo::new(0), view).map(|id| id.0)
    }

    fn pick(view: &PoolView<'_>) -> Option<usize> {
        pick_with(&LeastConnections::new(), view)
    }

    /// Holds `counts[i]` requests in flight on backend `i` until the guards are dropped.
    fn load(b: &[Backend], counts: &[usize]) -> Vec<InFlightGuard> {
        b.iter()
            .zip(counts)
            .flat_map(|(b, &n)| (0..n).map(|_| b.live.begin(0)))
            .collect()
    }

    /// A closed-loop simulation: `concurrency` requests always in flight, all of the same
    /// length, so they finish in the order they started; each completion starts a new
    /// pick. Returns each backend's share of `picks` picks.
    fn steady_state_shares(
        lc: &LeastConnections,
        b: &[Backend],
        concurrency: usize,
        picks: usize,
    ) -> Vec<f64> {
        let view = PoolView::new(b, &[], false);
        let mut running = std::collections::VecDeque::new();
        let mut counts = vec![0usize; b.len()];
        for k in 0..picks + concurrency {
            if running.len() == concurrency {
                running.pop_front();
            }
            let i = pick_with(lc, &view).expect("eligible");
            if k >= concurrency {
                counts[i] += 1;
            }
            running.push_back(b[i].live.begin(0));
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
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
    fn divides_by_effective_weight() {
        // 1/1 against 2/3: the heavier backend is less loaded per unit of weight.
        let b = backends(&[1, 3]);
        let _guards = load(&b, &[1, 2]);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(pick(&view), Some(1));
        // Slow start holds backend 1 at a third of its weight: 2/1 > 1/1.
        b[1].live.set_effective_weight(1.0);
        assert_eq!(pick(&view), Some(0));
    }

    #[test]
    fn ties_rotate() {
        let b = backends(&[1, 1, 1, 1, 1]);
        let lc = LeastConnections::new();
        let view = PoolView::new(&b, &[], false);
        // An idle pool is served in exact rotation.
        let picks: Vec<_> = (0..10)
            .map(|_| pick_with(&lc, &view).expect("eligible"))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
        // Only the tied least-loaded backends are picked, each of them in turn.
        let _guards = load(&b, &[1, 0, 1, 0, 0]);
        let mut counts = [0usize; 5];
        for _ in 0..500 {
            counts[pick_with(&lc, &view).expect("eligible")] += 1;
        }
        assert_eq!((counts[0], counts[2]), (0, 0), "{counts:?}");
        for i in [1, 3, 4] {
            assert!(counts[i] >= 100, "{counts:?}");
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
        assert_eq!(pick(&PoolView::new(&[], &[], false)), None);
    }

    #[test]
    fn large_pool_samples_a_good_backend() {
        // 1,000 backends, loads 0..=999 in a shuffled order: the least loaded of
        // ⌈log₂ 1000⌉ + 1 = 11 draws is in the best 1/12 on average.
        let n = 1_000;
        let b = backends(&vec![1; n]);
        let mut loads: Vec<usize> = (0..n).collect();
        fastrand::Rng::with_seed(3).shuffle(&mut loads);
        let _guards = load(&b, &loads);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(choice_count(n), 11);
        let picks = 2_000;
        let mean_load: f64 = (0..picks)
            .map(|_| loads[pick(&view).expect("eligible")] as f64)
            .sum::<f64>()
            / f64::from(picks);
        assert!(mean_load < 120.0, "mean load picked {mean_load}");
    }

    #[test]
    fn large_pool_with_few_eligible_still_picks() {
        let b = backends(&vec![1; 500]);
        for (i, backend) in b.iter().enumerate() {
            if i != 321 {
                backend.live.set_flag(BackendFlags::DISABLED);
            }
        }
        let view = PoolView::new(&b, &[], false);
        for _ in 0..50 {
            assert_eq!(pick(&view), Some(321));
        }
    }

    #[test]
    fn choice_count_is_ceil_log2_plus_one() {
        let counts: Vec<_> = [1, 2, 3, 64, 65, 100, 10_000]
            .iter()
            .map(|&n| choice_count(n))
            .collect();
        assert_eq!(counts, vec![1, 2, 3, 7, 8, 8, 15]);
    }

    #[test]
    fn in_flight_per_weight_orders_fractions() {
        let f = |in_flight, weight| InFlightPerWeight { in_flight, weight };
        assert_eq!(f(1, 2.0), f(2, 4.0));
        assert!(f(1, 3.0) < f(1, 2.0));
        assert!(f(0, 1.0) < f(1, 100.0));
        assert!(f(3, 0.5) > f(5, 1.0));
    }

    #[test]
    fn nan_never_displaces_a_comparable_best() {
        let b = backends(&[1, 1, 1]);
        let view = PoolView::new(&b, &[], false);
        let loads = [f64::NAN, 2.0, 1.0];
        for start in 0..3 {
            assert_eq!(
                least_loaded_from(&view, start, |i| loads[i]),
                Some(BackendId(2))
            );
        }
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
            let lc = LeastConnections::new();
            let total: u32 = weights.iter().sum();
            let mut guards = Vec::new();
            for round in 1..=rounds {
                for _ in 0..total {
                    let i = pick_with(&lc, &view).expect("eligible");
                    guards.push(b[i].live.begin(0));
                }
                for (backend, &w) in b.iter().zip(&weights) {
                    prop_assert_eq!(backend.live.in_flight(), (round as u64) * u64::from(w));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// In steady state (a fixed number of equal-length requests always in flight) each
        /// backend's share of the picks follows its weight, in small exact pools and in
        /// large sampled ones.
        #[test]
        fn steady_state_shares_follow_weights(
            weights in prop::collection::vec(1u32..5, 2..6),
            large in proptest::bool::ANY,
        ) {
            // A large pool: the weights repeated to 40 backends each, compared per group.
            let pool_weights: Vec<u32> = if large {
                weights.iter().copied().cycle().take(40 * weights.len()).collect()
            } else {
                weights.clone()
            };
            let b = backends(&pool_weights);
            let lc = LeastConnections::new();
            let total: u32 = pool_weights.iter().sum();
            let concurrency = 8 * total as usize;
            let shares = steady_state_shares(&lc, &b, concurrency, 20 * total as usize);
            let groups = weights.len();
            for (g, &w) in weights.iter().enumerate() {
                let share: f64 = shares.iter().skip(g).step_by(groups).sum();
                let expected = f64::from(w) * (pool_weights.len() / groups) as f64 / f64::from(total);
                prop_assert!(
                    (share - expected).abs() < 0.1 * expected + 0.01,
                    "weight {} group: share {:.3}, expected {:.3}", w, share, expected
                );
            }
        }
    }
}
