//! `weighted_round_robin`: nginx's smooth weighted round robin.
//!
//! The algorithm of nginx's `ngx_http_upstream_get_peer`
//! (`src/http/ngx_http_upstream_round_robin.c`, introduced in nginx 1.3.1 by the change
//! "Upstream: smooth weighted round-robin balancing"). Every backend `i` keeps a running
//! score `current_i`; for each pick, over the eligible backends only:
//!
//! ```text
//! current_i += weight_i          for every eligible i
//! total      = Σ weight_i        over the eligible i
//! best       = argmax current_i  (the first one on a tie)
//! current_best -= total
//! ```
//!
//! Over every `Σ weight` consecutive picks (all backends eligible) each backend is picked
//! exactly `weight` times, and the picks are interleaved rather than bunched: weights
//! `{5, 1, 1}` give `a a b a c a a`, where nginx's earlier algorithm gave
//! `c b a a a a a`. An ineligible backend is skipped for that pick and its score left
//! untouched, exactly as nginx skips a peer that is down, failed or already tried.
//!
//! nginx additionally lowers a peer's `effective_weight` after failures and ramps it back;
//! Fulcrum takes failing backends out through health and ejection flags instead, so the
//! weights here are the configured ones, read once at construction.

use parking_lot::Mutex;

use super::{BackendId, PoolView, RequestInfo, Strategy, weight_of};
use crate::backend::Backend;

/// Smooth weighted round robin over the eligible backends (nginx's algorithm).
///
/// The scores sit behind one mutex, held for one O(n) pass over a contiguous array with
/// no allocation: the work nginx does per pick. That is tens of nanoseconds for tens of
/// backends but grows to tens of microseconds for ten thousand, where concurrent picks
/// queue on the lock; pools that large are better served by `random` or `p2c`.
#[derive(Debug)]
pub struct SmoothWeightedRoundRobin {
    peers: Mutex<Box<[SmoothPeer]>>,
}

/// One backend's weight and running score (nginx's `weight` and `current_weight`).
///
/// A score stays within `±Σ weight` (each pick adds `total` across the pool and takes
/// `total` back from one backend), so `i64` cannot overflow for `u32` weights.
#[derive(Clone, Copy, Debug)]
struct SmoothPeer {
    weight: i64,
    current: i64,
}

impl SmoothWeightedRoundRobin {
    /// A rotation over `backends` with their configured weights, every score at zero (the
    /// state nginx starts an upstream in).
    pub fn new(backends: &[Backend]) -> Self {
        let peers = backends
            .iter()
            .map(|b| SmoothPeer {
                weight: i64::try_from(weight_of(b)).expect("a u32 weight fits in i64"),
                current: 0,
            })
            .collect();
        Self {
            peers: Mutex::new(peers),
        }
    }
}

impl Strategy for SmoothWeightedRoundRobin {
    fn name(&self) -> &'static str {
        "weighted_round_robin"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        let mut peers = self.peers.lock();
        debug_assert_eq!(
            peers.len(),
            pool.len(),
            "strategy built for another backend list"
        );
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, peer) in peers.iter_mut().enumerate() {
            if !pool.is_eligible(i) {
                continue;
            }
            peer.current += peer.weight;
            total += peer.weight;
            // Strictly greater: on a tie the earlier backend wins, as in nginx, so the
            // sequence is deterministic (`a a b a c a a`, not a coin toss at each tie).
            if best.is_none_or(|(_, current)| peer.current > current) {
                best = Some((i, peer.current));
            }
        }
        let (best, _) = best?;
        peers[best].current -= total;
        Some(BackendId(best))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::testing::backends;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

    fn picks(wrr: &SmoothWeightedRoundRobin, view: &PoolView<'_>, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| wrr.pick(&RequestInfo::new(0), view).expect("eligible").0)
            .collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        // The example of nginx's "smooth weighted round-robin balancing" change:
        // weights { 5, 1, 1 } produce { a, a, b, a, c, a, a }.
        let pool = backends(&[5, 1, 1]);
        let wrr = SmoothWeightedRoundRobin::new(&pool);
        let view = PoolView::new(&pool, &[], false);
        let [a, b, c] = [0, 1, 2];
        for _ in 0..3 {
            assert_eq!(picks(&wrr, &view, 7), vec![a, a, b, a, c, a, a]);
        }
    }

    #[test]
    fn equal_weights_rotate() {
        let b = backends(&[2, 2, 2]);
        let wrr = SmoothWeightedRoundRobin::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(picks(&wrr, &view, 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_ineligible_and_excluded() {
        let b = backends(&[3, 1, 2]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let wrr = SmoothWeightedRoundRobin::new(&b);
        let excluded = [BackendId(2)];
        let view = PoolView::new(&b, &excluded, false);
        assert_eq!(picks(&wrr, &view, 4), vec![1; 4]);
        b[1].live.set_flag(BackendFlags::DISABLED);
        assert_eq!(wrr.pick(&RequestInfo::new(0), &view), None);
        let panic_view = PoolView::new(&b, &[], true);
        assert_eq!(
            wrr.pick(&RequestInfo::new(0), &panic_view),
            Some(BackendId(0))
        );
    }

    #[test]
    fn empty_pool_picks_nothing() {
        let wrr = SmoothWeightedRoundRobin::new(&[]);
        assert_eq!(
            wrr.pick(&RequestInfo::new(0), &PoolView::new(&[], &[], false)),
            None
        );
    }

    proptest! {
        #[test]
        fn each_cycle_gives_exactly_weight_picks(
            weights in prop::collection::vec(1u32..20, 1..10),
            cycles in 1usize..4,
        ) {
            let b = backends(&weights);
            let wrr = SmoothWeightedRoundRobin::new(&b);
            let view = PoolView::new(&b, &[], false);
            let cycle: u32 = weights.iter().sum();
            for _ in 0..cycles {
                let mut counts = vec![0u32; weights.len()];
                for i in picks(&wrr, &view, cycle as usize) {
                    counts[i] += 1;
                }
                prop_assert_eq!(&counts, &weights);
            }
        }

        #[test]
        fn eligible_backends_share_exactly_by_weight(
            pool in prop::collection::vec((1u32..20, any::<bool>()), 1..10),
            cycles in 1usize..4,
        ) {
            let weights: Vec<u32> = pool.iter().map(|&(w, _)| w).collect();
            let b = backends(&weights);
            for (backend, &(_, down)) in b.iter().zip(&pool) {
                if down {
                    backend.live.set_flag(BackendFlags::UNHEALTHY);
                }
            }
            let wrr = SmoothWeightedRoundRobin::new(&b);
            let view = PoolView::new(&b, &[], false);
            let expected: Vec<u32> =
                pool.iter().map(|&(w, down)| if down { 0 } else { w }).collect();
            let cycle: u32 = expected.iter().sum();
            if cycle == 0 {
                prop_assert_eq!(wrr.pick(&RequestInfo::new(0), &view), None);
                return Ok(());
            }
            for _ in 0..cycles {
                let mut counts = vec![0u32; weights.len()];
                for i in picks(&wrr, &view, cycle as usize) {
                    prop_assert!(view.is_eligible(i));
                    counts[i] += 1;
                }
                prop_assert_eq!(&counts, &expected);
            }
        }
    }
}
