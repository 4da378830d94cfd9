//! TCP mode: a client connection is spliced to a backend connection.
//!
//! The listener's single route names the pool. The pool's strategy picks a backend as for
//! HTTP; a connect failure is recorded against the backend (outlier detection) and retried
//! on another one within the pool's retry policy (`connect_failure`). Once connected, bytes
//! are copied both ways until either side closes; the backend counts one request in flight
//! for the connection's lifetime, so `least_connections` balances open connections as
//! HAProxy's `leastconn` does in TCP mode, and a backend's `max_requests` caps its open
//! connections (HAProxy's server `maxconn` in TCP mode): a connection that finds every
//! backend full waits in the pool queue, in arrival order, and is closed if the queue is
//! full or its timeout passes.

use std::net::SocketAddr;
use std::sync::Arc;

use fulcrum_balance::{BackendId, RequestInfo};
use fulcrum_stats::clock::now_ns;
use tokio::net::TcpStream;

use crate::admission::{Admission, Refusal};
use crate::forward::MAX_ATTEMPTS;
use crate::listener::ListenerRuntime;

/// Serves one client connection accepted on a TCP listener.
pub async fn serve(listener: Arc<ListenerRuntime>, mut client: TcpStream, peer: SocketAddr) {
    let Some((pool, backend_tags)) = listener
        .router
        .load()
        .routes()
        .first()
        .map(|r| (Arc::clone(&r.pool), r.backend_tags.clone()))
    else {
        tracing::warn!(listener = %listener.name, "tcp listener has no route; closing connection");
        return;
    };
    let _active = pool.enter();
    let state = pool.state();
    let allowed = backend_tags.as_deref().map(|tags| state.tag_mask(tags));
    let settings = &state.settings;
    let max_attempts = (1 + settings.retry.attempts as usize).min(MAX_ATTEMPTS);
    let mut tried = [BackendId(0); MAX_ATTEMPTS];
    let admission = Admission {
        pool: &pool,
        state: &state,
        allowed: allowed.as_deref(),
        info: RequestInfo::new(now_ns()),
    };
    for attempt in 0..max_attempts {
        let _retry = if attempt == 0 {
            None
        } else {
            match pool.try_retry(&settings.retry) {
                Some(claim) => Some(claim),
                None => break,
            }
        };
        let (id, guard) = match admission.admit(&tried[..attempt]).await {
            Ok(taken) => taken,
            Err(Refusal::NoBackend) => break,
            Err(refusal) => {
                tracing::warn!(listener = %listener.name, %peer, pool = %pool.name(), ?refusal, "every backend is at its max_requests; closing client connection");
                return;
            }
        };
        tried[attempt] = id;
        let backend = &state.runtimes[id.0];
        let addr = state.backends[id.0].addr;
        match tokio::time::timeout(settings.conn.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut upstream)) => {
                guard.success(now_ns());
                let _ = upstream.set_nodelay(true);
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((sent, received)) => tracing::debug!(
                        listener = %listener.name, %peer, backend = %backend.address, sent, received, "tcp connection closed"
                    ),
                    Err(error) => tracing::debug!(
                        listener = %listener.name, %peer, backend = %backend.address, %error, "tcp connection ended with an error"
                    ),
                }
                return;
            }
            Ok(Err(error)) => {
                tracing::debug!(listener = %listener.name, backend = %backend.address, %error, "tcp connect failed");
            }
            Err(_) => {
                tracing::debug!(listener = %listener.name, backend = %backend.address, "tcp connect timed out");
            }
        }
        backend.metrics.connect_failures.inc();
        let consecutive = guard.failure(now_ns());
        pool.maybe_eject(&state, id.0, consecutive);
        if !settings.retry.on_connect_failure {
            break;
        }
    }
    tracing::warn!(listener = %listener.name, %peer, pool = %pool.name(), "no backend reachable; closing client connection");
}
