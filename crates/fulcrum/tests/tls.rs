//! TLS termination end to end: a real node with a `tls` listener, certificates made by
//! rcgen at test time, a rustls client that trusts only the test CA, HTTP/1.1 and HTTP/2
//! chosen by ALPN, certificate renewal on reload, and refused bad files.

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
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        params.distinguished_name = name(cn);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn client(&self, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.issuer.der().clone())
            .expect("the CA certificate is valid");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
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
/// certificate, the response version, status, `x-echo-x-forwarded-proto` and body.
struct Seen {
    alpn: Vec<u8>,
    leaf: Vec<u8>,
    version: http::Version,
    status: u16,
    forwarded_proto: String,
    body: String,
}

/// `GET /echo` over a new TLS connection to `addr`, asking for ALPN `alpn`.
async fn get(ca: &Ca, addr: std::net::SocketAddr, alpn: &[u8]) -> Seen {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = ca
        .client(alpn)
        .connect(ServerName::try_from("localhost").expect("a DNS name"), tcp)
        .await
        .expect("TLS handshake with a certificate the test CA issued");
    let (_, session) = tls.get_ref();
    let negotiated = session.alpn_protocol().unwrap_or_default().to_vec();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c: &CertificateDer<'_>| c.to_vec())
        .expect("a server certificate");
    let io = TokioIo::new(tls);
    let request = http::Request::get("https://localhost/echo")
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = if negotiated == b"h2" {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        sender.send_request(request).await.expect("h2 response")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("http/1.1 handshake");
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .expect("http/1.1 response")
    };
    let version = response.version();
    let status = response.status().as_u16();
    let forwarded_proto = response
        .headers()
        .get("x-echo-x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Seen {
        alpn: negotiated,
        leaf,
        version,
        status,
        forwarded_proto,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
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
    assert!(message.contains("listener `web`"), "{message}");
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
