//! Fulcrum's cluster layer: several nodes that act as one load balancer.
//!
//! - [`membership`]: gossip membership and failure detection (chitchat: Scuttlebutt
//!   anti-entropy, phi-accrual failure detector), each node's published state, and the
//!   `node_joined` / `node_left` / `node_failed` events.
//! - [`health`]: the cluster-wide backend health merge (`any | majority | local`).
//! - [`store`]: the coordination store (`none | redis | etcd`): node registry, leader lease
//!   with fencing token, shared configuration with a version, backend registry with TTL,
//!   persisted endpoint statistics.
//! - [`election`]: the leader-election loop over a store (campaign, renew, step down
//!   before the lease expires).
//! - [`shared`]: the versioned run-time configuration overlay every node applies.
//! - [`discovery`]: backends from DNS (A/AAAA, SRV).
//! - [`runtime`]: the node's control plane wiring all of the above to the data plane.
//! - [`assign`]: work assignments (tenants, keys) to nodes by bounded-load consistent
//!   hashing, rebalanced with as few moves as possible.

pub mod assign;
pub mod discovery;
pub mod election;
pub mod health;
pub mod membership;
pub mod runtime;
pub mod shared;
pub mod store;
pub mod testutil;
