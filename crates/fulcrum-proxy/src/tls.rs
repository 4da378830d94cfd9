//! TLS termination on `http` listeners: the rustls server configuration built from a
//! listener's `tls` settings, swapped on reload so renewed certificates take effect
//! without a restart.

use std::sync::Arc;

use arc_swap::ArcSwap;
use fulcrum_config::{TlsConfig, TlsVersion};
use rustls::ServerConfig;

/// ALPN protocols offered, in preference order (RFC 7301; `h2` per RFC 9113 §3.2).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A listener's TLS settings and the server configuration built from them.
#[derive(Debug)]
pub struct TlsState {
    /// The settings the configuration was built from (re-read on reload).
    pub settings: TlsConfig,
    /// The rustls configuration new handshakes use.
    pub config: Arc<ServerConfig>,
}

/// A listener's TLS state, swapped whole on reload; connections already open keep the
/// configuration they were accepted with.
pub type SwappableTls = ArcSwap<TlsState>;

/// Reads `settings`' certificate chain and key and builds the server configuration:
/// the ring provider's default cipher suites, TLS 1.2 and 1.3 (or 1.3 only), no client
/// authentication, ALPN `h2` then `http/1.1`.
///
/// # Errors
/// A message naming the file at fault (unreadable, not PEM, no certificate or key) or,
/// from rustls, a key that does not match the certificate or is of an unsupported type.
pub fn build(settings: &TlsConfig) -> Result<TlsState, String> {
    let material = fulcrum_config::tls::read_pem(settings).map_err(|e| e.message)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(material.certificates, material.private_key)
        .map_err(|e| {
            format!(
                "certificate `{}` with key `{}`: {e}",
                settings.certificate.display(),
                settings.private_key.display()
            )
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsState {
        settings: settings.clone(),
        config: Arc::new(config),
    })
}
