//! Exponentially weighted moving averages of latency.
//!
//! [`PeakEwma`] is the latency estimator behind the `peak_ewma` strategy. It follows
//! Finagle's `PeakEwma` load metric (Twitter, "Finagle: load balancing", 2016) as ported to
//! tower's `PeakEwma` and used by Linkerd:
//!
//! * an observation above the estimate replaces it at once (peak sensitivity: a backend
//!   that turns slow is penalised immediately);
//! * an observation below it blends in with weight `1 - e^(-Δ/τ)`, where `Δ` is the time
//!   since the previous observation and `τ` the decay time, so the average is time-based,
//!   not sample-based, and converges to the true latency whatever the request rate;
//! * between observations the value *read* decays toward zero as `E·e^(-(now-t)/τ)`, so a
//!   backend that receives nothing (because it looked slow) is eventually tried again.
//!
//! Fulcrum adds [`PeakEwma::penalize`] for failed attempts: a backend that fails fast (a
//! quick 503, a refused connection) would otherwise look *faster* than its healthy peers
//! and attract more traffic. A failure is observed as a peak, but never below
//! [`MIN_PENALTY_NS`], so fast failures cannot pull the estimate down. How often a backend
//! fails is priced apart, by its failure ratio (`fulcrum-balance`'s
//! `LiveBackend::latency_estimate_ns`): an earlier version doubled the estimate at every
//! failure, and a backend failing 10 % of its requests sat at the 60-s cap, lost every
//! comparison and overloaded its peers.
//!
//! [`Ewma`] is the plain time-decayed average with the same update rule and packing, for
//! statistics that should report a typical value rather than react to peaks (per-endpoint
//! request durations).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::duration_ns;

/// Smallest estimate a failure leaves: 1 ms, in nanoseconds.
pub const MIN_PENALTY_NS: f64 = 1e6;

/// Timestamps are stored in units of 2^20 ns (≈1.05 ms) in 32 bits, which wraps after
/// ≈52 days; elapsed times are computed with wrapping arithmetic.
const STAMP_SHIFT: u32 = 20;

/// A lock-free peak-sensitive EWMA of latency, shared between threads.
///
/// State is one `AtomicU64`: the estimate as `f32` nanoseconds in the high half and the
/// time of the last observation in the low half. Updates are compare-and-swap loops, so
/// concurrent observations are never lost; reads are a single load.
#[derive(Debug)]
pub struct PeakEwma {
    state: AtomicU64,
    tau_ns: f64,
}

impl PeakEwma {
    /// A new estimator with decay time `decay` (τ; Finagle and Linkerd use 10 s) and
    /// starting estimate `initial` (the latency assumed before any observation), stamped
    /// at `now_ns` (see [`crate::clock::now_ns`]).
    ///
    /// A zero `decay` is treated as 1 ns (the estimate then follows the last observation).
    pub fn new(decay: Duration, initial: Duration, now_ns: u64) -> Self {
        let tau_ns = (duration_ns(decay) as f64).max(1.0);
        Self {
            state: AtomicU64::new(pack(duration_ns(initial) as f32, stamp(now_ns))),
            tau_ns,
        }
    }

    /// The current estimate in nanoseconds: the stored value decayed toward zero for the
    /// time since the last observation.
    #[inline]
    pub fn estimate_ns(&self, now_ns: u64) -> f64 {
        let (value, at) = unpack(self.state.load(Ordering::Relaxed));
        f64::from(value) * self.decay(at, now_ns)
    }

    /// Records a successful request that took `rtt_ns` nanoseconds, finishing at `now_ns`.
    pub fn observe(&self, rtt_ns: u64, now_ns: u64) {
        let rtt = rtt_ns as f64;
        self.update(now_ns, |stored, w| {
            if rtt > stored {
                rtt
            } else {
                stored * w + rtt * (1.0 - w)
            }
        });
    }

    /// Records an attempt abandoned `elapsed_ns` after it was sent, without an answer (a
    /// hedge's loser): a lower bound of its latency (a right-censored observation). It can
    /// only raise the estimate, to `elapsed_ns` when the current estimate is below it;
    /// otherwise nothing is learnt and the estimate stays.
    pub fn observe_at_least(&self, elapsed_ns: u64, now_ns: u64) {
        let elapsed = elapsed_ns as f64;
        self.update(now_ns, |stored, w| (stored * w).max(elapsed));
    }

    /// Records a failed attempt that took `rtt_ns` nanoseconds, finishing at `now_ns`: a
    /// peak that fast failures cannot pull down — the estimate becomes
    /// `max(current estimate, rtt, MIN_PENALTY_NS)`.
    pub fn penalize(&self, rtt_ns: u64, now_ns: u64) {
        let rtt = rtt_ns as f64;
        self.update(now_ns, |stored, w| {
            (stored * w).max(rtt).max(MIN_PENALTY_NS)
        });
    }

    /// Applies `next(stored, w)` atomically (see [`cas_update`]).
    fn update(&self, now_ns: u64, next: impl Fn(f64, f64) -> f64) {
        cas_update(&self.state, self.tau_ns, now_ns, |stored, w| {
            next(f64::from(stored), w).max(0.0) as f32
        });
    }

    /// `e^(-Δ/τ)` for the time Δ from stamp `at` to `now_ns` (see [`decay_weight`]).
    #[inline]
    fn decay(&self, at: u32, now_ns: u64) -> f64 {
        decay_weight(self.tau_ns, at, now_ns)
    }
}

/// A lock-free, time-decayed exponentially weighted moving average, shared between
/// threads: the plain counterpart of [`PeakEwma`] (same packing, same time-based weight),
/// without peak sensitivity and without decay toward zero between observations.
///
/// An observation `x` made `Δ` after the previous one updates the average `E` to
/// `E·w + x·(1 − w)` with `w = e^(-Δ/τ)` (the time-weighted EWMA of Finagle/tower, as in
/// [`PeakEwma`]); the first observation sets it. Time is stamped with ≈1 ms resolution,
/// so observations arriving within the same millisecond as the previous update carry no
/// weight: above ~1000 observations per second the average is effectively a random sample
/// of one observation per millisecond, ample for a decay time of seconds.
///
/// Used for the per-endpoint duration average ([`crate::endpoint::EndpointStats`]).
#[derive(Debug)]
pub struct Ewma {
    state: AtomicU64,
    tau_ns: f64,
}

impl Ewma {
    /// An empty average with decay time `decay` (τ; a zero `decay` is treated as 1 ns,
    /// i.e. the average follows the last observation).
    pub fn new(decay: Duration) -> Self {
        Self {
            state: AtomicU64::new(pack(f32::NAN, 0)),
            tau_ns: (duration_ns(decay) as f64).max(1.0),
        }
    }

    /// Records an observation of `value_ns` nanoseconds made at `now_ns`.
    pub fn observe(&self, value_ns: u64, now_ns: u64) {
        let x = value_ns as f64;
        cas_update(&self.state, self.tau_ns, now_ns, |stored, w| {
            if stored.is_nan() {
                x as f32
            } else {
                (f64::from(stored) * w + x * (1.0 - w)) as f32
            }
        });
    }

    /// The average in nanoseconds, or `None` before the first observation. One load.
    #[inline]
    pub fn value_ns(&self) -> Option<f64> {
        let (value, _) = unpack(self.state.load(Ordering::Relaxed));
        (!value.is_nan()).then_some(f64::from(value))
    }
}

/// Replaces the value packed in `state` by `next(stored, w)`, where `w = e^(-Δ/τ)` for the
/// time `Δ` since the stamped update, and stamps it with `now_ns`; a compare-and-swap
/// loop, so concurrent updates are never lost.
fn cas_update(state: &AtomicU64, tau_ns: f64, now_ns: u64, next: impl Fn(f32, f64) -> f32) {
    let now = stamp(now_ns);
    let mut current = state.load(Ordering::Relaxed);
    loop {
        let (value, at) = unpack(current);
        let updated = next(value, decay_weight(tau_ns, at, now_ns));
        // A caller whose clock read is older than the last update (it read the clock
        // before another thread recorded) must not move the stamp backwards.
        let stamp_after = if elapsed_stamps(at, now) > 0 { now } else { at };
        match state.compare_exchange_weak(
            current,
            pack(updated, stamp_after),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

/// `e^(-Δ/τ)` for the time Δ from stamp `at` to `now_ns`; 1 when `now_ns` is not after
/// `at` (concurrent callers read the clock at slightly different times).
#[inline]
fn decay_weight(tau_ns: f64, at: u32, now_ns: u64) -> f64 {
    let elapsed = elapsed_stamps(at, stamp(now_ns));
    if elapsed <= 0 {
        return 1.0;
    }
    let elapsed_ns = (elapsed as u64) << STAMP_SHIFT;
    (-(elapsed_ns as f64) / tau_ns).exp()
}

/// Stamps from `from` to `to`, signed: the 32-bit stamps wrap, and a difference of more
/// than half the range (≈26 days) is read as negative, i.e. `to` before `from`.
#[inline]
fn elapsed_stamps(from: u32, to: u32) -> i32 {
    to.wrapping_sub(from) as i32
}

#[inline]
fn stamp(now_ns: u64) -> u32 {
    // Truncation is the point: the stamp wraps, and differences use wrapping_sub.
    (now_ns >> STAMP_SHIFT) as u32
}

#[inline]
fn pack(value: f32, at: u32) -> u64 {
    (u64::from(value.to_bits()) << 32) | u64::from(at)
}

#[inline]
fn unpack(state: u64) -> (f32, u32) {
    (f32::from_bits((state >> 32) as u32), state as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const TAU: Duration = Duration::from_secs(10);

    fn ewma(initial_ms: u64) -> PeakEwma {
        PeakEwma::new(TAU, Duration::from_millis(initial_ms), 0)
    }

    #[test]
    fn a_censored_sample_only_raises_the_estimate() {
        let e = ewma(5);
        // Abandoned after 50 ms: the latency is at least that, above the estimate.
        e.observe_at_least(50 * MS, 0);
        assert!((e.estimate_ns(0) - (50 * MS) as f64).abs() < 1e3);
        // Abandoned after 10 ms: says nothing new, the estimate stays.
        e.observe_at_least(10 * MS, 0);
        assert!((e.estimate_ns(0) - (50 * MS) as f64).abs() < 1e3);
    }

    #[test]
    fn starts_at_initial_estimate() {
        let e = ewma(30);
        assert!((e.estimate_ns(0) - 30.0 * MS as f64).abs() < 1.0);
    }

    #[test]
    fn peak_replaces_lower_estimate_immediately() {
        let e = ewma(10);
        e.observe(500 * MS, MS);
        let est = e.estimate_ns(MS);
        assert!(est > 499.0 * MS as f64, "estimate {est}");
    }

    #[test]
    fn lower_observations_converge_to_true_latency() {
        let e = ewma(1000);
        let mut now = 0;
        // 200 s = 20 τ: the initial 1 s has decayed to nothing.
        for _ in 0..10_000 {
            now += 20 * MS;
            e.observe(10 * MS, now);
        }
        let est = e.estimate_ns(now) / MS as f64;
        assert!((est - 10.0).abs() < 0.5, "estimate {est} ms");
    }

    #[test]
    fn idle_estimate_decays_toward_zero() {
        let e = ewma(100);
        e.observe(100 * MS, 0);
        let later = e.estimate_ns(30_000 * MS);
        // e^-3 ≈ 0.05
        assert!(later < 6.0 * MS as f64, "later {later}");
        assert!(later > 4.0 * MS as f64, "later {later}");
    }

    #[test]
    fn fast_failures_do_not_lower_the_estimate() {
        let e = ewma(1);
        e.observe(10 * MS, 0);
        for i in 1..=6 {
            e.penalize(MS / 10, i * MS);
            let est = e.estimate_ns(i * MS);
            assert!((9.9 * MS as f64..=10.0 * MS as f64).contains(&est), "{est}");
        }
        // An idle estimate decayed below the floor is raised to it.
        let e = ewma(1);
        e.penalize(MS / 10, 0);
        assert!(e.estimate_ns(0) >= MIN_PENALTY_NS * 0.999);
        // A slow failure is a peak.
        e.penalize(500 * MS, 0);
        assert!(e.estimate_ns(0) >= 499.0 * MS as f64);
    }

    #[test]
    fn reads_and_updates_with_an_older_clock_do_not_decay() {
        let e = ewma(1);
        e.observe(500 * MS, 1_000 * MS);
        // A reader whose clock was read 5 ms before the update sees no decay, not zero.
        let est = e.estimate_ns(995 * MS);
        assert!(est > 499.0 * MS as f64, "estimate {est}");
        // A penalty recorded out of order keeps the peak.
        e.penalize(MS, 990 * MS);
        assert!(e.estimate_ns(1_000 * MS) > 499.0 * MS as f64);
        // And the stamp did not move backwards: decay is measured from the newest update.
        let later = e.estimate_ns(11_000 * MS);
        let expected = 500.0 * MS as f64 * (-1.0f64).exp();
        assert!(
            (later - expected).abs() / expected < 0.01,
            "later {later} expected {expected}"
        );
    }

    #[test]
    fn repeated_failures_do_not_compound() {
        let e = ewma(1);
        for i in 0..100 {
            e.penalize(MS, i);
        }
        assert!(e.estimate_ns(100) <= MIN_PENALTY_NS * 1.001);
    }

    #[test]
    fn concurrent_observations_are_not_lost() {
        use std::sync::Arc;
        let e = Arc::new(ewma(1));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        e.observe(5 * MS, i * MS);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("observer thread panicked");
        }
        e.observe(800 * MS, 10_000 * MS);
        assert!(e.estimate_ns(10_000 * MS) > 799.0 * MS as f64);
    }

    #[test]
    fn plain_ewma_starts_empty_then_takes_first_value() {
        let e = Ewma::new(TAU);
        assert_eq!(e.value_ns(), None);
        e.observe(40 * MS, 5 * MS);
        let v = e.value_ns().expect("observed");
        assert!((v - 40.0 * MS as f64).abs() < 1.0, "value {v}");
    }

    #[test]
    fn plain_ewma_is_time_weighted_and_not_peak_sensitive() {
        let e = Ewma::new(TAU);
        e.observe(10 * MS, 0);
        // One τ later a 110 ms observation gets weight 1 - e^-1 ≈ 0.632.
        e.observe(110 * MS, 10_000 * MS);
        let v = e.value_ns().expect("observed") / MS as f64;
        let expected = 10.0 + 100.0 * (1.0 - (-1.0f64).exp());
        assert!((v - expected).abs() < 0.5, "value {v} expected {expected}");
        // Reading does not decay it.
        assert_eq!(e.value_ns(), e.value_ns());
    }

    #[test]
    fn plain_ewma_converges() {
        let e = Ewma::new(TAU);
        e.observe(1_000 * MS, 0);
        let mut now = 0;
        for _ in 0..10_000 {
            now += 20 * MS;
            e.observe(10 * MS, now);
        }
        let v = e.value_ns().expect("observed") / MS as f64;
        assert!((v - 10.0).abs() < 0.5, "value {v} ms");
    }

    proptest! {
        #[test]
        fn plain_ewma_stays_within_observed_range(
            obs in proptest::collection::vec((1u64..5_000, 0u64..10_000), 1..200)
        ) {
            let e = Ewma::new(TAU);
            let mut now = 0u64;
            let (mut lo, mut hi) = (f64::MAX, 0.0f64);
            for (v_ms, gap_ms) in obs {
                now += gap_ms * MS;
                e.observe(v_ms * MS, now);
                lo = lo.min(v_ms as f64);
                hi = hi.max(v_ms as f64);
                let v = e.value_ns().expect("observed") / MS as f64;
                prop_assert!(v >= lo * 0.9999 && v <= hi * 1.0001, "{} not in {}..{}", v, lo, hi);
            }
        }

        #[test]
        fn estimate_stays_within_observed_range(
            obs in proptest::collection::vec((1u64..5_000, 1u64..10_000), 1..200)
        ) {
            let e = PeakEwma::new(TAU, Duration::from_millis(1), 0);
            let mut now = 0u64;
            let mut max = 1.0f64;
            for (rtt_ms, gap_ms) in obs {
                now += gap_ms * MS;
                e.observe(rtt_ms * MS, now);
                max = max.max(rtt_ms as f64);
                let est = e.estimate_ns(now) / MS as f64;
                prop_assert!(est >= 0.0);
                prop_assert!(est <= max * 1.0001, "est {} > max {}", est, max);
            }
        }
    }
}
