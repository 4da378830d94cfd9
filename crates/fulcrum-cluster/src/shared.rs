//! The shared configuration: run-time changes made through the admin API of any node
//! (strategy switch, drain/disable/enable, weights, added and removed backends), kept as
//! one versioned overlay on top of each node's configuration file and applied by every
//! node (seed 004's replicated configuration).
//!
//! The overlay is a JSON document. With a coordination store it is written with
//! compare-and-set on its version ([`crate::store::Store::put_config`]), so two concurrent
//! writers cannot lose each other's change; with `coordination: none` it spreads by
//! gossip and the highest `(version, written_by)` wins, and the node whose write lost
//! re-applies it on top of the winner (the control plane's rebase, which
//! [`SharedConfig::writes`] makes possible: it tells which writes a document holds).
//! [`effective_config`] folds the overlay and the discovered backends
//! into the file's [`Config`]; the result is validated as a whole before anything is
//! applied, so a change that would leave a pool without backends or name an unknown
//! strategy is refused with the validator's message rather than half-applied.

use std::collections::BTreeMap;

use fulcrum_balance::StrategyKind;
use fulcrum_config::{BackendConfig, Config};
use serde::{Deserialize, Serialize};

/// The overlay document: per pool, the changes made at run time. `version` 0 = no change
/// was ever made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SharedConfig {
    /// Version, incremented by one per write.
    pub version: u64,
    /// Node that wrote this version.
    pub written_by: String,
    /// Wall-clock time of the write, Unix milliseconds.
    pub written_ms: u64,
    /// Changes per pool name.
    pub pools: BTreeMap<String, PoolOverlay>,
    /// Per writing node, its latest write this document builds on: a write `(node,
    /// generation, version)` is part of the document when the entry of `node` has that
    /// generation and a version at least as high (see [`SharedConfig::includes`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub writes: BTreeMap<String, WriteMark>,
}

/// The latest write of one node (one process: its gossip generation) a document builds on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WriteMark {
    /// The writing process's gossip generation (its start time, Unix ms).
    pub generation: u64,
    /// The version it wrote.
    pub version: u64,
}

/// Run-time changes to one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolOverlay {
    /// Strategy name replacing the configured one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Changes per backend address.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, BackendOverlay>,
}

/// Run-time changes to one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackendOverlay {
    /// Operator state: `draining` or `disabled`; `None` = in rotation (enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminState>,
    /// Weight replacing the configured one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Set when the backend was added at run time (not in the file): its tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<BTreeMap<String, String>>,
    /// For a backend added at run time: its `max_requests` (0 = the pool's
    /// `default_max_requests`).
    #[serde(skip_serializing_if = "is_zero")]
    pub max_requests: u32,
    /// The backend was removed at run time.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// An operator state kept in the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// No new requests; in-flight ones finish.
    Draining,
    /// Out of rotation for maintenance.
    Disabled,
}

/// One run-time change, as the admin API receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `POST /api/pools/{pool}/strategy`.
    Strategy {
        /// Pool name.
        pool: String,
        /// New strategy.
        strategy: StrategyKind,
    },
    /// `POST /api/pools/{pool}/backends/{address}/drain|disable|enable`; `None` = enable.
    Admin {
        /// Pool name.
        pool: String,
        /// Backend address as configured.
        address: String,
        /// New operator state.
        state: Option<AdminState>,
    },
    /// `POST /api/pools/{pool}/backends/{address}/weight`.
    Weight {
        /// Pool name.
        pool: String,
        /// Backend address.
        address: String,
        /// New weight, 1..=65535.
        weight: u32,
    },
    /// `POST /api/pools/{pool}/backends` on a pool that does not use the registry.
    AddBackend {
        /// Pool name.
        pool: String,
        /// The backend.
        backend: BackendConfig,
    },
    /// `DELETE /api/pools/{pool}/backends/{address}` on such a pool.
    RemoveBackend {
        /// Pool name.
        pool: String,
        /// Backend address.
        address: String,
    },
}

impl Change {
    /// The pool the change is about.
    pub fn pool(&self) -> &str {
        match self {
            Change::Strategy { pool, .. }
            | Change::Admin { pool, .. }
            | Change::Weight { pool, .. }
            | Change::AddBackend { pool, .. }
            | Change::RemoveBackend { pool, .. } => pool,
        }
    }
}

/// Why a change cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// No pool has this name.
    #[error("no pool named `{0}`")]
    UnknownPool(String),
    /// The pool has no backend with this address.
    #[error("pool `{pool}` has no backend `{address}`")]
    UnknownBackend {
        /// Pool name.
        pool: String,
        /// Address.
        address: String,
    },
    /// The pool already has a backend with this address.
    #[error("pool `{pool}` already has a backend `{address}`")]
    DuplicateBackend {
        /// Pool name.
        pool: String,
        /// Address.
        address: String,
    },
    /// The configuration the change would produce does not validate.
    #[error("the change would make the configuration invalid: {0}")]
    Invalid(String),
}

impl SharedConfig {
    /// Parses a document written by [`SharedConfig::to_json`].
    ///
    /// # Errors
    /// The JSON error, naming line and column.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Marks this document as version `version`, written by node `by` now.
    pub fn stamp(&mut self, version: u64, by: &str) {
        self.version = version;
        by.clone_into(&mut self.written_by);
        self.written_ms = crate::store::now_ms();
    }

    /// Records that this document holds write `version` of node `by` running as
    /// `generation`. Each node builds every write on a document holding all of its own
    /// earlier writes (a write that loses a race is re-applied on top of the winner), so
    /// the mark of a node's latest write stands for all of its earlier ones.
    pub fn mark_write(&mut self, by: &str, generation: u64, version: u64) {
        self.writes.insert(
            by.to_owned(),
            WriteMark {
                generation,
                version,
            },
        );
    }

    /// Whether this document holds write `version` of node `by` running as `generation`:
    /// it was written on top of it (or is it). A mark of a later generation counts as
    /// holding it too: a node id is one process at a time, so only two processes
    /// misconfigured with the same id can ask about an older one — and answering no there
    /// would make each re-apply its writes over the other's without end.
    pub fn includes(&self, by: &str, generation: u64, version: u64) -> bool {
        self.writes.get(by).is_some_and(|m| {
            m.generation > generation || (m.generation == generation && m.version >= version)
        })
    }

    /// The version of the latest write of node `by` running as `generation` this
    /// document holds, if any.
    pub fn latest_write(&self, by: &str, generation: u64) -> Option<u64> {
        self.writes
            .get(by)
            .filter(|m| m.generation == generation)
            .map(|m| m.version)
    }

    /// The document as compact JSON.
    pub fn to_json(&self) -> String {
        // Maps with string keys and plain fields always serialise.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Whether pool `pool` has backend `address` once the overlay is applied to `base`
    /// and `discovered`.
    fn has_backend(
        &self,
        base: &Config,
        discovered: &BTreeMap<String, Vec<BackendConfig>>,
        pool: &str,
        address: &str,
    ) -> bool {
        effective_backends(base, self, discovered, pool)
            .iter()
            .any(|b| same_address(&b.address, address))
    }

    /// Applies `change` to a copy of this overlay, checked against `base` and
    /// `discovered` (the pool and backend must exist) and validated as a whole. The copy
    /// keeps this version; the writer sets the next one.
    ///
    /// # Errors
    /// [`ChangeError`] naming the unknown pool or backend, the duplicate address, or the
    /// validator's message for the resulting configuration.
    pub fn with_change(
        &self,
        base: &Config,
        discovered: &BTreeMap<String, Vec<BackendConfig>>,
        change: &Change,
    ) -> Result<SharedConfig, ChangeError> {
        let pool = change.pool();
        if !base.pools.contains_key(pool) {
            return Err(ChangeError::UnknownPool(pool.to_owned()));
        }
        let mut next = self.clone();
        let unknown = || ChangeError::UnknownBackend {
            pool: pool.to_owned(),
            address: change_address(change).unwrap_or_default().to_owned(),
        };
        match change {
            Change::Strategy { strategy, .. } => {
                next.pools.entry(pool.to_owned()).or_default().strategy =
                    Some(strategy.name().to_owned());
            }
            Change::Admin { address, state, .. } => {
                if !self.has_backend(base, discovered, pool, address) {
                    return Err(unknown());
                }
                let entry = next.backend(pool, address);
                entry.admin = *state;
            }
            Change::Weight {
                address, weight, ..
            } => {
                if !self.has_backend(base, discovered, pool, address) {
                    return Err(unknown());
                }
                next.backend(pool, address).weight = Some(*weight);
            }
            Change::AddBackend { backend, .. } => {
                if self.has_backend(base, discovered, pool, &backend.address) {
                    return Err(ChangeError::DuplicateBackend {
                        pool: pool.to_owned(),
                        address: backend.address.clone(),
                    });
                }
                let in_file = base.pools[pool]
                    .backends
                    .iter()
                    .find(|b| same_address(&b.address, &backend.address));
                if let Some(file) = in_file {
                    // A backend of the file removed at run time comes back as the file's
                    // own (its spelling, weight, tags and limit from the file), not as a
                    // run-time addition: so it leaves when the file drops it.
                    next.backend(pool, &file.address).removed = false;
                } else {
                    let entry = next.backend(pool, &backend.address);
                    entry.removed = false;
                    entry.added = Some(backend.tags.clone());
                    entry.weight = Some(backend.weight);
                    entry.max_requests = backend.max_requests;
                }
            }
            Change::RemoveBackend { address, .. } => {
                if !self.has_backend(base, discovered, pool, address) {
                    return Err(unknown());
                }
                let in_file = base.pools[pool]
                    .backends
                    .iter()
                    .find(|b| same_address(&b.address, address));
                if let Some(file) = in_file {
                    let entry = next.backend(pool, &file.address);
                    *entry = BackendOverlay {
                        removed: true,
                        ..BackendOverlay::default()
                    };
                } else if let Some(p) = next.pools.get_mut(pool) {
                    p.backends.remove(address);
                }
            }
        }
        next.prune();
        effective_config(base, &next, discovered)
            .validate()
            .map_err(|e| ChangeError::Invalid(e.to_string()))?;
        Ok(next)
    }

    fn backend(&mut self, pool: &str, address: &str) -> &mut BackendOverlay {
        self.pools
            .entry(pool.to_owned())
            .or_default()
            .backends
            .entry(address.to_owned())
            .or_default()
    }

    /// Drops entries that change nothing.
    fn prune(&mut self) {
        for p in self.pools.values_mut() {
            p.backends.retain(|_, b| *b != BackendOverlay::default());
        }
        self.pools
            .retain(|_, p| p.strategy.is_some() || !p.backends.is_empty());
    }

    /// The operator state the overlay gives backend `address` of `pool`.
    pub fn admin_state(&self, pool: &str, address: &str) -> Option<AdminState> {
        self.pools
            .get(pool)
            .and_then(|p| p.backends.get(address))
            .and_then(|b| b.admin)
    }
}

/// Whether two backend addresses name the same backend: equal up to ASCII case (host
/// names compare without case, RFC 4343), or the same IP address and port written two
/// ways (`[0:0::1]:80` and `[::1]:80`). The admin API finds a named backend this way too.
pub fn same_address(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
        || matches!(
            (a.parse::<std::net::SocketAddr>(), b.parse::<std::net::SocketAddr>()),
            (Ok(x), Ok(y)) if x == y
        )
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One line for logs: what changed, without the values' bulk (an added backend's tags
/// are counted, not printed).
impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Strategy { pool, strategy } => {
                write!(f, "pool `{pool}`: strategy {}", strategy.name())
            }
            Change::Admin {
                pool,
                address,
                state,
            } => {
                let state = match state {
                    Some(AdminState::Draining) => "draining",
                    Some(AdminState::Disabled) => "disabled",
                    None => "enabled",
                };
                write!(f, "pool `{pool}` backend `{address}`: {state}")
            }
            Change::Weight {
                pool,
                address,
                weight,
            } => write!(f, "pool `{pool}` backend `{address}`: weight {weight}"),
            Change::AddBackend { pool, backend } => write!(
                f,
                "pool `{pool}`: backend `{}` added (weight {}, {} tag(s), max_requests {})",
                backend.address,
                backend.weight,
                backend.tags.len(),
                backend.max_requests
            ),
            Change::RemoveBackend { pool, address } => {
                write!(f, "pool `{pool}`: backend `{address}` removed")
            }
        }
    }
}

fn change_address(change: &Change) -> Option<&str> {
    match change {
        Change::Admin { address, .. }
        | Change::Weight { address, .. }
        | Change::RemoveBackend { address, .. } => Some(address),
        Change::AddBackend { backend, .. } => Some(&backend.address),
        Change::Strategy { .. } => None,
    }
}

/// Pool `pool`'s backends once `overlay` and `discovered` apply to `base`: the file's
/// backends, then discovered ones, then ones added at run time (an address appears once,
/// first occurrence wins), minus removed ones, with overlay weights.
pub fn effective_backends(
    base: &Config,
    overlay: &SharedConfig,
    discovered: &BTreeMap<String, Vec<BackendConfig>>,
    pool: &str,
) -> Vec<BackendConfig> {
    let Some(p) = base.pools.get(pool) else {
        return Vec::new();
    };
    let changes = overlay.pools.get(pool);
    let mut out: Vec<BackendConfig> = Vec::new();
    let mut push = |b: BackendConfig| {
        if !out.iter().any(|o| same_address(&o.address, &b.address)) {
            out.push(b);
        }
    };
    for b in &p.backends {
        push(b.clone());
    }
    for b in discovered.get(pool).into_iter().flatten() {
        push(b.clone());
    }
    if let Some(changes) = changes {
        for (address, c) in &changes.backends {
            if let Some(tags) = &c.added {
                push(BackendConfig {
                    address: address.clone(),
                    weight: c.weight.unwrap_or(1),
                    tags: tags.clone(),
                    max_requests: c.max_requests,
                });
            }
        }
        out.retain(|b| !changes.backends.get(&b.address).is_some_and(|c| c.removed));
        for b in &mut out {
            if let Some(w) = changes.backends.get(&b.address).and_then(|c| c.weight) {
                b.weight = w;
            }
        }
    }
    out
}

/// The configuration a node runs: `base` (its file) with `overlay`'s strategies and
/// backend changes and the `discovered` backends folded in. Not validated here; the
/// caller validates before applying.
pub fn effective_config(
    base: &Config,
    overlay: &SharedConfig,
    discovered: &BTreeMap<String, Vec<BackendConfig>>,
) -> Config {
    let mut config = base.clone();
    let names: Vec<String> = config.pools.keys().cloned().collect();
    for name in names {
        let backends = effective_backends(base, overlay, discovered, &name);
        let strategy = overlay
            .pools
            .get(&name)
            .and_then(|p| p.strategy.as_deref())
            .and_then(|name| name.parse::<StrategyKind>().ok());
        if let Some(pool) = config.pools.get_mut(&name) {
            pool.backends = backends;
            if let Some(kind) = strategy {
                pool.strategy = kind;
            }
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        fulcrum_config::parse(
            "listeners: [{name: web, listen: 127.0.0.1:0, routes: [{pool: app}]}]\n\
             pools:\n  app:\n    backends:\n      - {address: 127.0.0.1:9001}\n      - {address: 127.0.0.1:9002}\n",
            "test.yaml",
        )
        .expect("test config is valid")
    }

    #[test]
    fn strategy_weight_add_remove_compose() {
        let base = base();
        let none = BTreeMap::new();
        let doc = SharedConfig::default();
        let doc = doc
            .with_change(
                &base,
                &none,
                &Change::Strategy {
                    pool: "app".into(),
                    strategy: StrategyKind::P2c,
                },
            )
            .expect("valid");
        let doc = doc
            .with_change(
                &base,
                &none,
                &Change::Weight {
                    pool: "app".into(),
                    address: "127.0.0.1:9002".into(),
                    weight: 7,
                },
            )
            .expect("valid");
        let doc = doc
            .with_change(
                &base,
                &none,
                &Change::AddBackend {
                    pool: "app".into(),
                    backend: BackendConfig::new("127.0.0.1:9003"),
                },
            )
            .expect("valid");
        let doc = doc
            .with_change(
                &base,
                &none,
                &Change::RemoveBackend {
                    pool: "app".into(),
                    address: "127.0.0.1:9001".into(),
                },
            )
            .expect("valid");
        let cfg = effective_config(&base, &doc, &none);
        let app = &cfg.pools["app"];
        assert_eq!(app.strategy, StrategyKind::P2c);
        let got: Vec<(&str, u32)> = app
            .backends
            .iter()
            .map(|b| (b.address.as_str(), b.weight))
            .collect();
        assert_eq!(got, [("127.0.0.1:9002", 7), ("127.0.0.1:9003", 1)]);
        // Round trip through JSON.
        assert_eq!(SharedConfig::from_json(&doc.to_json()).expect("json"), doc);
    }

    #[test]
    fn adding_back_a_file_backend_removed_at_run_time_restores_the_files_own() {
        let base = base();
        let none = BTreeMap::new();
        let removed = SharedConfig::default()
            .with_change(
                &base,
                &none,
                &Change::RemoveBackend {
                    pool: "app".into(),
                    address: "127.0.0.1:9002".into(),
                },
            )
            .expect("valid");
        let mut again = BackendConfig::new("127.0.0.1:9002");
        again.weight = 4;
        let restored = removed
            .with_change(
                &base,
                &none,
                &Change::AddBackend {
                    pool: "app".into(),
                    backend: again,
                },
            )
            .expect("valid");
        // Nothing left in the overlay: the backend is the file's again.
        assert_eq!(restored.pools, BTreeMap::new());
        // So a file that drops it drops it (it was a run-time addition before).
        let without = fulcrum_config::parse(
            "listeners: [{name: web, listen: 127.0.0.1:0, routes: [{pool: app}]}]\n\
             pools:\n  app:\n    backends:\n      - {address: 127.0.0.1:9001}\n",
            "test.yaml",
        )
        .expect("test config is valid");
        let cfg = effective_config(&without, &restored, &none);
        let got: Vec<&str> = cfg.pools["app"]
            .backends
            .iter()
            .map(|b| b.address.as_str())
            .collect();
        assert_eq!(got, ["127.0.0.1:9001"]);
    }

    #[test]
    fn a_file_backend_removed_and_added_back_under_another_spelling_is_restored() {
        let base = fulcrum_config::parse(
            "listeners: [{name: web, listen: 127.0.0.1:0, routes: [{pool: app}]}]\n\
             pools:\n  app:\n    backends:\n      - {address: \"localhost:9001\"}\n      - {address: \"[::1]:9002\"}\n      - {address: 127.0.0.1:9003}\n",
            "test.yaml",
        )
        .expect("test config is valid");
        let none = BTreeMap::new();
        for (file, removed_as, added_as) in [
            ("localhost:9001", "LOCALHOST:9001", "LocalHost:9001"),
            ("[::1]:9002", "[0:0::1]:9002", "[0:0:0::1]:9002"),
        ] {
            let removed = SharedConfig::default()
                .with_change(
                    &base,
                    &none,
                    &Change::RemoveBackend {
                        pool: "app".into(),
                        address: removed_as.into(),
                    },
                )
                .expect("valid");
            assert!(
                removed.pools["app"].backends[file].removed,
                "recorded under the file's spelling"
            );
            let restored = removed
                .with_change(
                    &base,
                    &none,
                    &Change::AddBackend {
                        pool: "app".into(),
                        backend: BackendConfig::new(added_as),
                    },
                )
                .expect("valid");
            assert_eq!(restored.pools, BTreeMap::new(), "{added_as}");
            // And another spelling of a listed backend is a duplicate.
            let duplicate = restored.with_change(
                &base,
                &none,
                &Change::AddBackend {
                    pool: "app".into(),
                    backend: BackendConfig::new(added_as),
                },
            );
            assert!(
                matches!(duplicate, Err(ChangeError::DuplicateBackend { .. })),
                "{duplicate:?}"
            );
        }
    }

    #[test]
    fn a_change_reads_as_one_short_line() {
        let mut backend = BackendConfig::new("127.0.0.1:9003");
        backend.tags.insert("note".into(), "x".repeat(100_000));
        let line = Change::AddBackend {
            pool: "app".into(),
            backend,
        }
        .to_string();
        assert_eq!(
            line,
            "pool `app`: backend `127.0.0.1:9003` added (weight 1, 1 tag(s), max_requests 0)"
        );
        let drain = Change::Admin {
            pool: "app".into(),
            address: "127.0.0.1:9001".into(),
            state: Some(AdminState::Draining),
        };
        assert_eq!(
            drain.to_string(),
            "pool `app` backend `127.0.0.1:9001`: draining"
        );
    }

    #[test]
    fn refuses_unknown_names_and_empty_pools() {
        let base = base();
        let none = BTreeMap::new();
        let doc = SharedConfig::default();
        let unknown_pool = doc.with_change(
            &base,
            &none,
            &Change::Strategy {
                pool: "nope".into(),
                strategy: StrategyKind::P2c,
            },
        );
        assert_eq!(unknown_pool, Err(ChangeError::UnknownPool("nope".into())));
        let unknown_backend = doc.with_change(
            &base,
            &none,
            &Change::Admin {
                pool: "app".into(),
                address: "127.0.0.1:1".into(),
                state: Some(AdminState::Draining),
            },
        );
        assert!(matches!(
            unknown_backend,
            Err(ChangeError::UnknownBackend { .. })
        ));
        let one = doc
            .with_change(
                &base,
                &none,
                &Change::RemoveBackend {
                    pool: "app".into(),
                    address: "127.0.0.1:9001".into(),
                },
            )
            .expect("one backend left");
        let empty = one.with_change(
            &base,
            &none,
            &Change::RemoveBackend {
                pool: "app".into(),
                address: "127.0.0.1:9002".into(),
            },
        );
        match empty {
            Err(ChangeError::Invalid(message)) => {
                assert!(message.contains("no backends"), "{message}")
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_document_holds_the_writes_it_was_built_on() {
        let base = base();
        let none = BTreeMap::new();
        let mut first = SharedConfig::default()
            .with_change(
                &base,
                &none,
                &Change::Strategy {
                    pool: "app".into(),
                    strategy: StrategyKind::P2c,
                },
            )
            .expect("valid");
        first.stamp(1, "node-1");
        first.mark_write("node-1", 100, 1);
        // node-2 builds on it: the new document holds both writes.
        let mut second = first
            .with_change(
                &base,
                &none,
                &Change::Weight {
                    pool: "app".into(),
                    address: "127.0.0.1:9001".into(),
                    weight: 3,
                },
            )
            .expect("valid");
        second.stamp(2, "node-2");
        second.mark_write("node-2", 200, 2);
        assert!(second.includes("node-1", 100, 1));
        assert!(second.includes("node-2", 200, 2));
        assert!(!second.includes("node-2", 200, 3), "a later write");
        // A restarted node-1 (a later generation) has not written into it.
        assert!(!second.includes("node-1", 300, 1));
        assert_eq!(second.latest_write("node-1", 100), Some(1));
        assert_eq!(second.latest_write("node-1", 300), None);
        // The marks travel with the document.
        let back = SharedConfig::from_json(&second.to_json()).expect("json");
        assert!(back.includes("node-1", 100, 1));
        // A concurrent write of the same version on another base does not hold it.
        let mut concurrent = SharedConfig::default();
        concurrent.stamp(1, "node-3");
        concurrent.mark_write("node-3", 400, 1);
        assert!(!concurrent.includes("node-1", 100, 1));
    }

    #[test]
    fn enable_prunes_the_entry() {
        let base = base();
        let none = BTreeMap::new();
        let drained = SharedConfig::default()
            .with_change(
                &base,
                &none,
                &Change::Admin {
                    pool: "app".into(),
                    address: "127.0.0.1:9001".into(),
                    state: Some(AdminState::Draining),
                },
            )
            .expect("valid");
        assert_eq!(
            drained.admin_state("app", "127.0.0.1:9001"),
            Some(AdminState::Draining)
        );
        let enabled = drained
            .with_change(
                &base,
                &none,
                &Change::Admin {
                    pool: "app".into(),
                    address: "127.0.0.1:9001".into(),
                    state: None,
                },
            )
            .expect("valid");
        assert!(enabled.pools.is_empty());
    }
}
