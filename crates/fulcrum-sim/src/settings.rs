//! Run-time behaviour of a simulated backend and the parsing of `/control` changes to it.
//!
//! [`Settings`] starts from the command line and is replaced through `/control`; the work
//! endpoint reads it once per request. Parsing a change is pure (query text in, a validated
//! [`SettingsChange`] or a [`BadParameter`] out) so every rule is unit-tested here.

use serde::{Deserialize, Serialize};

use crate::latency::{LatencySpec, MAX_LATENCY};

/// The largest `--capacity` / `capacity=`: beyond this "unlimited" (0) is what is meant.
pub const MAX_CAPACITY: u32 = 1_000_000;

/// The largest `--slow-factor` / `slow_factor=`.
pub const MAX_SLOW_FACTOR: f64 = 1000.0;

/// The largest `--cache-size` / `cache_size=`: a million keys is far more than any
/// benchmark's key space needs, and bounds the memory a typo can claim.
pub const MAX_CACHE_SIZE: u32 = 1_000_000;

/// `--cache-miss-ms` when not given: the cost of fetching a missing key from the origin.
pub const DEFAULT_CACHE_MISS_MS: u64 = 20;

/// How a simulated backend behaves right now; shown by `/stats` and `/control`.
///
/// JSON: `{"latency":"fixed:20ms","fail_rate":0.0,"slow_factor":1.0,"capacity":0,"healthy":true,
/// "cache_size":0,"cache_miss_ms":20}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Latency distribution of the work endpoint, before the slow factor.
    pub latency: LatencySpec,
    /// Share of work requests answered `503`, `0.0..=1.0`.
    pub fail_rate: f64,
    /// Multiplier applied to every work latency, `0.0..=MAX_SLOW_FACTOR`.
    pub slow_factor: f64,
    /// Work requests served at once; more wait in a FIFO queue. `0` = unlimited.
    /// A change applies to requests arriving afterwards: those already queued or being
    /// served keep their place under the previous limit.
    pub capacity: u32,
    /// What `/health` reports: `true` → 200, `false` → 503.
    pub healthy: bool,
    /// Keys the simulated LRU cache holds, `0..=MAX_CACHE_SIZE`; `0` = no cache. A work
    /// request carrying a cache key (`x-cache-key` header or `key` query parameter) whose
    /// key is not cached pays [`cache_miss_ms`](Self::cache_miss_ms) extra and caches it.
    /// Shrinking evicts the least recently used keys; `0` empties the cache.
    pub cache_size: u32,
    /// Milliseconds a cache miss adds to the work latency (before the slow factor),
    /// `0..=3_600_000`.
    pub cache_miss_ms: u64,
}

impl Default for Settings {
    /// Instant, never failing, unlimited, healthy, no cache.
    fn default() -> Self {
        Settings {
            latency: LatencySpec::default(),
            fail_rate: 0.0,
            slow_factor: 1.0,
            capacity: 0,
            healthy: true,
            cache_size: 0,
            cache_miss_ms: DEFAULT_CACHE_MISS_MS,
        }
    }
}

impl Settings {
    /// Checks every field's range (specs and numbers built in code skip the parsers).
    ///
    /// # Errors
    /// `(option name, message)` for the first field out of range.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        self.latency.validate().map_err(|m| ("latency", m))?;
        check_fail_rate(self.fail_rate).map_err(|m| ("fail-rate", m))?;
        check_slow_factor(self.slow_factor).map_err(|m| ("slow-factor", m))?;
        if self.capacity > MAX_CAPACITY {
            return Err((
                "capacity",
                format!("{} is above the maximum of {MAX_CAPACITY}", self.capacity),
            ));
        }
        check_cache_size(self.cache_size).map_err(|m| ("cache-size", m))?;
        check_cache_miss_ms(self.cache_miss_ms).map_err(|m| ("cache-miss-ms", m))?;
        Ok(())
    }

    /// This settings with `change` applied; fields the change leaves out stay.
    pub(crate) fn with(mut self, change: &SettingsChange) -> Settings {
        if let Some(latency) = change.latency {
            self.latency = latency;
        }
        if let Some(fail_rate) = change.fail_rate {
            self.fail_rate = fail_rate;
        }
        if let Some(slow_factor) = change.slow_factor {
            self.slow_factor = slow_factor;
        }
        if let Some(capacity) = change.capacity {
            self.capacity = capacity;
        }
        if let Some(healthy) = change.healthy {
            self.healthy = healthy;
        }
        if let Some(cache_size) = change.cache_size {
            self.cache_size = cache_size;
        }
        if let Some(cache_miss_ms) = change.cache_miss_ms {
            self.cache_miss_ms = cache_miss_ms;
        }
        self
    }
}

/// Accepts a fail rate in `0.0..=1.0`.
pub(crate) fn check_fail_rate(rate: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not a rate from 0 to 1"))
    }
}

/// Accepts a slow factor in `0.0..=MAX_SLOW_FACTOR`.
pub(crate) fn check_slow_factor(factor: f64) -> Result<f64, String> {
    if (0.0..=MAX_SLOW_FACTOR).contains(&factor) {
        Ok(factor)
    } else {
        Err(format!(
            "{factor} is not a factor from 0 to {MAX_SLOW_FACTOR}"
        ))
    }
}

/// Accepts a cache size in `0..=MAX_CACHE_SIZE`.
pub(crate) fn check_cache_size(size: u32) -> Result<u32, String> {
    if size <= MAX_CACHE_SIZE {
        Ok(size)
    } else {
        Err(format!(
            "{size} is not a number of keys from 0 (no cache) to {MAX_CACHE_SIZE}"
        ))
    }
}

/// Accepts a cache-miss penalty of at most [`MAX_LATENCY`] in milliseconds.
pub(crate) fn check_cache_miss_ms(ms: u64) -> Result<u64, String> {
    let max_ms = MAX_LATENCY.as_millis();
    if u128::from(ms) <= max_ms {
        Ok(ms)
    } else {
        Err(format!(
            "{ms} is not a whole number of milliseconds from 0 to {max_ms}"
        ))
    }
}

/// A validated `/control` request: the fields to change, `None` = leave as is.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SettingsChange {
    pub latency: Option<LatencySpec>,
    pub fail_rate: Option<f64>,
    pub slow_factor: Option<f64>,
    pub capacity: Option<u32>,
    pub healthy: Option<bool>,
    pub cache_size: Option<u32>,
    pub cache_miss_ms: Option<u64>,
}

/// A `/control` or query parameter that cannot be used; becomes a `400`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BadParameter {
    /// The parameter as the client spelled it.
    pub parameter: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl BadParameter {
    pub(crate) fn new(parameter: &str, message: impl Into<String>) -> Self {
        BadParameter {
            parameter: parameter.to_owned(),
            message: message.into(),
        }
    }

    /// One line naming the parameter, for the error body.
    pub(crate) fn to_message(&self) -> String {
        format!("parameter `{}`: {}", self.parameter, self.message)
    }
}

const CONTROL_PARAMETERS: &str =
    "delay_ms, latency, fail, slow_factor, capacity, healthy, cache_size, cache_miss_ms";

/// The `/control` parameters, aliases folded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlParameter {
    DelayMs,
    Latency,
    Fail,
    SlowFactor,
    Capacity,
    Healthy,
    CacheSize,
    CacheMissMs,
}

impl ControlParameter {
    fn from_key(key: &str) -> Option<Self> {
        Some(match key {
            "delay_ms" | "set_delay_ms" => ControlParameter::DelayMs,
            "latency" => ControlParameter::Latency,
            "fail" | "fail_rate" => ControlParameter::Fail,
            "slow_factor" => ControlParameter::SlowFactor,
            "capacity" => ControlParameter::Capacity,
            "healthy" => ControlParameter::Healthy,
            "cache_size" => ControlParameter::CacheSize,
            "cache_miss_ms" => ControlParameter::CacheMissMs,
            _ => return None,
        })
    }

    /// The setting this parameter writes; two parameters writing one setting conflict.
    fn setting(self) -> &'static str {
        match self {
            ControlParameter::DelayMs | ControlParameter::Latency => "latency",
            ControlParameter::Fail => "fail_rate",
            ControlParameter::SlowFactor => "slow_factor",
            ControlParameter::Capacity => "capacity",
            ControlParameter::Healthy => "healthy",
            ControlParameter::CacheSize => "cache_size",
            ControlParameter::CacheMissMs => "cache_miss_ms",
        }
    }
}

/// Parses a `/control` query string (percent-encoded, `a=1&b=2`).
///
/// Parameters: `delay_ms=N` (fixed latency of N ms; alias `set_delay_ms` from the seed
/// spec), `latency=SPEC`, `fail=R` (alias `fail_rate`), `slow_factor=F`, `capacity=N`,
/// `healthy=true|false`, `cache_size=N`, `cache_miss_ms=N`.
///
/// # Errors
/// The first parameter that is unknown, repeated, empty, out of range, or that conflicts
/// with another (`delay_ms` and `latency` both set the latency).
pub(crate) fn parse_control(query: &str) -> Result<SettingsChange, BadParameter> {
    let mut change = SettingsChange::default();
    // (setting, key as spelled) for every parameter so far, to report repeats and conflicts.
    let mut seen: Vec<(&'static str, String)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let key = key.as_ref();
        let parameter = ControlParameter::from_key(key).ok_or_else(|| {
            BadParameter::new(
                key,
                format!("unknown parameter; known: {CONTROL_PARAMETERS}"),
            )
        })?;
        if let Some((_, first)) = seen
            .iter()
            .find(|(setting, _)| *setting == parameter.setting())
        {
            let message = if first == key {
                "given more than once".to_owned()
            } else {
                format!(
                    "conflicts with `{first}`: both set the {}; give one",
                    parameter.setting()
                )
            };
            return Err(BadParameter::new(key, message));
        }
        seen.push((parameter.setting(), key.to_owned()));
        let value = value.trim();
        if value.is_empty() {
            return Err(BadParameter::new(key, "needs a value"));
        }
        let bad = |message: String| BadParameter::new(key, message);
        match parameter {
            ControlParameter::DelayMs => {
                change.latency = Some(LatencySpec::Fixed(parse_delay_ms(value).map_err(bad)?));
            }
            ControlParameter::Latency => change.latency = Some(value.parse().map_err(bad)?),
            ControlParameter::Fail => {
                change.fail_rate = Some(parse_f64(value).and_then(check_fail_rate).map_err(bad)?);
            }
            ControlParameter::SlowFactor => {
                change.slow_factor =
                    Some(parse_f64(value).and_then(check_slow_factor).map_err(bad)?);
            }
            ControlParameter::Capacity => {
                let capacity = value
                    .parse::<u32>()
                    .ok()
                    .filter(|c| *c <= MAX_CAPACITY)
                    .ok_or_else(|| {
                        bad(format!(
                            "`{value}` is not a whole number from 0 (unlimited) to {MAX_CAPACITY}"
                        ))
                    })?;
                change.capacity = Some(capacity);
            }
            ControlParameter::Healthy => {
                change.healthy = Some(match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(format!("`{value}` is not `true` or `false`"))),
                });
            }
            ControlParameter::CacheSize => {
                let size = value
                    .parse::<u32>()
                    .map_err(|_| format!("`{value}` is not a whole number"))
                    .and_then(check_cache_size)
                    .map_err(bad)?;
                change.cache_size = Some(size);
            }
            ControlParameter::CacheMissMs => {
                change.cache_miss_ms = Some(parse_ms(value).map_err(bad)?);
            }
        }
    }
    Ok(change)
}

/// Reads a per-request latency override from a work request's query: `delay_ms=N` (alias
/// `delay`, as in the seed spec). Other parameters belong to the application and are ignored.
///
/// # Errors
/// The override parameter when its value is not a whole number of milliseconds up to 1h.
pub(crate) fn parse_delay_override(
    query: &str,
) -> Result<Option<std::time::Duration>, BadParameter> {
    let mut delay = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "delay_ms" || key == "delay" {
            delay = Some(parse_delay_ms(value.trim()).map_err(|m| BadParameter::new(&key, m))?);
        }
    }
    Ok(delay)
}

fn parse_delay_ms(value: &str) -> Result<std::time::Duration, String> {
    parse_ms(value).map(std::time::Duration::from_millis)
}

/// A whole number of milliseconds from 0 to [`MAX_LATENCY`].
fn parse_ms(value: &str) -> Result<u64, String> {
    let max_ms = MAX_LATENCY.as_millis();
    value
        .parse::<u64>()
        .ok()
        .filter(|ms| u128::from(*ms) <= max_ms)
        .ok_or_else(|| {
            format!("`{value}` is not a whole number of milliseconds from 0 to {max_ms}")
        })
}

fn parse_f64(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .map_err(|_| format!("`{value}` is not a number"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn parses_every_parameter() {
        let change = parse_control(
            "delay_ms=150&fail=0.25&slow_factor=2&capacity=4&healthy=false\
             &cache_size=100&cache_miss_ms=35",
        )
        .expect("valid");
        assert_eq!(
            change,
            SettingsChange {
                latency: Some(LatencySpec::Fixed(Duration::from_millis(150))),
                fail_rate: Some(0.25),
                slow_factor: Some(2.0),
                capacity: Some(4),
                healthy: Some(false),
                cache_size: Some(100),
                cache_miss_ms: Some(35),
            }
        );
        let encoded = parse_control("latency=uniform%3A10ms..50ms").expect("valid");
        assert_eq!(
            encoded.latency,
            Some(LatencySpec::Uniform {
                low: Duration::from_millis(10),
                high: Duration::from_millis(50)
            })
        );
        let lognormal = parse_control("latency=lognormal:20ms%2C0.5&fail_rate=1").expect("valid");
        assert!(matches!(
            lognormal.latency,
            Some(LatencySpec::LogNormal { .. })
        ));
        assert_eq!(lognormal.fail_rate, Some(1.0));
        assert_eq!(parse_control(""), Ok(SettingsChange::default()));
        assert_eq!(
            parse_control("set_delay_ms=5")
                .expect("seed spec alias")
                .latency,
            Some(LatencySpec::Fixed(Duration::from_millis(5)))
        );
    }

    #[test]
    fn names_the_bad_parameter() {
        for (query, parameter, needle) in [
            ("fail=1.5", "fail", "rate from 0 to 1"),
            ("fail=abc", "fail", "not a number"),
            ("fail=NaN", "fail", "rate from 0 to 1"),
            ("delay_ms=-3", "delay_ms", "whole number"),
            ("delay_ms=99999999999", "delay_ms", "whole number"),
            ("slow_factor=-1", "slow_factor", "factor"),
            ("slow_factor=inf", "slow_factor", "factor"),
            ("capacity=2000000", "capacity", "whole number"),
            ("capacity=1.5", "capacity", "whole number"),
            ("healthy=yes", "healthy", "`true` or `false`"),
            ("cache_size=2000000", "cache_size", "no cache"),
            ("cache_size=-1", "cache_size", "whole number"),
            ("cache_miss_ms=1.5", "cache_miss_ms", "whole number"),
            ("cache_miss_ms=99999999999", "cache_miss_ms", "whole number"),
            ("latency=fast", "latency", "not a duration"),
            ("fail=", "fail", "needs a value"),
            ("colour=red", "colour", "unknown parameter"),
            ("fail=0.1&fail=0.2", "fail", "more than once"),
            (
                "delay_ms=5&latency=fixed:5ms",
                "latency",
                "conflicts with `delay_ms`",
            ),
            (
                "healthy=true&capacity=1&capacity=2",
                "capacity",
                "more than once",
            ),
            (
                "fail=0.1&fail_rate=0.2",
                "fail_rate",
                "conflicts with `fail`",
            ),
        ] {
            let err = parse_control(query).expect_err(query);
            assert_eq!(err.parameter, parameter, "{query}");
            assert!(err.message.contains(needle), "{query}: {}", err.message);
            assert!(err.to_message().contains(&format!("`{parameter}`")));
        }
    }

    #[test]
    fn change_applies_only_given_fields() {
        let base = Settings::default();
        let changed = base.with(&SettingsChange {
            fail_rate: Some(0.5),
            ..SettingsChange::default()
        });
        assert_eq!(
            changed,
            Settings {
                fail_rate: 0.5,
                ..base
            }
        );
    }

    #[test]
    fn delay_override_reads_either_spelling() {
        assert_eq!(
            parse_delay_override("delay_ms=20&x=1"),
            Ok(Some(Duration::from_millis(20)))
        );
        assert_eq!(
            parse_delay_override("delay=7"),
            Ok(Some(Duration::from_millis(7)))
        );
        assert_eq!(parse_delay_override("page=2"), Ok(None));
        let err = parse_delay_override("delay=soon").expect_err("bad");
        assert_eq!(err.parameter, "delay");
    }

    #[test]
    fn validate_rejects_out_of_range_fields() {
        assert_eq!(Settings::default().validate(), Ok(()));
        let bad = Settings {
            fail_rate: 2.0,
            ..Settings::default()
        };
        assert_eq!(bad.validate().expect_err("bad").0, "fail-rate");
        let bad = Settings {
            capacity: MAX_CAPACITY + 1,
            ..Settings::default()
        };
        assert_eq!(bad.validate().expect_err("bad").0, "capacity");
        let bad = Settings {
            cache_size: MAX_CACHE_SIZE + 1,
            ..Settings::default()
        };
        assert_eq!(bad.validate().expect_err("bad").0, "cache-size");
        let bad = Settings {
            cache_miss_ms: 3_600_001,
            ..Settings::default()
        };
        assert_eq!(bad.validate().expect_err("bad").0, "cache-miss-ms");
    }
}
