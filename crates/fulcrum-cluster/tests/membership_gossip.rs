//! Gossip membership over real UDP on 127.0.0.1: convergence, failure detection of a
//! killed node, graceful leave, run-time join, restart generations and the membership
//! leader. Every test uses its own cluster id, so a port freed by one test and reused by
//! another can never merge two tests' clusters. Waits poll with generous deadlines; the
//! elapsed times are printed (`--nocapture`) to size the production defaults.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fulcrum_cluster::membership::{
    ClusterEvent, EventKind, KEY_ADMIN, KEY_TAGS, Member, MemberState, Membership, MembershipError,
    MembershipSettings,
};
use tokio::sync::broadcast;
use tokio::time::{Instant, timeout};

/// Gossip interval of the test clusters.
const INTERVAL: Duration = Duration::from_millis(100);
/// Phi threshold of the test clusters: detection takes about a second, and a test process
/// stalled for half a second on a loaded machine is not declared dead.
const PHI: f64 = 16.0;
/// How long anything may take before a test fails; far above the expected seconds, so a
/// loaded machine does not fail the suite.
const DEADLINE: Duration = Duration::from_secs(30);

fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since.as_millis()).expect("milliseconds fit in u64")
}

fn local() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

fn settings(cluster: &str, node_id: &str, seeds: &[&Membership]) -> MembershipSettings {
    MembershipSettings {
        cluster_id: cluster.to_string(),
        seeds: seeds.iter().map(|m| m.gossip_addr().to_string()).collect(),
        interval: INTERVAL,
        phi_threshold: PHI,
        ..MembershipSettings::new(node_id, local())
    }
}

async fn start(cluster: &str, node_id: &str, seeds: &[&Membership]) -> Membership {
    let initial = vec![(KEY_ADMIN.to_string(), format!("admin-of-{node_id}"))];
    Membership::start(settings(cluster, node_id, seeds), initial)
        .await
        .expect("gossip starts on an ephemeral port")
}

/// Starts `ids` as one cluster, all seeded with the first node.
async fn cluster(name: &str, ids: &[&str]) -> Vec<Membership> {
    let first = start(name, ids[0], &[]).await;
    let mut nodes = vec![first];
    for id in &ids[1..] {
        let node = start(name, id, &[&nodes[0]]).await;
        nodes.push(node);
    }
    nodes
}

/// Polls `check` until it holds; panics with `what` after [`DEADLINE`]. Returns how long
/// it took.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(members: &[Member], node_id: &str) -> Option<MemberState> {
    members
        .iter()
        .find(|m| m.node_id == node_id)
        .map(|m| m.state)
}

/// Waits until every node lists every id in `ids` as alive.
async fn converged(nodes: &[Membership], ids: &[&str]) -> Duration {
    eventually("every node lists every node alive", || async {
        for node in nodes {
            let members = node.members().await;
            if ids
                .iter()
                .any(|id| state_of(&members, id) != Some(MemberState::Alive))
            {
                return false;
            }
        }
        true
    })
    .await
}

/// Receives events until one of `kind` for `node_id` arrives.
async fn next_event(
    rx: &mut broadcast::Receiver<ClusterEvent>,
    kind: EventKind,
    node_id: &str,
) -> ClusterEvent {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(e) if e.kind == kind && e.node_id == node_id => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    };
    timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {kind:?} event for {node_id} within {DEADLINE:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_with_each_others_values() {
    let nodes = cluster("converge", &["a", "b", "c"]).await;
    let took = converged(&nodes, &["a", "b", "c"]).await;
    eprintln!("3 nodes converged in {took:?} at {INTERVAL:?} gossip");

    for node in &nodes {
        let members = node.members().await;
        let ids: Vec<&str> = members.iter().map(|m| m.node_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"], "sorted by node id, self included");
        for m in &members {
            assert_eq!(m.is_self, m.node_id == node.node_id());
            assert_eq!(
                m.values.get(KEY_ADMIN).map(String::as_str),
                Some(format!("admin-of-{}", m.node_id).as_str()),
                "{} sees {}'s initial values",
                node.node_id(),
                m.node_id
            );
            assert!(m.last_seen_ms.is_some());
            if m.is_self {
                assert_eq!(m.gossip_addr, node.advertise_addr());
                assert_eq!(m.generation, node.generation());
            }
        }
    }
    let a = &nodes[0];
    assert_eq!(a.gossip_addr().port(), a.advertise_addr().port());
    assert_ne!(
        a.gossip_addr().port(),
        0,
        "port 0 resolves to the bound port"
    );

    // Values set and deleted after start propagate too.
    a.set(KEY_TAGS, r#"{"zone":"a"}"#).await;
    eventually("b and c see a's tags", || async {
        for node in &nodes[1..] {
            let members = node.members().await;
            let tags = members
                .iter()
                .find(|m| m.node_id == "a")
                .and_then(|m| m.values.get(KEY_TAGS).cloned());
            if tags.as_deref() != Some(r#"{"zone":"a"}"#) {
                return false;
            }
        }
        true
    })
    .await;
    a.delete(KEY_TAGS).await;
    eventually("b sees a's tags deleted", || async {
        let members = nodes[1].members().await;
        members
            .iter()
            .any(|m| m.node_id == "a" && !m.values.contains_key(KEY_TAGS))
    })
    .await;

    // Joins were observed (more than two only if a stalled machine made a node flap).
    let counts = a.event_counts();
    assert!(counts.joined >= 2, "{counts:?}");
    assert_eq!(counts.left, 0);
    let recent = a.recent_events();
    let joined: Vec<&str> = recent.iter().map(|e| e.node_id.as_str()).collect();
    assert!(joined.contains(&"b") && joined.contains(&"c"), "{recent:?}");
    assert!(recent.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_reported_failed() {
    let mut nodes = cluster("kill", &["a", "b", "c"]).await;
    converged(&nodes, &["a", "b", "c"]).await;
    let mut events_a = nodes[0].subscribe();
    let mut events_b = nodes[1].subscribe();

    // Dropping the only handle stops gossip at once without announcing anything: to the
    // peers this is a kill -9.
    let killed_at = Instant::now();
    drop(nodes.pop());

    let failed = next_event(&mut events_a, EventKind::NodeFailed, "c").await;
    eprintln!(
        "a reported c failed {:?} after the kill (interval {INTERVAL:?}, phi {PHI})",
        killed_at.elapsed()
    );
    assert!(failed.at_ms > 0);
    next_event(&mut events_b, EventKind::NodeFailed, "c").await;
    for node in &nodes {
        let members = node.members().await;
        assert_eq!(state_of(&members, "c"), Some(MemberState::Failed));
        assert!(node.event_counts().failed >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_leaves_is_reported_left_and_can_be_forgotten() {
    let nodes = cluster("leave", &["a", "b", "c"]).await;
    converged(&nodes, &["a", "b", "c"]).await;
    let mut events_a = nodes[0].subscribe();
    let mut events_b = nodes[1].subscribe();

    let leaving_ms = unix_ms();
    nodes[2].leave().await;
    let left = next_event(&mut events_a, EventKind::NodeLeft, "c").await;
    eprintln!(
        "a reported c left {} ms after leave() began (leave() takes 3 intervals)",
        left.at_ms.saturating_sub(leaving_ms)
    );
    assert_eq!(left.node_id, "c");
    next_event(&mut events_b, EventKind::NodeLeft, "c").await;
    for node in &nodes[..2] {
        let members = node.members().await;
        assert_eq!(state_of(&members, "c"), Some(MemberState::Left));
    }

    // The node that left knows it.
    let c = &nodes[2];
    assert_eq!(state_of(&c.members().await, "c"), Some(MemberState::Left));
    assert_eq!(c.membership_leader().await, None);
    assert!(matches!(
        c.join(nodes[0].gossip_addr()).await,
        Err(MembershipError::Stopped)
    ));
    c.leave().await; // idempotent

    // Forgetting: only nodes that are gone, never self.
    let a = &nodes[0];
    assert!(!a.forget("a").await, "self");
    assert!(!a.forget("b").await, "alive");
    assert!(!a.forget("zz").await, "unknown");
    assert!(a.forget("c").await);
    assert_eq!(state_of(&a.members().await, "c"), None);
    assert_eq!(
        state_of(&nodes[1].members().await, "c"),
        Some(MemberState::Left),
        "forget is local"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_leader_is_the_lowest_alive_id() {
    let mut nodes = cluster("leader", &["n1", "n2", "n3"]).await;
    converged(&nodes, &["n1", "n2", "n3"]).await;
    for node in &nodes {
        assert_eq!(node.membership_leader().await.as_deref(), Some("n1"));
    }

    let n1 = nodes.remove(0);
    drop(n1);
    let took = eventually("n2 and n3 agree the leader is n2", || async {
        for node in &nodes {
            if node.membership_leader().await.as_deref() != Some("n2") {
                return false;
            }
        }
        true
    })
    .await;
    eprintln!("leadership moved to n2 {took:?} after n1 was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_adds_a_seed_at_run_time() {
    let a = start("join", "a", &[]).await;
    let b = start("join", "b", &[]).await;
    b.join(a.gossip_addr()).await.expect("a answers b's gossip");
    converged(&[a.clone(), b.clone()], &["a", "b"]).await;

    assert!(matches!(
        b.join(b.gossip_addr()).await,
        Err(MembershipError::BadSeed { .. })
    ));

    // A UDP port that never answers.
    let silent = tokio::net::UdpSocket::bind(local())
        .await
        .expect("bind a silent socket");
    let silent_addr = silent.local_addr().expect("bound address");
    match a.join(silent_addr).await {
        Err(MembershipError::JoinTimeout { seed, .. }) => assert_eq!(seed, silent_addr),
        other => panic!("expected a join timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_with_a_new_generation() {
    let mut nodes = cluster("restart", &["a", "b"]).await;
    converged(&nodes, &["a", "b"]).await;
    let old_generation = nodes[1].generation();
    let mut events = nodes[0].subscribe();

    drop(nodes.pop());
    let b = start("restart", "b", &[&nodes[0]]).await;
    assert!(b.generation() > old_generation);
    next_event(&mut events, EventKind::NodeJoined, "b").await;
    eventually("a lists the new generation of b alive", || async {
        let members = nodes[0].members().await;
        members.iter().any(|m| {
            m.node_id == "b" && m.generation == b.generation() && m.state == MemberState::Alive
        })
    })
    .await;
    let listed = nodes[0].members().await;
    assert_eq!(
        listed.iter().filter(|m| m.node_id == "b").count(),
        1,
        "one entry per node id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_reports_bad_settings() {
    let a = start("errors", "a", &[]).await;

    let taken = MembershipSettings::new("b", a.gossip_addr());
    assert!(matches!(
        Membership::start(taken, vec![]).await,
        Err(MembershipError::Bind { .. })
    ));

    let mut bad_seed = MembershipSettings::new("b", local());
    bad_seed.seeds = vec!["node-2".into()];
    let err = Membership::start(bad_seed, vec![])
        .await
        .expect_err("a seed without a port");
    assert!(err.to_string().contains("node-2"), "{err}");

    let unspecified = MembershipSettings::new("b", ([0, 0, 0, 0], 0).into());
    assert!(matches!(
        Membership::start(unspecified, vec![]).await,
        Err(MembershipError::UnspecifiedAdvertise(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_can_run_on_a_spawned_task() {
    // The admin API and the control plane call these from spawned tasks, which needs Send
    // futures: no lock may be held across an await.
    let a = start("send", "a", &[]).await;
    let b = start("send", "b", &[&a]).await;
    let seed = a.gossip_addr();
    let task = tokio::spawn({
        let b = b.clone();
        async move {
            b.set(KEY_TAGS, "{}").await;
            b.try_set(KEY_TAGS, "{}").await.expect("small value");
            b.delete(KEY_TAGS).await;
            b.join(seed).await.expect("a answers");
            let members = b.members().await;
            let leader = b.membership_leader().await;
            let forgot = b.forget("nobody").await;
            b.leave().await;
            (members.len(), leader, forgot)
        }
    });
    let (members, leader, forgot) = task.await.expect("the task does not panic");
    assert!(members >= 1);
    assert!(leader.is_some());
    assert!(!forgot);
}
