//! Failover: a backend killed under load, detected, avoided, and re-admitted.

mod common;

use common::{Backend, DEADLINE, Load, Node, assert_all_ok, eventually, simple_config};
use std::time::Duration;

const HEALTH: &str =
    "    health_check: { path: /health, interval: 200ms, timeout: 150ms, rise: 2, fall: 2 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_avoided_without_client_errors_and_readmitted() {
    let b1 = Backend::start("b1", &["--latency", "fixed:2ms"]);
    let mut b2 = Backend::start("b2", &["--latency", "fixed:2ms"]);
    let b3 = Backend::start("b3", &["--latency", "fixed:2ms"]);
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2, &b3], HEALTH));
    let b2_address = b2.address();

    let load = Load::start(&format!("{}/steady", node.url("web")), 4);
    load.wait_for_more(200).await;
    assert!(
        load.count_from("b2") > 0,
        "b2 served traffic before the kill"
    );

    b2.kill();
    eventually(DEADLINE, "b2 reported unhealthy", async || {
        (node.backend_state("app", &b2_address).await == "unhealthy").then_some(())
    })
    .await;
    // Traffic keeps flowing to the others meanwhile.
    load.wait_for_more(200).await;

    b2.restart();
    eventually(DEADLINE, "b2 healthy again", async || {
        (node.backend_state("app", &b2_address).await == "healthy").then_some(())
    })
    .await;
    let before = load.count_from("b2");
    eventually(DEADLINE, "b2 gets traffic again", async || {
        (load.count_from("b2") > before + 20).then_some(())
    })
    .await;

    let outcomes = load.stop().await;
    assert_all_ok(&outcomes);
    assert!(outcomes.len() > 500, "only {} requests", outcomes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_backend_and_readmits_it() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let bad = Backend::start("bad", &[]);
    let extra = "    outlier_detection: { consecutive_failures: 3, base_ejection_time: 1s, max_ejection_percent: 50 }\n\
                 \x20   retry: { attempts: 2, retry_on: [connect_failure, reset, 503] }\n";
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2, &bad], extra));
    bad.control("fail=1").await;

    // Every 503 from `bad` is retried elsewhere, so clients see only 200s; three in a row
    // eject it.
    let load = Load::start(&format!("{}/x", node.url("web")), 2);
    eventually(DEADLINE, "bad ejected", async || {
        (node.backend_state("app", &bad.address()).await == "ejected").then_some(())
    })
    .await;
    let backends = node.api("/api/pools/app/backends").await;
    let entry = backends["backends"]
        .as_array()
        .expect("array")
        .iter()
        .find(|b| b["address"] == bad.address())
        .cloned();
    let entry = entry.expect("bad listed");
    assert!(entry["ejections"].as_u64() >= Some(1), "{entry}");
    assert_eq!(entry["in_rotation"], false);

    // Once healthy again, the ejection expires and it is re-admitted.
    bad.control("fail=0").await;
    eventually(DEADLINE, "bad re-admitted", async || {
        (node.backend_state("app", &bad.address()).await == "healthy").then_some(())
    })
    .await;
    let before = load.count_from("bad");
    eventually(DEADLINE, "bad serves again", async || {
        (load.count_from("bad") > before).then_some(())
    })
    .await;
    let outcomes = load.stop().await;
    assert_all_ok(&outcomes);

    let metrics = node.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("fulcrum_ejections_total") && l.contains(&bad.address()))
        .unwrap_or_else(|| panic!("no ejection series for bad in:\n{metrics}"));
    assert!(!line.ends_with(" 0"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_failing_gives_a_json_502_and_no_backend_gives_503() {
    let mut b1 = Backend::start("b1", &[]);
    let mut b2 = Backend::start("b2", &[]);
    let extra = "    outlier_detection: { consecutive_failures: 0 }\n";
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2], extra));
    b1.kill();
    b2.kill();
    let response = common::client()
        .get(format!("{}/gone", node.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.expect("json error");
    assert_eq!(body["error"]["code"], "upstream_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("connect"),
        "{body}"
    );
    // Clients are not told the backends' addresses.
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("127.0.0.1"),
        "the backend address leaked to the client: {body}"
    );

    for b in [&b1, &b2] {
        let (status, _) = node
            .api_post(&format!("/api/pools/app/backends/{}/disable", b.addr), None)
            .await;
        assert_eq!(status, 200);
    }
    let response = common::client()
        .get(format!("{}/none", node.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("json error");
    assert_eq!(body["error"]["code"], "no_backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_routes_to_all_when_too_few_are_healthy() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let b3 = Backend::start("b3", &[]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&b1, &b2, &b3],
        &format!("{HEALTH}    panic_threshold: 50\n"),
    ));
    // Two of three failing their health checks: 33 % healthy, below a 50 % panic
    // threshold. Their /health fails but they still serve requests.
    b1.control("healthy=false").await;
    b2.control("healthy=false").await;
    eventually(DEADLINE, "pool in panic mode", async || {
        let pools = node.api("/api/pools").await;
        (pools["pools"][0]["panic"] == true && pools["pools"][0]["backends"]["unhealthy"] == 2)
            .then_some(())
    })
    .await;
    let counts = common::spread(&format!("{}/p", node.url("web")), 30).await;
    assert_eq!(
        counts.len(),
        3,
        "panic mode routes to every backend: {counts:?}"
    );

    // One recovers: 67 % healthy, panic ends, unhealthy b2 gets nothing.
    b1.control("healthy=true").await;
    eventually(DEADLINE, "panic over", async || {
        (node.api("/api/pools").await["pools"][0]["panic"] == false).then_some(())
    })
    .await;
    let counts = common::spread(&format!("{}/p", node.url("web")), 30).await;
    assert!(!counts.contains_key("b2"), "{counts:?}");
    assert_eq!(counts.get("b1"), Some(&15), "{counts:?}");
}

/// A reload that removes `health_check` takes a failed check's verdict with it: the
/// backend is back in rotation (as backends without checks are), not held out forever
/// by a flag nothing clears any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_health_checks_readmits_a_backend_they_had_failed() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2], HEALTH));
    b1.control("healthy=false").await;
    eventually(DEADLINE, "b1 unhealthy", async || {
        (node.backend_state("app", &b1.address()).await == "unhealthy").then_some(())
    })
    .await;
    let (status, body) = node
        .reload(&node.pin_addresses(&simple_config("round_robin", &[&b1, &b2], "")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(node.backend_state("app", &b1.address()).await, "healthy");
    let counts = common::spread(&format!("{}/h", node.url("web")), 10).await;
    assert_eq!(counts.get("b1"), Some(&5), "{counts:?}");
}

/// A reload that turns outlier detection off ends its running ejections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_outlier_detection_off_lifts_its_ejections() {
    let b1 = Backend::start("b1", &[]);
    let bad = Backend::start("bad", &[]);
    let outlier = |n: u32| {
        format!("    outlier_detection: {{ consecutive_failures: {n}, base_ejection_time: 5m }}\n")
    };
    let node = Node::start(&simple_config("round_robin", &[&b1, &bad], &outlier(1)));
    bad.control("fail=1").await;
    eventually(DEADLINE, "bad ejected", async || {
        let _ = common::client()
            .get(format!("{}/o", node.url("web")))
            .send()
            .await;
        (node.backend_state("app", &bad.address()).await == "ejected").then_some(())
    })
    .await;
    bad.control("fail=0").await;
    let (status, body) = node
        .reload(&node.pin_addresses(&simple_config("round_robin", &[&b1, &bad], &outlier(0))))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(node.backend_state("app", &bad.address()).await, "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_detects_a_dead_backend_and_readmits_it() {
    let b1 = Backend::start("b1", &[]);
    let mut b2 = Backend::start("b2", &[]);
    let tcp =
        "    health_check: { type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 1 }\n";
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2], tcp));
    let address = b2.address();
    b2.kill();
    eventually(DEADLINE, "b2 unhealthy", async || {
        (node.backend_state("app", &address).await == "unhealthy").then_some(())
    })
    .await;
    let counts = common::spread(&format!("{}/t", node.url("web")), 10).await;
    assert_eq!(counts.get("b1"), Some(&10), "{counts:?}");
    b2.restart();
    eventually(DEADLINE, "b2 healthy", async || {
        (node.backend_state("app", &address).await == "healthy").then_some(())
    })
    .await;
}

/// Reads one request head from a raw test backend's connection, up to its empty line (or
/// the connection's end); returns its `Content-Length` (0 without one).
fn read_head(reader: &mut std::io::BufReader<std::net::TcpStream>) -> usize {
    use std::io::BufRead;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            return length;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
}

/// A backend that reads each request (head and `Content-Length` body) and closes the
/// connection without answering: a reset after the request was sent.
fn closing_backend() -> std::net::SocketAddr {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            let length = read_head(&mut reader);
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_requests_with_small_bodies_are_retried_with_their_body() {
    let closing = closing_backend();
    let echo = Backend::start("echo", &[]);
    let yaml = |extra: &str| {
        format!(
            "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: round_robin\n    outlier_detection: {{ consecutive_failures: 0 }}\n    retry: {{ attempts: 1{extra} }}\n    backends:\n      - address: {closing}\n      - address: {}\n",
            echo.addr
        )
    };
    let client = common::client();

    // PUT is idempotent: reset after it was sent, retried on the other backend with the
    // same body (round robin starts on the closing backend).
    let node = Node::start(&yaml(""));
    let response = client
        .put(format!("{}/echo", node.url("web")))
        .body("put-body-1")
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "put-body-1");
    // POST is not retried once sent, unless retry_non_idempotent.
    let post = |node: &Node| {
        client
            .post(format!("{}/echo", node.url("web")))
            .body("post-body-2")
            .send()
    };
    let response = post(&node).await.expect("post");
    assert_eq!(
        response.status(),
        200,
        "round robin: the echo backend's turn"
    );
    let response = post(&node).await.expect("post");
    assert_eq!(response.status(), 502);
    let node = Node::start(&yaml(", retry_non_idempotent: true"));
    let response = post(&node).await.expect("post");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "post-body-2");
    // With buffering off, a sent PUT is not retried.
    let node = Node::start(&yaml(", max_body_bytes: 0"));
    let response = client
        .put(format!("{}/echo", node.url("web")))
        .body("put-body-3")
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), 502);
}

/// A backend that answers every request with `200`, `Content-Length: 100` and 3 bytes,
/// then closes the connection: a response cut short after its head.
fn truncating_backend() -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            read_head(&mut reader);
            let mut stream = reader.into_inner();
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc");
        }
    });
    addr
}

/// A response the backend cuts short (fewer bytes than its `Content-Length`, then the
/// connection closed) is the backend's failure, though its head was a 200: counted in
/// its errors and `fulcrum_upstream_errors_total{kind="body"}`, its endpoint's errors,
/// and outlier detection ejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_is_the_backends_failure() {
    let backend = truncating_backend();
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    outlier_detection: {{ consecutive_failures: 2 }}\n    backends:\n      - address: {backend}\n"
    ));
    for _ in 0..2 {
        let r = common::client()
            .get(format!("{}/cut", node.url("web")))
            .send()
            .await
            .expect("the head arrives");
        assert_eq!(r.status(), 200);
        assert!(
            r.bytes().await.is_err(),
            "the client sees the body cut short"
        );
    }
    eventually(DEADLINE, "the truncating backend is ejected", async || {
        (node.backend_state("app", &backend.to_string()).await == "ejected").then_some(())
    })
    .await;
    assert_body_failures(&node, backend, 2).await;
    let endpoint = node.endpoint("app", "GET /cut").await;
    assert_eq!(endpoint["errors"].as_u64(), Some(2), "{endpoint}");
}

/// Asserts that pool `app`'s backend at `backend` completed `n` attempts, all failed, and
/// that `fulcrum_upstream_errors_total{kind="body"}` counts the `n`: responses cut short.
async fn assert_body_failures(node: &Node, backend: std::net::SocketAddr, n: u64) {
    let b = node.backend("app", &backend.to_string()).await;
    assert_eq!(
        (b["requests"].as_u64(), b["errors"].as_u64()),
        (Some(n), Some(n)),
        "{b}"
    );
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(
            &metrics,
            "fulcrum_upstream_errors_total",
            &format!(r#"pool="app",backend="{backend}",kind="body""#)
        ),
        Some(n as f64),
        "{metrics}"
    );
}

/// A backend that answers every request with `200` and `Content-Length: 10`, then sends
/// the body one byte every `gap`, or — with `gap` = `None` — sends 3 bytes and then
/// nothing, holding the connection open for a minute: a body that stalls.
fn dribbling_backend(gap: Option<Duration>) -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                read_head(&mut reader);
                let mut stream = reader.into_inner();
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
                match gap {
                    Some(gap) => {
                        for _ in 0..10 {
                            std::thread::sleep(gap);
                            let _ = stream.write_all(b"x");
                        }
                    }
                    None => {
                        let _ = stream.write_all(b"abc");
                        std::thread::sleep(Duration::from_secs(60));
                    }
                }
            });
        }
    });
    addr
}

/// A backend that stops sending its body is cut off after `timeouts.read`: the client
/// gets the response cut short (not a hang), and it is the backend's failure
/// (`kind="body"`). A body that keeps coming, however slowly, is never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_after_the_read_timeout() {
    let stalled = dribbling_backend(None);
    let steady = dribbling_backend(Some(Duration::from_millis(150)));
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - match: {{ path_prefix: /steady }}\n        pool: steady\n      - pool: app\npools:\n  app:\n    timeouts: {{ read: 500ms }}\n    outlier_detection: {{ consecutive_failures: 0 }}\n    backends:\n      - address: {stalled}\n  steady:\n    timeouts: {{ read: 500ms }}\n    backends:\n      - address: {steady}\n"
    ));
    let response = common::client()
        .get(format!("{}/stall", node.url("web")))
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), 200);
    // The client's own timeout is DEADLINE: an error that is not it is the cut.
    let error = response.bytes().await.expect_err("the body is cut short");
    assert!(!error.is_timeout(), "the client timed out first: {error}");
    assert_body_failures(&node, stalled, 1).await;
    // Ten bytes 150 ms apart, 1.5 s in all, three times the read timeout.
    let body = common::client()
        .get(format!("{}/steady", node.url("web")))
        .send()
        .await
        .expect("the head arrives")
        .bytes()
        .await
        .expect("a slow but steady body is not cut");
    assert_eq!(&body[..], b"xxxxxxxxxx");
}

/// A refused connection is retried on another backend whatever the retry budget (no
/// backend worked on the request); retries of answered requests stay within it, and
/// those it refuses are counted in `fulcrum_retry_budget_exhausted_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_outside_the_retry_budget() {
    let mut dead = Backend::start("dead", &[]);
    let live = Backend::start("live", &[]);
    let failing = Backend::start("failing", &["--fail-rate", "1"]);
    let live2 = Backend::start("live2", &[]);
    dead.kill();
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - match: {{ path_prefix: /fail }}\n        pool: fail\n      - pool: app\npools:\n  app:\n    outlier_detection: {{ consecutive_failures: 0 }}\n    retry: {{ attempts: 2, budget_percent: 0, min_retry_concurrency: 0 }}\n    backends:\n      - address: {}\n      - address: {}\n  fail:\n    outlier_detection: {{ consecutive_failures: 0 }}\n    retry: {{ attempts: 2, budget_percent: 0, min_retry_concurrency: 0, retry_on: [503] }}\n    backends:\n      - address: {}\n      - address: {}\n",
        dead.addr, live.addr, failing.addr, live2.addr
    ));
    let counts = common::spread(&format!("{}/ok", node.url("web")), 20).await;
    assert_eq!(counts.get("live"), Some(&20), "{counts:?}");
    let client = common::client();
    let mut refused = 0;
    for _ in 0..10 {
        let response = client
            .get(format!("{}/fail", node.url("web")))
            .send()
            .await
            .expect("request");
        match response.status().as_u16() {
            200 => {}
            503 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // Round robin sends every other request to the failing backend first.
    assert_eq!(refused, 5);
    let metrics = node.metrics().await;
    let value = |name: &str, pool: &str| {
        common::metric_value(&metrics, name, &format!(r#"pool="{pool}""#)).unwrap_or(0.0)
    };
    assert_eq!(value("fulcrum_retries_total", "app"), 10.0, "{metrics}");
    assert_eq!(
        value("fulcrum_retry_budget_exhausted_total", "app"),
        0.0,
        "{metrics}"
    );
    assert_eq!(value("fulcrum_retries_total", "fail"), 0.0, "{metrics}");
    assert_eq!(
        value("fulcrum_retry_budget_exhausted_total", "fail"),
        5.0,
        "{metrics}"
    );
}
