//! Prometheus metrics of the data plane.
//!
//! Metric families are registered once, named after what they measure (Prometheus
//! conventions: `_total` counters, `_seconds` durations), each with a help string. The
//! per-backend series used on every request are resolved once, when the backend joins a
//! pool ([`BackendMetrics`]), so the request path only touches atomics and never hashes a
//! label set. Gauges that mirror live state (`fulcrum_backend_up`,
//! `fulcrum_backend_in_flight`) are filled in at scrape time from that state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Labels of per-backend series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Pool name.
    pub pool: String,
    /// Backend address as configured.
    pub backend: String,
}

/// Labels of per-backend response counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// Pool name.
    pub pool: String,
    /// Backend address as configured.
    pub backend: String,
    /// `1xx` … `5xx`.
    pub code_class: &'static str,
}

/// Labels of upstream failures that produced no response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Pool name.
    pub pool: String,
    /// Backend address as configured.
    pub backend: String,
    /// `connect_failure`, `reset` or `timeout`.
    pub kind: &'static str,
}

/// Labels of per-pool series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub pool: String,
}

/// Labels of traffic anomaly episodes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabels {
    /// Pool name.
    pub pool: String,
    /// `spike` or `drop`.
    pub kind: &'static str,
}

/// Labels of requests the pool queue refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueRejectionLabels {
    /// Pool name.
    pub pool: String,
    /// `full` or `timeout`.
    pub reason: &'static str,
}

/// Labels of responses Fulcrum generated itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalReplyLabels {
    /// Listener name.
    pub listener: String,
    /// HTTP status code.
    pub code: u16,
}

/// Label of a listener's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// Listener name.
    pub listener: String,
}

/// Labels of a listener's TLS handshakes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsHandshakeLabels {
    /// Listener name.
    pub listener: String,
    /// `ok`, `error` (the handshake failed: bad client hello, no shared version or
    /// cipher, unknown server name…) or `timeout` (not done within the listener's
    /// `timeouts.request_header`).
    pub result: &'static str,
}

/// Labels of health state transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    /// Pool name.
    pub pool: String,
    /// Backend address as configured.
    pub backend: String,
    /// `healthy` or `unhealthy`: the state entered.
    pub state: &'static str,
}

const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bound of the first duration bucket: 0.5 ms, in nanoseconds.
const FIRST_BUCKET_NS: u64 = 500_000;
/// Finite duration buckets: 0.5 ms, 1 ms, 2 ms, … 16.384 s (doubling), then `+Inf`.
const FINITE_BUCKETS: usize = 16;

/// A Prometheus histogram of durations with fixed, doubling buckets (0.5 ms … 16.4 s),
/// updated lock-free: three relaxed atomic additions per observation, and the bucket
/// index from integer bit arithmetic. prometheus-client's own `Histogram` takes a mutex
/// and scans its buckets on every observation, which showed in the request path's
/// profile. Cloning shares the counts.
#[derive(Clone, Debug, Default)]
pub struct DurationHistogram {
    inner: Arc<DurationInner>,
}

#[derive(Debug, Default)]
struct DurationInner {
    buckets: [AtomicU64; FINITE_BUCKETS + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl DurationHistogram {
    /// Index of the bucket holding `ns`: the smallest `k` with `ns ≤ 0.5 ms × 2^k`, or the
    /// `+Inf` bucket.
    #[inline]
    fn bucket(ns: u64) -> usize {
        if ns <= FIRST_BUCKET_NS {
            return 0;
        }
        let q = (ns - 1) / FIRST_BUCKET_NS; // ≥ 1
        ((64 - q.leading_zeros()) as usize).min(FINITE_BUCKETS)
    }

    /// Records one duration of `ns` nanoseconds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        let inner = &*self.inner;
        inner.buckets[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
        inner.count.fetch_add(1, Ordering::Relaxed);
        inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let mut buckets = [(0.0, 0u64); FINITE_BUCKETS + 1];
        for (k, (bound, count)) in buckets.iter_mut().enumerate() {
            *bound = if k < FINITE_BUCKETS {
                (FIRST_BUCKET_NS << k) as f64 / 1e9
            } else {
                f64::INFINITY
            };
            *count = inner.buckets[k].load(Ordering::Relaxed);
        }
        // Count from the buckets, so `_count` equals the `+Inf` bucket even while
        // observations race with the scrape.
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

const CLUSTER_NONE: u8 = 0;
const CLUSTER_ONLY: u8 = 1;
const CLUSTER_WITH_STORE: u8 = 2;

/// Every metric family of a node, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// The `fulcrum_cluster_*` families of membership and leadership.
    cluster_registry: Registry,
    /// The coordination store's families (`fulcrum_cluster_store_*`).
    store_registry: Registry,
    /// Which of the two are exported ([`Metrics::enable_cluster`]).
    cluster_scope: AtomicU8,
    responses: Family<ResponseLabels, Counter>,
    duration: Family<BackendLabels, DurationHistogram>,
    upstream_errors: Family<ErrorLabels, Counter>,
    retries: Family<PoolLabels, Counter>,
    retry_budget_exhausted: Family<PoolLabels, Counter>,
    hedges: Family<PoolLabels, Counter>,
    hedges_won: Family<PoolLabels, Counter>,
    queued: Family<PoolLabels, Counter>,
    endpoints_evicted: Family<PoolLabels, Counter>,
    queue_rejections: Family<QueueRejectionLabels, Counter>,
    queue_length: Family<PoolLabels, Gauge>,
    anomalies: Family<AnomalyLabels, Counter>,
    rate: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    rate_forecast: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// `fulcrum_backend_effective_weight`: weight used by strategies, set at scrape time.
    pub backend_effective_weight: Family<BackendLabels, Gauge<f64, AtomicU64>>,
    /// `fulcrum_endpoints`: endpoints tracked per pool, set at scrape time.
    pub endpoints: Family<PoolLabels, Gauge>,
    ejections: Family<BackendLabels, Counter>,
    cancelled: Family<BackendLabels, Counter>,
    tcp_connections: Family<BackendLabels, Counter>,
    health_transitions: Family<HealthLabels, Counter>,
    /// `fulcrum_backend_up`: 1 when the backend may receive traffic, set at scrape time.
    pub backend_up: Family<BackendLabels, Gauge>,
    /// `fulcrum_backend_in_flight`: requests in flight, set at scrape time.
    pub backend_in_flight: Family<BackendLabels, Gauge>,
    local_replies: Family<LocalReplyLabels, Counter>,
    tls_handshakes: Family<TlsHandshakeLabels, Counter>,
    listener_connections: Family<ListenerLabels, Gauge>,
    listener_limited: Family<ListenerLabels, Counter>,
    listener_send_timeouts: Family<ListenerLabels, Counter>,
    /// `fulcrum_connections_accepted_total`: client connections accepted, all listeners.
    pub connections_accepted: Counter<u64, AtomicU64>,
    /// Cluster figures (empty on a single node).
    pub cluster: ClusterMetrics,
}

/// Label `kind` of cluster events (`node_joined`, `node_left`, `node_failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Event kind.
    pub kind: String,
}

/// Label `state` of cluster members (`alive`, `failed`, `left`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Member state.
    pub state: String,
}

/// The cluster layer's metric families; the cluster runtime updates them.
#[derive(Clone, Debug, Default)]
pub struct ClusterMetrics {
    /// `fulcrum_cluster_events_total{kind}`: membership events seen by this node.
    pub events: Family<KindLabels, Counter>,
    /// `fulcrum_cluster_members{state}`: members as this node sees them.
    pub members: Family<StateLabels, Gauge>,
    /// `fulcrum_cluster_leader`: 1 while this node is the leader.
    pub leader: Gauge,
    /// `fulcrum_cluster_leader_changes_total`: times the leader seen by this node changed.
    pub leader_changes: Counter,
    /// `fulcrum_cluster_store_up`: 1 while the coordination store answers (1 with `none`).
    pub store_up: Gauge,
    /// `fulcrum_cluster_store_outages_total`: times the store became unreachable.
    pub store_outages: Counter,
    /// `fulcrum_cluster_config_version`: shared configuration version applied here.
    pub config_version: Gauge,
    /// `fulcrum_cluster_backends_peer_down`: backends out of rotation here because other
    /// nodes see them failing.
    pub peer_down: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let responses = Family::<ResponseLabels, Counter>::default();
        registry.register(
            "fulcrum_requests",
            "Requests forwarded to a backend that got a response, by status class",
            responses.clone(),
        );
        let duration = Family::<BackendLabels, DurationHistogram>::default();
        registry.register(
            "fulcrum_request_duration_seconds",
            "Time from sending a request to a backend to the end of its response body",
            duration.clone(),
        );
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "fulcrum_upstream_errors",
            "Attempts that got no response: connect failure, reset before the response head, or timeout",
            upstream_errors.clone(),
        );
        let retries = Family::<PoolLabels, Counter>::default();
        registry.register("fulcrum_retries", "Retried attempts", retries.clone());
        let retry_budget_exhausted = Family::<PoolLabels, Counter>::default();
        registry.register(
            "fulcrum_retry_budget_exhausted",
            "Retries not made because the pool's retry budget was spent (Envoy's upstream_rq_retry_overflow): the client got the failure",
            retry_budget_exhausted.clone(),
        );
        let hedges = Family::<PoolLabels, Counter>::default();
        registry.register(
            "fulcrum_hedges",
            "Hedged attempts sent (a second copy of a slow request to another backend)",
            hedges.clone(),
        );
        let hedges_won = Family::<PoolLabels, Counter>::default();
        registry.register(
            "fulcrum_hedges_won",
            "Hedged attempts whose response arrived first and was used",
            hedges_won.clone(),
        );
        let queued = Family::<PoolLabels, Counter>::default();
        registry.register(
            "fulcrum_queued_requests",
            "Requests that waited in the pool queue because every backend was at its max_requests",
            queued.clone(),
        );
        let queue_rejections = Family::<QueueRejectionLabels, Counter>::default();
        registry.register(
            "fulcrum_queue_rejections",
            "Requests refused by the pool queue: reason=\"full\" (queue.max_size reached) or \"timeout\" (queue.timeout passed)",
            queue_rejections.clone(),
        );
        let queue_length = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "fulcrum_pool_queue_length",
            "Requests waiting in the pool queue now",
            queue_length.clone(),
        );
        let endpoints_evicted = Family::<PoolLabels, Counter>::default();
        registry.register(
            "fulcrum_endpoints_evicted",
            "Endpoints dropped from a full endpoint table (seen once and idle 10 s, or idle for the latency window) to make room for new ones",
            endpoints_evicted.clone(),
        );
        let anomalies = Family::<AnomalyLabels, Counter>::default();
        registry.register(
            "fulcrum_traffic_anomalies",
            "Request-rate anomaly episodes (spikes and drops against the Holt forecast), counted once when each starts",
            anomalies.clone(),
        );
        let rate = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "fulcrum_pool_request_rate",
            "Requests per second received by the pool in the last complete second",
            rate.clone(),
        );
        let rate_forecast = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "fulcrum_pool_request_rate_forecast",
            "Holt forecast of the pool's request rate for the next second, requests per second",
            rate_forecast.clone(),
        );
        let backend_effective_weight = Family::<BackendLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "fulcrum_backend_effective_weight",
            "Weight strategies use: configured weight × dynamic-weight factor × slow-start factor",
            backend_effective_weight.clone(),
        );
        let endpoints = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "fulcrum_endpoints",
            "Endpoints (method + normalised path) tracked by the pool's statistics",
            endpoints.clone(),
        );
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "fulcrum_ejections",
            "Ejections by outlier detection",
            ejections.clone(),
        );
        let cancelled = Family::<BackendLabels, Counter>::default();
        registry.register(
            "fulcrum_upstream_cancelled",
            "Attempts abandoned before their response head because another attempt of the request answered first (hedge losers)",
            cancelled.clone(),
        );
        let tcp_connections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "fulcrum_tcp_connections",
            "Connections of tcp listeners spliced to the backend that ended without the backend failing (its failures are in fulcrum_upstream_errors_total)",
            tcp_connections.clone(),
        );
        let health_transitions = Family::<HealthLabels, Counter>::default();
        registry.register(
            "fulcrum_health_transitions",
            "Active health check state changes, by the state entered",
            health_transitions.clone(),
        );
        let backend_up = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "fulcrum_backend_up",
            "1 if the backend is in rotation (healthy, not ejected, drained or disabled), else 0",
            backend_up.clone(),
        );
        let backend_in_flight = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "fulcrum_backend_in_flight",
            "Requests in flight to the backend",
            backend_in_flight.clone(),
        );
        let local_replies = Family::<LocalReplyLabels, Counter>::default();
        registry.register(
            "fulcrum_local_replies",
            "Responses generated by Fulcrum itself (no route, no backend, all attempts failed, bad request)",
            local_replies.clone(),
        );
        let tls_handshakes = Family::<TlsHandshakeLabels, Counter>::default();
        registry.register(
            "fulcrum_tls_handshakes",
            "TLS handshakes on listeners with `tls`, by result (ok, error, timeout)",
            tls_handshakes.clone(),
        );
        let listener_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "fulcrum_listener_connections",
            "Client connections open on a listener",
            listener_connections.clone(),
        );
        let listener_limited = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "fulcrum_listener_connections_limited",
            "Times a listener stopped accepting because `max_connections` connections were open",
            listener_limited.clone(),
        );
        let listener_send_timeouts = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "fulcrum_listener_send_timeouts",
            "Client connections closed because the client accepted no response bytes for `timeouts.send`",
            listener_send_timeouts.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "fulcrum_connections_accepted",
            "Client connections accepted on all listeners",
            connections_accepted.clone(),
        );
        let cluster = ClusterMetrics::default();
        // Exported only by a node in a cluster (and the store families only with a
        // store): a single node must not report a store that is "down".
        let mut cluster_registry = Registry::default();
        let mut store_registry = Registry::default();
        cluster_registry.register(
            "fulcrum_cluster_events",
            "Cluster membership events (node_joined, node_left, node_failed) seen by this node",
            cluster.events.clone(),
        );
        cluster_registry.register(
            "fulcrum_cluster_members",
            "Cluster members by state as this node sees them",
            cluster.members.clone(),
        );
        cluster_registry.register(
            "fulcrum_cluster_leader",
            "1 while this node is the cluster leader",
            cluster.leader.clone(),
        );
        cluster_registry.register(
            "fulcrum_cluster_leader_changes",
            "Changes of the cluster leader seen by this node",
            cluster.leader_changes.clone(),
        );
        store_registry.register(
            "fulcrum_cluster_store_up",
            "1 while the coordination store answers",
            cluster.store_up.clone(),
        );
        store_registry.register(
            "fulcrum_cluster_store_outages",
            "Times the coordination store became unreachable",
            cluster.store_outages.clone(),
        );
        cluster_registry.register(
            "fulcrum_cluster_config_version",
            "Version of the shared cluster configuration applied on this node",
            cluster.config_version.clone(),
        );
        cluster_registry.register(
            "fulcrum_cluster_backends_peer_down",
            "Backends out of rotation on this node because other nodes see them failing",
            cluster.peer_down.clone(),
        );
        Self {
            cluster,
            registry,
            cluster_registry,
            store_registry,
            cluster_scope: AtomicU8::new(CLUSTER_NONE),
            responses,
            duration,
            upstream_errors,
            retries,
            retry_budget_exhausted,
            endpoints_evicted,
            hedges,
            hedges_won,
            queued,
            queue_rejections,
            queue_length,
            anomalies,
            rate,
            rate_forecast,
            backend_effective_weight,
            endpoints,
            ejections,
            cancelled,
            tcp_connections,
            health_transitions,
            backend_up,
            backend_in_flight,
            local_replies,
            tls_handshakes,
            listener_connections,
            listener_limited,
            listener_send_timeouts,
            connections_accepted,
        }
    }

    /// The series of one backend, resolved once.
    pub fn backend(&self, pool: &str, backend: &str) -> BackendMetrics {
        let labels = BackendLabels {
            pool: pool.to_owned(),
            backend: backend.to_owned(),
        };
        let response = |code_class| {
            self.responses.get_or_create_owned(&ResponseLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                code_class,
            })
        };
        let error = |kind| {
            self.upstream_errors.get_or_create_owned(&ErrorLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                kind,
            })
        };
        BackendMetrics {
            responses: CODE_CLASSES.map(response),
            connect_failures: error("connect_failure"),
            resets: error("reset"),
            body_failures: error("body"),
            timeouts: error("timeout"),
            duration: self.duration.get_or_create_owned(&labels),
            ejections: self.ejections.get_or_create_owned(&labels),
            cancelled: self.cancelled.get_or_create_owned(&labels),
            tcp_connections: self.tcp_connections.get_or_create_owned(&labels),
            became_healthy: self.health_transitions.get_or_create_owned(&HealthLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                state: "healthy",
            }),
            became_unhealthy: self.health_transitions.get_or_create_owned(&HealthLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                state: "unhealthy",
            }),
        }
    }

    /// Removes a backend's series (it left the configuration).
    pub fn remove_backend(&self, pool: &str, backend: &str) {
        let labels = BackendLabels {
            pool: pool.to_owned(),
            backend: backend.to_owned(),
        };
        for code_class in CODE_CLASSES {
            self.responses.remove(&ResponseLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                code_class,
            });
        }
        for kind in ["connect_failure", "reset", "timeout", "body"] {
            self.upstream_errors.remove(&ErrorLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                kind,
            });
        }
        for state in ["healthy", "unhealthy"] {
            self.health_transitions.remove(&HealthLabels {
                pool: pool.to_owned(),
                backend: backend.to_owned(),
                state,
            });
        }
        self.duration.remove(&labels);
        self.ejections.remove(&labels);
        self.cancelled.remove(&labels);
        self.tcp_connections.remove(&labels);
    }

    /// Removes the series of a pool that left the configuration (its backends' go with
    /// [`Metrics::remove_backend`]), so a deleted pool does not keep exporting its last
    /// request rate and counters. Requests still in flight on it count into detached
    /// series; a pool added again under the name starts from zero, which Prometheus
    /// reads as a counter reset.
    pub fn remove_pool(&self, pool: &str) {
        let labels = PoolLabels {
            pool: pool.to_owned(),
        };
        for family in [
            &self.retries,
            &self.retry_budget_exhausted,
            &self.hedges,
            &self.hedges_won,
            &self.queued,
            &self.endpoints_evicted,
        ] {
            family.remove(&labels);
        }
        self.queue_length.remove(&labels);
        self.rate.remove(&labels);
        self.rate_forecast.remove(&labels);
        for reason in ["full", "timeout"] {
            self.queue_rejections.remove(&QueueRejectionLabels {
                pool: pool.to_owned(),
                reason,
            });
        }
        for kind in ["spike", "drop"] {
            self.anomalies.remove(&AnomalyLabels {
                pool: pool.to_owned(),
                kind,
            });
        }
    }

    /// The series of one pool, resolved once.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let labels = PoolLabels {
            pool: pool.to_owned(),
        };
        let anomaly = |kind| {
            self.anomalies.get_or_create_owned(&AnomalyLabels {
                pool: pool.to_owned(),
                kind,
            })
        };
        PoolMetrics {
            retries: self.retries.get_or_create_owned(&labels),
            retry_budget_exhausted: self.retry_budget_exhausted.get_or_create_owned(&labels),
            hedges: self.hedges.get_or_create_owned(&labels),
            hedges_won: self.hedges_won.get_or_create_owned(&labels),
            queued: self.queued.get_or_create_owned(&labels),
            endpoints_evicted: self.endpoints_evicted.get_or_create_owned(&labels),
            queue_full: self
                .queue_rejections
                .get_or_create_owned(&QueueRejectionLabels {
                    pool: pool.to_owned(),
                    reason: "full",
                }),
            queue_timeouts: self
                .queue_rejections
                .get_or_create_owned(&QueueRejectionLabels {
                    pool: pool.to_owned(),
                    reason: "timeout",
                }),
            queue_length: self.queue_length.get_or_create_owned(&labels),
            spikes: anomaly("spike"),
            drops: anomaly("drop"),
            rate: self.rate.get_or_create_owned(&labels),
            rate_forecast: self.rate_forecast.get_or_create_owned(&labels),
        }
    }

    /// The counter of local replies with `code` on `listener`.
    pub fn local_replies(&self, listener: &str, code: u16) -> Counter {
        self.local_replies.get_or_create_owned(&LocalReplyLabels {
            listener: listener.to_owned(),
            code,
        })
    }

    /// The counter of TLS handshakes on `listener` that ended with `result` (`ok`,
    /// `error`, `timeout`).
    pub fn tls_handshakes(&self, listener: &str, result: &'static str) -> Counter {
        self.tls_handshakes
            .get_or_create_owned(&TlsHandshakeLabels {
                listener: listener.to_owned(),
                result,
            })
    }

    /// The gauge of client connections open on `listener`.
    pub fn listener_connections(&self, listener: &str) -> Gauge {
        self.listener_connections
            .get_or_create_owned(&ListenerLabels {
                listener: listener.to_owned(),
            })
    }

    /// The counter of times `listener` reached its `max_connections`.
    pub fn listener_limited(&self, listener: &str) -> Counter {
        self.listener_limited.get_or_create_owned(&ListenerLabels {
            listener: listener.to_owned(),
        })
    }

    /// The counter of connections of `listener` closed by its `timeouts.send`.
    pub fn listener_send_timeouts(&self, listener: &str) -> Counter {
        self.listener_send_timeouts
            .get_or_create_owned(&ListenerLabels {
                listener: listener.to_owned(),
            })
    }

    /// Exports the cluster families from now on (a node in a cluster), and the
    /// coordination store's with `with_store`. A single node exports neither, so an
    /// alert on `fulcrum_cluster_store_up == 0` does not fire on every single node.
    pub fn enable_cluster(&self, with_store: bool) {
        let scope = if with_store {
            CLUSTER_WITH_STORE
        } else {
            CLUSTER_ONLY
        };
        self.cluster_scope.store(scope, Ordering::Relaxed);
    }

    /// Encodes every exported family in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::with_capacity(16 * 1024);
        let scope = self.cluster_scope.load(Ordering::Relaxed);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if scope >= CLUSTER_ONLY {
            let _ = encode_registry(&mut out, &self.cluster_registry);
        }
        if scope >= CLUSTER_WITH_STORE {
            let _ = encode_registry(&mut out, &self.store_registry);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

/// One pool's pre-resolved series; cloning shares the underlying atomics.
#[derive(Clone, Debug, Default)]
pub struct PoolMetrics {
    /// Retried attempts.
    pub retries: Counter,
    /// Retries refused by the retry budget.
    pub retry_budget_exhausted: Counter,
    /// Hedged attempts sent.
    pub hedges: Counter,
    /// Hedged attempts that won.
    pub hedges_won: Counter,
    /// Requests that waited in the pool queue.
    pub queued: Counter,
    /// Endpoints evicted from the pool's full endpoint table.
    pub endpoints_evicted: Counter,
    /// Requests refused because the pool queue was full.
    pub queue_full: Counter,
    /// Requests refused after waiting `queue.timeout`.
    pub queue_timeouts: Counter,
    /// Requests waiting in the pool queue now.
    pub queue_length: Gauge,
    /// Rate spike episodes started (one per episode, not per anomalous second).
    pub spikes: Counter,
    /// Rate drop episodes started (one per episode, not per anomalous second).
    pub drops: Counter,
    /// Last complete second's request rate.
    pub rate: Gauge<f64, AtomicU64>,
    /// Forecast of the next second's rate.
    pub rate_forecast: Gauge<f64, AtomicU64>,
}

/// One backend's pre-resolved series; cloning shares the underlying atomics.
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    responses: [Counter; 5],
    /// Connect failures.
    pub connect_failures: Counter,
    /// Failures after connecting, before a response head.
    pub resets: Counter,
    /// Responses the backend cut short after their head (closed or reset mid-body).
    pub body_failures: Counter,
    /// Response header timeouts.
    pub timeouts: Counter,
    /// Exchange durations.
    pub duration: DurationHistogram,
    /// Ejections by outlier detection.
    pub ejections: Counter,
    /// Attempts abandoned because another attempt answered first (hedge losers).
    pub cancelled: Counter,
    /// TCP-mode connections that ended without the backend failing.
    pub tcp_connections: Counter,
    /// Transitions to healthy by active checks.
    pub became_healthy: Counter,
    /// Transitions to unhealthy by active checks.
    pub became_unhealthy: Counter,
}

impl BackendMetrics {
    /// Counts a response with status `status`.
    #[inline]
    pub fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].inc();
    }
}

/// Shared handle on a node's metrics.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_buckets_are_upper_inclusive_and_doubling() {
        assert_eq!(DurationHistogram::bucket(0), 0);
        assert_eq!(DurationHistogram::bucket(500_000), 0);
        assert_eq!(DurationHistogram::bucket(500_001), 1);
        assert_eq!(DurationHistogram::bucket(1_000_000), 1);
        assert_eq!(DurationHistogram::bucket(1_000_001), 2);
        assert_eq!(DurationHistogram::bucket(FIRST_BUCKET_NS << 15), 15);
        assert_eq!(
            DurationHistogram::bucket((FIRST_BUCKET_NS << 15) + 1),
            FINITE_BUCKETS
        );
        assert_eq!(DurationHistogram::bucket(u64::MAX), FINITE_BUCKETS);
        for ns in [
            1u64,
            499_999,
            700_000,
            3_000_000,
            90_000_000,
            16_384_000_000,
        ] {
            let k = DurationHistogram::bucket(ns);
            let upper = FIRST_BUCKET_NS << k;
            assert!(ns <= upper, "{ns} above bucket {k}");
            assert!(k == 0 || ns > upper / 2, "{ns} belongs below bucket {k}");
        }
    }

    #[test]
    fn histogram_encodes_cumulative_buckets() {
        let metrics = Metrics::new();
        let b = metrics.backend("app", "127.0.0.1:1");
        for ns in [100_000, 800_000, 800_000, 30_000_000_000] {
            b.duration.observe_ns(ns);
        }
        let text = metrics.encode();
        let line = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("fulcrum_request_duration_seconds_bucket")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .unwrap_or_else(|| panic!("no bucket {le} in:\n{text}"))
                .to_owned()
        };
        assert!(line("0.0005").ends_with(" 1"), "{}", line("0.0005"));
        assert!(line("0.001").ends_with(" 3"), "{}", line("0.001"));
        assert!(line("16.384").ends_with(" 3"), "{}", line("16.384"));
        assert!(line("+Inf").ends_with(" 4"), "{}", line("+Inf"));
        assert!(
            text.contains(
                "fulcrum_request_duration_seconds_count{pool=\"app\",backend=\"127.0.0.1:1\"} 4"
            ),
            "{text}"
        );
    }
}
