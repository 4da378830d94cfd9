//! Fulcrum's backend simulator: an HTTP server whose latency, capacity, failures, cache and
//! health are set on the command line and changed at run time, used by `fulcrum backend`,
//! `fulcrum demo`, the benchmarks and the end-to-end tests; and [`loadgen`], the open-loop
//! load generator of `fulcrum bench`.
//!
//! It sits at the far end of the request flow: Fulcrum forwards to it as to any upstream.
//! [`start_backend`] binds, serves HTTP/1.1 (and HTTP/2 cleartext) on background tasks, and
//! returns a [`BackendHandle`]; the CLI prints [`BackendHandle::ready_line`] so that whoever
//! started the process learns the address.
//!
//! # Endpoints
//! | path | answer |
//! | --- | --- |
//! | `GET /health` | 200 `{"status":"ok","name":…}`; 503 `{"status":"unhealthy",…}` after `/control?healthy=false`. Never delayed or failed. |
//! | `GET /stats` | [`BackendStatsSnapshot`] as JSON. |
//! | `GET\|POST /control?…` | changes [`Settings`]: `delay_ms`, `latency`, `fail`, `slow_factor`, `capacity`, `healthy`, `cache_size`, `cache_miss_ms` (query string, or a form body on POST); returns the new settings; 400 naming the parameter on a bad value (nothing is changed then). |
//! | `/echo` (any method) | streams the request body back; `x-echo-host`, `x-echo-x-forwarded-for`, `-proto`, `-host`, `-client-cert` reflect those request headers. |
//! | `GET /download?bytes=N` | N bytes (default 1 MiB, at most 1 GiB) of the [`DownloadPattern`] stream in 64 KiB chunks, SHA-256 in `x-content-sha256`. |
//! | `GET /ws` | WebSocket echo of text and binary messages. |
//! | anything else | the work endpoint: waits for capacity (FIFO), looks its cache key (`x-cache-key` header or `?key=`) up in the LRU cache when `cache_size` > 0 (a miss adds `cache_miss_ms`), sleeps the latency × slow factor (`?delay_ms=N` or `?delay=N` overrides the latency for one request), answers 200 `{"backend":…,"path":…,"method":…}`, or 503 `{"error":{"code":"injected_failure",…}}` at the fail rate. |
//!
//! Every response carries `x-backend: <name>`. Errors use the project's shape
//! `{"error":{"code":…,"message":…}}`.

mod args;
mod error;
pub mod latency;
pub mod loadgen;
mod pattern;
mod routes;
mod server;
mod settings;
mod state;
mod ws;

pub use args::BackendArgs;
pub use error::SimError;
pub use latency::LatencySpec;
pub use pattern::{DOWNLOAD_CHUNK, DownloadPattern, MAX_DOWNLOAD_BYTES, pattern_sha256};
pub use routes::{BACKEND_HEADER, CACHE_KEY_HEADER, CONTENT_SHA256_HEADER};
pub use server::{BackendHandle, start_backend};
pub use settings::{
    DEFAULT_CACHE_MISS_MS, MAX_CACHE_SIZE, MAX_CAPACITY, MAX_SLOW_FACTOR, Settings,
};
pub use state::BackendStatsSnapshot;
