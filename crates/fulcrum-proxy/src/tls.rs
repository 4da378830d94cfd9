//! TLS in the data plane: termination on `http` listeners (the rustls server
//! configuration built from a listener's `tls` settings, swapped on reload so renewed
//! certificates take effect without a restart), and origination to a pool's backends
//! (`pools.*.tls`: the client configuration its connections and health checks use).

use std::sync::Arc;

use crate::upstream::UpstreamProtocol;
use arc_swap::ArcSwap;
use fulcrum_config::{TlsConfig, TlsVersion, UpstreamTlsConfig};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocols offered, in preference order (RFC 7301; `h2` per RFC 9113 §3.2;
/// `http/1.0`, which the HTTP/1 server speaks too, so a client offering only it — `curl
/// --http1.0` — is not refused with `no_application_protocol`).
const ALPN: [&[u8]; 3] = [b"h2", b"http/1.1", b"http/1.0"];

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
/// authentication, ALPN `h2`, `http/1.1`, then `http/1.0`.
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

/// TLS to a pool's backends: the connector and the name to verify, if fixed.
///
/// Clones share the connector, which [`UpstreamTls::rebuild`] and
/// [`UpstreamTls::install`] replace in place (a reload from the file re-reads `ca_file`
/// even when the configuration is unchanged, as listener certificates are re-read).
#[derive(Clone)]
pub struct UpstreamTls {
    /// rustls client configuration (trust roots, ALPN `http/1.1` or `h2`), swapped by
    /// `install`.
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    /// `server_name` when set; else each backend's own host is used.
    pub server_name: Option<ServerName<'static>>,
    /// The settings it was built from, for `rebuild`.
    settings: UpstreamTlsConfig,
    /// The protocol offered by ALPN.
    protocol: UpstreamProtocol,
}

impl UpstreamTls {
    /// The connector for a new connection.
    pub fn connector(&self) -> Arc<tokio_rustls::TlsConnector> {
        self.connector.load_full()
    }

    /// Builds the connector again from the same settings (re-reading `ca_file`, or the
    /// system trust store) without installing it; [`UpstreamTls::install`] puts it in
    /// place, so several pools can be re-read first and changed together.
    ///
    /// # Errors
    /// As [`upstream`]: the CA file or trust store cannot be used.
    pub fn rebuild(&self) -> Result<tokio_rustls::TlsConnector, String> {
        client_connector(&self.settings, self.protocol)
    }

    /// Installs a connector made by [`UpstreamTls::rebuild`]; new connections use it,
    /// open ones are unaffected.
    pub fn install(&self, connector: tokio_rustls::TlsConnector) {
        self.connector.store(Arc::new(connector));
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Builds the client side of `pools.*.tls`: trust `ca_file`'s certificates, or the
/// system's trust store when it is absent; TLS 1.2 and 1.3 with the *ring* provider's
/// defaults; ALPN `http/1.1` or `h2`, the pool's `protocol` (RFC 7301; an HTTP/2 pool
/// offers only `h2`, as RFC 9113 §3.2 requires of a client that knows the server speaks
/// it).
///
/// # Errors
/// A message naming the CA file that cannot be used, a system trust store with no
/// usable certificate, or an invalid `server_name`.
pub fn upstream(
    settings: &UpstreamTlsConfig,
    protocol: UpstreamProtocol,
) -> Result<UpstreamTls, String> {
    let connector = client_connector(settings, protocol)?;
    let server_name = settings
        .server_name
        .as_deref()
        .map(fulcrum_config::tls::server_name)
        .transpose()?;
    Ok(UpstreamTls {
        connector: Arc::new(ArcSwap::from_pointee(connector)),
        server_name,
        settings: settings.clone(),
        protocol,
    })
}

/// The rustls client of `settings`: its trust roots, the *ring* provider's defaults,
/// ALPN `http/1.1` or `h2` per `protocol`.
fn client_connector(
    settings: &UpstreamTlsConfig,
    protocol: UpstreamProtocol,
) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            for certificate in fulcrum_config::tls::read_ca_file(path)? {
                roots.add(certificate).map_err(|e| {
                    format!("`{}`: a CA certificate is unusable: {e}", path.display())
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(format!(
                    "no usable CA certificate in the system trust store ({} error(s)); set `ca_file`",
                    native.errors.len()
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![match protocol {
        UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
        UpstreamProtocol::Http2 => b"h2".to_vec(),
    }];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The TLS name of a backend address `host:port` (`[v6]:port`): its host as a DNS name or
/// IP address; the socket address's IP if the host is neither.
pub fn backend_server_name(address: &str, addr: std::net::SocketAddr) -> ServerName<'static> {
    let host = match address.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => address,
    };
    fulcrum_config::tls::server_name(host).unwrap_or_else(|_| ServerName::from(addr.ip()))
}
