//! The coordination store and leader election against real servers: every scenario runs
//! on Redis and on etcd (`redis::*`, `etcd::*`), each test with its own server on free
//! ports. Waits poll with deadlines; timing bounds follow from the lease TTL.

use std::time::{Duration, Instant};

use fulcrum_cluster::election::{Elector, LeaderState};
use fulcrum_cluster::store::{
    EndpointStatRecord, NodeRecord, OP_TIMEOUT, PutConfig, RegisteredBackend, Store, StoreError,
    StoreSettings,
};
use fulcrum_cluster::testutil::{EtcdServer, RedisServer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Deadline for anything that does not depend on a TTL (startup, reconnection).
const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` every 25 ms until it returns `Some`, or panics after `deadline`.
async fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A store server of either kind.
enum Server {
    Redis(RedisServer),
    Etcd(EtcdServer),
}

impl Server {
    fn settings(&self) -> StoreSettings {
        match self {
            Server::Redis(server) => StoreSettings::redis(server.url()),
            Server::Etcd(server) => StoreSettings::etcd(server.endpoints()),
        }
    }

    async fn store(&self) -> Store {
        Store::connect(&self.settings())
            .await
            .expect("test settings are valid")
    }

    /// Leader lease TTL: etcd's TTLs are whole seconds.
    fn lease_ttl(&self) -> Duration {
        match self {
            Server::Redis(_) => Duration::from_millis(1500),
            Server::Etcd(_) => Duration::from_secs(2),
        }
    }

    /// Extra time a lease may outlive its TTL in the store: etcd checks expiry every
    /// 500 ms; plus round trips on a loaded machine.
    fn expiry_slack(&self) -> Duration {
        match self {
            Server::Redis(_) => Duration::from_millis(1000),
            Server::Etcd(_) => Duration::from_millis(1500),
        }
    }

    fn kill(&mut self) {
        match self {
            Server::Redis(server) => server.kill(),
            Server::Etcd(server) => server.kill(),
        }
    }

    fn restart(&mut self) {
        match self {
            Server::Redis(server) => server.restart(),
            Server::Etcd(server) => server.restart(),
        }
    }
}

struct Candidate {
    name: String,
    state: watch::Receiver<LeaderState>,
    task: JoinHandle<()>,
}

/// The live candidates that believe they lead; panics if more than one does.
fn single_leader(candidates: &[&Candidate]) -> Option<(String, u64)> {
    let leaders: Vec<(String, u64)> = candidates
        .iter()
        .filter_map(|c| {
            let state = c.state.borrow();
            state
                .is_leader
                .then(|| (c.name.clone(), state.token.expect("a leader has a token")))
        })
        .collect();
    assert!(leaders.len() <= 1, "two nodes lead at once: {leaders:?}");
    leaders.into_iter().next()
}

async fn one_leader_and_failover_after_a_crash(server: Server) {
    let ttl = server.lease_ttl();
    let cancel = CancellationToken::new();
    let mut candidates = Vec::new();
    for i in 0..3 {
        let name = format!("node-{i}");
        let (state, task) = Elector::spawn_with_handle(
            server.store().await,
            name.clone(),
            ttl,
            cancel.child_token(),
        );
        candidates.push(Candidate { name, state, task });
    }

    let all: Vec<&Candidate> = candidates.iter().collect();
    let (first, first_token) = eventually(DEADLINE, "one leader that all agree on", async || {
        let leader = single_leader(&all)?;
        all.iter()
            .all(|c| {
                let state = c.state.borrow();
                state.leader.as_deref() == Some(leader.0.as_str()) && state.token == Some(leader.1)
            })
            .then_some(leader)
    })
    .await;
    let store = server.store().await;
    let record = store.leader().await.expect("leader readable");
    assert_eq!(
        record.map(|r| (r.node_id, r.token)),
        Some((first.clone(), first_token))
    );

    // A crash: the task stops without releasing the lease, which must expire.
    let crashed = candidates
        .iter()
        .position(|c| c.name == first)
        .expect("the leader is a candidate");
    candidates[crashed].task.abort();
    let crashed_at = Instant::now();
    let survivors: Vec<&Candidate> = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != crashed)
        .map(|(_, c)| c)
        .collect();
    let bound = ttl + ttl / 3 + server.expiry_slack();
    let (second, second_token) = eventually(bound, "a new leader after the crash", async || {
        single_leader(&survivors)
    })
    .await;
    eprintln!("failover after {:?}", crashed_at.elapsed());
    assert_ne!(second, first);
    assert!(
        second_token > first_token,
        "fencing token {second_token} not above {first_token}"
    );

    // A clean stop releases the lease at once.
    cancel.cancel();
    for candidate in candidates {
        let _ = candidate.task.await;
    }
    assert_eq!(store.leader().await.expect("leader readable"), None);
}

async fn config_compare_and_set_and_watch(server: Server) {
    let writer = server.store().await;
    let other = server.store().await;
    let mut watched = writer.watch_config();

    assert_eq!(writer.config().await.expect("config readable"), None);
    assert_eq!(
        writer
            .put_config(0, 1, r#"{"v":1}"#)
            .await
            .expect("first write"),
        PutConfig::Written(1)
    );
    assert_eq!(
        writer
            .put_config(0, 1, r#"{"v":"stale"}"#)
            .await
            .expect("stale write answered"),
        PutConfig::Conflict { current: 1 }
    );
    assert_eq!(
        other
            .put_config(1, 2, r#"{"v":2}"#)
            .await
            .expect("second write"),
        PutConfig::Written(2)
    );
    assert_eq!(
        writer.config().await.expect("config readable"),
        Some((2, r#"{"v":2}"#.to_owned()))
    );
    // The change made through the other handle reaches the watcher.
    let seen = eventually(DEADLINE, "watch_config sees version 2", async || {
        let current = watched.borrow_and_update().clone();
        current.filter(|(version, _)| *version == 2)
    })
    .await;
    assert_eq!(&*seen.1, r#"{"v":2}"#);
    // So does the next one, while the watcher is running.
    assert_eq!(
        other
            .put_config(2, 3, r#"{"v":3}"#)
            .await
            .expect("third write"),
        PutConfig::Written(3)
    );
    tokio::time::timeout(
        DEADLINE,
        watched.wait_for(|c| c.as_ref().is_some_and(|(v, _)| *v == 3)),
    )
    .await
    .expect("version 3 watched in time")
    .expect("watch task alive");
    // A write may jump ahead (a node writing back the newer document it runs after the
    // store lost it), never stay or go back.
    assert_eq!(
        other
            .put_config(3, 7, r#"{"v":7}"#)
            .await
            .expect("jumping write"),
        PutConfig::Written(7)
    );
    assert_eq!(
        writer.config().await.expect("config readable"),
        Some((7, r#"{"v":7}"#.to_owned()))
    );
    let error = writer
        .put_config(7, 7, r#"{"v":"same"}"#)
        .await
        .expect_err("a version not after the expected one is refused");
    assert!(matches!(error, StoreError::Invalid(_)), "{error}");
}

async fn registry_entries_expire_after_their_ttl(server: Server) {
    let store = server.store().await;
    let ttl = match server {
        Server::Redis(_) => Duration::from_millis(300),
        Server::Etcd(_) => Duration::from_secs(1),
    };
    let short = RegisteredBackend {
        address: "10.0.0.1:80".to_owned(),
        weight: 2,
        tags: [("zone".to_owned(), "a".to_owned())].into(),
        max_requests: 16,
    };
    let long = RegisteredBackend {
        address: "10.0.0.2:80".to_owned(),
        weight: 1,
        tags: Default::default(),
        max_requests: 0,
    };
    store
        .register_backend("app", &short, ttl)
        .await
        .expect("register");
    store
        .register_backend("app", &long, Duration::from_secs(60))
        .await
        .expect("register");
    store
        .register_backend("other", &short, Duration::from_secs(60))
        .await
        .expect("register");
    assert_eq!(
        store.registered_backends("app").await.expect("list"),
        vec![short.clone(), long.clone()]
    );

    let registered_at = Instant::now();
    eventually(
        ttl * 4 + DEADLINE / 4,
        "the short-TTL entry expired",
        async || {
            let listed = store.registered_backends("app").await.expect("list");
            (listed == vec![long.clone()]).then_some(())
        },
    )
    .await;
    assert!(
        registered_at.elapsed() >= ttl.saturating_sub(Duration::from_millis(50)),
        "expired before its TTL"
    );

    assert!(
        store
            .deregister_backend("app", &long.address)
            .await
            .expect("deregister")
    );
    assert!(
        !store
            .deregister_backend("app", &long.address)
            .await
            .expect("deregister")
    );
    assert!(
        store
            .registered_backends("app")
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        store.registered_backends("other").await.expect("list"),
        vec![short]
    );
    assert!(matches!(
        store.registered_backends("a:b").await,
        Err(StoreError::Invalid(_))
    ));
}

async fn fenced_chores_refuse_smaller_tokens(server: Server) {
    let store = server.store().await;
    let set = |token: u64, field: &str, value: &str| {
        let store = store.clone();
        let fields = vec![(field.to_owned(), value.to_owned())];
        async move {
            store
                .set_cluster_status(token, &fields)
                .await
                .expect("answered")
        }
    };
    assert!(set(5, "leader", "node-a").await);
    assert!(
        !set(4, "leader", "node-stale").await,
        "a smaller token is refused"
    );
    assert!(set(5, "epoch", "5").await, "the same token is accepted");
    assert!(set(6, "leader", "node-b").await);
    assert!(!set(5, "leader", "node-a").await);
    let status = store.cluster_status().await.expect("readable");
    assert_eq!(status.get("leader").map(String::as_str), Some("node-b"));
    assert_eq!(status.get("epoch").map(String::as_str), Some("5"));

    // The election's own tokens fence the same way.
    let lease = store
        .try_acquire("node-c", server.lease_ttl())
        .await
        .expect("answered")
        .expect("no one else campaigns");
    assert!(
        store
            .renew(&lease, server.lease_ttl())
            .await
            .expect("answered")
    );
    let report = store
        .gc_stale(0, Duration::from_secs(3600))
        .await
        .expect("answered");
    assert!(!report.applied, "gc with token 0 is refused after token 6");
    store.release(&lease).await.expect("released");
    assert!(
        !store
            .renew(&lease, server.lease_ttl())
            .await
            .expect("answered")
    );
}

fn stat(endpoint: &str, count: u64, avg_ms: f64, long: bool) -> EndpointStatRecord {
    EndpointStatRecord {
        endpoint: endpoint.to_owned(),
        count,
        errors: 1,
        avg_ms,
        long,
    }
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        node_id: id.to_owned(),
        admin: "127.0.0.1:9901".to_owned(),
        listeners: vec!["127.0.0.1:8080".to_owned()],
        ..NodeRecord::default()
    }
}

async fn stats_merge_and_gc_of_stale_nodes(server: Server) {
    let store = server.store().await;
    let ttl = Duration::from_secs(60);
    store
        .save_stats(
            "node-b",
            &[
                stat("GET /b", 10, 100.0, false),
                stat("GET /shared", 10, 9000.0, true),
            ],
        )
        .await
        .expect("saved");
    store
        .set_node_status("node-b", r#"{"busy":true}"#)
        .await
        .expect("saved");
    store.heartbeat(&node("node-b"), ttl).await.expect("saved");
    store
        .save_stats(
            "node-a",
            &[
                stat("GET /a", 5, 10.0, false),
                stat("GET /shared", 30, 1000.0, false),
            ],
        )
        .await
        .expect("saved");

    let merged = store.load_stats().await.expect("readable");
    let shared = merged
        .iter()
        .find(|s| s.endpoint == "GET /shared")
        .expect("merged endpoint");
    assert_eq!((shared.count, shared.errors), (40, 2));
    assert!(
        (shared.avg_ms - 3000.0).abs() < 1e-6,
        "count-weighted mean: {}",
        shared.avg_ms
    );
    assert!(!shared.long, "a quarter of the requests long is not long");
    assert_eq!(merged.len(), 3);
    assert!(store.long_requests().await.expect("readable").is_empty());
    store
        .save_stats("node-a", &[stat("GET /shared", 10, 1000.0, true)])
        .await
        .expect("saved");
    assert_eq!(
        store.long_requests().await.expect("readable"),
        vec!["GET /shared".to_owned()]
    );

    assert!(store.set_cluster_status(10, &[]).await.expect("answered"));
    let refused = store.gc_stale(9, Duration::ZERO).await.expect("answered");
    assert!(!refused.applied);
    assert_eq!(store.nodes().await.expect("readable").len(), 1);

    // node-a keeps writing; node-b went quiet and becomes stale after max_age.
    let max_age = Duration::from_millis(500);
    let report = eventually(DEADLINE, "gc removes node-b", async || {
        store.set_node_status("node-a", "{}").await.expect("saved");
        store.heartbeat(&node("node-a"), ttl).await.expect("saved");
        let report = store.gc_stale(10, max_age).await.expect("answered");
        assert!(report.applied);
        (!report.nodes_removed.is_empty()).then_some(report)
    })
    .await;
    assert_eq!(report.nodes_removed, vec!["node-b".to_owned()]);
    assert_eq!(report.stats_removed, 1, "only GET /b was node-b's alone");
    let endpoints: Vec<String> = store
        .load_stats()
        .await
        .expect("readable")
        .into_iter()
        .map(|s| s.endpoint)
        .collect();
    assert_eq!(
        endpoints,
        vec!["GET /a".to_owned(), "GET /shared".to_owned()]
    );
    let nodes: Vec<String> = store
        .nodes()
        .await
        .expect("readable")
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(nodes, vec!["node-a".to_owned()]);
    let statuses = store.node_statuses().await.expect("readable");
    assert_eq!(statuses.keys().collect::<Vec<_>>(), vec!["node-a"]);

    store.remove_node("node-a").await.expect("removed");
    assert!(store.nodes().await.expect("readable").is_empty());
    assert!(store.node_statuses().await.expect("readable").is_empty());
}

async fn outage_steps_down_and_recovers(mut server: Server) {
    let ttl = server.lease_ttl();
    let store = server.store().await;
    let mut watched = store.watch_config();
    assert_eq!(
        store.put_config(0, 1, "before").await.expect("written"),
        PutConfig::Written(1)
    );
    let cancel = CancellationToken::new();
    let (mut state, _task) =
        Elector::spawn_with_handle(store.clone(), "node-0".to_owned(), ttl, cancel.clone());
    tokio::time::timeout(DEADLINE, state.wait_for(|s| s.is_leader))
        .await
        .expect("leader in time")
        .expect("elector alive");
    assert!(store.health().available);

    server.kill();
    let killed_at = Instant::now();
    // A deadline for hangs, not a speed check: OP_TIMEOUT bounds every call.
    let error = tokio::time::timeout(OP_TIMEOUT * 5, store.config())
        .await
        .expect("a call to a dead store returns instead of hanging")
        .expect_err("the store is down");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
    tokio::time::timeout(ttl * 2, state.wait_for(|s| !s.is_leader))
        .await
        .expect("stepped down in time")
        .expect("elector alive");
    let stepped_down = killed_at.elapsed();
    assert!(
        stepped_down < ttl,
        "stepped down {stepped_down:?} after the outage began, not before the lease could expire"
    );
    let health = store.health();
    assert!(!health.available);
    assert!(health.outages >= 1);
    assert!(health.unavailable_since_ms.is_some());
    assert!(!state.borrow().store_available);

    server.restart();
    eventually(DEADLINE, "the store reconnects", async || {
        store.health().available.then_some(())
    })
    .await;
    tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| s.is_leader && s.store_available),
    )
    .await
    .expect("leader again in time")
    .expect("elector alive");
    // The configuration watch resumes too (Redis lost its data, etcd kept it).
    let current = store.config().await.expect("readable").map_or(0, |c| c.0);
    let PutConfig::Written(version) = store
        .put_config(current, current + 1, "after")
        .await
        .expect("answered")
    else {
        panic!("no concurrent writer");
    };
    tokio::time::timeout(
        DEADLINE,
        watched.wait_for(|c| {
            c.as_ref()
                .is_some_and(|(v, doc)| *v == version && &**doc == "after")
        }),
    )
    .await
    .expect("the watch saw the write made after the outage")
    .expect("watch task alive");
    cancel.cancel();
}

/// A leader that stepped down while the store was down could not release its lease then.
/// etcd keeps leases across its restart (and restarts their TTL), so the lease would
/// outlive the outage by a full TTL, naming as leader a node that does not lead. The
/// elector releases it as soon as the store answers again: it never reads its own given-up
/// lease back as the leader, and leads again with a new token.
async fn a_lease_given_up_during_an_outage_is_released_when_the_store_returns(mut server: Server) {
    let ttl = server.lease_ttl();
    let store = server.store().await;
    let cancel = CancellationToken::new();
    let (mut state, _task) =
        Elector::spawn_with_handle(store.clone(), "node-0".to_owned(), ttl, cancel.clone());
    let first = tokio::time::timeout(DEADLINE, state.wait_for(|s| s.is_leader))
        .await
        .expect("leader in time")
        .expect("elector alive")
        .token
        .expect("a leader has a token");
    server.kill();
    let stepped_down = tokio::time::timeout(DEADLINE, state.wait_for(|s| !s.is_leader))
        .await
        .expect("stepped down in time")
        .expect("elector alive")
        .clone();
    assert_eq!(stepped_down.stepped_down, Some(first), "{stepped_down:?}");
    server.restart();
    // Every state published from now on, until it leads again.
    let mut seen = Vec::new();
    let again = tokio::time::timeout(DEADLINE, async {
        loop {
            let now = state.borrow_and_update().clone();
            if now.is_leader {
                return now;
            }
            seen.push(now);
            state.changed().await.expect("elector alive");
        }
    })
    .await
    .expect("leader again in time");
    assert!(again.token > Some(first), "{again:?}");
    for s in &seen {
        assert!(
            !(s.store_available && s.leader.as_deref() == Some("node-0")),
            "read its own given-up lease back as the leader: {s:?} (all: {seen:?})"
        );
    }
    cancel.cancel();
}

async fn connects_before_the_server_is_up(mut server: Server) {
    server.kill();
    let store = Store::connect(&server.settings())
        .await
        .expect("connect does not need the server");
    let leader = tokio::time::timeout(OP_TIMEOUT * 5, store.leader())
        .await
        .expect("a call to a dead store returns instead of hanging");
    assert!(
        matches!(leader, Err(StoreError::Unavailable(_))),
        "{leader:?}"
    );
    assert!(!store.health().available);

    server.restart();
    eventually(DEADLINE, "the store connects", async || {
        store.health().available.then_some(())
    })
    .await;
    assert_eq!(store.leader().await.expect("readable"), None);
}

mod redis {
    use super::*;

    fn server() -> Server {
        Server::Redis(RedisServer::start())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_and_failover_after_a_crash() {
        super::one_leader_and_failover_after_a_crash(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn config_compare_and_set_and_watch() {
        super::config_compare_and_set_and_watch(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_entries_expire_after_their_ttl() {
        super::registry_entries_expire_after_their_ttl(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fenced_chores_refuse_smaller_tokens() {
        super::fenced_chores_refuse_smaller_tokens(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats_merge_and_gc_of_stale_nodes() {
        super::stats_merge_and_gc_of_stale_nodes(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_steps_down_and_recovers() {
        super::outage_steps_down_and_recovers(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connects_before_the_server_is_up() {
        super::connects_before_the_server_is_up(server()).await;
    }

    /// Seed 000's keys are where operators look for them (`redis-cli HGETALL ...`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seed_keys_hold_the_documented_values() {
        let server = RedisServer::start();
        let store = Store::connect(&StoreSettings::redis(server.url()))
            .await
            .expect("valid settings");
        store
            .save_stats("node-a", &[stat("GET /x", 3, 6000.0, true)])
            .await
            .expect("saved");
        store
            .set_node_status("node-a", r#"{"working":false}"#)
            .await
            .expect("saved");
        let lease = store
            .try_acquire("node-a", Duration::from_secs(5))
            .await
            .expect("answered")
            .expect("acquired");

        let client = ::redis::Client::open(server.url()).expect("valid url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis is up");
        let hget = |key: &'static str, field: &'static str| {
            let mut conn = conn.clone();
            async move {
                ::redis::cmd("HGET")
                    .arg(key)
                    .arg(field)
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .expect("HGET answered")
            }
        };
        let merged: EndpointStatRecord = serde_json::from_str(
            &hget("fulcrum:request:stats", "GET /x")
                .await
                .expect("merged record"),
        )
        .expect("JSON record");
        assert_eq!(merged, stat("GET /x", 3, 6000.0, true));
        assert_eq!(
            hget("fulcrum:node:status", "node-a").await.as_deref(),
            Some(r#"{"working":false}"#)
        );
        let long: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg("fulcrum:request:long_requests")
            .query_async(&mut conn)
            .await
            .expect("SMEMBERS answered");
        assert_eq!(long, vec!["GET /x".to_owned()]);
        let leader: String = ::redis::cmd("GET")
            .arg("fulcrum:leader")
            .query_async(&mut conn)
            .await
            .expect("GET answered");
        assert_eq!(leader, format!("node-a:{}", lease.token));
        let fencing: u64 = ::redis::cmd("GET")
            .arg("fulcrum:leader:fencing")
            .query_async(&mut conn)
            .await
            .expect("GET answered");
        assert_eq!(fencing, lease.token);
    }

    /// A lost token counter (evicted, deleted) cannot hand out tokens the chore fence
    /// would refuse.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_exceed_the_chore_fence() {
        let server = RedisServer::start();
        let store = Store::connect(&StoreSettings::redis(server.url()))
            .await
            .expect("valid settings");
        // A fence beyond the counter's clock seed (year 2096 in ms).
        let fence = 4_000_000_000_000;
        assert!(
            store
                .set_cluster_status(fence, &[])
                .await
                .expect("answered")
        );
        let lease = store
            .try_acquire("node-a", Duration::from_secs(5))
            .await
            .expect("answered")
            .expect("acquired");
        assert_eq!(lease.token, fence + 1);
        assert!(
            store
                .set_cluster_status(lease.token, &[("leader".to_owned(), "node-a".to_owned())])
                .await
                .expect("answered")
        );
    }

    /// Redis restarted without persistence loses every key, the token counter with them; the
    /// counter is seeded from the server's clock, so the next leader's token is still above
    /// every token handed out before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_stay_monotonic_across_a_restart_without_persistence() {
        let mut server = RedisServer::start();
        let store = Store::connect(&StoreSettings::redis(server.url()))
            .await
            .expect("valid settings");
        let ttl = Duration::from_secs(5);
        let mut before = 0;
        for _ in 0..3 {
            let lease = store
                .try_acquire("node-a", ttl)
                .await
                .expect("answered")
                .expect("acquired");
            assert!(lease.token > before, "{} after {before}", lease.token);
            before = lease.token;
            store.release(&lease).await.expect("released");
        }
        server.restart();
        let after = eventually(DEADLINE, "a lease after the restart", async || {
            store.try_acquire("node-b", ttl).await.ok().flatten()
        })
        .await;
        assert!(
            after.token > before,
            "token {} after the restart is not above {before}",
            after.token
        );
    }
}

mod etcd {
    use super::*;

    fn server() -> Server {
        Server::Etcd(EtcdServer::start())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_and_failover_after_a_crash() {
        super::one_leader_and_failover_after_a_crash(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn config_compare_and_set_and_watch() {
        super::config_compare_and_set_and_watch(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_entries_expire_after_their_ttl() {
        super::registry_entries_expire_after_their_ttl(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fenced_chores_refuse_smaller_tokens() {
        super::fenced_chores_refuse_smaller_tokens(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats_merge_and_gc_of_stale_nodes() {
        super::stats_merge_and_gc_of_stale_nodes(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_steps_down_and_recovers() {
        super::outage_steps_down_and_recovers(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connects_before_the_server_is_up() {
        super::connects_before_the_server_is_up(server()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_given_up_during_an_outage_is_released_when_the_store_returns() {
        super::a_lease_given_up_during_an_outage_is_released_when_the_store_returns(server()).await;
    }
}
