//! `fulcrum check` and `fulcrum run` on bad configurations: exit 2 and an error naming
//! file, line and field; and graceful shutdown of `run`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Backend, Node, check, client, fulcrum_bin, simple_config};

const VALID: &str = "listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - pool: app
pools:
  app:
    backends:
      - address: 127.0.0.1:8081
";

#[test]
fn check_accepts_a_valid_config() {
    let (code, stderr, _) = check(VALID);
    assert_eq!(code, 0, "{stderr}");
}

/// Each bad config, the line the error must point at, and a fragment of the message.
#[test]
fn check_reports_each_error_with_file_line_and_field() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "unknown key",
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    colour: red\n    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: 127.0.0.1:8081\n",
            4,
            "colour",
        ),
        (
            "bad duration",
            &VALID.replace(
                "    backends:",
                "    timeouts: { connect: 5 parsecs }\n    backends:",
            ),
            8,
            "connect",
        ),
        (
            "duplicate listener",
            &VALID.replace(
                "pools:",
                "  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:",
            ),
            6,
            "web",
        ),
        (
            "route to missing pool",
            &VALID.replace("      - pool: app", "      - pool: api"),
            5,
            "api",
        ),
        (
            "empty pool",
            &VALID.replace(
                "    backends:\n      - address: 127.0.0.1:8081\n",
                "    backends: []\n",
            ),
            7,
            "no backends",
        ),
        (
            "bad address",
            &VALID.replace("127.0.0.1:8081", "127.0.0.1:99999"),
            9,
            "port",
        ),
        (
            "bad listen address",
            &VALID.replace("listen: 127.0.0.1:0", "listen: localhost"),
            3,
            "listen",
        ),
        (
            "duplicate pool",
            &format!("{VALID}  app:\n    backends:\n      - address: 127.0.0.1:8082\n"),
            10,
            "app",
        ),
    ];
    for (what, yaml, line, fragment) in cases {
        let (code, stderr, name) = check(yaml);
        assert_eq!(code, 2, "{what}: exit code; stderr: {stderr}");
        let expected = format!("{name}:{line}:");
        assert!(
            stderr.contains(&expected),
            "{what}: expected `{expected}` in: {stderr}"
        );
        assert!(
            stderr.contains(fragment),
            "{what}: expected `{fragment}` in: {stderr}"
        );
    }
}

/// Runs `fulcrum run` on `yaml` (written to a temporary file) and waits for it to exit:
/// for configurations it must refuse.
fn run_once(yaml: &str) -> std::process::Output {
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut file, yaml.as_bytes()).expect("write");
    Command::new(fulcrum_bin())
        .args(["run", "--config"])
        .arg(file.path())
        .output()
        .expect("run")
}

#[test]
fn check_and_run_refuse_a_backend_name_that_does_not_resolve_at_its_line() {
    let yaml = VALID.replace("127.0.0.1:8081", "no-such-host.invalid:8081");
    let (code, stderr, _) = check(&yaml);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(":9:18: pools.app.backends[0].address: cannot resolve backend `no-such-host.invalid:8081`"),
        "{stderr}"
    );
    let out = run_once(&yaml);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":9:18: pools.app.backends[0].address: cannot resolve"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_invalid_config() {
    let out = run_once(&VALID.replace("      - pool: app", "      - pool: api"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":5:"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing started: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let slow = Backend::start("slow", &["--latency", "fixed:1500ms"]);
    let mut node = Node::start(&simple_config("round_robin", &[&slow], ""));
    let url = format!("{}/slow", node.url("web"));
    let request =
        tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    common::eventually(common::DEADLINE, "request in flight", async || {
        let v = node.api("/api/pools/app/backends").await;
        (v["backends"][0]["in_flight"] == 1).then_some(())
    })
    .await;
    node.signal("TERM");
    assert_eq!(
        request.await.expect("task").expect("response"),
        200,
        "in-flight request finished"
    );
    let code = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(20)));
    assert_eq!(code, Some(0), "logs:\n{}", node.logs());
    // The listener is closed.
    assert!(std::net::TcpStream::connect(node.listeners["web"]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_without_waiting_for_the_drain() {
    let slow = Backend::start("slow", &["--latency", "fixed:600s"]);
    let yaml = format!(
        "runtime:\n  drain_timeout: 600s\n{}",
        simple_config("round_robin", &[&slow], "")
    );
    let mut node = Node::start(&yaml);
    let url = format!("{}/slow", node.url("web"));
    let _request = tokio::spawn(async move { client().get(url).send().await.is_ok() });
    common::eventually(common::DEADLINE, "request in flight", async || {
        let v = node.api("/api/pools/app/backends").await;
        (v["backends"][0]["in_flight"] == 1).then_some(())
    })
    .await;
    node.signal("TERM");
    common::eventually(common::DEADLINE, "the drain began", async || {
        node.logs().contains("draining").then_some(())
    })
    .await;
    node.signal("TERM");
    // The drain would last 600 s; the deadline only guards against a hang.
    let code = tokio::task::block_in_place(|| node.wait_exit(common::DEADLINE));
    assert_eq!(code, Some(1), "logs:\n{}", node.logs());
    assert!(node.logs().contains("second signal"), "{}", node.logs());
}

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(fulcrum_bin())
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .expect("run check");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected the example configs, found {checked}"
    );
}
