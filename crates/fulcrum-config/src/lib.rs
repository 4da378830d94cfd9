//! Fulcrum's configuration: `fulcrum.yaml` parsed into typed structs, with defaults,
//! `${ENV}` expansion and validation whose errors point at the file, line, column and
//! field.
//!
//! `fulcrum check` and `fulcrum run` call [`load`]; a reload calls it again and keeps the
//! running config when it fails, so a [`Config`] returned here is always complete and
//! valid. The reference of every key is `docs/CONFIG.md`.
//!
//! Loading goes in four steps, each reporting with the same [`Diagnostic`] format:
//! 1. environment expansion of the raw text (`${VAR}`, `${VAR:-default}`, `$${`);
//! 2. a marked YAML parse that indexes the position of every field path and finds
//!    duplicate keys;
//! 3. typed deserialization (`serde_yaml_ng`), which stops at the first syntax or type
//!    error (unknown key, wrong type, bad duration, unknown strategy, bad listen address);
//! 4. semantic checks (references, uniqueness, ranges, cross-field rules), which report
//!    every problem.
//!
//! ```
//! let yaml = "
//! listeners:
//!   - name: web
//!     listen: 127.0.0.1:8080
//!     routes:
//!       - pool: app
//! pools:
//!   app:
//!     backends:
//!       - address: 127.0.0.1:8081
//! ";
//! let config = fulcrum_config::parse(yaml, "fulcrum.yaml").unwrap();
//! assert_eq!(config.pools["app"].backends[0].weight, 1);
//!
//! let err = fulcrum_config::parse(&yaml.replace("8081", "99999"), "fulcrum.yaml").unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "fulcrum.yaml:10:18: pools.app.backends[0].address: \
//!      invalid address \"127.0.0.1:99999\": port must be 1..=65535"
//! );
//! ```

mod env;
mod error;
mod locate;
mod model;
mod scalar;
pub mod tls;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Diagnostic};
pub use model::{
    AdminConfig, AnalysisConfig, AssignmentsConfig, BackendConfig, CertificatePair, ClientAuth,
    ClusterConfig, Config, CoordinationBackend, CoordinationConfig, DiscoveryConfig,
    DiscoverySource, DnsRecord, DurationClassConfig, DurationClassMode, DynamicWeightsConfig,
    GossipConfig, HashConfig, HashKey, HeaderMatch, HealthCheckConfig, HealthCheckKind,
    HealthMergeRule, HedgeConfig, ListenerConfig, ListenerTimeouts, LogConfig, LogFormat,
    MAX_REQUESTS_LIMIT, OutlierDetectionConfig, PoolConfig, Protocol, QueueConfig, QueuePriority,
    Rate, RateLimitConfig, RateLimitKey, ResponseTimeConfig, RetryConfig, RouteConfig, RouteMatch,
    RuntimeConfig, SlowStartConfig, StatsConfig, TailAwareConfig, TlsConfig, TlsVersion,
    UpstreamProtocol, UpstreamTimeouts, UpstreamTlsConfig, parse_nameserver,
};
pub use scalar::{HedgeDelay, RetryOn, StatusRange};

use locate::{Anchor, SourceIndex};
use validate::Locator;

/// A diagnostic about field `path` (e.g. `pools.app.backends[0].address`) of the file at
/// `file`, positioned at its value (or its nearest ancestor present in the file): for
/// problems found after validation, such as a backend host name that does not resolve.
/// Without a readable, parseable file the diagnostic has no position.
pub fn diagnostic_at(file: &Path, path: &str, message: String) -> Diagnostic {
    let origin = file.display().to_string();
    let pos = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| SourceIndex::build(&text).ok())
        .map(|index| index.locate(path, Anchor::Value));
    Diagnostic {
        origin,
        line: pos.map_or(0, |p| p.line),
        column: pos.map_or(0, |p| p.column),
        path: path.to_owned(),
        message,
    }
}

/// Reads, expands, parses and validates the configuration file at `path`.
///
/// Diagnostics name the file as `path` was given. An unreadable file is a `ConfigError`
/// with one diagnostic without position (`fulcrum.yaml: cannot read config file: …`).
///
/// # Errors
/// Every problem found, as described for [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let source = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole(&origin, format!("cannot read config file: {e}")))?;
    parse(&source, &origin)
}

/// Expands `${ENV}` references in `source` from the process environment, then parses and
/// validates it. `origin` names the source in diagnostics (usually the file name).
///
/// # Errors
/// A [`ConfigError`] listing, in source order: every environment reference that cannot be
/// expanded; or the YAML syntax error; or duplicate keys and the first type error
/// (unknown key, wrong type, bad value of a typed scalar); or every semantic problem.
/// Later steps run only when the earlier ones found nothing, except that duplicate keys
/// do not stop deserialization.
pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with_env(source, origin, &|name| std::env::var(name).ok())
}

/// [`parse`] reading environment variables through `lookup`.
fn parse_with_env(
    source: &str,
    origin: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let expanded = match env::expand(source, lookup) {
        Ok(expanded) => expanded,
        Err(problems) => {
            // The unexpanded text usually parses too (`${X}` is a plain scalar): use it to
            // name the field each reference is in.
            let index = SourceIndex::build(source).ok();
            let diags = problems
                .into_iter()
                .map(|p| Diagnostic {
                    origin: origin.to_owned(),
                    line: p.line,
                    column: p.column,
                    path: index
                        .as_ref()
                        .and_then(|i| i.path_at(p.line, p.column))
                        .unwrap_or_default()
                        .to_owned(),
                    message: p.message,
                })
                .collect();
            return Err(ConfigError::new(diags));
        }
    };
    let text = expanded.text.as_str();
    let mut loc = Locator {
        origin,
        index: None,
        columns: Some(&expanded.columns),
        end: Some(validate::end_of(text)),
    };
    let index = SourceIndex::build(text).map_err(|e| syntax_error(text, e, &loc))?;
    loc.index = Some(&index);

    let mut diags: Vec<Diagnostic> = index
        .duplicates
        .iter()
        .map(|d| {
            loc.at(
                d.at,
                &d.path,
                format!("duplicate key `{}` (first at line {})", d.key, d.first.line),
            )
        })
        .collect();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, Config>(de) {
        Ok(config) => {
            diags.extend(validate::check(&config, &loc));
            if diags.is_empty() {
                Ok(config)
            } else {
                Err(ConfigError::new(diags))
            }
        }
        Err(err) => {
            let d = type_error(err, &index, &loc);
            // serde reports a duplicate struct field at its mapping; the index already
            // reported it at the key.
            if diags.is_empty() || !d.message.starts_with("duplicate field") {
                diags.push(d);
            }
            Err(ConfigError::new(diags))
        }
    }
}

/// The diagnostic for a YAML syntax error. libyaml (under `serde_yaml_ng`) words them
/// with more context ("while parsing a flow sequence at line 6 column 13") than
/// `yaml-rust2`, so its message is used when it rejects the text too.
fn syntax_error(text: &str, err: locate::SyntaxError, loc: &Locator<'_>) -> ConfigError {
    let (at, message) = match serde_yaml_ng::from_str::<serde::de::IgnoredAny>(text) {
        Err(e) if e.location().is_some_and(|m| m.line() > 0) => {
            let m = e.location().expect("checked above");
            let message = e.to_string();
            let own = format!(" at line {} column {}", m.line(), m.column());
            (
                locate::Pos {
                    line: m.line(),
                    column: m.column(),
                },
                message.replacen(&own, "", 1),
            )
        }
        _ => (err.at, err.message),
    };
    let tab_indent = text
        .lines()
        .nth(at.line.saturating_sub(1))
        .is_some_and(|l| {
            l.chars()
                .take_while(|c| c.is_whitespace())
                .any(|c| c == '\t')
        });
    let hint = if tab_indent {
        " (YAML is indented with spaces, not tabs)"
    } else {
        ""
    };
    ConfigError::new(vec![loc.at(
        at,
        "",
        format!("invalid YAML: {message}{hint}"),
    )])
}

/// Turns a deserialization error into a diagnostic: the path from `serde_path_to_error`,
/// the message without `serde_yaml_ng`'s own path prefix and position suffix, and the
/// position of the field (from the index, else from the error).
fn type_error(
    err: serde_path_to_error::Error<serde_yaml_ng::Error>,
    index: &SourceIndex,
    loc: &Locator<'_>,
) -> Diagnostic {
    let path = match err.path().to_string() {
        p if p == "." => String::new(),
        p => p,
    };
    let inner = err.into_inner();
    let mark = inner.location();
    let mut message = inner.to_string();
    if let Some(m) = &mark {
        message = message.replacen(
            &format!(" at line {} column {}", m.line(), m.column()),
            "",
            1,
        );
    }
    // serde_yaml_ng prefixes the path of the value or of its parent mapping.
    let mut prefix = Some(path.as_str());
    while let Some(p) = prefix {
        if !p.is_empty()
            && let Some(rest) = message.strip_prefix(p).and_then(|m| m.strip_prefix(": "))
        {
            message = rest.to_owned();
            break;
        }
        prefix = locate::parent(p);
    }
    let message = friendly_type_names(message);
    let anchor = if message.starts_with("unknown field") || message.starts_with("duplicate field") {
        Anchor::Key
    } else {
        Anchor::Value
    };
    let pos = index
        .exact(&path, anchor)
        .or_else(|| {
            mark.filter(|m| m.line() > 0).map(|m| locate::Pos {
                line: m.line(),
                column: m.column(),
            })
        })
        .unwrap_or_else(|| index.locate(&path, anchor));
    loc.at(pos, &path, message)
}

/// Replaces Rust type names in serde's "expected …" with what a YAML writer knows. The
/// storage type's range is named only for a number too large for it; a value of the
/// wrong type or a negative one is told what kind of value is wanted, since the field's
/// own range is usually narrower (it is checked, and reported, once the type is right).
fn friendly_type_names(message: String) -> String {
    let wrong_kind = message.starts_with("invalid type") || message.contains("integer `-");
    if wrong_kind {
        for rust in [
            "expected u8",
            "expected u16",
            "expected u32",
            "expected u64",
        ] {
            if let Some(head) = message.strip_suffix(rust) {
                return format!("{head}expected a whole number, 0 or more");
            }
        }
    }
    const NAMES: &[(&str, &str)] = &[
        ("expected u8", "expected an integer 0..=255"),
        ("expected u16", "expected an integer 0..=65535"),
        ("expected u32", "expected an integer 0..=4294967295"),
        (
            "expected u64",
            "expected an integer 0..=18446744073709551615",
        ),
        ("expected usize", "expected a non-negative integer"),
        ("expected f64", "expected a number"),
        ("expected a map", "expected a mapping"),
    ];
    for (rust, yaml) in NAMES {
        if let Some(head) = message.strip_suffix(rust) {
            return format!("{head}{yaml}");
        }
    }
    match message.find("expected struct ") {
        Some(at) => format!("{}expected a mapping", &message[..at]),
        None => message,
    }
}

impl Config {
    /// Runs the semantic checks on a config built in code (e.g. by `fulcrum demo` or an
    /// admin API change) — the same checks [`parse`] runs after deserialization. The
    /// diagnostics have origin `config` and no position.
    ///
    /// # Errors
    /// Every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let loc = Locator {
            origin: "config",
            index: None,
            columns: None,
            end: None,
        };
        let diags = validate::check(self, &loc);
        if diags.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::new(diags))
        }
    }
}

#[cfg(test)]
mod tests;
