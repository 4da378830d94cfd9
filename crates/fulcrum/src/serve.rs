//! Running a node: configuration → data plane + admin API, until a signal.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use fulcrum_admin::{AdminState, ReloadFn};
use fulcrum_cluster::runtime::ControlPlane;
use fulcrum_config::Config;
use fulcrum_proxy::Node;
use fulcrum_proxy::node::NodeSpec;
use fulcrum_proxy::spec::{ResolveError, node_spec};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Where a node's configuration came from, for reloads.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file SIGHUP, `POST /api/reload` and a change of the file re-read.
    pub path: PathBuf,
    /// Whether a change of the file reloads by itself ([`crate::watch`]).
    pub watch: bool,
}

/// `fulcrum run`: loads and validates `path`, then serves until SIGTERM/SIGINT; with
/// `watch`, a change of the file reloads it.
pub fn run(path: PathBuf, threads: Option<usize>, watch: bool) -> ExitCode {
    let runtime = match control_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    // SIGHUP's default action ends the process. Take it over before anything slow
    // (reading the file, resolving backend names), so that a reload signal sent during
    // start-up (a service manager's reload racing the start) is kept and served once the
    // node is ready, instead of killing it.
    let hangup = runtime.block_on(async { signal(SignalKind::hangup()).ok() });
    let config = match fulcrum_config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            eprintln!("fulcrum: refusing to start with an invalid configuration");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&config.log);
    serve_on(
        runtime,
        hangup,
        config,
        Some(ConfigSource { path, watch }),
        threads,
        |_, _| {},
    )
}

/// The control runtime (admin API, health checks, signals), on the calling thread.
fn control_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("fulcrum: cannot start the control runtime: {error}");
            ExitCode::from(1)
        })
}

/// Serves `config` on a control runtime on this thread (admin API, health checks,
/// signals) plus the node's worker threads. `source` is the file SIGHUP,
/// `POST /api/reload` and (if watched) a change of the file re-read. `on_ready` runs once
/// everything is bound, after the ready line is printed.
pub fn serve(
    config: Config,
    source: Option<ConfigSource>,
    threads: Option<usize>,
    on_ready: impl FnOnce(&Node, SocketAddr),
) -> ExitCode {
    let runtime = match control_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let hangup = runtime.block_on(async { signal(SignalKind::hangup()).ok() });
    serve_on(runtime, hangup, config, source, threads, on_ready)
}

/// [`serve`] on `runtime`, with SIGHUP already taken over (`hangup`).
fn serve_on(
    runtime: tokio::runtime::Runtime,
    hangup: Option<tokio::signal::unix::Signal>,
    config: Config,
    source: Option<ConfigSource>,
    threads: Option<usize>,
    on_ready: impl FnOnce(&Node, SocketAddr),
) -> ExitCode {
    let spec = match spec_located(&config, source.as_ref().map(|s| s.path.as_path()), threads) {
        Ok(spec) => spec,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    raise_open_file_limit(&config);
    runtime.block_on(async move {
        let node = match Node::start(&spec) {
            Ok(node) => node,
            Err(error) => {
                eprintln!("fulcrum: {error}");
                return ExitCode::from(1);
            }
        };
        let admin_listener = match tokio::net::TcpListener::bind(config.admin.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!(
                    "fulcrum: admin: cannot listen on {}: {error}",
                    config.admin.listen
                );
                node.shutdown().await;
                return ExitCode::from(1);
            }
        };
        let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.listen);

        let control = match ControlPlane::start(node.clone(), config.clone(), admin_addr).await {
            Ok(control) => control,
            Err(error) => {
                eprintln!("fulcrum: {error}");
                node.shutdown().await;
                return ExitCode::from(1);
            }
        };
        let reload: Option<ReloadFn> = source.as_ref().map(|source| {
            let path = source.path.clone();
            let control = control.clone();
            let started = config.clone();
            // The log level the node runs (a reload changes it).
            let level = Arc::new(std::sync::Mutex::new(config.log.level.clone()));
            Arc::new(move || reload_from(&path, &control, &started, admin_addr, &level)) as ReloadFn
        });
        let admin_shutdown = CancellationToken::new();
        let stop_watching = CancellationToken::new();
        if let (Some(source), Some(reload)) = (&source, &reload)
            && source.watch
        {
            match crate::watch::spawn(
                source.path.clone(),
                Arc::clone(reload),
                stop_watching.clone(),
            ) {
                Ok(()) => tracing::info!(file = %source.path.display(), "reloading when the configuration file changes"),
                Err(error) => tracing::warn!(%error, "configuration file not watched; SIGHUP and POST /api/reload still reload"),
            }
        }
        let state = AdminState {
            node: node.clone(),
            node_name: node_name(),
            token: config.admin.token.clone(),
            reload: reload.clone(),
            control: Some(control.clone()),
        };
        let admin = tokio::spawn(fulcrum_admin::serve(
            admin_listener,
            state,
            admin_shutdown.clone(),
        ));
        tracing::info!(address = %admin_addr, "admin API listening");

        print_ready(&node, admin_addr);
        on_ready(&node, admin_addr);

        let mut exit = ExitCode::SUCCESS;
        tokio::select! {
            () = wait_for_shutdown(reload, hangup) => {}
            error = control.fatal_error() => {
                tracing::error!(%error, "stopping");
                eprintln!("fulcrum: {error}");
                exit = ExitCode::from(2);
            }
        }
        stop_watching.cancel();
        control.shutdown().await;
        let drain = tokio::spawn({
            let node = node.clone();
            async move { node.shutdown().await }
        });
        // A second signal during the drain exits at once.
        tokio::select! {
            _ = drain => {}
            () = next_termination_signal() => {
                eprintln!("fulcrum: second signal; exiting without waiting for the drain");
                // At once: returning would wait for the worker runtimes, which are still
                // draining.
                std::process::exit(1);
            }
        }
        admin_shutdown.cancel();
        let _ = admin.await;
        exit
    })
}

/// File descriptors kept aside, beyond two per client connection, for what is not a
/// proxied connection: the admin API and its clients, health checks, gossip, the
/// coordination store, log and configuration files.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit, as Go's
/// runtime does at start and HAProxy does for its `maxconn`: the usual soft default of
/// 1024 would cap a proxy at about 500 client connections (each may hold a backend
/// connection too), while the hard limit is what the operator allowed. Then warns when
/// the listeners' `max_connections` add up to more than the limit can hold: two
/// descriptors per client connection plus [`RESERVED_DESCRIPTORS`]. Beyond the limit,
/// accepting fails with EMFILE (the listener backs off and retries) and so do backend
/// connections (502). Listeners without `max_connections` are unbounded and not counted.
fn raise_open_file_limit(config: &Config) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-file limit (ulimit -n)");
            match before {
                Some((soft, _)) => soft,
                None => return,
            }
        }
    };
    if let Some((soft, hard)) = before
        && limit > soft
    {
        tracing::info!(
            from = soft,
            to = limit,
            hard,
            "raised the open-file soft limit (ulimit -n) to the hard limit"
        );
    }
    let clients: u64 = config
        .listeners
        .iter()
        .map(|l| u64::from(l.max_connections))
        .sum();
    let needed = clients
        .saturating_mul(2)
        .saturating_add(RESERVED_DESCRIPTORS);
    if clients > 0 && needed > limit {
        tracing::warn!(
            max_connections = clients,
            needed,
            open_file_limit = limit,
            "the listeners' max_connections need up to {needed} open files (two per client \
             connection, plus {RESERVED_DESCRIPTORS}) but the limit is {limit}: raise the \
             hard limit (ulimit -Hn, LimitNOFILE= in systemd) or lower max_connections, or \
             connections beyond it will fail"
        );
    }
}

/// The node spec of `config`, or why it cannot be built (what validation cannot know: a
/// backend host name that does not resolve, a CA file that changed since), located in
/// `file` when there is one: `FILE:LINE:COLUMN: pools.P.backends[I].address: …`, the
/// format of every other configuration error.
pub(crate) fn spec_located(
    config: &Config,
    file: Option<&std::path::Path>,
    threads: Option<usize>,
) -> Result<NodeSpec, String> {
    // Listener certificates with keys that do not match them (the validator reads the
    // files but has no TLS library to compare keys), located at the key.
    for (i, listener) in config.listeners.iter().enumerate() {
        for (at, certificate, private_key) in listener.tls.iter().flat_map(|t| t.pairs()) {
            if let Err(message) = fulcrum_proxy::tls::check_pair(certificate, private_key) {
                let path = format!("listeners[{i}].tls.{at}private_key");
                return Err(match file {
                    Some(file) => fulcrum_config::diagnostic_at(file, &path, message).to_string(),
                    None => format!("fulcrum: {path}: {message}"),
                });
            }
        }
    }
    node_spec(config, threads).map_err(|error| {
        let Some(file) = file else {
            return format!("fulcrum: {error}");
        };
        let (path, message) = match &error {
            ResolveError::Address {
                pool,
                address,
                reason,
            } => {
                let index = config
                    .pools
                    .get(pool)
                    .and_then(|p| p.backends.iter().position(|b| &b.address == address));
                let path = match index {
                    Some(i) => format!("pools.{pool}.backends[{i}].address"),
                    None => format!("pools.{pool}"),
                };
                (
                    path,
                    format!("cannot resolve backend `{address}`: {reason}"),
                )
            }
            ResolveError::Tls { pool, message } => (format!("pools.{pool}.tls"), message.clone()),
            other => return format!("fulcrum: {other}"),
        };
        fulcrum_config::diagnostic_at(file, &path, message).to_string()
    })
}

fn node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fulcrum".to_owned())
}

/// Prints the machine-readable ready line on stdout.
fn print_ready(node: &Node, admin: SocketAddr) {
    let line = json!({
        "event": "ready",
        "admin": admin.to_string(),
        "threads": node.threads(),
        "listeners": node.listener_status(),
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn reload_from(
    path: &std::path::Path,
    control: &ControlPlane,
    started: &Config,
    admin_addr: SocketAddr,
    level: &std::sync::Mutex<String>,
) -> Result<String, String> {
    let config = fulcrum_config::load(path).map_err(|e| e.to_string())?;
    // Blocks that only a restart applies; `log.level` applies now. The admin address may
    // name the port an ephemeral `:0` was given.
    let mut on_restart = Vec::new();
    let admin_listen_kept =
        config.admin.listen == started.admin.listen || config.admin.listen == admin_addr;
    if config.admin.token != started.admin.token || !admin_listen_kept {
        on_restart.push("admin");
    }
    if config.cluster != started.cluster {
        on_restart.push("cluster");
    }
    if config.runtime != started.runtime {
        on_restart.push("runtime");
    }
    if config.log.format != started.log.format {
        on_restart.push("log.format");
    }
    for what in &on_restart {
        tracing::warn!("{what} settings changed; they take effect on restart");
    }
    let pools = config.pools.len();
    let backends: usize = config.pools.values().map(|p| p.backends.len()).sum();
    control.set_base(config.clone()).map_err(|error| {
        // Located in the file when the file itself is at fault (a backend name that does
        // not resolve, a listener change that needs a restart): resolved again only on
        // this error path.
        match spec_located(&config, Some(path), Some(1)) {
            Err(located) => located,
            Ok(spec) => match control.node().listener_change(&spec) {
                Some(change) => {
                    fulcrum_config::diagnostic_at(path, &change.path(), change.to_string())
                        .to_string()
                }
                None => {
                    let shared = control.shared();
                    let mut overrides = runtime_overrides(&config, &shared);
                    overrides.extend(runtime_additions(&shared));
                    if overrides.is_empty() {
                        error
                    } else {
                        format!(
                            "{error} (the file is valid on its own: run-time changes made \
                             through the admin API make it invalid; they are: {}; undo the \
                             one at fault through the API, or change the file to fit them)",
                            overrides.join("; ")
                        )
                    }
                }
            },
        }
    })?;
    let level_change = {
        // Poisoned only if a reload panicked; the level it holds is still a level.
        let mut level = level
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let change = crate::logging::set_level(&level, &config.log.level);
        level.clone_from(&config.log.level);
        change
    };
    if let Some(change) = &level_change {
        tracing::warn!("{change}");
    }
    let overrides = runtime_overrides(&config, &control.shared());
    for what in &overrides {
        tracing::warn!(%what, "a run-time change made through the admin API overrides the file");
    }
    let mut summary = format!(
        "{pools} pool(s), {backends} backend(s) from {}",
        path.display()
    );
    if let Some(change) = level_change {
        summary.push_str(&format!("; {change}"));
    }
    if !on_restart.is_empty() {
        summary.push_str(&format!(
            "; changed settings that take effect on restart: {}",
            on_restart.join(", ")
        ));
    }
    if !overrides.is_empty() {
        summary.push_str(&format!(
            "; {} run-time change(s) made through the admin API override the file (undo them through the API): {}",
            overrides.len(),
            overrides.join("; ")
        ));
    }
    Ok(summary)
}

/// The backends added through the admin API (kept across reloads), named for a refused
/// reload: such a backend may be what makes the file invalid (a duplicate of one the file
/// now lists).
fn runtime_additions(shared: &fulcrum_cluster::shared::SharedConfig) -> Vec<String> {
    shared
        .pools
        .iter()
        .flat_map(|(name, changes)| {
            changes
                .backends
                .iter()
                .filter(|(_, b)| b.added.is_some() && !b.removed)
                .map(move |(address, _)| {
                    format!("pools.{name} backend `{address}`: added at run time")
                })
        })
        .collect()
}

/// Where the run-time overlay (changes made through the admin API, kept across reloads
/// and, in a cluster, shared) makes the node run something else than `config` says: a
/// strategy or weight that differs from the file's, a backend of the file removed, and
/// changes kept for a pool the file no longer has (they apply again if it comes back).
/// Drain and disable states and backends added at run time are left out: they add to
/// the file rather than contradict it.
fn runtime_overrides(
    config: &Config,
    shared: &fulcrum_cluster::shared::SharedConfig,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, changes) in &shared.pools {
        let Some(pool) = config.pools.get(name) else {
            out.push(format!(
                "pool `{name}` is not in the file, but run-time changes to it are kept and apply again if it comes back"
            ));
            continue;
        };
        if let Some(strategy) = &changes.strategy
            && strategy != pool.strategy.name()
        {
            out.push(format!(
                "pools.{name}.strategy: `{}` in the file, `{strategy}` set at run time",
                pool.strategy.name()
            ));
        }
        for (address, change) in &changes.backends {
            let Some(backend) = pool.backends.iter().find(|b| b.address == *address) else {
                continue;
            };
            if change.removed {
                out.push(format!(
                    "pools.{name} backend `{address}`: in the file, removed at run time"
                ));
            } else if let Some(weight) = change.weight
                && weight != backend.weight
            {
                out.push(format!(
                    "pools.{name} backend `{address}`: weight {} in the file, {weight} set at run time",
                    backend.weight
                ));
            }
        }
    }
    out
}

/// Waits for SIGTERM or SIGINT, reloading on SIGHUP (`hangup`) meanwhile; a SIGHUP that
/// arrived before this was called reloads at once.
async fn wait_for_shutdown(
    reload: Option<ReloadFn>,
    mut hangup: Option<tokio::signal::unix::Signal>,
) {
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = next_termination_signal() => return,
            () = hup => {
                let Some(reload) = reload.clone() else {
                    tracing::warn!("SIGHUP ignored: no configuration file to reload");
                    continue;
                };
                match tokio::task::spawn_blocking(move || reload()).await {
                    Ok(Ok(summary)) => tracing::info!(%summary, "SIGHUP: configuration reloaded"),
                    Ok(Err(error)) => tracing::error!(%error, "SIGHUP: new configuration refused; the running one stays"),
                    Err(error) => tracing::error!(%error, "SIGHUP: reload failed"),
                }
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn next_termination_signal() {
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
