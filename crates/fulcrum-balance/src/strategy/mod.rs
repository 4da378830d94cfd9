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
        Self { now_ns, hash_key: None }
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
        Self { backends, excluded, panic }
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

    /// The first eligible backend at or after `start`, wrapping around; `None` if none is.
    /// O(n) in the worst case, O(1) when most backends are eligible.
    #[inline]
    pub fn next_eligible_from(&self, start: usize) -> Option<BackendId> {
        let n = self.backends.len();
        (0..n).map(|k| (start + k) % n).find(|&i| self.is_eligible(i)).map(BackendId)
    }
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
}
