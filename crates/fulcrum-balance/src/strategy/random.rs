//! `random`: weighted random, by Vose's alias method.
//!
//! Each request goes to backend `i` with probability `w_i / Σ w` over the eligible
//! backends, independently of every other request: HAProxy's `balance random` (which
//! honours server weights) and Envoy's `RANDOM` load balancer (which ignores them: its
//! behaviour is the equal-weight case). Weights are effective weights
//! ([`PoolView::effective_weight`]: configured × dynamic × slow start).
//!
//! Sampling is O(1) with an alias table (Walker, "An efficient method for generating
//! discrete random variables with general distributions", ACM TOMS 3(3), 1977), built in
//! O(n) by Vose's stable variant ("A linear algorithm for generating random numbers with a
//! given distribution", IEEE TSE 17(9), 1991). The table has one bucket per backend; with
//! `p_i = n · w_i / Σ w`, bucket `i` keeps backend `i` with probability `min(p_i, 1)` and
//! otherwise names an *alias* that the excess of some `p_j > 1` fills. A pick draws a
//! bucket `b` uniformly and a coin `u` uniform in `[0, 1)`:
//!
//! ```text
//! pick = b          if u < keep_b
//!        alias_b    otherwise
//! ```
//!
//! so `P(i) = (keep_i + Σ_{b : alias_b = i} (1 − keep_b)) / n = w_i / Σ w`.
//!
//! Each bucket is one `AtomicU64` (keep probability in units of 2⁻³² and alias, packed),
//! so picks are lock-free and write-free. [`Strategy::tick`] rebuilds the table when an
//! effective weight moved by more than 1 % or a backend's eligibility changed (ineligible
//! backends get weight 0); it overwrites buckets one by one, so a pick concurrent with a
//! rebuild may follow a mix of the old and new distributions, never an invalid index.
//!
//! A draw that lands on an ineligible backend (a retry's already-tried backend, or one
//! that went down since the last tick) is redrawn, up to `MAX_DRAWS` draws in all, after
//! which the pick falls back to one weighted draw over the eligible backends only (O(n)).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::weighted_round_robin::{scheduled_weights, weight_changed};
use super::{BackendId, PoolView, RequestInfo, Strategy};
use crate::backend::Backend;

/// Draws from the table before falling back to a draw over the eligible backends. With a
/// fraction `f` of the weight ineligible since the last tick, the fallback runs for a
/// share `f^MAX_DRAWS` of picks (one in 81 when a third of the weight is down).
const MAX_DRAWS: usize = 4;

/// Weighted random over the eligible backends, O(1) per pick. Lock-free and write-free.
#[derive(Debug)]
pub struct WeightedRandom {
    table: AliasTable,
    /// The weights the table was last built from; only `tick` locks it.
    built_from: Mutex<Box<[f64]>>,
}

impl WeightedRandom {
    /// Weighted random over `backends`, with their current effective weights (the
    /// configured ones until the pool publishes effective weights).
    pub fn new(backends: &[Backend]) -> Self {
        let view = PoolView::new(backends, &[], false);
        let weights: Box<[f64]> = (0..view.len()).map(|i| view.effective_weight(i)).collect();
        let table = AliasTable::new(weights.len());
        table.fill(&weights);
        Self {
            table,
            built_from: Mutex::new(weights),
        }
    }
}

impl Strategy for WeightedRandom {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        debug_assert_eq!(
            self.table.len(),
            pool.len(),
            "strategy built for another backend list"
        );
        if pool.is_empty() {
            return None;
        }
        for _ in 0..MAX_DRAWS {
            let i = self
                .table
                .sample(fastrand::usize(..pool.len()), fastrand::u32(..));
            if pool.is_eligible(i) {
                return Some(BackendId(i));
            }
        }
        weighted_draw_over_eligible(pool)
    }

    fn tick(&self, pool: &PoolView<'_>, _now_ns: u64) {
        let weights = scheduled_weights(pool, |i| pool.effective_weight(i));
        let mut built_from = self.built_from.lock();
        if built_from
            .iter()
            .zip(&weights)
            .any(|(&old, &new)| weight_changed(old, new))
        {
            self.table.fill(&weights);
            built_from.copy_from_slice(&weights);
        }
    }
}

/// Walker's alias table, one atomic bucket per backend.
#[derive(Debug)]
struct AliasTable {
    /// Bucket `i`: the probability of keeping `i`, in units of 2⁻³², in the high half; the
    /// alias taken otherwise in the low half.
    buckets: Box<[AtomicU64]>,
}

impl AliasTable {
    /// A table of `n` buckets, each keeping its own backend (uniform) until filled.
    fn new(n: usize) -> Self {
        Self {
            buckets: (0..n).map(|i| AtomicU64::new(pack(u32::MAX, i))).collect(),
        }
    }

    /// Number of buckets (backends).
    fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The backend for bucket `bucket` (uniform in `0..len`) and coin `coin` (uniform in
    /// `u32`).
    #[inline]
    fn sample(&self, bucket: usize, coin: u32) -> usize {
        let packed = self.buckets[bucket].load(Ordering::Relaxed);
        let keep = (packed >> 32) as u32;
        if coin < keep {
            bucket
        } else {
            (packed & u64::from(u32::MAX)) as usize
        }
    }

    /// Refills the table for `weights` (one per bucket; non-positive or non-finite weights
    /// count as 0) by Vose's algorithm. If no weight is positive the table becomes
    /// uniform. O(n) time, with two work lists allocated (never on the pick path).
    fn fill(&self, weights: &[f64]) {
        let n = self.buckets.len();
        debug_assert_eq!(weights.len(), n, "one weight per bucket");
        let clean = |w: f64| if w.is_finite() && w > 0.0 { w } else { 0.0 };
        let total: f64 = weights.iter().map(|&w| clean(w)).sum();
        let mut scaled: Vec<f64> = if total > 0.0 {
            weights
                .iter()
                .map(|&w| clean(w) * n as f64 / total)
                .collect()
        } else {
            vec![1.0; n]
        };
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            self.buckets[s].store(pack(keep_units(scaled[s]), l), Ordering::Relaxed);
            // Vose: the large backend gives bucket `s` what it lacks, computed as
            // `(p_l + p_s) − 1` rather than `p_l − (1 − p_s)` for numerical stability.
            scaled[l] = (scaled[l] + scaled[s]) - 1.0;
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // What remains has (up to rounding) probability exactly 1: keep itself.
        for i in small.into_iter().chain(large) {
            self.buckets[i].store(pack(u32::MAX, i), Ordering::Relaxed);
        }
    }
}

/// A keep probability `p` in units of 2⁻³², saturating at `u32::MAX` (the coin is then
/// below it with probability 1 − 2⁻³², and such buckets alias themselves anyway).
fn keep_units(p: f64) -> u32 {
    (p * 4_294_967_296.0)
        .round()
        .clamp(0.0, f64::from(u32::MAX)) as u32
}

fn pack(keep: u32, alias: usize) -> u64 {
    let alias = u32::try_from(alias).expect("fewer than 2³² backends");
    (u64::from(keep) << 32) | u64::from(alias)
}

/// One draw over the eligible backends of `pool` in proportion to effective weight: two
/// O(n) passes, no allocation.
fn weighted_draw_over_eligible(pool: &PoolView<'_>) -> Option<BackendId> {
    let eligible = |i: &usize| pool.is_eligible(*i);
    let total: f64 = (0..pool.len())
        .filter(eligible)
        .map(|i| pool.effective_weight(i))
        .sum();
    if total <= 0.0 {
        return None;
    }
    let mut r = fastrand::f64() * total;
    // Another thread may change eligibility between the two passes (a drain, an
    // ejection), leaving `r` past the eligible weight the second pass sees; the last
    // eligible backend seen then takes it, so the result was eligible when read.
    let mut last = None;
    for i in (0..pool.len()).filter(eligible) {
        let w = pool.effective_weight(i);
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
    use proptest::prelude::{ProptestConfig, any, prop, prop_assert, prop_assert_eq, proptest};

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

    /// Each backend's exact probability in `table`, summed over every bucket and coin.
    fn exact_probabilities(table: &AliasTable) -> Vec<f64> {
        let n = table.len();
        let mut p = vec![0.0; n];
        for (b, bucket) in table.buckets.iter().enumerate() {
            let packed = bucket.load(Ordering::Relaxed);
            let keep = (packed >> 32) as f64 / 4_294_967_296.0;
            let alias = (packed & u64::from(u32::MAX)) as usize;
            p[b] += keep / n as f64;
            p[alias] += (1.0 - keep) / n as f64;
        }
        p
    }

    #[test]
    fn alias_table_is_exact() {
        let table = AliasTable::new(4);
        table.fill(&[1.0, 2.0, 3.0, 4.0]);
        for (got, want) in exact_probabilities(&table).iter().zip([0.1, 0.2, 0.3, 0.4]) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        // No weight at all: uniform.
        table.fill(&[0.0; 4]);
        assert_eq!(exact_probabilities(&table), vec![0.25; 4]);
    }

    #[test]
    fn shares_follow_weights() {
        let b = backends(&[1, 2, 3, 4]);
        let wr = WeightedRandom::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_close(&shares(&wr, &view), &[0.1, 0.2, 0.3, 0.4]);
    }

    #[test]
    fn shares_follow_effective_weights_after_a_tick() {
        let b = backends(&[1, 1]);
        let wr = WeightedRandom::new(&b);
        let view = PoolView::new(&b, &[], false);
        // Slow start holds backend 1 at a quarter of its weight.
        b[1].live.set_effective_weight(0.25);
        wr.tick(&view, 0);
        assert_close(&shares(&wr, &view), &[0.8, 0.2]);
    }

    #[test]
    fn ineligible_weight_is_redistributed_by_weight() {
        // Backend 0 holds half the weight, so a share of picks takes the fallback path.
        let b = backends(&[5, 1, 2, 2]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let wr = WeightedRandom::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_close(&shares(&wr, &view), &[0.0, 0.2, 0.4, 0.4]);
        // After a tick the table leaves it out: the same shares without fallbacks.
        wr.tick(&view, 0);
        assert!(exact_probabilities(&wr.table)[0] < 1e-9);
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

        /// Vose's table gives every backend exactly its share of the weight (to the
        /// 2⁻³² resolution of the keep probabilities).
        #[test]
        fn table_probabilities_equal_weight_shares(
            weights in prop::collection::vec(0.0f64..1000.0, 1..200),
        ) {
            let table = AliasTable::new(weights.len());
            table.fill(&weights);
            let total: f64 = weights.iter().sum();
            let p = exact_probabilities(&table);
            prop_assert_eq!(p.len(), weights.len());
            for (i, (&got, &w)) in p.iter().zip(&weights).enumerate() {
                let want = if total > 0.0 { w / total } else { 1.0 / weights.len() as f64 };
                prop_assert!((got - want).abs() < 1e-7, "backend {}: {} vs {}", i, got, want);
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
