//! Cluster endpoints of the admin API: members, leader, status, membership events
//! (Server-Sent Events), join/forget, work assignments; seed 000's `/cluster/*` views;
//! and the run-time changes that go through the control plane (weights, adding and
//! removing backends, and — in a cluster — every change) with `?consistency=`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use fulcrum_cluster::runtime::{Consistency, ControlError, ControlPlane};
use fulcrum_cluster::shared::{Change, ChangeError};
use fulcrum_config::{BackendConfig, MAX_REQUESTS_LIMIT};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{AdminState, ApiError, bad_body};

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        let (status, code) = match &error {
            ControlError::Change(ChangeError::UnknownPool(_)) => {
                (StatusCode::NOT_FOUND, "unknown_pool")
            }
            ControlError::Change(ChangeError::UnknownBackend { .. }) => {
                (StatusCode::NOT_FOUND, "unknown_backend")
            }
            ControlError::Change(ChangeError::DuplicateBackend { .. }) => {
                (StatusCode::CONFLICT, "duplicate_backend")
            }
            ControlError::Change(ChangeError::Invalid(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_change")
            }
            ControlError::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "write_conflict"),
            ControlError::Lagging { .. } => (StatusCode::GATEWAY_TIMEOUT, "consistency_timeout"),
            ControlError::Apply(_) => (StatusCode::INTERNAL_SERVER_ERROR, "apply_failed"),
            ControlError::NoRegistry(_) => (StatusCode::CONFLICT, "no_registry"),
        };
        ApiError::new(status, code, error.to_string())
    }
}

/// `?consistency=async|quorum|all` of mutating calls.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct WriteQuery {
    consistency: Option<String>,
}

impl WriteQuery {
    pub(crate) fn consistency(&self) -> Result<Consistency, ApiError> {
        match &self.consistency {
            None => Ok(Consistency::Async),
            Some(v) => v
                .parse()
                .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_consistency", e)),
        }
    }
}

/// The control plane when the node is in a cluster, for changes that must reach every
/// node; `None` on a single node.
pub(crate) fn clustered(state: &AdminState) -> Option<&ControlPlane> {
    state.control.as_ref().filter(|c| c.is_clustered())
}

fn control(state: &AdminState) -> Result<&ControlPlane, ApiError> {
    state.control.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_control_plane",
            "this node runs without a control plane",
        )
    })
}

fn cluster_only(state: &AdminState) -> Result<&ControlPlane, ApiError> {
    clustered(state).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node is not part of a cluster (no `cluster` block in its configuration)",
        )
    })
}

/// Applies `change` through the control plane and answers with the write's result.
pub(crate) async fn submit(
    plane: &ControlPlane,
    change: Change,
    consistency: Consistency,
) -> Result<Value, ApiError> {
    let result = plane.submit(change, consistency).await?;
    Ok(json!(result))
}

/// 422 `invalid_weight` unless `weight` is within 1..=65535, as in the configuration.
fn check_weight(weight: u32) -> Result<(), ApiError> {
    if (1..=65535).contains(&weight) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_weight",
            format!("weight {weight} is out of range 1..=65535"),
        ))
    }
}

/// Body of `POST /api/pools/{pool}/backends/{address}/weight`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightBody {
    weight: u32,
}

pub(crate) async fn set_weight(
    state: &AdminState,
    pool: String,
    address: String,
    body: Result<Json<WeightBody>, JsonRejection>,
    query: &WriteQuery,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(bad_body)?;
    check_weight(body.weight)?;
    let plane = control(state)?;
    let write = submit(
        plane,
        Change::Weight {
            pool: pool.clone(),
            address: address.clone(),
            weight: body.weight,
        },
        query.consistency()?,
    )
    .await?;
    Ok(Json(
        json!({ "pool": pool, "backend": address, "weight": body.weight, "write": write }),
    ))
}

/// Body of `POST /api/pools/{pool}/backends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddBackendBody {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    /// Most requests in flight at once; 0 (default) = the pool's `default_max_requests`.
    #[serde(default)]
    max_requests: u32,
    /// Registry pools: seconds the registration lives unless refreshed (default 30).
    #[serde(default)]
    ttl_secs: Option<u64>,
}

fn one() -> u32 {
    1
}

pub(crate) async fn add_backend(
    State(state): State<AdminState>,
    Path(pool): Path<String>,
    Query(query): Query<WriteQuery>,
    body: Result<Json<AddBackendBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(body) = body.map_err(bad_body)?;
    crate::pool_named(&state, &pool)?;
    let plane = control(&state)?;
    check_weight(body.weight)?;
    if body.max_requests > MAX_REQUESTS_LIMIT {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_max_requests",
            format!(
                "max_requests {} is out of range 0..={MAX_REQUESTS_LIMIT}",
                body.max_requests
            ),
        ));
    }
    if body.address.parse::<SocketAddr>().is_err() && !body.address.contains(':') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_address",
            format!("`{}` is not host:port", body.address),
        ));
    }
    // Resolved now, as every node will when it applies the change: an address none can
    // resolve would be written and then refused everywhere.
    let lookup = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host(body.address.as_str()),
    )
    .await;
    let unresolvable = |reason: String| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_address",
            format!("cannot resolve `{}`: {reason}", body.address),
        )
    };
    match lookup {
        Ok(Ok(mut addresses)) => {
            if addresses.next().is_none() {
                return Err(unresolvable("no address".to_owned()));
            }
        }
        Ok(Err(error)) => return Err(unresolvable(error.to_string())),
        Err(_) => return Err(unresolvable("no answer within 5 s".to_owned())),
    }
    // Another spelling of a listed backend is that backend (a duplicate, or for a
    // registry pool a renewal), not a new one.
    let address = crate::listed_address(&state, &pool, body.address.clone());
    let backend = BackendConfig {
        address,
        weight: body.weight,
        tags: body.tags,
        max_requests: body.max_requests,
    };
    if plane.uses_registry(&pool) {
        let ttl = Duration::from_secs(body.ttl_secs.unwrap_or(30).clamp(1, 86_400));
        plane.register(&pool, &backend, ttl).await?;
        return Ok((
            StatusCode::CREATED,
            Json(json!({
                "pool": pool, "backend": backend.address, "registered": true,
                "ttl_secs": ttl.as_secs(),
            })),
        ));
    }
    let shown = backend.address.clone();
    let write = submit(
        plane,
        Change::AddBackend {
            pool: pool.clone(),
            backend,
        },
        query.consistency()?,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "pool": pool, "backend": shown, "write": write })),
    ))
}

pub(crate) async fn remove_backend(
    State(state): State<AdminState>,
    Path((pool, address)): Path<(String, String)>,
    Query(query): Query<WriteQuery>,
) -> Result<Json<Value>, ApiError> {
    crate::pool_named(&state, &pool)?;
    let address = crate::listed_address(&state, &pool, address);
    let plane = control(&state)?;
    if plane.uses_registry(&pool) {
        let removed = plane.deregister(&pool, &address).await?;
        if removed {
            return Ok(Json(
                json!({ "pool": pool, "backend": address, "deregistered": true }),
            ));
        }
    }
    let write = submit(
        plane,
        Change::RemoveBackend {
            pool: pool.clone(),
            address: address.clone(),
        },
        query.consistency()?,
    )
    .await?;
    Ok(Json(
        json!({ "pool": pool, "backend": address, "removed": true, "write": write }),
    ))
}

pub(crate) async fn nodes(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    Ok(Json(json!({ "nodes": plane.nodes().await })))
}

pub(crate) async fn node(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    plane
        .nodes()
        .await
        .into_iter()
        .find(|n| n.node_id == id)
        .map(|n| Json(json!(n)))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_node",
                format!("no cluster member `{id}`"),
            )
        })
}

pub(crate) async fn forget_node(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    if plane.node_id() == Some(id.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "is_self",
            "a node cannot remove itself; stop it instead (it then leaves gracefully)",
        ));
    }
    if !plane.nodes().await.iter().any(|n| n.node_id == id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_node",
            format!("no cluster member `{id}`"),
        ));
    }
    if plane.forget(&id).await {
        Ok(Json(json!({ "node_id": id, "removed": true })))
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_removable",
            format!("`{id}` is still alive; only failed or departed nodes can be removed"),
        ))
    }
}

pub(crate) async fn leader(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    Ok(Json(json!(plane.leader().await)))
}

pub(crate) async fn status(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    Ok(Json(plane.status().await))
}

/// Body of `POST /api/cluster/join`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinBody {
    seed: String,
}

pub(crate) async fn join(
    State(state): State<AdminState>,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(bad_body)?;
    let plane = cluster_only(&state)?;
    let seed: SocketAddr = body.seed.parse().map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_seed",
            format!("`{}` is not ip:port", body.seed),
        )
    })?;
    plane
        .join_seed(seed)
        .await
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "join_failed", e))?;
    Ok(Json(json!({ "seed": seed.to_string(), "joining": true })))
}

pub(crate) async fn assignments(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    Ok(Json(json!(plane.assignments().await)))
}

pub(crate) async fn rebalance(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    Ok(Json(json!(plane.rebalance().await)))
}

/// `GET /api/cluster/events`: the recent events, then each new one, as Server-Sent
/// Events (`event: node_joined|node_left|node_failed`, `data:` the event as JSON).
pub(crate) async fn events(
    State(state): State<AdminState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let plane = cluster_only(&state)?;
    let Some((recent, rx)) = plane.events() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node is not part of a cluster",
        ));
    };
    let backlog: Vec<Result<Event, Infallible>> = recent.iter().map(|e| Ok(to_event(e))).collect();
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((Ok(to_event(&e)), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(backlog), live);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One membership event as an SSE event: `event:` its kind, `id:` its sequence number,
/// `data:` the event as JSON.
fn to_event(e: &fulcrum_cluster::membership::ClusterEvent) -> Event {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "event".to_owned());
    Event::default()
        .event(kind)
        .id(e.seq.to_string())
        .data(serde_json::to_string(e).unwrap_or_default())
}

/// Seed 000's `GET /cluster/nodes`.
pub(crate) async fn seed_nodes(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    nodes(State(state)).await
}

/// Seed 000's `GET /cluster/master`: the leader.
pub(crate) async fn seed_master(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    let leader = plane.leader().await;
    Ok(Json(json!({
        "master": leader.as_ref().and_then(|l| l.leader.clone()),
        "is_master": leader.as_ref().is_some_and(|l| l.is_self),
        "token": leader.as_ref().and_then(|l| l.token),
    })))
}

/// Seed 000's `GET /cluster/stats`.
pub(crate) async fn seed_stats(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let plane = cluster_only(&state)?;
    Ok(Json(plane.cluster_stats().await))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_query() {
        let q = WriteQuery {
            consistency: Some("quorum".into()),
        };
        assert_eq!(q.consistency().expect("valid"), Consistency::Quorum);
        let bad = WriteQuery {
            consistency: Some("most".into()),
        };
        assert!(bad.consistency().is_err());
    }
}
