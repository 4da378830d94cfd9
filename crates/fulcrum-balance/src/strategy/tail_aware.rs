//! `tail_aware`: power of two choices on a tail-risk score, with a feedback loop on the
//! pool's p99 and SLO-aware conditional hedging (seed 002's ALPHA1).
//!
//! **Pick.** Two distinct eligible backends are drawn at random and the request goes to the
//! one with the lower tail-risk score (Mitzenmacher, "The Power of Two Choices in
//! Randomized Load Balancing", 1996/2001; the pair draw, eligibility handling and O(n)
//! fallback are `p2c`'s, shared):
//!
//! ```text
//! score_i = work_i + β · interference_i + γ · age_i                       (all in ns)
//! work_i         = expected_latency_i(now) × (in_flight_i + 1)
//! interference_i = max(0, p99_i − p50_i)        over the recent third of its latency window
//! age_i          = now − start of the oldest request in flight on i (0 when idle)
//! ```
//!
//! * `work` is the expected work queued ahead of a new request: the peak-EWMA service time,
//!   or the age of the backend's oldest request in flight when larger
//!   ([`crate::LiveBackend::expected_latency_ns`], as `peak_ewma` prices it: a request
//!   still waiting is a lower bound of the current latency, so a backend that has just
//!   joined with an optimistic estimate, or has stopped answering, does not draw a queue
//!   before its first answers come back), times the queue it joins, the `+ 1`
//!   counting the request being placed — Finagle's and Linkerd's peak-EWMA cost, and the
//!   queue-size × service-time product C3 ranks replicas by (Suresh et al., "C3: Cutting
//!   Tail Latency in Cloud Data Stores via Adaptive Replica Selection", NSDI'15). Weights
//!   are not applied: this strategy steers by measured latency, in which a backend's
//!   capacity already shows.
//! * `interference` is how far the backend's tail stands out from its own typical
//!   latency: a backend with noisy neighbours, GC pauses or a cold cache has a p99 far
//!   above its median even while its average looks fine (Dean and Barroso, "The Tail at
//!   Scale", CACM 56(2), 2013). The median, not the EWMA, is the reference: a peak EWMA
//!   sits at the last slow response, so `p99 − ewma` would vanish exactly when the tail
//!   shows. Both quantiles are taken over the last two of the window's six sub-windows
//!   ([`crate::LiveBackend::recent_latency_p50_p99_ns`]: 10–20 s with the default 60 s
//!   window), a memory like the peak EWMA's τ = 10 s. Over the whole window, a backend
//!   slowed for two seconds kept a p99 of its slow answers — and so a score that lost
//!   every pair — for the window's full minute after it had recovered, and the few
//!   requests it still got could not dilute them; a backend with no recent answers has
//!   no recent tail and competes on work and age alone. Reading two window quantiles merges histograms (thousands of loads), too dear
//!   per pick, so [`Strategy::tick`] refreshes a cached value per backend, at most
//!   [`REFRESH_PER_TICK`] backends per tick in rotation (a 10,000-backend pool is swept in
//!   79 ticks, about 8 s).
//! * `age` is the head-of-line age ([`crate::LiveBackend::head_age_ns`]): a backend that
//!   stalled grows it from the moment it stops answering, long before a slow response
//!   reaches its latency statistics.
//!
//! Per pick: two random draws, and for each of the pair two atomic loads for `work`, one
//! for the cached interference and, if it has requests in flight,
//! [`crate::backend::TRACKED_IN_FLIGHT`] for the age; β and γ are `f64` bit patterns in
//! atomics, read lock-free. The one write is a relaxed increment of the pick counter that
//! `hedge_rate` divides by.
//!
//! **Feedback (every tick).** The observed p99 is the **maximum** window p99 over the
//! backends that completed requests since their previous refresh (those serving now).
//! The maximum is conservative (the tail a client can currently hit) where a
//! request-weighted mean of per-backend p99s would hide a straggler carrying a few percent
//! of the traffic; a backend the balancer already keeps idle drops out of it at once.
//! Against the target `T` it gives a verdict with a hysteresis band of
//! [`HYSTERESIS`] (10 %): *over* when `p99 > T`, *under* when `p99 < 0.9 T` (or no
//! backend is serving), *in band* otherwise. When `adapt` is on, β and γ follow a
//! multiplicative-increase / multiplicative-decrease controller, at most once per half
//! [`TICK_INTERVAL`] (a tick firing a little early is not skipped; extra ticks cannot
//! speed the controller up more than twice):
//!
//! ```text
//! over:    β ← min(β × 1.1,  16 β₀)        (same for γ)
//! under:   β ← max(β / 1.05, β₀ / 4)
//! in band: unchanged
//! ```
//!
//! Increase is faster than decrease so a violation is corrected within a few ticks (×2.6
//! in 1 s) while relaxation is gradual (÷1.6 in 1 s); the caps keep the loop bounded, and
//! the band keeps it from oscillating around the target. Comfortably meeting the target
//! lets the score lean on `work` (plain peak EWMA, the best mean-latency choice).
//!
//! **Hedging.** [`Strategy::hedge_allowed`] is true while the pool is over its target:
//! set on an *over* verdict, cleared on an *under* one, kept in band. Hedged requests
//! (Dean and Barroso's "hedged requests"; Vulimiri et al., "Low Latency via Redundancy",
//! CoNEXT 2013) cut the tail but add load, so they are spent only while the SLO is missed.
//! Before the first tick no hedging is allowed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fulcrum_stats::clock::duration_ns;
use parking_lot::Mutex;

use super::p2c::power_of_two_choices;
use super::{BackendId, Figure, PoolView, RequestInfo, Strategy, StrategyParams, TICK_INTERVAL};

/// Factor applied to β and γ on each tick over the target.
pub const INCREASE_FACTOR: f64 = 1.1;
/// Divisor applied to β and γ on each tick under the hysteresis band.
pub const DECREASE_FACTOR: f64 = 1.05;
/// Upper bound of β and γ, as a multiple of their initial values.
pub const MAX_GAIN: f64 = 16.0;
/// Lower bound of β and γ, as a multiple of their initial values.
pub const MIN_GAIN: f64 = 0.25;
/// Width of the hysteresis band below the target, as a ratio of it: the pool is *under*
/// only below `(1 − HYSTERESIS) × target`.
pub const HYSTERESIS: f64 = 0.1;
/// Backends whose window quantiles one tick reads (two histogram merges each).
pub const REFRESH_PER_TICK: usize = 128;

/// Nanoseconds per millisecond, for the figures.
const NS_PER_MS: f64 = 1e6;

/// The observed p99 against the target, with hysteresis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Observed p99 above the target.
    Over,
    /// Observed p99 between `(1 − HYSTERESIS) × target` and the target.
    InBand,
    /// Observed p99 below `(1 − HYSTERESIS) × target`, or no backend serving.
    Under,
}

impl Verdict {
    /// The verdict on an observed p99 of `observed_ns` (None: no data) against
    /// `target_ns`, both in nanoseconds.
    pub fn of(observed_ns: Option<u64>, target_ns: u64) -> Self {
        let Some(observed) = observed_ns else {
            return Self::Under;
        };
        let observed = observed as f64;
        let target = target_ns as f64;
        if observed > target {
            Self::Over
        } else if observed < (1.0 - HYSTERESIS) * target {
            Self::Under
        } else {
            Self::InBand
        }
    }
}

/// One controller step for a gain (β or γ) of initial value `initial`: ×[`INCREASE_FACTOR`]
/// when over, ÷[`DECREASE_FACTOR`] when under, unchanged in band, kept within
/// `[MIN_GAIN × initial, MAX_GAIN × initial]`.
pub fn adjust(gain: f64, initial: f64, verdict: Verdict) -> f64 {
    let next = match verdict {
        Verdict::Over => gain * INCREASE_FACTOR,
        Verdict::Under => gain / DECREASE_FACTOR,
        Verdict::InBand => gain,
    };
    next.clamp(initial * MIN_GAIN, initial * MAX_GAIN)
}

/// P2C on a tail-risk score with feedback-adapted weights and SLO-aware hedging (seed
/// 002's ALPHA1).
///
/// Of two random eligible backends, picks the lower
/// `score = latency_estimate × (in_flight + 1) + β × max(0, p99 − p50) + γ × head_age`
/// (all in ns; the window quantiles are cached per backend by [`Strategy::tick`]). Each
/// tick compares the pool's observed p99 (the maximum window p99 over backends serving
/// now) with `target_p99`: over it, β and γ grow ×1.1 (up to 16× their initial values)
/// and hedging is allowed; below 90 % of it, they shrink ÷1.05 (down to ¼) and hedging
/// stops; in between, nothing changes. The source file's module documentation gives the
/// sources and the reasoning.
#[derive(Debug)]
pub struct TailAware {
    /// The p99 target, in ns.
    target_p99_ns: u64,
    /// Initial β (weight of interference), dimensionless.
    beta0: f64,
    /// Initial γ (weight of head-of-line age), dimensionless.
    gamma0: f64,
    /// Whether ticks adapt β and γ.
    adapt: bool,
    /// Current β as `f64` bits.
    beta: AtomicU64,
    /// Current γ as `f64` bits.
    gamma: AtomicU64,
    /// Per backend: cached `max(0, p99 − p50)` of the latency window, in ns.
    interference_ns: Box<[AtomicU64]>,
    /// The pool's observed p99 at the last tick, in ns; 0 when no backend was serving.
    observed_p99_ns: AtomicU64,
    /// Whether the pool is over its target (hedging allowed).
    over_target: AtomicBool,
    /// Picks that returned a backend.
    picks: AtomicU64,
    /// Hedges the forwarder sent.
    hedges_sent: AtomicU64,
    /// Hedges whose answer won.
    hedges_won: AtomicU64,
    /// Tick-side state; never touched by `pick`.
    feedback: Mutex<Feedback>,
}

/// What ticks remember between calls.
#[derive(Debug)]
struct Feedback {
    /// Next backend to refresh.
    cursor: usize,
    /// Per backend, as of its last refresh.
    samples: Vec<Sample>,
    /// When β and γ last changed (or were held), clock ns.
    last_step_ns: Option<u64>,
}

/// One backend's window statistics as of its last refresh.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Window p99 in ns, `None` when the window is empty.
    p99_ns: Option<u64>,
    /// [`crate::LiveBackend::requests`] at the refresh.
    completed: u64,
    /// Whether it completed requests since the refresh before.
    serving: bool,
}

impl TailAware {
    /// The strategy for a pool of `backends` backends with `params`' target p99, initial
    /// β and γ (negative or non-finite values count as 0, which disables the term) and
    /// `adapt` switch.
    pub fn new(backends: &[crate::Backend], params: &StrategyParams) -> Self {
        let gain = |g: f64| if g.is_finite() && g > 0.0 { g } else { 0.0 };
        let (beta0, gamma0) = (gain(params.beta), gain(params.gamma));
        let n = backends.len();
        Self {
            target_p99_ns: duration_ns(params.target_p99),
            beta0,
            gamma0,
            adapt: params.adapt,
            beta: AtomicU64::new(beta0.to_bits()),
            gamma: AtomicU64::new(gamma0.to_bits()),
            interference_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            observed_p99_ns: AtomicU64::new(0),
            over_target: AtomicBool::new(false),
            picks: AtomicU64::new(0),
            hedges_sent: AtomicU64::new(0),
            hedges_won: AtomicU64::new(0),
            feedback: Mutex::new(Feedback {
                cursor: 0,
                samples: vec![Sample::default(); n],
                last_step_ns: None,
            }),
        }
    }

    /// Current weight β of the interference term (dimensionless).
    pub fn beta(&self) -> f64 {
        f64::from_bits(self.beta.load(Ordering::Relaxed))
    }

    /// Current weight γ of the head-of-line age term (dimensionless).
    pub fn gamma(&self) -> f64 {
        f64::from_bits(self.gamma.load(Ordering::Relaxed))
    }

    /// The pool's p99 observed at the last tick, in ns (`None` if no backend was serving).
    pub fn observed_p99_ns(&self) -> Option<u64> {
        Some(self.observed_p99_ns.load(Ordering::Relaxed)).filter(|&p| p > 0)
    }

    /// Expected work ahead of a new request on backend `i` at `now_ns`, in ns.
    #[inline]
    fn work_ns(pool: &PoolView<'_>, i: usize, now_ns: u64) -> f64 {
        let live = &pool.backends()[i].live;
        live.expected_latency_ns(now_ns) * live.in_flight().saturating_add(1) as f64
    }

    /// Cached interference of backend `i`, in ns (0 before its first refresh).
    #[inline]
    fn interference(&self, i: usize) -> u64 {
        self.interference_ns
            .get(i)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// The tail-risk score of backend `i` at `now_ns` with weights `beta` and `gamma`, ns.
    #[inline]
    fn score(&self, pool: &PoolView<'_>, i: usize, now_ns: u64, beta: f64, gamma: f64) -> f64 {
        let live = &pool.backends()[i].live;
        let in_flight = live.in_flight();
        let work = live.expected_latency_ns(now_ns) * in_flight.saturating_add(1) as f64;
        // An idle backend has no head of line: skip the scan of its start-time slots.
        let age = if in_flight == 0 {
            0
        } else {
            live.head_age_ns(now_ns)
        };
        work + beta * self.interference(i) as f64 + gamma * age as f64
    }

    /// Refreshes the window statistics of up to [`REFRESH_PER_TICK`] backends, in
    /// rotation, and returns the pool's observed p99 (see the module documentation).
    fn refresh(&self, fb: &mut Feedback, pool: &PoolView<'_>, now_ns: u64) -> Option<u64> {
        let n = fb.samples.len().min(pool.len());
        for _ in 0..n.min(REFRESH_PER_TICK) {
            let i = fb.cursor % n;
            fb.cursor = (i + 1) % n;
            let live = &pool.backends()[i].live;
            let completed = live.requests();
            let p99 = live.latency_quantile_ns(0.99, now_ns);
            let spread = live
                .recent_latency_p50_p99_ns(now_ns)
                .map_or(0, |(p50, p99)| p99.saturating_sub(p50));
            self.interference_ns[i].store(spread, Ordering::Relaxed);
            let sample = &mut fb.samples[i];
            *sample = Sample {
                p99_ns: p99,
                serving: completed > sample.completed,
                completed,
            };
        }
        fb.samples
            .iter()
            .filter(|s| s.serving)
            .filter_map(|s| s.p99_ns)
            .max()
    }
}

impl Strategy for TailAware {
    fn name(&self) -> &'static str {
        "tail_aware"
    }

    fn pick(&self, req: &RequestInfo, pool: &PoolView<'_>) -> Option<BackendId> {
        let (beta, gamma) = (self.beta(), self.gamma());
        let picked = power_of_two_choices(pool, |i| self.score(pool, i, req.now_ns, beta, gamma))?;
        self.picks.fetch_add(1, Ordering::Relaxed);
        Some(picked)
    }

    fn tick(&self, pool: &PoolView<'_>, now_ns: u64) {
        let mut fb = self.feedback.lock();
        let observed = self.refresh(&mut fb, pool, now_ns);
        self.observed_p99_ns
            .store(observed.unwrap_or(0), Ordering::Relaxed);
        let verdict = Verdict::of(observed, self.target_p99_ns);
        match verdict {
            Verdict::Over => self.over_target.store(true, Ordering::Relaxed),
            Verdict::Under => self.over_target.store(false, Ordering::Relaxed),
            Verdict::InBand => {}
        }
        let min_step_ns = duration_ns(TICK_INTERVAL) / 2;
        let due = fb
            .last_step_ns
            .is_none_or(|last| now_ns.saturating_sub(last) >= min_step_ns);
        if !self.adapt || !due {
            return;
        }
        fb.last_step_ns = Some(now_ns);
        let beta = adjust(self.beta(), self.beta0, verdict);
        let gamma = adjust(self.gamma(), self.gamma0, verdict);
        self.beta.store(beta.to_bits(), Ordering::Relaxed);
        self.gamma.store(gamma.to_bits(), Ordering::Relaxed);
    }

    /// `target_p99_ms`, `current_p99_ms` (0 when no backend is serving), `beta`, `gamma`,
    /// `hedge_rate` (hedges sent per pick), `hedges_sent`, `hedges_won`, and per backend
    /// `work_ewma_ms`, `interference_ms`, `head_age_ms`.
    fn figures(&self, pool: &PoolView<'_>, now_ns: u64) -> Vec<Figure> {
        let picks = self.picks.load(Ordering::Relaxed);
        let sent = self.hedges_sent.load(Ordering::Relaxed);
        let mut figures = vec![
            Figure::pool("target_p99_ms", self.target_p99_ns as f64 / NS_PER_MS),
            Figure::pool(
                "current_p99_ms",
                self.observed_p99_ns.load(Ordering::Relaxed) as f64 / NS_PER_MS,
            ),
            Figure::pool("beta", self.beta()),
            Figure::pool("gamma", self.gamma()),
            Figure::pool(
                "hedge_rate",
                if picks == 0 {
                    0.0
                } else {
                    sent as f64 / picks as f64
                },
            ),
            Figure::pool("hedges_sent", sent as f64),
            Figure::pool("hedges_won", self.hedges_won.load(Ordering::Relaxed) as f64),
        ];
        for i in 0..pool.len() {
            let live = &pool.backends()[i].live;
            figures.extend([
                Figure::backend(
                    "work_ewma_ms",
                    i,
                    Self::work_ns(pool, i, now_ns) / NS_PER_MS,
                ),
                Figure::backend(
                    "interference_ms",
                    i,
                    self.interference(i) as f64 / NS_PER_MS,
                ),
                Figure::backend(
                    "head_age_ms",
                    i,
                    live.head_age_ns(now_ns) as f64 / NS_PER_MS,
                ),
            ]);
        }
        figures
    }

    fn hedge_allowed(&self, _now_ns: u64) -> bool {
        self.over_target.load(Ordering::Relaxed)
    }

    fn note_hedge(&self, won: bool) {
        let counter = if won {
            &self.hedges_won
        } else {
            &self.hedges_sent
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::{Backend, BackendFlags};
    use crate::strategy::testing::backends;
    use proptest::prelude::{prop, prop_assert, proptest};

    const MS: u64 = 1_000_000;

    fn params(target_ms: u64) -> StrategyParams {
        StrategyParams {
            target_p99: Duration::from_millis(target_ms),
            ..StrategyParams::default()
        }
    }

    /// Asserts a window quantile of about `ms` (the histogram's error is ≤ 3.1 %).
    fn assert_ms(ns: Option<u64>, ms: u64) {
        let ns = ns.expect("a quantile") as f64;
        let want = (ms * MS) as f64;
        assert!(
            (ns - want).abs() <= 0.04 * want,
            "{ns} ns, expected about {ms} ms"
        );
    }

    fn pick(s: &TailAware, view: &PoolView<'_>, now_ns: u64) -> usize {
        s.pick(&RequestInfo::new(now_ns), view).expect("eligible").0
    }

    /// Records one response of `latency_ms` on every backend of `b`, finishing at `now`.
    fn respond_all(b: &[Backend], now: u64, latency_ms: u64) {
        for backend in b {
            backend.live.begin(now - latency_ms * MS).success(now);
        }
    }

    /// A closed loop of `requests` requests (each starts when the previous is answered),
    /// backend `i` answering after `latency_ms(i)`; counts per backend.
    fn simulate(
        s: &TailAware,
        b: &[Backend],
        requests: usize,
        latency_ms: impl Fn(usize) -> u64,
    ) -> Vec<usize> {
        let view = PoolView::new(b, &[], false);
        let mut counts = vec![0; b.len()];
        let mut now = 0;
        let mut next_tick = 0;
        for _ in 0..requests {
            if now >= next_tick {
                s.tick(&view, now);
                next_tick = now + duration_ns(TICK_INTERVAL);
            }
            let i = pick(s, &view, now);
            counts[i] += 1;
            let guard = b[i].live.begin(now);
            now += latency_ms(i) * MS;
            guard.success(now);
        }
        counts
    }

    #[test]
    fn stalled_backend_loses_nearly_all_picks() {
        let b = backends(&[1, 1, 1]);
        let s = TailAware::new(&b, &params(200));
        // Backend 0 took a request at t = 0 and never answered.
        let _stalled = b[0].live.begin(0);
        let counts = simulate(&s, &b, 3_000, |i| if i == 0 { 10_000 } else { 10 });
        assert!(counts[0] <= 3, "{counts:?}");
        assert!(counts[1] > 1_200 && counts[2] > 1_200, "{counts:?}");
    }

    #[test]
    fn head_age_alone_outweighs_equal_work() {
        // Same latency and load; backend 0's one request is 2 s old, backend 1's is new.
        let b = backends(&[1, 1]);
        let s = TailAware::new(&b, &params(200));
        let _old = b[0].live.begin(MS);
        let _new = b[1].live.begin(2_000 * MS);
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(pick(&s, &view, 2_001 * MS), 1);
        }
    }

    /// A backend whose first answers have not come back (its estimate still the
    /// optimistic initial one) is priced by the age of what it holds, times its queue,
    /// as `peak_ewma` prices it: it does not draw a pile of requests meanwhile, even with
    /// γ adapted down to a quarter.
    #[test]
    fn a_backend_without_answers_yet_is_priced_by_what_it_holds() {
        let b = backends(&[1, 1]);
        let s = TailAware::new(
            &b,
            &StrategyParams {
                gamma: 0.25,
                ..params(200)
            },
        );
        // Backend 0 answers in 10 ms and holds two requests that just started.
        b[0].live.begin(0).success(10 * MS);
        let now = 1_000 * MS;
        let _busy = [b[0].live.begin(now), b[0].live.begin(now)];
        // Backend 1 just joined: three requests, the oldest 30 ms old, none answered.
        let _held = [
            b[1].live.begin(now - 30 * MS),
            b[1].live.begin(now - 10 * MS),
            b[1].live.begin(now),
        ];
        let view = PoolView::new(&b, &[], false);
        for _ in 0..100 {
            assert_eq!(pick(&s, &view, now), 0);
        }
    }

    #[test]
    fn slow_backend_gets_less_traffic() {
        let b = backends(&[1, 1, 1]);
        let s = TailAware::new(&b, &params(1_000));
        let counts = simulate(&s, &b, 3_000, |i| if i == 0 { 500 } else { 10 });
        assert!(counts[0] < 150, "{counts:?}");
    }

    /// A backend slowed for two seconds, then healthy again: 25 s later its old slow
    /// answers no longer count as a tail, so it competes again (over the whole 60-s
    /// window they kept it out of every pair for a minute, the few requests it still got
    /// unable to dilute them).
    #[test]
    fn a_short_slowdown_is_forgotten_within_the_recent_window() {
        let b = backends(&[1, 1]);
        let mut now = 1_000 * MS;
        // Two seconds of 400 ms answers from backend 0, 20 ms from backend 1.
        for _ in 0..20 {
            b[0].live.begin(now - 400 * MS).success(now);
            b[1].live.begin(now - 20 * MS).success(now);
            now += 100 * MS;
        }
        // Then 23 s in which backend 0 gets one request a second, both at 20 ms.
        for k in 0..230 {
            if k % 10 == 0 {
                b[0].live.begin(now - 20 * MS).success(now);
            }
            b[1].live.begin(now - 20 * MS).success(now);
            now += 100 * MS;
        }
        let view = PoolView::new(&b, &[], false);
        let tail_aware = TailAware::new(&b, &params(200));
        tail_aware.tick(&view, now);
        assert!(
            tail_aware.interference(0) < 5 * MS,
            "{}",
            tail_aware.interference(0)
        );
        // The whole window still holds the slow answers (the SLO feedback reads it).
        assert!(b[0].live.latency_quantile_ns(0.99, now).expect("answers") > 300 * MS);
    }

    #[test]
    fn interference_penalises_a_heavy_tail() {
        // Backend 0's median is 10 ms but 5 of its last 150 responses took 1 s (15 s ago,
        // within the recent part of its window, so its peak EWMA has come down to about
        // 240 ms); backend 1 answers a steady 300 ms.
        let b = backends(&[1, 1]);
        let mut now = 1_000 * MS;
        for k in 0..150 {
            let slow = if k < 5 { 1_000 } else { 10 };
            b[0].live.begin(now - slow * MS).success(now);
            b[1].live.begin(now - 300 * MS).success(now);
            now += 100 * MS;
        }
        let view = PoolView::new(&b, &[], false);
        let tail_aware = TailAware::new(&b, &params(200));
        tail_aware.tick(&view, now);
        assert!(
            tail_aware.interference(0) > 900 * MS,
            "{}",
            tail_aware.interference(0)
        );
        assert!(
            tail_aware.interference(1) < MS,
            "{}",
            tail_aware.interference(1)
        );
        assert!(TailAware::work_ns(&view, 0, now) < TailAware::work_ns(&view, 1, now));
        for _ in 0..100 {
            assert_eq!(
                pick(&tail_aware, &view, now),
                1,
                "the tail outweighs the work"
            );
        }
        // Without the interference term the lower work wins.
        let work_only = TailAware::new(
            &b,
            &StrategyParams {
                beta: 0.0,
                ..params(200)
            },
        );
        work_only.tick(&view, now);
        for _ in 0..100 {
            assert_eq!(pick(&work_only, &view, now), 0);
        }
    }

    #[test]
    fn gains_rise_over_target_and_fall_back_under_it() {
        let b = backends(&[1, 1, 1]);
        let s = TailAware::new(&b, &params(200));
        let view = PoolView::new(&b, &[], false);
        let step = duration_ns(TICK_INTERVAL);
        let mut now = 1_000 * MS;
        assert!(!s.hedge_allowed(now), "no hedging before any evidence");
        for _ in 0..10 {
            respond_all(&b, now, 500);
            s.tick(&view, now);
            now += step;
        }
        let expected = INCREASE_FACTOR.powi(10);
        assert!((s.beta() - expected).abs() < 1e-9, "β = {}", s.beta());
        assert!((s.gamma() - expected).abs() < 1e-9, "γ = {}", s.gamma());
        assert!(s.hedge_allowed(now));
        assert_ms(s.observed_p99_ns(), 500);
        // A long violation saturates at the cap.
        for _ in 0..100 {
            respond_all(&b, now, 500);
            s.tick(&view, now);
            now += step;
        }
        assert_eq!(s.beta(), MAX_GAIN);
        // Once the slow responses have left the 60 s window, fast ones bring β back down.
        now += 61_000 * MS;
        for _ in 0..200 {
            respond_all(&b, now, 20);
            s.tick(&view, now);
            now += step;
        }
        assert!(!s.hedge_allowed(now));
        assert!(s.beta() < 1.0 && s.gamma() < 1.0, "β = {}", s.beta());
        assert!(s.beta() >= MIN_GAIN - 1e-12);
    }

    #[test]
    fn in_band_holds_gains_and_hedging_state() {
        let b = backends(&[1]);
        let s = TailAware::new(&b, &params(200));
        let view = PoolView::new(&b, &[], false);
        let mut now = 1_000 * MS;
        respond_all(&b, now, 300);
        s.tick(&view, now);
        assert!(s.hedge_allowed(now));
        let beta = s.beta();
        // 190 ms is within 10 % below the target: hold. Wait for 300 ms to leave the window.
        now += 61_000 * MS;
        for _ in 0..20 {
            respond_all(&b, now, 190);
            s.tick(&view, now);
            now += duration_ns(TICK_INTERVAL);
        }
        assert_eq!(s.beta(), beta);
        assert!(s.hedge_allowed(now), "hedging stays on inside the band");
    }

    #[test]
    fn controller_is_rate_limited() {
        let b = backends(&[1]);
        let s = TailAware::new(&b, &params(100));
        let view = PoolView::new(&b, &[], false);
        respond_all(&b, 1_000 * MS, 500);
        for k in 0..10 {
            s.tick(&view, 1_000 * MS + k * MS);
        }
        assert!((s.beta() - INCREASE_FACTOR).abs() < 1e-12, "{}", s.beta());
    }

    #[test]
    fn adapt_off_keeps_gains_but_still_tracks_the_slo() {
        let b = backends(&[1]);
        let p = StrategyParams {
            adapt: false,
            beta: 2.0,
            ..params(100)
        };
        let s = TailAware::new(&b, &p);
        let view = PoolView::new(&b, &[], false);
        respond_all(&b, 1_000 * MS, 500);
        s.tick(&view, 1_000 * MS);
        assert_eq!(s.beta(), 2.0);
        assert!(s.hedge_allowed(1_000 * MS));
    }

    #[test]
    fn idle_backend_leaves_the_observed_p99() {
        // Backend 0 was slow once but serves nothing any more: it does not hold the pool
        // over target.
        let b = backends(&[1, 1]);
        let s = TailAware::new(&b, &params(200));
        let view = PoolView::new(&b, &[], false);
        b[0].live.begin(0).success(900 * MS);
        s.tick(&view, 1_000 * MS);
        assert_ms(s.observed_p99_ns(), 900);
        b[1].live.begin(1_000 * MS).success(1_010 * MS);
        s.tick(&view, 1_100 * MS);
        assert_ms(s.observed_p99_ns(), 10);
        assert!(!s.hedge_allowed(1_100 * MS));
    }

    #[test]
    fn hedge_rate_counts_sent_hedges_per_pick() {
        let b = backends(&[1, 1]);
        let s = TailAware::new(&b, &params(200));
        let view = PoolView::new(&b, &[], false);
        for _ in 0..10 {
            pick(&s, &view, 0);
        }
        s.note_hedge(false);
        s.note_hedge(false);
        s.note_hedge(true);
        let figures = s.figures(&view, 0);
        let get = |name: &str| {
            figures
                .iter()
                .find(|f| f.name == name && f.backend.is_none())
                .expect(name)
                .value
        };
        assert!((get("hedge_rate") - 0.2).abs() < 1e-12);
        assert_eq!(get("hedges_won"), 1.0);
        assert_eq!(get("target_p99_ms"), 200.0);
        for name in ["work_ewma_ms", "interference_ms", "head_age_ms"] {
            assert_eq!(
                figures.iter().filter(|f| f.name == name).count(),
                2,
                "{name}"
            );
        }
    }

    #[test]
    fn large_pool_refreshes_in_rotation() {
        let n = REFRESH_PER_TICK * 2 + 5;
        let b = backends(&vec![1; n]);
        let s = TailAware::new(&b, &params(200));
        let view = PoolView::new(&b, &[], false);
        let last = &b[n - 1].live;
        last.begin(0).success(5 * MS);
        last.begin(0).success(500 * MS);
        s.tick(&view, 1_000 * MS);
        assert_eq!(s.interference(n - 1), 0, "not reached by the first tick");
        s.tick(&view, 1_100 * MS);
        s.tick(&view, 1_200 * MS);
        assert!(s.interference(n - 1) > 400 * MS);
    }

    #[test]
    fn only_eligible_backends_are_picked() {
        let b = backends(&[1, 1, 1]);
        let s = TailAware::new(&b, &params(200));
        b[0].live.set_flag(BackendFlags::UNHEALTHY);
        let excluded = [BackendId(2)];
        let view = PoolView::new(&b, &excluded, false);
        for _ in 0..50 {
            assert_eq!(pick(&s, &view, 0), 1);
        }
        let none = [BackendId(1), BackendId(2)];
        assert_eq!(
            s.pick(&RequestInfo::new(0), &PoolView::new(&b, &none, false)),
            None
        );
    }

    #[test]
    fn invalid_gains_count_as_zero() {
        let b = backends(&[1]);
        let p = StrategyParams {
            beta: f64::NAN,
            gamma: -3.0,
            ..params(200)
        };
        let s = TailAware::new(&b, &p);
        assert_eq!((s.beta(), s.gamma()), (0.0, 0.0));
    }

    proptest! {
        /// Whatever the sequence of verdicts, a gain stays within its bounds.
        #[test]
        fn gains_stay_bounded(
            initial in 0.01f64..100.0,
            verdicts in prop::collection::vec(0u8..3, 0..400),
        ) {
            let mut gain = initial;
            for v in verdicts {
                let verdict = match v {
                    0 => Verdict::Over,
                    1 => Verdict::InBand,
                    _ => Verdict::Under,
                };
                gain = adjust(gain, initial, verdict);
                prop_assert!(gain >= initial * MIN_GAIN * (1.0 - 1e-12));
                prop_assert!(gain <= initial * MAX_GAIN * (1.0 + 1e-12));
            }
        }

        /// The verdict is monotone in the observed p99.
        #[test]
        fn verdict_is_monotone(target in 1u64..1_000_000_000, a in 0u64..2_000_000_000, d in 0u64..1_000_000_000) {
            let rank = |v: Verdict| match v {
                Verdict::Under => 0,
                Verdict::InBand => 1,
                Verdict::Over => 2,
            };
            prop_assert!(rank(Verdict::of(Some(a), target)) <= rank(Verdict::of(Some(a + d), target)));
        }
    }
}
