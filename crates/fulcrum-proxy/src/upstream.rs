//! Upstream connections: per-backend pools of keep-alive HTTP/1.1 connections, or of
//! multiplexed HTTP/2 connections (`pools.*.protocol: http2`).
//!
//! Each backend has one [`ConnPool`], shared by every worker thread but partitioned by
//! worker: a worker only reuses the connections it opened, whose hyper connection tasks
//! run on its own runtime, so a request never wakes another thread and the per-worker lock
//! is uncontended (nginx keeps its upstream keepalive cache per worker for the same
//! reason).
//!
//! Fulcrum drives `hyper::client::conn::http1` directly instead of hyper-util's pooled
//! `client::legacy::Client` (which DESIGN.md first chose). Reading hyper-util 0.1.21
//! showed two costs that matter here: it spawns a task per request to return a
//! connection to its pool once the response body has been read, and when connecting fails
//! it drops the request, body included, so a request with a body could never be retried on
//! another backend. Here, a connection is established *before* the request is handed over,
//! a connect failure gives the request back intact, and a connection returns to its pool
//! from the response body's end-of-stream, with no task spawned (see
//! docs/ARCHITECTURE.md).
//!
//! Over HTTP/2 each worker keeps one connection per backend and sends every request of
//! that worker to that backend on it as a stream (Envoy's per-worker connection pools);
//! the backend's `SETTINGS_MAX_CONCURRENT_STREAMS` makes further requests wait inside
//! hyper for a free stream. A connection that closed (GOAWAY, reset) or stayed unused
//! past the idle timeout is replaced by a new one on the next request.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_stats::clock::{duration_ns, now_ns};
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio_util::either::Either as EitherIo;

/// The body of a request sent upstream: the client's streamed body, or a buffered one
/// (empty for body-less requests; replayed requests — retries, hedges — are rebuilt with
/// it).
pub type UpstreamBody = Either<RequestBody, Full<Bytes>>;

/// A client's request body streamed to a backend, noting when its frames went out: the
/// `response_header` timer runs from the body's last frame (as Envoy's per-try timeout
/// does from the end of the request), not from the first byte, so an upload longer than
/// the timeout is not cut off; and a client whose upload stalls for that long is told
/// so (408) instead of the backend being blamed.
pub struct RequestBody {
    inner: Incoming,
    progress: Arc<BodyProgress>,
}

/// When a streamed request body last moved, shared by the body (polled by the upstream
/// connection's task) and the attempt that waits for the response head.
#[derive(Debug, Default)]
pub struct BodyProgress {
    /// Clock nanoseconds of the last frame sent (or of the start).
    last_ns: AtomicU64,
    /// The last frame was sent.
    done: AtomicBool,
    /// The last poll for a frame found none ready: the body waits for the client, not
    /// for the backend to take what was sent (a backend that stops reading leaves the
    /// body unpolled with this false).
    awaiting_client: AtomicBool,
    /// Reading the client's body failed (it aborted the upload, or its framing is bad).
    failed: AtomicBool,
}

impl RequestBody {
    /// Wraps a client's body, starting its progress clock now.
    pub fn new(inner: Incoming) -> Self {
        let progress = Arc::new(BodyProgress::default());
        progress.last_ns.store(now_ns(), Ordering::Relaxed);
        Self { inner, progress }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let progress = &self.progress;
        match &polled {
            std::task::Poll::Ready(Some(Ok(_))) => {
                progress.last_ns.store(now_ns(), Ordering::Relaxed);
                progress.awaiting_client.store(false, Ordering::Relaxed);
            }
            std::task::Poll::Ready(None) => {
                progress.last_ns.store(now_ns(), Ordering::Relaxed);
                progress.awaiting_client.store(false, Ordering::Relaxed);
                progress.done.store(true, Ordering::Release);
            }
            std::task::Poll::Pending => {
                progress.awaiting_client.store(true, Ordering::Relaxed);
            }
            std::task::Poll::Ready(Some(Err(_))) => {
                progress.failed.store(true, Ordering::Release);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Most idle connections a worker keeps per backend; further ones are closed when released.
pub const MAX_IDLE_PER_WORKER: usize = 256;

/// HTTP/2 flow-control window of each stream from a backend: how much of a response the
/// backend may send ahead of what the client has taken (1 MiB; hyper's default is 2 MiB).
pub const H2_STREAM_WINDOW: u32 = 1 << 20;

/// HTTP/2 flow-control window of a whole backend connection (1 GiB; hyper's default is
/// 5 MiB). Bytes a client has not read yet hold their share of it, and all of a worker's
/// requests to the backend share the connection: with a window of a few stream windows,
/// three clients that stopped reading large downloads held all of it, and every other
/// response on the connection stalled. This large it is exhausted only by a thousand
/// stalled streams, each bounded by [`H2_STREAM_WINDOW`].
pub const H2_CONNECTION_WINDOW: u32 = 1 << 30;

/// Interval of HTTP/2 PINGs to a backend while requests are in flight on the connection.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// An HTTP/2 connection whose PING is not acknowledged within this closes; its requests
/// fail as resets.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Marks the current thread as worker `index` (0-based) for connection-pool partitioning.
/// Threads that never call this (the control thread) share one extra partition.
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

fn worker_slot(slots: usize) -> usize {
    let w = WORKER.with(Cell::get);
    if w < slots - 1 { w } else { slots - 1 }
}

/// Why an upstream exchange failed, as retry and outlier logic classify it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be established (refused, unreachable, timed out).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// Backend address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The connection was established but failed before a response head arrived (reset,
    /// closed, protocol error).
    #[error("{addr} failed before responding: {source}")]
    Reset {
        /// Backend address.
        addr: SocketAddr,
        /// The underlying error.
        source: hyper::Error,
    },
    /// No response head within the pool's `response_header` timeout.
    #[error("{addr} sent no response head within {timeout:?}")]
    Timeout {
        /// Backend address.
        addr: SocketAddr,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The client's request body failed while it was being sent (the client aborted the
    /// upload, or its chunked framing is malformed): the client's fault, not the
    /// backend's.
    #[error(
        "the request body could not be read from the client: {}",
        root_cause(source)
    )]
    ClientBody {
        /// The underlying error.
        source: hyper::Error,
    },
    /// The client's request body made no progress for the `response_header` timeout
    /// while the backend waited for the rest of it.
    #[error("the client sent no request body data for {timeout:?}")]
    ClientStalled {
        /// The timeout that elapsed.
        timeout: Duration,
    },
}

/// The innermost error of `error`'s source chain: what actually went wrong, rather than
/// hyper's wrapper ("error from user's Body stream").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

impl UpstreamError {
    /// What kind of failure this was, in words fit for a client (no address, no
    /// transport detail).
    pub fn kind_text(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "could not connect to a backend",
            // hyper names the one parse error that is a size, not a syntax, problem
            // only in its message.
            UpstreamError::Reset { source, .. }
                if source.is_parse() && source.to_string().contains("too large") =>
            {
                "the backend's response head is too large (over 100 header fields or 400 KiB)"
            }
            UpstreamError::Reset { source, .. } if source.is_parse() => {
                "the backend's response is not valid HTTP"
            }
            UpstreamError::Reset { .. } => "the backend closed the connection before responding",
            UpstreamError::Timeout { .. } => "no response head in time",
            UpstreamError::ClientBody { .. } => "the request body could not be read",
            UpstreamError::ClientStalled { .. } => "the request body stalled",
        }
    }

    /// Whether the client, not the backend, caused the failure (such failures are not
    /// recorded against the backend nor retried).
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            UpstreamError::ClientBody { .. } | UpstreamError::ClientStalled { .. }
        )
    }
}

/// Waits for the answer to a request whose body streams: the `response_header` timer
/// runs from the body's last progress. A timeout is the client's (`ClientStalled`) when
/// the body was waiting for the client's next bytes; otherwise the backend's (`Timeout`):
/// the body had ended, or the backend stopped taking it.
async fn wait_streamed<F, T>(
    sent: F,
    progress: &BodyProgress,
    timeout: Duration,
    addr: SocketAddr,
) -> Result<T, SendFailure>
where
    F: Future<Output = T>,
{
    tokio::pin!(sent);
    let timeout_ns = duration_ns(timeout);
    let mut wait = timeout;
    loop {
        tokio::select! {
            biased;
            answer = &mut sent => return Ok(answer),
            () = tokio::time::sleep(wait) => {}
        }
        let idle = now_ns().saturating_sub(progress.last_ns.load(Ordering::Relaxed));
        if idle >= timeout_ns {
            let error = if !progress.done.load(Ordering::Acquire)
                && progress.awaiting_client.load(Ordering::Relaxed)
            {
                UpstreamError::ClientStalled { timeout }
            } else {
                UpstreamError::Timeout { addr, timeout }
            };
            return Err(SendFailure {
                error,
                unsent: None,
                unprocessed: false,
            });
        }
        wait = Duration::from_nanos(timeout_ns - idle);
    }
}

/// Whether `error` says an HTTP/2 backend did not process the request: its stream was
/// refused (`REFUSED_STREAM`, RFC 9113 §8.7) or lay above the last stream id of the
/// backend's `GOAWAY` (§6.8: such streams "were not processed" and "might be retried").
fn h2_refused(error: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = current.source();
    }
    false
}

/// A failed send, with the request given back when it was never written to the wire
/// (so it can be retried elsewhere whatever its body).
pub struct SendFailure {
    /// What went wrong.
    pub error: UpstreamError,
    /// The request, if it was not sent.
    pub unsent: Option<Request<UpstreamBody>>,
    /// The backend provably did not process the request: a keep-alive race (the request
    /// given back unsent by a pooled connection that closed, see [`Conn::send`]), or an
    /// HTTP/2 stream refused (`REFUSED_STREAM`) or above the last stream id of the
    /// backend's `GOAWAY` (RFC 9113 §8.7, §6.8). Not the backend's failure, and safe to
    /// send again.
    pub unprocessed: bool,
}

struct IdleConn {
    sender: http1::SendRequest<UpstreamBody>,
    /// When it was released, in clock nanoseconds.
    idle_since_ns: u64,
}

/// A worker's HTTP/2 connection to one backend.
struct SharedConn {
    sender: http2::SendRequest<UpstreamBody>,
    /// When a request last took it, in clock nanoseconds.
    used_ns: u64,
}

/// The HTTP version spoken to a pool's backends (`pools.*.protocol`): the configuration's
/// own type, which the data plane uses as it is.
pub use fulcrum_config::UpstreamProtocol;

/// Timeouts (and TLS) applied to one backend's connections (from the pool's settings).
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// Longest TCP connect.
    pub connect_timeout: Duration,
    /// Longest wait from sending a request to receiving the response head.
    pub response_header_timeout: Duration,
    /// Longest silence of the backend while its response body is awaited
    /// (`timeouts.read`); the body then fails as cut short.
    pub read_timeout: Duration,
    /// Idle connections older than this are not reused.
    pub idle_timeout: Duration,
    /// TLS to the backends (`pools.*.tls`); `None` = plain HTTP.
    pub tls: Option<crate::tls::UpstreamTls>,
    /// HTTP/1.1 or HTTP/2 (`pools.*.protocol`).
    pub protocol: UpstreamProtocol,
}

/// Keep-alive connections to one backend, partitioned by worker thread.
pub struct ConnPool {
    addr: SocketAddr,
    /// The TLS name of the backend's configured host (used when the pool's TLS settings
    /// fix none).
    server_name: rustls::pki_types::ServerName<'static>,
    idle: Box<[Mutex<Vec<IdleConn>>]>,
    /// Per worker: its HTTP/2 connection (`protocol: http2`), if open.
    shared: Box<[Mutex<Option<SharedConn>>]>,
    /// Per worker: held while its HTTP/2 connection is being opened, so that a burst of
    /// requests opens one connection, not one each.
    opening: Box<[tokio::sync::Mutex<()>]>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The request side of an upstream connection.
enum Sender {
    H1(http1::SendRequest<UpstreamBody>),
    /// `https`: whether it runs over TLS (the `:scheme` of its requests).
    H2 {
        sender: http2::SendRequest<UpstreamBody>,
        https: bool,
    },
}

/// A connection checked out of a [`ConnPool`], ready for one request (over HTTP/2, a
/// handle on the worker's shared connection).
pub struct Conn {
    sender: Sender,
    /// Whether the connection served a request before (a failure on a reused connection
    /// may be a keep-alive race rather than a backend fault).
    reused: bool,
}

impl ConnPool {
    /// An empty pool for backend `address` (as configured, `host:port`) at `addr`, with
    /// one partition per worker plus one for other threads.
    pub fn new(address: &str, addr: SocketAddr, workers: usize) -> Self {
        Self {
            addr,
            server_name: crate::tls::backend_server_name(address, addr),
            idle: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            shared: (0..=workers).map(|_| Mutex::new(None)).collect(),
            opening: (0..=workers).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// The name a TLS connection to this backend verifies: `tls`'s `server_name`, else
    /// the backend's host.
    pub fn server_name(
        &self,
        tls: &crate::tls::UpstreamTls,
    ) -> rustls::pki_types::ServerName<'static> {
        tls.server_name
            .clone()
            .unwrap_or_else(|| self.server_name.clone())
    }

    /// The backend address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Idle connections currently pooled, over all workers (HTTP/2 connections count
    /// as idle while open, as they take new requests).
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|p| p.lock().len()).sum::<usize>()
            + self
                .shared
                .iter()
                .filter(|s| s.lock().as_ref().is_some_and(|c| !c.sender.is_closed()))
                .count()
    }

    /// A ready connection: the most recently used idle one of this worker that is still
    /// open and younger than the idle timeout at `now_ns` (the request's clock reading),
    /// else a new one.
    pub async fn checkout(
        &self,
        settings: &ConnSettings,
        now_ns: u64,
    ) -> Result<Conn, UpstreamError> {
        let slot = worker_slot(self.idle.len());
        if settings.protocol == UpstreamProtocol::Http2 {
            if let Some(conn) = self.shared_h2(slot, settings, now_ns) {
                return Ok(conn);
            }
            // Boxed: opening is rare, and inline its future would enlarge every
            // request's.
            return Box::pin(self.open_h2(slot, settings, now_ns)).await;
        }
        loop {
            let candidate = self.idle[slot].lock().pop();
            let Some(mut idle) = candidate else { break };
            if idle.sender.is_closed()
                || now_ns.saturating_sub(idle.idle_since_ns) > duration_ns(settings.idle_timeout)
            {
                continue;
            }
            // A connection released at body end-of-stream becomes ready once its task has
            // polled again; this resolves at once, or with an error if it closed meanwhile.
            if idle.sender.ready().await.is_ok() {
                return Ok(Conn {
                    sender: Sender::H1(idle.sender),
                    reused: true,
                });
            }
        }
        // Boxed: connecting is the rare path, and its future is large; inline it would
        // enlarge (and be copied with) every request's future.
        Box::pin(self.connect(settings)).await
    }

    /// Opens worker `slot`'s HTTP/2 connection (it has none that is usable), unless
    /// another request of the worker did while this one waited its turn.
    async fn open_h2(
        &self,
        slot: usize,
        settings: &ConnSettings,
        now_ns: u64,
    ) -> Result<Conn, UpstreamError> {
        let _opening = self.opening[slot].lock().await;
        if let Some(conn) = self.shared_h2(slot, settings, now_ns) {
            return Ok(conn);
        }
        let conn = self.connect(settings).await?;
        if let Sender::H2 { sender, .. } = &conn.sender {
            *self.shared[slot].lock() = Some(SharedConn {
                sender: sender.clone(),
                used_ns: now_ns,
            });
        }
        Ok(conn)
    }

    /// A handle on worker `slot`'s HTTP/2 connection if it is open (an open HTTP/2
    /// connection is always ready: further streams beyond the backend's limit wait
    /// inside hyper) and was used within the idle timeout; a closed or stale one is
    /// dropped.
    fn shared_h2(&self, slot: usize, settings: &ConnSettings, now_ns: u64) -> Option<Conn> {
        let mut shared = self.shared[slot].lock();
        let current = shared.as_mut()?;
        if !current.sender.is_ready()
            || now_ns.saturating_sub(current.used_ns) > duration_ns(settings.idle_timeout)
        {
            *shared = None;
            return None;
        }
        current.used_ns = current.used_ns.max(now_ns);
        Some(Conn {
            sender: Sender::H2 {
                sender: current.sender.clone(),
                https: settings.tls.is_some(),
            },
            reused: true,
        })
    }

    async fn connect(&self, settings: &ConnSettings) -> Result<Conn, UpstreamError> {
        let addr = self.addr;
        let stream = connect_step(
            addr,
            settings.connect_timeout,
            "connection",
            TcpStream::connect(addr),
        )
        .await?;
        // Small requests and responses: do not wait for Nagle coalescing.
        let _ = stream.set_nodelay(true);
        // One stream type for plain and TLS connections (tokio-util's `Either`), so hyper's
        // client connection is instantiated once: with two instantiations the plain
        // path's request cost grew by ~2 % (callgrind), from inlining alone.
        let io = match &settings.tls {
            None => EitherIo::Left(stream),
            Some(tls) => {
                // The TLS handshake counts against the connect timeout; a failure
                // (refused certificate, no common version) is a connect failure.
                let name = self.server_name(tls);
                let handshake = tls.connector().connect(name, stream);
                EitherIo::Right(
                    connect_step(addr, settings.connect_timeout, "TLS handshake", handshake)
                        .await?,
                )
            }
        };
        if settings.protocol == UpstreamProtocol::Http2 {
            return Box::pin(Self::handshake_h2(addr, io, settings.tls.is_some())).await;
        }
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Reset { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(backend = %addr, %error, "upstream connection ended with an error");
            }
        });
        Ok(Conn {
            sender: Sender::H1(sender),
            reused: false,
        })
    }

    /// The HTTP/2 connection preface and settings exchange on a connected stream.
    async fn handshake_h2(
        addr: SocketAddr,
        io: EitherIo<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>,
        https: bool,
    ) -> Result<Conn, UpstreamError> {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Detects a backend that vanished without closing (HAProxy and Envoy
            // probe HTTP/2 backends the same way); an unanswered PING closes it.
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Reset { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(backend = %addr, %error, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(Conn {
            sender: Sender::H2 { sender, https },
            reused: false,
        })
    }

    /// Returns a connection whose response has been read to the end at `now_ns`, for reuse
    /// by this worker. Closed connections and those beyond [`MAX_IDLE_PER_WORKER`] are dropped.
    pub fn release(&self, conn: Conn, now_ns: u64) {
        // An HTTP/2 handle is dropped: its connection stays with the worker's slot.
        let Sender::H1(sender) = conn.sender else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let slot = worker_slot(self.idle.len());
        let mut idle = self.idle[slot].lock();
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push(IdleConn {
                sender,
                idle_since_ns: now_ns,
            });
        }
    }

    /// Drops every pooled connection, idle HTTP/1.1 ones and each worker's HTTP/2 one
    /// (requests in flight keep theirs until they end), so the next requests connect
    /// anew: after the pool's TLS identity or trust changed, no request goes out on a
    /// connection made with the old one.
    pub fn close_all(&self) {
        for partition in self.idle.iter() {
            partition.lock().clear();
        }
        for slot in self.shared.iter() {
            *slot.lock() = None;
        }
    }

    /// Drops every idle connection older than `idle_timeout` or already closed.
    pub fn evict_idle(&self, idle_timeout: Duration) {
        let now = now_ns();
        let limit = duration_ns(idle_timeout);
        for partition in self.idle.iter() {
            partition
                .lock()
                .retain(|c| !c.sender.is_closed() && now.saturating_sub(c.idle_since_ns) <= limit);
        }
        for slot in self.shared.iter() {
            let mut shared = slot.lock();
            if shared
                .as_ref()
                .is_some_and(|c| c.sender.is_closed() || now.saturating_sub(c.used_ns) > limit)
            {
                // Requests still in flight keep their handles, and the connection, until
                // they end.
                *shared = None;
            }
        }
    }
}

/// One step of connecting to `addr` (`what`: "connection", "TLS handshake") within
/// `timeout`; an error or the timeout is an [`UpstreamError::Connect`].
async fn connect_step<T>(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    step: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(timeout, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::Connect {
            addr,
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no {what} within {timeout:?}"),
            ),
        }),
    }
}

impl Conn {
    /// Whether this is a handle on a shared HTTP/2 connection.
    fn is_multiplexed(&self) -> bool {
        matches!(self.sender, Sender::H2 { .. })
    }

    /// Sends `req` and waits for the response head, up to `timeout`.
    ///
    /// On failure, the request is given back in [`SendFailure::unsent`] if it never reached
    /// the wire. The connection is consumed either way; on success the caller keeps it with
    /// the response (see `ResponseBody`) and releases it at end-of-stream.
    pub async fn send(
        &mut self,
        addr: SocketAddr,
        req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendFailure> {
        let progress = match req.body() {
            Either::Left(streamed) => Some(Arc::clone(&streamed.progress)),
            Either::Right(_) => None,
        };
        // A request given back unsent never ran when its connection had served before
        // (it closed in a keep-alive race) or is shared (HTTP/2: it closed under the
        // queued request, whether or not this attempt opened it).
        let race = self.reused || self.is_multiplexed();
        let answer = match &mut self.sender {
            Sender::H1(sender) => {
                let sent = sender.try_send_request(req);
                await_answer(sent, progress.as_deref(), addr, timeout).await
            }
            // Boxed, so that the HTTP/2 path does not enlarge every HTTP/1.1 request's
            // future.
            Sender::H2 { sender, https } => {
                let mut req = req;
                crate::headers::to_h2_request(&mut req, *https);
                let sent = sender.try_send_request(req);
                Box::pin(await_answer(sent, progress.as_deref(), addr, timeout)).await
            }
        };
        answer.map_err(|mut failure| {
            failure.unprocessed |= race && failure.unsent.is_some();
            failure
        })
    }
}

/// Waits for the answer to a request handed to hyper (`sent`) under the
/// `response_header` timeout, from the send (`progress` = `None`: buffered body) or from
/// the streamed body's last progress; classifies a failure.
async fn await_answer<F>(
    sent: F,
    progress: Option<&BodyProgress>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Response<Incoming>, SendFailure>
where
    F: Future<
        Output = Result<
            Response<Incoming>,
            hyper::client::conn::TrySendError<Request<UpstreamBody>>,
        >,
    >,
{
    let answer = match progress {
        // Buffered: the timer runs from the send.
        None => match tokio::time::timeout(timeout, sent).await {
            Ok(answer) => answer,
            Err(_) => {
                return Err(SendFailure {
                    error: UpstreamError::Timeout { addr, timeout },
                    unsent: None,
                    unprocessed: false,
                });
            }
        },
        // Streamed: the timer runs from the body's last progress. Boxed: this wait is
        // larger than the plain timeout, and inline it would enlarge (and be copied
        // with) every request's future.
        Some(progress) => Box::pin(wait_streamed(sent, progress, timeout, addr)).await?,
    };
    match answer {
        Ok(response) => Ok(response),
        Err(mut failure) => {
            let unsent = failure.take_message();
            let source = failure.into_error();
            // hyper reports a failure of the request body it was sending (our
            // `RequestBody`, i.e. the client's stream) as a "user" error; so are other
            // misuses ("dispatch task is gone": the connection died under the request),
            // so the client is blamed only when its body did fail.
            let client_failed =
                source.is_user() && progress.is_some_and(|p| p.failed.load(Ordering::Acquire));
            let unprocessed = h2_refused(&source);
            let error = if client_failed {
                UpstreamError::ClientBody { source }
            } else {
                UpstreamError::Reset { addr, source }
            };
            Err(SendFailure {
                error,
                unsent,
                unprocessed,
            })
        }
    }
}
