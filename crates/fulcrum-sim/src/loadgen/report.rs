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
/// response, for every complete response whatever its status. Requests given up on are
/// included, censored at the moment they were given up: a timed-out one at the timeout,
/// an interrupted one at its age when the run was stopped; their true latency is at least
/// that, so with any of them the percentiles are lower bounds
/// ([`ClassReport::timed_out`], [`ClassReport::interrupted`]). Requests that failed
/// without a complete response (connect, transport, body errors) are not included
/// ([`ClassReport::failed_without_response`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Requests measured: complete responses, timed-out and interrupted requests.
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
    /// (`connect`, `timeout`, `transport`, `body`, `interrupted`).
    pub errors: u64,
    /// `errors` by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// Requests given up at the timeout (`error_kinds.timeout`); in the latency
    /// histogram at the timeout, a lower bound of their latency.
    pub timed_out: u64,
    /// Requests still outstanding when an operator's stop ended the run
    /// (`error_kinds.interrupted`); in the latency histogram at their age then, a lower
    /// bound of their latency.
    pub interrupted: u64,
    /// Requests that failed without a complete response (`connect`, `transport`, `body`
    /// errors); not in the latency histogram.
    pub failed_without_response: u64,
    /// Complete responses (any status) per second of the run, end of the last included.
    pub achieved_rate: f64,
    /// Latency of complete responses, timed-out and interrupted requests:
    /// `latency_ms.count` = `requests` − `failed_without_response`.
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
    /// An operator stopped the run (Ctrl-C) before it ended: before its schedule did
    /// (`sent_secs` < `duration_secs`) or while waiting for the last requests.
    pub interrupted: bool,
    /// Seconds from the first arrival to the stop when `interrupted`, else `null`.
    pub interrupted_after_secs: Option<f64>,
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
    /// The per-request timeout, seconds: timed-out requests are in the latencies at it.
    pub timeout_secs: f64,
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
    responses: u64,
    timed_out: u64,
    interrupted: u64,
    failed_without_response: u64,
    error_kinds: BTreeMap<String, u64>,
}

impl ClassCounts {
    fn new() -> Self {
        ClassCounts {
            histogram: histogram(),
            requests: 0,
            dropped: 0,
            ok: 0,
            responses: 0,
            timed_out: 0,
            interrupted: 0,
            failed_without_response: 0,
            error_kinds: BTreeMap::new(),
        }
    }

    fn add(&mut self, other: &ClassCounts) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms of one run share their bounds");
        self.requests += other.requests;
        self.dropped += other.dropped;
        self.ok += other.ok;
        self.responses += other.responses;
        self.timed_out += other.timed_out;
        self.interrupted += other.interrupted;
        self.failed_without_response += other.failed_without_response;
        for (kind, n) in &other.error_kinds {
            *self.error_kinds.entry(kind.clone()).or_default() += n;
        }
    }

    fn record_latency(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.max(1));
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
            timed_out: self.timed_out,
            interrupted: self.interrupted,
            failed_without_response: self.failed_without_response,
            achieved_rate: round3(self.responses as f64 / seconds),
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

    /// Counts one finished request of `class`; `latency` runs from its scheduled send
    /// time to its response's last byte, or to the moment it was given up.
    pub(crate) fn record(&mut self, class: usize, outcome: &Outcome, latency: Duration) {
        let counts = &mut self.classes[class];
        let kind = match *outcome {
            Outcome::Response(status) => {
                counts.record_latency(latency);
                counts.responses += 1;
                if (200..300).contains(&status) {
                    counts.ok += 1;
                    return;
                }
                format!("status_{status}")
            }
            // Censored: the true latency is at least `latency`, so it is recorded there.
            Outcome::TimedOut => {
                counts.record_latency(latency);
                counts.timed_out += 1;
                "timeout".to_owned()
            }
            Outcome::Interrupted => {
                counts.record_latency(latency);
                counts.interrupted += 1;
                "interrupted".to_owned()
            }
            Outcome::Failed(kind) => {
                counts.failed_without_response += 1;
                kind.to_owned()
            }
        };
        *counts.error_kinds.entry(kind).or_default() += 1;
    }

    pub(crate) fn into_report(self, spec: &LoadSpec, mix: &Mix, timing: Timing) -> LoadReport {
        let Timing {
            elapsed,
            max_lag,
            sent_for,
            stopped_at,
        } = timing;
        let sending = sent_for.unwrap_or(spec.duration);
        let mut all = ClassCounts::new();
        for counts in &self.classes {
            all.add(counts);
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
            interrupted: stopped_at.is_some(),
            interrupted_after_secs: stopped_at.map(|at| round3(at.as_secs_f64())),
            elapsed_secs: round3(elapsed.as_secs_f64()),
            send_rate: round3(all.requests as f64 / sending.as_secs_f64().max(f64::MIN_POSITIVE)),
            max_send_lag_ms: round3(max_lag.as_secs_f64() * 1000.0),
            seed: spec.seed,
            max_in_flight: spec.max_in_flight,
            timeout_secs: spec.timeout.as_secs_f64(),
            overall: all.report("all".to_owned(), 1.0, elapsed),
            endpoints,
        }
    }
}

/// When a run ended and how it went, for [`Recorder::into_report`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// From the first arrival to the last request finished or given up.
    pub(crate) elapsed: Duration,
    /// How far behind schedule the latest request was sent.
    pub(crate) max_lag: Duration,
    /// How much of the schedule was sent when a stop cut it short; `None` = all of it.
    pub(crate) sent_for: Option<Duration>,
    /// From the first arrival to an operator's stop; `None` = not stopped.
    pub(crate) stopped_at: Option<Duration>,
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
                "interrupted after {:.2}s: {:.2}s of the {}s schedule sent; {} requests still outstanding were abandoned",
                self.interrupted_after_secs.unwrap_or(self.elapsed_secs),
                self.sent_secs,
                self.duration_secs,
                self.overall.interrupted
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
        writeln!(f)?;
        if self.endpoints.len() > 1 {
            for row in self
                .endpoints
                .iter()
                .filter(|row| row.timed_out + row.interrupted + row.failed_without_response > 0)
            {
                writeln!(f, "{}: {}", row.path, coverage(row, self.timeout_secs))?;
            }
            writeln!(f, "all: {}", coverage(&self.overall, self.timeout_secs))?;
        } else {
            writeln!(f, "{}", coverage(&self.overall, self.timeout_secs))?;
        }
        if !self.overall.error_kinds.is_empty() {
            let kinds: Vec<String> = self
                .overall
                .error_kinds
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            writeln!(f, "errors: {}", kinds.join(", "))?;
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

/// Which requests `row`'s percentiles cover, in words: the ones censored at the moment
/// they were given up are lower bounds of their latency (and so is any percentile that
/// falls on one), the ones that failed without a response are left out.
fn coverage(row: &ClassReport, timeout_secs: f64) -> String {
    let mut text = format!(
        "latency of {} of {} requests",
        row.latency_ms.count, row.requests
    );
    if row.timed_out > 0 {
        text.push_str(&format!(
            "; {} timed out, counted at the {timeout_secs}s timeout as lower bounds",
            row.timed_out
        ));
    }
    if row.interrupted > 0 {
        text.push_str(&format!(
            "; {} interrupted, counted at their age when abandoned as lower bounds",
            row.interrupted
        ));
    }
    if row.failed_without_response > 0 {
        text.push_str(&format!(
            "; {} failed without a response, not included",
            row.failed_without_response
        ));
    }
    text
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
        for _ in 0..2 {
            recorder.sent(0);
        }
        recorder.sent(1);
        recorder.dropped(1);
        recorder.record(0, &Outcome::Response(200), Duration::from_millis(10));
        recorder.record(0, &Outcome::Response(503), Duration::from_millis(30));
        recorder.record(1, &Outcome::Response(204), Duration::from_millis(20));
        let mut spec = super::super::LoadSpec::new("http://127.0.0.1:1/".parse().expect("literal"));
        spec.duration = Duration::from_secs(2);
        let mix: Mix = "/a:3,/b:1".parse().expect("valid");
        let report = recorder.into_report(&spec, &mix, timing(None));

        let a = &report.endpoints[0];
        assert_eq!((a.requests, a.ok, a.errors, a.dropped), (2, 1, 1, 0));
        assert_eq!(a.error_kinds["status_503"], 1);
        assert_eq!(a.latency_ms.count, 2, "a 5xx response has a latency");
        assert_eq!(a.share, 0.75);
        assert!((a.latency_ms.max - 30.0).abs() < 0.1);

        let all = &report.overall;
        assert_eq!(
            (all.requests, all.ok, all.errors, all.dropped),
            (3, 2, 1, 1)
        );
        assert_eq!(all.latency_ms.count, 3);
        assert!((all.latency_ms.mean - 20.0).abs() < 0.1);
        assert!((all.latency_ms.p50 - 20.0).abs() < 0.1);
        assert_eq!(all.achieved_rate, 1.5);
        assert_eq!(report.send_rate, 1.5);
        assert!(!report.interrupted && report.interrupted_after_secs.is_none());

        let table = report.to_string();
        assert!(table.contains("/a") && table.contains("all"), "{table}");
        assert!(table.contains("errors: status_503 1"), "{table}");
        assert!(
            table.contains("all: latency of 3 of 3 requests\n"),
            "{table}"
        );
        assert!(table.contains("1 arrivals dropped"), "{table}");
        assert!(!table.contains("interrupted"), "{table}");
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["endpoints"][1]["path"], "/b");
        assert_eq!(json["overall"]["latency_ms"]["count"], 3);
    }

    fn timing(stopped_at: Option<Duration>) -> Timing {
        Timing {
            elapsed: Duration::from_secs(2),
            max_lag: Duration::ZERO,
            sent_for: stopped_at,
            stopped_at,
        }
    }

    /// 90 fast responses and 10 requests given up at a 1 s timeout: leaving the ten out
    /// would put p99 at 10 ms; censored at the timeout it is at least 1 s, and the
    /// percentiles below the censored share stay exact.
    #[test]
    fn timed_out_requests_are_censored_at_the_timeout_and_failures_left_out() {
        let mut recorder = Recorder::new(2);
        for _ in 0..90 {
            recorder.sent(0);
            recorder.record(0, &Outcome::Response(200), Duration::from_millis(10));
        }
        for _ in 0..10 {
            recorder.sent(0);
            recorder.record(0, &Outcome::TimedOut, Duration::from_millis(1000));
        }
        for _ in 0..5 {
            recorder.sent(1);
            recorder.record(1, &Outcome::Failed("connect"), Duration::from_millis(1));
        }
        let mut spec = super::super::LoadSpec::new("http://127.0.0.1:1/".parse().expect("literal"));
        spec.timeout = Duration::from_secs(1);
        let mix: Mix = "/slow,/gone".parse().expect("valid");
        let report = recorder.into_report(&spec, &mix, timing(None));

        let slow = &report.endpoints[0];
        assert_eq!((slow.requests, slow.ok, slow.errors), (100, 90, 10));
        assert_eq!((slow.timed_out, slow.failed_without_response), (10, 0));
        assert_eq!(slow.error_kinds["timeout"], 10);
        assert_eq!(slow.latency_ms.count, 100);
        assert!(slow.latency_ms.p99 >= 1000.0, "{:?}", slow.latency_ms);
        assert!(slow.latency_ms.max >= 1000.0, "{:?}", slow.latency_ms);
        assert!((slow.latency_ms.p50 - 10.0).abs() < 0.1, "exact below");
        assert_eq!(slow.achieved_rate, 45.0, "complete responses only");

        let gone = &report.endpoints[1];
        assert_eq!((gone.failed_without_response, gone.timed_out), (5, 0));
        assert_eq!(gone.latency_ms.count, 0, "no response, no latency");

        let all = &report.overall;
        assert_eq!(
            (all.requests, all.timed_out, all.failed_without_response),
            (105, 10, 5)
        );
        assert_eq!(
            all.latency_ms.count,
            all.requests - all.failed_without_response
        );
        assert!(all.latency_ms.p99 >= 1000.0);

        let table = report.to_string();
        assert!(
            table.contains(
                "all: latency of 100 of 105 requests; 10 timed out, counted at the 1s timeout"
            ),
            "{table}"
        );
        assert!(
            table.contains("5 failed without a response, not included"),
            "{table}"
        );
        assert!(
            table.contains("/gone: latency of 0 of 5 requests"),
            "{table}"
        );
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["overall"]["timed_out"], 10);
        assert_eq!(json["overall"]["failed_without_response"], 5);
        assert_eq!(json["endpoints"][0]["latency_ms"]["count"], 100);
        assert_eq!(json["timeout_secs"], 1.0);
    }

    #[test]
    fn interrupted_requests_are_censored_at_their_age_and_the_stop_is_reported() {
        let mut recorder = Recorder::new(1);
        for _ in 0..3 {
            recorder.sent(0);
        }
        recorder.record(0, &Outcome::Response(200), Duration::from_millis(5));
        recorder.record(0, &Outcome::Interrupted, Duration::from_millis(2500));
        recorder.record(0, &Outcome::Interrupted, Duration::from_millis(2100));
        let mut spec = super::super::LoadSpec::new("http://127.0.0.1:1/".parse().expect("literal"));
        spec.duration = Duration::from_secs(60);
        let mix: Mix = "/".parse().expect("valid");
        let report = recorder.into_report(&spec, &mix, timing(Some(Duration::from_millis(1500))));

        assert!(report.interrupted);
        assert_eq!(report.interrupted_after_secs, Some(1.5));
        assert_eq!(report.sent_secs, 1.5);
        let all = &report.overall;
        assert_eq!((all.ok, all.errors, all.interrupted), (1, 2, 2));
        assert_eq!(all.error_kinds["interrupted"], 2);
        assert_eq!(all.latency_ms.count, 3);
        assert!(all.latency_ms.max >= 2500.0);
        let table = report.to_string();
        assert!(table.contains("interrupted after 1.50s"), "{table}");
        assert!(
            table.contains("2 requests still outstanding were abandoned"),
            "{table}"
        );
        assert!(
            table.contains("2 interrupted, counted at their age when abandoned"),
            "{table}"
        );
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
