//! Per-endpoint request statistics: how long does `GET /v1/users/{id}` take, how often
//! does it fail, and is it a long endpoint?
//!
//! Each pool owns one [`EndpointTable`]. Before forwarding a request the proxy looks up
//! the request's endpoint ([`EndpointTable::get`], keyed by [`crate::path::endpoint_hash`])
//! and reads its class ([`EndpointStats::class`], one atomic load) so duration-aware
//! strategies know whether the request is likely long; when the response completes it
//! calls [`EndpointStats::record`]. Both run on worker threads concurrently, so everything
//! on those paths is lock-free; snapshots for the admin API are taken off the hot path.
//!
//! The long/short rule is the Dify cluster load balancer's (seed 000): an endpoint is long
//! when the average of its last N durations (default 5) reaches a threshold (default
//! 5 000 ms), with the hysteresis of [`Classifier`].
//!
//! The table is bounded: after [`EndpointConfig::max_endpoints`] distinct endpoints, new
//! ones share one overflow entry (key [`OVERFLOW_KEY`]), so a client requesting random
//! URLs cannot grow memory. A full table is swept by the pool's background task
//! ([`EndpointTable::evict_when_full`]): endpoints seen once and not since
//! [`EVICTION_GRACE`], or not used within the latency window, make room again, so a
//! past scan of random URLs does not keep new real endpoints out for good.

use arc_swap::ArcSwap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::classify::{Classifier, RequestClass};
use crate::ewma::Ewma;
use crate::histogram::WindowedHistogram;
use crate::path::{endpoint_hash, endpoint_key, key_hash, key_matches};

/// Key of the entry that collects every endpoint beyond [`EndpointConfig::max_endpoints`].
pub const OVERFLOW_KEY: &str = "* {other}";

/// Largest [`EndpointConfig::window`]: 1024 durations.
pub const MAX_WINDOW: usize = 1024;

/// Largest [`EndpointConfig::max_endpoints`]: 2^20; larger values are clamped (the table
/// reserves two slots of 16 bytes per endpoint up front).
pub const MAX_ENDPOINTS_LIMIT: usize = 1 << 20;

/// Sub-windows of each endpoint's latency histogram: the p50/p95/p99 window slides in
/// quarter steps. Memory per endpoint ≈ 4 × 2.1 KiB.
const HISTOGRAM_SLOTS: usize = 4;

/// An empty slot of the duration ring (durations are clamped below it).
const EMPTY: u64 = u64::MAX;

/// How long after its last use an endpoint of a full table is kept even if it was seen
/// only once (10 s): long enough for its first request to complete and a second to come.
pub const EVICTION_GRACE: Duration = Duration::from_secs(10);

/// Per-endpoint statistics settings; `Default` gives the seed-000 values.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    /// How many of an endpoint's most recent durations are averaged for its class
    /// (Dify cluster LB, seed 000: 5). Valid range 1..=[`MAX_WINDOW`]; out-of-range values
    /// are clamped.
    pub window: usize,
    /// Decay time τ of the per-endpoint duration EWMA (default 10 s, as Finagle/Linkerd).
    pub ewma_decay: Duration,
    /// Sliding window of the p50/p95/p99 duration quantiles (default 60 s).
    pub latency_window: Duration,
    /// The long/short rule (default 5 000 ms threshold, 0.2 hysteresis).
    pub classifier: Classifier,
    /// Distinct endpoints tracked per table before new ones share the overflow entry
    /// (default 1000). 0 sends everything to the overflow entry; values above
    /// [`MAX_ENDPOINTS_LIMIT`] are clamped.
    pub max_endpoints: usize,
}

impl Default for EndpointConfig {
    /// window 5, ewma_decay 10 s, latency_window 60 s, classifier 5 000 ms / 0.2,
    /// max_endpoints 1000.
    fn default() -> Self {
        Self {
            window: 5,
            ewma_decay: Duration::from_secs(10),
            latency_window: Duration::from_secs(60),
            classifier: Classifier::default(),
            max_endpoints: 1000,
        }
    }
}

/// A point-in-time copy of one endpoint's statistics, for the admin API and metrics.
/// Durations are in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSnapshot {
    /// The endpoint key, e.g. `"GET /v1/users/{id}"` (or [`OVERFLOW_KEY`]).
    pub key: String,
    /// Requests recorded since the endpoint was first seen.
    pub count: u64,
    /// Of those, requests recorded as errors.
    pub errors: u64,
    /// Average of the last N durations (the class input), in ms; 0 before any record.
    pub average_ms: f64,
    /// Time-decayed EWMA of durations, in ms; 0 before any record.
    pub ewma_ms: f64,
    /// Longest duration ever recorded, in ms; 0 before any record.
    pub max_ms: f64,
    /// Median duration over the latency window, in ms (≤ 3.1 % relative error); `None`
    /// when the window is empty.
    pub p50_ms: Option<f64>,
    /// 95th percentile over the latency window, in ms; `None` when empty.
    pub p95_ms: Option<f64>,
    /// 99th percentile over the latency window, in ms; `None` when empty.
    pub p99_ms: Option<f64>,
    /// The endpoint's current class.
    pub class: RequestClass,
}

/// One endpoint's statistics, shared between worker threads (usually via the
/// `Arc` returned by [`EndpointTable::get`]). Every method takes `&self` and is lock-free.
pub struct EndpointStats {
    key: Box<str>,
    hash: u64,
    count: AtomicU64,
    errors: AtomicU64,
    /// The last N durations in ns, written round-robin at `count % N`; [`EMPTY`] until
    /// first written.
    ring: Box<[AtomicU64]>,
    max_ns: AtomicU64,
    ewma: Ewma,
    histogram: WindowedHistogram,
    class: AtomicU8,
    classifier: Classifier,
    /// Clock ns of the last record, or of the creation before any.
    last_used_ns: AtomicU64,
}

impl std::fmt::Debug for EndpointStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointStats")
            .field("key", &self.key)
            .field("count", &self.count.load(Ordering::Relaxed))
            .field("class", &self.class())
            .finish_non_exhaustive()
    }
}

impl EndpointStats {
    /// Empty statistics for the endpoint named `key` (normally built by
    /// [`EndpointTable::get`] from [`crate::path::endpoint_key`]). Never fails; out-of-range
    /// `config.window` is clamped to 1..=[`MAX_WINDOW`].
    pub fn new(key: String, config: &EndpointConfig) -> Self {
        let hash = key_hash(&key);
        Self::with_hash(key, hash, config)
    }

    fn with_hash(key: String, hash: u64, config: &EndpointConfig) -> Self {
        let window = config.window.clamp(1, MAX_WINDOW);
        Self {
            key: key.into_boxed_str(),
            hash,
            count: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ring: (0..window).map(|_| AtomicU64::new(EMPTY)).collect(),
            max_ns: AtomicU64::new(0),
            ewma: Ewma::new(config.ewma_decay),
            histogram: WindowedHistogram::new(config.latency_window, HISTOGRAM_SLOTS),
            class: AtomicU8::new(RequestClass::Unknown.to_u8()),
            classifier: config.classifier,
            last_used_ns: AtomicU64::new(crate::clock::now_ns()),
        }
    }

    /// The endpoint key, e.g. `"GET /v1/users/{id}"`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Records a completed request that took `duration_ns` nanoseconds and finished at
    /// `now_ns` (see [`crate::clock::now_ns`]); `error` marks a failed request (its
    /// duration still counts: a timeout is a long request). Updates the counters, the
    /// last-N ring, the EWMA, the maximum, the latency histogram, and re-classifies the
    /// endpoint. Lock-free; cost O(N) for the class average (N = window, default 5).
    pub fn record(&self, duration_ns: u64, error: bool, now_ns: u64) {
        let duration_ns = duration_ns.min(EMPTY - 1);
        let seq = self.count.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let len = self.ring.len() as u64;
        self.ring[(seq % len) as usize].store(duration_ns, Ordering::Relaxed);
        self.max_ns.fetch_max(duration_ns, Ordering::Relaxed);
        self.ewma.observe(duration_ns, now_ns);
        self.histogram.record(duration_ns, now_ns);
        self.last_used_ns.store(now_ns, Ordering::Relaxed);

        let previous = self.class.load(Ordering::Relaxed);
        let next = self
            .classifier
            .classify(RequestClass::from_u8(previous), self.average_ns())
            .to_u8();
        if next != previous {
            // Losing this race means another record just re-classified from fresher data.
            let _ =
                self.class
                    .compare_exchange(previous, next, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Records a request refused before any backend saw it (the pool queue was full or
    /// timed out): counted, and counted as an error, but with no duration, since the time
    /// it waited says nothing of how long the endpoint takes. The last-N average and the
    /// class keep the durations already recorded.
    pub fn record_refused(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Warm start: when nothing has been recorded here yet, fills the last-N ring with
    /// `average_ns` (an average persisted by the cluster, seed 000's `request:stats`) and
    /// classifies the endpoint from it, so a restarted node knows its long endpoints
    /// before their first request. Counters, EWMA and quantiles stay empty; the primed
    /// values are overwritten by the first N real records. Returns whether it primed.
    pub fn prime(&self, average_ns: u64) -> bool {
        if self.count.load(Ordering::Relaxed) != 0
            || self
                .ring
                .iter()
                .any(|slot| slot.load(Ordering::Relaxed) != EMPTY)
        {
            return false;
        }
        let average_ns = average_ns.min(EMPTY - 1);
        for slot in &self.ring {
            // Only slots still empty: a concurrent record wins.
            let _ = slot.compare_exchange(EMPTY, average_ns, Ordering::Relaxed, Ordering::Relaxed);
        }
        let next = self
            .classifier
            .classify(RequestClass::Unknown, self.average_ns())
            .to_u8();
        let _ = self.class.compare_exchange(
            RequestClass::Unknown.to_u8(),
            next,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        true
    }

    /// The endpoint's current class: one atomic load, meant to be read before forwarding
    /// every request.
    #[inline]
    pub fn class(&self) -> RequestClass {
        RequestClass::from_u8(self.class.load(Ordering::Relaxed))
    }

    /// Average of the last N recorded durations (fewer while the ring fills), in
    /// nanoseconds; `None` before the first record.
    pub fn average_ns(&self) -> Option<u64> {
        let (sum, n) = self
            .ring
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|&d| d != EMPTY)
            .fold((0u128, 0u128), |(sum, n), d| (sum + u128::from(d), n + 1));
        // The mean of u64 values fits in u64.
        (n > 0).then(|| (sum / n) as u64)
    }

    /// The `q`-quantile (0..=1, clamped) of durations recorded within the latency window
    /// ending at `now_ns`, in nanoseconds (≤ 3.1 % relative error, HdrHistogram-style
    /// buckets); `None` when the window is empty.
    pub fn quantile_ns(&self, q: f64, now_ns: u64) -> Option<u64> {
        self.histogram.quantile(q, now_ns)
    }

    /// Requests recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// A point-in-time copy of the statistics, quantiles over the window ending at
    /// `now_ns`. Allocates; for the admin API, not the request path.
    pub fn snapshot(&self, now_ns: u64) -> EndpointSnapshot {
        const MS: f64 = 1e6;
        let window = self.histogram.snapshot(now_ns);
        let quantile_ms = |q| window.quantile(q).map(|ns| ns as f64 / MS);
        EndpointSnapshot {
            key: self.key.to_string(),
            count: self.count.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            average_ms: self.average_ns().map_or(0.0, |ns| ns as f64 / MS),
            ewma_ms: self.ewma.value_ns().map_or(0.0, |ns| ns / MS),
            max_ms: self.max_ns.load(Ordering::Relaxed) as f64 / MS,
            p50_ms: quantile_ms(0.5),
            p95_ms: quantile_ms(0.95),
            p99_ms: quantile_ms(0.99),
            class: self.class(),
        }
    }
}

/// A pool's endpoints: a bounded, read-mostly map from endpoint to [`EndpointStats`].
///
/// Design: a fixed-size open-addressed table (linear probing) of `OnceLock` slots,
/// allocated once at twice `max_endpoints` (rounded up to a power of two), so the load
/// factor stays ≤ ½ and a miss ends at an empty slot after ~2.5 probes on average. A
/// lookup is lock-free and performs no shared write on the table: it hashes the request
/// with [`endpoint_hash`], probes with acquire loads, and confirms the key by streaming
/// comparison (no allocation). Slots are filled once and never cleared, so no reader can
/// see a slot change under it; [`EndpointTable::evict_when_full`] builds a new slot array
/// and swaps it in whole (`arc-swap`: a lookup loads the current array without a lock). The slot index mixes the FNV hash with a per-table random
/// seed, so a client cannot choose paths that pile up in one probe run.
pub struct EndpointTable {
    config: EndpointConfig,
    /// The slots; replaced whole by [`EndpointTable::evict_when_full`].
    slots: ArcSwap<Slots>,
    /// Slots per array minus one (a power of two minus one).
    mask: usize,
    seed: u64,
    max_endpoints: usize,
    overflow: Arc<EndpointStats>,
    overflowed: AtomicU64,
    evicted: AtomicU64,
}

/// One generation of the table's slots and how many are taken.
struct Slots {
    slots: Box<[OnceLock<Arc<EndpointStats>>]>,
    len: AtomicUsize,
}

impl Slots {
    fn new(capacity: usize) -> Self {
        Self {
            slots: (0..capacity).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
        }
    }
}

impl std::fmt::Debug for EndpointTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointTable")
            .field("len", &self.len())
            .field("max_endpoints", &self.max_endpoints)
            .field("overflowed", &self.overflowed())
            .finish_non_exhaustive()
    }
}

impl EndpointTable {
    /// An empty table. Allocates the slot array up front (16 bytes × 2 × `max_endpoints`,
    /// rounded up to a power of two); never fails (out-of-range settings are clamped, see
    /// [`EndpointConfig`]).
    pub fn new(config: EndpointConfig) -> Self {
        let max_endpoints = config.max_endpoints.min(MAX_ENDPOINTS_LIMIT);
        let capacity = (max_endpoints * 2).next_power_of_two().max(2);
        Self {
            slots: ArcSwap::from_pointee(Slots::new(capacity)),
            mask: capacity - 1,
            seed: RandomState::new().hash_one(0x5eed_u64),
            max_endpoints,
            overflow: Arc::new(EndpointStats::new(OVERFLOW_KEY.to_string(), &config)),
            overflowed: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            config,
        }
    }

    /// The statistics of the endpoint of a `method` request to `path` (the path without
    /// its query string), created on first sight. When the table already holds
    /// `max_endpoints` endpoints, a new endpoint gets the shared overflow entry (key
    /// [`OVERFLOW_KEY`]) and [`EndpointTable::overflowed`] counts the lookup.
    ///
    /// Hot path: no lock, no allocation and no shared write on the table when the endpoint
    /// exists (cloning the returned `Arc` increments the endpoint's own reference count).
    pub fn get(&self, method: &str, path: &str) -> Arc<EndpointStats> {
        let hash = endpoint_hash(method, path);
        let table = self.slots.load();
        let mut i = self.index_of(hash);
        for _ in 0..table.slots.len() {
            match table.slots[i].get() {
                Some(stats) if stats.hash == hash && key_matches(&stats.key, method, path) => {
                    return Arc::clone(stats);
                }
                Some(_) => i = (i + 1) & self.mask,
                None => return self.insert(&table, i, hash, method, path),
            }
        }
        self.overflow()
    }

    /// Inserts the endpoint at the first free slot of `table` from `start`, or finds it
    /// there if another thread inserted it meanwhile.
    #[cold]
    fn insert(
        &self,
        table: &Slots,
        start: usize,
        hash: u64,
        method: &str,
        path: &str,
    ) -> Arc<EndpointStats> {
        let reserved = table
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_endpoints).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return self.overflow();
        }
        let mut i = start;
        for _ in 0..table.slots.len() {
            let mut created = false;
            let stats = table.slots[i].get_or_init(|| {
                created = true;
                Arc::new(EndpointStats::with_hash(
                    endpoint_key(method, path),
                    hash,
                    &self.config,
                ))
            });
            if created {
                return Arc::clone(stats);
            }
            if stats.hash == hash && key_matches(&stats.key, method, path) {
                // Another thread created it first: give the reservation back.
                table.len.fetch_sub(1, Ordering::AcqRel);
                return Arc::clone(stats);
            }
            i = (i + 1) & self.mask;
        }
        // Unreachable while len ≤ max_endpoints < slots.len(); degrade, do not panic.
        table.len.fetch_sub(1, Ordering::AcqRel);
        self.overflow()
    }

    /// When the table is full, replaces its slots with only the endpoints worth keeping:
    /// those used within [`EVICTION_GRACE`], and those seen at least twice and used within
    /// the latency window ([`EndpointConfig::latency_window`]). The rest — typically the
    /// single requests of a scan of random URLs — are dropped, so that new endpoints get
    /// their own statistics again instead of sharing the overflow entry. Kept endpoints
    /// keep their statistics (the same objects move). Returns how many were evicted (0
    /// when the table is not full). For the pool's background task, off the request path:
    /// O(slots), allocates a new slot array. An endpoint created by a request while the
    /// sweep runs may be dropped with the old slots; its next request creates it again.
    pub fn evict_when_full(&self, now_ns: u64) -> usize {
        let current = self.slots.load_full();
        let before = current.len.load(Ordering::Acquire);
        if before < self.max_endpoints {
            return 0;
        }
        let grace = crate::clock::duration_ns(EVICTION_GRACE);
        let window = crate::clock::duration_ns(self.config.latency_window);
        let next = Slots::new(current.slots.len());
        let mut kept = 0;
        for stats in current.slots.iter().filter_map(OnceLock::get) {
            let idle = now_ns.saturating_sub(stats.last_used_ns.load(Ordering::Relaxed));
            if idle > grace && (stats.count() < 2 || idle > window) {
                continue;
            }
            let mut i = self.index_of(stats.hash);
            while next.slots[i].set(Arc::clone(stats)).is_err() {
                i = (i + 1) & self.mask;
            }
            kept += 1;
        }
        next.len.store(kept, Ordering::Release);
        self.slots.store(Arc::new(next));
        let evicted = before.saturating_sub(kept);
        self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        evicted
    }

    /// Endpoints evicted by [`EndpointTable::evict_when_full`] since the table was built.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn overflow(&self) -> Arc<EndpointStats> {
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        Arc::clone(&self.overflow)
    }

    /// Slot index: the FNV hash mixed with the table's random seed (splitmix64 finaliser,
    /// Steele et al. 2014), so probe runs do not depend on attacker-chosen hash bits.
    #[inline]
    fn index_of(&self, hash: u64) -> usize {
        let mut z = hash ^ self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z as usize) & self.mask
    }

    /// Lookups that were sent to the overflow entry because the table was full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Distinct endpoints tracked (excluding the overflow entry); at most `max_endpoints`.
    pub fn len(&self) -> usize {
        self.slots.load().len.load(Ordering::Acquire)
    }

    /// Whether no endpoint has been seen yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The settings the table was built with (as given, before clamping).
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// Snapshots of every endpoint, plus the overflow entry once it has been used, sorted
    /// by request count, highest first (ties by key). Allocates; for the admin API.
    pub fn snapshot(&self, now_ns: u64) -> Vec<EndpointSnapshot> {
        let mut all: Vec<EndpointSnapshot> = self
            .slots
            .load()
            .slots
            .iter()
            .filter_map(OnceLock::get)
            .map(|stats| stats.snapshot(now_ns))
            .collect();
        if self.overflowed() > 0 {
            all.push(self.overflow.snapshot(now_ns));
        }
        all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    fn table(max_endpoints: usize) -> EndpointTable {
        EndpointTable::new(EndpointConfig {
            max_endpoints,
            ..EndpointConfig::default()
        })
    }

    #[test]
    fn same_endpoint_same_stats() {
        let t = table(10);
        let a = t.get("GET", "/v1/users/1");
        let b = t.get("GET", "/v1/users/2");
        let c = t.get("POST", "/v1/users/2");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.key(), "GET /v1/users/{id}");
        assert_eq!(t.len(), 2);
        assert_eq!(t.overflowed(), 0);
    }

    #[test]
    fn record_updates_everything() {
        let s = EndpointStats::new("GET /x".into(), &EndpointConfig::default());
        assert_eq!(s.class(), RequestClass::Unknown);
        assert_eq!(s.average_ns(), None);
        s.record(10 * MS, false, S);
        s.record(30 * MS, true, S);
        let snap = s.snapshot(S);
        assert_eq!(snap.key, "GET /x");
        assert_eq!(snap.count, 2);
        assert_eq!(snap.errors, 1);
        assert_eq!(snap.average_ms, 20.0);
        assert_eq!(snap.max_ms, 30.0);
        assert_eq!(
            snap.ewma_ms, 10.0,
            "same-millisecond observation has no weight"
        );
        let p99 = snap.p99_ms.expect("window holds two values");
        assert!((p99 - 30.0).abs() < 1.0, "p99 {p99}");
        assert_eq!(snap.class, RequestClass::Short);
    }

    #[test]
    fn average_covers_last_n() {
        let s = EndpointStats::new("GET /x".into(), &EndpointConfig::default());
        for d in [100, 1, 2, 3, 4, 5] {
            s.record(d, false, 0);
        }
        assert_eq!(s.average_ns(), Some(3));
    }

    #[test]
    fn class_flips_to_long_after_enough_long_samples() {
        let s = EndpointStats::new("GET /report".into(), &EndpointConfig::default());
        for _ in 0..5 {
            s.record(S, false, 0);
        }
        assert_eq!(s.class(), RequestClass::Short);
        // avg after k 10 s samples = (10k + (5 - k)) / 5 s ≥ 5 s ⇔ k ≥ 20/9, i.e. k = 3.
        s.record(10 * S, false, 0);
        s.record(10 * S, false, 0);
        assert_eq!(s.class(), RequestClass::Short);
        s.record(10 * S, false, 0);
        assert_eq!(s.class(), RequestClass::Long);
    }

    #[test]
    fn hysteresis_prevents_flapping() {
        let s = EndpointStats::new("GET /llm".into(), &EndpointConfig::default());
        for _ in 0..5 {
            s.record(6 * S, false, 0);
        }
        assert!(s.class().is_long());
        // Averages wandering between 4.2 s and 5.8 s: always long once long.
        for i in 0..100u64 {
            let d = if i % 2 == 0 { 4_200 * MS } else { 5_800 * MS };
            s.record(d, false, 0);
            assert!(s.class().is_long(), "flapped at {i}");
        }
        for _ in 0..5 {
            s.record(3 * S, false, 0);
        }
        assert_eq!(s.class(), RequestClass::Short);
        // And a short endpoint stays short in the band.
        for i in 0..100u64 {
            let d = if i % 2 == 0 { 4_200 * MS } else { 4_800 * MS };
            s.record(d, false, 0);
            assert_eq!(s.class(), RequestClass::Short, "flapped at {i}");
        }
    }

    #[test]
    fn full_table_sends_new_endpoints_to_overflow() {
        let t = table(2);
        t.get("GET", "/a");
        t.get("GET", "/b");
        let o1 = t.get("GET", "/c");
        let o2 = t.get("GET", "/d");
        assert!(Arc::ptr_eq(&o1, &o2));
        assert_eq!(o1.key(), OVERFLOW_KEY);
        assert_eq!(t.overflowed(), 2);
        // Known endpoints are still found.
        assert_eq!(t.get("GET", "/a").key(), "GET /a");
        assert_eq!(t.len(), 2);

        let z = table(0);
        assert_eq!(z.get("GET", "/a").key(), OVERFLOW_KEY);
    }

    #[test]
    fn a_full_table_evicts_one_off_and_idle_endpoints_and_keeps_the_rest() {
        let t = table(4);
        let now = crate::clock::now_ns();
        let grace = crate::clock::duration_ns(EVICTION_GRACE);
        let window = crate::clock::duration_ns(EndpointConfig::default().latency_window);
        // A real endpoint, used often and recently.
        let users = t.get("GET", "/users");
        users.record(5 * MS, false, now);
        users.record(5 * MS, false, now + 2 * grace);
        // A scan: one request each.
        for path in ["/x1", "/x2", "/x3"] {
            t.get("GET", path).record(MS, false, now);
        }
        assert_eq!(t.len(), 4);
        assert_eq!(t.get("GET", "/orders").key(), OVERFLOW_KEY, "full");
        // Not full: nothing to do.
        assert_eq!(table(4).evict_when_full(now), 0);

        // Within the grace period everything stays.
        assert_eq!(t.evict_when_full(now + grace / 2), 0);
        // After it, the one-off requests go; the repeated endpoint stays, with its data.
        let later = now + 2 * grace;
        assert_eq!(t.evict_when_full(later), 3);
        assert_eq!(t.evicted(), 3);
        assert_eq!(t.len(), 1);
        let kept = t.get("GET", "/users");
        assert!(Arc::ptr_eq(&kept, &users), "the same statistics moved");
        assert_eq!(kept.count(), 2);
        // New endpoints get their own entries again.
        assert_eq!(t.get("GET", "/orders").key(), "GET /orders");
        assert_eq!(t.len(), 2);
        // A repeated endpoint idle for longer than the latency window goes too.
        for path in ["/a", "/b"] {
            t.get("GET", path);
        }
        assert_eq!(t.len(), 4);
        assert_eq!(t.evict_when_full(later + window + grace), 4);
        assert!(t.is_empty());
        let keys: Vec<String> = t.snapshot(later).into_iter().map(|s| s.key).collect();
        assert!(!keys.contains(&"GET /users".to_string()), "{keys:?}");
    }

    #[test]
    fn snapshot_is_sorted_by_count() {
        let t = table(1);
        t.get("GET", "/a").record(MS, false, 0);
        for _ in 0..3 {
            t.get("GET", "/b").record(MS, false, 0);
        }
        let snap = t.snapshot(0);
        let keys: Vec<_> = snap.iter().map(|s| (s.key.as_str(), s.count)).collect();
        assert_eq!(keys, [(OVERFLOW_KEY, 3), ("GET /a", 1)]);
    }

    #[test]
    fn concurrent_lookups_and_records() {
        let t = Arc::new(table(64));
        let threads: Vec<_> = (0..8)
            .map(|th| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..5_000u64 {
                        let path = format!("/r{}/{}", i % 100, th * 10_000 + i);
                        t.get("GET", &path).record(MS, i % 10 == 0, i);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("worker thread panicked");
        }
        assert_eq!(t.len(), 64);
        let snap = t.snapshot(5_000);
        assert_eq!(snap.len(), 65);
        let total: u64 = snap.iter().map(|s| s.count).sum();
        let errors: u64 = snap.iter().map(|s| s.errors).sum();
        assert_eq!(total, 40_000);
        assert_eq!(errors, 4_000);
        let overflow = snap
            .iter()
            .find(|s| s.key == OVERFLOW_KEY)
            .expect("100 routes into 64 slots overflow");
        assert_eq!(overflow.count, t.overflowed());
        // Every tracked key is distinct.
        let mut keys: Vec<_> = snap.iter().map(|s| s.key.clone()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 65);
    }

    proptest! {
        #[test]
        fn table_is_bounded_and_consistent(
            max in 0usize..20,
            paths in proptest::collection::vec("(/[a-z0-9]{1,4}){1,3}", 1..200),
        ) {
            let t = table(max);
            for p in &paths {
                let s = t.get("GET", p);
                prop_assert!(t.len() <= max);
                if s.key() != OVERFLOW_KEY {
                    prop_assert_eq!(s.key(), endpoint_key("GET", p));
                    // A second lookup finds the same entry.
                    prop_assert!(Arc::ptr_eq(&s, &t.get("GET", p)));
                }
            }
            let mut distinct: Vec<String> =
                paths.iter().map(|p| endpoint_key("GET", p)).collect();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(t.len(), distinct.len().min(max));
            prop_assert_eq!(t.overflowed() > 0, distinct.len() > max);
        }
    }
}
