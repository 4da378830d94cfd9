//! One-step-ahead forecasting of a per-second series: Holt's linear (double exponential)
//! smoothing and the simple moving average.
//!
//! Holt's method (C. C. Holt, "Forecasting seasonals and trends by exponentially weighted
//! moving averages", ONR memorandum 52, 1957) tracks a level `ℓ` and a trend `b`:
//!
//! ```text
//! ℓₜ = α·xₜ + (1 − α)·(ℓₜ₋₁ + bₜ₋₁)
//! bₜ = β·(ℓₜ − ℓₜ₋₁) + (1 − β)·bₜ₋₁
//! x̂ₜ₊₁ = ℓₜ + bₜ
//! ```
//!
//! initialised with `ℓ₁ = x₁`, `b₁ = 0`. Unlike a moving average it follows a ramp without
//! lag, which is what lets [`crate::anomaly::RateAnalyzer`] tell a growing load from a
//! spike.

/// Holt's linear exponential smoothing (Holt 1957) of a series, one observation at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    state: Option<(f64, f64)>,
}

impl Holt {
    /// An empty smoother with level weight `alpha` and trend weight `beta`, both ratios
    /// clamped to 0.001..=1 (NaN reads as 1: follow the data).
    pub fn new(alpha: f64, beta: f64) -> Self {
        Self {
            alpha: unit(alpha),
            beta: unit(beta),
            state: None,
        }
    }

    /// Feeds the next observation `x` (non-finite values are ignored).
    pub fn update(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.state = Some(match self.state {
            None => (x, 0.0),
            Some((level, trend)) => {
                let next = self.alpha * x + (1.0 - self.alpha) * (level + trend);
                (next, self.beta * (next - level) + (1.0 - self.beta) * trend)
            }
        });
    }

    /// Restarts the smoother at `level` with `trend` (units of the series per step), as if
    /// its state had just been estimated; non-finite values are ignored. For a level
    /// shift, which the smoothing alone would absorb only over many steps.
    pub fn restart(&mut self, level: f64, trend: f64) {
        if level.is_finite() && trend.is_finite() {
            self.state = Some((level, trend));
        }
    }

    /// The forecast for the next observation, `ℓ + b`; `None` before the first one.
    pub fn forecast(&self) -> Option<f64> {
        self.state.map(|(level, trend)| level + trend)
    }

    /// The smoothed level `ℓ`; `None` before the first observation.
    pub fn level(&self) -> Option<f64> {
        self.state.map(|(level, _)| level)
    }

    /// The smoothed trend `b`, in units of the series per step; `None` before the first
    /// observation.
    pub fn trend(&self) -> Option<f64> {
        self.state.map(|(_, trend)| trend)
    }
}

/// Mean of the last `n` values of `series` (fewer if it is shorter); `None` when `series`
/// is empty or `n` is 0.
pub fn simple_moving_average(
    series: impl DoubleEndedIterator<Item = f64>,
    n: usize,
) -> Option<f64> {
    let (sum, count) = series
        .rev()
        .take(n)
        .fold((0.0, 0usize), |(sum, count), x| (sum + x, count + 1));
    (count > 0).then(|| sum / count as f64)
}

fn unit(x: f64) -> f64 {
    if x.is_nan() { 1.0 } else { x.clamp(0.001, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_observation_sets_level() {
        let mut h = Holt::new(0.5, 0.1);
        assert_eq!(h.forecast(), None);
        h.update(42.0);
        assert_eq!(h.level(), Some(42.0));
        assert_eq!(h.trend(), Some(0.0));
        assert_eq!(h.forecast(), Some(42.0));
    }

    #[test]
    fn tracks_a_linear_ramp() {
        let mut h = Holt::new(0.5, 0.1);
        for t in 0..200 {
            h.update(100.0 + 3.0 * f64::from(t));
        }
        let trend = h.trend().expect("fed");
        let forecast = h.forecast().expect("fed");
        assert!((trend - 3.0).abs() < 0.01, "trend {trend}");
        // Next value is 100 + 3·200 = 700.
        assert!((forecast - 700.0).abs() < 0.1, "forecast {forecast}");
    }

    #[test]
    fn restart_replaces_level_and_trend() {
        let mut h = Holt::new(0.5, 0.1);
        h.restart(5.0, 1.0);
        assert_eq!(h.forecast(), Some(6.0));
        for t in 0..50 {
            h.update(10.0 + f64::from(t));
        }
        h.restart(200.0, 0.5);
        h.restart(f64::NAN, 0.0);
        assert_eq!((h.level(), h.trend()), (Some(200.0), Some(0.5)));
        h.update(200.5);
        assert_eq!(h.forecast(), Some(201.0));
    }

    #[test]
    fn moving_average_of_the_tail() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(simple_moving_average(xs.into_iter(), 2), Some(3.5));
        assert_eq!(simple_moving_average(xs.into_iter(), 10), Some(2.5));
        assert_eq!(simple_moving_average(xs.into_iter(), 0), None);
        assert_eq!(simple_moving_average(std::iter::empty(), 3), None);
    }

    proptest! {
        #[test]
        fn constant_series_is_a_fixed_point(
            c in 0.0f64..1e6, alpha in 0.0f64..=1.0, beta in 0.0f64..=1.0, n in 1usize..100,
        ) {
            let mut h = Holt::new(alpha, beta);
            for _ in 0..n {
                h.update(c);
            }
            prop_assert!((h.forecast().expect("fed") - c).abs() <= 1e-9 * c.max(1.0));
        }
    }
}
