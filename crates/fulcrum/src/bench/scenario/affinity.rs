//! `affinity`: what key affinity buys when backends cache. Each backend keeps an LRU cache
//! of a few keys, a miss costs an origin fetch; the hashing strategies send a key to the
//! same backend every time, so each cache holds a slice of the key space instead of every
//! cache holding the same hot keys. Bounded loads (`bounded_load: 1.25`) keep the hottest
//! key's backend from taking much more than its share.
//!
//! Parameters, fixed before any result was seen:
//! - 4 backends, 2 ms fixed latency, unlimited concurrency, an LRU cache of 100 keys each,
//!   a miss adds 20 ms;
//! - keys drawn from Zipf(1000, s = 1.0) in `x-cache-key` (the 100 hottest keys take
//!   about 69 % of requests, so the four caches together could hold the 400 hottest);
//! - 400 req/s, Poisson, 10 s per strategy (3 s with `--quick`), fresh (cold) caches and
//!   node per strategy, same seeded arrivals and keys for all;
//! - pool `hash: { key: header, name: x-cache-key, bounded_load: 1.25 }`.
//!
//! Reported: the backends' cache hit rate (from their `/stats`), requests per backend
//! and the max/mean load ratio, p50 and p99.

use std::time::Duration;

use fulcrum_sim::BackendArgs;
use fulcrum_sim::loadgen::{DEFAULT_KEY_HEADER, KeySpec, LoadGenerator, LoadSpec};
use serde::Serialize;

use super::{Options, ScenarioError, ScenarioResult, Table, TestBed, ms, pick_strategies};

const BACKENDS: usize = 4;
const LATENCY: &str = "fixed:2ms";
const CACHE_SIZE: u32 = 100;
const CACHE_MISS_MS: u64 = 20;
const KEYS: u64 = 1000;
const ZIPF_S: f64 = 1.0;
const RATE: f64 = 400.0;
const RUN: Duration = Duration::from_secs(10);
const HASH: &str = "hash: { key: header, name: x-cache-key, bounded_load: 1.25 }";
const STRATEGIES: [&str; 5] = [
    "rendezvous",
    "ring_hash",
    "maglev",
    "round_robin",
    "least_connections",
];

#[derive(Serialize)]
struct Parameters {
    backends: usize,
    latency: &'static str,
    cache_size_per_backend: u32,
    cache_miss_ms: u64,
    zipf_keys: u64,
    zipf_s: f64,
    rate: f64,
    run_secs: f64,
    hash: &'static str,
    seed: u64,
}

#[derive(Serialize)]
struct Output {
    scenario: &'static str,
    parameters: Parameters,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    strategy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
    requests: u64,
    errors: u64,
    cache_hits: u64,
    cache_misses: u64,
    /// hits / (hits + misses) over all backends.
    cache_hit_rate: f64,
    /// Requests each backend received, in pool order.
    requests_per_backend: Vec<u64>,
    /// Busiest backend's requests over the mean; 1 = perfectly even.
    max_mean_load_ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Row {
    fn unavailable(strategy: &str, reason: String) -> Row {
        Row {
            strategy: strategy.to_owned(),
            unavailable: Some(reason),
            requests: 0,
            errors: 0,
            cache_hits: 0,
            cache_misses: 0,
            cache_hit_rate: 0.0,
            requests_per_backend: Vec::new(),
            max_mean_load_ratio: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
        }
    }
}

fn backends() -> Vec<BackendArgs> {
    (1..=BACKENDS)
        .map(|i| BackendArgs {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            name: Some(format!("backend-{i}")),
            latency: LATENCY.parse().expect("constant latency spec"),
            cache_size: CACHE_SIZE,
            cache_miss_ms: CACHE_MISS_MS,
            ..BackendArgs::default()
        })
        .collect()
}

/// Busiest over mean of `loads`; 0 when nothing was sent.
fn max_mean_ratio(loads: &[u64]) -> f64 {
    let total: u64 = loads.iter().sum();
    if total == 0 || loads.is_empty() {
        return 0.0;
    }
    let mean = total as f64 / loads.len() as f64;
    let max = loads.iter().copied().max().unwrap_or(0) as f64;
    (max / mean * 1000.0).round() / 1000.0
}

pub(super) async fn run(options: &Options) -> Result<ScenarioResult, ScenarioError> {
    let strategies = pick_strategies(options, &STRATEGIES)?;
    let run_length = options.run_length(RUN);
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
            exponent: ZIPF_S,
            header: DEFAULT_KEY_HEADER.parse().expect("constant header name"),
        });
        spec.timeout = options.timeout;
        spec.seed = options.seed;
        let generator = LoadGenerator::new(spec)
            .map_err(|e| ScenarioError::Runtime(format!("scenario load: {e}")))?;
        let report =
            crate::bench::drive(generator, name, options.show_progress, Default::default()).await;
        let stats = bed.backend_stats();
        bed.stop().await;
        let hits: u64 = stats.iter().map(|s| s.cache_hits).sum();
        let misses: u64 = stats.iter().map(|s| s.cache_misses).sum();
        let per_backend: Vec<u64> = stats.iter().map(|s| s.requests).collect();
        rows.push(Row {
            strategy: name.clone(),
            unavailable: None,
            requests: report.overall.requests,
            errors: report.overall.errors,
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: if hits + misses == 0 {
                0.0
            } else {
                (hits as f64 / (hits + misses) as f64 * 1000.0).round() / 1000.0
            },
            max_mean_load_ratio: max_mean_ratio(&per_backend),
            requests_per_backend: per_backend,
            p50_ms: report.overall.latency_ms.p50,
            p99_ms: report.overall.latency_ms.p99,
        });
    }
    let output = Output {
        scenario: "affinity",
        parameters: Parameters {
            backends: BACKENDS,
            latency: LATENCY,
            cache_size_per_backend: CACHE_SIZE,
            cache_miss_ms: CACHE_MISS_MS,
            zipf_keys: KEYS,
            zipf_s: ZIPF_S,
            rate: RATE,
            run_secs: run_length.as_secs_f64(),
            hash: HASH,
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
        "affinity: {} backends, latency {}, LRU cache of {} keys each (a miss adds {} ms), \
         Zipf({}, s={}) keys in x-cache-key, {} req/s for {}s, pool {}; seed {}\n\n",
        p.backends,
        p.latency,
        p.cache_size_per_backend,
        p.cache_miss_ms,
        p.zipf_keys,
        p.zipf_s,
        p.rate,
        p.run_secs,
        p.hash,
        p.seed
    );
    let mut table = Table::new(
        &[
            "strategy",
            "requests",
            "errors",
            "hit rate",
            "requests per backend",
            "max/mean",
            "p50 ms",
            "p99 ms",
        ],
        1,
    );
    for row in &output.results {
        if let Some(reason) = &row.unavailable {
            table.row(vec![row.strategy.clone(), format!("unavailable: {reason}")]);
            continue;
        }
        let per_backend: Vec<String> = row
            .requests_per_backend
            .iter()
            .map(u64::to_string)
            .collect();
        table.row(vec![
            row.strategy.clone(),
            row.requests.to_string(),
            row.errors.to_string(),
            format!("{:.1}%", row.cache_hit_rate * 100.0),
            per_backend.join(" / "),
            format!("{:.2}", row.max_mean_load_ratio),
            ms(row.p50_ms),
            ms(row.p99_ms),
        ]);
    }
    text.push_str(&table.render());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_ratio_is_max_over_mean() {
        assert_eq!(max_mean_ratio(&[100, 100, 100, 100]), 1.0);
        assert_eq!(max_mean_ratio(&[200, 100, 50, 50]), 2.0);
        assert_eq!(max_mean_ratio(&[0, 0]), 0.0);
        assert_eq!(max_mean_ratio(&[]), 0.0);
    }
}
