//! Admission: picking a backend for an attempt and starting it, in a pool with request
//! limits after waiting in the pool queue ([`crate::queue`]) when every backend the
//! request may use is full. Shared by the HTTP forwarder and TCP listeners.

use std::sync::Arc;
use std::time::Duration;

use fulcrum_balance::{BackendId, InFlightGuard, PoolView, RequestClass, RequestInfo};
use fulcrum_stats::clock::now_ns;

use crate::state::{Pool, PoolState};

/// What admission needs of a request: its pool and the state it loaded, the backends its
/// route allows, and its class and affinity key.
#[derive(Clone, Copy)]
pub(crate) struct Admission<'a> {
    /// The pool.
    pub pool: &'a Arc<Pool>,
    /// The state the request loaded (kept for its whole life).
    pub state: &'a PoolState,
    /// The backends the route allows (its required tags); `None` = all.
    pub allowed: Option<&'a [bool]>,
    /// Class and affinity key, decided once before the first pick; `now_ns` is when the
    /// request arrived.
    pub info: RequestInfo,
}

impl Admission<'_> {
    /// Whether the request is predicted long.
    pub(crate) fn long(&self) -> bool {
        self.info.class == RequestClass::Long
    }

    /// Picks a backend not in `tried`; `None` if none is eligible. In a pool with
    /// request limits only backends with room are eligible.
    pub(crate) fn pick(&self, now: u64, tried: &[BackendId]) -> Option<BackendId> {
        self.pick_in(now, tried, self.state.limited)
    }

    /// Picks a backend not in `tried`, else (a retry after every eligible backend was
    /// tried) any; among those with room if `with_room`.
    fn pick_untried_first(
        &self,
        now: u64,
        tried: &[BackendId],
        with_room: bool,
    ) -> Option<BackendId> {
        self.pick_in(now, tried, with_room).or_else(|| {
            if tried.is_empty() {
                None
            } else {
                self.pick_in(now, &[], with_room)
            }
        })
    }

    /// Picks a backend not in `tried`, among those with room if `with_room`.
    fn pick_in(&self, now: u64, tried: &[BackendId], with_room: bool) -> Option<BackendId> {
        let panic = self.pool.is_panic(self.state);
        let mut info = self.info;
        info.now_ns = now;
        let view = PoolView::new(&self.state.backends, tried, panic)
            // The pool counts this request from its arrival (`Pool::enter`); the
            // bounded-load rule's T is the load *before* it, and adds it itself.
            .with_total_in_flight(self.pool.active_requests().saturating_sub(1))
            .with_allowed(self.allowed)
            .with_capacity_only(with_room);
        if tried.is_empty() {
            self.state.strategy.pick(&info, &view)
        } else {
            self.state.strategy.pick_another(&info, &view)
        }
    }

    /// Picks a backend for the next attempt and starts it, without waiting: one not in
    /// `tried`, else (a retry after every eligible backend was tried) any. In a pool with
    /// request limits the attempt starts only on a backend with room; `Ok(None)` when
    /// every eligible backend is full and the request must wait in the pool queue
    /// ([`Admission::wait_for_room`]). Synchronous, so that the common case holds no
    /// queue state across an await.
    fn admit_now(
        &self,
        tried: &[BackendId],
    ) -> Result<Option<(BackendId, InFlightGuard)>, Refusal> {
        let now = now_ns();
        if !self.state.limited {
            let id = self
                .pick_untried_first(now, tried, false)
                .ok_or(Refusal::NoBackend)?;
            let guard = self.state.runtimes[id.0]
                .live
                .begin_classified(now, self.long());
            return Ok(Some((id, guard)));
        }
        if self.pool.queue().is_empty()
            && let Some(taken) = self.take_room(now, tried)
        {
            return Ok(Some(taken));
        }
        // Queue only for a backend that exists: with every backend unhealthy or tried,
        // waiting cannot help.
        if self.pick_untried_first(now, tried, false).is_none() {
            return Err(Refusal::NoBackend);
        }
        Ok(None)
    }

    /// Picks a backend for the next attempt and starts it ([`Admission::admit_now`]),
    /// waiting in the pool queue when every backend it may use is full
    /// ([`Admission::wait_for_room`]). The waiting future is boxed, so that a caller's
    /// future does not carry the queue's state (ticket, timer) unless a request waits.
    pub(crate) async fn admit(
        &self,
        tried: &[BackendId],
    ) -> Result<(BackendId, InFlightGuard), Refusal> {
        match self.admit_now(tried)? {
            Some(taken) => Ok(taken),
            None => Box::pin(self.wait_for_room(tried)).await,
        }
    }

    /// Waits in the pool queue (see [`crate::queue`]) until a backend this request may
    /// use has room, then starts the attempt there; refused when the queue is full or
    /// `queue.timeout` has passed since the request arrived.
    async fn wait_for_room(
        &self,
        tried: &[BackendId],
    ) -> Result<(BackendId, InFlightGuard), Refusal> {
        let queue = self.pool.queue();
        let settings = &self.state.settings.queue;
        let metrics = self.pool.metrics();
        let key = settings.key(self.info.now_ns, self.long());
        let Some(mut ticket) = queue.join(key, settings.max_size) else {
            metrics.queue_full.inc();
            return Err(Refusal::QueueFull);
        };
        metrics.queued.inc();
        let _waiting = Waiting::new(&metrics.queue_length);
        // A slot may have freed between the look in `admit_now` and joining: hand it to
        // the first waiter (this request or one before it).
        if self.pool_has_room() {
            queue.wake_first();
        }
        let waited = Duration::from_nanos(now_ns().saturating_sub(self.info.now_ns));
        let deadline = tokio::time::Instant::now() + settings.timeout.saturating_sub(waited);
        loop {
            if tokio::time::timeout_at(deadline, ticket.woken())
                .await
                .is_err()
            {
                metrics.queue_timeouts.inc();
                return Err(Refusal::QueueTimeout(settings.timeout));
            }
            if let Some(taken) = self.take_room(now_ns(), tried) {
                ticket.done();
                return Ok(taken);
            }
            ticket.requeue();
            // A slot freed while this request was out of the queue woke nobody: look
            // again, and pass room this request cannot use to the next waiter.
            if self.pool_has_room() {
                if let Some(taken) = self.take_room(now_ns(), tried) {
                    ticket.done();
                    return Ok(taken);
                }
                ticket.pass_on();
            }
        }
    }

    /// Whether some backend of the pool (not only those this request may use) has room
    /// now, in the pool's current panic mode.
    fn pool_has_room(&self) -> bool {
        self.state.has_room(self.pool.is_panic(self.state))
    }

    /// Starts an attempt on a backend with room now, if there is one: picks among the
    /// backends with room (not in `tried`, else any) and claims a slot, picking again if
    /// another request claimed the last slot first.
    fn take_room(&self, now: u64, tried: &[BackendId]) -> Option<(BackendId, InFlightGuard)> {
        for _ in 0..3 {
            let id = self.pick_untried_first(now, tried, true)?;
            if let Some(guard) = self.state.runtimes[id.0]
                .live
                .try_begin_classified(now, self.long())
            {
                return Some((id, guard));
            }
        }
        None
    }
}

/// Why no attempt could start.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// No backend is eligible (all unhealthy, drained, excluded by the route's tags, or
    /// already tried).
    NoBackend,
    /// Every backend was at its request limit and the pool queue was full.
    QueueFull,
    /// Every backend stayed at its request limit for the queue timeout (given).
    QueueTimeout(Duration),
}

/// Counts a request in the pool's queue-length gauge while it waits.
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
