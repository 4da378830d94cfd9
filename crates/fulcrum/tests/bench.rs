//! `fulcrum bench` as a user runs it: the real binary against real `fulcrum backend`
//! processes, reading its `--json` report. Counts are checked with generous tolerances
//! (arrivals are Poisson and machines are loaded); nothing asserts on timing, and latency
//! values only against bounds that hold by construction (a request given up at the
//! timeout took at least the timeout).

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

fn millis(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// A `fulcrum bench` process running in the background, its output collected as it comes;
/// killed on drop.
struct RunningBench {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl RunningBench {
    fn start(args: &[&str]) -> RunningBench {
        let mut child = Command::new(fulcrum_bin())
            .arg("bench")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run fulcrum bench");
        let collect = |mut pipe: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = Arc::clone(&text);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    sink.lock()
                        .expect("output lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().expect("stdout is piped")));
        let stderr = collect(Box::new(child.stderr.take().expect("stderr is piped")));
        RunningBench {
            child,
            stdout,
            stderr,
        }
    }

    /// Sends SIGINT, as Ctrl-C in a terminal does.
    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT failed");
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("output lock").clone()
    }

    /// Polls until stderr contains `needle`, or panics after `deadline`.
    fn wait_for_stderr(&self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                start.elapsed() < deadline,
                "no `{needle}` on stderr after {deadline:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until the process exits; (exit code, stdout, stderr). Panics (and kills it)
    /// if it is still running after `deadline`: that is a hang, not slowness.
    fn wait_exit(mut self, deadline: Duration) -> (i32, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                start.elapsed() < deadline,
                "fulcrum bench still running {deadline:?} after being told to stop; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The pipes close with the process; give the readers a moment to take the rest.
        let drained = Instant::now();
        while Arc::strong_count(&self.stdout) + Arc::strong_count(&self.stderr) > 2
            && drained.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stdout = self.stdout.lock().expect("output lock").clone();
        (
            status.code().expect("an exit code, not a signal"),
            stdout,
            self.stderr(),
        )
    }
}

impl Drop for RunningBench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a stopped bench may take to exit before the test calls it a hang: far above
/// the 2 s stop grace, far below the 30 s timeout it would wait without one.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

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
    let bench = RunningBench::start(&[
        "--url",
        &url,
        "--rate",
        "100",
        "--duration",
        "600s",
        "--json",
    ]);
    common::eventually(common::DEADLINE, "requests arrive", async || {
        (backend.stats().await["requests"].as_u64() >= Some(20)).then_some(())
    })
    .await;
    bench.interrupt();
    // The schedule would last 600 s; the deadline only guards against a hang.
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || bench.wait_exit(EXIT_DEADLINE))
            .await
            .expect("join");
    assert_eq!(code, 130, "interrupted: 128 + SIGINT; stderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["interrupted"], true, "{report}");
    assert!(
        report["interrupted_after_secs"].as_f64() > Some(0.0),
        "{report}"
    );
    assert!(count(&report["overall"]["requests"]) >= 20, "{report}");
    assert!(report["sent_secs"].as_f64() < Some(600.0), "{report}");
}

/// The backend answers after an hour, the timeout is the default 30 s: after Ctrl-C the
/// bench waits its 2 s grace, then reports every request as interrupted, censored at its
/// age (at least the grace), and exits 130. Before, it waited the whole timeout and
/// exited 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_gives_up_on_a_stalled_backend_after_the_grace_and_exits_130() {
    let backend = Backend::start("bench-stall", &["--latency", "fixed:3600s"]);
    let url = format!("http://{}/", backend.addr);
    let bench = RunningBench::start(&[
        "--url",
        &url,
        "--rate",
        "50",
        "--duration",
        "600s",
        "--json",
    ]);
    common::eventually(common::DEADLINE, "requests arrive", async || {
        (backend.stats().await["requests"].as_u64() >= Some(10)).then_some(())
    })
    .await;
    bench.interrupt();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || bench.wait_exit(EXIT_DEADLINE))
            .await
            .expect("join");
    assert_eq!(code, 130, "stderr:\n{stderr}");
    assert!(stderr.contains("Ctrl-C again to stop waiting"), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["interrupted"], true, "{report}");
    let all = &report["overall"];
    let requests = count(&all["requests"]);
    assert!(requests >= 10, "{report}");
    assert_eq!(count(&all["ok"]), 0, "none answered: {report}");
    assert_eq!(count(&all["interrupted"]), requests, "{report}");
    assert_eq!(count(&all["error_kinds"]["interrupted"]), requests);
    assert_eq!(count(&all["timed_out"]), 0, "{report}");
    let latency = &all["latency_ms"];
    assert_eq!(count(&latency["count"]), requests, "censored: {report}");
    // Each was outstanding through the whole grace, so its recorded age is at least 2 s.
    assert!(millis(&latency["p50"]) >= 2000.0, "{report}");
}

/// A second Ctrl-C ends the wait: the human report is printed with the interruption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_abandons_the_wait_and_prints_the_report() {
    let backend = Backend::start("bench-stall-2", &["--latency", "fixed:3600s"]);
    let url = format!("http://{}/", backend.addr);
    let bench = RunningBench::start(&["--url", &url, "--rate", "50", "--duration", "600s"]);
    common::eventually(common::DEADLINE, "requests arrive", async || {
        (backend.stats().await["requests"].as_u64() >= Some(10)).then_some(())
    })
    .await;
    bench.interrupt();
    // The first signal must be handled before the second is sent, or the two merge.
    bench.wait_for_stderr("Ctrl-C again", EXIT_DEADLINE);
    bench.interrupt();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || bench.wait_exit(EXIT_DEADLINE))
            .await
            .expect("join");
    assert_eq!(code, 130, "stderr:\n{stderr}");
    assert!(stdout.contains("interrupted after "), "{stdout}");
    assert!(
        stdout.contains("requests still outstanding were abandoned"),
        "{stdout}"
    );
    assert!(
        stdout.contains("interrupted, counted at their age when abandoned"),
        "{stdout}"
    );
    assert!(stdout.contains("errors: interrupted "), "{stdout}");
}

/// Half the requests go to an endpoint slower than --timeout. They count in the
/// percentiles at the timeout, so p99 and max are at least the timeout; before, they were
/// left out and the endpoint showed no latency at all.
#[test]
fn timed_out_requests_count_in_the_percentiles_at_the_timeout() {
    let backend = Backend::start("bench-timeout", &[]);
    let url = format!("http://{}", backend.addr);
    let args = [
        "--url",
        &url,
        "--rate",
        "100",
        "--duration",
        "1s",
        "--timeout",
        "500ms",
        "--mix",
        "/fast?delay_ms=1:1,/slow?delay_ms=5000:1",
    ];
    let report = bench_json(&args);
    let slow = &report["endpoints"][1];
    assert_eq!(slow["path"], "/slow?delay_ms=5000");
    let slow_requests = count(&slow["requests"]);
    assert!(slow_requests > 0, "{report}");
    assert_eq!(
        count(&slow["latency_ms"]["count"]),
        slow_requests,
        "{report}"
    );
    assert!(millis(&slow["latency_ms"]["p50"]) >= 500.0, "{report}");
    assert_eq!(count(&slow["timed_out"]), slow_requests, "{report}");
    assert_eq!(report["timeout_secs"], 0.5);

    let all = &report["overall"];
    let requests = count(&all["requests"]);
    let timed_out = count(&all["timed_out"]);
    let failed = count(&all["failed_without_response"]);
    assert!(timed_out >= slow_requests, "{report}");
    assert_eq!(count(&all["error_kinds"]["timeout"]), timed_out);
    assert_eq!(count(&all["ok"]) + count(&all["errors"]), requests);
    assert_eq!(count(&all["latency_ms"]["count"]), requests - failed);
    assert!(millis(&all["latency_ms"]["max"]) >= 500.0, "{report}");
    if slow_requests * 100 > requests {
        assert!(millis(&all["latency_ms"]["p99"]) >= 500.0, "{report}");
    }

    let (code, stdout, stderr) = bench(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("timed out, counted at the 0.5s timeout"),
        "{stdout}"
    );
    assert!(stdout.contains("all: latency of "), "{stdout}");
}

/// A request refused has no latency: it is counted, and the report says the percentiles
/// leave it out.
#[test]
fn requests_failed_without_a_response_are_counted_but_not_in_the_percentiles() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}/");
    let args = ["--url", &url, "--rate", "50", "--duration", "500ms"];
    let report = bench_json(&args);
    let all = &report["overall"];
    let requests = count(&all["requests"]);
    assert!(requests > 0, "{report}");
    assert_eq!(count(&all["failed_without_response"]), requests, "{report}");
    assert_eq!(count(&all["error_kinds"]["connect"]), requests, "{report}");
    assert_eq!(count(&all["latency_ms"]["count"]), 0, "{report}");

    let (code, stdout, _) = bench(&args);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("failed without a response, not included"),
        "{stdout}"
    );
}
