//! Request limits and the pool queue end to end: `max_requests` caps what a backend gets
//! at once, requests beyond wait in Fulcrum (short before long with `priority: class`,
//! in arrival order with `fifo`), and a full or timed-out queue answers a JSON `503`.

mod common;

use std::time::Instant;

use common::{Backend, DEADLINE, Node, client, eventually, metric_value, simple_config};
use serde_json::Value;

/// The value of the first series of `name` whose line contains `labels`, 0 if absent.
fn metric(metrics: &str, name: &str, labels: &str) -> f64 {
    metric_value(metrics, name, labels).unwrap_or(0.0)
}

/// Sends a GET to `url` in the background; resolves to (status, JSON body or Null, when
/// the response ended).
fn spawn_get(url: String) -> tokio::task::JoinHandle<(u16, Value, Instant)> {
    tokio::spawn(async move {
        let response = client().get(&url).send().await.expect("request");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, Instant::now())
    })
}

/// Waits until `n` requests wait in pool `app`'s queue.
async fn until_queued(node: &Node, n: f64) {
    eventually(DEADLINE, &format!("{n} requests queued"), async || {
        let metrics = node.metrics().await;
        (metric(&metrics, "fulcrum_pool_queue_length", "pool=\"app\"") == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_caps_a_backend_and_the_rest_wait_in_fulcrum() {
    let b1 = Backend::start("b1", &["--latency", "fixed:1ms"]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&b1],
        "    default_max_requests: 2\n",
    ));
    let url = format!("{}/work?delay_ms=1500", node.url("web"));
    let requests: Vec<_> = (0..6).map(|_| spawn_get(url.clone())).collect();
    // Two at the backend, four waiting in Fulcrum, none in the backend's own queue.
    until_queued(&node, 4.0).await;
    let stats = eventually(DEADLINE, "2 requests at the backend", async || {
        let stats = b1.stats().await;
        (stats["in_flight"] == 2).then_some(stats)
    })
    .await;
    assert_eq!(stats["queued"], 0, "{stats}");
    let metrics = node.metrics().await;
    assert_eq!(
        metric(&metrics, "fulcrum_pool_queue_length", "pool=\"app\""),
        4.0,
        "still waiting while the backend serves 2"
    );
    let backend = node.backend("app", &b1.address()).await;
    assert_eq!(backend["in_flight"], 2, "{backend}");
    for request in requests {
        let (status, body, _) = request.await.expect("request task");
        assert_eq!(status, 200, "{body}");
    }
    let metrics = node.metrics().await;
    assert_eq!(
        metric(&metrics, "fulcrum_queued_requests_total", "pool=\"app\""),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "fulcrum_pool_queue_length", "pool=\"app\""),
        0.0
    );
}

/// Classifies `GET /long` as long (3 requests of 250 ms against a 150 ms threshold),
/// then holds the only slot with a long request and queues a long request and, after it,
/// a short one. Returns whether the short one finished first, i.e. was served first (the
/// backend serves one at a time, and the long one takes 250 ms).
async fn short_overtakes_long(priority: &str) -> bool {
    let b1 = Backend::start("b1", &["--latency", "fixed:1ms"]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&b1],
        &format!(
            "    stats: {{ long_request_threshold: 150ms, stats_window: 3 }}\n    \
             default_max_requests: 1\n    queue: {{ priority: {priority} }}\n"
        ),
    ));
    let web = node.url("web");
    let long = format!("{web}/long?delay_ms=250");
    for _ in 0..3 {
        let (status, _, _) = spawn_get(long.clone()).await.expect("warm-up");
        assert_eq!(status, 200);
    }
    let stats = node.endpoint("app", "GET /long").await;
    assert_eq!(stats["class"], "long", "{stats}");

    let blocker = spawn_get(format!("{web}/long?delay_ms=1500"));
    eventually(DEADLINE, "the blocker at the backend", async || {
        (b1.stats().await["in_flight"] == 1).then_some(())
    })
    .await;
    let queued_long = spawn_get(long.clone());
    until_queued(&node, 1.0).await;
    let queued_short = spawn_get(format!("{web}/short"));
    until_queued(&node, 2.0).await;
    let (s1, _, _) = blocker.await.expect("blocker");
    let (s2, _, long_done) = queued_long.await.expect("long");
    let (s3, _, short_done) = queued_short.await.expect("short");
    assert_eq!((s1, s2, s3), (200, 200, 200));
    short_done < long_done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_priority_serves_a_queued_short_request_before_an_earlier_long_one() {
    assert!(
        short_overtakes_long("class").await,
        "priority class: the short request, queued 2nd, goes 1st"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_priority_serves_queued_requests_in_arrival_order() {
    assert!(
        !short_overtakes_long("fifo").await,
        "priority fifo: the long request, queued 1st, goes 1st"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_timed_out_queue_answers_503_naming_the_pool() {
    let b1 = Backend::start("b1", &["--latency", "fixed:1ms"]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&b1],
        "    default_max_requests: 1\n    queue: { max_size: 1, timeout: 300ms }\n",
    ));
    let web = node.url("web");
    let blocker = spawn_get(format!("{web}/hold?delay_ms=3000"));
    eventually(DEADLINE, "the blocker at the backend", async || {
        (b1.stats().await["in_flight"] == 1).then_some(())
    })
    .await;
    // Hold the one queue place with a request that will time out, then overflow it.
    let waiting = spawn_get(format!("{web}/wait"));
    until_queued(&node, 1.0).await;
    let (status, body, _) = spawn_get(format!("{web}/overflow"))
        .await
        .expect("overflow");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("pool `app`"), "{message}");

    let (status, body, _) = waiting.await.expect("waiting");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "queue_timeout", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("pool `app`") && message.contains("300 ms"),
        "{message}"
    );
    let (status, _, _) = blocker.await.expect("blocker");
    assert_eq!(status, 200);

    let metrics = node.metrics().await;
    let rejected = |reason: &str| {
        metric(
            &metrics,
            "fulcrum_queue_rejections_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(rejected("full"), 1.0, "{metrics}");
    assert_eq!(rejected("timeout"), 1.0, "{metrics}");
    // Refusals count as errors of their endpoints without a duration.
    let wait = node.endpoint("app", "GET /wait").await;
    assert_eq!(wait["errors"], 1, "{wait}");
    assert_eq!(wait["max_ms"], 0.0, "no duration: {wait}");
    assert_eq!(wait["class"], "unknown", "{wait}");
    // The node still serves once the slot is free.
    let (status, _, _) = spawn_get(format!("{web}/after")).await.expect("after");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_caps_open_connections_and_queues_the_next() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let b1 = Backend::start("b1", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: tcp\n    listen: 127.0.0.1:0\n    protocol: tcp\n    routes:\n      - pool: app\n\
         pools:\n  app:\n    default_max_requests: 1\n    queue: {{ max_size: 1, timeout: 30s }}\n    backends:\n      - address: {}\n",
        b1.addr
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["tcp"];
    // A holds b1's only slot for as long as it stays open, even without sending a byte.
    let first = TcpStream::connect(addr).await.expect("connect A");
    eventually(DEADLINE, "A holds b1's slot", async || {
        let v = node.api("/api/pools/app/backends").await;
        (v["backends"][0]["in_flight"] == 1).then_some(())
    })
    .await;
    // B waits in the queue; its request waits in the socket meanwhile.
    let mut second = TcpStream::connect(addr).await.expect("connect B");
    until_queued(&node, 1.0).await;
    second
        .write_all(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write B");
    // C finds the queue full: closed without a byte.
    let mut third = TcpStream::connect(addr).await.expect("connect C");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, third.read_to_end(&mut buf))
        .await
        .expect("C is closed");
    assert!(
        read.is_err() || buf.is_empty(),
        "C got {:?}",
        String::from_utf8_lossy(&buf)
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "fulcrum_queue_rejections_total",
            "reason=\"full\""
        ),
        1.0,
        "{metrics}"
    );
    // A leaves: B gets the slot and its request through.
    drop(first);
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, second.read_to_end(&mut answer))
        .await
        .expect("B answered before the deadline")
        .expect("read B");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-backend: b1"), "{answer}");
    let metrics = node.metrics().await;
    assert_eq!(
        metric(&metrics, "fulcrum_queued_requests_total", "pool=\"app\""),
        1.0,
        "{metrics}"
    );
}
