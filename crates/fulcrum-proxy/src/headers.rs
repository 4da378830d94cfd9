//! Header rewriting between client and backend.
//!
//! A proxy is an intermediary in the sense of RFC 9110 §7.6: it must not forward the
//! connection-specific ("hop-by-hop") fields of one connection to the next. Those are the
//! `Connection` field, every field it names, and the fields RFC 9110 §7.6.1 and RFC 9112
//! define as hop-by-hop: `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding` and
//! `Upgrade` (kept only to carry a protocol upgrade such as WebSocket, RFC 9110 §7.8).
//! hyper re-frames bodies itself, so dropping `Transfer-Encoding` loses nothing. `Expect`
//! is answered by this proxy (hyper sends `100 Continue` when the body is first read), so
//! it is not forwarded either, as Envoy does.
//!
//! Toward the backend Fulcrum sets the de-facto `X-Forwarded-For` (appending the client
//! address), `X-Forwarded-Proto` and `X-Forwarded-Host` fields, and turns the request
//! target into origin form (`/path?query`) over HTTP/1.1, with `Host` taken from the
//! HTTP/2 `:authority` when the client spoke HTTP/2.

use http::header::{
    CONNECTION, CONTENT_LENGTH, COOKIE, EXPECT, HOST, HeaderMap, HeaderName, HeaderValue, TE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{StatusCode, Uri, Version, request, response};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Client-Cert` (Envoy's name and format), set on listeners that verify
/// client certificates.
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// The connection-specific and forwarding fields a message carries, found in one pass
/// over its field names, so that only the fields actually present are looked up again.
/// (Each `HeaderMap` lookup hashes the name; most messages carry none of these.)
#[derive(Clone, Copy, Default)]
struct Present {
    connection: bool,
    keep_alive: bool,
    proxy_connection: bool,
    te: bool,
    transfer_encoding: bool,
    upgrade: bool,
    expect: bool,
    host: bool,
    forwarded_for: bool,
}

impl Present {
    fn scan(headers: &HeaderMap) -> Self {
        let mut p = Present::default();
        for name in headers.keys() {
            // Standard names compare by tag; the custom ones by bytes, after a length check.
            if name == CONNECTION {
                p.connection = true;
            } else if name == HOST {
                p.host = true;
            } else if name == TE {
                p.te = true;
            } else if name == TRANSFER_ENCODING {
                p.transfer_encoding = true;
            } else if name == UPGRADE {
                p.upgrade = true;
            } else if name == EXPECT {
                p.expect = true;
            } else if *name == KEEP_ALIVE {
                p.keep_alive = true;
            } else if *name == PROXY_CONNECTION {
                p.proxy_connection = true;
            } else if *name == X_FORWARDED_FOR {
                p.forwarded_for = true;
            }
        }
        p
    }
}

/// Removes the fields named by `Connection` and then the fixed hop-by-hop fields present.
/// Returns whether the message asked for a protocol upgrade (`Connection: upgrade` with an
/// `Upgrade` field) and `allow_upgrade` holds; the `Upgrade` field is then kept and
/// `Connection: upgrade` restored.
fn strip_hop_by_hop(headers: &mut HeaderMap, present: Present, allow_upgrade: bool) -> bool {
    let mut upgrade_requested = false;
    if present.connection {
        // Header values are reference-counted, so these clones do not copy; the Vec is
        // only needed for the rare message with several Connection fields.
        let mut values = headers.get_all(CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        headers.remove(CONNECTION);
        for value in first.iter().chain(rest.iter()) {
            let Ok(list) = value.to_str() else { continue };
            for token in list_items(list) {
                if token.eq_ignore_ascii_case("upgrade") {
                    upgrade_requested = true;
                } else if !token.eq_ignore_ascii_case("keep-alive")
                    && !token.eq_ignore_ascii_case("close")
                    // An end-to-end field a sender must not nominate (RFC 9110 §7.6.1),
                    // and one routing has used: dropping it would send the backend its
                    // own address as the host (its default virtual host).
                    && !token.eq_ignore_ascii_case("host")
                {
                    // Lookup by &str is case-insensitive and does not allocate.
                    headers.remove(token);
                }
            }
        }
    }
    if present.keep_alive {
        headers.remove(&KEEP_ALIVE);
    }
    if present.proxy_connection {
        headers.remove(&PROXY_CONNECTION);
    }
    if present.te {
        headers.remove(TE);
    }
    if present.transfer_encoding {
        headers.remove(TRANSFER_ENCODING);
    }
    // HTTP/2 over cleartext by Upgrade (RFC 7540 §3.2, removed in RFC 9113) is never
    // tunnelled: a backend that accepts it would take the connection past every route,
    // header and rate-limit decision (h2c smuggling). The request goes on as a plain
    // HTTP/1.1 request, as Envoy and HAProxy do.
    let upgrading = allow_upgrade && upgrade_requested && present.upgrade && !requests_h2c(headers);
    if upgrading {
        headers.insert(CONNECTION, UPGRADE_TOKEN.clone());
    } else if present.upgrade {
        headers.remove(UPGRADE);
    }
    upgrading
}

/// `host[:port]` per RFC 3986 §3.2.2–3.2.3 (empty allowed: RFC 9112 §3.2). One pass
/// over a reg-name or IPv4 host (every request's path); IP literals apart.
fn valid_host(value: &[u8]) -> bool {
    if value.first() == Some(&b'[') {
        return valid_ip_literal_host(value);
    }
    let mut colon = None;
    for (i, &b) in value.iter().enumerate() {
        if b == b':' {
            if colon.is_some() {
                return false;
            }
            colon = Some(i);
        } else if !REG_NAME[usize::from(b)] {
            return false;
        }
    }
    colon.is_none_or(|c| valid_port(&value[c + 1..]))
}

/// `[IPv6 or IPvFuture][:port]`, loosely: the literal's characters, then a port.
#[cold]
fn valid_ip_literal_host(value: &[u8]) -> bool {
    let Some(end) = value.iter().position(|&b| b == b']') else {
        return false;
    };
    let literal = &value[1..end];
    if literal.is_empty()
        || !literal
            .iter()
            .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'))
    {
        return false;
    }
    match &value[end + 1..] {
        [] => true,
        [b':', port @ ..] => valid_port(port),
        _ => false,
    }
}

/// A port: empty (the grammar allows it) or up to 65535.
fn valid_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65_535
}

/// The bytes of a reg-name (RFC 3986 §3.2.2): unreserved, pct-encoded (`%` and hex
/// digits) and sub-delims.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// The items of a comma-separated field value (RFC 9110 §5.6.1), trimmed, empty ones
/// skipped.
fn list_items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// Whether an `Upgrade` field names `h2c`.
fn requests_h2c(headers: &HeaderMap) -> bool {
    headers.get_all(UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|list| list_items(list).any(|token| token.eq_ignore_ascii_case("h2c")))
    })
}

/// What [`prepare_request`] found out about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// A protocol upgrade request (HTTP/1.1 `Upgrade`, e.g. WebSocket).
    pub upgrading: bool,
    /// The request names no host at all (an HTTP/1.0 request without `Host`): the
    /// forwarder sets `Host` to the backend's address, as nginx does, because HTTP/1.1
    /// requires it.
    pub needs_host: bool,
    /// The request body has a transfer coding other than `chunked` (e.g. `gzip,
    /// chunked`): Fulcrum would forward the decoded chunks under `chunked` alone and so
    /// silently drop the other coding, so such a request is refused with 501 (RFC 9112
    /// §6.1: a coding the server does not understand).
    pub unsupported_coding: bool,
    /// Why an HTTP/1 request's `Host` is refused (RFC 9112 §3.2), for a 400: more than one
    /// `Host` field (a router and a backend could read different ones), none in
    /// HTTP/1.1, or a value that is not `host[:port]` (RFC 3986 §3.2.2). An
    /// absolute-form target's authority replaces `Host` (§3.2.2), so it is not checked.
    pub host_problem: Option<&'static str>,
    /// The client sent `TE: trailers` (every gRPC client does). `TE` is hop-by-hop and
    /// removed, but over HTTP/2 `te: trailers` is the one value allowed (RFC 9113
    /// §8.2.2), and gRPC servers require it, so it is sent on to HTTP/2 backends.
    pub te_trailers: bool,
}

/// Rewrites a client request head for the backend.
///
/// `client_ip` is the client's address as a header value (made once per connection);
/// `proto` is `http` or `https`.
pub fn prepare_request(
    parts: &mut request::Parts,
    client_ip: &HeaderValue,
    proto: &'static str,
) -> Prepared {
    let present = Present::scan(&parts.headers);
    let unsupported_coding = present.transfer_encoding && !only_chunked(&parts.headers);
    let from_h1 = parts.version == Version::HTTP_11 || parts.version == Version::HTTP_10;
    let te_trailers = present.te && asks_trailers(&parts.headers);
    let upgrading = strip_hop_by_hop(&mut parts.headers, present, from_h1);
    if present.expect {
        parts.headers.remove(EXPECT);
    }

    // The target's authority (HTTP/2 `:authority`, an HTTP/1 absolute-form target) wins
    // over `Host` (RFC 9113 §8.3.1, RFC 9112 §3.2.2) and replaces it.
    let authority = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let mut host_problem = None;
    let host =
        if let Some(authority) = authority {
            // Checked as `Host` is: no userinfo (RFC 9110 §4.2.4, RFC 9113 §8.3.1), a valid
            // port; and an absolute-form target names an HTTP scheme.
            if !valid_host(authority.as_bytes()) {
                host_problem = Some("the request target's authority is not a valid host[:port]");
            } else if parts.uri.scheme_str().is_some_and(|s| {
                !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https")
            }) {
                host_problem = Some("the request target's scheme is not http or https");
            }
            parts.headers.insert(HOST, authority.clone());
            Some(authority)
        } else if present.host {
            // Repeated fields make the map hold more values than names; only then look.
            if from_h1
                && parts.headers.len() != parts.headers.keys_len()
                && parts.headers.get_all(HOST).iter().nth(1).is_some()
            {
                host_problem = Some("more than one Host field");
            }
            let host = parts.headers.get(HOST).cloned();
            if from_h1
                && host_problem.is_none()
                && host.as_ref().is_some_and(|h| !valid_host(h.as_bytes()))
            {
                host_problem = Some("the Host field is not a valid host[:port]");
            }
            host
        } else {
            if parts.version == Version::HTTP_11 {
                host_problem = Some("no Host field (HTTP/1.1 requires one)");
            }
            None
        };
    let needs_host = host.is_none();
    if let Some(host) = host {
        parts.headers.insert(&X_FORWARDED_HOST, host);
    }
    parts
        .headers
        .insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if present.forwarded_for {
        append_forwarded_for(&mut parts.headers, client_ip);
    } else {
        parts.headers.insert(&X_FORWARDED_FOR, client_ip.clone());
    }

    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = origin_form(&parts.uri);
    }
    // HTTP/2 may split `Cookie` into one field per cookie; toward HTTP/1.1 they must be
    // one field, joined with "; " (RFC 9113 §8.2.3). Repeated fields make the map hold
    // more values than names; only then look.
    if !from_h1 && parts.headers.len() != parts.headers.keys_len() {
        join_cookies(&mut parts.headers);
    }
    parts.version = Version::HTTP_11;
    Prepared {
        upgrading,
        needs_host,
        unsupported_coding,
        host_problem,
        te_trailers,
    }
}

/// Joins several `Cookie` fields into one, separated by `"; "` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    // Valid field bytes joined by "; " are valid field bytes.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// Whether a `TE` field lists `trailers`.
fn asks_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(TE).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|list| list_items(list).any(|c| c.eq_ignore_ascii_case("trailers")))
    })
}

/// `te: trailers`, sent on to HTTP/2 backends for clients that asked for trailers.
pub static TE_TRAILERS: HeaderValue = HeaderValue::from_static("trailers");

/// Turns a request prepared for an HTTP/1.1 backend (origin-form target, `Host`) into
/// HTTP/2 form (RFC 9113 §8.3.1): an absolute target whose scheme (`https` over TLS,
/// `http` otherwise) and authority become `:scheme` and `:authority`; `Host` then goes,
/// as the authority replaces it. A request whose `Host` is not a valid authority keeps
/// its field and is sent with `:scheme` alone (the h2 crate's form for forwarded
/// HTTP/1 requests).
pub fn to_h2_request<B>(request: &mut http::Request<B>, https: bool) {
    if request.uri().authority().is_some() {
        return;
    }
    let Some(authority) = request
        .headers()
        .get(HOST)
        .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok())
    else {
        return;
    };
    let mut target = http::uri::Parts::default();
    target.scheme = Some(if https {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    target.authority = Some(authority);
    target.path_and_query = Some(
        request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    if let Ok(uri) = Uri::from_parts(target) {
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        request.headers_mut().remove(HOST);
    }
}

/// Whether every `Transfer-Encoding` coding is `chunked`.
fn only_chunked(headers: &HeaderMap) -> bool {
    headers.get_all(TRANSFER_ENCODING).iter().all(|value| {
        value
            .to_str()
            .is_ok_and(|list| list_items(list).all(|c| c.eq_ignore_ascii_case("chunked")))
    })
}

/// Appends `client_ip` to `X-Forwarded-For`, joining multiple existing fields into one
/// list (RFC 9110 §5.3 allows either form).
fn append_forwarded_for(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    let mut joined = Vec::with_capacity(64);
    for value in headers.get_all(&X_FORWARDED_FOR) {
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if !joined.is_empty() {
        // Empty when the client named X-Forwarded-For in `Connection` (already removed).
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(client_ip.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(value) => {
            headers.insert(&X_FORWARDED_FOR, value);
        }
        // Existing values were valid header bytes, as is the address: cannot fail, but a
        // replacement beats a panic.
        Err(_) => {
            headers.insert(&X_FORWARDED_FOR, client_ip.clone());
        }
    }
}

/// `/path?query` of `uri` (`/` if it has none).
fn origin_form(uri: &Uri) -> Uri {
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    path.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

/// Rewrites a backend response head for the client: hop-by-hop fields removed; for a
/// `101 Switching Protocols` answer to an upgrade request, `Upgrade` and
/// `Connection: upgrade` are kept. `to_h1` says whether the client speaks HTTP/1.x
/// (HTTP/2 forbids connection-specific fields altogether).
pub fn prepare_response(parts: &mut response::Parts, upgrading: bool, to_h1: bool) {
    let allow_upgrade = upgrading && to_h1 && parts.status == StatusCode::SWITCHING_PROTOCOLS;
    let present = Present::scan(&parts.headers);
    if present.transfer_encoding {
        // A message with both is framed by `Transfer-Encoding` (which hyper decoded);
        // forwarding the `Content-Length` would misframe it for the client (RFC 9112
        // §6.3: an intermediary must remove it).
        parts.headers.remove(CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers, present, allow_upgrade);
    // Fulcrum answers in its own protocol version, whatever the backend's: an HTTP/1.0
    // backend's answer went to HTTP/1.1 clients with an `HTTP/1.0` status line, so
    // hyper could not re-frame a body without length and closed the connection.
    parts.version = Version::HTTP_11;
}

/// Removes the fields whose name is `name` (lowercase, with `-`) spelt with `_` in
/// place of one or more `-` (`X_Forwarded_Client_Cert`): CGI-style servers (PHP, WSGI)
/// map both spellings to the same variable, so a client could pass a forged value past
/// a proxy that removed only the dashed one.
pub fn remove_underscore_twin(headers: &mut HeaderMap, name: &str) {
    let twins: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.len() == name.len()
                && k.contains('_')
                && k.bytes()
                    .zip(name.bytes())
                    .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
        })
        .cloned()
        .collect();
    for twin in twins {
        headers.remove(&twin);
    }
}

/// Whether `fields` (a response head, for a "trailers-only" answer, or trailers) carry a
/// gRPC status that is the server's failure: those Envoy maps to a 5xx for outlier
/// detection (`grpc::Utility::grpcToHttpStatus`) — UNKNOWN (2), DEADLINE_EXCEEDED (4),
/// UNIMPLEMENTED (12), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15). Codes that are
/// the client's (INVALID_ARGUMENT, NOT_FOUND, …) are not.
pub fn grpc_server_error(fields: &HeaderMap) -> bool {
    fields
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok())
        .is_some_and(|code| matches!(code, 2 | 4 | 12..=15))
}

/// Whether a response head is a gRPC answer whose status comes in the trailers: content
/// type `application/grpc` (or `application/grpc+proto`, …) and no `grpc-status` in the
/// head (gRPC over HTTP/2 spec: "Response-Headers *Length-Prefixed-Message Trailers").
pub fn grpc_status_in_trailers(head: &HeaderMap) -> bool {
    head.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        && !head.contains_key(&GRPC_STATUS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(req: Request<()>) -> request::Parts {
        req.into_parts().0
    }

    fn ip() -> HeaderValue {
        HeaderValue::from_static("10.0.0.7")
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut p = parts(
            Request::get("/a?b=1")
                .header("connection", "keep-alive, X-Secret")
                .header("keep-alive", "timeout=5")
                .header("x-secret", "1")
                .header("te", "trailers")
                .header("transfer-encoding", "chunked")
                .header("upgrade", "h2c")
                .header("proxy-connection", "keep-alive")
                .header("expect", "100-continue")
                .header("x-kept", "yes")
                .body(())
                .expect("valid request"),
        );
        assert!(!prepare_request(&mut p, &ip(), "http").upgrading);
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
            "expect",
        ] {
            assert!(!p.headers.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(p.headers["x-kept"], "yes");
        assert_eq!(p.uri, "/a?b=1");
    }

    #[test]
    fn sets_forwarded_fields() {
        let mut p = parts(
            Request::get("/")
                .header("host", "shop.example:8080")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-forwarded-proto", "https")
                .body(())
                .expect("valid request"),
        );
        prepare_request(&mut p, &ip(), "http");
        assert_eq!(p.headers["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "shop.example:8080");
        assert_eq!(p.headers["host"], "shop.example:8080");
    }

    #[test]
    fn forwarded_for_named_in_connection_is_replaced_not_joined() {
        let mut p = parts(
            Request::get("/")
                .header("connection", "x-forwarded-for")
                .header("x-forwarded-for", "6.6.6.6")
                .body(())
                .expect("valid request"),
        );
        prepare_request(&mut p, &ip(), "http");
        assert_eq!(p.headers["x-forwarded-for"], "10.0.0.7");
    }

    #[test]
    fn a_request_without_any_host_is_flagged() {
        let mut p = parts(
            Request::get("/")
                .version(Version::HTTP_10)
                .body(())
                .expect("valid request"),
        );
        let prepared = prepare_request(&mut p, &ip(), "http");
        assert!(prepared.needs_host);
        assert!(!p.headers.contains_key("x-forwarded-host"));
        let mut p = parts(
            Request::get("/")
                .header("host", "a")
                .body(())
                .expect("valid request"),
        );
        assert!(!prepare_request(&mut p, &ip(), "http").needs_host);
    }

    #[test]
    fn joins_multiple_forwarded_for_fields() {
        let mut p = parts(
            Request::get("/")
                .header("x-forwarded-for", "1.1.1.1")
                .header("x-forwarded-for", "2.2.2.2")
                .body(())
                .expect("valid request"),
        );
        prepare_request(&mut p, &ip(), "http");
        assert_eq!(p.headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(p.headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.7");
    }

    #[test]
    fn h2_request_gets_host_and_origin_form() {
        let mut p = parts(
            Request::get("http://api.example:9000/v1/x?y=2")
                .version(Version::HTTP_2)
                .body(())
                .expect("valid request"),
        );
        prepare_request(&mut p, &ip(), "http");
        assert_eq!(p.uri, "/v1/x?y=2");
        assert_eq!(p.headers["host"], "api.example:9000");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn websocket_upgrade_is_kept() {
        let mut p = parts(
            Request::get("/ws")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .body(())
                .expect("valid request"),
        );
        assert!(prepare_request(&mut p, &ip(), "http").upgrading);
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.headers["upgrade"], "websocket");
        assert!(p.headers.contains_key("sec-websocket-key"));
    }

    #[test]
    fn host_syntax() {
        for good in [
            &b""[..],
            b"api.example.com",
            b"api.example.com:8080",
            b"127.0.0.1:80",
            b"[::1]:8443",
            b"[2001:db8::1]",
            b"a_b-c.example",
            b"host:",
        ] {
            assert!(valid_host(good), "{:?}", String::from_utf8_lossy(good));
        }
        for bad in [
            &b"evil.com/.example.com"[..],
            b"evil.com?.example.com",
            b"evil.com#.example.com",
            b"a b.example.com",
            b"evil@a.example.com",
            b"a.example.com:99999",
            b"a.example.com:8o",
            b"[::1",
            b"[::1]x",
            b"[]",
        ] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn one_valid_host_field_and_absolute_form_wins() {
        let problem = |builder: http::request::Builder| {
            let mut p = parts(builder.body(()).expect("valid"));
            let problem = prepare_request(&mut p, &ip(), "http").host_problem;
            (problem, p.headers.get("host").cloned())
        };
        let (bad, _) = problem(
            Request::get("/")
                .header("host", "a.example")
                .header("host", "b.example"),
        );
        assert_eq!(bad, Some("more than one Host field"));
        let (bad, _) = problem(Request::get("/").version(Version::HTTP_11));
        assert!(bad.is_some());
        let (fine, _) = problem(Request::get("/").version(Version::HTTP_10));
        assert_eq!(fine, None);
        let (bad, _) = problem(Request::get("/").header("host", "evil.com/x"));
        assert!(bad.is_some());
        let (fine, host) =
            problem(Request::get("http://target.example/x").header("host", "other.example"));
        assert_eq!(fine, None);
        assert_eq!(host.expect("host"), "target.example");
    }

    #[test]
    fn a_target_authority_is_checked_as_host_is() {
        let problem = |builder: http::request::Builder| {
            let mut p = parts(builder.body(()).expect("valid"));
            prepare_request(&mut p, &ip(), "http").host_problem
        };
        for bad in [
            "http://user:pw@abs.example/x",
            "http://a.example:99999/x",
            "ftp://a.example/x",
        ] {
            assert!(problem(Request::get(bad)).is_some(), "{bad}");
        }
        // HTTP/2's :authority too.
        let h2 = Request::get("https://u@a.example/x").version(Version::HTTP_2);
        assert!(problem(h2).is_some());
        let h2 = Request::get("https://a.example:8443/x").version(Version::HTTP_2);
        assert_eq!(problem(h2), None);
    }

    #[test]
    fn host_named_in_connection_is_kept() {
        let mut p = parts(
            Request::get("/")
                .header("host", "tenant-a.example")
                .header("connection", "host, x-drop")
                .header("x-drop", "1")
                .body(())
                .expect("valid request"),
        );
        assert_eq!(prepare_request(&mut p, &ip(), "http").host_problem, None);
        assert_eq!(p.headers["host"], "tenant-a.example");
        assert_eq!(p.headers["x-forwarded-host"], "tenant-a.example");
        assert!(!p.headers.contains_key("x-drop"));
    }

    #[test]
    fn http2_cookie_fields_become_one_for_http1() {
        let mut p = parts(
            Request::get("https://a.example/")
                .version(Version::HTTP_2)
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .header("cookie", "c=3")
                .body(())
                .expect("valid request"),
        );
        prepare_request(&mut p, &ip(), "https");
        let cookies: Vec<_> = p.headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        // HTTP/1.1 clients' fields are theirs to frame (RFC 6265 asks for one field).
        let mut p = parts(
            Request::get("/")
                .header("host", "a.example")
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(())
                .expect("valid request"),
        );
        prepare_request(&mut p, &ip(), "http");
        assert_eq!(p.headers.get_all("cookie").iter().count(), 2);
    }

    #[test]
    fn a_response_with_content_length_and_transfer_encoding_loses_the_length() {
        let (mut p, ()) = http::Response::builder()
            .header("content-length", "50")
            .header("transfer-encoding", "chunked")
            .body(())
            .expect("valid response")
            .into_parts();
        prepare_response(&mut p, false, true);
        assert!(!p.headers.contains_key("content-length"));
        assert!(!p.headers.contains_key("transfer-encoding"));
    }

    #[test]
    fn codings_other_than_chunked_are_flagged() {
        let coded = |te: &str| {
            let mut p = parts(
                Request::post("/x")
                    .header("transfer-encoding", te)
                    .body(())
                    .expect("valid request"),
            );
            prepare_request(&mut p, &ip(), "http").unsupported_coding
        };
        assert!(!coded("chunked"));
        assert!(!coded("Chunked"));
        assert!(coded("gzip, chunked"));
        assert!(coded("deflate,chunked"));
    }

    #[test]
    fn h2c_upgrade_is_refused_and_stripped() {
        let mut p = parts(
            Request::get("/x")
                .header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", "h2c")
                .header("http2-settings", "AAMAAABkAAQAAP__")
                .body(())
                .expect("valid request"),
        );
        assert!(!prepare_request(&mut p, &ip(), "http").upgrading);
        assert!(!p.headers.contains_key("upgrade"));
        assert!(!p.headers.contains_key("http2-settings"));
        assert!(!p.headers.contains_key("connection"));
    }

    #[test]
    fn response_hop_by_hop_removed_but_101_upgrade_kept() {
        let (mut p, ()) = http::Response::builder()
            .header("connection", "close")
            .header("keep-alive", "timeout=5")
            .header("transfer-encoding", "chunked")
            .header("x-app", "1")
            .body(())
            .expect("valid response")
            .into_parts();
        prepare_response(&mut p, false, true);
        assert!(!p.headers.contains_key("connection"));
        assert!(!p.headers.contains_key("keep-alive"));
        assert!(!p.headers.contains_key("transfer-encoding"));
        assert_eq!(p.headers["x-app"], "1");

        let (mut p, ()) = http::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("valid response")
            .into_parts();
        prepare_response(&mut p, true, true);
        assert_eq!(p.headers["upgrade"], "websocket");
        assert_eq!(p.headers["connection"], "upgrade");
    }

    #[test]
    fn http2_form_takes_the_authority_from_host_and_keeps_te_trailers_apart() {
        let mut p = parts(
            Request::post("/pkg.Svc/Call?x=1")
                .header("host", "api.example:8443")
                .header("te", "trailers")
                .body(())
                .expect("valid request"),
        );
        let prepared = prepare_request(&mut p, &ip(), "https");
        assert!(prepared.te_trailers);
        assert!(
            !p.headers.contains_key("te"),
            "TE is hop-by-hop toward HTTP/1.1"
        );
        let mut request = Request::from_parts(p, ());
        to_h2_request(&mut request, true);
        assert_eq!(request.uri(), "https://api.example:8443/pkg.Svc/Call?x=1");
        assert_eq!(request.version(), Version::HTTP_2);
        assert!(!request.headers().contains_key("host"));
        // Applied twice (a retried request) it changes nothing.
        to_h2_request(&mut request, false);
        assert_eq!(request.uri(), "https://api.example:8443/pkg.Svc/Call?x=1");

        // No TE: trailers asked for; a Host that is no authority stays as it is.
        let mut p = parts(
            Request::get("/")
                .header("host", "bad host")
                .header("te", "gzip")
                .body(())
                .expect("valid request"),
        );
        assert!(!prepare_request(&mut p, &ip(), "http").te_trailers);
        let mut request = Request::from_parts(p, ());
        to_h2_request(&mut request, false);
        assert_eq!(request.uri(), "/");
        assert_eq!(request.headers()["host"], "bad host");
    }

    #[test]
    fn underscore_spellings_of_a_header_are_removed() {
        let mut h = HeaderMap::new();
        for name in [
            "x_forwarded_client_cert",
            "x-forwarded_client-cert",
            "x-forwarded-client-certs",
            "x_forwarded_for",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_static("Hash=evil"),
            );
        }
        remove_underscore_twin(&mut h, "x-forwarded-client-cert");
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-forwarded-client-certs", "x_forwarded_for"]);
    }
}
