//! `maglev`: Maglev hashing with bounded load.
//!
//! **The lookup table** (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4, Pseudocode 1). Each backend `i` has a preference list,
//! a permutation of the `M` table entries (`M` prime):
//!
//! ```text
//! offset_i = h1(address_i) mod M
//! skip_i   = h2(address_i) mod (M − 1) + 1
//! permutation_i[j] = (offset_i + j × skip_i) mod M
//! ```
//!
//! and the backends take turns claiming the next unclaimed entry of their lists until the
//! table is full. In the weighted variant used here (as in Envoy's `MAGLEV`; the paper
//! weights backends by the relative frequency of their turns) a backend's turns per round are proportional to its
//! effective weight: each round adds `w_i / max w` to its credit and it claims one entry
//! per whole unit, so the heaviest backend claims exactly one entry per round and backend
//! `i` ends with about `M × w_i / Σ w` entries. The turn order is by address hash and
//! `h1`, `h2` are fixed-seed remixes of the address hash, so every node builds the same
//! table whatever the order of its backend list.
//!
//! A pick is `table[h(key) mod M]`: O(1). Removing a backend hands its entries to the
//! others and, because the remaining backends' claims interleave differently, moves a
//! small number of other entries too (a few percent of the entries at most with `M ≫ n`,
//! per the paper's evaluation; about 0.5 % in the 10-backend test here).
//!
//! `M` is `StrategyParams::maglev_table_size` (65,537 by default, the paper's choice),
//! raised when the pool is large to the next prime at or above the power of two at or
//! above `MIN_ENTRIES_PER_BACKEND × n`: the imbalance between backends falls with `M / n`,
//! and the paper keeps `M` above 100 times the number of backends. Rounding to a power of two
//! first keeps `M`, and so the table, unchanged between most pools that differ by one
//! backend.
//!
//! **Bounded load** (Mirrokni, Thorup & Zadimoghaddam, SODA 2018). If the key's backend
//! is ineligible or at its bound (the rule in the `bounded` module), the pick probes
//! further entries `h, h + s, h + 2s, …` (mod `M`, `s` a second hash of the key), up to
//! `MAX_PROBES` entries, and takes the first eligible admitting backend; then the least
//! loaded eligible one. Probing from a key-derived sequence keeps the detour of a key the
//! same on every node and spreads a hot backend's overflow over the others in proportion
//! to their table shares.
//!
//! The table is rebuilt on tick only when some backend's effective weight changed by more
//! than 1 % since it was built (slow start, dynamic weights), at most once a second.
//! Requests without a key are spread by round robin.

use super::bounded::{
    BoundedLoad, EligibleWeight, HashCounters, KeylessSpread, Routed, SwappableTable,
    address_hashes, effective_weights, key_hash, least_loaded, mix64,
};
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy, StrategyParams};
use crate::backend::Backend;
use crate::slow_start::SlowStart;

/// Table entries per backend the table size is raised to, at least.
const MIN_ENTRIES_PER_BACKEND: usize = 100;
/// Table entries probed after the key's own before falling back to the least loaded
/// eligible backend.
const MAX_PROBES: usize = 16;
/// Seed of `h1`, the permutation offset.
const OFFSET_SEED: u64 = 0x3c6e_f372_fe94_f82b;
/// Seed of `h2`, the permutation skip.
const SKIP_SEED: u64 = 0xa54f_f53a_5f1d_36f1;

/// Maglev hashing with bounded load. A pick loads the table without a lock (`arc-swap`)
/// for one lookup (a few more when probing) and writes one counter.
#[derive(Debug)]
pub struct Maglev {
    addr_hashes: Box<[u64]>,
    /// Backend indices in table-building turn order (by address hash).
    turn_order: Box<[usize]>,
    /// `M`, a prime.
    size: usize,
    table: SwappableTable<Table>,
    bound: BoundedLoad,
    eligible_weight: EligibleWeight,
    counters: HashCounters,
    keyless: KeylessSpread,
    slow_start: SlowStart,
}

/// One built lookup table.
#[derive(Debug)]
struct Table {
    /// `entries[e]` = index of the backend owning entry `e`; empty for an empty pool.
    entries: Box<[u32]>,
    /// The effective weights the table was built with.
    weights: Box<[f64]>,
}

impl Table {
    /// Eisenbud et al.'s population with weighted turns, over a table of `size` entries
    /// (prime).
    fn build(addr_hashes: &[u64], turn_order: &[usize], weights: Box<[f64]>, size: usize) -> Self {
        const EMPTY: u32 = u32::MAX;
        let n = addr_hashes.len();
        if n == 0 {
            return Self {
                entries: Box::new([]),
                weights,
            };
        }
        let m = size as u64;
        let skip: Vec<u64> = addr_hashes
            .iter()
            .map(|&h| mix64(h ^ SKIP_SEED) % (m - 1) + 1)
            .collect();
        // `next[i]` = permutation_i[j] for the next j backend i has not tried yet.
        let mut next: Vec<u64> = addr_hashes
            .iter()
            .map(|&h| mix64(h ^ OFFSET_SEED) % m)
            .collect();
        let heaviest = weights.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
        let mut credit = vec![0.0; n];
        let mut entries = vec![EMPTY; size];
        let mut filled = 0;
        while filled < size {
            for &i in turn_order {
                credit[i] += weights[i] / heaviest;
                while credit[i] >= 1.0 && filled < size {
                    credit[i] -= 1.0;
                    // Each permutation visits every entry, so an empty one is found.
                    loop {
                        let e = next[i] as usize;
                        next[i] = (next[i] + skip[i]) % m;
                        if entries[e] == EMPTY {
                            entries[e] = u32::try_from(i).expect("pools have < 4G backends");
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Self {
            entries: entries.into_boxed_slice(),
            weights,
        }
    }
}

/// The table size for `n` backends and a configured size of `configured` entries: the
/// smallest prime ≥ `max(configured, (MIN_ENTRIES_PER_BACKEND × n).next_power_of_two())`.
fn table_size(configured: usize, n: usize) -> usize {
    let floor = configured.max((MIN_ENTRIES_PER_BACKEND * n.max(1)).next_power_of_two());
    (floor..)
        .find(|&m| is_prime(m))
        .expect("a prime exists above any bound")
}

/// Trial division; table sizes are at most a few million, so O(√m) is nothing next to
/// the table build.
fn is_prime(m: usize) -> bool {
    m >= 2
        && (2..)
            .take_while(|d| d * d <= m)
            .all(|d| !m.is_multiple_of(d))
}

impl Maglev {
    /// A Maglev table over `backends` of at least `params.maglev_table_size` entries,
    /// bounded by `params.bounded_load`; `params.slow_start` feeds the `warmup_progress`
    /// figure.
    pub fn new(backends: &[Backend], params: &StrategyParams) -> Self {
        let addr_hashes = address_hashes(backends);
        let mut turn_order: Vec<usize> = (0..backends.len()).collect();
        turn_order.sort_unstable_by_key(|&i| (addr_hashes[i], i));
        let size = table_size(params.maglev_table_size, backends.len());
        let table = Table::build(
            &addr_hashes,
            &turn_order,
            effective_weights(&PoolView::new(backends, &[], false)),
            size,
        );
        Self {
            addr_hashes,
            turn_order: turn_order.into_boxed_slice(),
            size,
            table: SwappableTable::new(table),
            bound: BoundedLoad::new(params.bounded_load),
            eligible_weight: EligibleWeight::new(backends),
            counters: HashCounters::default(),
            keyless: KeylessSpread::default(),
            slow_start: params.slow_start,
        }
    }

    /// The lookup, then the probes, for `key` in `table`.
    fn route(&self, table: &Table, key: u64, pool: &PoolView<'_>) -> Option<Routed> {
        let m = table.entries.len();
        if m == 0 {
            return None;
        }
        let mut e = (key % m as u64) as usize;
        let first = table.entries[e] as usize;
        let step = (mix64(key) % (m as u64 - 1)) as usize + 1;
        let admission = self.bound.admission(pool, self.eligible_weight.get(pool));
        let mut redirected = false;
        for _ in 0..=MAX_PROBES {
            let i = table.entries[e] as usize;
            if pool.is_eligible(i) {
                if admission.admits(pool, i) {
                    return Some(Routed {
                        backend: BackendId(i),
                        first_choice: i == first,
                        redirected,
                    });
                }
                redirected = true;
            }
            e = (e + step) % m;
        }
        let backend = least_loaded(pool)?;
        Some(Routed {
            backend,
            first_choice: backend.0 == first,
            redirected,
        })
    }
}

impl Strategy for Maglev {
    fn name(&self) -> &'static str {
        "maglev"
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
        let routed = self.route(&self.table.read(), key_hash(raw), pool)?;
        Some(self.counters.record(routed))
    }

    /// Refreshes `W` for the bound; rebuilds the table if effective weights changed
    /// materially (see the module documentation).
    fn tick(&self, pool: &PoolView<'_>, now_ns: u64) {
        self.eligible_weight.refresh(pool);
        self.table.rebuild_if_weights_changed(
            pool,
            now_ns,
            |table| &table.weights,
            |weights| Table::build(&self.addr_hashes, &self.turn_order, weights, self.size),
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
    use proptest::prelude::{prop, prop_assert, prop_assert_eq, proptest};

    #[test]
    fn table_size_is_a_prime_with_room_per_backend() {
        assert_eq!(table_size(65_537, 10), 65_537);
        assert_eq!(table_size(7, 1), 131, "next prime ≥ 128");
        assert_eq!(table_size(65_537, 1_000), 131_101, "next prime ≥ 2^17");
        assert_eq!(table_size(65_537, 1_000), table_size(65_537, 1_001));
        assert!(is_prime(65_537) && !is_prime(65_535) && !is_prime(1));
    }

    #[test]
    fn paper_example_fills_the_table() {
        // Eisenbud et al.'s Table 1 setting: three backends, M = 7; every entry is taken
        // and each backend owns two or three.
        let b = backends(&[1, 1, 1]);
        let hashes = address_hashes(&b);
        let table = Table::build(&hashes, &[0, 1, 2], vec![1.0; 3].into(), 7);
        let mut counts = [0; 3];
        for &owner in &table.entries {
            counts[owner as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 2 || c == 3), "{counts:?}");
    }

    #[test]
    fn ineligible_backend_keys_probe_elsewhere() {
        let b = backends(&[1; 6]);
        let s = Maglev::new(&b, &unbounded());
        let before = owners(&s, &b, 3_000);
        b[5].live.set_flag(BackendFlags::UNHEALTHY);
        let after = owners(&s, &b, 3_000);
        let down = b[5].address.to_string();
        for (x, y) in before.iter().zip(&after) {
            assert!(x == y || *x == down, "{x} → {y}");
            assert_ne!(*y, down);
        }
    }

    proptest! {
        /// Every table is full, each backend owns entries in proportion to its weight
        /// (within the rounding of weighted turns), and the build is a pure function of
        /// addresses and weights.
        #[test]
        fn entries_follow_weights(weights in prop::collection::vec(1u32..5, 1..12)) {
            let b = backends(&weights);
            let hashes = address_hashes(&b);
            let order: Vec<usize> = (0..b.len()).collect();
            let w: Box<[f64]> = weights.iter().map(|&w| f64::from(w)).collect();
            let table = Table::build(&hashes, &order, w.clone(), 4_099);
            let again = Table::build(&hashes, &order, w, 4_099);
            prop_assert_eq!(&table.entries, &again.entries);
            let total: u32 = weights.iter().sum();
            for (i, &wi) in weights.iter().enumerate() {
                let owned = table.entries.iter().filter(|&&o| o as usize == i).count() as f64;
                let expected = 4_099.0 * f64::from(wi) / f64::from(total);
                prop_assert!((owned - expected).abs() <= 0.02 * 4_099.0, "{i}: {owned} vs {expected}");
            }
        }
    }
}
