//! Real servers for tests: a `redis-server` or a single-member `etcd` on free 127.0.0.1
//! ports with a throw-away data directory, and a `dnsmasq` answering fixed records; each
//! killed (SIGKILL) when dropped.
//!
//! Used by this crate's store and discovery tests and by the binary's end-to-end tests.
//! The servers must be installed (`redis-server`, `etcd` 3.4+, `dnsmasq` on `PATH`);
//! constructors panic with a message saying what is missing, since a test cannot proceed
//! without them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer after being started.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// A `redis-server` on a free port without persistence, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on a free 127.0.0.1 port with no persistence (`--save ""`,
    /// no AOF) in a temporary directory, and waits until it answers `PING`.
    ///
    /// # Panics
    /// If `redis-server` cannot be started or does not answer within 20 s.
    pub fn start() -> RedisServer {
        let port = free_port();
        let dir = TempDir::new("redis");
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        let child = spawn_logged(cmd, &self.dir.path().join("redis.log"), "redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_ready("redis-server", self.child.as_mut(), || redis_pong(port));
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it to exit; a no-op if it is not running.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Kills the server if it runs, then starts it again on the same port (with an empty
    /// dataset: there is no persistence) and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-member etcd cluster on free client and peer ports, killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
}

impl EtcdServer {
    /// Starts `etcd` on free 127.0.0.1 client and peer ports with a temporary
    /// `--data-dir`, and waits until `/health` reports healthy. Heartbeat and election
    /// timeouts are shortened (50 ms, 500 ms), which also lowers etcd's minimum lease TTL
    /// to 1 s.
    ///
    /// # Panics
    /// If `etcd` cannot be started or is not healthy within 20 s.
    pub fn start() -> EtcdServer {
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        let mut server = EtcdServer {
            child: None,
            client_port,
            peer_port,
            dir: TempDir::new("etcd"),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "fulcrum-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("fulcrum-test={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
        let child = spawn_logged(cmd, &self.dir.path().join("etcd.log"), "etcd");
        self.child = Some(child);
        let port = self.client_port;
        wait_ready("etcd", self.child.as_mut(), || etcd_healthy(port));
    }

    /// The client URLs: `["http://127.0.0.1:<client port>"]`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![format!("http://127.0.0.1:{}", self.client_port)]
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Kills the server (SIGKILL) and waits for it to exit; a no-op if it is not running.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Kills the server if it runs, then starts it again on the same ports with the same
    /// data directory (its data survives) and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `dnsmasq` on a free 127.0.0.1 port (UDP and TCP) answering only the records it was
/// started with (no upstream, no `/etc/hosts`), killed when dropped.
pub struct DnsServer {
    child: Option<Child>,
    port: u16,
    _dir: TempDir,
}

impl DnsServer {
    /// Starts `dnsmasq` with `records`, each one of its record options without the leading
    /// dashes: `srv-host=_http._tcp.app.test,b1.app.test,8081,0,3` (name, target, port,
    /// priority, weight) or `host-record=b1.app.test,127.0.0.1`; waits until it accepts
    /// TCP connections.
    ///
    /// # Panics
    /// If `dnsmasq` cannot be started or does not listen within 20 s.
    pub fn start(records: &[&str]) -> DnsServer {
        let port = free_port();
        let dir = TempDir::new("dns");
        let mut cmd = Command::new("dnsmasq");
        cmd.args(["--keep-in-foreground", "--conf-file=/dev/null"])
            .args(["--no-resolv", "--no-hosts", "--no-poll"])
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .arg(format!("--port={port}"))
            // Stay the invoking user (dnsmasq started as root would switch to `nobody`).
            .arg(format!("--user={}", current_user()))
            .arg("--pid-file=")
            .arg("--log-queries")
            .args(records.iter().map(|r| format!("--{r}")));
        let mut child = spawn_logged(cmd, &dir.path().join("dnsmasq.log"), "dnsmasq");
        wait_ready("dnsmasq", Some(&mut child), || {
            TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_millis(200),
            )
            .is_ok()
        });
        DnsServer {
            child: Some(child),
            port,
            _dir: dir,
        }
    }

    /// `127.0.0.1:<port>`, for `discovery.nameservers`.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The user running the tests (`$USER`, else `root`), for dnsmasq's `--user`.
fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".to_owned())
}

/// A directory under the system temporary directory, removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(kind: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "fulcrum-{kind}-{}-{n}-{}",
            std::process::id(),
            crate::store::now_ms()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port the kernel just handed out on 127.0.0.1 (free unless someone races for it).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// Spawns `cmd` with its output appended to `log`.
fn spawn_logged(mut cmd: Command, log: &Path, program: &str) -> Child {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()))
    };
    cmd.stdin(Stdio::null())
        .stdout(open())
        .stderr(open())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} (is it installed and on PATH?): {e}"))
}

/// Polls `ready` every 20 ms until it holds, panicking if the process exits or the
/// deadline passes.
fn wait_ready(program: &str, child: Option<&mut Child>, mut ready: impl FnMut() -> bool) {
    let Some(child) = child else {
        panic!("{program} was not spawned");
    };
    let start = Instant::now();
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{program} exited during startup: {status}");
        }
        assert!(
            start.elapsed() < READY_DEADLINE,
            "{program} not ready after {READY_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // Child::kill sends SIGKILL on Unix.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `request` to 127.0.0.1:`port` and returns what came back (empty on failure).
fn exchange(port: u16, request: &[u8]) -> String {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(request).is_err() {
        return String::new();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if request.starts_with(b"PING") && answer.ends_with(b"\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn redis_pong(port: u16) -> bool {
    exchange(port, b"PING\r\n").starts_with("+PONG")
}

fn etcd_healthy(port: u16) -> bool {
    let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    exchange(port, request.as_bytes()).contains("\"health\":\"true\"")
}
