//! Fulcrum's data plane.
//!
//! A [`Node`] accepts client connections on listeners ([`listener`]), routes each request
//! to a pool ([`router`]), picks a backend with the pool's strategy and forwards the
//! request over a pooled upstream connection ([`forward`], [`upstream`]), retrying on
//! another backend within the pool's retry policy and budget. Outcomes feed each backend's
//! live statistics and passive outlier detection; active health checks ([`health`]) run
//! beside. Pools, backends and routes come from a [`NodeSpec`], which the binary builds
//! from the validated configuration ([`spec`]).
//!
//! Request flow and threading are described in `docs/ARCHITECTURE.md`.

mod admission;
pub mod analysis;
pub mod body;
pub mod forward;
pub mod h1_guard;
pub mod headers;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod normalize;
pub mod queue;
pub mod ratelimit;
pub mod router;
pub mod spec;
pub mod state;
pub mod tcp;
pub mod tls;
pub mod upstream;

pub use node::{
    AdminAction, AdminError, BackendStatus, ListenerStatus, Node, NodeError, NodeSpec, PoolSummary,
};
pub use state::Pool;
