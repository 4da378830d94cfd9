//! From a validated configuration to the [`NodeSpec`] the data plane runs.
//!
//! The configuration crate has already checked shapes, ranges and cross-references; what
//! is left here is what needs the outside world: resolving backend host names (once, at
//! startup or reload) and choosing the worker count.

use std::net::{SocketAddr, ToSocketAddrs};

use fulcrum_balance::LiveBackendConfig;
use fulcrum_config::{Config, HealthCheckKind, Protocol, RetryOn};

use crate::listener::{ClientTimeouts, ListenerProtocol};
use crate::node::{ListenerSpec, NodeSpec, PoolSpec, RouteSpec};
use crate::state::{BackendSpec, HealthCheckSettings, HealthProbe, PoolSettings, RetryPolicy};
use crate::upstream::ConnSettings;

/// A backend address that could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error("pool `{pool}`: cannot resolve backend `{address}`: {reason}")]
pub struct ResolveError {
    /// Pool name.
    pub pool: String,
    /// Backend address as configured.
    pub address: String,
    /// Resolver message.
    pub reason: String,
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
                    }
                })
                .collect(),
        })
        .collect();

    let mut pools = Vec::with_capacity(config.pools.len());
    for (name, p) in &config.pools {
        let mut backends = Vec::with_capacity(p.backends.len());
        for b in &p.backends {
            let addr = resolve(&b.address).map_err(|reason| ResolveError {
                pool: name.clone(),
                address: b.address.clone(),
                reason,
            })?;
            backends.push(BackendSpec {
                address: b.address.clone(),
                addr,
                weight: b.weight,
                tags: b.tags.clone(),
            });
        }
        let mut retry = RetryPolicy {
            attempts: p.retry.attempts,
            budget_percent: u32::from(p.retry.budget_percent),
            min_retry_concurrency: p.retry.min_retry_concurrency,
            on_connect_failure: false,
            on_reset: false,
            on_timeout: false,
            on_status: 0,
            non_idempotent: p.retry.retry_non_idempotent,
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
        pools.push(PoolSpec {
            name: name.clone(),
            strategy: p.strategy,
            backends,
            settings: PoolSettings {
                conn: ConnSettings {
                    connect_timeout: p.timeouts.connect,
                    response_header_timeout: p.timeouts.response_header,
                    idle_timeout: p.timeouts.idle,
                },
                retry,
                outlier: (&p.outlier_detection).into(),
                panic_threshold: p.panic_threshold,
                health_check,
                live: LiveBackendConfig {
                    ewma_decay: p.stats.ewma_decay,
                    latency_window: p.stats.latency_window,
                    ..LiveBackendConfig::default()
                },
                strategy: fulcrum_balance::StrategyParams::default(),
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
