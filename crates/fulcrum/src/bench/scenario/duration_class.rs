//! `duration-class`: seed 000's benchmark (round robin vs "intelligent" load balancing on
//! two nodes, for a mixed, a short-dominant and a long-dominant load), on simulated
//! backends.
//!
//! The effect measured is head-of-line blocking: a backend serves a few requests at once
//! and queues the rest first come, first served, so under round robin a short request
//! that lands behind long ones waits for them. `duration_class` learns which endpoints are
//! long (average of the last `stats_window` durations at or above
//! `long_request_threshold`) and keeps short requests off the backends holding long ones:
//! with seed 000's static rules (short requests on the first backend, long ones on the
//! other) and in adaptive mode (a work-proportional reservation for long requests, which
//! spill when it is overloaded). `least_connections`, which knows nothing of classes, is
//! the reference for what plain load balancing gains.
//!
//! Two more rows hold requests in Fulcrum instead of the backends' queues: with
//! `default_max_requests` equal to the backends' capacity, requests beyond it wait in
//! the pool queue, in arrival order for `least_connections + fifo queue` (what HAProxy's
//! `maxconn` queue does) and short first for `duration_class adaptive + class queue`
//! (`queue.priority: class`). The difference between those two rows is what ordering by
//! class adds to pooling the queue.
//!
//! Parameters, each set by the rule given and none tuned to a `duration_class` result:
//! - seed 000's times scaled by 1/25: its 5 s threshold becomes 200 ms, a short request
//!   (its short-dominant mean, 0.5 s) 20 ms, a long one (its long-dominant mean, 8 s)
//!   320 ms. Fixed latencies (`?delay_ms=`), so differences come from queueing alone;
//! - 2 backends (the seed's two nodes), each serving 4 requests at once, FIFO beyond;
//! - mixes by request count: short-dominant 95 % short, mixed 80 %, long-dominant 30 %.
//!   A load's *floor* is its mean service time, the mean response time with no queueing
//!   at all: `share·20 + (1 − share)·320` ms;
//! - the regime, from the seed's baseline: its table puts round robin at 1.56–1.78× its
//!   "intelligent" means, which cannot be below the floor, so round robin ran at *least*
//!   1.78× the floor in its mixed load, or the claimed −43.75 % would beat the floor. Each
//!   load here runs at the utilisation where round robin's expected mean is **2× the
//!   floor**, the round figure above all three of the seed's bounds (1.56, 1.67, 1.78):
//!   every claim of the table is attainable in principle, and needs most of round robin's
//!   queueing removed (mixed: a mean of 1.125× the floor). The utilisations were found
//!   from round robin alone, in a discrete-event model of this bed (to the nearest 0.005;
//!   the unit test `loads_put_round_robin_at_twice_the_floor` checks them), and never
//!   changed after a `duration_class` result; the scenario prints round robin's measured
//!   multiple of the floor beside the results;
//! - a heavier regime for the mixed load only, round robin at **3× the floor** (the next
//!   round multiple), added after the 2× results: in a discrete-event model of this bed
//!   (`bench/duration_class_model.py`) no policy modelled reaches −43.75 % at 2× (short
//!   first with a central queue: −37 %), because long requests are 80 % of the work and
//!   cannot be preempted; the seed's figure needs round robin further above the floor.
//!   Its utilisation, like the others, comes from round robin alone;
//! - 30 s per run (3 s with `--quick`): in the model (`--runs 100 --seconds 30`), the
//!   standard deviation of one run's improvement over round robin on the mixed load is
//!   about 9 percentage points at 10 s and 6–8 at 30 s; each strategy gets fresh backends
//!   and node and the same seeded arrivals.

use std::time::Duration;

use fulcrum_balance::StrategyKind;
use fulcrum_sim::BackendArgs;
use fulcrum_sim::loadgen::{ClassReport, LoadGenerator, LoadReport, LoadSpec, Mix, MixEntry};
use serde::Serialize;

use super::{Options, ScenarioError, ScenarioResult, Table, TestBed, ms, pick_strategies};

const BACKENDS: usize = 2;
const CAPACITY: u32 = 4;
const SHORT_MS: u64 = 20;
const LONG_MS: u64 = 320;
const THRESHOLD: &str = "200ms";
/// Round robin's mean response time the loads are set for, as a multiple of the floor.
const ROUND_ROBIN_OVER_FLOOR: f64 = 2.0;
const RUN: Duration = Duration::from_secs(30);
/// (name, share of short requests, utilisation: offered load as a share of the pool's
/// capacity, where round robin's mean is [`ROUND_ROBIN_OVER_FLOOR`] × the floor).
const LOADS: [(&str, f64, f64); 3] = [
    ("mixed", 0.80, 0.81),
    ("short-dominant", 0.95, 0.775),
    ("long-dominant", 0.30, 0.925),
];
/// Round robin's mean over the floor in the heavier regime, which runs the mixed load
/// only.
const HEAVY_OVER_FLOOR: f64 = 3.0;
/// The mixed load at the utilisation where round robin's mean is [`HEAVY_OVER_FLOOR`] ×
/// the floor (found like [`LOADS`]'s, from round robin alone).
const HEAVY_LOAD: (&str, f64, f64) = ("mixed, heavy", 0.80, 0.89);
const STRATEGIES: [&str; 3] = ["round_robin", "duration_class", "least_connections"];

#[derive(Serialize)]
struct Parameters {
    backends: usize,
    capacity_per_backend: u32,
    short_ms: u64,
    long_ms: u64,
    long_request_threshold: &'static str,
    round_robin_over_floor: f64,
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
    /// Mean service time of the mix: the mean response time without any queueing.
    floor_ms: f64,
    /// The same for the requests this run sent (every strategy gets the same arrivals),
    /// which the multiples of the floor are relative to; `None` if nothing was measured.
    run_floor_ms: Option<f64>,
    utilisation: f64,
    rate: f64,
    /// Round robin's expected mean over the floor at this utilisation (the regime).
    regime_over_floor: f64,
    /// Round robin's measured mean over the run's floor (the regime is set for
    /// [`ROUND_ROBIN_OVER_FLOOR`]).
    round_robin_over_floor: Option<f64>,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    strategy: String,
    /// `duration_class.mode` of the pool, for `duration_class`.
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    /// Where requests beyond the backends' capacity wait.
    queueing: Queueing,
    /// The row's label in the text table.
    label: String,
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

/// How a row's pool holds requests beyond the backends' capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Queueing {
    /// No `max_requests`: every request is sent at once and waits in a backend's FIFO.
    Backend,
    /// `default_max_requests` = the backends' capacity: requests beyond wait in Fulcrum's
    /// pool queue, in arrival order (`queue.priority: fifo`, HAProxy's `maxconn` queue).
    ProxyFifo,
    /// The same with `queue.priority: class`: short requests first, a long one ordered
    /// `long_request_threshold` after its arrival.
    ProxyClass,
}

impl Queueing {
    fn label(self) -> &'static str {
        match self {
            Queueing::Backend => "",
            Queueing::ProxyFifo => " + fifo queue",
            Queueing::ProxyClass => " + class queue",
        }
    }

    /// The pool lines that configure it.
    fn pool_lines(self) -> Vec<String> {
        let limit = format!("default_max_requests: {CAPACITY}");
        match self {
            Queueing::Backend => Vec::new(),
            Queueing::ProxyFifo => vec![limit, "queue: { priority: fifo }".to_owned()],
            Queueing::ProxyClass => vec![limit, "queue: { priority: class }".to_owned()],
        }
    }
}

/// One row of the comparison: a strategy, for `duration_class` its mode, and where
/// requests queue.
struct Contender {
    strategy: String,
    kind: Option<StrategyKind>,
    mode: Option<&'static str>,
    queueing: Queueing,
}

impl Contender {
    fn label(&self) -> String {
        let mode = self.mode.map(|m| format!(" {m}")).unwrap_or_default();
        format!("{}{mode}{}", self.strategy, self.queueing.label())
    }
}

/// The rows for `strategies`: each strategy as it is; `duration_class` in both modes;
/// and, with `max_requests` set to the backends' capacity, `least_connections` with a
/// FIFO pool queue and `duration_class` adaptive with a class-priority one.
fn contenders(strategies: Vec<(String, Option<StrategyKind>)>) -> Vec<Contender> {
    let mut rows = Vec::new();
    let mut queued = Vec::new();
    for (strategy, kind) in strategies {
        let row = |mode, queueing| Contender {
            strategy: strategy.clone(),
            kind,
            mode,
            queueing,
        };
        match strategy.as_str() {
            "duration_class" => {
                rows.push(row(Some("static"), Queueing::Backend));
                rows.push(row(Some("adaptive"), Queueing::Backend));
                queued.push(row(Some("adaptive"), Queueing::ProxyClass));
            }
            "least_connections" => {
                rows.push(row(None, Queueing::Backend));
                queued.push(row(None, Queueing::ProxyFifo));
            }
            _ => rows.push(row(None, Queueing::Backend)),
        }
    }
    rows.extend(queued);
    rows
}

impl Row {
    fn measured(contender: &Contender, report: &LoadReport) -> Row {
        let all = &report.overall;
        Row {
            strategy: contender.strategy.clone(),
            mode: contender.mode,
            queueing: contender.queueing,
            label: contender.label(),
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

    fn unavailable(contender: &Contender, reason: String) -> Row {
        Row {
            strategy: contender.strategy.clone(),
            mode: contender.mode,
            queueing: contender.queueing,
            label: contender.label(),
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

    /// Mean service time of the requests this row sent, ms.
    fn floor_ms(&self) -> Option<f64> {
        let (short, long) = (self.short.as_ref()?, self.long.as_ref()?);
        let requests = short.requests + long.requests;
        (requests > 0)
            .then(|| (short.requests * SHORT_MS + long.requests * LONG_MS) as f64 / requests as f64)
    }
}

/// Mean service time of a mix with `short_share` short requests, ms: the load's floor.
fn floor_ms(short_share: f64) -> f64 {
    short_share * SHORT_MS as f64 + (1.0 - short_share) * LONG_MS as f64
}

/// The arrival rate offering `utilisation` of the pool's capacity for this mix, per
/// second (one decimal).
fn rate_for(short_share: f64, utilisation: f64) -> f64 {
    let slots = (BACKENDS as f64) * f64::from(CAPACITY);
    (utilisation * slots / (floor_ms(short_share) / 1000.0) * 10.0).round() / 10.0
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
    let contenders = contenders(pick_strategies(options, &STRATEGIES)?);
    let run_length = options.run_length(RUN);
    let threshold_line = format!("stats: {{ long_request_threshold: {THRESHOLD} }}");
    let mut loads = Vec::new();
    for (load, short_share, utilisation) in LOADS.into_iter().chain([HEAVY_LOAD]) {
        let rate = rate_for(short_share, utilisation);
        let mut rows: Vec<Row> = Vec::new();
        for contender in &contenders {
            let mode_line = contender
                .mode
                .map(|mode| format!("duration_class: {{ mode: {mode} }}"));
            let queue_lines = contender.queueing.pool_lines();
            let mut pool_extra = vec![threshold_line.as_str()];
            pool_extra.extend(mode_line.as_deref());
            pool_extra.extend(queue_lines.iter().map(String::as_str));
            let started =
                TestBed::start_for(&contender.strategy, contender.kind, backends(), &pool_extra)
                    .await?;
            let bed = match started {
                Ok(bed) => bed,
                Err(reason) => {
                    rows.push(Row::unavailable(contender, reason));
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
            let label = format!("{load} {}", contender.label());
            let report =
                crate::bench::drive(generator, &label, options.show_progress, Default::default())
                    .await;
            bed.stop().await;
            rows.push(Row::measured(contender, &report));
        }
        let run_floor = rows.iter().find_map(Row::floor_ms);
        let baseline = rows
            .iter()
            .find(|r| {
                r.strategy == "round_robin"
                    && r.queueing == Queueing::Backend
                    && r.unavailable.is_none()
            })
            .map(|r| r.mean_ms)
            .filter(|b| *b > 0.0);
        if let Some(baseline) = baseline {
            for row in rows.iter_mut().filter(|r| r.unavailable.is_none()) {
                row.improvement_mean_pct =
                    Some(((baseline - row.mean_ms) / baseline * 1000.0).round() / 10.0);
            }
        }
        loads.push(LoadResult {
            load,
            short_share,
            floor_ms: floor_ms(short_share),
            run_floor_ms: run_floor,
            utilisation,
            rate,
            regime_over_floor: if load == HEAVY_LOAD.0 {
                HEAVY_OVER_FLOOR
            } else {
                ROUND_ROBIN_OVER_FLOOR
            },
            round_robin_over_floor: baseline
                .zip(run_floor)
                .map(|(b, floor)| (b / floor * 100.0).round() / 100.0),
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
            round_robin_over_floor: ROUND_ROBIN_OVER_FLOOR,
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
         beyond), /short {} ms, /long {} ms, long_request_threshold {}, each load at the \
         utilisation where round_robin's mean is {}x its floor (and the mixed load again at \
         {HEAVY_OVER_FLOOR}x), {}s per run, seed {}\n\n",
        p.backends,
        p.capacity_per_backend,
        p.short_ms,
        p.long_ms,
        p.long_request_threshold,
        p.round_robin_over_floor,
        p.run_secs,
        p.seed
    );
    let mut loads = Table::new(
        &[
            "load",
            "short",
            "floor ms",
            "run floor ms",
            "utilisation",
            "rate/s",
            "regime: round_robin / floor",
            "measured",
        ],
        1,
    );
    for load in &output.loads {
        loads.row(vec![
            load.load.to_owned(),
            format!("{:.0}%", load.short_share * 100.0),
            format!("{:.0}", load.floor_ms),
            load.run_floor_ms.map_or("-".into(), ms),
            format!("{:.3}", load.utilisation),
            format!("{:.1}", load.rate),
            format!("{:.0}x", load.regime_over_floor),
            load.round_robin_over_floor
                .map_or("-".into(), |x| format!("{x:.2}")),
        ]);
    }
    text.push_str(&loads.render());
    text.push('\n');
    let mut table = Table::new(
        &[
            "load",
            "strategy",
            "requests",
            "errors",
            "mean ms",
            "x floor",
            "p50 ms",
            "p99 ms",
            "short mean",
            "short p99",
            "long mean",
            "long p99",
            "mean vs round_robin",
        ],
        2,
    );
    for load in &output.loads {
        for row in &load.results {
            if let Some(reason) = &row.unavailable {
                table.row(vec![
                    load.load.to_owned(),
                    row.label.clone(),
                    format!("unavailable: {reason}"),
                ]);
                continue;
            }
            let class = |c: &Option<Classes>, f: fn(&Classes) -> f64| {
                c.as_ref().map_or("-".into(), |c| ms(f(c)))
            };
            table.row(vec![
                load.load.to_owned(),
                row.label.clone(),
                row.requests.to_string(),
                row.errors.to_string(),
                ms(row.mean_ms),
                load.run_floor_ms
                    .map_or("-".into(), |floor| format!("{:.2}", row.mean_ms / floor)),
                ms(row.p50_ms),
                ms(row.p99_ms),
                class(&row.short, |c| c.mean_ms),
                class(&row.short, |c| c.p99_ms),
                class(&row.long, |c| c.mean_ms),
                class(&row.long, |c| c.p99_ms),
                match row.improvement_mean_pct {
                    Some(pct) if row.label != "round_robin" => format!("{pct:+.1}%"),
                    _ => "-".to_owned(),
                },
            ]);
        }
    }
    text.push_str(&table.render());
    text.push_str(
        "\nfloor: mean service time (no queueing) of the mix; run floor: of the requests this \
         run sent, which x floor divides by. mean vs round_robin: (round_robin mean - \
         mean) / round_robin mean; positive = faster. Seed 000 claims 43.75% (mixed), 40% \
         (short-dominant), 35.8% (long-dominant).\n",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_offer_each_load_its_utilisation() {
        for (_, short_share, utilisation) in LOADS {
            let offered = rate_for(short_share, utilisation) * floor_ms(short_share) / 1000.0;
            let slots = (BACKENDS as f64) * f64::from(CAPACITY);
            assert!(
                (offered / slots - utilisation).abs() < 0.01,
                "{short_share}"
            );
        }
        assert!((floor_ms(0.8) - 80.0).abs() < 1e-9);
        let shares = mix(0.8).shares();
        assert!((shares[0] - 0.8).abs() < 1e-9 && (shares[1] - 0.2).abs() < 1e-9);
    }

    /// Round robin's mean response time over the floor in a discrete-event model of the
    /// bed: Poisson arrivals for one run of `run_ms`, alternately to 2 backends that serve
    /// 4 requests at once, first come first served (each request takes the backend's
    /// earliest free slot, no sooner than its arrival), fixed service times; each run's
    /// mean over its own floor, as the scenario reports it, averaged over `runs` runs.
    fn modelled_round_robin_over_floor(
        short_share: f64,
        utilisation: f64,
        run_ms: f64,
        runs: u64,
    ) -> f64 {
        let rate_per_ms =
            utilisation * (BACKENDS as f64) * f64::from(CAPACITY) / floor_ms(short_share);
        let mut sum = 0.0;
        for run in 0..runs {
            // splitmix64: a seeded uniform source, so the check is deterministic.
            let mut state = run.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
            let mut uniform = move || {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
            };
            let mut free_at = [[0.0f64; CAPACITY as usize]; BACKENDS];
            let (mut t, mut total, mut service_total, mut count) = (0.0, 0.0, 0.0, 0u64);
            loop {
                t += -(1.0 - uniform()).ln() / rate_per_ms;
                if t >= run_ms {
                    break;
                }
                let service = if uniform() < short_share {
                    SHORT_MS as f64
                } else {
                    LONG_MS as f64
                };
                let slots = &mut free_at[(count % BACKENDS as u64) as usize];
                let slot = (0..slots.len())
                    .min_by(|&a, &b| slots[a].total_cmp(&slots[b]))
                    .expect("capacity above 0");
                let start = slots[slot].max(t);
                slots[slot] = start + service;
                total += start + service - t;
                service_total += service;
                count += 1;
            }
            sum += total / service_total;
        }
        sum / runs as f64
    }

    /// The regime rule: at each load's utilisation, round robin's expected mean over a
    /// full run is 2× the floor, and 3× in the heavy regime (within 0.1; 200 modelled
    /// runs, standard error ≤ 0.05).
    #[test]
    fn loads_put_round_robin_at_twice_the_floor() {
        let regimes = LOADS
            .iter()
            .map(|load| (load, ROUND_ROBIN_OVER_FLOOR))
            .chain([(&HEAVY_LOAD, HEAVY_OVER_FLOOR)]);
        for ((load, short_share, utilisation), over_floor) in regimes {
            let x = modelled_round_robin_over_floor(
                *short_share,
                *utilisation,
                RUN.as_secs_f64() * 1000.0,
                200,
            );
            assert!(
                (x - over_floor).abs() < 0.1,
                "{load}: round robin at {x:.3}× the floor, not {over_floor}×"
            );
        }
    }

    #[test]
    fn duration_class_runs_in_both_modes() {
        let rows = contenders(vec![
            ("round_robin".to_owned(), Some(StrategyKind::RoundRobin)),
            (
                "duration_class".to_owned(),
                Some(StrategyKind::DurationClass),
            ),
        ]);
        let labels: Vec<String> = rows.iter().map(Contender::label).collect();
        assert_eq!(
            labels,
            [
                "round_robin",
                "duration_class static",
                "duration_class adaptive",
                "duration_class adaptive + class queue"
            ]
        );
        assert_eq!(
            rows[3].queueing.pool_lines(),
            ["default_max_requests: 4", "queue: { priority: class }"]
        );
    }
}
