//! Scalar values with their own syntax: durations, addresses, strategy names, retry
//! conditions, status ranges and hedge delays. Parsing lives here so that the error messages for a bad
//! value are written once and read the same wherever the value appears.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use fulcrum_balance::StrategyKind;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Serde for [`Duration`] as a humantime string: `250ms`, `5s`, `1m 30s`. A bare number is
/// rejected ("missing unit, e.g. 5s") rather than guessed at.
/// Serde for a rate `N/s`, `N/m` or `N/h` (N = 1..=1000000).
pub(crate) mod rate {
    use super::*;
    use crate::model::Rate;

    pub fn serialize<S: Serializer>(r: &Rate, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(r)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let v = String::deserialize(d)?;
        parse(&v).map_err(de::Error::custom)
    }

    /// Parses `N/s`, `N/m` or `N/h`.
    pub fn parse(v: &str) -> Result<Rate, String> {
        let bad = |why: &str| format!("invalid rate `{v}`: {why}, e.g. 100/s, 30/m or 500/h");
        let (count, unit) = v
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("missing `/unit`"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad("the count must be a whole number"))?;
        if !(1..=1_000_000).contains(&count) {
            return Err(bad("the count must be 1..=1000000"));
        }
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad("the unit must be s, m or h")),
        };
        Ok(Rate { count, per })
    }
}

pub(crate) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl DurationVisitor {
        fn bare_number<E: de::Error>(n: impl fmt::Display) -> E {
            E::custom(format!(
                "invalid duration `{n}`: missing unit, e.g. {n}s or {n}ms"
            ))
        }

        fn negative<E: de::Error>(n: impl fmt::Display) -> E {
            E::custom(format!(
                "invalid duration `{n}`: durations cannot be negative; expected e.g. 250ms or 5s"
            ))
        }
    }

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, e.g. 250ms, 5s or 1m")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Err(Self::bare_number(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(if v < 0 {
                Self::negative(v)
            } else {
                Self::bare_number(v)
            })
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(if v < 0.0 {
                Self::negative(v)
            } else {
                Self::bare_number(v)
            })
        }
    }
}

/// Parses a humantime duration, with the messages used in diagnostics.
pub(crate) fn parse_duration(v: &str) -> Result<Duration, String> {
    let t = v.trim();
    if t.starts_with('-') {
        return Err(format!(
            "invalid duration `{t}`: durations cannot be negative; expected e.g. 250ms or 5s"
        ));
    }
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "invalid duration `{t}`: missing unit, e.g. {t}s or {t}ms"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        let why = match e {
            humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => {
                format!("unknown unit `{unit}`")
            }
            humantime::DurationError::Empty => "empty".to_owned(),
            humantime::DurationError::NumberOverflow => "too large".to_owned(),
            _ => "not a number with a unit".to_owned(),
        };
        format!("invalid duration `{v}`: {why}; expected e.g. 250ms, 5s, 1m or 1h (units ns, us, ms, s, m, h, d)")
    })
}

/// Serde for [`StrategyKind`] by its configuration name; an unknown name lists the valid
/// ones.
pub(crate) mod strategy {
    use super::*;

    pub fn serialize<S: Serializer>(k: &StrategyKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StrategyKind, D::Error> {
        struct StrategyVisitor;
        impl Visitor<'_> for StrategyVisitor {
            type Value = StrategyKind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a strategy name, one of: {}",
                    StrategyKind::NAMES.join(", ")
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrategyKind, E> {
                StrategyKind::from_str(v).map_err(E::custom)
            }
        }
        d.deserialize_str(StrategyVisitor)
    }
}

/// Serde for a listen address: an IP literal and a port (`0.0.0.0:8080`, `[::]:8080`;
/// port 0 = an ephemeral port).
pub(crate) mod listen_addr {
    use super::*;

    pub fn serialize<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        struct ListenVisitor;
        impl Visitor<'_> for ListenVisitor {
            type Value = SocketAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ip:port address, e.g. 127.0.0.1:8080 or [::1]:8080")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
                parse_listen_addr(v).map_err(E::custom)
            }
        }
        d.deserialize_str(ListenVisitor)
    }
}

/// Serde for an optional listen address (`advertise`): absent or `ip:port`.
pub(crate) mod opt_listen_addr {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let v = String::deserialize(d)?;
        parse_listen_addr(&v).map(Some).map_err(de::Error::custom)
    }
}

/// Parses a listen address (`ip:port`, port 0..=65535), with diagnostic messages.
pub(crate) fn parse_listen_addr(v: &str) -> Result<SocketAddr, String> {
    let bad = |why: &str| format!("invalid address \"{v}\": {why}");
    let (host, port) = split_host_port(v).map_err(|why| bad(&why))?;
    let port: u16 = port.parse().map_err(|_| bad("port must be 0..=65535"))?;
    let ip = parse_ip_host(host)
        .map_err(|why| bad(&why))?
        .ok_or_else(|| {
            bad("a listen address needs an IP address, not a host name, e.g. 0.0.0.0:8080")
        })?;
    Ok(SocketAddr::new(ip, port))
}

/// Checks a backend address `host:port`: IPv4, `[IPv6]` or DNS name, port 1..=65535.
/// Returns the socket address when the host is an IP literal (`None` for a name, which is
/// resolved at startup).
pub(crate) fn check_backend_addr(v: &str) -> Result<Option<SocketAddr>, String> {
    let bad = |why: &str| format!("invalid address \"{v}\": {why}");
    let (host, port) = split_host_port(v).map_err(|why| bad(&why))?;
    let port = match port.parse::<u16>() {
        Ok(p) if p >= 1 => p,
        _ => return Err(bad("port must be 1..=65535")),
    };
    match parse_ip_host(host).map_err(|why| bad(&why))? {
        Some(ip) => Ok(Some(SocketAddr::new(ip, port))),
        None => check_dns_name(host).map(|()| None).map_err(|why| bad(&why)),
    }
}

/// Splits `host:port`, with `[v6]:port` for IPv6. Both parts are non-empty; the port is
/// all digits.
fn split_host_port(v: &str) -> Result<(&str, &str), String> {
    if v.is_empty() {
        return Err("empty; expected host:port".to_owned());
    }
    if v.trim() != v || v.contains(char::is_whitespace) {
        return Err("contains whitespace".to_owned());
    }
    if v.contains("://") {
        return Err("expected host:port without a scheme".to_owned());
    }
    let (host, port) = if let Some(rest) = v.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err("missing `]` after the IPv6 address".to_owned());
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err("missing port, expected [ipv6]:port, e.g. [::1]:8080".to_owned());
        };
        if inside.is_empty() {
            return Err("host is empty".to_owned());
        }
        (&v[..inside.len() + 2], port)
    } else {
        let Some((host, port)) = v.rsplit_once(':') else {
            return Err("missing port, expected host:port, e.g. 127.0.0.1:8080".to_owned());
        };
        if host.contains(':') {
            return Err("an IPv6 address must be in brackets, e.g. [::1]:8080".to_owned());
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("host is empty".to_owned());
    }
    if port.is_empty() {
        return Err("missing port after `:`".to_owned());
    }
    if !port.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("port `{port}` is not a number"));
    }
    Ok((host, port))
}

/// The IP address of `host` if it is an IP literal (`1.2.3.4` or `[::1]`), `None` if it
/// is a name; an error if it looks like an IP literal but is not a valid one.
fn parse_ip_host(host: &str) -> Result<Option<IpAddr>, String> {
    if let Some(inside) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inside
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip)))
            .map_err(|_| format!("`{inside}` is not a valid IPv6 address"));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return host
            .parse::<Ipv4Addr>()
            .map(|ip| Some(IpAddr::V4(ip)))
            .map_err(|_| format!("`{host}` is not a valid IPv4 address"));
    }
    Ok(None)
}

/// Checks a DNS host name: labels of letters, digits, `-` and `_`, 1..=63 characters,
/// not starting or ending with `-`; at most 253 characters in all; a trailing dot is fine.
pub(crate) fn check_dns_name(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err("host name is longer than 253 characters".to_owned());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("host name `{host}` has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!(
                "host name label `{label}` is longer than 63 characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("host name `{host}` contains `{c}`"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("host name label `{label}` starts or ends with `-`"));
        }
    }
    Ok(())
}

/// A failure a request may be retried on (`retry.retry_on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `connect_failure`: the upstream connection could not be established (refused,
    /// unreachable, connect timeout). Nothing was sent, so this is safe for any method.
    ConnectFailure,
    /// `reset`: the upstream connection was reset or closed before a response head.
    Reset,
    /// `timeout`: no response head within `timeouts.response_header`.
    Timeout,
    /// A response status, 500..=599 (e.g. `502`, `503`, `504`).
    Status(u16),
}

impl RetryOn {
    /// The configuration names of the non-status conditions.
    pub const NAMES: &'static [&'static str] = &["connect_failure", "reset", "timeout"];
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect_failure"),
            Self::Reset => f.write_str("reset"),
            Self::Timeout => f.write_str("timeout"),
            Self::Status(s) => write!(f, "{s}"),
        }
    }
}

impl FromStr for RetryOn {
    type Err = String;

    /// Parses `connect_failure`, `reset`, `timeout` or a status `500`..=`599`.
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = format!(
            "expected {} or an HTTP status 500..=599",
            Self::NAMES.join(", ")
        );
        match s {
            "connect_failure" => Ok(Self::ConnectFailure),
            "reset" => Ok(Self::Reset),
            "timeout" => Ok(Self::Timeout),
            _ => match s.parse::<u16>() {
                Ok(code @ 500..=599) => Ok(Self::Status(code)),
                Ok(code) => Err(format!("status {code} is not retriable; {expected}")),
                Err(_) => Err(format!("unknown retry condition `{s}`; {expected}")),
            },
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Status(code) => s.serialize_u16(*code),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RetryOnVisitor;
        impl Visitor<'_> for RetryOnVisitor {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connect_failure, reset, timeout or an HTTP status 500..=599")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryOn, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RetryOn, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RetryOn, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(RetryOnVisitor)
    }
}

/// An inclusive range of HTTP status codes, written `200` or `200-399`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusRange {
    /// Lowest accepted status, 100..=599.
    pub start: u16,
    /// Highest accepted status, `start..=599`.
    pub end: u16,
}

impl StatusRange {
    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.start..=self.end).contains(&status)
    }
}

impl Default for StatusRange {
    /// `200-299`.
    fn default() -> Self {
        Self {
            start: 200,
            end: 299,
        }
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for StatusRange {
    type Err = String;

    /// Parses `200` or `200-399`; codes are 100..=599 and the range is not empty.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid status range `{s}`: {why}");
        let code = |part: &str| -> Result<u16, String> {
            match part.trim().parse::<u16>() {
                Ok(c @ 100..=599) => Ok(c),
                _ => Err(bad("a status is a number 100..=599, e.g. 200 or 200-399")),
            }
        };
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (code(a)?, code(b)?),
            None => {
                let c = code(s)?;
                (c, c)
            }
        };
        if start > end {
            return Err(bad("the first status is greater than the second"));
        }
        Ok(Self { start, end })
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RangeVisitor;
        impl Visitor<'_> for RangeVisitor {
            type Value = StatusRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status `200` or a range `200-399`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusRange, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusRange, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusRange, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(RangeVisitor)
    }
}

/// When a hedged request's second attempt is sent (`hedge.delay`). Default `p95`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HedgeDelay {
    /// A fixed delay, written as a duration (`50ms`). Validated: > 0.
    Fixed(Duration),
    /// `p95`: the endpoint's observed 95th-percentile latency, floored at
    /// `hedge.min_delay` (Dean and Barroso, "The Tail at Scale", 2013). The default.
    #[default]
    P95,
}

impl fmt::Display for HedgeDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            Self::P95 => f.write_str("p95"),
        }
    }
}

impl FromStr for HedgeDelay {
    type Err = String;

    /// Parses `p95` or a duration such as `50ms`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "p95" {
            return Ok(Self::P95);
        }
        parse_duration(s)
            .map(Self::Fixed)
            .map_err(|e| format!("{e}; or `p95` for the endpoint's observed p95"))
    }
}

impl Serialize for HedgeDelay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HedgeDelayVisitor;
        impl HedgeDelayVisitor {
            fn bare_number<E: de::Error>(n: impl fmt::Display) -> E {
                E::custom(format!(
                    "invalid hedge delay `{n}`: missing unit, e.g. {n}ms; or `p95` for the \
                     endpoint's observed p95"
                ))
            }
        }
        impl Visitor<'_> for HedgeDelayVisitor {
            type Value = HedgeDelay;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`p95` or a duration with a unit, e.g. 50ms")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HedgeDelay, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HedgeDelay, E> {
                Err(Self::bare_number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HedgeDelay, E> {
                Err(Self::bare_number(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HedgeDelay, E> {
                Err(Self::bare_number(v))
            }
        }
        d.deserialize_any(HedgeDelayVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(
            parse_duration("5")
                .unwrap_err()
                .contains("missing unit, e.g. 5s")
        );
        assert!(
            parse_duration("5 parsecs")
                .unwrap_err()
                .contains("unknown unit `parsecs`")
        );
        assert!(parse_duration("").unwrap_err().contains("invalid duration"));
        assert!(
            parse_duration("-1s")
                .unwrap_err()
                .contains("durations cannot be negative")
        );
        // A bare negative number is told it is negative, not to add a unit.
        let parsed = serde_yaml_ng::from_str::<Wrapper>("d: -1").map(|w| w.d);
        let message = parsed.expect_err("negative").to_string();
        assert!(message.contains("cannot be negative"), "{message}");
        assert!(!message.contains("missing unit"), "{message}");
    }

    #[derive(Debug, serde::Deserialize)]
    struct Wrapper {
        #[serde(with = "duration")]
        d: Duration,
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen_addr("0.0.0.0:0"), Ok(([0, 0, 0, 0], 0).into()));
        assert_eq!(
            parse_listen_addr("[::1]:80").unwrap().to_string(),
            "[::1]:80"
        );
        let err = |v| parse_listen_addr(v).unwrap_err();
        assert!(err("127.0.0.1").contains("missing port"));
        assert!(err("localhost:80").contains("not a host name"));
        assert!(err("1.2.3.4:70000").contains("port must be 0..=65535"));
        assert!(err("::1:80").contains("brackets"));
        assert!(err("300.1.1.1:80").contains("not a valid IPv4"));
        assert!(err("[::g]:80").contains("not a valid IPv6"));
    }

    #[test]
    fn backend_addresses() {
        assert_eq!(
            check_backend_addr("10.0.0.1:80"),
            Ok(Some(([10, 0, 0, 1], 80).into()))
        );
        assert_eq!(check_backend_addr("api.internal:8080"), Ok(None));
        assert_eq!(check_backend_addr("my_svc.local.:80"), Ok(None));
        assert!(check_backend_addr("[fe80::1]:443").unwrap().is_some());
        let err = |v| check_backend_addr(v).unwrap_err();
        assert!(err("example.com").contains("missing port"));
        assert!(err("example.com:").contains("missing port"));
        assert!(err(":80").contains("host is empty"));
        assert!(err("[]:80").contains("host is empty"));
        assert!(err("a:0").contains("port must be 1..=65535"));
        assert!(err("a:99999").contains("port must be 1..=65535"));
        assert!(err("a:http").contains("not a number"));
        assert!(err("a..b:1").contains("empty label"));
        assert!(err("-a:1").contains("starts or ends with `-`"));
        assert!(err("a/b:1").contains("contains `/`"));
        assert!(err("http://a:1").contains("scheme"));
        assert!(err(" a:1").contains("whitespace"));
        assert!(err("").contains("empty"));
    }

    #[test]
    fn retry_on() {
        assert_eq!("reset".parse(), Ok(RetryOn::Reset));
        assert_eq!("503".parse(), Ok(RetryOn::Status(503)));
        assert!(
            "404"
                .parse::<RetryOn>()
                .unwrap_err()
                .contains("not retriable")
        );
        assert!(
            "resets"
                .parse::<RetryOn>()
                .unwrap_err()
                .contains("connect_failure, reset")
        );
        for r in [
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::Timeout,
            RetryOn::Status(502),
        ] {
            assert_eq!(r.to_string().parse(), Ok(r));
        }
    }

    #[test]
    fn status_ranges() {
        assert_eq!(
            "200-399".parse(),
            Ok(StatusRange {
                start: 200,
                end: 399
            })
        );
        assert_eq!(
            "204".parse(),
            Ok(StatusRange {
                start: 204,
                end: 204
            })
        );
        assert_eq!(StatusRange::default().to_string(), "200-299");
        assert!("300-200".parse::<StatusRange>().is_err());
        assert!("99".parse::<StatusRange>().is_err());
        assert!("2xx".parse::<StatusRange>().is_err());
        assert!(StatusRange::default().contains(204));
        assert!(!StatusRange::default().contains(301));
    }

    #[test]
    fn hedge_delays() {
        assert_eq!("p95".parse(), Ok(HedgeDelay::P95));
        assert_eq!(
            "50ms".parse(),
            Ok(HedgeDelay::Fixed(Duration::from_millis(50)))
        );
        let err = "fast".parse::<HedgeDelay>().unwrap_err();
        assert!(err.starts_with("invalid duration `fast`"), "{err}");
        assert!(
            err.ends_with("or `p95` for the endpoint's observed p95"),
            "{err}"
        );
        assert!(
            "50".parse::<HedgeDelay>()
                .unwrap_err()
                .contains("missing unit")
        );
        for d in [
            HedgeDelay::P95,
            HedgeDelay::Fixed(Duration::from_millis(1500)),
        ] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
        assert_eq!(HedgeDelay::default(), HedgeDelay::P95);
    }
}
