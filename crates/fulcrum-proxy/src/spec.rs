//! From a validated configuration to the [`NodeSpec`] the data plane runs.
//!
//! The configuration crate has already checked shapes, ranges and cross-references; what
//! is left here is what needs the outside world: resolving backend host names (once, at
//! startup or reload) and choosing the worker count.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};

use fulcrum_balance::{DurationClassMode, LiveBackendConfig, SlowStart, StrategyParams};
use fulcrum_config::{Config, HashConfig, HashKey, HealthCheckKind, PoolConfig, Protocol, RetryOn};
use fulcrum_stats::clock::duration_ns;
use fulcrum_stats::{AnalysisConfig, Classifier, DynamicWeightConfig, EndpointConfig};

use crate::listener::{ClientTimeouts, ListenerProtocol};
use crate::node::{ListenerSpec, NodeSpec, PoolSpec, RouteSpec};
use crate::queue::{QueuePriority, QueueSettings};
use crate::state::{
    BackendSpec, HashKeySource, HealthCheckSettings, HealthProbe, HedgeDelay, HedgePolicy,
    PoolSettings, RetryPolicy,
};
use crate::upstream::ConnSettings;

/// Why a configuration could not be turned into a [`NodeSpec`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// A backend address that could not be resolved.
    #[error("pool `{pool}`: cannot resolve backend `{address}`: {reason}")]
    Address {
        /// Pool name.
        pool: String,
        /// Backend address as configured.
        address: String,
        /// Resolver message.
        reason: String,
    },
    /// A pool's `tls` settings that cannot be used (CA file, trust store, server name).
    #[error("pool `{pool}`: tls: {message}")]
    Tls {
        /// Pool name.
        pool: String,
        /// What is wrong.
        message: String,
    },
}

/// Resolves `address` (`host:port`) to its first socket address.
pub fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    address
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no addresses found".to_owned())
}

/// Builds the data-plane description of `config`. `threads` overrides
/// `runtime.threads`; 0 in both means one worker per available CPU.
///
/// # Errors
/// A [`ResolveError`] for the first backend host name that does not resolve.
pub fn node_spec(config: &Config, threads: Option<usize>) -> Result<NodeSpec, ResolveError> {
    let threads = match threads.filter(|&t| t > 0).unwrap_or(config.runtime.threads) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = config
        .listeners
        .iter()
        .map(|l| ListenerSpec {
            name: l.name.clone(),
            listen: l.listen,
            protocol: match l.protocol {
                Protocol::Http => ListenerProtocol::Http,
                Protocol::Tcp => ListenerProtocol::Tcp,
            },
            timeouts: ClientTimeouts {
                request_header: l.timeouts.request_header,
                idle: l.timeouts.idle,
                send: l.timeouts.send,
            },
            tls: l.tls.clone(),
            max_connections: l.max_connections,
            access_log: l.access_log,
            path_normalization: crate::normalize::PathNormalization {
                normalize: l.normalize_path,
                merge_slashes: l.merge_slashes,
            },
            routes: l
                .routes
                .iter()
                .map(|r| {
                    let m = r.r#match.clone().unwrap_or_default();
                    RouteSpec {
                        host: m.host,
                        path_prefix: m.path_prefix,
                        header: m.header.map(|h| (h.name, h.value)),
                        pool: r.pool.clone(),
                        backend_tags: r.backend_tags.clone(),
                        rate_limit: r.rate_limit.clone(),
                    }
                })
                .collect(),
        })
        .collect();

    let mut pools = Vec::with_capacity(config.pools.len());
    for (name, p) in &config.pools {
        let mut backends = Vec::with_capacity(p.backends.len());
        for b in &p.backends {
            let addr = resolve(&b.address).map_err(|reason| ResolveError::Address {
                pool: name.clone(),
                address: b.address.clone(),
                reason,
            })?;
            backends.push(BackendSpec {
                address: b.address.clone(),
                addr,
                weight: b.weight,
                tags: b.tags.clone(),
                max_requests: if b.max_requests > 0 {
                    b.max_requests
                } else {
                    p.default_max_requests
                },
            });
        }
        let protocol = p.protocol;
        let tls = p
            .tls
            .as_ref()
            .map(|t| {
                crate::tls::upstream(t, protocol).map_err(|message| ResolveError::Tls {
                    pool: name.clone(),
                    message,
                })
            })
            .transpose()?;
        let mut retry = RetryPolicy {
            attempts: p.retry.attempts,
            budget_percent: u32::from(p.retry.budget_percent),
            min_retry_concurrency: p.retry.min_retry_concurrency,
            on_connect_failure: false,
            on_reset: false,
            on_timeout: false,
            on_status: 0,
            non_idempotent: p.retry.retry_non_idempotent,
            max_body_bytes: p.retry.max_body_bytes,
        };
        for on in &p.retry.retry_on {
            match on {
                RetryOn::ConnectFailure => retry.on_connect_failure = true,
                RetryOn::Reset => retry.on_reset = true,
                RetryOn::Timeout => retry.on_timeout = true,
                RetryOn::Status(code) => retry.add_status(*code),
            }
        }
        let health_check = p.health_check.as_ref().map(|h| HealthCheckSettings {
            probe: match h.r#type {
                HealthCheckKind::Http => HealthProbe::Http {
                    path: h.path.clone(),
                    host: h.host.clone(),
                    expected: (h.expected_status.start, h.expected_status.end),
                },
                HealthCheckKind::Tcp => HealthProbe::Tcp,
            },
            interval: h.interval,
            timeout: h.timeout,
            rise: h.rise,
            fall: h.fall,
        });
        let strategy = strategy_params(p, &backends);
        pools.push(PoolSpec {
            name: name.clone(),
            strategy: p.strategy,
            backends,
            settings: PoolSettings {
                tag_filters: tag_filters(config, name),
                conn: ConnSettings {
                    connect_timeout: p.timeouts.connect,
                    response_header_timeout: p.timeouts.response_header,
                    read_timeout: p.timeouts.read,
                    idle_timeout: p.timeouts.idle,
                    tls,
                    protocol,
                },
                retry,
                queue: QueueSettings {
                    max_size: p.queue.max_size as usize,
                    timeout: p.queue.timeout,
                    priority: match p.queue.priority {
                        fulcrum_config::QueuePriority::Fifo => QueuePriority::Fifo,
                        fulcrum_config::QueuePriority::Class => QueuePriority::Class {
                            long_offset: p.stats.long_request_threshold,
                        },
                    },
                },
                outlier: (&p.outlier_detection).into(),
                panic_threshold: p.panic_threshold,
                health_check,
                live: LiveBackendConfig {
                    ewma_decay: p.stats.ewma_decay,
                    latency_window: p.stats.latency_window,
                    ..LiveBackendConfig::default()
                },
                strategy,
                hedge: p.hedge.as_ref().map(|h| HedgePolicy {
                    delay: match h.delay {
                        fulcrum_config::HedgeDelay::Fixed(d) => HedgeDelay::Fixed(d),
                        fulcrum_config::HedgeDelay::P95 => HedgeDelay::P95,
                    },
                    min_delay: h.min_delay,
                    budget_percent: u32::from(h.budget_percent),
                    max_body_bytes: h.max_body_bytes,
                }),
                hash_key: hash_key_source(&p.hash),
                endpoints: EndpointConfig {
                    window: p.stats.stats_window as usize,
                    ewma_decay: p.stats.ewma_decay,
                    latency_window: p.stats.latency_window,
                    classifier: Classifier {
                        threshold_ns: duration_ns(p.stats.long_request_threshold),
                        hysteresis: p.stats.long_request_hysteresis,
                    },
                    max_endpoints: p.stats.max_endpoints as usize,
                },
                analysis: AnalysisConfig {
                    horizon: p.analysis.horizon,
                    alpha: p.analysis.holt_alpha,
                    beta: p.analysis.holt_beta,
                    threshold: p.analysis.anomaly_threshold,
                    min_rate: p.analysis.min_rate,
                    ..AnalysisConfig::default()
                },
                dynamic_weights: p.dynamic_weights.enabled.then(|| DynamicWeightConfig {
                    smoothing: p.dynamic_weights.smoothing,
                    ..DynamicWeightConfig::default()
                }),
                dynamic_weights_interval: p.dynamic_weights.interval,
            },
        });
    }
    Ok(NodeSpec {
        listeners,
        pools,
        threads,
        drain_timeout: config.runtime.drain_timeout,
    })
}

/// The distinct backend-tag sets that routes to pool `pool` require, in route order.
fn tag_filters(config: &Config, pool: &str) -> Vec<BTreeMap<String, String>> {
    let mut sets: Vec<BTreeMap<String, String>> = Vec::new();
    for r in config.listeners.iter().flat_map(|l| &l.routes) {
        if r.pool == pool && !r.backend_tags.is_empty() && !sets.contains(&r.backend_tags) {
            sets.push(r.backend_tags.clone());
        }
    }
    sets
}

/// The strategies' parameters from a pool's configuration; `backends` (in configured
/// order) resolves `duration_class.short_backends` addresses to indices.
fn strategy_params(p: &PoolConfig, backends: &[BackendSpec]) -> StrategyParams {
    let short_backends = p
        .duration_class
        .short_backends
        .iter()
        .filter_map(|address| {
            let resolved = resolve(address).ok();
            backends
                .iter()
                .position(|b| b.address == *address || Some(b.addr) == resolved)
        })
        .collect();
    StrategyParams {
        bounded_load: (p.hash.bounded_load > 0.0).then_some(p.hash.bounded_load),
        maglev_table_size: p.hash.table_size as usize,
        ring_points_per_weight: p.hash.points_per_weight as usize,
        ring_size: p.hash.ring_size as usize,
        slow_start: SlowStart {
            window: p.slow_start.window,
            aggression: p.slow_start.aggression,
            min_weight: f64::from(p.slow_start.min_weight_percent) / 100.0,
        },
        short_backends,
        duration_class_mode: match p.duration_class.mode {
            fulcrum_config::DurationClassMode::Static => DurationClassMode::Static,
            fulcrum_config::DurationClassMode::Adaptive => DurationClassMode::Adaptive,
        },
        target_p99: p.tail_aware.target_p99,
        beta: p.tail_aware.beta,
        gamma: p.tail_aware.gamma,
        adapt: p.tail_aware.adapt,
        exploration: p.response_time.exploration,
    }
}

/// Where the affinity key comes from, per `hash.key` and `hash.name` (validated: a header
/// name is a valid token).
fn hash_key_source(hash: &HashConfig) -> HashKeySource {
    let name = hash.name.clone().unwrap_or_default();
    match hash.key {
        HashKey::Header => match http::header::HeaderName::try_from(name.as_str()) {
            Ok(header) => HashKeySource::Header(header),
            // Unreachable after validation; fall back to the client address.
            Err(_) => HashKeySource::ClientIp,
        },
        HashKey::Cookie => HashKeySource::Cookie(name),
        HashKey::Path => HashKeySource::Path,
        HashKey::ClientIp => HashKeySource::ClientIp,
    }
}
