//! Semantic checks of a deserialized [`Config`]: references, uniqueness, ranges and rules
//! that span fields. Every problem is reported, each at the position of the offending
//! field when the config came from text.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::env::ColumnMap;
use crate::error::Diagnostic;
use crate::locate::{Anchor, Pos, SourceIndex};
use crate::model::{
    ClusterConfig, Config, CoordinationBackend, DiscoveryConfig, DiscoverySource, DnsRecord,
    DurationClassMode, HashConfig, HashKey, HealthCheckConfig, HealthCheckKind, HedgeConfig,
    ListenerConfig, MAX_REQUESTS_LIMIT, PoolConfig, Protocol, RouteMatch, UpstreamProtocol,
};
use crate::scalar::{HedgeDelay, check_backend_addr, check_dns_name};

/// Turns field paths into located [`Diagnostic`]s for one source.
pub(crate) struct Locator<'a> {
    pub origin: &'a str,
    /// Positions of the parsed text; `None` for a config built in code.
    pub index: Option<&'a SourceIndex>,
    /// Maps columns of the env-expanded text back to the file.
    pub columns: Option<&'a ColumnMap>,
    /// The end of the parsed text: positions past it (libyaml reports the end of a text
    /// without a final line break one line further down) are moved back to it.
    pub end: Option<Pos>,
}

/// The position just after the last character of `text`.
pub(crate) fn end_of(text: &str) -> Pos {
    let line = text.matches('\n').count() + 1;
    let last = text.rsplit('\n').next().unwrap_or("");
    Pos {
        line,
        column: last.chars().count() + 1,
    }
}

impl Locator<'_> {
    /// A diagnostic at `pos` of the parsed text.
    pub fn at(&self, pos: Pos, path: &str, message: String) -> Diagnostic {
        let pos = match self.end {
            Some(end) if pos.line > end.line => end,
            _ => pos,
        };
        let column = self
            .columns
            .map_or(pos.column, |c| c.original(pos.line, pos.column));
        Diagnostic {
            origin: self.origin.to_owned(),
            line: pos.line,
            column,
            path: path.to_owned(),
            message,
        }
    }

    /// A diagnostic about `path`, placed at `locate_path` (usually the same path).
    pub fn diag(
        &self,
        path: &str,
        locate_path: &str,
        anchor: Anchor,
        message: String,
    ) -> Diagnostic {
        match self.index {
            Some(index) => self.at(index.locate(locate_path, anchor), path, message),
            None => Diagnostic {
                origin: self.origin.to_owned(),
                line: 0,
                column: 0,
                path: path.to_owned(),
                message,
            },
        }
    }

    /// `"{sep}line N"` for the node at `path`, or nothing when it has no position.
    fn line_note(&self, sep: &str, path: &str) -> String {
        match self.index.and_then(|i| i.exact(path, Anchor::Key)) {
            Some(pos) => format!("{sep}line {}", pos.line),
            None => String::new(),
        }
    }

    /// Whether the text sets exactly `path` (always false for a config built in code).
    fn is_written(&self, path: &str) -> bool {
        self.index.is_some_and(|i| i.contains(path))
    }
}

/// The semantic checker: walks a [`Config`] and gathers diagnostics.
struct Checker<'a> {
    loc: &'a Locator<'a>,
    diags: Vec<Diagnostic>,
    /// The cluster's coordination store (`None` without a `cluster` block).
    store: Option<CoordinationBackend>,
}

/// Checks `config`; returns every problem found, empty when it is valid.
pub(crate) fn check(config: &Config, loc: &Locator<'_>) -> Vec<Diagnostic> {
    let mut c = Checker {
        loc,
        diags: Vec::new(),
        store: config.cluster.as_ref().map(|c| c.coordination.backend),
    };
    c.log(config);
    c.runtime(config);
    c.admin(config);
    c.listeners(config);
    c.pools(config);
    c.cluster(config);
    c.diags
}

/// Largest request body a pool may buffer for hedges or retries (`max_body_bytes`).
const MAX_BUFFERED_BODY: u64 = 16 * 1024 * 1024;

/// Most worker threads `runtime.threads` may ask for: far beyond any core count, well
/// below what exhausts file descriptors and memory at start.
pub const MAX_THREADS: usize = 1024;

/// Characters allowed in listener and pool names (they appear in URLs and metrics).
fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return Err(format!(
            "{kind} name `{name}` contains `{c}`; use letters, digits, `_`, `.` and `-`"
        ));
    }
    Ok(())
}

/// Whether two listen addresses cannot both be bound: same port and the same IP, or one
/// of them the wildcard address of the same family. Port 0 (ephemeral) never conflicts.
fn addresses_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

/// Whether `c` may appear in an HTTP header name (RFC 9110 `tchar`).
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Whether `name` is an HTTP token: a valid header name, and a valid cookie name
/// (RFC 6265 `cookie-name`).
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.chars().all(is_tchar)
}

/// What two backend addresses of a pool are compared by: the socket address of an IP
/// literal (`sock`, from [`check_backend_addr`]), else the host name without case or
/// trailing dot, and the port.
fn backend_key(address: &str, sock: Option<SocketAddr>) -> String {
    match (sock, address.rsplit_once(':')) {
        (Some(s), _) => s.to_string(),
        (None, Some((host, port))) => {
            format!("{}:{port}", host.trim_end_matches('.').to_ascii_lowercase())
        }
        (None, None) => address.to_ascii_lowercase(),
    }
}

/// `v` as YAML writes it, for the non-finite values that `{v}` would show as `NaN`/`inf`.
fn yaml_float(v: f64) -> String {
    if v.is_nan() {
        ".nan".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { ".inf" } else { "-.inf" }.to_owned()
    } else {
        v.to_string()
    }
}

/// Whether `n` is prime (trial division; `n` is at most about a million here).
fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl Checker<'_> {
    /// Reports `message` about `path`, at `path`.
    fn report(&mut self, path: &str, anchor: Anchor, message: String) {
        self.diags.push(self.loc.diag(path, path, anchor, message));
    }

    /// Reports that the duration at `path` must be positive, if it is zero.
    fn positive(&mut self, path: &str, d: Duration) {
        if d.is_zero() {
            self.report(path, Anchor::Value, "must be greater than 0".to_owned());
        }
    }

    /// Reports an integer outside `range`.
    fn int_range(&mut self, path: &str, v: u64, range: RangeInclusive<u64>) {
        if !range.contains(&v) {
            self.report(
                path,
                Anchor::Value,
                format!(
                    "{v} is out of range; must be {}..={}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }

    /// Reports a number that is not finite (`.nan`, `.inf`) or for which `ok` is false;
    /// `expected` words the valid values.
    fn number(&mut self, path: &str, v: f64, ok: fn(f64) -> bool, expected: &str) {
        let message = if !v.is_finite() {
            format!(
                "{} is not a finite number; must be {expected}",
                yaml_float(v)
            )
        } else if !ok(v) {
            format!("{v} is out of range; must be {expected}")
        } else {
            return;
        };
        self.report(path, Anchor::Value, message);
    }

    /// Reports a percentage above 100.
    fn percent(&mut self, path: &str, v: u8) {
        if v > 100 {
            self.report(
                path,
                Anchor::Value,
                format!("{v} is not a percentage; must be 0..=100"),
            );
        }
    }

    fn runtime(&mut self, config: &Config) {
        if config.runtime.threads > MAX_THREADS {
            self.report(
                "runtime.threads",
                Anchor::Value,
                format!(
                    "{} is out of range 0..={MAX_THREADS} (0 = one per CPU core)",
                    config.runtime.threads
                ),
            );
        }
    }

    fn log(&mut self, config: &Config) {
        let level = &config.log.level;
        if level.trim().is_empty() {
            self.report("log.level", Anchor::Value, "is empty; e.g. info".to_owned());
        } else if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level) {
            self.report(
                "log.level",
                Anchor::Value,
                format!(
                    "invalid log filter `{level}`: {e} (e.g. `info` or `info,fulcrum_proxy=debug`)"
                ),
            );
        } else if let Some(word) = level
            .split(',')
            .map(str::trim)
            .find(|d| !d.is_empty() && !is_log_directive(d))
        {
            // The filter syntax takes a bare word for a target name, so a misspelt level
            // would parse and silence every other log line.
            self.report(
                "log.level",
                Anchor::Value,
                format!(
                    "`{word}` is not a level (trace, debug, info, warn, error, off) nor `target=level`"
                ),
            );
        }
    }

    fn admin(&mut self, config: &Config) {
        if let Some(token) = &config.admin.token {
            if token.is_empty() {
                self.report(
                    "admin.token",
                    Anchor::Value,
                    "is empty; remove it (or set it to null) to require no token".to_owned(),
                );
            } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.report(
                    "admin.token",
                    Anchor::Value,
                    "contains whitespace or control characters, which a bearer token cannot"
                        .to_owned(),
                );
            }
        }
    }

    fn listeners(&mut self, config: &Config) {
        if config.listeners.is_empty() {
            self.report(
                "listeners",
                Anchor::Key,
                "no listeners; at least one listener is required".to_owned(),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        // Bound addresses so far, with who holds them.
        let mut bound: Vec<(SocketAddr, String, String)> = vec![(
            config.admin.listen,
            "the admin listener".to_owned(),
            "admin.listen".to_owned(),
        )];
        for (i, l) in config.listeners.iter().enumerate() {
            let p = format!("listeners[{i}]");
            if let Err(e) = check_name("listener", &l.name) {
                self.report(&format!("{p}.name"), Anchor::Value, e);
            } else if let Some(&first) = names.get(l.name.as_str()) {
                let first_path = format!("listeners[{first}]");
                let note = self.loc.line_note(", ", &first_path);
                self.report(
                    &format!("{p}.name"),
                    Anchor::Value,
                    format!(
                        "duplicate listener name `{}` (first used by {first_path}{note})",
                        l.name
                    ),
                );
            } else {
                names.insert(&l.name, i);
            }
            let listen_path = format!("{p}.listen");
            if let Some((_, holder, holder_path)) = bound
                .iter()
                .find(|(addr, ..)| addresses_conflict(*addr, l.listen))
            {
                let note = self.loc.line_note(" at ", holder_path);
                let msg = format!("address {} is already used by {holder}{note}", l.listen);
                self.report(&listen_path, Anchor::Value, msg);
            }
            bound.push((l.listen, format!("listener `{}`", l.name), listen_path));
            self.positive(
                &format!("{p}.timeouts.request_header"),
                l.timeouts.request_header,
            );
            self.positive(&format!("{p}.timeouts.idle"), l.timeouts.idle);
            self.positive(&format!("{p}.timeouts.send"), l.timeouts.send);
            self.int_range(
                &format!("{p}.max_connections"),
                u64::from(l.max_connections),
                0..=10_000_000,
            );
            self.tls(l, &p);
            if l.protocol == Protocol::Tcp {
                // HTTP-only settings switched on for a listener that passes bytes through.
                for (set, key, lacks) in [
                    (l.access_log, "access_log", "requests to log"),
                    (
                        l.merge_slashes,
                        "merge_slashes",
                        "request paths to merge slashes in",
                    ),
                ] {
                    if set {
                        self.report(
                            &format!("{p}.{key}"),
                            Anchor::Key,
                            format!(
                                "listener `{}` is `tcp`: it passes bytes through and has no \
                                 {lacks}",
                                l.name
                            ),
                        );
                    }
                }
            }
            self.routes(config, l, &p);
        }
    }

    /// `tls` only on `http` listeners, with every certificate and key file readable PEM
    /// (read here, so that `fulcrum check` and a reload name a bad file at its line),
    /// each extra certificate selectable by SNI (a DNS name in its leaf), `client_ca`
    /// readable, and `client_auth` only with `client_ca`.
    fn tls(&mut self, l: &ListenerConfig, p: &str) {
        let Some(tls) = &l.tls else { return };
        if l.protocol == Protocol::Tcp {
            self.report(
                &format!("{p}.tls"),
                Anchor::Key,
                format!(
                    "listener `{}` is `tcp`: TLS termination is supported on `http` listeners \
                     only (a `tcp` listener passes the client's TLS through unchanged)",
                    l.name
                ),
            );
            return;
        }
        for (at, certificate, private_key) in tls.pairs() {
            match crate::tls::read_pair(certificate, private_key) {
                Err(e) => self.report(
                    &format!("{p}.tls.{at}{}", e.file.key()),
                    Anchor::Value,
                    e.message,
                ),
                // The default certificate is served without SNI too; an extra one is
                // reachable only through a DNS name of its leaf.
                Ok(material) if !at.is_empty() => {
                    let names = crate::tls::dns_names(&material.certificates[0]);
                    let problem = match names {
                        Err(e) => Some(e),
                        Ok(names) if names.is_empty() => Some(
                            "its leaf certificate has no DNS name (subjectAltName), so no \
                             client's SNI could select it"
                                .to_owned(),
                        ),
                        Ok(_) => None,
                    };
                    if let Some(problem) = problem {
                        self.report(
                            &format!("{p}.tls.{at}certificate"),
                            Anchor::Value,
                            format!("`{}`: {problem}", certificate.display()),
                        );
                    }
                }
                Ok(_) => {}
            }
        }
        match &tls.client_ca {
            Some(ca) => {
                if let Err(message) = crate::tls::read_ca_file(ca) {
                    self.report(&format!("{p}.tls.client_ca"), Anchor::Value, message);
                }
            }
            None if tls.client_auth.is_some() => self.report(
                &format!("{p}.tls.client_auth"),
                Anchor::Key,
                "`client_auth` needs `client_ca`: the CA certificates client certificates \
                 are verified against"
                    .to_owned(),
            ),
            None => {}
        }
    }

    fn routes(&mut self, config: &Config, l: &ListenerConfig, p: &str) {
        if l.routes.is_empty() {
            self.diags.push(self.loc.diag(
                &format!("{p}.routes"),
                p,
                Anchor::Key,
                format!(
                    "listener `{}` has no routes; add at least one route naming a pool",
                    l.name
                ),
            ));
        }
        if l.protocol == Protocol::Tcp && l.routes.len() > 1 {
            self.report(
                &format!("{p}.routes[1]"),
                Anchor::Value,
                format!(
                    "tcp listener `{}` has {} routes; a tcp listener forwards every connection \
                     to one pool, so it takes exactly one route",
                    l.name,
                    l.routes.len()
                ),
            );
        }
        for (j, route) in l.routes.iter().enumerate() {
            let rp = format!("{p}.routes[{j}]");
            if let Some(limit) = &route.rate_limit {
                if let Some(burst) = limit.burst {
                    self.int_range(
                        &format!("{rp}.rate_limit.burst"),
                        u64::from(burst),
                        1..=1_000_000,
                    );
                }
                if l.protocol == Protocol::Tcp {
                    self.report(
                        &format!("{rp}.rate_limit"),
                        Anchor::Key,
                        format!(
                            "listener `{}` is `tcp`: rate limits apply to HTTP requests, on \
                             `http` listeners",
                            l.name
                        ),
                    );
                }
            }
            if l.protocol == Protocol::Tcp
                && let Some(pool) = config.pools.get(&route.pool)
                && pool.protocol == UpstreamProtocol::Http2
            {
                self.report(
                    &format!("{rp}.pool"),
                    Anchor::Value,
                    format!(
                        "tcp listener `{}` forwards bytes, not HTTP, but pool `{}` has \
                         `protocol: http2`; use a pool with `protocol: http1` (the default)",
                        l.name, route.pool
                    ),
                );
            }
            if !config.pools.contains_key(&route.pool) {
                let known = if config.pools.is_empty() {
                    "no pools are defined".to_owned()
                } else {
                    let names: Vec<&str> = config.pools.keys().map(String::as_str).collect();
                    format!("defined pools: {}", names.join(", "))
                };
                self.report(
                    &format!("{rp}.pool"),
                    Anchor::Value,
                    format!(
                        "route names pool `{}`, which is not defined ({known})",
                        route.pool
                    ),
                );
            }
            match (&route.r#match, l.protocol) {
                (Some(_), Protocol::Tcp) => self.report(
                    &format!("{rp}.match"),
                    Anchor::Key,
                    format!(
                        "tcp listener `{}` cannot match on host, path or headers; remove `match`",
                        l.name
                    ),
                ),
                (Some(m), Protocol::Http) => self.route_match(m, &format!("{rp}.match")),
                (None, _) => {}
            }
            for (k, v) in &route.backend_tags {
                if k.is_empty()
                    || k.chars().any(|c| c.is_control())
                    || v.chars().any(|c| c.is_control())
                {
                    self.report(
                        &format!("{rp}.backend_tags"),
                        Anchor::Key,
                        format!("tag `{k}: {v}` is empty or has control characters"),
                    );
                }
            }
        }
    }

    fn route_match(&mut self, m: &RouteMatch, p: &str) {
        if let Some(host) = &m.host {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let problem = if host == "*" {
                Some("`*` alone matches every host; leave `host` out instead".to_owned())
            } else if name.contains(':') {
                Some("a host to match has no port (the request's port is ignored)".to_owned())
            } else {
                check_dns_name(name).err()
            };
            if let Some(why) = problem {
                self.report(
                    &format!("{p}.host"),
                    Anchor::Value,
                    format!("invalid host `{host}`: {why}; e.g. api.example.com or *.example.com"),
                );
            }
        }
        if let Some(prefix) = &m.path_prefix
            && !prefix.starts_with('/')
        {
            self.report(
                &format!("{p}.path_prefix"),
                Anchor::Value,
                format!("path prefix `{prefix}` must start with `/`"),
            );
        }
        if let Some(h) = &m.header {
            if h.name.is_empty() || !h.name.chars().all(is_tchar) {
                self.report(
                    &format!("{p}.header.name"),
                    Anchor::Value,
                    format!("`{}` is not a valid HTTP header name", h.name),
                );
            }
            if let Some(v) = &h.value
                && v.chars().any(|c| c.is_control() && c != '\t')
            {
                self.report(
                    &format!("{p}.header.value"),
                    Anchor::Value,
                    "a header value cannot contain control characters".to_owned(),
                );
            }
        }
    }

    fn pools(&mut self, config: &Config) {
        if config.pools.is_empty() {
            self.report(
                "pools",
                Anchor::Key,
                "no pools; at least one pool is required".to_owned(),
            );
        }
        for (name, pool) in &config.pools {
            self.pool(name, pool);
        }
    }

    fn pool(&mut self, name: &str, pool: &PoolConfig) {
        let p = format!("pools.{name}");
        if let Some(tls) = &pool.tls {
            if let Some(ca) = &tls.ca_file
                && let Err(message) = crate::tls::read_ca_file(ca)
            {
                self.report(&format!("{p}.tls.ca_file"), Anchor::Value, message);
            }
            if let Some(server_name) = &tls.server_name
                && let Err(message) = crate::tls::server_name(server_name)
            {
                self.report(&format!("{p}.tls.server_name"), Anchor::Value, message);
            }
            match (&tls.certificate, &tls.private_key) {
                (Some(certificate), Some(private_key)) => {
                    if let Err(e) = crate::tls::read_pair(certificate, private_key) {
                        self.report(
                            &format!("{p}.tls.{}", e.file.key()),
                            Anchor::Value,
                            e.message,
                        );
                    }
                }
                (None, None) => {}
                (Some(_), None) | (None, Some(_)) => {
                    let (set, missing) = if tls.certificate.is_some() {
                        ("certificate", "private_key")
                    } else {
                        ("private_key", "certificate")
                    };
                    self.report(
                        &format!("{p}.tls.{set}"),
                        Anchor::Key,
                        format!(
                            "`{set}` needs `{missing}`: a client certificate for the backends \
                             is given as both files"
                        ),
                    );
                }
            }
        }
        if let Err(e) = check_name("pool", name) {
            self.report(&p, Anchor::Key, e);
        }
        if pool.backends.is_empty() && pool.discovery.source == DiscoverySource::Static {
            self.diags.push(self.loc.diag(
                &format!("{p}.backends"),
                &p,
                Anchor::Key,
                format!(
                    "pool `{name}` has no backends; add at least one, or discover them \
                     (`discovery.source: dns | registry`)"
                ),
            ));
        }
        // Normalised address → index of its first backend.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, b) in pool.backends.iter().enumerate() {
            let bp = format!("{p}.backends[{i}]");
            match check_backend_addr(&b.address) {
                Err(e) => self.report(&format!("{bp}.address"), Anchor::Value, e),
                Ok(sock) => {
                    let key = backend_key(&b.address, sock);
                    if let Some(&first) = seen.get(&key) {
                        let first_path = format!("{p}.backends[{first}]");
                        let note = self.loc.line_note(", ", &first_path);
                        self.report(
                            &format!("{bp}.address"),
                            Anchor::Value,
                            format!(
                                "duplicate backend address `{}` in pool `{name}` (first at \
                                 {first_path}{note})",
                                b.address
                            ),
                        );
                    } else {
                        seen.insert(key, i);
                    }
                }
            }
            if !(1..=65535).contains(&b.weight) {
                self.report(
                    &format!("{bp}.weight"),
                    Anchor::Value,
                    format!("weight {} is out of range; must be 1..=65535", b.weight),
                );
            }
            self.int_range(
                &format!("{bp}.max_requests"),
                b.max_requests.into(),
                0..=MAX_REQUESTS_LIMIT.into(),
            );
        }
        self.int_range(
            &format!("{p}.default_max_requests"),
            pool.default_max_requests.into(),
            0..=MAX_REQUESTS_LIMIT.into(),
        );
        self.int_range(
            &format!("{p}.queue.max_size"),
            pool.queue.max_size.into(),
            1..=1_000_000,
        );
        self.positive(&format!("{p}.queue.timeout"), pool.queue.timeout);
        let t = &pool.timeouts;
        self.positive(&format!("{p}.timeouts.connect"), t.connect);
        self.positive(&format!("{p}.timeouts.response_header"), t.response_header);
        self.positive(&format!("{p}.timeouts.read"), t.read);
        self.positive(&format!("{p}.timeouts.idle"), t.idle);
        if pool.retry.attempts > 10 {
            self.report(
                &format!("{p}.retry.attempts"),
                Anchor::Value,
                format!(
                    "{} retries is too many; must be 0..=10",
                    pool.retry.attempts
                ),
            );
        }
        self.percent(
            &format!("{p}.retry.budget_percent"),
            pool.retry.budget_percent,
        );
        if pool.retry.max_body_bytes > MAX_BUFFERED_BODY {
            self.report(
                &format!("{p}.retry.max_body_bytes"),
                Anchor::Value,
                format!(
                    "{} is out of range; must be 0..={MAX_BUFFERED_BODY} (16 MiB)",
                    pool.retry.max_body_bytes
                ),
            );
        }
        if let Some(hc) = &pool.health_check {
            self.health_check(hc, &format!("{p}.health_check"));
        }
        let od = &pool.outlier_detection;
        let op = format!("{p}.outlier_detection");
        self.positive(&format!("{op}.base_ejection_time"), od.base_ejection_time);
        if od.max_ejection_time < od.base_ejection_time {
            self.report(
                &format!("{op}.max_ejection_time"),
                Anchor::Value,
                format!(
                    "max_ejection_time ({}) must be at least base_ejection_time ({})",
                    humantime::format_duration(od.max_ejection_time),
                    humantime::format_duration(od.base_ejection_time)
                ),
            );
        }
        self.percent(
            &format!("{op}.max_ejection_percent"),
            od.max_ejection_percent,
        );
        self.percent(&format!("{p}.panic_threshold"), pool.panic_threshold);
        self.stats(pool, &p);
        self.analysis(pool, &p);
        let dw = &pool.dynamic_weights;
        self.positive(&format!("{p}.dynamic_weights.interval"), dw.interval);
        self.number(
            &format!("{p}.dynamic_weights.smoothing"),
            dw.smoothing,
            |v| v > 0.0 && v <= 1.0,
            "greater than 0 and at most 1",
        );
        let ss = &pool.slow_start;
        self.number(
            &format!("{p}.slow_start.aggression"),
            ss.aggression,
            |v| v > 0.0,
            "greater than 0",
        );
        self.int_range(
            &format!("{p}.slow_start.min_weight_percent"),
            ss.min_weight_percent.into(),
            1..=100,
        );
        self.hash(&pool.hash, &format!("{p}.hash"));
        self.duration_class(name, pool, &p, &seen);
        let ta = &pool.tail_aware;
        self.positive(&format!("{p}.tail_aware.target_p99"), ta.target_p99);
        for (field, v) in [("beta", ta.beta), ("gamma", ta.gamma)] {
            self.number(
                &format!("{p}.tail_aware.{field}"),
                v,
                |v| v >= 0.0,
                "at least 0",
            );
        }
        self.number(
            &format!("{p}.response_time.exploration"),
            pool.response_time.exploration,
            |v| (0.0..=0.5).contains(&v),
            "0..=0.5",
        );
        self.discovery(&pool.discovery, &format!("{p}.discovery"));
        if let Some(hedge) = &pool.hedge {
            self.hedge(hedge, &format!("{p}.hedge"));
        }
    }

    fn stats(&mut self, pool: &PoolConfig, p: &str) {
        let s = &pool.stats;
        let sp = format!("{p}.stats");
        self.positive(&format!("{sp}.ewma_decay"), s.ewma_decay);
        self.positive(&format!("{sp}.latency_window"), s.latency_window);
        self.int_range(
            &format!("{sp}.stats_window"),
            s.stats_window.into(),
            1..=1024,
        );
        self.int_range(
            &format!("{sp}.max_endpoints"),
            s.max_endpoints.into(),
            1..=100_000,
        );
        self.positive(
            &format!("{sp}.long_request_threshold"),
            s.long_request_threshold,
        );
        self.number(
            &format!("{sp}.long_request_hysteresis"),
            s.long_request_hysteresis,
            |v| (0.0..1.0).contains(&v),
            "at least 0 and less than 1",
        );
    }

    fn analysis(&mut self, pool: &PoolConfig, p: &str) {
        let a = &pool.analysis;
        let ap = format!("{p}.analysis");
        let horizon = humantime::format_duration(a.horizon);
        if a.horizon.subsec_nanos() != 0 {
            self.report(
                &format!("{ap}.horizon"),
                Anchor::Value,
                format!("{horizon} is not a whole number of seconds (the history has 1 s buckets)"),
            );
        } else if !(10..=3600).contains(&a.horizon.as_secs()) {
            self.report(
                &format!("{ap}.horizon"),
                Anchor::Value,
                format!("{horizon} is out of range; must be 10s..=3600s"),
            );
        }
        for (field, v) in [("holt_alpha", a.holt_alpha), ("holt_beta", a.holt_beta)] {
            self.number(
                &format!("{ap}.{field}"),
                v,
                |v| v > 0.0 && v <= 1.0,
                "greater than 0 and at most 1",
            );
        }
        self.number(
            &format!("{ap}.anomaly_threshold"),
            a.anomaly_threshold,
            |v| v > 0.0,
            "greater than 0",
        );
        self.number(
            &format!("{ap}.min_rate"),
            a.min_rate,
            |v| v >= 0.0,
            "at least 0",
        );
    }

    fn hash(&mut self, h: &HashConfig, p: &str) {
        let name_path = format!("{p}.name");
        match (h.key, &h.name) {
            (HashKey::Header | HashKey::Cookie, None) => {
                let what = if h.key == HashKey::Header {
                    "the header to hash, e.g. x-user-id"
                } else {
                    "the cookie to hash, e.g. session"
                };
                self.diags.push(self.loc.diag(
                    &name_path,
                    &format!("{p}.key"),
                    Anchor::Value,
                    format!("hash key `{}` needs `name`, {what}", h.key.name()),
                ));
            }
            (HashKey::Header, Some(name)) if !is_token(name) => self.report(
                &name_path,
                Anchor::Value,
                format!("`{name}` is not a valid HTTP header name"),
            ),
            (HashKey::Cookie, Some(name)) if !is_token(name) => self.report(
                &name_path,
                Anchor::Value,
                format!(
                    "`{name}` is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~)"
                ),
            ),
            (HashKey::Path | HashKey::ClientIp, Some(_)) => self.report(
                &name_path,
                Anchor::Key,
                format!(
                    "`name` applies to hash keys `header` and `cookie` only; this key is `{}`",
                    h.key.name()
                ),
            ),
            _ => {}
        }
        self.number(
            &format!("{p}.bounded_load"),
            h.bounded_load,
            |v| v == 0.0 || (1.0..=100.0).contains(&v),
            "0 (unbounded) or 1.0..=100",
        );
        let table = format!("{p}.table_size");
        if !(7..=1_000_003).contains(&h.table_size) {
            self.report(
                &table,
                Anchor::Value,
                format!(
                    "{} is out of range; must be a prime in 7..=1000003",
                    h.table_size
                ),
            );
        } else if !is_prime(h.table_size) {
            let next = (h.table_size..).find(|&n| is_prime(n)).unwrap_or(1_000_003);
            self.report(
                &table,
                Anchor::Value,
                format!(
                    "{} is not a prime; the Maglev table size must be prime (the next one is {next})",
                    h.table_size
                ),
            );
        }
        self.int_range(
            &format!("{p}.points_per_weight"),
            h.points_per_weight.into(),
            1..=10_000,
        );
        if h.ring_size != 0 && !(64..=1_000_000).contains(&h.ring_size) {
            self.report(
                &format!("{p}.ring_size"),
                Anchor::Value,
                format!(
                    "{} is out of range; must be 0 (no minimum) or 64..=1000000",
                    h.ring_size
                ),
            );
        }
    }

    /// `seen` maps the pool's valid backend addresses ([`backend_key`]) to their index.
    fn duration_class(
        &mut self,
        name: &str,
        pool: &PoolConfig,
        p: &str,
        seen: &HashMap<String, usize>,
    ) {
        let sp = format!("{p}.duration_class.short_backends");
        if pool.duration_class.mode == DurationClassMode::Adaptive
            && !pool.duration_class.short_backends.is_empty()
        {
            self.report(
                &sp,
                Anchor::Key,
                "applies to `mode: static` only: adaptive mode chooses which backends serve \
                 long requests itself; remove `short_backends` or set `mode: static`"
                    .to_owned(),
            );
            return;
        }
        // Backend key → index of its first entry in `short_backends`.
        let mut listed: HashMap<String, usize> = HashMap::new();
        for (i, address) in pool.duration_class.short_backends.iter().enumerate() {
            let ep = format!("{sp}[{i}]");
            let key = check_backend_addr(address)
                .ok()
                .map(|sock| backend_key(address, sock))
                .filter(|k| seen.contains_key(k));
            match key {
                None => {
                    let known: Vec<&str> =
                        pool.backends.iter().map(|b| b.address.as_str()).collect();
                    self.report(
                        &ep,
                        Anchor::Value,
                        format!(
                            "`{address}` is not a backend of pool `{name}` (backends: {})",
                            known.join(", ")
                        ),
                    );
                }
                Some(key) => {
                    if let Some(&first) = listed.get(&key) {
                        self.report(
                            &ep,
                            Anchor::Value,
                            format!("`{address}` is listed twice (first at {sp}[{first}])"),
                        );
                    } else {
                        listed.insert(key, i);
                    }
                }
            }
        }
        if pool.backends.len() >= 2 && listed.len() == pool.backends.len() {
            self.report(
                &sp,
                Anchor::Value,
                format!(
                    "lists every backend of pool `{name}`; leave at least one for long requests"
                ),
            );
        }
    }

    fn discovery(&mut self, d: &DiscoveryConfig, p: &str) {
        if d.interval < Duration::from_millis(100) {
            self.report(
                &format!("{p}.interval"),
                Anchor::Value,
                format!("{d:?} is below the minimum of 100ms", d = d.interval),
            );
        }
        if d.source == DiscoverySource::Dns {
            for (i, server) in d.nameservers.iter().enumerate() {
                if crate::model::parse_nameserver(server).is_none() {
                    self.report(
                        &format!("{p}.nameservers[{i}]"),
                        Anchor::Value,
                        format!("name server \"{server}\" is not `ip:port` or `ip`"),
                    );
                }
            }
        } else if !d.nameservers.is_empty() {
            self.report(
                &format!("{p}.nameservers"),
                Anchor::Key,
                "`nameservers` is only used with `source: dns`".to_owned(),
            );
        }
        match d.source {
            DiscoverySource::Static => {
                if d.name.is_some() {
                    self.report(
                        &format!("{p}.name"),
                        Anchor::Key,
                        "`name` is only used with `source: dns`".to_owned(),
                    );
                }
            }
            DiscoverySource::Dns => match (&d.name, d.record) {
                (None, _) => self.report(
                    p,
                    Anchor::Key,
                    "`source: dns` needs a `name` to resolve (`host:port`, or an SRV name with \
                     `record: srv`)"
                        .to_owned(),
                ),
                (Some(name), DnsRecord::A) => {
                    if let Err(e) = check_backend_addr(name) {
                        self.report(&format!("{p}.name"), Anchor::Value, e);
                    }
                }
                (Some(name), DnsRecord::Srv) => {
                    if let Err(e) = check_dns_name(name.trim_end_matches('.')) {
                        self.report(
                            &format!("{p}.name"),
                            Anchor::Value,
                            format!("invalid SRV name \"{name}\": {e}"),
                        );
                    }
                }
            },
            DiscoverySource::Registry => {
                if d.name.is_some() {
                    self.report(
                        &format!("{p}.name"),
                        Anchor::Key,
                        "`name` is only used with `source: dns`".to_owned(),
                    );
                }
                if !matches!(
                    self.store,
                    Some(CoordinationBackend::Redis | CoordinationBackend::Etcd)
                ) {
                    self.report(
                        &format!("{p}.source"),
                        Anchor::Value,
                        "`source: registry` needs a coordination store: set \
                         `cluster.coordination.backend` to `redis` or `etcd`"
                            .to_owned(),
                    );
                }
            }
        }
    }

    fn cluster(&mut self, config: &Config) {
        let Some(c) = &config.cluster else {
            return;
        };
        let c: &ClusterConfig = c;
        if let Err(e) = check_name("node", &c.node_id) {
            self.report("cluster.node_id", Anchor::Value, e);
        } else if c.node_id.len() > 64 {
            self.report(
                "cluster.node_id",
                Anchor::Value,
                format!("is {} bytes long; at most 64", c.node_id.len()),
            );
        }
        if let Err(e) = check_name("cluster", &c.cluster_id) {
            self.report("cluster.cluster_id", Anchor::Value, e);
        }
        let g = &c.gossip;
        if g.interval < Duration::from_millis(10) || g.interval > Duration::from_secs(10) {
            self.report(
                "cluster.gossip.interval",
                Anchor::Value,
                format!("{:?} is outside 10ms..=10s", g.interval),
            );
        }
        self.number(
            "cluster.gossip.phi_threshold",
            g.phi_threshold,
            |v| v.is_finite() && v > 0.0,
            "a finite number > 0",
        );
        if g.advertise.is_none() && g.listen.ip().is_unspecified() {
            self.report(
                "cluster.gossip.listen",
                Anchor::Value,
                format!(
                    "{} cannot be advertised to other nodes; set `cluster.gossip.advertise` \
                     to the address they reach this node at",
                    g.listen
                ),
            );
        }
        if let Some(a) = g.advertise
            && (a.port() == 0 || a.ip().is_unspecified())
        {
            self.report(
                "cluster.gossip.advertise",
                Anchor::Value,
                "an unspecified address or port 0 cannot be advertised; give the address and \
                 port other nodes reach"
                    .to_owned(),
            );
        }
        for (i, seed) in g.seeds.iter().enumerate() {
            if let Err(e) = check_backend_addr(seed) {
                self.report(&format!("cluster.gossip.seeds[{i}]"), Anchor::Value, e);
            }
        }
        for (k, v) in &c.tags {
            if k.is_empty()
                || k.chars().any(|ch| ch.is_control())
                || v.chars().any(|ch| ch.is_control())
            {
                self.report(
                    "cluster.tags",
                    Anchor::Key,
                    format!("tag `{k}: {v}` is empty or has control characters"),
                );
            }
        }
        if c.publish_interval < Duration::from_millis(100) {
            self.report(
                "cluster.publish_interval",
                Anchor::Value,
                format!("{:?} is below the minimum of 100ms", c.publish_interval),
            );
        }
        self.positive("cluster.consistency_timeout", c.consistency_timeout);
        let co = &c.coordination;
        let p = "cluster.coordination";
        match co.backend {
            CoordinationBackend::None => {}
            CoordinationBackend::Redis => match &co.url {
                None => self.report(
                    p,
                    Anchor::Key,
                    "`backend: redis` needs a `url`, e.g. redis://127.0.0.1:6379".to_owned(),
                ),
                Some(url) if !(url.starts_with("redis://") || url.starts_with("rediss://")) => {
                    self.report(
                        &format!("{p}.url"),
                        Anchor::Value,
                        format!("`{url}` is not a Redis URL; e.g. redis://127.0.0.1:6379"),
                    );
                }
                Some(_) => {}
            },
            CoordinationBackend::Etcd => {
                if co.endpoints.is_empty() {
                    self.report(
                        p,
                        Anchor::Key,
                        "`backend: etcd` needs `endpoints`, e.g. [http://127.0.0.1:2379]"
                            .to_owned(),
                    );
                }
                for (i, e) in co.endpoints.iter().enumerate() {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        self.report(
                            &format!("{p}.endpoints[{i}]"),
                            Anchor::Value,
                            format!("`{e}` is not an etcd client URL; e.g. http://127.0.0.1:2379"),
                        );
                    }
                }
            }
        }
        if co.backend != CoordinationBackend::Redis && co.url.is_some() {
            self.report(
                &format!("{p}.url"),
                Anchor::Key,
                "`url` is only used with `backend: redis`".to_owned(),
            );
        }
        if co.backend != CoordinationBackend::Etcd && !co.endpoints.is_empty() {
            self.report(
                &format!("{p}.endpoints"),
                Anchor::Key,
                "`endpoints` is only used with `backend: etcd`".to_owned(),
            );
        }
        let secs = |d: Duration| d.as_secs_f64();
        if !(1.0..=60.0).contains(&secs(co.lease_ttl)) {
            self.report(
                &format!("{p}.lease_ttl"),
                Anchor::Value,
                format!("{:?} is outside 1s..=60s", co.lease_ttl),
            );
        }
        if !(1.0..=300.0).contains(&secs(co.node_ttl)) {
            self.report(
                &format!("{p}.node_ttl"),
                Anchor::Value,
                format!("{:?} is outside 1s..=300s", co.node_ttl),
            );
        }
        self.number(
            "cluster.assignments.bounded_load",
            c.assignments.bounded_load,
            |v| v.is_finite() && (1.0..=10.0).contains(&v),
            "a finite number in 1.0..=10.0",
        );
    }

    fn hedge(&mut self, h: &HedgeConfig, p: &str) {
        if let HedgeDelay::Fixed(d) = h.delay {
            self.positive(&format!("{p}.delay"), d);
        }
        self.int_range(
            &format!("{p}.budget_percent"),
            h.budget_percent.into(),
            1..=100,
        );
        if h.max_body_bytes > MAX_BUFFERED_BODY {
            self.report(
                &format!("{p}.max_body_bytes"),
                Anchor::Value,
                format!(
                    "{} is out of range; must be 0..={MAX_BUFFERED_BODY} (16 MiB)",
                    h.max_body_bytes
                ),
            );
        }
    }

    fn health_check(&mut self, hc: &HealthCheckConfig, p: &str) {
        match hc.r#type {
            HealthCheckKind::Http => {
                if !hc.path.starts_with('/') {
                    self.report(
                        &format!("{p}.path"),
                        Anchor::Value,
                        format!("health check path `{}` must start with `/`", hc.path),
                    );
                }
                if let Some(host) = &hc.host
                    && (host.is_empty()
                        || host.chars().any(|c| c.is_whitespace() || c.is_control()))
                {
                    self.report(
                        &format!("{p}.host"),
                        Anchor::Value,
                        format!("`{host}` is not a valid Host header value"),
                    );
                }
            }
            HealthCheckKind::Tcp => {
                // Defaults are fine (a serialized config writes them back); a value set on
                // purpose would be silently ignored, so it is refused.
                let defaults = HealthCheckConfig::default();
                let set = [
                    ("path", hc.path != defaults.path),
                    ("host", hc.host.is_some()),
                    (
                        "expected_status",
                        hc.expected_status != defaults.expected_status,
                    ),
                ];
                for (field, _) in set.into_iter().filter(|(_, differs)| *differs) {
                    self.report(
                        &format!("{p}.{field}"),
                        Anchor::Key,
                        format!("`{field}` applies to http health checks only; this one is tcp"),
                    );
                }
            }
        }
        self.positive(&format!("{p}.interval"), hc.interval);
        self.positive(&format!("{p}.timeout"), hc.timeout);
        if !hc.interval.is_zero() && hc.timeout >= hc.interval {
            // Point at whichever of the two the file sets (timeout first).
            let at = [format!("{p}.timeout"), format!("{p}.interval")]
                .into_iter()
                .find(|f| self.loc.is_written(f))
                .unwrap_or_else(|| format!("{p}.timeout"));
            self.report(
                &at,
                Anchor::Value,
                format!(
                    "health check timeout ({}) must be less than its interval ({})",
                    humantime::format_duration(hc.timeout),
                    humantime::format_duration(hc.interval)
                ),
            );
        }
        for (field, v) in [("rise", hc.rise), ("fall", hc.fall)] {
            if v == 0 {
                self.report(
                    &format!("{p}.{field}"),
                    Anchor::Value,
                    "must be at least 1".to_owned(),
                );
            }
        }
    }
}

/// Whether one comma-separated directive of `log.level` is a level, or names a target or
/// span explicitly (`target=level`, `target::path`, `span[...]`), rather than a bare word.
fn is_log_directive(directive: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    directive.contains(['=', ':', '[', '{'])
        || LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(addresses_conflict(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(addresses_conflict(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(addresses_conflict(a("127.0.0.1:80"), a("0.0.0.0:80")));
        assert!(!addresses_conflict(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!addresses_conflict(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(!addresses_conflict(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!addresses_conflict(a("[::]:80"), a("127.0.0.1:80")));
        assert!(addresses_conflict(a("[::]:80"), a("[::1]:80")));
    }

    #[test]
    fn names() {
        assert!(check_name("pool", "api-v2.eu_1").is_ok());
        assert!(check_name("pool", "").unwrap_err().contains("empty"));
        assert!(
            check_name("pool", "a b")
                .unwrap_err()
                .contains("contains ` `")
        );
    }

    #[test]
    fn backend_keys_ignore_case_and_a_trailing_dot() {
        let key = |a: &str| backend_key(a, check_backend_addr(a).unwrap());
        assert_eq!(key("Api.Internal.:8080"), key("api.internal:8080"));
        assert_ne!(key("api.internal:8080"), key("api.internal:8081"));
        assert_eq!(key("[0::1]:9"), key("[::1]:9"));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        // The Maglev paper's table sizes and the upper bound of `hash.table_size`.
        assert!(is_prime(65537) && is_prime(655_373) && is_prime(1_000_003));
        assert!(!is_prime(65536) && !is_prime(1_000_001));
    }

    #[test]
    fn non_finite_numbers_are_written_as_yaml() {
        assert_eq!(yaml_float(f64::NAN), ".nan");
        assert_eq!(yaml_float(f64::INFINITY), ".inf");
        assert_eq!(yaml_float(f64::NEG_INFINITY), "-.inf");
        assert_eq!(yaml_float(0.25), "0.25");
    }
}
