//! Network-partition test of clustering (issue 4, "optional but valued"): three real
//! `fulcrum run` nodes, each in its own Linux network namespace, coordinated by a real etcd.
//!
//! ```text
//!   root namespace: bridge fpt<pid>b 10.77.X.1/24 ── etcd, backend simulator, test client
//!        │ fpt<pid>v1           │ fpt<pid>v2           │ fpt<pid>v3   ← taken down to cut node-3 off
//!   ns fpt<pid>n1 .11     ns fpt<pid>n2 .12     ns fpt<pid>n3 .13
//!      node-1                node-2                node-3
//! ```
//!
//! node-3 starts first and takes the etcd lease, then node-1 and node-2 join. node-3's link
//! to the bridge is taken down (packets are dropped, nothing is refused):
//!
//! - node-1 and node-2 report node-3 `failed`, agree on a leader among themselves (a new
//!   one with a larger fencing token, since node-3 led) and serve every client request
//!   sent through their listeners, from before the cut until after the heal;
//! - node-3, queried with `curl` inside its namespace, reports the store lost and the
//!   others failed, and does not claim the leadership once cut off for longer than the
//!   lease TTL; a watch samples all three leader views throughout, and no sample may show
//!   node-3 and a majority node both leading;
//! - a configuration write on node-3 is refused (`503 store_unavailable`, nothing
//!   changed); the same write on node-1 (`?consistency=quorum`) succeeds.
//!
//! After the link comes back, all three list each other alive, node-3 sees the store and
//! runs the write made during the partition, and all three agree on the majority's leader.
//! A second round cuts node-3 off again, now a follower: the majority keeps its leader.
//! All waits poll against deadlines; the whole test takes about 13 s.
//!
//! Needs root (or CAP_NET_ADMIN), `ip` (iproute2), `curl` and `etcd`. Where network
//! namespaces cannot be created, the test says why on stderr and passes without running.
//! Every process, namespace, link and temporary file is removed by drop guards, also when
//! the test panics; what a run killed outright leaves (names carry its pid) is removed by
//! the next run.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, Spawned, eventually, fulcrum_bin};
use serde_json::Value;

/// Prefix of every namespace and link name this test creates (followed by the pid).
const PREFIX: &str = "fpt";
/// Leader lease TTL of the nodes.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// Deadline of each step the test waits for.
const STEP: Duration = Duration::from_secs(15);
/// Gossip port of every node (each node has an address of its own).
const GOSSIP_PORT: u16 = 7946;
/// Time between two requests of a client loop.
const PACE: Duration = Duration::from_millis(20);

/// Runs `ip args…`; its stderr as the error.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Output of `ip args…`, empty on failure.
fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// Prefix of this run's temporary files and directories (etcd data, node configs).
fn temp_prefix() -> String {
    format!("fulcrum-partition-{}-", std::process::id())
}

/// The pid embedded in a name this test created (`fpt<pid><kind><n>`), if any.
fn owner_pid(name: &str) -> Option<u32> {
    let digits: String = name
        .strip_prefix(PREFIX)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Removes what earlier runs left when they were killed before their drop guard ran (the
/// pid in the names no longer exists): the processes in their namespaces, their etcd and
/// backend (found by the address of their bridge on the command line), the namespaces,
/// the links and the temporary files.
fn remove_leftovers() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let kill = |pid: &str| {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    };
    let links: Vec<String> = ip_output(&["-o", "link", "show"])
        .lines()
        // "12: fpt123v1@if11: <…" or "13: fpt123b: <…"
        .filter_map(|line| {
            line.split(": ")
                .nth(1)?
                .split('@')
                .next()
                .map(str::to_owned)
        })
        .filter(|name| dead(name))
        .collect();
    for bridge in links.iter().filter(|name| name.ends_with('b')) {
        let addresses = ip_output(&["-o", "-4", "addr", "show", "dev", bridge]);
        let Some(address) = addresses
            .split_whitespace()
            .skip_while(|word| *word != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
        else {
            continue;
        };
        let needle = format!("{address}:");
        let Ok(procs) = std::fs::read_dir("/proc") else {
            continue;
        };
        for entry in procs.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours = args.first().is_some_and(|a| a.ends_with("etcd"))
                || args.get(1).is_some_and(|a| a == "backend");
            if ours && args.iter().any(|a| a.contains(&needle)) {
                kill(&pid);
            }
        }
    }
    for line in ip_output(&["netns", "list"]).lines() {
        if let Some(name) = line.split_whitespace().next()
            && dead(name)
        {
            for pid in ip_output(&["netns", "pids", name]).split_whitespace() {
                kill(pid);
            }
            let _ = ip(&["netns", "delete", name]);
        }
    }
    for link in links {
        let _ = ip(&["link", "delete", &link]);
    }
    let temp = std::env::temp_dir();
    for entry in std::fs::read_dir(&temp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("fulcrum-partition-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
}

/// The test network: a bridge in the root namespace and one namespace per node, each
/// joined to the bridge by a veth pair. Removed on drop.
struct Net {
    tag: String,
    subnet: u8,
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Net {
    /// Creates the bridge and `n` namespaces. `Ok(None)` (after printing why) when this
    /// machine does not let the test create network namespaces.
    fn create(n: usize) -> Result<Option<Net>, String> {
        if which("ip").is_none() {
            eprintln!("SKIPPED partition test: `ip` (iproute2) is not installed");
            return Ok(None);
        }
        if which("curl").is_none() {
            eprintln!(
                "SKIPPED partition test: `curl` is not installed (used to query the cut-off node)"
            );
            return Ok(None);
        }
        remove_leftovers();
        let tag = format!("{PREFIX}{}", std::process::id());
        let mut net = Net {
            subnet: free_subnet(),
            tag,
            namespaces: Vec::new(),
            links: Vec::new(),
        };
        // The first namespace doubles as the permission probe.
        let first = net.ns(1);
        if let Err(error) = ip(&["netns", "add", &first]) {
            eprintln!(
                "SKIPPED partition test: cannot create a network namespace (needs root or \
                 CAP_NET_ADMIN and a kernel with network namespaces): {error}"
            );
            return Ok(None);
        }
        net.namespaces.push(first);
        let bridge = format!("{}b", net.tag);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        net.links.push(bridge.clone());
        let cidr = format!("{}/24", net.bridge_ip());
        ip(&["addr", "add", &cidr, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=n {
            let ns = net.ns(i);
            if i > 1 {
                ip(&["netns", "add", &ns])?;
                net.namespaces.push(ns.clone());
            }
            let outside = net.veth(i);
            let inside = format!("{}p{i}", net.tag);
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            net.links.push(outside.clone());
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            let cidr = format!("{}/24", net.node_ip(i));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(Some(net))
    }

    /// Name of node `i`'s namespace (1-based).
    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    /// Root-namespace end of node `i`'s veth pair.
    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.tag)
    }

    fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 10 + i as u8)
    }

    /// Cuts node `i` off: its link to the bridge goes down (packets are dropped, nothing
    /// is refused), while its own address stays usable inside its namespace.
    fn cut(&self, i: usize) {
        ip(&["link", "set", &self.veth(i), "down"]).expect("take the veth down");
    }

    fn heal(&self, i: usize) {
        ip(&["link", "set", &self.veth(i), "up"]).expect("bring the veth up");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth ends inside it, and with them their
        // peers; the explicit deletes cover namespaces that live on a little longer.
        for ns in self.namespaces.drain(..).rev() {
            if let Err(error) = ip(&["netns", "delete", &ns]) {
                eprintln!("partition test cleanup: {error}");
            }
        }
        for link in self.links.drain(..).rev() {
            let _ = ip(&["link", "delete", &link]);
        }
    }
}

/// A 10.77.X.0/24 subnet no address of the root namespace is in, starting from one
/// derived from the pid so that parallel runs pick different ones.
fn free_subnet() -> u8 {
    let used = ip_output(&["-o", "-4", "addr", "show"]);
    let start = std::process::id() % 240;
    (0..240)
        .map(|k| u8::try_from(10 + (start + k) % 240).expect("10..250"))
        .find(|x| !used.contains(&format!(" 10.77.{x}.")))
        .expect("a free 10.77.X.0/24 subnet")
}

/// `program`'s path if it is on `PATH`.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// A free TCP port on `ip`.
fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A single-member etcd on the bridge address (the same flags as
/// `fulcrum_cluster::testutil::EtcdServer`, which listens on 127.0.0.1 only), killed on
/// drop; its log is printed if the test fails.
struct Etcd {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Etcd {
    async fn start(ip: Ipv4Addr) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}etcd-", temp_prefix()))
            .tempdir()
            .expect("etcd data directory");
        let client_port = free_port(ip);
        let mut peer_port = free_port(ip);
        while peer_port == client_port {
            peer_port = free_port(ip);
        }
        let url = format!("http://{ip}:{client_port}");
        let peer = format!("http://{ip}:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "partition-test"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("partition-test={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd (is it installed and on PATH?): {e}"));
        let etcd = Etcd { child, dir, url };
        let health = format!("{}/health", etcd.url);
        eventually(STEP, "etcd is healthy", async || {
            let text = quick_client()
                .get(&health)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("\"health\":\"true\"").then_some(())
        })
        .await;
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("---- last lines of etcd's log ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A `fulcrum run` node inside its namespace.
struct NsNode {
    /// 1-based index: `node-{index}` in namespace and on veth number `index`.
    index: usize,
    id: String,
    ns: String,
    admin: SocketAddr,
    web: SocketAddr,
    _proc: Spawned,
    _config: tempfile::NamedTempFile,
}

impl NsNode {
    /// Starts node `i` (1-based) of `n` in its namespace.
    fn start(net: &Net, i: usize, n: usize, backend: SocketAddr, etcd: &str) -> NsNode {
        let id = format!("node-{i}");
        let me = net.node_ip(i);
        let seeds: Vec<String> = (1..=n)
            .filter(|&j| j != i)
            .map(|j| format!("{}:{GOSSIP_PORT}", net.node_ip(j)))
            .collect();
        let yaml = format!(
            "admin:\n  listen: {me}:0\n\
             listeners:\n  - name: web\n    listen: {me}:0\n    routes:\n      - pool: app\n\
             pools:\n  app:\n    strategy: round_robin\n    retry: {{ attempts: 2 }}\n    backends:\n      - address: {backend}\n\
             \x20   health_check: {{ path: /health, interval: 1s, timeout: 500ms }}\n\
             cluster:\n  node_id: {id}\n  gossip:\n    listen: {me}:{GOSSIP_PORT}\n    advertise: {me}:{GOSSIP_PORT}\n    seeds: [{}]\n    interval: 100ms\n    phi_threshold: 6.0\n  publish_interval: 500ms\n\
             \x20 coordination:\n    backend: etcd\n    endpoints: [{etcd}]\n    lease_ttl: {}s\n    node_ttl: 3s\n",
            seeds.join(", "),
            LEASE_TTL.as_secs()
        );
        let mut config = tempfile::Builder::new()
            .prefix(&temp_prefix())
            .suffix(".yaml")
            .tempfile()
            .expect("temp config");
        std::io::Write::write_all(&mut config, yaml.as_bytes()).expect("write config");
        let ns = net.ns(i);
        // `ip netns exec` enters the namespace and execs the program: the child's pid is
        // the node's, so killing the child kills the node.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(fulcrum_bin())
            .arg("run")
            .arg("--config")
            .arg(config.path())
            .args(["--threads", "1"])
            .env("RUST_LOG", "info");
        let proc = Spawned::start(&format!("{id} (netns {ns})"), cmd);
        let addr = |v: &Value| -> SocketAddr {
            v.as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{id}: bad address in ready line {}", proc.ready))
        };
        let admin = addr(&proc.ready["admin"]);
        let web = addr(&proc.ready["listeners"][0]["listen"]);
        NsNode {
            index: i,
            id,
            ns,
            admin,
            web,
            _proc: proc,
            _config: config,
        }
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `GET` an admin path from the root namespace, through the bridge.
    async fn api(&self, path: &str) -> Option<Value> {
        get_json(&self.admin_url(path)).await
    }

    /// `GET` an admin path from inside the node's own namespace (with curl), which works
    /// while the node is cut off from the bridge.
    async fn api_inside(&self, path: &str) -> Option<Value> {
        curl_json(self.ns.clone(), self.admin_url(path)).await
    }
}

/// An HTTP client with a short timeout, for admin queries.
fn quick_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client")
}

async fn get_json(url: &str) -> Option<Value> {
    let response = quick_client().get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// `ip netns exec ns curl url`, parsed as JSON; `None` unless it answered 2xx.
async fn curl_json(ns: String, url: String) -> Option<Value> {
    match curl(ns, url, None).await? {
        (200..=299, body) => Some(body),
        _ => None,
    }
}

/// `ip netns exec ns curl url`: a `GET`, or a `POST` of `body` as JSON. Status and JSON
/// body (`null` if none), or `None` if nothing answered.
async fn curl(ns: String, url: String, body: Option<Value>) -> Option<(u16, Value)> {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "curl", "-sS", "--noproxy", "*"])
            .args(["--max-time", "3", "-w", "\n%{http_code}"]);
        if let Some(body) = body {
            cmd.args(["-X", "POST", "-H", "content-type: application/json"])
                .args(["--data", &body.to_string()]);
        }
        let out = cmd.arg(&url).stdin(Stdio::null()).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n')?;
        let status = status.trim().parse().ok()?;
        Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    })
    .await
    .ok()
    .flatten()
}

/// `GET /api/cluster/leader` as seen by one node.
#[derive(Clone, Debug, PartialEq)]
struct LeaderView {
    leader: Option<String>,
    token: Option<u64>,
    is_self: bool,
}

impl LeaderView {
    fn parse(v: &Value) -> Option<LeaderView> {
        Some(LeaderView {
            leader: v["leader"].as_str().map(str::to_owned),
            token: v["token"].as_u64(),
            is_self: v["is_self"].as_bool()?,
        })
    }

    /// Whether the node claims to lead (it says so, or names itself).
    fn claims(&self, id: &str) -> bool {
        self.is_self || self.leader.as_deref() == Some(id)
    }
}

/// `(node_id, state)` of every member in a `GET /api/cluster/nodes` answer.
fn members(v: &Value) -> Vec<(String, String)> {
    v["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    (
                        n["node_id"].as_str().unwrap_or_default().to_owned(),
                        n["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn state_of(members: &[(String, String)], id: &str) -> Option<String> {
    members
        .iter()
        .find(|(n, _)| n == id)
        .map(|(_, s)| s.clone())
}

/// The strategy of pool `app` in a `GET /api/pools/app` answer.
fn strategy(v: &Value) -> Option<String> {
    v["strategy"].as_str().map(str::to_owned)
}

/// Everything the test started; on drop, the processes are killed before the network
/// they live in is removed.
struct Lab {
    nodes: Vec<NsNode>,
    backend: Option<Backend>,
    etcd: Option<Etcd>,
    net: Net,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.nodes.clear();
        self.backend.take();
        self.etcd.take();
        // `net` is dropped next, removing namespaces, veths and the bridge.
    }
}

impl Lab {
    fn node(&self, id: &str) -> &NsNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("{id} is not running"))
    }

    /// Waits until every node in `ids` lists every node in `ids` alive (asked through the
    /// bridge).
    async fn all_alive(&self, ids: &[&str]) {
        for id in ids {
            let node = self.node(id);
            eventually(STEP, &format!("{id} lists {ids:?} alive"), async || {
                let m = members(&node.api("/api/cluster/nodes").await?);
                ids.iter()
                    .all(|other| state_of(&m, other).as_deref() == Some("alive"))
                    .then_some(())
            })
            .await;
        }
    }

    /// Waits until every node in `ids` names the same leader with the same token and it
    /// is one of them, and exactly one of them says it leads; returns it.
    async fn agreed_leader(&self, ids: &[&str]) -> (String, u64) {
        eventually(
            STEP,
            &format!("{ids:?} agree on one leader among them"),
            async || {
                let mut views = Vec::new();
                for id in ids {
                    views.push(LeaderView::parse(
                        &self.node(id).api("/api/cluster/leader").await?,
                    )?);
                }
                let first = views[0].clone();
                let leader = first.leader?;
                let token = first.token?;
                let agreed = views.iter().all(|v| {
                    v.leader.as_deref() == Some(leader.as_str()) && v.token == Some(token)
                });
                let leaders = views.iter().filter(|v| v.is_self).count();
                (agreed && leaders == 1 && ids.contains(&leader.as_str()))
                    .then_some((leader, token))
            },
        )
        .await
    }
}

/// Client loops, one per node, each sending a GET every [`PACE`] through the node's
/// listener and recording every outcome (status, or 0 and the error).
struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: Vec<(String, tokio::task::JoinHandle<()>)>,
    outcomes: Arc<Mutex<Vec<(String, u16, String)>>>,
}

impl Traffic {
    fn start(nodes: &[&NsNode]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let tasks = nodes
            .iter()
            .map(|node| {
                let (stop, outcomes, id) =
                    (Arc::clone(&stop), Arc::clone(&outcomes), node.id.clone());
                let url = format!("http://{}/traffic", node.web);
                let client = common::client();
                let task = tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = match client.get(&url).send().await {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let body = response.text().await.unwrap_or_default();
                                (status, if status == 200 { String::new() } else { body })
                            }
                            Err(error) => (0, error.to_string()),
                        };
                        outcomes
                            .lock()
                            .expect("outcomes")
                            .push((id.clone(), outcome.0, outcome.1));
                        tokio::time::sleep(PACE).await;
                    }
                });
                (node.id.clone(), task)
            })
            .collect();
        Traffic {
            stop,
            tasks,
            outcomes,
        }
    }

    fn count(&self, id: &str) -> usize {
        self.outcomes
            .lock()
            .expect("outcomes")
            .iter()
            .filter(|(n, _, _)| n == id)
            .count()
    }

    /// Waits until every node answered `n` more requests.
    async fn wait_for_more(&self, n: usize) {
        for (id, _) in &self.tasks {
            let target = self.count(id) + n;
            eventually(STEP, &format!("{n} more answers from {id}"), async || {
                (self.count(id) >= target).then_some(())
            })
            .await;
        }
    }

    /// Stops the loops; panics if any request failed. Returns how many were sent.
    async fn stop_and_check(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for (_, task) in self.tasks {
            task.await.expect("client loop");
        }
        let outcomes = std::mem::take(&mut *self.outcomes.lock().expect("outcomes"));
        let failures: Vec<_> = outcomes.iter().filter(|(_, s, _)| *s != 200).collect();
        assert!(
            failures.is_empty(),
            "{} of {} client requests to the majority failed: {:?}",
            failures.len(),
            outcomes.len(),
            &failures[..failures.len().min(10)]
        );
        outcomes.len()
    }
}

/// One observation of the split-brain watch: the majority nodes' leader views, then
/// (queried after them) the cut-off node's, and when that last query was sent.
#[derive(Debug)]
struct Sample {
    /// Since the cut, when the cut-off node was queried.
    at: Duration,
    majority: Vec<(String, Option<LeaderView>)>,
    isolated: Option<LeaderView>,
}

/// Polls the leader view of every node for as long as the partition lasts.
struct Watch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Watch {
    fn start(lab: &Lab, majority: &[&str], isolated: &str, cut: Instant) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let majority: Vec<(String, String)> = majority
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    lab.node(id).admin_url("/api/cluster/leader"),
                )
            })
            .collect();
        let node = lab.node(isolated);
        let (ns, url) = (node.ns.clone(), node.admin_url("/api/cluster/leader"));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut views = Vec::new();
                    for (id, url) in &majority {
                        let view = get_json(url).await.and_then(|v| LeaderView::parse(&v));
                        views.push((id.clone(), view));
                    }
                    let at = cut.elapsed();
                    let isolated = curl_json(ns.clone(), url.clone())
                        .await
                        .and_then(|v| LeaderView::parse(&v));
                    samples.push(Sample {
                        at,
                        majority: views,
                        isolated,
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                samples
            }
        });
        Watch { stop, task }
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("watch task")
    }
}

/// Cuts `isolated` off from the other nodes and etcd, checks both sides, heals, checks the
/// cluster is whole again. `before` is the leader all three agreed on; returns the leader
/// after healing.
async fn partition_round(
    lab: &Lab,
    round: usize,
    isolated: &str,
    majority: &[&str],
    before: (String, u64),
    new_strategy: &str,
) -> (String, u64) {
    let all: Vec<&str> = majority.iter().copied().chain([isolated]).collect();
    let traffic = Traffic::start(&majority.iter().map(|id| lab.node(id)).collect::<Vec<_>>());
    traffic.wait_for_more(10).await;

    eprintln!(
        "round {round}: cutting {isolated} off (leader before: {} token {})",
        before.0, before.1
    );
    let cut = Instant::now();
    lab.net.cut(lab.node(isolated).index);
    let watch = Watch::start(lab, majority, isolated, cut);

    // The majority reports the cut-off node failed.
    for id in majority {
        let node = lab.node(id);
        eventually(
            STEP,
            &format!("{id} reports {isolated} failed"),
            async || {
                let m = members(&node.api("/api/cluster/nodes").await?);
                let others_alive = majority
                    .iter()
                    .all(|o| state_of(&m, o).as_deref() == Some("alive"));
                (others_alive && state_of(&m, isolated).as_deref() == Some("failed")).then_some(())
            },
        )
        .await;
    }
    let detected = cut.elapsed();

    // The majority has (or elects) a leader among itself.
    let after = lab.agreed_leader(majority).await;
    let elected = cut.elapsed();
    if before.0 == isolated {
        assert!(
            after.1 > before.1,
            "round {round}: new leader {} has token {}, not larger than {isolated}'s {}",
            after.0,
            after.1,
            before.1
        );
    } else {
        assert_eq!(
            after, before,
            "round {round}: the majority's leader changed although it kept the store"
        );
    }

    // The cut-off node, queried from inside its namespace: store lost, the others failed,
    // and it does not claim the leadership.
    let node = lab.node(isolated);
    eventually(
        STEP,
        &format!("{isolated} reports the store lost"),
        async || {
            let v = node.api_inside("/api/cluster/status").await?;
            (v["coordination"]["available"] == false).then_some(())
        },
    )
    .await;
    eventually(
        STEP,
        &format!("{isolated} reports the others failed"),
        async || {
            let m = members(&node.api_inside("/api/cluster/nodes").await?);
            majority
                .iter()
                .all(|o| state_of(&m, o).as_deref() == Some("failed"))
                .then_some(())
        },
    )
    .await;
    let stepped_down = eventually(
        STEP,
        &format!("{isolated} does not claim to lead"),
        async || {
            let v = LeaderView::parse(&node.api_inside("/api/cluster/leader").await?)?;
            (!v.claims(isolated)).then_some(v)
        },
    )
    .await;
    let not_leading = cut.elapsed();
    // The shared configuration: the cut-off node refuses writes (it cannot reach etcd)
    // and changes nothing; a write on the majority succeeds once both of its nodes run it.
    let old_strategy =
        strategy(&node.api_inside("/api/pools/app").await.expect("pool")).expect("strategy");
    let refused = curl(
        node.ns.clone(),
        node.admin_url("/api/pools/app/strategy"),
        Some(serde_json::json!({ "strategy": new_strategy })),
    )
    .await
    .expect("the cut-off node answers inside its namespace");
    assert_eq!(
        refused.0, 503,
        "round {round}: a write on the cut-off node: {refused:?}"
    );
    assert_eq!(
        refused.1["error"]["code"], "store_unavailable",
        "{refused:?}"
    );
    let unchanged = strategy(&node.api_inside("/api/pools/app").await.expect("pool"));
    assert_eq!(
        unchanged.as_deref(),
        Some(old_strategy.as_str()),
        "round {round}: a refused write changed the cut-off node"
    );
    let response = quick_client()
        .post(
            lab.node(majority[0])
                .admin_url("/api/pools/app/strategy?consistency=quorum"),
        )
        .json(&serde_json::json!({ "strategy": new_strategy }))
        .send()
        .await
        .expect("write on the majority");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(
        status, 200,
        "round {round}: a write on the majority: {body}"
    );
    for id in majority {
        let v = lab.node(id).api("/api/pools/app").await.expect("pool");
        assert_eq!(
            strategy(&v).as_deref(),
            Some(new_strategy),
            "round {round}: {id}: {v}"
        );
    }
    // Stay cut off for longer than the lease TTL, then look again.
    tokio::time::sleep_until((cut + LEASE_TTL + Duration::from_millis(500)).into()).await;
    let late = LeaderView::parse(
        &node
            .api_inside("/api/cluster/leader")
            .await
            .expect("the cut-off node answers inside its namespace"),
    )
    .expect("leader view");
    assert!(
        !late.claims(isolated),
        "round {round}: {isolated}, cut off from etcd for more than the lease TTL, still claims to lead: {late:?}"
    );
    // The majority served all along.
    traffic.wait_for_more(20).await;

    // Heal.
    let healed = Instant::now();
    lab.net.heal(lab.node(isolated).index);
    let samples = watch.stop().await;
    // The views the cut-off node formed while it could not reach the backend must not
    // take the backend out on the majority, which reaches it, when the node comes back:
    // sample the majority's merged view through the heal.
    let sampled_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < sampled_until {
        for id in majority {
            if let Some(v) = lab.node(id).api("/api/cluster/status").await {
                let down: Vec<&Value> = v["backends"]
                    .as_array()
                    .map(|b| b.iter().filter(|b| b["cluster_down"] == true).collect())
                    .unwrap_or_default();
                assert!(
                    down.is_empty(),
                    "round {round}: {id} took a reachable backend out after the heal: {down:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab.all_alive(&all).await;
    let rejoined = healed.elapsed();
    eventually(
        STEP,
        &format!("{isolated} sees the store again"),
        async || {
            let v = lab.node(isolated).api("/api/cluster/status").await?;
            (v["coordination"]["available"] == true).then_some(())
        },
    )
    .await;
    let reconnected = healed.elapsed();
    eventually(
        STEP,
        &format!("{isolated} applies the write made during the partition"),
        async || {
            let v = lab.node(isolated).api("/api/pools/app").await?;
            (strategy(&v).as_deref() == Some(new_strategy)).then_some(())
        },
    )
    .await;
    let whole = lab.agreed_leader(&all).await;
    let agreed = healed.elapsed();
    assert_eq!(
        whole, after,
        "round {round}: healing must not change the majority's leader"
    );
    traffic.wait_for_more(10).await;
    let requests = traffic.stop_and_check().await;

    // No observation shows two leaders, or the cut-off node leading after the lease TTL.
    // The majority was queried before the cut-off node in each sample, so a sample where
    // both say `is_self` means both claimed to lead at the moment the second answered.
    let split: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.isolated.as_ref().is_some_and(|v| v.is_self)
                && s.majority
                    .iter()
                    .any(|(_, v)| v.as_ref().is_some_and(|v| v.is_self))
        })
        .collect();
    assert!(
        split.is_empty(),
        "round {round}: two leaders at once: {split:?}"
    );
    let late_claims: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > LEASE_TTL && s.isolated.as_ref().is_some_and(|v| v.claims(isolated)))
        .collect();
    assert!(
        late_claims.is_empty(),
        "round {round}: {isolated} claimed to lead after losing etcd for more than the lease TTL: {late_claims:?}"
    );
    let last_claim = samples
        .iter()
        .filter(|s| s.isolated.as_ref().is_some_and(|v| v.claims(isolated)))
        .map(|s| s.at)
        .max();
    eprintln!(
        "round {round}: {isolated} reported failed after {detected:?}; majority leader {} (token {}) \
         agreed after {elected:?}; {isolated} not leading ({stepped_down:?}) after {not_leading:?}, \
         last seen claiming at {last_claim:?}; {} watch samples; after healing: all alive in \
         {rejoined:?}, store back on {isolated} in {reconnected:?}, one leader agreed in {agreed:?}; \
         {requests} client requests, none failed",
        after.0,
        after.1,
        samples.len()
    );
    whole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_loses_the_lead_and_the_majority_keeps_serving() {
    let started = Instant::now();
    let net = match Net::create(3) {
        Ok(Some(net)) => net,
        Ok(None) => return,
        Err(error) => panic!("cannot set up the test network: {error}"),
    };
    let etcd = Etcd::start(net.bridge_ip()).await;
    let backend = Backend::start_at(SocketAddr::new(IpAddr::V4(net.bridge_ip()), 0), "b1", &[]);
    let mut lab = Lab {
        nodes: Vec::new(),
        backend: None,
        etcd: None,
        net,
    };
    let (backend_addr, etcd_url) = (backend.addr, etcd.url.clone());
    lab.backend = Some(backend);
    lab.etcd = Some(etcd);

    // node-3 first, so that it takes the lease: the first round cuts the leader off.
    lab.nodes
        .push(NsNode::start(&lab.net, 3, 3, backend_addr, &etcd_url));
    let node3 = lab.node("node-3");
    eventually(STEP, "node-3 leads alone", async || {
        let v = LeaderView::parse(&node3.api("/api/cluster/leader").await?)?;
        v.is_self.then_some(())
    })
    .await;
    for i in 1..=2 {
        let node = NsNode::start(&lab.net, i, 3, backend_addr, &etcd_url);
        lab.nodes.push(node);
    }
    let all = ["node-1", "node-2", "node-3"];
    lab.all_alive(&all).await;
    let first = lab.agreed_leader(&all).await;
    assert_eq!(first.0, "node-3", "node-3 took the lease first");
    eprintln!("cluster up after {:?}", started.elapsed());

    // Round 1: the leader is cut off.
    let second = partition_round(&lab, 1, "node-3", &["node-1", "node-2"], first, "p2c").await;
    // Round 2: node-3 again, now a follower.
    partition_round(
        &lab,
        2,
        "node-3",
        &["node-1", "node-2"],
        second,
        "least_connections",
    )
    .await;
    eprintln!("partition test took {:?}", started.elapsed());
}
