//! Redis backend of the coordination store, after seed 000's Redis coordination centre.
//!
//! Keys (all under the prefix, `fulcrum:` by default):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `leader` | string, `PX` ttl | `<node_id>:<token>` of the lease holder |
//! | `leader:fencing` | counter | last fencing token handed out (`INCR`; seeded with the server's clock in ms) |
//! | `chores:fencing` | string | highest token accepted for a leader chore |
//! | `node:{id}` | string, `PX` ttl | the node's registry record (JSON) |
//! | `nodes` | set | ids with a registry record (index; expired ones pruned on read) |
//! | `registry:{pool}:{address}` | string, `PX` ttl | a registered backend (JSON) |
//! | `registry:{pool}` | set | addresses registered in the pool (index) |
//! | `config` | hash | `version`, `doc`; changes published on channel `config:changed` |
//! | `request:stats` | hash | endpoint → merged record (JSON) — seed 000 |
//! | `request:long_requests` | set | endpoints classified long — seed 000 |
//! | `request:stats:node:{id}` | hash | endpoint → that node's record (JSON) |
//! | `request:stats:nodes` | sorted set | contributing node ids, scored by last save (ms) |
//! | `node:status` | hash | node id → status JSON — seed 000 |
//! | `node:status:seen` | sorted set | node id → last status write (ms) |
//! | `cluster:status` | hash | cluster status fields — seed 000 |
//!
//! The lease follows the Redis `SET` documentation ("Distributed locks": `SET key value NX
//! PX ttl`, extend and delete only if the value is still ours, by script). Everything that
//! must be atomic is one Lua script. Scripts address keys built from the prefix inside the
//! script, which a single Redis server (or a Sentinel-managed primary) allows but Redis
//! Cluster does not: Redis Cluster is not supported.
//!
//! The connection is a `redis::aio::ConnectionManager` (it reconnects by itself, here with
//! backoff from 100 ms up to 5 s with jitter and no retry limit); every call is bounded by
//! [`OP_TIMEOUT`](super::OP_TIMEOUT).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubStream};
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Backoff, CONFIG_POLL_INTERVAL, ConfigSnapshot, EndpointStatRecord, GcReport, HealthTracker,
    LeaderRecord, Lease, LeaseHolder, NodeRecord, OP_TIMEOUT, PutConfig, RECONNECT_MAX,
    RECONNECT_MIN, RegisteredBackend, StoreError, duration_ms, now_ms, probe_loop, publish_config,
};

const KIND: &str = "redis";

/// Acquires the lease: a new fencing token, then the leader key, only if no one holds it.
/// The token also exceeds the highest chore token, should the counter have been lost
/// (evicted, deleted) while the chore fence survived.
///
/// A missing counter (first election, or a Redis restarted without persistence) is
/// seeded with the Redis server's clock in milliseconds (`TIME`), so tokens stay
/// monotonic across a restart that lost every key: the tokens handed out before it were
/// at most the seed of that time plus one per election, below the clock's value at the
/// restart unless elections came faster than one per millisecond or the server's clock
/// went back. (The same idea as a hybrid logical clock's physical component: Kulkarni et
/// al., "Logical Physical Clocks", OPODIS 2014.)
/// KEYS: leader, leader:fencing, chores:fencing. ARGV: node id, ttl (ms).
/// Returns the token or nil.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('SET', KEYS[2], string.format('%d', ms))
end
local token = redis.call('INCR', KEYS[2])
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if token <= fence then
  token = fence + 1
  redis.call('SET', KEYS[2], string.format('%d', token))
end
if redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'NX', 'PX', ARGV[2]) then
  return token
end
return false
",
    )
});

/// Compare-and-extend. KEYS: leader. ARGV: lease value, ttl (ms). Returns 1 if extended.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Compare-and-delete. KEYS: leader. ARGV: lease value. Returns 1 if deleted.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Values of an index set's live entries; prunes members whose entry expired.
/// KEYS: index set. ARGV: key prefix of the entries. Returns the values.
static LIST_INDEXED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local values = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', ARGV[1] .. member)
  if value then
    values[#values + 1] = value
  else
    redis.call('SREM', KEYS[1], member)
  end
end
return values
",
    )
});

/// Configuration compare-and-set. KEYS: config hash. ARGV: expected version, document,
/// change channel, new version. Returns {1, new version} or {0, current version}.
static PUT_CONFIG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'version', ARGV[4], 'doc', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, tonumber(ARGV[4])}
",
    )
});

/// Lua shared by the chore and statistics scripts: the fencing check and the merge of
/// one endpoint's per-node records into `request:stats` (the rule documented on
/// `Store::save_stats`; `merge_endpoint` is the Rust twin used by etcd).
macro_rules! lua_prelude {
    () => {
        r#"
local function fenced(p, token)
  local highest = tonumber(redis.call('GET', p .. 'chores:fencing') or '0')
  if tonumber(token) < highest then
    return false
  end
  redis.call('SET', p .. 'chores:fencing', token)
  return true
end

local function merge(p, endpoint)
  local records, count, errors = {}, 0, 0
  for _, node in ipairs(redis.call('ZRANGE', p .. 'request:stats:nodes', 0, -1)) do
    local raw = redis.call('HGET', p .. 'request:stats:node:' .. node, endpoint)
    if raw then
      local r = cjson.decode(raw)
      records[#records + 1] = r
      count = count + r.count
      errors = errors + r.errors
    end
  end
  if #records == 0 then
    redis.call('HDEL', p .. 'request:stats', endpoint)
    redis.call('SREM', p .. 'request:long_requests', endpoint)
    return false
  end
  local total, weighted, long_weight = 0, 0, 0
  for _, r in ipairs(records) do
    local w = 1
    if count > 0 then
      w = r.count
    end
    total = total + w
    weighted = weighted + w * r.avg_ms
    if r.long then
      long_weight = long_weight + w
    end
  end
  local long = long_weight * 2 >= total
  local json = string.format('{"endpoint":%s,"count":%d,"errors":%d,"avg_ms":%.17g,"long":%s}',
    cjson.encode(endpoint), count, errors, weighted / total, long and 'true' or 'false')
  redis.call('HSET', p .. 'request:stats', endpoint, json)
  if long then
    redis.call('SADD', p .. 'request:long_requests', endpoint)
  else
    redis.call('SREM', p .. 'request:long_requests', endpoint)
  end
  return true
end
"#
    };
}

/// Saves a node's records and re-merges their endpoints.
/// ARGV: prefix, node id, now (ms), then endpoint, record JSON pairs.
static SAVE_STATS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r"
local p, node = ARGV[1], ARGV[2]
redis.call('ZADD', p .. 'request:stats:nodes', ARGV[3], node)
for i = 4, #ARGV, 2 do
  redis.call('HSET', p .. 'request:stats:node:' .. node, ARGV[i], ARGV[i + 1])
  merge(p, ARGV[i])
end
return 1
"
    ))
});

/// Fenced write of cluster status fields. ARGV: prefix, token, then field, value pairs.
/// Returns 1 if applied, 0 if the token is stale.
static SET_CLUSTER_STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r"
local p = ARGV[1]
if not fenced(p, ARGV[2]) then
  return 0
end
if #ARGV > 2 then
  redis.call('HSET', p .. 'cluster:status', unpack(ARGV, 3))
end
return 1
"
    ))
});

/// Fenced removal of stale nodes' status, registry record and statistics.
/// ARGV: prefix, token, cutoff (unix ms). Returns {applied, stats removed, {node ids}}.
static GC_STALE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_prelude!(),
        r"
local p = ARGV[1]
if not fenced(p, ARGV[2]) then
  return {0, 0, {}}
end
local cutoff = tonumber(ARGV[3])
local seen = {}
local function see(id, ms)
  ms = tonumber(ms) or 0
  if seen[id] == nil or ms > seen[id] then
    seen[id] = ms
  end
end
for _, id in ipairs(redis.call('HKEYS', p .. 'node:status')) do
  see(id, 0)
end
local scores = redis.call('ZRANGE', p .. 'node:status:seen', 0, -1, 'WITHSCORES')
for i = 1, #scores, 2 do
  see(scores[i], scores[i + 1])
end
for _, id in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local raw = redis.call('GET', p .. 'node:' .. id)
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == 'table' then
      see(id, record.updated_ms)
    else
      see(id, 0)
    end
  else
    redis.call('SREM', p .. 'nodes', id)
  end
end
scores = redis.call('ZRANGE', p .. 'request:stats:nodes', 0, -1, 'WITHSCORES')
for i = 1, #scores, 2 do
  see(scores[i], scores[i + 1])
end
local removed, touched = {}, {}
for id, ms in pairs(seen) do
  if ms < cutoff then
    removed[#removed + 1] = id
    redis.call('HDEL', p .. 'node:status', id)
    redis.call('ZREM', p .. 'node:status:seen', id)
    redis.call('DEL', p .. 'node:' .. id)
    redis.call('SREM', p .. 'nodes', id)
    local contribution = p .. 'request:stats:node:' .. id
    for _, endpoint in ipairs(redis.call('HKEYS', contribution)) do
      touched[endpoint] = true
    end
    redis.call('DEL', contribution)
    redis.call('ZREM', p .. 'request:stats:nodes', id)
  end
end
local stats_removed = 0
for endpoint in pairs(touched) do
  if not merge(p, endpoint) then
    stats_removed = stats_removed + 1
  end
end
return {1, stats_removed, removed}
"
    ))
});

/// Key names under the prefix.
struct Keys {
    prefix: String,
    leader: String,
    leader_fencing: String,
    chores_fencing: String,
    nodes: String,
    node: String,
    config: String,
    config_changed: String,
    stats: String,
    long_requests: String,
    node_status: String,
    node_status_seen: String,
    cluster_status: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let key = |name: &str| format!("{prefix}{name}");
        Keys {
            prefix: prefix.to_owned(),
            leader: key("leader"),
            leader_fencing: key("leader:fencing"),
            chores_fencing: key("chores:fencing"),
            nodes: key("nodes"),
            node: key("node:"),
            config: key("config"),
            config_changed: key("config:changed"),
            stats: key("request:stats"),
            long_requests: key("request:long_requests"),
            node_status: key("node:status"),
            node_status_seen: key("node:status:seen"),
            cluster_status: key("cluster:status"),
        }
    }

    fn registry_index(&self, pool: &str) -> String {
        format!("{}registry:{pool}", self.prefix)
    }

    fn registry_entries(&self, pool: &str) -> String {
        format!("{}registry:{pool}:", self.prefix)
    }
}

/// Maps a Redis error to a [`StoreError`] naming the operation.
trait During<T> {
    fn during(self, op: &str) -> Result<T, StoreError>;
}

impl<T> During<T> for RedisResult<T> {
    fn during(self, op: &str) -> Result<T, StoreError> {
        self.map_err(|e| classify(op, &e))
    }
}

fn classify(op: &str, e: &RedisError) -> StoreError {
    let message = format!("{KIND} {op}: {e}");
    let unavailable = e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        );
    if unavailable {
        StoreError::Unavailable(message)
    } else if matches!(e.kind(), ErrorKind::Parse | ErrorKind::UnexpectedReturnType) {
        StoreError::Protocol(message)
    } else if matches!(e.kind(), ErrorKind::InvalidClientConfig) {
        StoreError::Invalid(message)
    } else {
        StoreError::Rejected(message)
    }
}

fn protocol(op: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Protocol(format!("{KIND} {op}: {what}"))
}

fn to_json<T: serde::Serialize>(op: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| protocol(op, format!("cannot encode: {e}")))
}

/// Parses JSON values, skipping (with a warning) those Fulcrum cannot read.
fn parse_all<T: serde::de::DeserializeOwned>(op: &str, raw: Vec<String>) -> Vec<T> {
    raw.into_iter()
        .filter_map(|value| match serde_json::from_str(&value) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                tracing::warn!(store = KIND, op, %error, value, "skipping unreadable record");
                None
            }
        })
        .collect()
}

/// TTL in milliseconds for `PX`, at least 1.
fn ttl_ms(ttl: Duration) -> u64 {
    duration_ms(ttl).max(1)
}

/// Redis side of [`super::Store`]; clones share the connection.
#[derive(Clone)]
pub(crate) struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Arc<Keys>,
    health: Arc<HealthTracker>,
}

impl RedisStore {
    /// Creates the handle without waiting for a connection and starts its probe.
    pub(crate) fn connect(
        url: &str,
        key_prefix: &str,
        cancel: CancellationToken,
    ) -> Result<RedisStore, StoreError> {
        let invalid = |e: RedisError| StoreError::Invalid(format!("{KIND} url {url:?}: {e}"));
        let client = redis::Client::open(url).map_err(invalid)?;
        // The manager retries forever: 100 ms doubling to 2.5 s, plus up to 100 % jitter.
        let config = ConnectionManagerConfig::new()
            .set_min_delay(RECONNECT_MIN)
            .set_max_delay(RECONNECT_MAX / 2)
            .set_exponent_base(2.0)
            .set_number_of_retries(usize::MAX)
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(invalid)?;
        let store = RedisStore {
            client,
            conn,
            keys: Arc::new(Keys::new(key_prefix)),
            health: Arc::new(HealthTracker::new(KIND)),
        };
        tokio::spawn(store.clone().probe(cancel));
        Ok(store)
    }

    pub(crate) fn health(&self) -> &HealthTracker {
        &self.health
    }

    /// Pings once a second while Redis answers, with backoff while it does not; keeps
    /// [`HealthTracker`] current and the connection manager reconnecting when idle.
    async fn probe(self, cancel: CancellationToken) {
        probe_loop(cancel, || async {
            self.health
                .run("ping", async {
                    let mut conn = self.conn.clone();
                    redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .during("ping")
                })
                .await
                .is_ok()
        })
        .await;
    }

    pub(crate) async fn try_acquire(
        &self,
        node_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        const OP: &str = "try_acquire";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let token: Option<u64> = ACQUIRE
                    .key(&self.keys.leader)
                    .key(&self.keys.leader_fencing)
                    .key(&self.keys.chores_fencing)
                    .arg(node_id)
                    .arg(ttl_ms(ttl))
                    .invoke_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(token.map(|token| Lease {
                    node_id: node_id.to_owned(),
                    token,
                    holder: LeaseHolder::Redis {
                        value: format!("{node_id}:{token}"),
                    },
                }))
            })
            .await
    }

    pub(crate) async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        const OP: &str = "renew";
        let LeaseHolder::Redis { value } = &lease.holder else {
            return Err(StoreError::Invalid(format!(
                "{KIND} {OP}: not a Redis lease"
            )));
        };
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let extended: i64 = RENEW
                    .key(&self.keys.leader)
                    .arg(value)
                    .arg(ttl_ms(ttl))
                    .invoke_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(extended == 1)
            })
            .await
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        const OP: &str = "release";
        let LeaseHolder::Redis { value } = &lease.holder else {
            return Err(StoreError::Invalid(format!(
                "{KIND} {OP}: not a Redis lease"
            )));
        };
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let _deleted: i64 = RELEASE
                    .key(&self.keys.leader)
                    .arg(value)
                    .invoke_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(())
            })
            .await
    }

    pub(crate) async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        const OP: &str = "leader";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let value: Option<String> = redis::cmd("GET")
                    .arg(&self.keys.leader)
                    .query_async(&mut conn)
                    .await
                    .during(OP)?;
                let Some(value) = value else {
                    return Ok(None);
                };
                let (node_id, token) = value
                    .rsplit_once(':')
                    .and_then(|(node, token)| Some((node, token.parse::<u64>().ok()?)))
                    .ok_or_else(|| {
                        protocol(
                            OP,
                            format!("leader key holds {value:?}, not <node_id>:<token>"),
                        )
                    })?;
                Ok(Some(LeaderRecord {
                    node_id: node_id.to_owned(),
                    token,
                }))
            })
            .await
    }

    pub(crate) async fn heartbeat(
        &self,
        node: &NodeRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        const OP: &str = "heartbeat";
        let json = to_json(OP, node)?;
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(format!("{}{}", self.keys.node, node.node_id))
                    .arg(json)
                    .arg("PX")
                    .arg(ttl_ms(ttl))
                    .ignore()
                    .cmd("SADD")
                    .arg(&self.keys.nodes)
                    .arg(&node.node_id)
                    .ignore()
                    .exec_async(&mut conn)
                    .await
                    .during(OP)
            })
            .await
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        const OP: &str = "nodes";
        let raw = self
            .health
            .run(OP, self.list_indexed(OP, &self.keys.nodes, &self.keys.node))
            .await?;
        Ok(parse_all(OP, raw))
    }

    async fn list_indexed(
        &self,
        op: &str,
        index: &str,
        entry_prefix: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        LIST_INDEXED
            .key(index)
            .arg(entry_prefix)
            .invoke_async(&mut conn)
            .await
            .during(op)
    }

    pub(crate) async fn remove_node(&self, node_id: &str) -> Result<(), StoreError> {
        const OP: &str = "remove_node";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(format!("{}{node_id}", self.keys.node))
                    .ignore()
                    .cmd("SREM")
                    .arg(&self.keys.nodes)
                    .arg(node_id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(&self.keys.node_status)
                    .arg(node_id)
                    .ignore()
                    .cmd("ZREM")
                    .arg(&self.keys.node_status_seen)
                    .arg(node_id)
                    .ignore()
                    .exec_async(&mut conn)
                    .await
                    .during(OP)
            })
            .await
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
                let mut conn = self.conn.clone();
                let (written, version): (i64, u64) = PUT_CONFIG
                    .key(&self.keys.config)
                    .arg(expected_version)
                    .arg(doc)
                    .arg(&self.keys.config_changed)
                    .arg(version)
                    .invoke_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(if written == 1 {
                    PutConfig::Written(version)
                } else {
                    PutConfig::Conflict { current: version }
                })
            })
            .await
    }

    pub(crate) async fn config(&self) -> Result<Option<(u64, String)>, StoreError> {
        const OP: &str = "config";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let (version, doc): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(&self.keys.config)
                    .arg("version")
                    .arg("doc")
                    .query_async(&mut conn)
                    .await
                    .during(OP)?;
                match (version, doc) {
                    (None, None) => Ok(None),
                    (Some(version), Some(doc)) => {
                        let version = version.parse::<u64>().map_err(|_| {
                            protocol(OP, format!("config version {version:?} is not a number"))
                        })?;
                        Ok(Some((version, doc)))
                    }
                    _ => Err(protocol(OP, "config hash lacks its version or doc")),
                }
            })
            .await
    }

    /// Keeps `tx` current: a subscription to the change channel (re-established with
    /// backoff) and a poll every [`CONFIG_POLL_INTERVAL`].
    pub(crate) async fn watch_config(
        self,
        tx: watch::Sender<ConfigSnapshot>,
        cancel: CancellationToken,
    ) {
        let mut subscription: Option<PubSubStream> = None;
        let mut backoff = Backoff::new();
        let mut next_subscribe = Instant::now();
        let mut poll = tokio::time::interval(CONFIG_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if subscription.is_none() && Instant::now() >= next_subscribe {
                let subscribed = tokio::select! {
                    _ = cancel.cancelled() => return,
                    subscribed = tokio::time::timeout(OP_TIMEOUT, self.subscribe()) => subscribed,
                };
                match subscribed {
                    Ok(Ok(stream)) => {
                        subscription = Some(stream);
                        backoff.reset();
                        // Catch up on what was written while unsubscribed.
                        self.refresh_config(&tx).await;
                    }
                    Ok(Err(_)) | Err(_) => next_subscribe = Instant::now() + backoff.next_delay(),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                message = next_message(&mut subscription) => {
                    if message.is_none() {
                        tracing::debug!(store = KIND, "configuration subscription ended");
                        subscription = None;
                    }
                    self.refresh_config(&tx).await;
                }
                _ = poll.tick() => self.refresh_config(&tx).await,
            }
        }
    }

    async fn subscribe(&self) -> RedisResult<PubSubStream> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.keys.config_changed).await?;
        Ok(pubsub.into_on_message())
    }

    async fn refresh_config(&self, tx: &watch::Sender<ConfigSnapshot>) {
        match self.config().await {
            Ok(config) => publish_config(tx, config),
            Err(error) => tracing::debug!(store = KIND, %error, "configuration not read"),
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
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(format!(
                        "{}{}",
                        self.keys.registry_entries(pool),
                        backend.address
                    ))
                    .arg(json)
                    .arg("PX")
                    .arg(ttl_ms(ttl))
                    .ignore()
                    .cmd("SADD")
                    .arg(self.keys.registry_index(pool))
                    .arg(&backend.address)
                    .ignore()
                    .exec_async(&mut conn)
                    .await
                    .during(OP)
            })
            .await
    }

    pub(crate) async fn deregister_backend(
        &self,
        pool: &str,
        address: &str,
    ) -> Result<bool, StoreError> {
        const OP: &str = "deregister_backend";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let (deleted, _unindexed): (i64, i64) = redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(format!("{}{address}", self.keys.registry_entries(pool)))
                    .cmd("SREM")
                    .arg(self.keys.registry_index(pool))
                    .arg(address)
                    .query_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(deleted > 0)
            })
            .await
    }

    pub(crate) async fn registered_backends(
        &self,
        pool: &str,
    ) -> Result<Vec<RegisteredBackend>, StoreError> {
        const OP: &str = "registered_backends";
        let index = self.keys.registry_index(pool);
        let entries = self.keys.registry_entries(pool);
        let raw = self
            .health
            .run(OP, self.list_indexed(OP, &index, &entries))
            .await?;
        Ok(parse_all(OP, raw))
    }

    pub(crate) async fn save_stats(
        &self,
        node_id: &str,
        stats: &[EndpointStatRecord],
    ) -> Result<(), StoreError> {
        const OP: &str = "save_stats";
        let mut args = Vec::with_capacity(stats.len() * 2);
        for record in stats {
            args.push(record.endpoint.clone());
            args.push(to_json(OP, record)?);
        }
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let _: i64 = SAVE_STATS
                    .arg(&self.keys.prefix)
                    .arg(node_id)
                    .arg(now_ms())
                    .arg(&args)
                    .invoke_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(())
            })
            .await
    }

    pub(crate) async fn load_stats(&self) -> Result<Vec<EndpointStatRecord>, StoreError> {
        const OP: &str = "load_stats";
        let raw = self.hgetall(OP, &self.keys.stats).await?;
        Ok(parse_all(OP, raw.into_values().collect()))
    }

    pub(crate) async fn long_requests(&self) -> Result<Vec<String>, StoreError> {
        const OP: &str = "long_requests";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                redis::cmd("SMEMBERS")
                    .arg(&self.keys.long_requests)
                    .query_async(&mut conn)
                    .await
                    .during(OP)
            })
            .await
    }

    pub(crate) async fn set_node_status(
        &self,
        node_id: &str,
        status_json: &str,
    ) -> Result<(), StoreError> {
        const OP: &str = "set_node_status";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                redis::pipe()
                    .atomic()
                    .cmd("HSET")
                    .arg(&self.keys.node_status)
                    .arg(node_id)
                    .arg(status_json)
                    .ignore()
                    .cmd("ZADD")
                    .arg(&self.keys.node_status_seen)
                    .arg(now_ms())
                    .arg(node_id)
                    .ignore()
                    .exec_async(&mut conn)
                    .await
                    .during(OP)
            })
            .await
    }

    pub(crate) async fn node_statuses(
        &self,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        self.hgetall("node_statuses", &self.keys.node_status).await
    }

    pub(crate) async fn set_cluster_status(
        &self,
        token: u64,
        fields: &[(String, String)],
    ) -> Result<bool, StoreError> {
        const OP: &str = "set_cluster_status";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let mut invocation = SET_CLUSTER_STATUS.prepare_invoke();
                invocation.arg(&self.keys.prefix).arg(token);
                for (field, value) in fields {
                    invocation.arg(field).arg(value);
                }
                let applied: i64 = invocation.invoke_async(&mut conn).await.during(OP)?;
                Ok(applied == 1)
            })
            .await
    }

    pub(crate) async fn cluster_status(
        &self,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        self.hgetall("cluster_status", &self.keys.cluster_status)
            .await
    }

    pub(crate) async fn gc_stale(
        &self,
        token: u64,
        cutoff_ms: u64,
    ) -> Result<GcReport, StoreError> {
        const OP: &str = "gc_stale";
        self.health
            .run(OP, async {
                let mut conn = self.conn.clone();
                let (applied, stats_removed, nodes_removed): (i64, usize, Vec<String>) = GC_STALE
                    .arg(&self.keys.prefix)
                    .arg(token)
                    .arg(cutoff_ms)
                    .invoke_async(&mut conn)
                    .await
                    .during(OP)?;
                Ok(GcReport {
                    applied: applied == 1,
                    nodes_removed,
                    stats_removed,
                })
            })
            .await
    }

    async fn hgetall(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        self.health
            .run(op, async {
                let mut conn = self.conn.clone();
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .during(op)
            })
            .await
    }
}

/// The next message of the subscription, or never without one.
async fn next_message(subscription: &mut Option<PubSubStream>) -> Option<redis::Msg> {
    match subscription {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
