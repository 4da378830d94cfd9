//! Active health checks and the outlier-ejection sweep.
//!
//! Each backend of a pool with a `health_check` gets its own task that probes it every
//! `interval` (the first probe after a random fraction of it, so a pool's checks do not
//! fire in lockstep): an HTTP `GET` on a fresh connection, healthy if the status is in
//! the expected range, or a bare TCP connect. As in HAProxy (`rise`/`fall`), `fall`
//! consecutive failures mark a healthy backend unhealthy and `rise` consecutive successes
//! re-admit it; backends start healthy. Probes use fresh connections so a check observes
//! what a new client connection would.
//!
//! When active checks re-admit a backend (unhealthy → healthy), an outlier-detection
//! ejection still pending from the same outage is lifted too, as Envoy does with
//! `successful_active_health_check_uneject_host`. Fulcrum lifts it only on that
//! transition, not on every passing check, so a backend whose health endpoint passes while
//! its real requests fail stays ejected for its full ejection time.
//!
//! The same module runs each pool's sweep: once a second, backends whose
//! outlier-detection ejection has expired are re-admitted, and pooled upstream
//! connections idle for longer than the pool's `timeouts.idle` are closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_balance::BackendFlags;
use http::Request;
use http::header::{CONNECTION, HOST, HeaderValue, USER_AGENT};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::state::{BackendRuntime, HealthCheckSettings, HealthProbe, Pool};
use crate::upstream::UpstreamProtocol;

/// Period of the ejection sweep.
pub const EJECTION_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Outcome of one probe.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The backend answered as expected.
    Healthy,
    /// It did not; the reason, for logs.
    Unhealthy(String),
}

/// Probes `addr` once according to `settings`, over TLS when `tls` (the pool's upstream
/// TLS and the name to verify) is given: the handshake, certificate check included, is
/// part of the probe. An HTTP check speaks the pool's `protocol` (an HTTP/2-only
/// backend, such as a gRPC server, refuses HTTP/1.1).
pub async fn probe(
    addr: std::net::SocketAddr,
    address: &str,
    settings: &HealthCheckSettings,
    tls: Option<(
        &crate::tls::UpstreamTls,
        rustls::pki_types::ServerName<'static>,
    )>,
    protocol: UpstreamProtocol,
) -> ProbeResult {
    match tokio::time::timeout(
        settings.timeout,
        probe_inner(addr, address, &settings.probe, tls, protocol),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => ProbeResult::Unhealthy(format!("no answer within {:?}", settings.timeout)),
    }
}

async fn probe_inner(
    addr: std::net::SocketAddr,
    address: &str,
    probe: &HealthProbe,
    tls: Option<(
        &crate::tls::UpstreamTls,
        rustls::pki_types::ServerName<'static>,
    )>,
    protocol: UpstreamProtocol,
) -> ProbeResult {
    let stream = match TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(error) => return ProbeResult::Unhealthy(format!("connect: {error}")),
    };
    match tls {
        None => http_probe(stream, address, probe, protocol, false).await,
        Some((tls, name)) => match tls.connector().connect(name, stream).await {
            Ok(stream) => http_probe(stream, address, probe, protocol, true).await,
            Err(error) => ProbeResult::Unhealthy(format!("TLS handshake: {error}")),
        },
    }
}

/// The HTTP part of a probe on an established stream (TCP checks are done once connected).
async fn http_probe<IO>(
    stream: IO,
    address: &str,
    probe: &HealthProbe,
    protocol: UpstreamProtocol,
    https: bool,
) -> ProbeResult
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let HealthProbe::Http {
        path,
        host,
        expected,
    } = probe
    else {
        return ProbeResult::Healthy;
    };
    let request = Request::get(path.as_str())
        .header(HOST, host.as_deref().unwrap_or(address))
        .header(USER_AGENT, "fulcrum-health-check")
        .body(Empty::<Bytes>::new());
    let mut request = match request {
        Ok(request) => request,
        Err(error) => return ProbeResult::Unhealthy(format!("invalid check request: {error}")),
    };
    let (answer, driver) = match protocol {
        UpstreamProtocol::Http1 => {
            let (mut sender, connection) =
                match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                    Ok(pair) => pair,
                    Err(error) => return ProbeResult::Unhealthy(format!("handshake: {error}")),
                };
            let driver = tokio::spawn(connection);
            request
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            (sender.send_request(request).await, driver)
        }
        UpstreamProtocol::Http2 => {
            let (mut sender, connection) = match hyper::client::conn::http2::handshake(
                TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            {
                Ok(pair) => pair,
                Err(error) => {
                    return ProbeResult::Unhealthy(format!("HTTP/2 handshake: {error}{H2_HINT}"));
                }
            };
            let driver = tokio::spawn(connection);
            crate::headers::to_h2_request(&mut request, https);
            (sender.send_request(request).await, driver)
        }
    };
    let result = match answer {
        Ok(response) => {
            let status = response.status().as_u16();
            if (expected.0..=expected.1).contains(&status) {
                ProbeResult::Healthy
            } else {
                ProbeResult::Unhealthy(format!(
                    "status {status}, expected {}-{}",
                    expected.0, expected.1
                ))
            }
        }
        // An HTTP/1.1-only server answers the HTTP/2 preface with an HTTP/1.1 error and
        // closes: hyper reports a connection or protocol error, which alone does not say
        // why.
        Err(error) if protocol == UpstreamProtocol::Http2 => {
            ProbeResult::Unhealthy(format!("request: {error}{H2_HINT}"))
        }
        Err(error) => ProbeResult::Unhealthy(format!("request: {error}")),
    };
    driver.abort();
    result
}

/// Added to an HTTP/2 probe's protocol failure: the likeliest cause.
const H2_HINT: &str = " (does the backend speak HTTP/2? the pool's `protocol: http2` sends \
                       the HTTP/2 preface without negotiation over plain TCP)";

/// Checks one backend of `pool` until `cancel` fires, updating its `UNHEALTHY` flag.
pub async fn check_loop(
    pool: Arc<Pool>,
    backend: Arc<BackendRuntime>,
    addr: std::net::SocketAddr,
    settings: HealthCheckSettings,
    cancel: CancellationToken,
) {
    let first_delay = settings.interval.mul_f64(fastrand::f64());
    let mut successes = 0u32;
    let mut failures = 0u32;
    let mut delay = first_delay;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = settings.interval;
        // The pool's current TLS settings (a reload may change them).
        let (tls, protocol) = {
            let state = pool.state();
            (
                state.settings.conn.tls.clone(),
                state.settings.conn.protocol,
            )
        };
        let target = tls.as_ref().map(|t| (t, backend.conns.server_name(t)));
        let result = probe(addr, &backend.address, &settings, target, protocol).await;
        let unhealthy = backend.live.flags().contains(BackendFlags::UNHEALTHY);
        match result {
            ProbeResult::Healthy => {
                failures = 0;
                successes = successes.saturating_add(1);
                if unhealthy
                    && successes >= settings.rise
                    && pool.clear_flag(&backend.live, BackendFlags::UNHEALTHY)
                {
                    backend.metrics.became_healthy.inc();
                    let lifted = pool.lift_ejection(&backend.live);
                    tracing::info!(
                        pool = %pool.name(),
                        backend = %backend.address,
                        ejection_lifted = lifted,
                        "health check passed; backend healthy"
                    );
                }
            }
            ProbeResult::Unhealthy(reason) => {
                successes = 0;
                failures = failures.saturating_add(1);
                tracing::debug!(pool = %pool.name(), backend = %backend.address, %reason, failures, "health check failed");
                if !unhealthy
                    && failures >= settings.fall
                    && pool.set_flag(&backend.live, BackendFlags::UNHEALTHY)
                {
                    backend.metrics.became_unhealthy.inc();
                    tracing::warn!(pool = %pool.name(), backend = %backend.address, %reason, "health check failed; backend unhealthy");
                }
            }
        }
    }
}

/// Every [`EJECTION_SWEEP_INTERVAL`] until `cancel`: re-admits `pool`'s expired
/// ejections and closes its idle upstream connections older than the idle timeout.
pub async fn ejection_sweep(pool: Arc<Pool>, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(EJECTION_SWEEP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {
                pool.sweep_ejections();
                let state = pool.state();
                // Failures recorded after a response head (a body cut short) had no pool
                // at hand: outlier detection decides on them here.
                for (i, backend) in state.backends.iter().enumerate() {
                    if backend.live.take_late_failure() {
                        pool.maybe_eject(&state, i, backend.live.consecutive_failures());
                    }
                }
                for runtime in &state.runtimes {
                    runtime.conns.evict_idle(state.settings.conn.idle_timeout);
                }
            }
        }
    }
}
