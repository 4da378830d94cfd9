//! What the hashing strategies (`rendezvous`, `ring_hash`, `maglev`) share: a fixed
//! address hash, the bounded-load admission rule, hot-key tracking, counters and figures.
//!
//! **Hashing.** Every node of a Fulcrum cluster must map a key to the same backend, so
//! nothing here depends on the process: addresses are hashed with 64-bit FNV-1a (Fowler,
//! Noll, Vo; offset basis `0xcbf29ce484222325`, prime `0x100000001b3`) followed by the
//! SplitMix64 finaliser (Steele, Lea, Flood, "Fast splittable pseudorandom number
//! generators", OOPSLA 2014), which FNV needs because addresses differing only in their
//! last digit differ only in a few low bits after FNV alone. Keys, already hashed by the
//! proxy, go through the finaliser once more with a fixed seed, so that sequential or
//! poorly mixed key hashes still spread. Never `std`'s `RandomState`, which is seeded per
//! process.
//!
//! **Bounded load** (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded
//! Loads", SODA 2018). With load factor `c ≥ 1`, `T` requests in flight over the pool and
//! `W` the summed effective weight of the eligible backends, backend `i` (effective weight
//! `w_i`) admits one more request iff
//!
//! ```text
//! in_flight_i + 1 ≤ ceil(c × (T + 1) × w_i / W)
//! ```
//!
//! With equal weights `w_i / W = 1 / n_eligible`, which is the paper's
//! `ceil(c × (T + 1) / n)`; weighting the capacity keeps a weight-3 backend from being
//! capped at the average load while it is meant to carry three times as much, and keeps a
//! backend in slow start (low effective weight) from being filled up to the average. Since
//! `Σ_i ceil(c (T+1) w_i / W) ≥ c (T+1) > T`, some eligible backend always admits, and the
//! least loaded one per unit of weight does (see [`least_loaded`]), so the strategies'
//! last resort keeps the bound too when `W` is exact.
//!
//! `W` is summed over the eligible backends. `rendezvous` on a small pool computes it
//! exactly during its scan; the O(1) and O(log n) paths read it from [`EligibleWeight`],
//! refreshed at construction and on every tick. Between ticks it can be stale by one
//! tick interval: a backend that went down leaves `W` too large (bound stricter), one that
//! came back leaves it too small (bound looser by that backend's share of `W`). A request's
//! own exclusions (retries) are not subtracted, which only makes the bound stricter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, Guard};

use super::{BackendId, Figure, PoolView};
use crate::backend::Backend;
use crate::slow_start::SlowStart;

/// 64-bit FNV-1a of `bytes`: offset basis `0xcbf29ce484222325`, prime `0x100000001b3`.
#[inline]
pub(super) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The SplitMix64 finaliser: a bijection on `u64` in which every input bit affects every
/// output bit with probability about one half.
#[inline]
pub(super) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Seed mixed into request keys before they meet backend hashes.
const KEY_SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// The hash of a backend's configured address (`host:port`): FNV-1a then [`mix64`].
/// Deterministic across processes, platforms and Fulcrum nodes.
#[inline]
pub(super) fn address_hash(address: &str) -> u64 {
    mix64(fnv1a64(address.as_bytes()))
}

/// The address hashes of `backends`, in list order.
pub(super) fn address_hashes(backends: &[Backend]) -> Box<[u64]> {
    backends.iter().map(|b| address_hash(&b.address)).collect()
}

/// A request key hash (`RequestInfo::hash_key`) remixed with a fixed seed.
#[inline]
pub(super) fn key_hash(key: u64) -> u64 {
    mix64(key ^ KEY_SEED)
}

/// The bounded-load rule of the module documentation with load factor `c`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct BoundedLoad {
    /// `c`, at least 1; `None` = unbounded.
    factor: Option<f64>,
}

impl BoundedLoad {
    /// The rule with factor `factor` (`StrategyParams::bounded_load`); values below 1 are
    /// raised to 1 (the smallest factor under which some backend always admits), and a
    /// non-finite factor means unbounded.
    pub(super) fn new(factor: Option<f64>) -> Self {
        Self {
            factor: factor.filter(|c| c.is_finite()).map(|c| c.max(1.0)),
        }
    }

    /// The rule for one pick: `T` = `pool.total_in_flight()` (O(1) when the proxy gave
    /// it), `W` = `eligible_weight` (summed effective weight of the eligible backends).
    #[inline]
    pub(super) fn admission(&self, pool: &PoolView<'_>, eligible_weight: f64) -> Admission {
        match self.factor {
            Some(c) if eligible_weight > 0.0 && eligible_weight.is_finite() => Admission {
                // c × (T + 1) / W, the capacity per unit of weight.
                per_weight: Some(c * (pool.total_in_flight() as f64 + 1.0) / eligible_weight),
            },
            _ => Admission { per_weight: None },
        }
    }

    /// Whether the rule is on at all (saves summing `W` when it is off).
    #[inline]
    pub(super) fn is_bounded(&self) -> bool {
        self.factor.is_some()
    }
}

/// The bounded-load rule evaluated for one pick.
#[derive(Clone, Copy, Debug)]
pub(super) struct Admission {
    /// `c × (T + 1) / W`, or `None` when unbounded.
    per_weight: Option<f64>,
}

impl Admission {
    /// Whether backend `i` of `pool` admits one more request:
    /// `in_flight_i + 1 ≤ ceil(c × (T + 1) × w_i / W)`. Always true when unbounded.
    #[inline]
    pub(super) fn admits(&self, pool: &PoolView<'_>, i: usize) -> bool {
        self.per_weight.is_none_or(|per_weight| {
            let capacity = (per_weight * pool.effective_weight(i)).ceil();
            (pool.backends()[i].live.in_flight() + 1) as f64 <= capacity
        })
    }
}

/// The summed effective weight of the routable backends, normally and in panic mode,
/// cached for the pick paths that cannot afford an O(n) sum (see the module
/// documentation for how stale it may be).
#[derive(Debug, Default)]
pub(super) struct EligibleWeight {
    /// `f64` bits of Σ effective weight over backends routable outside panic mode.
    normal: AtomicU64,
    /// `f64` bits of the same sum in panic mode (only operator flags exclude).
    panic: AtomicU64,
}

impl EligibleWeight {
    /// The sums for `backends` now.
    pub(super) fn new(backends: &[Backend]) -> Self {
        let cache = Self::default();
        cache.refresh(&PoolView::new(backends, &[], false));
        cache
    }

    /// Recomputes both sums over `pool`'s backends (O(n); on tick).
    pub(super) fn refresh(&self, pool: &PoolView<'_>) {
        let (mut normal, mut panic) = (0.0, 0.0);
        for (i, b) in pool.backends().iter().enumerate() {
            let w = pool.effective_weight(i);
            if b.live.is_routable(false) {
                normal += w;
            }
            if b.live.is_routable(true) {
                panic += w;
            }
        }
        self.normal.store(f64::to_bits(normal), Ordering::Relaxed);
        self.panic.store(f64::to_bits(panic), Ordering::Relaxed);
    }

    /// `W` for a pick on `pool` (panic mode or not).
    #[inline]
    pub(super) fn get(&self, pool: &PoolView<'_>) -> f64 {
        let bits = if pool.is_panic() {
            &self.panic
        } else {
            &self.normal
        };
        f64::from_bits(bits.load(Ordering::Relaxed))
    }
}

/// The eligible backend of `pool` with the fewest requests in flight per unit of effective
/// weight (lowest index on a tie); `None` if none is eligible. O(n): the hashing
/// strategies' last resort when their bounded search found no admitting backend.
pub(super) fn least_loaded(pool: &PoolView<'_>) -> Option<BackendId> {
    (0..pool.len())
        .filter(|&i| pool.is_eligible(i))
        .map(|i| (load_per_weight(pool, i), i))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, i)| BackendId(i))
}

/// Requests in flight on backend `i` per unit of effective weight.
#[inline]
pub(super) fn load_per_weight(pool: &PoolView<'_>, i: usize) -> f64 {
    pool.backends()[i].live.in_flight() as f64 / pool.effective_weight(i)
}

/// The even spread of requests without an affinity key: round robin over the eligible
/// backends. Lock-free: one `fetch_add` per keyless pick.
#[derive(Debug, Default)]
pub(super) struct KeylessSpread {
    next: AtomicUsize,
}

impl KeylessSpread {
    /// The next eligible backend in rotation; `None` if none is eligible.
    #[inline]
    pub(super) fn pick(&self, pool: &PoolView<'_>) -> Option<BackendId> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        pool.next_eligible_from(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

/// How a keyed pick ended, for [`HashCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Routed {
    /// The backend picked.
    pub(super) backend: BackendId,
    /// Whether it is the key's first choice (its hash owner among all backends, eligible
    /// or not).
    pub(super) first_choice: bool,
    /// Whether a preferred eligible backend was passed over because it was at its bounded
    /// load.
    pub(super) redirected: bool,
}

/// Counters of keyed picks behind the `affinity_share` and `bounded_load_redirects`
/// figures. One `fetch_add` per keyed pick, more only when affinity is lost.
#[derive(Debug, Default)]
pub(super) struct HashCounters {
    keyed_picks: AtomicU64,
    off_first_choice: AtomicU64,
    redirects: AtomicU64,
}

impl HashCounters {
    /// Counts `routed`, and returns its backend.
    #[inline]
    pub(super) fn record(&self, routed: Routed) -> BackendId {
        self.keyed_picks.fetch_add(1, Ordering::Relaxed);
        if !routed.first_choice {
            self.off_first_choice.fetch_add(1, Ordering::Relaxed);
        }
        if routed.redirected {
            self.redirects.fetch_add(1, Ordering::Relaxed);
        }
        routed.backend
    }

    /// The figures every hashing strategy reports: `affinity_share` (ratio 0..=1 of keyed
    /// picks that went to the key's first choice; 1 before any), `bounded_load_redirects`
    /// (count since the strategy was built) and per backend `warmup_progress` (ratio 0..=1
    /// of its slow-start ramp, 1 when done or slow start is off).
    pub(super) fn figures(
        &self,
        slow_start: &SlowStart,
        pool: &PoolView<'_>,
        now_ns: u64,
    ) -> Vec<Figure> {
        let picks = self.keyed_picks.load(Ordering::Relaxed);
        let off = self.off_first_choice.load(Ordering::Relaxed).min(picks);
        let affinity = if picks == 0 {
            1.0
        } else {
            1.0 - off as f64 / picks as f64
        };
        let mut figures = vec![
            Figure::pool("affinity_share", affinity),
            Figure::pool(
                "bounded_load_redirects",
                self.redirects.load(Ordering::Relaxed) as f64,
            ),
        ];
        figures.extend(pool.backends().iter().enumerate().map(|(i, b)| {
            Figure::backend(
                "warmup_progress",
                i,
                slow_start.progress(b.live.warm_since_ns(), now_ns),
            )
        }));
        figures
    }
}

/// Relative change of one backend's effective weight that makes `ring_hash` and `maglev`
/// rebuild their tables: 1 %.
pub(super) const MATERIAL_WEIGHT_CHANGE: f64 = 0.01;

/// Shortest time between two table rebuilds, in ns (1 s): during a slow-start ramp the
/// weights change on every tick, and a rebuild of a large pool's table costs tens of
/// milliseconds of the tick thread.
pub(super) const MIN_REBUILD_INTERVAL_NS: u64 = 1_000_000_000;

/// The effective weights of `pool`'s backends, in list order.
pub(super) fn effective_weights(pool: &PoolView<'_>) -> Box<[f64]> {
    (0..pool.len()).map(|i| pool.effective_weight(i)).collect()
}

/// Whether some backend's effective weight in `pool` differs from `built` by more than
/// [`MATERIAL_WEIGHT_CHANGE`] relative to `built` (or the list changed length).
pub(super) fn weights_changed(built: &[f64], pool: &PoolView<'_>) -> bool {
    built.len() != pool.len()
        || built
            .iter()
            .enumerate()
            .any(|(i, &w)| (pool.effective_weight(i) - w).abs() > MATERIAL_WEIGHT_CHANGE * w)
}

/// A table built from the backends' effective weights (a hash ring, a Maglev lookup
/// table), read by every pick and replaced on tick when the weights changed materially.
///
/// Picks load the current table through `arc-swap` (no lock, and no write to a shared
/// reader count: a lock's reader count is one cache line every picking thread writes);
/// a rebuild happens beside the readers and swaps one pointer.
#[derive(Debug)]
pub(super) struct SwappableTable<T> {
    current: ArcSwap<T>,
    /// When the table was last rebuilt, clock ns (0 = built at construction).
    last_rebuild_ns: AtomicU64,
}

impl<T> SwappableTable<T> {
    /// A cell holding `table`.
    pub(super) fn new(table: T) -> Self {
        Self {
            current: ArcSwap::from_pointee(table),
            last_rebuild_ns: AtomicU64::new(0),
        }
    }

    /// The current table (kept alive until the guard is dropped; a swap meanwhile does
    /// not free it).
    #[inline]
    pub(super) fn read(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    /// On tick at `now_ns`: if [`MIN_REBUILD_INTERVAL_NS`] has passed since the last
    /// rebuild and `pool`'s effective weights differ materially from the `built_with`
    /// weights of the current table ([`weights_changed`]), replaces the table by
    /// `build(current effective weights)`. Returns whether it did.
    pub(super) fn rebuild_if_weights_changed(
        &self,
        pool: &PoolView<'_>,
        now_ns: u64,
        built_with: impl FnOnce(&T) -> &[f64],
        build: impl FnOnce(Box<[f64]>) -> T,
    ) -> bool {
        let last = self.last_rebuild_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(last) < MIN_REBUILD_INTERVAL_NS {
            return false;
        }
        let current = self.current.load_full();
        if !weights_changed(built_with(&current), pool) {
            return false;
        }
        let table = Arc::new(build(effective_weights(pool)));
        self.current.store(table);
        self.last_rebuild_ns.store(now_ns, Ordering::Relaxed);
        true
    }
}

/// Count-min sketch rows.
const SKETCH_DEPTH: usize = 4;
/// Counters per count-min sketch row (a power of two: a row index is 10 bits of one hash).
const SKETCH_WIDTH: usize = 1024;
/// Slots for candidate and hot keys (direct-mapped by key hash).
const HOT_SLOTS: usize = 32;
/// One keyed pick in this many is sampled into the sketch.
const SAMPLE_ONE_IN: u32 = 8;
/// Sampled picks needed in the window before any key is called hot. The halving window
/// holds about `2 × rate / SAMPLE_ONE_IN` samples at steady state, so no key is called hot
/// below about 256 keyed picks per second.
const MIN_SAMPLES: u64 = 64;
/// The lowest share of sampled picks that can make a key hot, whatever the pool size: 1 %.
const MIN_HOT_SHARE: f64 = 0.01;
/// How often the sketch's counts are halved, in ns (1 s): an exponentially decaying
/// window, so a key that cools down stops being hot within a few seconds.
const DECAY_INTERVAL_NS: u64 = 1_000_000_000;

/// Popularity-aware key tracking (BETA1): which keys carry so large a share of the
/// traffic that one backend cannot serve them alone.
///
/// A lock-free count-min sketch (Cormode & Muthukrishnan, "An improved data stream
/// summary: the count-min sketch and its applications", J. Algorithms 55(1), 2005) of
/// `SKETCH_DEPTH × SKETCH_WIDTH` atomic counters counts one keyed pick in
/// `SAMPLE_ONE_IN`. A sampled key whose estimate already exceeds the hot threshold is
/// offered as a candidate (one of `HOT_SLOTS` slots, by key hash); on each tick the
/// candidates are re-estimated and the ones above the threshold published as the hot set
/// (the same slots, so [`HotKeys::is_hot`] is one load on the pick path). Counts halve
/// every `DECAY_INTERVAL_NS`.
///
/// A key is hot when its estimated share of sampled picks exceeds
/// `max(1 / (2n), MIN_HOT_SHARE)` for a pool of `n` backends. Why `1 / (2n)`: a backend's
/// fair share is `1 / n`, so a key above half of it takes its first-choice backend to at
/// least 1.5× the average load together with that backend's ordinary keys, past the
/// default bounded-load factor 1.25; bounded load would then redirect its overflow to
/// arbitrary backends, each of which caches the key cold. Sending a hot key to the less
/// loaded of its two highest-ranked backends splits it between two warm caches instead.
/// Why the 1 % floor: the sketch overestimates a count by at most `e / SKETCH_WIDTH` ≈
/// 0.27 % of the samples with probability `1 − e^-SKETCH_DEPTH` ≈ 98 %, so in large pools
/// a bare `1 / (2n)` would be within the sketch's error.
#[derive(Debug)]
pub(super) struct HotKeys {
    sketch: Box<[AtomicU32]>,
    /// Sampled keyed picks in the (decaying) window.
    sampled: AtomicU64,
    /// Keys offered as hot candidates since the last tick; 0 = empty.
    candidates: Box<[AtomicU64]>,
    /// The hot set published by the last tick; 0 = empty.
    hot: Box<[AtomicU64]>,
    /// Number of keys in `hot`.
    hot_count: AtomicUsize,
    /// `f64` bits of the hot threshold share for the pool size.
    threshold: AtomicU64,
    /// When the counts were last halved, clock ns.
    last_decay_ns: AtomicU64,
}

impl HotKeys {
    /// An empty tracker for a pool of `n` backends.
    pub(super) fn new(n: usize) -> Self {
        let zeros = |len: usize| (0..len).map(|_| AtomicU64::new(0)).collect();
        Self {
            sketch: (0..SKETCH_DEPTH * SKETCH_WIDTH)
                .map(|_| AtomicU32::new(0))
                .collect(),
            sampled: AtomicU64::new(0),
            candidates: zeros(HOT_SLOTS),
            hot: zeros(HOT_SLOTS),
            hot_count: AtomicUsize::new(0),
            threshold: AtomicU64::new(f64::to_bits(hot_threshold(n))),
            last_decay_ns: AtomicU64::new(0),
        }
    }

    /// The sketch counters of `key` (a [`key_hash`]), one per row: row `r` uses bits
    /// `10r..10r+10` of a remix of the key.
    #[inline]
    fn cells(&self, key: u64) -> impl Iterator<Item = &AtomicU32> {
        let h = mix64(key);
        (0..SKETCH_DEPTH).map(move |row| {
            let col = (h >> (row * 10)) as usize & (SKETCH_WIDTH - 1);
            &self.sketch[row * SKETCH_WIDTH + col]
        })
    }

    /// The slot of `key` in `candidates` and `hot`.
    #[inline]
    fn slot(key: u64) -> usize {
        (key >> 40) as usize % HOT_SLOTS
    }

    /// The sketch's estimate of `key`'s sampled picks (never below the truth).
    fn estimate(&self, key: u64) -> u64 {
        self.cells(key)
            .map(|c| u64::from(c.load(Ordering::Relaxed)))
            .min()
            .unwrap_or(0)
    }

    /// Notes a keyed pick of `key` (a [`key_hash`]): sampled one in `SAMPLE_ONE_IN`.
    #[inline]
    pub(super) fn observe(&self, key: u64) {
        if fastrand::u32(..SAMPLE_ONE_IN) != 0 {
            return;
        }
        let sampled = self.sampled.fetch_add(1, Ordering::Relaxed) + 1;
        let estimate = self
            .cells(key)
            .map(|c| c.fetch_add(1, Ordering::Relaxed).saturating_add(1))
            .min()
            .unwrap_or(0);
        let threshold = f64::from_bits(self.threshold.load(Ordering::Relaxed));
        if sampled >= MIN_SAMPLES && estimate as f64 > threshold * sampled as f64 {
            self.candidates[Self::slot(key)].store(key, Ordering::Relaxed);
        }
    }

    /// Whether `key` (a [`key_hash`]) was hot at the last tick. One atomic load.
    #[inline]
    pub(super) fn is_hot(&self, key: u64) -> bool {
        key != 0 && self.hot[Self::slot(key)].load(Ordering::Relaxed) == key
    }

    /// Number of hot keys published by the last tick.
    pub(super) fn count(&self) -> usize {
        self.hot_count.load(Ordering::Relaxed)
    }

    /// Publishes the hot set for a pool of `n` backends from the candidates, then decays
    /// the counts if `DECAY_INTERVAL_NS` has passed since the last decay. On tick only
    /// (O(sketch size) when decaying).
    pub(super) fn refresh(&self, n: usize, now_ns: u64) {
        let threshold = hot_threshold(n);
        self.threshold
            .store(f64::to_bits(threshold), Ordering::Relaxed);
        let sampled = self.sampled.load(Ordering::Relaxed);
        let mut count = 0;
        for (candidate, hot) in self.candidates.iter().zip(self.hot.iter()) {
            let key = candidate.load(Ordering::Relaxed);
            let is_hot = key != 0
                && sampled >= MIN_SAMPLES
                && self.estimate(key) as f64 > threshold * sampled as f64;
            hot.store(if is_hot { key } else { 0 }, Ordering::Relaxed);
            if is_hot {
                count += 1;
            } else {
                candidate.store(0, Ordering::Relaxed);
            }
        }
        self.hot_count.store(count, Ordering::Relaxed);
        let last = self.last_decay_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(last) >= DECAY_INTERVAL_NS {
            self.last_decay_ns.store(now_ns, Ordering::Relaxed);
            // Load then store: a concurrent increment may be lost, which an estimate
            // halved a moment later can afford.
            for cell in self.sketch.iter() {
                cell.store(cell.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
            self.sampled.store(sampled / 2, Ordering::Relaxed);
        }
    }
}

/// The share of sampled picks above which a key is hot in a pool of `n` backends:
/// `max(1 / (2n), MIN_HOT_SHARE)` (see [`HotKeys`]).
fn hot_threshold(n: usize) -> f64 {
    (0.5 / n.max(1) as f64).max(MIN_HOT_SHARE)
}

#[cfg(test)]
pub(super) mod testing {
    //! Helpers for the hashing strategies' tests: whole-key-space experiments run against
    //! each of `rendezvous`, `ring_hash` and `maglev`.

    use crate::backend::Backend;
    use crate::strategy::{
        BackendId, PoolView, RequestInfo, Strategy, StrategyKind, StrategyParams, build_strategy,
    };

    /// The three hashing strategies.
    pub(crate) const HASHING: [StrategyKind; 3] = [
        StrategyKind::Rendezvous,
        StrategyKind::RingHash,
        StrategyKind::Maglev,
    ];

    /// Default parameters without bounded load.
    pub(crate) fn unbounded() -> StrategyParams {
        StrategyParams {
            bounded_load: None,
            ..StrategyParams::default()
        }
    }

    /// The address each of `keys` maps to through `strategy` over `backends`, with no
    /// request in flight.
    pub(crate) fn owners(strategy: &dyn Strategy, backends: &[Backend], keys: u64) -> Vec<String> {
        let view = PoolView::new(backends, &[], false);
        (0..keys)
            .map(|k| {
                let id = strategy
                    .pick(&RequestInfo::new(0).with_hash_key(k), &view)
                    .expect("eligible");
                backends[id.0].address.to_string()
            })
            .collect()
    }

    /// Each backend's share of `keys` keys under a `kind` strategy built (and ticked at
    /// `now_ns`, so tables see current effective weights) with `params`.
    pub(crate) fn shares(
        kind: StrategyKind,
        backends: &[Backend],
        params: &StrategyParams,
        keys: u64,
        now_ns: u64,
    ) -> Vec<f64> {
        let strategy = build_strategy(kind, backends, params);
        let view = PoolView::new(backends, &[], false);
        strategy.tick(&view, now_ns);
        let mut counts = vec![0u64; backends.len()];
        for k in 0..keys {
            let BackendId(i) = strategy
                .pick(&RequestInfo::new(now_ns).with_hash_key(k), &view)
                .expect("eligible");
            counts[i] += 1;
        }
        counts.iter().map(|&c| c as f64 / keys as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{HASHING, owners, shares, unbounded};
    use super::*;
    use crate::backend::{BackendFlags, InFlightGuard};
    use crate::strategy::testing::backends;
    use crate::strategy::{RequestInfo, StrategyKind, StrategyParams, build_strategy};
    use proptest::prelude::{ProptestConfig, any, prop, proptest};

    #[test]
    fn address_hash_is_fixed() {
        // FNV-1a test vectors (Landon Curt Noll's reference list).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned so a change that would remap every key across a cluster is noticed.
        assert_eq!(address_hash("10.0.0.1:80"), mix64(fnv1a64(b"10.0.0.1:80")));
        assert_ne!(address_hash("10.0.0.1:80"), address_hash("10.0.0.1:81"));
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn admission_matches_mirrokni_rule() {
        let b = backends(&[1, 1, 1, 1]);
        // 4 in flight on backend 0 → T = 4: capacity ceil(1.25 × 5 / 4) = 2 per backend.
        let _guards: Vec<_> = (0..4).map(|_| b[0].live.begin(0)).collect();
        let view = PoolView::new(&b, &[], false);
        let admission = BoundedLoad::new(Some(1.25)).admission(&view, 4.0);
        assert!(!admission.admits(&view, 0));
        assert!(admission.admits(&view, 1));
        let _one = b[1].live.begin(0);
        assert!(admission.admits(&view, 1), "1 + 1 ≤ 2");
        let unbounded = BoundedLoad::new(None).admission(&view, 4.0);
        assert!(unbounded.admits(&view, 0));
        assert_eq!(BoundedLoad::new(Some(0.5)), BoundedLoad::new(Some(1.0)));
    }

    #[test]
    fn hot_key_is_found_and_cools_down() {
        let hot = HotKeys::new(10);
        let key = key_hash(42);
        let s = 1_000_000_000;
        // One pick in five on the same key: 20 %, past the threshold 1/(2n) = 5 %.
        for k in 0..20_000u64 {
            hot.observe(if k % 5 == 0 { key } else { key_hash(k + 1_000) });
        }
        hot.refresh(10, s);
        assert!(hot.is_hot(key));
        assert_eq!(hot.count(), 1);
        assert!(!hot.is_hot(key_hash(1_001)));
        // Then the key disappears: decays below the threshold within a few seconds.
        for t in 2..10 {
            for k in 0..5_000u64 {
                hot.observe(key_hash(k + 100_000 * t));
            }
            hot.refresh(10, t * s);
        }
        assert!(!hot.is_hot(key));
        assert_eq!(hot.count(), 0);
    }

    #[test]
    fn removing_a_backend_moves_about_one_nth() {
        const N: u32 = 10;
        const KEYS: u64 = 10_000;
        let all = backends(&[1; N as usize]);
        let removed = 3;
        let mut rest = all.clone();
        rest.remove(removed);
        let gone = all[removed].address.to_string();
        for kind in HASHING {
            let before = owners(&*build_strategy(kind, &all, &unbounded()), &all, KEYS);
            let after = owners(&*build_strategy(kind, &rest, &unbounded()), &rest, KEYS);
            let moved: Vec<_> = (0..KEYS as usize)
                .filter(|&k| before[k] != after[k])
                .collect();
            let fraction = moved.len() as f64 / KEYS as f64;
            let n = f64::from(N);
            assert!(
                (0.5 / n..=2.0 / n).contains(&fraction),
                "{kind}: moved {fraction}"
            );
            let from_removed = moved.iter().filter(|&&k| before[k] == gone).count();
            let on_removed = before.iter().filter(|&a| *a == gone).count();
            assert_eq!(
                from_removed, on_removed,
                "{kind}: every key of the removed one moved"
            );
            if kind == StrategyKind::Rendezvous {
                assert_eq!(
                    from_removed,
                    moved.len(),
                    "only the removed backend's keys move"
                );
            }
        }
    }

    #[test]
    fn weights_are_respected() {
        let b = backends(&[3, 1, 1, 1, 2]);
        // A ring's shares stray from its weights by about 1/√points per backend (8 % at
        // the default 160 points per unit of weight, which `ring_has_points_in_proportion
        // _to_weight` checks exactly); this checks the proportion, on a finer ring.
        let params = StrategyParams {
            ring_points_per_weight: 4096,
            ..unbounded()
        };
        for kind in HASHING {
            let s = shares(kind, &b, &params, 40_000, 0);
            for (i, expected) in [3.0, 1.0, 1.0, 1.0, 2.0].iter().enumerate() {
                let ratio = s[i] / s[1] / expected;
                assert!((0.85..=1.15).contains(&ratio), "{kind}: shares {s:?}");
            }
        }
    }

    #[test]
    fn same_key_same_backend_across_nodes_and_orders() {
        let b = backends(&[1, 2, 1, 3, 1, 1, 2]);
        let mut shuffled = b.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        for kind in HASHING {
            for params in [unbounded(), StrategyParams::default()] {
                let one = owners(&*build_strategy(kind, &b, &params), &b, 2_000);
                let two = owners(&*build_strategy(kind, &b, &params), &b, 2_000);
                let other_order =
                    owners(&*build_strategy(kind, &shuffled, &params), &shuffled, 2_000);
                assert_eq!(one, two, "{kind}");
                assert_eq!(one, other_order, "{kind}: list order must not matter");
            }
            // A rebuild after a tick with unchanged weights keeps the mapping.
            let strategy = build_strategy(kind, &b, &unbounded());
            let before = owners(&*strategy, &b, 2_000);
            strategy.tick(&PoolView::new(&b, &[], false), 10_000_000_000);
            assert_eq!(before, owners(&*strategy, &b, 2_000), "{kind}");
        }
    }

    #[test]
    fn warming_backend_share_grows_with_its_factor() {
        for kind in HASHING {
            let mut last = 0.0;
            for factor in [0.1, 0.3, 0.6, 1.0] {
                let b = backends(&[1, 1, 1, 1]);
                b[0].live.set_effective_weight(factor);
                let share = shares(kind, &b, &unbounded(), 20_000, 10_000_000_000)[0];
                let expected = factor / (3.0 + factor);
                assert!(
                    share > last,
                    "{kind}: share {share} at {factor} after {last}"
                );
                assert!(
                    (share - expected).abs() < 0.25 * expected + 0.01,
                    "{kind}: share {share}, expected {expected}"
                );
                last = share;
            }
        }
    }

    #[test]
    fn keyless_requests_are_spread() {
        let b = backends(&[1, 1, 1]);
        b[1].live.set_flag(BackendFlags::DRAINING);
        let view = PoolView::new(&b, &[], false);
        for kind in HASHING {
            let s = build_strategy(kind, &b, &StrategyParams::default());
            let mut seen = [0; 3];
            for _ in 0..30 {
                seen[s.pick(&RequestInfo::new(0), &view).expect("eligible").0] += 1;
            }
            assert!(
                seen[0] >= 10 && seen[1] == 0 && seen[2] >= 10,
                "{kind}: {seen:?}"
            );
        }
    }

    #[test]
    fn figures_report_affinity_redirects_and_warmup() {
        let b = backends(&[1, 1]);
        let params = StrategyParams {
            slow_start: SlowStart {
                window: std::time::Duration::from_secs(10),
                ..SlowStart::default()
            },
            ..StrategyParams::default()
        };
        for kind in HASHING {
            let s = build_strategy(kind, &b, &params);
            let view = PoolView::new(&b, &[], false);
            let mut guards = Vec::new();
            for _ in 0..20 {
                let id = s
                    .pick(&RequestInfo::new(0).with_hash_key(7), &view)
                    .expect("eligible");
                guards.push(b[id.0].live.begin(0));
            }
            let figures = s.figures(&view, 5_000_000_000);
            let get = |name: &str, backend: Option<usize>| {
                figures
                    .iter()
                    .find(|f| f.name == name && f.backend == backend)
                    .unwrap_or_else(|| panic!("{kind}: no {name}"))
                    .value
            };
            assert!(get("bounded_load_redirects", None) >= 5.0, "{kind}");
            let affinity = get("affinity_share", None);
            assert!((0.3..=0.8).contains(&affinity), "{kind}: {affinity}");
            assert!(
                (get("warmup_progress", Some(1)) - 0.5).abs() < 1e-9,
                "{kind}"
            );
        }
    }

    /// Picks `keys` one after another on `kind`, keeping every request in flight, and
    /// checks each pick against the bounded-load rule in exact integer arithmetic with
    /// `c = quarters / 4`.
    fn check_bound(
        kind: StrategyKind,
        weights: &[u32],
        down: &[bool],
        quarters: u64,
        keys: &[u64],
    ) {
        let b = backends(weights);
        for (backend, &down) in b.iter().zip(down) {
            if down {
                backend.live.set_flag(BackendFlags::UNHEALTHY);
            }
        }
        let params = StrategyParams {
            bounded_load: Some(quarters as f64 / 4.0),
            ..StrategyParams::default()
        };
        let strategy = build_strategy(kind, &b, &params);
        let eligible_weight: u64 = (0..b.len())
            .filter(|&i| !down[i])
            .map(|i| u64::from(weights[i]))
            .sum();
        let mut guards: Vec<InFlightGuard> = Vec::new();
        for (t, &key) in keys.iter().enumerate() {
            let view = PoolView::new(&b, &[], false);
            let Some(BackendId(i)) = strategy.pick(&RequestInfo::new(0).with_hash_key(key), &view)
            else {
                assert_eq!(eligible_weight, 0, "{kind}: None with eligible backends");
                return;
            };
            assert!(!down[i], "{kind}: picked unhealthy {i}");
            guards.push(b[i].live.begin(0));
            // After the pick: in_flight_i ≤ ceil(c × T × w_i / W), T counting this request.
            let total = t as u64 + 1;
            let in_flight = b[i].live.in_flight();
            let numerator = quarters * total * u64::from(weights[i]);
            let capacity = numerator.div_ceil(4 * eligible_weight);
            assert!(
                in_flight <= capacity,
                "{kind}: backend {i} at {in_flight} > {capacity} after {total} picks"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Bounded load is never exceeded, with equal or unequal weights, some backends
        /// down, and keys drawn from a small set so that a few keys are hot.
        #[test]
        fn bounded_load_is_never_exceeded(
            pool in prop::collection::vec((1u32..5, prop::bool::weighted(0.2)), 1..20),
            equal in any::<bool>(),
            quarters in 4u64..12,
            keys in prop::collection::vec(0u64..30, 1..300),
        ) {
            let weights: Vec<u32> = pool.iter().map(|&(w, _)| if equal { 1 } else { w }).collect();
            let down: Vec<bool> = pool.iter().map(|&(_, d)| d).collect();
            for kind in HASHING {
                check_bound(kind, &weights, &down, quarters, &keys);
            }
        }
    }

    #[test]
    fn bounded_load_holds_on_large_pools() {
        // Past rendezvous's exact limit (skeleton path) and with one very hot key.
        let weights: Vec<u32> = (0..200).map(|i| i % 3 + 1).collect();
        let down = vec![false; 200];
        let keys: Vec<u64> = (0..2_000u64)
            .map(|k| if k % 3 == 0 { 1 } else { k })
            .collect();
        for kind in HASHING {
            check_bound(kind, &weights, &down, 5, &keys);
        }
    }
}
