//! Request routing: a listener's ordered routes, first match wins.
//!
//! A route matches on any combination of host (exact, or `*.suffix` wildcard; compared
//! case-insensitively without the port), path prefix and one header (name, and optionally
//! an exact value); a route with no conditions matches everything. Each route holds its
//! pool directly, so routing a request costs a few comparisons and no map lookup.

use std::sync::Arc;

use http::header::{HOST, HeaderName, HeaderValue};
use http::request::Parts;

use crate::normalize::PathNormalization;
use crate::state::Pool;

/// How a route matches the request host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// The host equals this (lowercase, no port).
    Exact(String),
    /// The host ends with this suffix, which starts with `.` (from `*.example.com`); the
    /// bare domain does not match, as in nginx `server_name` wildcards.
    Suffix(String),
}

impl HostMatch {
    /// Parses `example.com` or `*.example.com` (lowercased).
    pub fn parse(pattern: &str) -> Self {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostMatch::Suffix(suffix.to_owned()),
            _ => HostMatch::Exact(pattern),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(exact) => host.eq_ignore_ascii_case(exact),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// One route: conditions and the pool it sends matching requests to.
#[derive(Clone, Debug)]
pub struct Route {
    /// Host condition.
    pub host: Option<HostMatch>,
    /// Path prefix condition (starts with `/`).
    pub path_prefix: Option<String>,
    /// Header condition: name, and exact value if any.
    pub header: Option<(HeaderName, Option<HeaderValue>)>,
    /// Destination pool.
    pub pool: Arc<Pool>,
    /// Tags a backend must carry to serve this route; `None` = any backend of the pool.
    pub backend_tags: Option<Arc<std::collections::BTreeMap<String, String>>>,
    /// The route's local rate limit, if any.
    pub rate_limit: Option<Arc<crate::ratelimit::RouteLimiter>>,
}

impl Route {
    fn matches(&self, parts: &Parts) -> bool {
        if let Some(host) = &self.host {
            // A fully qualified `api.example.com.` is the same host (RFC 1034 §3.1).
            match request_host(parts).map(|h| h.strip_suffix('.').unwrap_or(h)) {
                Some(h) if host.matches(h) => {}
                _ => return false,
            }
        }
        if let Some(prefix) = &self.path_prefix
            && !parts.uri.path().starts_with(prefix.as_str())
        {
            return false;
        }
        if let Some((name, value)) = &self.header {
            // Any of the header's fields may match (HAProxy's `hdr()`): the order in
            // which a client repeats a header does not decide the route.
            let matched = match value {
                None => parts.headers.contains_key(name),
                Some(want) => parts.headers.get_all(name).iter().any(|got| got == want),
            };
            if !matched {
                return false;
            }
        }
        true
    }
}

/// The host a request is for, without port: the target's authority (HTTP/2
/// `:authority`, an HTTP/1 absolute-form target), which wins over `Host` (RFC 9113
/// §8.3.1, RFC 9112 §3.2.2), else the `Host` field.
pub fn request_host(parts: &Parts) -> Option<&str> {
    let raw = match parts.uri.authority() {
        Some(authority) => authority.as_str(),
        None => parts.headers.get(HOST).and_then(|h| h.to_str().ok())?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [IPv6]:port
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

/// A listener's routes in order.
#[derive(Clone, Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// How request paths are normalized before [`Router::route`].
    pub path_normalization: PathNormalization,
    /// Whether each request of the listener writes an access-log line
    /// ([`crate::body::AccessEntry`]).
    pub access_log: bool,
}

impl Router {
    /// A router over `routes`, tried in order, without path normalization or access log.
    pub fn new(routes: Vec<Route>) -> Self {
        Self {
            routes,
            path_normalization: PathNormalization::default(),
            access_log: false,
        }
    }

    /// The same router with `normalization` applied to request paths first.
    #[must_use]
    pub fn with_path_normalization(mut self, normalization: PathNormalization) -> Self {
        self.path_normalization = normalization;
        self
    }

    /// The first route matching the request, if any.
    #[inline]
    pub fn route(&self, parts: &Parts) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(parts))
    }

    /// All routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn pool(name: &str) -> Arc<Pool> {
        Arc::new(crate::state::tests::empty_pool(name))
    }

    fn parts(uri: &str, host: Option<&str>, header: Option<(&str, &str)>) -> Parts {
        let mut b = Request::get(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        if let Some((n, v)) = header {
            b = b.header(n, v);
        }
        b.body(()).expect("valid request").into_parts().0
    }

    fn router() -> Router {
        Router::new(vec![
            Route {
                host: Some(HostMatch::parse("API.example.com")),
                path_prefix: Some("/v2".into()),
                header: None,
                pool: pool("api-v2"),
                backend_tags: None,
                rate_limit: None,
            },
            Route {
                host: None,
                path_prefix: None,
                header: Some((
                    HeaderName::from_static("x-canary"),
                    Some(HeaderValue::from_static("1")),
                )),
                pool: pool("canary"),
                backend_tags: None,
                rate_limit: None,
            },
            Route {
                host: Some(HostMatch::parse("*.example.com")),
                path_prefix: None,
                header: None,
                pool: pool("wild"),
                backend_tags: None,
                rate_limit: None,
            },
            Route {
                host: None,
                path_prefix: Some("/static/".into()),
                header: None,
                pool: pool("static"),
                backend_tags: None,
                rate_limit: None,
            },
        ])
    }

    fn routed(r: &Router, p: &Parts) -> Option<String> {
        r.route(p).map(|route| route.pool.name().to_owned())
    }

    #[test]
    fn first_match_wins() {
        let r = router();
        assert_eq!(
            routed(&r, &parts("/v2/users", Some("api.example.com:8080"), None)).as_deref(),
            Some("api-v2")
        );
        assert_eq!(
            routed(&r, &parts("/v1/users", Some("api.example.com"), None)).as_deref(),
            Some("wild")
        );
        assert_eq!(
            routed(
                &r,
                &parts(
                    "/v2/users",
                    Some("api.example.com"),
                    Some(("x-canary", "1"))
                )
            )
            .as_deref(),
            Some("api-v2")
        );
        assert_eq!(
            routed(&r, &parts("/x", Some("other.org"), Some(("x-canary", "1")))).as_deref(),
            Some("canary")
        );
        assert_eq!(
            routed(&r, &parts("/x", Some("other.org"), Some(("x-canary", "2")))),
            None
        );
        assert_eq!(
            routed(&r, &parts("/static/a.css", Some("other.org"), None)).as_deref(),
            Some("static")
        );
    }

    #[test]
    fn wildcard_does_not_match_bare_domain() {
        let r = router();
        assert_eq!(routed(&r, &parts("/", Some("example.com"), None)), None);
        assert_eq!(
            routed(&r, &parts("/", Some("a.b.EXAMPLE.com"), None)).as_deref(),
            Some("wild")
        );
    }

    #[test]
    fn h2_authority_is_the_host() {
        let r = router();
        let p = Request::get("http://api.example.com/v2/x")
            .body(())
            .expect("valid request")
            .into_parts()
            .0;
        assert_eq!(routed(&r, &p).as_deref(), Some("api-v2"));
    }

    #[test]
    fn ports_and_ipv6_are_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
    }

    #[test]
    fn a_trailing_dot_and_any_repeated_header_field_match() {
        let r = router();
        assert_eq!(
            routed(&r, &parts("/v2/x", Some("api.example.com.:443"), None)).as_deref(),
            Some("api-v2")
        );
        assert_eq!(routed(&r, &parts("/", Some(".example.com"), None)), None);
        for order in [["0", "1"], ["1", "0"]] {
            let p = Request::get("/x")
                .header("host", "other.org")
                .header("x-canary", order[0])
                .header("x-canary", order[1])
                .body(())
                .expect("valid request")
                .into_parts()
                .0;
            assert_eq!(routed(&r, &p).as_deref(), Some("canary"), "{order:?}");
        }
    }
}
