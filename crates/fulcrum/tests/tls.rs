//! TLS termination end to end: a real node with a `tls` listener, certificates made by
//! rcgen at test time, a rustls client that trusts only the test CA, HTTP/1.1 and HTTP/2
//! chosen by ALPN, certificate renewal on reload, refused bad files, certificates chosen
//! by SNI, and client certificates (mutual TLS) on listeners and towards backends.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Backend, Node};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, CertifiedIssuer, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

/// A test CA that issues leaf certificates for `localhost` and 127.0.0.1.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = name("Fulcrum test CA");
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// A leaf with common name `cn`: (certificate PEM, key PEM, certificate DER).
    fn leaf(&self, cn: &str) -> (String, String, Vec<u8>) {
        self.leaf_for(cn, &["localhost", "127.0.0.1"], &[])
    }

    /// A leaf with common name `cn`, subject alternative names `names` (DNS names or IP
    /// addresses) and `uris` (URI names): (certificate PEM, key PEM, certificate DER).
    fn leaf_for(&self, cn: &str, names: &[&str], uris: &[&str]) -> (String, String, Vec<u8>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("leaf params");
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*uri).expect("an ASCII URI"),
            ));
        }
        params.distinguished_name = name(cn);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn client(&self, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        self.client_with(alpn, None)
    }

    /// A client trusting this CA that presents `identity` (certificate PEM, key PEM),
    /// if given, to servers asking for a client certificate.
    fn client_with(
        &self,
        alpn: &[u8],
        identity: Option<(&str, &str)>,
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.issuer.der().clone())
            .expect("the CA certificate is valid");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                use rustls::pki_types::pem::PemObject;
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client certificate PEM");
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .expect("client key PEM");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("a matching client key")
            }
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// What one HTTPS request saw: the negotiated ALPN protocol, the server's leaf
/// certificate, the response version, status, `x-echo-x-forwarded-proto`,
/// `x-echo-x-forwarded-client-cert` and body.
struct Seen {
    alpn: Vec<u8>,
    leaf: Vec<u8>,
    version: http::Version,
    status: u16,
    forwarded_proto: String,
    client_cert: String,
    body: String,
}

/// `GET /echo` over a new TLS connection to `addr`, asking for ALPN `alpn`.
async fn get(ca: &Ca, addr: std::net::SocketAddr, alpn: &[u8]) -> Seen {
    let connector = ca.client(alpn);
    request(&connector, addr, "localhost", &[])
        .await
        .expect("an HTTPS request with a certificate the test CA issued")
}

/// `GET /echo` with `headers` over a new TLS connection from `connector` to `addr`,
/// verifying the server as `server_name` (a DNS name is sent as SNI, an IP address is
/// not). `Err` says where it failed: the handshake, or the request (with TLS 1.3 a
/// server's refusal of the client certificate arrives after the client's handshake).
async fn request(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    server_name: &str,
    headers: &[(&str, &str)],
) -> Result<Seen, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(server_name.to_owned()).expect("a DNS name or IP");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let negotiated = session.alpn_protocol().unwrap_or_default().to_vec();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c: &CertificateDer<'_>| c.to_vec())
        .expect("a server certificate");
    let io = TokioIo::new(tls);
    let mut request = http::Request::get("https://localhost/echo").header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<bytes::Bytes>::new()).expect("request");
    let response = if negotiated == b"h2" {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        sender.send_request(request).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        sender.send_request(request).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let version = response.version();
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let forwarded_proto = header("x-echo-x-forwarded-proto");
    let client_cert = header("x-echo-x-forwarded-client-cert");
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Seen {
        alpn: negotiated,
        leaf,
        version,
        status,
        forwarded_proto,
        client_cert,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), cert).expect("write cert");
    std::fs::write(dir.join("key.pem"), key).expect("write key");
}

fn config(dir: &Path, backend: &Backend) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    tls:\n      certificate: {}\n      private_key: {}\n    routes:\n      - pool: app\n  - name: plain\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: {}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        backend.address()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_alpn_renewal_on_reload_and_bad_files_refused() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key, first_der) = ca.leaf("first");
    write_pair(dir.path(), &cert, &key);
    let backend = Backend::start("b1", &[]);
    let yaml = config(dir.path(), &backend);
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];

    // HTTP/1.1 and HTTP/2 by ALPN; backends learn the client used https.
    let h1 = get(&ca, addr, b"http/1.1").await;
    assert_eq!(h1.alpn, b"http/1.1");
    assert_eq!(h1.version, http::Version::HTTP_11);
    assert_eq!(h1.status, 200, "{}", h1.body);
    assert_eq!(h1.forwarded_proto, "https");
    assert_eq!(h1.leaf, first_der);
    let h2 = get(&ca, addr, b"h2").await;
    assert_eq!(h2.alpn, b"h2");
    assert_eq!(h2.version, http::Version::HTTP_2);
    assert_eq!(h2.status, 200, "{}", h2.body);
    assert_eq!(h2.forwarded_proto, "https");
    // A client offering only http/1.0 (curl --http1.0) is served, not refused.
    let h10 = get(&ca, addr, b"http/1.0").await;
    assert_eq!(h10.alpn, b"http/1.0");
    assert_eq!(h10.status, 200, "{}", h10.body);

    // Plain HTTP to the TLS port is a failed handshake, counted; no request reaches a backend.
    let plain = common::client()
        .get(format!("http://{addr}/echo"))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    // Counted once the server side has given up on it, which may be just after the
    // client saw the connection close.
    let metrics = common::eventually(
        common::DEADLINE,
        "the failed handshake counted",
        async || {
            let metrics = node.metrics().await;
            metrics
                .contains(r#"fulcrum_tls_handshakes_total{listener="web",result="error"} 1"#)
                .then_some(metrics)
        },
    )
    .await;
    assert!(
        metrics.contains(r#"fulcrum_tls_handshakes_total{listener="web",result="ok"} 3"#),
        "{metrics}"
    );
    // A plain-text listener beside it says `http`, and has no handshake series.
    assert!(!metrics.contains(r#"fulcrum_tls_handshakes_total{listener="plain""#));
    let beside = common::client()
        .get(format!("{}/echo", node.url("plain")))
        .send()
        .await
        .expect("plain request");
    assert_eq!(beside.status(), 200);
    assert_eq!(beside.headers()["x-echo-x-forwarded-proto"], "http");

    // A renewed certificate in the same files. A run-time change that is not a reload
    // from the file (here a backend added through the API, which reloads the node's
    // pools) keeps the running certificate and its session cache; a reload picks the new
    // one up for new connections, even though the configuration is unchanged.
    let (cert, key, second_der) = ca.leaf("second");
    write_pair(dir.path(), &cert, &key);
    let b2 = Backend::start("b2", &[]);
    let (status, body) = node
        .api_post(
            "/api/pools/app/backends",
            Some(serde_json::json!({"address": b2.address()})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let v = node.api("/api/pools/app/backends").await;
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(2), "{v}");
    let changed = get(&ca, addr, b"http/1.1").await;
    assert_eq!(changed.status, 200);
    assert_eq!(
        changed.leaf, first_der,
        "a pool change does not reload certificates"
    );
    let (status, body) = node.api_post("/api/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let renewed = get(&ca, addr, b"http/1.1").await;
    assert_eq!(renewed.status, 200);
    assert_eq!(
        renewed.leaf, second_der,
        "the renewed certificate is served"
    );

    // A key that does not match the certificate: the reload is refused, naming both
    // files, and the running certificate stays.
    let (_, other_key, _) = ca.leaf("third");
    std::fs::write(dir.path().join("key.pem"), other_key).expect("write key");
    let (status, body) = node.api_post("/api/reload", None).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("key.pem"), "{message}");
    assert!(
        message.contains("listeners[0].tls.private_key")
            && message.contains("does not belong to the certificate"),
        "{message}"
    );
    // An unreadable key file is named too.
    std::fs::remove_file(dir.path().join("key.pem")).expect("remove key");
    let (status, body) = node.api_post("/api/reload", None).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("listeners[0].tls.private_key") && message.contains("cannot read"),
        "{message}"
    );
    let still = get(&ca, addr, b"h2").await;
    assert_eq!(still.status, 200);
    assert_eq!(
        still.leaf, second_der,
        "the last good certificate is still served"
    );
}

#[test]
fn check_names_a_missing_certificate_at_its_line() {
    let backend_free = "127.0.0.1:9";
    let (code, stderr, _) = common::check(&format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    tls:\n      certificate: /nonexistent/cert.pem\n      private_key: /nonexistent/key.pem\n    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: {backend_free}\n"
    ));
    assert_eq!(code, 2);
    assert!(
        stderr.contains(":5:") && stderr.contains("listeners[0].tls.certificate"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cannot read `/nonexistent/cert.pem`"),
        "{stderr}"
    );

    // A key that is not the certificate's: found by `check` too, at the key's line.
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, _, _) = ca.leaf("one");
    let (_, other_key, _) = ca.leaf("two");
    write_pair(dir.path(), &cert, &other_key);
    let (code, stderr, _) = common::check(&format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    tls:\n      certificate: {}\n      private_key: {}\n    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: {backend_free}\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(":6:")
            && stderr.contains("listeners[0].tls.private_key")
            && stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );
}

/// `pools.*.tls`: a node speaks TLS to its backends, verifying them against `ca_file` —
/// here the backend is another node's TLS listener, in front of a plain simulator — and
/// health checks go over TLS too; an untrusted certificate fails both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_speak_tls_to_backends_and_refuse_untrusted_ones() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key, _) = ca.leaf("backend");
    write_pair(dir.path(), &cert, &key);
    std::fs::write(dir.path().join("ca.pem"), ca.issuer.pem()).expect("write CA");
    let other = Ca::new();
    std::fs::write(dir.path().join("other-ca.pem"), other.issuer.pem()).expect("write CA");
    let simulator = Backend::start("b1", &[]);
    let tls_backend = Node::start(&config(dir.path(), &simulator));
    let backend_addr = tls_backend.listeners["web"];

    let front_with = |ca_file: &str, protocol: &str| {
        Node::start(&format!(
            "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    protocol: {protocol}\n    tls: {{ ca_file: {} }}\n    health_check: {{ path: /health, interval: 300ms, timeout: 250ms, rise: 1, fall: 3 }}\n    retry: {{ attempts: 1 }}\n    backends:\n      - address: {backend_addr}\n",
            dir.path().join(ca_file).display()
        ))
    };
    let front = |ca_file: &str| front_with(ca_file, "http1");

    // Trusted: the request crosses TLS (the TLS listener says `https` to the simulator),
    // and the backend stays healthy under TLS health checks.
    let trusting = front("ca.pem");
    let r = common::client()
        .get(format!("{}/echo", trusting.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-echo-x-forwarded-proto"], "https");
    let checks = common::eventually(common::DEADLINE, "TLS health checks pass", async || {
        let m = tls_backend.metrics().await;
        let line = m
            .lines()
            .find(|l| l.starts_with(r#"fulcrum_tls_handshakes_total{listener="web",result="ok"}"#))?
            .to_owned();
        let n: u64 = line.rsplit(' ').next()?.parse().ok()?;
        (n >= 3).then_some(n)
    })
    .await;
    assert!(checks >= 3);
    let v = trusting.api("/api/pools/app/backends").await;
    assert_eq!(v["backends"][0]["state"], "healthy", "{v}");

    // `protocol: http2` over TLS: ALPN offers only `h2`, so an answer means the backend
    // agreed to HTTP/2 (a TLS listener that did not would fail the handshake); its
    // health checks pass over HTTP/2 as well.
    let h2_front = front_with("ca.pem", "http2");
    let r = common::client()
        .get(format!("{}/echo", h2_front.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-echo-x-forwarded-proto"], "https");
    let handshakes = async || {
        let m = tls_backend.metrics().await;
        common::metric_value(
            &m,
            "fulcrum_tls_handshakes_total",
            r#"listener="web",result="ok""#,
        )
    };
    let before = handshakes().await.unwrap_or(0.0);
    common::eventually(
        common::DEADLINE,
        "HTTP/2 TLS health checks ran",
        async || (handshakes().await? >= before + 4.0).then_some(()),
    )
    .await;
    // Four checks at most 300 ms apart (fall: 3): failing ones would have taken it out.
    let v = h2_front.api("/api/pools/app/backends").await;
    assert_eq!(v["backends"][0]["state"], "healthy", "{v}");
    drop(h2_front);

    // Untrusted CA: requests fail as connect failures (502), and the health check takes
    // the backend out.
    let distrusting = front("other-ca.pem");
    let r = common::client()
        .get(format!("{}/echo", distrusting.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "upstream_failed", "{body}");
    common::eventually(
        common::DEADLINE,
        "the untrusted backend is unhealthy",
        async || {
            let v = distrusting.api("/api/pools/app/backends").await;
            (v["backends"][0]["state"] == "unhealthy").then_some(())
        },
    )
    .await;

    // The CA file rotated in place, configuration unchanged: a reload from the file reads
    // it again, and the backend is trusted, checked healthy and served.
    std::fs::write(dir.path().join("other-ca.pem"), ca.issuer.pem()).expect("rotate CA");
    let (status, body) = distrusting.api_post("/api/reload", None).await;
    assert_eq!(status, 200, "{body}");
    common::eventually(common::DEADLINE, "the rotated CA is trusted", async || {
        let v = distrusting.api("/api/pools/app/backends").await;
        (v["backends"][0]["state"] == "healthy").then_some(())
    })
    .await;
    let r = common::client()
        .get(format!("{}/echo", distrusting.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
}

/// `listeners[].tls.certificates` and `strict_sni`: the certificate is chosen by the
/// client's SNI, exactly or by a one-label wildcard, else the default one (also without
/// SNI), or the handshake is refused under `strict_sni`. `client_ca`: a `required`
/// listener refuses clients without a certificate from that CA, an `optional` one serves
/// them; both replace a client's `X-Forwarded-Client-Cert` with the verified
/// certificate's hash and names (a listener without `client_ca` passes it through).
/// `pools.*.tls.certificate`: a node presents a client certificate to a backend that
/// requires one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_certificates_and_client_certificates_are_verified_both_ways() {
    use sha2::Digest;
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (cert, key, default_der) = ca.leaf("default");
    write_pair(dir.path(), &cert, &key);
    let pair = |stem: &str, names: &[&str], uris: &[&str], issuer: &Ca| {
        let (cert, key, der) = issuer.leaf_for(stem, names, uris);
        std::fs::write(dir.path().join(format!("{stem}.pem")), &cert).expect("write cert");
        std::fs::write(dir.path().join(format!("{stem}.key")), &key).expect("write key");
        (cert, key, der)
    };
    let (_, _, api_der) = pair("api", &["api.example.test"], &[], &ca);
    let (_, _, wild_der) = pair("wild", &["*.apps.example.test"], &[], &ca);
    let clients = Ca::new();
    let (client_cert, client_key, client_der) = pair(
        "client",
        &["client.test"],
        &["spiffe://fulcrum.test/client"],
        &clients,
    );
    // Signed by the server CA, not the clients' one.
    let (stranger_cert, stranger_key, _) = pair("stranger", &["stranger.test"], &[], &ca);
    std::fs::write(dir.path().join("clients-ca.pem"), clients.issuer.pem()).expect("write CA");
    std::fs::write(dir.path().join("ca.pem"), ca.issuer.pem()).expect("write CA");

    let backend = Backend::start("b1", &[]);
    let listener = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    listen: 127.0.0.1:0\n    tls:\n      certificate: {}\n      private_key: {}\n{extra}    routes:\n      - pool: app\n",
            file("cert.pem"),
            file("key.pem")
        )
    };
    let sni = format!(
        "      certificates:\n        - {{ certificate: {}, private_key: {} }}\n        - {{ certificate: {}, private_key: {} }}\n",
        file("api.pem"),
        file("api.key"),
        file("wild.pem"),
        file("wild.key")
    );
    let client_ca = format!("      client_ca: {}\n", file("clients-ca.pem"));
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n{}{}{}{}pools:\n  app:\n    backends:\n      - address: {}\n",
        listener("sni", &sni),
        listener("strict", &format!("{sni}      strict_sni: true\n")),
        listener("mtls", &client_ca),
        listener(
            "optional",
            &format!("{client_ca}      client_auth: optional\n")
        ),
        backend.address()
    ));
    let anonymous = ca.client(b"http/1.1");

    // SNI: exact name, wildcard of one label, else the default certificate.
    for (server_name, expected, what) in [
        ("api.example.test", &api_der, "exact name"),
        ("x.apps.example.test", &wild_der, "wildcard"),
        ("localhost", &default_der, "the default's own name"),
        ("127.0.0.1", &default_der, "no SNI (an IP address)"),
    ] {
        let seen = request(&anonymous, node.listeners["sni"], server_name, &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(seen.status, 200, "{what}: {}", seen.body);
        assert_eq!(&seen.leaf, expected, "{what}: the certificate served");
    }
    // Names no certificate covers get the default certificate, which the client then
    // refuses for the name (a wildcard covers one label only).
    for unknown in [
        "other.example.test",
        "a.b.apps.example.test",
        "apps.example.test",
    ] {
        let e = request(&anonymous, node.listeners["sni"], unknown, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{unknown}: the default certificate does not name it"));
        assert!(
            e.contains("certificate not valid for name"),
            "{unknown}: {e}"
        );
    }
    // strict_sni: served for a known name, refused by the server otherwise.
    let seen = request(
        &anonymous,
        node.listeners["strict"],
        "api.example.test",
        &[],
    )
    .await
    .expect("strict_sni serves a known name");
    assert_eq!(seen.leaf, api_der);
    for unknown in ["other.example.test", "127.0.0.1"] {
        let e = request(&anonymous, node.listeners["strict"], unknown, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("strict_sni refuses {unknown}"));
        assert!(
            e.contains("handshake") && !e.contains("certificate not valid for name"),
            "strict_sni: the server refuses {unknown}, not the client: {e}"
        );
    }
    // Without client_ca the header is the client's own.
    let spoof = [("x-forwarded-client-cert", "Hash=forged")];
    let seen = request(&anonymous, node.listeners["sni"], "localhost", &spoof)
        .await
        .expect("request");
    assert_eq!(seen.client_cert, "Hash=forged");

    // client_ca, required: no certificate, or one from another CA, is refused; the
    // clients' CA's certificate is served, with X-Forwarded-Client-Cert set by Fulcrum.
    let expected_xfcc = format!(
        "Hash={};URI=spiffe://fulcrum.test/client;DNS=client.test",
        sha2::Sha256::digest(&client_der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let with_client = ca.client_with(b"http/1.1", Some((&client_cert, &client_key)));
    let with_stranger = ca.client_with(b"h2", Some((&stranger_cert, &stranger_key)));
    for (connector, what) in [
        (&anonymous, "no certificate"),
        (&with_stranger, "an untrusted one"),
    ] {
        let refused = request(connector, node.listeners["mtls"], "localhost", &[]).await;
        assert!(refused.is_err(), "client_ca required refuses {what}");
    }
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let connector = ca.client_with(alpn, Some((&client_cert, &client_key)));
        let seen = request(&connector, node.listeners["mtls"], "localhost", &spoof)
            .await
            .expect("a client certificate from client_ca is accepted");
        assert_eq!(seen.status, 200, "{}", seen.body);
        assert_eq!(seen.client_cert, expected_xfcc, "{:?}", seen.alpn);
    }

    // client_ca, optional: served without a certificate (the forged header removed),
    // with one (the header set), but an untrusted one is still refused.
    let seen = request(&anonymous, node.listeners["optional"], "localhost", &spoof)
        .await
        .expect("optional serves clients without a certificate");
    assert_eq!((seen.status, seen.client_cert.as_str()), (200, ""));
    let seen = request(&with_client, node.listeners["optional"], "localhost", &[])
        .await
        .expect("optional serves a verified certificate");
    assert_eq!(seen.client_cert, expected_xfcc);
    let refused = request(&with_stranger, node.listeners["optional"], "localhost", &[]).await;
    assert!(
        refused.is_err(),
        "optional still refuses an untrusted certificate"
    );

    // Towards backends: a node whose pool presents the client certificate passes the
    // `mtls` listener; without it the backend refuses the handshake (502).
    let front = |identity: &str| {
        Node::start(&format!(
            "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    tls: {{ ca_file: {}, server_name: localhost{identity} }}\n    retry: {{ attempts: 1 }}\n    backends:\n      - address: {}\n",
            file("ca.pem"),
            node.listeners["mtls"]
        ))
    };
    let presenting = front(&format!(
        ", certificate: {}, private_key: {}",
        file("client.pem"),
        file("client.key")
    ));
    let r = common::client()
        .get(format!("{}/echo", presenting.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-echo-x-forwarded-client-cert"],
        expected_xfcc.as_str()
    );
    // The client certificate replaced by one the backend does not trust, and reloaded:
    // the pooled connection made with the old one is not used again.
    std::fs::copy(
        dir.path().join("stranger.pem"),
        dir.path().join("client.pem"),
    )
    .expect("copy");
    std::fs::copy(
        dir.path().join("stranger.key"),
        dir.path().join("client.key"),
    )
    .expect("copy");
    let (status, body) = presenting.api_post("/api/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let r = common::client()
        .get(format!("{}/echo", presenting.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        502,
        "the reloaded identity is refused, not the old one reused"
    );
    let bare = front("");
    let r = common::client()
        .get(format!("{}/echo", bare.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 502);
}
