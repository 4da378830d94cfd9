//! Smart balancing end to end: long/short classification, hedging, tail-aware balancing,
//! traffic analysis and dynamic weights, through real `fulcrum run` and `fulcrum backend`
//! processes.

mod common;

use std::time::Duration;

use common::{
    Backend, DEADLINE, Load, Node, client, eventually, metric_value, served_by, simple_config,
};

/// GETs `url` and returns which backend served it (asserting a 200).
async fn get_served_by(client: &reqwest::Client, url: &str) -> String {
    let response = client.get(url).send().await.expect("request");
    assert_eq!(response.status(), 200, "GET {url}");
    let by = served_by(&response);
    let _ = response.bytes().await;
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_class_sends_long_endpoint_to_backend_2_and_short_to_backend_1() {
    let b1 = Backend::start("b1", &["--latency", "fixed:1ms"]);
    let b2 = Backend::start("b2", &["--latency", "fixed:1ms"]);
    let node = Node::start(&simple_config(
        "duration_class",
        &[&b1, &b2],
        "    stats: { long_request_threshold: 150ms, stats_window: 3 }\n",
    ));
    let client = client();
    let long_url = format!("{}/v1/jobs/42/run?delay_ms=250", node.url("web"));
    let short_url = format!("{}/v1/users/7", node.url("web"));

    // Build history: the endpoint's last-3 average crosses the threshold.
    for _ in 0..3 {
        get_served_by(&client, &long_url).await;
        get_served_by(&client, &short_url).await;
    }
    // (Tracked with its numeric segment normalised.)
    let long = node.endpoint("app", "GET /v1/jobs/{id}/run").await;
    assert_eq!(long["class"], "long", "{long}");
    let short = node.endpoint("app", "GET /v1/users/{id}").await;
    assert_eq!(short["class"], "short", "{short}");
    assert_eq!(short["count"], 3, "{short}");

    // Classified: long requests go to backend 2, short ones stay on backend 1 — also
    // while a long request is in flight on backend 2.
    for _ in 0..4 {
        assert_eq!(get_served_by(&client, &long_url).await, "b2");
    }
    let in_flight = {
        let (client, url) = (client.clone(), long_url.clone());
        tokio::spawn(async move { get_served_by(&client, &url).await })
    };
    for _ in 0..20 {
        assert_eq!(get_served_by(&client, &short_url).await, "b1");
    }
    assert_eq!(in_flight.await.expect("long request task"), "b2");

    let metrics = node.api("/api/algorithm-metrics").await;
    let pool = &metrics["pools"]["app"];
    assert_eq!(pool["strategy"], "duration_class", "{metrics}");
    assert!(
        pool["figures"]["picks_long"].as_f64().unwrap_or(0.0) >= 5.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_get_completes_from_the_fast_backend() {
    let slow = Backend::start("slow", &["--latency", "fixed:2s"]);
    let fast = Backend::start("fast", &["--latency", "fixed:2ms"]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&slow, &fast],
        "    hedge: { delay: 100ms, budget_percent: 100 }\n",
    ));
    let client = client();
    let url = format!("{}/item", node.url("web"));
    // Round robin sends every other first attempt to the slow backend (a hedge takes no
    // turn of the rotation); each of those is hedged to the fast one after 100 ms, and
    // the fast answer wins.
    for _ in 0..6 {
        assert_eq!(get_served_by(&client, &url).await, "fast");
    }
    let metrics = node.metrics().await;
    let value = |name: &str| {
        metric_value(&metrics, name, "pool=\"app\"")
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert_eq!(value("fulcrum_hedges_total"), 3.0, "{metrics}");
    assert_eq!(value("fulcrum_hedges_won_total"), 3.0, "{metrics}");
    // The slow backend's abandoned attempts are counted as such, not as requests.
    let slow_series = format!("backend=\"{}\"", slow.address());
    assert_eq!(
        metric_value(&metrics, "fulcrum_upstream_cancelled_total", &slow_series),
        Some(3.0),
        "{metrics}"
    );
    let slow_status = node.backend("app", &slow.address()).await;
    assert_eq!(slow_status["cancelled"], 3, "{slow_status}");
    assert_eq!(slow_status["requests"], 0, "{slow_status}");
    // A POST is not idempotent: never hedged, so it waits for the slow backend or
    // goes to the fast one by round robin, but is sent exactly once.
    let before = slow.stats().await["requests"].as_u64().unwrap_or(0)
        + fast.stats().await["requests"].as_u64().unwrap_or(0);
    for _ in 0..2 {
        let response = client
            .post(format!("{}/submit", node.url("web")))
            .body("x")
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 200);
    }
    let after = slow.stats().await["requests"].as_u64().unwrap_or(0)
        + fast.stats().await["requests"].as_u64().unwrap_or(0);
    assert_eq!(after - before, 2, "each POST sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_that_fails_never_turns_a_slow_success_into_an_error() {
    let slow = Backend::start("slow", &["--latency", "fixed:300ms"]);
    let failing = Backend::start("failing", &["--fail-rate", "1"]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&slow, &failing],
        "    hedge: { delay: 50ms, budget_percent: 100 }\n    retry: { attempts: 1, retry_on: [connect_failure, reset, 503] }\n    outlier_detection: { consecutive_failures: 0 }\n",
    ));
    let client = client();
    let url = format!("{}/item", node.url("web"));
    // Every request whose first attempt goes to the slow backend is hedged to the failing
    // one after 50 ms, which answers 503 at once: the client still gets the slow 200.
    // Those that start on the failing backend are retried (on 503) on the slow one.
    for _ in 0..6 {
        let response = client.get(&url).send().await.expect("request");
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "slow");
    }
    let metrics = node.metrics().await;
    let value = |name: &str| metric_value(&metrics, name, "pool=\"app\"").unwrap_or(0.0);
    assert!(value("fulcrum_hedges_total") >= 3.0, "{metrics}");
    assert_eq!(
        value("fulcrum_hedges_won_total"),
        0.0,
        "a failed hedge is not won: {metrics}"
    );
    // The slow backend served every request once: nothing was cancelled or sent twice.
    let slow_status = node.backend("app", &slow.address()).await;
    assert_eq!(slow_status["cancelled"], 0, "{slow_status}");
    assert_eq!(slow.stats().await["requests"], 6, "{slow_status}");
    // The failing backend's answers count as its failures, and as 5xx responses in the
    // metrics, the held-back ones included: 3 first attempts (retried) and 3 hedges.
    let failing_status = node.backend("app", &failing.address()).await;
    assert_eq!(failing_status["errors"], 6, "{failing_status}");
    let failing_5xx = format!("backend=\"{}\",code_class=\"5xx\"", failing.address());
    assert_eq!(
        metric_value(&metrics, "fulcrum_requests_total", &failing_5xx),
        Some(6.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_bodies_within_the_hedge_limit_are_hedged() {
    let slow = Backend::start("slow", &["--latency", "fixed:300ms"]);
    let fast = Backend::start("fast", &["--latency", "fixed:2ms"]);
    // Retries buffer bodies up to 64 KiB (the default); hedges only up to 1 KiB.
    let node = Node::start(&simple_config(
        "round_robin",
        &[&slow, &fast],
        "    hedge: { delay: 50ms, budget_percent: 100, max_body_bytes: 1024 }\n",
    ));
    let client = client();
    let url = format!("{}/item", node.url("web"));
    let hedges = async || {
        metric_value(
            &node.metrics().await,
            "fulcrum_hedges_total",
            "pool=\"app\"",
        )
        .unwrap_or(0.0)
    };
    // Two PUTs each: one of them starts on the slow backend.
    for size in [5000, 1025] {
        for _ in 0..2 {
            let response = client
                .put(&url)
                .body(vec![b'x'; size])
                .send()
                .await
                .expect("put");
            assert_eq!(response.status(), 200);
        }
        assert_eq!(hedges().await, 0.0, "a {size}-byte body is not hedged");
    }
    for _ in 0..2 {
        let response = client
            .put(&url)
            .body(vec![b'x'; 1024])
            .send()
            .await
            .expect("put");
        assert_eq!(served_by(&response), "fast");
    }
    assert_eq!(hedges().await, 1.0, "a 1024-byte body is hedged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_aware_moves_traffic_off_a_stalled_backend() {
    let b1 = Backend::start("b1", &["--latency", "fixed:2ms"]);
    let b2 = Backend::start("b2", &["--latency", "fixed:2ms"]);
    let b3 = Backend::start("b3", &["--latency", "fixed:2ms"]);
    let node = Node::start(&simple_config("tail_aware", &[&b1, &b2, &b3], ""));
    let url = format!("{}/t", node.url("web"));
    let load = Load::start(&url, 3);
    load.wait_for_more(60).await;
    // b2 stalls: every request it takes now hangs for 3 s.
    b2.control("delay_ms=3000").await;
    let before = load.count_from("b2");
    load.wait_for_more(300).await;
    let outcomes = load.stop().await;
    common::assert_all_ok(&outcomes);
    let stalled = outcomes.iter().filter(|(_, b)| b == "b2").count() - before;
    assert!(
        stalled <= 10,
        "the stalled backend still got {stalled} requests after stalling"
    );

    let metrics = node.api("/api/algorithm-metrics").await;
    let pool = &metrics["pools"]["app"];
    assert_eq!(pool["strategy"], "tail_aware", "{metrics}");
    for figure in [
        "target_p99_ms",
        "current_p99_ms",
        "beta",
        "gamma",
        "hedge_rate",
    ] {
        assert!(pool["figures"][figure].is_number(), "{figure}: {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_endpoint_table_makes_room_after_a_scan() {
    let b = Backend::start("b1", &[]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&b],
        "    stats: { max_endpoints: 3 }\n",
    ));
    let client = client();
    let get = async |path: &str| {
        let response = client
            .get(format!("{}{path}", node.url("web")))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
    };
    // A real endpoint, used twice; then a scan fills the table.
    get("/users").await;
    get("/users").await;
    for path in ["/scan-a", "/scan-b", "/scan-c"] {
        get(path).await;
    }
    get("/orders").await;
    assert_eq!(node.endpoint("app", "* {other}").await["count"], 2);
    // The table holds /users and the first two scanned paths. Within two sweeps (10 s
    // grace, 10 s period) the two one-off requests leave; the real endpoint stays with
    // its statistics and the next new one gets its own entry.
    eventually(
        Duration::from_secs(60),
        "the scan's endpoints are evicted",
        async || {
            let metrics = node.metrics().await;
            (metric_value(&metrics, "fulcrum_endpoints_evicted_total", "pool=\"app\"")? == 2.0)
                .then_some(())
        },
    )
    .await;
    get("/orders").await;
    assert_eq!(node.endpoint("app", "GET /orders").await["count"], 1);
    assert_eq!(node.endpoint("app", "GET /users").await["count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_rate_spike_is_reported_as_an_anomaly() {
    let b1 = Backend::start("b1", &["--latency", "fixed:1ms"]);
    let node = Node::start(&simple_config(
        "round_robin",
        &[&b1],
        "    analysis: { anomaly_threshold: 4.0, min_rate: 5 }\n",
    ));
    let client = client();
    let url = format!("{}/steady", node.url("web"));

    // A steady ~20 req/s until the analysis has a forecast (warm-up of 10 s)…
    let warm = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    while warm.elapsed() < Duration::from_secs(13) {
        ticker.tick().await;
        get_served_by(&client, &url).await;
    }
    let before = node.api("/api/pools/app/analysis").await;
    assert!(before["forecast"].is_number(), "{before}");
    assert!(
        before["anomalies"].as_array().is_some_and(|a| a.is_empty()),
        "no anomaly in steady traffic: {before}"
    );

    // …then a burst of a few hundred requests at once.
    let burst = Load::start(&url, 16);
    burst.wait_for_more(600).await;
    common::assert_all_ok(&burst.stop().await);

    let analysis = eventually(DEADLINE, "a spike in the analysis", async || {
        let analysis = node.api("/api/pools/app/analysis").await;
        let spiked = analysis["anomalies"]
            .as_array()?
            .iter()
            .any(|a| a["kind"] == "spike");
        spiked.then_some(analysis)
    })
    .await;
    assert!(
        analysis["series"].as_array().is_some_and(|s| s.len() >= 10),
        "{analysis}"
    );
    // Reported as an episode: its span, whether it is over, and its peak.
    let spike = analysis["anomalies"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["kind"] == "spike"))
        .expect("a spike, found above");
    assert!(
        spike["peak_rate"].as_f64() >= spike["forecast"].as_f64(),
        "{spike}"
    );
    assert!(spike["duration_secs"].as_u64() >= Some(1), "{spike}");
    assert!(spike["seconds"].as_u64() >= Some(1), "{spike}");
    assert_eq!(
        spike["ongoing"].as_bool(),
        Some(spike["end_second"].is_null()),
        "{spike}"
    );
    assert!(
        node.metrics()
            .await
            .contains("fulcrum_traffic_anomalies_total{pool=\"app\",kind=\"spike\"}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_weights_lower_a_slow_backend_next_to_its_configured_weight() {
    let fast = Backend::start("fast", &["--latency", "fixed:2ms"]);
    let slow = Backend::start("slow", &["--latency", "fixed:40ms"]);
    let node = Node::start(&simple_config(
        "weighted_round_robin",
        &[&fast, &slow],
        "    dynamic_weights: { enabled: true, interval: 200ms }\n",
    ));
    let load = Load::start(&format!("{}/d", node.url("web")), 4);
    let slow_addr = slow.address();
    let backends = eventually(DEADLINE, "the slow backend's weight to drop", async || {
        let backends = node.api("/api/pools/app/backends").await;
        let slow = backends["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == slow_addr.as_str())?
            .clone();
        (slow["effective_weight"].as_f64()? < 0.8).then_some(backends)
    })
    .await;
    common::assert_all_ok(&load.stop().await);
    for b in backends["backends"].as_array().expect("backends") {
        assert_eq!(b["weight"], 1, "configured weight shown: {b}");
        let effective = b["effective_weight"].as_f64().expect("effective weight");
        assert!((0.1..=10.0).contains(&effective), "bounded: {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_weights_lower_a_stalled_backend_whose_requests_never_complete() {
    let backends: Vec<Backend> = ["b1", "b2", "b3"]
        .iter()
        .map(|name| Backend::start(name, &["--latency", "fixed:2ms"]))
        .collect();
    let node = Node::start(&simple_config(
        "weighted_round_robin",
        &backends.iter().collect::<Vec<_>>(),
        "    dynamic_weights: { enabled: true, interval: 200ms, smoothing: 0.5 }\n    outlier_detection: { consecutive_failures: 0 }\n",
    ));
    // Clients that give up after 1 s, as the operator's did: an abandoned request leaves
    // no outcome, so only the age of the requests in flight shows the stall.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = format!("{}/d", node.url("web"));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, url) = (std::sync::Arc::clone(&stop), url.clone());
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("client");
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(response) = client.get(&url).send().await {
                        let _ = response.bytes().await;
                    }
                }
            })
        })
        .collect();
    let factors = async || -> Option<Vec<(String, f64)>> {
        let analysis = node.api("/api/pools/app/analysis").await;
        analysis["weights"]
            .as_array()?
            .iter()
            .map(|w| {
                Some((
                    w["address"].as_str()?.to_owned(),
                    w["dynamic_factor"].as_f64()?,
                ))
            })
            .collect()
    };
    // Traffic flows through all three first.
    eventually(DEADLINE, "requests on every backend", async || {
        let backends = node.api("/api/pools/app/backends").await;
        let all = backends["backends"].as_array()?;
        all.iter()
            .all(|b| b["requests"].as_u64().unwrap_or(0) >= 20)
            .then_some(())
    })
    .await;

    backends[2].control("latency=fixed:60s").await;
    let stalled = backends[2].address();
    let seen = eventually(
        DEADLINE,
        "the stalled backend's factor to fall below the healthy ones",
        async || {
            let factors = factors().await?;
            let (own, others): (Vec<_>, Vec<_>) =
                factors.iter().partition(|(address, _)| *address == stalled);
            let own = own.first()?.1;
            (own < 0.5 && others.iter().all(|(_, f)| *f > own)).then_some(factors)
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }
    for (address, factor) in &seen {
        assert!((0.1..=10.0).contains(factor), "{address}: {factor} bounded");
    }
}
