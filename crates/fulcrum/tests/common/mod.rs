//! Shared helpers of the end-to-end tests: real `fulcrum` processes (simulated backends
//! and nodes) on 127.0.0.1 with ephemeral ports, and a real HTTP client.
//!
//! Processes print a JSON line on stdout once listening; the helpers read it (with a
//! deadline) to learn the bound ports. Every process is killed when its handle drops; a
//! node's stderr is kept and printed if the test panics, to explain the failure.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `fulcrum check --config` on `yaml` written to a temporary `.yaml` file; returns
/// the exit code, stderr, and the file's name (which located errors start with).
pub fn check(yaml: &str) -> (i32, String, String) {
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut file, yaml.as_bytes()).expect("write");
    let out = Command::new(fulcrum_bin())
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .expect("run check");
    let name = file
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().expect("exit code"), stderr, name)
}

/// Path of the `fulcrum` binary under test.
pub fn fulcrum_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fulcrum"))
}

/// Default deadline for anything the tests wait for.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` every 50 ms until it returns `Some`, or panics after `deadline` with `what`.
pub async fn eventually<T>(
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process whose stdout's first JSON line announced readiness.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
    label: String,
}

impl Proc {
    fn spawn(label: &str, mut cmd: Command) -> (Proc, Value) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    log.lock().expect("log lock").push_str(&line);
                    line.clear();
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = true;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if first && let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                    let _ = tx.send(v);
                    first = false;
                }
                line.clear();
            }
            // Drain the rest so the child never blocks on a full pipe.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let mut proc = Proc {
            child,
            stderr: log,
            label: label.to_owned(),
        };
        match rx.recv_timeout(DEADLINE) {
            Ok(ready) => (proc, ready),
            Err(_) => {
                let status = proc.child.try_wait().ok().flatten();
                let log = proc.stderr.lock().expect("log lock").clone();
                let _ = proc.child.kill();
                panic!("{label} did not become ready (exit status {status:?}); stderr:\n{log}");
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- stderr of {} ----\n{}",
                self.label,
                self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
    }
}

/// Any `fulcrum` command that prints a JSON ready line, killed on drop.
pub struct Spawned {
    proc: Proc,
    /// The ready line.
    pub ready: Value,
}

impl Spawned {
    /// Runs `cmd` and waits for its ready line.
    pub fn start(label: &str, cmd: Command) -> Spawned {
        let (proc, ready) = Proc::spawn(label, cmd);
        Spawned { proc, ready }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything the process wrote to standard error so far.
    pub fn logs(&self) -> String {
        self.proc.stderr.lock().expect("log lock").clone()
    }
}

/// A simulated backend process (`fulcrum backend`).
pub struct Backend {
    proc: Option<Proc>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name (the `x-backend` header of its responses).
    pub name: String,
    args: Vec<String>,
}

impl Backend {
    /// Starts a backend named `name` on an ephemeral port with extra `args`.
    pub fn start(name: &str, args: &[&str]) -> Backend {
        Self::start_at("127.0.0.1:0".parse().expect("valid literal"), name, args)
    }

    /// Starts a backend on `addr`.
    pub fn start_at(addr: SocketAddr, name: &str, args: &[&str]) -> Backend {
        let mut cmd = Command::new(fulcrum_bin());
        cmd.args(["backend", "--listen", &addr.to_string(), "--name", name])
            .args(args);
        let (proc, ready) = Proc::spawn(&format!("backend {name}"), cmd);
        let addr = ready["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("ready line has an address");
        Backend {
            proc: Some(proc),
            addr,
            name: name.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// Starts it again on the same address with the same arguments.
    pub fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut again = Backend::start_at(self.addr, &self.name, &args);
        self.proc = again.proc.take();
    }

    /// `host:port` string.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// `GET /stats` of the backend.
    pub async fn stats(&self) -> Value {
        client()
            .get(format!("http://{}/stats", self.addr))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    /// `GET /control?{query}`.
    pub async fn control(&self, query: &str) {
        let status = client()
            .get(format!("http://{}/control?{query}", self.addr))
            .send()
            .await
            .expect("control")
            .status();
        assert!(status.is_success(), "control {query}: {status}");
    }
}

/// A `fulcrum run` process.
pub struct Node {
    proc: Proc,
    /// Admin API address.
    pub admin: SocketAddr,
    /// Bound address of each listener, by name.
    pub listeners: HashMap<String, SocketAddr>,
    /// The configuration file (kept alive for reloads).
    pub config: tempfile::NamedTempFile,
}

impl Node {
    /// Writes `yaml` to a temporary file and runs `fulcrum run --config` on it with one
    /// worker thread, not watching the file (so a test's reload is the one it asks for).
    pub fn start(yaml: &str) -> Node {
        Self::start_with(yaml, &["--threads", "1", "--no-watch"])
    }

    /// Same, with extra command-line arguments.
    pub fn start_with(yaml: &str, args: &[&str]) -> Node {
        let mut config = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("temp config");
        std::io::Write::write_all(&mut config, yaml.as_bytes()).expect("write config");
        let mut cmd = Command::new(fulcrum_bin());
        cmd.arg("run").arg("--config").arg(config.path()).args(args);
        cmd.env("RUST_LOG", "info,fulcrum_proxy=debug");
        let (proc, ready) = Proc::spawn("fulcrum run", cmd);
        let admin = ready["admin"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("ready line has admin");
        let listeners = ready["listeners"]
            .as_array()
            .expect("ready line has listeners")
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().expect("listener name").to_owned(),
                    l["listen"]
                        .as_str()
                        .and_then(|a| a.parse().ok())
                        .expect("listener address"),
                )
            })
            .collect();
        Node {
            proc,
            admin,
            listeners,
            config,
        }
    }

    /// `http://<listener>` of the listener named `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}", self.listeners[name])
    }

    /// `http://<admin>{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `GET` an admin path, expecting 200 and JSON.
    pub async fn api(&self, path: &str) -> Value {
        let response = client()
            .get(self.admin_url(path))
            .send()
            .await
            .expect("admin request");
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.expect("admin json")
    }

    /// `yaml` (a file like [`simple_config`]'s, whose admin and first listener listen on
    /// `127.0.0.1:0`) with this node's bound admin and `web` addresses in their place, so
    /// that a reload keeps them.
    pub fn pin_addresses(&self, yaml: &str) -> String {
        yaml.replacen("listen: 127.0.0.1:0", &format!("listen: {}", self.admin), 1)
            .replacen(
                "listen: 127.0.0.1:0",
                &format!("listen: {}", self.listeners["web"]),
                1,
            )
    }

    /// Writes `yaml` to the node's configuration file and reloads it (`POST
    /// /api/reload`); returns the reload's status and JSON body.
    pub async fn reload(&self, yaml: &str) -> (u16, Value) {
        std::fs::write(self.config.path(), yaml).expect("rewrite config");
        self.api_post("/api/reload", None).await
    }

    /// `POST` an admin path with a JSON body; returns status and JSON body.
    pub async fn api_post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = client().post(self.admin_url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Backend `address` of `pool` as `GET /api/pools/{pool}/backends` lists it; panics
    /// if it is not listed.
    pub async fn backend(&self, pool: &str, address: &str) -> Value {
        let v = self.api(&format!("/api/pools/{pool}/backends")).await;
        v["backends"]
            .as_array()
            .expect("backends array")
            .iter()
            .find(|b| b["address"] == address)
            .cloned()
            .unwrap_or_else(|| panic!("backend {address} not in pool {pool}: {v}"))
    }

    /// The `GET /api/endpoints` entry of `endpoint` (e.g. `GET /v1/users/{id}`) in
    /// `pool`; panics if it is not tracked.
    pub async fn endpoint(&self, pool: &str, endpoint: &str) -> Value {
        let v = self.api("/api/endpoints").await;
        v["endpoints"]
            .as_array()
            .expect("endpoints array")
            .iter()
            .find(|e| e["pool"] == pool && e["endpoint"] == endpoint)
            .cloned()
            .unwrap_or_else(|| panic!("endpoint `{endpoint}` of pool {pool} not tracked: {v}"))
    }

    /// The state of backend `address` of `pool`, from the admin API.
    pub async fn backend_state(&self, pool: &str, address: &str) -> String {
        let b = self.backend(pool, address).await;
        b["state"].as_str().expect("state").to_owned()
    }

    /// Sends a signal (`TERM`, `HUP`, …) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.proc.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits up to `deadline` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the node logged so far.
    pub fn logs(&self) -> String {
        self.proc.stderr.lock().expect("log lock").clone()
    }
}

/// A shared HTTP/1.1 client with keep-alive and no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .expect("client")
}

/// The `x-backend` header of a response (which simulated backend served it).
pub fn served_by(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Sends `n` sequential GETs to `url`; returns how many each backend served. Panics on
/// any non-200.
pub async fn spread(url: &str, n: usize) -> HashMap<String, usize> {
    let client = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let response = client.get(url).send().await.expect("request");
        assert_eq!(response.status(), 200, "GET {url}");
        *counts.entry(served_by(&response)).or_insert(0) += 1;
    }
    counts
}

/// A pool of client tasks sending GETs in a loop until stopped, recording every outcome.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Status (or 0 for a transport error) and backend of every response.
    pub outcomes: Arc<Mutex<Vec<(u16, String)>>>,
}

impl Load {
    /// Starts `concurrency` loops GETting `url`.
    pub fn start(url: &str, concurrency: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..concurrency)
            .map(|_| {
                let (stop, outcomes, url, client) = (
                    Arc::clone(&stop),
                    Arc::clone(&outcomes),
                    url.to_owned(),
                    client(),
                );
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let outcome = match client.get(&url).send().await {
                            Ok(response) => {
                                let backend = served_by(&response);
                                let status = response.status().as_u16();
                                // Read the body so the connection is reused.
                                let _ = response.bytes().await;
                                (status, backend)
                            }
                            Err(error) => (0, format!("transport error: {error}")),
                        };
                        outcomes.lock().expect("outcomes lock").push(outcome);
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            outcomes,
        }
    }

    /// Responses so far.
    pub fn count(&self) -> usize {
        self.outcomes.lock().expect("outcomes lock").len()
    }

    /// Responses so far from `backend`.
    pub fn count_from(&self, backend: &str) -> usize {
        self.outcomes
            .lock()
            .expect("outcomes lock")
            .iter()
            .filter(|(_, b)| b == backend)
            .count()
    }

    /// Waits until at least `n` more responses have arrived.
    pub async fn wait_for_more(&self, n: usize) {
        let target = self.count() + n;
        eventually(DEADLINE, &format!("{n} more responses"), async || {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    /// Stops the loops and returns every outcome.
    pub async fn stop(self) -> Vec<(u16, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        std::mem::take(&mut *self.outcomes.lock().expect("outcomes lock"))
    }
}

/// Panics with the failures if any outcome is not a 200.
pub fn assert_all_ok(outcomes: &[(u16, String)]) {
    let failures: Vec<_> = outcomes
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        outcomes.len(),
        &failures[..failures.len().min(10)]
    );
}

/// A YAML list of backend entries for `backends`.
pub fn backends_yaml(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| format!("      - address: {}\n", b.addr))
        .collect()
}

/// Like [`simple_config`], with an explicit weight per backend.
pub fn weighted_config(strategy: &str, backends: &[(&Backend, u32)]) -> String {
    let entries: String = backends
        .iter()
        .map(|(b, w)| format!("      - {{ address: {}, weight: {w} }}\n", b.addr))
        .collect();
    format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: {strategy}\n    backends:\n{entries}"
    )
}

/// The value of the first series of metric `name` whose line in the Prometheus text
/// `metrics` contains `labels` (e.g. `pool="app"`); `None` if there is none.
pub fn metric_value(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// A one-listener, one-pool configuration (`web` → pool `app`) with ephemeral ports; `pool_extra`
/// is YAML indented by 4 spaces inserted in the pool.
pub fn simple_config(strategy: &str, backends: &[&Backend], pool_extra: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: {strategy}\n    backends:\n{}{pool_extra}",
        backends_yaml(backends)
    )
}

/// A headless Chromium: `$FULCRUM_CHROMIUM`, else the first of `chromium-headless-shell`,
/// `chromium`, `chromium-browser`, `google-chrome` on `PATH` (CI installs Debian's
/// `chromium-headless-shell`).
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("FULCRUM_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium-headless-shell",
        "chromium",
        "chromium-browser",
        "google-chrome",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no headless Chromium found: install chromium-headless-shell (apt-get install \
         chromium-headless-shell) or set FULCRUM_CHROMIUM"
    );
}

/// What a headless Chromium shows for `url` once the page's scripts have run for up to 3 s
/// of virtual time: the DOM (`--dump-dom`) and the browser's console lines (stderr).
pub async fn render_page(url: &str) -> (String, String) {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().expect("a temporary browser profile");
        let output = Command::new(chromium())
            .arg("--headless")
            .arg("--no-sandbox")
            .arg("--disable-gpu")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--virtual-time-budget=3000")
            .arg("--dump-dom")
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("run headless Chromium");
        assert!(
            output.status.success(),
            "Chromium failed on {url}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let console = String::from_utf8_lossy(&output.stderr)
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .collect::<Vec<_>>()
            .join("\n");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            console,
        )
    })
    .await
    .expect("the browser task did not panic")
}

/// The HTML of the element of `dom` that carries attribute `attr` (e.g.
/// `data-backend="127.0.0.1:9001"`), up to the first `</{tag}>` after it.
pub fn element<'a>(dom: &'a str, attr: &str, tag: &str) -> Option<&'a str> {
    let start = dom.find(attr)?;
    let end = dom[start..].find(&format!("</{tag}>"))?;
    Some(&dom[start..start + end])
}
