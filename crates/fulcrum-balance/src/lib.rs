//! Load balancing for Fulcrum: the [`Strategy`] trait, every algorithm that implements it,
//! and the live per-backend state they read.
//!
//! This crate is pure: no sockets, no runtime, no clocks of its own. The data plane
//! (`fulcrum-proxy`) builds a [`PoolView`] over a pool's backends for each request, asks the
//! pool's strategy to [`Strategy::pick`] one, and reports the outcome back into the chosen
//! backend's [`LiveBackend`] through an [`InFlightGuard`]. Feedback reaches strategies only
//! through that shared live state (atomics), never through callbacks, so strategies stay
//! small, lock-free where possible, and testable without I/O.

pub mod backend;
pub mod outlier;
pub mod slow_start;
pub mod strategy;

pub use backend::{
    Backend, BackendFlags, InFlightGuard, LiveBackend, LiveBackendConfig, ReleaseListener,
};
pub use outlier::OutlierPolicy;
pub use slow_start::SlowStart;
pub use strategy::{
    BackendId, DurationClassMode, Figure, PoolView, RequestClass, RequestInfo, Strategy,
    StrategyKind, StrategyParams, TICK_INTERVAL, UnknownStrategy, build_strategy,
};
