//! etcd backend of the coordination store, after seed 004's etcd election, shared
//! configuration and service registry.
//!
//! Keys (all under the prefix, `/fulcrum/` by default):
//!
//! | key | holds |
//! | --- | --- |
//! | `election/<lease id, hex>` | the leader's node id, on the leader's lease |
//! | `chores/fencing` | highest token accepted for a leader chore, 20 digits |
//! | `nodes/{id}` | the node's registry record (JSON), on a lease of its TTL |
//! | `registry/{pool}/{address}` | a registered backend (JSON), on a lease of its TTL |
//! | `config` | `{"version", "doc"}` |
//! | `stats/{id}` | that node's endpoint records (JSON), merged when read |
//! | `node_status/{id}` | `{"node_id", "updated_ms", "status"}` |
//! | `cluster_status/{field}` | one cluster status field |
//!
//! **Election.** The leader key layout is that of etcd's election API (`v3election`:
//! candidates are `{name}/{lease id in hex}` keys on their session lease, the leader is
//! the oldest), so `etcdctl elect --listen {prefix}election` shows Fulcrum's leader. But
//! where `Campaign` queues a candidate key and blocks until it is the oldest, Fulcrum's
//! [`try_acquire`](EtcdStore::try_acquire) must not block: it creates its key in one
//! transaction *only if no candidate key exists* (a compare over the whole prefix), so
//! there is never more than one key and the one there leads. This is as safe as
//! `Campaign`: the transaction is linearizable and the key dies with its lease. The
//! fencing token is the key's create revision, which etcd's revision counter makes
//! strictly larger for every later leader.
//!
//! **TTLs.** etcd leases have whole-second TTLs (rounded up here) and a server minimum
//! (1.5 × the election timeout, 2 s with etcd's defaults). Each heartbeat or registration
//! attaches its key to a fresh lease of the requested TTL; the previous lease expires
//! unused, which avoids a keep-alive stream per key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Error, Event, EventType, GetOptions, KeyValue,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    Backoff, ConfigSnapshot, EndpointStatRecord, GcReport, HealthTracker, LeaderRecord, Lease,
    LeaseHolder, NodeRecord, OP_TIMEOUT, PutConfig, RegisteredBackend, StoreError, merge_endpoint,
    now_ms, probe_loop, publish_config,
};

const KIND: &str = "etcd";

/// Most stale keys one [`EtcdStore::gc_stale`] transaction deletes (etcd refuses more than
/// 128 operations per transaction by default).
const GC_BATCH: usize = 100;

/// How often the configuration watch re-reads the key as a safety net.
const CONFIG_REREAD_INTERVAL: Duration = Duration::from_secs(5);

/// HTTP/2 keep-alive ping period; etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// gRPC status codes (grpc/doc/statuscodes.md) that mean the server is unreachable or
/// could not answer in time, rather than a refusal.
const GRPC_CANCELLED: i32 = 1;
const GRPC_UNKNOWN: i32 = 2;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_UNAVAILABLE: i32 = 14;

/// The shared configuration as stored in `{prefix}config`.
#[derive(Serialize, Deserialize)]
struct ConfigDoc {
    version: u64,
    doc: String,
}

/// One node's statistics as stored in `{prefix}stats/{id}`.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct NodeStats {
    node_id: String,
    updated_ms: u64,
    endpoints: BTreeMap<String, EndpointStatRecord>,
}

/// One node's status as stored in `{prefix}node_status/{id}`.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct NodeStatus {
    node_id: String,
    updated_ms: u64,
    status: String,
}

/// Key names under the prefix.
struct Keys {
    election: String,
    fencing: String,
    nodes: String,
    registry: String,
    config: String,
    stats: String,
    node_status: String,
    cluster_status: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let key = |name: &str| format!("{prefix}{name}");
        Keys {
            election: key("election/"),
            fencing: key("chores/fencing"),
            nodes: key("nodes/"),
            registry: key("registry/"),
            config: key("config"),
            stats: key("stats/"),
            node_status: key("node_status/"),
            cluster_status: key("cluster_status/"),
        }
    }

    fn registry_pool(&self, pool: &str) -> String {
        format!("{}{pool}/", self.registry)
    }
}

/// Maps an etcd client error to a [`StoreError`] naming the operation.
trait During<T> {
    fn during(self, op: &str) -> Result<T, StoreError>;
}

impl<T> During<T> for Result<T, Error> {
    fn during(self, op: &str) -> Result<T, StoreError> {
        self.map_err(|e| classify(op, &e))
    }
}

fn classify(op: &str, e: &Error) -> StoreError {
    let message = format!("{KIND} {op}: {e}");
    match e {
        Error::GRpcStatus(status) => match i32::from(status.code()) {
            GRPC_CANCELLED | GRPC_UNKNOWN | GRPC_DEADLINE_EXCEEDED | GRPC_UNAVAILABLE => {
                StoreError::Unavailable(message)
            }
            _ => StoreError::Rejected(message),
        },
        Error::TransportError(_)
        | Error::IoError(_)
        | Error::WatchError(_)
        | Error::LeaseKeepAliveError(_)
        | Error::ElectError(_)
        | Error::Internal(_) => StoreError::Unavailable(message),
        Error::InvalidArgs(_) | Error::InvalidUri(_) | Error::EndpointError(_) => {
            StoreError::Invalid(message)
        }
        Error::Utf8Error(_) => StoreError::Protocol(message),
        _ => StoreError::Rejected(message),
    }
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::GRpcStatus(status) if i32::from(status.code()) == GRPC_NOT_FOUND)
}

fn protocol(op: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Protocol(format!("{KIND} {op}: {what}"))
}

fn to_json<T: Serialize>(op: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| protocol(op, format!("cannot encode: {e}")))
}

/// Parses the values of `kvs`, skipping (with a warning) those Fulcrum cannot read.
fn parse_all<T: serde::de::DeserializeOwned>(op: &str, kvs: &[KeyValue]) -> Vec<T> {
    kvs.iter()
        .filter_map(|kv| match serde_json::from_slice(kv.value()) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                let key = String::from_utf8_lossy(kv.key());
                tracing::warn!(store = KIND, op, %error, %key, "skipping unreadable record");
                None
            }
        })
        .collect()
}

/// Lease TTL in whole seconds, rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// A fencing token as a value etcd compares correctly: etcd compares values as bytes, so
/// zero-padding to the width of `u64::MAX` makes byte order numeric order.
fn fencing_value(token: u64) -> String {
    format!("{token:020}")
}

/// The part of `key` after `dir`, as text.
fn suffix(key: &[u8], dir: &str) -> String {
    String::from_utf8_lossy(key.strip_prefix(dir.as_bytes()).unwrap_or(key)).into_owned()
}

/// Publishes the configuration carried by watch events.
fn publish_events(tx: &watch::Sender<ConfigSnapshot>, events: &[Event]) {
    for event in events {
        match (event.event_type(), event.kv()) {
            (EventType::Put, Some(kv)) => match serde_json::from_slice::<ConfigDoc>(kv.value()) {
                Ok(doc) => publish_config(tx, Some((doc.version, doc.doc))),
                Err(error) => tracing::warn!(store = KIND, %error, "unreadable configuration"),
            },
            (EventType::Delete, _) => publish_config(tx, None),
            _ => {}
        }
    }
}

/// Merges every node's records into one per endpoint.
fn merge_all(nodes: &[NodeStats]) -> BTreeMap<String, EndpointStatRecord> {
    let mut by_endpoint: BTreeMap<&str, Vec<EndpointStatRecord>> = BTreeMap::new();
    for node in nodes {
        for (endpoint, record) in &node.endpoints {
            by_endpoint
                .entry(endpoint)
                .or_default()
                .push(record.clone());
        }
    }
    by_endpoint
        .into_iter()
        .filter_map(|(endpoint, records)| {
            merge_endpoint(endpoint, &records).map(|merged| (endpoint.to_owned(), merged))
        })
        .collect()
}

/// etcd side of [`super::Store`]; clones share the gRPC channel.
#[derive(Clone)]
pub(crate) struct EtcdStore {
    client: Client,
    keys: Arc<Keys>,
    health: Arc<HealthTracker>,
}

impl EtcdStore {
    /// Creates the client (its channel connects lazily and reconnects by itself) and
    /// starts the probe.
    pub(crate) async fn connect(
        endpoints: &[String],
        prefix: &str,
        cancel: CancellationToken,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(format!("{KIND}: no endpoints")));
        }
        if prefix.is_empty() {
            return Err(StoreError::Invalid(format!("{KIND}: empty key prefix")));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, OP_TIMEOUT * 3)
            .with_keep_alive_while_idle(true);
        // Building the client does not touch the network (the balanced channel connects
        // on first use), so this only fails for bad endpoints.
        let client =
            match tokio::time::timeout(OP_TIMEOUT, Client::connect(endpoints, Some(options))).await
            {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    return Err(StoreError::Invalid(format!(
                        "{KIND} endpoints {endpoints:?}: {e}"
                    )));
                }
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "{KIND} connect: no client within {OP_TIMEOUT:?}"
                    )));
                }
            };
        let store = EtcdStore {
            client,
            keys: Arc::new(Keys::new(prefix)),
            health: Arc::new(HealthTracker::new(KIND)),
        };
        tokio::spawn(store.clone().probe(cancel));
        Ok(store)
    }

    pub(crate) fn health(&self) -> &HealthTracker {
        &self.health
    }

    /// A linearizable read once a second while etcd answers (it needs a quorum), with
    /// backoff while it does not; keeps [`HealthTracker`] current.
    async fn probe(self, cancel: CancellationToken) {
        probe_loop(cancel, || async {
            self.health
                .run("probe", async {
                    self.client
                        .kv_client()
                        .get(
                            self.keys.fencing.as_str(),
                            Some(GetOptions::new().with_count_only()),
                        )
                        .await
                        .during("probe")
                })
                .await
                .is_ok()
        })
        .await;
    }

    /// Non-blocking campaign; see the module documentation.
    pub(crate) async fn try_acquire(
        &self,
        node_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        const OP: &str = "try_acquire";
        self.health
            .run(OP, async {
                let mut kv = self.client.kv_client();
                let election = self.keys.election.as_str();
                // Most rounds find a leader: answer without creating a lease.
                let candidates = kv
                    .get(
                        election,
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                    .during(OP)?;
                if candidates.count() > 0 {
                    return Ok(None);
                }
                let mut leases = self.client.lease_client();
                let lease_id = leases.grant(ttl_secs(ttl), None).await.during(OP)?.id();
                let key = format!("{election}{lease_id:x}");
                let txn = Txn::new()
                    .when([Compare::create_revision(election, CompareOp::Equal, 0).with_prefix()])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        node_id,
                        Some(PutOptions::new().with_lease(lease_id)),
                    )]);
                let response = kv.txn(txn).await.during(OP)?;
                if !response.succeeded() {
                    // Lost the race; the lease would expire anyway.
                    if let Err(error) = leases.revoke(lease_id).await {
                        tracing::debug!(store = KIND, %error, "unused candidate lease not revoked");
                    }
                    return Ok(None);
                }
                let revision = response
                    .header()
                    .map(|header| header.revision())
                    .ok_or_else(|| protocol(OP, "transaction response without a header"))?;
                let token = u64::try_from(revision)
                    .map_err(|_| protocol(OP, format!("negative revision {revision}")))?;
                Ok(Some(Lease {
                    node_id: node_id.to_owned(),
                    token,
                    holder: LeaseHolder::Etcd { lease_id, key },
                }))
            })
            .await
    }

    pub(crate) async fn renew(&self, lease: &Lease, _ttl: Duration) -> Result<bool, StoreError> {
        const OP: &str = "renew";
        let LeaseHolder::Etcd { lease_id, key } = &lease.holder else {
            return Err(StoreError::Invalid(format!(
                "{KIND} {OP}: not an etcd lease"
            )));
        };
        self.health
            .run(OP, async {
                match self.client.lease_client().keep_alive(*lease_id).await {
                    Ok(_) => {}
                    // The client reports a lease the server no longer knows (TTL 0) this way.
                    Err(Error::LeaseKeepAliveError(_)) => return Ok(false),
                    Err(e) if is_not_found(&e) => return Ok(false),
                    Err(e) => return Err(classify(OP, &e)),
                }
                let current = self
                    .client
                    .kv_client()
                    .get(key.as_str(), None)
                    .await
                    .during(OP)?;
                Ok(current.kvs().first().is_some_and(|kv| {
                    u64::try_from(kv.create_revision()) == Ok(lease.token)
                        && kv.lease() == *lease_id
                }))
            })
            .await
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        const OP: &str = "release";
        let LeaseHolder::Etcd { lease_id, .. } = &lease.holder else {
            return Err(StoreError::Invalid(format!(
                "{KIND} {OP}: not an etcd lease"
            )));
        };
        self.health
            .run(OP, async {
                // Revoking the lease deletes the election key attached to it.
                match self.client.lease_client().revoke(*lease_id).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(classify(OP, &e)),
                }
            })
            .await
    }

    pub(crate) async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        const OP: &str = "leader";
        self.health
            .run(OP, async {
                // The oldest candidate key leads, as in etcd's `Election.Leader`.
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1);
                let response = self
                    .client
                    .kv_client()
                    .get(self.keys.election.as_str(), Some(options))
                    .await
                    .during(OP)?;
                let Some(kv) = response.kvs().first() else {
                    return Ok(None);
                };
                let node_id = kv.value_str().during(OP)?.to_owned();
                let token = u64::try_from(kv.create_revision())
                    .map_err(|_| protocol(OP, "negative create revision"))?;
                Ok(Some(LeaderRecord { node_id, token }))
            })
            .await
    }

    /// Puts `value` at `key` on a fresh lease of `ttl`.
    async fn put_with_ttl(
        &self,
        op: &str,
        key: String,
        value: String,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let lease_id = self
            .client
            .lease_client()
            .grant(ttl_secs(ttl), None)
            .await
            .during(op)?
            .id();
        self.client
            .kv_client()
            .put(key, value, Some(PutOptions::new().with_lease(lease_id)))
            .await
            .during(op)?;
        Ok(())
    }

    /// The key-values under `dir`.
    async fn list(&self, op: &str, dir: &str) -> Result<Vec<KeyValue>, StoreError> {
        let mut response = self
            .client
            .kv_client()
            .get(dir, Some(GetOptions::new().with_prefix()))
            .await
            .during(op)?;
        Ok(response.take_kvs())
    }

    pub(crate) async fn heartbeat(
        &self,
        node: &NodeRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        const OP: &str = "heartbeat";
        let json = to_json(OP, node)?;
        let key = format!("{}{}", self.keys.nodes, node.node_id);
        self.health
            .run(OP, self.put_with_ttl(OP, key, json, ttl))
            .await
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        const OP: &str = "nodes";
        let kvs = self.health.run(OP, self.list(OP, &self.keys.nodes)).await?;
        Ok(parse_all(OP, &kvs))
    }

    pub(crate) async fn remove_node(&self, node_id: &str) -> Result<(), StoreError> {
        const OP: &str = "remove_node";
        let txn = Txn::new().and_then([
            TxnOp::delete(format!("{}{node_id}", self.keys.nodes), None),
            TxnOp::delete(format!("{}{node_id}", self.keys.node_status), None),
        ]);
        self.health
            .run(OP, async {
                self.client.kv_client().txn(txn).await.during(OP)?;
                Ok(())
            })
            .await
    }

    /// The stored configuration, its key's mod revision (0 = absent) and the store
    /// revision of the read.
    async fn read_config(&self, op: &str) -> Result<(Option<ConfigDoc>, i64, i64), StoreError> {
        let response = self
            .client
            .kv_client()
            .get(self.keys.config.as_str(), None)
            .await
            .during(op)?;
        let revision = response.header().map_or(0, |header| header.revision());
        match response.kvs().first() {
            None => Ok((None, 0, revision)),
            Some(kv) => {
                let doc: ConfigDoc = serde_json::from_slice(kv.value())
                    .map_err(|e| protocol(op, format!("unreadable configuration: {e}")))?;
                Ok((Some(doc), kv.mod_revision(), revision))
            }
        }
    }

    pub(crate) async fn put_config(
        &self,
        expected_version: u64,
        version: u64,
        doc: &str,
    ) -> Result<PutConfig, StoreError> {
        const OP: &str = "put_config";
        self.health
            .run(OP, async {
                let (current, mod_revision, _) = self.read_config(OP).await?;
                let current_version = current.as_ref().map_or(0, |c| c.version);
                if current_version != expected_version {
                    return Ok(PutConfig::Conflict {
                        current: current_version,
                    });
                }
                let value = to_json(
                    OP,
                    &ConfigDoc {
                        version,
                        doc: doc.to_owned(),
                    },
                )?;
                let key = self.keys.config.as_str();
                let unchanged = if current.is_some() {
                    Compare::mod_revision(key, CompareOp::Equal, mod_revision)
                } else {
                    Compare::create_revision(key, CompareOp::Equal, 0)
                };
                let txn = Txn::new()
                    .when([unchanged])
                    .and_then([TxnOp::put(key, value, None)]);
                if self
                    .client
                    .kv_client()
                    .txn(txn)
                    .await
                    .during(OP)?
                    .succeeded()
                {
                    return Ok(PutConfig::Written(version));
                }
                // Someone wrote in between: report what is there now.
                let (now, _, _) = self.read_config(OP).await?;
                Ok(PutConfig::Conflict {
                    current: now.map_or(0, |c| c.version),
                })
            })
            .await
    }

    pub(crate) async fn config(&self) -> Result<Option<(u64, String)>, StoreError> {
        const OP: &str = "config";
        let (doc, _, _) = self.health.run(OP, self.read_config(OP)).await?;
        Ok(doc.map(|d| (d.version, d.doc)))
    }

    /// Keeps `tx` current: read, then watch from the next revision; on any failure,
    /// read and watch again after a backoff.
    pub(crate) async fn watch_config(
        self,
        tx: watch::Sender<ConfigSnapshot>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        loop {
            let followed = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.follow_config(&tx, &mut backoff) => outcome,
            };
            if let Err(error) = followed {
                tracing::debug!(store = KIND, %error, "configuration watch interrupted");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Reads the configuration and follows its changes until the watch breaks.
    async fn follow_config(
        &self,
        tx: &watch::Sender<ConfigSnapshot>,
        backoff: &mut Backoff,
    ) -> Result<(), StoreError> {
        const OP: &str = "watch_config";
        let (doc, _, revision) = self.health.run(OP, self.read_config(OP)).await?;
        publish_config(tx, doc.map(|d| (d.version, d.doc)));
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = self
            .health
            .run(OP, async {
                self.client
                    .watch_client()
                    .watch(self.keys.config.as_str(), Some(options))
                    .await
                    .during(OP)
            })
            .await?;
        backoff.reset();
        let mut reread = tokio::time::interval(CONFIG_REREAD_INTERVAL);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reread.tick().await;
        loop {
            tokio::select! {
                message = stream.message() => {
                    let Some(response) = message.during(OP)? else {
                        let ended = format!("{KIND} {OP}: watch stream ended");
                        return Err(StoreError::Unavailable(ended));
                    };
                    if response.canceled() {
                        let reason = response.cancel_reason();
                        let canceled = format!("{KIND} {OP}: watch canceled: {reason}");
                        return Err(StoreError::Unavailable(canceled));
                    }
                    publish_events(tx, response.events());
                }
                _ = reread.tick() => {
                    let (doc, _, _) = self.health.run(OP, self.read_config(OP)).await?;
                    publish_config(tx, doc.map(|d| (d.version, d.doc)));
                }
            }
        }
    }

    pub(crate) async fn register_backend(
        &self,
        pool: &str,
        backend: &RegisteredBackend,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        const OP: &str = "register_backend";
        let json = to_json(OP, backend)?;
        let key = format!("{}{}", self.keys.registry_pool(pool), backend.address);
        self.health
            .run(OP, self.put_with_ttl(OP, key, json, ttl))
            .await
    }

    pub(crate) async fn deregister_backend(
        &self,
        pool: &str,
        address: &str,
    ) -> Result<bool, StoreError> {
        const OP: &str = "deregister_backend";
        let key = format!("{}{address}", self.keys.registry_pool(pool));
        self.health
            .run(OP, async {
                let response = self.client.kv_client().delete(key, None).await.during(OP)?;
                Ok(response.deleted() > 0)
            })
            .await
    }

    pub(crate) async fn registered_backends(
        &self,
        pool: &str,
    ) -> Result<Vec<RegisteredBackend>, StoreError> {
        const OP: &str = "registered_backends";
        let dir = self.keys.registry_pool(pool);
        let kvs = self.health.run(OP, self.list(OP, &dir)).await?;
        Ok(parse_all(OP, &kvs))
    }

    pub(crate) async fn save_stats(
        &self,
        node_id: &str,
        stats: &[EndpointStatRecord],
    ) -> Result<(), StoreError> {
        const OP: &str = "save_stats";
        /// Attempts before giving up on a contended key (only one node writes its own key,
        /// so contention means two handles of the same node).
        const ATTEMPTS: usize = 5;
        let key = format!("{}{node_id}", self.keys.stats);
        self.health
            .run(OP, async {
                let mut kv = self.client.kv_client();
                for _ in 0..ATTEMPTS {
                    let response = kv.get(key.as_str(), None).await.during(OP)?;
                    let (mut doc, unchanged) = match response.kvs().first() {
                        Some(current) => (
                            serde_json::from_slice::<NodeStats>(current.value())
                                .unwrap_or_default(),
                            Compare::mod_revision(
                                key.as_str(),
                                CompareOp::Equal,
                                current.mod_revision(),
                            ),
                        ),
                        None => (
                            NodeStats::default(),
                            Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                        ),
                    };
                    doc.node_id = node_id.to_owned();
                    doc.updated_ms = now_ms();
                    for record in stats {
                        doc.endpoints
                            .insert(record.endpoint.clone(), record.clone());
                    }
                    let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
                        key.as_str(),
                        to_json(OP, &doc)?,
                        None,
                    )]);
                    if kv.txn(txn).await.during(OP)?.succeeded() {
                        return Ok(());
                    }
                }
                Err(StoreError::Rejected(format!(
                    "{KIND} {OP}: {key} changed under {ATTEMPTS} attempts"
                )))
            })
            .await
    }

    async fn all_stats(&self, op: &'static str) -> Result<Vec<NodeStats>, StoreError> {
        let kvs = self.health.run(op, self.list(op, &self.keys.stats)).await?;
        Ok(parse_all(op, &kvs))
    }

    pub(crate) async fn load_stats(&self) -> Result<Vec<EndpointStatRecord>, StoreError> {
        let nodes = self.all_stats("load_stats").await?;
        Ok(merge_all(&nodes).into_values().collect())
    }

    pub(crate) async fn long_requests(&self) -> Result<Vec<String>, StoreError> {
        let nodes = self.all_stats("long_requests").await?;
        Ok(merge_all(&nodes)
            .into_values()
            .filter(|record| record.long)
            .map(|record| record.endpoint)
            .collect())
    }

    pub(crate) async fn set_node_status(
        &self,
        node_id: &str,
        status_json: &str,
    ) -> Result<(), StoreError> {
        const OP: &str = "set_node_status";
        let value = to_json(
            OP,
            &NodeStatus {
                node_id: node_id.to_owned(),
                updated_ms: now_ms(),
                status: status_json.to_owned(),
            },
        )?;
        let key = format!("{}{node_id}", self.keys.node_status);
        self.health
            .run(OP, async {
                self.client
                    .kv_client()
                    .put(key, value, None)
                    .await
                    .during(OP)?;
                Ok(())
            })
            .await
    }

    pub(crate) async fn node_statuses(&self) -> Result<BTreeMap<String, String>, StoreError> {
        const OP: &str = "node_statuses";
        let kvs = self
            .health
            .run(OP, self.list(OP, &self.keys.node_status))
            .await?;
        Ok(parse_all::<NodeStatus>(OP, &kvs)
            .into_iter()
            .map(|status| (status.node_id, status.status))
            .collect())
    }

    /// A transaction that applies `ops` only if `token` is at least the recorded chore
    /// token, recording it; its `succeeded()` is true when it was refused.
    fn fenced(&self, token: u64, ops: Vec<TxnOp>) -> Txn {
        let value = fencing_value(token);
        let mut apply = vec![TxnOp::put(self.keys.fencing.as_str(), value.as_str(), None)];
        apply.extend(ops);
        // A missing key fails a value comparison, so the first chore is applied.
        Txn::new()
            .when([Compare::value(
                self.keys.fencing.as_str(),
                CompareOp::Greater,
                value.as_str(),
            )])
            .or_else(apply)
    }

    pub(crate) async fn set_cluster_status(
        &self,
        token: u64,
        fields: &[(String, String)],
    ) -> Result<bool, StoreError> {
        const OP: &str = "set_cluster_status";
        // One put per field (a later duplicate wins; etcd refuses a key twice per txn).
        let fields: BTreeMap<&str, &str> = fields
            .iter()
            .map(|(field, value)| (field.as_str(), value.as_str()))
            .collect();
        let ops = fields
            .into_iter()
            .map(|(field, value)| {
                TxnOp::put(format!("{}{field}", self.keys.cluster_status), value, None)
            })
            .collect();
        let txn = self.fenced(token, ops);
        self.health
            .run(OP, async {
                let response = self.client.kv_client().txn(txn).await.during(OP)?;
                Ok(!response.succeeded())
            })
            .await
    }

    pub(crate) async fn cluster_status(&self) -> Result<BTreeMap<String, String>, StoreError> {
        const OP: &str = "cluster_status";
        let dir = self.keys.cluster_status.as_str();
        let kvs = self.health.run(OP, self.list(OP, dir)).await?;
        Ok(kvs
            .iter()
            .map(|kv| {
                (
                    suffix(kv.key(), dir),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }

    pub(crate) async fn gc_stale(
        &self,
        token: u64,
        cutoff_ms: u64,
    ) -> Result<GcReport, StoreError> {
        const OP: &str = "gc_stale";
        self.health
            .run(OP, self.gc_stale_inner(token, cutoff_ms))
            .await
    }

    async fn gc_stale_inner(&self, token: u64, cutoff_ms: u64) -> Result<GcReport, StoreError> {
        const OP: &str = "gc_stale";
        let statuses = self.list(OP, &self.keys.node_status).await?;
        let nodes = self.list(OP, &self.keys.nodes).await?;
        let stats = self.list(OP, &self.keys.stats).await?;

        // Last sign of life per node id (the key suffix); unreadable records count as 0.
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        let mut see = |id: String, ms: u64| {
            let last = seen.entry(id).or_insert(0);
            *last = (*last).max(ms);
        };
        for kv in &statuses {
            let ms = serde_json::from_slice::<NodeStatus>(kv.value()).map_or(0, |s| s.updated_ms);
            see(suffix(kv.key(), &self.keys.node_status), ms);
        }
        for kv in &nodes {
            let ms = serde_json::from_slice::<NodeRecord>(kv.value()).map_or(0, |n| n.updated_ms);
            see(suffix(kv.key(), &self.keys.nodes), ms);
        }
        for kv in &stats {
            let ms = serde_json::from_slice::<NodeStats>(kv.value()).map_or(0, |s| s.updated_ms);
            see(suffix(kv.key(), &self.keys.stats), ms);
        }
        let stale: BTreeSet<String> = seen
            .into_iter()
            .filter(|(_, ms)| *ms < cutoff_ms)
            .map(|(id, _)| id)
            .collect();

        // (node id, key, mod revision, is a stats key) of what to delete, each deletion
        // guarded by its mod revision so a node that wrote meanwhile keeps its key.
        let stale = &stale;
        let doomed: Vec<(String, Vec<u8>, i64, bool)> = [
            (&statuses, &self.keys.node_status, false),
            (&nodes, &self.keys.nodes, false),
            (&stats, &self.keys.stats, true),
        ]
        .into_iter()
        .flat_map(|(kvs, dir, is_stats)| {
            kvs.iter().filter_map(move |kv| {
                let id = suffix(kv.key(), dir);
                stale
                    .contains(&id)
                    .then(|| (id, kv.key().to_vec(), kv.mod_revision(), is_stats))
            })
        })
        .take(GC_BATCH)
        .collect();
        let deletions = doomed
            .iter()
            .map(|(_, key, mod_revision, _)| {
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            *mod_revision,
                        )])
                        .and_then([TxnOp::delete(key.clone(), None)]),
                )
            })
            .collect();
        let response = self
            .client
            .kv_client()
            .txn(self.fenced(token, deletions))
            .await
            .during(OP)?;
        if response.succeeded() {
            return Ok(GcReport::default());
        }
        // Responses: the fencing put, then one nested transaction per deletion.
        let deleted: Vec<bool> = response
            .op_responses()
            .into_iter()
            .skip(1)
            .map(|op| matches!(op, TxnOpResponse::Txn(nested) if nested.succeeded()))
            .collect();
        let mut nodes_removed = Vec::new();
        let mut removed_stats = BTreeSet::new();
        for ((id, key, _, is_stats), gone) in doomed.iter().zip(deleted) {
            if gone {
                nodes_removed.push(id.clone());
                if *is_stats {
                    removed_stats.insert(key.clone());
                }
            }
        }
        let before: Vec<NodeStats> = parse_all(OP, &stats);
        let kept: Vec<NodeStats> = stats
            .iter()
            .filter(|kv| !removed_stats.contains(kv.key()))
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        let (before, after) = (merge_all(&before), merge_all(&kept));
        let stats_removed = before.keys().filter(|e| !after.contains_key(*e)).count();
        Ok(GcReport {
            applied: true,
            nodes_removed,
            stats_removed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn fencing_values_sort_like_numbers() {
        assert!(fencing_value(9) < fencing_value(10));
        assert!(fencing_value(99_999) < fencing_value(100_000));
        assert_eq!(fencing_value(u64::MAX).len(), 20);
    }
}
