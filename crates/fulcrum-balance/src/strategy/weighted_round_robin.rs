//! `weighted_round_robin`: Envoy's earliest-deadline-first weighted round robin.
//!
//! Envoy's round robin load balancer schedules weighted hosts with an EDF scheduler
//! (`source/common/upstream/edf_scheduler.h`): every backend `i` of weight `w_i` is a
//! periodic task with period `1 / w_i`, kept in a binary min-heap by its next deadline.
//! A pick pops the earliest deadline `d`, advances the scheduler's virtual time to `d` and
//! pushes the backend back with deadline `d + 1 / w_i`. The k-th turn of backend `i` is
//! therefore due at
//!
//! ```text
//! deadline_i(k) = (k − ½) / w_i          k = 1, 2, …
//! ```
//!
//! and the picks come in increasing deadline order, ties broken by backend index so the
//! sequence is deterministic. Over every unit of virtual time (one *cycle* of `Σ w`
//! picks) each backend's deadlines in `(c, c + 1]` number exactly `w_i` for integer
//! weights: shares are exact per cycle, as with nginx's smooth weighted round robin,
//! and picks of one backend are spread through the cycle. Envoy starts every backend a
//! whole period out (`k / w_i`); starting half a period out, as here, interleaves better
//! (weights `{5, 1, 1}` give `a a a b c a a` instead of `a a a a a b c`) and orders
//! turns as the Sainte-Laguë divisor method orders seats. No deadline falls on a cycle
//! boundary (`(k − ½)/w = c` has no integer solution), so float rounding cannot move a
//! turn from one cycle to the next.
//!
//! Each pick is O(log n): one sift of the heap top, under a `parking_lot` mutex held for
//! that sift only (no allocation, no I/O). nginx's smooth algorithm, which this replaces,
//! costs a pass over every backend per pick (52 µs at 10,000 backends).
//!
//! **Weights** are effective weights ([`PoolView::effective_weight`]: configured ×
//! dynamic × slow start). [`Strategy::tick`] rebuilds the heap when a weight moved by
//! more than 1 % or a backend's eligibility changed, preserving each backend's progress
//! through its current period (stride scheduling's rule for ticket changes: Waldspurger
//! and Weihl, "Stride Scheduling", MIT/LCS/TM-528, 1995): a backend that had a fraction
//! `r` of its period `1/w` left has `r / w'` left under its new weight `w'`, so a
//! slow-start ramp neither restarts the rotation nor bursts onto the heaviest backend.
//! Backends ineligible at the tick are left out of the heap until they return (at half a
//! period, as at the start), so a long-down backend costs nothing per pick.
//!
//! **Retries and hedges** take no turn: [`Strategy::pick_another`] draws a random other
//! eligible backend ([`super::random_eligible`]), so extra attempts neither shift the
//! rotation of first attempts nor pile on one backend.
//!
//! **Ineligible picks** between ticks (a backend ejected since the last tick) consume
//! that backend's turn and the pick takes the next deadline,
//! up to [`MAX_TURNS`] turns; after that the pick falls back to the first eligible backend
//! after the last one popped ([`PoolView::next_eligible_from`]). Consuming, rather than
//! deferring, the turn keeps a returning backend from receiving a burst of overdue turns.
//!
//! Deadlines are `f64`: exact turn order is kept while `k × w` stays below 2⁵², i.e. for
//! billions of cycles at any realistic weight, and every rebuild rebases virtual time to 0.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use parking_lot::Mutex;

use super::{BackendId, Figure, PoolView, RequestInfo, Strategy};
use crate::backend::Backend;

/// Turns popped per pick before falling back to a scan: a retry excludes a few backends
/// at most, and longer runs of ineligible turns only occur between a backend going down
/// and the next tick taking it out of the heap.
const MAX_TURNS: usize = 8;

/// A weight change smaller than this share of the old weight does not rebuild the heap:
/// effective weights are recomputed every tick and float noise must not restart cycles.
const REBUILD_THRESHOLD: f64 = 0.01;

/// Weighted round robin by earliest deadline first over effective weights (Envoy's
/// scheduler). O(log n) per pick under a short mutex.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    scheduler: EdfScheduler,
}

impl WeightedRoundRobin {
    /// A rotation over `backends` with their current effective weights (the configured
    /// ones until the pool publishes effective weights).
    pub fn new(backends: &[Backend]) -> Self {
        let view = PoolView::new(backends, &[], false);
        let weights: Vec<f64> = (0..view.len()).map(|i| view.effective_weight(i)).collect();
        Self {
            scheduler: EdfScheduler::new(&weights),
        }
    }
}

impl Strategy for WeightedRoundRobin {
    fn name(&self) -> &'static str {
        "weighted_round_robin"
    }

    fn pick(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        self.scheduler.pick(pool)
    }

    fn pick_another(&self, _req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        super::random_eligible(pool)
    }

    fn tick(&self, pool: &PoolView<'_>, _now_ns: u64) {
        self.scheduler
            .reschedule(&scheduled_weights(pool, |i| pool.effective_weight(i)));
    }

    fn figures(&self, _pool: &PoolView<'_>, _now_ns: u64) -> Vec<Figure> {
        self.scheduler.figures()
    }
}

/// The weights to schedule for `pool` at a tick: `weight(i)` for the backends eligible
/// now and 0 (left out) for the others, or `weight(i)` for every backend if none is
/// eligible (so that a pool coming back from a total outage is scheduled at once).
pub(super) fn scheduled_weights(pool: &PoolView<'_>, weight: impl Fn(usize) -> f64) -> Vec<f64> {
    let any_eligible = (0..pool.len()).any(|i| pool.is_eligible(i));
    (0..pool.len())
        .map(|i| {
            if !any_eligible || pool.is_eligible(i) {
                weight(i)
            } else {
                0.0
            }
        })
        .collect()
}

/// An earliest-deadline-first scheduler over a fixed backend list, shared by
/// `weighted_round_robin` and `adaptive_weighted`.
#[derive(Debug)]
pub(super) struct EdfScheduler {
    /// The heap and virtual time: locked by every pick for one O(log n) sift.
    state: Mutex<EdfState>,
    /// The weights the heap was last built from (0 = not scheduled), compared at each
    /// tick; only [`EdfScheduler::reschedule`] locks it, so picks never wait for it.
    built_from: Mutex<Box<[f64]>>,
}

#[derive(Debug)]
struct EdfState {
    heap: BinaryHeap<Turn>,
    /// Deadline of the last turn popped.
    now: f64,
}

/// A backend's next turn. Its deadline is `origin + turns / weight`, recomputed from the
/// turn count rather than accumulated, so rounding errors do not build up.
#[derive(Clone, Copy, Debug)]
struct Turn {
    deadline: f64,
    origin: f64,
    weight: f64,
    turns: u64,
    backend: usize,
}

impl Turn {
    /// The first turn of `backend` of `weight`, due `remaining / weight` after virtual
    /// time 0 (`remaining` = the share of a period left, in `(0, 1]`).
    fn first(backend: usize, weight: f64, remaining: f64) -> Self {
        let origin = (remaining - 1.0) / weight;
        Self {
            deadline: origin + 1.0 / weight,
            origin,
            weight,
            turns: 1,
            backend,
        }
    }

    /// Moves to the next turn, one period later.
    fn advance(&mut self) {
        self.turns += 1;
        self.deadline = self.origin + self.turns as f64 / self.weight;
    }
}

impl Ord for Turn {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest deadline, then the
    /// lowest backend index.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then_with(|| other.backend.cmp(&self.backend))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

/// A weight the scheduler can divide by: positive and finite, or 0 (not scheduled).
fn sanitize(weight: f64) -> f64 {
    if weight.is_finite() && weight > 0.0 {
        weight.max(f64::MIN_POSITIVE)
    } else {
        0.0
    }
}

impl EdfScheduler {
    /// A scheduler over `weights.len()` backends, backend `i` with `weights[i]` (0 or
    /// less: not scheduled), every one half a period from its first turn.
    pub(super) fn new(weights: &[f64]) -> Self {
        let weights: Box<[f64]> = weights.iter().copied().map(sanitize).collect();
        let heap = weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0.0)
            .map(|(i, &w)| Turn::first(i, w, 0.5))
            .collect();
        Self {
            state: Mutex::new(EdfState { heap, now: 0.0 }),
            built_from: Mutex::new(weights),
        }
    }

    /// The backend whose turn is due, skipping (and consuming) the turns of ineligible
    /// backends, up to [`MAX_TURNS`]; then the first eligible backend after the last one
    /// popped. `None` only when no backend of `pool` is eligible.
    pub(super) fn pick(&self, pool: &PoolView<'_>) -> Option<BackendId> {
        let mut last = None;
        {
            let mut state = self.state.lock();
            for _ in 0..MAX_TURNS {
                let Some(mut top) = state.heap.peek_mut() else {
                    break;
                };
                let (backend, due) = (top.backend, top.deadline);
                top.advance();
                // Dropping the `PeekMut` sifts the advanced turn down: O(log n).
                drop(top);
                state.now = due;
                debug_assert!(backend < pool.len(), "strategy built for another list");
                if pool.is_eligible(backend) {
                    return Some(BackendId(backend));
                }
                last = Some(backend);
            }
        }
        pool.next_eligible_from(last.map_or(0, |i| i + 1))
    }

    /// Rebuilds the heap for new `weights` (0: leave the backend out) if any weight moved
    /// by more than [`REBUILD_THRESHOLD`] or a backend joined or left the schedule.
    /// Returns whether it rebuilt.
    ///
    /// Each backend keeps the share of its period it had left (stride scheduling's rule);
    /// a backend joining starts half a period out. Virtual time restarts at 0. The pick
    /// lock is held for one O(n) pass and an O(n) heapify (about 0.1 ms at 10,000
    /// backends), once per tick at most and only when something changed.
    pub(super) fn reschedule(&self, weights: &[f64]) -> bool {
        let mut built_from = self.built_from.lock();
        debug_assert_eq!(built_from.len(), weights.len(), "another backend list");
        let changed = built_from
            .iter()
            .zip(weights)
            .any(|(&old, &new)| weight_changed(old, sanitize(new)));
        if !changed {
            return false;
        }
        for (old, &new) in built_from.iter_mut().zip(weights) {
            *old = sanitize(new);
        }
        let mut state = self.state.lock();
        let now = state.now;
        let mut turns = std::mem::take(&mut state.heap).into_vec();
        let mut scheduled = vec![false; built_from.len()];
        turns.retain_mut(|turn| {
            let weight = built_from[turn.backend];
            if weight == 0.0 {
                return false;
            }
            scheduled[turn.backend] = true;
            let remaining = ((turn.deadline - now) * turn.weight).clamp(0.0, 1.0);
            *turn = Turn::first(turn.backend, weight, remaining);
            true
        });
        turns.extend(
            built_from
                .iter()
                .enumerate()
                .filter(|&(i, &w)| w > 0.0 && !scheduled[i])
                .map(|(i, &w)| Turn::first(i, w, 0.5)),
        );
        state.heap = BinaryHeap::from(turns);
        state.now = 0.0;
        true
    }

    /// The weight each backend is scheduled with, as `scheduled_weight` figures.
    pub(super) fn figures(&self) -> Vec<Figure> {
        self.built_from
            .lock()
            .iter()
            .enumerate()
            .map(|(i, &w)| Figure::backend("scheduled_weight", i, w))
            .collect()
    }
}

/// Whether a weight moved from `old` to `new` (0: not scheduled) enough to rebuild a
/// schedule or table built from it.
pub(super) fn weight_changed(old: f64, new: f64) -> bool {
    if old == 0.0 || new == 0.0 {
        return (old == 0.0) != (new == 0.0);
    }
    (new - old).abs() > REBUILD_THRESHOLD * old
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use crate::strategy::testing::backends;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

    fn picks(wrr: &WeightedRoundRobin, view: &PoolView<'_>, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| wrr.pick(&RequestInfo::new(0), view).expect("eligible").0)
            .collect()
    }

    fn counts(picked: &[usize], n: usize) -> Vec<u32> {
        let mut counts = vec![0u32; n];
        for &i in picked {
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn sequence_for_5_1_1_and_3_2_1() {
        let pool = backends(&[5, 1, 1]);
        let wrr = WeightedRoundRobin::new(&pool);
        let view = PoolView::new(&pool, &[], false);
        let [a, b, c] = [0, 1, 2];
        for _ in 0..3 {
            assert_eq!(picks(&wrr, &view, 7), vec![a, a, a, b, c, a, a]);
        }
        let pool = backends(&[3, 2, 1]);
        let wrr = WeightedRoundRobin::new(&pool);
        let view = PoolView::new(&pool, &[], false);
        for _ in 0..10 {
            assert_eq!(picks(&wrr, &view, 6), vec![a, b, a, c, b, a]);
        }
    }

    #[test]
    fn equal_weights_rotate() {
        let b = backends(&[2, 2, 2]);
        let wrr = WeightedRoundRobin::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(picks(&wrr, &view, 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn another_attempt_takes_no_turn() {
        let b = backends(&[2, 1, 1]);
        let all = PoolView::new(&b, &[], false);
        let first = crate::strategy::testing::first_picks_with_another_attempt(
            &WeightedRoundRobin::new(&b),
            &b,
            8,
        );
        // The same sequence as without the extra attempts.
        let fresh = WeightedRoundRobin::new(&b);
        assert_eq!(first, picks(&fresh, &all, 8));
        assert_eq!(counts(&first, 3), vec![4, 2, 2]);
    }

    #[test]
    fn skips_ineligible_and_excluded() {
        let b = backends(&[3, 1, 2]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let wrr = WeightedRoundRobin::new(&b);
        let excluded = [BackendId(2)];
        let view = PoolView::new(&b, &excluded, false);
        assert_eq!(picks(&wrr, &view, 4), vec![1; 4]);
        b[1].live.set_flag(BackendFlags::DISABLED);
        assert_eq!(wrr.pick(&RequestInfo::new(0), &view), None);
        let panic_view = PoolView::new(&b, &[], true);
        let picked = picks(&wrr, &panic_view, 5);
        assert!(picked.iter().all(|&i| i != 1), "{picked:?}");
    }

    #[test]
    fn long_ineligible_runs_fall_back_to_an_eligible_backend() {
        // Backend 0 holds 40 consecutive turns per cycle: more than MAX_TURNS.
        let b = backends(&[40, 1]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let wrr = WeightedRoundRobin::new(&b);
        let view = PoolView::new(&b, &[], false);
        assert_eq!(picks(&wrr, &view, 20), vec![1; 20]);
        // A tick takes backend 0 out of the heap: no turns are wasted any more.
        wrr.tick(&view, 0);
        assert_eq!(wrr.scheduler.state.lock().heap.len(), 1);
        assert_eq!(picks(&wrr, &view, 3), vec![1; 3]);
    }

    #[test]
    fn empty_pool_picks_nothing() {
        let wrr = WeightedRoundRobin::new(&[]);
        let view = PoolView::new(&[], &[], false);
        assert_eq!(wrr.pick(&RequestInfo::new(0), &view), None);
        wrr.tick(&view, 0);
        assert_eq!(wrr.pick(&RequestInfo::new(0), &view), None);
    }

    #[test]
    fn effective_weights_are_scheduled_and_small_changes_ignored() {
        let b = backends(&[1, 1]);
        let wrr = WeightedRoundRobin::new(&b);
        let view = PoolView::new(&b, &[], false);
        // A slow-start or dynamic-weight factor published by the pool: 1 : 3.
        b[1].live.set_effective_weight(3.0);
        wrr.tick(&view, 0);
        assert_eq!(counts(&picks(&wrr, &view, 400), 2), vec![100, 300]);
        // Noise below 1 % does not rebuild (and so cannot restart a cycle).
        b[1].live.set_effective_weight(3.01);
        assert!(!wrr.scheduler.reschedule(&[1.0, 3.01]));
        assert!(wrr.scheduler.reschedule(&[1.0, 3.5]));
    }

    #[test]
    fn ramping_weight_keeps_progress() {
        // A backend in slow start ramps 0.1 → 1 over ten ticks, with fewer picks per
        // tick than a cycle: it must still get its share of each tick, not be pushed to
        // the back of a restarted cycle every time.
        let b = backends(&[1, 1]);
        let wrr = WeightedRoundRobin::new(&b);
        let view = PoolView::new(&b, &[], false);
        let mut ramped = 0.0;
        let mut picked_new = 0;
        for step in 1..=10 {
            let factor = f64::from(step) / 10.0;
            b[1].live.set_effective_weight(factor);
            wrr.tick(&view, 0);
            for _ in 0..5 {
                if wrr.pick(&RequestInfo::new(0), &view) == Some(BackendId(1)) {
                    picked_new += 1;
                }
            }
            ramped += 5.0 * factor / (1.0 + factor);
        }
        assert!(
            (f64::from(picked_new) - ramped).abs() <= 3.0,
            "picked {picked_new}, expected about {ramped:.1}"
        );
    }

    #[test]
    fn returning_backend_rejoins_without_a_burst() {
        let b = backends(&[1, 1, 1]);
        let wrr = WeightedRoundRobin::new(&b);
        let view = PoolView::new(&b, &[], false);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        wrr.tick(&view, 0);
        let _ = picks(&wrr, &view, 100);
        b[0].live.clear_flag(BackendFlags::UNHEALTHY);
        wrr.tick(&view, 0);
        for _ in 0..5 {
            assert_eq!(counts(&picks(&wrr, &view, 3), 3), vec![1, 1, 1]);
        }
    }

    proptest! {
        /// Over every cycle of `Σ w` picks each backend is picked exactly `w` times.
        #[test]
        fn each_cycle_gives_exactly_weight_picks(
            weights in prop::collection::vec(1u32..50, 1..20),
            cycles in 1usize..4,
        ) {
            let b = backends(&weights);
            let wrr = WeightedRoundRobin::new(&b);
            let view = PoolView::new(&b, &[], false);
            let cycle: u32 = weights.iter().sum();
            for _ in 0..cycles {
                prop_assert_eq!(&counts(&picks(&wrr, &view, cycle as usize), weights.len()), &weights);
            }
        }

        /// With some backends down since the last tick, the others share exactly by
        /// weight per cycle of their own weights.
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
            let wrr = WeightedRoundRobin::new(&b);
            let view = PoolView::new(&b, &[], false);
            wrr.tick(&view, 0);
            let expected: Vec<u32> =
                pool.iter().map(|&(w, down)| if down { 0 } else { w }).collect();
            let cycle: u32 = expected.iter().sum();
            if cycle == 0 {
                prop_assert_eq!(wrr.pick(&RequestInfo::new(0), &view), None);
                return Ok(());
            }
            for _ in 0..cycles {
                let picked = picks(&wrr, &view, cycle as usize);
                prop_assert!(picked.iter().all(|&i| view.is_eligible(i)));
                prop_assert_eq!(&counts(&picked, weights.len()), &expected);
            }
        }

        /// Any sequence of reweightings keeps every pick eligible and long-run shares
        /// within one pick per backend per rebuild of the weights.
        #[test]
        fn shares_follow_weights_across_rebuilds(
            steps in prop::collection::vec(prop::collection::vec(0.1f64..10.0, 4), 1..6),
        ) {
            let b = backends(&[1, 1, 1, 1]);
            let wrr = WeightedRoundRobin::new(&b);
            let view = PoolView::new(&b, &[], false);
            for weights in &steps {
                wrr.scheduler.reschedule(weights);
                let total: f64 = weights.iter().sum();
                let n = 1_000;
                let got = counts(&picks(&wrr, &view, n), 4);
                for (i, &w) in weights.iter().enumerate() {
                    let expected = w / total * n as f64;
                    prop_assert!(
                        (f64::from(got[i]) - expected).abs() <= 2.0,
                        "backend {i}: {} picks, expected {expected:.1} ({weights:?})", got[i]
                    );
                }
            }
        }
    }
}
