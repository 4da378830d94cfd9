//! The load generator against real simulated backends on 127.0.0.1.
//!
//! Counts are checked with generous tolerances (arrivals are Poisson); nothing asserts on
//! elapsed time, and latency values only against bounds that hold by construction (a
//! request given up at the timeout took at least the timeout).

use std::time::Duration;

use fulcrum_sim::loadgen::{Interrupt, KeySpec, LoadGenerator, LoadReport, LoadSpec};
use fulcrum_sim::{BackendArgs, BackendHandle, CACHE_KEY_HEADER, start_backend};

async fn start(configure: impl FnOnce(&mut BackendArgs)) -> BackendHandle {
    let mut args = BackendArgs {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        ..BackendArgs::default()
    };
    configure(&mut args);
    start_backend(args).await.expect("backend starts")
}

fn spec(backend: &BackendHandle, rate: f64, seconds: f64) -> LoadSpec {
    let mut spec = LoadSpec::new(backend.url().parse().expect("backend URL"));
    spec.rate = rate;
    spec.duration = Duration::from_secs_f64(seconds);
    spec
}

async fn run(spec: LoadSpec) -> LoadReport {
    LoadGenerator::new(spec).expect("valid spec").run().await
}

/// `n` is within `tolerance` (a fraction) of `expected`.
fn near(n: u64, expected: f64, tolerance: f64) -> bool {
    (n as f64 - expected).abs() <= expected * tolerance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_rate_over_the_mix_and_counts_every_response() {
    let backend = start(|args| args.latency = "fixed:2ms".parse().expect("literal")).await;
    let mut spec = spec(&backend, 400.0, 1.5);
    spec.mix = "/short:3,/long?delay_ms=20:1".parse().expect("literal mix");
    let report = run(spec).await;

    let all = &report.overall;
    assert!(near(all.requests, 600.0, 0.3), "{} requests", all.requests);
    assert_eq!(all.ok, all.requests, "{report}");
    assert_eq!((all.errors, all.dropped), (0, 0));
    assert_eq!(all.latency_ms.count, all.requests);
    assert_eq!(backend.stats().requests, all.requests);
    assert_eq!(report.endpoints.len(), 2);
    let (short, long) = (&report.endpoints[0], &report.endpoints[1]);
    assert_eq!(
        (short.path.as_str(), long.path.as_str()),
        ("/short", "/long?delay_ms=20")
    );
    assert_eq!(short.requests + long.requests, all.requests);
    assert!(
        near(long.requests, all.requests as f64 / 4.0, 0.4),
        "{} of {} to /long",
        long.requests,
        all.requests
    );
    assert!(
        long.latency_ms.p50 >= 20.0,
        "the delay is part of the latency"
    );
    assert!(all.latency_ms.p50 <= all.latency_ms.p99 && all.latency_ms.p99 <= all.latency_ms.max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_failures_by_status_and_transport_errors_by_kind() {
    let failing = start(|args| args.fail_rate = 1.0).await;
    let report = run(spec(&failing, 200.0, 0.5)).await;
    assert!(report.overall.requests > 0);
    assert_eq!(report.overall.ok, 0);
    assert_eq!(report.overall.errors, report.overall.requests);
    assert_eq!(
        report.overall.error_kinds["status_503"],
        report.overall.requests
    );

    // Nobody listens on a port just released.
    let gone = start(|_| {}).await;
    let spec = spec(&gone, 100.0, 0.3);
    gone.shutdown().await;
    let report = run(spec).await;
    assert_eq!(report.overall.errors, report.overall.requests);
    assert_eq!(
        report.overall.error_kinds.get("connect"),
        Some(&report.overall.requests)
    );
    assert_eq!(
        report.overall.failed_without_response,
        report.overall.requests
    );
    assert_eq!(
        report.overall.latency_ms.count, 0,
        "a request refused has no latency"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_arrivals_beyond_the_in_flight_cap_and_times_out_slow_requests() {
    let slow = start(|args| args.latency = "fixed:2s".parse().expect("literal")).await;
    let mut spec = spec(&slow, 200.0, 0.5);
    spec.max_in_flight = 5;
    spec.timeout = Duration::from_millis(300);
    let report = run(spec).await;
    let all = &report.overall;
    assert!(all.dropped > 0, "{report}");
    assert!(all.requests >= 5);
    assert_eq!(
        all.error_kinds.get("timeout"),
        Some(&all.requests),
        "{report}"
    );
    assert_eq!(all.timed_out, all.requests);
    // Censored at the timeout, not left out: every one took at least 300 ms.
    assert_eq!(all.latency_ms.count, all.requests, "{report}");
    assert!(all.latency_ms.p50 >= 300.0, "{report}");
    assert!(all.latency_ms.max >= 300.0, "{report}");
    assert_eq!(report.endpoints[0].latency_ms, all.latency_ms);
}

/// A server that never answers in time: a stop leaves the requests in flight their grace
/// (an hour here), an abandon gives up on them at once. Without the abandon the run would
/// last an hour; the deadline only guards against that hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_gives_up_on_the_requests_in_flight_and_counts_them_interrupted() {
    let stalled = start(|args| args.latency = "fixed:3600s".parse().expect("literal")).await;
    let mut spec = spec(&stalled, 100.0, 3600.0);
    spec.timeout = Duration::from_secs(7200);
    spec.stop_grace = Duration::from_secs(3600);
    let generator = LoadGenerator::new(spec).expect("valid spec");
    let progress = generator.progress();
    let interrupt = Interrupt::new();
    let run = tokio::spawn(generator.run_until(interrupt.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while progress.in_flight() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "requests are sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    interrupt.stop();
    // Sending stops: `sent` no longer moves once the loop saw the stop.
    let mut sent = progress.sent();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = progress.sent();
        if now == sent {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "sending stops");
        sent = now;
    }
    assert!(!run.is_finished(), "the grace (an hour) is not over");
    interrupt.abandon();
    let report = tokio::time::timeout_at(deadline, run)
        .await
        .expect("the abandon ends the run")
        .expect("the run does not panic");

    let all = &report.overall;
    assert!(report.interrupted, "{report}");
    assert!(report.sent_secs < 3600.0, "{report}");
    assert!(all.requests >= 5, "{report}");
    assert_eq!(all.ok, 0, "{report}");
    assert_eq!(all.interrupted, all.requests, "{report}");
    assert_eq!(all.error_kinds.get("interrupted"), Some(&all.requests));
    assert_eq!(all.latency_ms.count, all.requests, "censored, not left out");
    assert_eq!(progress.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipf_keys_reach_the_backend_cache() {
    let backend = start(|args| {
        args.cache_size = 1000;
        args.cache_miss_ms = 1;
    })
    .await;
    let mut spec = spec(&backend, 500.0, 1.0);
    spec.keys = Some(KeySpec {
        count: 50,
        exponent: 1.0,
        header: CACHE_KEY_HEADER.parse().expect("literal header"),
    });
    let report = run(spec).await;
    let stats = backend.stats();
    assert_eq!(
        stats.cache_hits + stats.cache_misses,
        report.overall.requests
    );
    assert!(
        stats.cache_misses <= 50,
        "at most one miss per key: {stats:?}"
    );
    assert!(stats.cache_hits > stats.cache_misses, "{stats:?}");
}
