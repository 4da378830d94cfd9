//! Command-line options of `fulcrum backend`, embedded by the CLI with `#[command(flatten)]`.

use std::net::SocketAddr;

use crate::latency::LatencySpec;
use crate::settings::{
    DEFAULT_CACHE_MISS_MS, MAX_CACHE_SIZE, MAX_CAPACITY, Settings, check_cache_miss_ms,
    check_fail_rate, check_slow_factor,
};

/// Options of a simulated backend (`fulcrum backend`).
///
/// Every option can be changed while running through `/control` except `--listen` and
/// `--name`. [`Default`] gives the same values as an empty command line.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BackendArgs {
    /// Address to listen on, IP:PORT. Port 0 picks a free port; the line printed once
    /// listening tells which.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Name echoed in every response (`x-backend` header and JSON bodies) [default: the
    /// address actually listened on].
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Latency of each work request: `fixed:20ms`, `uniform:10ms..50ms`, or
    /// `lognormal:MEDIAN,SIGMA` (e.g. `lognormal:20ms,0.5`: median 20 ms, SIGMA the standard
    /// deviation of the underlying normal). Units: us, ms, s; at most 1h.
    #[arg(long, value_name = "SPEC", default_value = "fixed:0ms")]
    pub latency: LatencySpec,

    /// Work requests served at once; more wait in a first-come, first-served queue.
    /// 0 = unlimited.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_CAPACITY)))]
    pub capacity: u32,

    /// Share of work requests answered 503 (after their latency), from 0 to 1.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = parse_fail_rate)]
    pub fail_rate: f64,

    /// Multiplies every work latency (2 = twice as slow), from 0 to 1000.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0, value_parser = parse_slow_factor)]
    pub slow_factor: f64,

    /// Keys held by a simulated LRU cache; 0 = no cache. A work request carrying a key
    /// (`x-cache-key` header, else `?key=`) that is not cached pays --cache-miss-ms extra
    /// and is then cached. `/stats` counts `cache_hits` and `cache_misses`.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_CACHE_SIZE)))]
    pub cache_size: u32,

    /// Milliseconds a cache miss adds to the work latency (before the slow factor).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_CACHE_MISS_MS,
          value_parser = parse_cache_miss_ms)]
    pub cache_miss_ms: u64,
}

impl Default for BackendArgs {
    fn default() -> Self {
        let settings = Settings::default();
        BackendArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            name: None,
            latency: settings.latency,
            capacity: settings.capacity,
            fail_rate: settings.fail_rate,
            slow_factor: settings.slow_factor,
            cache_size: settings.cache_size,
            cache_miss_ms: settings.cache_miss_ms,
        }
    }
}

impl BackendArgs {
    /// The run-time settings these options start from (healthy).
    pub(crate) fn settings(&self) -> Settings {
        Settings {
            latency: self.latency,
            fail_rate: self.fail_rate,
            slow_factor: self.slow_factor,
            capacity: self.capacity,
            healthy: true,
            cache_size: self.cache_size,
            cache_miss_ms: self.cache_miss_ms,
        }
    }
}

/// Longest `--name`: it goes into a header on every response.
const MAX_NAME_LEN: usize = 256;

/// Accepts a name that can be sent as a header value: 1 to 256 visible ASCII characters or
/// spaces, not starting or ending with a space.
pub(crate) fn parse_name(name: &str) -> Result<String, String> {
    let printable = name.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !printable || name.trim() != name {
        return Err(format!(
            "`{name}`: a name is 1 to {MAX_NAME_LEN} visible ASCII characters (it is sent \
             in the x-backend header)"
        ));
    }
    Ok(name.to_owned())
}

fn parse_fail_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    check_fail_rate(rate)
}

fn parse_cache_miss_ms(text: &str) -> Result<u64, String> {
    let ms: u64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of milliseconds"))?;
    check_cache_miss_ms(ms)
}

fn parse_slow_factor(text: &str) -> Result<f64, String> {
    let factor: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    check_slow_factor(factor)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: BackendArgs,
    }

    fn parse(argv: &[&str]) -> Result<BackendArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("backend").chain(argv.iter().copied()))
            .map(|cli| cli.args)
    }

    #[test]
    fn empty_command_line_is_the_default() {
        assert_eq!(parse(&[]).expect("defaults parse"), BackendArgs::default());
    }

    #[test]
    fn parses_every_option() {
        let args = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--name",
            "b1",
            "--latency",
            "uniform:10ms..50ms",
            "--capacity",
            "8",
            "--fail-rate",
            "0.1",
            "--slow-factor",
            "2.5",
            "--cache-size",
            "500",
            "--cache-miss-ms",
            "15",
        ])
        .expect("valid");
        assert_eq!(
            args,
            BackendArgs {
                listen: "127.0.0.1:0".parse().expect("addr"),
                name: Some("b1".into()),
                latency: LatencySpec::Uniform {
                    low: Duration::from_millis(10),
                    high: Duration::from_millis(50)
                },
                capacity: 8,
                fail_rate: 0.1,
                slow_factor: 2.5,
                cache_size: 500,
                cache_miss_ms: 15,
            }
        );
    }

    #[test]
    fn rejects_bad_values_naming_the_option() {
        for (argv, needle) in [
            (&["--fail-rate", "1.5"][..], "--fail-rate"),
            (&["--slow-factor=-2"][..], "--slow-factor"),
            (&["--latency", "lognormal:20ms"][..], "--latency"),
            (&["--capacity", "2000000"][..], "--capacity"),
            (&["--cache-size", "2000000"][..], "--cache-size"),
            (&["--cache-miss-ms", "soon"][..], "--cache-miss-ms"),
            (&["--name", "bad\nname"][..], "--name"),
            (&["--name", ""][..], "--name"),
            (&["--listen", "localhost"][..], "--listen"),
        ] {
            let err = parse(argv).expect_err(needle).to_string();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }
}
