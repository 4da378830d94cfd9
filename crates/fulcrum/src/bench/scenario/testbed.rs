//! One scenario run's world: simulated backends and a node balancing them, started fresh
//! and stopped after; and the plain-text table the scenarios print.

use std::fmt::Write as _;

use fulcrum_proxy::Node;
use fulcrum_proxy::spec::node_spec;
use fulcrum_sim::{BackendArgs, BackendHandle, BackendStatsSnapshot, start_backend};
use http::Uri;

use super::ScenarioError;

/// Worker threads of the node under test: one, so the load generator and the simulated
/// backends keep the rest of the machine.
const NODE_THREADS: usize = 1;

/// Why a test bed could not start.
#[derive(Debug)]
pub(crate) enum BedError {
    /// This build refuses the node configuration (a key or strategy it does not have);
    /// the strategy is reported as unavailable.
    Config(String),
    /// A backend or the node could not start.
    Runtime(String),
}

impl From<BedError> for ScenarioError {
    fn from(error: BedError) -> Self {
        match error {
            BedError::Config(message) | BedError::Runtime(message) => {
                ScenarioError::Runtime(message)
            }
        }
    }
}

/// Simulated backends and a node with one pool over them, on 127.0.0.1 ephemeral ports.
pub(crate) struct TestBed {
    /// The backends, in pool order.
    pub backends: Vec<BackendHandle>,
    node: Node,
    /// `http://<node listener>/`.
    pub url: Uri,
}

impl TestBed {
    /// Starts `backends`, then a node whose pool `bench` balances them with `strategy`;
    /// `pool_extra` are YAML lines added to the pool (`stats: {…}`, `hash: {…}`).
    ///
    /// The node's configuration is written as YAML and goes through
    /// [`fulcrum_config::parse`], the path `fulcrum run` takes, so a scenario tests what an
    /// operator would run, and a key this build does not know is reported as such.
    /// Starts the bed for strategy `name` (`kind` is `None` when this build does not have
    /// it): `Ok(Err(reason))` when the strategy cannot run in this build, so the scenario
    /// reports it as unavailable and goes on; `Err` when a backend or the node fails.
    pub(crate) async fn start_for(
        name: &str,
        kind: Option<fulcrum_balance::StrategyKind>,
        backends: Vec<BackendArgs>,
        pool_extra: &[&str],
    ) -> Result<Result<TestBed, String>, ScenarioError> {
        if kind.is_none() {
            return Ok(Err("not in this build".to_owned()));
        }
        match Self::start(name, backends, pool_extra).await {
            Ok(bed) => Ok(Ok(bed)),
            Err(BedError::Config(reason)) => Ok(Err(reason)),
            Err(error) => Err(error.into()),
        }
    }

    pub(crate) async fn start(
        strategy: &str,
        backends: Vec<BackendArgs>,
        pool_extra: &[&str],
    ) -> Result<TestBed, BedError> {
        let mut handles = Vec::with_capacity(backends.len());
        for args in backends {
            let handle = start_backend(args)
                .await
                .map_err(|e| BedError::Runtime(format!("cannot start a simulated backend: {e}")))?;
            handles.push(handle);
        }
        let yaml = node_yaml(strategy, &handles, pool_extra);
        let config = fulcrum_config::parse(&yaml, "bench scenario").map_err(|e| {
            BedError::Config(e.to_string().lines().next().unwrap_or_default().to_owned())
        })?;
        let spec =
            node_spec(&config, Some(NODE_THREADS)).map_err(|e| BedError::Config(e.to_string()))?;
        let node = Node::start(&spec)
            .map_err(|e| BedError::Runtime(format!("cannot start the node: {e}")))?;
        let address = node
            .listeners()
            .first()
            .map(|listener| listener.local_addr)
            .ok_or_else(|| BedError::Runtime("the node has no listener".to_owned()))?;
        let url = format!("http://{address}/")
            .parse()
            .map_err(|e| BedError::Runtime(format!("listener address {address}: {e}")))?;
        Ok(TestBed {
            backends: handles,
            node,
            url,
        })
    }

    /// The backends' counters now, in pool order.
    pub(crate) fn backend_stats(&self) -> Vec<BackendStatsSnapshot> {
        self.backends.iter().map(BackendHandle::stats).collect()
    }

    /// Stops the node (draining what is in flight, at most a second) and the backends.
    pub(crate) async fn stop(self) {
        self.node.shutdown().await;
        for backend in self.backends {
            backend.shutdown().await;
        }
    }
}

/// The configuration of the node under test: one listener, one pool named `bench`, no
/// health checks (backends never fail here) and a short drain.
fn node_yaml(strategy: &str, backends: &[BackendHandle], pool_extra: &[&str]) -> String {
    let mut yaml = format!(
        "runtime:\n  drain_timeout: 1s\n\
         admin:\n  listen: 127.0.0.1:0\n\
         listeners:\n  - name: bench\n    listen: 127.0.0.1:0\n    routes:\n      - pool: bench\n\
         pools:\n  bench:\n    strategy: {strategy}\n    backends:\n"
    );
    for backend in backends {
        let _ = writeln!(yaml, "      - address: {}", backend.local_addr);
    }
    for line in pool_extra {
        let _ = writeln!(yaml, "    {line}");
    }
    yaml
}

/// A plain-text table: the first `left` columns left-aligned, the rest right-aligned.
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    left: usize,
}

impl Table {
    pub(crate) fn new(header: &[&str], left: usize) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            left,
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let columns = self.header.len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let width = widths.get(c).copied().unwrap_or(0);
                if c > 0 {
                    line.push_str("  ");
                }
                if c < self.left {
                    let _ = write!(line, "{cell:<width$}");
                } else {
                    let _ = write!(line, "{cell:>width$}");
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["strategy", "p99"], 1);
        table.row(vec!["round_robin".into(), "1.50".into()]);
        table.row(vec!["p2c".into(), "12.25".into()]);
        assert_eq!(
            table.render(),
            "strategy       p99\nround_robin   1.50\np2c          12.25\n"
        );
    }
}
