//! Request duration classes: is an endpoint "long" (seconds of work, e.g. an LLM
//! completion or a report export) or "short"?
//!
//! The rule comes from the Dify cluster load balancer (Fulcrum design seed 000): an
//! endpoint is long when the average of its last N request durations reaches a threshold
//! (default 5 s). The proxy reads the class of a request's endpoint *before* forwarding it
//! (see [`crate::endpoint::EndpointStats::class`]) so duration-aware strategies can keep
//! long requests from queueing behind each other.
//!
//! Fulcrum adds a hysteresis band below the threshold (a Schmitt trigger): an endpoint
//! whose average hovers around the threshold would otherwise flip class on every request,
//! and every flip moves its traffic between scheduling lanes.

/// A request's predicted duration class, from its endpoint's recent history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum RequestClass {
    /// The endpoint has no completed request yet.
    #[default]
    Unknown,
    /// The endpoint's recent average duration is below the long threshold.
    Short,
    /// The endpoint's recent average duration reached the long threshold (and has not
    /// fallen below the hysteresis band since).
    Long,
}

impl RequestClass {
    /// The class's name as used in metrics labels and the admin API: `"unknown"`,
    /// `"short"` or `"long"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Short => "short",
            Self::Long => "long",
        }
    }

    /// Whether the class is [`RequestClass::Long`].
    pub const fn is_long(self) -> bool {
        matches!(self, Self::Long)
    }

    /// Compact encoding for an `AtomicU8`.
    pub(crate) const fn to_u8(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Short => 1,
            Self::Long => 2,
        }
    }

    /// Inverse of [`RequestClass::to_u8`]; unknown codes read as `Unknown`.
    pub(crate) const fn from_u8(code: u8) -> Self {
        match code {
            1 => Self::Short,
            2 => Self::Long,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for RequestClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default long threshold: 5 000 ms, in nanoseconds (Dify cluster LB, seed 000).
pub const DEFAULT_LONG_THRESHOLD_NS: u64 = 5_000_000_000;

/// Default hysteresis: 0.2, i.e. a long endpoint turns short again below 80 % of the
/// threshold.
pub const DEFAULT_HYSTERESIS: f64 = 0.2;

/// The long/short decision rule with hysteresis (Dify cluster LB threshold rule, seed 000,
/// plus a Schmitt-trigger band).
///
/// * no average yet → [`RequestClass::Unknown`];
/// * average ≥ `threshold_ns` → [`RequestClass::Long`];
/// * average < `threshold_ns × (1 − hysteresis)` → [`RequestClass::Short`];
/// * in between, the previous class is kept (`Unknown` becomes `Short`: the endpoint has
///   never been long).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Classifier {
    /// Average duration at and above which an endpoint is long, in nanoseconds.
    pub threshold_ns: u64,
    /// Width of the band below the threshold in which a long endpoint stays long, as a
    /// ratio 0..1 of the threshold. Values outside 0..=1 are clamped; NaN reads as 0.
    pub hysteresis: f64,
}

impl Default for Classifier {
    /// 5 000 ms threshold, 0.2 hysteresis.
    fn default() -> Self {
        Self {
            threshold_ns: DEFAULT_LONG_THRESHOLD_NS,
            hysteresis: DEFAULT_HYSTERESIS,
        }
    }
}

impl Classifier {
    /// The class of an endpoint whose class was `previous` and whose recent average
    /// duration is `average_ns` nanoseconds (`None`: no completed request). Pure; never
    /// fails.
    pub fn classify(&self, previous: RequestClass, average_ns: Option<u64>) -> RequestClass {
        let Some(average) = average_ns else {
            return RequestClass::Unknown;
        };
        if average >= self.threshold_ns {
            return RequestClass::Long;
        }
        if (average as f64) < self.release_ns() {
            return RequestClass::Short;
        }
        match previous {
            RequestClass::Long => RequestClass::Long,
            RequestClass::Short | RequestClass::Unknown => RequestClass::Short,
        }
    }

    /// The average below which a long endpoint becomes short again, in nanoseconds:
    /// `threshold_ns × (1 − hysteresis)`.
    pub fn release_ns(&self) -> f64 {
        let h = if self.hysteresis.is_nan() {
            0.0
        } else {
            self.hysteresis.clamp(0.0, 1.0)
        };
        self.threshold_ns as f64 * (1.0 - h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn names_and_codes_round_trip() {
        for c in [
            RequestClass::Unknown,
            RequestClass::Short,
            RequestClass::Long,
        ] {
            assert_eq!(RequestClass::from_u8(c.to_u8()), c);
            assert_eq!(c.to_string(), c.name());
        }
        assert_eq!(RequestClass::Long.name(), "long");
        assert!(RequestClass::Long.is_long());
        assert!(!RequestClass::Short.is_long());
        assert_eq!(RequestClass::from_u8(200), RequestClass::Unknown);
    }

    #[test]
    fn no_history_is_unknown() {
        let c = Classifier::default();
        assert_eq!(c.classify(RequestClass::Long, None), RequestClass::Unknown);
    }

    #[test]
    fn threshold_and_band() {
        let c = Classifier::default(); // 5 s, band down to 4 s
        assert_eq!(
            c.classify(RequestClass::Unknown, Some(5 * S)),
            RequestClass::Long
        );
        assert_eq!(
            c.classify(RequestClass::Unknown, Some(4_500_000_000)),
            RequestClass::Short
        );
        assert_eq!(
            c.classify(RequestClass::Long, Some(4_500_000_000)),
            RequestClass::Long
        );
        assert_eq!(
            c.classify(RequestClass::Short, Some(4_500_000_000)),
            RequestClass::Short
        );
        assert_eq!(
            c.classify(RequestClass::Long, Some(4 * S - 1)),
            RequestClass::Short
        );
        assert_eq!(
            c.classify(RequestClass::Long, Some(4 * S)),
            RequestClass::Long
        );
    }

    #[test]
    fn out_of_range_hysteresis_is_clamped() {
        let mut c = Classifier {
            threshold_ns: 10,
            hysteresis: f64::NAN,
        };
        assert_eq!(c.release_ns(), 10.0);
        c.hysteresis = 7.0;
        assert_eq!(c.release_ns(), 0.0);
        // With the band covering everything, a long endpoint stays long.
        assert_eq!(c.classify(RequestClass::Long, Some(0)), RequestClass::Long);
        c.hysteresis = -1.0;
        assert_eq!(c.release_ns(), 10.0);
    }

    proptest! {
        #[test]
        fn long_iff_above_threshold_unless_in_band(
            threshold in 1u64..u64::MAX / 2,
            h in 0.0f64..=1.0,
            avg in any::<u64>(),
            prev in 0u8..3,
        ) {
            let c = Classifier { threshold_ns: threshold, hysteresis: h };
            let prev = RequestClass::from_u8(prev);
            let got = c.classify(prev, Some(avg));
            prop_assert_ne!(got, RequestClass::Unknown);
            if avg >= threshold {
                prop_assert_eq!(got, RequestClass::Long);
            } else if (avg as f64) < c.release_ns() {
                prop_assert_eq!(got, RequestClass::Short);
            } else {
                prop_assert_eq!(got.is_long(), prev.is_long());
            }
        }
    }
}
