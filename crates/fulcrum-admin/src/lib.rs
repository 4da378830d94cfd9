//! The admin API: node status, pools and backends with live figures, run-time changes
//! (strategy switch, drain/enable/disable), configuration reload, `GET /metrics` in the
//! Prometheus text format, and the live web dashboard (`GET /dashboard`) built on them.
//!
//! It runs on its own listener (`admin.listen`, 127.0.0.1 by default), apart from client
//! traffic, on the node's control runtime. Everything is JSON; errors are
//! `{"error": {"code": "...", "message": "..."}}` with the matching status: 400 for a
//! malformed body, 401 for a missing or wrong bearer token, 404 for an unknown pool,
//! backend or path, 405 for a wrong method, 422 for a well-formed request naming
//! something invalid (an unknown strategy), 500 when a reload fails. When `admin.token` is
//! set, every `POST` needs `Authorization: Bearer <token>`; reads stay open, as with
//! Envoy's admin interface bound to localhost.
//!
//! The paths are part of Fulcrum's fixed interface (DESIGN.md); see docs/API.md.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fulcrum_balance::StrategyKind;
use fulcrum_cluster::runtime::ControlPlane;
use fulcrum_cluster::shared::{AdminState as OverlayAdmin, Change};
use fulcrum_proxy::{AdminAction, AdminError, Node};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Reloads the node's configuration from its source (the config file); returns a summary
/// of what was applied, or why the new configuration was refused (the running one stays).
pub type ReloadFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the admin API serves.
#[derive(Clone)]
pub struct AdminState {
    /// The node.
    pub node: Node,
    /// Name of the node shown by `/api/status`.
    pub node_name: String,
    /// Bearer token required for `POST` calls, if any.
    pub token: Option<String>,
    /// Configuration reload, if the node has a configuration file.
    pub reload: Option<ReloadFn>,
    /// The node's control plane (shared configuration, discovery, cluster); run-time
    /// changes go through it when the node is in a cluster, so they reach every node.
    pub control: Option<ControlPlane>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// An API error: status, machine-readable code and a message naming the problem.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response()
    }
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        let code = match error {
            AdminError::UnknownPool(_) => "unknown_pool",
            AdminError::UnknownBackend { .. } => "unknown_backend",
        };
        ApiError::new(StatusCode::NOT_FOUND, code, error.to_string())
    }
}

mod cluster;

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    let mutating = Router::new()
        .route("/api/pools/{pool}/strategy", post(switch_strategy))
        .route(
            "/api/pools/{pool}/backends/{address}/{action}",
            post(backend_action),
        )
        .route("/api/reload", post(reload))
        .route("/api/pools/{pool}/backends", post(cluster::add_backend))
        .route(
            "/api/pools/{pool}/backends/{address}",
            delete(cluster::remove_backend),
        )
        .route("/api/cluster/join", post(cluster::join))
        .route("/api/cluster/nodes/{id}", delete(cluster::forget_node))
        .route("/api/cluster/rebalance", post(cluster::rebalance))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_cross_site,
        ));
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(dashboard))
        .route("/api/status", get(status))
        .route("/api/pools", get(pools))
        .route("/api/pools/{pool}", get(pool))
        .route("/api/pools/{pool}/backends", get(backends))
        .route("/api/pools/{pool}/analysis", get(analysis))
        .route("/api/endpoints", get(endpoints))
        .route("/api/algorithm-metrics", get(algorithm_metrics))
        .route("/metrics", get(metrics))
        .route("/api/cluster/nodes", get(cluster::nodes))
        .route("/api/cluster/nodes/{id}", get(cluster::node))
        .route("/api/cluster/leader", get(cluster::leader))
        .route("/api/cluster/status", get(cluster::status))
        .route("/api/cluster/events", get(cluster::events))
        .route("/api/cluster/assignments", get(cluster::assignments))
        .route("/cluster/nodes", get(cluster::seed_nodes))
        .route("/cluster/stats", get(cluster::seed_stats))
        .route("/cluster/master", get(cluster::seed_master))
        .merge(mutating)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Turns an error that axum's extractors answered in plain text (a path segment that is
/// not UTF-8, a malformed query string) into the API's JSON error shape, keeping the
/// status and the text as the message, so every error a client sees is JSON.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // Extractor rejections are one short line; anything longer is cut.
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        _ if status.is_client_error() => "bad_request",
        _ => "internal_error",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The dashboard page (`dashboard.html`) with the strategy names filled in.
static DASHBOARD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let names = serde_json::to_string(StrategyKind::NAMES)
        .expect("a list of string literals always serialises");
    include_str!("dashboard.html").replacen("/*STRATEGIES*/[]", &names, 1)
});

/// `GET /dashboard`: the live web dashboard, one self-contained page (no external
/// resources) that polls the read endpoints of this API once a second and makes changes
/// through it (strategy switch, drain/enable/disable, with the bearer token typed into
/// the page when `admin.token` is set).
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Only this page's own inline code and same-origin API calls.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        DASHBOARD.as_str(),
    )
        .into_response()
}

async fn require_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let authorized = given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes()));
        if !authorized {
            let message = if given.is_none() {
                "this call changes the node: send `Authorization: Bearer <admin.token>`"
            } else {
                "the bearer token does not match admin.token"
            };
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
            // RFC 6750 §3: a 401 names the scheme it wants.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"fulcrum-admin\""),
            );
            return response;
        }
    }
    next.run(request).await
}

/// Refuses a change that a web page could have sent on the operator's behalf, before the
/// token check (OWASP's CSRF defences; Envoy's admin docs warn of the same risk):
///
/// - `Sec-Fetch-Site: cross-site` or `same-site` (the Fetch Metadata a browser attaches),
///   or an `Origin` whose `host[:port]` is not the request's `Host`: 403 `cross_site`;
/// - a body typed as a form (`application/x-www-form-urlencoded`, `multipart/form-data`,
///   `text/plain`: the types a page can send without a CORS preflight), even an empty
///   one: 415 `unsupported_media_type`;
/// - with no `admin.token`, a `Host` that is neither an IP address nor `localhost`: 403
///   `host_not_allowed`. That is DNS rebinding — a page whose name now resolves to this
///   address is same-origin with the API, so neither check above sees it; a token stops
///   it, since the page cannot know the token.
///
/// Requests from scripts and `curl` carry none of these, and the dashboard's are
/// same-origin, so they pass.
async fn refuse_cross_site(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match cross_site_refusal(&headers, state.token.is_some()) {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    }
}

/// Why [`refuse_cross_site`] refuses a change with `headers`, if it does.
fn cross_site_refusal(headers: &HeaderMap, has_token: bool) -> Option<ApiError> {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").trim())
    };
    let host = text(header::HOST);
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site"))
        && (site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site"))
    {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            format!("a change sent by a page of another site (Sec-Fetch-Site: {site}) is refused"),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        let same = authority
            .zip(host)
            .is_some_and(|(a, h)| a.eq_ignore_ascii_case(h));
        if !same {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                format!(
                    "a change sent from origin `{origin}` to host `{}` is refused: only the \
                     API's own pages (the dashboard) may send changes from a browser",
                    host.unwrap_or("")
                ),
            ));
        }
    }
    if let Some(content_type) = text(header::CONTENT_TYPE) {
        let media = content_type.split(';').next().unwrap_or("").trim();
        let form = [
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "text/plain",
        ];
        if form.iter().any(|f| media.eq_ignore_ascii_case(f)) {
            return Some(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "`Content-Type: {media}` is refused on changes (a web page can send it as \
                     a form): send `application/json`, or no body"
                ),
            ));
        }
    }
    if !has_token
        && let Some(host) = host
        && !is_address_host(host)
    {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "admin.token is not set, so changes are taken only when addressed to an IP \
                 address or localhost (a page could reach `{host}` by DNS rebinding): use the \
                 address, or set admin.token"
            ),
        ));
    }
    None
}

/// Whether a `Host` value is an IP address or `localhost`, with or without a port.
fn is_address_host(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty() || port.strip_prefix(':').is_some_and(is_port))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        Some(_) => return false,
        None => host,
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
}

/// Whether `s` is a decimal port number.
fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok()
}

/// The token of an `Authorization: Bearer <token>` value; the scheme name is
/// case-insensitive (RFC 7235 §2.1), so `bearer` and `BEARER` are accepted too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so response timing does not reveal a token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no admin endpoint at {} {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn status(State(state): State<AdminState>) -> Json<Value> {
    let node = &state.node;
    let (mut requests, mut errors, mut in_flight, mut active) = (0u64, 0u64, 0u64, 0u64);
    for pool in node.pools() {
        active += pool.active_requests();
        for b in &pool.state().backends {
            requests += b.live.requests();
            errors += b.live.failures();
            in_flight += b.live.in_flight();
        }
    }
    let started = node
        .started_at()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Json(json!({
        "node": state.node_name,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": node.uptime().as_secs_f64(),
        "started_at_unix": started,
        "threads": node.threads(),
        "listeners": node.listener_status(),
        "totals": {
            "pools": node.pools().len(),
            "requests": requests,
            "errors": errors,
            "in_flight": in_flight,
            "active_requests": active,
        },
    }))
}

async fn pools(State(state): State<AdminState>) -> Json<Value> {
    let pools: Vec<_> = state
        .node
        .pools()
        .iter()
        .map(|p| Node::pool_summary(p))
        .collect();
    Json(json!({ "pools": pools }))
}

/// The pool named `name`, or 404 `unknown_pool`.
pub(crate) fn pool_named(
    state: &AdminState,
    name: &str,
) -> Result<Arc<fulcrum_proxy::Pool>, ApiError> {
    state
        .node
        .pool(name)
        .ok_or_else(|| AdminError::UnknownPool(name.to_owned()).into())
}

/// The spelling under which pool `pool` lists the backend a caller named `address` (the
/// same backend by [`fulcrum_cluster::shared::same_address`]: host name case, IP
/// notation); `address` itself when the pool lists none such (the call then reports it
/// unknown, or adds it).
pub(crate) fn listed_address(state: &AdminState, pool: &str, address: String) -> String {
    let Ok(p) = pool_named(state, pool) else {
        return address;
    };
    p.state()
        .backends
        .iter()
        .find(|b| fulcrum_cluster::shared::same_address(&b.address, &address))
        .map_or(address, |b| b.address.to_string())
}

async fn pool(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pool = pool_named(&state, &name)?;
    Ok(Json(json!(Node::pool_summary(&pool))))
}

async fn backends(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pool = pool_named(&state, &name)?;
    let summary = Node::pool_summary(&pool);
    Ok(Json(json!({
        "pool": summary.name,
        "strategy": summary.strategy,
        "panic": summary.panic,
        "backends": Node::backend_status(&pool),
    })))
}

async fn analysis(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pool = pool_named(&state, &name)?;
    Ok(Json(json!(Node::pool_analysis(&pool))))
}

async fn endpoints(State(state): State<AdminState>) -> Json<Value> {
    Json(json!({ "endpoints": state.node.endpoints() }))
}

async fn algorithm_metrics(State(state): State<AdminState>) -> Json<Value> {
    let pools: serde_json::Map<String, Value> = state
        .node
        .pools()
        .iter()
        .map(|pool| (pool.name().to_owned(), json!(Node::algorithm_metrics(pool))))
        .collect();
    Json(json!({ "pools": pools }))
}

/// Body of `POST /api/pools/{pool}/strategy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyChange {
    strategy: String,
}

/// The error for a body that is not the JSON expected: 413 `payload_too_large` for one
/// over the admin API's body limit (axum's 2 MiB default), else 400 `bad_request`.
pub(crate) fn bad_body(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body too large: {}", rejection.body_text()),
        );
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!("invalid JSON body: {}", rejection.body_text()),
    )
}

async fn switch_strategy(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Query(query): Query<cluster::WriteQuery>,
    body: Result<Json<StrategyChange>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(change) = body.map_err(bad_body)?;
    // 404 before 422: an unknown pool is the more fundamental error.
    pool_named(&state, &name)?;
    let kind: StrategyKind =
        change
            .strategy
            .parse()
            .map_err(|e: fulcrum_balance::UnknownStrategy| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_strategy",
                    e.to_string(),
                )
            })?;
    let consistency = query.consistency()?;
    // Through the control plane, on a single node too: the switch is then part of the
    // run-time overlay like a weight change, so a later change or reload that composes
    // the configuration again keeps it instead of going back to the file's strategy.
    if let Some(plane) = &state.control {
        let previous = pool_named(&state, &name)?.state().kind;
        let write = cluster::submit(
            plane,
            Change::Strategy {
                pool: name.clone(),
                strategy: kind,
            },
            consistency,
        )
        .await?;
        return Ok(Json(json!({
            "pool": name, "strategy": kind.name(), "previous": previous.name(), "write": write,
        })));
    }
    let previous = state.node.switch_strategy(&name, kind)?;
    Ok(Json(
        json!({ "pool": name, "strategy": kind.name(), "previous": previous.name() }),
    ))
}

async fn backend_action(
    State(state): State<AdminState>,
    Path((pool, address, action)): Path<(String, String, String)>,
    Query(query): Query<cluster::WriteQuery>,
    body: Result<Json<cluster::WeightBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let address = listed_address(&state, &pool, address);
    if action == "weight" {
        return cluster::set_weight(&state, pool, address, body, &query).await;
    }
    let action = match action.as_str() {
        "drain" => AdminAction::Drain,
        "disable" => AdminAction::Disable,
        "enable" => AdminAction::Enable,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "unknown backend action `{other}`; expected drain, enable, disable or weight"
                ),
            ));
        }
    };
    if let Some(plane) = cluster::clustered(&state) {
        let overlay = match action {
            AdminAction::Drain => Some(OverlayAdmin::Draining),
            AdminAction::Disable => Some(OverlayAdmin::Disabled),
            AdminAction::Enable => None,
        };
        let write = cluster::submit(
            plane,
            Change::Admin {
                pool: pool.clone(),
                address: address.clone(),
                state: overlay,
            },
            query.consistency()?,
        )
        .await?;
        let now = pool_named(&state, &pool)?
            .state()
            .backends
            .iter()
            .find(|b| &*b.address == address.as_str())
            .map_or("unknown", |b| b.live.flags().state_name());
        return Ok(Json(
            json!({ "pool": pool, "backend": address, "state": now, "write": write }),
        ));
    }
    // Checked on a single node too, where every value means the same.
    query.consistency()?;
    let new_state = state.node.set_backend_admin(&pool, &address, action)?;
    Ok(Json(
        json!({ "pool": pool, "backend": address, "state": new_state }),
    ))
}

async fn reload(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let Some(reload) = &state.reload else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_config_file",
            "this node was started without a configuration file; nothing to reload",
        ));
    };
    let reload = Arc::clone(reload);
    match tokio::task::spawn_blocking(move || reload()).await {
        Ok(Ok(summary)) => Ok(Json(json!({ "reloaded": true, "summary": summary }))),
        Ok(Err(message)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            message,
        )),
        Err(join) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reload_failed",
            join.to_string(),
        )),
    }
}

/// `GET /metrics`: OpenMetrics 1.0 to a client whose `Accept` asks for it (Prometheus
/// does), else the Prometheus text format 0.0.4 — the negotiation of Prometheus's own
/// client libraries, so `curl`, `promtool check metrics` and older scrapers get the format
/// they parse.
async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let text = state.node.metrics_text();
    if accepts_openmetrics(&headers) {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            prometheus_text(&text),
        )
            .into_response()
    }
}

/// Whether an `Accept` field lists `application/openmetrics-text` with a quality above 0
/// (RFC 9110 §12.5.1).
fn accepts_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && params.all(|param| {
                    param
                        .split_once('=')
                        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                        .and_then(|(_, q)| q.trim().parse::<f32>().ok())
                        .is_none_or(|q| q > 0.0)
                })
        })
}

/// OpenMetrics 1.0 text as the Prometheus text format 0.0.4: a counter family `x` is
/// announced as `x_total` (OpenMetrics names the family without the suffix its samples
/// carry), an `info` family as the gauge `x_info`, `stateset`/`unknown` families as
/// `gauge`/`untyped`, and the
/// lines 0.0.4 lacks (`# UNIT`, `# EOF`, `_created` samples, exemplars) are dropped.
/// Label and HELP escaping is the same in both for what Fulcrum exports.
fn prometheus_text(openmetrics: &str) -> String {
    // Families whose samples carry a suffix the family name lacks.
    let mut suffixed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            match kind {
                "counter" => suffixed.insert(name, "_total"),
                "info" => suffixed.insert(name, "_info"),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = suffixed.get(name).copied().unwrap_or("");
            let tail = if prefix == "# TYPE " {
                match tail {
                    "info" | "stateset" => "gauge",
                    "unknown" => "untyped",
                    other => other,
                }
            } else {
                tail
            };
            out.push_str(prefix);
            out.push_str(name);
            out.push_str(suffix);
            out.push(' ');
            out.push_str(tail);
            out.push('\n');
            continue;
        }
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if line[..name_end].ends_with("_created") {
            continue;
        }
        // An exemplar follows the value (and timestamp) after " # ".
        let sample = line.split_once(" # ").map_or(line, |(sample, _)| sample);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_negotiation_follows_accept() {
        let accept = |value: &'static str| request_headers(&[("accept", value)]);
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(accepts_openmetrics(&accept(prometheus)));
        assert!(accepts_openmetrics(&accept("Application/OpenMetrics-Text")));
        assert!(!accepts_openmetrics(&accept("*/*")));
        assert!(!accepts_openmetrics(&accept("text/plain")));
        assert!(!accepts_openmetrics(&accept(
            "application/openmetrics-text; q=0, text/plain"
        )));
        assert!(!accepts_openmetrics(&HeaderMap::new()));
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP fulcrum_requests Attempts.\n# TYPE fulcrum_requests counter\n\
                  fulcrum_requests_total{pool=\"a\"} 3\n\
                  fulcrum_requests_created{pool=\"a\"} 1.7e9\n\
                  # HELP fulcrum_up Up.\n# TYPE fulcrum_up gauge\n# UNIT fulcrum_up x\n\
                  fulcrum_up 1\n\
                  # TYPE fulcrum_build info\nfulcrum_build_info{v=\"1\"} 1\n\
                  # TYPE fulcrum_seconds histogram\n\
                  fulcrum_seconds_bucket{le=\"+Inf\"} 2 # {trace_id=\"x\"} 0.1\n\
                  fulcrum_seconds_sum 0.5\nfulcrum_seconds_count 2\n# EOF\n";
        let text = prometheus_text(om);
        assert_eq!(
            text,
            "# HELP fulcrum_requests_total Attempts.\n# TYPE fulcrum_requests_total counter\n\
             fulcrum_requests_total{pool=\"a\"} 3\n\
             # HELP fulcrum_up Up.\n# TYPE fulcrum_up gauge\nfulcrum_up 1\n\
             # TYPE fulcrum_build_info gauge\nfulcrum_build_info{v=\"1\"} 1\n\
             # TYPE fulcrum_seconds histogram\n\
             fulcrum_seconds_bucket{le=\"+Inf\"} 2\n\
             fulcrum_seconds_sum 0.5\nfulcrum_seconds_count 2\n"
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    fn request_headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, header::HeaderValue::from_static(value));
        }
        headers
    }

    fn refusal(pairs: &[(&'static str, &'static str)], has_token: bool) -> Option<&'static str> {
        cross_site_refusal(&request_headers(pairs), has_token).map(|e| e.code)
    }

    #[test]
    fn changes_a_web_page_could_send_are_refused() {
        let local = ("host", "127.0.0.1:9901");
        // curl and scripts: no Origin, no fetch metadata.
        assert_eq!(refusal(&[local], false), None);
        assert_eq!(
            refusal(&[local, ("content-type", "application/json")], false),
            None
        );
        // The dashboard: same origin.
        assert_eq!(
            refusal(
                &[
                    local,
                    ("origin", "http://127.0.0.1:9901"),
                    ("sec-fetch-site", "same-origin")
                ],
                false
            ),
            None
        );
        // Another site, by fetch metadata or by origin.
        assert_eq!(
            refusal(&[local, ("sec-fetch-site", "cross-site")], true),
            Some("cross_site")
        );
        assert_eq!(
            refusal(&[local, ("sec-fetch-site", "same-site")], true),
            Some("cross_site")
        );
        assert_eq!(
            refusal(&[local, ("origin", "http://evil.example")], true),
            Some("cross_site")
        );
        assert_eq!(
            refusal(&[local, ("origin", "null")], true),
            Some("cross_site")
        );
        // Form types, with or without a body.
        for form in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "Text/Plain;charset=utf-8",
        ] {
            let headers = [local, ("content-type", form)];
            assert_eq!(
                refusal(&headers, true),
                Some("unsupported_media_type"),
                "{form}"
            );
        }
        // DNS rebinding: a name, without a token.
        assert_eq!(
            refusal(&[("host", "evil.example:9901")], false),
            Some("host_not_allowed")
        );
        assert_eq!(refusal(&[("host", "evil.example:9901")], true), None);
        for host in [
            "localhost:9901",
            "LOCALHOST",
            "a.localhost:1",
            "[::1]:9901",
            "[::1]",
            "10.0.0.1",
        ] {
            assert!(is_address_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "127.0.0.1.nip.io:80",
            "[::1]x",
            "127.0.0.1:http",
            "",
        ] {
            assert!(!is_address_host(host), "{host}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("bearer s3cret "), Some("s3cret"));
        assert_eq!(bearer_token("BEARER s3cret"), Some("s3cret"));
        assert_eq!(bearer_token("Basic czNjcmV0"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
