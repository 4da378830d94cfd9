//! Pure statistics for Fulcrum's data plane and traffic analysis.
//!
//! Nothing in this crate does I/O or spawns tasks: every type is fed explicit
//! observations and an explicit `now_ns` timestamp, so the balancing and analysis code
//! that builds on it can be unit-tested, property-tested and benchmarked without sockets
//! or a runtime. The types used on the proxy's hot path ([`PeakEwma`],
//! [`WindowedHistogram`]) are lock-free: they are shared between worker threads and
//! updated with atomics.
//!
//! Time is a monotonic nanosecond count since an arbitrary process epoch; [`clock::now_ns`]
//! reads it.

pub mod clock;
pub mod ewma;
pub mod histogram;

pub use ewma::PeakEwma;
pub use histogram::WindowedHistogram;
