//! `fulcrum bench`: the open-loop load generator on the command line, and the scenarios
//! that compare strategies on simulated backends in one process.
//!
//! With `--url` it drives [`fulcrum_sim::loadgen`] against any HTTP server: Poisson
//! arrivals at `--rate`, latency from each request's scheduled send time (so no
//! coordinated omission), HDR percentiles per endpoint of the `--mix`. With `--scenario` it
//! starts simulated backends and an in-process node per strategy instead, runs a fixed,
//! documented load against each, and prints one comparison table (see [`scenario`]).

mod scenario;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_sim::loadgen::{
    DEFAULT_KEY_HEADER, Interrupt, KeySpec, LoadGenerator, LoadReport, LoadSpec, MAX_RATE, Mix,
    Progress,
};
use http::Uri;
use http::header::HeaderName;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Options of `fulcrum bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  fulcrum bench --url http://127.0.0.1:8080/ --rate 2000 --duration 30s
  fulcrum bench --url http://127.0.0.1:8080 --mix /short:0.8,/long:0.2 --json
  fulcrum bench --url http://127.0.0.1:8080/item --zipf-keys 10000 --zipf-s 1.1
  fulcrum bench --scenario list
  fulcrum bench --scenario straggler --quick

Latency runs from each request's scheduled send time to the last byte of its response,
so a server that stalls is charged for the requests that waited (no coordinated
omission). A request that times out is counted in the percentiles at --timeout, a lower
bound of its latency; one that fails without a response (connection refused, reset) is
left out; the report says how many requests the percentiles cover.

Ctrl-C stops sending and waits for the requests in flight at most 2 s (or --timeout if
shorter); a second Ctrl-C stops waiting. Requests still outstanding are reported as
interrupted, counted in the percentiles at their age then (a lower bound).

Exit codes: 0 done (request errors are reported, not fatal), 1 a runtime failure,
2 invalid options, 130 interrupted by Ctrl-C (the report is printed).")]
pub struct BenchArgs {
    /// Target: http://HOST:PORT[/PATH]. The path is the endpoint unless --mix is given.
    #[arg(long, value_name = "URL", value_parser = parse_url,
          required_unless_present = "scenario", help_heading = "Load")]
    url: Option<Uri>,

    /// Mean arrival rate, requests per second (Poisson arrivals).
    #[arg(long, value_name = "REQ_PER_SEC", default_value_t = fulcrum_sim::loadgen::DEFAULT_RATE,
          value_parser = parse_rate, allow_negative_numbers = true, help_heading = "Load")]
    rate: f64,

    /// How long requests are sent (`10s`, `1m 30s`); outstanding ones are then waited for.
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = parse_duration, help_heading = "Load")]
    duration: Duration,

    /// Endpoints and their weights: `/short:0.8,/long:0.2` (PATH[:WEIGHT],…; weight 1 when
    /// left out; a path may carry a query). Reported one row per endpoint.
    #[arg(long, value_name = "MIX", value_parser = parse_mix, help_heading = "Load")]
    mix: Option<Mix>,

    /// Send a key per request drawn from a Zipf distribution over N keys (ranks 1..=N in
    /// decimal, 1 the most popular), in --key-header.
    #[arg(long, value_name = "N", help_heading = "Keys")]
    zipf_keys: Option<u64>,

    /// Zipf exponent s: key k is drawn with probability ∝ 1/k^s (0 = uniform). Needs
    /// --zipf-keys.
    #[arg(long, value_name = "S", default_value_t = 1.0, value_parser = parse_zipf_s,
          allow_negative_numbers = true, requires = "zipf_keys", help_heading = "Keys")]
    zipf_s: f64,

    /// Header carrying the key (the simulator's cache reads x-cache-key). Needs
    /// --zipf-keys.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_KEY_HEADER,
          value_parser = parse_header_name, requires = "zipf_keys", help_heading = "Keys")]
    key_header: HeaderName,

    /// Requests outstanding at most; an arrival beyond it is not sent and is counted as
    /// dropped (never delayed).
    #[arg(long, value_name = "N", default_value_t = fulcrum_sim::loadgen::DEFAULT_MAX_IN_FLIGHT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000),
          help_heading = "Limits")]
    max_in_flight: usize,

    /// Longest a request may take, from its scheduled send time to the end of its body;
    /// a request given up then counts in the percentiles at this latency (a lower bound).
    #[arg(long, value_name = "DURATION", default_value = "30s",
          value_parser = parse_duration, help_heading = "Limits")]
    timeout: Duration,

    /// Seed of the arrival times, endpoint choices and keys (same seed, same sequence).
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Output")]
    seed: u64,

    /// Print one JSON object on stdout instead of the table (no progress bar).
    #[arg(long, help_heading = "Output")]
    json: bool,

    /// Run a built-in comparison instead of --url: `duration-class`, `straggler`,
    /// `affinity`, or `list` to describe them.
    #[arg(long, value_name = "NAME", value_enum,
          conflicts_with_all = ["url", "rate", "duration", "mix", "zipf_keys", "max_in_flight"],
          help_heading = "Scenarios")]
    scenario: Option<scenario::ScenarioName>,

    /// Shorter runs (3 s per load and strategy instead of the scenario's own length), for
    /// a smoke test.
    //
    // `conflicts_with = "url"` here and below says "only with --scenario": without a
    // scenario the URL is required.
    #[arg(long, conflicts_with = "url", help_heading = "Scenarios")]
    quick: bool,

    /// Strategies to compare, comma-separated [default: the scenario's own list].
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        conflicts_with = "url",
        help_heading = "Scenarios"
    )]
    strategies: Option<Vec<String>>,
}

/// `fulcrum bench`.
pub fn run(args: BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fulcrum bench: cannot start a runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let show_progress = !args.json && std::io::stderr().is_terminal();
    if let Some(name) = args.scenario {
        let options = scenario::Options {
            quick: args.quick,
            seed: args.seed,
            timeout: args.timeout,
            json: args.json,
            show_progress,
            strategies: args.strategies,
        };
        return runtime.block_on(scenario::run(name, options));
    }
    let spec = match load_spec(&args) {
        Ok(spec) => spec,
        Err(message) => {
            eprintln!("fulcrum bench: {message}");
            return ExitCode::from(2);
        }
    };
    let generator = match LoadGenerator::new(spec) {
        Ok(generator) => generator,
        Err(error) => {
            eprintln!("fulcrum bench: {error}");
            return ExitCode::from(2);
        }
    };
    let grace = generator.spec().effective_stop_grace();
    let report = runtime.block_on(async {
        let interrupt = Interrupt::new();
        let watcher = match watch_ctrl_c(interrupt.clone(), grace) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                eprintln!("fulcrum bench: cannot watch for Ctrl-C ({error}); it will end the run without a report");
                None
            }
        };
        let report = drive(generator, "", show_progress, interrupt).await;
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        report
    });
    match print_report(&report, args.json) {
        // 128 + SIGINT, as a shell reports a command ended by Ctrl-C.
        Ok(()) if report.interrupted => ExitCode::from(EXIT_INTERRUPTED),
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// Exit code of a run ended by Ctrl-C, after its report: 128 + SIGINT (2).
const EXIT_INTERRUPTED: u8 = 130;

/// Escalates `interrupt` on Ctrl-C: the first stops sending and leaves the requests in
/// flight `grace` to finish, the second abandons them. Installing the handler replaces
/// the default action (ending the process) for the rest of the run.
fn watch_ctrl_c(
    interrupt: Interrupt,
    grace: Duration,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // One stream for both signals, so a second Ctrl-C arriving early is not lost.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        if sigint.recv().await.is_none() {
            return;
        }
        eprintln!(
            "fulcrum bench: interrupted; no more requests are sent; waiting at most {} for the ones in flight (Ctrl-C again to stop waiting)",
            humantime::format_duration(grace)
        );
        interrupt.stop();
        if sigint.recv().await.is_some() {
            eprintln!("fulcrum bench: interrupted again; abandoning the requests in flight");
            interrupt.abandon();
        }
    }))
}

fn load_spec(args: &BenchArgs) -> Result<LoadSpec, String> {
    let url = args
        .url
        .clone()
        .ok_or("--url is required without --scenario")?;
    let mut spec = LoadSpec::new(url);
    spec.rate = args.rate;
    spec.duration = args.duration;
    spec.mix = args.mix.clone().unwrap_or_default();
    spec.keys = args.zipf_keys.map(|count| KeySpec {
        count,
        exponent: args.zipf_s,
        header: args.key_header.clone(),
    });
    spec.max_in_flight = args.max_in_flight;
    spec.timeout = args.timeout;
    spec.seed = args.seed;
    Ok(spec)
}

/// Writes `report` on stdout; on failure says why on stderr and returns exit code 1.
fn print_report(report: &LoadReport, json: bool) -> Result<(), ExitCode> {
    let mut out = std::io::stdout().lock();
    let written = if json {
        serde_json::to_string(report)
            .map_err(std::io::Error::other)
            .and_then(|text| writeln!(out, "{text}"))
    } else {
        write!(out, "{report}")
    };
    written.and_then(|()| out.flush()).map_err(|error| {
        eprintln!("fulcrum bench: cannot write the report: {error}");
        ExitCode::from(1)
    })
}

/// Runs `generator` to the end or until `interrupt`, with a progress bar on stderr when
/// `show_progress`; `label` names the run in the bar.
pub(crate) async fn drive(
    generator: LoadGenerator,
    label: &str,
    show_progress: bool,
    interrupt: Interrupt,
) -> LoadReport {
    if !show_progress {
        return generator.run_until(interrupt).await;
    }
    let duration = generator.spec().duration;
    let bar = ProgressBar::with_draw_target(
        Some(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)),
        ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:20}] {elapsed:>3}/{duration_s} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "duration_s",
                move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}s", duration.as_secs_f64());
                },
            )
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    let ticker = tokio::spawn(tick(bar.clone(), generator.progress()));
    let report = generator.run_until(interrupt).await;
    ticker.abort();
    bar.finish_and_clear();
    report
}

/// Updates `bar` from the run's counters ten times a second until aborted.
async fn tick(bar: ProgressBar, progress: Arc<Progress>) {
    let start = tokio::time::Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        bar.set_position(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        bar.set_message(format!(
            "sent {} done {} err {} drop {} open {}",
            progress.sent(),
            progress.completed(),
            progress.errors(),
            progress.dropped(),
            progress.in_flight()
        ));
    }
}

fn parse_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "`{text}`: expected http://HOST:PORT[/PATH] (https is not supported)"
        ));
    }
    Ok(uri)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if rate.is_finite() && rate > 0.0 && rate <= MAX_RATE {
        Ok(rate)
    } else {
        Err(format!(
            "{rate} is not a rate above 0 and at most {MAX_RATE} requests per second"
        ))
    }
}

/// A humantime duration above zero, as durations are written elsewhere in Fulcrum.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 10s or 1m 30s: {e}"))?;
    if duration.is_zero() {
        return Err(format!("`{text}`: must be above zero"));
    }
    Ok(duration)
}

fn parse_zipf_s(text: &str) -> Result<f64, String> {
    let s: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    fulcrum_sim::loadgen::Zipf::check(1, s)?;
    Ok(s)
}

fn parse_mix(text: &str) -> Result<Mix, String> {
    text.parse()
}

fn parse_header_name(text: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(text.as_bytes())
        .map_err(|_| format!("`{text}` is not a valid HTTP header name"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .map(|cli| cli.args)
    }

    #[test]
    fn defaults_follow_the_documentation() {
        let args = parse(&["--url", "http://127.0.0.1:8080/x"]).expect("valid");
        let spec = load_spec(&args).expect("spec");
        assert_eq!(spec.rate, 1000.0);
        assert_eq!(spec.duration, Duration::from_secs(10));
        assert_eq!(spec.timeout, Duration::from_secs(30));
        assert_eq!(spec.max_in_flight, 10_000);
        assert_eq!(spec.seed, 1);
        assert!(spec.keys.is_none() && spec.mix.entries().is_empty());
    }

    #[test]
    fn parses_every_load_option() {
        let args = parse(&[
            "--url",
            "http://127.0.0.1:8080",
            "--rate",
            "250.5",
            "--duration",
            "1m 30s",
            "--mix",
            "/short:0.8,/long:0.2",
            "--zipf-keys",
            "1000",
            "--zipf-s",
            "0.9",
            "--key-header",
            "x-user",
            "--max-in-flight",
            "50",
            "--timeout",
            "500ms",
            "--seed",
            "7",
            "--json",
        ])
        .expect("valid");
        assert!(args.json);
        let spec = load_spec(&args).expect("spec");
        assert_eq!(spec.rate, 250.5);
        assert_eq!(spec.duration, Duration::from_secs(90));
        assert_eq!(spec.mix.entries().len(), 2);
        let keys = spec.keys.expect("keys");
        assert_eq!(
            (keys.count, keys.exponent, keys.header.as_str()),
            (1000, 0.9, "x-user")
        );
        assert_eq!((spec.max_in_flight, spec.seed), (50, 7));
        assert_eq!(spec.timeout, Duration::from_millis(500));
    }

    #[test]
    fn rejects_bad_values_naming_the_option() {
        for (argv, needle) in [
            (&["--rate", "10"][..], "--url"),
            (&["--url", "https://example.com/"][..], "--url"),
            (&["--url", "localhost:80"][..], "--url"),
            (&["--url", "http://h:1", "--rate", "0"][..], "--rate"),
            (&["--url", "http://h:1", "--rate", "fast"][..], "--rate"),
            (&["--url", "http://h:1", "--rate", "-3"][..], "--rate"),
            (&["--url", "http://h:1", "--zipf-s", "-1"][..], "--zipf-s"),
            (
                &["--url", "http://h:1", "--zipf-s", "1.2"][..],
                "--zipf-keys",
            ),
            (
                &["--url", "http://h:1", "--key-header", "x-user"][..],
                "--zipf-keys",
            ),
            (
                &["--url", "http://h:1", "--duration", "10"][..],
                "--duration",
            ),
            (
                &["--url", "http://h:1", "--duration", "0s"][..],
                "--duration",
            ),
            (&["--url", "http://h:1", "--mix", "short:1"][..], "--mix"),
            (
                &["--url", "http://h:1", "--key-header", "bad header"][..],
                "--key-header",
            ),
            (
                &["--url", "http://h:1", "--max-in-flight", "0"][..],
                "--max-in-flight",
            ),
            (
                &["--url", "http://h:1", "--timeout", "soon"][..],
                "--timeout",
            ),
            (
                &["--url", "http://h:1", "--scenario", "straggler"][..],
                "--scenario",
            ),
            (&["--scenario", "nope"][..], "--scenario"),
            (&["--url", "http://h:1", "--quick"][..], "--quick"),
            (
                &["--url", "http://h:1", "--strategies", "p2c"][..],
                "--strategies",
            ),
        ] {
            let err = parse(argv).expect_err(needle).to_string();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }

    #[test]
    fn scenario_needs_no_url() {
        let args = parse(&[
            "--scenario",
            "straggler",
            "--quick",
            "--strategies",
            "round_robin,p2c",
        ])
        .expect("valid");
        assert!(args.quick);
        assert_eq!(
            args.strategies.as_deref(),
            Some(&["round_robin".to_owned(), "p2c".to_owned()][..])
        );
    }
}
