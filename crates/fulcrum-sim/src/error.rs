//! Errors of starting a simulated backend.

use std::net::SocketAddr;

/// Why [`start_backend`](crate::start_backend) could not start a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error(
        "cannot listen on {addr}: {source}; pick another --listen address (port 0 picks a free one)"
    )]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// An option is out of range; `option` is its command-line name without dashes.
    #[error("invalid --{option}: {message}")]
    InvalidOption {
        /// Command-line name of the option, e.g. `fail-rate`.
        option: &'static str,
        /// What is wrong with the value.
        message: String,
    },
    /// A settings change given to [`BackendHandle::control`](crate::BackendHandle::control)
    /// has a bad parameter.
    #[error("invalid settings change: {message}")]
    InvalidControl {
        /// The parameter and what is wrong with it.
        message: String,
    },
}
