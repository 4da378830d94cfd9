//! A running node's data plane: listeners, worker threads, pools, and background checks.
//!
//! [`Node::start`] binds every listener (failing before anything runs if one cannot be
//! bound), builds the pools, starts the workers, and spawns health checks and ejection
//! sweeps on the calling (control) runtime. The admin API reads and changes the node
//! through the methods here; [`Node::reload`] applies a new [`NodeSpec`] — routes, pools,
//! backends, strategies, policies — without dropping a request, reusing each surviving
//! backend's live statistics, health and pooled connections.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use fulcrum_balance::{Backend, BackendFlags, LiveBackend, PoolView, StrategyKind};
use fulcrum_stats::clock::now_ns;
use http::header::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::health;
use crate::listener::{self, ClientTimeouts, ListenerProtocol, ListenerRuntime, Workers};
use crate::metrics::Metrics;
use crate::router::{HostMatch, Route, Router};
use crate::state::{BackendRuntime, BackendSpec, Pool, PoolSettings, PoolState};
use crate::upstream::ConnPool;

/// A route as declared: conditions and a pool name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteSpec {
    /// `example.com` or `*.example.com`.
    pub host: Option<String>,
    /// Path prefix, starting with `/`.
    pub path_prefix: Option<String>,
    /// Header name and optional exact value.
    pub header: Option<(String, Option<String>)>,
    /// Destination pool name.
    pub pool: String,
    /// Tags a backend must carry to serve the route; empty = any.
    pub backend_tags: BTreeMap<String, String>,
    /// Local rate limit; `None` = none.
    pub rate_limit: Option<fulcrum_config::RateLimitConfig>,
}

/// A listener as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Unique name.
    pub name: String,
    /// Address to bind (port 0 = ephemeral).
    pub listen: SocketAddr,
    /// HTTP or TCP.
    pub protocol: ListenerProtocol,
    /// Client-side timeouts.
    pub timeouts: ClientTimeouts,
    /// Routes, first match wins.
    pub routes: Vec<RouteSpec>,
    /// TLS termination settings; `None` = plain text.
    pub tls: Option<fulcrum_config::TlsConfig>,
    /// Most client connections open at once (HAProxy's frontend `maxconn`); 0 =
    /// unlimited.
    pub max_connections: u32,
    /// Request path normalization before routing (reloadable: it lives in the router).
    pub path_normalization: crate::normalize::PathNormalization,
    /// Whether each request writes an access-log line (reloadable: in the router).
    pub access_log: bool,
}

/// A pool as declared.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    /// Unique name.
    pub name: String,
    /// Strategy.
    pub strategy: StrategyKind,
    /// Backends in order.
    pub backends: Vec<BackendSpec>,
    /// Policies.
    pub settings: PoolSettings,
}

/// Everything the data plane needs to run: the validated, resolved configuration.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Listeners.
    pub listeners: Vec<ListenerSpec>,
    /// Pools in declaration order.
    pub pools: Vec<PoolSpec>,
    /// Worker threads (≥ 1).
    pub threads: usize,
    /// Longest graceful-shutdown wait for in-flight requests.
    pub drain_timeout: Duration,
}

/// Why a node could not start or a reload was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A listener address could not be bound.
    #[error("listener `{listener}`: cannot listen on {addr}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Worker threads could not be started.
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
    /// A route names a pool that does not exist.
    #[error("listener `{listener}`: route to unknown pool `{pool}`")]
    UnknownPool {
        /// Listener name.
        listener: String,
        /// Pool name.
        pool: String,
    },
    /// A route's header condition is not a valid header name or value.
    #[error("listener `{listener}`: invalid header match: {message}")]
    InvalidHeader {
        /// Listener name.
        listener: String,
        /// What is wrong.
        message: String,
    },
    /// A reload changed listeners, which needs a restart.
    #[error("listener changes need a restart: {0}")]
    ListenersChanged(String),
    /// A listener's TLS certificate or key cannot be used.
    #[error("listener `{listener}`: TLS: {message}")]
    Tls {
        /// Listener name.
        listener: String,
        /// What is wrong, naming the file.
        message: String,
    },
    /// A pool's TLS to its backends cannot be built again (its `ca_file`, or the system
    /// trust store).
    #[error("pool `{pool}`: tls: {message}")]
    UpstreamTls {
        /// Pool name.
        pool: String,
        /// What is wrong, naming the file.
        message: String,
    },
}

/// A listener change a reload cannot apply ([`Node::listener_change`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerChange {
    /// The listener's index in `listeners`; `None` when their number changed.
    pub index: Option<usize>,
    /// The changed key of that listener (`listen`, `tls`, ...); empty with no index.
    pub key: &'static str,
    /// What changed, naming the listener.
    pub what: String,
}

impl ListenerChange {
    /// The configuration path of the change: `listeners[0].listen`, or `listeners`.
    pub fn path(&self) -> String {
        match self.index {
            Some(i) => format!("listeners[{i}].{}", self.key),
            None => "listeners".to_owned(),
        }
    }
}

impl std::fmt::Display for ListenerChange {
    /// What changed, and that the running configuration stays until a restart.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; the running configuration stays (listener names, addresses, protocols, \
             timeouts, `max_connections` and TLS on or off take effect on restart; routes, \
             rate limits and certificates reload)",
            self.what
        )
    }
}

/// Reads listener `name`'s certificate and key per `settings` and builds its TLS state.
fn listener_tls(
    name: &str,
    settings: &fulcrum_config::TlsConfig,
) -> Result<crate::tls::TlsState, NodeError> {
    crate::tls::build(settings).map_err(|message| NodeError::Tls {
        listener: name.to_owned(),
        message,
    })
}

/// Builds the TLS state of each listener of `spec` (`None` for plain-text ones), reading
/// the certificate and key files.
fn build_tls(spec: &NodeSpec) -> Result<Vec<Option<crate::tls::TlsState>>, NodeError> {
    spec.listeners
        .iter()
        .map(|l| {
            l.tls
                .as_ref()
                .map(|settings| listener_tls(&l.name, settings))
                .transpose()
        })
        .collect()
}

/// What an operator does to a backend through the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAction {
    /// No new requests; in-flight ones finish (HAProxy `drain`).
    Drain,
    /// Out of rotation for maintenance (HAProxy `maint`).
    Disable,
    /// Back in rotation: clears drain and disable.
    Enable,
}

/// Why an admin change could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    /// No pool has this name.
    #[error("no pool named `{0}`")]
    UnknownPool(String),
    /// The pool has no backend with this address.
    #[error("pool `{pool}` has no backend `{address}`")]
    UnknownBackend {
        /// Pool name.
        pool: String,
        /// Backend address.
        address: String,
    },
}

/// Latency figures of a backend, in milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LatencyMs {
    /// Time-decayed average (τ = `stats.ewma_decay`) of the time to the response head of
    /// successful attempts, without failure penalty
    /// ([`fulcrum_balance::LiveBackend::success_latency_ns`]); `null` before the first
    /// success. What dynamic weights read.
    pub ewma: Option<f64>,
    /// The peak-EWMA cost estimate the `peak_ewma`-family strategies read, decayed to now
    /// ([`fulcrum_balance::LiveBackend::latency_estimate_ns`]): jumps to a slower
    /// response at once and is at least doubled by every failure (up to 60 000 ms), so
    /// it is not a measured latency.
    pub peak_ewma: f64,
    /// Median over the latency window; `null` without data.
    pub p50: Option<f64>,
    /// 99th percentile over the latency window; `null` without data.
    pub p99: Option<f64>,
}

/// A backend's live figures, as the admin API shows them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BackendStatus {
    /// Address as configured.
    pub address: String,
    /// Configured weight.
    pub weight: u32,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// `healthy`, `unhealthy`, `ejected`, `draining` or `disabled`: the state this node
    /// routes by, which in a cluster includes the merged view of the other nodes.
    pub state: &'static str,
    /// This node's own view (its checks and ejections only); differs from `state` when
    /// the cluster's health merge takes the backend out while this node sees it well.
    pub local_state: &'static str,
    /// Whether new requests may go to it now.
    pub in_rotation: bool,
    /// Requests in flight.
    pub in_flight: u64,
    /// Most requests in flight at once (`max_requests`); 0 = unlimited.
    pub max_requests: u32,
    /// Attempts completed (success or failure).
    pub requests: u64,
    /// Failed attempts.
    pub errors: u64,
    /// Attempts abandoned because another attempt of the request answered first (hedge
    /// losers); in neither `requests` nor `errors`.
    pub cancelled: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Times ejected by outlier detection.
    pub ejections: u64,
    /// Seconds until the current ejection ends, if ejected.
    pub ejection_remaining_secs: Option<f64>,
    /// Latency in milliseconds.
    pub latency_ms: LatencyMs,
    /// Idle pooled connections.
    pub idle_connections: usize,
    /// The weight strategies use now: configured weight × dynamic-weight factor ×
    /// slow-start factor (equal to `weight` when neither is active).
    pub effective_weight: f64,
}

/// One endpoint's statistics, as `GET /api/endpoints` shows them (durations in ms).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EndpointStatus {
    /// Pool name.
    pub pool: String,
    /// Method and normalised path (`GET /v1/users/{id}`).
    pub endpoint: String,
    /// Requests since first seen.
    pub count: u64,
    /// Of those, errors (5xx from the backend, or no response).
    pub errors: u64,
    /// Average of the last `stats_window` durations (the class input).
    pub average_ms: f64,
    /// Time-decayed EWMA of durations.
    pub ewma_ms: f64,
    /// Longest duration seen.
    pub max_ms: f64,
    /// Median over the latency window; `null` without data.
    pub p50_ms: Option<f64>,
    /// 95th percentile over the latency window; `null` without data.
    pub p95_ms: Option<f64>,
    /// 99th percentile over the latency window; `null` without data.
    pub p99_ms: Option<f64>,
    /// `unknown`, `short` or `long`.
    pub class: &'static str,
}

/// One second of a pool's request-rate series.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RatePoint {
    /// Second index of the node's monotonic clock.
    pub second: u64,
    /// Requests received in that second.
    pub requests: u64,
}

/// A request-rate anomaly episode: consecutive anomalous seconds in one direction (see
/// [`fulcrum_stats::anomaly`]). Rates are in requests per second.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AnomalyStatus {
    /// Its first anomalous second (index of the node's monotonic clock, in seconds).
    pub second: u64,
    /// How many seconds ago it started (at the time of the API call).
    pub age_secs: u64,
    /// `spike` or `drop`.
    pub kind: &'static str,
    /// Requests observed in its first second.
    pub observed: f64,
    /// Requests the Holt forecast expected for its first second.
    pub forecast: f64,
    /// Largest robust z-score (|observed − forecast| / MAD-based scale) of its seconds.
    pub score: f64,
    /// Whether it is still going on.
    pub ongoing: bool,
    /// Its last anomalous second once it has ended; `None` (null) while ongoing.
    pub end_second: Option<u64>,
    /// Seconds from its first to its last anomalous second so far, both included.
    pub duration_secs: u64,
    /// Anomalous seconds in it (at most `duration_secs`: one normal second may be
    /// tolerated between two anomalous ones).
    pub seconds: u64,
    /// Highest (spike) or lowest (drop) count among its anomalous seconds.
    pub peak_rate: f64,
}

/// A backend's weights, as `GET /api/pools/{pool}/analysis` shows them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightStatus {
    /// Address as configured.
    pub address: String,
    /// Configured weight.
    pub weight: u32,
    /// Dynamic-weight factor (0.1..=10; 1 when dynamic weights are off).
    pub dynamic_factor: f64,
    /// Weight strategies use now.
    pub effective_weight: f64,
}

/// A pool's traffic analysis, as `GET /api/pools/{pool}/analysis` shows it. Rates are in
/// requests per second.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PoolAnalysis {
    /// Pool name.
    pub pool: String,
    /// Complete seconds within the horizon, oldest first.
    pub series: Vec<RatePoint>,
    /// Mean rate over the last 10 s.
    pub sma_10s: Option<f64>,
    /// Mean rate over the last 60 s.
    pub sma_60s: Option<f64>,
    /// Holt level.
    pub level: Option<f64>,
    /// Holt trend (requests per second per second).
    pub trend: Option<f64>,
    /// Holt forecast of the next second's rate.
    pub forecast: Option<f64>,
    /// Recent anomaly episodes (at most 100), oldest first; the ongoing one, if any, last.
    pub anomalies: Vec<AnomalyStatus>,
    /// Anomaly episodes started since the analysis (re)started.
    pub anomalies_total: u64,
    /// Whether dynamic weights are on.
    pub dynamic_weights: bool,
    /// Configured, dynamic and effective weight per backend.
    pub weights: Vec<WeightStatus>,
}

/// A strategy's own figures, as `GET /api/algorithm-metrics` shows them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AlgorithmMetrics {
    /// Strategy name.
    pub strategy: &'static str,
    /// Pool-wide figures by name (e.g. `target_p99_ms`, `beta`, `hedge_rate`).
    pub figures: BTreeMap<&'static str, f64>,
    /// Per-backend figures by name (e.g. `warmup_progress`, `head_age_ms`).
    pub backends: Vec<BackendFigures>,
    /// Hedges sent by the forwarder.
    pub hedges_sent: u64,
    /// Hedges whose response won.
    pub hedges_won: u64,
    /// Retries sent.
    pub retries: u64,
}

/// One backend's strategy figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BackendFigures {
    /// Address as configured.
    pub address: String,
    /// Figures by name.
    pub figures: BTreeMap<&'static str, f64>,
}

/// Backend counts of a pool by state.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BackendCounts {
    /// All backends.
    pub total: usize,
    /// In rotation.
    pub healthy: usize,
    /// Failing active checks.
    pub unhealthy: usize,
    /// Ejected by outlier detection.
    pub ejected: usize,
    /// Drained by an operator.
    pub draining: usize,
    /// Disabled by an operator.
    pub disabled: usize,
}

/// A pool's summary, as the admin API shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PoolSummary {
    /// Name.
    pub name: String,
    /// Strategy name.
    pub strategy: &'static str,
    /// Backend counts.
    pub backends: BackendCounts,
    /// Whether the pool is in panic mode (routing to all backends).
    pub panic: bool,
    /// Requests being handled (including those waiting in the queue).
    pub active_requests: u64,
    /// Requests waiting in the pool queue for a backend below its `max_requests`.
    pub queued_requests: usize,
    /// Whether active health checks run.
    pub health_checks: bool,
}

/// A listener, as the admin API shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Bound address.
    pub listen: String,
    /// `http` or `tcp`.
    pub protocol: &'static str,
}

struct NodeInner {
    pools: ArcSwap<Vec<Arc<Pool>>>,
    listeners: Vec<Arc<ListenerRuntime>>,
    metrics: Arc<Metrics>,
    started: Instant,
    started_at: SystemTime,
    shutdown: CancellationToken,
    workers: Mutex<Option<Workers>>,
    /// Cancels the current generation of health checks and sweeps.
    checks: Mutex<CancellationToken>,
    /// Serialises reloads.
    reload: Mutex<()>,
    threads: usize,
    drain_timeout: Duration,
}

/// A running node. Cheap to clone; every clone controls the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("listeners", &self.inner.listeners)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Binds the listeners, builds the pools, starts `spec.threads` workers, and spawns
    /// health checks on the current tokio runtime (which must outlive the node).
    ///
    /// # Errors
    /// [`NodeError::Bind`] if a listener cannot be bound; [`NodeError::UnknownPool`] or
    /// [`NodeError::InvalidHeader`] for routes the configuration validator should have
    /// caught; [`NodeError::Tls`] if a listener's certificate or key cannot be used;
    /// [`NodeError::Workers`] if threads cannot be spawned.
    pub fn start(spec: &NodeSpec) -> Result<Node, NodeError> {
        let threads = spec.threads.max(1);
        let metrics = Arc::new(Metrics::new());
        let tls = build_tls(spec)?;

        let mut bound = Vec::with_capacity(spec.listeners.len());
        for l in &spec.listeners {
            let (sockets, local) =
                listener::bind(l.listen, threads).map_err(|source| NodeError::Bind {
                    listener: l.name.clone(),
                    addr: l.listen,
                    source,
                })?;
            bound.push((sockets, local));
        }

        let pools: Vec<Arc<Pool>> = spec
            .pools
            .iter()
            .map(|p| {
                Arc::new(Pool::new(
                    &p.name,
                    build_state(p, &HashMap::new(), &metrics, threads, None),
                    metrics.pool(&p.name),
                ))
            })
            .collect();

        let mut listeners = Vec::with_capacity(spec.listeners.len());
        let mut per_worker: Vec<Vec<std::net::TcpListener>> =
            (0..threads).map(|_| Vec::new()).collect();
        for ((l, (sockets, local)), tls) in spec.listeners.iter().zip(bound).zip(tls) {
            let router = build_router(l, &pools, None)?;
            listeners.push(Arc::new(
                ListenerRuntime::new(
                    &l.name, l.protocol, local, router, l.timeouts, tls, &metrics,
                )
                .with_max_connections(l.max_connections, &metrics),
            ));
            for (worker, socket) in sockets.into_iter().enumerate() {
                per_worker[worker].push(socket);
            }
        }

        let shutdown = CancellationToken::new();
        let workers = listener::spawn_workers(
            listeners.clone(),
            per_worker,
            Arc::clone(&metrics),
            shutdown.clone(),
            spec.drain_timeout,
        )
        .map_err(NodeError::Workers)?;

        let node = Node {
            inner: Arc::new(NodeInner {
                pools: ArcSwap::from_pointee(pools),
                listeners,
                metrics,
                started: Instant::now(),
                started_at: SystemTime::now(),
                shutdown,
                workers: Mutex::new(Some(workers)),
                checks: Mutex::new(CancellationToken::new()),
                reload: Mutex::new(()),
                threads,
                drain_timeout: spec.drain_timeout,
            }),
        };
        node.restart_checks();
        node.spawn_rate_limit_sweep();
        for l in node.listeners() {
            tracing::info!(listener = %l.name, address = %l.local_addr, protocol = l.protocol.name(), "listening");
        }
        Ok(node)
    }

    /// Every 10 s until shutdown, drops the per-client rate-limit buckets that have
    /// refilled ([`crate::ratelimit::RouteLimiter::sweep`]) on every route.
    fn spawn_rate_limit_sweep(&self) {
        let (listeners, stop) = (self.inner.listeners.clone(), self.inner.shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for listener in &listeners {
                    for route in listener.router.load().routes() {
                        if let Some(limit) = &route.rate_limit {
                            limit.sweep();
                        }
                    }
                }
            }
        });
    }

    /// (Re)starts health checks and ejection sweeps for the current pools, stopping the
    /// previous generation.
    fn restart_checks(&self) {
        let cancel = CancellationToken::new();
        let previous = std::mem::replace(&mut *self.inner.checks.lock(), cancel.clone());
        previous.cancel();
        for pool in self.inner.pools.load().iter() {
            let state = pool.state();
            tokio::spawn(health::ejection_sweep(Arc::clone(pool), cancel.clone()));
            tokio::spawn(crate::analysis::pool_loop(Arc::clone(pool), cancel.clone()));
            if state.settings.outlier.consecutive_failures == 0 {
                // Outlier detection turned off: its running ejections end with it.
                for (backend, runtime) in state.backends.iter().zip(&state.runtimes) {
                    if pool.lift_ejection(&backend.live) {
                        tracing::info!(
                            pool = %pool.name(),
                            backend = %runtime.address,
                            "outlier detection off; ejection lifted"
                        );
                    }
                }
            }
            let Some(check) = &state.settings.health_check else {
                // No checks any more (removed by a reload): nothing would ever clear a
                // failed check's verdict, so it goes with them — the backends are
                // healthy until outlier detection says otherwise, as without checks.
                for (backend, runtime) in state.backends.iter().zip(&state.runtimes) {
                    if pool.clear_flag(&backend.live, BackendFlags::UNHEALTHY) {
                        runtime.metrics.became_healthy.inc();
                        tracing::info!(
                            pool = %pool.name(),
                            backend = %runtime.address,
                            "health checks removed; backend no longer held unhealthy"
                        );
                    }
                }
                continue;
            };
            for (backend, runtime) in state.backends.iter().zip(&state.runtimes) {
                tokio::spawn(health::check_loop(
                    Arc::clone(pool),
                    Arc::clone(runtime),
                    backend.addr,
                    check.clone(),
                    cancel.clone(),
                ));
            }
        }
    }

    /// Applies a new configuration: routes, pools, backends, strategies and policies, and
    /// TLS settings. A TLS listener's files are read again when its settings changed
    /// (paths, `min_version`) or `reread_certificates` is set (a reload from the file,
    /// which may follow a renewal); otherwise it keeps its server configuration, and
    /// with it its session cache. Listeners must otherwise be unchanged (names,
    /// addresses, protocols, timeouts, TLS on or off); changing them needs a restart.
    /// Backends kept at the same address keep their live statistics, health and
    /// connections. On error nothing is changed.
    pub fn reload(&self, spec: &NodeSpec, reread_certificates: bool) -> Result<(), NodeError> {
        let _serial = self.inner.reload.lock();
        self.check_listeners_unchanged(spec)?;
        let mut tls = Vec::with_capacity(spec.listeners.len());
        for (running, l) in self.inner.listeners.iter().zip(&spec.listeners) {
            let changed = match (&running.tls, &l.tls) {
                (Some(current), Some(next)) => {
                    reread_certificates || current.load().settings != *next
                }
                _ => false,
            };
            tls.push(match (changed, &l.tls) {
                (true, Some(settings)) => Some(listener_tls(&l.name, settings)?),
                _ => None,
            });
        }

        let current = self.inner.pools.load_full();
        let mut reuse: HashMap<(String, String), (SocketAddr, Arc<BackendRuntime>)> =
            HashMap::new();
        for pool in current.iter() {
            let state = pool.state();
            for (b, r) in state.backends.iter().zip(&state.runtimes) {
                reuse.insert(
                    (pool.name().to_owned(), b.address.to_string()),
                    (b.addr, Arc::clone(r)),
                );
            }
        }

        // Build everything before changing anything, so an error leaves the node as it was.
        let mut next_pools = Vec::with_capacity(spec.pools.len());
        let mut swaps = Vec::new();
        for p in &spec.pools {
            let existing = current.iter().find(|existing| existing.name() == p.name);
            let endpoints = existing.map(|pool| Arc::clone(&pool.state().endpoints));
            let state = build_state(
                p,
                &reuse,
                &self.inner.metrics,
                self.inner.threads,
                endpoints,
            );
            match existing {
                Some(existing) => {
                    next_pools.push(Arc::clone(existing));
                    swaps.push((Arc::clone(existing), state));
                }
                None => next_pools.push(Arc::new(Pool::new(
                    &p.name,
                    state,
                    self.inner.metrics.pool(&p.name),
                ))),
            }
        }
        let mut routers = Vec::with_capacity(spec.listeners.len());
        for (l, running) in spec.listeners.iter().zip(self.inner.listeners.iter()) {
            routers.push(build_router(l, &next_pools, Some(&running.router.load()))?);
        }

        let kept: HashSet<(String, String)> = spec
            .pools
            .iter()
            .flat_map(|p| {
                p.backends
                    .iter()
                    .map(move |b| (p.name.clone(), b.address.clone()))
            })
            .collect();
        for (pool, state) in swaps {
            // TLS to the backends changed, or its files were read again (they may hold a
            // new client certificate or CA): pooled connections made with the old
            // identity or trust go, as health checks already use the new one.
            let tls_settings =
                |s: &PoolState| s.settings.conn.tls.as_ref().map(|t| t.settings().clone());
            let renewed = tls_settings(&pool.state()) != tls_settings(&state)
                || (reread_certificates && state.settings.conn.tls.is_some());
            pool.swap_state(state);
            if renewed {
                for runtime in &pool.state().runtimes {
                    runtime.conns.close_all();
                }
            }
        }
        self.inner.pools.store(Arc::new(next_pools));
        for ((listener, router), tls) in self.inner.listeners.iter().zip(routers).zip(tls) {
            listener.set_router(router);
            if let (Some(current), Some(next)) = (&listener.tls, tls) {
                current.store(Arc::new(next));
            }
        }
        for (pool, address) in reuse.keys() {
            if !kept.contains(&(pool.clone(), address.clone())) {
                self.inner.metrics.remove_backend(pool, address);
            }
        }
        for pool in current.iter() {
            if !spec.pools.iter().any(|p| p.name == pool.name()) {
                self.inner.metrics.remove_pool(pool.name());
            }
        }
        self.restart_checks();
        tracing::info!(pools = spec.pools.len(), "configuration reloaded");
        Ok(())
    }

    fn check_listeners_unchanged(&self, spec: &NodeSpec) -> Result<(), NodeError> {
        match self.listener_change(spec) {
            Some(change) => Err(NodeError::ListenersChanged(change.to_string())),
            None => Ok(()),
        }
    }

    /// What `spec` changes in the running listeners that only a restart can apply (their
    /// number, and per listener its name, address, protocol, timeouts, `max_connections`,
    /// TLS on or off), the first such change in configured order; `None` when a reload
    /// can take `spec`'s listeners. [`Node::reload`] refuses a `spec` with a change.
    pub fn listener_change(&self, spec: &NodeSpec) -> Option<ListenerChange> {
        let running = &self.inner.listeners;
        if running.len() != spec.listeners.len() {
            return Some(ListenerChange {
                index: None,
                key: "",
                what: format!(
                    "{} listener(s) running, {} configured",
                    running.len(),
                    spec.listeners.len()
                ),
            });
        }
        for (index, (r, s)) in running.iter().zip(&spec.listeners).enumerate() {
            let same_addr = s.listen == r.local_addr
                || (s.listen.port() == 0 && s.listen.ip() == r.local_addr.ip());
            let (key, what) = if *r.name != *s.name {
                ("name", format!("`name` changed (running `{}`)", r.name))
            } else if !same_addr {
                (
                    "listen",
                    format!("`listen` changed (running on {})", r.local_addr),
                )
            } else if r.protocol != s.protocol {
                ("protocol", "`protocol` changed".to_owned())
            } else if r.timeouts != s.timeouts {
                ("timeouts", "`timeouts` changed".to_owned())
            } else if r.max_connections != s.max_connections {
                ("max_connections", "`max_connections` changed".to_owned())
            } else if r.tls.is_some() != s.tls.is_some() {
                ("tls", "`tls` turned on or off".to_owned())
            } else {
                continue;
            };
            return Some(ListenerChange {
                index: Some(index),
                key,
                what: format!("listener `{}`: {what}", s.name),
            });
        }
        None
    }

    /// Re-reads the certificate and key files of every TLS listener and the CA file (or
    /// system trust store) of every pool with `tls`, with their current settings, and
    /// swaps the new configurations in (a renewed certificate or CA without a
    /// configuration change). New handshakes use them; open connections are unaffected.
    /// Returns how many listeners and pools were reloaded.
    ///
    /// # Errors
    /// [`NodeError::Tls`] for the first listener whose files cannot be used, or
    /// [`NodeError::UpstreamTls`] for the first pool; then nothing changed.
    pub fn reload_certificates(&self) -> Result<usize, NodeError> {
        let _serial = self.inner.reload.lock();
        let mut next = Vec::new();
        for listener in self.inner.listeners.iter() {
            if let Some(tls) = &listener.tls {
                next.push((tls, listener_tls(&listener.name, &tls.load().settings)?));
            }
        }
        // The pools' `ca_file`s (or the system trust store) too, all read before any is
        // installed.
        let pools = self.inner.pools.load();
        let mut upstream = Vec::new();
        for pool in pools.iter() {
            let state = pool.state();
            if let Some(tls) = &state.settings.conn.tls {
                let connector = tls.rebuild().map_err(|message| NodeError::UpstreamTls {
                    pool: pool.name().to_owned(),
                    message,
                })?;
                upstream.push((Arc::clone(pool), tls.clone(), connector));
            }
        }
        let count = next.len() + upstream.len();
        for (tls, state) in next {
            tls.store(Arc::new(state));
        }
        for (pool, tls, connector) in upstream {
            tls.install(connector);
            for runtime in &pool.state().runtimes {
                runtime.conns.close_all();
            }
        }
        Ok(count)
    }

    /// The pools, in declaration order.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.inner.pools.load().iter().cloned().collect()
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.inner
            .pools
            .load()
            .iter()
            .find(|p| p.name() == name)
            .cloned()
    }

    /// The listeners.
    pub fn listeners(&self) -> &[Arc<ListenerRuntime>] {
        &self.inner.listeners
    }

    /// Listener summaries.
    pub fn listener_status(&self) -> Vec<ListenerStatus> {
        self.inner
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.name.to_string(),
                listen: l.local_addr.to_string(),
                protocol: l.protocol.name(),
            })
            .collect()
    }

    /// Time since the node started.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Wall-clock start time.
    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Prometheus text exposition of every metric, with live gauges refreshed.
    pub fn metrics_text(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics.backend_up.clear();
        metrics.backend_in_flight.clear();
        metrics.backend_effective_weight.clear();
        metrics.endpoints.clear();
        for pool in self.inner.pools.load().iter() {
            let state = pool.state();
            let panic = pool.is_panic(&state);
            metrics
                .endpoints
                .get_or_create(&crate::metrics::PoolLabels {
                    pool: pool.name().to_owned(),
                })
                .set(i64::try_from(state.endpoints.len()).unwrap_or(i64::MAX));
            let view = PoolView::new(&state.backends, &[], panic);
            for (i, b) in state.backends.iter().enumerate() {
                let labels = crate::metrics::BackendLabels {
                    pool: pool.name().to_owned(),
                    backend: b.address.to_string(),
                };
                metrics
                    .backend_up
                    .get_or_create(&labels)
                    .set(i64::from(b.live.is_routable(panic)));
                metrics
                    .backend_in_flight
                    .get_or_create(&labels)
                    .set(i64::try_from(b.live.in_flight()).unwrap_or(i64::MAX));
                metrics
                    .backend_effective_weight
                    .get_or_create(&labels)
                    .set(view.effective_weight(i));
            }
        }
        metrics.encode()
    }

    /// Summary of one pool.
    pub fn pool_summary(pool: &Pool) -> PoolSummary {
        let state = pool.state();
        let mut counts = BackendCounts {
            total: state.backends.len(),
            ..BackendCounts::default()
        };
        for b in &state.backends {
            match b.live.flags().state_name() {
                "disabled" => counts.disabled += 1,
                "draining" => counts.draining += 1,
                "unhealthy" => counts.unhealthy += 1,
                "ejected" => counts.ejected += 1,
                _ => counts.healthy += 1,
            }
        }
        PoolSummary {
            name: pool.name().to_owned(),
            strategy: state.kind.name(),
            backends: counts,
            panic: pool.is_panic(&state),
            active_requests: pool.active_requests(),
            queued_requests: pool.queue().len(),
            health_checks: state.settings.health_check.is_some(),
        }
    }

    /// Live figures of every backend of `pool`.
    pub fn backend_status(pool: &Pool) -> Vec<BackendStatus> {
        let state = pool.state();
        let now = now_ns();
        let panic = pool.is_panic(&state);
        let ms = |ns: u64| ns as f64 / 1e6;
        state
            .backends
            .iter()
            .zip(&state.runtimes)
            .zip(&state.tags)
            .map(|((b, r), tags)| {
                let live = &b.live;
                BackendStatus {
                    address: b.address.to_string(),
                    weight: b.weight,
                    tags: tags.clone(),
                    state: live.flags().state_name(),
                    local_state: live.flags().local().state_name(),
                    in_rotation: live.is_routable(panic),
                    in_flight: live.in_flight(),
                    max_requests: live.max_requests(),
                    requests: live.requests(),
                    errors: live.failures(),
                    cancelled: live.cancelled(),
                    consecutive_failures: live.consecutive_failures(),
                    ejections: live.ejections_total(),
                    ejection_remaining_secs: live
                        .ejected_until_ns()
                        .map(|until| until.saturating_sub(now) as f64 / 1e9),
                    latency_ms: LatencyMs {
                        ewma: live.success_latency_ns().map(|ns| ns / 1e6),
                        peak_ewma: live.latency_estimate_ns(now) / 1e6,
                        p50: live.latency_quantile_ns(0.5, now).map(ms),
                        p99: live.latency_quantile_ns(0.99, now).map(ms),
                    },
                    idle_connections: r.conns.idle_count(),
                    effective_weight: PoolView::new(std::slice::from_ref(b), &[], false)
                        .effective_weight(0),
                }
            })
            .collect()
    }

    /// Endpoint statistics of every pool, busiest first within each pool.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let now = now_ns();
        let mut out = Vec::new();
        for pool in self.pools() {
            let state = pool.state();
            out.extend(
                state
                    .endpoints
                    .snapshot(now)
                    .into_iter()
                    .map(|e| EndpointStatus {
                        pool: pool.name().to_owned(),
                        endpoint: e.key,
                        count: e.count,
                        errors: e.errors,
                        average_ms: e.average_ms,
                        ewma_ms: e.ewma_ms,
                        max_ms: e.max_ms,
                        p50_ms: e.p50_ms,
                        p95_ms: e.p95_ms,
                        p99_ms: e.p99_ms,
                        class: e.class.name(),
                    }),
            );
        }
        out
    }

    /// The traffic analysis of `pool`.
    pub fn pool_analysis(pool: &Pool) -> PoolAnalysis {
        let state = pool.state();
        let analysis = pool.analysis().lock();
        let snapshot = analysis.rate.snapshot();
        let current_second = now_ns() / 1_000_000_000;
        let weights = state
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| WeightStatus {
                address: b.address.to_string(),
                weight: b.weight,
                dynamic_factor: analysis.factors.get(i).copied().unwrap_or(1.0),
                effective_weight: PoolView::new(&state.backends, &[], false).effective_weight(i),
            })
            .collect();
        PoolAnalysis {
            pool: pool.name().to_owned(),
            series: snapshot
                .series
                .iter()
                .map(|&(second, requests)| RatePoint { second, requests })
                .collect(),
            sma_10s: snapshot.sma_10s,
            sma_60s: snapshot.sma_60s,
            level: snapshot.level,
            trend: snapshot.trend,
            forecast: snapshot.forecast,
            anomalies: snapshot
                .anomalies
                .iter()
                .map(|a| AnomalyStatus {
                    second: a.start,
                    age_secs: current_second.saturating_sub(a.start),
                    kind: a.kind.name(),
                    observed: a.observed,
                    forecast: a.forecast,
                    score: a.score,
                    ongoing: !a.ended,
                    end_second: a.end(),
                    duration_secs: a.duration_secs(),
                    seconds: a.seconds,
                    peak_rate: a.peak,
                })
                .collect(),
            anomalies_total: snapshot.anomalies_total,
            dynamic_weights: state.settings.dynamic_weights.is_some(),
            weights,
        }
    }

    /// The strategy figures of `pool` (seed 002's algorithm metrics).
    pub fn algorithm_metrics(pool: &Pool) -> AlgorithmMetrics {
        let state = pool.state();
        let now = now_ns();
        let panic = pool.is_panic(&state);
        let view =
            PoolView::new(&state.backends, &[], panic).with_total_in_flight(pool.active_requests());
        let mut figures = BTreeMap::new();
        let mut backends: Vec<BackendFigures> = state
            .backends
            .iter()
            .map(|b| BackendFigures {
                address: b.address.to_string(),
                figures: BTreeMap::new(),
            })
            .collect();
        for figure in state.strategy.figures(&view, now) {
            match figure.backend {
                None => {
                    figures.insert(figure.name, figure.value);
                }
                Some(i) => {
                    if let Some(b) = backends.get_mut(i) {
                        b.figures.insert(figure.name, figure.value);
                    }
                }
            }
        }
        let metrics = pool.metrics();
        AlgorithmMetrics {
            strategy: state.kind.name(),
            figures,
            backends,
            hedges_sent: metrics.hedges.get(),
            hedges_won: metrics.hedges_won.get(),
            retries: metrics.retries.get(),
        }
    }

    /// Switches pool `name` to strategy `kind` for new requests; returns the previous one.
    pub fn switch_strategy(
        &self,
        name: &str,
        kind: StrategyKind,
    ) -> Result<StrategyKind, AdminError> {
        let pool = self
            .pool(name)
            .ok_or_else(|| AdminError::UnknownPool(name.to_owned()))?;
        let previous = pool.switch_strategy(kind);
        tracing::info!(
            pool = name,
            from = previous.name(),
            to = kind.name(),
            "strategy switched"
        );
        Ok(previous)
    }

    /// Drains, disables or enables backend `address` of pool `pool`; returns its new state.
    pub fn set_backend_admin(
        &self,
        pool: &str,
        address: &str,
        action: AdminAction,
    ) -> Result<&'static str, AdminError> {
        let p = self
            .pool(pool)
            .ok_or_else(|| AdminError::UnknownPool(pool.to_owned()))?;
        let state = p.state();
        let index = state
            .position(address)
            .ok_or_else(|| AdminError::UnknownBackend {
                pool: pool.to_owned(),
                address: address.to_owned(),
            })?;
        let live = &state.backends[index].live;
        match action {
            AdminAction::Drain => {
                p.set_flag(live, BackendFlags::DRAINING);
            }
            AdminAction::Disable => {
                p.set_flag(live, BackendFlags::DISABLED);
            }
            AdminAction::Enable => {
                p.clear_flag(live, BackendFlags::DRAINING);
                p.clear_flag(live, BackendFlags::DISABLED);
            }
        }
        let now = live.flags().state_name();
        tracing::info!(
            pool,
            backend = address,
            ?action,
            state = now,
            "backend admin state changed"
        );
        Ok(now)
    }

    /// A token cancelled when the node begins shutting down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Stops accepting, lets in-flight requests finish for up to the drain timeout, and
    /// waits for the workers to exit. Idempotent.
    pub async fn shutdown(&self) {
        tracing::info!(
            drain_timeout_secs = self.inner.drain_timeout.as_secs_f64(),
            "shutting down: draining connections"
        );
        self.inner.shutdown.cancel();
        self.inner.checks.lock().cancel();
        let workers = self.inner.workers.lock().take();
        if let Some(workers) = workers {
            // Joining blocks; keep the control runtime responsive meanwhile.
            let _ = tokio::task::spawn_blocking(move || workers.join()).await;
        }
        tracing::info!("shutdown complete");
    }
}

/// Builds a pool state, reusing runtime state by (pool, address) from `reuse` when the
/// resolved address is unchanged, and the endpoint statistics `endpoints` when their
/// settings are unchanged.
fn build_state(
    spec: &PoolSpec,
    reuse: &HashMap<(String, String), (SocketAddr, Arc<BackendRuntime>)>,
    metrics: &Metrics,
    threads: usize,
    endpoints: Option<Arc<fulcrum_stats::EndpointTable>>,
) -> PoolState {
    let now = now_ns();
    let mut backends = Vec::with_capacity(spec.backends.len());
    let mut runtimes = Vec::with_capacity(spec.backends.len());
    let mut tags = Vec::with_capacity(spec.backends.len());
    for b in &spec.backends {
        let runtime = match reuse.get(&(spec.name.clone(), b.address.clone())) {
            Some((addr, runtime)) if *addr == b.addr => Arc::clone(runtime),
            _ => Arc::new(BackendRuntime {
                address: b.address.as_str().into(),
                live: Arc::new(LiveBackend::new(spec.settings.live, now)),
                conns: ConnPool::new(&b.address, b.addr, threads),
                metrics: metrics.backend(&spec.name, &b.address),
            }),
        };
        runtime.live.set_max_requests(b.max_requests);
        backends.push(Backend {
            address: Arc::clone(&runtime.address),
            addr: b.addr,
            weight: b.weight.max(1),
            live: Arc::clone(&runtime.live),
        });
        runtimes.push(runtime);
        tags.push(b.tags.clone());
    }
    PoolState::new(
        spec.strategy,
        backends,
        runtimes,
        tags,
        spec.settings.clone(),
        endpoints,
    )
}

/// The router of listener `spec` over `pools`. A route's rate limiter is taken over from
/// `previous` (the running router) when the route at the same position has the same
/// limit settings, so a reload keeps its buckets.
fn build_router(
    spec: &ListenerSpec,
    pools: &[Arc<Pool>],
    previous: Option<&Router>,
) -> Result<Router, NodeError> {
    let mut routes = Vec::with_capacity(spec.routes.len());
    for (i, r) in spec.routes.iter().enumerate() {
        let pool =
            pools
                .iter()
                .find(|p| p.name() == r.pool)
                .ok_or_else(|| NodeError::UnknownPool {
                    listener: spec.name.clone(),
                    pool: r.pool.clone(),
                })?;
        let header = match &r.header {
            None => None,
            Some((name, value)) => {
                let invalid = |message: String| NodeError::InvalidHeader {
                    listener: spec.name.clone(),
                    message,
                };
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| invalid(format!("name `{name}`: {e}")))?;
                let value = match value {
                    Some(v) => Some(
                        HeaderValue::from_str(v)
                            .map_err(|e| invalid(format!("value `{v}`: {e}")))?,
                    ),
                    None => None,
                };
                Some((name, value))
            }
        };
        routes.push(Route {
            host: r.host.as_deref().map(HostMatch::parse),
            path_prefix: r.path_prefix.clone(),
            header,
            pool: Arc::clone(pool),
            backend_tags: (!r.backend_tags.is_empty()).then(|| Arc::new(r.backend_tags.clone())),
            rate_limit: r.rate_limit.as_ref().map(|settings| {
                previous
                    .and_then(|p| p.routes().get(i))
                    .and_then(|old| old.rate_limit.as_ref())
                    .filter(|old| old.settings() == settings)
                    .map_or_else(
                        || Arc::new(crate::ratelimit::RouteLimiter::new(settings)),
                        Arc::clone,
                    )
            }),
        });
    }
    let mut router = Router::new(routes).with_path_normalization(spec.path_normalization);
    router.access_log = spec.access_log;
    Ok(router)
}
