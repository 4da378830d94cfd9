//! Log setup: `tracing` to stderr, text or JSON, filtered by `log.level` (or `RUST_LOG`,
//! which wins when set, as operators of Rust services expect).

use std::io::IsTerminal;

use fulcrum_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. A filter that does not parse falls back to `info`
/// (the configuration validator has already checked `log.level`).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // Already installed (only in tests that run several commands in one process).
    drop(installed);
}
