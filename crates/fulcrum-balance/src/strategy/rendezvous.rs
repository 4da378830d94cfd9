//! `rendezvous`: weighted highest-random-weight hashing with bounded load and hot-key
//! spreading (seed 002's BETA1, cache-aware routing).
//!
//! **Highest random weight** (Thaler & Ravishankar, "Using Name-Based Mappings to Increase
//! Hit Rates", IEEE/ACM ToN 6(1), 1998). Every backend scores every key and the key goes
//! to the highest score. The weighted score (the logarithmic method of Schindelhauer &
//! Schomaker, "Weighted Distributed Hash Tables", SPAA 2005) is
//!
//! ```text
//! score_i(k) = −w_i / ln(u_i(k)),    u_i(k) = mix(k, hash(address_i)) ∈ (0, 1)
//! ```
//!
//! with `w_i` the backend's effective weight ([`PoolView::effective_weight`]) and `u` the
//! top 53 bits of a fixed-seed 64-bit mix of the key and the backend's *address* hash (see
//! the `bounded` module), never its index. So every Fulcrum node maps a key to the same
//! backend whatever the order of its backend list; backend `i` wins a key with
//! probability exactly `w_i / Σ w`; and removing a backend moves only the keys it owned
//! (adding one moves only the keys it now wins, `w_new / Σ w` of them). A backend in slow
//! start has a low effective weight, so it wins few keys at first and more as it warms.
//!
//! **Bounded load** (Mirrokni, Thorup & Zadimoghaddam, SODA 2018): the pick is the
//! highest-scoring eligible backend that admits the request under the rule in the
//! `bounded` module, else the next highest, and so on; the affinity a key loses under load
//! is the minimum the bound requires.
//!
//! **Hot keys.** A key whose sampled share of picks exceeds the threshold of
//! `HotKeys` in the `bounded` module (`max(1/(2n), 1 %)`, justified there) goes to the
//! less loaded (per unit of weight) of its two highest-scoring eligible backends, still
//! subject to the bound: two warm caches share it instead of one overloaded one.
//!
//! **Cost.** Exact HRW scores all `n` backends: O(n) hashes, logarithms and live-weight
//! reads per pick (about 0.4 µs for 10 backends, mostly the logarithms and the loads of
//! each backend's live state), which pools of up to `EXACT_MAX_BACKENDS` = 64 backends
//! pay. Larger pools use skeleton-based HRW (Wang & Ravishankar's hierarchical variant)
//! with two levels: each backend belongs to one of `GROUPS` = 64 fixed groups by the top
//! 6 bits of its address hash; a pick first runs weighted HRW over the groups (group
//! weight = summed effective weight of its members, refreshed on tick), then over the
//! winning group's members. Because the two weighted draws multiply, backend `i` still
//! wins `(W_g / W) × (w_i / W_g) = w_i / W` of the keys. A pick costs O(64 + n/64) instead
//! of O(n) (about 220 scores at n = 10,000, against 10,000; 1.2 µs at n = 100 and 12 µs at
//! n = 10,000 in `benches/pick.rs`), without allocating, and the mapping is still a pure
//! function of the addresses and weights, so every node agrees.
//! Consistency is slightly weaker: a backend leaving *the configuration* lowers its
//! group's weight, so besides its own keys about as many keys of its group move to other
//! groups (≤ ~2/n in all, instead of exactly its 1/n). A backend that is merely ineligible
//! (down, draining) keeps its group's weight; its keys go to the next member of its group
//! and nothing else moves. Should a whole group be ineligible or at its bound, the next
//! group by score is tried, up to `MAX_GROUP_PROBES` groups, then the least loaded
//! eligible backend.
//!
//! Requests without a key are spread by round robin over the eligible backends.

use std::sync::atomic::{AtomicU64, Ordering};

use super::bounded::{
    Admission, BoundedLoad, EligibleWeight, HashCounters, HotKeys, KeylessSpread, Routed,
    address_hashes, key_hash, least_loaded, load_per_weight, mix64,
};
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy, StrategyParams};
use crate::backend::Backend;
use crate::slow_start::SlowStart;

/// Largest pool scored exactly; larger pools use the two-level skeleton.
const EXACT_MAX_BACKENDS: usize = 64;
/// Groups of the skeleton (a power of two: a group is the top bits of an address hash).
const GROUPS: usize = 64;
/// Groups tried, best score first, before falling back to the least loaded backend.
const MAX_GROUP_PROBES: usize = 4;
/// Seed of the groups' identities in the group-level draw.
const GROUP_SEED: u64 = 0x6a09_e667_f3bc_c908;

/// Weighted rendezvous hashing with bounded load and hot-key spreading. Lock-free: a pick
/// reads atomics and writes one counter (two on a sampled pick).
#[derive(Debug)]
pub struct Rendezvous {
    /// Address hash of each backend, in list order.
    addr_hashes: Box<[u64]>,
    /// The group level, for pools of more than `EXACT_MAX_BACKENDS` backends.
    skeleton: Option<Skeleton>,
    bound: BoundedLoad,
    /// `W` for the bound on the skeleton path (the exact path sums it in its scan).
    eligible_weight: EligibleWeight,
    hot: HotKeys,
    counters: HashCounters,
    keyless: KeylessSpread,
    slow_start: SlowStart,
}

/// The group level of skeleton-based HRW.
#[derive(Debug)]
struct Skeleton {
    /// Backend indices of each group.
    members: Box<[Box<[usize]>]>,
    /// Each group's identity hash in the group-level draw.
    group_hashes: Box<[u64]>,
    /// `f64` bits of each group's summed effective weight (0 = empty group), on tick.
    group_weights: Box<[AtomicU64]>,
}

impl Skeleton {
    fn new(addr_hashes: &[u64]) -> Self {
        let mut members = vec![Vec::new(); GROUPS];
        for (i, &h) in addr_hashes.iter().enumerate() {
            members[group_of(h)].push(i);
        }
        Self {
            members: members.into_iter().map(Vec::into_boxed_slice).collect(),
            group_hashes: (0..GROUPS as u64).map(|g| mix64(g ^ GROUP_SEED)).collect(),
            group_weights: (0..GROUPS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Recomputes the group weights from `pool`'s effective weights, eligible or not.
    fn refresh(&self, pool: &PoolView<'_>) {
        for (members, weight) in self.members.iter().zip(self.group_weights.iter()) {
            let sum: f64 = members.iter().map(|&i| pool.effective_weight(i)).sum();
            weight.store(sum.to_bits(), Ordering::Relaxed);
        }
    }
}

/// The skeleton group of a backend with address hash `h`: its top 6 bits.
#[inline]
fn group_of(h: u64) -> usize {
    (h >> (64 - GROUPS.trailing_zeros())) as usize
}

/// The weighted HRW score `−w / ln(u)` of the item with identity hash `id` for key hash
/// `key`, where `u ∈ (0, 1)` is the top 53 bits of `mix64(key ^ id)` offset by half a
/// step. Positive, and larger for larger `weight`.
#[inline]
fn score(key: u64, id: u64, weight: f64) -> f64 {
    const STEP: f64 = 1.0 / (1u64 << 53) as f64;
    let u = ((mix64(key ^ id) >> 11) as f64 + 0.5) * STEP;
    -weight / u.ln()
}

/// The outcome of scoring some backends for one key.
#[derive(Clone, Copy, Debug, Default)]
struct Ranking {
    /// The highest-scoring backend, eligible or not: the key's first choice.
    first: Option<(f64, usize)>,
    /// The two highest-scoring eligible backends, best first.
    top: [Option<(f64, usize)>; 2],
    /// The highest-scoring eligible backend that admits the request.
    best_admitted: Option<(f64, usize)>,
}

impl Ranking {
    /// Scores `members` for `key`.
    fn of(
        key: u64,
        members: impl Iterator<Item = usize>,
        addr_hashes: &[u64],
        pool: &PoolView<'_>,
        admission: &Admission,
    ) -> Self {
        let better = |slot: Option<(f64, usize)>, s: f64| slot.is_none_or(|(t, _)| s > t);
        let mut r = Self::default();
        for i in members {
            let s = score(key, addr_hashes[i], pool.effective_weight(i));
            if better(r.first, s) {
                r.first = Some((s, i));
            }
            if !pool.is_eligible(i) {
                continue;
            }
            if better(r.top[0], s) {
                r.top = [Some((s, i)), r.top[0]];
            } else if better(r.top[1], s) {
                r.top[1] = Some((s, i));
            }
            if better(r.best_admitted, s) && admission.admits(pool, i) {
                r.best_admitted = Some((s, i));
            }
        }
        r
    }

    /// The backend among these for the key, and whether the bound redirected it: the best
    /// eligible one (for a `hot` key, the less loaded of the best two) if it admits the
    /// request, else the best admitting one. `None` if none is eligible or none admits.
    fn route(
        &self,
        hot: bool,
        pool: &PoolView<'_>,
        admission: &Admission,
    ) -> Option<(usize, bool)> {
        let (_, best) = self.top[0]?;
        let preferred = match self.top[1] {
            Some((_, second))
                if hot && load_per_weight(pool, second) < load_per_weight(pool, best) =>
            {
                second
            }
            _ => best,
        };
        if admission.admits(pool, preferred) {
            return Some((preferred, false));
        }
        self.best_admitted.map(|(_, i)| (i, true))
    }
}

impl Rendezvous {
    /// Rendezvous hashing over `backends` with `params.bounded_load` and, for the
    /// `warmup_progress` figure, `params.slow_start`.
    pub fn new(backends: &[Backend], params: &StrategyParams) -> Self {
        let addr_hashes = address_hashes(backends);
        let skeleton = (backends.len() > EXACT_MAX_BACKENDS).then(|| {
            let skeleton = Skeleton::new(&addr_hashes);
            skeleton.refresh(&PoolView::new(backends, &[], false));
            skeleton
        });
        Self {
            addr_hashes,
            skeleton,
            bound: BoundedLoad::new(params.bounded_load),
            eligible_weight: EligibleWeight::new(backends),
            hot: HotKeys::new(backends.len()),
            counters: HashCounters::default(),
            keyless: KeylessSpread::default(),
            slow_start: params.slow_start,
        }
    }

    /// Exact HRW over the whole pool.
    fn pick_exact(&self, key: u64, hot: bool, pool: &PoolView<'_>) -> Option<Routed> {
        let eligible_weight = if self.bound.is_bounded() {
            (0..pool.len())
                .filter(|&i| pool.is_eligible(i))
                .map(|i| pool.effective_weight(i))
                .sum()
        } else {
            0.0
        };
        let admission = self.bound.admission(pool, eligible_weight);
        let ranking = Ranking::of(key, 0..pool.len(), &self.addr_hashes, pool, &admission);
        let first = ranking.first.map(|(_, i)| i);
        let (backend, redirected) = match ranking.route(hot, pool, &admission) {
            Some(routed) => routed,
            None => (least_loaded(pool)?.0, true),
        };
        Some(Routed {
            backend: BackendId(backend),
            first_choice: first == Some(backend),
            redirected,
        })
    }

    /// Skeleton HRW: the best groups in turn, then the least loaded backend.
    fn pick_skeleton(
        &self,
        skeleton: &Skeleton,
        key: u64,
        hot: bool,
        pool: &PoolView<'_>,
    ) -> Option<Routed> {
        let admission = self.bound.admission(pool, self.eligible_weight.get(pool));
        let mut group_scores = [f64::NEG_INFINITY; GROUPS];
        for (g, s) in group_scores.iter_mut().enumerate() {
            let weight = f64::from_bits(skeleton.group_weights[g].load(Ordering::Relaxed));
            if weight > 0.0 {
                *s = score(key, skeleton.group_hashes[g], weight);
            }
        }
        let mut first = None;
        let mut redirected = false;
        for probe in 0..MAX_GROUP_PROBES {
            let (g, &s) = group_scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("GROUPS > 0");
            if s == f64::NEG_INFINITY {
                break;
            }
            group_scores[g] = f64::NEG_INFINITY;
            let members = skeleton.members[g].iter().copied();
            let ranking = Ranking::of(key, members, &self.addr_hashes, pool, &admission);
            if probe == 0 {
                first = ranking.first.map(|(_, i)| i);
            }
            if let Some((backend, bounded)) = ranking.route(hot, pool, &admission) {
                return Some(Routed {
                    backend: BackendId(backend),
                    first_choice: first == Some(backend),
                    redirected: redirected || bounded,
                });
            }
            // Eligible members but none admitted: the bound moved the key on.
            redirected |= ranking.top[0].is_some();
        }
        let backend = least_loaded(pool)?;
        Some(Routed {
            backend,
            first_choice: first == Some(backend.0),
            redirected,
        })
    }
}

impl Strategy for Rendezvous {
    fn name(&self) -> &'static str {
        "rendezvous"
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
        let key = key_hash(raw);
        self.hot.observe(key);
        let hot = self.hot.is_hot(key);
        let routed = match &self.skeleton {
            None => self.pick_exact(key, hot, pool),
            Some(skeleton) => self.pick_skeleton(skeleton, key, hot, pool),
        }?;
        Some(self.counters.record(routed))
    }

    /// Refreshes `W` for the bound, the skeleton's group weights and the hot-key set.
    fn tick(&self, pool: &PoolView<'_>, now_ns: u64) {
        self.eligible_weight.refresh(pool);
        if let Some(skeleton) = &self.skeleton {
            skeleton.refresh(pool);
        }
        self.hot.refresh(pool.len(), now_ns);
    }

    /// `affinity_share`, `bounded_load_redirects`, `hot_keys` (count of keys spread over
    /// two backends now) and per backend `warmup_progress`.
    fn figures(&self, pool: &PoolView<'_>, now_ns: u64) -> Vec<Figure> {
        let mut figures = self.counters.figures(&self.slow_start, pool, now_ns);
        figures.push(Figure::pool("hot_keys", self.hot.count() as f64));
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::bounded::testing::{owners, unbounded};
    use crate::strategy::testing::backends;

    fn pick(s: &Rendezvous, view: &PoolView<'_>, key: u64) -> usize {
        s.pick(&RequestInfo::new(0).with_hash_key(key), view)
            .expect("eligible")
            .0
    }

    #[test]
    fn picks_the_highest_score() {
        let b = backends(&[1, 2, 3]);
        let s = Rendezvous::new(&b, &unbounded());
        let view = PoolView::new(&b, &[], false);
        for k in 0..500 {
            let key = key_hash(k);
            let best = (0..3)
                .max_by(|&x, &y| {
                    let sx = score(key, s.addr_hashes[x], view.effective_weight(x));
                    let sy = score(key, s.addr_hashes[y], view.effective_weight(y));
                    sx.total_cmp(&sy)
                })
                .expect("three backends");
            assert_eq!(pick(&s, &view, k), best);
        }
    }

    #[test]
    fn an_ineligible_backend_moves_only_its_own_keys() {
        for n in [10, 300] {
            let b = backends(&vec![1; n]);
            let s = Rendezvous::new(&b, &unbounded());
            let before = owners(&s, &b, 5_000);
            b[4].live.set_flag(BackendFlags::UNHEALTHY);
            let after = owners(&s, &b, 5_000);
            let down = b[4].address.to_string();
            for (k, (x, y)) in before.iter().zip(&after).enumerate() {
                assert!(
                    x == y || *x == down,
                    "n = {n}: key {k} moved from {x} to {y}"
                );
                assert_ne!(*y, down);
            }
        }
    }

    #[test]
    fn skeleton_keeps_weights_and_moves_few_keys() {
        let n = 400;
        let weights: Vec<u32> = (0..n).map(|i| if i % 2 == 0 { 3 } else { 1 }).collect();
        let b = backends(&weights);
        let s = Rendezvous::new(&b, &unbounded());
        assert!(s.skeleton.is_some());
        let view = PoolView::new(&b, &[], false);
        let keys = 100_000;
        let mut counts = [0u64; 2];
        for k in 0..keys {
            counts[pick(&s, &view, k) % 2] += 1;
        }
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!(
            (2.7..=3.3).contains(&ratio),
            "weight-3 half over weight-1 half: {ratio}"
        );
        // Removing one backend from the configuration: its keys plus about as many more.
        let mut rest = b.clone();
        rest.remove(17);
        let before = owners(&s, &b, 40_000);
        let after = owners(&Rendezvous::new(&rest, &unbounded()), &rest, 40_000);
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        let fraction = moved as f64 / 40_000.0;
        let share = 1.0 / 800.0; // weight 1 of 800
        assert!(fraction <= 3.0 * share, "moved {fraction}");
    }

    #[test]
    fn hot_key_is_spread_over_its_top_two() {
        let b = backends(&[1; 8]);
        let s = Rendezvous::new(&b, &unbounded());
        let view = PoolView::new(&b, &[], false);
        let hot_key = 99;
        // Make key 99 hot: half of all keyed picks.
        for k in 0..4_000u64 {
            pick(&s, &view, if k % 2 == 0 { hot_key } else { k + 1_000 });
        }
        s.tick(&view, 1_000_000_000);
        assert_eq!(s.hot.count(), 1);
        let figures = s.figures(&view, 0);
        assert!(figures.contains(&Figure::pool("hot_keys", 1.0)));
        // With requests held in flight, it alternates between its two best backends.
        let mut guards = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let i = pick(&s, &view, hot_key);
            seen.insert(i);
            guards.push(b[i].live.begin(0));
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
}
