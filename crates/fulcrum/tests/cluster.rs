//! End-to-end tests of clustering: real `fulcrum run` nodes gossiping on 127.0.0.1, real
//! `fulcrum backend` simulators, and real redis-server / etcd processes started by the
//! test setup on free ports.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, DEADLINE, Load, Node, assert_all_ok, backends_yaml, client, eventually};
use fulcrum_cluster::testutil::{DnsServer, EtcdServer, RedisServer};
use serde_json::{Value, json};

/// A free UDP port on 127.0.0.1 (bound, then released for the node to take).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral UDP port")
        .port()
}

/// How a test's nodes coordinate.
#[derive(Clone)]
enum Coordination {
    None,
    Redis(String),
    Etcd(Vec<String>),
}

impl Coordination {
    fn yaml(&self) -> String {
        match self {
            Coordination::None => "    backend: none\n".to_owned(),
            Coordination::Redis(url) => {
                format!("    backend: redis\n    url: {url}\n    lease_ttl: 2s\n    node_ttl: 3s\n")
            }
            Coordination::Etcd(endpoints) => format!(
                "    backend: etcd\n    endpoints: [{}]\n    lease_ttl: 2s\n    node_ttl: 3s\n",
                endpoints.join(", ")
            ),
        }
    }
}

/// The configuration of cluster node `id` gossiping on `port` with `seeds`, serving pool
/// `app` over `backends`; `pool_extra` (indented 4) is added to the pool.
fn node_yaml(
    id: &str,
    port: u16,
    seeds: &[u16],
    coordination: &Coordination,
    backends: &[&Backend],
    pool_extra: &str,
) -> String {
    let seeds: Vec<String> = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\n\
         pools:\n  app:\n    strategy: round_robin\n    retry: {{ attempts: 2 }}\n    backends:\n{}{pool_extra}\
         cluster:\n  node_id: {id}\n  gossip:\n    listen: 127.0.0.1:{port}\n    seeds: [{}]\n    interval: 100ms\n    phi_threshold: 6.0\n  publish_interval: 500ms\n  consistency_timeout: 10s\n  assignments:\n    items: [tenant-a, tenant-b, tenant-c, tenant-d, tenant-e, tenant-f]\n  coordination:\n{}",
        backends_yaml(backends),
        seeds.join(", "),
        coordination.yaml()
    )
}

struct Cluster {
    nodes: Vec<Option<Node>>,
    yamls: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes (`node-1` …), all seeded with the first node's gossip port.
    fn start(
        n: usize,
        coordination: &Coordination,
        backends: &[&Backend],
        extra: &[&str],
    ) -> Cluster {
        Self::start_edited(n, coordination, backends, extra, |yaml| yaml)
    }

    /// Like [`Cluster::start`], with each node's configuration passed through `edit`.
    fn start_edited(
        n: usize,
        coordination: &Coordination,
        backends: &[&Backend],
        extra: &[&str],
        edit: impl Fn(String) -> String,
    ) -> Cluster {
        let ports: Vec<u16> = (0..n).map(|_| free_udp_port()).collect();
        let mut nodes = Vec::new();
        let mut yamls = Vec::new();
        for i in 0..n {
            let seeds: Vec<u16> = ports.iter().copied().filter(|&p| p != ports[i]).collect();
            let yaml = node_yaml(
                &format!("node-{}", i + 1),
                ports[i],
                &seeds,
                coordination,
                backends,
                extra.get(i).copied().unwrap_or(""),
            );
            let yaml = edit(yaml);
            nodes.push(Some(Node::start(&yaml)));
            yamls.push(yaml);
        }
        Cluster { nodes, yamls }
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node is running")
    }

    fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.signal("KILL");
            drop(node);
        }
    }

    fn restart(&mut self, i: usize) {
        self.kill(i);
        self.nodes[i] = Some(Node::start(&self.yamls[i]));
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }
}

/// `(node_id, state)` of every member `node` lists.
async fn members(node: &Node) -> Vec<(String, String)> {
    let v = node.api("/api/cluster/nodes").await;
    v["nodes"]
        .as_array()
        .expect("nodes array")
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().expect("node_id").to_owned(),
                n["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

/// The gossip address `node` reports for itself.
async fn gossip_addr(node: &Node) -> String {
    node.api("/api/cluster/status").await["gossip_addr"]
        .as_str()
        .expect("gossip_addr")
        .to_owned()
}

async fn all_alive(cluster: &Cluster, n: usize) {
    for node in cluster.running() {
        eventually(DEADLINE, "every node lists every node alive", async || {
            let m = members(node).await;
            (m.iter().filter(|(_, s)| s == "alive").count() == n).then_some(())
        })
        .await;
    }
}

async fn leader(node: &Node) -> (Option<String>, Option<u64>) {
    let v = node.api("/api/cluster/leader").await;
    (v["leader"].as_str().map(str::to_owned), v["token"].as_u64())
}

async fn strategy(node: &Node) -> String {
    node.api("/api/pools/app").await["strategy"]
        .as_str()
        .expect("strategy")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_and_report_a_killed_node_failed() {
    let b = Backend::start("b1", &[]);
    let mut cluster = Cluster::start(3, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 3).await;

    // Every node lists all three, with their admin addresses and one view per backend.
    let v = cluster.node(1).api("/api/cluster/nodes").await;
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert!(
            n["admin"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{n}"
        );
        assert_eq!(n["config_version"], 0, "{n}");
    }
    let seed_view = cluster.node(0).api("/cluster/nodes").await;
    assert_eq!(seed_view["nodes"].as_array().map(Vec::len), Some(3));
    eventually(
        DEADLINE,
        "every node publishes its view of the backend",
        async || {
            let v = cluster.node(0).api("/api/cluster/nodes").await;
            v["nodes"]
                .as_array()?
                .iter()
                .all(|n| n["backends"].as_array().is_some_and(|b| b.len() == 1))
                .then_some(())
        },
    )
    .await;
    // With `none`, the leader is the lowest live node id.
    eventually(DEADLINE, "node-1 (lowest id) leads", async || {
        (leader(cluster.node(2)).await.0.as_deref() == Some("node-1")).then_some(())
    })
    .await;

    // kill -9 node-3: the others report it failed, log and count the event.
    let killed_at = Instant::now();
    cluster.kill(2);
    for i in 0..2 {
        eventually(DEADLINE, "node-3 reported failed", async || {
            members(cluster.node(i))
                .await
                .contains(&("node-3".to_owned(), "failed".to_owned()))
                .then_some(())
        })
        .await;
    }
    eprintln!("node-3 detected failed after {:?}", killed_at.elapsed());
    let status = cluster.node(0).api("/api/cluster/status").await;
    assert_eq!(status["members"]["alive"], 2, "{status}");
    assert!(status["events"]["failed"].as_u64() >= Some(1), "{status}");
    let metrics = cluster.node(0).metrics().await;
    assert!(
        metrics.contains("fulcrum_cluster_events_total{kind=\"node_failed\"} 1"),
        "{metrics}"
    );
    // Gossip only: no coordination store to report on.
    assert!(!metrics.contains("fulcrum_cluster_store_up"), "{metrics}");

    // The event stream replays the events so far: node-3 joined, then failed.
    let mut response = client()
        .get(cluster.node(0).admin_url("/api/cluster/events"))
        .send()
        .await
        .expect("events");
    assert_eq!(
        response.headers()["content-type"].to_str().ok(),
        Some("text/event-stream")
    );
    let mut text = String::new();
    let deadline = Instant::now() + DEADLINE;
    while !text.contains("event: node_failed") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    assert!(text.contains("event: node_joined"), "{text}");
    assert!(text.contains("event: node_failed"), "{text}");
    assert!(text.contains("\"node_id\":\"node-3\""), "{text}");

    // A failed node can be forgotten; a live one cannot.
    let (status, body) = delete(cluster.node(0), "/api/cluster/nodes/node-2").await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = delete(cluster.node(0), "/api/cluster/nodes/node-3").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = delete(cluster.node(0), "/api/cluster/nodes/node-9").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_node", "{body}");
}

async fn delete(node: &Node, path: &str) -> (u16, Value) {
    let response = client()
        .delete(node.admin_url(path))
        .send()
        .await
        .expect("delete");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_one_node_sees_failing_leaves_every_node_without_client_errors() {
    let b1 = Backend::start("b1", &[]);
    let mut b2 = Backend::start("b2", &[]);
    // Only node-1 checks actively (200 ms); node-2 and node-3 check once an hour, so they
    // can learn of the failure only through the cluster.
    let fast =
        "    health_check: { path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2 }\n";
    let slow = "    health_check: { path: /health, interval: 1h, timeout: 1s, rise: 1, fall: 2 }\n    outlier_detection: { consecutive_failures: 1000 }\n";
    let cluster = Cluster::start(3, &Coordination::None, &[&b1, &b2], &[fast, slow, slow]);
    all_alive(&cluster, 3).await;

    let loads: Vec<Load> = cluster
        .running()
        .map(|n| Load::start(&n.url("web"), 2))
        .collect();
    for load in &loads {
        load.wait_for_more(20).await;
    }
    let killed = Instant::now();
    b2.kill();
    let address = b2.address();
    for node in cluster.running() {
        eventually(
            DEADLINE,
            "every node takes b2 out of rotation",
            async || (node.backend_state("app", &address).await == "unhealthy").then_some(()),
        )
        .await;
    }
    eprintln!(
        "b2 out of rotation on all nodes after {:?}",
        killed.elapsed()
    );
    // node-3's own view still says healthy: the cluster took it out.
    let b = cluster.node(2).backend("app", &address).await;
    assert_eq!(b["state"], "unhealthy", "{b}");
    assert_ne!(b["local_state"], "unhealthy", "{b}");
    let status = cluster.node(2).api("/api/cluster/status").await;
    let view = status["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|v| v["address"] == address.as_str())
        .expect("view of b2")
        .clone();
    assert_eq!(view["cluster_down"], true, "{view}");
    assert_eq!(view["peers"]["node-1"], "unhealthy", "{view}");

    // From now on, no node sends to b2.
    let before: Vec<usize> = loads.iter().map(|l| l.count_from("b2")).collect();
    for load in &loads {
        load.wait_for_more(50).await;
    }
    for (load, n) in loads.iter().zip(before) {
        assert_eq!(load.count_from("b2"), n, "a node still routes to b2");
    }
    for load in loads {
        assert_all_ok(&load.stop().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_only_changes_reach_every_node() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let cluster = Cluster::start(3, &Coordination::None, &[&b1, &b2], &[]);
    all_alive(&cluster, 3).await;
    let body = set_strategy(cluster.node(1), "least_connections").await;
    assert_eq!(
        body["write"]["acknowledged"].as_array().map(Vec::len),
        Some(3),
        "{body}"
    );
    for node in cluster.running() {
        assert_eq!(strategy(node).await, "least_connections");
    }
    // A weight change and a drain, through node-3.
    set_weight(cluster.node(2), &b2.address(), 5).await;
    let path = format!(
        "/api/pools/app/backends/{}/drain?consistency=all",
        b1.address()
    );
    let (status, body) = cluster.node(2).api_post(&path, None).await;
    assert_eq!(status, 200, "{body}");
    for node in cluster.running() {
        let b1v = node.backend("app", &b1.address()).await;
        let b2v = node.backend("app", &b2.address()).await;
        assert_eq!(b1v["state"], "draining", "{b1v}");
        assert_eq!(b2v["weight"], 5, "{b2v}");
    }
    // Invalid changes are refused whole, with the reason.
    let (status, body) = cluster
        .node(0)
        .api_post("/api/pools/nope/strategy", Some(json!({"strategy": "p2c"})))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = cluster
        .node(0)
        .api_post(
            "/api/pools/app/backends/127.0.0.1:1/weight",
            Some(json!({"weight": 2})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_backend");
}

/// Without a store, a shared configuration larger than one gossip entry (48 KiB) still
/// reaches every node: it travels in parts, and back in one entry once it shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_configuration_larger_than_one_gossip_entry_reaches_every_node() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let b3 = Backend::start("b3", &[]);
    let cluster = Cluster::start(2, &Coordination::None, &[&b1, &b2], &[]);
    all_alive(&cluster, 2).await;
    // 100 KB of tags in two-byte characters: the document takes three parts.
    let note = "é".repeat(50_000);
    let (status, body) = cluster
        .node(0)
        .api_post(
            "/api/pools/app/backends?consistency=all",
            Some(json!({"address": b3.address(), "tags": {"note": note}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["write"]["acknowledged"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let added = cluster.node(1).backend("app", &b3.address()).await;
    assert_eq!(added["state"], "healthy", "{added}");
    // Removed again: the document fits in one entry, and the parts are withdrawn.
    let path = format!("/api/pools/app/backends/{}?consistency=all", b3.address());
    let (status, body) = delete(cluster.node(0), &path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["write"]["acknowledged"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let listed = cluster.node(1).api("/api/pools/app/backends").await;
    let addresses: Vec<&str> = listed["backends"]
        .as_array()
        .expect("backends array")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert!(!addresses.contains(&b3.address().as_str()), "{listed}");
    assert_eq!(addresses.len(), 2, "{listed}");
}

/// The election, config and outage checks shared by the Redis and etcd tests.
async fn store_backed_cluster(coordination: Coordination) {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let mut cluster = Cluster::start(3, &coordination, &[&b1, &b2], &[]);
    all_alive(&cluster, 3).await;

    // One leader, which every node agrees on, with a fencing token.
    let (first, token) = eventually(DEADLINE, "a leader is elected", async || {
        let (l, t) = leader(cluster.node(0)).await;
        Some((l?, t?))
    })
    .await;
    for node in cluster.running() {
        eventually(DEADLINE, "every node agrees on the leader", async || {
            (leader(node).await.0.as_deref() == Some(first.as_str())).then_some(())
        })
        .await;
    }

    // A strategy change on node-1 with ?consistency=all returns once all three report it.
    let body = set_strategy(cluster.node(0), "p2c").await;
    let version = body["write"]["version"].as_u64().expect("version");
    assert_eq!(
        body["write"]["acknowledged"].as_array().map(Vec::len),
        Some(3),
        "{body}"
    );
    for node in cluster.running() {
        assert_eq!(strategy(node).await, "p2c");
    }
    // A node restarted afterwards comes up with it.
    cluster.restart(2);
    eventually(
        DEADLINE,
        "the restarted node applies the shared config",
        async || (strategy(cluster.node(2)).await == "p2c").then_some(()),
    )
    .await;
    let v = cluster.node(2).api("/api/cluster/status").await;
    assert!(v["config_version"].as_u64() >= Some(version), "{v}");
    all_alive(&cluster, 3).await;

    // kill -9 the leader: a new one with a larger token (how soon — lease TTL plus one
    // renewal — is the store tests' deadline, store_backends.rs).
    let leader_index: usize = first
        .trim_start_matches("node-")
        .parse::<usize>()
        .expect("node-N")
        - 1;
    let killed = Instant::now();
    cluster.kill(leader_index);
    let other = (leader_index + 1) % 3;
    let (next, next_token) = eventually(DEADLINE, "a new leader", async || {
        let (l, t) = leader(cluster.node(other)).await;
        let l = l?;
        (l != first).then_some((l, t?))
    })
    .await;
    let took = killed.elapsed();
    eprintln!("new leader {next} (token {next_token}) after {took:?}");
    assert!(next_token > token, "token {next_token} must exceed {token}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_election_shared_config_and_restart() {
    let redis = RedisServer::start();
    store_backed_cluster(Coordination::Redis(redis.url())).await;
}

/// A leader killed with a long lease keeps the lease, and the API says so: it is still
/// `leader`, with the `leader_state` gossip reports (`failed`), and nobody else leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_holding_its_lease_is_reported_failed() {
    let redis = RedisServer::start();
    let b1 = Backend::start("b1", &[]);
    let mut cluster =
        Cluster::start_edited(2, &Coordination::Redis(redis.url()), &[&b1], &[], |yaml| {
            yaml.replace("lease_ttl: 2s", "lease_ttl: 60s")
        });
    all_alive(&cluster, 2).await;
    let first = eventually(DEADLINE, "a leader is elected", async || {
        let v = cluster.node(0).api("/api/cluster/leader").await;
        (v["leader_state"] == "alive").then_some(v["leader"].as_str()?.to_owned())
    })
    .await;
    let (dead, survivor) = if first == "node-1" { (0, 1) } else { (1, 0) };
    cluster.kill(dead);
    let v = eventually(
        DEADLINE,
        "the survivor reports the leader failed",
        async || {
            let v = cluster.node(survivor).api("/api/cluster/leader").await;
            (v["leader_state"] == "failed").then_some(v)
        },
    )
    .await;
    assert_eq!(v["leader"], first.as_str(), "{v}");
    assert_eq!(v["is_self"], false, "the lease is not expired: {v}");
    let status = cluster.node(survivor).api("/api/cluster/status").await;
    assert_eq!(status["leader"]["leader_state"], "failed", "{status}");
    // The dashboard's cluster panel shows it too.
    let (dom, console) = common::render_page(&cluster.node(survivor).admin_url("/dashboard")).await;
    assert!(!console.contains("Uncaught"), "script errors: {console}");
    let panel = common::element(&dom, r#"id="cluster""#, "section").expect("cluster panel");
    assert!(!panel.contains("hidden"), "{panel}");
    assert!(panel.contains(r#"<b class="failed">failed</b>"#), "{panel}");
    assert!(panel.contains(&format!("<b>{first}</b>")), "{panel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_election_shared_config_and_restart() {
    let etcd = EtcdServer::start();
    store_backed_cluster(Coordination::Etcd(etcd.endpoints())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_no_request_and_recovers() {
    let mut redis = RedisServer::start();
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let cluster = Cluster::start(2, &Coordination::Redis(redis.url()), &[&b1, &b2], &[]);
    all_alive(&cluster, 2).await;
    eventually(DEADLINE, "a leader", async || {
        leader(cluster.node(0)).await.1
    })
    .await;

    let loads: Vec<Load> = cluster
        .running()
        .map(|n| Load::start(&n.url("web"), 4))
        .collect();
    for load in &loads {
        load.wait_for_more(50).await;
    }
    // A change made before the outage, which the restarted (empty) Redis will not hold.
    let body = set_weight(cluster.node(0), &b2.address(), 5).await;
    let before = body["write"]["version"].as_u64().expect("version");
    redis.kill();
    for node in cluster.running() {
        eventually(DEADLINE, "the outage is reported", async || {
            let v = node.api("/api/cluster/status").await;
            (v["coordination"]["available"] == false).then_some(())
        })
        .await;
        // The leader each node names is marked stale: it was read before the outage.
        eventually(DEADLINE, "the leader view is stale", async || {
            let v = node.api("/api/cluster/leader").await;
            (v["stale"] == true).then_some(())
        })
        .await;
        eventually(DEADLINE, "the outage is in the metrics", async || {
            let m = node.metrics().await;
            (m.contains("fulcrum_cluster_store_up 0")
                && m.contains("fulcrum_cluster_store_outages_total 1"))
            .then_some(())
        })
        .await;
    }
    // Writes are refused clearly while the store is down; nothing half-applied.
    let (status, body) = cluster
        .node(0)
        .api_post("/api/pools/app/strategy", Some(json!({"strategy": "p2c"})))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(strategy(cluster.node(0)).await, "round_robin");
    for load in &loads {
        load.wait_for_more(100).await;
    }
    redis.restart();
    for node in cluster.running() {
        eventually(DEADLINE, "the store is back", async || {
            let v = node.api("/api/cluster/status").await;
            (v["coordination"]["available"] == true).then_some(())
        })
        .await;
    }
    let (l, t) = eventually(DEADLINE, "leadership recovers", async || {
        let (l, t) = leader(cluster.node(1)).await;
        Some((l?, t?))
    })
    .await;
    eprintln!("leader after the outage: {l} token {t}");
    eventually(DEADLINE, "the leader view is current again", async || {
        let v = cluster.node(1).api("/api/cluster/leader").await;
        (v["stale"] == false).then_some(())
    })
    .await;
    // The node registry recovers too: the restarted Redis (empty, no persistence) holds
    // both nodes' heartbeats again.
    let port = redis.port().to_string();
    eventually(DEADLINE, "both nodes are registered again", async || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port, "--raw", "SMEMBERS", "fulcrum:nodes"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (text.contains("node-1") && text.contains("node-2")).then_some(())
    })
    .await;
    // And writes go through again: numbered after what the nodes run (not from the
    // empty store's 0, which every node would ignore as old), applied everywhere, and
    // built on the overlay the nodes run, so the weight change made before survives.
    let body = set_strategy(cluster.node(1), "p2c").await;
    let after = body["write"]["version"].as_u64().expect("version");
    assert!(
        after > before,
        "version {after} must follow {before}: {body}"
    );
    for node in cluster.running() {
        assert_eq!(strategy(node).await, "p2c");
        let b2v = node.backend("app", &b2.address()).await;
        assert_eq!(b2v["weight"], 5, "{b2v}");
    }
    // The store holds that version and document again.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port, "--raw", "HGET", "fulcrum:config", "version"])
        .output()
        .expect("redis-cli runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        after.to_string()
    );
    // Emptied again with no write to follow: the leader writes the overlay back, so a
    // node starting meanwhile would adopt it rather than none.
    redis.kill();
    redis.restart();
    eventually(
        DEADLINE,
        "the leader writes the configuration back",
        async || {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &port, "--raw", "HGET", "fulcrum:config", "version"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == after.to_string()).then_some(())
        },
    )
    .await;
    for load in loads {
        assert_all_ok(&load.stop().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_backends_join_and_leave_every_node() {
    let redis = RedisServer::start();
    let b1 = Backend::start("b1", &[]);
    let registry = "    discovery: { source: registry, interval: 200ms }\n";
    let cluster = Cluster::start(
        2,
        &Coordination::Redis(redis.url()),
        &[&b1],
        &[registry, registry],
    );
    all_alive(&cluster, 2).await;

    // `fulcrum backend --register` registers itself through node-1's admin API.
    let admin = format!("http://{}", cluster.node(0).admin);
    let registered = Backend::start(
        "r1",
        &[
            "--register",
            &admin,
            "--pool",
            "app",
            "--tags",
            "zone=b",
            "--max-requests",
            "3",
            "--register-ttl",
            "2s",
        ],
    );
    for node in cluster.running() {
        eventually(
            DEADLINE,
            "the registered backend is in the pool",
            async || {
                let v = node.api("/api/pools/app/backends").await;
                v["backends"]
                    .as_array()?
                    .iter()
                    .find(|b| b["address"] == registered.address().as_str())
                    .filter(|b| b["tags"]["zone"] == "b" && b["max_requests"] == 3)
                    .map(|_| ())
            },
        )
        .await;
    }
    let load = Load::start(&cluster.node(1).url("web"), 2);
    eventually(
        DEADLINE,
        "traffic reaches the registered backend",
        async || (load.count_from("r1") > 0).then_some(()),
    )
    .await;
    assert_all_ok(&load.stop().await);

    // Killed without deregistering: its registration expires after the TTL.
    let address = registered.address();
    drop(registered);
    for node in cluster.running() {
        eventually(
            DEADLINE,
            "the expired backend leaves the pool",
            async || {
                let v = node.api("/api/pools/app/backends").await;
                (!v["backends"]
                    .as_array()?
                    .iter()
                    .any(|b| b["address"] == address.as_str()))
                .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_are_bounded_and_move_only_what_they_must() {
    let b = Backend::start("b1", &[]);
    let mut cluster = Cluster::start(3, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 3).await;
    let v = cluster.node(0).api("/api/cluster/assignments").await;
    let before = v["nodes"].as_object().expect("assignments").clone();
    assert_eq!(before.len(), 6, "{v}");
    let capacity = v["capacity"].as_u64().expect("capacity") as usize;
    for node in ["node-1", "node-2", "node-3"] {
        let n = before.values().filter(|x| *x == node).count();
        assert!(n <= capacity, "{node} holds {n} > {capacity}: {v}");
    }
    cluster.kill(2);
    eventually(DEADLINE, "node-3 failed", async || {
        members(cluster.node(0))
            .await
            .contains(&("node-3".to_owned(), "failed".to_owned()))
            .then_some(())
    })
    .await;
    let (status, after) = cluster
        .node(0)
        .api_post("/api/cluster/rebalance", None)
        .await;
    assert_eq!(status, 200, "{after}");
    let moved = after["moved"].as_array().expect("moved");
    let orphaned = before.values().filter(|x| *x == "node-3").count();
    assert_eq!(moved.len(), orphaned, "only node-3's items move: {after}");
    for m in moved {
        assert_eq!(m["from"], "node-3", "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_can_require_backend_tags() {
    let gpu = Backend::start("gpu", &[]);
    let cpu = Backend::start("cpu", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - match: {{ path_prefix: /infer }}\n        pool: app\n        backend_tags: {{ gpu: \"true\" }}\n      - pool: app\npools:\n  app:\n    backends:\n      - {{ address: {}, tags: {{ gpu: \"true\" }} }}\n      - {{ address: {} }}\n",
        gpu.address(),
        cpu.address()
    );
    let node = Node::start(&yaml);
    let tagged = common::spread(&format!("{}/infer", node.url("web")), 20).await;
    assert_eq!(tagged.get("gpu"), Some(&20), "{tagged:?}");
    let any = common::spread(&format!("{}/other", node.url("web")), 20).await;
    assert_eq!(any.get("cpu"), Some(&10), "{any:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_prints_the_cluster_as_tables() {
    let b = Backend::start("b1", &[]);
    let cluster = Cluster::start(2, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 2).await;
    eventually(DEADLINE, "a leader", async || {
        leader(cluster.node(0)).await.0
    })
    .await;
    let admin = format!("http://{}", cluster.node(0).admin);
    let run = |what: &str| {
        let out = std::process::Command::new(common::fulcrum_bin())
            .args(["ctl", "--admin", &admin, "cluster", what])
            .output()
            .expect("run fulcrum ctl");
        assert!(
            out.status.success(),
            "ctl {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let nodes = run("nodes");
    assert!(nodes.starts_with("NODE"), "{nodes}");
    assert!(
        nodes.contains("node-1 (self)") && nodes.contains("node-2"),
        "{nodes}"
    );
    assert_eq!(
        nodes.lines().filter(|l| l.contains("alive")).count(),
        2,
        "{nodes}"
    );
    let leader_table = run("leader");
    assert!(
        leader_table.contains("node-1") && leader_table.contains("none"),
        "{leader_table}"
    );
    let status = run("status");
    assert!(status.contains("2 alive, 0 failed, 0 left"), "{status}");
    assert!(status.contains(&b.address()), "{status}");
    // `host:port` without a scheme, and --json after the subcommand.
    let out = std::process::Command::new(common::fulcrum_bin())
        .args(["ctl", "--admin"])
        .arg(cluster.node(0).admin.to_string())
        .args(["cluster", "leader", "--json"])
        .output()
        .expect("run fulcrum ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(json["coordination"], "none", "{json}");
    // Pointed at a proxy listener instead of the admin API: an error, not a table.
    let out = std::process::Command::new(common::fulcrum_bin())
        .args([
            "ctl",
            "--admin",
            &cluster.node(0).url("web"),
            "cluster",
            "nodes",
        ])
        .output()
        .expect("run fulcrum ctl");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the admin API"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unreachable node is a clear error and exit 1.
    let out = std::process::Command::new(common::fulcrum_bin())
        .args(["ctl", "--admin", "http://127.0.0.1:1", "cluster", "nodes"])
        .output()
        .expect("run fulcrum ctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_adds_resolved_backends() {
    let b = Backend::start("dns", &[]);
    // `localhost` resolves through /etc/hosts; the pool lists no backend of its own.
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    backends: []\n    discovery: {{ source: dns, name: \"localhost:{}\", interval: 200ms }}\n",
        b.addr.port()
    );
    let node = Node::start(&yaml);
    eventually(DEADLINE, "the resolved backend serves", async || {
        let r = client()
            .get(format!("{}/x", node.url("web")))
            .send()
            .await
            .ok()?;
        (r.status() == 200 && common::served_by(&r) == "dns").then_some(())
    })
    .await;
    let v = node.api("/api/pools/app/backends").await;
    assert!(
        v["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .any(|x| x["address"] == format!("127.0.0.1:{}", b.addr.port()).as_str()),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_discovery_follows_weights_and_priority_and_stops_on_reload() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let b3 = Backend::start("b3", &[]);
    let srv = |b: &Backend, priority: u16, weight: u16| {
        format!(
            "srv-host=_http._tcp.app.test,{}.app.test,{},{priority},{weight}",
            b.name,
            b.addr.port()
        )
    };
    let records = [
        srv(&b1, 0, 3),
        srv(&b2, 0, 1),
        // Priority 1: a fallback, unused while priority 0 has targets (RFC 2782).
        srv(&b3, 1, 1),
        "host-record=b1.app.test,127.0.0.1".to_owned(),
        "host-record=b2.app.test,127.0.0.1".to_owned(),
        "host-record=b3.app.test,127.0.0.1".to_owned(),
    ];
    let dns = DnsServer::start(&records.iter().map(String::as_str).collect::<Vec<_>>());
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: weighted_round_robin\n    backends: []\n    discovery: {{ source: dns, record: srv, name: _http._tcp.app.test, nameservers: [\"{}\"], interval: 200ms }}\n",
        dns.address()
    );
    let node = Node::start(&yaml);
    eventually(DEADLINE, "both SRV targets are in the pool", async || {
        let v = node.api("/api/pools/app/backends").await;
        (v["backends"].as_array()?.len() == 2).then_some(())
    })
    .await;
    let url = format!("{}/x", node.url("web"));
    let spread = common::spread(&url, 40).await;
    assert_eq!(spread.get("b1"), Some(&30), "SRV weight 3: {spread:?}");
    assert_eq!(spread.get("b2"), Some(&10), "SRV weight 1: {spread:?}");
    assert_eq!(
        spread.get("b3"),
        None,
        "priority 1 is a fallback: {spread:?}"
    );

    // A reload to a static list stops discovery and drops what it had found.
    let next = node.pin_addresses(&common::simple_config("round_robin", &[&b3], ""));
    let (status, body) = node.reload(&next).await;
    assert_eq!(status, 200, "{body}");
    let v = node.api("/api/pools/app/backends").await;
    let listed: Vec<&str> = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert_eq!(listed, [b3.address().as_str()], "{v}");
    // Three discovery intervals later, the stopped task has not brought them back (a
    // check that something does not happen: there is no event to poll for).
    let spread = common::spread(&url, 20).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = common::spread(&url, 20).await;
    assert_eq!(spread.get("b3"), Some(&20), "{spread:?}");
    assert_eq!(later.get("b3"), Some(&20), "{later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_starts_warm_from_persisted_statistics() {
    let redis = RedisServer::start();
    let b = Backend::start("b1", &[]);
    let stats = "    stats: { long_request_threshold: 50ms }\n";
    let mut cluster = Cluster::start(1, &Coordination::Redis(redis.url()), &[&b], &[stats]);
    let url = format!("{}/report/42?delay_ms=80", cluster.node(0).url("web"));
    for _ in 0..5 {
        let r = client().get(&url).send().await.expect("request");
        assert_eq!(r.status(), 200);
    }
    // Persisted within 5 s: seed 000's long-request set names the endpoint.
    eventually(DEADLINE, "the long endpoint is persisted", async || {
        let v = cluster.node(0).api("/cluster/stats").await;
        v["long_requests"]
            .as_array()?
            .iter()
            .any(|e| e == "app|GET /report/{id}")
            .then_some(())
    })
    .await;
    cluster.restart(0);
    // Known before any request, from the persisted statistics.
    let e = cluster.node(0).endpoint("app", "GET /report/{id}").await;
    assert_eq!(e["class"], "long", "{e}");
    assert_eq!(e["count"], 0, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_seeds_joins_through_the_api() {
    let b = Backend::start("b1", &[]);
    let lonely_port = free_udp_port();
    let cluster = Cluster::start(2, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 2).await;
    let lonely = Node::start(&node_yaml(
        "node-9",
        lonely_port,
        &[],
        &Coordination::None,
        &[&b],
        "",
    ));
    assert_eq!(members(&lonely).await.len(), 1);
    let seed = gossip_addr(cluster.node(0)).await;
    let (status, body) = lonely
        .api_post("/api/cluster/join", Some(json!({ "seed": seed })))
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(DEADLINE, "the joined node sees all three", async || {
        (members(&lonely)
            .await
            .iter()
            .filter(|(_, s)| s == "alive")
            .count()
            == 3)
            .then_some(())
    })
    .await;
    let (status, body) = lonely
        .api_post(
            "/api/cluster/join",
            Some(json!({ "seed": "not-an-address" })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_seed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_changes_weights_and_backends_at_run_time() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let b3 = Backend::start("b3", &[]);
    let node = Node::start(&common::simple_config(
        "weighted_round_robin",
        &[&b1, &b2],
        "",
    ));
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/{}/drain", b1.address()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/{}/weight", b2.address()),
            Some(json!({"weight": 3})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The weight change reloaded the pool; the drain made directly stays.
    assert_eq!(node.backend_state("app", &b1.address()).await, "draining");
    let (status, body) = node
        .api_post(
            "/api/pools/app/backends",
            Some(json!({"address": b3.address(), "max_requests": 1_000_001})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_max_requests");
    let (status, body) = node
        .api_post(
            "/api/pools/app/backends",
            Some(json!({"address": b3.address(), "tags": {"zone": "c"}, "max_requests": 7})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let listed = node.api("/api/pools/app/backends").await;
    let limit_of = |address: String| {
        listed["backends"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["address"] == address.as_str()))
            .map(|b| b["max_requests"].clone())
    };
    assert_eq!(limit_of(b3.address()), Some(json!(7)), "{listed}");
    assert_eq!(limit_of(b2.address()), Some(json!(0)), "{listed}");
    let spread = common::spread(&node.url("web"), 40).await;
    assert_eq!(spread.get("b1"), None, "{spread:?}");
    assert_eq!(spread.get("b2"), Some(&30), "{spread:?}");
    assert_eq!(spread.get("b3"), Some(&10), "{spread:?}");
    let (status, body) = node
        .api_post(
            "/api/pools/app/backends",
            Some(json!({"address": b3.address()})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "duplicate_backend");
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/{}/weight", b2.address()),
            Some(json!({"weight": 0})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = delete(&node, &format!("/api/pools/app/backends/{}", b3.address())).await;
    assert_eq!(status, 200, "{body}");
    let spread = common::spread(&node.url("web"), 9).await;
    assert_eq!(spread.get("b3"), None, "{spread:?}");
    // A strategy switch is part of the run-time overlay too: a later change that composes
    // the configuration again (here a weight) keeps it.
    let (status, body) = node
        .api_post(
            "/api/pools/app/strategy?consistency=bogus",
            Some(json!({"strategy": "least_connections"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_consistency");
    let (status, body) = node
        .api_post(
            "/api/pools/app/strategy",
            Some(json!({"strategy": "least_connections"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous"], "weighted_round_robin", "{body}");
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/{}/weight", b2.address()),
            Some(json!({"weight": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(strategy(&node).await, "least_connections");
    // An address that does not resolve is refused before anything is written.
    let (status, body) = node
        .api_post(
            "/api/pools/app/backends",
            Some(json!({"address": "no-such-host.invalid:80"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_address");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no-such-host.invalid:80")),
        "{body}"
    );
    // Cluster-only paths say so on a single node.
    let response = client()
        .get(node.admin_url("/api/cluster/nodes"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_clustered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_names_the_nodes_that_lag_behind_its_consistency() {
    let b = Backend::start("b1", &[]);
    // A frozen node stays "alive" for a long time with this phi threshold; writes wait 1 s.
    let cluster = Cluster::start_edited(3, &Coordination::None, &[&b], &[], |yaml| {
        yaml.replace("phi_threshold: 6.0", "phi_threshold: 1000.0")
            .replace("consistency_timeout: 10s", "consistency_timeout: 1s")
    });
    all_alive(&cluster, 3).await;
    cluster.node(2).signal("STOP");
    let (status, body) = cluster
        .node(0)
        .api_post(
            "/api/pools/app/strategy?consistency=all",
            Some(json!({"strategy": "p2c"})),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "consistency_timeout");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("node-3 (at version 0)"), "{message}");
    // Applied here all the same, and a quorum (2 of 3) is met.
    assert_eq!(strategy(cluster.node(0)).await, "p2c");
    let (status, body) = cluster
        .node(0)
        .api_post(
            "/api/pools/app/strategy?consistency=quorum",
            Some(json!({"strategy": "least_connections"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The frozen node catches up once it runs again.
    cluster.node(2).signal("CONT");
    eventually(DEADLINE, "node-3 catches up", async || {
        (strategy(cluster.node(2)).await == "least_connections").then_some(())
    })
    .await;
}

/// Switches pool `app` to `strategy` through `node`, waiting for every live node
/// (`?consistency=all`); asserts 200 and returns the answer.
async fn set_strategy(node: &Node, strategy: &str) -> Value {
    let path = "/api/pools/app/strategy?consistency=all";
    let (status, body) = node
        .api_post(path, Some(json!({ "strategy": strategy })))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Sets backend `address`'s weight in pool `app` through `node`, waiting for every live
/// node (`?consistency=all`); asserts 200 and returns the answer.
async fn set_weight(node: &Node, address: &str, weight: u32) -> Value {
    let path = format!("/api/pools/app/backends/{address}/weight?consistency=all");
    let (status, body) = node
        .api_post(&path, Some(json!({ "weight": weight })))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Weight of backend `address` of pool `app` as `node` runs it.
async fn weight(node: &Node, address: &str) -> u64 {
    let b = node.backend("app", address).await;
    b["weight"].as_u64().expect("weight")
}

/// Without a store, two nodes writing at the same moment both write the next version;
/// every node runs the higher `(version, node)`. Both writers answered 200 with all three
/// nodes acknowledging, while the losing change was dropped everywhere. Now the loser is
/// re-applied on top of the winner, and a node counts as acknowledging only when it runs
/// a document holding the write, so once both calls answered every node runs both changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_writes_on_two_nodes_both_land_without_a_store() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let cluster = Cluster::start(3, &Coordination::None, &[&b1, &b2], &[]);
    all_alive(&cluster, 3).await;
    let weight_path = format!(
        "/api/pools/app/backends/{}/weight?consistency=all",
        b1.address()
    );
    for round in 1..=10u64 {
        // Node-2 toggles b2 between drained and enabled while node-1 sets b1's weight.
        let (action, expected) = if round % 2 == 1 {
            ("drain", "draining")
        } else {
            ("enable", "healthy")
        };
        let admin_path = format!(
            "/api/pools/app/backends/{}/{action}?consistency=all",
            b2.address()
        );
        let ((s1, body1), (s2, body2)) = tokio::join!(
            cluster
                .node(0)
                .api_post(&weight_path, Some(json!({ "weight": round + 1 }))),
            cluster.node(1).api_post(&admin_path, None),
        );
        assert_eq!(s1, 200, "round {round}: {body1}");
        assert_eq!(s2, 200, "round {round}: {body2}");
        for body in [&body1, &body2] {
            assert_eq!(
                body["write"]["acknowledged"].as_array().map(Vec::len),
                Some(3),
                "round {round}: {body}"
            );
        }
        // Both answered with every node acknowledging: every node runs both changes.
        for (i, node) in cluster.running().enumerate() {
            assert_eq!(
                weight(node, &b1.address()).await,
                round + 1,
                "round {round}: node-{} lost the weight change ({body1} / {body2})",
                i + 1
            );
            assert_eq!(
                node.backend_state("app", &b2.address()).await,
                expected,
                "round {round}: node-{} lost the {action} ({body1} / {body2})",
                i + 1
            );
        }
    }
}

/// A node restarted without seeds writes a change while it knows no peer (version 1,
/// acknowledged by itself alone); when it joins, it adopts the cluster's newer document.
/// The change it made must survive that: it is re-applied on top, and reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_made_before_joining_survives_the_join() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let mut cluster = Cluster::start(3, &Coordination::None, &[&b1, &b2], &[]);
    all_alive(&cluster, 3).await;
    // The cluster's own changes: a strategy, then a weight (version 2).
    set_strategy(cluster.node(0), "least_connections").await;
    let body = set_weight(cluster.node(1), &b1.address(), 4).await;
    let cluster_version = body["write"]["version"].as_u64().expect("version");

    // node-3 comes back on a new gossip port with no seeds: nobody knows where it is.
    cluster.kill(2);
    let alone = Node::start(&node_yaml(
        "node-3",
        free_udp_port(),
        &[],
        &Coordination::None,
        &[&b1, &b2],
        "",
    ));
    let path = format!(
        "/api/pools/app/backends/{}/disable?consistency=all",
        b2.address()
    );
    let (status, body) = alone.api_post(&path, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["write"]["version"].as_u64() < Some(cluster_version),
        "written before joining: {body}"
    );
    let seed = gossip_addr(cluster.node(0)).await;
    let (status, body) = alone
        .api_post("/api/cluster/join", Some(json!({ "seed": seed })))
        .await;
    assert_eq!(status, 200, "{body}");
    // Every node ends with the cluster's changes and node-3's.
    for node in [cluster.node(0), cluster.node(1), &alone] {
        eventually(
            DEADLINE,
            "every node runs both sides' changes",
            async || {
                let v = node.api("/api/cluster/status").await;
                let version = v["config_version"].as_u64()?;
                (version > cluster_version
                    && node.backend_state("app", &b2.address()).await == "disabled")
                    .then_some(())
            },
        )
        .await;
        assert_eq!(strategy(node).await, "least_connections");
        assert_eq!(weight(node, &b1.address()).await, 4);
    }
}

/// A write with `?consistency=all` while a member is down is acknowledged by the live
/// nodes only; the answer names the member it did not wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_names_the_members_it_skipped() {
    let b = Backend::start("b1", &[]);
    let mut cluster = Cluster::start(3, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 3).await;
    cluster.kill(2);
    eventually(DEADLINE, "node-1 sees node-3 failed", async || {
        let m = members(cluster.node(0)).await;
        m.contains(&("node-3".to_owned(), "failed".to_owned()))
            .then_some(())
    })
    .await;
    let body = set_strategy(cluster.node(0), "p2c").await;
    assert_eq!(
        body["write"]["acknowledged"],
        json!(["node-1", "node-2"]),
        "{body}"
    );
    assert_eq!(body["write"]["skipped"], json!(["node-3"]), "{body}");
}

/// `(version, written_by)` of the shared configuration in the store.
async fn stored_config(settings: &fulcrum_cluster::store::StoreSettings) -> Option<(u64, String)> {
    let store = fulcrum_cluster::store::Store::connect(settings)
        .await
        .ok()?;
    let (version, text) = store.config().await.ok()??;
    let doc: Value = serde_json::from_str(&text).ok()?;
    Some((version, doc["written_by"].as_str()?.to_owned()))
}

/// A node started while the store is down cannot read the shared configuration from it:
/// it adopts the newest one its peers run (gossiped), so a backend disabled cluster-wide
/// stays out of rotation on it too; when the store returns, the store keeps (or gets back)
/// that document, not an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_the_store_is_down_runs_the_peers_configuration() {
    let mut redis = RedisServer::start();
    let settings = fulcrum_cluster::store::StoreSettings::redis(redis.url());
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let mut cluster = Cluster::start(3, &Coordination::Redis(redis.url()), &[&b1, &b2], &[]);
    all_alive(&cluster, 3).await;
    let path = format!(
        "/api/pools/app/backends/{}/disable?consistency=all",
        b1.address()
    );
    let (status, body) = cluster.node(0).api_post(&path, None).await;
    assert_eq!(status, 200, "{body}");
    let body = set_strategy(cluster.node(1), "least_connections").await;
    let version = body["write"]["version"].as_u64().expect("version");
    assert_eq!(
        stored_config(&settings).await,
        Some((version, "node-2".to_owned()))
    );

    redis.kill();
    for node in cluster.running() {
        eventually(DEADLINE, "the outage is reported", async || {
            let v = node.api("/api/cluster/status").await;
            (v["coordination"]["available"] == false).then_some(())
        })
        .await;
    }
    cluster.restart(2);
    let restarted = cluster.node(2);
    eventually(
        DEADLINE,
        "the restarted node runs the peers' configuration",
        async || {
            let v = restarted.api("/api/cluster/status").await;
            (v["config_version"].as_u64() == Some(version)).then_some(())
        },
    )
    .await;
    assert_eq!(strategy(restarted).await, "least_connections");
    assert_eq!(
        restarted.backend_state("app", &b1.address()).await,
        "disabled"
    );
    let served = common::spread(&restarted.url("web"), 20).await;
    assert_eq!(served.get("b2"), Some(&20), "{served:?}");

    // The store comes back (empty: no persistence); the cluster's document goes back into
    // it, and no node replaces it with an older one.
    redis.restart();
    eventually(
        DEADLINE,
        "the store holds the cluster's configuration again",
        async || {
            (stored_config(&settings).await == Some((version, "node-2".to_owned()))).then_some(())
        },
    )
    .await;
    for node in cluster.running() {
        eventually(DEADLINE, "the store is back", async || {
            let v = node.api("/api/cluster/status").await;
            (v["coordination"]["available"] == true).then_some(())
        })
        .await;
        let v = node.api("/api/cluster/status").await;
        assert_eq!(v["config_version"].as_u64(), Some(version), "{v}");
        assert_eq!(node.backend_state("app", &b1.address()).await, "disabled");
    }
    assert_eq!(
        stored_config(&settings).await,
        Some((version, "node-2".to_owned()))
    );
}

/// etcd keeps a lease across its own restart and restarts its TTL. A leader that stepped
/// down while etcd was down (its renewals failed) could not release its lease then; it
/// must release it once etcd answers again, and meanwhile no node may call it an `alive`
/// leader: it says itself that it does not lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stepped_down_during_an_etcd_restart_is_not_reported_alive() {
    let mut etcd = EtcdServer::start();
    let b = Backend::start("b1", &[]);
    let cluster = Cluster::start(3, &Coordination::Etcd(etcd.endpoints()), &[&b], &[]);
    all_alive(&cluster, 3).await;
    let (first, token) = eventually(DEADLINE, "a leader is elected", async || {
        let (l, t) = leader(cluster.node(0)).await;
        Some((l?, t?))
    })
    .await;
    let leader_index = first
        .trim_start_matches("node-")
        .parse::<usize>()
        .expect("node-N")
        - 1;
    etcd.kill();
    eventually(DEADLINE, "the leader steps down", async || {
        let v = cluster.node(leader_index).api("/api/cluster/leader").await;
        (v["is_self"] == false).then_some(())
    })
    .await;
    etcd.restart();
    // Until a leader with a new lease is reported everywhere, no node may name the old
    // lease's holder as an alive leader with a current (not stale) view.
    let mut settled = [false; 3];
    let mut samples = 0;
    let start = Instant::now();
    while settled.iter().any(|s| !s) {
        assert!(
            start.elapsed() < DEADLINE,
            "no new leader after etcd came back"
        );
        for (i, node) in cluster.running().enumerate() {
            let v = node.api("/api/cluster/leader").await;
            samples += 1;
            let old_lease = v["leader"] == first.as_str() && v["token"].as_u64() == Some(token);
            if old_lease && v["stale"] == false && v["leader_state"] == "alive" {
                // Right only if the old leader leads again, in a new term this view has
                // not read yet (it released its lease and won the next election).
                let own = cluster.node(leader_index).api("/api/cluster/leader").await;
                assert!(
                    own["is_self"] == true && own["token"].as_u64() > Some(token),
                    "node-{} names {first} an alive leader with the lease it gave up: {v} \
                     ({first} itself says {own})",
                    i + 1
                );
            }
            if v["leader"].is_string() && v["token"].as_u64() > Some(token) {
                settled[i] = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "a new leader everywhere {:?} after etcd came back ({samples} samples)",
        start.elapsed()
    );
}

/// A leader paused (SIGSTOP) past its lease steps down when it wakes. The store was
/// reachable throughout, so its leader view must never say `stale` (which means "cannot
/// reach the store").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_woken_from_a_pause_is_not_stale() {
    let redis = RedisServer::start();
    let b = Backend::start("b1", &[]);
    let cluster = Cluster::start(2, &Coordination::Redis(redis.url()), &[&b], &[]);
    all_alive(&cluster, 2).await;
    let (first, token) = eventually(DEADLINE, "a leader is elected", async || {
        let (l, t) = leader(cluster.node(0)).await;
        Some((l?, t?))
    })
    .await;
    let (paused, other) = if first == "node-1" { (0, 1) } else { (1, 0) };
    cluster.node(paused).signal("STOP");
    eventually(DEADLINE, "the other node takes over", async || {
        let (l, t) = leader(cluster.node(other)).await;
        (l.as_deref() != Some(first.as_str()) && t > Some(token)).then_some(())
    })
    .await;
    cluster.node(paused).signal("CONT");
    // Sampled until the woken node names the new leader.
    let view = eventually(DEADLINE, "the woken node sees the new leader", async || {
        let v = cluster.node(paused).api("/api/cluster/leader").await;
        assert_eq!(v["stale"], false, "the store is reachable: {v}");
        (v["token"].as_u64() > Some(token)).then_some(v)
    })
    .await;
    assert_eq!(view["is_self"], false, "{view}");
}

/// `(state, gossip_addr)` of member `node_id` as `node` lists it.
async fn member_entry(node: &Node, node_id: &str) -> Option<(String, String)> {
    let v = node.api("/api/cluster/nodes").await;
    v["nodes"]
        .as_array()
        .expect("nodes array")
        .iter()
        .find(|n| n["node_id"] == node_id)
        .map(|n| {
            (
                n["state"].as_str().unwrap_or_default().to_owned(),
                n["gossip_addr"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_started_with_a_used_node_id_stops_and_the_first_stays_listed() {
    let b = Backend::start("b1", &[]);
    let cluster = Cluster::start(2, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 2).await;
    let first = gossip_addr(cluster.node(0)).await;
    let first_port: u16 = first
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let peer_events = cluster.node(1).api("/api/cluster/status").await["events"].clone();

    // A copy of node-1's configuration on another gossip port.
    let mut copy = Node::start(&node_yaml(
        "node-1",
        free_udp_port(),
        &[first_port],
        &Coordination::None,
        &[&b],
        "",
    ));
    let code = tokio::task::block_in_place(|| copy.wait_exit(DEADLINE));
    assert_eq!(
        code,
        Some(2),
        "the copy exits with status 2; logs:\n{}",
        copy.logs()
    );
    let logs = copy.logs();
    assert!(
        logs.contains(&format!(
            "node_id `node-1` is already used by the live node gossiping at {first}"
        )),
        "the copy names the node it conflicts with:\n{logs}"
    );

    // Both the original and its peer list node-1 as the original, alive.
    for node in cluster.running() {
        eventually(
            DEADLINE,
            "node-1 is listed alive at its own address",
            async || {
                (member_entry(node, "node-1").await == Some(("alive".to_owned(), first.clone())))
                    .then_some(())
            },
        )
        .await;
    }
    let status = cluster.node(0).api("/api/cluster/status").await;
    assert_eq!(status["members"]["alive"], 2, "{status}");
    assert!(status["node_id_conflicts"].is_array(), "{status}");
    // The copy never showed as a join (or a departure) on the peer.
    let after = cluster.node(1).api("/api/cluster/status").await["events"].clone();
    assert_eq!(after, peer_events, "no membership event for the copy");
    // The original keeps serving.
    let response = client()
        .get(format!("{}/", cluster.node(0).url("web")))
        .send()
        .await
        .expect("request through the original");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_woken_from_a_pause_does_not_report_its_live_peers_failed() {
    let b = Backend::start("b1", &[]);
    let cluster = Cluster::start(3, &Coordination::None, &[&b], &[]);
    all_alive(&cluster, 3).await;
    let paused = cluster.node(0);
    let before = paused.api("/api/cluster/status").await["events"].clone();

    // Paused for 3 s: ten times the failure detector's timeout (phi 6 × 100 ms).
    paused.signal("STOP");
    let peer = cluster.node(1);
    eventually(
        DEADLINE,
        "the peers report the paused node failed",
        async || (member_entry(peer, "node-1").await?.0 == "failed").then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    paused.signal("CONT");

    all_alive(&cluster, 3).await;
    // Long enough for failures held back after the pause to be reported, had any peer
    // stayed silent (ten gossip intervals), and for any late event to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = paused.api("/api/cluster/status").await["events"].clone();
    assert_eq!(
        after["failed"], before["failed"],
        "the woken node reported no peer failed: before {before}, after {after}"
    );
    assert_eq!(after["joined"], before["joined"], "nor rejoined: {after}");
    assert!(
        members(paused).await.iter().all(|(_, s)| s == "alive"),
        "{:?}",
        members(paused).await
    );
    // The peers saw it fail and come back, as they should.
    let peer_events = peer.api("/api/cluster/status").await["events"].clone();
    assert!(peer_events["failed"].as_u64() >= Some(1), "{peer_events}");
}

/// `config_version` and `config_refused` of `node`'s cluster status.
async fn config_state(node: &Node) -> (u64, Value) {
    let status = node.api("/api/cluster/status").await;
    (
        status["config_version"].as_u64().expect("config_version"),
        status["config_refused"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_change_a_node_cannot_take_is_refused_once_reported_and_lifted_when_undone() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let (p1, p2) = (free_udp_port(), free_udp_port());
    // node-2's file has only b1, so removing b1 cluster-wide would leave its pool empty.
    let writer = Node::start(&node_yaml(
        "node-1",
        p1,
        &[p2],
        &Coordination::None,
        &[&b1, &b2],
        "",
    ));
    let narrow = Node::start(&node_yaml(
        "node-2",
        p2,
        &[p1],
        &Coordination::None,
        &[&b1],
        "",
    ));
    for node in [&writer, &narrow] {
        eventually(DEADLINE, "both nodes alive", async || {
            (members(node)
                .await
                .iter()
                .filter(|(_, s)| s == "alive")
                .count()
                == 2)
                .then_some(())
        })
        .await;
    }

    let (status, body) = delete(
        &writer,
        &format!("/api/pools/app/backends/{}", b1.address()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (removed, _) = config_state(&writer).await;
    let refused = eventually(
        DEADLINE,
        "node-2 reports the version it refused",
        async || {
            let (_, refused) = config_state(&narrow).await;
            (refused["version"].as_u64() == Some(removed)).then_some(refused)
        },
    )
    .await;
    assert_eq!(refused["written_by"], "node-1", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("pools.app.backends")),
        "the reason names the setting: {refused}"
    );
    // node-2 keeps serving with what it had: b1.
    let spread = common::spread(&narrow.url("web"), 4).await;
    assert_eq!(spread.get("b1"), Some(&4), "{spread:?}");
    // Refused once, not on every gossip round (10 a second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logged = narrow
        .logs()
        .matches("shared configuration refused here")
        .count();
    assert_eq!(logged, 1, "logged once:\n{}", narrow.logs());

    // Undone on node-1 (b1 added back): node-2 takes the newer version and clears it.
    let (status, body) = writer
        .api_post(
            "/api/pools/app/backends",
            Some(json!({"address": b1.address()})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (restored, _) = config_state(&writer).await;
    eventually(
        DEADLINE,
        "node-2 applies the version that undoes it",
        async || {
            let (version, refused) = config_state(&narrow).await;
            (version == restored && refused.is_null()).then_some(())
        },
    )
    .await;
}
