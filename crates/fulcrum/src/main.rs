//! `fulcrum`: the command-line entry point.
//!
//! ```text
//! fulcrum run --config FILE [--threads N]   run a node
//! fulcrum check --config FILE               validate a configuration (exit 0 ok, 2 invalid)
//! fulcrum demo                              simulated backends + a node + admin API on localhost
//! fulcrum backend --listen ADDR [...]       a simulated backend
//! fulcrum bench --url URL [...]             open-loop load generator with percentiles
//! fulcrum bench --scenario NAME             strategy comparisons on simulated backends
//! ```
//!
//! Exit codes: 0 success, 1 a runtime failure (a port cannot be bound, …), 2 an invalid
//! configuration or command line.

mod bench;
mod ctl;
mod demo;
mod logging;
mod serve;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// hyper re-allocates its 8 KiB read buffers for most requests (the previous message's
// header bytes are still referenced when it reads again); glibc serves blocks that size
// from its general heap, mimalloc from per-thread pages. Measured in BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fulcrum: a traffic-aware HTTP/TCP load balancer.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, propagate_version = true)]
#[command(
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node from a configuration file.
    ///
    /// Prints one JSON line to stdout once every listener is bound
    /// (`{"event":"ready",...}`, with the bound addresses), logs to stderr. SIGTERM or SIGINT
    /// drains in-flight requests (up to `runtime.drain_timeout`) and exits; a second signal
    /// exits at once. SIGHUP, `POST /api/reload` and a change of the file reload the
    /// configuration file.
    Run {
        /// The YAML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Worker threads, 1..=1024 (default: `runtime.threads`, or one per CPU core).
        #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
        threads: Option<usize>,
        /// Do not reload when the file changes (SIGHUP and the admin API still do).
        #[arg(long)]
        no_watch: bool,
    },
    /// Validate a configuration file without starting anything.
    ///
    /// Exit 0 and a one-line summary if it is valid; exit 2 and one line per problem
    /// (`FILE:LINE:COLUMN: FIELD: MESSAGE`) on stderr if not. Backend host names are
    /// resolved, as `run` would.
    Check {
        /// The YAML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run three simulated backends (one slower), a node and its admin API on localhost.
    Demo(demo::DemoArgs),
    /// Run a simulated backend (latency, capacity, failures, /control).
    ///
    /// Prints `{"event":"listening","name":...,"address":...}` once listening.
    Backend(demo::BackendCli),
    /// Open-loop load generator with HDR percentiles, or a built-in strategy comparison.
    ///
    /// Sends Poisson arrivals at --rate to --url for --duration, each at its scheduled
    /// time whether or not earlier ones were answered, and reports per endpoint: requests,
    /// errors by kind, mean, p50, p90, p99, p99.9 and max latency (ms) measured from the
    /// scheduled send time. Ctrl-C stops sending and reports what was sent. `--scenario NAME` runs simulated backends and a node per
    /// strategy in this process instead (`--scenario list` describes them).
    Bench(bench::BenchArgs),
    /// Read a node's figures as tables, or change pools and backends, through its admin API.
    ///
    /// Reads: `status`, `pools`, `backends POOL`, `endpoints`, `cluster status|nodes|leader`.
    /// Changes: `drain|enable|disable POOL ADDRESS`, `weight POOL ADDRESS N`,
    /// `strategy POOL NAME`, `reload` (with --token or FULCRUM_ADMIN_TOKEN when the node
    /// sets `admin.token`). Exit 1 when the node cannot be reached or refuses the call.
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            threads,
            no_watch,
        } => serve::run(config, threads, !no_watch),
        Command::Demo(args) => demo::run(args),
        Command::Backend(args) => demo::backend(args),
        Command::Bench(args) => bench::run(args),
        Command::Ctl(args) => ctl::run(args),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match fulcrum_config::load(path) {
        Ok(config) => {
            // As `run` would: backend names must resolve (as `nginx -t` checks).
            if let Err(error) = serve::spec_located(&config, Some(path), Some(1)) {
                eprintln!("{error}");
                return ExitCode::from(2);
            }
            let backends: usize = config.pools.values().map(|p| p.backends.len()).sum();
            println!(
                "{}: ok ({} listener(s), {} pool(s), {} backend(s))",
                path.display(),
                config.listeners.len(),
                config.pools.len(),
                backends
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(2)
        }
    }
}
