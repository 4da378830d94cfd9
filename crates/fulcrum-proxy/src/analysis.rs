//! Each pool's background task: effective weights (dynamic weights × slow start), the
//! strategy's periodic tick, and request-rate analysis.
//!
//! The request path only records (one atomic add into the pool's
//! [`fulcrum_stats::RateCounter`], the endpoint statistics, the backends' live state);
//! everything that needs a view over the whole pool runs here, every
//! [`fulcrum_balance::TICK_INTERVAL`], off the request path:
//!
//! 1. **Dynamic weights** (seed 001, opt-in): every `dynamic_weights.interval`, the
//!    backends' request/failure counters, success latency averages (without the peak-EWMA
//!    failure penalty) and oldest in-flight ages
//!    ([`fulcrum_balance::LiveBackend::dynamic_weight_signal`]) feed
//!    [`fulcrum_stats::DynamicWeights`], which moves each backend's factor (bounded to
//!    0.1..=10 × the configured weight) toward a target from its latency and error trend.
//! 2. **Effective weights**: configured weight × dynamic factor × slow-start factor
//!    ([`fulcrum_balance::slow_start::effective_weight`]), published into each backend's
//!    live state for the strategies to read.
//! 3. **Strategy tick** ([`fulcrum_balance::Strategy::tick`]): adaptive strategies adapt
//!    their parameters, table-based ones rebuild after weight changes.
//! 4. **Rate analysis**: each complete second's request count feeds the pool's
//!    [`fulcrum_stats::RateAnalyzer`] (moving averages, Holt forecast, robust anomaly
//!    detection). Anomalies come as episodes (one per incident, not one per anomalous
//!    second): each is logged when it starts (warn) and when it ends (info), counted once
//!    in `fulcrum_traffic_anomalies_total` when it starts, and kept for
//!    `GET /api/pools/{pool}/analysis`.
//! 5. **Endpoint table sweep**: every 10 s a full endpoint table drops the endpoints seen
//!    once and idle, or idle for the latency window
//!    ([`fulcrum_stats::EndpointTable::evict_when_full`]), counted in
//!    `fulcrum_endpoints_evicted_total`.

use std::sync::Arc;

use fulcrum_balance::slow_start::effective_weight;
use fulcrum_balance::{PoolView, TICK_INTERVAL};
use fulcrum_stats::clock::{duration_ns, now_ns};
use fulcrum_stats::{
    AnomalyEpisode, AnomalyEvent, AnomalyKind, BackendSignal, DynamicWeights, RateAnalyzer,
};
use tokio_util::sync::CancellationToken;

use crate::state::{Analysis, Pool, PoolState};

/// Runs `pool`'s periodic work until `cancel` fires.
pub async fn pool_loop(pool: Arc<Pool>, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(TICK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => tick(&pool, now_ns()),
        }
    }
}

/// One round of the pool's periodic work at `now` (clock ns).
pub fn tick(pool: &Pool, now: u64) {
    let state = pool.state();
    let mut analysis = pool.analysis().lock();
    update_dynamic_weights(&state, &mut analysis, now);
    for (i, backend) in state.backends.iter().enumerate() {
        let factor = analysis.factors.get(i).copied().unwrap_or(1.0);
        backend.live.set_effective_weight(effective_weight(
            backend.weight,
            factor,
            &state.settings.strategy.slow_start,
            backend.live.warm_since_ns(),
            now,
        ));
    }
    let panic = pool.is_panic(&state);
    let view =
        PoolView::new(&state.backends, &[], panic).with_total_in_flight(pool.active_requests());
    state.strategy.tick(&view, now);
    analyse_rate(pool, &state, &mut analysis, now);
    if now.saturating_sub(analysis.endpoints_swept_ns) >= duration_ns(ENDPOINT_SWEEP) {
        analysis.endpoints_swept_ns = now;
        let evicted = state.endpoints.evict_when_full(now);
        if evicted > 0 {
            pool.metrics().endpoints_evicted.inc_by(evicted as u64);
            tracing::info!(
                pool = %pool.name(),
                evicted,
                kept = state.endpoints.len(),
                "endpoint table was full: endpoints seen once or idle were dropped to make room"
            );
        }
    }
}

/// How often a full endpoint table is swept ([`fulcrum_stats::EndpointTable::evict_when_full`]).
const ENDPOINT_SWEEP: std::time::Duration = std::time::Duration::from_secs(10);

fn update_dynamic_weights(state: &PoolState, analysis: &mut Analysis, now: u64) {
    let same_backends = analysis.factor_addresses.len() == state.backends.len()
        && analysis
            .factor_addresses
            .iter()
            .zip(&state.backends)
            .all(|(a, b)| *a == b.address);
    if !same_backends {
        analysis.factor_addresses = state
            .backends
            .iter()
            .map(|b| Arc::clone(&b.address))
            .collect();
        analysis.factors = vec![1.0; state.backends.len()];
        analysis.weights = None;
    }
    let Some(config) = &state.settings.dynamic_weights else {
        analysis.weights = None;
        analysis.factors.iter_mut().for_each(|f| *f = 1.0);
        return;
    };
    if analysis
        .weights
        .as_ref()
        .is_none_or(|w| w.config() != config)
    {
        analysis.weights = Some(DynamicWeights::new(config.clone()));
        analysis.weights_updated_ns = 0;
    }
    let interval = duration_ns(state.settings.dynamic_weights_interval).max(1);
    if analysis.weights_updated_ns != 0
        && now.saturating_sub(analysis.weights_updated_ns) < interval
    {
        return;
    }
    analysis.weights_updated_ns = now;
    let signals: Vec<BackendSignal> = state
        .backends
        .iter()
        .map(|b| b.live.dynamic_weight_signal(now))
        .collect();
    let Analysis {
        weights, factors, ..
    } = analysis;
    if let Some(weights) = weights {
        weights.update(&signals, factors);
    }
}

fn analyse_rate(pool: &Pool, state: &PoolState, analysis: &mut Analysis, now: u64) {
    if analysis.rate_config != state.settings.analysis {
        // The new analyzer starts without history: an ongoing episode ends here.
        if let Some(e) = analysis.rate.ongoing() {
            report(
                pool,
                &AnomalyEvent::Ended(AnomalyEpisode {
                    ended: true,
                    ..e.clone()
                }),
            );
        }
        analysis.rate_config = state.settings.analysis.clone();
        analysis.rate = RateAnalyzer::new(analysis.rate_config.clone());
    }
    let since = analysis.last_second.unwrap_or(0);
    let seconds = pool.rate().completed_seconds(since, now);
    for &(second, count) in &seconds {
        for event in analysis.rate.push(second, count) {
            report(pool, &event);
        }
        analysis.last_second = Some(second);
    }
    if let Some(&(_, count)) = seconds.last() {
        let metrics = pool.metrics();
        metrics.rate.set(count as f64);
        if let Some(forecast) = analysis.rate.forecast() {
            metrics.rate_forecast.set(forecast);
        }
    }
}

/// Logs an anomaly episode's start (warn) or end (info, with its duration and peak), and
/// counts its start in `fulcrum_traffic_anomalies_total`.
fn report(pool: &Pool, event: &AnomalyEvent) {
    match event {
        AnomalyEvent::Started(e) => {
            let metrics = pool.metrics();
            match e.kind {
                AnomalyKind::Spike => metrics.spikes.inc(),
                AnomalyKind::Drop => metrics.drops.inc(),
            };
            tracing::warn!(
                pool = %pool.name(),
                kind = e.kind.name(),
                second = e.start,
                observed = e.observed,
                forecast = e.forecast,
                score = e.score,
                "request-rate anomaly started"
            );
        }
        AnomalyEvent::Ended(e) => tracing::info!(
            pool = %pool.name(),
            kind = e.kind.name(),
            second = e.start,
            duration_secs = e.duration_secs(),
            anomalous_secs = e.seconds,
            peak = e.peak,
            forecast = e.forecast,
            max_score = e.score,
            "request-rate anomaly ended"
        ),
    }
}
