//! Leader election over the coordination store: campaign, renew, step down in time.
//!
//! One task per node ([`Elector::spawn`]) holds or seeks the store's leader lease
//! ([`Store::try_acquire`]) and publishes a [`LeaderState`] on a `watch` channel; the
//! node runs cluster-wide chores (garbage collection, cluster status) only while
//! `is_leader`, passing the lease's fencing token so the store refuses the chores of a
//! leader that has been replaced (Kleppmann's fencing tokens).
//!
//! Timing, for a lease TTL `ttl`:
//! - while not leader, it campaigns every `ttl/3` (±10 % jitter, so nodes do not fall in
//!   lockstep), and reads the current leader to publish it;
//! - while leader, it renews every `ttl/3`, retrying sooner after an error;
//! - if no renewal has succeeded within `2·ttl/3` of the last one (the store is down or
//!   slow), it **steps down** — publishes `is_leader: false` — while the lease still has
//!   at least `ttl/3` to run in the store. The clock starts when a request is *sent*, so
//!   the store's expiry is always later than the local deadline: a successor can only
//!   acquire after the lease expired, by which time this node has stopped leading. This
//!   assumes clocks that run at similar rates (not synchronised clocks), as any lease does;
//! - a node that stepped down releases its lease (compare-and-delete, etcd lease
//!   revocation) so that a successor need not wait for the TTL. When the store does not
//!   answer (the usual reason for stepping down) the release is retried at the start of
//!   every campaign round until it is answered, before the node campaigns or reads the
//!   leader: etcd keeps a lease across its own restart and restarts its TTL, so an
//!   unreleased lease would otherwise block every candidate for a full TTL after the
//!   store came back, while naming a leader that no longer leads. The node publishes the
//!   token of the lease it gave up in [`LeaderState::stepped_down`], so that those who
//!   read it back from the store as the leader can tell.
//!
//! Transitions are logged at `info`.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{LeaderRecord, Lease, Store, now_ms};

/// What a node knows about the leadership, published by [`Elector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderState {
    /// This node holds a lease it renewed less than `2·ttl/3` ago.
    pub is_leader: bool,
    /// The leader's node id, as last read from the store (kept while the store is
    /// unreadable, except that a node that steps down clears itself).
    pub leader: Option<String>,
    /// The leader's fencing token, alongside `leader`.
    pub token: Option<u64>,
    /// The last store operation of the election loop got an answer (after stepping
    /// down: the store handle's own view, [`Store::health`], since a step-down after a
    /// pause of this process says nothing about the store).
    pub store_available: bool,
    /// While not leading: the fencing token of the last lease this node held and gave up
    /// (it stepped down, or found the lease lost). Until the release of a lease given up
    /// while the store was unreachable reaches the store (or the lease expires), the store
    /// still names this node leader with that token although it does not lead; peers
    /// compare the two.
    pub stepped_down: Option<u64>,
    /// Unix time in milliseconds of the last change of any field above.
    pub changed_ms: u64,
}

/// The election loop; see the module documentation.
pub struct Elector;

impl Elector {
    /// Spawns the election loop for `node_id` with lease TTL `ttl` on the current Tokio
    /// runtime and returns its state. The loop stops when `cancel` fires, releasing the
    /// lease if it holds one (so a successor need not wait for the TTL) and publishing
    /// `is_leader: false`.
    ///
    /// `ttl` should be well above the store's round trip and at least 1 s; etcd rounds it
    /// up to whole seconds and to its minimum lease TTL.
    ///
    /// # Example
    /// ```no_run
    /// # async fn example() -> Result<(), fulcrum_cluster::store::StoreError> {
    /// use std::time::Duration;
    ///
    /// use fulcrum_cluster::election::Elector;
    /// use fulcrum_cluster::store::{Store, StoreSettings};
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let etcd = StoreSettings::etcd(vec!["http://127.0.0.1:2379".to_owned()]);
    /// let store = Store::connect(&etcd).await?;
    /// let cancel = CancellationToken::new();
    /// let mut state = Elector::spawn(store, "node-1".to_owned(), Duration::from_secs(3), cancel);
    /// while state.changed().await.is_ok() {
    ///     let now = state.borrow().clone();
    ///     if now.is_leader {
    ///         println!("leading with fencing token {:?}", now.token);
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn spawn(
        store: Store,
        node_id: String,
        ttl: Duration,
        cancel: CancellationToken,
    ) -> watch::Receiver<LeaderState> {
        Self::spawn_with_handle(store, node_id, ttl, cancel).0
    }

    /// Like [`Elector::spawn`], also returning the task's handle: await it after
    /// cancelling to know the lease was released (shutdown), or abort it to stop without
    /// releasing (what a crash does; the lease then expires after its TTL).
    pub fn spawn_with_handle(
        store: Store,
        node_id: String,
        ttl: Duration,
        cancel: CancellationToken,
    ) -> (watch::Receiver<LeaderState>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(LeaderState {
            is_leader: false,
            leader: None,
            token: None,
            store_available: store.health().available,
            stepped_down: None,
            changed_ms: now_ms(),
        });
        let campaign = Campaign {
            store,
            node_id,
            ttl,
            tx,
            held: None,
            unreleased: None,
            given_up: None,
        };
        let handle = tokio::spawn(campaign.run(cancel));
        (rx, handle)
    }
}

/// A lease this node holds.
struct Held {
    lease: Lease,
    /// When the request of the last successful acquisition or renewal was sent.
    renewed_at: Instant,
}

/// State of the election loop.
struct Campaign {
    store: Store,
    node_id: String,
    ttl: Duration,
    tx: watch::Sender<LeaderState>,
    held: Option<Held>,
    /// A lease given up by stepping down whose release the store has not confirmed.
    unreleased: Option<Lease>,
    /// Token of the last lease given up ([`LeaderState::stepped_down`]).
    given_up: Option<u64>,
}

impl Campaign {
    fn interval(&self) -> Duration {
        self.ttl / 3
    }

    /// How long after the last renewal the leader steps down.
    fn step_down_after(&self) -> Duration {
        self.ttl * 2 / 3
    }

    async fn run(mut self, cancel: CancellationToken) {
        loop {
            let next = match self.held.take() {
                None => self.campaign().await,
                Some(held) => self.keep(held).await,
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        if let Some(held) = self.held.take() {
            let released = self.store.release(&held.lease).await;
            tracing::info!(
                node = %self.node_id,
                token = held.lease.token,
                released = released.is_ok(),
                "leadership given up: election stopped"
            );
            let available = released.is_ok();
            self.publish(false, None, None, available);
        }
        if let Some(lease) = self.unreleased.take()
            && let Err(error) = self.store.release(&lease).await
        {
            tracing::debug!(node = %self.node_id, %error, "lease given up earlier not released; it will expire");
        }
    }

    /// One campaign round; returns when to run the next one. A lease given up earlier
    /// is released first; while that fails the round does nothing else, so this node
    /// never reads its own unreleased lease back as the leader.
    async fn campaign(&mut self) -> Instant {
        let started = Instant::now();
        let next = started + jittered(self.interval());
        if let Some(lease) = &self.unreleased {
            match self.store.release(lease).await {
                Ok(()) => {
                    tracing::info!(
                        node = %self.node_id,
                        token = lease.token,
                        "released the lease given up when stepping down"
                    );
                    self.unreleased = None;
                }
                Err(error) => {
                    tracing::debug!(node = %self.node_id, %error, "lease given up still not released");
                    self.publish_unavailable();
                    return next;
                }
            }
        }
        match self.store.try_acquire(&self.node_id, self.ttl).await {
            Ok(Some(lease)) => {
                tracing::info!(node = %self.node_id, token = lease.token, "became leader");
                self.publish(true, Some(self.node_id.clone()), Some(lease.token), true);
                self.held = Some(Held {
                    lease,
                    renewed_at: started,
                });
                started + self.interval()
            }
            Ok(None) => {
                match self.store.leader().await {
                    Ok(Some(LeaderRecord { node_id, token })) => {
                        self.publish(false, Some(node_id), Some(token), true);
                    }
                    Ok(None) => self.publish(false, None, None, true),
                    Err(error) => {
                        tracing::debug!(node = %self.node_id, %error, "leader not read");
                        self.publish_unavailable();
                    }
                }
                next
            }
            Err(error) => {
                tracing::debug!(node = %self.node_id, %error, "campaign failed");
                self.publish_unavailable();
                next
            }
        }
    }

    /// One renewal round while leader; returns when to run the next one.
    async fn keep(&mut self, mut held: Held) -> Instant {
        let deadline = held.renewed_at + self.step_down_after();
        let started = Instant::now();
        if started >= deadline {
            // Typically this process was paused (SIGSTOP, a frozen VM) past the deadline:
            // campaign at once, which releases the lease and reads the current leader.
            self.step_down(held, "no renewal confirmed within 2/3 of the lease TTL");
            return Instant::now();
        }
        match tokio::time::timeout_at(deadline, self.store.renew(&held.lease, self.ttl)).await {
            Ok(Ok(true)) => {
                held.renewed_at = started;
                let token = held.lease.token;
                self.held = Some(held);
                self.publish(true, Some(self.node_id.clone()), Some(token), true);
                started + self.interval()
            }
            Ok(Ok(false)) => {
                tracing::info!(
                    node = %self.node_id,
                    token = held.lease.token,
                    "stepped down: lease lost"
                );
                self.given_up = Some(held.lease.token);
                self.publish(false, None, None, true);
                // Campaign again at once: the store may already name a successor.
                Instant::now()
            }
            Ok(Err(error)) => {
                tracing::debug!(node = %self.node_id, %error, "renewal failed");
                self.held = Some(held);
                self.publish_unavailable();
                (started + self.interval() / 2).min(deadline)
            }
            Err(_) => {
                self.step_down(held, "no renewal confirmed within 2/3 of the lease TTL");
                Instant::now() + self.interval()
            }
        }
    }

    /// Stops leading before the lease can expire. The lease is released by the next
    /// campaign round, retried until the store answers (compare-and-delete or lease
    /// revocation, so harmless if a successor already holds the lead). Whether the store
    /// is reachable is the store handle's view: a step-down after this process was paused
    /// does not mean the store is down.
    fn step_down(&mut self, held: Held, reason: &'static str) {
        tracing::info!(node = %self.node_id, token = held.lease.token, reason, "stepped down");
        self.given_up = Some(held.lease.token);
        self.unreleased = Some(held.lease);
        let available = self.store.health().available;
        self.publish(false, None, None, available);
    }

    /// Marks the store unreadable, keeping the last known leader unless it is this node.
    fn publish_unavailable(&self) {
        let current = self.tx.borrow().clone();
        let is_leader = self.held.is_some();
        let (leader, token) = if is_leader || current.leader.as_deref() != Some(&self.node_id) {
            (current.leader, current.token)
        } else {
            (None, None)
        };
        self.publish(is_leader, leader, token, false);
    }

    fn publish(
        &self,
        is_leader: bool,
        leader: Option<String>,
        token: Option<u64>,
        store_available: bool,
    ) {
        let stepped_down = if is_leader { None } else { self.given_up };
        self.tx.send_if_modified(|state| {
            let unchanged = state.is_leader == is_leader
                && state.leader == leader
                && state.token == token
                && state.store_available == store_available
                && state.stepped_down == stepped_down;
            if unchanged {
                return false;
            }
            if state.leader != leader && !is_leader {
                tracing::info!(
                    node = %self.node_id,
                    leader = leader.as_deref().unwrap_or("none"),
                    token,
                    "leader changed"
                );
            }
            *state = LeaderState {
                is_leader,
                leader,
                token,
                store_available,
                stepped_down,
                changed_ms: now_ms(),
            };
            true
        });
    }
}

/// `interval` scaled by a random factor in [0.9, 1.1).
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}
