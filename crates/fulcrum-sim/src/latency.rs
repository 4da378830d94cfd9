//! Latency distributions: how long the simulator's work endpoint "serves" a request.
//!
//! A [`LatencySpec`] is parsed from the `--latency` option or `/control?latency=`, shown back
//! in `/stats` in the same syntax, and sampled once per work request after the request has
//! left the capacity queue. Sampling is a pure function of the spec and a caller-supplied
//! RNG, so unit tests fix the seed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The longest latency the simulator ever sleeps: one hour. Samples (and samples scaled by
/// a slow factor) above it are clamped to it, so a heavy lognormal tail or a large factor
/// can never overflow a [`Duration`].
pub const MAX_LATENCY: Duration = Duration::from_secs(3600);

/// The largest σ accepted for a lognormal distribution. At σ = 10 one sample in a thousand
/// is already ~10¹³ times the median; anything larger is a typo.
pub const MAX_LOGNORMAL_SIGMA: f64 = 10.0;

/// A latency distribution for the work endpoint.
///
/// Text syntax (accepted by [`FromStr`], produced by [`fmt::Display`]):
/// - `fixed:20ms` (or just `20ms`): always the same latency;
/// - `uniform:10ms..50ms`: uniform between the two bounds, both inclusive;
/// - `lognormal:20ms,0.5`: lognormal with the given median and σ, the standard deviation
///   of the underlying normal distribution (so `ln(latency)` ~ N(ln(median), σ²)).
///
/// Durations are a non-negative number and a unit: `us`, `ms`, `s` (`1.5ms`, `250us`,
/// `2s`); a bare `0` is also accepted. Every duration must be at most [`MAX_LATENCY`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LatencySpec {
    /// Always this latency.
    Fixed(Duration),
    /// Uniformly distributed between `low` and `high` (inclusive, `low <= high`).
    Uniform {
        /// Smallest latency.
        low: Duration,
        /// Largest latency.
        high: Duration,
    },
    /// Lognormally distributed: the median latency and σ of the underlying normal.
    LogNormal {
        /// Median latency (the exponential of the underlying normal's mean).
        median: Duration,
        /// Standard deviation of the underlying normal, `0..=MAX_LOGNORMAL_SIGMA`.
        sigma: f64,
    },
}

impl Default for LatencySpec {
    /// `fixed:0ms`: answer at once.
    fn default() -> Self {
        LatencySpec::Fixed(Duration::ZERO)
    }
}

impl LatencySpec {
    /// Draws one latency from the distribution using `rng`; never above [`MAX_LATENCY`].
    ///
    /// The lognormal draw uses the Box–Muller transform for the standard normal `z` and
    /// returns `median · e^(σ·z)`.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            LatencySpec::Fixed(latency) => latency,
            LatencySpec::Uniform { low, high } => {
                // Nanosecond resolution; `MAX_LATENCY` in nanoseconds fits a u64 easily.
                let low_ns = saturating_nanos(low);
                let high_ns = saturating_nanos(high).max(low_ns);
                Duration::from_nanos(rng.u64(low_ns..=high_ns))
            }
            LatencySpec::LogNormal { median, sigma } => {
                let z = standard_normal(rng);
                clamp_secs(median.as_secs_f64() * (sigma * z).exp())
            }
        }
    }

    /// Checks the invariants that [`FromStr`] enforces, for specs built in code.
    ///
    /// # Errors
    /// A message naming what is wrong: a duration above [`MAX_LATENCY`], `low > high`, or a
    /// σ that is negative, not finite or above [`MAX_LOGNORMAL_SIGMA`].
    pub fn validate(&self) -> Result<(), String> {
        let check = |what: &str, d: Duration| {
            if d > MAX_LATENCY {
                Err(format!(
                    "{what} {} is above the maximum of 1h",
                    FormatDuration(d)
                ))
            } else {
                Ok(())
            }
        };
        match *self {
            LatencySpec::Fixed(latency) => check("latency", latency),
            LatencySpec::Uniform { low, high } => {
                check("lower bound", low)?;
                check("upper bound", high)?;
                if low > high {
                    return Err(format!(
                        "lower bound {} is above upper bound {}",
                        FormatDuration(low),
                        FormatDuration(high)
                    ));
                }
                Ok(())
            }
            LatencySpec::LogNormal { median, sigma } => {
                check("median", median)?;
                if !sigma.is_finite() || !(0.0..=MAX_LOGNORMAL_SIGMA).contains(&sigma) {
                    return Err(format!(
                        "sigma {sigma} must be a number from 0 to {MAX_LOGNORMAL_SIGMA}"
                    ));
                }
                Ok(())
            }
        }
    }
}

impl serde::Serialize for LatencySpec {
    /// Serialises as the text syntax, e.g. `"uniform:10ms..50ms"`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for LatencySpec {
    /// Reads the text syntax; invalid specs are a deserialisation error with the reason.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Multiplies a latency by a slow factor, clamping to [`MAX_LATENCY`]; a factor that is
/// negative or not finite counts as 0 (callers validate factors; this only never panics).
pub fn scale(latency: Duration, factor: f64) -> Duration {
    clamp_secs(latency.as_secs_f64() * factor)
}

/// Seconds to a duration in `0..=MAX_LATENCY`; NaN and negatives become zero.
fn clamp_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).map_or(MAX_LATENCY, |d| d.min(MAX_LATENCY))
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One standard normal draw by the Box–Muller transform.
fn standard_normal(rng: &mut fastrand::Rng) -> f64 {
    // `f64()` is in [0, 1); `1 - f64()` is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl FromStr for LatencySpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let spec = match text.split_once(':') {
            None => LatencySpec::Fixed(parse_duration(text)?),
            Some(("fixed", rest)) => LatencySpec::Fixed(parse_duration(rest)?),
            Some(("uniform", rest)) => {
                let (low, high) = rest.split_once("..").ok_or_else(|| {
                    format!("`{text}`: expected `uniform:LOW..HIGH`, e.g. `uniform:10ms..50ms`")
                })?;
                LatencySpec::Uniform {
                    low: parse_duration(low)?,
                    high: parse_duration(high)?,
                }
            }
            Some(("lognormal", rest)) => {
                let (median, sigma) = rest.split_once(',').ok_or_else(|| {
                    format!(
                        "`{text}`: expected `lognormal:MEDIAN,SIGMA`, e.g. `lognormal:20ms,0.5`"
                    )
                })?;
                let sigma = sigma
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("`{sigma}` is not a number (lognormal sigma)"))?;
                LatencySpec::LogNormal {
                    median: parse_duration(median)?,
                    sigma,
                }
            }
            Some((kind, _)) => {
                return Err(format!(
                    "unknown latency distribution `{kind}`: use fixed:20ms, uniform:10ms..50ms \
                     or lognormal:20ms,0.5"
                ));
            }
        };
        spec.validate()
            .map_err(|message| format!("`{text}`: {message}"))?;
        Ok(spec)
    }
}

impl fmt::Display for LatencySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LatencySpec::Fixed(latency) => write!(f, "fixed:{}", FormatDuration(latency)),
            LatencySpec::Uniform { low, high } => write!(
                f,
                "uniform:{}..{}",
                FormatDuration(low),
                FormatDuration(high)
            ),
            LatencySpec::LogNormal { median, sigma } => {
                write!(f, "lognormal:{},{sigma}", FormatDuration(median))
            }
        }
    }
}

/// Parses `20ms`, `1.5s`, `250us`, or `0` into a duration of at most [`MAX_LATENCY`].
///
/// # Errors
/// A message quoting the text when it has no unit, an unknown unit, a negative or
/// non-numeric amount, or is above the maximum.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("a duration is missing: write e.g. `20ms`, `1.5s` or `250us`".to_owned());
    }
    if text.starts_with('-') {
        return Err(format!("`{text}` is negative"));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{text}` has no unit: write e.g. `20ms`, `1.5s` or `250us`"))?;
    let (amount, unit) = text.split_at(split);
    if amount.is_empty() {
        return Err(format!(
            "`{text}` is not a duration: write e.g. `20ms`, `1.5s` or `250us`"
        ));
    }
    let nanos_per_unit = match unit {
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}`; use `us`, `ms` or `s`"
            ));
        }
    };
    let amount: f64 = amount
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. `20ms`"))?;
    let nanos = (amount * nanos_per_unit).round();
    if !nanos.is_finite() || nanos > MAX_LATENCY.as_nanos() as f64 {
        return Err(format!("`{text}` is above the maximum of 1h"));
    }
    // In range [0, 3.6e12] after the check above, so the cast is exact enough and cannot wrap.
    Ok(Duration::from_nanos(nanos as u64))
}

/// Shows a duration in the largest unit that keeps it whole (`2s`, `20ms`, `1500us`);
/// the output parses back with [`parse_duration`].
struct FormatDuration(Duration);

impl fmt::Display for FormatDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            f.write_str("0ms")
        } else if nanos.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", nanos / 1_000_000_000)
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            write!(f, "{}us", nanos / 1_000)
        } else {
            // Sub-microsecond precision only arises from code-built specs; three decimals
            // of a microsecond is what `parse_duration` can read back.
            write!(f, "{:.3}us", nanos as f64 / 1_000.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_every_syntax() {
        assert_eq!("fixed:20ms".parse(), Ok(LatencySpec::Fixed(ms(20))));
        assert_eq!("20ms".parse(), Ok(LatencySpec::Fixed(ms(20))));
        assert_eq!("fixed:0".parse(), Ok(LatencySpec::Fixed(Duration::ZERO)));
        assert_eq!(
            "fixed:1.5s".parse(),
            Ok(LatencySpec::Fixed(Duration::from_millis(1500)))
        );
        assert_eq!(
            "fixed:250us".parse(),
            Ok(LatencySpec::Fixed(Duration::from_micros(250)))
        );
        assert_eq!(
            "uniform:10ms..50ms".parse(),
            Ok(LatencySpec::Uniform {
                low: ms(10),
                high: ms(50)
            })
        );
        assert_eq!(
            "lognormal:20ms,0.5".parse(),
            Ok(LatencySpec::LogNormal {
                median: ms(20),
                sigma: 0.5
            })
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (text, needle) in [
            ("fixed:20", "no unit"),
            ("fixed:20h", "unknown unit"),
            ("fixed:-5ms", "negative"),
            ("fixed:1.2.3ms", "not a duration"),
            ("fixed:2h3m", "unknown unit"),
            ("fixed:3601s", "maximum"),
            ("uniform:10ms", "uniform:LOW..HIGH"),
            ("uniform:50ms..10ms", "above upper bound"),
            ("lognormal:20ms", "lognormal:MEDIAN,SIGMA"),
            ("lognormal:20ms,x", "not a number"),
            ("lognormal:20ms,-1", "sigma"),
            ("lognormal:20ms,NaN", "sigma"),
            ("lognormal:20ms,11", "sigma"),
            ("gamma:1ms", "unknown latency distribution"),
            ("", "missing"),
            ("fixed:fast", "not a duration"),
        ] {
            let err = text.parse::<LatencySpec>().expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "fixed:0ms",
            "fixed:20ms",
            "fixed:2s",
            "fixed:1500us",
            "uniform:10ms..50ms",
            "lognormal:20ms,0.5",
        ] {
            let spec: LatencySpec = text.parse().expect(text);
            assert_eq!(spec.to_string(), text);
            assert_eq!(spec.to_string().parse::<LatencySpec>(), Ok(spec));
        }
        let odd = LatencySpec::Fixed(Duration::from_nanos(1_500));
        assert_eq!(odd.to_string().parse::<LatencySpec>(), Ok(odd));
    }

    #[test]
    fn fixed_always_returns_its_latency() {
        let mut rng = fastrand::Rng::with_seed(1);
        let spec = LatencySpec::Fixed(ms(20));
        assert!((0..100).all(|_| spec.sample(&mut rng) == ms(20)));
    }

    #[test]
    fn uniform_stays_in_bounds_and_covers_them() {
        let mut rng = fastrand::Rng::with_seed(7);
        let spec = LatencySpec::Uniform {
            low: ms(10),
            high: ms(50),
        };
        let samples: Vec<Duration> = (0..10_000).map(|_| spec.sample(&mut rng)).collect();
        assert!(samples.iter().all(|d| (ms(10)..=ms(50)).contains(d)));
        // Both ends of the range are reached (within 1 ms) and the mean is near the middle.
        assert!(samples.iter().any(|d| *d < ms(11)));
        assert!(samples.iter().any(|d| *d > ms(49)));
        let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / 10_000.0;
        assert!((mean - 0.030).abs() < 0.001, "mean {mean}");
        let degenerate = LatencySpec::Uniform {
            low: ms(5),
            high: ms(5),
        };
        assert_eq!(degenerate.sample(&mut rng), ms(5));
    }

    #[test]
    fn lognormal_median_and_spread_match_parameters() {
        let mut rng = fastrand::Rng::with_seed(42);
        let spec = LatencySpec::LogNormal {
            median: ms(20),
            sigma: 0.5,
        };
        let mut samples: Vec<f64> = (0..20_001)
            .map(|_| spec.sample(&mut rng).as_secs_f64())
            .collect();
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        assert!((median - 0.020).abs() < 0.020 * 0.03, "median {median}");
        // ln(samples) should have standard deviation σ.
        let logs: Vec<f64> = samples.iter().map(|s| s.ln()).collect();
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / logs.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.02, "sigma {}", var.sqrt());
        assert!(samples.iter().all(|s| *s > 0.0));
    }

    #[test]
    fn lognormal_with_zero_sigma_is_fixed() {
        let mut rng = fastrand::Rng::with_seed(3);
        let spec = LatencySpec::LogNormal {
            median: ms(20),
            sigma: 0.0,
        };
        assert!((0..100).all(|_| spec.sample(&mut rng) == ms(20)));
    }

    #[test]
    fn samples_and_scaling_are_clamped() {
        let mut rng = fastrand::Rng::with_seed(9);
        let heavy = LatencySpec::LogNormal {
            median: MAX_LATENCY,
            sigma: MAX_LOGNORMAL_SIGMA,
        };
        assert!((0..1_000).all(|_| heavy.sample(&mut rng) <= MAX_LATENCY));
        assert_eq!(scale(ms(10), 2.5), ms(25));
        assert_eq!(scale(MAX_LATENCY, 1e300), MAX_LATENCY);
        assert_eq!(scale(ms(10), f64::INFINITY), MAX_LATENCY);
        assert_eq!(scale(ms(10), f64::NAN), Duration::ZERO);
        assert_eq!(scale(ms(10), -1.0), Duration::ZERO);
    }
}
