//! Log setup: `tracing` to stderr, text or JSON, filtered by `log.level` (or `RUST_LOG`,
//! which wins when set, as operators of Rust services expect).

use std::io::IsTerminal;

use fulcrum_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Replaces the installed subscriber's filter with a `log.level` directive.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How to change the level of the subscriber [`init`] installed (unset before, or when
/// another subscriber was already installed).
static SET_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

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
    let set_level: Option<SetLevel> = match config.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok().map(|()| level_setter(handle))
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok().map(|()| level_setter(handle))
        }
    };
    // None: already installed (only in tests that run several commands in one process).
    if let Some(set_level) = set_level {
        let _ = SET_LEVEL.set(set_level);
    }
}

/// A [`SetLevel`] that swaps the filter behind `handle`.
fn level_setter<S: 'static>(handle: tracing_subscriber::reload::Handle<EnvFilter, S>) -> SetLevel
where
    tracing_subscriber::reload::Handle<EnvFilter, S>: Send + Sync,
{
    Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Applies a reloaded configuration's `log.level`, unless `RUST_LOG` is set (it wins, as
/// at start). Returns what happened, for the reload's log; `None` when nothing changed.
pub fn set_level(previous: &str, level: &str) -> Option<String> {
    if previous == level {
        return None;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        return Some(format!(
            "log.level `{level}` not applied: RUST_LOG is set and wins"
        ));
    }
    let set = SET_LEVEL.get()?;
    Some(match set(level) {
        Ok(()) => format!("log.level is now `{level}`"),
        Err(error) => format!("log.level `{level}` not applied: {error}"),
    })
}
