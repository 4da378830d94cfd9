//! Each strategy's distribution over three real backends, through a real node.

mod common;

use common::{Backend, Load, Node, client, served_by, simple_config, spread, weighted_config};

fn three(args: &[&str]) -> [Backend; 3] {
    [
        Backend::start("b1", args),
        Backend::start("b2", args),
        Backend::start("b3", args),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact() {
    let [b1, b2, b3] = three(&[]);
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2, &b3], ""));
    let client = client();
    let mut order = Vec::new();
    for _ in 0..30 {
        let response = client
            .get(format!("{}/rr", node.url("web")))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        order.push(served_by(&response));
    }
    // Each window of three consecutive requests hits all three backends, in a fixed cycle.
    for (i, name) in order.iter().enumerate().skip(3) {
        assert_eq!(name, &order[i - 3], "order {order:?}");
    }
    let mut first: Vec<_> = order[..3].to_vec();
    first.sort();
    assert_eq!(first, ["b1", "b2", "b3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let [b1, b2, b3] = three(&[]);
    let node = Node::start(&weighted_config(
        "weighted_round_robin",
        &[(&b1, 3), (&b2, 2), (&b3, 1)],
    ));
    // Smooth WRR is exact over whole cycles of 6.
    let counts = spread(&format!("{}/w", node.url("web")), 60).await;
    assert_eq!(counts.get("b1"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("b3"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_follows_weights_within_tolerance() {
    let [b1, b2, b3] = three(&[]);
    let node = Node::start(&weighted_config("random", &[(&b1, 1), (&b2, 1), (&b3, 2)]));
    let n = 800;
    let counts = spread(&format!("{}/r", node.url("web")), n).await;
    // Expected shares 25 %, 25 %, 50 %; ±8 points is > 4 standard deviations at n = 800.
    for (name, share) in [("b1", 0.25), ("b2", 0.25), ("b3", 0.5)] {
        let got = *counts.get(name).unwrap_or(&0) as f64 / n as f64;
        assert!(
            (got - share).abs() < 0.08,
            "{name}: {got:.3} vs {share} ({counts:?})"
        );
    }
}

/// With one backend holding slow requests, in-flight-aware strategies send almost
/// everything to the idle ones; round robin would send it a third.
async fn avoids_backend_holding_slow_requests(strategy: &str) {
    let slow = Backend::start("slow", &["--latency", "fixed:2s"]);
    let fast1 = Backend::start("fast1", &["--latency", "fixed:2ms"]);
    let fast2 = Backend::start("fast2", &["--latency", "fixed:2ms"]);
    let node = Node::start(&simple_config(strategy, &[&slow, &fast1, &fast2], ""));
    let load = Load::start(&format!("{}/work", node.url("web")), 3);
    load.wait_for_more(150).await;
    let outcomes = load.stop().await;
    common::assert_all_ok(&outcomes);
    let from_slow = outcomes.iter().filter(|(_, b)| b == "slow").count();
    let share = from_slow as f64 / outcomes.len() as f64;
    assert!(
        share < 0.15,
        "{strategy}: slow backend served {from_slow} of {} requests",
        outcomes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_prefers_idle_backends() {
    avoids_backend_holding_slow_requests("least_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_prefers_idle_backends() {
    avoids_backend_holding_slow_requests("p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_moves_traffic_away_from_a_slowed_backend() {
    let [b1, b2, b3] = three(&["--latency", "fixed:2ms"]);
    let node = Node::start(&simple_config("peak_ewma", &[&b1, &b2, &b3], ""));
    let url = format!("{}/e", node.url("web"));
    // Warm up: every backend gets observed.
    let warm = spread(&url, 60).await;
    assert_eq!(warm.len(), 3, "all backends used while equal: {warm:?}");

    b2.control("delay_ms=300").await;
    // Sequential requests: the first ones to b2 reveal its latency; after that P2C on the
    // latency estimate keeps it out of nearly every pair it is drawn in.
    let after = spread(&url, 90).await;
    let to_b2 = *after.get("b2").unwrap_or(&0);
    assert!(
        to_b2 <= 9,
        "b2 got {to_b2} of 90 after slowing down: {after:?}"
    );
    assert!(
        after.contains_key("b1") && after.contains_key("b3"),
        "{after:?}"
    );
}
