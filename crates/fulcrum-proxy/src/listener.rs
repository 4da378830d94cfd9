//! Listeners and the worker threads that serve them.
//!
//! Fulcrum runs one single-threaded tokio runtime per worker thread (`--threads N`, one per
//! core by default), each accepting on its own `SO_REUSEPORT` socket for every listener, so
//! the kernel spreads connections over workers and a connection, its requests, and the
//! upstream connections they use all stay on one thread: no work stealing, no cross-thread
//! wakeups on the request path (the model of nginx workers and of Seastar/Glommio
//! thread-per-core designs). Shared state — pools, live backend statistics, metrics — is
//! reached through `Arc`s and atomics.
//!
//! Each HTTP connection runs under a watchdog that enforces the listener's client
//! timeouts: a request head must arrive within `request_header` of its first byte, and a
//! connection with no request in progress is closed after `idle`.
//!
//! Shutdown is graceful: on the node's shutdown signal every worker stops accepting,
//! asks its HTTP connections to finish the request in progress and close (HTTP/2:
//! `GOAWAY`), and waits for them — and for TCP tunnels — up to the drain timeout; what is
//! still open then is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::task::AtomicWaker;
use http::{Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{ProxyBody, error_response};
use crate::forward::{self, ConnContext, ForwardedClientCert};
use crate::h1_guard::{FramingVerdicts, H1Guard, MAX_HEAD_LEN};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::tls::{SwappableTls, TlsState};
use crate::upstream::set_worker_index;
use fulcrum_stats::clock::{duration_ns, now_ns};

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 (h2c with prior knowledge), auto-detected per connection.
    Http,
    /// Raw TCP pass-through to the pool of the listener's single route.
    Tcp,
}

impl ListenerProtocol {
    /// `http` or `tcp`.
    pub fn name(self) -> &'static str {
        match self {
            ListenerProtocol::Http => "http",
            ListenerProtocol::Tcp => "tcp",
        }
    }
}

/// Client-side timeouts of a listener, enforced per connection (HAProxy's
/// `timeout http-request` and `timeout http-keep-alive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// HTTP/1: longest time from the first byte of a request head to its end; a client
    /// that sends a head slower than this (slowloris) is disconnected.
    pub request_header: Duration,
    /// Longest time a connection may stay open with no request in progress (HTTP/1
    /// keep-alive between requests; HTTP/2 with no open stream); it is then closed
    /// gracefully.
    pub idle: Duration,
    /// Longest time the client may take no byte of a response that is ready to go out:
    /// every write to its socket blocks and the kernel's queue toward it does not shrink
    /// (`SIOCOUTQ`); the connection is then closed. The watchdog looks when writes start
    /// blocking and `send` later, so a stalled client is cut `send` after it stopped
    /// reading, and a slow but steady one never.
    pub send: Duration,
}

/// Every status the data plane answers with itself (`fulcrum_local_replies_total{code}`).
const REPLY_CODES: [StatusCode; 8] = [
    StatusCode::BAD_REQUEST,
    StatusCode::NOT_FOUND,
    StatusCode::REQUEST_TIMEOUT,
    StatusCode::TOO_MANY_REQUESTS,
    StatusCode::NOT_IMPLEMENTED,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// Results of a TLS handshake, as counted in `fulcrum_tls_handshakes_total{result}`.
const HANDSHAKE_RESULTS: [&str; 3] = ["ok", "error", "timeout"];

/// A listener as the data plane runs it.
#[derive(Debug)]
pub struct ListenerRuntime {
    /// Configured name.
    pub name: Arc<str>,
    /// HTTP or TCP.
    pub protocol: ListenerProtocol,
    /// The address actually bound (the configured one, with the port filled in when it was 0).
    pub local_addr: SocketAddr,
    /// Routes; swapped whole on reload, through [`ListenerRuntime::set_router`].
    pub router: ArcSwap<Router>,
    /// The current router's `access_log`, read once per request without loading the
    /// router (kept by [`ListenerRuntime::set_router`]).
    access_log: AtomicBool,
    /// Client-side timeouts.
    pub timeouts: ClientTimeouts,
    /// TLS termination (`tls` set): the server configuration new handshakes use, swapped
    /// on reload. `None` = plain text.
    pub tls: Option<SwappableTls>,
    replies: [Counter; REPLY_CODES.len()],
    handshakes: [Counter; 3],
    /// `max_connections` (0 = unlimited).
    pub max_connections: u32,
    /// Permits for open connections, over all workers; `None` = unlimited.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// `fulcrum_listener_connections`.
    open: Gauge,
    /// `fulcrum_listener_connections_limited_total`.
    limited: Counter,
    /// `fulcrum_listener_send_timeouts_total` (HTTP listeners).
    send_timeouts: Counter,
}

/// Held by a client connection for its lifetime: its place in the listener's
/// `max_connections` and in the open-connections gauge.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    open: Gauge,
}

impl ConnSlot {
    fn new(permit: Option<tokio::sync::OwnedSemaphorePermit>, open: &Gauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl ListenerRuntime {
    /// A listener named `name` bound at `local_addr`, terminating TLS with `tls` if given.
    pub fn new(
        name: &str,
        protocol: ListenerProtocol,
        local_addr: SocketAddr,
        router: Router,
        timeouts: ClientTimeouts,
        tls: Option<TlsState>,
        metrics: &Metrics,
    ) -> Self {
        Self {
            name: name.into(),
            protocol,
            local_addr,
            access_log: AtomicBool::new(router.access_log),
            router: ArcSwap::from_pointee(router),
            timeouts,
            // Registered (and so exported) only for listeners that terminate TLS.
            handshakes: match tls {
                Some(_) => HANDSHAKE_RESULTS.map(|result| metrics.tls_handshakes(name, result)),
                None => Default::default(),
            },
            tls: tls.map(ArcSwap::from_pointee),
            // Registered (and so exported) only for HTTP listeners: a TCP listener never
            // answers with a status of its own.
            replies: match protocol {
                ListenerProtocol::Http => {
                    REPLY_CODES.map(|code| metrics.local_replies(name, code.as_u16()))
                }
                ListenerProtocol::Tcp => Default::default(),
            },
            max_connections: 0,
            slots: None,
            open: metrics.listener_connections(name),
            limited: Counter::default(),
            send_timeouts: match protocol {
                ListenerProtocol::Http => metrics.listener_send_timeouts(name),
                ListenerProtocol::Tcp => Counter::default(),
            },
        }
    }

    /// Replaces the routes (a reload).
    pub fn set_router(&self, router: Router) {
        self.access_log.store(router.access_log, Ordering::Relaxed);
        self.router.store(Arc::new(router));
    }

    /// Whether requests write an access-log line ([`Router::access_log`]).
    #[inline]
    pub fn access_log(&self) -> bool {
        self.access_log.load(Ordering::Relaxed)
    }

    /// Limits the listener to `max` open client connections (HAProxy's frontend
    /// `maxconn`); 0 = unlimited. At the limit each worker thread holds the one
    /// connection it accepted last, unread, and stops accepting, so further connections
    /// wait in the kernel's backlog (and time out there, or are refused when it is
    /// full) rather than being accepted and closed; they are served, in order, as open
    /// ones close.
    #[must_use]
    pub fn with_max_connections(mut self, max: u32, metrics: &Metrics) -> Self {
        self.max_connections = max;
        if max > 0 {
            self.slots = Some(Arc::new(tokio::sync::Semaphore::new(max as usize)));
            self.limited = metrics.listener_limited(&self.name);
        }
        self
    }

    /// A place for one more (accepted) connection: at once when the listener is below
    /// its `max_connections` (or has none), else when a connection closes, first come
    /// first served over all workers; `None` if `shutdown` comes first.
    async fn slot(&self, shutdown: &CancellationToken) -> Option<ConnSlot> {
        let Some(slots) = &self.slots else {
            return Some(ConnSlot::new(None, &self.open));
        };
        let permit = match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.limited.inc();
                tracing::debug!(listener = %self.name, max_connections = self.max_connections, "connection limit reached; not accepting");
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return None,
                    // The semaphore is never closed.
                    permit = Arc::clone(slots).acquire_owned() => permit.ok()?,
                }
            }
        };
        Some(ConnSlot::new(Some(permit), &self.open))
    }

    /// `https` with TLS, else `http`: the scheme clients used (`X-Forwarded-Proto`).
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// A JSON error reply generated by this listener, counted in
    /// `fulcrum_local_replies_total`.
    pub fn reply(&self, status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
        if let Some(i) = REPLY_CODES.iter().position(|c| *c == status) {
            self.replies[i].inc();
        }
        tracing::debug!(listener = %self.name, status = status.as_u16(), code, message, "local reply");
        error_response(status, code, message)
    }
}

/// Binds `addr` for `workers` worker threads: one socket each, sharing the port with
/// `SO_REUSEPORT` when there are several. Returns the sockets and the bound address.
///
/// Before binding a fixed port with `SO_REUSEPORT`, the port is probed without it, so a
/// port already held by another process is an error rather than silently shared.
pub fn bind(
    addr: SocketAddr,
    workers: usize,
) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let workers = workers.max(1);
    if workers > 1 && addr.port() != 0 {
        drop(bind_one(addr, false)?);
    }
    let first = bind_one(addr, workers > 1)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind_one(local, true)?);
    }
    Ok((sockets, local))
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // An IPv6 address serves IPv6 only (nginx's and Envoy's default), so `[::]:P` and
        // `0.0.0.0:P` (or `127.0.0.1:P`) can be separate listeners, as validation
        // allows; dual-stack sockets would take the IPv4 side too.
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The worker threads of a node.
#[derive(Debug)]
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Waits for every worker to finish draining and exit.
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// Starts `sockets.len()` worker threads. `listeners[i]` is served by worker `w` on
/// `sockets[w][i]`. Workers run until `shutdown` is cancelled, then drain for at most
/// `drain_timeout`.
pub fn spawn_workers(
    listeners: Vec<Arc<ListenerRuntime>>,
    sockets: Vec<Vec<std::net::TcpListener>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) -> io::Result<Workers> {
    let mut threads = Vec::with_capacity(sockets.len());
    for (index, worker_sockets) in sockets.into_iter().enumerate() {
        let listeners = listeners.clone();
        let metrics = Arc::clone(&metrics);
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fulcrum-worker-{index}"))
            .spawn(move || {
                set_worker_index(index);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(worker = index, %error, "cannot start worker runtime");
                        return;
                    }
                };
                runtime.block_on(run_worker(
                    index,
                    listeners,
                    worker_sockets,
                    metrics,
                    shutdown,
                    drain_timeout,
                ));
            })?;
        threads.push(thread);
    }
    Ok(Workers { threads })
}

async fn run_worker(
    index: usize,
    listeners: Vec<Arc<ListenerRuntime>>,
    sockets: Vec<std::net::TcpListener>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) {
    let tracker = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for (listener, socket) in listeners.into_iter().zip(sockets) {
        match tokio::net::TcpListener::from_std(socket) {
            Ok(socket) => {
                accept_loops.push(accept_loop(listener, socket, &tracker, &metrics, &shutdown))
            }
            Err(error) => {
                tracing::error!(worker = index, listener = %listener.name, %error, "cannot register listener")
            }
        }
    }
    // Every accept loop ends when `shutdown` is cancelled.
    futures_util::future::join_all(accept_loops).await;
    tracker.close();
    let open = tracker.len();
    // Every HTTP connection saw `shutdown` and is finishing its request in progress.
    let drained = tokio::time::timeout(drain_timeout, tracker.wait()).await;
    match drained {
        Ok(()) => tracing::debug!(worker = index, connections = open, "worker drained"),
        Err(_) => tracing::warn!(
            worker = index,
            remaining = tracker.len(),
            drain_timeout_secs = drain_timeout.as_secs_f64(),
            "drain timeout reached; closing remaining connections"
        ),
    }
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Client timeouts are enforced by `serve_http`; hyper's own header timer would also
    // close keep-alive connections idle for `request_header`. A head larger than the
    // guard follows gets hyper's 431 rather than the guard's fail-closed 400.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .writev(false)
        .max_buf_size(MAX_HEAD_LEN);
    // The same head budget over HTTP/2 (hyper's default list size is 16 KiB): a browser
    // with large cookies must not get 431 only once ALPN picks h2.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_LEN as u32);
    builder
}

async fn accept_loop(
    listener: Arc<ListenerRuntime>,
    socket: tokio::net::TcpListener,
    tracker: &TaskTracker,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let builder = http_builder();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE/ENFILE: back off briefly instead of spinning.
                tracing::warn!(listener = %listener.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics.connections_accepted.inc();
        // Taken after the accept: each worker has its own `SO_REUSEPORT` socket, and a
        // permit held by an accept loop while it waited for a connection would strand
        // connections queued at another worker's socket. So at the limit each worker
        // holds at most one accepted connection, unread, until a permit frees.
        let Some(slot) = listener.slot(shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        match listener.protocol {
            ListenerProtocol::Tcp => {
                let serve = crate::tcp::serve(Arc::clone(&listener), stream, peer);
                tracker.spawn(async move {
                    serve.await;
                    drop(slot);
                });
            }
            ListenerProtocol::Http => match &listener.tls {
                None => {
                    let (connection, ctx) = http_connection(
                        &builder,
                        &listener,
                        stream,
                        peer,
                        ForwardedClientCert::PassThrough,
                        slot,
                    );
                    tracker.spawn(serve_http(connection, ctx, shutdown.clone()));
                }
                Some(tls) => {
                    let state = tls.load_full();
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&state.config));
                    let (listener, builder, shutdown) =
                        (Arc::clone(&listener), builder.clone(), shutdown.clone());
                    tracker.spawn(async move {
                        let Some(stream) = handshake(&listener, &acceptor, stream, peer).await
                        else {
                            return;
                        };
                        let client_cert = if state.verifies_clients() {
                            ForwardedClientCert::Set(crate::tls::forwarded_client_cert(
                                stream.get_ref().1.peer_certificates(),
                            ))
                        } else {
                            ForwardedClientCert::PassThrough
                        };
                        drop(state);
                        let (connection, ctx) =
                            http_connection(&builder, &listener, stream, peer, client_cert, slot);
                        serve_http(connection, ctx, shutdown).await;
                    });
                }
            },
        }
    }
}

/// Completes a TLS handshake within the listener's `request_header` timeout (the same
/// bound a slow plain-text request head gets), counting the result.
async fn handshake(
    listener: &ListenerRuntime,
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let [ok, error, timeout] = &listener.handshakes;
    match tokio::time::timeout(listener.timeouts.request_header, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            ok.inc();
            Some(stream)
        }
        Ok(Err(e)) => {
            error.inc();
            tracing::debug!(listener = %listener.name, %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            timeout.inc();
            tracing::debug!(listener = %listener.name, %peer, "TLS handshake timed out");
            None
        }
    }
}

/// The HTTP connection (HTTP/1.1 or HTTP/2, auto-detected; upgrades allowed) serving
/// `io` from `peer` on `listener`, behind the HTTP/1 framing guard, and its context.
fn http_connection<IO>(
    builder: &auto::Builder<TokioExecutor>,
    listener: &Arc<ListenerRuntime>,
    io: IO,
    peer: SocketAddr,
    client_cert: ForwardedClientCert,
    slot: ConnSlot,
) -> (
    impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
    + GracefulConnection
    + Send
    + 'static,
    Arc<ConnContext>,
)
where
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + std::os::fd::AsRawFd
        + Unpin
        + Send
        + 'static,
{
    let verdicts = FramingVerdicts::default();
    let mut ctx = ConnContext::new(
        Arc::clone(listener),
        peer,
        verdicts.clone(),
        client_cert,
        slot,
    );
    ctx.socket = Some(io.as_raw_fd());
    let ctx = Arc::new(ctx);
    let service_ctx = Arc::clone(&ctx);
    let service = service_fn(move |req| forward::handle(Arc::clone(&service_ctx), req));
    let io = TokioIo::new(H1Guard::new(io, verdicts));
    let connection = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    (connection, ctx)
}

/// What a connection's watchdog asks of the connection's task.
#[derive(Debug, Default)]
struct ConnControl {
    /// 0 (carry on), [`CLOSE_GRACEFULLY`] or [`CLOSE_NOW`]; only ever raised.
    request: AtomicU8,
    /// The connection task, woken when `request` changes.
    task: AtomicWaker,
}

const CLOSE_GRACEFULLY: u8 = 1;
const CLOSE_NOW: u8 = 2;

impl ConnControl {
    fn ask(&self, request: u8) {
        self.request.fetch_max(request, Ordering::AcqRel);
        self.task.wake();
    }
}

/// Drives one HTTP connection to its end, with a watchdog task beside it that enforces
/// the listener's client timeouts and the node's graceful shutdown.
///
/// The connection's own task only checks one atomic per poll; the deadlines and the
/// shutdown signal are waited on by the watchdog, so the request path does not poll
/// timers or cancellation futures on every wake-up.
async fn serve_http<C>(connection: C, ctx: Arc<ConnContext>, shutdown: CancellationToken)
where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + GracefulConnection,
{
    let control = Arc::new(ConnControl::default());
    let watchdog = tokio::spawn(watchdog(Arc::clone(&ctx), Arc::clone(&control), shutdown));
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let ended = std::future::poll_fn(|cx| {
        control.task.register(cx.waker());
        match control.request.load(Ordering::Acquire) {
            CLOSE_NOW => return Poll::Ready(None),
            CLOSE_GRACEFULLY if !closing => {
                closing = true;
                connection.as_mut().graceful_close();
            }
            _ => {}
        }
        connection.as_mut().poll(cx).map(Some)
    })
    .await;
    watchdog.abort();
    if let Some(Err(error)) = ended {
        tracing::debug!(listener = %ctx.listener.name, peer = %ctx.peer, %error, "client connection ended with an error");
    }
}

/// Watches one connection: sleeps until the nearest deadline — `request_header` after a
/// head started arriving (the guard reports heads that span reads, and wakes this task
/// when one starts), or `idle` after the last response finished; while requests are in
/// progress it re-checks every `idle` — and asks the connection to close when one
/// passes: at once for a slow head, gracefully (HTTP/1 after the response in progress,
/// HTTP/2 with `GOAWAY`) when idle or when the node shuts down. Aborted when the
/// connection ends.
async fn watchdog(ctx: Arc<ConnContext>, control: Arc<ConnControl>, shutdown: CancellationToken) {
    let timeouts = ctx.listener.timeouts;
    // When an idle close was asked for: a graceful close completes at once unless the
    // client holds it open (an HTTP/2 client that never acknowledges the GOAWAY's PING),
    // which IDLE_CLOSE_GRACE later is closed outright.
    let mut idle_close_asked: Option<u64> = None;
    // The client socket's unacknowledged bytes at the previous look (send timeout).
    let mut last_queued: Option<u32> = None;
    loop {
        let mut deadline = next_deadline(&ctx, timeouts);
        if let Some(asked) = idle_close_asked {
            if ctx.active_requests() > 0 {
                idle_close_asked = None;
            } else {
                let forced = asked.saturating_add(duration_ns(IDLE_CLOSE_GRACE));
                deadline = tokio::time::Instant::now()
                    + Duration::from_nanos(forced.saturating_sub(now_ns()));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                control.ask(CLOSE_GRACEFULLY);
                return;
            }
            () = ctx.verdicts.head_started() => {}
            // A stall can start while this sleeps toward a far deadline (an HTTP/2
            // connection's first request arrives after the watchdog last looked): what
            // the kernel holds now is what the client must have taken some of by then.
            () = ctx.verdicts.write_stall_started() => {
                last_queued = ctx.socket.and_then(unacknowledged_bytes);
            }
            () = tokio::time::sleep_until(deadline) => {
                let now = now_ns();
                if let Some(started) = ctx.verdicts.head_started_ns()
                    && now.saturating_sub(started) >= duration_ns(timeouts.request_header)
                {
                    tracing::debug!(listener = %ctx.listener.name, peer = %ctx.peer, "request header timeout; closing connection");
                    control.ask(CLOSE_NOW);
                    return;
                }
                // What the kernel still holds for the client, against the previous look:
                // writes stay blocked until a third or so of a full send buffer drains,
                // which a slow but steady reader can take longer than `send` to do.
                let queued = ctx.socket.and_then(unacknowledged_bytes);
                let drained = matches!((queued, last_queued), (Some(q), Some(last)) if q < last);
                if ctx.active_requests() > 0 {
                    last_queued = queued;
                }
                if let Some(since) = ctx.verdicts.write_stalled_ns()
                    && now.saturating_sub(since) >= duration_ns(timeouts.send)
                {
                    if drained {
                        // The client took bytes since the last look: slow, not stalled.
                        ctx.verdicts.restart_write_stall(now);
                    } else {
                        tracing::debug!(listener = %ctx.listener.name, peer = %ctx.peer, "send timeout: the client accepted no response bytes; closing connection");
                        ctx.listener.send_timeouts.inc();
                        control.ask(CLOSE_NOW);
                        return;
                    }
                }
                if ctx.active_requests() == 0
                    && ctx.verdicts.head_started_ns().is_none()
                    && now.saturating_sub(ctx.idle_since_ns()) >= duration_ns(timeouts.idle)
                {
                    match idle_close_asked {
                        None => {
                            tracing::trace!(listener = %ctx.listener.name, peer = %ctx.peer, "idle timeout; closing connection");
                            control.ask(CLOSE_GRACEFULLY);
                            // A graceful close of an idle connection completes at once;
                            // keep watching in case a request slipped in just before it,
                            // or the client holds the close open.
                            idle_close_asked = Some(now);
                        }
                        Some(asked)
                            if now.saturating_sub(asked) >= duration_ns(IDLE_CLOSE_GRACE) =>
                        {
                            tracing::debug!(listener = %ctx.listener.name, peer = %ctx.peer, "idle connection not closed within the grace period; closing it now");
                            control.ask(CLOSE_NOW);
                            return;
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
}

/// Bytes the kernel still holds for the peer of TCP socket `fd`: not yet sent, or sent
/// and not yet acknowledged (`SIOCOUTQ`, tcp(7)). `None` where it cannot tell.
#[cfg(target_os = "linux")]
fn unacknowledged_bytes(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut queued: libc::c_int = 0;
    // SAFETY: `SIOCOUTQ` (= `TIOCOUTQ` on Linux) writes one `int` through the pointer,
    // which points to a live local of that type. `fd` is only a number: should the socket
    // have been closed meanwhile, the call fails (or reads the queue of whatever socket
    // took the number), which is harmless to memory and only skews one look.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    (rc == 0).then(|| u32::try_from(queued).unwrap_or(0))
}

/// Bytes the kernel still holds for the peer of socket `fd`: unknown on this platform.
#[cfg(not(target_os = "linux"))]
fn unacknowledged_bytes(_fd: std::os::fd::RawFd) -> Option<u32> {
    None
}

/// How long an idle connection asked to close gracefully may stay open (an HTTP/2 client
/// must acknowledge the `GOAWAY`'s PING for hyper to finish the close) before it is closed
/// outright.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The next instant the watchdog of `ctx` must look at the connection.
fn next_deadline(ctx: &ConnContext, timeouts: ClientTimeouts) -> tokio::time::Instant {
    let now = now_ns();
    let mut at = now.saturating_add(duration_ns(timeouts.idle));
    if let Some(started) = ctx.verdicts.head_started_ns() {
        at = at.min(started.saturating_add(duration_ns(timeouts.request_header)));
    }
    if ctx.active_requests() == 0 {
        at = at.min(
            ctx.idle_since_ns()
                .saturating_add(duration_ns(timeouts.idle)),
        );
    } else {
        // A response may stall at any moment: look at least every `send`.
        at = at.min(now.saturating_add(duration_ns(timeouts.send)));
    }
    if let Some(since) = ctx.verdicts.write_stalled_ns() {
        at = at.min(since.saturating_add(duration_ns(timeouts.send)));
    }
    tokio::time::Instant::now() + Duration::from_nanos(at.saturating_sub(now))
}

/// A connection that can be asked to finish its request in progress and close.
pub trait GracefulConnection {
    /// Starts a graceful close.
    fn graceful_close(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulConnection for auto::UpgradeableConnection<'static, I, S, E>
where
    auto::UpgradeableConnection<'static, I, S, E>: std::future::Future,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful_close(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
