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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use fulcrum_balance::{BackendId, InFlightGuard, PoolView, RequestInfo};
use fulcrum_stats::clock::now_ns;
use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{ClientBody, ProxyBody, UpstreamBody as ResponseBody};
use crate::h1_guard::FramingVerdicts;
use crate::headers;
use crate::listener::ListenerRuntime;
use crate::state::{ActiveRetry, BackendRuntime, Pool, PoolState};
use crate::upstream::{Conn, SendFailure, UpstreamBody, UpstreamError};

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
    requests: AtomicU64,
    /// Requests received whose response has not finished (HTTP/2: open streams).
    active: AtomicU32,
    /// When `active` last dropped to 0 (or the connection was accepted), clock ns.
    idle_since_ns: AtomicU64,
}

impl ConnContext {
    /// Context for a connection from `peer` accepted by `listener`.
    pub fn new(
        listener: Arc<ListenerRuntime>,
        peer: SocketAddr,
        verdicts: FramingVerdicts,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            listener,
            peer,
            client_ip,
            verdicts,
            requests: AtomicU64::new(0),
            active: AtomicU32::new(0),
            idle_since_ns: AtomicU64::new(now_ns()),
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
    let response = route_and_forward(&ctx, req).await;
    Ok(response.map(|body| ClientBody::new(body, active)))
}

async fn route_and_forward(ctx: &ConnContext, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let index = ctx.requests.fetch_add(1, Ordering::Relaxed);
    let client_h1 = req.version() <= Version::HTTP_11;
    if client_h1 && let Some(fault) = ctx.verdicts.fault(index) {
        let message = format!("{fault}; refusing the request");
        let mut response = ctx
            .listener
            .reply(StatusCode::BAD_REQUEST, "bad_request", &message);
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let on_upgrade =
        (client_h1 && req.headers().contains_key(UPGRADE)).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let pool = {
        let router = ctx.listener.router.load();
        match router.route(&parts) {
            Some(route) => Arc::clone(&route.pool),
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
    let prepared = headers::prepare_request(&mut parts, &ctx.client_ip, "http");
    let on_upgrade = if prepared.upgrading { on_upgrade } else { None };
    forward(
        ctx,
        &pool,
        parts,
        body,
        on_upgrade,
        client_h1,
        prepared.needs_host,
    )
    .await
}

/// RFC 9110 §9.2.2 idempotent methods.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A body-less request head kept to rebuild the request for each attempt.
fn rebuild(template: &Parts) -> Request<UpstreamBody> {
    let mut req = Request::new(Either::Right(Empty::new()));
    *req.method_mut() = template.method.clone();
    *req.uri_mut() = template.uri.clone();
    *req.version_mut() = template.version;
    *req.headers_mut() = template.headers.clone();
    req
}

/// Records a failed attempt and lets outlier detection act on it.
fn record_failure(pool: &Pool, state: &PoolState, index: usize, guard: &InFlightGuard) {
    let consecutive = guard.failure(now_ns());
    pool.maybe_eject(state, index, consecutive);
}

async fn forward(
    ctx: &ConnContext,
    pool: &Arc<Pool>,
    parts: Parts,
    body: Incoming,
    on_upgrade: Option<OnUpgrade>,
    client_h1: bool,
    needs_host: bool,
) -> Response<ProxyBody> {
    let _active = pool.enter();
    let state = pool.state();
    let settings = &state.settings;
    let retry = &settings.retry;
    let upgrading = on_upgrade.is_some();
    let body_empty = body.is_end_stream();

    // A body-less idempotent request can be rebuilt for every attempt (`template`);
    // anything else is sent once (`pending`) and retried only if it comes back unsent.
    let replayable =
        body_empty && !upgrading && (is_idempotent(&parts.method) || retry.non_idempotent);
    let (template, mut pending) = if replayable {
        (Some(parts), None)
    } else {
        let body = if body_empty {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        };
        (None, Some(Request::from_parts(parts, body)))
    };

    let max_attempts = (1 + retry.attempts as usize).min(MAX_ATTEMPTS);
    let mut tried = [BackendId(0); MAX_ATTEMPTS];
    let mut n_tried = 0;
    let mut last_error: Option<UpstreamError> = None;
    let mut last_status: Option<StatusCode> = None;
    let mut claimed: Option<ActiveRetry> = None;
    let mut on_upgrade = on_upgrade;

    for attempt in 0..max_attempts {
        let _retry = if attempt == 0 {
            None
        } else {
            if template.is_none() && pending.is_none() {
                break; // sent once, cannot be replayed
            }
            match claimed.take().or_else(|| pool.try_retry(retry)) {
                Some(claim) => Some(claim),
                None => {
                    tracing::debug!(pool = %pool.name(), "retry budget exhausted");
                    break;
                }
            }
        };

        let now = now_ns();
        let info = RequestInfo::new(now);
        let panic = pool.is_panic(&state);
        let picked = state.strategy.pick(
            &info,
            &PoolView::new(&state.backends, &tried[..n_tried], panic),
        );
        let id = match picked {
            Some(id) => id,
            // Every eligible backend was tried: a retry may go back to one of them.
            None if n_tried > 0 => match state
                .strategy
                .pick(&info, &PoolView::new(&state.backends, &[], panic))
            {
                Some(id) => id,
                None => break,
            },
            None => {
                let message = format!("pool `{}` has no eligible backend", pool.name());
                return ctx
                    .listener
                    .reply(StatusCode::SERVICE_UNAVAILABLE, "no_backend", &message);
            }
        };
        tried[n_tried] = id;
        n_tried += 1;
        let backend = &state.runtimes[id.0];
        tracing::debug!(
            pool = %pool.name(),
            backend = %backend.address,
            strategy = state.kind.name(),
            attempt,
            panic,
            in_flight = backend.live.in_flight(),
            "picked backend"
        );
        let guard = backend.live.begin(now);

        let mut conn = match backend.conns.checkout(&settings.conn, now).await {
            Ok(conn) => conn,
            Err(error) => {
                backend.metrics.connect_failures.inc();
                record_failure(pool, &state, id.0, &guard);
                tracing::debug!(pool = %pool.name(), backend = %backend.address, %error, "connect failed");
                last_error = Some(error);
                if retry.on_connect_failure {
                    continue;
                }
                break;
            }
        };
        let mut request = match pending.take() {
            Some(request) => request,
            None => match &template {
                Some(template) => rebuild(template),
                None => break,
            },
        };
        if needs_host && let Ok(host) = HeaderValue::from_str(&backend.address) {
            request.headers_mut().insert(http::header::HOST, host);
        }

        match conn
            .send(
                backend.conns.addr(),
                request,
                settings.conn.response_header_timeout,
            )
            .await
        {
            Ok(response) => {
                let status = response.status();
                backend.metrics.response(status.as_u16());
                if status.is_server_error() {
                    record_failure(pool, &state, id.0, &guard);
                    if template.is_some()
                        && retry.retries_status(status.as_u16())
                        && attempt + 1 < max_attempts
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
                } else {
                    guard.success(now_ns());
                }
                return respond(response, guard, conn, backend, on_upgrade.take(), client_h1);
            }
            Err(SendFailure { error, unsent }) => {
                match &error {
                    UpstreamError::Timeout { .. } => backend.metrics.timeouts.inc(),
                    UpstreamError::Reset { .. } => backend.metrics.resets.inc(),
                    UpstreamError::Connect { .. } => backend.metrics.connect_failures.inc(),
                };
                // A pooled connection that closed just before the request went out is a
                // keep-alive race, not a fault of the backend.
                let keepalive_race = unsent.is_some() && conn.reused;
                if !keepalive_race {
                    record_failure(pool, &state, id.0, &guard);
                }
                tracing::debug!(pool = %pool.name(), backend = %backend.address, %error, unsent = unsent.is_some(), "attempt failed");
                let retriable = match &error {
                    UpstreamError::Timeout { .. } => retry.on_timeout,
                    UpstreamError::Reset { .. } => retry.on_reset,
                    UpstreamError::Connect { .. } => retry.on_connect_failure,
                };
                let never_sent = unsent.is_some();
                pending = unsent;
                last_error = Some(error);
                if !(retriable || never_sent) {
                    break;
                }
            }
        }
    }

    match (last_error, last_status) {
        (Some(error @ UpstreamError::Timeout { .. }), _) => ctx.listener.reply(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            &format!("{error}"),
        ),
        (Some(error), _) => ctx.listener.reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("{n_tried} attempt(s) failed; last: {error}"),
        ),
        (None, Some(status)) => ctx.listener.reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("{n_tried} attempt(s) failed; last backend answered {status}"),
        ),
        (None, None) => ctx.listener.reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("pool `{}`: no attempt could be made", pool.name()),
        ),
    }
}

/// Turns a backend response into the client response: hop-by-hop fields removed, the
/// body streamed with the attempt's guard and connection attached; for an accepted
/// protocol upgrade, a tunnel between the two upgraded connections.
fn respond(
    mut response: Response<Incoming>,
    guard: InFlightGuard,
    conn: Conn,
    backend: &Arc<BackendRuntime>,
    client_upgrade: Option<OnUpgrade>,
    client_h1: bool,
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
        )),
    )
}
