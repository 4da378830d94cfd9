//! The pure part of the load generator: when each request is due, which endpoint it goes
//! to, and which key it carries. Everything is drawn from one seeded RNG, so a seed fixes
//! the whole sequence and the unit tests check the distributions.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Most distinct Zipf keys: the CDF takes 8 bytes per key (80 MB at this bound).
pub const MAX_ZIPF_KEYS: u64 = 10_000_000;

/// Largest Zipf exponent accepted; beyond it rank 1 takes practically every request.
pub const MAX_ZIPF_EXPONENT: f64 = 10.0;

/// One endpoint of a [`Mix`]: a path (with an optional query) and its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct MixEntry {
    /// Path and query sent, e.g. `/long?delay_ms=400`.
    pub path: String,
    /// Relative weight, finite and > 0.
    pub weight: f64,
}

/// The endpoints a load is spread over, with weights: `/short:0.8,/long:0.2`.
///
/// Text syntax: comma-separated `PATH[:WEIGHT]`; a missing weight is 1; weights are
/// relative (they need not add up to 1). The weight is after the **last** colon, so a path
/// may itself contain colons when a weight is given. Paths start with `/` and must be a
/// valid HTTP path and query. Each path may appear once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mix {
    entries: Vec<MixEntry>,
}

impl Mix {
    /// A mix of one path.
    pub fn single(path: String) -> Mix {
        Mix {
            entries: vec![MixEntry { path, weight: 1.0 }],
        }
    }

    /// The entries in the order given.
    pub fn entries(&self) -> &[MixEntry] {
        &self.entries
    }

    /// Builds a mix from entries, checking each as [`FromStr`] does.
    ///
    /// # Errors
    /// A message naming the first bad entry.
    pub fn from_entries(entries: Vec<MixEntry>) -> Result<Mix, String> {
        for (i, entry) in entries.iter().enumerate() {
            check_path(&entry.path)?;
            if !(entry.weight.is_finite() && entry.weight > 0.0) {
                return Err(format!(
                    "`{}`: weight {} is not a number above 0",
                    entry.path, entry.weight
                ));
            }
            if entries[..i].iter().any(|e| e.path == entry.path) {
                return Err(format!("`{}` is listed twice", entry.path));
            }
        }
        Ok(Mix { entries })
    }

    /// Each entry's share of the requests, in order (sums to 1).
    pub fn shares(&self) -> Vec<f64> {
        let total: f64 = self.entries.iter().map(|e| e.weight).sum();
        self.entries.iter().map(|e| e.weight / total).collect()
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{path}`: a path starts with `/`"));
    }
    path.parse::<http::uri::PathAndQuery>()
        .map(|_| ())
        .map_err(|_| format!("`{path}` is not a valid HTTP path and query"))
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(text: &str) -> Result<Mix, String> {
        let mut entries = Vec::new();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!(
                    "`{text}`: an empty entry; expected PATH[:WEIGHT],… e.g. /short:0.8,/long:0.2"
                ));
            }
            let (path, weight) = match item.rsplit_once(':') {
                Some((path, weight)) => {
                    let weight = weight.trim().parse::<f64>().map_err(|_| {
                        format!("`{item}`: `{weight}` is not a weight (a number above 0)")
                    })?;
                    (path.trim(), weight)
                }
                None => (item, 1.0),
            };
            entries.push(MixEntry {
                path: path.to_owned(),
                weight,
            });
        }
        Mix::from_entries(entries)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}", entry.path, entry.weight)?;
        }
        Ok(())
    }
}

/// The Zipf distribution over ranks `1..=n` with exponent `s`: P(k) ∝ 1/kˢ.
///
/// Sampling inverts a precomputed cumulative distribution by binary search: O(n) memory
/// and set-up, O(log n) per draw, exact for any `s ≥ 0` (including `s = 1`, where the
/// rejection samplers need special cases).
#[derive(Clone, Debug)]
pub struct Zipf {
    /// `cdf[i]` = P(rank ≤ i + 1); the last entry is 1.
    cdf: Vec<f64>,
}

impl Zipf {
    /// Checks `n` (1..=[`MAX_ZIPF_KEYS`]) and `s` (finite, 0..=[`MAX_ZIPF_EXPONENT`]).
    ///
    /// # Errors
    /// A message saying which is out of range.
    pub fn check(n: u64, s: f64) -> Result<(), String> {
        if !(1..=MAX_ZIPF_KEYS).contains(&n) {
            return Err(format!(
                "{n} is not a number of keys from 1 to {MAX_ZIPF_KEYS}"
            ));
        }
        if !(s.is_finite() && (0.0..=MAX_ZIPF_EXPONENT).contains(&s)) {
            return Err(format!(
                "exponent {s} is not a number from 0 to {MAX_ZIPF_EXPONENT}"
            ));
        }
        Ok(())
    }

    /// The distribution over `n` keys with exponent `s`.
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub fn new(n: u64, s: f64) -> Result<Zipf, String> {
        Zipf::check(n, s)?;
        let mut cdf = Vec::with_capacity(n as usize);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for p in &mut cdf {
            *p /= sum;
        }
        if let Some(last) = cdf.last_mut() {
            // Rounding must not leave a draw of u just below 1 without a rank.
            *last = 1.0;
        }
        Ok(Zipf { cdf })
    }

    /// Number of keys n.
    pub fn keys(&self) -> u64 {
        self.cdf.len() as u64
    }

    /// Probability of rank `k` (1-based); 0 outside `1..=n`.
    pub fn probability(&self, k: u64) -> f64 {
        match k {
            0 => 0.0,
            1 => self.cdf.first().copied().unwrap_or(0.0),
            k if k <= self.keys() => self.cdf[k as usize - 1] - self.cdf[k as usize - 2],
            _ => 0.0,
        }
    }

    /// Draws a rank in `1..=n`.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> u64 {
        let u = rng.f64();
        // First index whose cumulative probability exceeds u.
        let index = self.cdf.partition_point(|&p| p <= u);
        (index.min(self.cdf.len() - 1) + 1) as u64
    }
}

/// One scheduled request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arrival {
    /// When it is due, from the start of the run.
    pub at: Duration,
    /// Index of its endpoint in the mix.
    pub class: usize,
    /// Its key rank, when keys are drawn.
    pub key: Option<u64>,
}

/// The Poisson arrival process of a run: exponential inter-arrival times with mean
/// 1/`rate`, each arrival's endpoint drawn by the mix weights and its key from the Zipf
/// distribution, until `duration`.
#[derive(Debug)]
pub struct Schedule {
    rng: fastrand::Rng,
    rate: f64,
    end: Duration,
    /// Seconds since the start of the last arrival.
    clock: f64,
    /// Cumulative mix shares, last = 1.
    cumulative: Vec<f64>,
    zipf: Option<Arc<Zipf>>,
}

impl Schedule {
    /// The arrivals of a run at `rate` req/s for `duration` over `mix`, keys from `zipf`,
    /// all drawn from `seed`.
    pub fn new(
        rate: f64,
        duration: Duration,
        mix: &Mix,
        zipf: Option<Arc<Zipf>>,
        seed: u64,
    ) -> Schedule {
        let mut cumulative: Vec<f64> = mix
            .shares()
            .iter()
            .scan(0.0, |sum, share| {
                *sum += share;
                Some(*sum)
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Schedule {
            rng: fastrand::Rng::with_seed(seed),
            rate,
            end: duration,
            clock: 0.0,
            cumulative,
            zipf,
        }
    }

    /// The next arrival, or `None` once past the end of the run.
    pub fn next_arrival(&mut self) -> Option<Arrival> {
        // Inverse transform: −ln(U)/λ with U in (0, 1] is exponential with rate λ.
        let u = 1.0 - self.rng.f64();
        self.clock += -u.ln() / self.rate;
        let at = Duration::try_from_secs_f64(self.clock).ok()?;
        if at >= self.end {
            return None;
        }
        let pick = self.rng.f64();
        let class = self
            .cumulative
            .partition_point(|&c| c <= pick)
            .min(self.cumulative.len().saturating_sub(1));
        let key = self.zipf.as_ref().map(|z| z.sample(&mut self.rng));
        Some(Arrival { at, class, key })
    }
}

impl Iterator for Schedule {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        self.next_arrival()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixes() {
        let mix: Mix = "/short:0.8, /long:0.2".parse().expect("valid");
        assert_eq!(
            mix.entries(),
            &[
                MixEntry {
                    path: "/short".into(),
                    weight: 0.8
                },
                MixEntry {
                    path: "/long".into(),
                    weight: 0.2
                }
            ]
        );
        let mix: Mix = "/a,/b?delay_ms=5:3".parse().expect("valid");
        assert_eq!(mix.shares(), vec![0.25, 0.75]);
        assert_eq!(mix.entries()[1].path, "/b?delay_ms=5");
        assert_eq!(mix.to_string(), "/a:1,/b?delay_ms=5:3");
    }

    #[test]
    fn rejects_bad_mixes_with_the_entry() {
        for (text, needle) in [
            ("", "empty entry"),
            ("/a,,/b", "empty entry"),
            ("short:1", "starts with `/`"),
            ("/a:0", "above 0"),
            ("/a:-1", "above 0"),
            ("/a:x", "not a weight"),
            ("/a:inf", "above 0"),
            ("/a,/a", "twice"),
            ("/a b", "valid HTTP path"),
        ] {
            let err = text.parse::<Mix>().expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn zipf_matches_its_probabilities() {
        let zipf = Zipf::new(100, 1.0).expect("valid");
        let harmonic: f64 = (1..=100).map(|k| 1.0 / k as f64).sum();
        assert!((zipf.probability(1) - 1.0 / harmonic).abs() < 1e-12);
        assert!((zipf.probability(10) - 0.1 / harmonic).abs() < 1e-12);
        assert_eq!(zipf.probability(0), 0.0);
        assert_eq!(zipf.probability(101), 0.0);

        let mut rng = fastrand::Rng::with_seed(7);
        let draws = 200_000;
        let mut counts = vec![0u64; 101];
        for _ in 0..draws {
            let k = zipf.sample(&mut rng);
            assert!((1..=100).contains(&k));
            counts[k as usize] += 1;
        }
        for k in [1, 2, 5, 50] {
            let expected = zipf.probability(k) * draws as f64;
            let sd = expected.sqrt();
            let got = counts[k as usize] as f64;
            assert!(
                (got - expected).abs() < 5.0 * sd,
                "rank {k}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn zipf_of_exponent_zero_is_uniform_and_bounds_are_checked() {
        let zipf = Zipf::new(4, 0.0).expect("valid");
        for k in 1..=4 {
            assert!((zipf.probability(k) - 0.25).abs() < 1e-12);
        }
        assert!(Zipf::new(0, 1.0).is_err());
        assert!(Zipf::new(MAX_ZIPF_KEYS + 1, 1.0).is_err());
        assert!(Zipf::new(10, -1.0).is_err());
        assert!(Zipf::new(10, f64::NAN).is_err());
        let one = Zipf::new(1, 1.0).expect("valid");
        assert_eq!(one.sample(&mut fastrand::Rng::with_seed(1)), 1);
    }

    #[test]
    fn arrivals_are_poisson_at_the_rate_and_follow_the_mix() {
        let mix: Mix = "/short:0.8,/long:0.2".parse().expect("valid");
        let rate = 1000.0;
        let duration = Duration::from_secs(100);
        let arrivals: Vec<Arrival> = Schedule::new(rate, duration, &mix, None, 42).collect();
        let n = arrivals.len() as f64;
        // Count in 100 s at 1000/s: Poisson, sd ≈ 316.
        assert!((n - 100_000.0).abs() < 5.0 * 316.0, "{n} arrivals");
        assert!(arrivals.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(arrivals.iter().all(|a| a.at < duration && a.key.is_none()));

        // Exponential inter-arrival times: mean 1 ms and coefficient of variation 1.
        let gaps: Vec<f64> = arrivals
            .windows(2)
            .map(|w| (w[1].at - w[0].at).as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.001).abs() < 0.00002, "mean gap {mean}");
        assert!(
            (var.sqrt() / mean - 1.0).abs() < 0.03,
            "cv {}",
            var.sqrt() / mean
        );

        let long = arrivals.iter().filter(|a| a.class == 1).count() as f64;
        assert!((long / n - 0.2).abs() < 0.01, "long share {}", long / n);
    }

    #[test]
    fn a_seed_fixes_the_sequence() {
        let mix: Mix = "/a:1,/b:1".parse().expect("valid");
        let zipf = Some(Arc::new(Zipf::new(1000, 1.1).expect("valid")));
        let run = |seed| -> Vec<Arrival> {
            Schedule::new(500.0, Duration::from_secs(2), &mix, zipf.clone(), seed).collect()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        assert!(
            run(3)
                .iter()
                .all(|a| a.key.is_some_and(|k| (1..=1000).contains(&k)))
        );
    }
}
