//! Run-time operations through the admin API, under load: strategy switches, drain,
//! disable/enable, reload; and the API's error responses.

mod common;

use common::{
    Backend, DEADLINE, Load, Node, Spawned, assert_all_ok, client, eventually, fulcrum_bin,
    simple_config,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategy_switches_and_drain_under_load_drop_nothing() {
    let b1 = Backend::start("b1", &["--latency", "fixed:2ms"]);
    let b2 = Backend::start("b2", &["--latency", "fixed:2ms"]);
    let b3 = Backend::start("b3", &["--latency", "fixed:2ms"]);
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2, &b3], ""));
    let load = Load::start(&format!("{}/busy", node.url("web")), 4);
    load.wait_for_more(100).await;

    for strategy in [
        "weighted_round_robin",
        "random",
        "least_connections",
        "p2c",
        "peak_ewma",
        "round_robin",
    ] {
        let (status, body) = node
            .api_post(
                "/api/pools/app/strategy",
                Some(json!({ "strategy": strategy })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["strategy"], strategy);
        let pools = node.api("/api/pools").await;
        assert_eq!(pools["pools"][0]["strategy"], strategy);
        load.wait_for_more(50).await;
    }

    // Drain b1: it finishes what it has and gets nothing new.
    let (status, body) = node
        .api_post(&format!("/api/pools/app/backends/{}/drain", b1.addr), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "draining");
    eventually(DEADLINE, "b1 has nothing in flight", async || {
        let v = node.api("/api/pools/app/backends").await;
        let b = v["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == b1.address())?
            .clone();
        (b["in_flight"] == 0).then_some(())
    })
    .await;
    let drained_at = load.count_from("b1");
    load.wait_for_more(300).await;
    assert_eq!(
        load.count_from("b1"),
        drained_at,
        "a drained backend got new requests"
    );

    // Disable b2 as well: everything goes to b3.
    let (status, _) = node
        .api_post(
            &format!("/api/pools/app/backends/{}/disable", b2.addr),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(node.backend_state("app", &b2.address()).await, "disabled");
    let (b2_before, b3_before) = (load.count_from("b2"), load.count_from("b3"));
    load.wait_for_more(200).await;
    assert!(
        load.count_from("b2") <= b2_before + 4,
        "disabled b2 kept getting traffic"
    );
    assert!(load.count_from("b3") >= b3_before + 190);

    // Enable both: traffic returns.
    for b in [&b1, &b2] {
        let (status, body) = node
            .api_post(&format!("/api/pools/app/backends/{}/enable", b.addr), None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["state"], "healthy");
    }
    let before = load.count_from("b1");
    eventually(DEADLINE, "b1 serves again", async || {
        (load.count_from("b1") > before + 10).then_some(())
    })
    .await;

    assert_all_ok(&load.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_errors_are_json_with_the_right_status() {
    let b1 = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b1], ""));
    let c = client();

    // 422: well-formed request, unknown strategy; the message lists the valid ones.
    let (status, body) = node
        .api_post(
            "/api/pools/app/strategy",
            Some(json!({ "strategy": "fastest" })),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], "unknown_strategy");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("peak_ewma"),
        "{body}"
    );

    // 400: malformed body.
    let response = c
        .post(node.admin_url("/api/pools/app/strategy"))
        .header("content-type", "application/json")
        .body("{\"strategy\": ")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "bad_request");
    let (status, body) = node
        .api_post("/api/pools/app/strategy", Some(json!({ "strat": "p2c" })))
        .await;
    assert_eq!(status, 400, "{body}");
    // 413: a body over the limit; and what axum's extractors refuse (a path segment
    // that is not UTF-8) is JSON too.
    let response = c
        .post(node.admin_url("/api/pools/app/strategy"))
        .header("content-type", "application/json")
        .body(format!("{{\"strategy\": \"{}\"}}", "x".repeat(3 << 20)))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    // (A new client: the server closed the connection it refused the big body on.)
    let response = client()
        .get(node.admin_url("/api/pools/%ff/backends"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("UTF-8"),
        "{body}"
    );

    // 404: unknown pool, unknown backend, unknown path.
    let (status, body) = node
        .api_post(
            "/api/pools/nope/strategy",
            Some(json!({ "strategy": "p2c" })),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "unknown_pool");
    let (status, body) = node
        .api_post("/api/pools/app/backends/127.0.0.1:1/drain", None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "unknown_backend");
    let response = c
        .get(node.admin_url("/api/pools/nope/backends"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    let response = c
        .get(node.admin_url("/api/nothing"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found");

    // 405: wrong method.
    let response = c
        .get(node.admin_url("/api/pools/app/strategy"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 405);

    // Status and metrics.
    let status = node.api("/api/status").await;
    assert_eq!(status["listeners"][0]["name"], "web");
    let metrics = node.metrics().await;
    for family in [
        "fulcrum_requests_total",
        "fulcrum_request_duration_seconds",
        "fulcrum_backend_up",
        "fulcrum_backend_in_flight",
        "fulcrum_retries_total",
        "fulcrum_ejections_total",
    ] {
        assert!(
            metrics.contains(family),
            "{family} missing from /metrics:\n{metrics}"
        );
    }
    // A single node exports no cluster families (no "store down" on every node).
    assert!(!metrics.contains("fulcrum_cluster_"), "{metrics}");
    // Without an Accept asking for OpenMetrics: the Prometheus text format 0.0.4, whose
    // counter families carry their `_total` and which has no `# EOF`.
    assert!(
        metrics.contains("# TYPE fulcrum_requests_total counter"),
        "{metrics}"
    );
    assert!(!metrics.contains("# EOF"), "{metrics}");
    let response = c
        .get(node.admin_url("/metrics"))
        .header("accept", "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    // Prometheus's own Accept gets OpenMetrics.
    let response = c
        .get(node.admin_url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let openmetrics = response.text().await.expect("text");
    assert!(
        openmetrics.contains("# TYPE fulcrum_requests counter"),
        "{openmetrics}"
    );
    assert!(openmetrics.trim_end().ends_with("# EOF"), "{openmetrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_need_the_bearer_token() {
    let b1 = Backend::start("b1", &[]);
    let yaml = simple_config("round_robin", &[&b1], "").replace(
        "  listen: 127.0.0.1:0\nlisteners",
        "  listen: 127.0.0.1:0\n  token: s3cret\nlisteners",
    );
    let node = Node::start(&yaml);
    let (status, body) = node
        .api_post(
            "/api/pools/app/strategy",
            Some(json!({ "strategy": "p2c" })),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let response = client()
        .post(node.admin_url("/api/pools/app/strategy"))
        .json(&json!({ "strategy": "p2c" }))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer realm=\"fulcrum-admin\""[..])
    );
    let response = client()
        .post(node.admin_url("/api/pools/app/strategy"))
        .bearer_auth("wrong")
        .json(&json!({ "strategy": "p2c" }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
    let response = client()
        .post(node.admin_url("/api/pools/app/strategy"))
        .header("authorization", "bearer s3cret")
        .json(&json!({ "strategy": "p2c" }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    // Reads stay open.
    node.api("/api/pools").await;
}

/// A backend named in another spelling — host name case, another notation of the same IP
/// address — is the listed backend, for every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_is_found_whatever_the_spelling_of_its_address() {
    let b1 = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b1], ""));
    let port = b1.addr.port();
    let add = |address: String| {
        let node = &node;
        async move {
            node.api_post(
                "/api/pools/app/backends",
                Some(json!({ "address": address })),
            )
            .await
        }
    };
    let (status, body) = add(format!("[::1]:{port}")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = add(format!("[0:0::1]:{port}")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "duplicate_backend", "{body}");
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/[0:0:0::1]:{port}/drain"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["backend"], format!("[::1]:{port}"), "{body}");
    assert_eq!(
        node.backend("app", &format!("[::1]:{port}")).await["state"],
        "draining"
    );
    let (status, body) = add(format!("LOCALHOST:{port}")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/localhost:{port}/weight"),
            Some(json!({ "weight": 3 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        node.backend("app", &format!("LOCALHOST:{port}")).await["weight"],
        3
    );
    let response = client()
        .delete(node.admin_url(&format!("/api/pools/app/backends/Localhost:{port}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 200);
}

/// A file that is valid on its own but that run-time changes make invalid is refused with
/// a message naming those changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_because_of_run_time_changes_names_them() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let extra = |short: &Backend| {
        format!(
            "    duration_class: {{ short_backends: [\"{}\"] }}\n",
            short.address()
        )
    };
    let node = Node::start(&simple_config("duration_class", &[&b1, &b2], &extra(&b1)));
    let response = client()
        .delete(node.admin_url(&format!("/api/pools/app/backends/{}", b2.address())))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 200);
    let next = node.pin_addresses(&simple_config("duration_class", &[&b1, &b2], &extra(&b2)));
    let (status, body) = node.reload(&next).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("short_backends"), "{message}");
    assert!(
        message.contains("run-time changes made through the admin API make it invalid"),
        "{message}"
    );
    assert!(message.contains(&b2.address()), "{message}");
}

/// A change a web page could send on the operator's behalf — a cross-site form post, a
/// fetch from another origin, a DNS-rebound name — is refused and changes nothing;
/// `curl` and the dashboard's own requests still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_web_page_could_send_are_refused() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b1, &b2], ""));
    let disable = node.admin_url(&format!("/api/pools/app/backends/{}/disable", b1.address()));
    let port = disable
        .split(':')
        .nth(2)
        .and_then(|rest| rest.split('/').next())
        .expect("admin URL has a port")
        .to_owned();
    let attempts = [
        (
            vec![(
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            )],
            Some("a=b"),
            415,
            "unsupported_media_type",
        ),
        (
            vec![("content-type", "text/plain".to_owned())],
            None,
            415,
            "unsupported_media_type",
        ),
        (
            vec![("origin", "http://evil.example".to_owned())],
            None,
            403,
            "cross_site",
        ),
        (
            vec![("sec-fetch-site", "cross-site".to_owned())],
            None,
            403,
            "cross_site",
        ),
        (
            vec![("host", format!("rebound.example:{port}"))],
            None,
            403,
            "host_not_allowed",
        ),
    ];
    for (headers, body, status, code) in attempts {
        let mut request = client().post(&disable);
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), status, "{headers:?}");
        let body: serde_json::Value = response.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], code, "{headers:?}: {body}");
        let b1v = node.backend("app", &b1.address()).await;
        assert_eq!(b1v["state"], "healthy", "{headers:?} changed it: {b1v}");
    }
    // The dashboard's request (same origin) and curl's (no origin, no type) pass.
    let origin = format!("http://127.0.0.1:{port}");
    let response = client()
        .post(&disable)
        .header("origin", &origin)
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        node.backend("app", &b1.address()).await["state"],
        "disabled"
    );
    let enable = disable.replace("/disable", "/enable");
    let response = client().post(&enable).send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(node.backend("app", &b1.address()).await["state"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_valid_config_and_refuses_an_invalid_one() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b1], ""));
    let url = format!("{}/r", node.url("web"));
    let before = common::spread(&url, 10).await;
    assert_eq!(before.get("b1"), Some(&10));

    // Same listener (port now known), second backend, new strategy.
    let next = node.pin_addresses(&simple_config("p2c", &[&b1, &b2], ""));
    let (status, body) = node.reload(&next).await;
    assert_eq!(status, 200, "{body}");
    let pools = node.api("/api/pools").await;
    assert_eq!(pools["pools"][0]["strategy"], "p2c");
    // b1's live statistics survived the reload.
    let backends = node.api("/api/pools/app/backends").await;
    let kept = backends["backends"]
        .as_array()
        .expect("array")
        .iter()
        .find(|b| b["address"] == b1.address())
        .cloned();
    assert_eq!(kept.expect("b1 kept")["requests"], 10, "{backends}");
    assert_eq!(pools["pools"][0]["backends"]["total"], 2);
    let after = common::spread(&url, 40).await;
    assert!(after.contains_key("b2"), "{after:?}");

    // An invalid file is refused whole; the running configuration stays.
    let (status, body) = node
        .reload(&next.replace("strategy: p2c", "strategy: fastest"))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains(":"),
        "{body}"
    );
    let pools = node.api("/api/pools").await;
    assert_eq!(pools["pools"][0]["strategy"], "p2c");

    // SIGHUP reloads too.
    std::fs::write(
        node.config.path(),
        next.replace("strategy: p2c", "strategy: least_connections"),
    )
    .expect("rewrite");
    node.signal("HUP");
    eventually(DEADLINE, "SIGHUP reload", async || {
        (node.api("/api/pools").await["pools"][0]["strategy"] == "least_connections").then_some(())
    })
    .await;

    // Settings only a restart applies are named; `log.level` applies at once, unless
    // RUST_LOG is set (as it is here, by the test harness).
    let (status, body) = node
        .reload(&format!(
            "runtime:\n  drain_timeout: 5s\nlog:\n  level: warn\n{}",
            next.replace("strategy: p2c", "strategy: least_connections")
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let summary = body["summary"].as_str().expect("summary");
    assert!(
        summary.contains("changed settings that take effect on restart: runtime"),
        "{summary}"
    );
    assert!(
        summary.contains("log.level `warn` not applied: RUST_LOG is set"),
        "{summary}"
    );

    // A listener setting that only a restart applies: refused, naming what changed.
    let (status, body) = node
        .reload(&next.replace(
            "    routes:",
            "    timeouts: { request_header: 7s }\n    routes:",
        ))
        .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("listener `web`: `timeouts` changed"),
        "{body}"
    );
    // Located at the key, as every other refusal of the file is: the `timeouts` key is
    // on line 6 of the file (admin: 2 lines, listeners:, - name:, listen:).
    let located = format!(
        "{}:6:15: listeners[0].timeouts: listener `web`",
        node.config.path().display()
    );
    assert!(message.contains(&located), "expected `{located}` in {body}");

    // A backend name that does not resolve: refused, located at its field in the file.
    let (status, body) = node
        .reload(&next.replace(&b1.address(), "no-such-host.invalid:80"))
        .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "pools.app.backends[0].address: cannot resolve backend `no-such-host.invalid:80`"
        ),
        "{body}"
    );

    // A pool removed by a reload takes its series with it (its backends' and its own:
    // no frozen request rate for a pool that is gone).
    let with_old = next.replace(
        "    routes:\n",
        "    routes:\n      - match: { path_prefix: /old }\n        pool: old\n",
    ) + &format!("  old:\n    backends:\n      - address: {}\n", b2.address());
    let (status, body) = node.reload(&with_old).await;
    assert_eq!(status, 200, "{body}");
    let r = common::client()
        .get(format!("{}/old", node.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(common::served_by(&r), "b2");
    assert!(node.metrics().await.contains(r#"pool="old""#));
    let (status, body) = node.reload(&next).await;
    assert_eq!(status, 200, "{body}");
    let metrics = node.metrics().await;
    let stale: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains(r#"pool="old""#))
        .collect();
    assert!(stale.is_empty(), "series of the removed pool: {stale:?}");

    // Run-time changes win over the file, and the reload says where: a weight and a
    // strategy set through the API stay when the file changes them.
    let (status, body) = node
        .api_post(
            &format!("/api/pools/app/backends/{}/weight", b2.address()),
            Some(json!({ "weight": 5 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = node
        .api_post(
            "/api/pools/app/strategy",
            Some(json!({ "strategy": "random" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = node
        .reload(&next.replace(
            &format!("address: {}\n", b2.address()),
            &format!("address: {}\n        weight: 3\n", b2.address()),
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let summary = body["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("2 run-time change(s)")
            && summary.contains(&format!(
                "backend `{}`: weight 3 in the file, 5 set at run time",
                b2.address()
            ))
            && summary.contains("pools.app.strategy: `p2c` in the file, `random` set at run time"),
        "{summary}"
    );
    let backends = node.api("/api/pools/app/backends").await;
    let weight = backends["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == b2.address()))
        .map(|b| b["weight"].clone());
    assert_eq!(weight, Some(json!(5)), "{backends}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_the_file_reloads_it_and_a_bad_one_is_refused() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let node = Node::start_with(
        &simple_config("round_robin", &[&b1], ""),
        &["--threads", "1"],
    );
    let path = node.config.path().to_path_buf();
    let strategy = async || {
        node.api("/api/pools").await["pools"][0]["strategy"]
            .as_str()
            .map(str::to_owned)
    };

    // Saved as editors do: a new file renamed over the old one.
    let next = node.pin_addresses(&simple_config("p2c", &[&b1, &b2], ""));
    let staged = path.with_extension("yaml.tmp");
    std::fs::write(&staged, &next).expect("write staged");
    std::fs::rename(&staged, &path).expect("rename over");
    eventually(DEADLINE, "the renamed-over file is loaded", async || {
        (strategy().await.as_deref() == Some("p2c")).then_some(())
    })
    .await;
    let pools = node.api("/api/pools").await;
    assert_eq!(pools["pools"][0]["backends"]["total"], 2, "{pools}");

    // Written in place with a mistake: refused whole, the running configuration stays.
    std::fs::write(&path, next.replace("strategy: p2c", "strategy: p3c")).expect("write");
    eventually(DEADLINE, "the refusal is logged", async || {
        node.logs()
            .contains("file changed: new configuration refused")
            .then_some(())
    })
    .await;
    assert_eq!(strategy().await.as_deref(), Some("p2c"));

    // Fixed in place: loaded.
    std::fs::write(
        &path,
        next.replace("strategy: p2c", "strategy: least_connections"),
    )
    .expect("write");
    eventually(DEADLINE, "the fixed file is loaded", async || {
        (strategy().await.as_deref() == Some("least_connections")).then_some(())
    })
    .await;
}

/// The `Max open files` soft and hard limits of process `pid`, from `/proc/PID/limits`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Runs `fulcrum run` on `yaml` under `ulimit -Sn soft -Hn hard`.
fn run_with_open_file_limits(
    yaml: &str,
    soft: u64,
    hard: u64,
) -> (Spawned, tempfile::NamedTempFile) {
    let config = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp config");
    std::fs::write(config.path(), yaml).expect("write config");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" run --config \"$1\" --threads 1 --no-watch"
        ))
        .arg(fulcrum_bin())
        .arg(config.path())
        .env("RUST_LOG", "info");
    (Spawned::start("fulcrum run (ulimit)", cmd), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_and_max_connections_beyond_it_is_reported() {
    let b = Backend::start("b1", &[]);
    let yaml = simple_config("round_robin", &[&b], "").replacen(
        "    routes:",
        "    max_connections: 300\n    routes:",
        1,
    );

    // The soft limit rises to the hard one; 300 connections fit in 1024 or more
    // descriptors (raising the hard limit needs root: stay within the test's own).
    let hard = open_file_limits(std::process::id()).1.min(4096);
    assert!(
        hard >= 1024,
        "this test needs a hard open-file limit of 1024 or more"
    );
    let (node, _config) = run_with_open_file_limits(&yaml, 256, hard);
    assert_eq!(open_file_limits(node.pid()), (hard, hard));
    let listen = node.ready["listeners"][0]["listen"]
        .as_str()
        .expect("listen")
        .to_owned();
    let response = client()
        .get(format!("http://{listen}/"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert!(
        !node.logs().contains("max_connections need"),
        "{}",
        node.logs()
    );
    drop(node);

    // A hard limit of 512 cannot hold 300 client connections and their backend ones.
    let (node, _config) = run_with_open_file_limits(&yaml, 512, 512);
    assert_eq!(open_file_limits(node.pid()), (512, 512));
    let logs = node.logs();
    assert!(
        logs.contains("the listeners' max_connections need up to 856 open files")
            && logs.contains("the limit is 512"),
        "the node warns that the limit is too low:\n{logs}"
    );
}

/// Runs `fulcrum ctl --admin ADDR ARGS…` with `FULCRUM_ADMIN_TOKEN` set to `env_token`
/// (or unset): exit code, stdout, stderr.
fn ctl(node: &Node, args: &[&str], env_token: Option<&str>) -> (i32, String, String) {
    let mut command = std::process::Command::new(fulcrum_bin());
    command
        .args(["ctl", "--admin", &node.admin.to_string()])
        .args(args)
        .env_remove("FULCRUM_ADMIN_TOKEN");
    if let Some(token) = env_token {
        command.env("FULCRUM_ADMIN_TOKEN", token);
    }
    let out = command.output().expect("run fulcrum ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fulcrum ctl` reads pools, backends and endpoints as tables, and drains, enables,
/// re-weights and switches strategy through the API with the bearer token; refusals are
/// exit 1 with the API's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_shows_pools_and_changes_backends() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let yaml = simple_config("round_robin", &[&b1, &b2], "").replace(
        "  listen: 127.0.0.1:0\nlisteners",
        "  listen: 127.0.0.1:0\n  token: s3cret\nlisteners",
    );
    let node = Node::start(&yaml);
    let url = format!("{}/v1/users/42", node.url("web"));
    let counts = common::spread(&url, 10).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    let (a1, a2) = (b1.address(), b2.address());

    let (code, pools, err) = ctl(&node, &["pools"], None);
    assert_eq!(code, 0, "{err}");
    let row = pools.lines().find(|l| l.starts_with("app ")).expect(&pools);
    assert!(
        row.contains("round_robin") && row.contains("2/2"),
        "{pools}"
    );
    let (code, backends, err) = ctl(&node, &["backends", "app"], None);
    assert_eq!(code, 0, "{err}");
    for address in [&a1, &a2] {
        let row = backends
            .lines()
            .find(|l| l.starts_with(address.as_str()))
            .expect(&backends);
        assert!(row.contains("healthy"), "{backends}");
    }
    let (code, endpoints, err) = ctl(&node, &["endpoints", "--json"], None);
    assert_eq!(code, 0, "{err}");
    let endpoints: serde_json::Value = serde_json::from_str(&endpoints).expect("JSON");
    assert_eq!(
        endpoints["endpoints"][0]["endpoint"], "GET /v1/users/{id}",
        "{endpoints}"
    );
    assert_eq!(endpoints["endpoints"][0]["count"], 10, "{endpoints}");

    // A change without the token is refused, and changes nothing.
    let (code, _, err) = ctl(&node, &["drain", "app", &a1], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    assert_eq!(node.backend_state("app", &a1).await, "healthy");
    // With it (after the subcommand), the backend drains and traffic leaves it.
    let (code, out, err) = ctl(&node, &["drain", "app", &a1, "--token", "s3cret"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("pool app: backend {a1} is draining\n"));
    assert_eq!(node.backend_state("app", &a1).await, "draining");
    let counts = common::spread(&url, 6).await;
    assert_eq!(counts.get("b2"), Some(&6), "{counts:?}");
    // The token from the environment.
    let (code, out, err) = ctl(&node, &["enable", "app", &a1], Some("s3cret"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is healthy"), "{out}");
    let (code, _, err) = ctl(&node, &["disable", "app", &a2], Some("s3cret"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(node.backend_state("app", &a2).await, "disabled");

    let (code, out, err) = ctl(&node, &["strategy", "app", "p2c"], Some("s3cret"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("strategy p2c (was round_robin)"), "{out}");
    assert_eq!(node.api("/api/pools/app").await["strategy"], "p2c");
    let (code, _, err) = ctl(&node, &["weight", "app", &a1, "3"], Some("s3cret"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(node.backend("app", &a1).await["weight"], 3);

    let (code, _, err) = ctl(&node, &["strategy", "app", "bogus"], Some("s3cret"));
    assert_eq!(code, 1);
    assert!(
        err.contains("422") && err.contains("unknown_strategy"),
        "{err}"
    );
    let (code, _, err) = ctl(&node, &["backends", "nope"], None);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_pool"), "{err}");
    let (code, out, err) = ctl(&node, &["reload"], Some("s3cret"));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("reloaded: "), "{out}");
    // The reload keeps the run-time changes.
    assert_eq!(node.backend_state("app", &a2).await, "disabled");
}
