//! Listening, accepting and serving connections, and stopping all of it.
//!
//! Every task the backend starts (the accept loop, one per connection, HTTP/2 streams,
//! WebSocket echoes) goes through one [`Spawner`]: it tracks the task and cancels it on
//! shutdown, so [`BackendHandle::shutdown`] returns only once every socket is closed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::args::{BackendArgs, parse_name};
use crate::error::SimError;
use crate::routes;
use crate::state::{BackendStatsSnapshot, SimState};

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again, so the
/// loop does not spin while the condition lasts.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Starts tasks that end when the backend shuts down; also hyper's executor for HTTP/2.
#[derive(Clone)]
pub(crate) struct Spawner {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Spawner {
    /// Runs `task` until it finishes or the backend shuts down, whichever is first.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            cancel.run_until_cancelled_owned(task).await;
        });
    }
}

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn(async move {
            future.await;
        });
    }
}

/// A running simulated backend, returned by [`start_backend`].
///
/// Dropping the handle stops the backend as [`shutdown`](Self::shutdown) does, without
/// waiting for it.
pub struct BackendHandle {
    /// The address the backend listens on (the real port when `--listen` had port 0).
    pub local_addr: SocketAddr,
    state: Arc<SimState>,
    spawner: Spawner,
}

#[derive(Serialize)]
struct ReadyLine<'a> {
    event: &'static str,
    name: &'a str,
    address: String,
}

impl BackendHandle {
    /// The backend's name, as sent in `x-backend`.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// `http://<local_addr>`, the base URL of the backend.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The line `fulcrum backend` prints on stdout once listening, without a newline:
    /// `{"event":"listening","name":"<name>","address":"127.0.0.1:PORT"}`. Scripts and
    /// tests read the ephemeral port from it.
    pub fn ready_line(&self) -> String {
        serde_json::to_string(&ReadyLine {
            event: "listening",
            name: &self.state.name,
            address: self.local_addr.to_string(),
        })
        .unwrap_or_default()
    }

    /// Counters and settings right now; the same data as `GET /stats`.
    pub fn stats(&self) -> BackendStatsSnapshot {
        self.state.snapshot()
    }

    /// Changes the settings as `/control?<query>` does (same parameters, same checks, all
    /// or nothing) without going through HTTP; for benchmarks and tests that hold the
    /// handle. Returns the settings now in force.
    ///
    /// # Errors
    /// [`SimError::InvalidControl`] naming the first bad parameter; nothing is changed.
    pub fn control(&self, query: &str) -> Result<crate::Settings, SimError> {
        let change =
            crate::settings::parse_control(query).map_err(|bad| SimError::InvalidControl {
                message: bad.to_message(),
            })?;
        let settings = self.state.apply(&change);
        tracing::info!(backend = %self.state.name, query, "settings changed through the handle");
        Ok(settings)
    }

    /// Stops the backend: stops accepting, closes every open connection (requests still
    /// being served are cut off, as if the process had died) and returns once all of the
    /// backend's tasks have ended and its listening socket is closed.
    pub async fn shutdown(self) {
        self.spawner.cancel.cancel();
        self.spawner.tracker.close();
        self.spawner.tracker.wait().await;
        tracing::info!(backend = %self.state.name, "backend stopped");
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        self.spawner.cancel.cancel();
    }
}

/// Binds `args.listen`, starts serving in background tasks on the current tokio runtime,
/// and returns once the socket is listening.
///
/// # Errors
/// [`SimError::Bind`] when the address cannot be bound; [`SimError::InvalidOption`] when a
/// field is out of the range the command-line parser enforces (for args built in code).
///
/// # Example
/// ```no_run
/// # async fn run() -> Result<(), fulcrum_sim::SimError> {
/// use fulcrum_sim::{BackendArgs, start_backend};
///
/// let backend = start_backend(BackendArgs {
///     listen: "127.0.0.1:0".parse().expect("literal address"),
///     latency: "uniform:10ms..50ms".parse().expect("literal spec"),
///     ..BackendArgs::default()
/// })
/// .await?;
/// println!("{}", backend.ready_line());
/// backend.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub async fn start_backend(args: BackendArgs) -> Result<BackendHandle, SimError> {
    let settings = args.settings();
    settings
        .validate()
        .map_err(|(option, message)| SimError::InvalidOption { option, message })?;
    if let Some(name) = &args.name {
        parse_name(name).map_err(|message| SimError::InvalidOption {
            option: "name",
            message,
        })?;
    }

    let bind = |source| SimError::Bind {
        addr: args.listen,
        source,
    };
    let listener = TcpListener::bind(args.listen).await.map_err(bind)?;
    let local_addr = listener.local_addr().map_err(bind)?;
    let name = args.name.unwrap_or_else(|| local_addr.to_string());
    let name_header = HeaderValue::from_str(&name).map_err(|_| SimError::InvalidOption {
        option: "name",
        message: format!("`{name}` cannot be sent as a header value"),
    })?;
    let state = Arc::new(SimState::new(name, name_header, settings));

    let spawner = Spawner {
        tracker: TaskTracker::new(),
        cancel: CancellationToken::new(),
    };
    let mut builder = auto::Builder::new(spawner.clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .http2()
        .timer(TokioTimer::new());
    spawner.spawn(accept_loop(
        listener,
        Arc::new(builder),
        state.clone(),
        spawner.clone(),
    ));
    tracing::info!(
        backend = %state.name,
        address = %local_addr,
        latency = %settings.latency,
        capacity = settings.capacity,
        fail_rate = settings.fail_rate,
        slow_factor = settings.slow_factor,
        cache_size = settings.cache_size,
        "backend listening"
    );
    Ok(BackendHandle {
        local_addr,
        state,
        spawner,
    })
}

async fn accept_loop(
    listener: TcpListener,
    builder: Arc<auto::Builder<Spawner>>,
    state: Arc<SimState>,
    spawner: Spawner,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                spawner.spawn(serve_connection(
                    stream,
                    peer,
                    builder.clone(),
                    state.clone(),
                    spawner.clone(),
                ));
            }
            Err(err) => {
                tracing::warn!(backend = %state.name, error = %err, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<Spawner>>,
    state: Arc<SimState>,
    spawner: Spawner,
) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let name = state.name.clone();
    let service = service_fn(move |req| routes::route(req, state.clone(), spawner.clone()));
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(backend = %name, %peer, error = %err, "connection ended with an error");
    }
}
