//! The [`Strategy`] trait and the algorithms that implement it, one file each.
//!
//! A strategy picks one backend for one request from the pool's eligible backends. The
//! contract every implementation keeps:
//!
//! * **Eligibility.** It returns only an index for which [`PoolView::is_eligible`] is true,
//!   and `None` only when no backend is eligible.
//! * **Hot path.** `pick` runs once per request attempt on the proxy's worker threads. It
//!   must not block, must not allocate beyond O(1) scratch, and may hold a lock only for
//!   a short critical section that never spans an `.await` (there are none here).
//! * **Feedback through live state.** Strategies read [`crate::LiveBackend`] atomics
//!   (in-flight, latency estimate) through the view; they are never called back with
//!   outcomes. A strategy instance is built for one backend list ([`build_strategy`]) and
//!   replaced, not mutated, when the list or the strategy changes.
//!
//! Each file cites the system or paper its algorithm comes from.

mod adaptive_weighted;
mod bounded;
mod duration_class;
mod health_score;
mod least_connections;
mod maglev;
mod p2c;
mod peak_ewma;
mod random;
mod rendezvous;
mod response_time;
mod ring_hash;
mod round_robin;
mod tail_aware;
mod weighted_round_robin;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::backend::Backend;
use crate::slow_start::SlowStart;

pub use fulcrum_stats::RequestClass;

pub use adaptive_weighted::AdaptiveWeighted;
pub use duration_class::DurationClass;
pub use health_score::HealthScore;
pub use least_connections::LeastConnections;
pub use maglev::Maglev;
pub use p2c::PowerOfTwoChoices;
pub use peak_ewma::PeakEwmaStrategy;
pub use random::WeightedRandom;
pub use rendezvous::Rendezvous;
pub use response_time::ResponseTime;
pub use ring_hash::RingHash;
pub use round_robin::RoundRobin;
pub use tail_aware::TailAware;
pub use weighted_round_robin::WeightedRoundRobin;

/// Index of a backend within the [`PoolView`] (and the backend list the strategy was
/// built for).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub usize);

/// What a strategy may key its decision on, beyond the pool's live state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestInfo {
    /// Clock time of the decision, in nanoseconds (see `fulcrum_stats::clock::now_ns`).
    pub now_ns: u64,
    /// A hash of the request's affinity key (header, cookie, path or client IP), for
    /// hashing strategies; `None` when the request carries no key (hashing strategies then
    /// fall back to an even spread).
    pub hash_key: Option<u64>,
    /// The request's predicted duration class, from its endpoint's history (known before
    /// forwarding); [`RequestClass::Unknown`] when the endpoint has no history yet.
    pub class: RequestClass,
}

impl RequestInfo {
    /// A request decided at `now_ns`, without an affinity key or class.
    pub fn new(now_ns: u64) -> Self {
        Self {
            now_ns,
            hash_key: None,
            class: RequestClass::Unknown,
        }
    }

    /// The same request with affinity key hash `key`.
    pub fn with_hash_key(mut self, key: u64) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// The same request with predicted class `class`.
    pub fn with_class(mut self, class: RequestClass) -> Self {
        self.class = class;
        self
    }
}

/// A pool's backends as one request sees them: the backend list, the backends this
/// request has already tried (excluded, so a retry goes elsewhere), and whether the pool
/// is in panic mode (too few healthy backends: health and ejection are ignored, operator
/// drain/disable still honoured).
///
/// Built per request attempt on the stack; no allocation.
#[derive(Clone, Copy, Debug)]
pub struct PoolView<'a> {
    backends: &'a [Backend],
    excluded: &'a [BackendId],
    panic: bool,
    total_in_flight: Option<u64>,
    allowed: Option<&'a [bool]>,
    capacity: bool,
}

impl<'a> PoolView<'a> {
    /// A view over `backends`, skipping `excluded`, in panic mode if `panic`.
    pub fn new(backends: &'a [Backend], excluded: &'a [BackendId], panic: bool) -> Self {
        Self {
            backends,
            excluded,
            panic,
            total_in_flight: None,
            allowed: None,
            capacity: false,
        }
    }

    /// The same view restricted, if `only_with_capacity`, to the backends below their
    /// request limit ([`crate::LiveBackend::has_capacity`]): a pool with limits picks among
    /// the backends that can take the request now, and queues it when none can.
    pub fn with_capacity_only(mut self, only_with_capacity: bool) -> Self {
        self.capacity = only_with_capacity;
        self
    }

    /// The same view restricted to the backends `i` with `allowed[i]` (a route's
    /// required backend tags); backends past the end of `allowed` are not allowed.
    pub fn with_allowed(mut self, allowed: Option<&'a [bool]>) -> Self {
        self.allowed = allowed;
        self
    }

    /// The same view with the pool's total load (requests in flight over all backends)
    /// known in O(1) — the proxy keeps a pool-wide counter — so bounded-load strategies
    /// need not sum it per pick.
    pub fn with_total_in_flight(mut self, total: u64) -> Self {
        self.total_in_flight = Some(total);
        self
    }

    /// Requests in flight over all backends: the value given to
    /// [`PoolView::with_total_in_flight`], else the sum over backends (O(n)).
    #[inline]
    pub fn total_in_flight(&self) -> u64 {
        self.total_in_flight
            .unwrap_or_else(|| self.backends.iter().map(|b| b.live.in_flight()).sum())
    }

    /// The effective weight of backend `i` (> 0): what the pool's periodic tick last
    /// published (configured weight × dynamic-weight factor × slow-start factor, see
    /// [`crate::slow_start`]), or the configured weight if nothing was published yet.
    #[inline]
    pub fn effective_weight(&self, i: usize) -> f64 {
        let b = &self.backends[i];
        b.live
            .effective_weight()
            .unwrap_or_else(|| weight_of(b) as f64)
    }

    /// Number of backends in the pool (eligible or not).
    #[inline]
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the pool has no backends at all.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// All backends, eligible or not, in configured order.
    #[inline]
    pub fn backends(&self) -> &'a [Backend] {
        self.backends
    }

    /// The backend at `id`. Panics if `id` is out of range (a strategy bug: indices come
    /// from `0..len()`).
    #[inline]
    pub fn backend(&self, id: BackendId) -> &'a Backend {
        &self.backends[id.0]
    }

    /// Whether the pool is in panic mode for this request.
    #[inline]
    pub fn is_panic(&self) -> bool {
        self.panic
    }

    /// Whether backend `i` may receive this request: routable (see
    /// [`crate::LiveBackend::is_routable`]), allowed by the route, below its request limit
    /// when the view asks for capacity, and not already tried by it.
    #[inline]
    pub fn is_eligible(&self, i: usize) -> bool {
        self.backends[i].live.is_routable(self.panic)
            && (!self.capacity || self.backends[i].live.has_capacity())
            && self
                .allowed
                .is_none_or(|a| a.get(i).copied().unwrap_or(false))
            && !self.excluded.contains(&BackendId(i))
    }

    /// The weight of backend `i` as strategies use it: the configured weight, counted as
    /// at least 1 so that a zero (rejected by config validation) can neither take an
    /// eligible backend out of rotation nor divide by zero.
    #[inline]
    pub fn weight(&self, i: usize) -> u64 {
        weight_of(&self.backends[i])
    }

    /// The first eligible backend at or after `start`, wrapping around; `None` if none is.
    /// O(n) in the worst case, O(1) when most backends are eligible.
    #[inline]
    pub fn next_eligible_from(&self, start: usize) -> Option<BackendId> {
        let n = self.backends.len();
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.is_eligible(i))
            .map(BackendId)
    }
}

/// `backend`'s weight as strategies use it (see [`PoolView::weight`]); also read by the
/// strategies that take weights once at construction, so both agree.
#[inline]
fn weight_of(backend: &Backend) -> u64 {
    u64::from(backend.weight.max(1))
}

/// One figure a strategy reports about itself for the admin API
/// (`GET /api/algorithm-metrics`): a name, the backend it concerns (if any) and a value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figure {
    /// Stable snake_case name with its unit as suffix (`target_p99_ms`, `beta`,
    /// `hedge_rate`, `bounded_load_redirects`, `warmup_progress`).
    pub name: &'static str,
    /// Index of the backend the figure is about, or `None` for a pool-wide figure.
    pub backend: Option<usize>,
    /// The value.
    pub value: f64,
}

impl Figure {
    /// A pool-wide figure.
    pub fn pool(name: &'static str, value: f64) -> Self {
        Self {
            name,
            backend: None,
            value,
        }
    }

    /// A figure about backend `i`.
    pub fn backend(name: &'static str, i: usize, value: f64) -> Self {
        Self {
            name,
            backend: Some(i),
            value,
        }
    }
}

/// A uniformly random eligible backend of `pool` (which marks the backends already tried
/// ineligible): up to 8 draws, then the first eligible backend after a random start.
/// `None` only when none is eligible. O(1) expected while most backends are eligible.
/// What the rotations use for retries and hedges ([`Strategy::pick_another`]).
pub fn random_eligible(pool: &PoolView<'_>) -> Option<BackendId> {
    let n = pool.len();
    if n == 0 {
        return None;
    }
    for _ in 0..8 {
        let i = fastrand::usize(..n);
        if pool.is_eligible(i) {
            return Some(BackendId(i));
        }
    }
    pool.next_eligible_from(fastrand::usize(..n))
}

/// Picks a backend for one request from a pool's eligible backends.
///
/// See the [module documentation](self) for the contract.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// The strategy's configuration name (`round_robin`, `p2c`, …).
    fn name(&self) -> &'static str;

    /// The backend for this request, or `None` only when no backend is eligible.
    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId>;

    /// The backend for another attempt of a request that was already sent (a retry or a
    /// hedge); `pool` marks the backends it went to ineligible. `None` only when no
    /// backend is eligible. Default: [`Strategy::pick`].
    ///
    /// Rotations override it with [`random_eligible`], which takes no turn: an extra
    /// attempt is not a new request, and letting it take the next turn would lock first
    /// attempts into a pattern (round robin over two backends with every request hedged
    /// sent every first attempt to the same backend, the hedges taking the other's turns);
    /// and a uniform draw spreads the extra attempts over the other backends instead of
    /// piling them on the failed one's neighbour in the rotation.
    fn pick_another(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        self.pick(req, pool)
    }

    /// Periodic housekeeping, called by the pool's background task about every
    /// [`TICK_INTERVAL`] (never on the request path): adapt parameters from the live
    /// statistics, rebuild tables after effective weights changed. Default: nothing.
    fn tick(&self, pool: &PoolView<'_>, now_ns: u64) {
        let _ = (pool, now_ns);
    }

    /// The strategy's own figures for the admin API. Default: none.
    fn figures(&self, pool: &PoolView<'_>, now_ns: u64) -> Vec<Figure> {
        let _ = (pool, now_ns);
        Vec::new()
    }

    /// Whether the forwarder may hedge requests now (SLO-aware conditional hedging: a
    /// strategy that tracks a latency target vetoes hedges while the target is met).
    /// Only consulted when the pool has a hedge policy. Default: `true`.
    fn hedge_allowed(&self, now_ns: u64) -> bool {
        let _ = now_ns;
        true
    }

    /// Told that the forwarder sent a hedge (`won` = false) or that a hedge's answer won
    /// (`won` = true), for strategies that report a hedge rate. Default: nothing.
    fn note_hedge(&self, won: bool) {
        let _ = won;
    }
}

/// How often the proxy calls [`Strategy::tick`].
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Which backends `duration_class` dedicates to short requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DurationClassMode {
    /// Seed 000's rules: configured short backends (the first by default), long requests
    /// on the others.
    #[default]
    Static,
    /// Reserve a share of backends for long requests in proportion to their share of the
    /// work, recomputed on every tick.
    Adaptive,
}

/// Parameters of the strategies that have any; each strategy reads its own part.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategyParams {
    /// `rendezvous`, `ring_hash`, `maglev`: bounded-load factor `c` (Mirrokni et al.
    /// 2018): no backend takes more than `ceil(c × (total in flight + 1) / n)` requests in
    /// flight, `n` the eligible backends; with unequal (effective) weights `1 / n` becomes
    /// the backend's share of the eligible weight, `w_i / Σ w`. `None` = unbounded.
    /// Otherwise ≥ 1.
    pub bounded_load: Option<f64>,
    /// `maglev`: lookup table size, a prime (Eisenbud et al. use 65537).
    pub maglev_table_size: usize,
    /// `ring_hash`: points per unit of weight on the Ketama ring (nginx and libketama
    /// use 160); at least 1.
    pub ring_points_per_weight: usize,
    /// `ring_hash`: minimum total number of points on the ring; 0 = none. A floor makes
    /// every backend's point count depend on the total weight, so more keys move when it
    /// decides (see `ring_hash`).
    pub ring_size: usize,
    /// Slow start of backends that (re)join, for the weight-based strategies (also
    /// applied to effective weights by the proxy; hashing strategies read it to warm up).
    pub slow_start: SlowStart,
    /// `duration_class`: indices of the backends dedicated to short requests (empty =
    /// the first backend).
    pub short_backends: Vec<usize>,
    /// `duration_class`: static (seed 000) or adaptive.
    pub duration_class_mode: DurationClassMode,
    /// `tail_aware`: the p99 latency target.
    pub target_p99: Duration,
    /// `tail_aware`: initial weight β of the interference term.
    pub beta: f64,
    /// `tail_aware`: initial weight γ of the head-of-line age term.
    pub gamma: f64,
    /// `tail_aware`: adapt β and γ by feedback on the observed p99.
    pub adapt: bool,
    /// `response_time`: share (0..=0.5) of picks that explore a random eligible backend.
    pub exploration: f64,
}

impl Default for StrategyParams {
    fn default() -> Self {
        Self {
            bounded_load: Some(1.25),
            maglev_table_size: 65_537,
            ring_points_per_weight: 160,
            ring_size: 0,
            slow_start: SlowStart::default(),
            short_backends: Vec::new(),
            duration_class_mode: DurationClassMode::Static,
            target_p99: Duration::from_millis(200),
            beta: 1.0,
            gamma: 1.0,
            adapt: true,
            exploration: 0.05,
        }
    }
}

/// Every strategy this build implements, by configuration name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StrategyKind {
    /// `round_robin`: each backend in turn ([`RoundRobin`]).
    RoundRobin,
    /// `weighted_round_robin`: Envoy's earliest-deadline-first weighted round robin
    /// ([`WeightedRoundRobin`]).
    WeightedRoundRobin,
    /// `random`: weighted random ([`WeightedRandom`]).
    Random,
    /// `least_connections`: fewest in-flight requests per unit of effective weight, sampled
    /// in large pools ([`LeastConnections`]).
    LeastConnections,
    /// `p2c`: power of two choices on in-flight requests ([`PowerOfTwoChoices`]).
    P2c,
    /// `peak_ewma`: P2C on peak-EWMA latency × (in-flight + 1) ([`PeakEwmaStrategy`]).
    PeakEwma,
    /// `response_time`: lowest EWMA response time, with exploration (seed 002 RRT-BS,
    /// [`ResponseTime`]).
    ResponseTime,
    /// `health_score`: highest 0..1 score from load and failure history (seed 002 HS-BS,
    /// [`HealthScore`]).
    HealthScore,
    /// `adaptive_weighted`: failure-adaptive weighted round robin (seed 002 HF-WRR,
    /// [`AdaptiveWeighted`]).
    AdaptiveWeighted,
    /// `tail_aware`: P2C on a tail-risk score with SLO-aware hedging (seed 002 ALPHA1).
    TailAware,
    /// `rendezvous`: highest-random-weight hashing with bounded load (seed 002 BETA1).
    Rendezvous,
    /// `ring_hash`: Ketama consistent hashing with bounded load.
    RingHash,
    /// `maglev`: Maglev hashing (Eisenbud et al., NSDI'16) with bounded load.
    Maglev,
    /// `duration_class`: long/short request classification and node rules (seed 000).
    DurationClass,
}

impl StrategyKind {
    /// Every implemented strategy, in documentation order.
    pub const ALL: &'static [StrategyKind] = &[
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::Random,
        Self::LeastConnections,
        Self::P2c,
        Self::PeakEwma,
        Self::ResponseTime,
        Self::HealthScore,
        Self::AdaptiveWeighted,
        Self::TailAware,
        Self::Rendezvous,
        Self::RingHash,
        Self::Maglev,
        Self::DurationClass,
    ];

    /// Names of every implemented strategy, in documentation order.
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "weighted_round_robin",
        "random",
        "least_connections",
        "p2c",
        "peak_ewma",
        "response_time",
        "health_score",
        "adaptive_weighted",
        "tail_aware",
        "rendezvous",
        "ring_hash",
        "maglev",
        "duration_class",
    ];

    /// Whether the strategy maps a request's affinity key to a backend (the proxy then
    /// computes [`RequestInfo::hash_key`]).
    pub fn uses_hash_key(self) -> bool {
        matches!(self, Self::Rendezvous | Self::RingHash | Self::Maglev)
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::Random => "random",
            Self::LeastConnections => "least_connections",
            Self::P2c => "p2c",
            Self::PeakEwma => "peak_ewma",
            Self::ResponseTime => "response_time",
            Self::HealthScore => "health_score",
            Self::AdaptiveWeighted => "adaptive_weighted",
            Self::TailAware => "tail_aware",
            Self::Rendezvous => "rendezvous",
            Self::RingHash => "ring_hash",
            Self::Maglev => "maglev",
            Self::DurationClass => "duration_class",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strategy name this build does not implement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy `{name}`; expected one of: {}", StrategyKind::NAMES.join(", "))]
pub struct UnknownStrategy {
    /// The name that was asked for (its first 64 characters and `…` if longer).
    pub name: String,
}

impl FromStr for StrategyKind {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownStrategy {
                name: shortened(s, 64),
            })
    }
}

/// `s` cut to at most `max` characters, with `…` when cut (error messages echo what
/// they refuse, and a 2 MB name must not come back whole).
fn shortened(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

/// Builds a `kind` strategy for `backends` (the list the returned strategy's
/// [`BackendId`]s index) with `params` (each strategy reads its own part).
pub fn build_strategy(
    kind: StrategyKind,
    backends: &[Backend],
    params: &StrategyParams,
) -> Box<dyn Strategy> {
    match kind {
        StrategyKind::RoundRobin => Box::new(RoundRobin::new()),
        StrategyKind::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(backends)),
        StrategyKind::Random => Box::new(WeightedRandom::new(backends)),
        StrategyKind::LeastConnections => Box::new(LeastConnections::new()),
        StrategyKind::P2c => Box::new(PowerOfTwoChoices::new()),
        StrategyKind::PeakEwma => Box::new(PeakEwmaStrategy::new()),
        StrategyKind::TailAware => Box::new(TailAware::new(backends, params)),
        StrategyKind::DurationClass => Box::new(DurationClass::new(backends, params)),
        StrategyKind::Rendezvous => Box::new(Rendezvous::new(backends, params)),
        StrategyKind::RingHash => Box::new(RingHash::new(backends, params)),
        StrategyKind::Maglev => Box::new(Maglev::new(backends, params)),
        StrategyKind::ResponseTime => Box::new(ResponseTime::new(params.exploration)),
        StrategyKind::HealthScore => Box::new(HealthScore::new(backends)),
        StrategyKind::AdaptiveWeighted => Box::new(AdaptiveWeighted::new(backends)),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the strategies' unit and property tests.

    use std::sync::Arc;

    use crate::backend::{Backend, LiveBackend, LiveBackendConfig};

    /// `weights.len()` backends on 127.0.0.1:9000.. with the given weights.
    pub fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let port = 9000 + u16::try_from(i).expect("test pools have < 56k backends");
                Backend {
                    address: format!("127.0.0.1:{port}").into(),
                    addr: ([127, 0, 0, 1], port).into(),
                    weight: w,
                    live: Arc::new(LiveBackend::new(LiveBackendConfig::default(), 0)),
                }
            })
            .collect()
    }

    /// `n` first picks of `strategy` over `b`, each followed by a second attempt
    /// (`pick_another`, as a retry or hedge makes) that must go to another backend.
    pub fn first_picks_with_another_attempt(
        strategy: &dyn super::Strategy,
        b: &[Backend],
        n: usize,
    ) -> Vec<usize> {
        let all = super::PoolView::new(b, &[], false);
        let req = super::RequestInfo::new(0);
        (0..n)
            .map(|_| {
                let picked = strategy.pick(&req, &all).expect("eligible");
                let tried = [picked];
                let rest = super::PoolView::new(b, &tried, false);
                let other = strategy.pick_another(&req, &rest).expect("eligible");
                assert_ne!(other, picked);
                picked.0
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendFlags;
    use proptest::prelude::{any, prop, prop_assert, proptest};

    #[test]
    fn names_round_trip() {
        assert_eq!(StrategyKind::ALL.len(), StrategyKind::NAMES.len());
        for (kind, name) in StrategyKind::ALL.iter().zip(StrategyKind::NAMES) {
            assert_eq!(kind.name(), *name);
            assert_eq!(name.parse::<StrategyKind>(), Ok(*kind));
        }
    }

    #[test]
    fn unknown_strategy_lists_known_ones() {
        let err = "fastest".parse::<StrategyKind>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`fastest`"), "{msg}");
        assert!(msg.contains("peak_ewma"), "{msg}");
        let huge = "é".repeat(100_000);
        let err = huge.parse::<StrategyKind>().unwrap_err();
        assert_eq!(
            err.name.chars().count(),
            65,
            "64 characters and the ellipsis"
        );
    }

    #[test]
    fn built_strategies_carry_their_kind_name() {
        let pool = testing::backends(&[1, 2]);
        for &kind in StrategyKind::ALL {
            assert_eq!(
                build_strategy(kind, &pool, &StrategyParams::default()).name(),
                kind.name()
            );
        }
    }

    /// Every strategy, asked for a backend with room, never returns a full one, and
    /// returns one whenever some eligible backend has room.
    #[test]
    fn every_strategy_respects_request_limits() {
        let pool = testing::backends(&[1, 2, 3, 1]);
        let full = [0usize, 2];
        for backend in &pool {
            backend.live.set_max_requests(1);
        }
        let guards: Vec<_> = full
            .iter()
            .map(|&i| pool[i].live.try_begin_classified(0, false).unwrap())
            .collect();
        for &kind in StrategyKind::ALL {
            let strategy = build_strategy(kind, &pool, &StrategyParams::default());
            for k in 0..50u64 {
                let info = RequestInfo::new(k).with_hash_key(k.wrapping_mul(0x9E37_79B9));
                let view = PoolView::new(&pool, &[], false).with_capacity_only(true);
                let picked = strategy.pick(&info, &view);
                let id = picked.unwrap_or_else(|| panic!("{kind:?}: none picked"));
                assert!(
                    !full.contains(&id.0),
                    "{kind:?} picked full backend {}",
                    id.0
                );
            }
        }
        drop(guards);
    }

    /// One backend of a random pool: weight, health flag (none, unhealthy or draining),
    /// whether this request already tried it, and requests already in flight.
    fn backend_case() -> impl proptest::strategy::Strategy<Value = (u32, u8, bool, u8)> {
        (1u32..100, 0u8..3, prop::bool::weighted(0.2), 0u8..4)
    }

    proptest! {
        /// The contract of every strategy: `Some(i)` with `i` eligible if any backend is
        /// eligible, `None` otherwise.
        #[test]
        fn every_strategy_picks_eligible_iff_any(
            cases in prop::collection::vec(backend_case(), 1..50),
            panic in any::<bool>(),
            now_ms in 0u64..100_000,
        ) {
            let weights: Vec<u32> = cases.iter().map(|c| c.0).collect();
            let pool = testing::backends(&weights);
            let mut excluded = Vec::new();
            let mut guards = Vec::new();
            for (i, &(_, flag, tried, in_flight)) in cases.iter().enumerate() {
                let flag = match flag {
                    0 => BackendFlags::NONE,
                    1 => BackendFlags::UNHEALTHY,
                    _ => BackendFlags::DRAINING,
                };
                pool[i].live.set_flag(flag);
                if tried {
                    excluded.push(BackendId(i));
                }
                guards.extend((0..in_flight).map(|_| pool[i].live.begin(0)));
            }
            let view = PoolView::new(&pool, &excluded, panic);
            let any_eligible = (0..view.len()).any(|i| view.is_eligible(i));
            let req = RequestInfo::new(now_ms * 1_000_000);
            for &kind in StrategyKind::ALL {
                let strategy = build_strategy(kind, &pool, &StrategyParams::default());
                // Several picks: stateful strategies (rotations) move between them.
                for _ in 0..8 {
                    match strategy.pick(&req, &view) {
                        Some(BackendId(i)) => {
                            prop_assert!(i < view.len(), "{kind}: index {i} out of range");
                            prop_assert!(view.is_eligible(i), "{kind}: picked ineligible {i}");
                        }
                        None => prop_assert!(!any_eligible, "{kind}: None with eligible backends"),
                    }
                }
            }
        }
    }
}
