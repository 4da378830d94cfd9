//! `fulcrum demo` and `fulcrum backend`.
//!
//! The demo needs no configuration: it starts three simulated backends (the third one
//! four times slower), a node balancing them with `peak_ewma` behind active health checks,
//! and the admin API, all on 127.0.0.1, then prints where to look and what to try.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use fulcrum_balance::StrategyKind;
use fulcrum_config::{
    BackendConfig, Config, HealthCheckConfig, ListenerConfig, PoolConfig, RouteConfig,
};
use fulcrum_sim::{BackendArgs, BackendHandle, LatencySpec, start_backend};

/// Options of `fulcrum demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Proxy listener [default: 127.0.0.1:8080, or a free port if taken].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Admin API listener [default: 127.0.0.1:9901, or a free port if taken].
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Strategy of the demo pool.
    #[arg(long, value_name = "NAME", default_value = "peak_ewma", value_parser = StrategyKind::from_str)]
    strategy: StrategyKind,
    /// Worker threads of the node.
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
}

/// `preferred` if it can be bound now, else the same IP with an ephemeral port.
fn free_or_ephemeral(preferred: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(preferred) {
        Ok(_) => preferred,
        Err(_) => SocketAddr::new(preferred.ip(), 0),
    }
}

/// `fulcrum demo`.
pub fn run(args: DemoArgs) -> ExitCode {
    crate::logging::init(&fulcrum_config::LogConfig::default());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fulcrum demo: cannot start a runtime: {error}");
            return ExitCode::from(1);
        }
    };
    // Backends run on their own thread's runtime for as long as the demo does.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let specs = [
                ("backend-1", 8081, "lognormal:10ms,0.4"),
                ("backend-2", 8082, "lognormal:10ms,0.4"),
                ("backend-3", 8083, "lognormal:40ms,0.4"),
            ];
            let mut handles: Vec<BackendHandle> = Vec::new();
            for (name, port, latency) in specs {
                let args = BackendArgs {
                    listen: free_or_ephemeral(SocketAddr::from(([127, 0, 0, 1], port))),
                    name: Some(name.to_owned()),
                    latency: LatencySpec::from_str(latency)
                        .expect("demo latency specs are valid literals"),
                    ..BackendArgs::default()
                };
                match start_backend(args).await {
                    Ok(handle) => handles.push(handle),
                    Err(error) => {
                        let _ = tx.send(Err(format!("cannot start {name}: {error}")));
                        return;
                    }
                }
            }
            let described = handles
                .iter()
                .zip(specs)
                .map(|(h, (name, _, latency))| (name.to_owned(), h.local_addr, latency.to_owned()))
                .collect::<Vec<_>>();
            let _ = tx.send(Ok(described));
            // Keep serving until the process exits.
            std::future::pending::<()>().await;
            drop(handles);
        });
    });
    let backends = match rx.recv() {
        Ok(Ok(backends)) => backends,
        Ok(Err(error)) => {
            eprintln!("fulcrum demo: {error}");
            return ExitCode::from(1);
        }
        Err(_) => {
            eprintln!("fulcrum demo: the backend thread stopped unexpectedly");
            return ExitCode::from(1);
        }
    };

    let listen = args
        .listen
        .unwrap_or_else(|| free_or_ephemeral(SocketAddr::from(([127, 0, 0, 1], 8080))));
    let admin = args
        .admin
        .unwrap_or_else(|| free_or_ephemeral(SocketAddr::from(([127, 0, 0, 1], 9901))));
    let mut config = Config::default();
    config.admin.listen = admin;
    config.listeners.push(ListenerConfig {
        name: "web".to_owned(),
        listen,
        routes: vec![RouteConfig {
            pool: "demo".to_owned(),
            ..RouteConfig::default()
        }],
        ..ListenerConfig::default()
    });
    config.pools.insert(
        "demo".to_owned(),
        PoolConfig {
            strategy: args.strategy,
            backends: backends
                .iter()
                .map(|(_, addr, _)| BackendConfig::new(addr.to_string()))
                .collect(),
            health_check: Some(HealthCheckConfig {
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 2,
                ..HealthCheckConfig::default()
            }),
            ..PoolConfig::default()
        },
    );
    if let Err(error) = config.validate() {
        eprintln!("fulcrum demo: internal configuration is invalid: {error}");
        return ExitCode::from(1);
    }
    crate::serve::serve(config, None, Some(args.threads), |node, admin| {
        let proxy = node
            .listeners()
            .first()
            .map(|l| l.local_addr)
            .unwrap_or(listen);
        let strategy = args.strategy.name();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "\nFulcrum demo is running ({strategy} over three simulated backends).\n"
        );
        let _ = writeln!(out, "  proxy        http://{proxy}/");
        let _ = writeln!(out, "  dashboard    http://{admin}/dashboard");
        let _ = writeln!(out, "  admin API    http://{admin}/api/status");
        let _ = writeln!(out, "  metrics      http://{admin}/metrics");
        for (name, addr, latency) in &backends {
            let _ = writeln!(out, "  {name:<12} http://{addr}/  ({latency})");
        }
        let slow = backends.get(1).map_or(proxy, |b| b.1);
        let _ = writeln!(out, "\nTry:");
        let _ = writeln!(out, "  curl -s http://{proxy}/hello");
        let _ = writeln!(
            out,
            "  for i in $(seq 100); do curl -s -o /dev/null http://{proxy}/; done"
        );
        let _ = writeln!(out, "  curl -s http://{admin}/api/pools/demo/backends");
        let _ = writeln!(
            out,
            "  curl -s 'http://{slow}/control?delay_ms=300'     # slow backend-2; peak_ewma moves away"
        );
        let _ = writeln!(
            out,
            "  curl -s -X POST http://{admin}/api/pools/demo/strategy -H 'content-type: application/json' -d '{{\"strategy\":\"round_robin\"}}'"
        );
        let _ = writeln!(out, "\nPress Ctrl-C to stop.");
        let _ = out.flush();
    })
}

/// `fulcrum backend`: runs one simulated backend until SIGTERM/SIGINT.
/// `fulcrum backend` arguments: the simulator's, plus self-registration.
#[derive(clap::Args, Debug)]
pub struct BackendCli {
    /// The simulator's settings.
    #[command(flatten)]
    pub args: BackendArgs,
    /// Register this backend with the node whose admin API is at URL (e.g.
    /// http://127.0.0.1:9901) in pool `--pool`, refreshed every third of
    /// `--register-ttl`, and deregister it on exit. The pool should use
    /// `discovery.source: registry`; other pools add it through the shared configuration.
    #[arg(long, value_name = "ADMIN_URL", requires = "pool")]
    pub register: Option<String>,
    /// Pool to register in.
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// Tags of the registration, `k=v` (repeat or separate with commas).
    #[arg(long = "tags", value_name = "K=V", value_delimiter = ',', value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Weight of the registration, 1..=65535.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub weight: u32,
    /// Most requests in flight at once that the node sends this backend (its
    /// `max_requests`, 0..=1000000); 0 = the pool's `default_max_requests`. Set it to what
    /// the backend serves at once (e.g. its `--concurrency`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests: u32,
    /// Time-to-live of the registration.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub register_ttl: std::time::Duration,
    /// Bearer token for the admin API, if it requires one.
    #[arg(long, value_name = "TOKEN", env = "FULCRUM_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not k=v")),
    }
}

/// `fulcrum backend`: runs the simulator until SIGTERM/SIGINT, registered with a node if
/// `--register` is given.
pub fn backend(cli: BackendCli) -> ExitCode {
    let args = cli.args.clone();
    crate::logging::init(&fulcrum_config::LogConfig::default());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fulcrum backend: cannot start a runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let handle = match start_backend(args).await {
            Ok(handle) => handle,
            Err(error) => {
                eprintln!("fulcrum backend: {error}");
                return ExitCode::from(1);
            }
        };
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", handle.ready_line());
            let _ = out.flush();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let registration = cli.register.clone().map(|admin| {
            tokio::spawn(crate::ctl::keep_registered(
                crate::ctl::Registration {
                    admin,
                    pool: cli.pool.clone().unwrap_or_default(),
                    address: handle.local_addr.to_string(),
                    tags: cli.tags.iter().cloned().collect(),
                    weight: cli.weight,
                    max_requests: cli.max_requests,
                    ttl: cli.register_ttl,
                    token: cli.admin_token.clone(),
                },
                stop.clone(),
            ))
        });
        crate::serve::next_termination_signal().await;
        stop.cancel();
        if let Some(registration) = registration {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), registration).await;
        }
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}
