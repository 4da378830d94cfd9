//! Pools and their live state: what a request reads to pick and reach a backend.
//!
//! A [`Pool`] lives as long as the node has a pool of that name. Its current
//! [`PoolState`] — backend list, strategy, policies — is swapped atomically (`arc-swap`)
//! when an operator switches the strategy or the configuration is reloaded; a request
//! reads it with one atomic load and keeps the `Arc` it loaded for its whole life, so a
//! swap never disturbs requests in flight. Per-backend runtime state ([`BackendRuntime`]:
//! live statistics, connection pool, metric series) is shared between successive states
//! by address, so statistics, health and pooled connections survive swaps.
//!
//! Every change to a backend's flags goes through [`Pool::set_flag`] /
//! [`Pool::clear_flag`], which bump the pool's health generation so the panic-mode
//! decision (Envoy's healthy panic threshold) is recomputed only when health changes,
//! not on every request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use fulcrum_balance::{
    Backend, BackendFlags, LiveBackend, LiveBackendConfig, OutlierPolicy, PoolView, Strategy,
    StrategyKind, StrategyParams, build_strategy,
};
use fulcrum_stats::clock::now_ns;
use fulcrum_stats::{
    AnalysisConfig, DynamicWeightConfig, DynamicWeights, EndpointConfig, EndpointTable,
    RateAnalyzer, RateCounter,
};
use parking_lot::Mutex;

use crate::metrics::{BackendMetrics, PoolMetrics};
use crate::queue::{PoolQueue, QueueSettings};
use crate::upstream::{ConnPool, ConnSettings, UpstreamProtocol};

/// Which failures of an attempt may be retried on another backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = none).
    pub attempts: u32,
    /// Retries in flight may be at most this percentage of the pool's active requests
    /// (Envoy's retry budget) …
    pub budget_percent: u32,
    /// … but this many concurrent retries are always allowed.
    pub min_retry_concurrency: u32,
    /// Retry when the connection cannot be established.
    pub on_connect_failure: bool,
    /// Retry when the connection fails before a response head arrives.
    pub on_reset: bool,
    /// Retry when no response head arrives within the response header timeout.
    pub on_timeout: bool,
    /// Retry on these response statuses (500..=599), as a bit set indexed by `status - 500`.
    pub on_status: u128,
    /// Retry non-idempotent methods too (by default only GET, HEAD, OPTIONS, TRACE, PUT and
    /// DELETE are retried once sent, RFC 9110 §9.2.2).
    pub non_idempotent: bool,
    /// Bodies with a declared length up to this many bytes are buffered so the request can
    /// be sent again; 0 = never.
    pub max_body_bytes: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            budget_percent: 20,
            min_retry_concurrency: 3,
            on_connect_failure: true,
            on_reset: true,
            on_timeout: false,
            on_status: 0,
            non_idempotent: false,
            max_body_bytes: 65_536,
        }
    }
}

impl RetryPolicy {
    /// Whether a response with `status` is retriable.
    #[inline]
    pub fn retries_status(&self, status: u16) -> bool {
        (500..600).contains(&status) && self.on_status & (1u128 << (status - 500)) != 0
    }

    /// Adds `status` (500..=599; others are ignored) to the retriable statuses.
    pub fn add_status(&mut self, status: u16) {
        if (500..600).contains(&status) {
            self.on_status |= 1u128 << (status - 500);
        }
    }
}

/// How an active health check probes a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthProbe {
    /// `GET path` over HTTP/1.1 on a fresh connection; healthy if the status is in
    /// `expected` (inclusive range).
    Http {
        /// Request path.
        path: String,
        /// `Host` header; the backend address when `None`.
        host: Option<String>,
        /// Accepted status range, inclusive.
        expected: (u16, u16),
    },
    /// A TCP connect; healthy if it succeeds.
    Tcp,
}

/// Active health checking of a pool's backends (HAProxy's `check inter rise fall`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// What a check does.
    pub probe: HealthProbe,
    /// Time between checks of one backend.
    pub interval: Duration,
    /// Longest a check may take.
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
}

/// When a hedge is sent after the first attempt (see [`HedgePolicy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeDelay {
    /// A fixed delay.
    Fixed(Duration),
    /// The endpoint's observed p95 latency (no hedge until it has one), at least
    /// [`HedgePolicy::min_delay`].
    P95,
}

/// Hedged requests (Dean & Barroso, "The Tail at Scale", CACM 2013): a second copy of a
/// slow idempotent request goes to another backend; the first answer wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HedgePolicy {
    /// How long to wait for the first attempt's response head before hedging.
    pub delay: HedgeDelay,
    /// Floor of the p95 delay.
    pub min_delay: Duration,
    /// Hedges sent in the last [`HEDGE_BUDGET_WINDOW_SECS`] seconds stay at most this
    /// percentage (1..=100) of the pool's requests in the same seconds.
    pub budget_percent: u32,
    /// Request bodies up to this many bytes (declared `Content-Length`) are buffered so
    /// the request can be hedged; larger or chunked bodies are never hedged.
    pub max_body_bytes: u64,
}

/// Where a hashing strategy's affinity key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKeySource {
    /// A request header's value (absent header: no key).
    Header(http::header::HeaderName),
    /// A cookie's value (absent cookie: no key).
    Cookie(String),
    /// The request path (without the query).
    Path,
    /// The client's IP address.
    ClientIp,
}

/// A pool's policies: everything but its backends and strategy.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Upstream connection timeouts.
    pub conn: ConnSettings,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// The pool queue (used when backends have request limits).
    pub queue: QueueSettings,
    /// Passive outlier detection.
    pub outlier: OutlierPolicy,
    /// Below this percentage of healthy backends, route to all of them (0 disables).
    pub panic_threshold: u8,
    /// Active health checks, if configured.
    pub health_check: Option<HealthCheckSettings>,
    /// Parameters of the backends' live statistics.
    pub live: LiveBackendConfig,
    /// Parameters of the strategies (each reads its own part).
    pub strategy: StrategyParams,
    /// Hedged requests; `None` = no hedging.
    pub hedge: Option<HedgePolicy>,
    /// Where the affinity key of hashing strategies comes from.
    pub hash_key: HashKeySource,
    /// Endpoint statistics (last-N average, long/short classification, quantiles).
    pub endpoints: EndpointConfig,
    /// Request-rate analysis (moving averages, Holt forecast, anomalies).
    pub analysis: AnalysisConfig,
    /// Dynamic weight adjustment; `None` = off (effective weight = configured weight ×
    /// slow start).
    pub dynamic_weights: Option<DynamicWeightConfig>,
    /// How often dynamic weights are recomputed.
    pub dynamic_weights_interval: Duration,
    /// The backend-tag sets routes to this pool require (`routes[].backend_tags`); the
    /// state precomputes which backends carry each, so a tag route costs no allocation.
    pub tag_filters: Vec<BTreeMap<String, String>>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            conn: ConnSettings {
                connect_timeout: Duration::from_secs(1),
                response_header_timeout: Duration::from_secs(30),
                read_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(60),
                tls: None,
                protocol: UpstreamProtocol::Http1,
            },
            retry: RetryPolicy::default(),
            queue: QueueSettings::default(),
            outlier: OutlierPolicy::default(),
            panic_threshold: 0,
            health_check: None,
            live: LiveBackendConfig::default(),
            strategy: StrategyParams::default(),
            hedge: None,
            hash_key: HashKeySource::ClientIp,
            endpoints: EndpointConfig::default(),
            analysis: AnalysisConfig::default(),
            dynamic_weights: None,
            dynamic_weights_interval: Duration::from_secs(1),
            tag_filters: Vec::new(),
        }
    }
}

/// One backend as a pool's members are declared: address, weight, tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// `host:port` as configured.
    pub address: String,
    /// Resolved socket address.
    pub addr: std::net::SocketAddr,
    /// Weight ≥ 1.
    pub weight: u32,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// Most requests in flight at once; 0 = unlimited.
    pub max_requests: u32,
}

/// Runtime state of one backend of one pool, shared across pool-state swaps.
#[derive(Debug)]
pub struct BackendRuntime {
    /// `host:port` as configured.
    pub address: Arc<str>,
    /// Live statistics and flags (read by strategies).
    pub live: Arc<LiveBackend>,
    /// Keep-alive connections.
    pub conns: ConnPool,
    /// Pre-resolved metric series.
    pub metrics: BackendMetrics,
}

/// A pool's current configuration and strategy. Immutable; replaced whole.
#[derive(Debug)]
pub struct PoolState {
    /// The strategy in use.
    pub kind: StrategyKind,
    /// Its instance, built for `backends`.
    pub strategy: Box<dyn Strategy>,
    /// Backends in configured order (what strategies index).
    pub backends: Vec<Backend>,
    /// Runtime state, parallel to `backends`.
    pub runtimes: Vec<Arc<BackendRuntime>>,
    /// Tags, parallel to `backends`.
    pub tags: Vec<BTreeMap<String, String>>,
    /// Policies.
    pub settings: PoolSettings,
    /// Endpoint statistics, shared by successive states while the endpoint settings
    /// stay the same.
    pub endpoints: Arc<EndpointTable>,
    /// Per entry of `settings.tag_filters`: which backends carry every tag of it.
    tag_masks: Vec<Box<[bool]>>,
    /// Whether some backend has a request limit: picks then consider only backends with
    /// room, and requests wait in the pool queue when none has.
    pub limited: bool,
}

/// Whether a backend with `tags` carries every tag of `required` with the same value.
pub fn has_tags(tags: &BTreeMap<String, String>, required: &BTreeMap<String, String>) -> bool {
    required.iter().all(|(k, v)| tags.get(k) == Some(v))
}

impl PoolState {
    /// A state with a fresh `kind` strategy over `backends`; `endpoints` is kept if given
    /// (and built with its settings), else a new table is made.
    pub fn new(
        kind: StrategyKind,
        backends: Vec<Backend>,
        runtimes: Vec<Arc<BackendRuntime>>,
        tags: Vec<BTreeMap<String, String>>,
        settings: PoolSettings,
        endpoints: Option<Arc<EndpointTable>>,
    ) -> Self {
        let strategy = build_strategy(kind, &backends, &settings.strategy);
        let endpoints = endpoints
            .filter(|table| *table.config() == settings.endpoints)
            .unwrap_or_else(|| Arc::new(EndpointTable::new(settings.endpoints.clone())));
        let tag_masks = settings
            .tag_filters
            .iter()
            .map(|required| tags.iter().map(|t| has_tags(t, required)).collect())
            .collect();
        let limited = backends.iter().any(|b| b.live.max_requests() > 0);
        Self {
            kind,
            strategy,
            backends,
            runtimes,
            tags,
            settings,
            endpoints,
            tag_masks,
            limited,
        }
    }

    /// Whether some backend could take a request now: eligible (panic mode as given)
    /// in a view of the whole pool restricted to backends below their request limit.
    /// O(n); used only on the queueing path.
    pub fn has_room(&self, panic: bool) -> bool {
        PoolView::new(&self.backends, &[], panic)
            .with_capacity_only(true)
            .next_eligible_from(0)
            .is_some()
    }

    /// Which backends carry every tag of `required` (one flag per backend): precomputed
    /// when `required` is one of `settings.tag_filters`, else computed (a route and a
    /// state from two sides of a reload).
    pub fn tag_mask(&self, required: &BTreeMap<String, String>) -> std::borrow::Cow<'_, [bool]> {
        match self.settings.tag_filters.iter().position(|f| f == required) {
            Some(i) => std::borrow::Cow::Borrowed(&self.tag_masks[i]),
            None => {
                std::borrow::Cow::Owned(self.tags.iter().map(|t| has_tags(t, required)).collect())
            }
        }
    }

    /// Index of the backend with configured address `address`.
    pub fn position(&self, address: &str) -> Option<usize> {
        self.backends.iter().position(|b| &*b.address == address)
    }
}

/// A named pool of backends.
pub struct Pool {
    name: Arc<str>,
    state: ArcSwap<PoolState>,
    /// Requests waiting for a backend below its request limit; every backend of every
    /// state of the pool tells it when a slot frees.
    queue: Arc<PoolQueue>,
    /// Bumped after every flag change or state swap.
    health_generation: AtomicU64,
    /// `(generation << 1) | panic` as last computed.
    panic_cache: AtomicU64,
    active_requests: AtomicU64,
    active_retries: AtomicU64,
    metrics: PoolMetrics,
    /// Requests received per second (hot path: one atomic add).
    rate: RateCounter,
    /// Rate analysis and dynamic weights, driven by the pool's background task.
    analysis: Mutex<Analysis>,
    /// Hedge budget: requests per second seen while a hedge policy was set, and hedges
    /// sent per second, over the last [`HEDGE_BUDGET_WINDOW_SECS`].
    hedge_requests: RateCounter,
    hedges_sent: RateCounter,
    /// Serialises hedge claims, so that concurrent claims cannot overshoot the budget
    /// (taken only when a hedge delay has passed, never by ordinary requests).
    hedge_claim: Mutex<()>,
}

/// The hedge budget's window: hedges sent in the last this many seconds (and the second
/// in progress) are compared with the requests of the same seconds. Finagle's
/// `RetryBudget` lets deposits expire after the same 10 s (its default `ttl`), so a quiet
/// hour does not bank a burst of hedges for the next incident.
pub const HEDGE_BUDGET_WINDOW_SECS: u64 = 10;

/// Longest rate history any configuration may ask for (`analysis.horizon` ≤ 3600 s).
const MAX_RATE_HORIZON: Duration = Duration::from_secs(3600);

/// State of a pool's traffic analysis, owned by its background task (and read by the API).
#[derive(Debug)]
pub struct Analysis {
    /// Request-rate analysis.
    pub rate: RateAnalyzer,
    /// The settings `rate` was built with (rebuilt when a reload changes them).
    pub rate_config: AnalysisConfig,
    /// Last second fed to `rate`.
    pub last_second: Option<u64>,
    /// Dynamic weight controller, when enabled.
    pub weights: Option<DynamicWeights>,
    /// Dynamic weight factor per backend (parallel to the state's backends), 1 when off.
    pub factors: Vec<f64>,
    /// Addresses `factors` belong to (to notice a changed backend list).
    pub factor_addresses: Vec<Arc<str>>,
    /// When dynamic weights were last updated, clock ns.
    pub weights_updated_ns: u64,
    /// When the endpoint table was last swept, clock ns.
    pub endpoints_swept_ns: u64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("state", &self.state.load())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool named `name` in `state`, counting into `metrics`.
    pub fn new(name: &str, state: PoolState, metrics: PoolMetrics) -> Self {
        let rate_config = state.settings.analysis.clone();
        let queue = Arc::new(PoolQueue::new());
        listen_for_release(&state, &queue);
        Self {
            name: name.into(),
            queue,
            analysis: Mutex::new(Analysis {
                rate: RateAnalyzer::new(rate_config.clone()),
                rate_config,
                // Start from now: earlier seconds predate the pool.
                last_second: Some(now_ns() / 1_000_000_000),
                weights: None,
                factors: Vec::new(),
                factor_addresses: Vec::new(),
                weights_updated_ns: 0,
                endpoints_swept_ns: 0,
            }),
            state: ArcSwap::from_pointee(state),
            health_generation: AtomicU64::new(1),
            panic_cache: AtomicU64::new(0),
            active_requests: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
            metrics,
            rate: RateCounter::new(MAX_RATE_HORIZON),
            hedge_requests: RateCounter::new(Duration::from_secs(HEDGE_BUDGET_WINDOW_SECS)),
            hedges_sent: RateCounter::new(Duration::from_secs(HEDGE_BUDGET_WINDOW_SECS)),
            hedge_claim: Mutex::new(()),
        }
    }

    /// The pool's metric series.
    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    /// The per-second request counter.
    pub fn rate(&self) -> &RateCounter {
        &self.rate
    }

    /// The traffic analysis state (locked briefly by the background task and the API).
    pub fn analysis(&self) -> &Mutex<Analysis> {
        &self.analysis
    }

    /// Counts a request arriving at `now_ns` (clock ns) toward the hedge budget (only
    /// while a hedge policy is set). Lock-free: one atomic add in the common case.
    #[inline]
    pub fn count_hedgeable(&self, now_ns: u64) {
        self.hedge_requests.record(now_ns);
    }

    /// Claims a hedge at `now_ns` if `policy`'s budget allows: the hedges sent in the
    /// last [`HEDGE_BUDGET_WINDOW_SECS`] seconds (and the second in progress) stay at
    /// most `budget_percent` % of the requests counted by [`Pool::count_hedgeable`] in
    /// the same seconds. A sliding window rather than totals since start, so the budget
    /// follows the current traffic.
    pub fn try_hedge(&self, policy: &HedgePolicy, now_ns: u64) -> bool {
        let _claim = self.hedge_claim.lock();
        let requests = self
            .hedge_requests
            .recent_total(HEDGE_BUDGET_WINDOW_SECS, now_ns);
        // Rounded up, so a quiet pool (a request every few seconds) can still hedge: at
        // most one hedge beyond the share per window.
        let budget = (requests * u64::from(policy.budget_percent)).div_ceil(100);
        let sent = self
            .hedges_sent
            .recent_total(HEDGE_BUDGET_WINDOW_SECS, now_ns);
        if sent >= budget {
            return false;
        }
        self.hedges_sent.record(now_ns);
        true
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state (one atomic load and reference-count increment).
    #[inline]
    pub fn state(&self) -> Arc<PoolState> {
        self.state.load_full()
    }

    /// The pool queue.
    pub fn queue(&self) -> &Arc<PoolQueue> {
        &self.queue
    }

    /// Replaces the state; requests in flight keep the one they loaded.
    pub fn swap_state(&self, state: PoolState) -> Arc<PoolState> {
        listen_for_release(&state, &self.queue);
        // Limits may have been raised or lifted: let waiters look again.
        if state.has_room(false) {
            self.queue.wake_first();
        }
        let old = self.state.swap(Arc::new(state));
        self.health_generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    /// Switches to strategy `kind`, keeping backends, live state and policies.
    /// Returns the previous strategy.
    pub fn switch_strategy(&self, kind: StrategyKind) -> StrategyKind {
        let mut previous = kind;
        self.state.rcu(|current| {
            previous = current.kind;
            PoolState::new(
                kind,
                current.backends.clone(),
                current.runtimes.clone(),
                current.tags.clone(),
                current.settings.clone(),
                Some(Arc::clone(&current.endpoints)),
            )
        });
        self.health_generation.fetch_add(1, Ordering::AcqRel);
        previous
    }

    /// Sets `flag` on `live`; returns whether it changed.
    pub fn set_flag(&self, live: &LiveBackend, flag: BackendFlags) -> bool {
        let changed = live.set_flag(flag);
        if changed {
            self.health_generation.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    /// Clears `flag` on `live`; returns whether it changed. A backend that becomes
    /// routable again restarts its slow start.
    pub fn clear_flag(&self, live: &LiveBackend, flag: BackendFlags) -> bool {
        let changed = live.clear_flag(flag);
        if changed {
            self.health_generation.fetch_add(1, Ordering::AcqRel);
            if live.flags().is_empty() {
                live.restart_warmup(now_ns());
            }
        }
        changed
    }

    /// Whether `state` is in panic mode: fewer than `panic_threshold` percent of the
    /// backends not drained or disabled are healthy (Envoy's healthy panic threshold). In
    /// panic mode health and ejections are ignored, so traffic spreads over every backend
    /// rather than failing outright or overloading the few healthy ones.
    ///
    /// Recomputed (O(n)) only after a flag change or state swap; otherwise one load.
    #[inline]
    pub fn is_panic(&self, state: &PoolState) -> bool {
        let generation = self.health_generation.load(Ordering::Acquire);
        let cached = self.panic_cache.load(Ordering::Acquire);
        if cached >> 1 == generation {
            return cached & 1 == 1;
        }
        let panic = compute_panic(state);
        self.panic_cache
            .store((generation << 1) | u64::from(panic), Ordering::Release);
        panic
    }

    /// Tries to eject backend `index` of `state` after a failure, if outlier detection
    /// calls for it and `max_ejection_percent` allows. Returns the ejection duration.
    pub fn maybe_eject(
        &self,
        state: &PoolState,
        index: usize,
        consecutive: u32,
    ) -> Option<Duration> {
        let policy = &state.settings.outlier;
        if !policy.should_eject(consecutive) {
            return None;
        }
        let live = &state.backends[index].live;
        if live.flags().contains(BackendFlags::EJECTED) {
            return None;
        }
        let ejected = state
            .backends
            .iter()
            .filter(|b| b.live.flags().contains(BackendFlags::EJECTED))
            .count();
        if !policy.within_budget(state.backends.len(), ejected) {
            return None;
        }
        let duration = live.eject(policy, now_ns())?;
        self.health_generation.fetch_add(1, Ordering::AcqRel);
        state.runtimes[index].metrics.ejections.inc();
        tracing::warn!(
            pool = %self.name,
            backend = %state.backends[index].address,
            consecutive_failures = consecutive,
            ejection_secs = duration.as_secs_f64(),
            "backend ejected by outlier detection"
        );
        Some(duration)
    }

    /// Lifts the outlier ejection of `live` at once; returns whether it was ejected.
    pub fn lift_ejection(&self, live: &LiveBackend) -> bool {
        let now = now_ns();
        let lifted = live.lift_ejection(now);
        if lifted {
            self.health_generation.fetch_add(1, Ordering::AcqRel);
            if live.flags().is_empty() {
                live.restart_warmup(now);
            }
        }
        lifted
    }

    /// Re-admits ejected backends whose ejection time has passed; returns how many.
    pub fn sweep_ejections(&self) -> usize {
        let state = self.state();
        let now = now_ns();
        let mut readmitted = 0;
        for backend in &state.backends {
            if backend.live.uneject_if_due(now) {
                readmitted += 1;
                if backend.live.flags().is_empty() {
                    backend.live.restart_warmup(now);
                }
                tracing::info!(pool = %self.name, backend = %backend.address, "ejection ended; backend re-admitted");
            }
        }
        if readmitted > 0 {
            self.health_generation.fetch_add(1, Ordering::AcqRel);
        }
        readmitted
    }

    /// Counts a request entering the pool until the returned guard drops (retry budget).
    #[inline]
    pub fn enter(self: &Arc<Self>) -> ActiveRequest {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        ActiveRequest {
            pool: Arc::clone(self),
        }
    }

    /// Claims a retry if the retry budget allows: retries in flight stay below
    /// `max(min_retry_concurrency, budget_percent × active requests)` (Envoy's
    /// `retry_budget`). The claim is released when the returned guard drops.
    pub fn try_retry(self: &Arc<Self>, policy: &RetryPolicy) -> Option<ActiveRetry> {
        let active = self.active_requests.load(Ordering::Relaxed);
        let budget = (active * u64::from(policy.budget_percent) / 100)
            .max(u64::from(policy.min_retry_concurrency));
        let claimed = self
            .active_retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < budget).then_some(r + 1)
            })
            .is_ok();
        if claimed {
            self.metrics.retries.inc();
            Some(ActiveRetry {
                pool: Arc::clone(self),
            })
        } else {
            self.metrics.retry_budget_exhausted.inc();
            None
        }
    }

    /// Counts a retry that the budget does not limit: the request again after its
    /// backend provably did not process it (a keep-alive race, an HTTP/2 stream refused
    /// or left unprocessed by a `GOAWAY`), which adds no work for any backend. Such
    /// retries are bounded by `retry.attempts` alone, as HAProxy's and nginx's are.
    pub fn note_free_retry(&self) {
        self.metrics.retries.inc();
    }

    /// Requests currently in the pool (received, response head not yet sent).
    pub fn active_requests(&self) -> u64 {
        self.active_requests.load(Ordering::Relaxed)
    }
}

/// Makes `queue` the release listener of `state`'s backends (new ones; a backend keeps
/// the listener it got first, which is this pool's queue).
fn listen_for_release(state: &PoolState, queue: &Arc<PoolQueue>) {
    for backend in &state.backends {
        backend.live.set_release_listener(Arc::clone(queue) as _);
    }
}

fn compute_panic(state: &PoolState) -> bool {
    let threshold = u64::from(state.settings.panic_threshold);
    if threshold == 0 {
        return false;
    }
    let mut considered = 0u64;
    let mut healthy = 0u64;
    for backend in &state.backends {
        let flags = backend.live.flags();
        if flags.intersects(BackendFlags::ADMIN) {
            continue;
        }
        considered += 1;
        if flags.is_empty() {
            healthy += 1;
        }
    }
    considered > 0 && healthy * 100 < threshold * considered
}

/// A request counted as active in its pool.
#[derive(Debug)]
pub struct ActiveRequest {
    pool: Arc<Pool>,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.pool.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry counted against its pool's retry budget.
#[derive(Debug)]
pub struct ActiveRetry {
    pool: Arc<Pool>,
}

impl Drop for ActiveRetry {
    fn drop(&mut self) {
        self.pool.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::Metrics;

    const SEC: u64 = 1_000_000_000;

    /// A round-robin pool named `name` without backends, with default settings.
    pub(crate) fn empty_pool(name: &str) -> Pool {
        let state = PoolState::new(
            StrategyKind::RoundRobin,
            vec![],
            vec![],
            vec![],
            PoolSettings::default(),
            None,
        );
        Pool::new(name, state, Metrics::new().pool(name))
    }

    fn pool() -> Pool {
        empty_pool("app")
    }

    fn policy(budget_percent: u32) -> HedgePolicy {
        HedgePolicy {
            delay: HedgeDelay::Fixed(Duration::from_millis(10)),
            min_delay: Duration::from_millis(5),
            budget_percent,
            max_body_bytes: 0,
        }
    }

    #[test]
    fn hedge_budget_is_a_share_of_recent_requests() {
        let pool = pool();
        let policy = policy(10);
        // Clock seconds far from 0, as on a running node.
        let t0 = 1_000 * SEC;
        for _ in 0..100 {
            pool.count_hedgeable(t0);
        }
        let granted = (0..20).filter(|_| pool.try_hedge(&policy, t0)).count();
        assert_eq!(granted, 10, "10 % of 100 requests");
        // Later in the window: still spent.
        assert!(!pool.try_hedge(&policy, t0 + 5 * SEC));
        // After a quiet spell the old requests no longer fund hedges: no burst is banked.
        let later = t0 + 2 * HEDGE_BUDGET_WINDOW_SECS * SEC;
        assert!(!pool.try_hedge(&policy, later));
        // One request in a quiet window: the share rounds up to one hedge.
        let quiet = later + 2 * HEDGE_BUDGET_WINDOW_SECS * SEC;
        pool.count_hedgeable(quiet);
        assert!(pool.try_hedge(&policy, quiet));
        assert!(!pool.try_hedge(&policy, quiet));
        let later = quiet + 2 * HEDGE_BUDGET_WINDOW_SECS * SEC;
        for _ in 0..20 {
            pool.count_hedgeable(later);
        }
        let granted = (0..20).filter(|_| pool.try_hedge(&policy, later)).count();
        assert_eq!(granted, 2, "10 % of the 20 requests in the window");
    }

    #[test]
    fn concurrent_hedge_claims_never_overshoot_the_budget() {
        let pool = Arc::new(pool());
        let now = 1_000 * SEC;
        for _ in 0..1_000 {
            pool.count_hedgeable(now);
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    (0..200).filter(|_| pool.try_hedge(&policy(5), now)).count()
                })
            })
            .collect();
        let granted: usize = threads
            .into_iter()
            .map(|t| t.join().expect("claim thread panicked"))
            .sum();
        assert_eq!(granted, 50, "5 % of 1000 requests, across 4 threads");
    }
}
