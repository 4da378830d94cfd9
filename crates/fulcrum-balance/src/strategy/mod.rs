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

mod least_connections;
mod p2c;
mod peak_ewma;
mod random;
mod round_robin;
mod weighted_round_robin;

use std::fmt;
use std::str::FromStr;

use crate::backend::Backend;

pub use least_connections::LeastConnections;
pub use p2c::PowerOfTwoChoices;
pub use peak_ewma::PeakEwmaStrategy;
pub use random::WeightedRandom;
pub use round_robin::RoundRobin;
pub use weighted_round_robin::SmoothWeightedRoundRobin;

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
    /// hashing strategies; `None` when the pool has no hash policy.
    pub hash_key: Option<u64>,
}

impl RequestInfo {
    /// A request decided at `now_ns`, without an affinity key.
    pub fn new(now_ns: u64) -> Self {
        Self {
            now_ns,
            hash_key: None,
        }
    }

    /// The same request with affinity key hash `key`.
    pub fn with_hash_key(mut self, key: u64) -> Self {
        self.hash_key = Some(key);
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
}

impl<'a> PoolView<'a> {
    /// A view over `backends`, skipping `excluded`, in panic mode if `panic`.
    pub fn new(backends: &'a [Backend], excluded: &'a [BackendId], panic: bool) -> Self {
        Self {
            backends,
            excluded,
            panic,
        }
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
    /// [`crate::LiveBackend::is_routable`]) and not already tried by it.
    #[inline]
    pub fn is_eligible(&self, i: usize) -> bool {
        self.backends[i].live.is_routable(self.panic) && !self.excluded.contains(&BackendId(i))
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

/// Picks a backend for one request from a pool's eligible backends.
///
/// See the [module documentation](self) for the contract.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// The strategy's configuration name (`round_robin`, `p2c`, …).
    fn name(&self) -> &'static str;

    /// The backend for this request, or `None` only when no backend is eligible.
    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId>;
}

/// Every strategy this build implements, by configuration name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StrategyKind {
    /// `round_robin`: each backend in turn ([`RoundRobin`]).
    RoundRobin,
    /// `weighted_round_robin`: nginx's smooth weighted round robin
    /// ([`SmoothWeightedRoundRobin`]).
    WeightedRoundRobin,
    /// `random`: weighted random ([`WeightedRandom`]).
    Random,
    /// `least_connections`: fewest in-flight requests per unit of weight
    /// ([`LeastConnections`]).
    LeastConnections,
    /// `p2c`: power of two choices on in-flight requests ([`PowerOfTwoChoices`]).
    P2c,
    /// `peak_ewma`: P2C on peak-EWMA latency × (in-flight + 1) ([`PeakEwmaStrategy`]).
    PeakEwma,
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
    ];

    /// Names of every implemented strategy, in documentation order.
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "weighted_round_robin",
        "random",
        "least_connections",
        "p2c",
        "peak_ewma",
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::Random => "random",
            Self::LeastConnections => "least_connections",
            Self::P2c => "p2c",
            Self::PeakEwma => "peak_ewma",
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
    /// The name that was asked for.
    pub name: String,
}

impl FromStr for StrategyKind {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownStrategy { name: s.to_owned() })
    }
}

/// Builds a `kind` strategy for `backends` (the list the returned strategy's
/// [`BackendId`]s index; weights are read from it once, here).
pub fn build_strategy(kind: StrategyKind, backends: &[Backend]) -> Box<dyn Strategy> {
    match kind {
        StrategyKind::RoundRobin => Box::new(RoundRobin::new()),
        StrategyKind::WeightedRoundRobin => Box::new(SmoothWeightedRoundRobin::new(backends)),
        StrategyKind::Random => Box::new(WeightedRandom::new(backends)),
        StrategyKind::LeastConnections => Box::new(LeastConnections::new()),
        StrategyKind::P2c => Box::new(PowerOfTwoChoices::new()),
        StrategyKind::PeakEwma => Box::new(PeakEwmaStrategy::new()),
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
    }

    #[test]
    fn built_strategies_carry_their_kind_name() {
        let pool = testing::backends(&[1, 2]);
        for &kind in StrategyKind::ALL {
            assert_eq!(build_strategy(kind, &pool).name(), kind.name());
        }
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
                let strategy = build_strategy(kind, &pool);
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
