//! The typed configuration: one struct per YAML block, every field public and documented
//! with its unit and default. `Default` of each struct is the documented default, so code
//! (`fulcrum demo`, tests) can build a [`Config`] with `..Default::default()` and check it
//! with [`Config::validate`].
//!
//! Values that a [`Config`] returned by [`crate::parse`] or [`crate::load`] is guaranteed to
//! satisfy are stated as "validated: …" on each field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fulcrum_balance::{OutlierPolicy, StrategyKind};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::scalar::{self, HedgeDelay, RetryOn, StatusRange};

/// A whole `fulcrum.yaml`.
///
/// Only `listeners` and `pools` need to be written; every other block has defaults.
///
/// `PartialEq` but not `Eq`: pools hold `f64` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Process settings: worker threads, graceful shutdown.
    pub runtime: RuntimeConfig,
    /// Log level and format.
    pub log: LogConfig,
    /// The admin API listener.
    pub admin: AdminConfig,
    /// Addresses that accept client traffic, and their routes. Validated: at least one;
    /// names and listen addresses unique.
    pub listeners: Vec<ListenerConfig>,
    /// Backend pools by name, in file order. Validated: at least one; names unique and
    /// made of `[A-Za-z0-9_.-]`.
    pub pools: IndexMap<String, PoolConfig>,
    /// Clustering: gossip membership, cluster-wide health, coordination store. `None`
    /// (no `cluster` block, the default) = a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `runtime`: how the process runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the async runtime; 0 (default) = one per CPU core. The command
    /// line's `--threads` overrides it.
    pub threads: usize,
    /// On graceful shutdown, the longest wait for in-flight requests to finish before
    /// connections are closed. Default 30 s.
    #[serde(with = "scalar::duration")]
    pub drain_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// `log`: what is logged and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` `EnvFilter` directive: `info`, `warn,fulcrum_proxy=debug`, …. Default
    /// `info`. Validated: parses as a filter.
    pub level: String,
    /// Line format. Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `text`: human-readable lines.
    #[default]
    Text,
    /// `json`: one JSON object per line.
    Json,
}

/// `admin`: the admin API and dashboard listener.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` the admin API binds. Default `127.0.0.1:9901`. Validated: not the
    /// address of a listener.
    #[serde(with = "scalar::listen_addr")]
    pub listen: SocketAddr,
    /// Bearer token required for mutating admin calls (`POST`); `None` (default) = no
    /// token required. Usually `${FULCRUM_ADMIN_TOKEN}`. Validated: not empty, no
    /// whitespace. Hidden from `Debug` output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token: None,
        }
    }
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One entry of `listeners`: an address that accepts client connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs, metrics and the API. Required. Validated: unique, made of
    /// `[A-Za-z0-9_.-]`.
    pub name: String,
    /// `ip:port` to bind. Required. Port 0 = an ephemeral port. Validated: unique among
    /// listeners and the admin listener (port 0 excepted).
    #[serde(with = "scalar::listen_addr")]
    pub listen: SocketAddr,
    /// `http` (default; HTTP/1.1 and HTTP/2) or `tcp` (pass-through).
    #[serde(default)]
    pub protocol: Protocol,
    /// Client-side timeouts.
    #[serde(default)]
    pub timeouts: ListenerTimeouts,
    /// Most client connections open at once on this listener, over all worker threads
    /// (HAProxy's frontend `maxconn`): when that many are open the listener stops
    /// accepting and further connections wait in the kernel's accept backlog until one
    /// closes. 0 (default) = unlimited. Validated: ≤ 10000000.
    #[serde(default)]
    pub max_connections: u32,
    /// Routes, tried in order; the first that matches picks the pool. Validated: at least
    /// one; each names a pool; a `tcp` listener has exactly one route, without `match`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// TLS termination; absent = plain text. Validated: `http` listeners only; both
    /// files readable PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Normalize request paths before routing, and forward them normalized (RFC 3986
    /// §6.2.2: percent-encoded unreserved characters decoded, `.` and `..` segments
    /// resolved; Envoy's `normalize_path`). Default true. `http` listeners only.
    #[serde(default = "yes")]
    pub normalize_path: bool,
    /// Merge runs of `/` in request paths into one before routing, and forward them
    /// merged (Envoy's `merge_slashes`). Default false: under RFC 3986 `//a` and `/a`
    /// differ. `http` listeners only.
    #[serde(default)]
    pub merge_slashes: bool,
    /// Write one access-log line per request when its response ends (Envoy's access log,
    /// nginx's `access_log`, HAProxy's `option httplog`): an `info` event with target
    /// `fulcrum::access` in the node's log. Default false. Reloadable. `http` listeners
    /// only.
    #[serde(default)]
    pub access_log: bool,
}

fn yes() -> bool {
    true
}

/// `listeners[].tls`: TLS termination with rustls (HAProxy's `bind … ssl crt`, Envoy's
/// `DownstreamTlsContext`). The listener then speaks HTTPS: HTTP/2 or HTTP/1.1 chosen by
/// ALPN (RFC 7301), `X-Forwarded-Proto: https` to backends. The files are read at start
/// and again on every reload (SIGHUP, `POST /api/reload`), so a renewed certificate is
/// picked up without a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first (e.g. Let's Encrypt's
    /// `fullchain.pem`). Required. A relative path is relative to the working directory.
    /// The default certificate: served when the client's SNI names none of
    /// `certificates` (or sends no SNI), unless `strict_sni`.
    pub certificate: PathBuf,
    /// PEM file with the leaf's private key: PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1
    /// (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`). Required.
    pub private_key: PathBuf,
    /// More certificates, each chosen when the client's SNI (RFC 6066 §3) matches one of
    /// its leaf's DNS subject alternative names, exactly or by a `*.` wildcard of one
    /// label (HAProxy's several `crt`, nginx's `server_name` per `server`). Earlier
    /// entries win a name two certificates share; `certificate` is matched first.
    /// Validated: readable PEM, and each leaf has at least one DNS name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificatePair>,
    /// Refuse the handshake (alert `unrecognized_name`) when the client's SNI matches no
    /// certificate or is absent, instead of serving `certificate` (HAProxy's
    /// `strict-sni`). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict_sni: bool,
    /// PEM file of the CA certificates client certificates must chain to (mutual TLS;
    /// HAProxy's `ca-file` with `verify required`, Envoy's `validation_context` with
    /// `require_client_certificate`). Absent = clients are not asked for a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `required` (default; a client without a valid certificate fails
    /// the handshake) or `optional` (a client may present none, but one it presents must
    /// be valid; HAProxy's `verify optional`). Validated: only with `client_ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
    /// Lowest protocol version accepted: `1.2` (default) or `1.3`.
    #[serde(default)]
    pub min_version: TlsVersion,
}

impl TlsConfig {
    /// The certificate and key files in matching order: `("", certificate,
    /// private_key)` first, then `("certificates[i].", …)` — the first element is the
    /// key path of the pair relative to `tls.`, for locating errors.
    pub fn pairs(&self) -> impl Iterator<Item = (String, &std::path::Path, &std::path::Path)> {
        std::iter::once((
            String::new(),
            self.certificate.as_path(),
            self.private_key.as_path(),
        ))
        .chain(self.certificates.iter().enumerate().map(|(i, pair)| {
            (
                format!("certificates[{i}]."),
                pair.certificate.as_path(),
                pair.private_key.as_path(),
            )
        }))
    }
}

/// One entry of `listeners[].tls.certificates` or the client certificate of
/// `pools.*.tls`: a PEM certificate chain (leaf first) and its private key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    /// PEM file with the certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM file with the leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
}

/// `listeners[].tls.client_auth`: whether a client certificate is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Every client must present a certificate that chains to `client_ca`.
    #[default]
    Required,
    /// A client may present no certificate; one it presents must be valid.
    Optional,
}

/// `pools.*.tls`: TLS (rustls, TLS 1.2 and 1.3, ALPN `http/1.1` or `h2`) on the
/// connections to the pool's backends and their health checks. The backend's
/// certificate is always verified (RFC 5280 path validation, name per RFC 6125).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA certificates to trust (e.g. an internal CA); absent = the
    /// system's trust store (`/etc/ssl/certs` on Debian). Validated: readable PEM with at
    /// least one certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The name to send (SNI) and verify the certificate against; absent = the host of
    /// each backend's address (a DNS name, or an IP address checked against IP SANs).
    /// Validated: a DNS name or IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM file with the client certificate chain (leaf first) presented to backends
    /// that ask for one (mutual TLS; HAProxy's `server … crt`, nginx's
    /// `proxy_ssl_certificate`). Validated: set together with `private_key`, readable
    /// PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    /// PEM file with the client certificate's private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<PathBuf>,
}

/// `listeners[].tls.min_version`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    /// TLS 1.2 (RFC 5246) and 1.3.
    #[default]
    V1_2,
    /// TLS 1.3 (RFC 8446) only.
    V1_3,
}

impl TlsVersion {
    /// `1.2` or `1.3`.
    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

impl Serialize for TlsVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    /// `"1.2"`/`"1.3"`, also written unquoted (YAML reads `1.2` as a number).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TlsVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a TLS version: 1.2 or 1.3")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TlsVersion, E> {
                match v {
                    "1.2" => Ok(TlsVersion::V1_2),
                    "1.3" => Ok(TlsVersion::V1_3),
                    _ => Err(E::custom(format!(
                        "unsupported TLS version `{v}`: expected 1.2 or 1.3"
                    ))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TlsVersion, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TlsVersion, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TlsVersion, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for ListenerConfig {
    /// An `http` listener with an empty name on `127.0.0.1:0` and no routes: fill in
    /// `name` and `routes` before use.
    fn default() -> Self {
        Self {
            name: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            protocol: Protocol::Http,
            timeouts: ListenerTimeouts::default(),
            max_connections: 0,
            routes: Vec::new(),
            tls: None,
            normalize_path: true,
            merge_slashes: false,
            access_log: false,
        }
    }
}

/// `listeners[].protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `http`: HTTP/1.1 and HTTP/2 (auto-detected); routes match on host, path, headers.
    #[default]
    Http,
    /// `tcp`: raw TCP pass-through to one pool.
    Tcp,
}

/// `listeners[].timeouts`: client-side timeouts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTimeouts {
    /// HTTP/1: longest time from the first byte of a request head to its end (HAProxy's
    /// `timeout http-request`); a slower client is disconnected. Default 10 s.
    /// Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub request_header: Duration,
    /// Longest time a client connection may stay open with no request in progress
    /// (HTTP/1 keep-alive, HTTP/2 with no open stream; HAProxy's `timeout
    /// http-keep-alive`); it is then closed gracefully. Default 60 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub idle: Duration,
    /// Longest time a client may accept none of a response's bytes that are ready to go
    /// out (its socket stays full: it stopped reading); the connection is then closed, so
    /// a slow reader cannot hold a backend connection and its request slot (nginx's
    /// `send_timeout`, HAProxy's `timeout client`). Default 60 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub send: Duration,
}

impl Default for ListenerTimeouts {
    fn default() -> Self {
        Self {
            request_header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(60),
        }
    }
}

/// One entry of `listeners[].routes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// What a request must match; `None` (no `match` key) matches every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<RouteMatch>,
    /// The pool that serves matching requests. Required. Validated: names a pool.
    pub pool: String,
    /// Tags a backend must carry (all of them, exact values) to serve this route, e.g.
    /// `{ gpu: "true", zone: a }`; empty (default) = every backend of the pool. A request
    /// whose pool has no eligible backend with these tags gets `503`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backend_tags: BTreeMap<String, String>,
    /// Local rate limit of the route; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

/// `routes[].rate_limit`: a token bucket (GCRA, as implemented by the `governor` crate)
/// in front of the route's pool, like nginx's `limit_req` or Envoy's local rate limit.
/// A request over the limit is answered `429` with `Retry-After` and never reaches a
/// backend. The limit is per node: with N nodes sharing the traffic the cluster admits
/// up to N times it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate, `N/s`, `N/m` or `N/h` (N = 1..=1000000), e.g. `100/s`. Required.
    #[serde(with = "scalar::rate")]
    pub rate: Rate,
    /// Requests admitted at once above the sustained rate (the bucket size), 1..=1000000.
    /// Default: N of `rate` (one second's, minute's or hour's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `route` (default): one bucket for all requests of the route; `client_ip`: one
    /// bucket per client address (buckets that have refilled are dropped every 10 s, so
    /// memory follows the clients active within a refill time).
    #[serde(default)]
    pub per: RateLimitKey,
}

impl RateLimitConfig {
    /// The bucket size: `burst`, else the rate's N.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rate.count)
    }
}

/// A rate: `count` requests per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Requests per period (1..=1000000).
    pub count: u32,
    /// The period: 1 s, 1 min or 1 h.
    pub per: Duration,
}

impl Rate {
    /// The time one request's token takes to come back: `per / count`.
    pub fn period(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// `routes[].rate_limit.per`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitKey {
    /// One bucket for the route.
    #[default]
    Route,
    /// One bucket per client IP address (the TCP peer).
    ClientIp,
}

/// `routes[].match`: every condition given must hold; none given matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteMatch {
    /// Host (the `Host` header or `:authority`, port ignored), compared without case:
    /// `api.example.com`, or `*.example.com` for any subdomain (not the bare
    /// `example.com`). Validated: a host name without port, optionally with a leading `*.`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix, e.g. `/api/`: a plain string prefix, so `/api` also matches `/apis`.
    /// Validated: starts with `/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// A request header that must be present (with the given value, if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
}

/// `match.header`: a header condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, compared without case. Required. Validated: an HTTP token.
    pub name: String,
    /// Exact value the header must have; `None` = the header only has to be present.
    /// Validated: no control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// One entry of `pools`: a named group of backends and the policies that serve them.
///
/// The strategy-specific blocks (`hash`, `duration_class`, `tail_aware`, `response_time`)
/// are read only by their strategy but validated whatever the strategy is, since the
/// strategy can be changed at run time through the admin API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// How a backend is picked for each request. Default `round_robin`; names in
    /// `fulcrum_balance::StrategyKind::NAMES`.
    #[serde(with = "scalar::strategy")]
    pub strategy: StrategyKind,
    /// The upstream servers. Validated: at least one; addresses unique within the pool.
    pub backends: Vec<BackendConfig>,
    /// Upstream-side timeouts.
    pub timeouts: UpstreamTimeouts,
    /// Retries of failed requests on other backends.
    pub retry: RetryConfig,
    /// `max_requests` of the backends that set none (0), including discovered,
    /// registered and API-added ones (HAProxy's `default-server maxconn`); 0 (default) =
    /// unlimited. Validated: ≤ 1000000.
    pub default_max_requests: u32,
    /// Where requests wait when every backend is at its `max_requests`.
    pub queue: QueueConfig,
    /// Active health checks; `None` (default) = none, backends count as healthy until
    /// outlier detection says otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive health: ejection of backends that keep failing.
    pub outlier_detection: OutlierDetectionConfig,
    /// Percent 0..=100 (Envoy's `healthy_panic_threshold`): when fewer than this share of
    /// backends is healthy, requests go to all backends rather than overload the few left.
    /// 0 disables panic mode. Default 0 (off, as HAProxy and nginx: with Envoy's 50, two
    /// frozen backends of three were put back in rotation and timed out a third of the
    /// requests while the third backend could carry them all).
    pub panic_threshold: u8,
    /// The HTTP version spoken to the pool's backends: `http1` (default) or `http2`
    /// (HAProxy's `server … proto h2`, Envoy's `http2_protocol_options`), needed for
    /// gRPC. Health checks use it too. Validated: `http2` only for pools of `http`
    /// listeners.
    pub protocol: UpstreamProtocol,
    /// TLS to the pool's backends (HAProxy's `server … ssl verify required`, nginx's
    /// `proxy_pass https://`); absent = plain HTTP. Health checks use it too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsConfig>,
    /// Live statistics kept per backend and per endpoint.
    pub stats: StatsConfig,
    /// Request-rate history, forecast and anomaly detection.
    pub analysis: AnalysisConfig,
    /// Periodic re-weighting of backends from their observed performance (opt-in).
    pub dynamic_weights: DynamicWeightsConfig,
    /// Envoy's slow start: a new or recovered backend's weight ramps up over a window.
    pub slow_start: SlowStartConfig,
    /// Affinity key and table sizes of `rendezvous`, `ring_hash` and `maglev`.
    pub hash: HashConfig,
    /// Long/short request classes of `duration_class`.
    pub duration_class: DurationClassConfig,
    /// Tail-latency control of `tail_aware`.
    pub tail_aware: TailAwareConfig,
    /// Exploration of `response_time`.
    pub response_time: ResponseTimeConfig,
    /// Request hedging; `None` (default) = no hedging. Present (even `hedge: {}`) = on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeConfig>,
    /// Where backends come from besides `backends`: `static` (default, only the list),
    /// `dns` or `registry`.
    pub discovery: DiscoveryConfig,
}

impl Default for PoolConfig {
    /// A `round_robin` pool with no backends (add at least one before use).
    fn default() -> Self {
        Self {
            strategy: StrategyKind::RoundRobin,
            backends: Vec::new(),
            timeouts: UpstreamTimeouts::default(),
            retry: RetryConfig::default(),
            default_max_requests: 0,
            queue: QueueConfig::default(),
            health_check: None,
            outlier_detection: OutlierDetectionConfig::default(),
            panic_threshold: 0,
            protocol: UpstreamProtocol::Http1,
            tls: None,
            stats: StatsConfig::default(),
            analysis: AnalysisConfig::default(),
            dynamic_weights: DynamicWeightsConfig::default(),
            slow_start: SlowStartConfig::default(),
            hash: HashConfig::default(),
            duration_class: DurationClassConfig::default(),
            tail_aware: TailAwareConfig::default(),
            response_time: ResponseTimeConfig::default(),
            hedge: None,
            discovery: DiscoveryConfig::default(),
        }
    }
}

/// One entry of `pools.*.backends`: an upstream server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `host:port`: IPv4, `[IPv6]` or a DNS name (resolved at startup), port 1..=65535.
    /// Required. Kept as written; it identifies the backend in the API and across
    /// reloads. Validated: well-formed, unique within the pool.
    pub address: String,
    /// Relative share of traffic for weighted strategies, 1..=65535. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels (`zone: a`), shown in the API and usable by strategies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Most requests in flight to this backend at once (HAProxy's server `maxconn`,
    /// Envoy's `max_requests`); 0 (default) = the pool's `default_max_requests`, itself 0
    /// (unlimited) by default. When every eligible backend is
    /// at its limit, requests wait in the pool's `queue`. Set it to the number of
    /// requests the backend serves at once, so requests queue in Fulcrum, where their
    /// order can be chosen, rather than in the backend. Validated: ≤ 1000000.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_requests: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn default_weight() -> u32 {
    1
}

impl Default for BackendConfig {
    /// An empty address with weight 1: fill in `address` before use.
    fn default() -> Self {
        Self {
            address: String::new(),
            weight: default_weight(),
            tags: BTreeMap::new(),
            max_requests: 0,
        }
    }
}

impl BackendConfig {
    /// A backend at `address` with weight 1 and no tags.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ..Self::default()
        }
    }
}

/// `pools.*.timeouts`: upstream-side timeouts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// Longest time to establish a connection to a backend. Default 1 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub connect: Duration,
    /// Longest time from sending the request to receiving the response head. Default
    /// 30 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub response_header: Duration,
    /// Longest time the backend may send nothing while the rest of a response body is
    /// awaited (nginx's `proxy_read_timeout`, HAProxy's `timeout server` once the head has
    /// arrived). Time the client takes to read is not counted. Default 60 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub read: Duration,
    /// Idle timeout of pooled keep-alive upstream connections. Default 60 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub idle: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            response_header: Duration::from_secs(30),
            read: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

/// `pools.*.queue`: the pool queue, where a request waits while every backend it may go
/// to is at its `max_requests` (HAProxy's backend queue with `timeout queue`). Unused
/// unless some backend of the pool has `max_requests`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Most requests waiting at once; a request beyond gets `503 queue_full`. Default
    /// 1024. Validated: 1..=1000000.
    pub max_size: u32,
    /// Longest wait for a backend; then `503 queue_timeout`. Default 5 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub timeout: Duration,
    /// Which waiting request gets a freed slot first. Default `class`.
    pub priority: QueuePriority,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_size: 1024,
            timeout: Duration::from_secs(5),
            priority: QueuePriority::Class,
        }
    }
}

/// `pools.*.protocol`: the HTTP version spoken to backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// `http1` (default): HTTP/1.1, one request at a time per pooled keep-alive
    /// connection.
    #[default]
    Http1,
    /// `http2`: HTTP/2 by prior knowledge over plain TCP (RFC 9113 §3.3), or negotiated
    /// by ALPN `h2` over TLS; one multiplexed connection per backend and worker thread,
    /// as Envoy's per-worker pools. Carries gRPC (trailers, `te: trailers`).
    Http2,
}

/// `pools.*.queue.priority`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePriority {
    /// `fifo`: in arrival order.
    Fifo,
    /// `class` (default): short requests before long ones (the endpoint's class, see
    /// `stats.long_request_threshold`), as if each long request had arrived
    /// `long_request_threshold` later than it did (HAProxy's `set-priority-offset`): a
    /// long request waits at most that much longer than a short one that arrived with
    /// it, so long requests are never starved.
    #[default]
    Class,
}

/// `pools.*.retry`: retries on another backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first try; 0 disables retries. Default 2. Validated: ≤ 10.
    pub attempts: u32,
    /// Retries in flight may be at most this percent of the pool's active requests
    /// (Envoy's retry budget), 0..=100. Default 20.
    pub budget_percent: u8,
    /// Retries allowed in flight regardless of the budget, so a quiet pool can still
    /// retry. Default 3.
    pub min_retry_concurrency: u32,
    /// Failures that are retried. Default `[connect_failure, reset]`.
    pub retry_on: Vec<RetryOn>,
    /// Also retry non-idempotent requests (`POST`, `PATCH`, …) on failures other than
    /// `connect_failure` (which is always safe). Default false.
    pub retry_non_idempotent: bool,
    /// Request bodies with a declared `Content-Length` up to this many bytes are
    /// buffered, so a request that was sent can be sent again (HAProxy's L7 retries and
    /// Envoy's retries likewise need the body buffered). Larger or chunked bodies stream
    /// and are retried only if never sent. 0..=16 MiB; 0 = never buffer. Default 64 KiB.
    pub max_body_bytes: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            budget_percent: 20,
            min_retry_concurrency: 3,
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::Reset],
            retry_non_idempotent: false,
            max_body_bytes: 65_536,
        }
    }
}

/// `pools.*.health_check`: active health checks of every backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `http` (default): a `GET path` whose status must be in `expected_status`; `tcp`: a
    /// connect.
    pub r#type: HealthCheckKind,
    /// Path of the `GET`, http only. Default `/health`. Validated: starts with `/`; left
    /// at the default on a tcp check.
    pub path: String,
    /// `Host` header of the `GET`, http only; `None` (default) = the backend address.
    /// Validated: no whitespace; `None` on a tcp check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Statuses that count as healthy, http only: `200` or `200-399`. Default `200-299`.
    /// Validated: left at the default on a tcp check.
    pub expected_status: StatusRange,
    /// Time between two checks of one backend. Default 2 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub interval: Duration,
    /// Longest wait for one check. Default 1 s. Validated: > 0 and < `interval`.
    #[serde(with = "scalar::duration")]
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy. Default 2.
    /// Validated: ≥ 1.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy. Default 3.
    /// Validated: ≥ 1.
    pub fall: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            r#type: HealthCheckKind::Http,
            path: "/health".to_owned(),
            host: None,
            expected_status: StatusRange::default(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// `health_check.type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// `http`: an HTTP `GET`.
    #[default]
    Http,
    /// `tcp`: a TCP connect.
    Tcp,
}

/// `pools.*.outlier_detection`: passive health (Envoy's outlier detection). On by default
/// with Envoy's defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Consecutive failed attempts (connect error, reset, timeout, 5xx) that eject a
    /// backend; 0 disables outlier detection. Default 5.
    pub consecutive_failures: u32,
    /// Length of a first ejection; the n-th ejection in a row lasts n times this.
    /// Default 30 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub base_ejection_time: Duration,
    /// Upper bound of one ejection. Default 300 s. Validated: ≥ `base_ejection_time`.
    #[serde(with = "scalar::duration")]
    pub max_ejection_time: Duration,
    /// Most backends of the pool ejected at once, in percent 0..=100 (at least one may
    /// always be ejected unless 0). Default 10.
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        OutlierPolicy::default().into()
    }
}

impl From<&OutlierDetectionConfig> for OutlierPolicy {
    fn from(c: &OutlierDetectionConfig) -> Self {
        OutlierPolicy {
            consecutive_failures: c.consecutive_failures,
            base_ejection_time: c.base_ejection_time,
            max_ejection_time: c.max_ejection_time,
            max_ejection_percent: c.max_ejection_percent,
        }
    }
}

impl From<OutlierDetectionConfig> for OutlierPolicy {
    fn from(c: OutlierDetectionConfig) -> Self {
        (&c).into()
    }
}

impl From<OutlierPolicy> for OutlierDetectionConfig {
    fn from(p: OutlierPolicy) -> Self {
        Self {
            consecutive_failures: p.consecutive_failures,
            base_ejection_time: p.base_ejection_time,
            max_ejection_time: p.max_ejection_time,
            max_ejection_percent: p.max_ejection_percent,
        }
    }
}

/// `pools.*.stats`: live statistics per backend and per endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsConfig {
    /// Decay time τ of the peak-EWMA latency estimate: an old sample's weight falls to
    /// 1/e after τ. Default 10 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub ewma_decay: Duration,
    /// Window of the p50/p99 latencies shown by the API. Default 60 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub latency_window: Duration,
    /// N: an endpoint's duration is the average of its last N request durations.
    /// Default 5. Validated: 1..=1024.
    pub stats_window: u32,
    /// Endpoints tracked per pool; beyond this many, new endpoints share one overflow
    /// entry. Default 1000. Validated: 1..=100000.
    pub max_endpoints: u32,
    /// An endpoint is long when its last-N average is at least this. Default 5 s.
    /// Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub long_request_threshold: Duration,
    /// Hysteresis h, a ratio: a long endpoint becomes short again only when its average
    /// falls below `long_request_threshold` × (1 − h). Default 0.2. Validated: finite,
    /// 0 ≤ h < 1.
    pub long_request_hysteresis: f64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            ewma_decay: Duration::from_secs(10),
            latency_window: Duration::from_secs(60),
            stats_window: 5,
            max_endpoints: 1000,
            long_request_threshold: Duration::from_millis(5000),
            long_request_hysteresis: 0.2,
        }
    }
}

/// `pools.*.analysis`: the pool's request-rate history (1 s buckets), its Holt
/// (double exponential smoothing) forecast, and spike/drop detection by a robust z-score
/// (median absolute deviation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    /// Length of the rate history, in 1 s buckets. Default 300 s. Validated: whole
    /// seconds, 10 s..=3600 s.
    #[serde(with = "scalar::duration")]
    pub horizon: Duration,
    /// Holt's level smoothing factor α. Default 0.5. Validated: finite, 0 < α ≤ 1.
    pub holt_alpha: f64,
    /// Holt's trend smoothing factor β. Default 0.1. Validated: finite, 0 < β ≤ 1.
    pub holt_beta: f64,
    /// Robust z-score (deviation from the median in units of 1.4826 × MAD) at or above
    /// which a rate is flagged as a spike or drop. Default 4.0. Validated: finite, > 0.
    pub anomaly_threshold: f64,
    /// Requests per second below which nothing is flagged. Default 5.0. Validated:
    /// finite, ≥ 0.
    pub min_rate: f64,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        Self {
            horizon: Duration::from_secs(300),
            holt_alpha: 0.5,
            holt_beta: 0.1,
            anomaly_threshold: 4.0,
            min_rate: 5.0,
        }
    }
}

/// `pools.*.dynamic_weights`: periodic re-weighting of backends from their observed
/// latency and errors. Off by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicWeightsConfig {
    /// Whether weights are recomputed. Default false.
    pub enabled: bool,
    /// Time between two recomputations. Default 1 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub interval: Duration,
    /// EWMA factor of a new weight: weight ← s × computed + (1 − s) × previous.
    /// Default 0.3. Validated: finite, 0 < s ≤ 1.
    pub smoothing: f64,
}

impl Default for DynamicWeightsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: Duration::from_secs(1),
            smoothing: 0.3,
        }
    }
}

/// `pools.*.slow_start`: Envoy's slow start. For weight-based strategies, a new or
/// recovered backend's effective weight is
/// `weight × max(min_weight_percent / 100, (time_since_start / window) ^ (1 / aggression))`
/// until `window` has passed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlowStartConfig {
    /// Length of the ramp; 0 (default) = slow start off.
    #[serde(with = "scalar::duration")]
    pub window: Duration,
    /// Shape of the ramp: 1.0 (default) is linear, larger values ramp up faster at the
    /// start. Validated: finite, > 0.
    pub aggression: f64,
    /// Floor of the effective weight during the ramp, in percent of the configured
    /// weight. Default 10. Validated: 1..=100.
    pub min_weight_percent: u8,
}

impl Default for SlowStartConfig {
    fn default() -> Self {
        Self {
            window: Duration::ZERO,
            aggression: 1.0,
            min_weight_percent: 10,
        }
    }
}

/// `pools.*.hash`: the affinity key of the hashing strategies (`rendezvous`,
/// `ring_hash`, `maglev`) and their table sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HashConfig {
    /// What is hashed. Default `client_ip`.
    pub key: HashKey,
    /// The header or cookie name, for `key: header` or `key: cookie`. Default `None`.
    /// Validated: set iff `key` is `header` or `cookie`; an HTTP token (header names are
    /// compared without case).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Load bound c of consistent hashing with bounded loads (Mirrokni, Thorup and
    /// Zadimoghaddam, 2018): no backend takes more than c × the average load; a key whose
    /// backend is full goes to the next one. 0 = unbounded. Default 1.25. Validated:
    /// finite, 0 or 1.0..=100.
    pub bounded_load: f64,
    /// Size M of the Maglev lookup table (Eisenbud et al., 2016). Default 65537.
    /// Validated: a prime, 7..=1000003.
    pub table_size: u32,
    /// `ring_hash`: points each unit of a backend's weight places on the Ketama ring
    /// (nginx's `hash … consistent` and libketama use 160). Default 160. Validated:
    /// 1..=10000.
    pub points_per_weight: u32,
    /// `ring_hash`: minimum points on the ring in total; 0 = no minimum (the default). A
    /// minimum makes every backend's point count depend on the pool's total weight, so
    /// more than the changed backend's keys move when it decides. Validated: 0 or
    /// 64..=1000000.
    pub ring_size: u32,
}

impl Default for HashConfig {
    fn default() -> Self {
        Self {
            key: HashKey::ClientIp,
            name: None,
            bounded_load: 1.25,
            table_size: 65537,
            points_per_weight: 160,
            ring_size: 0,
        }
    }
}

/// `hash.key`: what the hashing strategies hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// `header`: the value of the request header `hash.name`.
    Header,
    /// `cookie`: the value of the cookie `hash.name`.
    Cookie,
    /// `path`: the request path, without the query.
    Path,
    /// `client_ip`: the client's IP address (the default).
    #[default]
    ClientIp,
}

impl HashKey {
    /// The configuration name: `header`, `cookie`, `path` or `client_ip`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Cookie => "cookie",
            Self::Path => "path",
            Self::ClientIp => "client_ip",
        }
    }
}

/// `pools.*.duration_class`: the rules of `duration_class`, which keeps short requests
/// off the backends busy with long ones. An endpoint is long or short by
/// `stats.long_request_threshold`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurationClassConfig {
    /// How the short backends are chosen. Default `static`.
    pub mode: DurationClassMode,
    /// Addresses of the backends dedicated to short requests; empty (default) = the
    /// first backend. Validated: each is the address of a backend of this pool, listed
    /// once; not every backend when the pool has two or more; empty with `mode: adaptive`.
    pub short_backends: Vec<String>,
}

/// `duration_class.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurationClassMode {
    /// `static`: the short backends are `short_backends`, fixed.
    #[default]
    Static,
    /// `adaptive`: a share of backends proportional to the long requests' share of the
    /// work is reserved for long requests, recomputed every 100 ms; `short_backends` must
    /// be empty.
    Adaptive,
}

/// `pools.*.tail_aware`: the feedback controller of `tail_aware`, which scores a
/// backend by its expected work (latency EWMA × (in-flight + 1)) plus β × interference
/// (how far its windowed p99 exceeds its p50) plus γ × the age of its oldest request in
/// flight (head-of-line blocking).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TailAwareConfig {
    /// The p99 latency the controller aims for. Default 200 ms. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub target_p99: Duration,
    /// Initial interference weight β. Default 1.0. Validated: finite, ≥ 0.
    pub beta: f64,
    /// Initial head-of-line age weight γ. Default 1.0. Validated: finite, ≥ 0.
    pub gamma: f64,
    /// Whether β and γ adapt by feedback on the observed p99 against `target_p99`.
    /// Default true.
    pub adapt: bool,
}

impl Default for TailAwareConfig {
    fn default() -> Self {
        Self {
            target_p99: Duration::from_millis(200),
            beta: 1.0,
            gamma: 1.0,
            adapt: true,
        }
    }
}

/// `pools.*.response_time`: settings of `response_time`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseTimeConfig {
    /// Share of picks that go to a random eligible backend rather than the fastest, so
    /// that every backend's response time stays measured. Default 0.05. Validated:
    /// finite, 0..=0.5.
    pub exploration: f64,
}

impl Default for ResponseTimeConfig {
    fn default() -> Self {
        Self { exploration: 0.05 }
    }
}

/// `pools.*.hedge`: request hedging ("The Tail at Scale", Dean and Barroso, 2013): when
/// a request has no response head after `delay`, a second attempt goes to another
/// backend and the first response wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeConfig {
    /// When the second attempt is sent: a duration (`50ms`) or `p95`, the endpoint's
    /// observed 95th-percentile latency. Default `p95`. Validated: a duration is > 0.
    pub delay: HedgeDelay,
    /// Floor of the `p95` delay (unused with a fixed delay). Default 5 ms.
    #[serde(with = "scalar::duration")]
    pub min_delay: Duration,
    /// Hedges sent in the last 10 s are at most this percent of the pool's requests in
    /// the same 10 s. Default 10. Validated: 1..=100.
    pub budget_percent: u8,
    /// Requests with a body of at most this many bytes are buffered and may be hedged;
    /// 0 = only requests without a body. Default 65536 (64 KiB). Validated: ≤ 16777216
    /// (16 MiB).
    pub max_body_bytes: u64,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            delay: HedgeDelay::P95,
            min_delay: Duration::from_millis(5),
            budget_percent: 10,
            max_body_bytes: 65536,
        }
    }
}

/// `pools.*.discovery`: where a pool's backends come from. Discovered backends are added
/// to the ones listed in `backends` (which may then be empty) with weight 1 and no tags
/// (DNS SRV records give their weight).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `static` (default): only `backends`; `dns`: the records of `name`, re-resolved
    /// every `interval`; `registry`: backends registered in the cluster's coordination
    /// store (`POST /api/pools/{pool}/backends` or `fulcrum backend --register`), each
    /// kept while its registration's TTL is refreshed. Validated: `registry` needs a
    /// `cluster.coordination` backend of `redis` or `etcd`.
    pub source: DiscoverySource,
    /// `dns`: the name to resolve: `host:port` for A/AAAA records, or an SRV name such
    /// as `_http._tcp.example.com` (which carries ports and weights). Validated: set iff
    /// `source` is `dns`; `host:port` with a port 1..=65535 unless `record` is `srv`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `dns`: the record type: `a` (A and AAAA, the default) or `srv`.
    pub record: DnsRecord,
    /// `dns`: time between two resolutions; `registry`: time between two reads of the
    /// registry. Default 5 s. Validated: ≥ 100 ms.
    #[serde(with = "scalar::duration")]
    pub interval: Duration,
    /// `dns`: the name servers to ask, as `ip:port` or `ip` (port 53), in order (HAProxy's
    /// `resolvers` `nameserver` lines, Envoy's `dns_resolvers`), for example a Consul
    /// agent's DNS interface at `127.0.0.1:8600`. Empty (default) = the system's
    /// (`/etc/resolv.conf`). Validated: each parses; only with `source: dns`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// Largest `max_requests` and `default_max_requests` a configuration (or the admin API's
/// add-backend call) may set.
pub const MAX_REQUESTS_LIMIT: u32 = 1_000_000;

/// A name server of `discovery.nameservers`: `ip:port`, or `ip` with port 53; `None` when
/// `text` is neither.
pub fn parse_nameserver(text: &str) -> Option<std::net::SocketAddr> {
    text.parse::<std::net::SocketAddr>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            source: DiscoverySource::Static,
            name: None,
            record: DnsRecord::A,
            interval: Duration::from_secs(5),
            nameservers: Vec::new(),
        }
    }
}

/// `discovery.source`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoverySource {
    /// Only the backends listed in the configuration.
    #[default]
    Static,
    /// DNS records of `discovery.name`.
    Dns,
    /// Backends registered in the coordination store.
    Registry,
}

/// `discovery.record`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsRecord {
    /// A and AAAA records of a `host:port` name.
    #[default]
    A,
    /// SRV records (RFC 2782): target, port and weight per record.
    Srv,
}

/// `cluster`: this node's place in a cluster of Fulcrum nodes (docs/CLUSTER.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's unique name in the cluster. Default: the host name. Validated: not
    /// empty, `[A-Za-z0-9_.-]`, at most 64 bytes.
    pub node_id: String,
    /// Name of the cluster; nodes gossip only with nodes of the same cluster id.
    /// Default `fulcrum`.
    pub cluster_id: String,
    /// Gossip membership (chitchat: Scuttlebutt anti-entropy, phi-accrual failure
    /// detection).
    pub gossip: GossipConfig,
    /// Free-form labels of this node (`zone: a`), published to the other nodes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// How the nodes' views of a backend are merged into the cluster view: `any`
    /// (default: out of rotation on every node when any node's active check fails it,
    /// or when two nodes eject it passively), `majority` (when more than half of the
    /// nodes that report it see it down) or `local` (each node keeps its own view).
    pub health_merge: HealthMergeRule,
    /// How often this node republishes its view of its backends and its load when
    /// nothing changed (changes are published at once). Default 1 s. Validated: ≥ 100 ms.
    #[serde(with = "scalar::duration")]
    pub publish_interval: Duration,
    /// The coordination store.
    pub coordination: CoordinationConfig,
    /// Longest wait of a write made with `?consistency=quorum|all` for the other nodes to
    /// report the new configuration version. Default 5 s. Validated: > 0.
    #[serde(with = "scalar::duration")]
    pub consistency_timeout: Duration,
    /// Named work items (tenants, keys) assigned to nodes by bounded-load consistent
    /// hashing (`GET /api/cluster/assignments`).
    pub assignments: AssignmentsConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            cluster_id: "fulcrum".to_owned(),
            gossip: GossipConfig::default(),
            tags: BTreeMap::new(),
            health_merge: HealthMergeRule::Any,
            publish_interval: Duration::from_secs(1),
            coordination: CoordinationConfig::default(),
            consistency_timeout: Duration::from_secs(5),
            assignments: AssignmentsConfig::default(),
        }
    }
}

/// The host name (`HOSTNAME`, then `/etc/hostname`), or `fulcrum` when neither is set.
fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fulcrum".to_owned())
}

/// `cluster.gossip`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// UDP address gossip is received on. Default `127.0.0.1:7946`; port 0 = ephemeral.
    #[serde(with = "scalar::listen_addr")]
    pub listen: SocketAddr,
    /// Address the other nodes reach this node at; default = `listen`.
    #[serde(
        default,
        with = "scalar::opt_listen_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub advertise: Option<SocketAddr>,
    /// `host:port` of nodes to contact at start; any live node will do. Default none.
    /// Validated: each `host:port` with a port 1..=65535.
    pub seeds: Vec<String>,
    /// Time between two gossip rounds. Default 200 ms. Validated: 10 ms..=10 s.
    #[serde(with = "scalar::duration")]
    pub interval: Duration,
    /// Phi-accrual suspicion level above which a silent node is declared failed
    /// (Hayashibara et al. 2004; Cassandra uses 8). Default 8.0. Validated: finite, > 0.
    pub phi_threshold: f64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7946)),
            advertise: None,
            seeds: Vec::new(),
            interval: Duration::from_millis(200),
            phi_threshold: 8.0,
        }
    }
}

/// `cluster.health_merge`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthMergeRule {
    /// Down on every node when any node's active check fails it, or two nodes eject it.
    #[default]
    Any,
    /// Down when more than half of the nodes that report the backend see it down.
    Majority,
    /// Every node keeps its own view.
    Local,
}

/// `cluster.coordination`: the store that holds what must survive a node: the leader
/// lease, the shared configuration, the backend registry, persisted statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinationConfig {
    /// `none` (default: gossip only; the leader is the lowest live node id, which is not
    /// partition-safe), `redis` or `etcd`.
    pub backend: CoordinationBackend,
    /// `redis`: the server URL, `redis://host:port[/db]`. Validated: set iff `backend`
    /// is `redis`; starts with `redis://` or `rediss://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `etcd`: client URLs, `http://host:port`. Validated: not empty iff `backend` is
    /// `etcd`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Prefix of every key Fulcrum writes. Default `fulcrum:` (Redis) or `/fulcrum/`
    /// (etcd) when empty.
    pub prefix: String,
    /// Time-to-live of the leader lease; the leader renews it every third of it and
    /// steps down when it could not for two thirds of it. Default 3 s. Validated:
    /// 1 s..=60 s.
    #[serde(with = "scalar::duration")]
    pub lease_ttl: Duration,
    /// Time-to-live of this node's entry in the node registry, refreshed every third of
    /// it. Default 10 s. Validated: 1 s..=300 s.
    #[serde(with = "scalar::duration")]
    pub node_ttl: Duration,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        Self {
            backend: CoordinationBackend::None,
            url: None,
            endpoints: Vec::new(),
            prefix: String::new(),
            lease_ttl: Duration::from_secs(3),
            node_ttl: Duration::from_secs(10),
        }
    }
}

/// `cluster.coordination.backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordinationBackend {
    /// Gossip only.
    #[default]
    None,
    /// A Redis server.
    Redis,
    /// An etcd cluster (v3 API).
    Etcd,
}

/// `cluster.assignments`: seed 004's work assignments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssignmentsConfig {
    /// The work items (tenant names, keys). Default none.
    pub items: Vec<String>,
    /// Bounded-load factor c: no node holds more than ⌈c × items / nodes⌉. Default 1.25.
    /// Validated: finite, 1.0..=10.0.
    pub bounded_load: f64,
}

impl Default for AssignmentsConfig {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            bounded_load: 1.25,
        }
    }
}
