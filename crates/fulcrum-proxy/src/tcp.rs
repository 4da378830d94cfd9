//! TCP mode: a client connection is spliced to a backend connection.
//!
//! The listener's single route names the pool. The pool's strategy picks a backend as for
//! HTTP; a connect failure is recorded against the backend (outlier detection) and retried
//! on another one within the pool's retry policy (`connect_failure`). Once connected, bytes
//! are copied both ways until either side closes, or until nothing moves either way for
//! the listener's `timeouts.idle` (HAProxy's `timeout client`/`timeout server` in TCP
//! mode), when both are closed. A connection's outcome is recorded when it ends: a failure
//! of the backend (outlier detection) if the backend's side failed (a reset), even after
//! it was accepted; else a success whose latency is the connect time. The backend counts
//! one request in flight for the connection's lifetime, so `least_connections` balances open connections as
//! HAProxy's `leastconn` does in TCP mode, and a backend's `max_requests` caps its open
//! connections (HAProxy's server `maxconn` in TCP mode): a connection that finds every
//! backend full waits in the pool queue, in arrival order, and is closed if the queue is
//! full or its timeout passes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use fulcrum_balance::{BackendId, RequestInfo};
use fulcrum_stats::clock::{duration_ns, now_ns};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::admission::{Admission, Refusal};
use crate::forward::MAX_ATTEMPTS;
use crate::listener::ListenerRuntime;

/// Serves one client connection accepted on a TCP listener.
pub async fn serve(listener: Arc<ListenerRuntime>, client: TcpStream, peer: SocketAddr) {
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
            Ok(Ok(upstream)) => {
                // The outcome is recorded when the connection ends (a backend may reset
                // it after accepting it); its latency is the connect time.
                let connected_ns = now_ns();
                let _ = upstream.set_nodelay(true);
                let activity = Activity::new();
                let mut client = Watched::new(client, &activity, false);
                let mut upstream = Watched::new(upstream, &activity, true);
                let idle = duration_ns(listener.timeouts.idle);
                let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
                tokio::pin!(copy);
                let ended = loop {
                    let quiet = now_ns().saturating_sub(activity.last_ns.load(Ordering::Relaxed));
                    if quiet >= idle {
                        break None;
                    }
                    tokio::select! {
                        ended = &mut copy => break Some(ended),
                        () = tokio::time::sleep(std::time::Duration::from_nanos(idle - quiet)) => {}
                    }
                };
                match ended {
                    Some(Ok((sent, received))) => tracing::debug!(
                        listener = %listener.name, %peer, backend = %backend.address, sent, received, "tcp connection closed"
                    ),
                    Some(Err(error)) => tracing::debug!(
                        listener = %listener.name, %peer, backend = %backend.address, %error, "tcp connection ended with an error"
                    ),
                    None => tracing::debug!(
                        listener = %listener.name, %peer, backend = %backend.address, "tcp connection idle; closing both sides"
                    ),
                }
                if activity.upstream_failed.load(Ordering::Relaxed) {
                    backend.metrics.resets.inc();
                    let consecutive = guard.failure(now_ns());
                    pool.maybe_eject(&state, id.0, consecutive);
                } else {
                    backend.metrics.tcp_connections.inc();
                    guard.success(connected_ns);
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

/// What the two sides of a TCP-mode connection have done: when bytes last moved (for the
/// idle timeout) and whether the backend's side failed.
#[derive(Debug)]
struct Activity {
    last_ns: AtomicU64,
    upstream_failed: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            last_ns: AtomicU64::new(now_ns()),
            upstream_failed: AtomicBool::new(false),
        }
    }
}

/// One side of a TCP-mode connection: notes when bytes move and, for the backend's side,
/// any I/O error (a reset) on it.
struct Watched<'a> {
    stream: TcpStream,
    activity: &'a Activity,
    upstream: bool,
}

impl<'a> Watched<'a> {
    fn new(stream: TcpStream, activity: &'a Activity, upstream: bool) -> Self {
        Self {
            stream,
            activity,
            upstream,
        }
    }

    fn note<T>(&self, polled: &Poll<io::Result<T>>, moved: bool) {
        match polled {
            Poll::Ready(Ok(_)) if moved => {
                self.activity.last_ns.store(now_ns(), Ordering::Relaxed);
            }
            Poll::Ready(Err(_)) if self.upstream => {
                self.activity.upstream_failed.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl AsyncRead for Watched<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        self.note(&polled, moved);
        polled
    }
}

impl AsyncWrite for Watched<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(&polled, true);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.note(&polled, false);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.note(&polled, false);
        polled
    }
}
