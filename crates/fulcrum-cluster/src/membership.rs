//! Gossip membership: which Fulcrum nodes form the cluster, which of them are alive, and
//! what each one publishes (its admin address, listeners, tags, load, config version and
//! its view of every backend's health). It sits beside the data plane: the proxy publishes
//! its backend views here and reads the others' back to merge them ([`crate::health`]);
//! the admin API lists [`Membership::members`] and the [`ClusterEvent`]s.
//!
//! Built on chitchat (Quickwit), which implements Scuttlebutt anti-entropy gossip (van
//! Renesse, Dumitriu, Gough & Zhang, "Efficient Reconciliation and Flow Control for
//! Anti-Entropy Protocols", LADIS 2008) over UDP: every node owns a versioned key-value
//! map; each gossip interval it exchanges digests with up to three live peers (plus,
//! occasionally, a seed and a dead node) and receives only the key-values it has not yet
//! seen. Liveness comes from a phi-accrual failure detector (Hayashibara, Défago, Yared &
//! Katayama, "The φ Accrual Failure Detector", SRDS 2004) fed by the heartbeats carried in
//! the digests.
//!
//! # Timing (chitchat 0.13)
//! Chitchat's phi is `elapsed / mean heartbeat interval` (an exponential-arrival
//! approximation, not the paper's normal-distribution log form), so a silent node is
//! declared dead about `phi_threshold × mean interval` after its last heartbeat, checked
//! once per gossip interval. Heartbeats reach a node both directly and through third
//! parties, so the mean interval is well below the gossip interval. Measured on loopback
//! with the defaults (200 ms, φ = 8): a killed node is reported failed after 0.8 s in a
//! 3-node cluster and 1.2 s with 7 nodes; at a 1 s interval, after 5 s; φ = 12 at 200 ms,
//! 1.4 s. A node that stalls longer than that (CPU starvation, a paused VM) is reported
//! failed, then joined again when it resumes: raise φ or the interval on busy hosts. The
//! stalled node itself hears nothing meanwhile either, and its detector takes that for
//! its peers' silence; it notices the gap in its own ticks (more than three intervals)
//! and for the next ten intervals lists peers that look silent as alive and reports
//! them failed only if they are still silent then (`Tracker::hold_deadline`). A new
//! node is reported alive after three heartbeats, a few gossip rounds (3 nodes converge in
//! about 0.6 s at 200 ms).
//!
//! # Generations
//! Every start takes a new generation (the start time in Unix milliseconds), so a
//! restarted node is a new chitchat identity: peers report `node_joined` for it at once and
//! do not report the old generation's failure. The old generation's state is kept as dead
//! until `dead_grace` has passed; [`Membership::members`] shows only the newest generation
//! of each node.
//!
//! # Published keys
//! A node's values are plain strings under the well-known keys below ([`KEY_ADMIN`], ...)
//! and one `backend:{pool}/{address}` key per backend ([`BackendSummary`]). A key and its
//! value together may not exceed [`MAX_ENTRY_BYTES`]: chitchat sends a key-value in one
//! datagram and would otherwise stall that node's replication.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport, UdpSocket};
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
    ProtocolVersion, spawn_chitchat,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex as AsyncMutex, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::store::now_ms as unix_ms;

/// Key: the node's admin API address (`host:port`).
pub const KEY_ADMIN: &str = "admin";
/// Key: the node's listeners, a JSON array (one object per listener: name, address,
/// protocol).
pub const KEY_LISTENERS: &str = "listeners";
/// Key: the node's tags, a JSON object of string to string (`{"zone": "a"}`).
pub const KEY_TAGS: &str = "tags";
/// Key: the version of the configuration the node runs (decimal).
pub const KEY_CONFIG_VERSION: &str = "config_version";
/// Key: the node's load, [`NodeLoad::encode`].
pub const KEY_LOAD: &str = "load";
/// Key: the node's lifecycle status; only [`STATUS_LEFT`] is interpreted.
pub const KEY_STATUS: &str = "status";
/// Key: the shared configuration when coordination is `none`: [`ConfigDoc::encode`], the
/// version, a newline, then the JSON document — when it fits in one entry
/// ([`MAX_ENTRY_BYTES`]); a larger one is split over [`KEY_CONFIG_DOC_PART`] keys.
pub const KEY_CONFIG_DOC: &str = "config_doc";
/// Prefix of the keys of a shared configuration too large for [`KEY_CONFIG_DOC`]: part `i`
/// is under `config_doc_part:<i>`, its value the version, a newline, `<i>/<count>`, a
/// newline, then that slice of the JSON ([`ConfigDoc::entries`]).
pub const KEY_CONFIG_DOC_PART: &str = "config_doc_part:";
/// Most parts a shared configuration is split into: [`ConfigDoc::MAX_JSON_BYTES`] is
/// this many parts of a little under [`MAX_ENTRY_BYTES`] (about 1.5 MiB in all).
pub const MAX_CONFIG_DOC_PARTS: usize = 32;
/// Key: the node's hold on the leader lease of the coordination store: `leading:<token>`,
/// `stepped_down:<token>` (it does not lead; the last lease it held, with that fencing
/// token, it gave up — if the store still names it leader with that token, the release
/// has not reached the store yet), or `none`.
pub const KEY_LEASE: &str = "lease";
/// Value of [`KEY_STATUS`] published by [`Membership::leave`]: the node is going away on
/// purpose. Peers drop it from the live set at once and report `node_left`.
pub const STATUS_LEFT: &str = "left";
/// Prefix of the per-backend keys, [`BackendSummary::key`].
pub const BACKEND_KEY_PREFIX: &str = "backend:";

/// Largest key plus value, in bytes, that [`Membership::set`] publishes. Chitchat sends a
/// key-value whole in one UDP datagram (64 KiB, less the header and a digest that grows with
/// the cluster); a larger one would block every later update of the node.
pub const MAX_ENTRY_BYTES: usize = 48 * 1024;

/// Default gossip interval.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// Default phi-accrual threshold.
pub const DEFAULT_PHI_THRESHOLD: f64 = 8.0;
/// Default time a failed node stays listed before it is forgotten.
pub const DEFAULT_DEAD_GRACE: Duration = Duration::from_secs(60 * 60);
/// Default cluster id; nodes with different cluster ids ignore each other.
pub const DEFAULT_CLUSTER_ID: &str = "fulcrum";

/// Events kept for [`Membership::recent_events`] and buffered per subscriber.
const RECENT_EVENTS: usize = 256;
/// Direct pushes of the `status=left` key to every live peer before [`Membership::leave`]
/// stops gossiping, one per gossip interval (UDP may drop one).
const LEAVE_PUSHES: u32 = 3;
/// Gossip rounds a node first learned of through gossip may take to turn alive before it
/// is listed as failed (it may be a node that died before we joined).
const DISCOVERY_ROUNDS: u32 = 10;
/// Shortest time [`Membership::join`] waits for the seed to answer.
const MIN_JOIN_WAIT: Duration = Duration::from_secs(2);
/// Gossip rounds after first learning of an identity before a heartbeat of it counts as
/// proof that it runs: a node that died still has heartbeats in flight between peers for
/// a few rounds (see [`NodeIdConflict`]).
const CONFLICT_ROUNDS: u32 = 10;
/// A gap of more than this many gossip intervals between two of this node's own ticks
/// means it did not run (a stopped process, a paused VM, CPU starvation). Its failure
/// detector then took its own silence for the peers': failures are held back for
/// `DISCOVERY_ROUNDS` intervals while fresh heartbeats arrive.
const STALL_ROUNDS: u32 = 3;
/// How long after start a node that finds an older live node with its id reports it as
/// [`Membership::startup_conflict`] (the operator started a copy; it should not serve).
/// Later conflicts (two partitions with the same id meeting) are only listed and logged.
const STARTUP_CONFLICT_WINDOW: Duration = Duration::from_secs(30);

/// What [`Membership::start`] needs. [`MembershipSettings::new`] fills in the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipSettings {
    /// This node's id, unique in the cluster (`cluster.node_id`).
    pub node_id: String,
    /// Cluster name; gossip from another cluster id is refused.
    pub cluster_id: String,
    /// UDP address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address peers gossip to; port 0 means the bound port. Must not be unspecified
    /// (`0.0.0.0`, `::`).
    pub advertise: SocketAddr,
    /// Nodes to contact first, `host:port` (a name is re-resolved every minute).
    pub seeds: Vec<String>,
    /// Gossip interval (default 200 ms). Also the failure detector's prior heartbeat
    /// interval.
    pub interval: Duration,
    /// Phi-accrual threshold (default 8): a node is dead once the time since its last
    /// heartbeat exceeds `phi_threshold` mean heartbeat intervals. Lower detects sooner and
    /// suspects more often.
    pub phi_threshold: f64,
    /// How long a failed node stays listed as failed before it is forgotten (default 1 h).
    pub dead_grace: Duration,
}

impl MembershipSettings {
    /// Settings with the defaults: cluster [`DEFAULT_CLUSTER_ID`], advertise = `listen`, no
    /// seeds, 200 ms interval, phi 8, dead grace 1 h.
    pub fn new(node_id: impl Into<String>, listen: SocketAddr) -> MembershipSettings {
        MembershipSettings {
            node_id: node_id.into(),
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            listen,
            advertise: listen,
            seeds: Vec::new(),
            interval: DEFAULT_GOSSIP_INTERVAL,
            phi_threshold: DEFAULT_PHI_THRESHOLD,
            dead_grace: DEFAULT_DEAD_GRACE,
        }
    }

    fn validate(&self) -> Result<(), MembershipError> {
        let invalid = |reason: String| Err(MembershipError::Settings(reason));
        if self.node_id.trim().is_empty() {
            return invalid("node_id is empty".into());
        }
        if self.interval.is_zero() {
            return invalid("gossip interval must be positive".into());
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return invalid(format!(
                "phi_threshold must be a positive number, got {}",
                self.phi_threshold
            ));
        }
        for seed in &self.seeds {
            check_seed(seed)?;
        }
        Ok(())
    }
}

/// Why a membership operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// The gossip socket could not be bound (address in use, not local, no permission).
    #[error("cannot bind the gossip socket on {addr}/udp: {reason}")]
    Bind {
        /// The `listen` address.
        addr: SocketAddr,
        /// The operating system's reason.
        reason: String,
    },
    /// A seed is not `host:port`.
    #[error("bad gossip seed `{seed}`: {reason}")]
    BadSeed {
        /// The seed as given.
        seed: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The advertise address is unspecified, so peers could not reach this node.
    #[error("gossip advertise address {0} is unspecified: set it to an address peers can reach")]
    UnspecifiedAdvertise(SocketAddr),
    /// Invalid settings (empty node id, zero interval, bad phi threshold).
    #[error("invalid gossip settings: {0}")]
    Settings(String),
    /// A key plus value exceeds [`MAX_ENTRY_BYTES`].
    #[error("gossip key `{key}` with its value is {len} bytes, over the {max}-byte limit")]
    EntryTooLarge {
        /// The key.
        key: String,
        /// Key plus value length in bytes.
        len: usize,
        /// [`MAX_ENTRY_BYTES`].
        max: usize,
    },
    /// A shared configuration document is larger than [`ConfigDoc::MAX_JSON_BYTES`].
    #[error(
        "the shared configuration is {len} bytes of JSON, over the {max}-byte limit of \
         what gossip carries ({MAX_CONFIG_DOC_PARTS} parts)"
    )]
    DocumentTooLarge {
        /// The document's JSON length in bytes.
        len: usize,
        /// [`ConfigDoc::MAX_JSON_BYTES`].
        max: usize,
    },
    /// Chitchat did not start.
    #[error("cannot start gossip: {0}")]
    Start(String),
    /// The seed did not answer in time.
    #[error(
        "no gossip answer from {seed} within {waited:?}: check the address, that it runs \
         Fulcrum with the same cluster id, and that UDP is allowed"
    )]
    JoinTimeout {
        /// The seed.
        seed: SocketAddr,
        /// How long [`Membership::join`] waited.
        waited: Duration,
    },
    /// This node has left the cluster ([`Membership::leave`]).
    #[error("this node has left the cluster")]
    Stopped,
}

/// A member's state as this node sees it. Serialized lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heartbeats arrive (phi below the threshold). Self is always alive until it leaves.
    Alive,
    /// The failure detector declared it dead and it did not announce leaving.
    Failed,
    /// It published `status=left` ([`Membership::leave`]) before going away.
    Left,
}

/// One cluster member, as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The node's id.
    pub node_id: String,
    /// The address it gossips on (its advertise address).
    pub gossip_addr: SocketAddr,
    /// Its generation: the Unix time in milliseconds when it started.
    pub generation: u64,
    /// Alive, failed or left.
    pub state: MemberState,
    /// This node.
    pub is_self: bool,
    /// The node's published key-values ([`KEY_ADMIN`], [`BackendSummary`] keys, ...).
    pub values: BTreeMap<String, String>,
    /// Unix milliseconds when this node last saw the member's heartbeat advance (within a
    /// gossip interval); now for self; `None` if never seen alive.
    pub last_seen_ms: Option<u64>,
}

/// The kind of a [`ClusterEvent`]. Serialized `node_joined`, `node_left`, `node_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A node turned alive: first seen, a new generation (restart), or back after failing.
    NodeJoined,
    /// An alive node published `status=left` and dropped out of the live set.
    NodeLeft,
    /// An alive node dropped out of the live set without announcing it.
    NodeFailed,
}

/// A membership change observed by this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// Sequence number on this node, from 1, without gaps.
    pub seq: u64,
    /// What happened.
    pub kind: EventKind,
    /// To which node.
    pub node_id: String,
    /// When this node observed it, Unix milliseconds.
    pub at_ms: u64,
}

/// Events observed since start, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCounts {
    /// `node_joined` events.
    pub joined: u64,
    /// `node_left` events.
    pub left: u64,
    /// `node_failed` events.
    pub failed: u64,
}

/// Another live node gossiping under this node's id: `cluster.node_id` was given to two
/// nodes (a copied configuration file, or the host-name default on two nodes of one host).
/// Peers would see one member flapping between the two, whose backend views, load and
/// statistics overwrite each other.
///
/// Detection: an identity (node id, generation, gossip address) with this node's id but
/// another gossip address whose heartbeat this node saw advance at least
/// `CONFLICT_ROUNDS` (10) gossip intervals after it first learned of it, and within the
/// last 10 intervals. A restart on the same address is never a conflict (two processes
/// cannot hold one UDP address), and a previous generation that died — after a restart on
/// another port — stops advancing: its last heartbeats reach this node within a few
/// rounds of relaying, before the 10 have passed. (Consul refuses a node whose id a live
/// member already uses in the same way.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdConflict {
    /// The id both nodes use.
    pub node_id: String,
    /// The other node's gossip address.
    pub gossip_addr: SocketAddr,
    /// The other node's generation (its start time, Unix milliseconds).
    pub generation: u64,
    /// This node started after the other (a newer generation; on a tie, the higher gossip
    /// address): it is the copy that should go.
    pub this_node_is_newer: bool,
    /// When this node found the conflict, Unix milliseconds.
    pub since_ms: u64,
}

/// This node's membership in a cluster: a running chitchat instance plus the event feed.
/// Cheap to clone; gossip stops when [`Membership::leave`] is called or the last clone is
/// dropped (dropping without `leave` looks like a crash to the peers).
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    self_id: ChitchatId,
    bound: SocketAddr,
    interval: Duration,
    discovery_grace: Duration,
    chitchat: Arc<AsyncMutex<Chitchat>>,
    /// `None` once the node has left.
    handle: parking_lot::Mutex<Option<ChitchatHandle>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// State shared with the background task that turns live-set changes into events.
struct Shared {
    tracker: parking_lot::Mutex<Tracker>,
    events: broadcast::Sender<ClusterEvent>,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership")
            .field("node_id", &self.inner.node_id)
            .field("generation", &self.inner.self_id.generation_id)
            .field("gossip_addr", &self.inner.bound)
            .field("advertise_addr", &self.inner.self_id.gossip_advertise_addr)
            .finish()
    }
}

impl Membership {
    /// Binds the UDP gossip socket, starts chitchat with `initial` as this node's first
    /// key-values (published atomically with the node itself, so peers never see the node
    /// without them), and starts the task that produces [`ClusterEvent`]s.
    ///
    /// Errors: [`MembershipError::Bind`] if the socket cannot be bound,
    /// [`MembershipError::BadSeed`] for a seed that is not `host:port`,
    /// [`MembershipError::UnspecifiedAdvertise`], [`MembershipError::Settings`],
    /// [`MembershipError::EntryTooLarge`] for an oversized initial value. Must run inside
    /// a Tokio runtime.
    pub async fn start(
        settings: MembershipSettings,
        initial: Vec<(String, String)>,
    ) -> Result<Membership, MembershipError> {
        settings.validate()?;
        for (key, value) in &initial {
            check_entry(key, value)?;
        }
        let socket =
            UdpSocket::open(settings.listen)
                .await
                .map_err(|err| MembershipError::Bind {
                    addr: settings.listen,
                    reason: format!("{:#}", err.root_cause()),
                })?;
        let bound = socket.local_addr().map_err(|err| MembershipError::Bind {
            addr: settings.listen,
            reason: format!("{err:#}"),
        })?;
        let mut advertise = settings.advertise;
        if advertise.port() == 0 {
            advertise.set_port(bound.port());
        }
        if advertise.ip().is_unspecified() {
            return Err(MembershipError::UnspecifiedAdvertise(advertise));
        }

        let self_id = ChitchatId::new(settings.node_id.clone(), next_generation(), advertise);
        let config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: settings.cluster_id.clone(),
            gossip_interval: settings.interval,
            listen_addr: bound,
            seed_nodes: settings.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: settings.phi_threshold,
                // The prior of the mean heartbeat interval (weight: 5 samples). Chitchat's
                // default of 5 s would delay the first failure detections by tens of
                // seconds; heartbeats come at least once per gossip interval.
                initial_interval: settings.interval,
                dead_node_grace_period: settings.dead_grace,
                ..FailureDetectorConfig::default()
            },
            // Tombstones of deleted keys live as long as dead nodes do, so a node back from
            // a long partition still learns about deletions rather than being reset.
            marked_for_deletion_grace_period: settings.dead_grace,
            catchup_callback: None,
            // A node that announced leaving drops out of the live set as soon as the
            // announcement arrives, instead of after the failure detector's timeout.
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.get(KEY_STATUS) != Some(STATUS_LEFT)
            })),
            // V1 compresses digests; every Fulcrum node runs chitchat 0.13, which reads both.
            protocol_version: ProtocolVersion::V1,
        };
        let handle = spawn_chitchat(config, initial, &PreboundUdp::new(Box::new(socket)))
            .await
            .map_err(|err| MembershipError::Start(format!("{err:#}")))?;
        let chitchat = handle.chitchat();
        let live_nodes = chitchat.lock().await.live_nodes_watcher();
        let (events, _) = broadcast::channel(RECENT_EVENTS);
        let shared = Arc::new(Shared {
            tracker: parking_lot::Mutex::new(Tracker::default()),
            events,
        });
        let stop = CancellationToken::new();
        tokio::spawn(track_live_set(
            shared.clone(),
            chitchat.clone(),
            live_nodes,
            self_id.clone(),
            settings.interval,
            stop.clone(),
        ));
        info!(
            node_id = %settings.node_id,
            generation = self_id.generation_id,
            gossip_addr = %bound,
            advertise_addr = %advertise,
            seeds = ?settings.seeds,
            "gossip started"
        );
        Ok(Membership {
            inner: Arc::new(Inner {
                node_id: settings.node_id,
                self_id,
                bound,
                interval: settings.interval,
                discovery_grace: settings.interval * DISCOVERY_ROUNDS,
                chitchat,
                handle: parking_lot::Mutex::new(Some(handle)),
                shared,
                stop,
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The address the gossip socket is bound to (the actual port when `listen` had
    /// port 0).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.inner.bound
    }

    /// The address peers gossip to (`advertise`, with the bound port if its port was 0).
    pub fn advertise_addr(&self) -> SocketAddr {
        self.inner.self_id.gossip_advertise_addr
    }

    /// This node's generation: its start time in Unix milliseconds.
    pub fn generation(&self) -> u64 {
        self.inner.self_id.generation_id
    }

    /// Publishes `key = value` for this node. Does nothing if the value is unchanged, so
    /// callers may republish on every tick without causing gossip traffic. A key plus value
    /// over [`MAX_ENTRY_BYTES`] is refused and logged; use [`Membership::try_set`] to get
    /// the error.
    pub async fn set(&self, key: &str, value: &str) {
        if let Err(err) = self.try_set(key, value).await {
            error!(error = %err, "not published");
        }
    }

    /// [`Membership::set`], returning [`MembershipError::EntryTooLarge`] instead of logging.
    pub async fn try_set(&self, key: &str, value: &str) -> Result<(), MembershipError> {
        check_entry(key, value)?;
        // NodeState::set is itself a no-op for an unchanged value (no new version).
        self.inner
            .chitchat
            .lock()
            .await
            .self_node_state()
            .set(key, value);
        Ok(())
    }

    /// Deletes this node's `key` (a tombstone is gossiped). Does nothing if absent.
    pub async fn delete(&self, key: &str) {
        let mut chitchat = self.inner.chitchat.lock().await;
        let state = chitchat.self_node_state();
        // Deleting a tombstone again would bump the version for nothing.
        if state.contains_key(key) {
            state.delete(key);
        }
    }

    /// Every member this node knows of, self included, sorted by node id, newest generation
    /// of each node only.
    ///
    /// [`MemberState::Alive`]: the failure detector hears its heartbeats (self: until it
    /// leaves). [`MemberState::Left`]: it published `status=left`. [`MemberState::Failed`]:
    /// dead by the phi-accrual detector; listed until `dead_grace` passes or
    /// [`Membership::forget`]. A node learned of through gossip but never heard alive is
    /// listed (as failed) only after 10 gossip intervals, so that newcomers do not flash as
    /// failed.
    pub async fn members(&self) -> Vec<Member> {
        let chitchat = self.inner.chitchat.lock().await;
        let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut tracker = self.inner.shared.tracker.lock();
        // Per node id, the identity listed so far and its rank.
        let mut newest: BTreeMap<String, (ListingRank, Member)> = BTreeMap::new();
        for (id, state) in chitchat.node_states() {
            let is_self = *id == self.inner.self_id;
            let alive = is_self || live.contains(id) || tracker.is_held(id);
            let seen = tracker
                .seen
                .entry(id.clone())
                .or_insert_with(|| Seen::new(now, state));
            seen.was_alive |= alive;
            let member_state = if state.get(KEY_STATUS) == Some(STATUS_LEFT) {
                MemberState::Left
            } else if alive {
                MemberState::Alive
            } else if seen.was_alive
                || now.duration_since(seen.first_seen) >= self.inner.discovery_grace
            {
                MemberState::Failed
            } else {
                continue;
            };
            let last_seen_ms = if is_self {
                Some(now_ms)
            } else {
                seen.last_seen_ms
            };
            if !is_self && tracker.is_forgotten(id) {
                continue;
            }
            let member = Member {
                node_id: id.node_id.to_string(),
                gossip_addr: id.gossip_advertise_addr,
                generation: id.generation_id,
                state: member_state,
                is_self,
                values: state
                    .key_values()
                    .map(|(key, value)| (key.to_string(), value.to_string()))
                    .collect(),
                last_seen_ms,
            };
            let rank = listing_rank(&member, tracker.live.get(&*id.node_id) == Some(id));
            match newest.get(&member.node_id) {
                Some((listed, _)) if *listed >= rank => {}
                _ => {
                    newest.insert(member.node_id.clone(), (rank, member));
                }
            }
        }
        newest.into_values().map(|(_, member)| member).collect()
    }

    /// Live nodes gossiping under this node's id, as [`NodeIdConflict`] describes; empty
    /// in a well-configured cluster.
    pub fn node_id_conflicts(&self) -> Vec<NodeIdConflict> {
        self.inner
            .shared
            .tracker
            .lock()
            .conflicts
            .values()
            .cloned()
            .collect()
    }

    /// How long after start this node has usually found a live node already using its id,
    /// if there is one ([`Membership::startup_conflict`]): `CONFLICT_ROUNDS` (10) gossip
    /// intervals of proof plus three for the first exchanges. Writes in this node's name
    /// that a copy must not make (its record in the coordination store) wait this long.
    pub fn conflict_check_time(&self) -> Duration {
        self.inner.interval * (CONFLICT_ROUNDS + 3)
    }

    /// The first [`NodeIdConflict`] found within 30 s of this node's start in which this
    /// node is the newer one: an operator started a second node with an id a live node
    /// already uses, and this copy should stop (`fulcrum run` exits with status 2). `None`
    /// otherwise; once set it stays set.
    pub fn startup_conflict(&self) -> Option<NodeIdConflict> {
        self.inner.shared.tracker.lock().startup_conflict.clone()
    }

    /// A receiver of every [`ClusterEvent`] from now on. A receiver more than 256 events
    /// behind gets `RecvError::Lagged` and skips ahead; [`Membership::recent_events`] has
    /// the history.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.shared.events.subscribe()
    }

    /// The last 256 events, oldest first.
    pub fn recent_events(&self) -> Vec<ClusterEvent> {
        self.inner
            .shared
            .tracker
            .lock()
            .recent
            .iter()
            .cloned()
            .collect()
    }

    /// Events since start, by kind.
    pub fn event_counts(&self) -> EventCounts {
        self.inner.shared.tracker.lock().counts
    }

    /// Contacts `seed` now (`POST /api/cluster/join`): gossips with it every interval until
    /// it shows up in this node's view, for at least 2 s (10 intervals if longer).
    ///
    /// Errors: [`MembershipError::BadSeed`] for this node's own address,
    /// [`MembershipError::JoinTimeout`] if the seed does not answer,
    /// [`MembershipError::Stopped`] after [`Membership::leave`].
    pub async fn join(&self, seed: SocketAddr) -> Result<(), MembershipError> {
        if seed == self.advertise_addr() || seed == self.gossip_addr() {
            return Err(MembershipError::BadSeed {
                seed: seed.to_string(),
                reason: "that is this node's own gossip address",
            });
        }
        let known_before = self.inner.chitchat.lock().await.node_states().len();
        let waited = MIN_JOIN_WAIT.max(self.inner.interval * DISCOVERY_ROUNDS);
        let deadline = Instant::now() + waited;
        loop {
            {
                let handle = self.inner.handle.lock();
                let handle = handle.as_ref().ok_or(MembershipError::Stopped)?;
                // Only fails if the gossip server has stopped.
                handle.gossip(seed).map_err(|_| MembershipError::Stopped)?;
            }
            tokio::time::sleep(self.inner.interval).await;
            {
                let chitchat = self.inner.chitchat.lock().await;
                let states = chitchat.node_states();
                // The seed may advertise another address than the one we used (NAT, a
                // name), so any node learned meanwhile counts as an answer too.
                if states.len() > known_before
                    || states.keys().any(|id| id.gossip_advertise_addr == seed)
                {
                    info!(%seed, "joined through seed");
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(MembershipError::JoinTimeout { seed, waited });
            }
        }
    }

    /// Stops listing a failed or left node (`DELETE /api/cluster/nodes/{id}`), up to its
    /// current generation; it is listed again if it comes back alive or restarts. Returns
    /// false for self, an alive node, or an unknown id.
    ///
    /// Local to this node: peers keep listing it until their own `dead_grace` passes, and
    /// chitchat still probes it now and then until then.
    pub async fn forget(&self, node_id: &str) -> bool {
        if node_id == self.inner.node_id {
            return false;
        }
        let Some(member) = self
            .members()
            .await
            .into_iter()
            .find(|m| m.node_id == node_id)
        else {
            return false;
        };
        if member.state == MemberState::Alive {
            return false;
        }
        self.inner
            .shared
            .tracker
            .lock()
            .forgotten
            .insert(member.node_id, member.generation);
        info!(node_id, generation = member.generation, "node forgotten");
        true
    }

    /// Leaves the cluster gracefully: publishes `status=left`, pushes it directly to every
    /// live peer for three gossip intervals (peers report `node_left` as soon as it
    /// arrives), then stops chitchat. Idempotent. Afterwards this node lists itself as
    /// [`MemberState::Left`], [`Membership::join`] fails and
    /// [`Membership::membership_leader`] is `None`.
    pub async fn leave(&self) {
        let Some(handle) = self.inner.handle.lock().take() else {
            return;
        };
        let peers: Vec<SocketAddr> = {
            let mut chitchat = self.inner.chitchat.lock().await;
            chitchat.self_node_state().set(KEY_STATUS, STATUS_LEFT);
            chitchat
                .live_nodes()
                .filter(|id| **id != self.inner.self_id)
                .map(|id| id.gossip_advertise_addr)
                .collect()
        };
        if !peers.is_empty() {
            for _ in 0..LEAVE_PUSHES {
                for &peer in &peers {
                    if handle.gossip(peer).is_err() {
                        break;
                    }
                }
                tokio::time::sleep(self.inner.interval).await;
            }
        }
        if let Err(err) = handle.shutdown().await {
            warn!(error = %err, "gossip server stopped with an error");
        }
        self.inner.stop.cancel();
        info!(node_id = %self.inner.node_id, peers = peers.len(), "left the cluster");
    }

    /// The leader when coordination is `none`: the lowest node id among the alive members
    /// (self included); `None` after [`Membership::leave`].
    ///
    /// **Not partition-safe**: each side of a network partition elects its own leader, and
    /// while a failed leader is still within the failure detector's timeout (about
    /// `phi_threshold` gossip intervals) nodes may disagree. Use it only for chores that
    /// tolerate running twice or not at all for a few seconds; anything that must run
    /// exactly once needs a coordination store's lease with a fencing token.
    pub async fn membership_leader(&self) -> Option<String> {
        if self.inner.handle.lock().is_none() {
            return None;
        }
        self.members()
            .await
            .into_iter()
            .find(|m| m.state == MemberState::Alive)
            .map(|m| m.node_id)
    }
}

/// Which of several identities of one node id [`Membership::members`] lists: self, then the
/// one the event feed lists as live (`incumbent`: see [`Tracker::apply_live_set`]), then an
/// alive one, then the newest generation. (A restart's new generation is alive and newest;
/// a copy refused for its duplicate id is newest, but the original is the incumbent while
/// it lives, and the copy is gone afterwards.)
fn listing_rank(member: &Member, incumbent: bool) -> ListingRank {
    (
        member.is_self,
        incumbent,
        member.state == MemberState::Alive,
        member.generation,
    )
}

/// [`listing_rank`]: self, incumbent, alive, generation; higher is listed.
type ListingRank = (bool, bool, bool, u64);

/// Turns changes of chitchat's live set into events, and samples heartbeats every gossip
/// interval for [`Member::last_seen_ms`] and [`NodeIdConflict`]s. Ends when the
/// membership is dropped or leaves.
async fn track_live_set(
    shared: Arc<Shared>,
    chitchat: Arc<AsyncMutex<Chitchat>>,
    mut live_nodes: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    self_id: ChitchatId,
    interval: Duration,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = live_nodes.changed() => {
                if changed.is_err() {
                    return;
                }
                let live = peers(&live_nodes.borrow_and_update(), &self_id);
                let events = {
                    let chitchat = chitchat.lock().await;
                    let now = Instant::now();
                    let mut tracker = shared.tracker.lock();
                    let hold = tracker.hold_deadline(now, interval);
                    tracker.apply_live_set(&live, |id| has_left(&chitchat, id), now, unix_ms(), hold)
                };
                publish(&shared, events);
            }
            _ = tick.tick() => {
                let chitchat = chitchat.lock().await;
                let now = Instant::now();
                let mut tracker = shared.tracker.lock();
                tracker.hold_deadline(now, interval);
                let live = peers(&live_nodes.borrow(), &self_id);
                let events =
                    tracker.expire_held(&live, |id| has_left(&chitchat, id), now, unix_ms());
                publish(&shared, events);
                tracker.observe(&chitchat, &self_id, now, unix_ms());
                tracker.find_conflicts(
                    &self_id,
                    now,
                    interval * CONFLICT_ROUNDS,
                    now.duration_since(started) <= STARTUP_CONFLICT_WINDOW,
                    unix_ms(),
                );
            }
        }
    }
}

/// The live identities of `live_set` other than this node's. Other identities with this
/// node's id are not peers either: they are its earlier generations or a copy
/// ([`NodeIdConflict`]).
fn peers(live_set: &BTreeMap<ChitchatId, NodeState>, self_id: &ChitchatId) -> Vec<ChitchatId> {
    live_set
        .keys()
        .filter(|id| id.node_id != self_id.node_id)
        .cloned()
        .collect()
}

/// Whether `id` published `status=left` ([`Membership::leave`]).
fn has_left(chitchat: &Chitchat, id: &ChitchatId) -> bool {
    chitchat
        .node_state(id)
        .is_some_and(|state| state.get(KEY_STATUS) == Some(STATUS_LEFT))
}

/// Logs `events` and sends them to the subscribers (none is fine: the history keeps them).
fn publish(shared: &Shared, events: Vec<(ClusterEvent, ChitchatId)>) {
    for (event, id) in events {
        log_event(&event, &id);
        let _ = shared.events.send(event);
    }
}

fn log_event(event: &ClusterEvent, id: &ChitchatId) {
    let (node_id, generation, gossip_addr) =
        (&event.node_id, id.generation_id, id.gossip_advertise_addr);
    match event.kind {
        EventKind::NodeJoined => {
            info!(seq = event.seq, %node_id, generation, %gossip_addr, "node joined");
        }
        EventKind::NodeLeft => {
            info!(seq = event.seq, %node_id, generation, %gossip_addr, "node left");
        }
        EventKind::NodeFailed => {
            warn!(seq = event.seq, %node_id, generation, %gossip_addr, "node failed");
        }
    }
}

/// What this node remembers about each chitchat identity (node id + generation).
#[derive(Debug, Default)]
struct Tracker {
    /// Live peers by node id: the newest live generation, as of the last live-set change.
    live: BTreeMap<String, ChitchatId>,
    seen: HashMap<ChitchatId, Seen>,
    /// Node id → the newest generation [`Membership::forget`] hid.
    forgotten: HashMap<String, u64>,
    recent: VecDeque<ClusterEvent>,
    counts: EventCounts,
    last_seq: u64,
    /// Current [`NodeIdConflict`]s, by the other identity.
    conflicts: BTreeMap<ChitchatId, NodeIdConflict>,
    /// [`Membership::startup_conflict`].
    startup_conflict: Option<NodeIdConflict>,
    /// Peers that dropped out of the live set while failures were held back after a stall
    /// of this node (see `STALL_ROUNDS`), by node id: kept in `live`, listed alive, and
    /// reported failed only if still silent at the deadline.
    held: BTreeMap<String, Instant>,
    /// When [`Tracker::hold_deadline`] last ran.
    last_tick: Option<Instant>,
    /// Failures are held back until then (set when a stall is found).
    hold_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    first_seen: Instant,
    heartbeat: u64,
    last_seen_ms: Option<u64>,
    was_alive: bool,
    /// When [`Tracker::observe`] last saw the heartbeat change (not the first sight).
    advanced_at: Option<Instant>,
}

impl Seen {
    fn new(now: Instant, state: &NodeState) -> Seen {
        Seen {
            first_seen: now,
            heartbeat: state.heartbeat().into(),
            last_seen_ms: None,
            was_alive: false,
            advanced_at: None,
        }
    }

    /// Whether this identity provably runs: its heartbeat advanced at least `lag` after
    /// this node first learned of it, and again within the last `lag`.
    fn runs(&self, now: Instant, lag: Duration) -> bool {
        self.advanced_at.is_some_and(|at| {
            at.duration_since(self.first_seen) >= lag && now.duration_since(at) <= lag
        })
    }
}

impl Tracker {
    /// Called on every tick and live-set change with the gossip `interval`: finds a stall
    /// of this node — more than `STALL_ROUNDS` intervals since the last call, time in which
    /// the failure detector heard nothing because this node did not run — and then holds
    /// failures back for `DISCOVERY_ROUNDS` intervals. Returns the deadline of failures
    /// found now, if they are to be held.
    fn hold_deadline(&mut self, now: Instant, interval: Duration) -> Option<Instant> {
        if let Some(last) = self.last_tick {
            let gap = now.saturating_duration_since(last);
            if gap > interval * STALL_ROUNDS {
                let until = now + interval * DISCOVERY_ROUNDS;
                self.hold_until = Some(until);
                warn!(
                    stalled_ms = gap.as_millis() as u64,
                    "this node did not run for a while (paused, or starved of CPU): peers that \
                     look silent are not reported failed until they had time to be heard again"
                );
            }
        }
        self.last_tick = Some(now);
        self.hold_until.filter(|&until| now < until)
    }

    /// Whether `id` is a held peer ([`Tracker::held`]): listed alive meanwhile.
    fn is_held(&self, id: &ChitchatId) -> bool {
        self.held.contains_key(&*id.node_id) && self.live.get(&*id.node_id) == Some(id)
    }

    /// Reports the held peers whose deadline passed and that are still not in `live`
    /// (self excluded) as failed (or left), and stops holding them.
    fn expire_held(
        &mut self,
        live: &[ChitchatId],
        has_left: impl Fn(&ChitchatId) -> bool,
        now: Instant,
        now_ms: u64,
    ) -> Vec<(ClusterEvent, ChitchatId)> {
        let due: Vec<String> = self
            .held
            .iter()
            .filter(|&(_, &deadline)| deadline <= now)
            .map(|(node_id, _)| node_id.clone())
            .collect();
        let mut events = Vec::new();
        for node_id in due {
            self.held.remove(&node_id);
            if live.iter().any(|id| *id.node_id == *node_id) {
                continue;
            }
            if let Some(id) = self.live.remove(&node_id) {
                let kind = if has_left(&id) {
                    EventKind::NodeLeft
                } else {
                    EventKind::NodeFailed
                };
                events.push((self.event(kind, &node_id, now_ms), id));
            }
        }
        events
    }

    /// Diffs the new live set (self excluded) against the previous one, by node id. With
    /// `hold`, a peer that dropped out without announcing its leave is not reported yet:
    /// it stays in the live set, held until the deadline ([`Tracker::expire_held`]).
    fn apply_live_set(
        &mut self,
        live: &[ChitchatId],
        has_left: impl Fn(&ChitchatId) -> bool,
        now: Instant,
        now_ms: u64,
        hold: Option<Instant>,
    ) -> Vec<(ClusterEvent, ChitchatId)> {
        let previous = std::mem::take(&mut self.live);
        let mut current: BTreeMap<String, ChitchatId> = BTreeMap::new();
        for id in live {
            let seen = self.seen.entry(id.clone()).or_insert(Seen {
                first_seen: now,
                heartbeat: 0,
                last_seen_ms: None,
                was_alive: false,
                advanced_at: None,
            });
            seen.was_alive = true;
            seen.last_seen_ms.get_or_insert(now_ms);
            match current.get(&*id.node_id) {
                Some(newest) if newest.generation_id >= id.generation_id => {}
                _ => {
                    current.insert(id.node_id.to_string(), id.clone());
                }
            }
        }
        // A newer identity on another address while the listed one is still live is a
        // restart on a new port (the old identity times out within the failure
        // detector's bound) or a copy with the same id, which stops on its own
        // (`NodeIdConflict`): the listed one stays until it drops out, so a copy never
        // shows as a join.
        for (node_id, listed) in &previous {
            if let Some(newest) = current.get_mut(node_id)
                && newest.gossip_advertise_addr != listed.gossip_advertise_addr
                && live.contains(listed)
            {
                *newest = listed.clone();
            }
        }

        let mut events = Vec::new();
        for (node_id, id) in &current {
            let is_new = previous
                .get(node_id)
                .is_none_or(|previous| previous.generation_id < id.generation_id);
            if is_new {
                if self
                    .forgotten
                    .get(node_id)
                    .is_some_and(|&hidden| hidden <= id.generation_id)
                {
                    self.forgotten.remove(node_id);
                }
                events.push((
                    self.event(EventKind::NodeJoined, node_id, now_ms),
                    id.clone(),
                ));
            }
        }
        self.held
            .retain(|node_id, _| !current.contains_key(node_id));
        for (node_id, id) in &previous {
            if current.contains_key(node_id) {
                continue;
            }
            if let Some(deadline) = hold
                && !has_left(id)
            {
                self.held.entry(node_id.clone()).or_insert(deadline);
            }
            if self.held.contains_key(node_id) && !has_left(id) {
                current.insert(node_id.clone(), id.clone());
                continue;
            }
            self.held.remove(node_id);
            let kind = if has_left(id) {
                EventKind::NodeLeft
            } else {
                EventKind::NodeFailed
            };
            events.push((self.event(kind, node_id, now_ms), id.clone()));
        }
        self.live = current;
        events
    }

    fn event(&mut self, kind: EventKind, node_id: &str, at_ms: u64) -> ClusterEvent {
        self.last_seq += 1;
        match kind {
            EventKind::NodeJoined => self.counts.joined += 1,
            EventKind::NodeLeft => self.counts.left += 1,
            EventKind::NodeFailed => self.counts.failed += 1,
        }
        let event = ClusterEvent {
            seq: self.last_seq,
            kind,
            node_id: node_id.to_string(),
            at_ms,
        };
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event.clone());
        event
    }

    /// Records heartbeat progress and forgets identities chitchat has garbage-collected.
    fn observe(&mut self, chitchat: &Chitchat, self_id: &ChitchatId, now: Instant, now_ms: u64) {
        let states = chitchat.node_states();
        for (id, state) in states {
            if id == self_id {
                continue;
            }
            let heartbeat: u64 = state.heartbeat().into();
            let seen = self
                .seen
                .entry(id.clone())
                .or_insert_with(|| Seen::new(now, state));
            if heartbeat != seen.heartbeat {
                seen.heartbeat = heartbeat;
                seen.last_seen_ms = Some(now_ms);
                seen.advanced_at = Some(now);
            }
        }
        let before = self.seen.len();
        self.seen.retain(|id, _| states.contains_key(id));
        if self.seen.len() != before {
            debug!(
                removed = before - self.seen.len(),
                "dead nodes garbage-collected"
            );
        }
        self.forgotten
            .retain(|node_id, _| states.keys().any(|id| *id.node_id == **node_id));
    }

    /// Updates [`Tracker::conflicts`] from the heartbeats [`Tracker::observe`] recorded:
    /// identities with `self_id`'s node id and another gossip address that run (see
    /// [`Seen::runs`], with `lag`). Logs each new one; records the first in which this
    /// node is the newer as the startup conflict while `at_startup`.
    fn find_conflicts(
        &mut self,
        self_id: &ChitchatId,
        now: Instant,
        lag: Duration,
        at_startup: bool,
        now_ms: u64,
    ) {
        let running: Vec<ChitchatId> = self
            .seen
            .iter()
            .filter(|(id, seen)| {
                id.node_id == self_id.node_id
                    && id.gossip_advertise_addr != self_id.gossip_advertise_addr
                    && seen.runs(now, lag)
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.conflicts.retain(|id, _| running.contains(id));
        for id in running {
            if self.conflicts.contains_key(&id) {
                continue;
            }
            let this_node_is_newer = (self_id.generation_id, self_id.gossip_advertise_addr)
                > (id.generation_id, id.gossip_advertise_addr);
            let conflict = NodeIdConflict {
                node_id: id.node_id.to_string(),
                gossip_addr: id.gossip_advertise_addr,
                generation: id.generation_id,
                this_node_is_newer,
                since_ms: now_ms,
            };
            error!(
                node_id = %id.node_id,
                other_gossip_addr = %id.gossip_advertise_addr,
                other_generation = id.generation_id,
                this_node_is_newer,
                "another live node uses this node's id: give every node its own cluster.node_id"
            );
            if at_startup && this_node_is_newer && self.startup_conflict.is_none() {
                self.startup_conflict = Some(conflict.clone());
            }
            self.conflicts.insert(id, conflict);
        }
    }

    fn is_forgotten(&self, id: &ChitchatId) -> bool {
        self.forgotten
            .get(&*id.node_id)
            .is_some_and(|&hidden| id.generation_id <= hidden)
    }
}

/// Hands chitchat the socket [`Membership::start`] bound itself, so the bound port is known
/// before the node's identity (which carries the advertise address) is built.
struct PreboundUdp {
    socket: parking_lot::Mutex<Option<Box<dyn Socket>>>,
}

impl PreboundUdp {
    fn new(socket: Box<dyn Socket>) -> PreboundUdp {
        PreboundUdp {
            socket: parking_lot::Mutex::new(Some(socket)),
        }
    }
}

#[async_trait]
impl Transport for PreboundUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = self.socket.lock().take();
        socket.ok_or_else(|| anyhow::anyhow!("gossip socket {listen_addr} was already opened"))
    }
}

fn check_seed(seed: &str) -> Result<(), MembershipError> {
    let bad = |reason| {
        Err(MembershipError::BadSeed {
            seed: seed.to_string(),
            reason,
        })
    };
    if let Ok(addr) = seed.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            bad("port 0 is not a peer's port")
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = seed.rsplit_once(':') else {
        return bad("expected host:port");
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return bad("expected host:port with a host name or IP address");
    }
    match port.parse::<u16>() {
        Ok(0) => bad("port 0 is not a peer's port"),
        Ok(_) => Ok(()),
        Err(_) => bad("the port is not a number from 1 to 65535"),
    }
}

fn check_entry(key: &str, value: &str) -> Result<(), MembershipError> {
    let len = key.len() + value.len();
    if len > MAX_ENTRY_BYTES {
        return Err(MembershipError::EntryTooLarge {
            key: key.to_string(),
            len,
            max: MAX_ENTRY_BYTES,
        });
    }
    Ok(())
}

/// A new generation: the Unix time in milliseconds, strictly increasing within the process
/// (tests start several nodes in the same millisecond).
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = unix_ms();
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or_else(|last| last);
    now.max(previous + 1)
}

/// A backend's health as one node sees it. Serialized lowercase (the admin API's backend
/// `state` words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendHealth {
    /// In rotation.
    Healthy,
    /// The active health check is failing (`fall` failures in a row).
    Unhealthy,
    /// Ejected by passive outlier detection, for the current ejection period.
    Ejected,
    /// Drained by an operator: no new requests, in-flight ones finish.
    Draining,
    /// Disabled by an operator.
    Disabled,
}

impl BackendHealth {
    /// The word used in the API: `healthy`, `unhealthy`, `ejected`, `draining`, `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendHealth::Healthy => "healthy",
            BackendHealth::Unhealthy => "unhealthy",
            BackendHealth::Ejected => "ejected",
            BackendHealth::Draining => "draining",
            BackendHealth::Disabled => "disabled",
        }
    }

    /// One-letter wire code: `h`ealthy, `u`nhealthy, `e`jected, `d`raining, disabled `x`.
    fn code(self) -> char {
        match self {
            BackendHealth::Healthy => 'h',
            BackendHealth::Unhealthy => 'u',
            BackendHealth::Ejected => 'e',
            BackendHealth::Draining => 'd',
            BackendHealth::Disabled => 'x',
        }
    }

    fn from_code(code: &str) -> Option<BackendHealth> {
        Some(match code {
            "h" => BackendHealth::Healthy,
            "u" => BackendHealth::Unhealthy,
            "e" => BackendHealth::Ejected,
            "d" => BackendHealth::Draining,
            "x" => BackendHealth::Disabled,
            _ => return None,
        })
    }
}

impl fmt::Display for BackendHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest latency encoded, in milliseconds (about 11.6 days); larger values are clamped.
const MAX_EWMA_MS: f64 = 1e9;

/// One node's summary of one backend, gossiped under [`BackendSummary::key`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendSummary {
    /// The pool's name (may contain `/`).
    pub pool: String,
    /// The backend's `host:port` (must not contain `/`).
    pub address: String,
    /// This node's view of its health.
    pub health: BackendHealth,
    /// Latency EWMA of the backend's successful attempts (time to the response head),
    /// milliseconds, encoded to 0.1 ms; 0 before the first success.
    pub ewma_ms: f64,
    /// Recent error rate, 0 to 1 (encoded to 0.001).
    pub error_rate: f64,
    /// Requests in flight from this node.
    pub in_flight: u64,
}

impl BackendSummary {
    /// The gossip key: `backend:{pool}/{address}`.
    pub fn key(&self) -> String {
        format!("{BACKEND_KEY_PREFIX}{}/{}", self.pool, self.address)
    }

    /// The gossip value: `{health}|{ewma_ms}|{error_rate}|{in_flight}`, e.g. `h|12.3|0.010|5`
    /// (health codes `h u e d x` for healthy, unhealthy, ejected, draining, disabled).
    /// Latency is rounded to 0.1 ms and clamped to 0..=1e9, the error rate to 0.001 and
    /// 0..=1 (NaN as 0), so small fluctuations do not cause gossip traffic.
    pub fn encode(&self) -> String {
        format!(
            "{}|{:.1}|{:.3}|{}",
            self.health.code(),
            clamp(self.ewma_ms, MAX_EWMA_MS),
            clamp(self.error_rate, 1.0),
            self.in_flight
        )
    }

    /// Parses a key and value written by [`BackendSummary::key`] and
    /// [`BackendSummary::encode`]; `None` if either is malformed. Fields after the fourth
    /// are ignored, so later versions may append some.
    pub fn decode(key: &str, value: &str) -> Option<BackendSummary> {
        let (pool, address) = key.strip_prefix(BACKEND_KEY_PREFIX)?.rsplit_once('/')?;
        if pool.is_empty() || address.is_empty() {
            return None;
        }
        let mut fields = value.split('|');
        let health = BackendHealth::from_code(fields.next()?)?;
        let ewma_ms = parse_finite(fields.next()?)?;
        let error_rate = parse_finite(fields.next()?)?;
        let in_flight = fields.next()?.parse().ok()?;
        Some(BackendSummary {
            pool: pool.to_string(),
            address: address.to_string(),
            health,
            ewma_ms: clamp(ewma_ms, MAX_EWMA_MS),
            error_rate: clamp(error_rate, 1.0),
            in_flight,
        })
    }
}

/// Every backend summary a member publishes, sorted by pool then address; malformed
/// entries are skipped.
pub fn backends_of(member: &Member) -> Vec<BackendSummary> {
    member
        .values
        .range(BACKEND_KEY_PREFIX.to_string()..)
        .take_while(|(key, _)| key.starts_with(BACKEND_KEY_PREFIX))
        .filter_map(|(key, value)| BackendSummary::decode(key, value))
        .collect()
}

/// A node's load, gossiped under [`KEY_LOAD`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Requests in flight through the node.
    pub in_flight: u64,
    /// Requests per second over the last window (encoded to 0.1).
    pub requests_per_sec: f64,
    /// Fraction of the node's CPU in use, 0 to 1 (encoded to 0.001), if known.
    pub cpu_hint: Option<f64>,
}

/// Largest request rate encoded, per second; larger values are clamped.
const MAX_RATE: f64 = 1e12;

impl NodeLoad {
    /// The gossip value: `{in_flight}|{requests_per_sec}|{cpu_hint or -}`, e.g.
    /// `12|340.5|0.420` or `12|340.5|-`; rounded like [`BackendSummary::encode`].
    pub fn encode(&self) -> String {
        let cpu = match self.cpu_hint {
            Some(cpu) => format!("{:.3}", clamp(cpu, 1.0)),
            None => "-".to_string(),
        };
        format!(
            "{}|{:.1}|{cpu}",
            self.in_flight,
            clamp(self.requests_per_sec, MAX_RATE)
        )
    }

    /// Parses a value written by [`NodeLoad::encode`]; `None` if malformed. Fields after
    /// the third are ignored.
    pub fn decode(value: &str) -> Option<NodeLoad> {
        let mut fields = value.split('|');
        let in_flight = fields.next()?.parse().ok()?;
        let requests_per_sec = clamp(parse_finite(fields.next()?)?, MAX_RATE);
        let cpu_hint = match fields.next()? {
            "-" => None,
            cpu => Some(clamp(parse_finite(cpu)?, 1.0)),
        };
        Some(NodeLoad {
            in_flight,
            requests_per_sec,
            cpu_hint,
        })
    }

    /// The load a member publishes, if any and well-formed.
    pub fn of(member: &Member) -> Option<NodeLoad> {
        NodeLoad::decode(member.values.get(KEY_LOAD)?)
    }
}

/// The shared configuration gossiped under [`KEY_CONFIG_DOC`] when coordination is `none`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDoc {
    /// The configuration version; the highest one in the cluster wins.
    pub version: u64,
    /// The configuration as JSON.
    pub json: String,
}

impl ConfigDoc {
    /// The gossip value: the version in decimal, a newline, then the JSON.
    pub fn encode(&self) -> String {
        format!("{}\n{}", self.version, self.json)
    }

    /// Parses a value written by [`ConfigDoc::encode`]; `None` if the first line is not a
    /// version.
    pub fn decode(value: &str) -> Option<ConfigDoc> {
        let (version, json) = value.split_once('\n')?;
        Some(ConfigDoc {
            version: version.parse().ok()?,
            json: json.to_string(),
        })
    }

    /// The config document a member publishes, if any and well-formed: whole under
    /// [`KEY_CONFIG_DOC`], or reassembled from its [`KEY_CONFIG_DOC_PART`] keys when every
    /// part of one version has arrived (gossip carries a node's keys one by one, so a peer
    /// may hold some parts of a newer version beside others of an older one: then `None`).
    pub fn of(member: &Member) -> Option<ConfigDoc> {
        ConfigDoc::from_values(&member.values)
    }

    /// [`ConfigDoc::of`] on a node's published key-values.
    pub fn from_values(values: &BTreeMap<String, String>) -> Option<ConfigDoc> {
        if let Some(whole) = values.get(KEY_CONFIG_DOC) {
            return ConfigDoc::decode(whole);
        }
        let (version, first) = Self::part(values, 0)?;
        let (_, count, text) = first;
        let mut json = String::with_capacity(count * Self::PART_BYTES);
        json.push_str(text);
        for index in 1..count {
            let (v, (i, c, text)) = Self::part(values, index)?;
            if v != version || i != index || c != count {
                return None;
            }
            json.push_str(text);
        }
        Some(ConfigDoc { version, json })
    }

    /// The version a node's key-values publish, without assembling or parsing the
    /// document (the gossip loop looks at every peer's every 100 ms).
    pub fn version_in(values: &BTreeMap<String, String>) -> Option<u64> {
        let value = values
            .get(KEY_CONFIG_DOC)
            .or_else(|| values.get(&format!("{KEY_CONFIG_DOC_PART}0")))?;
        value.split_once('\n')?.0.parse().ok()
    }

    /// Largest JSON slice per part: what is left of [`MAX_ENTRY_BYTES`] after the longest
    /// key and header ([`u64`] version, `index/count`, two newlines), less a margin.
    const PART_BYTES: usize = MAX_ENTRY_BYTES - 128;

    /// Largest document gossip carries: [`MAX_CONFIG_DOC_PARTS`] parts.
    pub const MAX_JSON_BYTES: usize = MAX_CONFIG_DOC_PARTS * Self::PART_BYTES;

    /// The gossip entries (key, value) that publish this document: one under
    /// [`KEY_CONFIG_DOC`] when it fits in [`MAX_ENTRY_BYTES`], else parts under
    /// [`KEY_CONFIG_DOC_PART`]`0`… of at most `PART_BYTES` of JSON each, cut on character
    /// boundaries. A publisher switching between the two forms deletes the other form's
    /// keys (and parts past the new count).
    ///
    /// Errors: [`MembershipError::DocumentTooLarge`] over [`ConfigDoc::MAX_JSON_BYTES`].
    pub fn entries(&self) -> Result<Vec<(String, String)>, MembershipError> {
        let whole = self.encode();
        if check_entry(KEY_CONFIG_DOC, &whole).is_ok() {
            return Ok(vec![(KEY_CONFIG_DOC.to_owned(), whole)]);
        }
        if self.json.len() > Self::MAX_JSON_BYTES {
            return Err(MembershipError::DocumentTooLarge {
                len: self.json.len(),
                max: Self::MAX_JSON_BYTES,
            });
        }
        let mut slices = Vec::new();
        let mut rest = self.json.as_str();
        while !rest.is_empty() {
            let mut end = Self::PART_BYTES.min(rest.len());
            // A UTF-8 character is at most 4 bytes, so this steps back at most 3.
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            let (slice, tail) = rest.split_at(end);
            slices.push(slice);
            rest = tail;
        }
        let count = slices.len();
        Ok(slices
            .into_iter()
            .enumerate()
            .map(|(index, slice)| {
                (
                    format!("{KEY_CONFIG_DOC_PART}{index}"),
                    format!("{}\n{index}/{count}\n{slice}", self.version),
                )
            })
            .collect())
    }

    /// Part `index` of `values`: `(version, (index, count, text))`.
    fn part(
        values: &BTreeMap<String, String>,
        index: usize,
    ) -> Option<(u64, (usize, usize, &str))> {
        let value = values.get(&format!("{KEY_CONFIG_DOC_PART}{index}"))?;
        let (version, rest) = value.split_once('\n')?;
        let (position, text) = rest.split_once('\n')?;
        let (i, count) = position.split_once('/')?;
        let (i, count): (usize, usize) = (i.parse().ok()?, count.parse().ok()?);
        if i >= count || count > MAX_CONFIG_DOC_PARTS {
            return None;
        }
        Some((version.parse().ok()?, (i, count, text)))
    }
}

fn parse_finite(field: &str) -> Option<f64> {
    field.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// `x` within `0..=max`; NaN is 0.
fn clamp(x: f64, max: f64) -> f64 {
    if x > 0.0 { x.min(max) } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(node: &str, generation: u64) -> ChitchatId {
        ChitchatId::new(node, generation, ([127, 0, 0, 1], 7000).into())
    }

    fn kinds(events: &[(ClusterEvent, ChitchatId)]) -> Vec<(EventKind, &str)> {
        events
            .iter()
            .map(|(e, _)| (e.kind, e.node_id.as_str()))
            .collect()
    }

    #[test]
    fn live_set_changes_become_events() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let never_left = |_: &ChitchatId| false;
        let e = t.apply_live_set(&[id("a", 1), id("b", 1)], never_left, now, 10, None);
        assert_eq!(
            kinds(&e),
            [(EventKind::NodeJoined, "a"), (EventKind::NodeJoined, "b")]
        );
        // A value change re-sends the same live set: no event.
        assert!(
            t.apply_live_set(&[id("a", 1), id("b", 1)], never_left, now, 11, None)
                .is_empty()
        );
        let e = t.apply_live_set(&[id("a", 1)], never_left, now, 12, None);
        assert_eq!(kinds(&e), [(EventKind::NodeFailed, "b")]);
        let e = t.apply_live_set(&[], |id: &ChitchatId| &*id.node_id == "a", now, 13, None);
        assert_eq!(kinds(&e), [(EventKind::NodeLeft, "a")]);
        // Back from a failure (a healed partition) is a join, as in memberlist.
        let e = t.apply_live_set(&[id("b", 1)], never_left, now, 14, None);
        assert_eq!(kinds(&e), [(EventKind::NodeJoined, "b")]);

        assert_eq!(
            t.counts,
            EventCounts {
                joined: 3,
                left: 1,
                failed: 1
            }
        );
        let seqs: Vec<u64> = t.recent.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_restart_is_a_join_and_the_old_generation_fails_silently() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let never_left = |_: &ChitchatId| false;
        t.apply_live_set(&[id("a", 1)], never_left, now, 1, None);
        let e = t.apply_live_set(&[id("a", 1), id("a", 2)], never_left, now, 2, None);
        assert_eq!(kinds(&e), [(EventKind::NodeJoined, "a")]);
        assert_eq!(e[0].1.generation_id, 2);
        // The old generation times out while the new one is alive: nothing to report.
        assert!(
            t.apply_live_set(&[id("a", 2)], never_left, now, 3, None)
                .is_empty()
        );
    }

    fn at(node: &str, generation: u64, port: u16) -> ChitchatId {
        ChitchatId::new(node, generation, ([127, 0, 0, 1], port).into())
    }

    fn seen_at(first_seen: Instant, advanced_at: Option<Instant>) -> Seen {
        Seen {
            first_seen,
            heartbeat: 1,
            last_seen_ms: None,
            was_alive: true,
            advanced_at,
        }
    }

    #[test]
    fn a_live_copy_of_this_node_id_is_a_conflict() {
        let lag = Duration::from_secs(2);
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(5);
        let me = at("a", 20, 7000);
        let mut t = Tracker::default();
        // An older live node with our id on another address: it advanced 3 s after we
        // learned of it, and 100 ms ago.
        let older = at("a", 10, 7001);
        t.seen.insert(
            older.clone(),
            seen_at(
                t0 + Duration::from_secs(1),
                Some(now - Duration::from_millis(100)),
            ),
        );
        // Our previous generation on the same address, still advancing: a restart, not a
        // copy (two processes cannot share the address).
        t.seen.insert(at("a", 5, 7000), seen_at(t0, Some(now)));
        // Another previous generation that moved ports and died: its last heartbeats
        // arrived within the lag of learning of it.
        t.seen.insert(
            at("a", 6, 7002),
            seen_at(
                t0 + Duration::from_secs(4),
                Some(now - Duration::from_millis(500)),
            ),
        );
        // Another node, advancing.
        t.seen.insert(at("b", 1, 7003), seen_at(t0, Some(now)));

        t.find_conflicts(&me, now, lag, true, 99);
        let conflicts: Vec<&NodeIdConflict> = t.conflicts.values().collect();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].gossip_addr, older.gossip_advertise_addr);
        assert!(conflicts[0].this_node_is_newer);
        assert_eq!(conflicts[0].since_ms, 99);
        assert_eq!(t.startup_conflict.as_ref(), Some(conflicts[0]));

        // It stops advancing: the conflict clears; the startup conflict stays latched.
        t.seen.get_mut(&older).expect("inserted").advanced_at = Some(now);
        t.find_conflicts(&me, now + lag * 2, lag, true, 100);
        assert!(t.conflicts.is_empty());
        assert!(t.startup_conflict.is_some());
    }

    #[test]
    fn the_older_node_of_a_conflict_and_late_conflicts_do_not_stop_this_one() {
        let lag = Duration::from_secs(2);
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(5);
        let mut t = Tracker::default();
        t.seen.insert(at("a", 30, 7001), seen_at(t0, Some(now)));
        // This node is older: listed, not a startup conflict.
        t.find_conflicts(&at("a", 20, 7000), now, lag, true, 1);
        assert_eq!(t.conflicts.len(), 1);
        assert!(!t.conflicts.values().all(|c| c.this_node_is_newer));
        assert!(t.startup_conflict.is_none());
        // Newer, but past the startup window: listed only.
        let mut t = Tracker::default();
        t.seen.insert(at("a", 10, 7001), seen_at(t0, Some(now)));
        t.find_conflicts(&at("a", 20, 7000), now, lag, false, 1);
        assert_eq!(t.conflicts.len(), 1);
        assert!(t.startup_conflict.is_none());
    }

    #[test]
    fn members_list_self_then_the_alive_then_the_newest_identity() {
        let member = |generation, state, is_self| Member {
            node_id: "a".into(),
            gossip_addr: ([127, 0, 0, 1], 7000).into(),
            generation,
            state,
            is_self,
            values: BTreeMap::new(),
            last_seen_ms: None,
        };
        let rank = |m: &Member| listing_rank(m, false);
        // A restart: the new generation wins.
        assert!(
            rank(&member(2, MemberState::Alive, false))
                > rank(&member(1, MemberState::Failed, false))
        );
        // A copy that left after its refusal does not hide the live original.
        assert!(
            rank(&member(1, MemberState::Alive, false))
                > rank(&member(2, MemberState::Left, false))
        );
        // This node is listed as itself whatever a copy's generation.
        assert!(
            rank(&member(1, MemberState::Alive, true))
                > rank(&member(2, MemberState::Alive, false))
        );
    }

    #[test]
    fn failures_right_after_a_stall_of_this_node_are_held_until_the_peers_had_time() {
        let interval = Duration::from_millis(100);
        let never_left = |_: &ChitchatId| false;
        let t0 = Instant::now();
        let mut t = Tracker::default();
        assert_eq!(t.hold_deadline(t0, interval), None);
        t.apply_live_set(&[id("a", 1), id("b", 1)], never_left, t0, 1, None);
        // Ticks on time: nothing held.
        assert_eq!(t.hold_deadline(t0 + interval, interval), None);

        // This node did not run for 3 s; on waking its detector drops both peers.
        let woke = t0 + Duration::from_secs(3);
        let hold = t.hold_deadline(woke, interval);
        assert_eq!(hold, Some(woke + interval * DISCOVERY_ROUNDS));
        assert!(t.apply_live_set(&[], never_left, woke, 2, hold).is_empty());
        assert!(t.is_held(&id("a", 1)) && t.is_held(&id("b", 1)));
        // `a` is heard again: no event, no longer held.
        let later = woke + interval * 3;
        let hold = t.hold_deadline(later, interval);
        assert!(
            t.apply_live_set(&[id("a", 1)], never_left, later, 3, hold)
                .is_empty()
        );
        assert!(!t.is_held(&id("a", 1)));
        // Before the deadline `b` stays held; after it, `b` is reported failed, once.
        assert!(
            t.expire_held(&[id("a", 1)], never_left, later, 4)
                .is_empty()
        );
        let deadline = woke + interval * DISCOVERY_ROUNDS;
        let e = t.expire_held(&[id("a", 1)], never_left, deadline, 5);
        assert_eq!(kinds(&e), [(EventKind::NodeFailed, "b")]);
        assert!(
            t.expire_held(&[id("a", 1)], never_left, deadline, 6)
                .is_empty()
        );
        // Outside a hold, failures are reported at once.
        let e = t.apply_live_set(&[], never_left, deadline + interval, 7, None);
        assert_eq!(kinds(&e), [(EventKind::NodeFailed, "a")]);
    }

    #[test]
    fn a_peer_that_left_during_a_hold_is_reported_at_once() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.apply_live_set(&[id("a", 1)], |_: &ChitchatId| false, t0, 1, None);
        let e = t.apply_live_set(
            &[],
            |_: &ChitchatId| true,
            t0,
            2,
            Some(t0 + Duration::from_secs(1)),
        );
        assert_eq!(kinds(&e), [(EventKind::NodeLeft, "a")]);
        assert!(t.held.is_empty());
    }

    #[test]
    fn a_copy_on_another_address_is_no_join_and_a_restart_on_a_new_port_joins_late() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let never_left = |_: &ChitchatId| false;
        let e = t.apply_live_set(&[at("a", 1, 7000)], never_left, now, 1, None);
        assert_eq!(kinds(&e), [(EventKind::NodeJoined, "a")]);
        // A copy with the same id appears, then stops: no event, the original stays listed.
        let both = [at("a", 1, 7000), at("a", 2, 7001)];
        assert!(t.apply_live_set(&both, never_left, now, 2, None).is_empty());
        assert_eq!(t.live["a"], at("a", 1, 7000));
        assert!(
            t.apply_live_set(&[at("a", 1, 7000)], never_left, now, 3, None)
                .is_empty()
        );
        // A restart on a new port: the new generation joins once the old one times out.
        let both = [at("a", 1, 7000), at("a", 3, 7002)];
        assert!(t.apply_live_set(&both, never_left, now, 4, None).is_empty());
        let e = t.apply_live_set(&[at("a", 3, 7002)], never_left, now, 5, None);
        assert_eq!(kinds(&e), [(EventKind::NodeJoined, "a")]);
        assert_eq!(e[0].1, at("a", 3, 7002));
        // A restart on the same address joins at once, as before.
        let both = [at("a", 3, 7002), at("a", 4, 7002)];
        let e = t.apply_live_set(&both, never_left, now, 6, None);
        assert_eq!(kinds(&e), [(EventKind::NodeJoined, "a")]);
    }

    #[test]
    fn the_event_history_is_bounded() {
        let mut t = Tracker::default();
        for i in 0..(RECENT_EVENTS as u64 + 10) {
            t.event(EventKind::NodeJoined, "a", i);
        }
        assert_eq!(t.recent.len(), RECENT_EVENTS);
        assert_eq!(t.recent.front().map(|e| e.seq), Some(11));
        assert_eq!(t.counts.joined, RECENT_EVENTS as u64 + 10);
    }

    #[test]
    fn forgetting_hides_up_to_a_generation_until_the_node_returns() {
        let mut t = Tracker::default();
        t.forgotten.insert("a".into(), 5);
        assert!(t.is_forgotten(&id("a", 5)));
        assert!(t.is_forgotten(&id("a", 4)));
        assert!(!t.is_forgotten(&id("a", 6)));
        assert!(!t.is_forgotten(&id("b", 1)));
        t.apply_live_set(
            &[id("a", 5)],
            |_: &ChitchatId| false,
            Instant::now(),
            1,
            None,
        );
        assert!(!t.is_forgotten(&id("a", 5)), "alive again: listed again");
    }

    #[test]
    fn seeds_must_be_host_and_port() {
        for good in ["127.0.0.1:7946", "[::1]:7946", "node-2.fulcrum:7946"] {
            assert!(check_seed(good).is_ok(), "{good}");
        }
        for bad in [
            "node-2",
            "127.0.0.1:0",
            ":7946",
            "node-2:",
            "node-2:http",
            "node-2:0",
            "a b:1",
        ] {
            assert!(
                matches!(check_seed(bad), Err(MembershipError::BadSeed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn settings_are_validated() {
        let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let ok = MembershipSettings::new("n1", listen);
        assert!(ok.validate().is_ok());
        let mut zero = ok.clone();
        zero.interval = Duration::ZERO;
        assert!(zero.validate().is_err());
        let mut phi = ok.clone();
        phi.phi_threshold = f64::NAN;
        assert!(phi.validate().is_err());
        let mut empty = ok;
        empty.node_id = " ".into();
        assert!(empty.validate().is_err());
    }

    #[test]
    fn generations_increase() {
        let a = next_generation();
        let b = next_generation();
        assert!(b > a);
        assert!(a >= unix_ms() - 60_000);
    }

    #[test]
    fn oversized_entries_are_refused() {
        assert!(check_entry("k", &"v".repeat(MAX_ENTRY_BYTES - 1)).is_ok());
        let err = check_entry("k", &"v".repeat(MAX_ENTRY_BYTES)).expect_err("one byte over");
        assert!(err.to_string().contains("`k`"));
    }

    #[test]
    fn summaries_encode_compactly() {
        let s = BackendSummary {
            pool: "api".into(),
            address: "10.0.0.7:8080".into(),
            health: BackendHealth::Healthy,
            ewma_ms: 12.34,
            error_rate: 0.0102,
            in_flight: 5,
        };
        assert_eq!(s.key(), "backend:api/10.0.0.7:8080");
        assert_eq!(s.encode(), "h|12.3|0.010|5");
        let back = BackendSummary::decode(&s.key(), "h|12.3|0.010|5|future-field")
            .expect("extra fields are ignored");
        assert_eq!(back.ewma_ms, 12.3);
        assert_eq!(BackendSummary::decode("backend:api", "h|1|0|0"), None);
        assert_eq!(BackendSummary::decode("load", "h|1|0|0"), None);
        assert_eq!(BackendSummary::decode(&s.key(), "q|1|0|0"), None);
        assert_eq!(BackendSummary::decode(&s.key(), "h|NaN|0|0"), None);
        assert_eq!(BackendSummary::decode(&s.key(), "h|1|0"), None);
    }

    #[test]
    fn config_docs_round_trip() {
        let doc = ConfigDoc {
            version: 42,
            json: "{\"a\":\n1}".into(),
        };
        assert_eq!(ConfigDoc::decode(&doc.encode()), Some(doc));
        assert_eq!(ConfigDoc::decode("x\n{}"), None);
        assert_eq!(ConfigDoc::decode("7"), None);
    }

    fn values_of(entries: &[(String, String)]) -> BTreeMap<String, String> {
        entries.iter().cloned().collect()
    }

    #[test]
    fn a_small_config_doc_is_one_entry_and_a_large_one_is_split_into_parts_that_reassemble() {
        let small = ConfigDoc {
            version: 3,
            json: "{}".into(),
        };
        let entries = small.entries().expect("fits");
        assert_eq!(
            entries,
            vec![(KEY_CONFIG_DOC.to_owned(), "3\n{}".to_owned())]
        );
        assert_eq!(ConfigDoc::from_values(&values_of(&entries)), Some(small));
        // Two-byte characters across every part boundary, 2.5 entries long.
        let json = format!("{{\"x\":\"{}\"}}", "é".repeat(MAX_ENTRY_BYTES * 5 / 4));
        let large = ConfigDoc { version: 9, json };
        let entries = large.entries().expect("within the parts limit");
        assert_eq!(entries.len(), 3);
        for (index, (key, value)) in entries.iter().enumerate() {
            assert_eq!(key, &format!("config_doc_part:{index}"));
            assert!(key.len() + value.len() <= MAX_ENTRY_BYTES, "part {index}");
            assert!(value.starts_with(&format!("9\n{index}/3\n")));
        }
        let values = values_of(&entries);
        assert_eq!(ConfigDoc::version_in(&values), Some(9));
        assert_eq!(ConfigDoc::from_values(&values), Some(large.clone()));
        // A part missing, or one of another version: not assembled.
        let mut missing = values.clone();
        missing.remove("config_doc_part:1");
        assert_eq!(ConfigDoc::from_values(&missing), None);
        let newer = ConfigDoc {
            version: 10,
            json: large.json.replace('é', "e"),
        };
        let mut mixed = values.clone();
        let (key, value) = newer.entries().expect("within the parts limit")[0].clone();
        assert_eq!(key, "config_doc_part:0");
        mixed.insert(key, value);
        assert_eq!(ConfigDoc::from_values(&mixed), None);
        // The whole-document key wins over parts left from before.
        let mut both = values;
        both.insert(KEY_CONFIG_DOC.to_owned(), "11\n{}".to_owned());
        assert_eq!(ConfigDoc::from_values(&both).map(|d| d.version), Some(11));
        assert_eq!(ConfigDoc::version_in(&both), Some(11));
    }

    #[test]
    fn a_config_doc_over_the_parts_limit_is_refused() {
        let doc = ConfigDoc {
            version: 1,
            json: "x".repeat(ConfigDoc::MAX_JSON_BYTES + 1),
        };
        match doc.entries() {
            Err(MembershipError::DocumentTooLarge { len, max }) => {
                assert_eq!(
                    (len, max),
                    (ConfigDoc::MAX_JSON_BYTES + 1, ConfigDoc::MAX_JSON_BYTES)
                );
            }
            other => panic!("expected DocumentTooLarge, got {other:?}"),
        }
        let at_limit = ConfigDoc {
            version: u64::MAX,
            json: "x".repeat(ConfigDoc::MAX_JSON_BYTES),
        };
        let entries = at_limit.entries().expect("at the limit");
        assert_eq!(entries.len(), MAX_CONFIG_DOC_PARTS);
        assert!(
            entries
                .iter()
                .all(|(k, v)| k.len() + v.len() <= MAX_ENTRY_BYTES)
        );
        assert_eq!(ConfigDoc::from_values(&values_of(&entries)), Some(at_limit));
    }
}
