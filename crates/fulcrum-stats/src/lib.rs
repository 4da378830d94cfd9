//! Pure statistics for Fulcrum's data plane and traffic analysis.
//!
//! Nothing in this crate does I/O or spawns tasks: every type is fed explicit
//! observations and an explicit `now_ns` timestamp, so the balancing and analysis code
//! that builds on it can be unit-tested, property-tested and benchmarked without sockets
//! or a runtime. The types used on the proxy's hot path ([`PeakEwma`], [`Ewma`],
//! [`WindowedHistogram`], [`EndpointTable`], [`EndpointStats`], [`RateCounter`]) are
//! lock-free: they are shared between worker threads and updated with atomics. The
//! analysis types ([`RateAnalyzer`], [`DynamicWeights`]) are owned by one background task
//! per pool and take `&mut self`.
//!
//! Where each piece sits in the request flow:
//!
//! * before forwarding: [`EndpointTable::get`] finds the request's endpoint
//!   ([`path`] normalises `GET /users/42` to `GET /users/{id}`) and
//!   [`EndpointStats::class`] says whether it is long ([`classify`]);
//!   [`RateCounter::record`] counts the request;
//! * after the response: [`EndpointStats::record`] stores its duration;
//! * every second, off the request path: [`RateAnalyzer`] forecasts the pool's request
//!   rate and flags spikes and drops ([`forecast`], [`anomaly`]); [`DynamicWeights`]
//!   turns backend latency and error rates into weight factors ([`weights`]).
//!
//! Time is a monotonic nanosecond count since an arbitrary process epoch; [`clock::now_ns`]
//! reads it.

pub mod anomaly;
pub mod classify;
pub mod clock;
pub mod endpoint;
pub mod ewma;
pub mod forecast;
pub mod histogram;
pub mod path;
pub mod rate;
pub mod weights;

pub use anomaly::{
    AnalysisConfig, AnomalyEpisode, AnomalyEvent, AnomalyKind, RateAnalyzer, RateSnapshot,
};
pub use classify::{Classifier, RequestClass};
pub use endpoint::{EndpointConfig, EndpointSnapshot, EndpointStats, EndpointTable};
pub use ewma::{Ewma, PeakEwma};
pub use forecast::Holt;
pub use histogram::WindowedHistogram;
pub use path::{endpoint_hash, endpoint_key, normalize_path};
pub use rate::RateCounter;
pub use weights::{BackendSignal, DynamicWeightConfig, DynamicWeights};
