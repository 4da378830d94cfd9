//! `fulcrum ctl`: a small admin-API client that prints readable tables, and the
//! self-registration of `fulcrum backend --register`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// `fulcrum ctl` arguments.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Base URL of a node's admin API, e.g. http://127.0.0.1:9901 (`host:port` means
    /// `http://host:port`).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9901")]
    pub admin: String,
    /// Print the API's JSON instead of a table (before or after the subcommand).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to show.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `fulcrum ctl` commands.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// The cluster as seen by the node.
    Cluster {
        /// `status`, `nodes` or `leader`.
        #[command(subcommand)]
        what: ClusterWhat,
    },
}

/// `fulcrum ctl cluster` views.
#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum ClusterWhat {
    /// Members, leader, coordination store, config version, backends the cluster took out.
    Status,
    /// One row per member: state, admin address, config version, load.
    Nodes,
    /// The leader and its fencing token.
    Leader,
}

/// Runs `fulcrum ctl`; exit 0 on success, 1 when the node cannot be reached or answers
/// with an error (printed).
pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fulcrum ctl: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let CtlCommand::Cluster { what } = args.command;
        // The field every answer of that view has: what tells the admin API's answer
        // from anything else answering JSON on that address (a proxy listener's backend).
        let (path, field) = match what {
            ClusterWhat::Status => ("/api/cluster/status", "node_id"),
            ClusterWhat::Nodes => ("/api/cluster/nodes", "nodes"),
            ClusterWhat::Leader => ("/api/cluster/leader", "coordination"),
        };
        let url = format!("{}{path}", admin_base(&args.admin));
        let body = match get_json(&url).await {
            Ok(body) if body.get(field).is_some() => body,
            Ok(_) => {
                eprintln!(
                    "fulcrum ctl: GET {url}: the answer is not the admin API's (no `{field}`); is --admin the node's admin address?"
                );
                return ExitCode::from(1);
            }
            Err(error) => {
                eprintln!("fulcrum ctl: {error}");
                return ExitCode::from(1);
            }
        };
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&body).unwrap_or_default()
            );
            return ExitCode::SUCCESS;
        }
        let text = match what {
            ClusterWhat::Status => status_table(&body),
            ClusterWhat::Nodes => nodes_table(&body),
            ClusterWhat::Leader => leader_table(&body),
        };
        print!("{text}");
        ExitCode::SUCCESS
    })
}

/// `--admin` as a base URL without a trailing slash; `host:port` gets `http://`.
fn admin_base(admin: &str) -> String {
    let admin = admin.trim_end_matches('/');
    if admin.contains("://") {
        admin.to_owned()
    } else {
        format!("http://{admin}")
    }
}

async fn get_json(url: &str) -> Result<Value, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("GET {url}: invalid JSON: {e}"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("error");
        return Err(format!("GET {url}: {status}: {message}"));
    }
    Ok(body)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn nodes_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|n| {
            let mut id = s(&n["node_id"]);
            if n["is_self"].as_bool() == Some(true) {
                id.push_str(" (self)");
            }
            vec![
                id,
                s(&n["state"]),
                if n["is_leader"].as_bool() == Some(true) {
                    "yes"
                } else {
                    ""
                }
                .to_owned(),
                s(&n["admin"]),
                s(&n["gossip_addr"]),
                s(&n["config_version"]),
                s(&n["load"]["in_flight"]),
                n["load"]["requests_per_sec"]
                    .as_f64()
                    .map_or("-".to_owned(), |r| format!("{r:.1}")),
                n["backends"].as_array().map_or(0, Vec::len).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "STATE",
            "LEADER",
            "ADMIN",
            "GOSSIP",
            "CONFIG",
            "IN_FLIGHT",
            "REQ/S",
            "BACKENDS",
        ],
        &rows,
    )
}

/// The leader's state, marked stale while the node cannot reach the store.
fn leader_state(leader: &Value) -> String {
    if leader["stale"] == true {
        format!("{}, stale: store unreachable", s(&leader["leader_state"]))
    } else {
        s(&leader["leader_state"])
    }
}

fn leader_table(body: &Value) -> String {
    table(
        &["LEADER", "STATE", "TOKEN", "SELF", "COORDINATION", "METHOD"],
        &[vec![
            s(&body["leader"]),
            leader_state(body),
            s(&body["token"]),
            s(&body["is_self"]),
            s(&body["coordination"]),
            s(&body["method"]),
        ]],
    )
}

fn status_table(body: &Value) -> String {
    let mut out = String::new();
    let kv: Vec<(&str, String)> = vec![
        ("node", s(&body["node_id"])),
        ("cluster", s(&body["cluster_id"])),
        (
            "members",
            format!(
                "{} alive, {} failed, {} left",
                s(&body["members"]["alive"]),
                s(&body["members"]["failed"]),
                s(&body["members"]["left"])
            ),
        ),
        (
            "leader",
            format!(
                "{} ({}, token {})",
                s(&body["leader"]["leader"]),
                leader_state(&body["leader"]),
                s(&body["leader"]["token"])
            ),
        ),
        (
            "coordination",
            format!(
                "{} ({})",
                s(&body["coordination"]["kind"]),
                if body["coordination"]["available"].as_bool() == Some(false) {
                    "UNAVAILABLE"
                } else {
                    "up"
                }
            ),
        ),
        ("health merge", s(&body["health_merge"])),
        ("config version", s(&body["config_version"])),
    ];
    let mut kv = kv;
    let refused = &body["config_refused"];
    if refused.is_object() {
        kv.push((
            "REFUSED config",
            format!(
                "version {} by {}: {}",
                s(&refused["version"]),
                s(&refused["written_by"]),
                s(&refused["error"])
            ),
        ));
    }
    for conflict in body["node_id_conflicts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        kv.push((
            "NODE ID CONFLICT",
            format!(
                "another live node uses this node's id at {} (generation {})",
                s(&conflict["gossip_addr"]),
                s(&conflict["generation"])
            ),
        ));
    }
    for (k, v) in kv {
        out.push_str(&format!("{k:<15} {v}\n"));
    }
    let rows: Vec<Vec<String>> = body["backends"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|b| {
            let peers: BTreeMap<String, Value> =
                serde_json::from_value(b["peers"].clone()).unwrap_or_default();
            let peers: Vec<String> = peers
                .iter()
                .map(|(n, st)| format!("{n}={}", s(st)))
                .collect();
            vec![
                s(&b["pool"]),
                s(&b["address"]),
                s(&b["local"]),
                peers.join(" "),
                if b["cluster_down"].as_bool() == Some(true) {
                    "DOWN"
                } else {
                    "up"
                }
                .to_owned(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["POOL", "BACKEND", "LOCAL", "PEERS", "CLUSTER"],
            &rows,
        ));
    }
    out
}

/// What `fulcrum backend --register` registers, and where.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Base URL of the node's admin API.
    pub admin: String,
    /// Pool to register in.
    pub pool: String,
    /// This backend's `host:port`.
    pub address: String,
    /// Tags of the registration.
    pub tags: BTreeMap<String, String>,
    /// Weight, 1..=65535.
    pub weight: u32,
    /// Most requests in flight at once (the backend's `max_requests`); 0 = the pool's
    /// `default_max_requests`.
    pub max_requests: u32,
    /// Time-to-live; refreshed every third of it.
    pub ttl: Duration,
    /// Bearer token of the admin API, if it needs one.
    pub token: Option<String>,
}

/// Keeps the backend registered (`POST /api/pools/{pool}/backends` with `ttl_secs`),
/// refreshing every third of the TTL, until `stop` fires; then deregisters it
/// (`DELETE`). Failures are logged and retried; they never stop the backend.
pub async fn keep_registered(r: Registration, stop: tokio_util::sync::CancellationToken) {
    let Registration {
        admin,
        pool,
        address,
        tags,
        weight,
        max_requests,
        ttl,
        token,
    } = r;
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "registration disabled");
            return;
        }
    };
    let base = admin.trim_end_matches('/').to_owned();
    let url = format!("{base}/api/pools/{pool}/backends");
    let body = serde_json::json!({
        "address": address, "weight": weight, "tags": tags, "max_requests": max_requests,
        "ttl_secs": ttl.as_secs().max(1),
    });
    let every = (ttl / 3).max(Duration::from_millis(200));
    let mut registered = false;
    loop {
        let mut request = client.post(&url).json(&body);
        if let Some(t) = &token {
            request = request.bearer_auth(t);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {
                if !registered {
                    tracing::info!(%url, %address, "registered");
                    registered = true;
                }
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                if registered
                    && status == reqwest::StatusCode::CONFLICT
                    && text.contains("duplicate_backend")
                {
                    // A pool without the registry keeps an added backend until it is
                    // removed: a renewal finds it there, which is what it wanted.
                    tracing::debug!(%url, %address, "still in the pool");
                } else {
                    tracing::warn!(%url, %status, body = %text, "registration refused");
                }
            }
            Err(error) => tracing::warn!(%url, %error, "registration failed; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    let mut request = client.delete(format!("{url}/{address}"));
    if let Some(t) = &token {
        request = request.bearer_auth(t);
    }
    let _ = request.send().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_without_a_scheme_is_http() {
        assert_eq!(admin_base("127.0.0.1:9901"), "http://127.0.0.1:9901");
        assert_eq!(admin_base("http://10.0.0.1:9901/"), "http://10.0.0.1:9901");
        assert_eq!(admin_base("https://lb.example"), "https://lb.example");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        let nodes = serde_json::json!({"nodes": [
            {"node_id": "n1", "is_self": true, "state": "alive", "is_leader": true,
             "admin": "127.0.0.1:1", "gossip_addr": "127.0.0.1:2", "config_version": 3,
             "load": {"in_flight": 2, "requests_per_sec": 10.0}, "backends": [1, 2]}
        ]});
        let text = nodes_table(&nodes);
        assert!(text.contains("n1 (self)"), "{text}");
        assert!(text.contains("alive"), "{text}");
        assert!(text.contains("10.0"), "{text}");
    }

    #[test]
    fn status_shows_a_refused_configuration_and_node_id_conflicts() {
        let status = serde_json::json!({
            "node_id": "n3", "cluster_id": "c", "config_version": 4,
            "members": {"alive": 3, "failed": 0, "left": 0},
            "leader": {"leader": "n1", "token": null},
            "coordination": {"kind": "none", "available": true},
            "config_refused": {"version": 5, "written_by": "n1", "error": "pools.app.backends: empty", "at_ms": 1},
            "node_id_conflicts": [{"node_id": "n3", "gossip_addr": "127.0.0.1:7947", "generation": 42}],
            "backends": []
        });
        let text = status_table(&status);
        assert!(
            text.contains("REFUSED config  version 5 by n1: pools.app.backends: empty"),
            "{text}"
        );
        assert!(text.contains("NODE ID CONFLICT"), "{text}");
        assert!(text.contains("127.0.0.1:7947 (generation 42)"), "{text}");
        let quiet = serde_json::json!({"config_refused": null, "node_id_conflicts": []});
        let text = status_table(&quiet);
        assert!(
            !text.contains("REFUSED") && !text.contains("CONFLICT"),
            "{text}"
        );
    }
}
