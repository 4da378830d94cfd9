//! Dynamic weight adjustment: per-backend factors that multiply the configured weights, so
//! a backend that answers slowly or fails often gets a smaller share of the traffic
//! (Fulcrum design seed 001, "dynamic load adjustment").
//!
//! A pool's background task calls [`DynamicWeights::update`] on a fixed interval (e.g.
//! every second) with each backend's cumulative counters, the latency average of its
//! successful attempts and the age of its oldest request in flight; the strategies read
//! the resulting factors. The rule is a feedback loop in the spirit of Envoy's
//! least-request weights and NGINX Plus' slow-start/`least_time`: scores relative to the
//! pool median rather than absolute thresholds, so it is independent of the pool's latency
//! scale, and a smoothed step so one noisy interval cannot swing traffic.

/// Share of the smoothing step used for backends without traffic in an interval (nothing
/// completed, nothing in flight): they drift back toward 1 at a quarter of the normal
/// speed, so a backend that was starved because it looked bad is eventually tried again.
pub const IDLE_RECOVERY: f64 = 0.25;

/// Settings of [`DynamicWeights`]; `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicWeightConfig {
    /// Share (ratio 0..1) of the distance to the target a factor moves per update
    /// (default 0.3); also the smoothing of the per-interval error rate. Clamped to 0..=1;
    /// NaN reads as the default.
    pub smoothing: f64,
    /// Smallest factor (default 0.1); clamped to at least 10⁻⁶.
    pub min_factor: f64,
    /// Largest factor (default 10.0); raised to `min_factor` if below it.
    pub max_factor: f64,
    /// Exponent of the latency score (default 1.0); negative or NaN reads as 0 (latency
    /// ignored).
    pub latency_exponent: f64,
    /// Exponent of the success-rate score (default 2.0); negative or NaN reads as 0
    /// (errors ignored).
    pub error_exponent: f64,
}

impl Default for DynamicWeightConfig {
    /// smoothing 0.3, factors within 0.1..=10, latency exponent 1, error exponent 2.
    fn default() -> Self {
        Self {
            smoothing: 0.3,
            min_factor: 0.1,
            max_factor: 10.0,
            latency_exponent: 1.0,
            error_exponent: 2.0,
        }
    }
}

/// One backend's input to an update: cumulative counters (monotonic; a decrease is read
/// as a counter reset), its latency average and the age of its oldest request in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendSignal {
    /// Requests completed since the backend was created.
    pub requests_total: u64,
    /// Of those, failed requests.
    pub failures_total: u64,
    /// Latency average in nanoseconds, of successful requests and without any failure
    /// penalty (errors are the error term's job; a penalised estimate here would count
    /// them twice); 0 or non-finite means unknown.
    pub latency_ewma_ns: f64,
    /// Age in nanoseconds of the backend's oldest request in flight now, 0 when none: a
    /// lower bound of its current latency (a right-censored observation), so a backend
    /// that stopped answering is seen before any of its requests completes.
    pub in_flight_age_ns: u64,
}

/// The dynamic weight controller of one pool. Owned by one task (`&mut self`).
///
/// Each [`update`](DynamicWeights::update), for every backend `i` that completed requests
/// in the interval since the previous update or has one in flight ("active"):
///
/// ```text
/// eᵢ  ← eᵢ + s·(failuresᵢ/requestsᵢ − eᵢ)                  (smoothed error rate; only
///                                                           if requests completed)
/// Lᵢ  = max(latencyᵢ, ageᵢ)                                 (latency input)
/// tᵢ  = (L̃ / Lᵢ)^p · (1 − eᵢ)^q                             (raw target)
/// tᵢ  ← clamp(tᵢ / mean_active(t), min_factor, max_factor)  (mean target 1)
/// fᵢ  ← clamp(fᵢ + s·(tᵢ − fᵢ), min_factor, max_factor)     (smoothed step)
/// ```
///
/// where `latencyᵢ` is the backend's latency average ([`BackendSignal::latency_ewma_ns`],
/// unpenalised), `ageᵢ` the age of its oldest request in flight, `L̃` the median of `Lᵢ`
/// over the active backends with a known latency, `p = latency_exponent`,
/// `q = error_exponent` and `s = smoothing`. A backend twice as slow as the median gets
/// half the target of a median one (with `p = 1`); one failing 50 % of its requests a
/// quarter and one failing 10 % `0.9² = 0.81` (with `q = 2`), relative to a healthy
/// backend of median latency. Errors enter only through `eᵢ`. A backend with unknown
/// latency counts as the median, or as its in-flight age when that is larger:
/// `(L̃ / max(L̃, ageᵢ))^p`. If no active backend has a known latency, every latency
/// score is 1; if every active target is 0 (all failing), all targets are 1, as nothing
/// distinguishes them.
///
/// Counting the in-flight age (as the `peak_ewma` strategy does, and NGINX Plus's
/// `least_time … inflight`) is what makes a stalled backend visible: its requests never
/// complete, so without it the backend would look idle and drift back toward 1.
///
/// A backend with nothing completed and nothing in flight in the interval keeps its error
/// rate and moves toward 1: `fᵢ ← fᵢ + s·IDLE_RECOVERY·(1 − fᵢ)`. When the number of
/// backends changes, the state is reset and every factor is set to 1 (the first interval
/// only records the counters).
#[derive(Clone, Debug)]
pub struct DynamicWeights {
    config: DynamicWeightConfig,
    /// `(requests_total, failures_total)` at the previous update.
    previous: Vec<(u64, u64)>,
    error_rates: Vec<f64>,
}

impl DynamicWeights {
    /// A controller with no history. Never fails: out-of-range settings are clamped as
    /// documented on [`DynamicWeightConfig`].
    pub fn new(config: DynamicWeightConfig) -> Self {
        let default = DynamicWeightConfig::default();
        let min_factor = if config.min_factor.is_nan() {
            default.min_factor
        } else {
            config.min_factor.max(1e-6)
        };
        let max_factor = if config.max_factor.is_nan() {
            default.max_factor
        } else {
            config.max_factor.max(min_factor)
        };
        let non_negative = |x: f64| if x.is_nan() { 0.0 } else { x.max(0.0) };
        Self {
            config: DynamicWeightConfig {
                smoothing: if config.smoothing.is_nan() {
                    default.smoothing
                } else {
                    config.smoothing.clamp(0.0, 1.0)
                },
                min_factor,
                max_factor,
                latency_exponent: non_negative(config.latency_exponent),
                error_exponent: non_negative(config.error_exponent),
            },
            previous: Vec::new(),
            error_rates: Vec::new(),
        }
    }

    /// The settings in effect (after clamping).
    pub fn config(&self) -> &DynamicWeightConfig {
        &self.config
    }

    /// The smoothed error rate (ratio 0..1) of each backend, in the order of the last
    /// update.
    pub fn error_rates(&self) -> &[f64] {
        &self.error_rates
    }

    /// Moves each factor in `factors` one step toward its target from `signals` (see the
    /// type docs for the formula). `factors[i]` belongs to `signals[i]`; the caller keeps
    /// the factors between calls (start them at 1). Non-finite factors are reset to 1.
    /// Every factor is within `min_factor..=max_factor` afterwards.
    ///
    /// `signals` and `factors` must have the same length; if they differ (a caller bug,
    /// asserted in debug builds) only the common prefix is updated.
    pub fn update(&mut self, signals: &[BackendSignal], factors: &mut [f64]) {
        debug_assert_eq!(signals.len(), factors.len(), "one factor per backend");
        let n = signals.len().min(factors.len());
        let (signals, factors) = (&signals[..n], &mut factors[..n]);
        let c = &self.config;
        if self.previous.len() != n {
            self.previous = signals
                .iter()
                .map(|s| (s.requests_total, s.failures_total))
                .collect();
            self.error_rates = vec![0.0; n];
            factors.fill(1.0);
            return;
        }

        let mut active = vec![false; n];
        for (i, s) in signals.iter().enumerate() {
            let (prev_requests, prev_failures) = self.previous[i];
            let requests = s.requests_total.saturating_sub(prev_requests);
            let failures = s.failures_total.saturating_sub(prev_failures).min(requests);
            self.previous[i] = (s.requests_total, s.failures_total);
            if requests > 0 {
                let rate = failures as f64 / requests as f64;
                self.error_rates[i] += c.smoothing * (rate - self.error_rates[i]);
            }
            active[i] = requests > 0 || s.in_flight_age_ns > 0;
        }

        let mut latencies: Vec<f64> = signals
            .iter()
            .zip(&active)
            .filter(|&(s, &a)| a && known_latency(s.latency_ewma_ns))
            .map(|(s, _)| latency_input(s))
            .collect();
        let median_latency = median(&mut latencies);

        let mut targets: Vec<f64> = signals
            .iter()
            .zip(&self.error_rates)
            .map(|(s, &e)| {
                let latency = if known_latency(s.latency_ewma_ns) {
                    latency_input(s)
                } else {
                    median_latency.map_or(0.0, |m| m.max(s.in_flight_age_ns as f64))
                };
                let latency_score = match median_latency {
                    Some(m) if known_latency(latency) => (m / latency).powf(c.latency_exponent),
                    _ => 1.0,
                };
                latency_score * (1.0 - e).clamp(0.0, 1.0).powf(c.error_exponent)
            })
            .collect();
        let (sum, count) = targets
            .iter()
            .zip(&active)
            .filter(|&(_, &a)| a)
            .fold((0.0, 0usize), |(sum, count), (&t, _)| (sum + t, count + 1));
        let mean = sum / count.max(1) as f64;
        for t in &mut targets {
            let normalised = if mean > 0.0 && mean.is_finite() {
                *t / mean
            } else {
                1.0
            };
            *t = clamp_finite(normalised, c.min_factor, c.max_factor);
        }

        for i in 0..n {
            let f = if factors[i].is_finite() {
                factors[i]
            } else {
                1.0
            };
            let (target, rate) = if active[i] {
                (targets[i], c.smoothing)
            } else {
                (1.0, c.smoothing * IDLE_RECOVERY)
            };
            factors[i] = clamp_finite(f + rate * (target - f), c.min_factor, c.max_factor);
        }
    }
}

fn known_latency(ns: f64) -> bool {
    ns.is_finite() && ns > 0.0
}

/// `Lᵢ = max(latencyᵢ, ageᵢ)` of a backend with a known latency average.
fn latency_input(s: &BackendSignal) -> f64 {
    s.latency_ewma_ns.max(s.in_flight_age_ns as f64)
}

/// `x` clamped to `lo..=hi`; NaN reads as 1 (then clamped).
fn clamp_finite(x: f64, lo: f64, hi: f64) -> f64 {
    if x.is_nan() {
        1.0f64.clamp(lo, hi)
    } else {
        x.clamp(lo, hi)
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: f64 = 1e6;

    /// Runs `rounds` updates where backend `i` serves 100 requests per interval with
    /// latency `latency_ms[i]` and failure share `fail[i]`.
    fn run(latency_ms: &[f64], fail: &[f64], rounds: usize) -> (DynamicWeights, Vec<f64>) {
        let mut w = DynamicWeights::new(DynamicWeightConfig::default());
        let mut signals: Vec<BackendSignal> = latency_ms
            .iter()
            .map(|&l| BackendSignal {
                latency_ewma_ns: l * MS,
                ..BackendSignal::default()
            })
            .collect();
        let mut factors = vec![1.0; signals.len()];
        for _ in 0..rounds {
            for (s, &f) in signals.iter_mut().zip(fail) {
                s.requests_total += 100;
                s.failures_total += (100.0 * f) as u64;
            }
            w.update(&signals, &mut factors);
        }
        (w, factors)
    }

    #[test]
    fn equal_backends_stay_at_one() {
        let (_, f) = run(&[10.0; 4], &[0.0; 4], 50);
        for x in f {
            assert!((x - 1.0).abs() < 1e-12, "{x}");
        }
    }

    #[test]
    fn slow_backend_drops_and_converges() {
        let (_, f) = run(&[10.0, 10.0, 30.0], &[0.0; 3], 60);
        // Targets: 1, 1, 1/3, normalised by their mean 7/9.
        let fast = 9.0 / 7.0;
        let slow = 3.0 / 7.0;
        assert!(
            (f[0] - fast).abs() < 1e-6 && (f[1] - fast).abs() < 1e-6,
            "{f:?}"
        );
        assert!((f[2] - slow).abs() < 1e-6, "{f:?}");
    }

    #[test]
    fn error_heavy_backend_drops() {
        let (w, f) = run(&[10.0; 3], &[0.0, 0.0, 0.5], 80);
        assert!((w.error_rates()[2] - 0.5).abs() < 1e-6);
        // Targets 1, 1, (1 − 0.5)² = 0.25, normalised by their mean 0.75.
        assert!((f[0] - 4.0 / 3.0).abs() < 1e-4, "{f:?}");
        assert!((f[2] - 1.0 / 3.0).abs() < 1e-4, "{f:?}");
        // A backend failing everything sits at the floor.
        let (_, f) = run(&[10.0; 3], &[0.0, 0.0, 1.0], 80);
        assert!((f[2] - 0.1).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn first_update_and_size_change_reset_to_one() {
        let mut w = DynamicWeights::new(DynamicWeightConfig::default());
        let s = BackendSignal {
            requests_total: 10,
            failures_total: 10,
            latency_ewma_ns: MS,
            in_flight_age_ns: 0,
        };
        let mut f = vec![0.5, 7.0];
        w.update(&[s, s], &mut f);
        assert_eq!(f, [1.0, 1.0]);
        let mut f = vec![0.5, 7.0, 3.0];
        w.update(&[s, s, s], &mut f);
        assert_eq!(f, [1.0, 1.0, 1.0]);
    }

    #[test]
    fn idle_backend_drifts_back_toward_one() {
        let mut w = DynamicWeights::new(DynamicWeightConfig::default());
        let busy = |n: u64| BackendSignal {
            requests_total: n,
            latency_ewma_ns: MS,
            ..BackendSignal::default()
        };
        let idle = BackendSignal {
            requests_total: 5,
            latency_ewma_ns: 100.0 * MS,
            ..BackendSignal::default()
        };
        let mut f = vec![1.0, 0.2];
        w.update(&[busy(0), idle], &mut f);
        f[1] = 0.2;
        let mut previous = f[1];
        for round in 1..=40 {
            w.update(&[busy(round * 100), idle], &mut f);
            assert!(f[1] > previous && f[1] < 1.0, "round {round}: {f:?}");
            previous = f[1];
        }
        assert!(f[1] > 0.9, "{f:?}");
        // Slower than an active backend would: one step covers s/4 = 7.5 % of the gap.
        let mut f2 = vec![1.0, 0.2];
        w.update(&[busy(4_100), idle], &mut f2);
        assert!((f2[1] - (0.2 + 0.075 * 0.8)).abs() < 1e-12, "{f2:?}");
    }

    #[test]
    fn counter_resets_and_bad_inputs_are_tolerated() {
        let mut w = DynamicWeights::new(DynamicWeightConfig::default());
        let mut f = vec![1.0, 1.0];
        let sig = |r, fl, l| BackendSignal {
            requests_total: r,
            failures_total: fl,
            latency_ewma_ns: l,
            in_flight_age_ns: 0,
        };
        w.update(&[sig(100, 0, MS), sig(100, 0, MS)], &mut f);
        f[0] = f64::NAN;
        w.update(
            &[sig(50, 90, f64::NAN), sig(200, 500, f64::INFINITY)],
            &mut f,
        );
        for x in &f {
            assert!(x.is_finite() && (0.1..=10.0).contains(x), "{f:?}");
        }
    }

    #[test]
    fn stalled_backend_with_requests_in_flight_falls_below_the_healthy_ones() {
        let mut w = DynamicWeights::new(DynamicWeightConfig {
            smoothing: 0.5,
            ..DynamicWeightConfig::default()
        });
        let sig = |requests, age_ms: u64| BackendSignal {
            requests_total: requests,
            latency_ewma_ns: 5.0 * MS,
            in_flight_age_ns: age_ms * 1_000_000,
            ..BackendSignal::default()
        };
        let mut f = vec![1.0; 3];
        w.update(&[sig(0, 0), sig(0, 0), sig(0, 0)], &mut f);
        // Backend 2 completes nothing more; its oldest request in flight ages 1 s a round
        // (then stays at the clients' 3-s timeout).
        for round in 1..=8u64 {
            let age = (round * 1_000).min(3_000);
            w.update(
                &[sig(round * 30, 2), sig(round * 30, 4), sig(0, age)],
                &mut f,
            );
            assert!(f[2] < f[0] && f[2] < f[1], "round {round}: {f:?}");
        }
        assert!((f[2] - 0.1).abs() < 0.01, "at the floor: {f:?}");
        // Once nothing is in flight any more it is idle and drifts back up.
        let before = f[2];
        w.update(&[sig(270, 0), sig(270, 0), sig(0, 0)], &mut f);
        assert!(f[2] > before, "{f:?}");
    }

    #[test]
    fn unknown_latency_counts_as_the_median_or_its_in_flight_age() {
        let mut w = DynamicWeights::new(DynamicWeightConfig {
            smoothing: 1.0,
            ..DynamicWeightConfig::default()
        });
        let sig = |requests, latency_ms: f64, age_ms: u64| BackendSignal {
            requests_total: requests,
            latency_ewma_ns: latency_ms * MS,
            in_flight_age_ns: age_ms * 1_000_000,
            ..BackendSignal::default()
        };
        let mut f = vec![1.0; 3];
        w.update(&[sig(0, 10.0, 0); 3], &mut f);
        // A young request on a backend without a latency average yet proves nothing:
        // it counts as the median, not as a 1-ms backend.
        w.update(
            &[sig(10, 10.0, 0), sig(10, 10.0, 0), sig(0, 0.0, 1)],
            &mut f,
        );
        assert!(f.iter().all(|&x| (x - 1.0).abs() < 1e-12), "{f:?}");
        // One waiting 40 ms, four times the median, counts as 40 ms: targets 1, 1, 1/4.
        w.update(
            &[sig(20, 10.0, 0), sig(20, 10.0, 0), sig(0, 0.0, 40)],
            &mut f,
        );
        assert!((f[2] - 0.25 / 0.75).abs() < 1e-9, "{f:?}");
    }

    fn signal() -> impl Strategy<Value = (u64, u64, f64, u64)> {
        (
            0u64..1_000,
            0u64..1_000,
            prop_oneof![Just(0.0), 1e3f64..1e10],
            prop_oneof![Just(0u64), 1u64..100_000_000_000],
        )
    }

    proptest! {
        #[test]
        fn factors_stay_in_bounds(
            config in (0.0f64..=1.0, 0.01f64..1.0, 1.0f64..20.0, 0.0f64..3.0, 0.0f64..3.0),
            rounds in proptest::collection::vec(proptest::collection::vec(signal(), 3), 1..30),
        ) {
            let (smoothing, min_factor, max_factor, latency_exponent, error_exponent) = config;
            let mut w = DynamicWeights::new(DynamicWeightConfig {
                smoothing, min_factor, max_factor, latency_exponent, error_exponent,
            });
            let mut totals = [(0u64, 0u64); 3];
            let mut factors = vec![1.0; 3];
            for round in rounds {
                let signals: Vec<BackendSignal> = round
                    .iter()
                    .zip(totals.iter_mut())
                    .map(|(&(req, fail, latency, age), total)| {
                        total.0 += req;
                        total.1 += fail.min(req);
                        BackendSignal {
                            requests_total: total.0,
                            failures_total: total.1,
                            latency_ewma_ns: latency,
                            in_flight_age_ns: age,
                        }
                    })
                    .collect();
                w.update(&signals, &mut factors);
                for &f in &factors {
                    prop_assert!(f.is_finite());
                    prop_assert!(f >= min_factor - 1e-12 && f <= max_factor + 1e-12, "{}", f);
                }
            }
        }
    }
}
