//! `duration-class`: seed 000's benchmark (round robin vs "intelligent" load balancing on
//! two nodes, for a mixed, a short-dominant and a long-dominant load), on simulated
//! backends.
//!
//! The effect measured is head-of-line blocking: a backend serves a few requests at once
//! and queues the rest first come, first served, so under round robin a short request
//! that lands behind long ones waits for them. `duration_class` learns which endpoints are
//! long (average of the last `stats_window` durations at or above
//! `long_request_threshold`) and keeps short requests on the first backend, long ones on
//! the others.
//!
//! Parameters, fixed before any result was seen and not tuned to one:
//! - seed 000's times scaled by 1/25 so the whole comparison takes about a minute: its
//!   5 s threshold becomes 200 ms, a short request (its short-dominant mean, 0.5 s)
//!   20 ms, a long one (its long-dominant mean, 8 s) 320 ms. Fixed latencies
//!   (`?delay_ms=`), so differences come from queueing alone;
//! - 2 backends (the seed's two nodes), each serving 4 requests at once, FIFO beyond;
//! - mixes by request count: short-dominant 95 % short, mixed 80 %, long-dominant 30 %;
//! - the rate of each mix offers 60 % of the pool's capacity (4 + 4 slots), so the three
//!   loads differ in their mix, not in how close to saturation they run:
//!   rate = 0.6 × 8 / mean service time;
//! - 10 s per run (3 s with `--quick`); each strategy gets fresh backends and node and the
//!   same seeded arrivals.

use std::time::Duration;

use fulcrum_sim::BackendArgs;
use fulcrum_sim::loadgen::{ClassReport, LoadGenerator, LoadReport, LoadSpec, Mix, MixEntry};
use serde::Serialize;

use super::{Options, ScenarioError, ScenarioResult, Table, TestBed, ms, pick_strategies};

const BACKENDS: usize = 2;
const CAPACITY: u32 = 4;
const SHORT_MS: u64 = 20;
const LONG_MS: u64 = 320;
const THRESHOLD: &str = "200ms";
/// Offered load as a share of the pool's capacity.
const UTILISATION: f64 = 0.6;
const RUN: Duration = Duration::from_secs(10);
/// (name, share of short requests).
const LOADS: [(&str, f64); 3] = [
    ("mixed", 0.80),
    ("short-dominant", 0.95),
    ("long-dominant", 0.30),
];
const STRATEGIES: [&str; 2] = ["round_robin", "duration_class"];

#[derive(Serialize)]
struct Parameters {
    backends: usize,
    capacity_per_backend: u32,
    short_ms: u64,
    long_ms: u64,
    long_request_threshold: &'static str,
    utilisation: f64,
    run_secs: f64,
    seed: u64,
}

#[derive(Serialize)]
struct Output {
    scenario: &'static str,
    parameters: Parameters,
    loads: Vec<LoadResult>,
}

#[derive(Serialize)]
struct LoadResult {
    load: &'static str,
    short_share: f64,
    rate: f64,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    strategy: String,
    /// `None` when this build cannot run the strategy; `unavailable` says why.
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
    requests: u64,
    errors: u64,
    dropped: u64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    short: Option<Classes>,
    long: Option<Classes>,
    /// (round robin mean − this mean) / round robin mean, in percent.
    improvement_mean_pct: Option<f64>,
}

#[derive(Serialize)]
struct Classes {
    requests: u64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Classes {
    fn of(class: &ClassReport) -> Self {
        Classes {
            requests: class.requests,
            mean_ms: class.latency_ms.mean,
            p50_ms: class.latency_ms.p50,
            p99_ms: class.latency_ms.p99,
        }
    }
}

impl Row {
    fn measured(strategy: &str, report: &LoadReport) -> Row {
        let all = &report.overall;
        Row {
            strategy: strategy.to_owned(),
            unavailable: None,
            requests: all.requests,
            errors: all.errors,
            dropped: all.dropped,
            mean_ms: all.latency_ms.mean,
            p50_ms: all.latency_ms.p50,
            p99_ms: all.latency_ms.p99,
            short: report.endpoints.first().map(Classes::of),
            long: report.endpoints.get(1).map(Classes::of),
            improvement_mean_pct: None,
        }
    }

    fn unavailable(strategy: &str, reason: String) -> Row {
        Row {
            strategy: strategy.to_owned(),
            unavailable: Some(reason),
            requests: 0,
            errors: 0,
            dropped: 0,
            mean_ms: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            short: None,
            long: None,
            improvement_mean_pct: None,
        }
    }
}

/// Mean service time of a mix with `short_share` short requests, seconds.
fn mean_service_secs(short_share: f64) -> f64 {
    (short_share * SHORT_MS as f64 + (1.0 - short_share) * LONG_MS as f64) / 1000.0
}

/// The arrival rate offering [`UTILISATION`] of the pool's capacity for this mix.
fn rate_for(short_share: f64) -> f64 {
    let slots = (BACKENDS as f64) * f64::from(CAPACITY);
    (UTILISATION * slots / mean_service_secs(short_share) * 10.0).round() / 10.0
}

fn mix(short_share: f64) -> Mix {
    Mix::from_entries(vec![
        MixEntry {
            path: format!("/short?delay_ms={SHORT_MS}"),
            weight: short_share,
        },
        MixEntry {
            path: format!("/long?delay_ms={LONG_MS}"),
            weight: 1.0 - short_share,
        },
    ])
    .expect("constant paths and weights above 0")
}

fn backends() -> Vec<BackendArgs> {
    (1..=BACKENDS)
        .map(|i| BackendArgs {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            name: Some(format!("backend-{i}")),
            capacity: CAPACITY,
            ..BackendArgs::default()
        })
        .collect()
}

pub(super) async fn run(options: &Options) -> Result<ScenarioResult, ScenarioError> {
    let strategies = pick_strategies(options, &STRATEGIES)?;
    let run_length = options.run_length(RUN);
    let threshold_line = format!("stats: {{ long_request_threshold: {THRESHOLD} }}");
    let mut loads = Vec::new();
    for (load, short_share) in LOADS {
        let rate = rate_for(short_share);
        let mut rows: Vec<Row> = Vec::new();
        for (name, kind) in &strategies {
            let bed = match TestBed::start_for(name, *kind, backends(), &[&threshold_line]).await? {
                Ok(bed) => bed,
                Err(reason) => {
                    rows.push(Row::unavailable(name, reason));
                    continue;
                }
            };
            let mut spec = LoadSpec::new(bed.url.clone());
            spec.rate = rate;
            spec.duration = run_length;
            spec.mix = mix(short_share);
            spec.timeout = options.timeout;
            spec.seed = options.seed;
            let generator = LoadGenerator::new(spec)
                .map_err(|e| ScenarioError::Runtime(format!("scenario load: {e}")))?;
            let label = format!("{load} {name}");
            let report = crate::bench::drive(generator, &label, options.show_progress).await;
            bed.stop().await;
            rows.push(Row::measured(name, &report));
        }
        let baseline = rows
            .iter()
            .find(|r| r.strategy == "round_robin" && r.unavailable.is_none())
            .map(|r| r.mean_ms);
        if let Some(baseline) = baseline.filter(|b| *b > 0.0) {
            for row in rows.iter_mut().filter(|r| r.unavailable.is_none()) {
                row.improvement_mean_pct =
                    Some(((baseline - row.mean_ms) / baseline * 1000.0).round() / 10.0);
            }
        }
        loads.push(LoadResult {
            load,
            short_share,
            rate,
            results: rows,
        });
    }
    let output = Output {
        scenario: "duration-class",
        parameters: Parameters {
            backends: BACKENDS,
            capacity_per_backend: CAPACITY,
            short_ms: SHORT_MS,
            long_ms: LONG_MS,
            long_request_threshold: THRESHOLD,
            utilisation: UTILISATION,
            run_secs: run_length.as_secs_f64(),
            seed: options.seed,
        },
        loads,
    };
    let text = render(&output);
    ScenarioResult::new(&output, text)
}

fn render(output: &Output) -> String {
    let p = &output.parameters;
    let mut text = format!(
        "duration-class (seed 000, times scaled 1/25): {} backends x capacity {} (FIFO queue \
         beyond), /short {} ms, /long {} ms, long_request_threshold {}, offered load {:.0}% of \
         capacity, {}s per run, seed {}\n\n",
        p.backends,
        p.capacity_per_backend,
        p.short_ms,
        p.long_ms,
        p.long_request_threshold,
        p.utilisation * 100.0,
        p.run_secs,
        p.seed
    );
    let mut table = Table::new(
        &[
            "load",
            "strategy",
            "rate/s",
            "requests",
            "errors",
            "mean ms",
            "p50 ms",
            "p99 ms",
            "short p99",
            "long p99",
            "mean vs round_robin",
        ],
        2,
    );
    for load in &output.loads {
        let label = format!("{} ({:.0}% short)", load.load, load.short_share * 100.0);
        for row in &load.results {
            if let Some(reason) = &row.unavailable {
                table.row(vec![
                    label.clone(),
                    row.strategy.clone(),
                    format!("unavailable: {reason}"),
                ]);
                continue;
            }
            table.row(vec![
                label.clone(),
                row.strategy.clone(),
                format!("{:.1}", load.rate),
                row.requests.to_string(),
                row.errors.to_string(),
                ms(row.mean_ms),
                ms(row.p50_ms),
                ms(row.p99_ms),
                row.short.as_ref().map_or("-".into(), |c| ms(c.p99_ms)),
                row.long.as_ref().map_or("-".into(), |c| ms(c.p99_ms)),
                match row.improvement_mean_pct {
                    Some(pct) if row.strategy != "round_robin" => format!("{pct:+.1}%"),
                    _ => "-".to_owned(),
                },
            ]);
        }
    }
    text.push_str(&table.render());
    text.push_str(
        "\nmean vs round_robin: (round_robin mean - mean) / round_robin mean; positive = faster. \
         Seed 000 claims 43.75% (mixed), 40% (short-dominant), 35.8% (long-dominant).\n",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_load_offers_the_same_share_of_capacity() {
        for (_, short_share) in LOADS {
            let offered = rate_for(short_share) * mean_service_secs(short_share);
            let slots = (BACKENDS as f64) * f64::from(CAPACITY);
            assert!(
                (offered / slots - UTILISATION).abs() < 0.01,
                "{short_share}"
            );
        }
        let shares = mix(0.8).shares();
        assert!((shares[0] - 0.8).abs() < 1e-9 && (shares[1] - 0.2).abs() < 1e-9);
    }
}
