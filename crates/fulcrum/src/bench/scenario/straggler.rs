//! `straggler`: seed 002's slow-server test ("create a slow server, send requests, the
//! algorithm should avoid it, check p99") for every strategy of this build.
//!
//! Parameters, fixed before any result was seen:
//! - 3 backends (the seed's three), lognormal latency with a 10 ms median and σ 0.3,
//!   each serving up to 32 requests at once (FIFO beyond);
//! - 300 req/s, Poisson, 10 s per strategy (3 s with `--quick`);
//! - halfway through, the first backend (the seed slows its first server, 8081) is slowed
//!   20× through its `/control?slow_factor=20`, so its median becomes 200 ms; 100 req/s
//!   at 200 ms still fits in its 32 slots, so round robin suffers slow answers, not an
//!   overflowing queue;
//! - every request carries a key drawn uniformly from 10 000 (`x-cache-key`) and the
//!   pool hashes on that header, so the hashing strategies spread load as they would
//!   with real keys rather than pinning one client address to one backend;
//! - fresh backends and node per strategy, same seeded arrivals for all.
//!
//! Reported over the whole run (before and after the slowdown): p50, p99, p99.9, errors,
//! and the share of requests the slowed backend received after the slowdown (a third
//! means the strategy did not notice).

use std::time::Duration;

use fulcrum_balance::StrategyKind;
use fulcrum_sim::loadgen::{DEFAULT_KEY_HEADER, KeySpec, LoadGenerator, LoadSpec};
use fulcrum_sim::{BackendArgs, BackendStatsSnapshot};
use serde::Serialize;

use super::{Options, ScenarioError, ScenarioResult, Table, TestBed, ms, pick_strategies};

const BACKENDS: usize = 3;
const LATENCY: &str = "lognormal:10ms,0.3";
const CAPACITY: u32 = 32;
const RATE: f64 = 300.0;
const RUN: Duration = Duration::from_secs(10);
const SLOW_FACTOR: u32 = 20;
const KEYS: u64 = 10_000;
const HASH: &str = "hash: { key: header, name: x-cache-key }";

#[derive(Serialize)]
struct Parameters {
    backends: usize,
    latency: &'static str,
    capacity_per_backend: u32,
    rate: f64,
    run_secs: f64,
    slowed_backend: &'static str,
    slow_factor: u32,
    slowed_at_secs: f64,
    seed: u64,
}

#[derive(Serialize)]
struct Output {
    scenario: &'static str,
    parameters: Parameters,
    /// Sorted by p99, unavailable strategies last.
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    strategy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
    requests: u64,
    errors: u64,
    dropped: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Share of the requests after the slowdown that went to the slowed backend.
    slowed_backend_share: f64,
}

impl Row {
    fn unavailable(strategy: &str, reason: String) -> Row {
        Row {
            strategy: strategy.to_owned(),
            unavailable: Some(reason),
            requests: 0,
            errors: 0,
            dropped: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            slowed_backend_share: 0.0,
        }
    }
}

fn backends() -> Vec<BackendArgs> {
    (1..=BACKENDS)
        .map(|i| BackendArgs {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            name: Some(format!("backend-{i}")),
            latency: LATENCY.parse().expect("constant latency spec"),
            capacity: CAPACITY,
            ..BackendArgs::default()
        })
        .collect()
}

/// Requests each backend had received, summed, and the first backend's.
fn counts(stats: &[BackendStatsSnapshot]) -> (u64, u64) {
    let total = stats.iter().map(|s| s.requests).sum();
    (total, stats.first().map_or(0, |s| s.requests))
}

pub(super) async fn run(options: &Options) -> Result<ScenarioResult, ScenarioError> {
    let strategies = pick_strategies(options, StrategyKind::NAMES)?;
    let run_length = options.run_length(RUN);
    let slow_at = run_length / 2;
    let mut rows = Vec::new();
    for (name, kind) in &strategies {
        let bed = match TestBed::start_for(name, *kind, backends(), &[HASH]).await? {
            Ok(bed) => bed,
            Err(reason) => {
                rows.push(Row::unavailable(name, reason));
                continue;
            }
        };
        let mut spec = LoadSpec::new(bed.url.clone());
        spec.rate = RATE;
        spec.duration = run_length;
        spec.keys = Some(KeySpec {
            count: KEYS,
            exponent: 0.0,
            header: DEFAULT_KEY_HEADER.parse().expect("constant header name"),
        });
        spec.timeout = options.timeout;
        spec.seed = options.seed;
        let generator = LoadGenerator::new(spec)
            .map_err(|e| ScenarioError::Runtime(format!("scenario load: {e}")))?;
        let slow_down = async {
            tokio::time::sleep(slow_at).await;
            let before = counts(&bed.backend_stats());
            let slowed = bed.backends[0].control(&format!("slow_factor={SLOW_FACTOR}"));
            (before, slowed)
        };
        let (report, (before, slowed)) = tokio::join!(
            crate::bench::drive(generator, name, options.show_progress, Default::default()),
            slow_down
        );
        let after = counts(&bed.backend_stats());
        bed.stop().await;
        slowed.map_err(|e| ScenarioError::Runtime(format!("slowing backend-1: {e}")))?;
        let sent_after = after.0.saturating_sub(before.0);
        let to_slowed = after.1.saturating_sub(before.1);
        let all = &report.overall;
        rows.push(Row {
            strategy: name.clone(),
            unavailable: None,
            requests: all.requests,
            errors: all.errors,
            dropped: all.dropped,
            p50_ms: all.latency_ms.p50,
            p99_ms: all.latency_ms.p99,
            p999_ms: all.latency_ms.p999,
            max_ms: all.latency_ms.max,
            slowed_backend_share: if sent_after == 0 {
                0.0
            } else {
                (to_slowed as f64 / sent_after as f64 * 1000.0).round() / 1000.0
            },
        });
    }
    rows.sort_by(|a, b| {
        (a.unavailable.is_some(), a.p99_ms)
            .partial_cmp(&(b.unavailable.is_some(), b.p99_ms))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let output = Output {
        scenario: "straggler",
        parameters: Parameters {
            backends: BACKENDS,
            latency: LATENCY,
            capacity_per_backend: CAPACITY,
            rate: RATE,
            run_secs: run_length.as_secs_f64(),
            slowed_backend: "backend-1",
            slow_factor: SLOW_FACTOR,
            slowed_at_secs: slow_at.as_secs_f64(),
            seed: options.seed,
        },
        results: rows,
    };
    let text = render(&output);
    ScenarioResult::new(&output, text)
}

fn render(output: &Output) -> String {
    let p = &output.parameters;
    let mut text = format!(
        "straggler (seed 002): {} backends, latency {}, capacity {} each, {} req/s for {}s; \
         {} slowed {}x at {}s; seed {}. Sorted by p99.\n\n",
        p.backends,
        p.latency,
        p.capacity_per_backend,
        p.rate,
        p.run_secs,
        p.slowed_backend,
        p.slow_factor,
        p.slowed_at_secs,
        p.seed
    );
    let mut table = Table::new(
        &[
            "strategy",
            "requests",
            "errors",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "to slowed after",
        ],
        1,
    );
    for row in &output.results {
        if let Some(reason) = &row.unavailable {
            table.row(vec![row.strategy.clone(), format!("unavailable: {reason}")]);
            continue;
        }
        table.row(vec![
            row.strategy.clone(),
            row.requests.to_string(),
            row.errors.to_string(),
            ms(row.p50_ms),
            ms(row.p99_ms),
            ms(row.p999_ms),
            ms(row.max_ms),
            format!("{:.1}%", row.slowed_backend_share * 100.0),
        ]);
    }
    text.push_str(&table.render());
    text.push_str(
        "\nto slowed after: share of the requests sent after the slowdown that went to the \
         slowed backend (33.3% = not noticed).\n",
    );
    text
}
