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
    /// Bearer token for changes, when the node sets `admin.token`.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "FULCRUM_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// How far a change must have spread before the command returns, in a cluster:
    /// `async` (applied on this node), `quorum` or `all` (of the live nodes).
    #[arg(long, global = true, value_name = "LEVEL", value_parser = ["async", "quorum", "all"])]
    pub consistency: Option<String>,
    /// Print the API's JSON instead of a table (before or after the subcommand).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to show or change.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `fulcrum ctl` commands: reads (`status`, `pools`, `backends`, `endpoints`, `cluster`)
/// print tables; changes (`strategy`, `drain`, `enable`, `disable`, `weight`, `reload`)
/// print what the node answered. Each is one admin API call (docs/API.md).
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// The node: version, uptime, listeners, totals (`GET /api/status`).
    Status,
    /// One row per pool: strategy, backends by state, panic, active and queued requests
    /// (`GET /api/pools`).
    Pools,
    /// One row per backend of POOL: state, weights, load, counts, latency
    /// (`GET /api/pools/{pool}/backends`).
    Backends {
        /// The pool.
        pool: String,
    },
    /// Endpoint statistics and long/short class, busiest first (`GET /api/endpoints`).
    Endpoints {
        /// Only this pool's endpoints.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Switch POOL to STRATEGY (`POST /api/pools/{pool}/strategy`).
    Strategy {
        /// The pool.
        pool: String,
        /// A strategy name, e.g. `p2c` (docs/ALGORITHMS.md).
        strategy: String,
    },
    /// Stop sending new requests to a backend; requests in flight finish (HAProxy `drain`).
    Drain {
        /// The pool.
        pool: String,
        /// The backend's address as the pool lists it.
        address: String,
    },
    /// Put a drained or disabled backend back in rotation.
    Enable {
        /// The pool.
        pool: String,
        /// The backend's address as the pool lists it.
        address: String,
    },
    /// Take a backend out of rotation for maintenance (HAProxy `maint`).
    Disable {
        /// The pool.
        pool: String,
        /// The backend's address as the pool lists it.
        address: String,
    },
    /// Set a backend's weight, 1..=65535 (`POST …/backends/{address}/weight`).
    Weight {
        /// The pool.
        pool: String,
        /// The backend's address as the pool lists it.
        address: String,
        /// The new weight.
        weight: u32,
    },
    /// Re-read the node's configuration file, as SIGHUP does (`POST /api/reload`).
    Reload,
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

/// Runs `fulcrum ctl`: one admin API call, printed as a table or a line (or the API's
/// JSON with `--json`); exit 0 on success, 1 when the node cannot be reached, is not an
/// admin API, or answers with an error (its code and message are printed).
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
        let call = match Call::of(&args) {
            Ok(call) => call,
            Err(error) => {
                eprintln!("fulcrum ctl: {error}");
                return ExitCode::from(2);
            }
        };
        let body = match call.send(args.token.as_deref()).await {
            Ok(body) if body.get(call.field).is_some() => body,
            Ok(_) => {
                eprintln!(
                    "fulcrum ctl: {} {}: the answer is not the admin API's (no `{}`); is --admin the node's admin address?",
                    call.method, call.url, call.field
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
        let text = match &args.command {
            CtlCommand::Status => node_status_table(&body),
            CtlCommand::Pools => pools_table(&body),
            CtlCommand::Backends { .. } => backends_table(&body),
            CtlCommand::Endpoints { pool } => endpoints_table(&body, pool.as_deref()),
            CtlCommand::Strategy { .. }
            | CtlCommand::Drain { .. }
            | CtlCommand::Enable { .. }
            | CtlCommand::Disable { .. }
            | CtlCommand::Weight { .. }
            | CtlCommand::Reload => change_line(&args.command, &body),
            CtlCommand::Cluster { what } => match what {
                ClusterWhat::Status => status_table(&body),
                ClusterWhat::Nodes => nodes_table(&body),
                ClusterWhat::Leader => leader_table(&body),
            },
        };
        print!("{text}");
        ExitCode::SUCCESS
    })
}

/// One admin API call of a `fulcrum ctl` command.
struct Call {
    method: reqwest::Method,
    url: reqwest::Url,
    body: Option<Value>,
    /// A field every successful answer of that call has: it tells the admin API's answer
    /// from anything else answering JSON on that address (a proxy listener's backend).
    field: &'static str,
}

impl Call {
    /// The call for `args`; an error names a malformed `--admin`.
    fn of(args: &CtlArgs) -> Result<Call, String> {
        let base = admin_base(&args.admin);
        let mut url = reqwest::Url::parse(&base)
            .ok()
            .filter(|url| !url.cannot_be_a_base() && url.host().is_some())
            .ok_or_else(|| format!("--admin {}: not an http(s) URL or host:port", args.admin))?;
        let get = reqwest::Method::GET;
        let post = reqwest::Method::POST;
        let backend = |pool: &str, address: &str, action: &str| {
            vec![
                "api".to_owned(),
                "pools".to_owned(),
                pool.to_owned(),
                "backends".to_owned(),
                address.to_owned(),
                action.to_owned(),
            ]
        };
        let (method, segments, body, field): (_, Vec<String>, _, _) = match &args.command {
            CtlCommand::Status => (get, segments(&["api", "status"]), None, "uptime_seconds"),
            CtlCommand::Pools => (get, segments(&["api", "pools"]), None, "pools"),
            CtlCommand::Backends { pool } => (
                get,
                segments(&["api", "pools", pool, "backends"]),
                None,
                "backends",
            ),
            CtlCommand::Endpoints { .. } => {
                (get, segments(&["api", "endpoints"]), None, "endpoints")
            }
            CtlCommand::Strategy { pool, strategy } => (
                post,
                segments(&["api", "pools", pool, "strategy"]),
                Some(serde_json::json!({ "strategy": strategy })),
                "strategy",
            ),
            CtlCommand::Drain { pool, address } => {
                (post, backend(pool, address, "drain"), None, "state")
            }
            CtlCommand::Enable { pool, address } => {
                (post, backend(pool, address, "enable"), None, "state")
            }
            CtlCommand::Disable { pool, address } => {
                (post, backend(pool, address, "disable"), None, "state")
            }
            CtlCommand::Weight {
                pool,
                address,
                weight,
            } => (
                post,
                backend(pool, address, "weight"),
                Some(serde_json::json!({ "weight": weight })),
                "weight",
            ),
            CtlCommand::Reload => (post, segments(&["api", "reload"]), None, "reloaded"),
            CtlCommand::Cluster { what } => match what {
                ClusterWhat::Status => (
                    get,
                    segments(&["api", "cluster", "status"]),
                    None,
                    "node_id",
                ),
                ClusterWhat::Nodes => (get, segments(&["api", "cluster", "nodes"]), None, "nodes"),
                ClusterWhat::Leader => (
                    get,
                    segments(&["api", "cluster", "leader"]),
                    None,
                    "coordination",
                ),
            },
        };
        url.path_segments_mut()
            .map_err(|()| format!("--admin {}: not a base URL", args.admin))?
            .pop_if_empty()
            .extend(&segments);
        // Only calls that change something take a consistency level (docs/API.md).
        if let Some(level) = &args.consistency
            && method == reqwest::Method::POST
            && !matches!(args.command, CtlCommand::Reload)
        {
            url.query_pairs_mut().append_pair("consistency", level);
        }
        Ok(Call {
            method,
            url,
            body,
            field,
        })
    }

    /// Sends the call; the JSON answer, or an error naming the call and, for an API
    /// error, its status, code and message.
    async fn send(&self, token: Option<&str>) -> Result<Value, String> {
        let (method, url) = (&self.method, &self.url);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        let mut request = client.request(method.clone(), url.clone());
        if let Some(body) = &self.body {
            request = request.json(body);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("{method} {url}: {status}, and the answer is not JSON: {e}"))?;
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("error");
            let message = body["error"]["message"].as_str().unwrap_or("");
            return Err(format!("{method} {url}: {status}: {code}: {message}"));
        }
        Ok(body)
    }
}

fn segments(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
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

/// A number of milliseconds with one decimal, `-` when absent.
fn ms(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |ms| format!("{ms:.1}"))
}

/// The rows of `key` in `body`, or none.
fn rows_of<'a>(body: &'a Value, key: &str) -> &'a [Value] {
    body[key].as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn node_status_table(body: &Value) -> String {
    let totals = &body["totals"];
    let mut out = String::new();
    let uptime = body["uptime_seconds"]
        .as_f64()
        .map_or("-".to_owned(), |secs| {
            humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
        });
    for (key, value) in [
        ("node", s(&body["node"])),
        ("version", s(&body["version"])),
        ("uptime", uptime),
        ("threads", s(&body["threads"])),
        (
            "totals",
            format!(
                "{} pool(s), {} request(s), {} error(s), {} in flight to backends, {} active client request(s)",
                s(&totals["pools"]),
                s(&totals["requests"]),
                s(&totals["errors"]),
                s(&totals["in_flight"]),
                s(&totals["active_requests"])
            ),
        ),
    ] {
        out.push_str(&format!("{key:<9} {value}\n"));
    }
    let rows: Vec<Vec<String>> = rows_of(body, "listeners")
        .iter()
        .map(|l| vec![s(&l["name"]), s(&l["listen"]), s(&l["protocol"])])
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(&["LISTENER", "ADDRESS", "PROTOCOL"], &rows));
    }
    out
}

fn pools_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = rows_of(body, "pools")
        .iter()
        .map(|p| {
            let b = &p["backends"];
            vec![
                s(&p["name"]),
                s(&p["strategy"]),
                format!("{}/{}", s(&b["healthy"]), s(&b["total"])),
                s(&b["unhealthy"]),
                s(&b["ejected"]),
                s(&b["draining"]),
                s(&b["disabled"]),
                if p["panic"] == true { "PANIC" } else { "no" }.to_owned(),
                s(&p["active_requests"]),
                s(&p["queued_requests"]),
            ]
        })
        .collect();
    table(
        &[
            "POOL",
            "STRATEGY",
            "HEALTHY",
            "UNHEALTHY",
            "EJECTED",
            "DRAINING",
            "DISABLED",
            "PANIC",
            "ACTIVE",
            "QUEUED",
        ],
        &rows,
    )
}

fn backends_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = rows_of(body, "backends")
        .iter()
        .map(|b| {
            let mut state = s(&b["state"]);
            if b["in_rotation"] == false && state == "healthy" {
                state.push_str(" (out)");
            }
            let tags: Vec<String> = b["tags"]
                .as_object()
                .map(|tags| tags.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
                .unwrap_or_default();
            let limit = match b["max_requests"].as_u64() {
                Some(0) | None => String::new(),
                Some(limit) => format!("/{limit}"),
            };
            vec![
                s(&b["address"]),
                state,
                s(&b["weight"]),
                b["effective_weight"]
                    .as_f64()
                    .map_or("-".to_owned(), |w| format!("{w:.2}")),
                format!("{}{limit}", s(&b["in_flight"])),
                s(&b["requests"]),
                s(&b["errors"]),
                ms(&b["latency_ms"]["ewma"]),
                ms(&b["latency_ms"]["p50"]),
                ms(&b["latency_ms"]["p99"]),
                tags.join(","),
            ]
        })
        .collect();
    let mut out = format!(
        "pool {}, strategy {}{}\n",
        s(&body["pool"]),
        s(&body["strategy"]),
        if body["panic"] == true {
            ", PANIC (every backend in rotation)"
        } else {
            ""
        }
    );
    out.push_str(&table(
        &[
            "BACKEND",
            "STATE",
            "WEIGHT",
            "EFFECTIVE",
            "IN_FLIGHT",
            "REQUESTS",
            "ERRORS",
            "EWMA_MS",
            "P50_MS",
            "P99_MS",
            "TAGS",
        ],
        &rows,
    ));
    out
}

fn endpoints_table(body: &Value, pool: Option<&str>) -> String {
    let rows: Vec<Vec<String>> = rows_of(body, "endpoints")
        .iter()
        .filter(|e| pool.is_none_or(|pool| e["pool"].as_str() == Some(pool)))
        .map(|e| {
            vec![
                s(&e["pool"]),
                s(&e["endpoint"]),
                s(&e["class"]),
                s(&e["count"]),
                s(&e["errors"]),
                ms(&e["average_ms"]),
                ms(&e["p50_ms"]),
                ms(&e["p95_ms"]),
                ms(&e["p99_ms"]),
                ms(&e["max_ms"]),
            ]
        })
        .collect();
    table(
        &[
            "POOL", "ENDPOINT", "CLASS", "COUNT", "ERRORS", "AVG_MS", "P50_MS", "P95_MS", "P99_MS",
            "MAX_MS",
        ],
        &rows,
    )
}

/// What `command`, a change, did, in a line or two: the node's answer, and in a cluster
/// how far the write has spread.
fn change_line(command: &CtlCommand, body: &Value) -> String {
    let mut out = match command {
        CtlCommand::Reload => format!("reloaded: {}\n", s(&body["summary"])),
        CtlCommand::Strategy { .. } => format!(
            "pool {}: strategy {} (was {})\n",
            s(&body["pool"]),
            s(&body["strategy"]),
            s(&body["previous"])
        ),
        CtlCommand::Weight { .. } => format!(
            "pool {}: backend {} weight {}\n",
            s(&body["pool"]),
            s(&body["backend"]),
            s(&body["weight"])
        ),
        _ => format!(
            "pool {}: backend {} is {}\n",
            s(&body["pool"]),
            s(&body["backend"]),
            s(&body["state"])
        ),
    };
    let write = &body["write"];
    if write.is_object() {
        let names = |key: &str| {
            rows_of(write, key)
                .iter()
                .map(s)
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "write: version {}, consistency {}, acknowledged by {}",
            s(&write["version"]),
            s(&write["consistency"]),
            names("acknowledged")
        ));
        let skipped = names("skipped");
        if !skipped.is_empty() {
            out.push_str(&format!(", skipped (not live): {skipped}"));
        }
        out.push('\n');
    }
    out
}

fn nodes_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = rows_of(body, "nodes")
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
    for conflict in rows_of(body, "node_id_conflicts") {
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
    let rows: Vec<Vec<String>> = rows_of(body, "backends")
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
