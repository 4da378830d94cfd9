//! Shared state of one simulated backend: its counters, current settings, capacity gate
//! and key cache.
//!
//! Every connection task holds an `Arc<SimState>`. Counters are atomics; the settings and
//! the gate sit behind one short-held lock, the cache behind another; neither is ever held
//! across an `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use lru::LruCache;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::settings::{Settings, SettingsChange};

/// What `/stats` reports, also returned by [`BackendHandle::stats`](crate::BackendHandle::stats).
///
/// JSON: `{"name":"b1","requests":12,"in_flight":1,"queued":2,"errors":0,"cache_hits":0,
/// "cache_misses":0,"settings":{…}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatsSnapshot {
    /// The backend's name.
    pub name: String,
    /// Requests received on the work, `/echo`, `/download` and `/ws` endpoints since start
    /// (counted on arrival; `/health`, `/stats` and `/control` are not counted).
    pub requests: u64,
    /// Work requests being served now: past the capacity queue, sleeping their latency.
    pub in_flight: u64,
    /// Work requests waiting in the capacity queue now.
    pub queued: u64,
    /// Work requests answered `503` by the fail rate since start.
    pub errors: u64,
    /// Work requests whose cache key was found in the cache since start.
    #[serde(default)]
    pub cache_hits: u64,
    /// Work requests whose cache key was not cached (and paid the miss penalty) since start.
    #[serde(default)]
    pub cache_misses: u64,
    /// Current behaviour.
    pub settings: Settings,
}

/// How many `/download` checksums are remembered; benchmarks repeat a few sizes.
const CHECKSUM_CACHE_ENTRIES: usize = 64;

pub(crate) struct SimState {
    pub name: String,
    /// `name` as the `x-backend` header value, validated once at start.
    pub name_header: HeaderValue,
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub queued: AtomicU64,
    pub errors: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    runtime: Mutex<Runtime>,
    /// The simulated cache's keys in recency order. Unbounded as a container: the bound is
    /// `settings.cache_size`, enforced on every insert, so a large size costs memory only
    /// as keys arrive.
    cache: Mutex<LruCache<Box<[u8]>, ()>>,
    /// `/download` length → hex SHA-256 of the pattern of that length.
    checksums: Mutex<HashMap<u64, Arc<str>>>,
}

struct Runtime {
    settings: Settings,
    /// `None` when capacity is unlimited. Replaced (not resized) when capacity changes:
    /// requests already queued or served keep the gate they joined, new ones use the new
    /// one, so a change never strands a waiter or double-counts a permit.
    gate: Option<Arc<Semaphore>>,
}

fn gate_for(capacity: u32) -> Option<Arc<Semaphore>> {
    // `Semaphore::new` is FIFO: waiters are served in the order they called `acquire`.
    (capacity > 0).then(|| Arc::new(Semaphore::new(capacity as usize)))
}

impl SimState {
    pub(crate) fn new(name: String, name_header: HeaderValue, settings: Settings) -> Self {
        SimState {
            name,
            name_header,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            runtime: Mutex::new(Runtime {
                settings,
                gate: gate_for(settings.capacity),
            }),
            cache: Mutex::new(LruCache::unbounded()),
            checksums: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn settings(&self) -> Settings {
        self.runtime.lock().settings
    }

    /// The capacity gate a request arriving now must pass; `None` = no limit.
    pub(crate) fn gate(&self) -> Option<Arc<Semaphore>> {
        self.runtime.lock().gate.clone()
    }

    /// Applies a validated change and returns the settings now in force.
    pub(crate) fn apply(&self, change: &SettingsChange) -> Settings {
        let mut runtime = self.runtime.lock();
        let next = runtime.settings.with(change);
        if next.capacity != runtime.settings.capacity {
            runtime.gate = gate_for(next.capacity);
        }
        runtime.settings = next;
        drop(runtime);
        if change.cache_size.is_some() {
            let mut cache = self.cache.lock();
            trim(&mut cache, next.cache_size);
            if next.cache_size == 0 {
                // Give the memory back, not only the entries.
                *cache = LruCache::unbounded();
            }
        }
        next
    }

    /// Looks `key` up in a cache of `capacity` keys, counting a hit or a miss; a miss
    /// inserts the key, evicting the least recently used ones beyond `capacity`. Returns
    /// `true` on a miss. `capacity` 0 means no cache: nothing is looked up or counted, and
    /// nothing is a miss.
    pub(crate) fn cache_miss(&self, key: &[u8], capacity: u32) -> bool {
        if capacity == 0 {
            return false;
        }
        let mut cache = self.cache.lock();
        let miss = cache.get(key).is_none();
        if miss {
            cache.put(key.into(), ());
            trim(&mut cache, capacity);
            self.cache_misses.fetch_add(1, Ordering::Relaxed);
        } else {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        miss
    }

    pub(crate) fn snapshot(&self) -> BackendStatsSnapshot {
        BackendStatsSnapshot {
            name: self.name.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            settings: self.settings(),
        }
    }

    pub(crate) fn cached_checksum(&self, len: u64) -> Option<Arc<str>> {
        self.checksums.lock().get(&len).cloned()
    }

    pub(crate) fn remember_checksum(&self, len: u64, checksum: Arc<str>) {
        let mut checksums = self.checksums.lock();
        if checksums.len() >= CHECKSUM_CACHE_ENTRIES {
            checksums.clear();
        }
        checksums.insert(len, checksum);
    }
}

/// Evicts least recently used keys until at most `capacity` remain.
fn trim(cache: &mut LruCache<Box<[u8]>, ()>, capacity: u32) {
    let capacity = capacity as usize;
    while cache.len() > capacity {
        cache.pop_lru();
    }
}

/// Counts one unit in a gauge for as long as it lives, so a cancelled request (client gone,
/// server shut down) can never leave the gauge high.
pub(crate) struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    pub(crate) fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(capacity: u32) -> SimState {
        SimState::new(
            "t".into(),
            HeaderValue::from_static("t"),
            Settings {
                capacity,
                ..Settings::default()
            },
        )
    }

    #[test]
    fn capacity_change_replaces_the_gate() {
        let state = state(0);
        assert!(state.gate().is_none());
        state.apply(&SettingsChange {
            capacity: Some(2),
            ..SettingsChange::default()
        });
        let gate = state.gate().expect("limited");
        assert_eq!(gate.available_permits(), 2);
        // An unrelated change keeps the same gate (and so the queue in it).
        state.apply(&SettingsChange {
            fail_rate: Some(0.5),
            ..SettingsChange::default()
        });
        assert!(Arc::ptr_eq(&gate, &state.gate().expect("still limited")));
        state.apply(&SettingsChange {
            capacity: Some(0),
            ..SettingsChange::default()
        });
        assert!(state.gate().is_none());
    }

    #[test]
    fn cache_is_lru_and_bounded_by_the_size_given() {
        let state = state(0);
        assert!(!state.cache_miss(b"a", 0), "size 0 is no cache");
        assert_eq!(state.snapshot().cache_misses, 0, "size 0 counts nothing");
        assert!(state.cache_miss(b"a", 2));
        assert!(state.cache_miss(b"b", 2));
        assert!(!state.cache_miss(b"a", 2), "a is cached; now most recent");
        assert!(
            state.cache_miss(b"c", 2),
            "evicts b, the least recently used"
        );
        assert!(!state.cache_miss(b"a", 2));
        assert!(state.cache_miss(b"b", 2), "b was evicted");
        let snapshot = state.snapshot();
        assert_eq!((snapshot.cache_hits, snapshot.cache_misses), (2, 4));
    }

    #[test]
    fn shrinking_the_cache_evicts_and_zero_empties_it() {
        let state = state(0);
        for key in [b"a", b"b", b"c"] {
            state.cache_miss(key, 3);
        }
        state.apply(&SettingsChange {
            cache_size: Some(1),
            ..SettingsChange::default()
        });
        assert_eq!(state.cache.lock().len(), 1);
        assert!(!state.cache_miss(b"c", 1), "the most recent key stays");
        state.apply(&SettingsChange {
            cache_size: Some(0),
            ..SettingsChange::default()
        });
        assert_eq!(state.cache.lock().len(), 0);
    }

    #[test]
    fn gauge_counts_while_alive() {
        let state = state(0);
        {
            let _a = Gauge::enter(&state.in_flight);
            let _b = Gauge::enter(&state.in_flight);
            assert_eq!(state.snapshot().in_flight, 2);
        }
        assert_eq!(state.snapshot().in_flight, 0);
    }

    #[test]
    fn checksum_cache_stays_bounded() {
        let state = state(0);
        for len in 0..(CHECKSUM_CACHE_ENTRIES as u64 * 2) {
            state.remember_checksum(len, Arc::from("x"));
        }
        assert!(state.checksums.lock().len() <= CHECKSUM_CACHE_ENTRIES);
        assert!(
            state
                .cached_checksum(CHECKSUM_CACHE_ENTRIES as u64 * 2 - 1)
                .is_some()
        );
    }
}
