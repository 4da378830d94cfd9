//! Backends and their live state.
//!
//! A [`Backend`] is one upstream server of a pool as the current configuration describes it
//! (address, weight). Its [`LiveBackend`] holds what the data plane learns about it at run
//! time: requests in flight, totals, the peak-EWMA latency estimate (penalised by
//! failures, for the strategies), the plain latency average of successful attempts (for
//! dynamic weights and the API), a windowed latency histogram, health and ejection flags. Live state is shared (`Arc`) and keyed by address
//! by the proxy, so it survives configuration reloads and strategy switches.
//!
//! Every counter is an atomic: strategies read it on the hot path without locks, and the
//! forwarder updates it through an [`InFlightGuard`], whose `Drop` releases the in-flight
//! count even when a request future is cancelled or panics.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fulcrum_stats::clock::duration_ns;
use fulcrum_stats::{BackendSignal, Ewma, PeakEwma, WindowedHistogram};
use parking_lot::Mutex;

use crate::outlier::OutlierPolicy;

/// One backend of a pool, as configured: address, weight, and a handle on its live state.
///
/// Cheap to clone (two `Arc`s and two integers).
#[derive(Clone)]
pub struct Backend {
    /// The address as written in the configuration (`host:port`); the backend's identity
    /// in the API, metrics and hashing.
    pub address: Arc<str>,
    /// The resolved socket address connections go to.
    pub addr: SocketAddr,
    /// Configured weight (≥ 1), relative to the other backends of the pool.
    pub weight: u32,
    /// Live statistics and flags, shared across reloads.
    pub live: Arc<LiveBackend>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("address", &self.address)
            .field("weight", &self.weight)
            .field("flags", &self.live.flags())
            .field("in_flight", &self.live.in_flight())
            .finish()
    }
}

/// Why a backend is (or is not) out of rotation: a set of independent reasons, stored as
/// bits in one atomic so strategies check eligibility with a single load.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendFlags(u32);

impl BackendFlags {
    /// No reason to avoid the backend.
    pub const NONE: Self = Self(0);
    /// Drained by an operator: no new requests; in-flight ones finish.
    pub const DRAINING: Self = Self(1);
    /// Disabled by an operator (maintenance): no new requests.
    pub const DISABLED: Self = Self(1 << 1);
    /// Failed its active health checks (`fall` consecutive failures).
    pub const UNHEALTHY: Self = Self(1 << 2);
    /// Ejected by passive outlier detection until its ejection time passes.
    pub const EJECTED: Self = Self(1 << 3);
    /// Out of rotation by the cluster: other nodes see the backend failing and the
    /// cluster's health-merge rule (`cluster.health_merge`) takes it out here too.
    pub const PEER_DOWN: Self = Self(1 << 4);

    /// Flags set by an operator; honoured even in panic mode.
    pub const ADMIN: Self = Self(Self::DRAINING.0 | Self::DISABLED.0);

    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag in `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag in `other` is set in `self`.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The state name shown by the admin API, by precedence:
    /// `disabled` > `draining` > `unhealthy` (own check failing, or [`Self::PEER_DOWN`])
    /// > `ejected` > `healthy`.
    pub fn state_name(self) -> &'static str {
        if self.contains(Self::DISABLED) {
            "disabled"
        } else if self.contains(Self::DRAINING) {
            "draining"
        } else if self.intersects(Self::UNHEALTHY) || self.intersects(Self::PEER_DOWN) {
            "unhealthy"
        } else if self.contains(Self::EJECTED) {
            "ejected"
        } else {
            "healthy"
        }
    }
}

impl BackendFlags {
    /// The flags without [`Self::PEER_DOWN`]: this node's own view of the backend.
    pub const fn local(self) -> Self {
        Self(self.0 & !Self::PEER_DOWN.0)
    }
}

impl fmt::Debug for BackendFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.state_name())
    }
}

/// Parameters of a backend's live statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LiveBackendConfig {
    /// Decay time τ of the peak-EWMA latency estimate (Finagle and Linkerd use 10 s) and
    /// of the plain latency average of successful attempts.
    pub ewma_decay: Duration,
    /// Latency assumed before the first observation.
    pub ewma_initial: Duration,
    /// Length of the sliding window the latency quantiles (p50, p99) cover.
    pub latency_window: Duration,
}

impl Default for LiveBackendConfig {
    fn default() -> Self {
        Self {
            ewma_decay: Duration::from_secs(10),
            ewma_initial: Duration::from_millis(1),
            latency_window: Duration::from_secs(60),
        }
    }
}

/// A failure ratio of 1 in the fixed point of `LiveBackend::failure_ratio` (2¹⁶).
const RATIO_ONE: u32 = 1 << 16;

/// Number of sub-windows the latency window is divided into (it slides by one at a time).
const LATENCY_SLOTS: usize = 6;

/// Sub-windows of the latency window that count as recent for
/// [`LiveBackend::recent_latency_p50_p99_ns`]: the current one and the one before.
pub const RECENT_LATENCY_SLOTS: usize = 2;

/// How many in-flight attempts per backend have their start time tracked, for
/// [`LiveBackend::oldest_in_flight_ns`]. Beyond this many concurrent attempts the oldest
/// age is a lower bound: an attempt that starts while every slot is taken is not seen,
/// but a slot freed by an ending attempt is taken by the next one to start, so while
/// attempts are in flight some are tracked. The in-flight count itself covers them all.
pub const TRACKED_IN_FLIGHT: usize = 16;

/// Marks an [`InFlightGuard`] that holds no start-time slot.
const NO_SLOT: u8 = u8::MAX;

/// What the data plane knows about a backend right now. Shared by every worker thread.
pub struct LiveBackend {
    in_flight: AtomicU64,
    long_in_flight: AtomicU64,
    /// Start times (clock ns, 0 = free) of up to [`TRACKED_IN_FLIGHT`] attempts in flight.
    started: [AtomicU64; TRACKED_IN_FLIGHT],
    /// The effective weight as an `f64` bit pattern: configured weight × dynamic factor ×
    /// slow-start factor, refreshed by the pool's periodic tick.
    effective_weight: AtomicU64,
    /// When the backend (re)joined rotation, clock ns: slow start ramps from here.
    warm_since_ns: AtomicU64,
    requests: AtomicU64,
    cancelled: AtomicU64,
    failures: AtomicU64,
    consecutive_failures: AtomicU32,
    /// A failure was recorded after its response head (see
    /// [`InFlightGuard::body_failure`]): outlier detection has not looked at it yet.
    late_failure: AtomicBool,
    flags: AtomicU32,
    /// Peak-EWMA latency: peak-sensitive, decays toward 0 while idle; a failure is a peak
    /// of at least 1 ms (what `peak_ewma` and its relatives read, with `failure_ratio`).
    latency: PeakEwma,
    /// Share of recent attempts that failed, an EWMA over attempts (α = 1/32, a memory
    /// of about 32 attempts), in units of 2⁻¹⁶. See [`LiveBackend::latency_estimate_ns`].
    failure_ratio: AtomicU32,
    /// Plain time-decayed average of the time to the response head of successful
    /// attempts, without failure penalty (what dynamic weights and the API read).
    success_latency: Ewma,
    histogram: WindowedHistogram,
    ejection: Mutex<Ejection>,
    ejections_total: AtomicU64,
    /// Most requests in flight at once (HAProxy's server `maxconn`, Envoy's
    /// `max_requests`); 0 = unlimited. Enforced by [`LiveBackend::try_begin_classified`].
    max_requests: AtomicU32,
    /// Told whenever an attempt on a limited backend ends, so a request waiting for
    /// capacity can take the freed slot (the proxy's pool queue).
    on_release: OnceLock<Arc<dyn ReleaseListener>>,
}

/// Told when a slot of a backend with a request limit frees up (see
/// [`LiveBackend::set_release_listener`]). Called from [`InFlightGuard`]'s `Drop`, on
/// whatever thread drops it: implementations must be quick and must not block.
pub trait ReleaseListener: Send + Sync {
    /// One attempt on a limited backend ended: a slot may be free.
    fn slot_freed(&self);
}

/// Ejection bookkeeping; touched only when a backend crosses the failure threshold or an
/// ejection expires, never on the ordinary request path.
#[derive(Default)]
struct Ejection {
    /// Ejection-time multiplier: how many recent ejections count toward the next one.
    times: u32,
    /// When the current (or last) ejection ends, in clock nanoseconds; 0 if never ejected.
    until_ns: u64,
}

impl fmt::Debug for LiveBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveBackend")
            .field("flags", &self.flags())
            .field("in_flight", &self.in_flight())
            .field("requests", &self.requests())
            .field("failures", &self.failures())
            .finish_non_exhaustive()
    }
}

impl LiveBackend {
    /// Fresh live state with no history, created at `now_ns`.
    pub fn new(config: LiveBackendConfig, now_ns: u64) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            long_in_flight: AtomicU64::new(0),
            started: std::array::from_fn(|_| AtomicU64::new(0)),
            effective_weight: AtomicU64::new(f64::NAN.to_bits()),
            warm_since_ns: AtomicU64::new(now_ns),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            late_failure: AtomicBool::new(false),
            flags: AtomicU32::new(0),
            latency: PeakEwma::new(config.ewma_decay, config.ewma_initial, now_ns),
            failure_ratio: AtomicU32::new(0),
            success_latency: Ewma::new(config.ewma_decay),
            histogram: WindowedHistogram::new(config.latency_window, LATENCY_SLOTS),
            ejection: Mutex::new(Ejection::default()),
            ejections_total: AtomicU64::new(0),
            max_requests: AtomicU32::new(0),
            on_release: OnceLock::new(),
        }
    }

    /// Most requests this backend may have in flight at once; 0 = unlimited.
    #[inline]
    pub fn max_requests(&self) -> u32 {
        self.max_requests.load(Ordering::Relaxed)
    }

    /// Sets the request limit (0 = unlimited). Attempts already in flight are kept; a
    /// lowered limit only stops new ones.
    pub fn set_max_requests(&self, max: u32) {
        self.max_requests.store(max, Ordering::Relaxed);
    }

    /// Whether another attempt may start now: unlimited, or fewer than
    /// [`LiveBackend::max_requests`] in flight. A hint for picking; the limit itself is
    /// enforced by [`LiveBackend::try_begin_classified`].
    #[inline]
    pub fn has_capacity(&self) -> bool {
        let max = self.max_requests();
        max == 0 || self.in_flight() < u64::from(max)
    }

    /// Installs the listener told when an attempt on this backend ends while it has a
    /// request limit. Only the first call takes effect (a backend belongs to one pool for
    /// its whole life); returns whether this call did.
    pub fn set_release_listener(&self, listener: Arc<dyn ReleaseListener>) -> bool {
        self.on_release.set(listener).is_ok()
    }

    /// Requests currently in flight to this backend (sent, response not yet finished).
    #[inline]
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Attempts in flight that were classified long (see [`LiveBackend::begin_classified`]).
    #[inline]
    pub fn long_in_flight(&self) -> u64 {
        self.long_in_flight.load(Ordering::Relaxed)
    }

    /// Start time (clock ns) of the oldest tracked attempt in flight, or `None` when none
    /// is tracked. Exact while at most [`TRACKED_IN_FLIGHT`] attempts are in flight; a
    /// lower bound on the true age beyond. O([`TRACKED_IN_FLIGHT`]) loads.
    pub fn oldest_in_flight_ns(&self) -> Option<u64> {
        self.started
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s != 0)
            .min()
    }

    /// Age at `now_ns` of the oldest tracked attempt in flight (0 when none), in ns: the
    /// head-of-line age that tail-aware balancing penalises.
    #[inline]
    pub fn head_age_ns(&self, now_ns: u64) -> u64 {
        self.oldest_in_flight_ns()
            .map_or(0, |started| now_ns.saturating_sub(started))
    }

    /// The effective weight set by the last [`LiveBackend::set_effective_weight`], or
    /// `None` if none was set yet (then strategies use the configured weight).
    #[inline]
    pub fn effective_weight(&self) -> Option<f64> {
        let w = f64::from_bits(self.effective_weight.load(Ordering::Relaxed));
        (w.is_finite() && w > 0.0).then_some(w)
    }

    /// Publishes the effective weight (configured × dynamic factor × slow-start factor);
    /// non-finite or non-positive values are ignored.
    pub fn set_effective_weight(&self, weight: f64) {
        if weight.is_finite() && weight > 0.0 {
            self.effective_weight
                .store(weight.to_bits(), Ordering::Relaxed);
        }
    }

    /// When the backend last (re)joined rotation, clock ns: creation, or the last
    /// [`LiveBackend::restart_warmup`].
    #[inline]
    pub fn warm_since_ns(&self) -> u64 {
        self.warm_since_ns.load(Ordering::Relaxed)
    }

    /// Restarts slow start at `now_ns` (the backend came back: health check passed or an
    /// ejection ended).
    pub fn restart_warmup(&self, now_ns: u64) {
        self.warm_since_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Attempts that completed with an outcome (success or failure) since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Attempts abandoned without an outcome because another attempt of the same request
    /// answered first (hedge losers), since start. Not in [`Self::requests`].
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Attempts that failed (connect error, reset, timeout, 5xx) since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Whether a failure was recorded after its response head since the last call
    /// (clearing it): outlier detection's periodic sweep then decides on ejection, as
    /// the forwarder does for failures it sees itself.
    pub fn take_late_failure(&self) -> bool {
        self.late_failure.swap(false, Ordering::AcqRel)
    }

    /// How many times outlier detection has ejected this backend since start.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// The latency cost of a request sent to this backend, in nanoseconds at `now_ns`:
    /// the peak-EWMA latency ([`fulcrum_stats::PeakEwma`], in which a failure counts as a
    /// peak of at least 1 ms) divided by the share of recent attempts that succeeded,
    /// `1 − p` (p = [`LiveBackend::failure_ratio`], at most 0.99): the expected number of
    /// attempts per success, as a geometric distribution gives it. A backend failing 10 %
    /// of its requests costs 1.11× its latency, one failing them all 100×. So a failing
    /// backend loses ties and close comparisons, and at low load gets little traffic,
    /// but keeps about its share when its peers are busy: its price rises with what
    /// failing costs a client, not without bound. (An earlier version doubled the
    /// estimate at every failure; a backend failing 10 % of its requests sat at a 60-s
    /// cap, lost every comparison and overloaded its peers: mean latency 0.5 s for
    /// 10-ms backends at 75 % load.) A cost for choosing between backends, not a
    /// measured latency: see [`LiveBackend::success_latency_ns`] for that.
    #[inline]
    pub fn latency_estimate_ns(&self, now_ns: u64) -> f64 {
        // Without failures the divisor is exactly 1.
        self.latency.estimate_ns(now_ns) / (1.0 - self.failure_ratio())
    }

    /// The share of recent attempts that failed, 0..=0.99: an exponentially weighted
    /// average over attempts (α = 1/32, so about the last 32 count), each failure 1 and
    /// each success 0.
    #[inline]
    pub fn failure_ratio(&self) -> f64 {
        (f64::from(self.failure_ratio.load(Ordering::Relaxed)) / f64::from(RATIO_ONE)).min(0.99)
    }

    /// Moves the failure ratio a 32nd of the way toward 1 (`failed`) or 0. A success
    /// while the ratio is 0 writes nothing, so healthy backends do not share the line.
    #[inline]
    fn note_outcome(&self, failed: bool) {
        let target = if failed { RATIO_ONE } else { 0 };
        if !failed && self.failure_ratio.load(Ordering::Relaxed) == 0 {
            return;
        }
        // r − ⌊r/32⌋ + target/32 stays within 0..=RATIO_ONE. Below 32, ⌊r/32⌋ is 0 and a
        // success would leave r stuck, so a success there clears it outright.
        let _ = self
            .failure_ratio
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(if !failed && r < 32 {
                    0
                } else {
                    r - (r >> 5) + (target >> 5)
                })
            });
    }

    /// The time-decayed average (τ = [`LiveBackendConfig::ewma_decay`], see
    /// [`fulcrum_stats::Ewma`]) of the time to the response head of successful attempts,
    /// in nanoseconds; `None` before the first success. Failures do not enter it: they
    /// are counted by [`LiveBackend::failures`] (a backend that fails fast would otherwise
    /// look faster), and it carries no failure penalty, unlike
    /// [`LiveBackend::latency_estimate_ns`].
    #[inline]
    pub fn success_latency_ns(&self) -> Option<f64> {
        self.success_latency.value_ns()
    }

    /// This backend's input to [`fulcrum_stats::DynamicWeights::update`] at `now_ns`: its
    /// completed and failed attempt counters, the latency average of its successful
    /// attempts ([`LiveBackend::success_latency_ns`], 0 = unknown), and the age of its
    /// oldest attempt in flight ([`LiveBackend::head_age_ns`]), a lower bound of its
    /// current latency that makes a backend which stopped answering visible before any
    /// of its requests completes. The failure penalty of the peak-EWMA estimate is left
    /// out on purpose: the dynamic-weight formula has its own error term.
    pub fn dynamic_weight_signal(&self, now_ns: u64) -> BackendSignal {
        BackendSignal {
            requests_total: self.requests(),
            failures_total: self.failures(),
            latency_ewma_ns: self.success_latency_ns().unwrap_or(0.0),
            in_flight_age_ns: if self.in_flight() == 0 {
                0
            } else {
                self.head_age_ns(now_ns)
            },
        }
    }

    /// The latency to expect of this backend now, in nanoseconds: the peak-EWMA estimate,
    /// or the age of its oldest request in flight when that is larger. A request that
    /// has waited `t` is a right-censored observation, a lower bound on the backend's
    /// current latency (NGINX Plus's `least_time … inflight` counts incomplete requests
    /// the same way): without it a backend that has stopped answering, or a new one
    /// whose first answers have not come back, keeps its old (or optimistic initial)
    /// estimate and draws traffic until responses arrive. The ages are read only while
    /// requests are in flight (O([`TRACKED_IN_FLIGHT`]) loads).
    #[inline]
    pub fn expected_latency_ns(&self, now_ns: u64) -> f64 {
        let estimate = self.latency_estimate_ns(now_ns);
        if self.in_flight() == 0 {
            return estimate;
        }
        estimate.max(self.head_age_ns(now_ns) as f64)
    }

    /// The median and 99th percentile of response latency over the recent part of the
    /// sliding window — its last [`RECENT_LATENCY_SLOTS`] sub-windows (10–20 s of the
    /// default 60 s window) — in nanoseconds; `None` when none completed in that time.
    pub fn recent_latency_p50_p99_ns(&self, now_ns: u64) -> Option<(u64, u64)> {
        let snapshot = self.histogram.snapshot_recent(now_ns, RECENT_LATENCY_SLOTS);
        Some((snapshot.quantile(0.5)?, snapshot.quantile(0.99)?))
    }

    /// The `q`-quantile (0..=1) of response latency over the sliding window, in
    /// nanoseconds; `None` when no request completed within the window.
    pub fn latency_quantile_ns(&self, q: f64, now_ns: u64) -> Option<u64> {
        self.histogram.quantile(q, now_ns)
    }

    /// The current flags.
    #[inline]
    pub fn flags(&self) -> BackendFlags {
        BackendFlags(self.flags.load(Ordering::Relaxed))
    }

    /// Sets `flag`; returns whether it was newly set.
    pub fn set_flag(&self, flag: BackendFlags) -> bool {
        self.flags.fetch_or(flag.0, Ordering::AcqRel) & flag.0 != flag.0
    }

    /// Clears `flag`; returns whether it was set before.
    pub fn clear_flag(&self, flag: BackendFlags) -> bool {
        self.flags.fetch_and(!flag.0, Ordering::AcqRel) & flag.0 != 0
    }

    /// Whether the backend may receive a new request: no flag at all normally; in panic
    /// mode (too few healthy backends) only operator flags count.
    #[inline]
    pub fn is_routable(&self, panic: bool) -> bool {
        let flags = self.flags.load(Ordering::Relaxed);
        if panic {
            flags & BackendFlags::ADMIN.0 == 0
        } else {
            flags == 0
        }
    }

    /// Starts an attempt: counts it in flight until the returned guard is dropped.
    #[inline]
    pub fn begin(self: &Arc<Self>, now_ns: u64) -> InFlightGuard {
        self.begin_classified(now_ns, false)
    }

    /// Starts an attempt of a request classified long (`long`) or not: counts it in flight
    /// (and in [`LiveBackend::long_in_flight`] if long) and records its start time for
    /// the head-of-line age, until the returned guard is dropped.
    pub fn begin_classified(self: &Arc<Self>, now_ns: u64, long: bool) -> InFlightGuard {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started_guard(before, now_ns, long)
    }

    /// Like [`LiveBackend::begin_classified`], but only if the backend is below its
    /// request limit ([`LiveBackend::max_requests`]); `None` when it is full. The check
    /// and the count are one atomic step, so concurrent callers never exceed the limit.
    pub fn try_begin_classified(
        self: &Arc<Self>,
        now_ns: u64,
        long: bool,
    ) -> Option<InFlightGuard> {
        let max = u64::from(self.max_requests());
        if max == 0 {
            return Some(self.begin_classified(now_ns, long));
        }
        let before = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(self.started_guard(before, now_ns, long))
    }

    /// The rest of starting an attempt once it is counted in flight (`before` = the count
    /// before it): the long count and a start-time slot.
    fn started_guard(self: &Arc<Self>, before: u64, now_ns: u64, long: bool) -> InFlightGuard {
        if long {
            self.long_in_flight.fetch_add(1, Ordering::Relaxed);
        }
        // Claim a free start-time slot, probing from a position that spreads concurrent
        // claims; 0 marks a free slot, so a start time of 0 is stored as 1. Probed even
        // when more attempts than slots are in flight: once the tracked attempts end
        // while untracked ones remain (a stalled backend whose clients give up), the
        // freed slots must be taken again, or the backend would show no age at all. A
        // load before the compare-and-swap leaves taken slots' cache lines shared.
        let stamp = now_ns.max(1);
        let mut slot = NO_SLOT;
        let n = TRACKED_IN_FLIGHT as u64;
        for k in 0..n {
            let i = ((before + k) % n) as usize;
            if self.started[i].load(Ordering::Relaxed) == 0
                && self.started[i]
                    .compare_exchange(0, stamp, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                slot = i as u8;
                break;
            }
        }
        InFlightGuard {
            backend: Arc::clone(self),
            started_ns: now_ns,
            outcome: AtomicU8::new(OUTCOME_NONE),
            reset_failures: AtomicU32::new(0),
            long,
            slot,
        }
    }

    /// Ejects the backend for `base × (recent ejections + 1)`, capped at
    /// `max(base, max_ejection_time)`, as Envoy's outlier detection does. The multiplier
    /// decays by one for each `base_ejection_time` the backend has stayed un-ejected.
    ///
    /// Returns the ejection duration, or `None` if the backend was already ejected (another
    /// thread won the race). The caller checks `max_ejection_percent` first.
    pub fn eject(&self, policy: &OutlierPolicy, now_ns: u64) -> Option<Duration> {
        let mut ejection = self.ejection.lock();
        if self.flags().contains(BackendFlags::EJECTED) {
            return None;
        }
        let base = duration_ns(policy.base_ejection_time).max(1);
        if ejection.until_ns != 0 && now_ns > ejection.until_ns {
            let calm_periods = (now_ns - ejection.until_ns) / base;
            ejection.times = ejection
                .times
                .saturating_sub(u32::try_from(calm_periods).unwrap_or(u32::MAX));
        }
        ejection.times = ejection.times.saturating_add(1);
        let cap = duration_ns(policy.max_ejection_time).max(base);
        let duration = base.saturating_mul(u64::from(ejection.times)).min(cap);
        ejection.until_ns = now_ns.saturating_add(duration);
        self.set_flag(BackendFlags::EJECTED);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        Some(Duration::from_nanos(duration))
    }

    /// Ends the ejection if its time has passed at `now_ns`, resetting the consecutive
    /// failure count (as Envoy does on un-ejection). Returns whether it was re-admitted.
    pub fn uneject_if_due(&self, now_ns: u64) -> bool {
        if !self.flags().contains(BackendFlags::EJECTED) {
            return false;
        }
        let ejection = self.ejection.lock();
        if now_ns < ejection.until_ns {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.clear_flag(BackendFlags::EJECTED)
    }

    /// Ends the current ejection now, whatever its remaining time (an active health check
    /// saw the backend recover), resetting the consecutive failure count. The ejection
    /// multiplier is kept, so a backend that fails again is ejected for longer. Returns
    /// whether the backend was ejected.
    pub fn lift_ejection(&self, now_ns: u64) -> bool {
        let mut ejection = self.ejection.lock();
        if !self.flags().contains(BackendFlags::EJECTED) {
            return false;
        }
        ejection.until_ns = ejection.until_ns.min(now_ns);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.clear_flag(BackendFlags::EJECTED)
    }

    /// When the current ejection ends (clock nanoseconds), if the backend is ejected.
    pub fn ejected_until_ns(&self) -> Option<u64> {
        if self.flags().contains(BackendFlags::EJECTED) {
            Some(self.ejection.lock().until_ns)
        } else {
            None
        }
    }
}

/// An attempt in flight to one backend. Created by [`LiveBackend::begin`].
///
/// Record the outcome once with [`success`](Self::success) or [`failure`](Self::failure)
/// when the response head arrives (or the attempt fails); the in-flight count is released
/// when the guard is dropped, which the forwarder does when the response body has been
/// fully streamed. An attempt abandoned because another attempt answered first is
/// recorded with [`cancel`](Self::cancel). A guard dropped without an outcome (the client
/// went away) counts nothing against the backend.
#[derive(Debug)]
pub struct InFlightGuard {
    backend: Arc<LiveBackend>,
    started_ns: u64,
    /// [`OUTCOME_NONE`], [`OUTCOME_SUCCESS`] or [`OUTCOME_OTHER`] (failure, cancel).
    outcome: AtomicU8,
    /// The consecutive failures a success at the head reset (restored if the body then
    /// fails, so a backend that cuts every response short still accumulates them).
    reset_failures: AtomicU32,
    long: bool,
    slot: u8,
}

const OUTCOME_NONE: u8 = 0;
const OUTCOME_SUCCESS: u8 = 1;
const OUTCOME_OTHER: u8 = 2;

impl InFlightGuard {
    /// When the attempt started (clock nanoseconds).
    pub fn started_ns(&self) -> u64 {
        self.started_ns
    }

    /// Sets the attempt's outcome if none is set yet; whether it was.
    fn record(&self, outcome: u8) -> bool {
        self.outcome
            .compare_exchange(OUTCOME_NONE, outcome, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Records that the response failed while its body streamed — the backend closed or
    /// reset the connection (or the HTTP/2 stream) before the body's end, so the client
    /// got a truncated answer — at `now_ns`. An attempt recorded as a success at its head
    /// becomes a failure of the same request: `failures` and the consecutive failures
    /// go up (not `requests`; the consecutive failures its head's success reset are
    /// restored), and the latency estimate is penalized as for any failure.
    /// An attempt without an outcome yet is recorded as a failure; one already failed or
    /// cancelled counts once. Outlier detection looks at it on its next sweep
    /// ([`LiveBackend::take_late_failure`]), not here: the body has no pool at hand.
    /// Returns the consecutive failures.
    pub fn body_failure(&self, now_ns: u64) -> u32 {
        let b = &self.backend;
        let upgraded = self
            .outcome
            .compare_exchange(
                OUTCOME_SUCCESS,
                OUTCOME_OTHER,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok();
        let consecutive = if upgraded {
            b.failures.fetch_add(1, Ordering::Relaxed);
            b.latency
                .penalize(now_ns.saturating_sub(self.started_ns), now_ns);
            b.note_outcome(true);
            let restored = self.reset_failures.load(Ordering::Relaxed) + 1;
            b.consecutive_failures
                .fetch_add(restored, Ordering::Relaxed)
                + restored
        } else if self.outcome.load(Ordering::Relaxed) == OUTCOME_NONE {
            self.failure(now_ns)
        } else {
            return b.consecutive_failures();
        };
        b.late_failure.store(true, Ordering::Release);
        consecutive
    }

    /// The backend this attempt went to.
    pub fn backend(&self) -> &Arc<LiveBackend> {
        &self.backend
    }

    /// Records a successful response head at `now_ns`: feeds the latency estimate, the
    /// success latency average and the window, and resets the consecutive-failure count.
    /// Only the first outcome counts.
    pub fn success(&self, now_ns: u64) {
        if !self.record(OUTCOME_SUCCESS) {
            return;
        }
        let rtt = now_ns.saturating_sub(self.started_ns);
        let b = &self.backend;
        b.requests.fetch_add(1, Ordering::Relaxed);
        // Written only when non-zero: the common case leaves the shared line alone.
        let failures = b.consecutive_failures.load(Ordering::Relaxed);
        if failures != 0 {
            b.consecutive_failures.store(0, Ordering::Relaxed);
            self.reset_failures.store(failures, Ordering::Relaxed);
        }
        b.latency.observe(rtt, now_ns);
        b.note_outcome(false);
        b.success_latency.observe(rtt, now_ns);
        b.histogram.record(rtt, now_ns);
    }

    /// Records, at `now_ns`, that the attempt is abandoned without an answer because
    /// another attempt of the request answered first (a hedge's loser): counted in
    /// [`LiveBackend::cancelled`], neither a request nor a failure, and its time so far
    /// is a lower bound of the backend's latency, which can only raise the estimate
    /// ([`fulcrum_stats::PeakEwma::observe_at_least`]). Only the first outcome counts.
    pub fn cancel(&self, now_ns: u64) {
        if !self.record(OUTCOME_OTHER) {
            return;
        }
        let b = &self.backend;
        b.cancelled.fetch_add(1, Ordering::Relaxed);
        b.latency
            .observe_at_least(now_ns.saturating_sub(self.started_ns), now_ns);
    }

    /// Records a failed attempt at `now_ns` (connect error, reset, timeout or a 5xx):
    /// penalises the latency estimate (see [`fulcrum_stats::PeakEwma::penalize`]) and
    /// returns the consecutive failure count, for outlier detection. Only the first outcome
    /// counts; a repeated call returns the current count without recording.
    pub fn failure(&self, now_ns: u64) -> u32 {
        let b = &self.backend;
        if !self.record(OUTCOME_OTHER) {
            return b.consecutive_failures();
        }
        let rtt = now_ns.saturating_sub(self.started_ns);
        b.requests.fetch_add(1, Ordering::Relaxed);
        b.failures.fetch_add(1, Ordering::Relaxed);
        b.latency.penalize(rtt, now_ns);
        b.note_outcome(true);
        b.histogram.record(rtt, now_ns);
        b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let b = &self.backend;
        if self.slot != NO_SLOT {
            b.started[usize::from(self.slot)].store(0, Ordering::Relaxed);
        }
        if self.long {
            b.long_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        b.in_flight.fetch_sub(1, Ordering::AcqRel);
        if b.max_requests() != 0
            && let Some(listener) = b.on_release.get()
        {
            listener.slot_freed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn live() -> Arc<LiveBackend> {
        Arc::new(LiveBackend::new(LiveBackendConfig::default(), 0))
    }

    /// A backend failing one request in ten is priced at about 1/(1 − 0.1) of its
    /// latency, not driven to a cap; one failing every request at 100× its floor; and
    /// one that recovers returns to its latency.
    #[test]
    fn failures_raise_the_cost_by_the_expected_attempts_per_success() {
        let b = live();
        let mut now = 0;
        for i in 0..2_000 {
            let guard = b.begin(now);
            now += 10 * MS;
            if i % 10 == 9 {
                guard.failure(now);
            } else {
                guard.success(now);
            }
        }
        let cost = b.latency_estimate_ns(now) / (10 * MS) as f64;
        assert!((1.03..=1.25).contains(&cost), "cost {cost}× the latency");
        assert!(
            (0.03..=0.2).contains(&b.failure_ratio()),
            "{}",
            b.failure_ratio()
        );
        for _ in 0..200 {
            let guard = b.begin(now);
            now += MS;
            guard.failure(now);
        }
        assert!(b.failure_ratio() >= 0.98, "{}", b.failure_ratio());
        for _ in 0..500 {
            let guard = b.begin(now);
            now += 10 * MS;
            guard.success(now);
        }
        assert_eq!(b.failure_ratio(), 0.0);
        let cost = b.latency_estimate_ns(now) / (10 * MS) as f64;
        assert!((0.99..=1.01).contains(&cost), "cost {cost}× the latency");
    }

    struct Count(std::sync::atomic::AtomicUsize);

    impl ReleaseListener for Count {
        fn slot_freed(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn request_limit_is_never_exceeded_and_releases_are_told() {
        let b = live();
        // Unlimited: always starts, and nobody is told.
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        assert!(b.set_release_listener(count.clone()));
        assert!(!b.set_release_listener(count.clone()), "only the first one");
        drop(b.try_begin_classified(0, false).unwrap());
        assert_eq!(count.0.load(Ordering::Relaxed), 0);

        b.set_max_requests(3);
        // 8 threads race for 3 slots, many times: never more than 3 in flight.
        let peak = Arc::new(AtomicU64::new(0));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let (b, peak) = (Arc::clone(&b), Arc::clone(&peak));
                scope.spawn(move || {
                    for _ in 0..2000 {
                        if let Some(guard) = b.try_begin_classified(0, true) {
                            peak.fetch_max(b.in_flight(), Ordering::Relaxed);
                            assert!(b.long_in_flight() <= 3);
                            drop(guard);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!((b.in_flight(), b.long_in_flight()), (0, 0));
        let told = count.0.load(Ordering::Relaxed);
        assert!(told > 0, "every release of a limited backend is told");

        let guards: Vec<_> = (0..3).map(|_| b.try_begin_classified(0, false)).collect();
        assert!(guards.iter().all(Option::is_some));
        assert!(!b.has_capacity());
        assert!(b.try_begin_classified(0, false).is_none());
        drop(guards);
        assert!(b.has_capacity());
        assert_eq!(count.0.load(Ordering::Relaxed), told + 3);
    }

    #[test]
    fn guard_releases_in_flight_on_drop() {
        let b = live();
        let g1 = b.begin(0);
        let g2 = b.begin(0);
        assert_eq!(b.in_flight(), 2);
        g1.success(5 * MS);
        drop(g1);
        assert_eq!(b.in_flight(), 1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.requests(), 1);
    }

    #[test]
    fn guard_released_when_future_is_cancelled() {
        let b = live();
        let guard = b.begin(0);
        let fut = async move {
            let _g = guard;
            std::future::pending::<()>().await;
        };
        // Dropping a never-completed future drops its captured guard.
        drop(fut);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn head_age_and_long_count_follow_guards() {
        let b = live();
        assert_eq!(b.head_age_ns(10 * MS), 0);
        let g1 = b.begin_classified(2 * MS, true);
        let g2 = b.begin(5 * MS);
        assert_eq!(b.long_in_flight(), 1);
        assert_eq!(b.oldest_in_flight_ns(), Some(2 * MS));
        assert_eq!(b.head_age_ns(10 * MS), 8 * MS);
        drop(g1);
        assert_eq!(b.long_in_flight(), 0);
        assert_eq!(b.head_age_ns(10 * MS), 5 * MS);
        drop(g2);
        assert_eq!(b.oldest_in_flight_ns(), None);
        // More attempts than slots: counts stay exact, slots are all released.
        let guards: Vec<_> = (0..40).map(|i| b.begin(i * MS + 1)).collect();
        assert_eq!(b.in_flight(), 40);
        assert_eq!(b.oldest_in_flight_ns(), Some(1));
        drop(guards);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.oldest_in_flight_ns(), None);
    }

    #[test]
    fn slots_freed_beyond_the_tracked_count_are_taken_by_later_attempts() {
        let b = live();
        let mut tracked: Vec<_> = (0..16).map(|i| b.begin(i * MS + 1)).collect();
        let untracked: Vec<_> = (16..40).map(|i| b.begin(i * MS + 1)).collect();
        // The tracked attempts end (their clients gave up); the untracked ones hang on.
        tracked.clear();
        assert_eq!(b.in_flight(), 24);
        assert_eq!(b.oldest_in_flight_ns(), None, "nothing tracked right now");
        let later = b.begin(100 * MS);
        assert_eq!(b.oldest_in_flight_ns(), Some(100 * MS));
        assert_eq!(b.head_age_ns(3_000 * MS), 2_900 * MS);
        drop((later, untracked));
        assert_eq!(b.oldest_in_flight_ns(), None);
    }

    #[test]
    fn effective_weight_ignores_nonsense() {
        let b = live();
        assert_eq!(b.effective_weight(), None);
        b.set_effective_weight(2.5);
        b.set_effective_weight(f64::NAN);
        b.set_effective_weight(-1.0);
        assert_eq!(b.effective_weight(), Some(2.5));
    }

    #[test]
    fn outcome_counts_once() {
        let b = live();
        let g = b.begin(0);
        assert_eq!(g.failure(MS), 1);
        assert_eq!(g.failure(MS), 1);
        g.success(MS);
        assert_eq!(b.requests(), 1);
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn success_resets_consecutive_failures() {
        let b = live();
        for _ in 0..3 {
            b.begin(0).failure(MS);
        }
        assert_eq!(b.consecutive_failures(), 3);
        b.begin(0).success(MS);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn flags_and_routability() {
        let b = live();
        assert!(b.is_routable(false));
        assert!(b.set_flag(BackendFlags::UNHEALTHY));
        assert!(!b.set_flag(BackendFlags::UNHEALTHY));
        assert!(!b.is_routable(false));
        assert!(b.is_routable(true), "panic mode ignores health");
        b.set_flag(BackendFlags::DRAINING);
        assert!(!b.is_routable(true), "panic mode honours drain");
        assert_eq!(b.flags().state_name(), "draining");
        assert!(b.clear_flag(BackendFlags::DRAINING));
        assert_eq!(b.flags().state_name(), "unhealthy");
    }

    #[test]
    fn ejection_grows_and_is_capped() {
        let policy = OutlierPolicy {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(5),
            max_ejection_time: Duration::from_secs(12),
            max_ejection_percent: 50,
        };
        let b = live();
        let s = 1_000 * MS;
        assert_eq!(b.eject(&policy, 0), Some(Duration::from_secs(5)));
        assert_eq!(b.eject(&policy, 0), None, "already ejected");
        assert!(!b.uneject_if_due(4 * s));
        assert!(b.uneject_if_due(5 * s));
        // Re-ejected right away: multiplier 2.
        assert_eq!(b.eject(&policy, 5 * s), Some(Duration::from_secs(10)));
        assert!(b.uneject_if_due(15 * s));
        // Again immediately: 3 × 5 s capped at 12 s.
        assert_eq!(b.eject(&policy, 15 * s), Some(Duration::from_secs(12)));
        assert!(b.uneject_if_due(27 * s));
        // An active check can lift an ejection early; the multiplier stays.
        assert_eq!(b.eject(&policy, 28 * s), Some(Duration::from_secs(12)));
        assert!(b.lift_ejection(29 * s));
        assert!(!b.lift_ejection(29 * s), "not ejected any more");
        assert!(b.is_routable(false));
        // After a long calm period the multiplier decays back to 1.
        assert_eq!(b.eject(&policy, 500 * s), Some(Duration::from_secs(5)));
        assert_eq!(b.ejections_total(), 5);
    }

    /// Three backends under simulated traffic, feeding dynamic weights as the proxy does
    /// ([`LiveBackend::dynamic_weight_signal`]) every second of simulated time.
    mod dynamic_weights {
        use super::*;
        use fulcrum_stats::{DynamicWeightConfig, DynamicWeights};

        const SECOND: u64 = 1_000 * MS;
        /// Attempts per backend per interval (about the operator's 100 req/s over 3
        /// backends).
        const PER_INTERVAL: u64 = 30;
        /// The client gives up (the attempt is dropped without an outcome) after this.
        const CLIENT_TIMEOUT: u64 = 3 * SECOND;

        /// How one backend behaves during an interval.
        #[derive(Clone, Copy)]
        enum Behaviour {
            /// Answers in 5 ms; every `n`-th attempt fails (also in 5 ms), 0 = never.
            Answers { fail_every: u64 },
            /// Accepts attempts and never answers.
            Stalled,
        }

        struct Pool {
            backends: Vec<Arc<LiveBackend>>,
            hanging: Vec<InFlightGuard>,
            weights: DynamicWeights,
            factors: Vec<f64>,
            interval: u64,
        }

        impl Pool {
            /// Three backends, `interval: 1s, smoothing: 0.5` (the operator's settings);
            /// the first update records the counters.
            fn new() -> Self {
                let backends = (0..3).map(|_| live()).collect::<Vec<_>>();
                let mut pool = Self {
                    backends,
                    hanging: Vec::new(),
                    weights: DynamicWeights::new(DynamicWeightConfig {
                        smoothing: 0.5,
                        ..DynamicWeightConfig::default()
                    }),
                    factors: vec![1.0; 3],
                    interval: 0,
                };
                pool.update();
                pool
            }

            /// One interval of traffic with `behaviour[i]` for backend `i`, then an update;
            /// returns the factors.
            fn run(&mut self, behaviour: [Behaviour; 3]) -> Vec<f64> {
                let start = self.interval * SECOND;
                for j in 0..PER_INTERVAL {
                    let t = start + j * (SECOND / PER_INTERVAL);
                    self.hanging
                        .retain(|g| t.saturating_sub(g.started_ns()) < CLIENT_TIMEOUT);
                    for (b, behaviour) in self.backends.iter().zip(behaviour) {
                        let guard = b.begin(t);
                        match behaviour {
                            Behaviour::Answers { fail_every } => {
                                if fail_every != 0 && j % fail_every == 0 {
                                    guard.failure(t + 5 * MS);
                                } else {
                                    guard.success(t + 5 * MS);
                                }
                            }
                            Behaviour::Stalled => self.hanging.push(guard),
                        }
                    }
                }
                self.interval += 1;
                self.update();
                self.factors.clone()
            }

            fn update(&mut self) {
                let now = self.interval * SECOND;
                let signals: Vec<_> = self
                    .backends
                    .iter()
                    .map(|b| b.dynamic_weight_signal(now))
                    .collect();
                self.weights.update(&signals, &mut self.factors);
            }
        }

        const HEALTHY: Behaviour = Behaviour::Answers { fail_every: 0 };

        #[test]
        fn stalled_backend_falls_below_the_healthy_ones_within_a_few_intervals() {
            let mut pool = Pool::new();
            for _ in 0..5 {
                pool.run([HEALTHY; 3]);
            }
            // Its requests never complete: nothing but their age shows the stall.
            let mut f = Vec::new();
            for _ in 0..2 {
                f = pool.run([HEALTHY, HEALTHY, Behaviour::Stalled]);
            }
            assert!(
                f[2] < f[0] && f[2] < f[1] && f[2] < 0.5,
                "2 intervals into the stall: {f:?}"
            );
            for _ in 0..6 {
                f = pool.run([HEALTHY, HEALTHY, Behaviour::Stalled]);
            }
            assert!(f[2] < 0.15, "at the floor after 8 intervals: {f:?}");
            assert!(f[0] > 1.0 && f[1] > 1.0, "{f:?}");
        }

        #[test]
        fn ten_percent_errors_at_normal_latency_give_about_0_81_not_the_floor() {
            let mut pool = Pool::new();
            let mut f = Vec::new();
            for _ in 0..20 {
                f = pool.run([HEALTHY, HEALTHY, Behaviour::Answers { fail_every: 10 }]);
            }
            // The documented target relative to a healthy backend: (1 − 0.1)² = 0.81.
            let relative = f[2] / f[0];
            assert!(
                (relative - 0.81).abs() < 0.02,
                "relative factor {relative}: {f:?}"
            );
            assert!(f[2] > 0.5, "{f:?}");
        }

        #[test]
        fn backend_recovers_within_bounded_intervals_after_errors_stop() {
            let mut pool = Pool::new();
            let mut f = Vec::new();
            for _ in 0..15 {
                f = pool.run([HEALTHY, HEALTHY, Behaviour::Answers { fail_every: 2 }]);
            }
            assert!(f[2] < 0.5 * f[0], "failing half its requests: {f:?}");
            for _ in 0..10 {
                f = pool.run([HEALTHY; 3]);
            }
            assert!(
                f[2] > 0.9 && f[0] < 1.1,
                "10 intervals after the errors stopped: {f:?}"
            );
        }
    }
}
