//! TLS in the data plane: termination on `http` listeners (the rustls server
//! configuration built from a listener's `tls` settings, swapped on reload so renewed
//! certificates take effect without a restart), and origination to a pool's backends
//! (`pools.*.tls`: the client configuration its connections and health checks use).

use std::sync::Arc;

use crate::upstream::UpstreamProtocol;
use arc_swap::ArcSwap;
use std::collections::HashMap;

use fulcrum_config::{ClientAuth, TlsConfig, TlsVersion, UpstreamTlsConfig};
use rustls::pki_types::ServerName;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
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

impl TlsState {
    /// Whether clients are asked for a certificate (`client_ca` set): then the
    /// connection's requests carry `X-Forwarded-Client-Cert` as Fulcrum sets it, never as
    /// the client sent it.
    pub fn verifies_clients(&self) -> bool {
        self.settings.client_ca.is_some()
    }
}

/// A listener's TLS state, swapped whole on reload; connections already open keep the
/// configuration they were accepted with.
pub type SwappableTls = ArcSwap<TlsState>;

/// Reads `settings`' certificate chains and keys (and `client_ca`) and builds the server
/// configuration: the ring provider's default cipher suites, TLS 1.2 and 1.3 (or 1.3
/// only), certificates chosen by SNI ([`SniResolver`]), client certificates verified
/// against `client_ca` when set (RFC 5280 path validation by rustls's webpki verifier;
/// required unless `client_auth: optional`), ALPN `h2`, `http/1.1`, then `http/1.0`.
///
/// # Errors
/// A message naming the file at fault (unreadable, not PEM, no certificate or key, a
/// CA bundle rustls cannot use) or, from rustls, a key that does not match its
/// certificate or is of an unsupported type.
pub fn build(settings: &TlsConfig) -> Result<TlsState, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = SniResolver::load(settings, &provider)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = Arc::new(roots_from(path)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = match settings.client_auth.unwrap_or_default() {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("`client_ca` `{}`: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsState {
        settings: settings.clone(),
        config: Arc::new(config),
    })
}

/// The trust roots of PEM bundle `path`.
fn roots_from(path: &std::path::Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for certificate in fulcrum_config::tls::read_ca_file(path)? {
        roots
            .add(certificate)
            .map_err(|e| format!("`{}`: a CA certificate is unusable: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A certificate chain and key read from `certificate` and `private_key`, checked to
/// match (rustls's `CertifiedKey::from_der`).
fn certified_key(
    certificate: &std::path::Path,
    private_key: &std::path::Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(CertifiedKey, Vec<String>), String> {
    let material =
        fulcrum_config::tls::read_pair(certificate, private_key).map_err(|e| e.message)?;
    let names = fulcrum_config::tls::dns_names(&material.certificates[0])
        .map_err(|e| format!("`{}`: {e}", certificate.display()))?;
    let key = CertifiedKey::from_der(material.certificates, material.private_key, provider)
        .map_err(|e| {
            let e = match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "the private key does not belong to the certificate's leaf".to_owned()
                }
                other => other.to_string(),
            };
            format!(
                "certificate `{}` with key `{}`: {e}",
                certificate.display(),
                private_key.display()
            )
        })?;
    Ok((key, names))
}

/// Checks that PEM files `certificate` and `private_key` hold a chain and the key of
/// its leaf, as a listener or pool would load them (for `fulcrum check`).
///
/// # Errors
/// As [`build`]: a file that cannot be used, or a key that does not match.
pub fn check_pair(
    certificate: &std::path::Path,
    private_key: &std::path::Path,
) -> Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    certified_key(certificate, private_key, &provider).map(|_| ())
}

/// Chooses a listener's certificate by the client's SNI (RFC 6066 §3): the certificate
/// whose leaf names the server name exactly, else one whose `*.` wildcard covers its
/// first label (RFC 6125 §6.4.3: one label only), else the default `certificate` —
/// which also answers clients that send no SNI (IP literals) — unless `strict_sni`, when
/// the handshake is refused. As HAProxy's `crt` list with its first certificate the
/// default, and `strict-sni`.
///
/// Names are taken from each leaf's DNS subject alternative names at load; the first
/// certificate in configuration order (the default first) keeps a name two share. A
/// lookup is one or two hash probes on the name rustls has already lowercased.
#[derive(Debug)]
pub struct SniResolver {
    /// Exact names and wildcard names (`*.example.com` stored as is) → certificate.
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// The default certificate (`certificate`); `None` with `strict_sni`.
    fallback: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// Reads every certificate of `settings` and indexes it by its DNS names.
    ///
    /// # Errors
    /// As [`build`]: a file that cannot be used or a key that does not match.
    pub fn load(
        settings: &TlsConfig,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        let mut fallback = None;
        for (_, certificate, private_key) in settings.pairs() {
            let (key, names) = certified_key(certificate, private_key, provider)?;
            let key = Arc::new(key);
            for name in names {
                by_name.entry(name).or_insert_with(|| Arc::clone(&key));
            }
            fallback.get_or_insert(key);
        }
        Ok(Self {
            by_name,
            fallback: if settings.strict_sni { None } else { fallback },
        })
    }

    /// The certificate for server name `sni` (lowercase, as rustls passes it), or for a
    /// client that sent none.
    pub fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni else {
            return self.fallback.clone();
        };
        // A fully qualified `a.example.com.` names the same host.
        let name = name.strip_suffix('.').unwrap_or(name);
        if let Some(key) = self.by_name.get(name) {
            return Some(Arc::clone(key));
        }
        // `*.example.com` covers `a.example.com`, not `example.com` nor `a.b.example.com`.
        if let Some((_, parent)) = name.split_once('.')
            && parent.contains('.')
            && let Some(key) = self.by_name.get(&format!("*.{parent}"))
        {
            return Some(Arc::clone(key));
        }
        self.fallback.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(client_hello.server_name())
    }
}

/// The `X-Forwarded-Client-Cert` value for a client that presented `chain` (leaf first)
/// on a listener with `client_ca`, in Envoy's format: `Hash=` the lowercase hex SHA-256
/// of the leaf's DER, then each URI subject alternative name as `URI=` (a SPIFFE ID, for
/// example) and each DNS name as `DNS=`, separated by `;` (Envoy's
/// `forward_client_cert_details: SANITIZE_SET` with `set_current_client_cert_details`
/// `uri` and `dns`). `None` for no certificate. Computed once per connection.
pub fn forwarded_client_cert(
    chain: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Option<http::HeaderValue> {
    use std::fmt::Write;
    let leaf = chain?.first()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let mut value = String::from("Hash=");
    for byte in digest.as_ref() {
        let _ = write!(value, "{byte:02x}");
    }
    if let Ok(cert) = webpki::EndEntityCert::try_from(leaf) {
        // Values with `"`, `,`, `;` or `=` (or anything not visible ASCII) would break the
        // field's syntax; such names are left out rather than escaped.
        let plain = |name: &&str| {
            name.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'='))
        };
        for uri in cert.valid_uri_names().filter(plain) {
            let _ = write!(value, ";URI={uri}");
        }
        for dns in cert.valid_dns_names().filter(plain) {
            let _ = write!(value, ";DNS={dns}");
        }
    }
    http::HeaderValue::try_from(value).ok()
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

    /// The settings it was built from.
    pub fn settings(&self) -> &UpstreamTlsConfig {
        &self.settings
    }

    /// Installs a connector made by [`UpstreamTls::rebuild`]; new connections use it,
    /// open ones are unaffected (the caller closes pooled ones).
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
        Some(path) => roots = roots_from(path)?,
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
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots);
    let mut config = match (&settings.certificate, &settings.private_key) {
        (Some(certificate), Some(private_key)) => {
            let material =
                fulcrum_config::tls::read_pair(certificate, private_key).map_err(|e| e.message)?;
            builder
                .with_client_auth_cert(material.certificates, material.private_key)
                .map_err(|e| {
                    format!(
                        "client certificate `{}` with key `{}`: {e}",
                        certificate.display(),
                        private_key.display()
                    )
                })?
        }
        _ => builder.with_no_client_auth(),
    };
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
