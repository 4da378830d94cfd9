//! The forwarder: one client request, from route to response.
//!
//! For each request: reject a head whose framing was ambiguous (see [`crate::h1_guard`]),
//! route it to a pool, rewrite its head for the backend ([`crate::headers`]), then make
//! attempts: the pool's strategy picks an eligible backend not yet tried by this request,
//! a pooled connection is checked out (or opened), the request is sent and the response
//! head awaited under the pool's timeouts. The outcome feeds the backend's live
//! statistics and outlier detection.
//!
//! A failed attempt is retried on another backend when the failure kind is in the pool's
//! `retry_on`, attempts remain, and the pool's retry budget allows. What can be retried
//! depends on where the request is: a request that never reached the wire (connect
//! failure, or a pooled connection that closed before sending) is retried whatever its
//! method and body, because it is given back intact; a request that was sent is retried
//! only if it has no body and is idempotent (RFC 9110 §9.2.2) or the pool allows
//! non-idempotent retries. When every attempt fails the client gets a JSON `502` (`504`
//! when the last attempt timed out); when no backend is eligible, `503`.
//!
//! In a pool whose backends have request limits (`max_requests`), an attempt starts only
//! on a backend below its limit; when every eligible backend is full the request waits in
//! the pool queue ([`crate::queue`]), and gets a `503` if the queue is full or its timeout
//! passes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use std::time::Duration;

use bytes::Bytes;
use fulcrum_balance::{BackendId, InFlightGuard, RequestInfo};
use fulcrum_stats::EndpointStats;
use fulcrum_stats::clock::now_ns;
use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::admission::{Admission, Refusal};
use crate::body::{
    AccessEntry, ClientBody, EndpointRecord, GrpcPending, ProxyBody, UpstreamBody as ResponseBody,
};
use crate::h1_guard::FramingVerdicts;
use crate::headers;
use crate::listener::ListenerRuntime;
use crate::state::{
    ActiveRetry, BackendRuntime, HashKeySource, HedgeDelay, Pool, PoolSettings, PoolState,
};
use crate::upstream::{Conn, SendFailure, UpstreamBody, UpstreamError, UpstreamProtocol};

/// Most attempts (first try plus retries) one request may make.
pub const MAX_ATTEMPTS: usize = 11;

/// What the forwarder knows about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnContext {
    /// The listener that accepted the connection.
    pub listener: Arc<ListenerRuntime>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client IP as a header value, for `X-Forwarded-For` (made once per connection).
    pub client_ip: HeaderValue,
    /// Framing verdicts of the HTTP/1 request heads read on this connection.
    pub verdicts: FramingVerdicts,
    /// What the connection's requests carry as `X-Forwarded-Client-Cert`.
    pub client_cert: ForwardedClientCert,
    requests: AtomicU64,
    /// Requests received whose response has not finished (HTTP/2: open streams).
    active: AtomicU32,
    /// When `active` last dropped to 0 (or the connection was accepted), clock ns.
    idle_since_ns: AtomicU64,
    /// The connection's place in its listener's open connections (`max_connections`),
    /// given up when the last reference to the context goes, with the connection.
    _slot: crate::listener::ConnSlot,
    /// The client socket's descriptor (under TLS too), for the send timeout's look at
    /// what the client has acknowledged; `None` for connections without one.
    pub(crate) socket: Option<std::os::fd::RawFd>,
}

/// `X-Forwarded-Client-Cert` on a connection's requests.
#[derive(Debug)]
pub enum ForwardedClientCert {
    /// The listener does not verify client certificates: the header is forwarded as the
    /// client sent it, like any other.
    PassThrough,
    /// The listener verifies client certificates (`tls.client_ca`): a value the client
    /// sent is removed, and this one (the verified certificate's hash and names, see
    /// [`crate::tls::forwarded_client_cert`]) set, if the client presented one (Envoy's
    /// `SANITIZE_SET`).
    Set(Option<HeaderValue>),
}

impl ConnContext {
    /// Context for a connection from `peer` accepted by `listener`.
    pub(crate) fn new(
        listener: Arc<ListenerRuntime>,
        peer: SocketAddr,
        verdicts: FramingVerdicts,
        client_cert: ForwardedClientCert,
        slot: crate::listener::ConnSlot,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            listener,
            peer,
            client_ip,
            verdicts,
            client_cert,
            requests: AtomicU64::new(0),
            active: AtomicU32::new(0),
            idle_since_ns: AtomicU64::new(now_ns()),
            _slot: slot,
            socket: None,
        }
    }

    /// Requests on this connection whose response is not finished.
    pub fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// When the connection last became idle (no request active), clock nanoseconds.
    pub fn idle_since_ns(&self) -> u64 {
        self.idle_since_ns.load(Ordering::Acquire)
    }
}

/// A request active on its client connection until its response body ends; keeps the
/// connection from counting as idle.
#[derive(Debug)]
pub struct ActiveGuard {
    ctx: Arc<ConnContext>,
}

impl ActiveGuard {
    fn new(ctx: &Arc<ConnContext>) -> Self {
        ctx.active.fetch_add(1, Ordering::AcqRel);
        Self {
            ctx: Arc::clone(ctx),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.ctx.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ctx.idle_since_ns.store(now_ns(), Ordering::Release);
        }
    }
}

/// Handles one client request (the hyper service function).
pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ClientBody>, Infallible> {
    let active = ActiveGuard::new(&ctx);
    let mut pending = PendingAccess(ctx.listener.access_log().then(|| access_entry(&ctx, &req)));
    let mut response = route_and_forward(&ctx, req, pending.0.is_some()).await;
    let access = pending.0.take().map(|mut entry| {
        entry.status = response.status().as_u16();
        entry.pool = response
            .extensions_mut()
            .remove::<RoutedPool>()
            .map(|p| p.0);
        if let ProxyBody::Upstream(body) = response.body() {
            entry.backend = body.backend_address().cloned();
        }
        entry
    });
    Ok(response.map(|body| ClientBody::new(body, active, access)))
}

/// An access-log line not yet handed to the response body: written with status 0 and
/// outcome `aborted` if the request is dropped first (the client went away before the
/// response head; nginx logs such a request as 499).
struct PendingAccess(Option<Box<AccessEntry>>);

impl Drop for PendingAccess {
    fn drop(&mut self) {
        if let Some(entry) = self.0.take() {
            entry.write("aborted");
        }
    }
}

/// The pool a logged request was routed to (a response extension, set only on listeners
/// with `access_log`).
#[derive(Clone)]
struct RoutedPool(Arc<str>);

/// The start of `req`'s access-log line.
#[cold]
fn access_entry(ctx: &ConnContext, req: &Request<Incoming>) -> Box<AccessEntry> {
    Box::new(AccessEntry {
        listener: Arc::clone(&ctx.listener.name),
        client: ctx.peer,
        method: req.method().clone(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned()),
        version: req.version(),
        status: 0,
        pool: None,
        backend: None,
        started_ns: now_ns(),
        bytes: 0,
    })
}

/// `429 Too Many Requests` (RFC 6585 §4) for a request over its route's rate limit, with
/// `Retry-After` (RFC 9110 §10.2.3) in whole seconds, rounded up, at least 1.
#[cold]
fn rate_limited(
    ctx: &ConnContext,
    settings: &fulcrum_config::RateLimitConfig,
    wait: Duration,
) -> Response<ProxyBody> {
    let per = match settings.per {
        fulcrum_config::RateLimitKey::Route => "this route",
        fulcrum_config::RateLimitKey::ClientIp => "this client on this route",
    };
    let message = format!(
        "rate limit of {} (burst {}) for {per} exceeded; retry in {} ms",
        settings.rate,
        settings.burst(),
        wait.as_millis()
    );
    let mut response = ctx
        .listener
        .reply(StatusCode::TOO_MANY_REQUESTS, "rate_limited", &message);
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// Whether the request target's form is wrong for its method (RFC 9112 §3.2): the
/// asterisk form (`*`) is for `OPTIONS` only, the authority form (`host:port`) for
/// `CONNECT` only. Otherwise `GET *` would go out as is, and `GET admin` as `GET /` with
/// its Host replaced by `admin`.
#[inline]
fn target_form_problem(method: &http::Method, uri: &http::Uri) -> Option<&'static str> {
    if uri.scheme().is_none() && uri.authority().is_some() && method != http::Method::CONNECT {
        return Some(
            "an authority-form request target is valid only with CONNECT (RFC 9112 §3.2.3)",
        );
    }
    if uri == "*" && method != http::Method::OPTIONS {
        return Some(
            "the asterisk-form request target `*` is valid only with OPTIONS (RFC 9112 §3.2.4)",
        );
    }
    None
}

/// A request refused before routing or forwarding (smuggling framing, a bad `Host`, an
/// unsupported transfer coding), closing the connection: its body, if any, is left
/// unread, so the connection cannot carry another request.
#[cold]
#[inline(never)]
fn refuse(
    ctx: &ConnContext,
    status: StatusCode,
    code: &str,
    problem: &dyn std::fmt::Display,
) -> Response<ProxyBody> {
    let mut response =
        ctx.listener
            .reply(status, code, &format!("{problem}; refusing the request"));
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn route_and_forward(
    ctx: &ConnContext,
    mut req: Request<Incoming>,
    logged: bool,
) -> Response<ProxyBody> {
    let index = ctx.requests.fetch_add(1, Ordering::Relaxed);
    let client_h1 = req.version() <= Version::HTTP_11;
    if client_h1 && let Some(fault) = ctx.verdicts.fault(index) {
        return refuse(ctx, StatusCode::BAD_REQUEST, "bad_request", &fault);
    }
    if req.method() == http::Method::CONNECT {
        // A tunnel to any address the client names is a forward proxy's job; Envoy and
        // nginx refuse it too unless configured.
        return refuse(
            ctx,
            StatusCode::NOT_IMPLEMENTED,
            "connect_not_supported",
            &"CONNECT is not supported: Fulcrum is a reverse proxy and opens no tunnels",
        );
    }
    if let Some(problem) = target_form_problem(req.method(), req.uri()) {
        return refuse(ctx, StatusCode::BAD_REQUEST, "bad_request", &problem);
    }
    let on_upgrade =
        (client_h1 && req.headers().contains_key(UPGRADE)).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if let ForwardedClientCert::Set(value) = &ctx.client_cert {
        // Before routing, so a route matching this header sees Fulcrum's value only.
        parts.headers.remove(&headers::X_FORWARDED_CLIENT_CERT);
        headers::remove_underscore_twin(&mut parts.headers, "x-forwarded-client-cert");
        if let Some(value) = value {
            parts
                .headers
                .insert(&headers::X_FORWARDED_CLIENT_CERT, value.clone());
        }
    }

    let (pool, backend_tags) = {
        let router = ctx.listener.router.load();
        router.path_normalization.apply(&mut parts.uri);
        match router.route(&parts) {
            Some(route) => {
                if let Some(limit) = &route.rate_limit
                    && let Err(wait) = limit.check(ctx.peer.ip())
                {
                    return rate_limited(ctx, limit.settings(), wait);
                }
                (Arc::clone(&route.pool), route.backend_tags.clone())
            }
            None => {
                let host = crate::router::request_host(&parts).unwrap_or("");
                let message = format!(
                    "no route matches host `{host}` and path `{}`",
                    parts.uri.path()
                );
                return ctx
                    .listener
                    .reply(StatusCode::NOT_FOUND, "no_route", &message);
            }
        }
    };
    let prepared = headers::prepare_request(&mut parts, &ctx.client_ip, ctx.listener.scheme());
    if let Some(problem) = prepared.host_problem {
        return refuse(ctx, StatusCode::BAD_REQUEST, "bad_request", &problem);
    }
    if prepared.unsupported_coding {
        return refuse(
            ctx,
            StatusCode::NOT_IMPLEMENTED,
            "unsupported_transfer_coding",
            &"only the chunked transfer coding is supported",
        );
    }
    let on_upgrade = if prepared.upgrading { on_upgrade } else { None };

    let _active = pool.enter();
    let routed = logged.then(|| RoutedPool(Arc::from(pool.name())));
    let state = pool.state();
    let allowed = backend_tags.as_deref().map(|tags| state.tag_mask(tags));
    let started = now_ns();
    pool.rate().record(started);
    // The endpoint's history decides the request's class before it is forwarded.
    let endpoint = state.endpoints.get(parts.method.as_str(), parts.uri.path());
    let mut info = RequestInfo::new(started).with_class(endpoint.class());
    if state.kind.uses_hash_key()
        && let Some(key) = affinity_key(&state.settings.hash_key, &parts, ctx.peer)
    {
        info = info.with_hash_key(key);
    }
    let hedge_delay = state.settings.hedge.as_ref().and_then(|policy| {
        pool.count_hedgeable(started);
        match policy.delay {
            HedgeDelay::Fixed(delay) => Some(delay),
            HedgeDelay::P95 => endpoint
                .quantile_ns(0.95, started)
                .map(|p95| Duration::from_nanos(p95).max(policy.min_delay)),
        }
    });
    let response = forward(
        ctx,
        &pool,
        &state,
        allowed.as_deref(),
        info,
        hedge_delay,
        parts,
        body,
        on_upgrade,
        client_h1,
        prepared,
        &endpoint,
    )
    .await;
    // Replies generated here (no backend, all attempts failed) count against the
    // endpoint now; streamed responses when their body ends (see `body.rs`).
    if let ProxyBody::Local(_) = response.body()
        && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        if response.extensions().get::<QueueRefused>().is_some() {
            endpoint.record_refused();
        } else {
            let now = now_ns();
            endpoint.record(
                now.saturating_sub(started),
                response.status().is_server_error(),
                now,
            );
        }
    }
    if let Some(routed) = routed {
        let mut response = response;
        response.extensions_mut().insert(routed);
        return response;
    }
    response
}

/// The affinity key of a request for hashing strategies, hashed to 64 bits with a fixed
/// function (FNV-1a, see `fulcrum_stats::path::key_hash`) so that every node derives the
/// same value; `None` when the request does not carry the configured key.
fn affinity_key(source: &HashKeySource, parts: &Parts, peer: SocketAddr) -> Option<u64> {
    match source {
        HashKeySource::Header(name) => parts.headers.get(name).map(|value| fnv1a(value.as_bytes())),
        HashKeySource::Cookie(name) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| fnv1a(value.as_bytes())),
        HashKeySource::Path => Some(fnv1a(parts.uri.path().as_bytes())),
        HashKeySource::ClientIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => fnv1a(&ip.octets()),
            std::net::IpAddr::V6(ip) => fnv1a(&ip.octets()),
        }),
    }
}

/// 64-bit FNV-1a (Fowler, Noll, Vo): fixed parameters, so stable across nodes and builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// RFC 9110 §9.2.2 idempotent methods.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request kept to rebuild it for each attempt: its head and its buffered body (empty
/// for a body-less request; `Bytes` clones share the buffer).
struct Template {
    parts: Parts,
    body: Bytes,
}

impl Template {
    fn rebuild(&self) -> Request<UpstreamBody> {
        let mut req = Request::new(Either::Right(Full::new(self.body.clone())));
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = self.parts.headers.clone();
        req
    }
}

/// Records a failed attempt and lets outlier detection act on it.
fn record_failure(pool: &Pool, state: &PoolState, index: usize, guard: &InFlightGuard) {
    let consecutive = guard.failure(now_ns());
    pool.maybe_eject(state, index, consecutive);
}

/// What one attempt on one backend came to.
enum Outcome {
    /// A response head arrived on `Conn`.
    Response(Response<Incoming>, Conn),
    /// No response: the error, the request if it never reached the wire, and whether the
    /// failure was a pooled connection closing just before the request went out, or an
    /// HTTP/2 stream the backend refused unprocessed (a keep-alive race, not a fault of
    /// the backend, and safe to retry).
    Failed {
        error: UpstreamError,
        unsent: Option<Request<UpstreamBody>>,
        keepalive_race: bool,
    },
}

/// One attempt: a pooled (or new) connection to `backend`, the request, and the wait for
/// the response head under the pool's timeouts.
async fn attempt(
    backend: &BackendRuntime,
    settings: &PoolSettings,
    now: u64,
    request: Request<UpstreamBody>,
) -> Outcome {
    let mut conn = match backend.conns.checkout(&settings.conn, now).await {
        Ok(conn) => conn,
        Err(error) => {
            backend.metrics.connect_failures.inc();
            return Outcome::Failed {
                error,
                unsent: Some(request),
                keepalive_race: false,
            };
        }
    };
    match conn
        .send(
            backend.conns.addr(),
            request,
            settings.conn.response_header_timeout,
        )
        .await
    {
        Ok(response) => Outcome::Response(response, conn),
        Err(SendFailure {
            error,
            unsent,
            unprocessed,
        }) => {
            match &error {
                UpstreamError::Timeout { .. } => {
                    backend.metrics.timeouts.inc();
                }
                UpstreamError::Reset { .. } => {
                    backend.metrics.resets.inc();
                }
                UpstreamError::Connect { .. } => {
                    backend.metrics.connect_failures.inc();
                }
                UpstreamError::ClientBody { .. } | UpstreamError::ClientStalled { .. } => {}
            }
            // The request never ran (a keep-alive race, an HTTP/2 stream refused or left
            // unprocessed by a GOAWAY): no failure of the backend's, and it may go again.
            let keepalive_race = unprocessed;
            Outcome::Failed {
                error,
                unsent,
                keepalive_race,
            }
        }
    }
}

/// What a request carries through its attempts.
struct Request0<'a> {
    ctx: &'a ConnContext,
    pool: &'a Arc<Pool>,
    state: &'a Arc<PoolState>,
    /// The backends the route allows (its required tags); `None` = all.
    allowed: Option<&'a [bool]>,
    /// Class and affinity key, decided once before the first pick; `now_ns` is when the
    /// request arrived.
    info: RequestInfo,
    needs_host: bool,
    /// The client asked for trailers (`TE: trailers`), sent on to HTTP/2 backends.
    te_trailers: bool,
    /// The endpoint's statistics, fed when the response ends.
    endpoint: &'a Arc<EndpointStats>,
}

impl Request0<'_> {
    /// What admission needs of this request (see [`crate::admission`]).
    fn admission(&self) -> Admission<'_> {
        Admission {
            pool: self.pool,
            state: self.state,
            allowed: self.allowed,
            info: self.info,
        }
    }

    /// Addresses `request` to `backend`: `Host` for a request that named none, and
    /// `te: trailers` over HTTP/2 when the client asked for trailers.
    fn set_host(&self, request: &mut Request<UpstreamBody>, backend: &BackendRuntime) {
        if self.needs_host
            && let Ok(host) = HeaderValue::from_str(&backend.address)
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        if self.te_trailers && self.state.settings.conn.protocol == UpstreamProtocol::Http2 {
            request
                .headers_mut()
                .insert(http::header::TE, headers::TE_TRAILERS.clone());
        }
    }
}

impl Refusal {
    /// The client's `503` for this refusal.
    fn reply(self, ctx: &ConnContext, pool: &Pool) -> Response<ProxyBody> {
        let (code, message) = match self {
            Refusal::NoBackend => (
                "no_backend",
                format!("pool `{}` has no eligible backend", pool.name()),
            ),
            Refusal::QueueFull => (
                "queue_full",
                format!(
                    "pool `{}`: every backend is at its max_requests and the queue is full \
                     ({} waiting)",
                    pool.name(),
                    pool.queue().len()
                ),
            ),
            Refusal::QueueTimeout(timeout) => (
                "queue_timeout",
                format!(
                    "pool `{}`: no backend had room within the queue timeout of {} ms",
                    pool.name(),
                    timeout.as_millis()
                ),
            ),
        };
        let queued = !matches!(self, Refusal::NoBackend);
        let mut response = ctx
            .listener
            .reply(StatusCode::SERVICE_UNAVAILABLE, code, &message);
        if queued {
            response.extensions_mut().insert(QueueRefused);
        }
        response
    }
}

/// Marks (as a response extension, never sent) a `503` from the pool queue, so that the
/// endpoint's statistics count it without a duration.
#[derive(Clone, Copy, Debug)]
struct QueueRefused;

/// The first attempt of a hedge-eligible request (Dean & Barroso, "The Tail at Scale",
/// CACM 2013): if no response head arrives within `delay`, a second copy goes to another
/// backend — when the hedge budget and the strategy (SLO-aware strategies veto hedges
/// while their latency target is met) allow it. The first response head wins; the other
/// attempt is cancelled by dropping it, which closes its connection and releases its
/// in-flight count without recording an outcome. A failure of one copy — a transport
/// failure, or a server-error answer (5xx; a gRPC server error in an HTTP/2 head) — does
/// not end the race: it is recorded and the other copy awaited, so a hedge never turns a
/// success into an error, and only a successful second copy counts as a hedge won. An
/// error answer's failure is recorded when it arrives, with its own latency. When both
/// fail, the caller gets the later error answer if either copy answered (already
/// recorded: the guard ignores a second outcome), else the later transport failure,
/// unrecorded; it records and retries it as it would any attempt.
#[allow(clippy::too_many_arguments)]
async fn hedged(
    r: &Request0<'_>,
    template: &Template,
    first: BackendId,
    first_guard: InFlightGuard,
    request: Request<UpstreamBody>,
    delay: Duration,
    tried: &mut [BackendId],
    n_tried: &mut usize,
) -> (BackendId, InFlightGuard, Outcome) {
    let state = r.state;
    let settings = &state.settings;
    let primary = attempt(&state.runtimes[first.0], settings, r.info.now_ns, request);
    tokio::pin!(primary);
    tokio::select! {
        biased;
        outcome = &mut primary => return (first, first_guard, outcome),
        () = tokio::time::sleep(delay) => {}
    }
    let now = now_ns();
    let admission = r.admission();
    let second = if *n_tried < tried.len()
        && state.strategy.hedge_allowed(now)
        && let Some(policy) = &settings.hedge
        && let Some(second) = admission.pick(now, &tried[..*n_tried])
        // In a pool with request limits a hedge needs a free slot; it never queues.
        && let Some(second_guard) = state.runtimes[second.0]
            .live
            .try_begin_classified(now, admission.long())
        // Charged last, so the budget counts only hedges that are sent (a refused claim
        // drops the unused guard).
        && r.pool.try_hedge(policy, now)
    {
        Some((second, second_guard))
    } else {
        None
    };
    let Some((second, second_guard)) = second else {
        return (first, first_guard, primary.await);
    };
    let runtime = &state.runtimes[second.0];
    tried[*n_tried] = second;
    *n_tried += 1;
    r.pool.metrics().hedges.inc();
    state.strategy.note_hedge(false);
    tracing::debug!(pool = %r.pool.name(), backend = %runtime.address, delay_ms = delay.as_secs_f64() * 1e3, "hedging");
    let mut copy = template.rebuild();
    r.set_host(&mut copy, runtime);
    let secondary = attempt(runtime, settings, now, copy);
    tokio::pin!(secondary);

    // The attempt that loses the race is dropped (its connection is closed, so the
    // backend sees the request cancelled); it is recorded as abandoned, not failed.
    let abandon = |loser: BackendId, guard: InFlightGuard| {
        guard.cancel(now_ns());
        state.runtimes[loser.0].metrics.cancelled.inc();
    };
    // A held error answer that does not go to the client is counted as a response, like
    // a 5xx that is retried (its failure was recorded when it arrived).
    let discard = |copy: BackendId, held: Outcome| {
        if let Outcome::Response(response, _) = held {
            state.runtimes[copy.0]
                .metrics
                .response(response.status().as_u16());
        }
    };
    let ids = [first, second];
    let mut guards = [Some(first_guard), Some(second_guard)];
    let mut copies = [Copy::Running, Copy::Running];
    loop {
        let (i, outcome) = tokio::select! {
            outcome = &mut primary, if matches!(copies[0], Copy::Running) => (0, outcome),
            outcome = &mut secondary, if matches!(copies[1], Copy::Running) => (1, outcome),
        };
        let j = 1 - i;
        let guard = |guards: &mut [Option<InFlightGuard>; 2], k: usize| {
            guards[k]
                .take()
                .expect("a copy's guard is taken once, when the race ends or it is settled")
        };
        match outcome {
            Outcome::Response(ref response, _) if !failure_head(settings, response) => {
                if i == 1 {
                    r.pool.metrics().hedges_won.inc();
                    state.strategy.note_hedge(true);
                }
                if let Some(held) = copies[j].take_held() {
                    discard(ids[j], *held);
                } else if matches!(copies[j], Copy::Running) {
                    abandon(ids[j], guard(&mut guards, j));
                }
                return (ids[i], guard(&mut guards, i), outcome);
            }
            // A server error: the other copy may still succeed, so the client waits for
            // it (a hedge must never turn a success into an error). Its failure is
            // recorded now, with its own latency; if it reaches the client after all,
            // the caller's recording of it is ignored (a guard records one outcome).
            Outcome::Response(..) => {
                if matches!(copies[j], Copy::Running) {
                    let held = guards[i]
                        .as_ref()
                        .expect("a copy's guard is taken once, when the race ends");
                    record_failure(r.pool, state, ids[i].0, held);
                    copies[i] = Copy::Held(Box::new(outcome));
                    continue;
                }
                // Both answered errors: the later goes to the client.
                if let Some(held) = copies[j].take_held() {
                    discard(ids[j], *held);
                }
                return (ids[i], guard(&mut guards, i), outcome);
            }
            Outcome::Failed { keepalive_race, .. } => {
                if matches!(copies[j], Copy::Failed) {
                    return (ids[i], guard(&mut guards, i), outcome);
                }
                if !keepalive_race {
                    record_failure(r.pool, state, ids[i].0, &guard(&mut guards, i));
                }
                copies[i] = Copy::Failed;
                // The other copy's error answer goes to the client, which learns more
                // from it than from a transport failure.
                if let Some(held) = copies[j].take_held() {
                    return (ids[j], guard(&mut guards, j), *held);
                }
            }
        }
    }
}

/// One copy of a hedged request, in [`hedged`]'s race.
enum Copy {
    /// No response head yet.
    Running,
    /// Failed, or settled otherwise; its failure is recorded (or, for a keep-alive race,
    /// not the backend's).
    Failed,
    /// Answered with a server error (its failure recorded), held back while the other
    /// copy runs.
    Held(Box<Outcome>),
}

impl Copy {
    /// The held answer, leaving the copy `Failed`; `None` (and the copy unchanged) when
    /// it holds none.
    fn take_held(&mut self) -> Option<Box<Outcome>> {
        match std::mem::replace(self, Copy::Failed) {
            Copy::Held(held) => Some(held),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// Whether a response head is a failure of the backend: a 5xx status, or over HTTP/2 a
/// gRPC server error answered "trailers-only" (`grpc-status` in the head).
fn failure_head(settings: &PoolSettings, response: &Response<Incoming>) -> bool {
    response.status().is_server_error()
        || (settings.conn.protocol == UpstreamProtocol::Http2
            && headers::grpc_server_error(response.headers()))
}

/// Whether the request's body can be buffered for replay (hedges, retries): a declared
/// `Content-Length` of at most `max` bytes.
fn small_body(parts: &Parts, max: u64) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len <= max)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &ConnContext,
    pool: &Arc<Pool>,
    state: &Arc<PoolState>,
    allowed: Option<&[bool]>,
    info: RequestInfo,
    hedge_delay: Option<Duration>,
    parts: Parts,
    body: Incoming,
    on_upgrade: Option<OnUpgrade>,
    client_h1: bool,
    prepared: headers::Prepared,
    endpoint: &Arc<EndpointStats>,
) -> Response<ProxyBody> {
    let settings = &state.settings;
    let retry = &settings.retry;
    let upgrading = on_upgrade.is_some();
    let body_empty = body.is_end_stream();
    let idempotent = is_idempotent(&parts.method);
    // `hedge.max_body_bytes` bounds what a hedge may send twice, whatever else buffers
    // the body (a retry's larger `max_body_bytes`).
    let hedge_delay = hedge_delay.filter(|_| {
        idempotent
            && !upgrading
            && (body_empty
                || settings
                    .hedge
                    .as_ref()
                    .is_some_and(|policy| small_body(&parts, policy.max_body_bytes)))
    });

    // A small body of a request that may be sent again — hedged, or retried once sent —
    // is buffered so it can be replayed; other bodies stream and are sent once.
    let replayable = !upgrading && (idempotent || retry.non_idempotent);
    let buffer = !body_empty
        && (hedge_delay.is_some()
            || (replayable && retry.attempts > 0 && small_body(&parts, retry.max_body_bytes)));
    let request = Request0 {
        ctx,
        pool,
        state,
        allowed,
        info,
        needs_host: prepared.needs_host,
        te_trailers: prepared.te_trailers,
        endpoint,
    };
    let (parts, buffered) = if buffer {
        // The client gets as long to send the body as a backend gets to answer.
        let wait = settings.conn.response_header_timeout;
        match tokio::time::timeout(wait, body.collect()).await {
            Ok(Ok(collected)) => (parts, Some(collected.to_bytes())),
            Ok(Err(error)) => {
                return ctx.listener.reply(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("the request body could not be read: {error}"),
                );
            }
            Err(_) => {
                return ctx.listener.reply(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    &format!("the request body did not arrive within {wait:?}"),
                );
            }
        }
    } else if body_empty {
        (parts, Some(Bytes::new()))
    } else {
        // Streamed: sent once (`pending`), retried only if it comes back unsent.
        return forward_attempts(
            request,
            None,
            Some(Request::from_parts(
                parts,
                Either::Left(crate::upstream::RequestBody::new(body)),
            )),
            None,
            on_upgrade,
            client_h1,
        )
        .await;
    };
    let body = buffered.unwrap_or_default();
    // A buffered idempotent request can be rebuilt for every attempt (`template`).
    let (template, pending) = if replayable {
        (Some(Template { parts, body }), None)
    } else {
        (
            None,
            Some(Request::from_parts(parts, Either::Right(Full::new(body)))),
        )
    };
    let hedge_delay = hedge_delay.filter(|_| template.is_some());
    forward_attempts(
        request,
        template,
        pending,
        hedge_delay,
        on_upgrade,
        client_h1,
    )
    .await
}

async fn forward_attempts(
    r: Request0<'_>,
    template: Option<Template>,
    mut pending: Option<Request<UpstreamBody>>,
    hedge_delay: Option<Duration>,
    on_upgrade: Option<OnUpgrade>,
    client_h1: bool,
) -> Response<ProxyBody> {
    let (ctx, pool, state) = (r.ctx, r.pool, r.state);
    let settings = &state.settings;
    let retry = &settings.retry;
    let max_attempts = (1 + retry.attempts as usize).min(MAX_ATTEMPTS);
    // One more slot than attempts: a hedge takes one too.
    let mut tried = [BackendId(0); MAX_ATTEMPTS + 1];
    let mut n_tried = 0;
    let mut last_error: Option<UpstreamError> = None;
    let mut last_status: Option<StatusCode> = None;
    let mut claimed: Option<ActiveRetry> = None;
    let mut on_upgrade = on_upgrade;
    // When the first attempt started: endpoint durations run from here, so time spent
    // in the pool queue does not make an endpoint look long.
    let mut first_started: Option<u64> = None;
    // The last attempt failed without the backend processing the request (a keep-alive
    // race, a refused stream, no connection at all): the next one is not charged to the
    // retry budget.
    let mut unprocessed = false;
    // Attempts made (`n_tried` drops a backend that did not process its attempt, so it
    // can be tried again).
    let mut attempts = 0usize;

    for attempt_no in 0..max_attempts {
        let _retry = if attempt_no == 0 {
            None
        } else {
            if template.is_none() && pending.is_none() {
                break; // sent once, cannot be replayed
            }
            if std::mem::take(&mut unprocessed) {
                pool.note_free_retry();
                None
            } else {
                match claimed.take().or_else(|| pool.try_retry(retry)) {
                    Some(claim) => Some(claim),
                    None => {
                        tracing::debug!(pool = %pool.name(), "retry budget exhausted");
                        break;
                    }
                }
            }
        };

        let (id, guard) = match r.admission().admit(&tried[..n_tried]).await {
            Ok(taken) => taken,
            Err(Refusal::NoBackend) if n_tried > 0 => break,
            Err(refusal) => return refusal.reply(ctx, pool),
        };
        let now = guard.started_ns();
        let first_started = *first_started.get_or_insert(now);
        if n_tried >= tried.len() {
            break;
        }
        tried[n_tried] = id;
        n_tried += 1;
        attempts += 1;
        let backend = &state.runtimes[id.0];
        tracing::debug!(
            pool = %pool.name(),
            backend = %backend.address,
            strategy = state.kind.name(),
            attempt = attempt_no,
            class = ?r.info.class,
            in_flight = backend.live.in_flight(),
            "picked backend"
        );
        let mut request = match pending.take() {
            Some(request) => request,
            None => match &template {
                Some(template) => template.rebuild(),
                None => break,
            },
        };
        r.set_host(&mut request, backend);

        let (id, guard, outcome) = match (attempt_no, hedge_delay, &template) {
            (0, Some(delay), Some(template)) => {
                hedged(
                    &r,
                    template,
                    id,
                    guard,
                    request,
                    delay,
                    &mut tried,
                    &mut n_tried,
                )
                .await
            }
            _ => (id, guard, attempt(backend, settings, now, request).await),
        };
        let backend = &state.runtimes[id.0];

        match outcome {
            Outcome::Response(response, conn) => {
                let status = response.status();
                backend.metrics.response(status.as_u16());
                // Over HTTP/2 a gRPC server's failure may come as a "trailers-only"
                // answer (status 200 with `grpc-status` in the head) or in the trailers
                // after the messages, when the outcome waits for them.
                let grpc = settings.conn.protocol == UpstreamProtocol::Http2;
                let failed = failure_head(settings, &response);
                let mut grpc_pending = None;
                if failed {
                    record_failure(pool, state, id.0, &guard);
                    if template.is_some()
                        && retry.retries_status(status.as_u16())
                        && attempt_no + 1 < max_attempts
                    {
                        // Claim the retry before discarding the response: without budget,
                        // the client gets this response rather than a synthetic error.
                        if let Some(claim) = pool.try_retry(retry) {
                            tracing::debug!(pool = %pool.name(), backend = %backend.address, %status, "retrying status");
                            claimed = Some(claim);
                            last_status = Some(status);
                            continue;
                        }
                    }
                } else if grpc && headers::grpc_status_in_trailers(response.headers()) {
                    grpc_pending = Some(Box::new(GrpcPending {
                        pool: Arc::clone(pool),
                        state: Arc::clone(state),
                        index: id.0,
                        head_ns: now_ns(),
                    }));
                } else {
                    guard.success(now_ns());
                }
                let record = EndpointRecord {
                    stats: Arc::clone(r.endpoint),
                    started_ns: first_started,
                    server_error: failed,
                    grpc: grpc_pending,
                };
                let mut response = response;
                if grpc && client_h1 && r.te_trailers {
                    trailers_for_h1(response.headers_mut());
                }
                return respond(
                    response,
                    guard,
                    conn,
                    backend,
                    on_upgrade.take(),
                    client_h1,
                    record,
                    settings.conn.read_timeout,
                );
            }
            Outcome::Failed {
                error,
                unsent,
                keepalive_race,
            } => {
                if error.is_client_fault() {
                    // Not the backend's failure, and not worth another attempt: the
                    // client's body is gone or stalled. The attempt counts nothing.
                    tracing::debug!(pool = %pool.name(), backend = %backend.address, %error, "client failed its request body");
                    return match error {
                        UpstreamError::ClientStalled { .. } => ctx.listener.reply(
                            StatusCode::REQUEST_TIMEOUT,
                            "request_timeout",
                            &error.to_string(),
                        ),
                        _ => ctx.listener.reply(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            &error.to_string(),
                        ),
                    };
                }
                if keepalive_race {
                    // The backend did not fail: it may take the next attempt too, on a
                    // new connection (in a one-backend pool, the only one), and that
                    // attempt costs no retry budget.
                    if let Some(at) = tried[..n_tried].iter().position(|&t| t == id) {
                        tried.swap(at, n_tried - 1);
                        n_tried -= 1;
                    }
                    unprocessed = true;
                } else {
                    record_failure(pool, state, id.0, &guard);
                    // No connection, so no backend worked on the request: retrying it
                    // elsewhere adds only the load it would have brought anyway, and is
                    // not charged to the retry budget (a refused connection must not
                    // turn into a client error because other requests are retrying).
                    unprocessed = matches!(error, UpstreamError::Connect { .. });
                }
                tracing::debug!(pool = %pool.name(), backend = %backend.address, %error, unsent = unsent.is_some(), "attempt failed");
                let never_sent = unsent.is_some();
                let retriable = match &error {
                    UpstreamError::Timeout { .. } => retry.on_timeout,
                    UpstreamError::Reset { .. } => retry.on_reset || never_sent || keepalive_race,
                    UpstreamError::Connect { .. } => retry.on_connect_failure,
                    UpstreamError::ClientBody { .. } | UpstreamError::ClientStalled { .. } => false,
                };
                pending = unsent;
                last_error = Some(error);
                if !retriable {
                    break;
                }
            }
        }
    }

    // A hedge's second copy counts in `n_tried` only.
    let attempts = attempts.max(n_tried);
    // Clients are told what kind of failure it was, not the backend's address or the
    // transport's details (HAProxy's 502/504 pages say as little); the log has them.
    if let Some(error) = &last_error {
        tracing::debug!(pool = %pool.name(), attempts, %error, "request failed upstream");
    }
    match (last_error, last_status) {
        (Some(UpstreamError::Timeout { timeout, .. }), _) => ctx.listener.reply(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            &format!("{attempts} attempt(s) failed; last: no response head within {timeout:?}"),
        ),
        (Some(error), _) => ctx.listener.reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("{attempts} attempt(s) failed; last: {}", error.kind_text()),
        ),
        (None, Some(status)) => ctx.listener.reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("{attempts} attempt(s) failed; last backend answered {status}"),
        ),
        (None, None) => ctx.listener.reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("pool `{}`: no attempt could be made", pool.name()),
        ),
    }
}

/// Readies an HTTP/2 backend's response head for an HTTP/1.1 client that asked for
/// trailers (`TE: trailers`): trailers travel only in a chunked body, which a
/// `Content-Length` would rule out, and hyper sends only the trailer fields the head
/// declares in `Trailer` (RFC 9110 §6.6.2), which gRPC servers do not send: a gRPC
/// answer without one declares gRPC's own (`grpc-status`, `grpc-message`,
/// `grpc-status-details-bin`).
#[cold]
fn trailers_for_h1(headers: &mut http::HeaderMap) {
    headers.remove(http::header::CONTENT_LENGTH);
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc && !headers.contains_key(http::header::TRAILER) {
        headers.insert(
            http::header::TRAILER,
            HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin"),
        );
    }
}

/// Turns a backend response into the client response: hop-by-hop fields removed, the
/// body streamed with the attempt's guard and connection attached; for an accepted
/// protocol upgrade, a tunnel between the two upgraded connections.
#[allow(clippy::too_many_arguments)]
fn respond(
    mut response: Response<Incoming>,
    guard: InFlightGuard,
    conn: Conn,
    backend: &Arc<BackendRuntime>,
    client_upgrade: Option<OnUpgrade>,
    client_h1: bool,
    record: EndpointRecord,
    read_timeout: Duration,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let (mut parts, _empty) = response.into_parts();
        headers::prepare_response(&mut parts, true, client_h1);
        let address = Arc::clone(&backend.address);
        // The upgraded connection is no longer HTTP: it never returns to the pool.
        drop(conn);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                    if let Err(error) =
                        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!(backend = %address, %error, "upgraded connection ended with an error");
                    }
                }
                Err(error) => {
                    tracing::debug!(backend = %address, %error, "protocol upgrade failed")
                }
            }
            // Keeps the backend's in-flight count for the tunnel's lifetime.
            drop(guard);
        });
        return Response::from_parts(parts, ProxyBody::empty());
    }
    let (mut parts, body) = response.into_parts();
    headers::prepare_response(&mut parts, false, client_h1);
    Response::from_parts(
        parts,
        ProxyBody::Upstream(ResponseBody::new(
            body,
            guard,
            Some(conn),
            Arc::clone(backend),
            Some(record),
            read_timeout,
        )),
    )
}
