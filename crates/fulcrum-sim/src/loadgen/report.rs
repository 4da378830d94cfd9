//! Counting a run's outcomes into HDR histograms and turning them into a [`LoadReport`]:
//! JSON for scripts, a table for people.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::schedule::Mix;
use super::{LoadSpec, Outcome};

/// Highest latency recorded exactly, in microseconds (1 h); longer ones count as 1 h.
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// Significant digits of the histograms: values within 0.1 %.
const SIGNIFICANT_DIGITS: u8 = 3;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
        .expect("constant bounds are valid: 1 ≤ low, high ≥ 2 × low, 3 significant digits")
}

/// Latency percentiles of one class, in milliseconds.
///
/// Latency is measured from the request's scheduled send time to the last byte of its
/// response, for every complete response whatever its status; requests that failed in
/// transport or timed out are only counted in the errors.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Responses measured.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |micros: u64| round3(micros as f64 / 1000.0);
        LatencySummary {
            count: h.len(),
            mean: round3(h.mean() / 1000.0),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The outcome of one endpoint of the mix, or of all of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassReport {
    /// The path (and query) of the endpoint; `all` for the whole run.
    pub path: String,
    /// Share of arrivals the mix gave this endpoint (1 for `all`).
    pub share: f64,
    /// Requests sent.
    pub requests: u64,
    /// Arrivals not sent because `max_in_flight` requests were outstanding.
    pub dropped: u64,
    /// Requests answered with a 2xx status, body read to the end.
    pub ok: u64,
    /// Requests that were not: a non-2xx status (`status_503`), or no complete response
    /// (`connect`, `timeout`, `transport`, `body`).
    pub errors: u64,
    /// `errors` by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// Complete responses (any status) per second of the run, end of the last included.
    pub achieved_rate: f64,
    /// Latency of complete responses.
    pub latency_ms: LatencySummary,
}

/// What a run measured; [`fmt::Display`] renders it as a table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadReport {
    /// Target URL.
    pub url: String,
    /// Requested arrival rate, req/s.
    pub rate: f64,
    /// Length of the arrival schedule, seconds.
    pub duration_secs: f64,
    /// Seconds of the schedule actually sent: `duration_secs`, or less when the run was
    /// stopped early ([`crate::loadgen::LoadGenerator::run_until`]).
    pub sent_secs: f64,
    /// The run was stopped before its schedule ended.
    pub interrupted: bool,
    /// From the first arrival to the last response, seconds.
    pub elapsed_secs: f64,
    /// Requests sent per second of the schedule sent (`sent_secs`): below `rate` by the
    /// Poisson noise, and by the drops.
    pub send_rate: f64,
    /// How far behind schedule the generator sent its latest request, milliseconds. It is
    /// included in the latencies (they run from the scheduled time); a large value means
    /// the generator itself was short of CPU.
    pub max_send_lag_ms: f64,
    /// Seed of the arrivals, endpoints and keys.
    pub seed: u64,
    /// The cap on outstanding requests.
    pub max_in_flight: usize,
    /// The whole run.
    pub overall: ClassReport,
    /// One per endpoint of the mix, in mix order.
    pub endpoints: Vec<ClassReport>,
}

#[derive(Debug)]
struct ClassCounts {
    histogram: Histogram<u64>,
    requests: u64,
    dropped: u64,
    ok: u64,
    error_kinds: BTreeMap<String, u64>,
}

impl ClassCounts {
    fn new() -> Self {
        ClassCounts {
            histogram: histogram(),
            requests: 0,
            dropped: 0,
            ok: 0,
            error_kinds: BTreeMap::new(),
        }
    }

    fn report(&self, path: String, share: f64, elapsed: Duration) -> ClassReport {
        let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        ClassReport {
            path,
            share: round3(share),
            requests: self.requests,
            dropped: self.dropped,
            ok: self.ok,
            errors: self.error_kinds.values().sum(),
            error_kinds: self.error_kinds.clone(),
            achieved_rate: round3(self.histogram.len() as f64 / seconds),
            latency_ms: LatencySummary::of(&self.histogram),
        }
    }
}

/// Per-class counters of a run in progress.
#[derive(Debug)]
pub(crate) struct Recorder {
    classes: Vec<ClassCounts>,
}

impl Recorder {
    pub(crate) fn new(classes: usize) -> Self {
        Recorder {
            classes: (0..classes).map(|_| ClassCounts::new()).collect(),
        }
    }

    pub(crate) fn sent(&mut self, class: usize) {
        self.classes[class].requests += 1;
    }

    pub(crate) fn dropped(&mut self, class: usize) {
        self.classes[class].dropped += 1;
    }

    pub(crate) fn record(&mut self, class: usize, outcome: &Outcome, latency: Duration) {
        let counts = &mut self.classes[class];
        let kind = match *outcome {
            Outcome::Response(status) => {
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                counts.histogram.saturating_record(micros.max(1));
                if (200..300).contains(&status) {
                    counts.ok += 1;
                    return;
                }
                format!("status_{status}")
            }
            Outcome::Failed(kind) => kind.to_owned(),
        };
        *counts.error_kinds.entry(kind).or_default() += 1;
    }

    pub(crate) fn into_report(
        self,
        spec: &LoadSpec,
        mix: &Mix,
        elapsed: Duration,
        max_lag: Duration,
        sent_for: Option<Duration>,
    ) -> LoadReport {
        let sending = sent_for.unwrap_or(spec.duration);
        let mut all = ClassCounts::new();
        for counts in &self.classes {
            all.histogram
                .add(&counts.histogram)
                .expect("histograms of one run share their bounds");
            all.requests += counts.requests;
            all.dropped += counts.dropped;
            all.ok += counts.ok;
            for (kind, n) in &counts.error_kinds {
                *all.error_kinds.entry(kind.clone()).or_default() += n;
            }
        }
        let endpoints = self
            .classes
            .iter()
            .zip(mix.entries().iter().zip(mix.shares()))
            .map(|(counts, (entry, share))| counts.report(entry.path.clone(), share, elapsed))
            .collect();
        LoadReport {
            url: spec.url.to_string(),
            rate: spec.rate,
            duration_secs: spec.duration.as_secs_f64(),
            sent_secs: round3(sending.as_secs_f64()),
            interrupted: sent_for.is_some(),
            elapsed_secs: round3(elapsed.as_secs_f64()),
            send_rate: round3(all.requests as f64 / sending.as_secs_f64().max(f64::MIN_POSITIVE)),
            max_send_lag_ms: round3(max_lag.as_secs_f64() * 1000.0),
            seed: spec.seed,
            max_in_flight: spec.max_in_flight,
            overall: all.report("all".to_owned(), 1.0, elapsed),
            endpoints,
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} for {}s at {} req/s (open loop, Poisson arrivals, seed {}), done in {:.2}s",
            self.url, self.duration_secs, self.rate, self.seed, self.elapsed_secs
        )?;
        if self.interrupted {
            writeln!(
                f,
                "interrupted: {:.2}s of the schedule sent",
                self.sent_secs
            )?;
        }
        writeln!(
            f,
            "sent {:.1} req/s; generator at most {:.1} ms behind schedule; latency from scheduled send to last byte\n",
            self.send_rate, self.max_send_lag_ms
        )?;
        writeln!(
            f,
            "{:<24} {:>6} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "endpoint",
            "share",
            "requests",
            "ok",
            "errors",
            "dropped",
            "rate/s",
            "mean ms",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max"
        )?;
        let show_overall = self.endpoints.len() > 1;
        let rows = self
            .endpoints
            .iter()
            .chain(show_overall.then_some(&self.overall));
        for row in rows {
            let l = &row.latency_ms;
            // Without a complete response there is no latency to show (`-`, not 0).
            let ms = |v: f64| {
                if l.count == 0 {
                    "-".to_owned()
                } else {
                    format!("{v:.2}")
                }
            };
            writeln!(
                f,
                "{:<24} {:>6.3} {:>9} {:>9} {:>7} {:>8} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                truncate(&row.path, 24),
                row.share,
                row.requests,
                row.ok,
                row.errors,
                row.dropped,
                row.achieved_rate,
                ms(l.mean),
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            )?;
        }
        if !self.overall.error_kinds.is_empty() {
            let kinds: Vec<String> = self
                .overall
                .error_kinds
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            writeln!(f, "\nerrors: {}", kinds.join(", "))?;
        }
        if self.overall.dropped > 0 {
            writeln!(
                f,
                "\n{} arrivals dropped: {} requests were outstanding (--max-in-flight); the target cannot keep up with this rate",
                self.overall.dropped, self.max_in_flight
            )?;
        }
        Ok(())
    }
}

/// `text` cut to `width` characters, with `…` when cut.
pub(crate) fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_statuses_failures_and_latencies_per_class() {
        let mut recorder = Recorder::new(2);
        for _ in 0..3 {
            recorder.sent(0);
        }
        recorder.sent(1);
        recorder.dropped(1);
        recorder.record(0, &Outcome::Response(200), Duration::from_millis(10));
        recorder.record(0, &Outcome::Response(503), Duration::from_millis(30));
        recorder.record(0, &Outcome::Failed("timeout"), Duration::from_secs(30));
        recorder.record(1, &Outcome::Response(204), Duration::from_millis(20));
        let mut spec = super::super::LoadSpec::new("http://127.0.0.1:1/".parse().expect("literal"));
        spec.duration = Duration::from_secs(2);
        let mix: Mix = "/a:3,/b:1".parse().expect("valid");
        let report =
            recorder.into_report(&spec, &mix, Duration::from_secs(2), Duration::ZERO, None);

        let a = &report.endpoints[0];
        assert_eq!((a.requests, a.ok, a.errors, a.dropped), (3, 1, 2, 0));
        assert_eq!(a.error_kinds["status_503"], 1);
        assert_eq!(a.error_kinds["timeout"], 1);
        assert_eq!(a.latency_ms.count, 2, "the timeout has no latency");
        assert_eq!(a.share, 0.75);
        assert!((a.latency_ms.max - 30.0).abs() < 0.1);

        let all = &report.overall;
        assert_eq!(
            (all.requests, all.ok, all.errors, all.dropped),
            (4, 2, 2, 1)
        );
        assert_eq!(all.latency_ms.count, 3);
        assert!((all.latency_ms.mean - 20.0).abs() < 0.1);
        assert!((all.latency_ms.p50 - 20.0).abs() < 0.1);
        assert_eq!(all.achieved_rate, 1.5);
        assert_eq!(report.send_rate, 2.0);

        let table = report.to_string();
        assert!(table.contains("/a") && table.contains("all"), "{table}");
        assert!(table.contains("status_503 1, timeout 1"), "{table}");
        assert!(table.contains("1 arrivals dropped"), "{table}");
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["endpoints"][1]["path"], "/b");
        assert_eq!(json["overall"]["latency_ms"]["count"], 3);
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        assert_eq!(LatencySummary::of(&histogram()), LatencySummary::default());
    }

    #[test]
    fn truncates_long_paths() {
        assert_eq!(truncate("/short", 8), "/short");
        assert_eq!(truncate("/a-very-long-path", 8), "/a-very…");
    }
}
