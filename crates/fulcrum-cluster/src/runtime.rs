//! The control plane of one node: what turns a [`Node`] into a member of a cluster.
//!
//! [`ControlPlane`] owns the node's configuration as three layers — the file (`base`),
//! the shared run-time overlay ([`SharedConfig`]) and the discovered backends (DNS,
//! registry) — and applies their composition with [`Node::reload`] whenever one of them
//! changes. With a `cluster` block it also:
//!
//! - gossips (chitchat) this node's addresses, tags, load, applied config version and one
//!   compact summary per backend; health changes are published at once, the rest every
//!   `publish_interval`;
//! - merges the other nodes' views of each backend by `health_merge` and takes a backend
//!   out of rotation here ([`BackendFlags::PEER_DOWN`]) when the cluster says so;
//! - keeps the shared overlay in the coordination store (compare-and-set on its version,
//!   watched for changes) or, with `none`, spreads it by gossip;
//! - runs the leader election ([`crate::election::Elector`]) and, as leader, the cluster
//!   chores (stale-node garbage collection, `cluster:status`), fenced by its token;
//! - heartbeats the node registry, persists endpoint statistics and reads them back at
//!   start (warm start), and reads registered backends.
//!
//! Every loop here runs on the control runtime, never on the request path; the data
//! plane sees the cluster only through backend flags and reloaded pool states. When the
//! store is down, the node keeps serving with its last known state: loops log, count the
//! outage and retry; no request waits on the store.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum_balance::BackendFlags;
use fulcrum_config::{
    BackendConfig, ClusterConfig, Config, CoordinationBackend, DiscoveryConfig, DiscoverySource,
    HealthMergeRule,
};
use fulcrum_proxy::Node;
use fulcrum_proxy::spec::node_spec;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::assign;
use crate::discovery::Dns;
use crate::election::{Elector, LeaderState};
use crate::health::{self, HealthMerge};
use crate::membership::{
    BackendHealth, BackendSummary, ClusterEvent, ConfigDoc, KEY_ADMIN, KEY_CONFIG_DOC,
    KEY_CONFIG_DOC_PART, KEY_CONFIG_VERSION, KEY_LEASE, KEY_LISTENERS, KEY_LOAD, KEY_STATUS,
    KEY_TAGS, Member, MemberState, Membership, MembershipSettings, NodeLoad, backends_of,
};
use crate::shared::{AdminState, Change, ChangeError, SharedConfig, effective_config};
use crate::store::{
    EndpointStatRecord, NodeRecord, PutConfig, RegisteredBackend, Store, StoreSettings,
    now_ms as unix_ms,
};

/// Gossip key under which a node publishes its [`rejoin_grace`], in milliseconds.
pub const KEY_HEALTH_GRACE: &str = "health_grace_ms";

/// A peer back from a failure counts in the health merge once it has been alive for at
/// least this many `publish_interval`s (see [`rejoin_grace`]).
pub const REJOIN_GRACE_INTERVALS: u32 = 3;

/// Upper bound of the grace, in `publish_interval`s (10 s by default).
pub const REJOIN_GRACE_MAX_INTERVALS: u32 = 10;

/// How long a node back from a failure (a partition, a pause) must have been alive
/// before the others count its backend views in the health merge — each node computes its
/// own from its configuration and publishes it ([`KEY_HEALTH_GRACE`]): long enough for it
/// to run its health checks again
/// (`rise` passes after up to one interval's wait, each bounded by the timeout) and
/// republish, so the views it formed while cut off do not take reachable backends out on
/// every node: `max(3 × publish_interval, max over pools of ((rise + 1) × interval +
/// timeout) + publish_interval)`, capped at 10 × publish_interval. A node seen for the
/// first time votes at once.
pub fn rejoin_grace(config: &Config, publish_interval: Duration) -> Duration {
    let checks = config
        .pools
        .values()
        .filter_map(|p| p.health_check.as_ref())
        .map(|h| h.interval * (h.rise + 1) + h.timeout + publish_interval)
        .max()
        .unwrap_or_default();
    // Capped so that a pool with very slow checks cannot keep peers from voting for long.
    let cap = publish_interval * REJOIN_GRACE_MAX_INTERVALS;
    (publish_interval * REJOIN_GRACE_INTERVALS).max(checks.min(cap))
}

/// How long a write waits for other nodes to report its version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Return once applied here (default).
    #[default]
    Async,
    /// Wait until a majority of live nodes report the new version.
    Quorum,
    /// Wait until every live node reports it.
    All,
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(Self::Async),
            "quorum" => Ok(Self::Quorum),
            "all" => Ok(Self::All),
            other => Err(format!(
                "unknown consistency `{other}`; expected async, quorum or all"
            )),
        }
    }
}

/// Why a run-time change was not applied (or not confirmed).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The change names something unknown or would make the configuration invalid.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The coordination store could not be reached; nothing was changed.
    #[error("coordination store unavailable; nothing was changed: {0}")]
    StoreUnavailable(String),
    /// The write lost to a concurrent one and was not applied: other writers kept winning
    /// the store's compare-and-set, or (without a store) the change could not be
    /// re-applied on top of the concurrent write that won.
    #[error("write conflict: {0}")]
    Conflict(String),
    /// The change was applied, but not every node required reported it in time.
    #[error(
        "version {version} applied here, but {missing} node(s) did not report it within \
         {timeout_ms} ms: {lagging}"
    )]
    Lagging {
        /// The version written.
        version: u64,
        /// How many more nodes were needed.
        missing: usize,
        /// The wait, ms.
        timeout_ms: u64,
        /// `node (version)` of each node behind.
        lagging: String,
    },
    /// The composed configuration could not be applied to the node.
    #[error("cannot apply the configuration: {0}")]
    Apply(String),
    /// The registry is used without a coordination store.
    #[error("pool `{0}` uses the registry, which needs a coordination store")]
    NoRegistry(String),
}

/// What a successful write reports.
#[derive(Clone, Debug, Serialize)]
pub struct WriteResult {
    /// Version of the shared configuration written.
    pub version: u64,
    /// The consistency waited for.
    pub consistency: &'static str,
    /// Live nodes that run a shared configuration holding this write (this one
    /// included): the document written, or a later one built on it.
    pub acknowledged: Vec<String>,
    /// Members gossip reports `failed` or `left`: not waited for, and not counted in the
    /// quorum (it is a majority of the live nodes).
    pub skipped: Vec<String>,
}

/// One backend as the cluster sees it (`GET /api/cluster/status`).
#[derive(Clone, Debug, Serialize)]
pub struct BackendClusterView {
    /// Pool.
    pub pool: String,
    /// Address.
    pub address: String,
    /// This node's own view.
    pub local: &'static str,
    /// Each other live node's view, by node id.
    pub peers: BTreeMap<String, &'static str>,
    /// Whether the merge rule takes the backend out of rotation cluster-wide.
    pub cluster_down: bool,
    /// The merge's reason.
    pub reason: &'static str,
}

/// One member as `GET /api/cluster/nodes` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    /// Node id.
    pub node_id: String,
    /// `alive`, `failed` or `left`.
    pub state: MemberState,
    /// Whether this is the node answering.
    pub is_self: bool,
    /// Gossip address.
    pub gossip_addr: String,
    /// Admin API address.
    pub admin: Option<String>,
    /// Listener addresses.
    pub listeners: Vec<String>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Shared configuration version it has applied.
    pub config_version: Option<u64>,
    /// Its load.
    pub load: Option<NodeLoad>,
    /// Whether it is the leader.
    pub is_leader: bool,
    /// Its view of every backend.
    pub backends: Vec<BackendSummary>,
}

/// Leader information (`GET /api/cluster/leader`).
#[derive(Clone, Debug, Serialize)]
pub struct LeaderView {
    /// Leader node id, if one is known.
    pub leader: Option<String>,
    /// The leader's state as this node sees it (`null` without a leader or for a node
    /// gossip does not know). With a store, a leader that died keeps its lease until the
    /// lease expires (`lease_ttl`): it is still `leader` then, with `leader_state:
    /// failed`, and no other node can lead before the lease is gone; a leader that stepped
    /// down while the store was unreachable is `stepped_down` until its release reaches
    /// the store.
    pub leader_state: Option<LeaderMemberState>,
    /// `true` while this node cannot reach the store: `leader` is the last one it read
    /// and may have stepped down since (a leader that cannot renew its lease steps down
    /// within two thirds of `lease_ttl`). Always `false` with `coordination: none`.
    pub stale: bool,
    /// Fencing token of the current lease (`null` with `coordination: none`).
    pub token: Option<u64>,
    /// Whether this node leads.
    pub is_self: bool,
    /// `none`, `redis` or `etcd`.
    pub coordination: &'static str,
    /// How the leader is chosen.
    pub method: &'static str,
}

/// The state of the node the store names leader (`leader_state` of [`LeaderView`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaderMemberState {
    /// Alive by gossip, and not known to have given the lease up.
    Alive,
    /// Declared dead by the failure detector.
    Failed,
    /// Left the cluster gracefully.
    Left,
    /// Alive, but it says it does not lead: it stepped down (its renewals failed) and the
    /// release of its lease has not reached the store yet, so the store still names it
    /// until the release does or the lease expires. No node leads meanwhile.
    SteppedDown,
}

impl From<MemberState> for LeaderMemberState {
    fn from(state: MemberState) -> Self {
        match state {
            MemberState::Alive => LeaderMemberState::Alive,
            MemberState::Failed => LeaderMemberState::Failed,
            MemberState::Left => LeaderMemberState::Left,
        }
    }
}

/// A change written on this node, kept (without a store) so that it can be re-applied
/// if a concurrent write wins over the document holding it.
struct OwnWrite {
    /// The version of this node's latest document holding it.
    version: u64,
    change: Change,
}

/// Most changes [`OwnWrite`] keeps: a concurrent write that wins over more of this node's
/// writes (a long partition) loses the oldest of them.
const OWN_WRITES_KEPT: usize = 1024;

struct ClusterParts {
    config: ClusterConfig,
    membership: Membership,
    store: Option<Store>,
    leader: watch::Receiver<LeaderState>,
    admin: String,
    listeners: Vec<String>,
}

struct Inner {
    node: Node,
    threads: usize,
    base: Mutex<Config>,
    shared: Mutex<SharedConfig>,
    discovered: Mutex<BTreeMap<String, Vec<BackendConfig>>>,
    /// The composed configuration last applied to the node.
    applied: Mutex<Option<Config>>,
    /// Serialises writes (compose + reload) on this node.
    write: tokio::sync::Mutex<()>,
    /// Without a store: this node's writes, oldest first (see [`OwnWrite`]).
    own_writes: Mutex<Vec<OwnWrite>>,
    /// The last shared configuration this node refused (its composition with this node's
    /// file is invalid here), until one is applied or the file is reloaded.
    refused: Mutex<Option<RefusedConfig>>,
    /// Held by every path that composes `base` + `shared` + `discovered` and applies the
    /// result (a reload, an adopted or submitted overlay, a discovery answer), from reading
    /// the layers to storing the new one, so that each applies on top of the latest of the
    /// others. Without it two such paths could interleave and the later `apply` run a
    /// composition missing the other's layer, while the stored layers claimed it applied.
    /// Never held across an await.
    compose: Mutex<()>,
    cluster: Option<ClusterParts>,
    views: Mutex<Vec<BackendClusterView>>,
    assignments: Mutex<BTreeMap<String, String>>,
    /// The discovery settings of the pools that discover backends, and the token of the
    /// tasks running them (replaced when a reload changes the settings).
    discovery: Mutex<(BTreeMap<String, DiscoveryConfig>, CancellationToken)>,
    cancel: CancellationToken,
}

/// A shared configuration version this node could not apply (`config_refused` in
/// `GET /api/cluster/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedConfig {
    /// Its version.
    pub version: u64,
    /// The node that wrote it.
    pub written_by: String,
    /// Why: the validator's or the node's message about the composition with this node's
    /// file (e.g. a removal that leaves one of its pools without backends).
    pub error: String,
    /// When it was refused, Unix milliseconds.
    pub at_ms: u64,
}

/// The node's control plane; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("clustered", &self.inner.cluster.is_some())
            .finish_non_exhaustive()
    }
}

fn health_of(flags: BackendFlags) -> BackendHealth {
    let local = flags.local();
    if local.contains(BackendFlags::DISABLED) {
        BackendHealth::Disabled
    } else if local.contains(BackendFlags::DRAINING) {
        BackendHealth::Draining
    } else if local.contains(BackendFlags::UNHEALTHY) {
        BackendHealth::Unhealthy
    } else if local.contains(BackendFlags::EJECTED) {
        BackendHealth::Ejected
    } else {
        BackendHealth::Healthy
    }
}

fn health_name(h: BackendHealth) -> &'static str {
    match h {
        BackendHealth::Healthy => "healthy",
        BackendHealth::Unhealthy => "unhealthy",
        BackendHealth::Ejected => "ejected",
        BackendHealth::Draining => "draining",
        BackendHealth::Disabled => "disabled",
    }
}

fn merge_rule(rule: HealthMergeRule) -> HealthMerge {
    match rule {
        HealthMergeRule::Any => HealthMerge::Any,
        HealthMergeRule::Majority => HealthMerge::Majority,
        HealthMergeRule::Local => HealthMerge::Local,
    }
}

impl ControlPlane {
    /// Starts the control plane of `node`, which runs `config` (the file). Without a
    /// `cluster` block only discovery runs. With one, joins the gossip cluster, connects
    /// to the coordination store (a store that is down does not stop the start: the node
    /// serves and reconnects), adopts the current shared configuration, and spawns the
    /// loops described in the module documentation on the current runtime.
    ///
    /// # Errors
    /// A message when the gossip socket cannot be bound, a seed is malformed, or the
    /// store settings are invalid.
    pub async fn start(
        node: Node,
        config: Config,
        admin: SocketAddr,
    ) -> Result<ControlPlane, String> {
        let cancel = CancellationToken::new();
        let threads = node.threads();
        let cluster = match &config.cluster {
            None => None,
            Some(c) => Some(Self::join(c, &config, &node, admin, cancel.clone()).await?),
        };
        let plane = ControlPlane {
            inner: Arc::new(Inner {
                node,
                threads,
                base: Mutex::new(config.clone()),
                shared: Mutex::new(SharedConfig::default()),
                discovered: Mutex::new(BTreeMap::new()),
                applied: Mutex::new(Some(config.clone())),
                write: tokio::sync::Mutex::new(()),
                own_writes: Mutex::new(Vec::new()),
                refused: Mutex::new(None),
                compose: Mutex::new(()),
                cluster,
                views: Mutex::new(Vec::new()),
                assignments: Mutex::new(BTreeMap::new()),
                discovery: Mutex::new((BTreeMap::new(), cancel.child_token())),
                cancel,
            }),
        };
        plane.spawn_discovery(&config);
        if let Some(c) = &plane.inner.cluster {
            plane.inner.node.metrics().enable_cluster(c.store.is_some());
            plane.startup_sync().await;
            plane.spawn_cluster_loops();
        }
        Ok(plane)
    }

    async fn join(
        c: &ClusterConfig,
        config: &Config,
        node: &Node,
        admin: SocketAddr,
        cancel: CancellationToken,
    ) -> Result<ClusterParts, String> {
        let listeners: Vec<String> = node
            .listener_status()
            .iter()
            .map(|l| l.listen.to_string())
            .collect();
        let settings = MembershipSettings {
            node_id: c.node_id.clone(),
            cluster_id: c.cluster_id.clone(),
            listen: c.gossip.listen,
            advertise: c.gossip.advertise.unwrap_or(c.gossip.listen),
            seeds: c.gossip.seeds.clone(),
            interval: c.gossip.interval,
            phi_threshold: c.gossip.phi_threshold,
            dead_grace: Duration::from_secs(3600),
        };
        let initial = vec![
            (KEY_ADMIN.to_owned(), admin.to_string()),
            (
                KEY_LISTENERS.to_owned(),
                serde_json::to_string(&listeners).unwrap_or_default(),
            ),
            (
                KEY_TAGS.to_owned(),
                serde_json::to_string(&c.tags).unwrap_or_default(),
            ),
            (KEY_CONFIG_VERSION.to_owned(), "0".to_owned()),
            (KEY_STATUS.to_owned(), "alive".to_owned()),
            (
                KEY_HEALTH_GRACE.to_owned(),
                rejoin_grace(config, c.publish_interval)
                    .as_millis()
                    .to_string(),
            ),
        ];
        let membership = Membership::start(settings, initial)
            .await
            .map_err(|e| format!("cluster: gossip: {e}"))?;
        let store_settings = match c.coordination.backend {
            CoordinationBackend::None => None,
            CoordinationBackend::Redis => Some(StoreSettings::Redis {
                url: c.coordination.url.clone().unwrap_or_default(),
                key_prefix: if c.coordination.prefix.is_empty() {
                    "fulcrum:".to_owned()
                } else {
                    c.coordination.prefix.clone()
                },
            }),
            CoordinationBackend::Etcd => Some(StoreSettings::Etcd {
                endpoints: c.coordination.endpoints.clone(),
                prefix: if c.coordination.prefix.is_empty() {
                    "/fulcrum/".to_owned()
                } else {
                    c.coordination.prefix.clone()
                },
            }),
        };
        let store = match store_settings {
            None => None,
            Some(s) => Some(
                Store::connect(&s)
                    .await
                    .map_err(|e| format!("cluster: coordination store: {e}"))?,
            ),
        };
        let leader = match &store {
            Some(store) => Elector::spawn(
                store.clone(),
                c.node_id.clone(),
                c.coordination.lease_ttl,
                cancel.child_token(),
            ),
            None => {
                let (tx, rx) = watch::channel(LeaderState {
                    is_leader: false,
                    leader: None,
                    token: None,
                    store_available: true,
                    stepped_down: None,
                    changed_ms: unix_ms(),
                });
                let membership = membership.clone();
                let me = c.node_id.clone();
                let cancel = cancel.child_token();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(200));
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            _ = tick.tick() => {}
                        }
                        let leader = membership.membership_leader().await;
                        let is_leader = leader.as_deref() == Some(me.as_str());
                        tx.send_if_modified(|s| {
                            if s.leader == leader && s.is_leader == is_leader {
                                return false;
                            }
                            s.leader.clone_from(&leader);
                            s.is_leader = is_leader;
                            s.changed_ms = unix_ms();
                            true
                        });
                    }
                });
                rx
            }
        };
        tracing::info!(
            node_id = %c.node_id,
            gossip = %membership.gossip_addr(),
            coordination = ?c.coordination.backend,
            "joined the cluster"
        );
        Ok(ClusterParts {
            config: c.clone(),
            membership,
            store,
            leader,
            admin: admin.to_string(),
            listeners,
        })
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Whether the node is part of a cluster.
    pub fn is_clustered(&self) -> bool {
        self.inner.cluster.is_some()
    }

    /// This node's id in the cluster.
    pub fn node_id(&self) -> Option<&str> {
        self.inner
            .cluster
            .as_ref()
            .map(|c| c.config.node_id.as_str())
    }

    /// The shared configuration applied here.
    pub fn shared(&self) -> SharedConfig {
        self.inner.shared.lock().clone()
    }

    /// Stops the loops and, in a cluster, leaves it gracefully (the others see
    /// `node_left`, not `node_failed`) and releases the leader lease if held.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        if let Some(c) = &self.inner.cluster {
            c.membership.leave().await;
        }
    }

    // ---------------------------------------------------------------- composition --

    /// Replaces the file layer (SIGHUP, `POST /api/reload`) and applies the composition.
    /// TLS certificate and key files are re-read even when the composition is unchanged,
    /// so a renewed certificate takes effect on reload.
    ///
    /// # Errors
    /// The validator's or the node's message; nothing changed then.
    pub fn set_base(&self, config: Config) -> Result<(), String> {
        let _compose = self.inner.compose.lock();
        let shared = self.inner.shared.lock().clone();
        // Backends found for a pool that no longer discovers any leave with the reload.
        let mut discovered = self.inner.discovered.lock().clone();
        discovered.retain(|pool, _| {
            config
                .pools
                .get(pool)
                .is_some_and(|p| p.discovery.source != DiscoverySource::Static)
        });
        self.apply(&config, &shared, &discovered, true)?;
        // The new file may take what the old one could not: offer it again.
        *self.inner.refused.lock() = None;
        *self.inner.discovered.lock() = discovered;
        self.spawn_discovery(&config);
        *self.inner.base.lock() = config;
        Ok(())
    }

    /// Composes `base` + `shared` + `discovered`, validates it, reloads the node if the
    /// composition changed, and sets the operator states the overlay gives. With
    /// `reread_certificates` (a reload from the file) TLS listeners read their certificate
    /// and key files again, changed composition or not; other changes (discovery,
    /// overlay) keep the TLS state, session cache included.
    fn apply(
        &self,
        base: &Config,
        shared: &SharedConfig,
        discovered: &BTreeMap<String, Vec<BackendConfig>>,
        reread_certificates: bool,
    ) -> Result<(), String> {
        let config = effective_config(base, shared, discovered);
        let changed = self.inner.applied.lock().as_ref() != Some(&config);
        if changed {
            config.validate().map_err(|e| e.to_string())?;
            let spec = node_spec(&config, Some(self.inner.threads)).map_err(|e| e.to_string())?;
            self.inner
                .node
                .reload(&spec, reread_certificates)
                .map_err(|e| e.to_string())?;
            *self.inner.applied.lock() = Some(config);
        } else if reread_certificates {
            self.inner
                .node
                .reload_certificates()
                .map_err(|e| e.to_string())?;
        }
        // In a cluster every operator state goes through the overlay, which is then the
        // whole truth; on a single node drain/disable act on the node directly and the
        // overlay never holds them, so it must not clear them.
        if self.inner.cluster.is_some() {
            self.apply_admin_states(shared);
        }
        Ok(())
    }

    fn apply_admin_states(&self, shared: &SharedConfig) {
        for pool in self.inner.node.pools() {
            let state = pool.state();
            for b in &state.backends {
                let want = shared.admin_state(pool.name(), &b.address);
                let flags = b.live.flags();
                let (drain, disable) = match want {
                    Some(AdminState::Draining) => (true, false),
                    Some(AdminState::Disabled) => (false, true),
                    None => (false, false),
                };
                if drain != flags.contains(BackendFlags::DRAINING) {
                    if drain {
                        pool.set_flag(&b.live, BackendFlags::DRAINING);
                    } else {
                        pool.clear_flag(&b.live, BackendFlags::DRAINING);
                    }
                }
                if disable != flags.contains(BackendFlags::DISABLED) {
                    if disable {
                        pool.set_flag(&b.live, BackendFlags::DISABLED);
                    } else {
                        pool.clear_flag(&b.live, BackendFlags::DISABLED);
                    }
                }
            }
        }
    }

    /// Adopts `doc` if it is newer than the applied overlay. Without a store, this node's
    /// own writes that `doc` does not hold are first re-applied on top of it
    /// ([`Self::rebase_own_writes`]), so a write that lost a race is not dropped.
    /// `seen` is the highest version any node reports.
    fn adopt(&self, doc: SharedConfig, seen: u64) {
        let _compose = self.inner.compose.lock();
        if !is_newer(&doc, &self.inner.shared.lock()) {
            return;
        }
        // Offered again on every gossip round (or store watch): refused once until the
        // file is reloaded.
        if self
            .inner
            .refused
            .lock()
            .as_ref()
            .is_some_and(|r| (r.version, &r.written_by) == (doc.version, &doc.written_by))
        {
            return;
        }
        let offered = (doc.version, doc.written_by.clone());
        let base = self.inner.base.lock().clone();
        let discovered = self.inner.discovered.lock().clone();
        let doc = self.rebase_own_writes(doc, &base, &discovered, seen);
        match self.apply(&base, &doc, &discovered, false) {
            Ok(()) => {
                tracing::info!(
                    version = doc.version,
                    written_by = %doc.written_by,
                    "shared configuration applied"
                );
                *self.inner.refused.lock() = None;
                self.set_applied_version(&doc);
            }
            Err(error) => {
                // All or nothing: the node keeps the version it runs. Remembered so that
                // the same document is not retried (and logged) on every gossip round;
                // the operator sees it in the log and in `GET /api/cluster/status`.
                tracing::error!(
                    version = offered.0,
                    written_by = %offered.1,
                    %error,
                    "shared configuration refused here; this node keeps the version it runs"
                );
                *self.inner.refused.lock() = Some(RefusedConfig {
                    version: offered.0,
                    written_by: offered.1,
                    error,
                    at_ms: unix_ms(),
                });
            }
        }
    }

    /// `doc` with this node's writes it does not hold re-applied on top, as a new version
    /// numbered after `doc` and `seen` and written by this node; `doc` itself when it
    /// holds them all. Such writes exist only without a store, where two nodes can write
    /// the same version at once (the higher `(version, node)` wins everywhere) or a node
    /// can write before it has joined its peers (their newer document wins). A change that
    /// no longer applies to `doc` (it names a backend `doc` removed, or would leave a pool
    /// empty) is dropped with a warning; a write still waiting for its acknowledgements
    /// then fails with `write_conflict`. Called with the compose lock held.
    fn rebase_own_writes(
        &self,
        doc: SharedConfig,
        base: &Config,
        discovered: &BTreeMap<String, Vec<BackendConfig>>,
        seen: u64,
    ) -> SharedConfig {
        let Some(me) = self.node_id() else {
            return doc;
        };
        let generation = self.generation();
        let held = |w: &OwnWrite| doc.includes(me, generation, w.version);
        let mut own = self.inner.own_writes.lock();
        // Versions only grow along the list: the last write is the one most likely missing.
        if own.last().is_none_or(held) {
            return doc;
        }
        let mut next = doc.clone();
        own.retain(|w| {
            if held(w) {
                return true;
            }
            match next.with_change(base, discovered, &w.change) {
                Ok(rebased) => {
                    next = rebased;
                    true
                }
                Err(error) => {
                    tracing::warn!(
                        change = ?w.change,
                        %error,
                        winner = doc.version,
                        written_by = %doc.written_by,
                        "a change made here lost a concurrent write and no longer applies on top of it; dropped"
                    );
                    false
                }
            }
        });
        let rebased: Vec<&mut OwnWrite> = own.iter_mut().filter(|w| !held(w)).collect();
        if rebased.is_empty() {
            return doc;
        }
        let version = doc.version.max(seen) + 1;
        next.stamp(version, me);
        next.mark_write(me, generation, version);
        tracing::info!(
            changes = rebased.len(),
            winner = doc.version,
            written_by = %doc.written_by,
            version,
            "changes made here re-applied on top of a concurrent write that won"
        );
        for w in rebased {
            w.version = version;
        }
        next
    }

    /// This node's gossip generation (0 without a cluster).
    fn generation(&self) -> u64 {
        self.inner
            .cluster
            .as_ref()
            .map_or(0, |c| c.membership.generation())
    }

    fn set_applied_version(&self, doc: &SharedConfig) {
        *self.inner.shared.lock() = doc.clone();
        self.inner
            .node
            .metrics()
            .cluster
            .config_version
            .set(i64::try_from(doc.version).unwrap_or(i64::MAX));
        // The gossip loop publishes the version (and, without a store, the document) on
        // its next tick, in order.
    }

    // -------------------------------------------------------------------- writes --

    /// Applies a run-time change on every node: locally without a cluster; in a cluster,
    /// written to the store (compare-and-set) or gossiped, applied here, then waited for
    /// per `consistency` (up to `cluster.consistency_timeout`).
    ///
    /// # Errors
    /// [`ControlError`]: an invalid change (nothing changed), the store unreachable
    /// (nothing changed), write conflicts, or nodes lagging (applied, not confirmed).
    pub async fn submit(
        &self,
        change: Change,
        consistency: Consistency,
    ) -> Result<WriteResult, ControlError> {
        let _serial = self.inner.write.lock().await;
        let me = self.node_id().unwrap_or("local").to_owned();
        let generation = self.generation();
        // A write is numbered after every version a node reports, so none ignores it.
        let members = match &self.inner.cluster {
            Some(c) => c.membership.members().await,
            None => Vec::new(),
        };
        let seen = highest_gossiped_version(&members);
        let version = match self.inner.cluster.as_ref().and_then(|c| c.store.clone()) {
            Some(store) => {
                self.write_to_store(&store, &change, &me, generation, seen, &members)
                    .await?
            }
            None => {
                // Composed, applied and recorded under the compose lock, so that a document
                // adopted from gossip meanwhile cannot slip under this one: the change is
                // built on exactly the document it replaces here, and if a concurrent
                // write elsewhere wins over it, the gossip loop re-applies it on top.
                let _compose = self.inner.compose.lock();
                let base = self.inner.base.lock().clone();
                let discovered = self.inner.discovered.lock().clone();
                let current = self.inner.shared.lock().clone();
                let mut next = current.with_change(&base, &discovered, &change)?;
                let version = current.version.max(seen) + 1;
                next.stamp(version, &me);
                next.mark_write(&me, generation, version);
                self.apply(&base, &next, &discovered, false)
                    .map_err(ControlError::Apply)?;
                self.set_applied_version(&next);
                if self.inner.cluster.is_some() {
                    let mut own = self.inner.own_writes.lock();
                    own.push(OwnWrite {
                        version,
                        change: change.clone(),
                    });
                    let excess = own.len().saturating_sub(OWN_WRITES_KEPT);
                    own.drain(..excess);
                }
                version
            }
        };
        tracing::info!(version, %change, "run-time change applied");
        self.wait_for(&me, generation, version, consistency).await
    }

    /// Writes `change` to the store by compare-and-set, retried a few times when another
    /// writer wins, and applies the result here; returns the version written.
    async fn write_to_store(
        &self,
        store: &Store,
        change: &Change,
        me: &str,
        generation: u64,
        seen: u64,
        members: &[Member],
    ) -> Result<u64, ControlError> {
        let base = self.inner.base.lock().clone();
        let discovered = self.inner.discovered.lock().clone();
        let mut attempts = 0;
        let doc = loop {
            attempts += 1;
            let (stored_version, stored) = match store.config().await {
                Ok(Some((version, text))) => {
                    (version, SharedConfig::from_json(&text).unwrap_or_default())
                }
                Ok(None) => (0, SharedConfig::default()),
                Err(e) => return Err(ControlError::StoreUnavailable(e.to_string())),
            };
            // A store that lost the configuration (Redis restarted empty) or went back to
            // an older one (a restored snapshot) is behind what the cluster runs: build on
            // the newest document of the store, this node and its live peers, so neither
            // the earlier changes nor the version go backwards (nodes ignore documents
            // older than theirs, and a write numbered below them would be lost).
            // On a tie the store's copy wins (`max_by` keeps the last of equals).
            let local = self.inner.shared.lock().clone();
            let current = [newest_gossiped_doc(members, 0), Some(local), Some(stored)]
                .into_iter()
                .flatten()
                .max_by(|a, b| (a.version, &a.written_by).cmp(&(b.version, &b.written_by)))
                .unwrap_or_default();
            let mut next = current.with_change(&base, &discovered, change)?;
            let version = current.version.max(seen).max(stored_version) + 1;
            next.stamp(version, me);
            next.mark_write(me, generation, version);
            match store
                .put_config(stored_version, next.version, &next.to_json())
                .await
            {
                Ok(PutConfig::Written(_)) => break next,
                Ok(PutConfig::Conflict { .. }) if attempts < 5 => continue,
                Ok(PutConfig::Conflict { current }) => {
                    return Err(ControlError::Conflict(format!(
                        "other writers kept changing the shared configuration (now at \
                         version {current}) during {attempts} attempts; nothing was changed, retry"
                    )));
                }
                Err(e) => return Err(ControlError::StoreUnavailable(e.to_string())),
            }
        };
        // On the layers as they are now: a reload or discovery answer may have landed
        // during the store round trips above, and the store's watch may already have made
        // this node adopt `doc` or a newer document.
        let _compose = self.inner.compose.lock();
        if is_newer(&doc, &self.inner.shared.lock()) {
            let base = self.inner.base.lock().clone();
            let discovered = self.inner.discovered.lock().clone();
            self.apply(&base, &doc, &discovered, false)
                .map_err(ControlError::Apply)?;
            self.set_applied_version(&doc);
        }
        Ok(doc.version)
    }

    /// Waits until enough live nodes run a shared configuration holding write `version`
    /// of this node (`me` running as `generation`): the document written or one built on
    /// it. A node that reports the same version number but runs another document (a
    /// concurrent write elsewhere) does not count.
    async fn wait_for(
        &self,
        me: &str,
        generation: u64,
        version: u64,
        consistency: Consistency,
    ) -> Result<WriteResult, ControlError> {
        let name = match consistency {
            Consistency::Async => "async",
            Consistency::Quorum => "quorum",
            Consistency::All => "all",
        };
        let Some(c) = &self.inner.cluster else {
            return Ok(WriteResult {
                version,
                consistency: name,
                acknowledged: vec!["local".to_owned()],
                skipped: Vec::new(),
            });
        };
        let timeout = c.config.consistency_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let local = self.inner.shared.lock().clone();
            if !local.includes(me, generation, version) {
                return Err(ControlError::Conflict(format!(
                    "version {version} written here lost to a concurrent write (version {} by \
                     {}) and no longer applies on top of it; the change was not kept, retry",
                    local.version, local.written_by
                )));
            }
            let members = c.membership.members().await;
            let alive: Vec<&Member> = members
                .iter()
                .filter(|m| m.state == MemberState::Alive)
                .collect();
            let skipped: Vec<String> = members
                .iter()
                .filter(|m| m.state != MemberState::Alive)
                .map(|m| m.node_id.clone())
                .collect();
            let holds = |m: &Member| {
                m.is_self
                    || match gossiped_doc(m) {
                        Some(doc) => doc.includes(me, generation, version),
                        // A document too large to gossip: with a store, versions are
                        // written by compare-and-set, one document per number.
                        None => {
                            c.store.is_some()
                                && m.values
                                    .get(KEY_CONFIG_VERSION)
                                    .and_then(|v| v.parse::<u64>().ok())
                                    .is_some_and(|v| v >= version)
                        }
                    }
            };
            let acknowledged: Vec<String> = alive
                .iter()
                .filter(|m| holds(m))
                .map(|m| m.node_id.clone())
                .collect();
            let needed = match consistency {
                Consistency::Async => 1,
                Consistency::Quorum => alive.len() / 2 + 1,
                Consistency::All => alive.len(),
            };
            if acknowledged.len() >= needed {
                return Ok(WriteResult {
                    // A write re-applied on top of a concurrent one has a new version.
                    version: local.latest_write(me, generation).unwrap_or(version),
                    consistency: name,
                    acknowledged,
                    skipped,
                });
            }
            if Instant::now() >= deadline {
                let lagging = alive
                    .iter()
                    .filter(|m| !holds(m))
                    .map(|m| {
                        let runs = gossiped_doc(m).map_or_else(
                            || {
                                m.values
                                    .get(KEY_CONFIG_VERSION)
                                    .map_or("?", String::as_str)
                                    .to_owned()
                            },
                            |doc| format!("{} by {}", doc.version, doc.written_by),
                        );
                        format!("{} (at version {runs})", m.node_id)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ControlError::Lagging {
                    version,
                    missing: needed - acknowledged.len(),
                    timeout_ms: timeout.as_millis() as u64,
                    lagging,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Registers `backend` in pool `pool`'s registry with `ttl` (a pool with
    /// `discovery.source: registry`); the registration must be refreshed before `ttl`
    /// passes. Read back by every node within the pool's discovery interval.
    ///
    /// # Errors
    /// [`ControlError::NoRegistry`] without a store; [`ControlError::StoreUnavailable`].
    pub async fn register(
        &self,
        pool: &str,
        backend: &BackendConfig,
        ttl: Duration,
    ) -> Result<(), ControlError> {
        let store = self
            .store()
            .ok_or_else(|| ControlError::NoRegistry(pool.to_owned()))?;
        store
            .register_backend(
                pool,
                &RegisteredBackend {
                    address: backend.address.clone(),
                    weight: backend.weight,
                    tags: backend.tags.clone(),
                    max_requests: backend.max_requests,
                },
                ttl,
            )
            .await
            .map_err(|e| ControlError::StoreUnavailable(e.to_string()))?;
        self.refresh_registry(pool, &self.discovery_task()).await;
        Ok(())
    }

    /// Removes a registration; `false` if there was none.
    ///
    /// # Errors
    /// As [`ControlPlane::register`].
    pub async fn deregister(&self, pool: &str, address: &str) -> Result<bool, ControlError> {
        let store = self
            .store()
            .ok_or_else(|| ControlError::NoRegistry(pool.to_owned()))?;
        let removed = store
            .deregister_backend(pool, address)
            .await
            .map_err(|e| ControlError::StoreUnavailable(e.to_string()))?;
        self.refresh_registry(pool, &self.discovery_task()).await;
        Ok(removed)
    }

    /// Whether pool `pool` takes its backends from the registry.
    pub fn uses_registry(&self, pool: &str) -> bool {
        self.inner
            .base
            .lock()
            .pools
            .get(pool)
            .is_some_and(|p| p.discovery.source == DiscoverySource::Registry)
    }

    fn store(&self) -> Option<Store> {
        self.inner.cluster.as_ref().and_then(|c| c.store.clone())
    }

    // ------------------------------------------------------------------ discovery --

    /// The token of the running discovery tasks, taken before a look-up so that a reload
    /// during it makes [`Self::set_discovered`] drop the answer.
    fn discovery_task(&self) -> CancellationToken {
        self.inner.discovery.lock().1.clone()
    }

    /// Applies `backends` as `pool`'s discovered backends, unless the pool no longer
    /// discovers backends or `task` (the discovery tasks' token when the look-up began)
    /// was cancelled: a reload replaced or stopped this pool's discovery while the answer
    /// was on its way. Checked under the compose lock, which a reload holds while it
    /// cancels the tasks, so a stale answer can never land after it.
    fn set_discovered(&self, pool: &str, backends: Vec<BackendConfig>, task: &CancellationToken) {
        let _compose = self.inner.compose.lock();
        if task.is_cancelled() || !self.inner.discovery.lock().0.contains_key(pool) {
            return;
        }
        {
            let current = self.inner.discovered.lock();
            if current.get(pool) == Some(&backends) {
                return;
            }
        }
        let base = self.inner.base.lock().clone();
        let shared = self.inner.shared.lock().clone();
        let mut next = self.inner.discovered.lock().clone();
        let count = backends.len();
        next.insert(pool.to_owned(), backends);
        match self.apply(&base, &shared, &next, false) {
            Ok(()) => {
                tracing::info!(pool, backends = count, "discovered backends changed");
                *self.inner.discovered.lock() = next;
            }
            Err(error) => tracing::error!(pool, %error, "discovered backends refused"),
        }
    }

    async fn refresh_registry(&self, pool: &str, task: &CancellationToken) {
        let Some(store) = self.store() else { return };
        match store.registered_backends(pool).await {
            Ok(list) => {
                let mut backends: Vec<BackendConfig> = list
                    .into_iter()
                    .map(|r| BackendConfig {
                        address: r.address,
                        weight: r.weight.max(1),
                        tags: r.tags,
                        max_requests: r.max_requests,
                    })
                    .collect();
                backends.sort_by(|a, b| a.address.cmp(&b.address));
                self.set_discovered(pool, backends, task);
            }
            // Keep the last known registrations while the store is down.
            Err(error) => {
                tracing::debug!(pool, %error, "registry read failed; keeping the last list")
            }
        }
    }

    /// Starts a task per pool that discovers backends (DNS or the registry), replacing
    /// the running ones if `config`'s discovery settings differ from theirs.
    fn spawn_discovery(&self, config: &Config) {
        let wanted: BTreeMap<String, DiscoveryConfig> = config
            .pools
            .iter()
            .filter(|(_, p)| p.discovery.source != DiscoverySource::Static)
            .map(|(name, p)| (name.clone(), p.discovery.clone()))
            .collect();
        let tasks = {
            let mut running = self.inner.discovery.lock();
            if running.0 == wanted {
                return;
            }
            running.1.cancel();
            *running = (wanted.clone(), self.inner.cancel.child_token());
            running.1.clone()
        };
        for (name, d) in wanted {
            let plane = self.clone();
            let cancel = tasks.child_token();
            tokio::spawn(async move {
                let dns = match d.source {
                    DiscoverySource::Dns => match Dns::new(
                        // Validated: every entry parses.
                        &d.nameservers
                            .iter()
                            .filter_map(|s| fulcrum_config::parse_nameserver(s))
                            .collect::<Vec<_>>(),
                    ) {
                        Ok(dns) => Some(dns),
                        Err(error) => {
                            tracing::error!(pool = %name, %error, "dns discovery disabled");
                            return;
                        }
                    },
                    _ => None,
                };
                let mut tick = tokio::time::interval(d.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match (&dns, d.source) {
                        (Some(dns), DiscoverySource::Dns) => {
                            let name_to_resolve = d.name.clone().unwrap_or_default();
                            match dns.resolve(&name_to_resolve, d.record).await {
                                Ok(backends) => plane.set_discovered(&name, backends, &cancel),
                                Err(error) => {
                                    tracing::warn!(pool = %name, %error, "dns discovery failed; keeping the last answer")
                                }
                            }
                        }
                        (_, DiscoverySource::Registry) => {
                            plane.refresh_registry(&name, &cancel).await
                        }
                        _ => return,
                    }
                }
            });
        }
    }

    // ------------------------------------------------------------------- cluster --

    /// Before serving as a member: adopt the shared configuration in the store — or,
    /// when the store cannot be read, the newest one the peers run — and prime endpoint
    /// classes from persisted statistics (warm start). Without a store the gossip loop
    /// adopts the peers' document.
    async fn startup_sync(&self) {
        let Some(c) = &self.inner.cluster else { return };
        if let Some(store) = &c.store {
            match store.config().await {
                Ok(Some((_, text))) => match SharedConfig::from_json(&text) {
                    Ok(doc) => self.adopt(doc, 0),
                    Err(error) => {
                        tracing::error!(%error, "shared configuration in the store is unreadable")
                    }
                },
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "coordination store unavailable at start; adopting the shared configuration the peers run");
                    self.adopt_from_peers(c).await;
                }
            }
            match store.load_stats().await {
                Ok(stats) => {
                    let primed = self.prime_endpoints(&stats);
                    if primed > 0 {
                        tracing::info!(
                            endpoints = primed,
                            "endpoint classes primed from the cluster's statistics"
                        );
                    }
                }
                Err(error) => tracing::debug!(%error, "no persisted statistics"),
            }
        }
    }

    /// Waits (at most ten gossip intervals, and at least a second) for a live peer to
    /// report the shared configuration it runs, then adopts the newest document the live
    /// peers gossip. The gossip loop keeps adopting newer ones while the store stays
    /// unreadable.
    async fn adopt_from_peers(&self, c: &ClusterParts) {
        let wait = (c.config.gossip.interval * 10).max(Duration::from_secs(1));
        let deadline = Instant::now() + wait;
        loop {
            let members = c.membership.members().await;
            let heard = members.iter().any(|m| {
                !m.is_self
                    && m.state == MemberState::Alive
                    && m.values.contains_key(KEY_CONFIG_VERSION)
            });
            if heard || Instant::now() >= deadline {
                match newest_gossiped_doc(&members, 0) {
                    Some(doc) => {
                        tracing::info!(
                            version = doc.version,
                            written_by = %doc.written_by,
                            "shared configuration adopted from the peers"
                        );
                        self.adopt(doc, highest_gossiped_version(&members));
                    }
                    None if heard => {}
                    None => tracing::warn!(
                        "no peer reported a shared configuration; serving the file configuration until the store or a peer answers"
                    ),
                }
                return;
            }
            tokio::time::sleep(c.config.gossip.interval.min(Duration::from_millis(100))).await;
        }
    }

    fn prime_endpoints(&self, stats: &[EndpointStatRecord]) -> usize {
        let mut primed = 0;
        for record in stats {
            // Keys are `pool|METHOD /path` (see `persist`).
            let Some((pool, endpoint)) = record.endpoint.split_once('|') else {
                continue;
            };
            let Some((method, path)) = endpoint.split_once(' ') else {
                continue;
            };
            let Some(pool) = self.inner.node.pool(pool) else {
                continue;
            };
            let avg_ns = (record.avg_ms * 1e6) as u64;
            if pool.state().endpoints.get(method, path).prime(avg_ns) {
                primed += 1;
            }
        }
        primed
    }

    fn spawn_cluster_loops(&self) {
        let Some(c) = &self.inner.cluster else { return };
        // Gossip publication and the health merge, every 100 ms.
        {
            let plane = self.clone();
            let cancel = self.inner.cancel.child_token();
            tokio::spawn(async move { plane.gossip_loop(cancel).await });
        }
        // Membership events into metrics.
        {
            let mut events = c.membership.subscribe();
            let metrics = self.inner.node.metrics().clone();
            let cancel = self.inner.cancel.child_token();
            tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        () = cancel.cancelled() => return,
                        e = events.recv() => e,
                    };
                    match event {
                        Ok(event) => {
                            let kind = serde_json::to_value(event.kind)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default();
                            metrics
                                .cluster
                                .events
                                .get_or_create(&fulcrum_proxy::metrics::KindLabels { kind })
                                .inc();
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        // Leader changes into metrics and logs.
        {
            let mut leader = c.leader.clone();
            let metrics = self.inner.node.metrics().clone();
            let cancel = self.inner.cancel.child_token();
            tokio::spawn(async move {
                let mut last: Option<String> = None;
                loop {
                    let state = leader.borrow_and_update().clone();
                    metrics.cluster.leader.set(i64::from(state.is_leader));
                    if state.leader != last {
                        if last.is_some() || state.leader.is_some() {
                            metrics.cluster.leader_changes.inc();
                        }
                        tracing::info!(leader = ?state.leader, token = ?state.token, is_self = state.is_leader, "cluster leader");
                        last.clone_from(&state.leader);
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        r = leader.changed() => if r.is_err() { return },
                    }
                }
            });
        }
        if let Some(store) = &c.store {
            // Shared configuration watch.
            {
                let plane = self.clone();
                let mut rx = store.watch_config();
                let cancel = self.inner.cancel.child_token();
                tokio::spawn(async move {
                    loop {
                        let current = rx.borrow_and_update().clone();
                        if let Some((_, text)) = current {
                            match SharedConfig::from_json(&text) {
                                Ok(doc) => plane.adopt(doc, 0),
                                Err(error) => {
                                    tracing::error!(%error, "unreadable shared configuration in the store")
                                }
                            }
                        }
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            r = rx.changed() => if r.is_err() { return },
                        }
                    }
                });
            }
            // Registry heartbeat, statistics, node status, leader chores.
            {
                let plane = self.clone();
                let cancel = self.inner.cancel.child_token();
                tokio::spawn(async move { plane.store_loop(cancel).await });
            }
        }
    }

    async fn gossip_loop(&self, cancel: CancellationToken) {
        let Some(c) = &self.inner.cluster else { return };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Last published (health, time) per key, and request/error counters for rates.
        let mut published: HashMap<String, (BackendHealth, Instant)> = HashMap::new();
        let mut counters: HashMap<String, (u64, u64)> = HashMap::new();
        let mut error_rates: HashMap<String, f64> = HashMap::new();
        let mut last_load = Instant::now() - c.config.publish_interval;
        let mut last_requests: u64 = 0;
        let rule = merge_rule(c.config.health_merge);
        // A peer's backend views count only once it has been alive for this long: a node
        // coming back from a partition still gossips the views it formed while cut off
        // (backends it could not reach) until its checks run again and it republishes.
        let default_grace = c.config.publish_interval * REJOIN_GRACE_INTERVALS;
        let mut alive_since: HashMap<String, Instant> = HashMap::new();
        // Peers seen failed or gone at least once.
        let mut returned: std::collections::HashSet<String> = std::collections::HashSet::new();
        // The shared configuration published last, `(version, written_by)`, and how many
        // parts it took (0: one whole entry, or none).
        let mut published_doc: Option<(u64, String)> = None;
        let mut published_parts: usize = 0;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let full = now.duration_since(last_load) >= c.config.publish_interval;
            // 1. Publish this node's view of its backends.
            let mut keys = std::collections::HashSet::new();
            let mut total_requests = 0u64;
            let mut total_in_flight = 0u64;
            for pool in self.inner.node.pools() {
                let state = pool.state();
                for b in &state.backends {
                    let live = &b.live;
                    let health = health_of(live.flags());
                    let mut summary = BackendSummary {
                        pool: pool.name().to_owned(),
                        address: b.address.to_string(),
                        health,
                        // The measured latency, as the backends API's `latency_ms.ewma`
                        // (not the failure-penalised peak-EWMA cost).
                        ewma_ms: live.success_latency_ns().unwrap_or(0.0) / 1e6,
                        error_rate: 0.0,
                        in_flight: live.in_flight(),
                    };
                    let key = summary.key();
                    total_requests += live.requests();
                    total_in_flight += live.in_flight();
                    let counts = (live.requests(), live.failures());
                    if full {
                        let (r0, e0) = counters.insert(key.clone(), counts).unwrap_or((0, 0));
                        let dr = counts.0.saturating_sub(r0);
                        let de = counts.1.saturating_sub(e0);
                        let rate = if dr == 0 { 0.0 } else { de as f64 / dr as f64 };
                        error_rates.insert(key.clone(), rate);
                    }
                    summary.error_rate = error_rates.get(&key).copied().unwrap_or(0.0);
                    let changed = published.get(&key).is_none_or(|(h, _)| *h != health);
                    if changed || full {
                        c.membership.set(&key, &summary.encode()).await;
                        published.insert(key.clone(), (health, now));
                    }
                    keys.insert(key);
                }
            }
            let stale: Vec<String> = published
                .keys()
                .filter(|k| !keys.contains(*k))
                .cloned()
                .collect();
            for key in stale {
                c.membership.delete(&key).await;
                published.remove(&key);
                counters.remove(&key);
                error_rates.remove(&key);
            }
            if full {
                let secs = now.duration_since(last_load).as_secs_f64().max(1e-3);
                let load = NodeLoad {
                    in_flight: total_in_flight,
                    requests_per_sec: total_requests.saturating_sub(last_requests) as f64 / secs,
                    cpu_hint: None,
                };
                c.membership.set(KEY_LOAD, &load.encode()).await;
                last_requests = total_requests;
                last_load = now;
            }
            // 2. The shared configuration this node runs: its version and the document
            // itself. Without a store the document spreads this way; with one, it is what
            // a node that cannot read the store adopts, and what tells a writer which
            // nodes run its write.
            // The document is serialised and published only when it changes.
            let (version, doc) = {
                let shared = self.inner.shared.lock();
                let id = (shared.version, shared.written_by.clone());
                let changed = shared.version > 0 && published_doc.as_ref() != Some(&id);
                let doc = changed.then(|| ConfigDoc {
                    version: shared.version,
                    json: shared.to_json(),
                });
                if changed {
                    published_doc = Some(id);
                }
                (shared.version, doc)
            };
            c.membership
                .set(KEY_CONFIG_VERSION, &version.to_string())
                .await;
            if let Some(doc) = doc {
                let entries = doc.entries();
                let parts = match &entries {
                    Ok(entries) if entries.len() > 1 || entries[0].0 != KEY_CONFIG_DOC => {
                        entries.len()
                    }
                    _ => 0,
                };
                // The other form's keys, and parts past the new count, go first: peers
                // must not take an older document for what runs here.
                if parts > 0 || entries.is_err() {
                    c.membership.delete(KEY_CONFIG_DOC).await;
                }
                for index in parts..published_parts {
                    c.membership
                        .delete(&format!("{KEY_CONFIG_DOC_PART}{index}"))
                        .await;
                }
                published_parts = parts;
                match entries {
                    Ok(entries) => {
                        for (key, value) in entries {
                            c.membership.set(&key, &value).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(version, %error, "the shared configuration is too large to gossip");
                    }
                }
            }
            let lease = {
                let leader = c.leader.borrow();
                match (leader.is_leader, leader.token, leader.stepped_down) {
                    (true, Some(token), _) => format!("leading:{token}"),
                    (false, _, Some(token)) => format!("stepped_down:{token}"),
                    _ => "none".to_owned(),
                }
            };
            c.membership.set(KEY_LEASE, &lease).await;
            // 3. Merge the cluster's views and flag backends down here.
            let members = c.membership.members().await;
            for m in &members {
                if m.state == MemberState::Alive {
                    alive_since.entry(m.node_id.clone()).or_insert(now);
                } else {
                    alive_since.remove(&m.node_id);
                    returned.insert(m.node_id.clone());
                }
            }
            alive_since.retain(|id, _| members.iter().any(|m| &m.node_id == id));
            // A peer seen failed or gone and now back votes once its own grace (which it
            // publishes, sized from its health checks) has passed; a first join at once.
            let settled: std::collections::HashSet<&str> = members
                .iter()
                .filter(|m| m.state == MemberState::Alive)
                .filter(|m| {
                    !returned.contains(&m.node_id)
                        || alive_since.get(&m.node_id).is_some_and(|since| {
                            let grace = m
                                .values
                                .get(KEY_HEALTH_GRACE)
                                .and_then(|v| v.parse::<u64>().ok())
                                .map_or(default_grace, Duration::from_millis);
                            now.duration_since(*since) >= grace
                        })
                })
                .map(|m| m.node_id.as_str())
                .collect();
            self.merge_health(rule, &members, &settled);
            self.update_member_metrics(&members);
            // 4. Without a store, the shared configuration spreads by gossip; with one, a
            // node that cannot read the store adopts the newest document its peers run
            // (they all had it from the store), so that one started during an outage does
            // not serve without the cluster's changes.
            let store_unreadable = c.store.as_ref().is_some_and(|s| !s.health().available);
            if (c.store.is_none() || store_unreadable)
                && let Some(doc) = newest_gossiped_doc(&members, version)
            {
                if store_unreadable && is_newer(&doc, &self.inner.shared.lock()) {
                    tracing::info!(
                        version = doc.version,
                        "coordination store unreadable; adopting the shared configuration the peers run"
                    );
                }
                self.adopt(doc, highest_gossiped_version(&members));
            }
        }
    }

    /// Merges the views of the `settled` live peers (alive for the rejoin grace) with this
    /// node's and sets or clears [`BackendFlags::PEER_DOWN`].
    fn merge_health(
        &self,
        rule: HealthMerge,
        members: &[Member],
        settled: &std::collections::HashSet<&str>,
    ) {
        let mut remote: HashMap<(String, String), Vec<(String, BackendHealth)>> = HashMap::new();
        for m in members.iter().filter(|m| {
            !m.is_self && m.state == MemberState::Alive && settled.contains(m.node_id.as_str())
        }) {
            for s in backends_of(m) {
                remote
                    .entry((s.pool, s.address))
                    .or_default()
                    .push((m.node_id.clone(), s.health));
            }
        }
        let mut views = Vec::new();
        let mut down = 0i64;
        for pool in self.inner.node.pools() {
            let state = pool.state();
            for b in &state.backends {
                let key = (pool.name().to_owned(), b.address.to_string());
                let peers = remote.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                let local = health_of(b.live.flags());
                let healths: Vec<BackendHealth> = peers.iter().map(|(_, h)| *h).collect();
                let merged = health::merge(rule, local, &healths);
                let has = b.live.flags().contains(BackendFlags::PEER_DOWN);
                if merged.down && !has {
                    pool.set_flag(&b.live, BackendFlags::PEER_DOWN);
                    tracing::warn!(pool = %key.0, backend = %key.1, reason = merged.reason, "backend out of rotation by the cluster");
                } else if !merged.down && has {
                    pool.clear_flag(&b.live, BackendFlags::PEER_DOWN);
                    tracing::info!(pool = %key.0, backend = %key.1, "backend back in rotation by the cluster");
                }
                if merged.down {
                    down += 1;
                }
                views.push(BackendClusterView {
                    pool: key.0,
                    address: key.1,
                    local: health_name(local),
                    peers: peers
                        .iter()
                        .map(|(n, h)| (n.clone(), health_name(*h)))
                        .collect(),
                    cluster_down: merged.down,
                    reason: merged.reason,
                });
            }
        }
        self.inner.node.metrics().cluster.peer_down.set(down);
        *self.inner.views.lock() = views;
    }

    fn update_member_metrics(&self, members: &[Member]) {
        let metrics = &self.inner.node.metrics().cluster;
        for (state, name) in [
            (MemberState::Alive, "alive"),
            (MemberState::Failed, "failed"),
            (MemberState::Left, "left"),
        ] {
            let n = members.iter().filter(|m| m.state == state).count();
            metrics
                .members
                .get_or_create(&fulcrum_proxy::metrics::StateLabels {
                    state: name.to_owned(),
                })
                .set(n as i64);
        }
    }

    async fn store_loop(&self, cancel: CancellationToken) {
        let Some(c) = &self.inner.cluster else { return };
        let Some(store) = &c.store else { return };
        let heartbeat_every = c.config.coordination.node_ttl / 3;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heartbeat: Option<Instant> = None;
        let started = Instant::now();
        let mut last_persist = Instant::now();
        let mut last_chores = Instant::now();
        let mut was_up = true;
        let metrics = self.inner.node.metrics().clone();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let health = store.health();
            metrics.cluster.store_up.set(i64::from(health.available));
            if was_up && !health.available {
                metrics.cluster.store_outages.inc();
                tracing::warn!(error = ?health.last_error, "coordination store unreachable; serving with the last known state");
            } else if !was_up && health.available {
                tracing::info!("coordination store reachable again");
            }
            was_up = health.available;
            let now = Instant::now();
            // A copy started with a live node's id finds out within the conflict check
            // time and stops: until then it must not overwrite that node's record.
            let settled = now.duration_since(started) >= c.membership.conflict_check_time()
                && c.membership.startup_conflict().is_none();
            if settled && last_heartbeat.is_none_or(|t| now.duration_since(t) >= heartbeat_every) {
                let record = NodeRecord {
                    node_id: c.config.node_id.clone(),
                    admin: c.admin.clone(),
                    listeners: c.listeners.clone(),
                    tags: c.config.tags.clone(),
                    config_version: self.inner.shared.lock().version,
                    updated_ms: unix_ms(),
                };
                match store
                    .heartbeat(&record, c.config.coordination.node_ttl)
                    .await
                {
                    Ok(()) => last_heartbeat = Some(now),
                    Err(error) => tracing::debug!(%error, "registry heartbeat failed"),
                }
            }
            if now.duration_since(last_persist) >= Duration::from_secs(5) {
                last_persist = now;
                self.persist(store, &c.config.node_id).await;
            }
            let leader = c.leader.borrow().clone();
            if leader.is_leader && now.duration_since(last_chores) >= Duration::from_secs(5) {
                last_chores = now;
                if let Some(token) = leader.token {
                    self.chores(store, token, c).await;
                }
            }
        }
    }

    /// Persists endpoint statistics and this node's status (seed 000's `request:stats`,
    /// `request:long_requests`, `node:status`).
    async fn persist(&self, store: &Store, node_id: &str) {
        let stats: Vec<EndpointStatRecord> = self
            .inner
            .node
            .endpoints()
            .into_iter()
            .filter(|e| e.count > 0)
            .map(|e| EndpointStatRecord {
                endpoint: format!("{}|{}", e.pool, e.endpoint),
                count: e.count,
                errors: e.errors,
                avg_ms: e.average_ms,
                long: e.class == "long",
            })
            .collect();
        if let Err(error) = store.save_stats(node_id, &stats).await {
            tracing::debug!(%error, "saving statistics failed");
            return;
        }
        let pools: Vec<serde_json::Value> = self
            .inner
            .node
            .pools()
            .iter()
            .map(|p| serde_json::to_value(Node::pool_summary(p)).unwrap_or_default())
            .collect();
        let status = serde_json::json!({
            "node_id": node_id,
            "updated_ms": unix_ms(),
            "config_version": self.inner.shared.lock().version,
            "config_refused": *self.inner.refused.lock(),
            "uptime_secs": self.inner.node.uptime().as_secs(),
            "pools": pools,
        });
        if let Err(error) = store.set_node_status(node_id, &status.to_string()).await {
            tracing::debug!(%error, "saving node status failed");
        }
    }

    /// The leader's chores, fenced by `token`: garbage-collect stale nodes and their
    /// statistics, and write `cluster:status`.
    /// Writes the shared configuration this node runs back to the store if the store
    /// is behind it: it lost the document (a Redis restarted empty) or holds an older one
    /// (a restored snapshot). Nodes that start meanwhile then adopt the overlay the
    /// cluster runs rather than none. Compare-and-set, so a write landing meanwhile wins.
    async fn restore_shared_config(&self, store: &Store) {
        let local = self.inner.shared.lock().clone();
        if local.version == 0 {
            return;
        }
        let stored_version = match store.config().await {
            Ok(Some((version, _))) => version,
            Ok(None) => 0,
            Err(error) => {
                tracing::debug!(%error, "reading the shared configuration failed");
                return;
            }
        };
        if stored_version >= local.version {
            return;
        }
        match store
            .put_config(stored_version, local.version, &local.to_json())
            .await
        {
            Ok(PutConfig::Written(_)) => tracing::warn!(
                stored_version,
                version = local.version,
                "the coordination store was behind the shared configuration the cluster runs; wrote it back"
            ),
            Ok(PutConfig::Conflict { .. }) => {}
            Err(error) => tracing::debug!(%error, "writing the shared configuration back failed"),
        }
    }

    async fn chores(&self, store: &Store, token: u64, c: &ClusterParts) {
        let max_age = c.config.coordination.node_ttl * 3;
        match store.gc_stale(token, max_age).await {
            Ok(report) if !report.applied => {
                tracing::warn!(
                    token,
                    "cluster chores refused: a newer leader holds a larger fencing token"
                );
                return;
            }
            Ok(report) => {
                if !report.nodes_removed.is_empty() || report.stats_removed > 0 {
                    tracing::info!(token, nodes = ?report.nodes_removed, stats = report.stats_removed, "stale cluster state collected");
                }
            }
            Err(error) => {
                tracing::debug!(%error, "cluster chores failed");
                return;
            }
        }
        self.restore_shared_config(store).await;
        let members = c.membership.members().await;
        let alive = members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .count();
        let fields = vec![
            ("leader".to_owned(), c.config.node_id.clone()),
            ("token".to_owned(), token.to_string()),
            ("alive_nodes".to_owned(), alive.to_string()),
            (
                "config_version".to_owned(),
                self.inner.shared.lock().version.to_string(),
            ),
            ("updated_ms".to_owned(), unix_ms().to_string()),
        ];
        if let Err(error) = store.set_cluster_status(token, &fields).await {
            tracing::debug!(%error, "writing cluster status failed");
        }
    }

    // ------------------------------------------------------------------------ API --

    /// Every member as this node sees it, sorted by node id.
    pub async fn nodes(&self) -> Vec<NodeView> {
        let Some(c) = &self.inner.cluster else {
            return Vec::new();
        };
        let leader = c.leader.borrow().leader.clone();
        c.membership
            .members()
            .await
            .into_iter()
            .map(|m| node_view(m, leader.as_deref()))
            .collect()
    }

    /// The leader as this node sees it.
    pub async fn leader(&self) -> Option<LeaderView> {
        let c = self.inner.cluster.as_ref()?;
        let state = c.leader.borrow().clone();
        let leader_state = match &state.leader {
            Some(id) => c
                .membership
                .members()
                .await
                .into_iter()
                .find(|m| &m.node_id == id)
                .map(|m| leader_member_state(&m, &state)),
            None => None,
        };
        let (coordination, method) = match c.config.coordination.backend {
            CoordinationBackend::None => (
                "none",
                "lowest live node id (gossip membership; not partition-safe)",
            ),
            CoordinationBackend::Redis => ("redis", "lease: SET NX PX, fencing token from INCR"),
            CoordinationBackend::Etcd => (
                "etcd",
                "etcd election on a lease; fencing token = leader key revision",
            ),
        };
        Some(LeaderView {
            is_self: state.is_leader,
            leader: state.leader,
            leader_state,
            stale: c.store.is_some() && !state.store_available,
            token: state.token,
            coordination,
            method,
        })
    }

    /// `GET /api/cluster/status`: this node, members by state, leader, store health,
    /// config version, and the merged backend views.
    pub async fn status(&self) -> serde_json::Value {
        let Some(c) = &self.inner.cluster else {
            return serde_json::json!({ "clustered": false });
        };
        let members = c.membership.members().await;
        let count = |s: MemberState| members.iter().filter(|m| m.state == s).count();
        let store = c.store.as_ref().map(|s| {
            let h = s.health();
            serde_json::json!({
                "kind": s.kind(),
                "available": h.available,
                "last_error": h.last_error,
                "outages": h.outages,
                "unavailable_since_ms": h.unavailable_since_ms,
            })
        });
        let events = c.membership.event_counts();
        serde_json::json!({
            "clustered": true,
            "node_id": c.config.node_id,
            "cluster_id": c.config.cluster_id,
            "gossip_addr": c.membership.gossip_addr().to_string(),
            "members": {
                "alive": count(MemberState::Alive),
                "failed": count(MemberState::Failed),
                "left": count(MemberState::Left),
            },
            "events": { "joined": events.joined, "left": events.left, "failed": events.failed },
            "node_id_conflicts": c.membership.node_id_conflicts(),
            "leader": self.leader().await,
            "coordination": store.unwrap_or_else(|| serde_json::json!({ "kind": "none", "available": true })),
            "health_merge": format!("{:?}", c.config.health_merge).to_lowercase(),
            "config_version": self.inner.shared.lock().version,
            "config_refused": *self.inner.refused.lock(),
            "backends": *self.inner.views.lock(),
        })
    }

    /// Completes with an error message when this node must stop serving as a member: it
    /// was started with a `cluster.node_id` that a live node already uses
    /// ([`Membership::startup_conflict`]). Never completes otherwise, nor without a
    /// cluster. `fulcrum run` exits with status 2 on it, leaving the cluster gracefully.
    pub async fn fatal_error(&self) -> String {
        let Some(c) = &self.inner.cluster else {
            return std::future::pending().await;
        };
        loop {
            if let Some(conflict) = c.membership.startup_conflict() {
                return format!(
                    "cluster: node_id `{}` is already used by the live node gossiping at {} \
                     (started {} ms before this one): every node needs its own \
                     cluster.node_id; this node leaves the cluster and stops",
                    conflict.node_id,
                    conflict.gossip_addr,
                    c.membership
                        .generation()
                        .saturating_sub(conflict.generation),
                );
            }
            tokio::time::sleep(c.config.gossip.interval).await;
        }
    }

    /// Recent membership events (oldest first) and a receiver for new ones.
    pub fn events(&self) -> Option<(Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>)> {
        let c = self.inner.cluster.as_ref()?;
        let rx = c.membership.subscribe();
        Some((c.membership.recent_events(), rx))
    }

    /// `POST /api/cluster/join`: contact `seed` to join (or merge with) its cluster.
    ///
    /// # Errors
    /// A message when not clustered or the seed is unusable.
    pub async fn join_seed(&self, seed: SocketAddr) -> Result<(), String> {
        let c = self
            .inner
            .cluster
            .as_ref()
            .ok_or("this node is not in a cluster")?;
        c.membership.join(seed).await.map_err(|e| e.to_string())
    }

    /// `DELETE /api/cluster/nodes/{id}`: stop listing a failed or departed node, and
    /// remove it from the store's registry. `false` if unknown or alive.
    pub async fn forget(&self, node_id: &str) -> bool {
        let Some(c) = &self.inner.cluster else {
            return false;
        };
        let forgotten = c.membership.forget(node_id).await;
        if forgotten && let Some(store) = &c.store {
            let _ = store.remove_node(node_id).await;
        }
        forgotten
    }

    /// `GET /api/cluster/assignments`: items per node; items of nodes no longer alive
    /// move (as few as they must) to live ones.
    pub async fn assignments(&self) -> Option<assign::Assignment> {
        self.compute_assignments().await
    }

    /// `POST /api/cluster/rebalance`: recompute with the bounded-load rule, moving only
    /// what it must; reports what moved.
    pub async fn rebalance(&self) -> Option<assign::Assignment> {
        self.compute_assignments().await
    }

    async fn compute_assignments(&self) -> Option<assign::Assignment> {
        let c = self.inner.cluster.as_ref()?;
        let nodes: Vec<String> = c
            .membership
            .members()
            .await
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.node_id)
            .collect();
        let mut previous = self.inner.assignments.lock();
        let result = assign::assign(
            &c.config.assignments.items,
            &nodes,
            c.config.assignments.bounded_load,
            &previous,
        );
        previous.clone_from(&result.nodes);
        Some(result)
    }

    /// Seed 000's `GET /cluster/stats`: the merged endpoint statistics in the store
    /// (`request:stats`) and the long-request set, or this node's own without a store.
    pub async fn cluster_stats(&self) -> serde_json::Value {
        if let Some(store) = self.store() {
            let stats = store.load_stats().await;
            let long = store.long_requests().await;
            if let (Ok(stats), Ok(long)) = (stats, long) {
                return serde_json::json!({ "source": store.kind(), "endpoints": stats, "long_requests": long });
            }
        }
        let endpoints = self.inner.node.endpoints();
        let long: Vec<String> = endpoints
            .iter()
            .filter(|e| e.class == "long")
            .map(|e| format!("{}|{}", e.pool, e.endpoint))
            .collect();
        serde_json::json!({ "source": "local", "endpoints": endpoints, "long_requests": long })
    }
}

fn node_view(m: Member, leader: Option<&str>) -> NodeView {
    let backends = backends_of(&m);
    let v = &m.values;
    NodeView {
        is_leader: leader == Some(m.node_id.as_str()),
        admin: v.get(KEY_ADMIN).cloned(),
        listeners: v
            .get(KEY_LISTENERS)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        tags: v
            .get(KEY_TAGS)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        config_version: v.get(KEY_CONFIG_VERSION).and_then(|s| s.parse().ok()),
        load: v.get(KEY_LOAD).and_then(|s| NodeLoad::decode(s)),
        gossip_addr: m.gossip_addr.to_string(),
        state: m.state,
        is_self: m.is_self,
        node_id: m.node_id,
        backends,
    }
}

/// The state of member `m`, whom `state` names leader: `stepped_down` when it is alive but
/// says it gave up that lease (this node: it does not hold it), else its membership state.
fn leader_member_state(m: &Member, state: &LeaderState) -> LeaderMemberState {
    if m.state != MemberState::Alive {
        return m.state.into();
    }
    let not_leading = if m.is_self {
        !state.is_leader
    } else {
        state.token.is_some_and(|token| {
            m.values.get(KEY_LEASE).map(String::as_str) == Some(&format!("stepped_down:{token}"))
        })
    };
    if not_leading {
        LeaderMemberState::SteppedDown
    } else {
        LeaderMemberState::Alive
    }
}

/// The highest shared-configuration version any member reports.
fn highest_gossiped_version(members: &[Member]) -> u64 {
    members
        .iter()
        .filter_map(|m| m.values.get(KEY_CONFIG_VERSION))
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// The newest shared configuration gossiped by a live member (`version\njson`), among
/// those at version `at_least` or later; documents of older versions are not parsed (this
/// runs every 100 ms).
fn newest_gossiped_doc(members: &[Member], at_least: u64) -> Option<SharedConfig> {
    members
        .iter()
        .filter(|m| !m.is_self && m.state == MemberState::Alive)
        .filter(|m| ConfigDoc::version_in(&m.values).is_some_and(|v| v >= at_least))
        .filter_map(ConfigDoc::of)
        .filter_map(|doc| SharedConfig::from_json(&doc.json).ok())
        .max_by(|a, b| (a.version, &a.written_by).cmp(&(b.version, &b.written_by)))
}

/// The shared configuration member `m` gossips, if any and readable.
fn gossiped_doc(m: &Member) -> Option<SharedConfig> {
    SharedConfig::from_json(&ConfigDoc::of(m)?.json).ok()
}

/// Whether `doc` wins over `current`: every node runs the highest `(version, writer)`.
fn is_newer(doc: &SharedConfig, current: &SharedConfig) -> bool {
    (doc.version, &doc.written_by) > (current.version, &current.written_by)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejoin_grace_covers_a_recheck_within_bounds() {
        let mut config = fulcrum_config::parse(
            "listeners: [{name: web, listen: 127.0.0.1:0, routes: [{pool: app}]}]\n\
             pools:\n  app:\n    backends: [{address: 127.0.0.1:9001}]\n",
            "t.yaml",
        )
        .expect("valid");
        let publish = Duration::from_secs(1);
        // No health checks: three publish intervals.
        assert_eq!(rejoin_grace(&config, publish), Duration::from_secs(3));
        // interval 1 s, rise 2, timeout 500 ms: (2 + 1) × 1 s + 0.5 s + 1 s.
        config.pools["app"].health_check = Some(fulcrum_config::HealthCheckConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            ..fulcrum_config::HealthCheckConfig::default()
        });
        assert_eq!(rejoin_grace(&config, publish), Duration::from_millis(4500));
        // Very slow checks are capped at ten publish intervals.
        if let Some(h) = config.pools["app"].health_check.as_mut() {
            h.interval = Duration::from_secs(3600);
        }
        assert_eq!(rejoin_grace(&config, publish), Duration::from_secs(10));
    }

    /// The addresses pool `pool` runs with on the node.
    fn running(plane: &ControlPlane, pool: &str) -> Vec<String> {
        let pool = plane
            .inner
            .node
            .pools()
            .into_iter()
            .find(|p| p.name() == pool)
            .expect("the pool exists");
        pool.state()
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect()
    }

    /// Discovery answers for two pools and reloads, racing on three threads, must leave
    /// the node running the composition of the layers it stores: each pool ends with its
    /// last answer. (Before the compose lock, one pool's answer could apply a composition
    /// without the other's, and its stored layer then kept it from ever being re-applied.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_discovery_answers_and_reloads_all_land() {
        let config = fulcrum_config::parse(
            "admin: {listen: 127.0.0.1:0}\n\
             listeners:\n  - {name: web, listen: 127.0.0.1:0, routes: [{match: {path_prefix: /b}, pool: b}, {pool: a}]}\n\
             pools:\n  a: {discovery: {source: dns, name: a.test:80, nameservers: [127.0.0.1:9], interval: 1h}}\n  \
             b: {discovery: {source: dns, name: b.test:80, nameservers: [127.0.0.1:9], interval: 1h}}\n",
            "t.yaml",
        )
        .expect("valid");
        let spec = node_spec(&config, Some(1)).expect("valid spec");
        let node = Node::start(&spec).expect("node starts");
        let admin = "127.0.0.1:9".parse().expect("an address");
        let plane = ControlPlane::start(node.clone(), config.clone(), admin)
            .await
            .expect("control plane starts");
        let task = plane.discovery_task();
        const ROUNDS: u16 = 300;
        let answer = |i: u16| {
            vec![BackendConfig {
                address: format!("127.0.0.1:{}", 10_000 + i),
                weight: 1,
                tags: BTreeMap::new(),
                max_requests: 0,
            }]
        };
        let threads: Vec<_> = [Some("a"), Some("b"), None]
            .into_iter()
            .map(|pool| {
                let (plane, task, config) = (plane.clone(), task.clone(), config.clone());
                tokio::task::spawn_blocking(move || {
                    for i in 0..ROUNDS {
                        match pool {
                            Some(pool) => plane.set_discovered(pool, answer(i), &task),
                            None => plane.set_base(config.clone()).expect("the reload applies"),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.await.expect("no thread panicked");
        }
        let last = vec![format!("127.0.0.1:{}", 10_000 + ROUNDS - 1)];
        assert_eq!(running(&plane, "a"), last);
        assert_eq!(running(&plane, "b"), last);
        plane.shutdown().await;
        node.shutdown().await;
    }
}
