//! Work assignments: which node owns which item (a tenant, a key range, a scheduled chore),
//! by bounded-load consistent hashing over rendezvous order (seed 004's processor
//! assignment). Pure, no I/O: the leader computes an [`Assignment`] from the alive members
//! and the previous assignment, and publishes it; any node computing it from the same
//! inputs gets the same answer.
//!
//! **Rendezvous (highest random weight) order** (Thaler & Ravishankar, "Using Name-Based
//! Mappings to Increase Hit Rates", IEEE/ACM ToN 6(1), 1998): every node scores every item
//! with a fixed hash of `(node, item)`, and an item prefers nodes by descending score. The
//! hash is FNV-1a 64 followed by MurmurHash3's `fmix64` finalizer, with no per-process key
//! (not `RandomState`), so every node and every restart computes the same order.
//!
//! **Bounded load** (Mirrokni, Thorup & Zadimoghaddam, "Consistent Hashing with Bounded
//! Loads", SODA 2018): no node takes more than `capacity = ⌈c·m/n⌉` of the `m` items over
//! `n` nodes; an item whose preferred node is full goes to its next preference. `c ≥ 1`
//! trades balance (`c` → 1: every node within one item of the mean) against movement
//! (larger `c`: fewer items pushed off their first choice); 1.25 is the usual default.
//!
//! **Minimal movement.** Items whose previous node is still present keep it, up to that
//! node's capacity (a node over capacity keeps the items that score highest on it); only
//! the rest are placed in preference order. So a node that leaves moves exactly its own
//! items, a node that joins takes only what the new, lower capacity forces off the others,
//! and re-running on its own output moves nothing. The price: a newcomer is not filled up
//! to the mean. A deliberate rebalance (`POST /api/cluster/rebalance`) passes an empty
//! `previous`, which gives the pure bounded-load rendezvous placement.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One item changing owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The item.
    pub item: String,
    /// Its previous node; `None` for an item that had none (new, or previously unassigned).
    pub from: Option<String>,
    /// Its new node.
    pub to: String,
}

/// The result of [`assign`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Assignment {
    /// Item → node, for every item (empty when there are no nodes).
    pub nodes: BTreeMap<String, String>,
    /// Items whose node differs from `previous`, in item order.
    pub moved: Vec<Move>,
    /// The most items any node holds: `⌈c·m/n⌉` (0 without items or nodes).
    pub capacity: usize,
}

/// Assigns `items` to `nodes` by bounded-load rendezvous hashing, keeping every item on
/// its `previous` node where that node is still present and under capacity (see the module
/// docs for the algorithm and its sources).
///
/// `c` is the bounded-load factor; values below 1 (and NaN) are treated as 1, an infinite
/// `c` means unbounded (pure rendezvous). Inputs are sorted and deduplicated first, so the
/// result depends only on the sets, never on their order. Entries of `previous` for items
/// not in `items` are ignored. Cost: O(m·n) hashes.
pub fn assign(
    items: &[String],
    nodes: &[String],
    c: f64,
    previous: &BTreeMap<String, String>,
) -> Assignment {
    let items: BTreeSet<&str> = items.iter().map(String::as_str).collect();
    let nodes: BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    if items.is_empty() || nodes.is_empty() {
        return Assignment::default();
    }
    let capacity = capacity(items.len(), nodes.len(), c);
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|&node| (node, 0)).collect();
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();

    // Keep previous owners, best-scoring items first where a node is over capacity.
    let mut kept: BTreeMap<&str, Vec<(u64, &str)>> = BTreeMap::new();
    for &item in &items {
        if let Some(node) = previous.get(item).map(String::as_str)
            && nodes.contains(node)
        {
            kept.entry(node)
                .or_default()
                .push((score(node, item), item));
        }
    }
    for (node, mut candidates) in kept {
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        candidates.truncate(capacity);
        load.insert(node, candidates.len());
        owner.extend(candidates.into_iter().map(|(_, item)| (item, node)));
    }

    // Place the rest on their best-scoring node with room.
    for &item in &items {
        if owner.contains_key(item) {
            continue;
        }
        let node = nodes
            .iter()
            .copied()
            .filter(|node| load[node] < capacity)
            .max_by(|a, b| score(a, item).cmp(&score(b, item)).then(b.cmp(a)))
            .expect("capacity × nodes ≥ items, so some node has room");
        *load.get_mut(node).expect("every node has a load entry") += 1;
        owner.insert(item, node);
    }

    let moved = owner
        .iter()
        .filter(|&(item, node)| previous.get(*item).map(String::as_str) != Some(*node))
        .map(|(&item, &node)| Move {
            item: item.to_string(),
            from: previous.get(item).cloned(),
            to: node.to_string(),
        })
        .collect();
    Assignment {
        nodes: owner
            .into_iter()
            .map(|(item, node)| (item.to_string(), node.to_string()))
            .collect(),
        moved,
        capacity,
    }
}

/// `⌈c·m/n⌉`, never below `⌈m/n⌉` (so everything fits despite float rounding) nor above `m`.
fn capacity(items: usize, nodes: usize, c: f64) -> usize {
    let c = if c >= 1.0 { c } else { 1.0 };
    let floor = items.div_ceil(nodes);
    let bounded = (c * items as f64 / nodes as f64).ceil();
    // `as` saturates: an infinite bound becomes usize::MAX, then `items`.
    (bounded as usize).clamp(floor, items)
}

/// The rendezvous score of `item` on `node`: FNV-1a 64 over `node`, a 0xff separator (never
/// in UTF-8, so `("ab", "c")` and `("a", "bc")` differ) and `item`, then `fmix64`, which
/// FNV needs for its high bits to spread similar names.
fn score(node: &str, item: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    let bytes = node
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(item.bytes());
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fmix64(hash)
}

/// MurmurHash3's 64-bit finalizer (Appleby): every input bit affects every output bit.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn loads(a: &Assignment) -> BTreeMap<&str, usize> {
        let mut loads = BTreeMap::new();
        for node in a.nodes.values() {
            *loads.entry(node.as_str()).or_default() += 1;
        }
        loads
    }

    /// The item's first rendezvous choice, ignoring capacity.
    fn top_choice<'a>(item: &str, nodes: &'a [String]) -> &'a str {
        nodes
            .iter()
            .max_by(|a, b| score(a, item).cmp(&score(b, item)).then(b.cmp(a)))
            .expect("at least one node")
    }

    #[test]
    fn empty_inputs_assign_nothing() {
        let none = BTreeMap::new();
        assert_eq!(
            assign(&[], &names("n", 3), 1.25, &none),
            Assignment::default()
        );
        assert_eq!(
            assign(&names("t", 3), &[], 1.25, &none),
            Assignment::default()
        );
    }

    #[test]
    fn capacity_is_the_bounded_load() {
        assert_eq!(capacity(100, 4, 1.25), 32);
        assert_eq!(capacity(8, 4, 1.0), 2);
        assert_eq!(capacity(10, 3, 1.0), 4, "never below ⌈m/n⌉");
        assert_eq!(capacity(10, 3, 0.5), 4, "c below 1 is 1");
        assert_eq!(capacity(10, 3, f64::NAN), 4);
        assert_eq!(capacity(10, 3, f64::INFINITY), 10, "never above m");
    }

    #[test]
    fn the_hash_is_fixed() {
        // Pinned so a change of hash (which would reshuffle every cluster's assignments
        // during a rolling upgrade) cannot go unnoticed.
        assert_eq!(score("node-1", "tenant-a"), 0x0df7_c378_c30c_5623);
        assert_eq!(score("node-2", "tenant-a"), 0xbae4_3279_edf3_01e9);
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    #[test]
    fn new_items_are_reported_as_moves_from_nowhere() {
        let a = assign(&names("t", 4), &names("n", 2), 1.0, &BTreeMap::new());
        assert_eq!(a.moved.len(), 4);
        assert!(a.moved.iter().all(|m| m.from.is_none()));
        assert_eq!(a.capacity, 2);
    }

    #[test]
    fn unbounded_is_pure_rendezvous() {
        let items = names("t", 200);
        let nodes = names("n", 7);
        let a = assign(&items, &nodes, f64::INFINITY, &BTreeMap::new());
        for (item, node) in &a.nodes {
            assert_eq!(node, top_choice(item, &nodes));
        }
    }

    #[test]
    fn a_node_over_capacity_keeps_its_best_scoring_items() {
        let items = names("t", 6);
        let nodes = names("n", 2);
        let all_on_n0: BTreeMap<String, String> = items
            .iter()
            .map(|i| (i.clone(), "n0".to_string()))
            .collect();
        let a = assign(&items, &nodes, 1.0, &all_on_n0);
        let mut by_score: Vec<&String> = items.iter().collect();
        by_score.sort_by_key(|i| std::cmp::Reverse(score("n0", i)));
        for item in &by_score[..3] {
            assert_eq!(a.nodes[*item], "n0");
        }
        for item in &by_score[3..] {
            assert_eq!(a.nodes[*item], "n1");
        }
        assert_eq!(a.moved.len(), 3);
    }

    proptest! {
        #[test]
        fn every_item_is_placed_once_within_capacity(
            m in 0usize..150, n in 1usize..12, c in 1.0f64..3.0,
        ) {
            let a = assign(&names("t", m), &names("n", n), c, &BTreeMap::new());
            prop_assert_eq!(a.nodes.len(), m);
            for (_, load) in loads(&a) {
                prop_assert!(load <= a.capacity);
            }
            if m > 0 {
                prop_assert_eq!(a.capacity, capacity(m, n, c));
            }
        }

        #[test]
        fn order_and_duplicates_do_not_matter(
            m in 1usize..80, n in 1usize..8, c in 1.0f64..2.0, seed in any::<u64>(),
        ) {
            let items = names("t", m);
            let nodes = names("n", n);
            let sorted = assign(&items, &nodes, c, &BTreeMap::new());
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut shuffled_items = items.clone();
            shuffled_items.extend(items.iter().take(3).cloned());
            rng.shuffle(&mut shuffled_items);
            let mut shuffled_nodes = nodes.clone();
            rng.shuffle(&mut shuffled_nodes);
            prop_assert_eq!(sorted, assign(&shuffled_items, &shuffled_nodes, c, &BTreeMap::new()));
        }

        #[test]
        fn reassigning_its_own_output_moves_nothing(
            m in 0usize..150, n in 1usize..12, c in 1.0f64..3.0,
        ) {
            let items = names("t", m);
            let nodes = names("n", n);
            let first = assign(&items, &nodes, c, &BTreeMap::new());
            let second = assign(&items, &nodes, c, &first.nodes);
            prop_assert!(second.moved.is_empty(), "{:?}", second.moved);
            prop_assert_eq!(second.nodes, first.nodes);
        }

        #[test]
        fn removing_a_node_moves_only_its_items(
            m in 1usize..150, n in 2usize..12, c in 1.0f64..3.0, gone in any::<prop::sample::Index>(),
        ) {
            let items = names("t", m);
            let nodes = names("n", n);
            let before = assign(&items, &nodes, c, &BTreeMap::new());
            let gone = nodes[gone.index(n)].clone();
            let rest: Vec<String> = nodes.iter().filter(|x| **x != gone).cloned().collect();
            let after = assign(&items, &rest, c, &before.nodes);
            // Capacity can only grow with fewer nodes, so nobody else is forced to move.
            let orphans: BTreeSet<&String> =
                before.nodes.iter().filter(|(_, v)| **v == gone).map(|(k, _)| k).collect();
            let moved: BTreeSet<&String> = after.moved.iter().map(|mv| &mv.item).collect();
            prop_assert_eq!(moved, orphans);
            for (_, load) in loads(&after) {
                prop_assert!(load <= after.capacity);
            }
        }

        #[test]
        fn adding_a_node_moves_only_what_capacity_forces(
            m in 1usize..150, n in 1usize..12, c in 1.0f64..3.0,
        ) {
            let items = names("t", m);
            let nodes = names("n", n);
            let before = assign(&items, &nodes, c, &BTreeMap::new());
            let mut more = nodes.clone();
            more.push("n-new".to_string());
            let after = assign(&items, &more, c, &before.nodes);
            let forced: usize = loads(&before)
                .values()
                .map(|load| load.saturating_sub(after.capacity))
                .sum();
            prop_assert_eq!(after.moved.len(), forced);
            for mv in &after.moved {
                let from = mv.from.as_deref().expect("every item had a node");
                prop_assert!(loads(&before)[from] > after.capacity, "{mv:?} was not forced");
            }
            for (_, load) in loads(&after) {
                prop_assert!(load <= after.capacity);
            }
        }
    }
}
