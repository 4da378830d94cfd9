//! The coordination store: what must survive a node, kept in Redis or etcd.
//!
//! A [`Store`] is a cheap, cloneable handle over one backend: Redis (`store/redis.rs`,
//! after seed 000's Redis coordination centre) or etcd (`store/etcd.rs`, after seed 004's
//! etcd election, configuration and service registry). Each backend file documents its
//! key layout. The store holds:
//!
//! - the **leader lease** with a **fencing token** (Kleppmann, "How to do distributed
//!   locking", 2016): every lease carries a number that only grows, and the store refuses
//!   leader chores ([`Store::set_cluster_status`], [`Store::gc_stale`]) whose token is
//!   smaller than the highest one it has seen, so a paused ex-leader cannot overwrite the
//!   work of its successor;
//! - the **node registry** (heartbeats with a TTL) and each node's status;
//! - the **shared configuration**: one JSON document with a version, written by
//!   compare-and-set and watched by every node;
//! - the **backend registry**: backends that register themselves with a TTL;
//! - the persisted **endpoint statistics** and the **cluster status** (seed 000's
//!   `request:stats`, `request:long_requests`, `node:status`, `cluster:status`).
//!
//! The handle never blocks on a store that is down: [`Store::connect`] returns at once and
//! (re)connects in the background with exponential backoff; every call is bounded by
//! [`OP_TIMEOUT`] and fails with [`StoreError::Unavailable`], and [`Store::health`] says
//! since when. A node that loses the store keeps serving with its last known state.
//!
//! Sits beside the data plane: the election loop ([`crate::election`]), the admin API
//! and the configuration reload path call it; no request waits on it.

mod etcd;
mod redis;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::etcd::EtcdStore;
use self::redis::RedisStore;

/// Upper bound of one store operation, connection attempt included: a call made while
/// the store is down fails with [`StoreError::Unavailable`] after at most this long.
pub const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// Default key prefix in Redis (every key Fulcrum writes starts with it).
pub const DEFAULT_REDIS_PREFIX: &str = "fulcrum:";

/// Default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/fulcrum/";

/// First delay of the background reconnection backoff.
pub(crate) const RECONNECT_MIN: Duration = Duration::from_millis(100);

/// Longest delay of the background reconnection backoff, jitter included.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Period of the availability probe while the store answers.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Period of the configuration poll that backs up change notifications (Redis pub/sub
/// messages are lost while a subscriber is disconnected).
pub(crate) const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The shared configuration as last seen by [`Store::watch_config`]: its version and
/// document, `None` until one has been read.
pub type ConfigSnapshot = Option<(u64, Arc<str>)>;

/// Where the coordination store is and under which prefix Fulcrum keeps its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    /// A Redis server (seed 000), e.g. `redis://127.0.0.1:6379/0`.
    Redis {
        /// `redis://[user:password@]host:port[/db]` (or `rediss://`, `unix://`).
        url: String,
        /// Prefix of every key, e.g. [`DEFAULT_REDIS_PREFIX`].
        key_prefix: String,
    },
    /// An etcd v3 cluster (seed 004), e.g. `http://127.0.0.1:2379`.
    Etcd {
        /// Client URLs of the members (`http://host:port`).
        endpoints: Vec<String>,
        /// Prefix of every key, e.g. [`DEFAULT_ETCD_PREFIX`].
        prefix: String,
    },
}

impl StoreSettings {
    /// Redis at `url` with the default prefix [`DEFAULT_REDIS_PREFIX`].
    pub fn redis(url: impl Into<String>) -> StoreSettings {
        StoreSettings::Redis {
            url: url.into(),
            key_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
        }
    }

    /// etcd at `endpoints` with the default prefix [`DEFAULT_ETCD_PREFIX`].
    pub fn etcd(endpoints: Vec<String>) -> StoreSettings {
        StoreSettings::Etcd {
            endpoints,
            prefix: DEFAULT_ETCD_PREFIX.to_owned(),
        }
    }
}

/// Why a store operation failed. Every message names the store (`redis`, `etcd`) and the
/// operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is down or unreachable, or did not answer within [`OP_TIMEOUT`]. Retry
    /// later; the handle reconnects by itself.
    #[error("coordination store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with data Fulcrum cannot read (a value not written by Fulcrum,
    /// or by an incompatible version).
    #[error("coordination store returned unreadable data: {0}")]
    Protocol(String),
    /// The store answered but refused the request (a server-side error such as a script
    /// error or an etcd request limit).
    #[error("coordination store refused the request: {0}")]
    Rejected(String),
    /// The settings or an argument cannot be used (bad URL, empty endpoint list, a pool
    /// name with a reserved character). Fix the configuration; retrying will not help.
    #[error("invalid coordination store settings: {0}")]
    Invalid(String),
}

/// A held leader lease: proof that `node_id` was the leader when the lease was granted.
/// Renew it well within its TTL ([`Store::renew`]) and hand its `token` to every fenced
/// leader chore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node that holds the lease.
    pub node_id: String,
    /// Fencing token (Kleppmann): strictly larger for every later lease of the same store.
    /// Redis: the value of `INCR {prefix}leader:fencing`; etcd: the create revision of
    /// the leader key.
    pub token: u64,
    pub(crate) holder: LeaseHolder,
}

/// What a backend needs to renew or release a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseHolder {
    /// The exact value of the Redis leader key, `<node_id>:<token>`.
    Redis { value: String },
    /// The etcd lease the leader key is attached to, and that key.
    Etcd { lease_id: i64, key: String },
}

/// The current leader as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The leader's node id.
    pub node_id: String,
    /// The fencing token of its lease.
    pub token: u64,
}

/// One node in the node registry (written by [`Store::heartbeat`], expires after its TTL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeRecord {
    /// The node id (`cluster.node_id`).
    pub node_id: String,
    /// Its admin API address, `host:port`.
    pub admin: String,
    /// Its listener addresses, `host:port`.
    pub listeners: Vec<String>,
    /// Free-form tags (zone, version, ...).
    pub tags: BTreeMap<String, String>,
    /// Version of the shared configuration the node runs (0 = none).
    pub config_version: u64,
    /// Unix time in milliseconds of the heartbeat that wrote the record; set by
    /// [`Store::heartbeat`], the caller's value is ignored.
    pub updated_ms: u64,
}

/// A backend that registered itself in a pool (expires after its TTL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegisteredBackend {
    /// `host:port`.
    pub address: String,
    /// Relative weight (as in the pool's static `backends`).
    pub weight: u32,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// Most requests in flight at once (0 = the pool's `default_max_requests`); absent in
    /// records written before it existed.
    pub max_requests: u32,
}

/// Statistics of one endpoint (`GET /v1/users/{id}`), as persisted in seed 000's
/// `request:stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointStatRecord {
    /// The endpoint: method and normalised path.
    pub endpoint: String,
    /// Requests seen.
    pub count: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Mean latency in milliseconds.
    pub avg_ms: f64,
    /// Classified as a long request (seed 000: recent mean at or above the threshold).
    pub long: bool,
}

/// Availability of the store as seen by this handle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHealth {
    /// The last operation or probe got an answer. `false` before the first answer.
    pub available: bool,
    /// The last connection-level error, if any (kept after recovery, for display).
    pub last_error: Option<String>,
    /// How many times the store became unavailable (an unreachable store at start
    /// counts once).
    pub outages: u64,
    /// Unix time in milliseconds since which it is unavailable, while it is.
    pub unavailable_since_ms: Option<u64>,
}

/// Outcome of [`Store::put_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutConfig {
    /// Written; the new version.
    Written(u64),
    /// Not written: the stored version is not the expected one.
    Conflict {
        /// The version in the store (0 = none).
        current: u64,
    },
}

/// Outcome of [`Store::gc_stale`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// `false` when the fencing token was stale and nothing was done.
    pub applied: bool,
    /// Nodes whose status, registry record or statistics were removed, sorted.
    pub nodes_removed: Vec<String>,
    /// Endpoints removed from the merged statistics because only removed nodes had
    /// contributed to them.
    pub stats_removed: usize,
}

/// Handle on the coordination store; clones share one connection and background tasks,
/// which stop when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    config_watch: OnceLock<watch::Sender<ConfigSnapshot>>,
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

enum Backend {
    Redis(RedisStore),
    // The etcd client is large (kilobytes of gRPC stubs); the handle is shared anyway.
    Etcd(Box<EtcdStore>),
}

/// Runs `$body` with `$b` bound to the backend, whichever it is.
macro_rules! dispatch {
    ($store:expr, $b:ident => $body:expr) => {
        match &$store.inner.backend {
            Backend::Redis($b) => $body,
            Backend::Etcd($b) => $body,
        }
    };
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("kind", &self.kind())
            .field("health", &self.health())
            .finish()
    }
}

impl Store {
    /// Opens a handle on the store described by `settings`.
    ///
    /// Never fails because the store is down: the handle (re)connects in the background
    /// with exponential backoff (100 ms doubling up to 5 s, with jitter) and calls made
    /// meanwhile fail with [`StoreError::Unavailable`] within [`OP_TIMEOUT`]. Must be
    /// called within a Tokio runtime, which runs the background tasks.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for an unparseable Redis URL, or an empty etcd endpoint
    /// list or prefix.
    ///
    /// # Example
    /// ```no_run
    /// # async fn example() -> Result<(), fulcrum_cluster::store::StoreError> {
    /// use fulcrum_cluster::store::{PutConfig, Store, StoreSettings};
    ///
    /// let store = Store::connect(&StoreSettings::redis("redis://127.0.0.1:6379")).await?;
    /// if let PutConfig::Conflict { current } = store.put_config(0, 1, "{}").await? {
    ///     println!("the shared configuration is already at version {current}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(settings: &StoreSettings) -> Result<Store, StoreError> {
        let shutdown = CancellationToken::new();
        let backend = match settings {
            StoreSettings::Redis { url, key_prefix } => Backend::Redis(RedisStore::connect(
                url,
                key_prefix,
                shutdown.child_token(),
            )?),
            StoreSettings::Etcd { endpoints, prefix } => {
                let etcd = EtcdStore::connect(endpoints, prefix, shutdown.child_token()).await?;
                Backend::Etcd(Box::new(etcd))
            }
        };
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                config_watch: OnceLock::new(),
                shutdown,
            }),
        })
    }

    /// `"redis"` or `"etcd"`.
    pub fn kind(&self) -> &'static str {
        match &self.inner.backend {
            Backend::Redis(_) => "redis",
            Backend::Etcd(_) => "etcd",
        }
    }

    /// Availability as seen by this handle's operations and its background probe (once a
    /// second while the store answers).
    pub fn health(&self) -> StoreHealth {
        dispatch!(self, b => b.health().snapshot())
    }

    /// Tries to become the leader for `ttl`, without waiting.
    ///
    /// Redis: takes a fencing token with `INCR {prefix}leader:fencing`, then
    /// `SET {prefix}leader <node_id>:<token> NX PX ttl` (the Redis `SET` documentation,
    /// "Distributed locks"), both in one script. etcd: grants a lease of `ttl` (whole
    /// seconds, rounded up; etcd raises it to its minimum TTL) and creates the election
    /// key `{prefix}election/<lease id in hex>` only if no candidate key exists, in one
    /// transaction; the key layout is that of etcd's election API, so
    /// `etcdctl elect --listen {prefix}election` observes Fulcrum's leader.
    ///
    /// Returns `None` when another node holds the lease.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store does not answer.
    pub async fn try_acquire(
        &self,
        node_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        dispatch!(self, b => b.try_acquire(node_id, ttl).await)
    }

    /// Extends a held lease to `ttl` from now; `false` when the lease is lost (expired,
    /// released or taken over), after which the holder must stop acting as leader.
    ///
    /// Redis: compare-and-extend (`PEXPIRE` only if the key still holds this lease's
    /// value). etcd: one lease keep-alive (the lease's own TTL applies; `ttl` is ignored)
    /// and a check that the election key is still this lease's.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store does not answer; the lease may still be
    /// valid, but the caller cannot know for how long.
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        dispatch!(self, b => b.renew(lease, ttl).await)
    }

    /// Gives the lease up at once so another node can take over without waiting for the
    /// TTL. Does nothing if the lease was already lost (compare-and-delete in Redis, lease
    /// revocation in etcd).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store does not answer (the lease then expires
    /// by itself).
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        dispatch!(self, b => b.release(lease).await)
    }

    /// The current leader, if any.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store does not answer; [`StoreError::Protocol`]
    /// when the leader key holds something Fulcrum did not write.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        dispatch!(self, b => b.leader().await)
    }

    /// Writes this node's registry record, expiring after `ttl` unless written again.
    /// `updated_ms` is set to the current time.
    ///
    /// Redis: `SET {prefix}node:{id} <json> PX ttl` and `SADD {prefix}nodes {id}`. etcd:
    /// `{prefix}nodes/{id}` on a lease of `ttl`. Node ids `status` and `status:*` are
    /// refused by both backends (in Redis they would collide with seed 000's
    /// `node:status`; refusing them everywhere keeps a cluster free to switch stores).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Invalid`] for an empty or reserved id.
    pub async fn heartbeat(&self, node: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        validate_node_id(&node.node_id)?;
        let mut record = node.clone();
        record.updated_ms = now_ms();
        dispatch!(self, b => b.heartbeat(&record, ttl).await)
    }

    /// The registry records that have not expired, sorted by node id. Records Fulcrum
    /// cannot read are skipped (with a warning).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut nodes = dispatch!(self, b => b.nodes().await)?;
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }

    /// Removes a node's registry record and status entry (a graceful leave). Its
    /// statistics stay until [`Store::gc_stale`] finds them stale.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn remove_node(&self, node_id: &str) -> Result<(), StoreError> {
        validate_node_id(node_id)?;
        dispatch!(self, b => b.remove_node(node_id).await)
    }

    /// Writes the shared configuration `doc` as `version`, only if the stored version is
    /// `expected_version` (0 = no configuration yet). `version` is normally
    /// `expected_version + 1`; it is larger when the store lost or rolled back the
    /// configuration (a Redis restarted empty, a restored snapshot) and a node writes back
    /// the newer document it runs, so versions never go backwards.
    ///
    /// Redis: the `{prefix}config` hash `{version, doc}`, compared and set by a script
    /// that also `PUBLISH`es the new version on `{prefix}config:changed`. etcd: the
    /// `{prefix}config` key holding `{"version", "doc"}`, written by a transaction that
    /// compares its mod revision (or its absence).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Protocol`] if the stored configuration
    /// is unreadable; [`StoreError::Invalid`] if `version` is not above
    /// `expected_version`.
    pub async fn put_config(
        &self,
        expected_version: u64,
        version: u64,
        doc: &str,
    ) -> Result<PutConfig, StoreError> {
        if version <= expected_version {
            return Err(StoreError::Invalid(format!(
                "configuration version {version} is not after the expected {expected_version}"
            )));
        }
        dispatch!(self, b => b.put_config(expected_version, version, doc).await)
    }

    /// The shared configuration and its version, if one was written.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Protocol`] if it is unreadable.
    pub async fn config(&self) -> Result<Option<(u64, String)>, StoreError> {
        dispatch!(self, b => b.config().await)
    }

    /// Follows the shared configuration: the receiver holds the latest `(version, doc)`
    /// seen (`None` until one is read) and changes whenever the version does.
    ///
    /// One background task per handle, started on the first call (within a Tokio
    /// runtime) and stopped when the last clone of the handle is dropped. etcd: the watch
    /// API from the revision of the last read, with a periodic re-read. Redis: a
    /// subscription to `{prefix}config:changed` plus a poll every second, because
    /// pub/sub messages sent while the subscriber is disconnected are lost. Both resume by
    /// themselves after an outage.
    pub fn watch_config(&self) -> watch::Receiver<ConfigSnapshot> {
        self.inner
            .config_watch
            .get_or_init(|| {
                let (tx, _) = watch::channel(None);
                let cancel = self.inner.shutdown.child_token();
                match &self.inner.backend {
                    Backend::Redis(b) => {
                        tokio::spawn(b.clone().watch_config(tx.clone(), cancel));
                    }
                    Backend::Etcd(b) => {
                        tokio::spawn(b.clone().watch_config(tx.clone(), cancel));
                    }
                }
                tx
            })
            .subscribe()
    }

    /// Registers (or refreshes) `backend` in `pool` for `ttl`.
    ///
    /// Redis: `{prefix}registry:{pool}:{address}` with `PX ttl`, indexed by the set
    /// `{prefix}registry:{pool}`. etcd: `{prefix}registry/{pool}/{address}` on a lease.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Invalid`] for a pool name that is empty
    /// or contains `:` or `/`, or an empty address.
    pub async fn register_backend(
        &self,
        pool: &str,
        backend: &RegisteredBackend,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        validate_pool(pool)?;
        if backend.address.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{} register_backend: empty backend address",
                self.kind()
            )));
        }
        dispatch!(self, b => b.register_backend(pool, backend, ttl).await)
    }

    /// Removes `address` from `pool`'s registry; `false` if it was not registered.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Invalid`] for a bad pool name.
    pub async fn deregister_backend(&self, pool: &str, address: &str) -> Result<bool, StoreError> {
        validate_pool(pool)?;
        dispatch!(self, b => b.deregister_backend(pool, address).await)
    }

    /// The backends registered in `pool` whose TTL has not run out, sorted by address.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Invalid`] for a bad pool name.
    pub async fn registered_backends(
        &self,
        pool: &str,
    ) -> Result<Vec<RegisteredBackend>, StoreError> {
        validate_pool(pool)?;
        let mut backends = dispatch!(self, b => b.registered_backends(pool).await)?;
        backends.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(backends)
    }

    /// Persists this node's endpoint statistics and merges them into the cluster's.
    ///
    /// Merge rule: each record is the node's own running total for its endpoint and
    /// replaces that node's previous record; the cluster record of an endpoint sums
    /// `count` and `errors` over the nodes, averages `avg_ms` weighted by `count`, and is
    /// `long` when nodes holding at least half of the requests say so (with no requests
    /// yet, every node weighs the same). Non-finite `avg_ms` is stored as 0.
    ///
    /// Redis (seed 000 keys): the merged record goes to the `{prefix}request:stats` hash
    /// (endpoint → JSON) and `{prefix}request:long_requests` holds the long endpoints,
    /// both maintained by one script; each node's records are kept in
    /// `{prefix}request:stats:node:{id}`. etcd: one key per node, `{prefix}stats/{id}`,
    /// merged when read.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Invalid`] for an empty node id.
    pub async fn save_stats(
        &self,
        node_id: &str,
        stats: &[EndpointStatRecord],
    ) -> Result<(), StoreError> {
        validate_node_id(node_id)?;
        let stats: Vec<EndpointStatRecord> = stats.iter().map(sanitize_stat).collect();
        dispatch!(self, b => b.save_stats(node_id, &stats).await)
    }

    /// The cluster's merged endpoint statistics, sorted by endpoint.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn load_stats(&self) -> Result<Vec<EndpointStatRecord>, StoreError> {
        let mut stats = dispatch!(self, b => b.load_stats().await)?;
        stats.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        Ok(stats)
    }

    /// Endpoints classified as long requests (seed 000's `request:long_requests`), sorted.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn long_requests(&self) -> Result<Vec<String>, StoreError> {
        let mut long = dispatch!(self, b => b.long_requests().await)?;
        long.sort();
        Ok(long)
    }

    /// Sets this node's status document (seed 000's `node:status` hash, node id → JSON);
    /// `status_json` is stored as given.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Invalid`] for an empty or reserved id.
    pub async fn set_node_status(
        &self,
        node_id: &str,
        status_json: &str,
    ) -> Result<(), StoreError> {
        validate_node_id(node_id)?;
        dispatch!(self, b => b.set_node_status(node_id, status_json).await)
    }

    /// Every node's status document, by node id.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn node_statuses(&self) -> Result<BTreeMap<String, String>, StoreError> {
        dispatch!(self, b => b.node_statuses().await)
    }

    /// Sets fields of the cluster status (seed 000's `cluster:status` hash), a leader
    /// chore: applied only if `token` is at least the highest fencing token the store has
    /// seen for chores, which it then records (a Lua script in Redis, a transaction
    /// comparing `{prefix}chores/fencing` in etcd). `false` = refused, the caller is a
    /// stale leader.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn set_cluster_status(
        &self,
        token: u64,
        fields: &[(String, String)],
    ) -> Result<bool, StoreError> {
        dispatch!(self, b => b.set_cluster_status(token, fields).await)
    }

    /// The cluster status fields.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn cluster_status(&self) -> Result<BTreeMap<String, String>, StoreError> {
        dispatch!(self, b => b.cluster_status().await)
    }

    /// Removes what nodes that have gone quiet left behind, a leader chore fenced like
    /// [`Store::set_cluster_status`].
    ///
    /// A node is stale when the newest of its registry record (`updated_ms`), its status
    /// entry and its statistics is older than `max_age`; all three are then removed, and
    /// merged statistics are recomputed without it (endpoints that only stale nodes
    /// contributed to disappear). etcd removes at most 100 keys per call; the next call
    /// continues.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn gc_stale(&self, token: u64, max_age: Duration) -> Result<GcReport, StoreError> {
        let cutoff_ms = now_ms().saturating_sub(duration_ms(max_age));
        let mut report = dispatch!(self, b => b.gc_stale(token, cutoff_ms).await)?;
        report.nodes_removed.sort();
        report.nodes_removed.dedup();
        Ok(report)
    }
}

/// Availability bookkeeping shared by a backend's operations and its probe.
pub(crate) struct HealthTracker {
    kind: &'static str,
    state: Mutex<TrackerState>,
}

struct TrackerState {
    health: StoreHealth,
    /// An outage is already counted (false while available and before the first error).
    down_reported: bool,
}

impl HealthTracker {
    pub(crate) fn new(kind: &'static str) -> HealthTracker {
        HealthTracker {
            kind,
            state: Mutex::new(TrackerState {
                health: StoreHealth::default(),
                down_reported: false,
            }),
        }
    }

    pub(crate) fn snapshot(&self) -> StoreHealth {
        self.state.lock().health.clone()
    }

    /// The store answered.
    pub(crate) fn record_answer(&self) {
        let mut state = self.state.lock();
        if !state.health.available {
            state.health.available = true;
            state.health.unavailable_since_ms = None;
            state.down_reported = false;
            tracing::info!(store = self.kind, "coordination store available");
        }
    }

    /// The store did not answer.
    pub(crate) fn record_unavailable(&self, error: &str) {
        let mut state = self.state.lock();
        state.health.last_error = Some(error.to_owned());
        state.health.available = false;
        if !state.down_reported {
            state.down_reported = true;
            state.health.outages += 1;
            state.health.unavailable_since_ms = Some(now_ms());
            tracing::warn!(store = self.kind, error, "coordination store unavailable");
        }
    }

    /// Runs one operation bounded by [`OP_TIMEOUT`] and records the outcome.
    pub(crate) async fn run<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{} {op}: no answer within {OP_TIMEOUT:?}",
                self.kind
            ))),
        };
        match &result {
            Err(StoreError::Unavailable(message)) => self.record_unavailable(message),
            _ => self.record_answer(),
        }
        result
    }
}

/// Exponential backoff with jitter for background reconnection: 100 ms doubling, each
/// delay drawn uniformly from its upper half, never above [`RECONNECT_MAX`].
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            next: RECONNECT_MIN,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = RECONNECT_MIN;
    }

    /// The next delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(RECONNECT_MAX);
        ceiling
            .mul_f64(0.5 + fastrand::f64() * 0.5)
            .max(RECONNECT_MIN)
    }
}

/// The availability probe both backends run: `probe` (one cheap operation through the
/// [`HealthTracker`], `true` if the store answered) every [`PROBE_INTERVAL`] while the
/// store answers, with [`Backoff`] while it does not, until `cancel` fires.
pub(crate) async fn probe_loop<F, Fut>(cancel: CancellationToken, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut backoff = Backoff::new();
    loop {
        let answered = tokio::select! {
            _ = cancel.cancelled() => return,
            answered = probe() => answered,
        };
        let delay = if answered {
            backoff.reset();
            PROBE_INTERVAL
        } else {
            backoff.next_delay()
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Publishes `value` if it differs from the one held. The document is compared too: a
/// store that lost its data (Redis without persistence) can reuse a version number.
pub(crate) fn publish_config(tx: &watch::Sender<ConfigSnapshot>, value: Option<(u64, String)>) {
    tx.send_if_modified(|held| {
        let same = match (&*held, &value) {
            (None, None) => true,
            (Some((v1, d1)), Some((v2, d2))) => v1 == v2 && **d1 == **d2,
            _ => false,
        };
        if same {
            return false;
        }
        *held = value.map(|(version, doc)| (version, Arc::from(doc)));
        true
    });
}

/// Merges several nodes' records of one endpoint (the rule documented on
/// [`Store::save_stats`]); `None` for no records. The Redis backend implements the same
/// rule in Lua.
pub(crate) fn merge_endpoint(
    endpoint: &str,
    records: &[EndpointStatRecord],
) -> Option<EndpointStatRecord> {
    if records.is_empty() {
        return None;
    }
    let count: u64 = records.iter().map(|r| r.count).sum();
    let errors: u64 = records.iter().map(|r| r.errors).sum();
    let weight = |r: &EndpointStatRecord| if count > 0 { r.count as f64 } else { 1.0 };
    let total: f64 = records.iter().map(weight).sum();
    let avg_ms = records.iter().map(|r| weight(r) * r.avg_ms).sum::<f64>() / total;
    let long_weight: f64 = records.iter().filter(|r| r.long).map(weight).sum();
    Some(EndpointStatRecord {
        endpoint: endpoint.to_owned(),
        count,
        errors,
        avg_ms,
        long: long_weight * 2.0 >= total,
    })
}

fn sanitize_stat(record: &EndpointStatRecord) -> EndpointStatRecord {
    let mut record = record.clone();
    if !record.avg_ms.is_finite() {
        record.avg_ms = 0.0;
    }
    record
}

fn validate_node_id(node_id: &str) -> Result<(), StoreError> {
    if node_id.is_empty() {
        return Err(StoreError::Invalid("empty node id".to_owned()));
    }
    if node_id == "status" || node_id.starts_with("status:") {
        return Err(StoreError::Invalid(format!(
            "node id {node_id:?} is reserved (it collides with the node:status key)"
        )));
    }
    Ok(())
}

fn validate_pool(pool: &str) -> Result<(), StoreError> {
    if pool.is_empty() || pool.contains([':', '/']) {
        return Err(StoreError::Invalid(format!(
            "pool name {pool:?} must be non-empty and contain neither ':' nor '/'"
        )));
    }
    Ok(())
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

/// `d` in whole milliseconds, saturating.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(count: u64, avg_ms: f64, long: bool) -> EndpointStatRecord {
        EndpointStatRecord {
            endpoint: "GET /a".to_owned(),
            count,
            errors: count / 10,
            avg_ms,
            long,
        }
    }

    #[test]
    fn merge_sums_counts_and_weights_the_mean_by_count() {
        let merged = merge_endpoint("GET /a", &[record(30, 10.0, false), record(10, 50.0, true)])
            .expect("two records merge");
        assert_eq!(merged.count, 40);
        assert_eq!(merged.errors, 4);
        assert!((merged.avg_ms - 20.0).abs() < 1e-9);
        assert!(!merged.long, "a quarter of the requests long is not long");
    }

    #[test]
    fn merge_is_long_when_half_the_requests_are() {
        let merged = merge_endpoint(
            "GET /a",
            &[record(10, 10.0, false), record(10, 9000.0, true)],
        )
        .expect("two records merge");
        assert!(merged.long);
    }

    #[test]
    fn merge_without_requests_weighs_nodes_equally() {
        let merged = merge_endpoint("GET /a", &[record(0, 10.0, true), record(0, 30.0, false)])
            .expect("two records merge");
        assert_eq!(merged.count, 0);
        assert!((merged.avg_ms - 20.0).abs() < 1e-9);
        assert!(merged.long);
        assert_eq!(merge_endpoint("GET /a", &[]), None);
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= RECONNECT_MIN && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= RECONNECT_MAX));
        assert!(delays[11] >= RECONNECT_MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn health_counts_each_outage_once() {
        let tracker = HealthTracker::new("redis");
        assert!(!tracker.snapshot().available);
        tracker.record_answer();
        tracker.record_unavailable("refused");
        tracker.record_unavailable("refused again");
        let health = tracker.snapshot();
        assert_eq!(health.outages, 1);
        assert!(!health.available);
        assert!(health.unavailable_since_ms.is_some());
        assert_eq!(health.last_error.as_deref(), Some("refused again"));
        tracker.record_answer();
        tracker.record_unavailable("down");
        assert_eq!(tracker.snapshot().outages, 2);
    }

    #[test]
    fn reserved_names_are_refused() {
        assert!(validate_pool("a:b").is_err());
        assert!(validate_pool("a/b").is_err());
        assert!(validate_pool("").is_err());
        assert!(validate_pool("app").is_ok());
        assert!(validate_node_id("status").is_err());
        assert!(validate_node_id("status:seen").is_err());
        assert!(validate_node_id("node-1").is_ok());
    }
}
