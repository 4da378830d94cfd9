//! `ring_hash`: Ketama consistent hashing with bounded load.
//!
//! **The ring** (Karger et al., "Consistent Hashing and Random Trees", STOC 1997; the
//! weighted, many-points-per-server layout of libketama, last.fm 2007, also Envoy's
//! `RING_HASH` and nginx's `hash … consistent`). Each backend places points on a 64-bit
//! ring in proportion to its effective weight:
//!
//! ```text
//! points_i = max(1, round(p × w_i)),    point_i,j = mix64(hash(address_i) ^ mix64(j ^ seed)),  j < points_i
//! ```
//!
//! A key hash `h` belongs to the first point clockwise from it (the smallest point ≥ `h`,
//! wrapping around), found by binary search: O(log P) for `P` points. The points of a
//! backend depend only on its address and its own weight, and ties are broken by address
//! hash, so every node builds the same ring whatever the order of its backend list.
//!
//! `p`, the points per unit of weight, is fixed: `StrategyParams::ring_points_per_weight`
//! (160 by default, the figure of nginx's `hash … consistent` and of libketama), so a
//! backend's points depend only on its address and its own weight. Adding or removing a
//! backend then moves only the arcs of its own points, `w / Σ w` of the keys, and a
//! weight change moves keys only to or from that backend: the property consistent
//! hashing exists for (Karger et al.). Envoy instead scales every backend's points so
//! that the ring keeps `minimum_ring_size` points, which changes every backend's count
//! when one joins or leaves; here such a floor is opt-in, `StrategyParams::ring_size`:
//! then `p = max(points per weight, the smallest power of two with p × Σ configured
//! weight ≥ ring_size)`, and when the second term decides, a change that makes the total
//! weight cross a power of two grows or shrinks every backend's point set by a prefix,
//! so more keys move. A backend's share strays from its weight by about `1 / √points`
//! (8 % at 160), which the load bound absorbs. The ring is capped at `MAX_POINTS` points
//! (Envoy's maximum ring size), where `p` is scaled down.
//!
//! Effective weights below the configured ones by a common factor — every backend
//! ramping through slow start together, as after a node starts — are scaled back up
//! before placing points (by `1 / max_i(w_eff_i / w_i)`, never down), so that a uniform
//! ramp, which changes no backend's share, moves no key and every node maps a key alike
//! whenever it started; a backend ramping alone still has fewer points.
//!
//! **Bounded load** (Mirrokni, Thorup & Zadimoghaddam, SODA 2018, forwarding along the
//! ring): the
//! pick walks clockwise from the key's point to the first eligible backend that admits the
//! request under the rule in the `bounded` module, up to `MAX_WALK` points, then takes the
//! least loaded eligible backend.
//!
//! The ring is rebuilt on tick only when some backend's effective weight changed by more
//! than 1 % since the ring was built (slow start, dynamic weights), at most once a second;
//! otherwise never. Requests without a key are spread by round robin.

use super::bounded::{
    BoundedLoad, EligibleWeight, HashCounters, KeylessSpread, Routed, SwappableTable,
    address_hashes, effective_weights, key_hash, least_loaded, mix64,
};
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy, StrategyParams};
use crate::backend::Backend;
use crate::slow_start::SlowStart;

/// Most points on a ring (Envoy's `maximum_ring_size` default, 8 M).
const MAX_POINTS: usize = 1 << 23;
/// Ring points walked past the key's point before falling back to the least loaded
/// eligible backend.
const MAX_WALK: usize = 128;
/// Seed of point indices.
const POINT_SEED: u64 = 0xbb67_ae85_84ca_a73b;

/// Ketama ring hashing with bounded load. A pick loads the ring without a lock
/// (`arc-swap`) for one binary search and a short walk, and writes one counter.
#[derive(Debug)]
pub struct RingHash {
    addr_hashes: Box<[u64]>,
    /// The backends' configured weights (at least 1 each), for the ramp scaling.
    configured: Box<[f64]>,
    /// Points per unit of weight (`p` in the module documentation).
    points_per_weight: f64,
    ring: SwappableTable<Ring>,
    bound: BoundedLoad,
    eligible_weight: EligibleWeight,
    counters: HashCounters,
    keyless: KeylessSpread,
    slow_start: SlowStart,
}

/// One built ring.
#[derive(Debug)]
struct Ring {
    /// Point positions, ascending.
    points: Box<[u64]>,
    /// `owners[j]` = index of the backend that placed `points[j]`.
    owners: Box<[u32]>,
    /// The effective weights the ring was built with.
    weights: Box<[f64]>,
}

impl Ring {
    /// The ring of backends with address hashes `addr_hashes`, effective weights `weights`
    /// and configured weights `configured`, with `points_per_weight` points per unit of
    /// weight (capped at `MAX_POINTS` points in all); effective weights uniformly below
    /// the configured ones are scaled up (module documentation).
    fn build(
        addr_hashes: &[u64],
        weights: Box<[f64]>,
        configured: &[f64],
        points_per_weight: f64,
    ) -> Self {
        let ramp = weights
            .iter()
            .zip(configured)
            .map(|(&w, &c)| w / c)
            .fold(0.0, f64::max);
        let lift = if ramp > 0.0 && ramp < 1.0 {
            1.0 / ramp
        } else {
            1.0
        };
        let total: f64 = weights.iter().sum::<f64>() * lift;
        let scale = lift * points_per_weight.min(MAX_POINTS as f64 / total.max(1.0));
        let mut placed: Vec<(u64, u64, u32)> = Vec::new();
        for (i, (&h, &w)) in addr_hashes.iter().zip(weights.iter()).enumerate() {
            let count = ((scale * w).round() as u64).max(1);
            let owner = u32::try_from(i).expect("pools have < 4G backends");
            placed.extend((0..count).map(|j| (mix64(h ^ mix64(j ^ POINT_SEED)), h, owner)));
        }
        placed.sort_unstable_by_key(|&(point, h, _)| (point, h));
        Self {
            points: placed.iter().map(|p| p.0).collect(),
            owners: placed.iter().map(|p| p.2).collect(),
            weights,
        }
    }

    /// Index of the first point clockwise from `key`.
    #[inline]
    fn successor(&self, key: u64) -> usize {
        let j = self.points.partition_point(|&p| p < key);
        if j == self.points.len() { 0 } else { j }
    }
}

impl RingHash {
    /// A ring over `backends` with `params.ring_points_per_weight` points per unit of
    /// weight (and at least `params.ring_size` points if that is not 0), bounded by
    /// `params.bounded_load`; `params.slow_start` feeds the `warmup_progress` figure.
    pub fn new(backends: &[Backend], params: &StrategyParams) -> Self {
        let addr_hashes = address_hashes(backends);
        let view = PoolView::new(backends, &[], false);
        let configured: Box<[f64]> = (0..backends.len()).map(|i| view.weight(i) as f64).collect();
        let total = (0..backends.len())
            .map(|i| view.weight(i))
            .sum::<u64>()
            .max(1);
        let floor = match params.ring_size as u64 {
            0 => 0,
            size => size.div_ceil(total).next_power_of_two(),
        };
        let points_per_weight = (params.ring_points_per_weight.max(1) as u64).max(floor) as f64;
        let ring = Ring::build(
            &addr_hashes,
            effective_weights(&view),
            &configured,
            points_per_weight,
        );
        Self {
            addr_hashes,
            configured,
            points_per_weight,
            ring: SwappableTable::new(ring),
            bound: BoundedLoad::new(params.bounded_load),
            eligible_weight: EligibleWeight::new(backends),
            counters: HashCounters::default(),
            keyless: KeylessSpread::default(),
            slow_start: params.slow_start,
        }
    }

    /// The walk from `key`'s point on `ring`.
    fn route(&self, ring: &Ring, key: u64, pool: &PoolView<'_>) -> Option<Routed> {
        if ring.points.is_empty() {
            return None;
        }
        let start = ring.successor(key);
        let first = ring.owners[start] as usize;
        let admission = self.bound.admission(pool, self.eligible_weight.get(pool));
        let mut redirected = false;
        let mut previous = usize::MAX;
        let len = ring.points.len();
        for step in 0..len.min(MAX_WALK) {
            let i = ring.owners[(start + step) % len] as usize;
            if i == previous || !pool.is_eligible(i) {
                continue;
            }
            previous = i;
            if admission.admits(pool, i) {
                return Some(Routed {
                    backend: BackendId(i),
                    first_choice: i == first,
                    redirected,
                });
            }
            redirected = true;
        }
        let backend = least_loaded(pool)?;
        Some(Routed {
            backend,
            first_choice: backend.0 == first,
            redirected,
        })
    }
}

impl Strategy for RingHash {
    fn name(&self) -> &'static str {
        "ring_hash"
    }

    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        debug_assert_eq!(
            self.addr_hashes.len(),
            pool.len(),
            "strategy built for another backend list"
        );
        let Some(raw) = req.hash_key else {
            return self.keyless.pick(pool);
        };
        let routed = self.route(&self.ring.read(), key_hash(raw), pool)?;
        Some(self.counters.record(routed))
    }

    /// Refreshes `W` for the bound; rebuilds the ring if effective weights changed
    /// materially (see the module documentation).
    fn tick(&self, pool: &PoolView<'_>, now_ns: u64) {
        self.eligible_weight.refresh(pool);
        self.ring.rebuild_if_weights_changed(
            pool,
            now_ns,
            |ring| &ring.weights,
            |weights| {
                Ring::build(
                    &self.addr_hashes,
                    weights,
                    &self.configured,
                    self.points_per_weight,
                )
            },
        );
    }

    /// `affinity_share`, `bounded_load_redirects` and per backend `warmup_progress`.
    fn figures(&self, pool: &PoolView<'_>, now_ns: u64) -> Vec<Figure> {
        self.counters.figures(&self.slow_start, pool, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::bounded::testing::{owners, unbounded};
    use crate::strategy::testing::backends;

    #[test]
    fn ring_has_points_in_proportion_to_weight() {
        let b = backends(&[1, 3]);
        let s = RingHash::new(&b, &unbounded());
        let ring = s.ring.read();
        assert_eq!(ring.points.len(), 4 * 160);
        assert!(ring.points.windows(2).all(|w| w[0] <= w[1]), "sorted");
        let light = ring.owners.iter().filter(|&&o| o == 0).count();
        assert_eq!(light, 160);
        // An opt-in floor on the ring size: 4096 points over weight 4.
        let floored = RingHash::new(
            &b,
            &StrategyParams {
                ring_size: 4096,
                ..unbounded()
            },
        );
        assert_eq!(floored.points_per_weight, 1024.0);
    }

    /// Which of the `keys` keys each backend address owns.
    fn mapping(backends: &[Backend], keys: u64) -> Vec<String> {
        owners(&RingHash::new(backends, &unbounded()), backends, keys)
    }

    #[test]
    fn joining_leaving_and_reweighting_move_only_that_backends_keys_at_every_pool_size() {
        // Every size from 2 to 33 crosses or meets a power of two of the total weight,
        // where a ring normalised to a fixed size rescales every backend.
        const KEYS: u64 = 4_000;
        for n in 2..=33usize {
            let all = backends(&vec![1; n]);
            let before = mapping(&all, KEYS);
            let mut rest = all.clone();
            let gone = rest.remove(n / 2).address.to_string();
            let after = mapping(&rest, KEYS);
            for (x, y) in before.iter().zip(&after) {
                assert!(x == y || *x == gone, "n={n}: a key moved {x} → {y}");
            }
            // Reweighting one backend: keys move only onto it.
            let mut heavier = all.clone();
            heavier[0].weight = 2;
            let target = heavier[0].address.to_string();
            let reweighted = mapping(&heavier, KEYS);
            for (x, y) in before.iter().zip(&reweighted) {
                assert!(x == y || *y == target, "n={n}: a key moved {x} → {y}");
            }
        }
    }

    #[test]
    fn a_uniform_slow_start_ramp_moves_no_key_and_a_lone_one_only_its_own() {
        let b = backends(&[1, 2, 1, 1, 3]);
        let s = RingHash::new(&b, &unbounded());
        let view = PoolView::new(&b, &[], false);
        let steady = owners(&s, &b, 3_000);
        // All at 30 % of their weights, as right after a node starts.
        for (i, backend) in b.iter().enumerate() {
            backend
                .live
                .set_effective_weight(0.3 * view.weight(i) as f64);
        }
        s.tick(&view, 2_000_000_000);
        assert_eq!(owners(&s, &b, 3_000), steady);
        // Then only backend 3 ramps (it rejoined): only keys of backend 3 move, elsewhere.
        for (i, backend) in b.iter().enumerate() {
            let w = view.weight(i) as f64;
            backend
                .live
                .set_effective_weight(if i == 3 { 0.2 * w } else { w });
        }
        s.tick(&view, 4_000_000_000);
        let ramping = owners(&s, &b, 3_000);
        let rejoined = b[3].address.to_string();
        let moved = steady.iter().zip(&ramping).filter(|(x, y)| x != y).count();
        assert!(moved > 0);
        for (x, y) in steady.iter().zip(&ramping) {
            assert!(x == y || *x == rejoined, "{x} → {y}");
        }
    }

    #[test]
    fn key_goes_to_its_successor_point() {
        let b = backends(&[1, 1, 1]);
        let s = RingHash::new(&b, &unbounded());
        let view = PoolView::new(&b, &[], false);
        let ring = s.ring.read();
        for k in 0..300 {
            let key = key_hash(k);
            let expected = ring.owners[ring.successor(key)] as usize;
            let picked = s.pick(&RequestInfo::new(0).with_hash_key(k), &view);
            assert_eq!(picked, Some(BackendId(expected)));
        }
        // Past the last point wraps to the first.
        assert_eq!(ring.successor(u64::MAX), 0);
    }

    #[test]
    fn ineligible_backend_keys_walk_to_the_next_point() {
        let b = backends(&[1; 6]);
        let s = RingHash::new(&b, &unbounded());
        let before = owners(&s, &b, 3_000);
        b[2].live.set_flag(BackendFlags::DRAINING);
        let after = owners(&s, &b, 3_000);
        let down = b[2].address.to_string();
        for (x, y) in before.iter().zip(&after) {
            assert!(x == y || *x == down, "{x} → {y}");
        }
    }

    #[test]
    fn rebuilds_only_on_material_weight_change() {
        let b = backends(&[1, 1, 1, 1]);
        let s = RingHash::new(&b, &unbounded());
        let view = PoolView::new(&b, &[], false);
        let s1 = 1_000_000_000;
        let built = |s: &RingHash| s.ring.read().points.len();
        let original = built(&s);
        b[0].live.set_effective_weight(1.005);
        s.tick(&view, 2 * s1);
        assert_eq!(built(&s), original, "0.5 % is not material");
        b[0].live.set_effective_weight(2.0);
        s.tick(&view, 3 * s1);
        assert!(built(&s) > original);
        // Back to the original weights: the same ring, so the same mapping.
        b[0].live.set_effective_weight(1.0);
        s.tick(&view, 3 * s1 + 100_000_000);
        assert_ne!(built(&s), original, "at most one rebuild a second");
        s.tick(&view, 5 * s1);
        assert_eq!(built(&s), original);
        let fresh = RingHash::new(&b, &unbounded());
        assert_eq!(owners(&s, &b, 2_000), owners(&fresh, &b, 2_000));
    }
}
