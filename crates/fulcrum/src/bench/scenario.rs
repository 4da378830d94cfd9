//! `fulcrum bench --scenario NAME`: strategy comparisons on simulated backends, all in
//! this process.
//!
//! Each scenario starts fresh simulated backends ([`fulcrum_sim::start_backend`]) and a
//! fresh node ([`fulcrum_proxy::Node`]) for every strategy it compares, drives the same
//! open-loop load (same seed, so the same arrival times, endpoints and keys) through the
//! node, and stops both before the next strategy, so no strategy inherits a warm cache, a
//! queue or learned statistics from another. Parameters are constants of each scenario's
//! module, printed with its results; none depends on the machine.
//!
//! | scenario | compares | question |
//! | --- | --- | --- |
//! | `duration-class` | `round_robin`, `duration_class` (static and adaptive), `least_connections` | do short requests stop queueing behind long ones, and what does it cost long ones (seed 000)? |
//! | `straggler` | every strategy of this build | who routes around a backend slowed 20× mid-run (seed 002)? |
//! | `affinity` | `rendezvous`, `ring_hash`, `maglev`, `round_robin`, `least_connections` | cache hit rate and balance under Zipf keys |

mod affinity;
mod duration_class;
mod straggler;
mod testbed;

use std::io::Write;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use fulcrum_balance::StrategyKind;
use serde::Serialize;

pub(crate) use testbed::{Table, TestBed};

/// The built-in scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScenarioName {
    /// Short requests queued behind long ones: round_robin vs duration_class (static and
    /// adaptive) vs least_connections.
    DurationClass,
    /// One backend slowed 20× mid-run: every strategy, sorted by p99.
    Straggler,
    /// Zipf keys and per-backend LRU caches: hashing vs load-based strategies.
    Affinity,
    /// Describe the scenarios.
    List,
}

/// What the command line says about a scenario run.
#[derive(Debug)]
pub struct Options {
    /// Each run (one load, one strategy) 3 s instead of the scenario's full length.
    pub quick: bool,
    /// Seed of every load of the run.
    pub seed: u64,
    /// Per-request timeout.
    pub timeout: Duration,
    /// One JSON object on stdout instead of a table.
    pub json: bool,
    /// A progress bar on stderr.
    pub show_progress: bool,
    /// Strategies to compare instead of the scenario's list.
    pub strategies: Option<Vec<String>>,
}

impl Options {
    /// `full`, or the quick length with `--quick`.
    fn run_length(&self, full: Duration) -> Duration {
        if self.quick {
            QUICK_RUN.min(full)
        } else {
            full
        }
    }
}

/// Length of each load with `--quick`.
const QUICK_RUN: Duration = Duration::from_secs(3);

/// Why a scenario could not run.
#[derive(Debug)]
pub(crate) enum ScenarioError {
    /// The command line asked for something that cannot be (exit 2).
    Usage(String),
    /// Something failed at run time (exit 1).
    Runtime(String),
}

/// Runs scenario `name` and prints its results; the process's exit code.
pub async fn run(name: ScenarioName, options: Options) -> ExitCode {
    let outcome = match name {
        ScenarioName::List => {
            let scenarios: Vec<serde_json::Value> = SCENARIOS
                .iter()
                .map(|(name, what)| serde_json::json!({ "name": name, "description": what }))
                .collect();
            let result = ScenarioResult {
                json: serde_json::json!({ "scenarios": scenarios }),
                text: list(),
            };
            return emit(&result, options.json);
        }
        ScenarioName::DurationClass => duration_class::run(&options).await,
        ScenarioName::Straggler => straggler::run(&options).await,
        ScenarioName::Affinity => affinity::run(&options).await,
    };
    match outcome {
        Ok(result) => emit(&result, options.json),
        Err(ScenarioError::Usage(message)) => {
            eprintln!("fulcrum bench: {message}");
            ExitCode::from(2)
        }
        Err(ScenarioError::Runtime(message)) => {
            eprintln!("fulcrum bench: {message}");
            ExitCode::from(1)
        }
    }
}

/// What a scenario returns: its JSON form and its table.
pub(crate) struct ScenarioResult {
    json: serde_json::Value,
    text: String,
}

impl ScenarioResult {
    pub(crate) fn new(json: &impl Serialize, text: String) -> Result<Self, ScenarioError> {
        let json = serde_json::to_value(json)
            .map_err(|e| ScenarioError::Runtime(format!("cannot serialise the results: {e}")))?;
        Ok(ScenarioResult { json, text })
    }
}

fn emit(result: &ScenarioResult, json: bool) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let written = if json {
        writeln!(out, "{}", result.json)
    } else {
        write!(out, "{}", result.text)
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fulcrum bench: cannot write the results: {error}");
            ExitCode::from(1)
        }
    }
}

/// The scenarios, with what each runs and how long it takes.
const SCENARIOS: [(&str, &str); 3] = [
    (
        "duration-class",
        "2 backends of capacity 4 (FIFO queue beyond), /short 20 ms and /long 320 ms \
         requests; four loads (three mixes where round robin's mean is twice the floor, \
         the mixed one also at three times) x six rows: round_robin, duration_class \
         static and adaptive, least_connections, and the two pooled-queue rows; \
         mean/p50/p99 and the mean's improvement (seed 000's benchmark, scaled 1/25). \
         About 13 minutes (30 s per run; --quick: about 1.5 minutes).",
    ),
    (
        "straggler",
        "3 backends, the first slowed 20x through /control halfway through each run; \
         every strategy of this build, sorted by p99 (seed 002's slow-server test). \
         About 10 s per strategy.",
    ),
    (
        "affinity",
        "4 backends with a 100-key LRU cache each (a miss costs 20 ms), Zipf(1000, 1.0) \
         keys in x-cache-key; hashing strategies vs round_robin and least_connections: \
         cache hit rate, requests per backend, p50/p99. About 1 minute.",
    ),
];

fn list() -> String {
    let mut text = String::new();
    for (name, what) in SCENARIOS {
        text.push_str(&format!("{name:<16}{what}\n"));
    }
    text.push_str(
        "\nRun: fulcrum bench --scenario NAME [--quick] [--json] [--strategies a,b] [--seed N]\n",
    );
    text
}

/// The strategies to compare: `--strategies` if given, each checked against this build,
/// else `default` (whose names this build may lack: those are returned as unavailable).
///
/// # Errors
/// [`ScenarioError::Usage`] for a `--strategies` name this build does not know, or an
/// empty list.
pub(crate) fn pick_strategies(
    options: &Options,
    default: &[&str],
) -> Result<Vec<(String, Option<StrategyKind>)>, ScenarioError> {
    match &options.strategies {
        Some(names) => {
            if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
                return Err(ScenarioError::Usage(
                    "invalid --strategies: expected comma-separated names, e.g. round_robin,p2c"
                        .to_owned(),
                ));
            }
            let mut picked: Vec<(String, Option<StrategyKind>)> = Vec::new();
            for name in names {
                let name = name.trim();
                let kind = StrategyKind::from_str(name)
                    .map_err(|e| ScenarioError::Usage(format!("invalid --strategies: {e}")))?;
                if !picked.iter().any(|(n, _)| n == name) {
                    picked.push((name.to_owned(), Some(kind)));
                }
            }
            Ok(picked)
        }
        None => Ok(default
            .iter()
            .map(|name| ((*name).to_owned(), StrategyKind::from_str(name).ok()))
            .collect()),
    }
}

/// Milliseconds with two decimals, for tables.
pub(crate) fn ms(value: f64) -> String {
    format!("{value:.2}")
}
