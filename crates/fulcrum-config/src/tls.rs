//! Reading TLS certificate chains, private keys and CA bundles (PEM), shared by the
//! validator (so `fulcrum check` and reloads report a bad file at its config line) and the
//! data plane (which builds the rustls configurations from the result).

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate chain (leaf first) and its private key, parsed from PEM.
#[derive(Debug)]
pub struct TlsMaterial {
    /// DER certificates in file order (leaf first); never empty.
    pub certificates: Vec<CertificateDer<'static>>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PrivateKeyDer<'static>,
}

/// Which file of a certificate pair a [`TlsFileError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    /// `certificate`.
    Certificate,
    /// `private_key`.
    PrivateKey,
}

impl TlsFile {
    /// The config key: `certificate` or `private_key`.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Certificate => "certificate",
            TlsFile::PrivateKey => "private_key",
        }
    }
}

/// A TLS file that cannot be used, and why (the message names the path).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsFileError {
    /// The file at fault.
    pub file: TlsFile,
    /// What is wrong, naming the path.
    pub message: String,
}

/// Reads and parses a certificate chain file and its private key file.
///
/// # Errors
/// [`TlsFileError`] naming the first file that is unreadable, is not PEM, holds no
/// certificate (`certificate`) or no private key (`private_key`).
pub fn read_pair(
    certificate: &std::path::Path,
    private_key: &std::path::Path,
) -> Result<TlsMaterial, TlsFileError> {
    let certificates =
        read_certificates(certificate, ", leaf first").map_err(|message| TlsFileError {
            file: TlsFile::Certificate,
            message,
        })?;
    let path = private_key.display();
    let private_key = PrivateKeyDer::from_pem_file(private_key).map_err(|e| TlsFileError {
        file: TlsFile::PrivateKey,
        message: match e {
            pem::Error::NoItemsFound => format!(
                "`{path}` holds no private key (expected a PKCS#8, PKCS#1 or SEC1 PEM block)"
            ),
            pem::Error::Io(_) => format!("cannot read `{path}`: {}", describe(&e)),
            _ => format!("`{path}` is not valid PEM: {}", describe(&e)),
        },
    })?;
    Ok(TlsMaterial {
        certificates,
        private_key,
    })
}

fn describe(e: &pem::Error) -> String {
    let text = |bytes: &[u8]| {
        let s = String::from_utf8_lossy(bytes);
        let s = s.trim();
        match s.char_indices().nth(60) {
            Some((end, _)) => format!("{}…", &s[..end]),
            None => s.to_owned(),
        }
    };
    match e {
        pem::Error::Io(io) => io.to_string(),
        pem::Error::MissingSectionEnd { end_marker } => {
            format!("a section has no `{}` line", text(end_marker))
        }
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed `-----BEGIN` line `{}`", text(line))
        }
        pem::Error::Base64Decode(reason) => format!("bad base64 inside a section ({reason})"),
        other => other.to_string(),
    }
}

/// The DNS names (subject alternative names, RFC 5280 §4.2.1.6) of leaf certificate
/// `leaf`, lowercased, wildcards (`*.example.com`) included: the names SNI selects it
/// by. Not a verification: the client verifies the certificate it is served.
///
/// # Errors
/// A message when `leaf` is not a parsable X.509 certificate.
pub fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the leaf certificate cannot be parsed: {e}"))?;
    Ok(cert
        .valid_dns_names()
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
        .collect())
}

/// Reads a PEM bundle of CA certificates (`pools.*.tls.ca_file`,
/// `listeners[].tls.client_ca`).
///
/// # Errors
/// A message naming `path` when it is unreadable, not PEM, or holds no certificate.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    read_certificates(path, "")
}

/// The certificates of PEM file `path`, in file order; a message naming the path when it
/// is unreadable, not PEM, or holds none (`order`, e.g. ", leaf first", completes the
/// hint of what was expected).
fn read_certificates(
    path: &std::path::Path,
    order: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read `{shown}`: {}", describe(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| match e {
            // Opening succeeds on a directory; reading it fails.
            pem::Error::Io(_) => format!("cannot read `{shown}`: {}", describe(&e)),
            _ => format!("`{shown}` is not valid PEM: {}", describe(&e)),
        })?;
    if certificates.is_empty() {
        return Err(format!(
            "`{shown}` holds no certificate (expected `-----BEGIN CERTIFICATE-----` blocks{order})"
        ));
    }
    Ok(certificates)
}

/// Parses a TLS server name: a DNS name or an IP address (`pools.*.tls.server_name`, or
/// a backend address's host).
///
/// # Errors
/// A message when `name` is neither.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| format!("`{name}` is not a DNS name or IP address"))
}
