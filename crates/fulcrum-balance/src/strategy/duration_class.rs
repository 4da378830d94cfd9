//! `duration_class`: short requests and long requests on separate backends (seed 000, the
//! Dify plugin daemon's cluster load balancer).
//!
//! A request arrives with its predicted class ([`RequestInfo::class`]), which the proxy
//! takes from its endpoint's history before forwarding (seed 000: *long* when the average
//! of the endpoint's last 5 responses is ≥ 5000 ms, *short* below, *unknown* without
//! history). The proxy begins long attempts with
//! [`crate::LiveBackend::begin_classified`], so every backend counts the long requests it
//! holds ([`crate::LiveBackend::long_in_flight`]). Keeping long requests off the backends
//! that serve short ones stops a burst of slow calls from queueing quick ones behind them
//! (head-of-line blocking across request classes).
//!
//! **Static mode** (seed 000's rules). Backends are numbered in configured order; the
//! *short* backends are [`StrategyParams::short_backends`] (indices out of range are
//! ignored), or backend 1 (index 0) when none is given; the others are the *long*
//! backends. Written for seed 000's layout, short = node 1, long = node 2 … N:
//!
//! ```text
//! short                        → round robin over the short backends (node 1)
//! long, 2 backends             → node 2 if it is idle (nothing in flight)
//!                              → node 2 if it is busy with long requests (≥ 1 long in flight)
//!                              → node 1 if node 2 is busy with short work only and node 1 is idle
//!                              → node 2 otherwise
//! long, 3+ backends            → round robin over the long backends (nodes 2 … N)
//! unknown                      → round robin over every eligible backend
//! ```
//!
//! The two-backend rule applies when the pool has two backends, one short and one long
//! (with `short_backends: [1]` the roles swap). **Degradation** (seed 000: "automatically
//! degrade to round-robin in extreme cases"): when the backend a rule needs is not
//! eligible (unhealthy, ejected, drained, disabled, or already tried by this request) —
//! no eligible short backend for a short request, no eligible long backend for a long one,
//! node 2 down in the two-backend rule, or no long backend configured at all — the
//! request goes round robin over every eligible backend and counts in `degraded_picks`.
//! Node 1 is used by the two-backend rule only if it is eligible.
//!
//! **Adaptive mode** ([`DurationClassMode::Adaptive`]): no hand-picked backends; the
//! split follows the workload. It is size-interval task assignment with equal load
//! (SITA-E: Harchol-Balter, Crovella & Murta, "On Choosing a Task Assignment Policy for a
//! Distributed Server System", JPDC 59(2), 1999: each size class gets hosts in proportion
//! to its share of the work, so that every host carries the same load and short tasks
//! never wait behind long ones), adapted to what a proxy cannot know — how many requests
//! a backend serves at once — and to pools too small to split by work in whole backends.
//!
//! *Reservation.* Every tick measures the long requests' share of the work and reserves
//! that share of the pool for them:
//!
//! ```text
//! sample = Σ long_in_flight_i / Σ in_flight_i          (ticks with nothing in flight are skipped)
//! share ← share + α · (sample − share),  α = SHARE_SMOOTHING = 0.1   (first sample taken as is)
//! k     = clamp(round(share × n), 1, n − 1)             (0 while no long request has been seen)
//! ```
//!
//! By Little's law the requests in flight of a class are its arrival rate times its time
//! in flight, so the in-flight ratio is the share of the work, not of the request count;
//! the EWMA (time constant ≈ 10 ticks, 1 s) keeps one burst from reshuffling the pool.
//! `k` is also capped so that one eligible backend stays unreserved. The reserved set is
//! sticky: members stay while they are eligible and `k` does not shrink; when `k` shrinks
//! the members holding the fewest long requests leave first; when it grows, the eligible
//! non-members busiest with long requests join first (then those with the least short
//! work, then later in configured order).
//!
//! *Long requests* keep to the reserved backends but are not stranded there. Rounding to
//! whole backends can leave the long work far above `k / n` of the pool (2 backends with
//! 80 % of the work long: `k = 1`, half the capacity), and then SITA-E's equal load holds
//! only if long requests overflow into the rest of the pool:
//!
//! ```text
//! r = P2C on in_flight among the eligible reserved backends
//! u = P2C on in_flight among the eligible unreserved backends
//! long → u   if in_flight(r) > in_flight(u) + SPILL_MARGIN      (a spill; SPILL_MARGIN = 1)
//!      → r   otherwise
//! ```
//!
//! A margin of one request is the smallest for which the spilled request leaves the
//! unreserved backend still less loaded than the reserved one: long requests leave their
//! set only for an imbalance that survives the move, not for the one-request differences
//! that every arrival and completion makes (with a margin of 0, two backends one request
//! apart would take long requests in turn, mixing the classes on a busy pool). An
//! unbounded margin (this mode's first version, and seed 000's static rule) leaves long
//! requests queueing on the reserved backends while the others idle. P2C is Mitzenmacher's
//! power of two choices (see `p2c`); with one or two backends in a set it is exact.
//!
//! *Short requests* keep to the unreserved backends the same way, and cross over to a
//! reserved one when it is strictly less loaded, by requests in flight first and long
//! requests in flight second:
//!
//! ```text
//! load(i) = (in_flight_i, long_in_flight_i)                        compared lexicographically
//! u = P2C on load among the eligible unreserved backends
//! r = P2C on load among the eligible reserved backends
//! short → r   if load(r) < load(u)
//!       → u   otherwise
//! ```
//!
//! The count comes first because the backend with the fewest requests in flight is the
//! one most likely to start the request at once, whatever its concurrency, which the
//! proxy does not know (join the shortest queue: Winston, "Optimality of the shortest
//! line discipline", J. Appl. Prob. 14(1), 1977). Among equally loaded backends, one
//! holding fewer long requests frees its slots sooner, so short requests avoid long work
//! in flight whenever a backend at least as lightly loaded has less of it; and since long
//! requests keep to the reserved backends, the unreserved ones are mostly free of it. A
//! strict preference for backends without long work, whatever their queue, fails once
//! long requests spill: when most backends hold one, every short request piles onto the
//! few that do not. Drawing one pair in each set keeps both sets in every comparison; a
//! pair drawn from the whole pool would, with most of it reserved, often hold only
//! reserved backends.
//!
//! ```text
//! nothing reserved yet                 → P2C over every eligible backend (long: on in_flight,
//!                                        short: on load)
//! no eligible backend in the own set   → the other set's r or u, counted as degraded
//! unknown                              → round robin over every eligible backend
//! ```
//!
//! In-flight counts are not divided by weights: like the static rules, adaptive mode
//! ignores backend weights.
//!
//! **Cost.** Picks are O(1) while the backends a rule needs are eligible: one rotation
//! counter, or up to two P2C pair draws (up to `MAX_PAIR_DRAWS` pairs each) and, in
//! adaptive mode, one lock-free load (`arc-swap`) of the reservation. The fallbacks
//! scan: a rotation skips ineligible members (O(members)), P2C scans its members after
//! `MAX_PAIR_DRAWS` pairs with no eligible backend. Ticks are O(n), O(n log n) when the
//! reservation changes.

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::p2c::{MAX_PAIR_DRAWS, distinct_pair, power_of_two_choices};
use super::{
    BackendId, DurationClassMode, Figure, PoolView, RequestClass, RequestInfo, RoundRobin,
    Strategy, StrategyParams,
};

/// Weight α of each tick's sample in the smoothed long-work share (0..1).
pub const SHARE_SMOOTHING: f64 = 0.1;

/// Adaptive mode: how many more requests in flight the reserved backend must hold than
/// the unreserved one before a long request spills to the unreserved one. One: a spill
/// leaves the unreserved backend still less loaded than the reserved one (see the module
/// documentation).
pub const SPILL_MARGIN: u64 = 1;

/// Long and short requests on separate backends: seed 000's rules, or an adaptive split.
///
/// Static mode: short requests round robin over the short backends
/// ([`StrategyParams::short_backends`], default the first); long requests round robin
/// over the others, except with two backends, where a long request goes to node 2 if it
/// is idle or already holds a long request, else to node 1 if node 1 is idle, else to
/// node 2. Adaptive mode: each tick reserves `clamp(round(share × n), 1, n − 1)` backends
/// for long requests, `share` being the smoothed long share of the requests in flight;
/// a long request goes to the less loaded of two reserved backends unless it holds more
/// than [`SPILL_MARGIN`] requests more than the less loaded of two unreserved ones (then
/// it spills there); a short request goes to the less loaded of two unreserved backends
/// unless the less loaded of two reserved ones holds fewer requests (or as many, with
/// fewer long ones). Unknown-class requests round robin over every eligible backend. The
/// source file's module documentation gives the full decision graph.
#[derive(Debug)]
pub struct DurationClass {
    mode: DurationClassMode,
    /// Static mode: the short backends, in configured order.
    short: Box<[usize]>,
    /// Static mode: the long backends (all others), in configured order.
    long: Box<[usize]>,
    /// Rotation over `short`.
    short_next: AtomicUsize,
    /// Rotation over `long`.
    long_next: AtomicUsize,
    /// Round robin over every eligible backend: unknown class and degradation.
    any: RoundRobin,
    /// Adaptive mode: the backends reserved for long requests.
    reservation: ArcSwap<Reservation>,
    /// Smoothed long-work share (0..=1), `None` before the first sample; ticks only.
    share: Mutex<Option<f64>>,
    picks_short: AtomicU64,
    picks_long: AtomicU64,
    picks_unknown: AtomicU64,
    degraded_picks: AtomicU64,
    /// Adaptive mode: long requests sent to an unreserved backend by the spill rule.
    long_spills: AtomicU64,
}

/// Adaptive mode's split of the pool.
#[derive(Debug, Default, PartialEq)]
struct Reservation {
    /// Reserved for long requests, in configured order.
    long: Vec<usize>,
    /// The others, in configured order.
    others: Vec<usize>,
    /// Per backend: whether reserved.
    reserved: Vec<bool>,
}

impl Reservation {
    fn from_flags(reserved: Vec<bool>) -> Self {
        let (long, others) = (0..reserved.len()).partition(|&i| reserved[i]);
        Self {
            long,
            others,
            reserved,
        }
    }
}

/// One backend's load as a tick sees it, for [`reserve`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendLoad {
    /// Whether the backend may receive requests.
    pub eligible: bool,
    /// Requests in flight (long and short).
    pub in_flight: u64,
    /// Long requests in flight.
    pub long_in_flight: u64,
}

/// How a rule routed a request.
enum Route {
    /// The rule's backend.
    Chosen(BackendId),
    /// No rule applies (unknown class, or nothing eligible at all): round robin over
    /// every eligible backend, not degraded.
    Anywhere,
    /// The rule's backends are not eligible: this fallback backend, or round robin over
    /// every eligible backend when `None`.
    Degraded(Option<BackendId>),
}

impl DurationClass {
    /// The strategy for `backends` with `params`' short backends and mode.
    pub fn new(backends: &[crate::Backend], params: &StrategyParams) -> Self {
        let n = backends.len();
        let mut is_short = vec![false; n];
        for &i in params.short_backends.iter().filter(|&&i| i < n) {
            is_short[i] = true;
        }
        if n > 0 && !is_short.contains(&true) {
            is_short[0] = true;
        }
        let (short, long): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| is_short[i]);
        Self {
            mode: params.duration_class_mode,
            short: short.into(),
            long: long.into(),
            short_next: AtomicUsize::new(0),
            long_next: AtomicUsize::new(0),
            any: RoundRobin::new(),
            reservation: ArcSwap::from_pointee(Reservation::from_flags(vec![false; n])),
            share: Mutex::new(None),
            picks_short: AtomicU64::new(0),
            picks_long: AtomicU64::new(0),
            picks_unknown: AtomicU64::new(0),
            degraded_picks: AtomicU64::new(0),
            long_spills: AtomicU64::new(0),
        }
    }

    /// The smoothed share (0..=1) of the work in flight that is long requests; 0 before
    /// the first tick that saw requests in flight.
    pub fn long_share(&self) -> f64 {
        self.share.lock().unwrap_or(0.0)
    }

    /// Backends currently dedicated to long requests, in configured order (static: the
    /// non-short backends; adaptive: the reservation).
    pub fn long_backends(&self) -> Vec<usize> {
        match self.mode {
            DurationClassMode::Static => self.long.to_vec(),
            DurationClassMode::Adaptive => self.reservation.load().long.clone(),
        }
    }

    fn static_long(&self, pool: &PoolView<'_>) -> Route {
        if pool.len() == 2 && self.short.len() == 1 && self.long.len() == 1 {
            return two_backends_long(self.short[0], self.long[0], pool);
        }
        rotate(&self.long_next, &self.long, pool).map_or(Route::Degraded(None), Route::Chosen)
    }

    /// Adaptive mode, short request: the unreserved backend `u` unless the reserved
    /// backend `r` is less loaded by (in flight, long in flight) (each the less loaded of
    /// a P2C pair of its set).
    fn adaptive_short(&self, pool: &PoolView<'_>) -> Route {
        let live = |i: usize| &pool.backends()[i].live;
        let load = |i: usize| (live(i).in_flight(), live(i).long_in_flight());
        let reservation = self.reservation.load();
        if reservation.long.is_empty() {
            return power_of_two_choices(pool, load).map_or(Route::Anywhere, Route::Chosen);
        }
        let unreserved = p2c_among(&reservation.others, pool, load);
        let reserved = p2c_among(&reservation.long, pool, load);
        match (unreserved, reserved) {
            (Some(u), Some(r)) if load(r) < load(u) => Route::Chosen(BackendId(r)),
            (Some(u), _) => Route::Chosen(BackendId(u)),
            (None, Some(r)) => Route::Degraded(Some(BackendId(r))),
            (None, None) => Route::Anywhere,
        }
    }

    /// Adaptive mode, long request: the reserved backend `r` unless it holds more than
    /// [`SPILL_MARGIN`] requests more than the unreserved backend `u` (each the less
    /// loaded of a P2C pair of its set).
    fn adaptive_long(&self, pool: &PoolView<'_>) -> Route {
        let load = |i: usize| pool.backends()[i].live.in_flight();
        let reservation = self.reservation.load();
        if reservation.long.is_empty() {
            return power_of_two_choices(pool, load).map_or(Route::Anywhere, Route::Chosen);
        }
        let reserved = p2c_among(&reservation.long, pool, load);
        let unreserved = p2c_among(&reservation.others, pool, load);
        match (reserved, unreserved) {
            (Some(r), Some(u)) if spills(load(r), load(u)) => {
                self.long_spills.fetch_add(1, Ordering::Relaxed);
                Route::Chosen(BackendId(u))
            }
            (Some(r), _) => Route::Chosen(BackendId(r)),
            (None, Some(u)) => Route::Degraded(Some(BackendId(u))),
            (None, None) => Route::Anywhere,
        }
    }

    /// Recomputes adaptive mode's reservation for a long-work share of `share`.
    fn update_reservation(&self, pool: &PoolView<'_>, share: f64) {
        let loads: Vec<BackendLoad> = (0..pool.len())
            .map(|i| {
                let live = &pool.backends()[i].live;
                BackendLoad {
                    eligible: pool.is_eligible(i),
                    in_flight: live.in_flight(),
                    long_in_flight: live.long_in_flight(),
                }
            })
            .collect();
        let k = reserve_count(share, loads.len());
        let next = reserve(&self.reservation.load().reserved, &loads, k);
        if next != self.reservation.load().reserved {
            self.reservation
                .store(Arc::new(Reservation::from_flags(next)));
        }
    }
}

/// Whether a long request spills from a reserved backend with `reserved` requests in
/// flight to an unreserved one with `unreserved`: only if the unreserved backend, even
/// after taking it, holds fewer than the reserved one.
pub fn spills(reserved: u64, unreserved: u64) -> bool {
    reserved > unreserved.saturating_add(SPILL_MARGIN)
}

/// Seed 000's two-backend rule for a long request, `short` being node 1 and `long` node 2.
fn two_backends_long(short: usize, long: usize, pool: &PoolView<'_>) -> Route {
    if !pool.is_eligible(long) {
        return Route::Degraded(None);
    }
    let node2 = &pool.backends()[long].live;
    if node2.in_flight() == 0 || node2.long_in_flight() > 0 {
        return Route::Chosen(BackendId(long));
    }
    // Node 2 is busy with short work only: node 1 takes the request if it is idle.
    if pool.is_eligible(short) && pool.backends()[short].live.in_flight() == 0 {
        return Route::Chosen(BackendId(short));
    }
    Route::Chosen(BackendId(long))
}

/// Round robin over the eligible backends among `members` (indices into the pool) with
/// rotation counter `next`: O(1) while members are eligible, O(members) when skipping.
fn rotate(next: &AtomicUsize, members: &[usize], pool: &PoolView<'_>) -> Option<BackendId> {
    let m = members.len();
    if m == 0 {
        return None;
    }
    let start = next.fetch_add(1, Ordering::Relaxed) % m;
    (0..m)
        .map(|k| (start + k) % m)
        .find(|&j| members[j] < pool.len() && pool.is_eligible(members[j]))
        .map(|j| {
            if j != start {
                // Continue after the one picked, as `round_robin` does.
                next.store(j + 1, Ordering::Relaxed);
            }
            BackendId(members[j])
        })
}

/// Power of two choices by `key` among the eligible backends of `members` (indices into
/// the pool). A pair with one eligible backend gives that one; a pair with none is
/// redrawn; after `MAX_PAIR_DRAWS` such pairs, the eligible member with the lowest key
/// (first in `members` on a tie), by an O(members) scan. `None` when no member is
/// eligible. With one or two members the pick is exact: the less loaded eligible one.
fn p2c_among<K: PartialOrd>(
    members: &[usize],
    pool: &PoolView<'_>,
    key: impl Fn(usize) -> K,
) -> Option<usize> {
    let eligible = |i: usize| i < pool.len() && pool.is_eligible(i);
    if members.len() >= 2 {
        for _ in 0..MAX_PAIR_DRAWS {
            let (a, b) = distinct_pair(members.len(), |bound| fastrand::usize(..bound));
            let (a, b) = (members[a], members[b]);
            match (eligible(a), eligible(b)) {
                (true, true) => return Some(if key(b) < key(a) { b } else { a }),
                (true, false) => return Some(a),
                (false, true) => return Some(b),
                (false, false) => {}
            }
        }
    }
    members
        .iter()
        .copied()
        .filter(|&i| eligible(i))
        .map(|i| (i, key(i)))
        .reduce(|best, c| if c.1 < best.1 { c } else { best })
        .map(|(i, _)| i)
}

/// How many of `n` backends to reserve for a long-work share of `share` (0..=1):
/// `clamp(round(share × n), 1, n − 1)`, or 0 when there is no long work or fewer than
/// two backends.
pub fn reserve_count(share: f64, n: usize) -> usize {
    if n < 2 || share.is_nan() || share <= 0.0 {
        return 0;
    }
    ((share.min(1.0) * n as f64).round() as usize).clamp(1, n - 1)
}

/// The backends to reserve for long requests (one flag per backend of `loads`), given the
/// `current` reservation and the target count `k`: sticky, as the module documentation
/// describes. Reserves only eligible backends, and at most all eligible but one.
pub fn reserve(current: &[bool], loads: &[BackendLoad], k: usize) -> Vec<bool> {
    let eligible = loads.iter().filter(|l| l.eligible).count();
    let k = k.min(eligible.saturating_sub(1));
    let mut flags: Vec<bool> = loads
        .iter()
        .enumerate()
        .map(|(i, l)| l.eligible && current.get(i).copied().unwrap_or(false))
        .collect();
    let mut members: Vec<usize> = (0..loads.len()).filter(|&i| flags[i]).collect();
    if members.len() > k {
        // Fewest long requests leave first; on a tie, the earlier in configured order.
        members.sort_by_key(|&i| (loads[i].long_in_flight, i));
        for &i in &members[..members.len() - k] {
            flags[i] = false;
        }
    } else if members.len() < k {
        let mut candidates: Vec<usize> = (0..loads.len())
            .filter(|&i| loads[i].eligible && !flags[i])
            .collect();
        // Most long requests join first; then least short work; then later in order.
        candidates.sort_by_key(|&i| {
            let l = loads[i];
            (
                Reverse(l.long_in_flight),
                l.in_flight.saturating_sub(l.long_in_flight),
                Reverse(i),
            )
        });
        for &i in &candidates[..k - members.len()] {
            flags[i] = true;
        }
    }
    flags
}

impl Strategy for DurationClass {
    fn name(&self) -> &'static str {
        "duration_class"
    }

    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        let adaptive = self.mode == DurationClassMode::Adaptive;
        let route = match req.class {
            RequestClass::Unknown => {
                self.picks_unknown.fetch_add(1, Ordering::Relaxed);
                Route::Anywhere
            }
            RequestClass::Short => {
                self.picks_short.fetch_add(1, Ordering::Relaxed);
                if adaptive {
                    self.adaptive_short(pool)
                } else {
                    rotate(&self.short_next, &self.short, pool)
                        .map_or(Route::Degraded(None), Route::Chosen)
                }
            }
            RequestClass::Long => {
                self.picks_long.fetch_add(1, Ordering::Relaxed);
                if adaptive {
                    self.adaptive_long(pool)
                } else {
                    self.static_long(pool)
                }
            }
        };
        match route {
            Route::Chosen(id) => Some(id),
            Route::Anywhere => self.any.pick(req, pool),
            Route::Degraded(fallback) => {
                self.degraded_picks.fetch_add(1, Ordering::Relaxed);
                fallback.or_else(|| self.any.pick(req, pool))
            }
        }
    }

    fn tick(&self, pool: &PoolView<'_>, _now_ns: u64) {
        let (long, total) = pool.backends().iter().fold((0u64, 0u64), |(l, t), b| {
            (l + b.live.long_in_flight(), t + b.live.in_flight())
        });
        let share = {
            let mut share = self.share.lock();
            if total > 0 {
                let sample = (long as f64 / total as f64).min(1.0);
                *share = Some(share.map_or(sample, |s| s + SHARE_SMOOTHING * (sample - s)));
            }
            share.unwrap_or(0.0)
        };
        if self.mode == DurationClassMode::Adaptive {
            self.update_reservation(pool, share);
        }
    }

    /// `long_share` (0..=1), `reserved_long_backends` (count), `picks_short`,
    /// `picks_long`, `picks_unknown`, `degraded_picks`, `long_spills` (counters since the
    /// strategy was built; `long_spills` stays 0 in static mode), and per backend
    /// `long_in_flight` and `reserved_long` (1 if dedicated to long requests, else 0).
    fn figures(&self, pool: &PoolView<'_>, _now_ns: u64) -> Vec<Figure> {
        let long = self.long_backends();
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let mut figures = vec![
            Figure::pool("long_share", self.long_share()),
            Figure::pool("reserved_long_backends", long.len() as f64),
            Figure::pool("picks_short", counter(&self.picks_short)),
            Figure::pool("picks_long", counter(&self.picks_long)),
            Figure::pool("picks_unknown", counter(&self.picks_unknown)),
            Figure::pool("degraded_picks", counter(&self.degraded_picks)),
            Figure::pool("long_spills", counter(&self.long_spills)),
        ];
        for (i, b) in pool.backends().iter().enumerate() {
            figures.push(Figure::backend(
                "long_in_flight",
                i,
                b.live.long_in_flight() as f64,
            ));
            let reserved = long.binary_search(&i).is_ok();
            figures.push(Figure::backend(
                "reserved_long",
                i,
                f64::from(u8::from(reserved)),
            ));
        }
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendFlags, InFlightGuard};
    use crate::strategy::testing::backends;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

    fn static_params(short: &[usize]) -> StrategyParams {
        StrategyParams {
            short_backends: short.to_vec(),
            ..StrategyParams::default()
        }
    }

    fn adaptive_params() -> StrategyParams {
        StrategyParams {
            duration_class_mode: DurationClassMode::Adaptive,
            ..StrategyParams::default()
        }
    }

    fn pick(s: &DurationClass, view: &PoolView<'_>, class: RequestClass) -> Option<usize> {
        s.pick(&RequestInfo::new(0).with_class(class), view)
            .map(|id| id.0)
    }

    /// Holds `short` short and `long` long requests in flight on backend `b`.
    fn hold(b: &Backend, short: usize, long: usize) -> Vec<InFlightGuard> {
        (0..short)
            .map(|_| b.live.begin_classified(0, false))
            .chain((0..long).map(|_| b.live.begin_classified(0, true)))
            .collect()
    }

    fn figure(s: &DurationClass, view: &PoolView<'_>, name: &str) -> f64 {
        s.figures(view, 0)
            .into_iter()
            .find(|f| f.name == name && f.backend.is_none())
            .expect(name)
            .value
    }

    use RequestClass::{Long, Short, Unknown};

    #[test]
    fn two_backends_shorts_go_to_node_1() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        let _busy = hold(&b[0], 3, 0);
        for _ in 0..10 {
            assert_eq!(pick(&s, &view, Short), Some(0));
        }
    }

    #[test]
    fn two_backends_long_goes_to_idle_node_2() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        assert_eq!(pick(&s, &view, Long), Some(1));
        // Node 1 busy or idle does not matter while node 2 is idle.
        let _node1 = hold(&b[0], 2, 0);
        assert_eq!(pick(&s, &view, Long), Some(1));
    }

    #[test]
    fn two_backends_long_stays_on_node_2_busy_with_long() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        // Node 2 holds a long request (and some short ones); node 1 is idle.
        let _node2 = hold(&b[1], 2, 1);
        for _ in 0..10 {
            assert_eq!(pick(&s, &view, Long), Some(1));
        }
    }

    #[test]
    fn two_backends_long_moves_to_idle_node_1_when_node_2_is_busy_with_short() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        let _node2 = hold(&b[1], 1, 0);
        assert_eq!(pick(&s, &view, Long), Some(0));
        // Node 1 busy too: back to node 2.
        let _node1 = hold(&b[0], 1, 0);
        assert_eq!(pick(&s, &view, Long), Some(1));
        assert_eq!(figure(&s, &view, "degraded_picks"), 0.0);
    }

    #[test]
    fn two_backends_roles_follow_short_backends() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &static_params(&[1]));
        let view = PoolView::new(&b, &[], false);
        assert_eq!(pick(&s, &view, Short), Some(1));
        assert_eq!(pick(&s, &view, Long), Some(0));
    }

    #[test]
    fn many_backends_long_round_robin_over_2_to_n() {
        let b = backends(&[1, 1, 1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&s, &view, Long).expect("eligible"))
            .collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        for _ in 0..5 {
            assert_eq!(pick(&s, &view, Short), Some(0));
        }
        assert_eq!(figure(&s, &view, "reserved_long_backends"), 3.0);
    }

    #[test]
    fn several_short_backends_rotate() {
        let b = backends(&[1, 1, 1, 1]);
        let s = DurationClass::new(&b, &static_params(&[0, 2, 9]));
        let view = PoolView::new(&b, &[], false);
        let shorts: Vec<_> = (0..4)
            .map(|_| pick(&s, &view, Short).expect("eligible"))
            .collect();
        assert_eq!(shorts, vec![0, 2, 0, 2]);
        let longs: Vec<_> = (0..4)
            .map(|_| pick(&s, &view, Long).expect("eligible"))
            .collect();
        assert_eq!(longs, vec![1, 3, 1, 3]);
    }

    #[test]
    fn unknown_class_is_plain_round_robin() {
        let b = backends(&[1, 1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&s, &view, Unknown).expect("eligible"))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(figure(&s, &view, "picks_unknown"), 6.0);
        assert_eq!(figure(&s, &view, "degraded_picks"), 0.0);
    }

    #[test]
    fn short_backend_down_spreads_shorts_round_robin() {
        let b = backends(&[1, 1, 1]);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        let mut seen = [0; 3];
        for _ in 0..6 {
            seen[pick(&s, &view, Short).expect("eligible")] += 1;
        }
        assert_eq!(seen, [0, 3, 3]);
        assert_eq!(figure(&s, &view, "degraded_picks"), 6.0);
    }

    #[test]
    fn excluded_short_backend_degrades_too() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let excluded = [BackendId(0)];
        let view = PoolView::new(&b, &excluded, false);
        assert_eq!(pick(&s, &view, Short), Some(1), "a retry goes elsewhere");
    }

    #[test]
    fn long_backends_down_spread_longs_over_eligible() {
        let b = backends(&[1, 1, 1]);
        b[1].live.set_flag(BackendFlags::EJECTED);
        b[2].live.set_flag(BackendFlags::DRAINING);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        assert_eq!(pick(&s, &view, Long), Some(0));
        // One long backend back: longs go there only.
        b[2].live.clear_flag(BackendFlags::DRAINING);
        for _ in 0..4 {
            assert_eq!(pick(&s, &view, Long), Some(2));
        }
        assert_eq!(figure(&s, &view, "degraded_picks"), 1.0);
    }

    #[test]
    fn two_backends_node_2_down_degrades_and_node_1_down_is_skipped() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        b[1].live.set_flag(BackendFlags::DISABLED);
        assert_eq!(pick(&s, &view, Long), Some(0));
        b[1].live.clear_flag(BackendFlags::DISABLED);
        // Node 2 busy with short work, node 1 idle but unhealthy: node 2.
        let _node2 = hold(&b[1], 1, 0);
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        assert_eq!(pick(&s, &view, Long), Some(1));
        assert_eq!(figure(&s, &view, "degraded_picks"), 1.0);
    }

    #[test]
    fn single_backend_takes_everything() {
        let b = backends(&[1]);
        for params in [StrategyParams::default(), adaptive_params()] {
            let s = DurationClass::new(&b, &params);
            let view = PoolView::new(&b, &[], false);
            for class in [Short, Long, Unknown] {
                assert_eq!(pick(&s, &view, class), Some(0));
            }
            let excluded = [BackendId(0)];
            assert_eq!(pick(&s, &PoolView::new(&b, &excluded, false), Long), None);
        }
    }

    #[test]
    fn counters_and_share_figures() {
        let b = backends(&[1, 1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        pick(&s, &view, Short);
        pick(&s, &view, Long);
        pick(&s, &view, Long);
        let _held = (hold(&b[1], 0, 1), hold(&b[0], 3, 0));
        s.tick(&view, 0);
        assert_eq!(figure(&s, &view, "picks_short"), 1.0);
        assert_eq!(figure(&s, &view, "picks_long"), 2.0);
        assert!((figure(&s, &view, "long_share") - 0.25).abs() < 1e-12);
        let per_backend: Vec<f64> = s
            .figures(&view, 0)
            .into_iter()
            .filter(|f| f.name == "long_in_flight")
            .map(|f| f.value)
            .collect();
        assert_eq!(per_backend, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn share_is_smoothed_over_ticks() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &StrategyParams::default());
        let view = PoolView::new(&b, &[], false);
        s.tick(&view, 0);
        assert_eq!(s.long_share(), 0.0, "nothing in flight: no sample");
        let long = hold(&b[1], 0, 1);
        s.tick(&view, 0);
        assert_eq!(s.long_share(), 1.0, "the first sample is taken as is");
        drop(long);
        let _short = hold(&b[0], 1, 0);
        s.tick(&view, 0);
        assert!((s.long_share() - 0.9).abs() < 1e-12);
    }

    #[test]
    fn adaptive_reserves_backends_in_proportion_to_long_work() {
        let b = backends(&[1; 10]);
        let s = DurationClass::new(&b, &adaptive_params());
        let view = PoolView::new(&b, &[], false);
        s.tick(&view, 0);
        assert!(s.long_backends().is_empty(), "no long work seen");
        // 30 % of the work in flight is long; the long requests sit on backends 4 and 7.
        let _held = (
            hold(&b[4], 0, 2),
            hold(&b[7], 0, 1),
            hold(&b[0], 4, 0),
            hold(&b[1], 3, 0),
        );
        s.tick(&view, 0);
        let reserved = s.long_backends();
        assert_eq!(reserved.len(), 3, "{reserved:?}");
        assert!(
            reserved.contains(&4) && reserved.contains(&7),
            "{reserved:?}"
        );
        assert!(
            !reserved.contains(&0) && !reserved.contains(&1),
            "{reserved:?}"
        );
        // Longs go only to reserved backends.
        for _ in 0..50 {
            let i = pick(&s, &view, Long).expect("eligible");
            assert!(reserved.contains(&i), "{i}");
        }
        assert_eq!(figure(&s, &view, "reserved_long_backends"), 3.0);
    }

    /// A two-backend adaptive pool whose tick reserved backend 1 for long requests.
    fn two_backends_reserving_1() -> (Vec<Backend>, DurationClass) {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &adaptive_params());
        {
            let _long = hold(&b[1], 0, 1);
            s.tick(&PoolView::new(&b, &[], false), 0);
        }
        assert_eq!(s.long_backends(), vec![1]);
        (b, s)
    }

    #[test]
    fn adaptive_longs_spill_only_beyond_the_margin() {
        let (b, s) = two_backends_reserving_1();
        let view = PoolView::new(&b, &[], false);
        let mut spilled = 0;
        for reserved in 0..6 {
            for unreserved in 0..6 {
                // Any mix of classes: the spill rule counts requests in flight.
                let _held = (
                    hold(&b[1], reserved / 2, reserved - reserved / 2),
                    hold(&b[0], unreserved - unreserved / 3, unreserved / 3),
                );
                let spill = reserved as u64 > unreserved as u64 + SPILL_MARGIN;
                spilled += usize::from(spill);
                for _ in 0..4 {
                    let expected = if spill { 0 } else { 1 };
                    assert_eq!(
                        pick(&s, &view, Long),
                        Some(expected),
                        "reserved {reserved}, unreserved {unreserved}"
                    );
                }
            }
        }
        assert_eq!(figure(&s, &view, "long_spills"), (4 * spilled) as f64);
        assert_eq!(figure(&s, &view, "degraded_picks"), 0.0);
    }

    #[test]
    fn adaptive_shorts_prefer_unreserved_backends_and_less_long_work() {
        let (b, s) = two_backends_reserving_1();
        let view = PoolView::new(&b, &[], false);
        // (short, long) requests in flight on each backend.
        type Held = (usize, usize);
        let cases: [(Held, Held, usize); 6] = [
            // (unreserved, reserved, expected backend)
            ((0, 0), (0, 0), 0),
            ((1, 0), (0, 1), 0),
            ((0, 1), (0, 1), 0),
            ((0, 2), (1, 1), 1),
            ((3, 0), (0, 2), 1),
            ((2, 0), (0, 3), 0),
        ];
        for ((us, ul), (rs, rl), expected) in cases {
            let _held = (hold(&b[0], us, ul), hold(&b[1], rs, rl));
            for _ in 0..4 {
                assert_eq!(
                    pick(&s, &view, Short),
                    Some(expected),
                    "unreserved ({us}, {ul}), reserved ({rs}, {rl})"
                );
            }
        }
        assert_eq!(figure(&s, &view, "degraded_picks"), 0.0);
    }

    #[test]
    fn adaptive_shorts_avoid_long_work_when_an_as_lightly_loaded_backend_has_none() {
        let b = backends(&[1; 3]);
        let s = DurationClass::new(&b, &adaptive_params());
        let view = PoolView::new(&b, &[], false);
        {
            let _held = (hold(&b[2], 0, 1), hold(&b[0], 2, 0));
            s.tick(&view, 0);
        }
        assert_eq!(s.long_backends(), vec![2]);
        // One request on each; a long one left over on unreserved backend 0.
        let _held = (hold(&b[0], 0, 1), hold(&b[1], 1, 0), hold(&b[2], 0, 1));
        for _ in 0..100 {
            assert_eq!(pick(&s, &view, Short), Some(1));
        }
    }

    #[test]
    fn adaptive_class_without_an_eligible_own_backend_degrades_to_the_other_set() {
        let (b, s) = two_backends_reserving_1();
        let view = PoolView::new(&b, &[], false);
        let _busy = hold(&b[0], 5, 0);
        b[1].live.set_flag(BackendFlags::UNHEALTHY);
        assert_eq!(pick(&s, &view, Long), Some(0));
        b[1].live.clear_flag(BackendFlags::UNHEALTHY);
        b[0].live.set_flag(BackendFlags::DRAINING);
        assert_eq!(pick(&s, &view, Short), Some(1));
        assert_eq!(figure(&s, &view, "degraded_picks"), 2.0);
        assert_eq!(figure(&s, &view, "long_spills"), 0.0);
    }

    #[test]
    fn adaptive_without_long_work_balances_every_class() {
        let b = backends(&[1, 1]);
        let s = DurationClass::new(&b, &adaptive_params());
        let view = PoolView::new(&b, &[], false);
        let _short = hold(&b[0], 1, 0);
        s.tick(&view, 0);
        assert!(s.long_backends().is_empty());
        assert_eq!(pick(&s, &view, Long), Some(1));
        assert_eq!(pick(&s, &view, Short), Some(1));
        assert_eq!(figure(&s, &view, "degraded_picks"), 0.0);
    }

    #[test]
    fn spill_rule() {
        assert!(!spills(0, 0));
        assert!(!spills(1 + SPILL_MARGIN, 1));
        assert!(spills(2 + SPILL_MARGIN, 1));
        assert!(!spills(u64::MAX, u64::MAX));
    }

    #[test]
    fn adaptive_reservation_is_sticky_and_replaces_ineligible_members() {
        let b = backends(&[1; 4]);
        let s = DurationClass::new(&b, &adaptive_params());
        let view = PoolView::new(&b, &[], false);
        let long = hold(&b[3], 0, 1);
        let _short = hold(&b[0], 3, 0);
        s.tick(&view, 0);
        assert_eq!(s.long_backends(), vec![3]);
        // The long request finishes; a new one lands elsewhere: the member stays.
        drop(long);
        let _other = hold(&b[1], 0, 1);
        s.tick(&view, 0);
        assert_eq!(s.long_backends(), vec![3]);
        // The member goes down: replaced by the backend busiest with long work.
        b[3].live.set_flag(BackendFlags::UNHEALTHY);
        s.tick(&view, 0);
        assert_eq!(s.long_backends(), vec![1]);
    }

    #[test]
    fn reserve_count_bounds() {
        assert_eq!(reserve_count(0.0, 10), 0);
        assert_eq!(reserve_count(0.01, 10), 1);
        assert_eq!(reserve_count(0.34, 10), 3);
        assert_eq!(reserve_count(1.0, 10), 9);
        assert_eq!(reserve_count(0.9, 1), 0);
        assert_eq!(reserve_count(f64::NAN, 5), 0);
    }

    fn load_case() -> impl proptest::strategy::Strategy<Value = (bool, u64, u64, bool)> {
        (prop::bool::weighted(0.8), 0u64..5, 0u64..3, any::<bool>())
    }

    proptest! {
        /// The reservation holds at most `k` backends, all eligible, leaves an eligible
        /// backend unreserved when there are two or more, and does not move while its
        /// members stay eligible and `k` does not change.
        #[test]
        fn reservation_invariants(
            cases in prop::collection::vec(load_case(), 1..40),
            k in 0usize..40,
        ) {
            let loads: Vec<BackendLoad> = cases
                .iter()
                .map(|&(eligible, short, long, _)| BackendLoad {
                    eligible,
                    in_flight: short + long,
                    long_in_flight: long,
                })
                .collect();
            let current: Vec<bool> = cases.iter().map(|c| c.3).collect();
            let next = reserve(&current, &loads, k);
            let members: Vec<usize> = (0..loads.len()).filter(|&i| next[i]).collect();
            let eligible = loads.iter().filter(|l| l.eligible).count();
            prop_assert!(members.len() <= k);
            prop_assert_eq!(members.len(), k.min(eligible.saturating_sub(1)));
            prop_assert!(members.iter().all(|&i| loads[i].eligible));
            // Sticky: applying the same k again changes nothing.
            prop_assert_eq!(reserve(&next, &loads, members.len()), next.clone());
            // Kept members are a subset of the eligible current ones when shrinking.
            let kept = (0..loads.len()).filter(|&i| current[i] && loads[i].eligible).count();
            if kept >= members.len() {
                prop_assert!(members.iter().all(|&i| current[i]));
            }
        }

        /// Adaptive picks follow the rules: a long request goes to an unreserved backend
        /// only when no reserved one is eligible or a reserved one holds more than
        /// `SPILL_MARGIN` requests more; a short request goes to a reserved backend only
        /// when no unreserved one is eligible or an unreserved one is more loaded by
        /// (in flight, long in flight). Where each set has at most two backends, P2C is
        /// exact and the pick is exactly the rule's.
        #[test]
        fn adaptive_picks_follow_the_spill_and_cross_over_rules(
            cases in prop::collection::vec(
                (prop::bool::weighted(0.8), 0usize..4, 0usize..3),
                2..10,
            ),
            tick_long in prop::collection::vec(0usize..3, 2..10),
            long in any::<bool>(),
        ) {
            let n = cases.len();
            let b = backends(&vec![1; n]);
            let s = DurationClass::new(&b, &adaptive_params());
            {
                // Long work on some backends at tick time sets the reservation.
                let held: Vec<_> = (0..n)
                    .map(|i| hold(&b[i], 1, tick_long.get(i).copied().unwrap_or(0)))
                    .collect();
                s.tick(&PoolView::new(&b, &[], false), 0);
                drop(held);
            }
            let mut guards = Vec::new();
            for (i, &(eligible, shorts, longs)) in cases.iter().enumerate() {
                if !eligible {
                    b[i].live.set_flag(BackendFlags::UNHEALTHY);
                }
                guards.push(hold(&b[i], shorts, longs));
            }
            let view = PoolView::new(&b, &[], false);
            let reserved = s.long_backends();
            let is_reserved = |i: usize| reserved.contains(&i);
            let live = |i: usize| &b[i].live;
            let load = |i: usize| (live(i).in_flight(), live(i).long_in_flight());
            let eligible_in = |own: bool| -> Vec<usize> {
                (0..n).filter(|&i| view.is_eligible(i) && is_reserved(i) == own).collect()
            };
            let (r_set, u_set) = (eligible_in(true), eligible_in(false));
            let exact = !reserved.is_empty() && reserved.len() <= 2 && n - reserved.len() <= 2;
            let class = if long { Long } else { Short };
            for _ in 0..8 {
                let Some(i) = pick(&s, &view, class) else {
                    prop_assert!(r_set.is_empty() && u_set.is_empty());
                    continue;
                };
                prop_assert!(view.is_eligible(i));
                if reserved.is_empty() {
                    continue;
                }
                if long {
                    let r_max = r_set.iter().map(|&j| load(j).0).max();
                    if !is_reserved(i) {
                        prop_assert!(r_max.is_none_or(|r| spills(r, load(i).0)), "{i}");
                    }
                    if exact {
                        let r_min = r_set.iter().map(|&j| load(j).0).min();
                        let u_min = u_set.iter().map(|&j| load(j).0).min();
                        let to_reserved = match (r_min, u_min) {
                            (Some(r), Some(u)) => !spills(r, u),
                            (Some(_), None) => true,
                            (None, _) => false,
                        };
                        let expected = if to_reserved { r_min } else { u_min };
                        prop_assert_eq!(is_reserved(i), to_reserved);
                        prop_assert_eq!(Some(load(i).0), expected);
                    }
                } else {
                    let u_max = u_set.iter().map(|&j| load(j)).max();
                    if is_reserved(i) {
                        prop_assert!(u_max.is_none_or(|u| load(i) < u), "{i}");
                    }
                    if exact {
                        let r_min = r_set.iter().map(|&j| load(j)).min();
                        let u_min = u_set.iter().map(|&j| load(j)).min();
                        let to_reserved = match (u_min, r_min) {
                            (Some(u), Some(r)) => r < u,
                            (Some(_), None) => false,
                            (None, _) => true,
                        };
                        let expected = if to_reserved { r_min } else { u_min };
                        prop_assert_eq!(is_reserved(i), to_reserved);
                        prop_assert_eq!(Some(load(i)), expected);
                    }
                }
            }
        }

        /// Whatever the mode, class and pool state: an eligible backend iff any, and the
        /// static rules' backend whenever it is eligible.
        #[test]
        fn picks_eligible_and_follows_static_rules(
            cases in prop::collection::vec((0u8..3, prop::bool::weighted(0.2), 0usize..3, 0usize..2), 1..12),
            short in prop::collection::vec(0usize..14, 0..3),
            adaptive in any::<bool>(),
            class in 0u8..3,
        ) {
            let b = backends(&vec![1; cases.len()]);
            let mut excluded = Vec::new();
            let mut guards = Vec::new();
            for (i, &(flag, tried, shorts, longs)) in cases.iter().enumerate() {
                b[i].live.set_flag(match flag {
                    0 => BackendFlags::NONE,
                    1 => BackendFlags::UNHEALTHY,
                    _ => BackendFlags::DRAINING,
                });
                if tried {
                    excluded.push(BackendId(i));
                }
                guards.push(hold(&b[i], shorts, longs));
            }
            let params = StrategyParams {
                short_backends: short,
                duration_class_mode: if adaptive {
                    DurationClassMode::Adaptive
                } else {
                    DurationClassMode::Static
                },
                ..StrategyParams::default()
            };
            let s = DurationClass::new(&b, &params);
            s.tick(&PoolView::new(&b, &[], false), 0);
            let view = PoolView::new(&b, &excluded, false);
            let any_eligible = (0..view.len()).any(|i| view.is_eligible(i));
            let class = [Unknown, Short, Long][usize::from(class)];
            for _ in 0..6 {
                let picked = pick(&s, &view, class);
                match picked {
                    Some(i) => prop_assert!(view.is_eligible(i)),
                    None => prop_assert!(!any_eligible),
                }
                if adaptive || view.len() == 2 {
                    continue;
                }
                let is_short = |i: usize| s.short.contains(&i);
                let short_eligible = s.short.iter().any(|&i| view.is_eligible(i));
                let long_eligible = s.long.iter().any(|&i| view.is_eligible(i));
                match (class, picked) {
                    (Short, Some(i)) if short_eligible => prop_assert!(is_short(i)),
                    (Long, Some(i)) if long_eligible => prop_assert!(!is_short(i)),
                    _ => {}
                }
            }
        }
    }
}
