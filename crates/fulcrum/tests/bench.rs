//! `fulcrum bench` as a user runs it: the real binary against real `fulcrum backend`
//! processes, reading its `--json` report. Counts are checked with generous tolerances
//! (arrivals are Poisson and machines are loaded); nothing asserts on timing.

mod common;

use std::process::Command;

use common::{Backend, fulcrum_bin};
use serde_json::Value;

/// Runs `fulcrum bench ARGS`; (exit code, stdout, stderr).
fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(fulcrum_bin())
        .arg("bench")
        .args(args)
        .output()
        .expect("run fulcrum bench");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `fulcrum bench ARGS --json`, expecting success and one JSON object on stdout.
fn bench_json(args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = bench(&all);
    assert_eq!(code, 0, "fulcrum bench {args:?} failed; stderr:\n{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn count(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

#[test]
fn sends_about_rate_times_duration_and_reports_percentiles() {
    let backend = Backend::start("bench-1", &["--latency", "fixed:1ms"]);
    let url = format!("http://{}/", backend.addr);
    let report = bench_json(&["--url", &url, "--rate", "200", "--duration", "2s"]);

    let all = &report["overall"];
    let requests = count(&all["requests"]);
    // 400 expected; a Poisson count's sd is 20, the rest is room for a slow machine.
    assert!((200..=600).contains(&requests), "{requests} requests");
    assert_eq!(count(&all["ok"]), requests);
    assert_eq!(count(&all["errors"]), 0);
    assert_eq!(count(&all["dropped"]), 0);
    let latency = &all["latency_ms"];
    assert_eq!(count(&latency["count"]), requests);
    for field in ["mean", "p50", "p90", "p99", "p999", "max"] {
        assert!(
            latency[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {latency}"
        );
    }
    assert_eq!(report["rate"], 200.0);
    assert_eq!(report["endpoints"].as_array().map(Vec::len), Some(1));
    assert_eq!(report["endpoints"][0]["path"], "/");
}

#[test]
fn reports_each_endpoint_of_a_mix() {
    let backend = Backend::start("bench-mix", &[]);
    let url = format!("http://{}", backend.addr);
    let report = bench_json(&[
        "--url",
        &url,
        "--rate",
        "300",
        "--duration",
        "1s",
        "--mix",
        "/short:0.8,/long?delay_ms=5:0.2",
        "--zipf-keys",
        "100",
    ]);
    let endpoints = report["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[0]["path"], "/short");
    assert_eq!(endpoints[1]["path"], "/long?delay_ms=5");
    assert_eq!(endpoints[0]["share"], 0.8);
    let per_endpoint: u64 = endpoints.iter().map(|e| count(&e["requests"])).sum();
    assert_eq!(per_endpoint, count(&report["overall"]["requests"]));
    assert!(
        endpoints.iter().all(|e| count(&e["requests"]) > 0),
        "{report}"
    );
}

#[test]
fn counts_errors_by_kind_when_the_backend_fails() {
    let backend = Backend::start("bench-fail", &["--fail-rate", "1"]);
    let url = format!("http://{}/", backend.addr);
    let report = bench_json(&["--url", &url, "--rate", "100", "--duration", "1s"]);
    let all = &report["overall"];
    let requests = count(&all["requests"]);
    assert!(requests > 0);
    assert_eq!(count(&all["ok"]), 0);
    assert_eq!(count(&all["errors"]), requests);
    assert_eq!(count(&all["error_kinds"]["status_503"]), requests);

    let (code, stdout, _) = bench(&["--url", &url, "--rate", "100", "--duration", "500ms"]);
    assert_eq!(code, 0, "request errors are reported, not fatal");
    assert!(stdout.contains("errors: status_503"), "{stdout}");
}

#[test]
fn bad_values_exit_2_naming_the_option() {
    for (args, needle) in [
        (&["--rate", "100"][..], "--url"),
        (&["--url", "ftp://127.0.0.1/"][..], "--url"),
        (
            &["--url", "http://127.0.0.1:1/", "--rate", "-5"][..],
            "--rate",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "--duration", "forever"][..],
            "--duration",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "--mix", "/a:0"][..],
            "--mix",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "--zipf-keys", "0"][..],
            "--zipf-keys",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/",
                "--zipf-keys",
                "5",
                "--zipf-s",
                "-1",
            ][..],
            "--zipf-s",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "--zipf-s", "1.2"][..],
            "--zipf-keys",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "--key-header", "x-user"][..],
            "--zipf-keys",
        ),
        (&["--scenario", "nonsense"][..], "--scenario"),
        (
            &["--scenario", "straggler", "--strategies", "fastest"][..],
            "--strategies",
        ),
    ] {
        let (code, stdout, stderr) = bench(args);
        assert_eq!(code, 2, "{args:?}: stdout {stdout} stderr {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn lists_the_scenarios() {
    let (code, stdout, _) = bench(&["--scenario", "list"]);
    assert_eq!(code, 0);
    for name in ["duration-class", "straggler", "affinity"] {
        assert!(stdout.contains(name), "{stdout}");
    }
}

#[test]
fn straggler_scenario_reports_one_row_per_strategy() {
    let report = bench_json(&[
        "--scenario",
        "straggler",
        "--quick",
        "--strategies",
        "round_robin,p2c",
    ]);
    assert_eq!(report["scenario"], "straggler");
    let rows = report["results"].as_array().expect("results");
    let mut names: Vec<&str> = rows
        .iter()
        .map(|r| r["strategy"].as_str().expect("strategy name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["p2c", "round_robin"]);
    for row in rows {
        assert!(count(&row["requests"]) > 0, "{row}");
        assert!(row["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{row}");
        assert!(row.get("unavailable").is_none(), "{row}");
    }
}

#[test]
fn duration_class_scenario_runs_both_modes_and_the_class_queue_on_every_load() {
    let report = bench_json(&[
        "--scenario",
        "duration-class",
        "--quick",
        "--strategies",
        "duration_class",
    ]);
    assert_eq!(report["scenario"], "duration-class");
    let loads = report["loads"].as_array().expect("loads");
    let names: Vec<&str> = loads
        .iter()
        .map(|l| l["load"].as_str().expect("load name"))
        .collect();
    assert_eq!(
        names,
        ["mixed", "short-dominant", "long-dominant", "mixed, heavy"]
    );
    for load in loads {
        assert!(load["floor_ms"].as_f64().is_some_and(|f| f > 0.0), "{load}");
        let rows = load["results"].as_array().expect("results");
        let modes: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| {
                (
                    r["strategy"].as_str().expect("strategy"),
                    r["mode"].as_str().expect("mode"),
                    r["queueing"].as_str().expect("queueing"),
                )
            })
            .collect();
        assert_eq!(
            modes,
            [
                ("duration_class", "static", "backend"),
                ("duration_class", "adaptive", "backend"),
                ("duration_class", "adaptive", "proxy_class"),
            ]
        );
        for row in rows {
            assert!(count(&row["requests"]) > 0, "{row}");
            assert!(row["mean_ms"].as_f64().is_some_and(|m| m > 0.0), "{row}");
            assert!(row.get("unavailable").is_none(), "{row}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_sending_and_reports_what_was_sent() {
    let backend = Backend::start("bench-int", &[]);
    let url = format!("http://{}/", backend.addr);
    let child = std::process::Command::new(fulcrum_bin())
        .args([
            "bench",
            "--url",
            &url,
            "--rate",
            "100",
            "--duration",
            "600s",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fulcrum bench");
    common::eventually(common::DEADLINE, "requests arrive", async || {
        (backend.stats().await["requests"].as_u64() >= Some(20)).then_some(())
    })
    .await;
    let pid = child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    // The schedule would last 600 s; the deadline only guards against a hang.
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("bench output");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["interrupted"], true, "{report}");
    assert!(count(&report["overall"]["requests"]) >= 20, "{report}");
    assert!(report["sent_secs"].as_f64() < Some(600.0), "{report}");
}
