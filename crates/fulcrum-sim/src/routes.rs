//! The simulator's HTTP endpoints: one function per endpoint and the router in front.
//!
//! Every response leaves through [`route`], which stamps `x-backend: <name>` on it, so a
//! client behind a proxy can always tell which backend answered.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::latency::scale;
use crate::pattern::{MAX_DOWNLOAD_BYTES, PatternBody, pattern_sha256};
use crate::server::Spawner;
use crate::settings::{BadParameter, parse_control, parse_delay_override};
use crate::state::{Gauge, SimState};
use crate::ws;

/// Error type of response bodies: the echoed request body can fail mid-stream.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every simulator response.
pub(crate) type ResBody = UnsyncBoxBody<Bytes, BoxError>;

/// Header naming the backend that answered, on every response.
pub const BACKEND_HEADER: &str = "x-backend";

/// Request header carrying the key the simulated cache looks up (else the `key` query
/// parameter).
pub const CACHE_KEY_HEADER: &str = "x-cache-key";

/// Header carrying the hex SHA-256 of a `/download` body.
pub const CONTENT_SHA256_HEADER: &str = "x-content-sha256";

/// `/download` length when `bytes` is not given: 1 MiB.
const DEFAULT_DOWNLOAD_BYTES: u64 = 1 << 20;

/// Request headers `/echo` reflects, and the `x-echo-<name>` response header each goes to,
/// so tests can see what a proxy set.
const ECHOED_HEADERS: [(&str, &str); 5] = [
    ("x-forwarded-for", "x-echo-x-forwarded-for"),
    ("x-forwarded-proto", "x-echo-x-forwarded-proto"),
    ("x-forwarded-host", "x-echo-x-forwarded-host"),
    ("x-forwarded-client-cert", "x-echo-x-forwarded-client-cert"),
    ("host", "x-echo-host"),
];

/// Answers one request.
pub(crate) async fn route(
    req: Request<Incoming>,
    state: Arc<SimState>,
    spawner: Spawner,
) -> Result<Response<ResBody>, Infallible> {
    let method = req.method().clone();
    let read_only = [Method::GET, Method::HEAD];
    let mut response = match req.uri().path() {
        "/health" if read_only.contains(&method) => health(&state),
        "/stats" if read_only.contains(&method) => json(StatusCode::OK, &state.snapshot()),
        "/control" if [Method::GET, Method::POST].contains(&method) => control(req, &state).await,
        "/download" if read_only.contains(&method) => download(req, &state).await,
        "/health" | "/stats" | "/download" => method_not_allowed("GET, HEAD"),
        "/control" => method_not_allowed("GET, POST"),
        "/echo" => echo(req, &state),
        "/ws" if method == Method::GET => ws::upgrade(req, &state, &spawner),
        "/ws" => method_not_allowed("GET"),
        _ => work(req, &state).await,
    };
    response
        .headers_mut()
        .insert(BACKEND_HEADER, state.name_header.clone());
    Ok(response)
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    name: &'a str,
}

/// `/health`: 200 `{"status":"ok"}`, or 503 `{"status":"unhealthy"}` after
/// `/control?healthy=false`. Never delayed or failed by the work settings.
fn health(state: &SimState) -> Response<ResBody> {
    let (status, word) = if state.settings().healthy {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    json(
        status,
        &Health {
            status: word,
            name: &state.name,
        },
    )
}

/// Largest `/control` form body; parameters are a few dozen bytes.
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// `/control`: validates every parameter, then applies them all at once (or none).
/// Parameters come from the query string and, for a POST, also from an
/// `application/x-www-form-urlencoded` body (what `curl -d` sends).
async fn control(req: Request<Incoming>, state: &SimState) -> Response<ResBody> {
    let mut parameters = req.uri().query().unwrap_or("").to_owned();
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = match Limited::new(req.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("reading the /control body failed: {err}"),
            );
        }
    };
    if !body.is_empty() {
        let form = std::str::from_utf8(&body).ok().filter(|_| is_form);
        let Some(form) = form else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "/control takes its parameters in the query string (POST /control?fail=0.5) \
                 or as an application/x-www-form-urlencoded body",
            );
        };
        if !parameters.is_empty() {
            parameters.push('&');
        }
        parameters.push_str(form.trim());
    }
    match parse_control(&parameters) {
        Ok(change) => {
            let settings = state.apply(&change);
            tracing::info!(
                backend = %state.name,
                latency = %settings.latency,
                fail_rate = settings.fail_rate,
                slow_factor = settings.slow_factor,
                capacity = settings.capacity,
                healthy = settings.healthy,
                cache_size = settings.cache_size,
                cache_miss_ms = settings.cache_miss_ms,
                "settings changed through /control"
            );
            json(StatusCode::OK, &settings)
        }
        Err(bad) => bad_request(&bad),
    }
}

#[derive(Serialize)]
struct WorkAnswer<'a> {
    backend: &'a str,
    path: &'a str,
    method: &'a str,
}

/// The work endpoint (every path without an endpoint of its own): queue for capacity,
/// look the cache key up, sleep the latency (plus the miss penalty), then answer 200, or
/// 503 at the fail rate.
async fn work(req: Request<Incoming>, state: &SimState) -> Response<ResBody> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let cache_key = cache_key(&parts);
    let delay_override = match parse_delay_override(parts.uri.query().unwrap_or("")) {
        Ok(delay) => delay,
        Err(bad) => return bad_request(&bad),
    };
    // Read the request body to its end so the connection can be reused for the next request.
    if let Err(err) = drain(body).await {
        return body_read_failed(&err);
    }

    let gate = state.gate();
    let queued = gate.as_ref().map(|_| Gauge::enter(&state.queued));
    let _permit = match gate {
        Some(gate) => match gate.acquire_owned().await {
            Ok(permit) => Some(permit),
            Err(_) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the capacity queue is closed",
                );
            }
        },
        None => None,
    };
    // Counted in flight before leaving the queue, so `/stats` never sees the request in neither.
    let _in_flight = Gauge::enter(&state.in_flight);
    drop(queued);

    let settings = state.settings();
    let mut rng = fastrand::Rng::new();
    let mut latency = delay_override.unwrap_or_else(|| settings.latency.sample(&mut rng));
    // Looked up once served, not on arrival: a key fetched by a request ahead in the
    // queue is a hit for the ones behind it, as in a real cache.
    if let Some(key) = cache_key
        && state.cache_miss(&key, settings.cache_size)
    {
        latency += std::time::Duration::from_millis(settings.cache_miss_ms);
    }
    tokio::time::sleep(scale(latency, settings.slow_factor)).await;

    if rng.f64() < settings.fail_rate {
        state.errors.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "injected_failure",
            &format!("simulated failure (fail rate {})", settings.fail_rate),
        );
    }
    json(
        StatusCode::OK,
        &WorkAnswer {
            backend: &state.name,
            path: parts.uri.path(),
            method: parts.method.as_str(),
        },
    )
}

/// The cache key of a work request: the `x-cache-key` header, else the `key` query
/// parameter; `None` when neither is there.
fn cache_key(parts: &http::request::Parts) -> Option<Vec<u8>> {
    if let Some(value) = parts.headers.get(CACHE_KEY_HEADER) {
        return Some(value.as_bytes().to_vec());
    }
    form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "key")
        .map(|(_, value)| value.as_bytes().to_vec())
}

/// `/echo`: the request body streams straight back as the response body, never buffered;
/// `content-type` is kept and the forwarding headers come back as `x-echo-<name>`.
fn echo(req: Request<Incoming>, state: &SimState) -> Response<ResBody> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let mut response = Response::new(body.map_err(BoxError::from).boxed_unsync());
    let headers = response.headers_mut();
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, content_type.clone());
    }
    for (name, echoed) in ECHOED_HEADERS {
        for value in parts.headers.get_all(name) {
            headers.append(HeaderName::from_static(echoed), value.clone());
        }
    }
    response
}

/// `/download?bytes=N`: N bytes of the [`DownloadPattern`](crate::DownloadPattern) stream
/// with its SHA-256 in `x-content-sha256`.
async fn download(req: Request<Incoming>, state: &SimState) -> Response<ResBody> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let mut len = DEFAULT_DOWNLOAD_BYTES;
    for (key, value) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        if key == "bytes" {
            match value.parse::<u64>() {
                Ok(n) if n <= MAX_DOWNLOAD_BYTES => len = n,
                _ => {
                    return bad_request(&BadParameter::new(
                        "bytes",
                        format!(
                            "`{value}` is not a whole number of bytes from 0 to \
                             {MAX_DOWNLOAD_BYTES} (1 GiB)"
                        ),
                    ));
                }
            }
        }
    }
    let checksum = match state.cached_checksum(len) {
        Some(checksum) => checksum,
        None => match tokio::task::spawn_blocking(move || pattern_sha256(len)).await {
            Ok(checksum) => {
                let checksum: Arc<str> = checksum.into();
                state.remember_checksum(len, checksum.clone());
                checksum
            }
            Err(err) => {
                tracing::error!(error = %err, "computing a /download checksum failed");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "computing the checksum failed",
                );
            }
        },
    };
    let mut response = Response::new(
        PatternBody::new(len)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        CONTENT_SHA256_HEADER,
        HeaderValue::from_str(&checksum).expect("a hex digest is a valid header value"),
    );
    response
}

/// Reads a request body to its end, discarding it.
async fn drain(mut body: Incoming) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

/// A JSON response; our types always serialise, the fallback only keeps this panic-free.
pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Response<ResBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// `{"error":{"code":…,"message":…}}` with `status`, the project-wide error shape.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response<ResBody> {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail { code, message },
        },
    )
}

fn bad_request(bad: &BadParameter) -> Response<ResBody> {
    error(StatusCode::BAD_REQUEST, "bad_request", &bad.to_message())
}

fn body_read_failed(err: &hyper::Error) -> Response<ResBody> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        &format!("reading the request body failed: {err}"),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<ResBody> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this endpoint accepts {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}
