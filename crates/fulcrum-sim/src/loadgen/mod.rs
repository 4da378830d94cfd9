//! An open-loop HTTP load generator with HDR latency percentiles, used by `fulcrum bench`
//! and its scenarios.
//!
//! It sits in front of the request flow, where clients are: it sends requests to a URL (a
//! Fulcrum listener or a backend) and measures what comes back.
//!
//! # Open loop, no coordinated omission
//! Requests arrive as a Poisson process: inter-arrival times are exponential with mean
//! 1/`rate`, drawn from a seeded RNG, so a run is reproducible and its arrivals are as
//! bursty as independent users are. Each request is sent at its scheduled time on its own
//! task, whether or not earlier ones have been answered (an *open* system in the sense of
//! Schroeder, Wierman and Harchol-Balter, "Open Versus Closed: A Cautionary Tale", NSDI
//! 2006). A closed-loop generator, where N connections each wait for an answer before
//! sending again, slows down exactly when the server does and so never measures the
//! requests that would have queued; Gil Tene named this *coordinated omission* ("How NOT
//! to Measure Latency", 2013; wrk2). Here latency runs from the request's **scheduled**
//! send time to the last byte of its response body, so time spent waiting for the
//! generator itself (a late timer, a busy CPU) counts against the server rather than
//! disappearing.
//!
//! Outstanding requests are capped (`max_in_flight`): an arrival that finds the cap
//! reached is not sent and is counted as `dropped`, never delayed, since delaying it would
//! reintroduce coordinated omission.
//!
//! # Requests without a response: censored, not left out
//! Leaving out the requests that never got an answer would hide a stall exactly when it
//! is worst: a backend that stops for longer than `timeout` would show only the fast
//! requests around the stall. So every request the generator *gave up on* is recorded
//! in the latency histograms at the moment it was given up, measured from its scheduled
//! send time like the others:
//!
//! - a request that reached `timeout` is recorded at `timeout` (`timed_out`);
//! - a request still outstanding when an operator's stop ended the run (see
//!   [`LoadGenerator::run_until`]) is recorded at its age then (`interrupted`).
//!
//! Its true latency is at least that value (right-censored), so every percentile is a
//! correct *lower bound* of the true one. With timeouts alone, the percentiles up to the
//! share of complete responses are exact: every response came before `timeout`, so the
//! censored values all lie above them. A request that failed without a complete
//! response (connection refused, reset, a broken body) is not recorded: it failed for a
//! reason other than the server's speed, usually at once, and its short time would
//! flatter the percentiles. The report says how many requests the percentiles cover and
//! how many of those are censored ([`ClassReport`]).
//!
//! # Layout
//! [`schedule`] is the pure part (arrival times, endpoint mix, Zipf keys); `report` holds
//! the histograms and the report; this module runs the schedule over a pooled HTTP/1.1
//! keep-alive client.
//!
//! # Example
//! ```no_run
//! # async fn run() -> Result<(), fulcrum_sim::loadgen::LoadError> {
//! use std::time::Duration;
//! use fulcrum_sim::loadgen::{LoadGenerator, LoadSpec};
//!
//! let mut spec = LoadSpec::new("http://127.0.0.1:8080/".parse().expect("literal URL"));
//! spec.rate = 200.0;
//! spec.duration = Duration::from_secs(5);
//! spec.mix = "/short:0.8,/long:0.2".parse().expect("literal mix");
//! let report = LoadGenerator::new(spec)?.run().await;
//! println!("{report}");
//! # Ok(())
//! # }
//! ```

mod report;
pub mod schedule;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use report::{ClassReport, LatencySummary, LoadReport};
pub use schedule::{Arrival, Mix, MixEntry, Schedule, Zipf};

use report::{Recorder, Timing};

/// `--rate` when not given, requests per second.
pub const DEFAULT_RATE: f64 = 1000.0;
/// The highest rate accepted; one process cannot schedule much more.
pub const MAX_RATE: f64 = 1_000_000.0;
/// `--max-in-flight` when not given.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// `--timeout` when not given: the longest a request may take, body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long requests outstanding at an operator's stop are still waited for when not set
/// otherwise ([`LoadSpec::stop_grace`]): 2 s, long enough for a healthy server's requests
/// to finish, short enough for Ctrl-C to feel immediate.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(2);
/// The longest run accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The header Zipf keys are sent in when no other is named: the one the simulator's cache
/// reads.
pub const DEFAULT_KEY_HEADER: &str = crate::routes::CACHE_KEY_HEADER;

/// Cache keys drawn from a Zipf distribution, one per request, sent in a header.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySpec {
    /// Distinct keys N: keys are the ranks `1..=N` in decimal, rank 1 the most popular.
    pub count: u64,
    /// Exponent s: key k is drawn with probability ∝ 1/kˢ.
    pub exponent: f64,
    /// The request header carrying the key.
    pub header: HeaderName,
}

/// What to send: target, rate, length, endpoint mix, keys and limits.
///
/// Built with [`LoadSpec::new`] and adjusted field by field; [`LoadGenerator::new`]
/// checks it.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// `http://host:port[/path]`. Requests go to its host and port; its path (and query)
    /// is the one endpoint when [`mix`](Self::mix) is empty.
    pub url: Uri,
    /// Mean arrival rate, requests per second, `0 < rate <= MAX_RATE`.
    pub rate: f64,
    /// How long arrivals are scheduled for; outstanding requests are then waited for (up
    /// to [`timeout`](Self::timeout)).
    pub duration: Duration,
    /// Paths and their shares of the requests; empty = the URL's path only.
    pub mix: Mix,
    /// Zipf-distributed keys sent with each request; `None` = no key header.
    pub keys: Option<KeySpec>,
    /// Requests outstanding at once at most; an arrival beyond it is dropped and counted.
    pub max_in_flight: usize,
    /// The longest one request may take, from its scheduled time to the end of its body;
    /// a request given up then is recorded at this latency, as a lower bound.
    pub timeout: Duration,
    /// After an operator's stop ([`Interrupt::stop`]), how long outstanding requests are
    /// still waited for before they are abandoned and reported as `interrupted`; at most
    /// [`timeout`](Self::timeout) is used. Default [`DEFAULT_STOP_GRACE`] (2 s).
    pub stop_grace: Duration,
    /// Seed of the arrival times, endpoint choices and keys.
    pub seed: u64,
}

impl LoadSpec {
    /// 1000 req/s for 10 s to `url`'s path, no keys, 10 000 in flight, 30 s timeout,
    /// 2 s stop grace, seed 1.
    pub fn new(url: Uri) -> Self {
        LoadSpec {
            url,
            rate: DEFAULT_RATE,
            duration: Duration::from_secs(10),
            mix: Mix::default(),
            keys: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            timeout: DEFAULT_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            seed: 1,
        }
    }

    /// How long requests outstanding at a stop are waited for: the stop grace, at most
    /// the timeout (a request cannot outlive its timeout anyway).
    pub fn effective_stop_grace(&self) -> Duration {
        self.stop_grace.min(self.timeout)
    }

    /// The endpoint mix actually used: [`mix`](Self::mix), or the URL's path alone.
    fn effective_mix(&self) -> Mix {
        if self.mix.entries().is_empty() {
            let path = self
                .url
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            Mix::single(path)
        } else {
            self.mix.clone()
        }
    }

    fn validate(&self) -> Result<(), LoadError> {
        let invalid =
            |option: &'static str, message: String| LoadError::Invalid { option, message };
        if self.url.scheme_str() != Some("http") || self.url.authority().is_none() {
            return Err(invalid(
                "url",
                format!("`{}` is not an http://HOST:PORT[/PATH] URL", self.url),
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(invalid(
                "rate",
                format!(
                    "{} is not a rate above 0 and at most {MAX_RATE} requests per second",
                    self.rate
                ),
            ));
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(invalid(
                "duration",
                format!(
                    "{:?} is not a duration above 0 and at most 24h",
                    self.duration
                ),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max-in-flight", "must be at least 1".to_owned()));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be above 0".to_owned()));
        }
        if let Some(keys) = &self.keys {
            Zipf::check(keys.count, 1.0).map_err(|m| invalid("zipf-keys", m))?;
            Zipf::check(1, keys.exponent).map_err(|m| invalid("zipf-s", m))?;
        }
        Ok(())
    }
}

/// Why a load could not be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// An option is out of range or malformed; `option` is its command-line name.
    #[error("invalid --{option}: {message}")]
    Invalid {
        /// Command-line name of the option without dashes, e.g. `rate`.
        option: &'static str,
        /// What is wrong with the value.
        message: String,
    },
}

/// Counters of a run in progress, for a progress display; read them while
/// [`LoadGenerator::run`] is running.
#[derive(Debug, Default)]
pub struct Progress {
    sent: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    in_flight: AtomicU64,
}

impl Progress {
    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Requests finished so far (answered, failed or timed out).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }
    /// Requests finished with an error so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    /// Arrivals dropped at the in-flight cap so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    /// Requests outstanding now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A checked [`LoadSpec`], ready to run.
#[derive(Debug)]
pub struct LoadGenerator {
    spec: LoadSpec,
    mix: Mix,
    zipf: Option<Arc<Zipf>>,
    progress: Arc<Progress>,
}

impl LoadGenerator {
    /// Checks `spec` and precomputes the key distribution.
    ///
    /// # Errors
    /// [`LoadError::Invalid`] naming the first option out of range.
    pub fn new(spec: LoadSpec) -> Result<Self, LoadError> {
        spec.validate()?;
        let mix = spec.effective_mix();
        let zipf = match &spec.keys {
            Some(keys) => Some(Arc::new(Zipf::new(keys.count, keys.exponent).map_err(
                |message| LoadError::Invalid {
                    option: "zipf-keys",
                    message,
                },
            )?)),
            None => None,
        };
        Ok(LoadGenerator {
            spec,
            mix,
            zipf,
            progress: Arc::new(Progress::default()),
        })
    }

    /// Live counters of the run, shared with [`run`](Self::run).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The checked spec.
    pub fn spec(&self) -> &LoadSpec {
        &self.spec
    }

    /// Sends the load on the current tokio runtime and returns the report once every
    /// request sent has finished (or timed out).
    pub async fn run(self) -> LoadReport {
        self.run_until(Interrupt::new()).await
    }

    /// [`run`](Self::run), stopped early by `interrupt` (an operator's Ctrl-C).
    ///
    /// After [`Interrupt::stop`] no further request is sent and the ones outstanding are
    /// waited for at most [`LoadSpec::effective_stop_grace`] (2 s by default); after
    /// [`Interrupt::abandon`], or once the grace is over, the ones still outstanding are
    /// abandoned: counted as `interrupted` errors and recorded in the latency histograms
    /// at their age then, a lower bound like a timeout (see the module documentation). The
    /// report covers what was sent, over the time it took, with `interrupted` set.
    pub async fn run_until(self, interrupt: Interrupt) -> LoadReport {
        let LoadGenerator {
            spec,
            mix,
            zipf,
            progress,
        } = self;
        let targets: Vec<Uri> = mix
            .entries()
            .iter()
            .map(|entry| join(&spec.url, &entry.path))
            .collect();
        let recorder = Arc::new(Mutex::new(Recorder::new(mix.entries().len())));
        let client = client();
        let key_header = spec.keys.as_ref().map(|k| k.header.clone());
        let tracker = TaskTracker::new();
        // Cancelled when the requests still outstanding are to be given up on.
        let give_up = CancellationToken::new();
        let mut schedule = Schedule::new(spec.rate, spec.duration, &mix, zipf, spec.seed);
        let mut max_lag = Duration::ZERO;
        let start = Instant::now();

        let mut sent_for = None;
        while let Some(arrival) = schedule.next_arrival() {
            let due = start + arrival.at;
            if !interrupt.is_stopped() && due > Instant::now() {
                tokio::select! {
                    () = interrupt.stopped() => {}
                    () = tokio::time::sleep_until(due) => {}
                }
            }
            if interrupt.is_stopped() {
                sent_for = Some(start.elapsed().min(spec.duration));
                break;
            }
            max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
            if progress.in_flight() >= spec.max_in_flight as u64 {
                progress.dropped.fetch_add(1, Ordering::Relaxed);
                recorder.lock().dropped(arrival.class);
                continue;
            }
            // Only this loop increments, so the check above cannot be raced past the cap.
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
            progress.sent.fetch_add(1, Ordering::Relaxed);
            recorder.lock().sent(arrival.class);
            let request = build_request(&targets[arrival.class], key_header.as_ref(), arrival.key);
            let client = client.clone();
            let recorder = recorder.clone();
            let progress = progress.clone();
            let give_up = give_up.clone();
            let timeout = spec.timeout;
            tracker.spawn(async move {
                // The deadline and the latency both start at the scheduled time.
                let outcome = tokio::select! {
                    result = tokio::time::timeout_at(due + timeout, exchange(&client, request)) => {
                        result.unwrap_or(Outcome::TimedOut)
                    }
                    () = give_up.cancelled() => Outcome::Interrupted,
                };
                let latency = Instant::now().saturating_duration_since(due);
                if !matches!(outcome, Outcome::Response(status) if (200..300).contains(&status)) {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
                recorder.lock().record(arrival.class, &outcome, latency);
                progress.completed.fetch_add(1, Ordering::Relaxed);
                progress.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        tracker.close();
        // Every request ends by its timeout; a stop (during the schedule or after it)
        // shortens the wait to the grace, an abandon ends it at once.
        let mut stopped_at = sent_for;
        tokio::select! {
            () = tracker.wait() => {}
            () = interrupt.stopped() => {
                stopped_at.get_or_insert_with(|| start.elapsed());
                tokio::select! {
                    () = tracker.wait() => {}
                    () = tokio::time::sleep(spec.effective_stop_grace()) => {}
                    () = interrupt.abandoned() => {}
                }
            }
        }
        give_up.cancel();
        tracker.wait().await;
        let elapsed = start.elapsed();
        let recorder = std::mem::replace(&mut *recorder.lock(), Recorder::new(0));
        recorder.into_report(
            &spec,
            &mix,
            Timing {
                elapsed,
                max_lag,
                sent_for,
                stopped_at,
            },
        )
    }
}

/// An operator's request to end a run early, shared between whoever watches for it (a
/// Ctrl-C handler) and [`LoadGenerator::run_until`]. Clones share the state.
///
/// It escalates in two steps, as command-line tools do for a first and a second Ctrl-C:
/// [`stop`](Self::stop) ends sending and lets the outstanding requests finish within the
/// stop grace; [`abandon`](Self::abandon) gives up on them at once.
#[derive(Clone, Debug, Default)]
pub struct Interrupt {
    stop: CancellationToken,
    abandon: CancellationToken,
}

impl Interrupt {
    /// Not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends no further request; the outstanding ones get [`LoadSpec::stop_grace`].
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops and gives up on the outstanding requests now.
    pub fn abandon(&self) {
        self.stop.cancel();
        self.abandon.cancel();
    }

    /// [`stop`](Self::stop) or [`abandon`](Self::abandon) was called.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    async fn abandoned(&self) {
        self.abandon.cancelled().await;
    }
}

/// What became of one request.
pub(crate) enum Outcome {
    /// A complete response with this status.
    Response(u16),
    /// Given up at `timeout`, without a complete response.
    TimedOut,
    /// Outstanding when an operator's stop ended the run, and given up then.
    Interrupted,
    /// Failed without a complete response; the error kind (`connect`, `transport`,
    /// `body`).
    Failed(&'static str),
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A pooled HTTP/1.1 keep-alive client: an idle connection is reused, a new one opened
/// when none is idle, so concurrency is whatever the arrivals demand.
fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

fn build_request(
    uri: &Uri,
    key_header: Option<&HeaderName>,
    key: Option<u64>,
) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = uri.clone();
    if let (Some(header), Some(key)) = (key_header, key) {
        request
            .headers_mut()
            .insert(header.clone(), HeaderValue::from(key));
    }
    request
}

/// Sends `request` and reads the whole response body.
async fn exchange(client: &HttpClient, request: Request<Empty<Bytes>>) -> Outcome {
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(err) if err.is_connect() => return Outcome::Failed("connect"),
        Err(_) => return Outcome::Failed("transport"),
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return Outcome::Failed("body");
        }
    }
    Outcome::Response(status)
}

/// `base`'s scheme and authority with `path` (which may carry a query).
fn join(base: &Uri, path: &str) -> Uri {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(
        path.parse()
            .expect("mix paths are checked to be valid path-and-query when parsed"),
    );
    Uri::from_parts(parts).expect("scheme and authority come from a valid URI")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_specs_naming_the_option() {
        let base = || LoadSpec::new("http://127.0.0.1:1/".parse().expect("literal"));
        let cases: Vec<(LoadSpec, &str)> = vec![
            (
                LoadSpec::new("https://127.0.0.1/".parse().expect("literal")),
                "url",
            ),
            (LoadSpec::new("/relative".parse().expect("literal")), "url"),
            (
                LoadSpec {
                    rate: 0.0,
                    ..base()
                },
                "rate",
            ),
            (
                LoadSpec {
                    rate: f64::NAN,
                    ..base()
                },
                "rate",
            ),
            (
                LoadSpec {
                    duration: Duration::ZERO,
                    ..base()
                },
                "duration",
            ),
            (
                LoadSpec {
                    max_in_flight: 0,
                    ..base()
                },
                "max-in-flight",
            ),
            (
                LoadSpec {
                    timeout: Duration::ZERO,
                    ..base()
                },
                "timeout",
            ),
            (
                LoadSpec {
                    keys: Some(KeySpec {
                        count: 0,
                        exponent: 1.0,
                        header: HeaderName::from_static("x-k"),
                    }),
                    ..base()
                },
                "zipf-keys",
            ),
        ];
        for (spec, option) in cases {
            match LoadGenerator::new(spec) {
                Err(LoadError::Invalid { option: got, .. }) => assert_eq!(got, option),
                Ok(_) => panic!("{option}: accepted"),
            }
        }
    }

    #[test]
    fn mix_defaults_to_the_url_path_and_joins_paths_to_the_authority() {
        let spec = LoadSpec::new(
            "http://127.0.0.1:8080/v1/items?x=1"
                .parse()
                .expect("literal"),
        );
        let mix = spec.effective_mix();
        assert_eq!(mix.entries().len(), 1);
        assert_eq!(mix.entries()[0].path, "/v1/items?x=1");
        assert_eq!(
            join(&spec.url, "/long?delay_ms=5").to_string(),
            "http://127.0.0.1:8080/long?delay_ms=5"
        );
        let bare = LoadSpec::new("http://127.0.0.1:8080".parse().expect("literal"));
        assert_eq!(bare.effective_mix().entries()[0].path, "/");
    }
}
