//! Prometheus metrics of the data plane.
//!
//! Metric families are registered once, named after what they measure (Prometheus
//! conventions: `_total` counters, `_seconds` durations), each with a help string. The
//! per-backend series used on every request are resolved once, when the backend joins a
//! pool ([`BackendMetrics`]), so the request path only touches atomics and never hashes a
//! label set. Gauges that mirror live state (`fulcrum_backend_up`,
//! `fulcrum_backend_in_flight`) are filled in at scrape time from that state.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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

/// Labels of responses Fulcrum generated itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalReplyLabels {
    /// Listener name.
    pub listener: String,
    /// HTTP status code.
    pub code: u16,
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

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~16 s, doubling.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric family of a node, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    responses: Family<ResponseLabels, Counter>,
    duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    upstream_errors: Family<ErrorLabels, Counter>,
    retries: Family<PoolLabels, Counter>,
    ejections: Family<BackendLabels, Counter>,
    health_transitions: Family<HealthLabels, Counter>,
    /// `fulcrum_backend_up`: 1 when the backend may receive traffic, set at scrape time.
    pub backend_up: Family<BackendLabels, Gauge>,
    /// `fulcrum_backend_in_flight`: requests in flight, set at scrape time.
    pub backend_in_flight: Family<BackendLabels, Gauge>,
    local_replies: Family<LocalReplyLabels, Counter>,
    /// `fulcrum_connections_accepted_total`: client connections accepted, all listeners.
    pub connections_accepted: Counter<u64, AtomicU64>,
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
        let duration = Family::<BackendLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
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
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "fulcrum_ejections",
            "Ejections by outlier detection",
            ejections.clone(),
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
        let connections_accepted = Counter::default();
        registry.register(
            "fulcrum_connections_accepted",
            "Client connections accepted on all listeners",
            connections_accepted.clone(),
        );
        Self {
            registry,
            responses,
            duration,
            upstream_errors,
            retries,
            ejections,
            health_transitions,
            backend_up,
            backend_in_flight,
            local_replies,
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
            timeouts: error("timeout"),
            duration: self.duration.get_or_create_owned(&labels),
            ejections: self.ejections.get_or_create_owned(&labels),
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
        for kind in ["connect_failure", "reset", "timeout"] {
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
    }

    /// The retry counter of a pool.
    pub fn retries(&self, pool: &str) -> Counter {
        self.retries.get_or_create_owned(&PoolLabels {
            pool: pool.to_owned(),
        })
    }

    /// The counter of local replies with `code` on `listener`.
    pub fn local_replies(&self, listener: &str, code: u16) -> Counter {
        self.local_replies.get_or_create_owned(&LocalReplyLabels {
            listener: listener.to_owned(),
            code,
        })
    }

    /// Encodes every family in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One backend's pre-resolved series; cloning shares the underlying atomics.
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    responses: [Counter; 5],
    /// Connect failures.
    pub connect_failures: Counter,
    /// Failures after connecting, before a response head.
    pub resets: Counter,
    /// Response header timeouts.
    pub timeouts: Counter,
    /// Exchange durations (seconds).
    pub duration: Histogram,
    /// Ejections by outlier detection.
    pub ejections: Counter,
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
