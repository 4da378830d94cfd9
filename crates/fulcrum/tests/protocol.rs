//! HTTP protocol handling through a real node: malformed requests, HTTP/2, WebSocket,
//! large streamed bodies, forwarded headers, routing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Backend, Node, client, simple_config};
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};

/// Sends raw bytes on a new connection and returns everything the proxy answered.
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_reach_a_backend() {
    let b = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b], ""));
    let addr = node.listeners["web"];
    let cases: &[(&str, &[u8])] = &[
        ("space in header name", b"GET /a HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"),
        ("control byte in header value", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n"),
        ("conflicting Content-Length", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("Content-Length then Transfer-Encoding", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("Transfer-Encoding then Content-Length", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("bad request line", b"GET /a HTTP/9.9\r\nHost: x\r\n\r\n"),
        ("two Host fields", b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ("invalid Host", b"GET /a HTTP/1.1\r\nHost: evil.com/.x\r\n\r\n"),
        ("Host port out of range", b"GET /a HTTP/1.1\r\nHost: x:99999\r\n\r\n"),
        ("HTTP/1.1 without Host", b"GET /a HTTP/1.1\r\n\r\n"),
        ("asterisk-form with GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("authority-form with GET", b"GET admin:80 HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("userinfo in an absolute-form target", b"GET http://u:pw@x/a HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("port out of range in an absolute-form target", b"GET http://x:99999/a HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("a scheme other than HTTP", b"GET ftp://x/a HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    for (what, request) in cases {
        let answer = raw(addr, request);
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: got {answer:?}");
    }
    // A transfer coding Fulcrum would silently drop: 501.
    let answer = raw(
        addr,
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("unsupported_transfer_coding"), "{answer}");
    // A tunnel: not a reverse proxy's job.
    let answer = raw(
        addr,
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("connect_not_supported"), "{answer}");
    // Fulcrum's own answers are counted by status.
    let metrics = node.metrics().await;
    let replies = |code: &str| {
        common::metric_value(
            &metrics,
            "fulcrum_local_replies_total",
            &format!(r#"listener="web",code="{code}""#),
        )
    };
    assert_eq!(replies("501"), Some(2.0), "{metrics}");
    assert!(replies("400").is_some_and(|n| n >= 4.0), "{metrics}");
    let stats = b.stats().await;
    assert_eq!(
        stats["requests"], 0,
        "a malformed request reached the backend: {stats}"
    );

    // A well-formed request on the same kind of raw connection is served.
    let answer = raw(
        addr,
        b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served() {
    let b = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b], ""));
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    for i in 0..20 {
        let response = h2
            .get(format!("{}/h2/{i}", node.url("web")))
            .send()
            .await
            .expect("h2 request");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["path"], format!("/h2/{i}"));
    }
    // Concurrent streams on one connection.
    let futures = (0..16).map(|i| h2.get(format!("{}/c/{i}", node.url("web"))).send());
    for response in futures_util::future::join_all(futures).await {
        assert_eq!(response.expect("h2 stream").status(), 200);
    }
    // The head budget is HTTP/1's 64 KiB, not HTTP/2's customary 16 KiB.
    let response = h2
        .get(format!("{}/big-cookie", node.url("web")))
        .header("cookie", format!("sso={}", "x".repeat(20_000)))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let b = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b], ""));
    let url = format!("ws://{}/ws", node.listeners["web"]);
    let (mut ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    for i in 0..10 {
        let text = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            text.clone().into(),
        ))
        .await
        .expect("send");
        let echoed = ws.next().await.expect("frame").expect("frame ok");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        blob.clone().into(),
    ))
    .await
    .expect("send binary");
    let echoed = ws.next().await.expect("frame").expect("frame ok");
    assert_eq!(echoed.into_data().as_ref(), blob.as_slice());
    ws.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_upload_and_download_arrive_intact() {
    let b = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b], ""));
    let c = client();

    // Upload 64 MiB as a stream of 1 MiB chunks (chunked transfer encoding), echoed back.
    const CHUNKS: usize = 64;
    let chunk = |i: usize| {
        bytes::Bytes::from(
            (0..1 << 20)
                .map(|j| ((i * 7 + j * 13) % 256) as u8)
                .collect::<Vec<u8>>(),
        )
    };
    let mut sent = Sha256::new();
    for i in 0..CHUNKS {
        sent.update(chunk(i));
    }
    let stream =
        futures_util::stream::iter((0..CHUNKS).map(move |i| Ok::<_, std::io::Error>(chunk(i))));
    let response = c
        .post(format!("{}/echo", node.url("web")))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 200);
    let mut received = Sha256::new();
    let mut total = 0usize;
    let mut body = response.bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.expect("body chunk");
        total += part.len();
        received.update(&part);
    }
    assert_eq!(total, CHUNKS << 20);
    assert_eq!(
        received.finalize(),
        sent.finalize(),
        "echoed upload differs"
    );

    // Download 128 MiB, checksummed by the backend.
    let response = c
        .get(format!("{}/download?bytes={}", node.url("web"), 128 << 20))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    let expected = response.headers()["x-content-sha256"]
        .to_str()
        .expect("header")
        .to_owned();
    let mut got = Sha256::new();
    let mut total = 0usize;
    let mut body = response.bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.expect("body chunk");
        total += part.len();
        got.update(&part);
    }
    assert_eq!(total, 128 << 20);
    let got: String = got.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_removed() {
    let b = Backend::start("b1", &[]);
    let node = Node::start(&simple_config("round_robin", &[&b], ""));
    let response = client()
        .post(format!("{}/echo", node.url("web")))
        .header("host", "shop.example:8443")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .body("x")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["x-echo-x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-echo-x-forwarded-proto"], "http");
    assert_eq!(h["x-echo-x-forwarded-host"], "shop.example:8443");
    assert_eq!(h["x-echo-host"], "shop.example:8443");
    assert!(h.get("x-echo-x-private").is_none());

    // An HTTP/1.0 request without Host reaches the backend with Host set to its address.
    let answer = raw(node.listeners["web"], b"GET /echo HTTP/1.0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let expected = format!("x-echo-host: {}", b.addr);
    assert!(
        answer.lines().any(|l| l == expected),
        "{expected} not in {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_host_path_and_header_first_match_wins() {
    let api = Backend::start("api", &[]);
    let canary = Backend::start("canary", &[]);
    let web = Backend::start("web", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n\
         \x20     - match: {{ header: {{ name: x-canary, value: \"1\" }} }}\n        pool: canary\n\
         \x20     - match: {{ host: api.example.com, path_prefix: /v1 }}\n        pool: api\n\
         \x20     - match: {{ path_prefix: /static }}\n        pool: web\n\
         pools:\n  api:\n    backends:\n      - address: {}\n  canary:\n    backends:\n      - address: {}\n  web:\n    backends:\n      - address: {}\n",
        api.addr, canary.addr, web.addr
    );
    let node = Node::start(&yaml);
    let c = client();
    let base = node.url("web");
    let hit = |path: &str, host: Option<&str>, canary: bool| {
        let mut request = c.get(format!("{base}{path}"));
        if let Some(host) = host {
            request = request.header("host", host);
        }
        if canary {
            request = request.header("x-canary", "1");
        }
        request.send()
    };
    let r = hit("/v1/users", Some("api.example.com"), false)
        .await
        .expect("request");
    assert_eq!(common::served_by(&r), "api");
    let r = hit("/v1/users", Some("api.example.com"), true)
        .await
        .expect("request");
    assert_eq!(common::served_by(&r), "canary");
    let r = hit("/static/app.js", Some("www.example.com"), false)
        .await
        .expect("request");
    assert_eq!(common::served_by(&r), "web");
    let r = hit("/v1/users", Some("www.example.com"), false)
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "no_route");
}

/// Paths are normalized before routing and forwarded normalized (RFC 3986: dot
/// segments, encoded unreserved characters), so `/x/../admin` or `/%61dmin` cannot slip
/// past a route meant for `/admin`; `merge_slashes` also folds `//`; `normalize_path:
/// false` routes the path as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_routing() {
    let admin = Backend::start("admin", &[]);
    let web = Backend::start("web", &[]);
    let yaml = |extra: &str| {
        format!(
            "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n{extra}    routes:\n      - match: {{ path_prefix: /admin }}\n        pool: admin\n      - pool: web\npools:\n  admin:\n    backends:\n      - address: {}\n  web:\n    backends:\n      - address: {}\n",
            admin.addr, web.addr
        )
    };
    let node = Node::start(&yaml(""));
    let addr = node.listeners["web"];
    // (backend, the path it was sent) for a raw request for `target`.
    let ask = |target: &str| {
        let answer = raw(
            addr,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        let header = |name: &str| {
            answer
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
        (
            header("x-backend:"),
            v["path"].as_str().unwrap_or_default().to_owned(),
        )
    };
    for (target, path) in [
        ("/x/../admin/panel", "/admin/panel"),
        ("/./admin", "/admin"),
        ("/%61dmin?next=/../x", "/admin"),
        ("/static/%2e%2e/admin/", "/admin/"),
        ("/../../admin", "/admin"),
    ] {
        assert_eq!(
            ask(target),
            ("admin".to_owned(), path.to_owned()),
            "{target}"
        );
    }
    // Under RFC 3986 `//admin` is another path: it stays so unless slashes merge.
    assert_eq!(ask("//admin"), ("web".to_owned(), "//admin".to_owned()));
    assert_eq!(ask("/a%2fb"), ("web".to_owned(), "/a%2Fb".to_owned()));

    let (status, body) = node
        .reload(&node.pin_addresses(&yaml("    merge_slashes: true\n")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ask("//admin//x"),
        ("admin".to_owned(), "/admin/x".to_owned())
    );
    let (status, body) = node
        .reload(&node.pin_addresses(&yaml("    normalize_path: false\n")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ask("/x/../admin"),
        ("web".to_owned(), "/x/../admin".to_owned())
    );

    // Nothing to normalize on a tcp listener.
    let (code, stderr, _) = common::check(
        "listeners:\n  - name: raw\n    protocol: tcp\n    listen: 127.0.0.1:0\n    merge_slashes: true\n    routes:\n      - pool: p\npools:\n  p:\n    backends:\n      - address: 127.0.0.1:1\n",
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("listeners[0].merge_slashes"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_passes_bytes_through() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: tcp\n    listen: 127.0.0.1:0\n    protocol: tcp\n    routes:\n      - pool: app\n\
         pools:\n  app:\n    backends:\n      - address: {}\n      - address: {}\n",
        b1.addr, b2.addr
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["tcp"];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let answer = raw(
            addr,
            b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let backend = answer
            .lines()
            .find_map(|l| l.strip_prefix("x-backend: "))
            .expect("x-backend header")
            .to_owned();
        seen.insert(backend);
    }
    assert_eq!(seen.len(), 2, "round robin over both backends: {seen:?}");
    // A tcp listener never answers with a status of its own: no such series.
    let metrics = node.metrics().await;
    assert!(
        !metrics.contains(r#"fulcrum_local_replies_total{listener="tcp""#),
        "{metrics}"
    );
    // Each finished connection is counted against its backend (two each), once it is
    // recorded, just after the client saw the close.
    for b in [&b1, &b2] {
        let labels = format!(r#"pool="app",backend="{}""#, b.address());
        common::eventually(common::DEADLINE, "tcp connections counted", async || {
            let metrics = node.metrics().await;
            (common::metric_value(&metrics, "fulcrum_tcp_connections_total", &labels) == Some(2.0))
                .then_some(())
        })
        .await;
    }
}

/// Reads until the peer closes the connection; returns what arrived.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(common::DEADLINE))
        .expect("timeout");
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "connection not closed by the proxy: {e}; got {:?}",
                String::from_utf8_lossy(&all)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeouts_close_slow_heads_and_idle_connections_but_not_slow_responses() {
    let b = Backend::start("b1", &["--latency", "fixed:1200ms"]);
    let yaml = simple_config("round_robin", &[&b], "").replace(
        "    routes:",
        "    timeouts: { request_header: 300ms, idle: 600ms }\n    routes:",
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];

    // A head that never completes (slowloris) is cut off, without a response.
    let mut slow_head = TcpStream::connect(addr).expect("connect");
    slow_head
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let got = tokio::task::block_in_place(|| read_until_closed(&mut slow_head));
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));

    // A request whose response takes longer than `idle` is served on a keep-alive
    // connection; the connection is closed only once it has been idle for `idle`.
    let mut keep_alive = TcpStream::connect(addr).expect("connect");
    keep_alive
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let got = tokio::task::block_in_place(|| read_until_closed(&mut keep_alive));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(b.stats().await["requests"], 1);

    // An idle HTTP/2 connection whose client never answers the GOAWAY's PING (so hyper's
    // graceful close cannot finish) is still closed, after a grace period.
    let mut h2 = TcpStream::connect(addr).expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .expect("write preface and SETTINGS");
    let got = tokio::task::block_in_place(|| read_until_closed(&mut h2));
    // The server's SETTINGS, its ACK of ours, GOAWAY (type 7) and PING (type 6) frames.
    assert!(got.len() >= 9, "{got:?}");
}

/// A backend whose response head has more fields than Fulcrum takes (100, as HAProxy's
/// `tune.http.maxhdr`) gets a 502 that says the head is too large, not that it is not
/// HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_response_head_that_is_too_large_is_reported_as_such() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let fields: String = (0..101)
                .map(|i| format!("Set-Cookie: c{i}=1\r\n"))
                .collect();
            let _ = stream.write_all(
                format!("HTTP/1.1 200 OK\r\n{fields}Content-Length: 2\r\n\r\nok").as_bytes(),
            );
        }
    });
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: {backend}\n"
    );
    let node = Node::start(&yaml);
    let response = client()
        .get(format!("{}/many-fields", node.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.expect("JSON error");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("response head is too large"), "{message}");
}

/// A node whose pool over `b` takes one request at a time (the next waits in the queue,
/// up to 30 s) behind a listener with `timeouts.send` = `send`.
fn one_slot_node(b: &Backend, send: &str) -> Node {
    let yaml = simple_config(
        "round_robin",
        &[b],
        "    default_max_requests: 1\n    queue: { max_size: 10, timeout: 30s }\n",
    )
    .replace(
        "    routes:",
        &format!("    timeouts: {{ send: {send} }}\n    routes:"),
    );
    Node::start(&yaml)
}

/// `fulcrum_listener_send_timeouts_total` of listener `web`.
async fn send_timeouts(node: &Node) -> Option<f64> {
    let metrics = node.metrics().await;
    common::metric_value(
        &metrics,
        "fulcrum_listener_send_timeouts_total",
        r#"listener="web""#,
    )
}

/// The only request slot of a [`one_slot_node`] is free again once its stalled client
/// is cut off: the next request is served rather than queued for 30 s, and one send
/// timeout is counted.
async fn the_slot_is_freed_by_one_send_timeout(node: &Node) {
    let response = client()
        .get(format!("{}/after", node.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(send_timeouts(node).await, Some(1.0));
}

/// A TCP stream whose reads stop for good once `paused` is set: a client that stops
/// reading its connection.
struct Pausable {
    inner: tokio::net::TcpStream,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for Pausable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.paused.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Pausable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HTTP/2 client that opens wide flow-control windows, then stops reading its whole
/// connection, is cut off by `timeouts.send` too, which frees the request slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_its_connection_is_cut_off() {
    let b = Backend::start("b1", &[]);
    let node = one_slot_node(&b, "500ms");
    let paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Pausable {
        inner: tokio::net::TcpStream::connect(node.listeners["web"])
            .await
            .expect("connect"),
        paused: std::sync::Arc::clone(&paused),
    };
    let (mut sender, connection) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::get("http://x/download?bytes=33554432")
        .body(())
        .expect("valid request");
    let (response, _) = sender.send_request(request, true).expect("send");
    let response = response.await.expect("response head");
    assert_eq!(response.status(), 200);
    paused.store(true, std::sync::atomic::Ordering::Relaxed);
    the_slot_is_freed_by_one_send_timeout(&node).await;
}

/// A client that reads slowly but steadily is not cut off by `timeouts.send`, even while
/// every write to it blocks for longer than that (the kernel makes a full socket
/// writable again only once a good part of its buffer has drained): what counts is
/// whether the client acknowledges bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_is_not_cut_off_by_the_send_timeout() {
    let b = Backend::start("b1", &[]);
    let yaml = simple_config("round_robin", &[&b], "")
        .replace("    routes:", "    timeouts: { send: 1s }\n    routes:");
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];
    let got = tokio::task::spawn_blocking(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect");
        let mut stream: TcpStream = socket.into();
        stream
            .write_all(
                b"GET /download?bytes=6000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .expect("write");
        // About 800 KB/s: 16 KiB every 20 ms (a pace, not a wait for anything).
        let mut total = 0;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("reader");
    assert!(got > 6_000_000, "the download was cut at {got} bytes");
    assert_eq!(send_timeouts(&node).await, Some(0.0));
}

/// `access_log: true` writes one line per request when its response ends: method,
/// target, status, pool, backend, bytes and outcome; a reload turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_and_follows_reloads() {
    let b = Backend::start("b1", &[]);
    let yaml = simple_config("round_robin", &[&b], "")
        .replace("    routes:", "    access_log: true\n    routes:");
    let node = Node::start(&yaml);
    let url = format!("{}/download?bytes=1234&x=1", node.url("web"));
    let response = client().get(&url).send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").len(), 1234);
    let line = common::eventually(common::DEADLINE, "the access-log line", async || {
        node.logs()
            .lines()
            .find(|l| l.contains("fulcrum::access") && l.contains("/download?bytes=1234&x=1"))
            .map(str::to_owned)
    })
    .await;
    for field in [
        "method=GET",
        "status=200",
        "pool=\"app\"",
        &format!("backend=\"{}\"", b.address()),
        "bytes=1234",
        "outcome=\"complete\"",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    // A client that gives up before the response head still gets its line.
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let gave_up = impatient
        .get(format!("{}/slow?delay_ms=3000", node.url("web")))
        .send()
        .await;
    assert!(gave_up.is_err(), "the request should time out: {gave_up:?}");
    let line = common::eventually(
        common::DEADLINE,
        "the abandoned request's line",
        async || {
            node.logs()
                .lines()
                .find(|l| l.contains("fulcrum::access") && l.contains("/slow?delay_ms=3000"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(line.contains("status=0"), "{line}");
    assert!(line.contains("outcome=\"aborted\""), "{line}");

    // Off after a reload: no line for the next request.
    let (status, body) = node
        .reload(&node.pin_addresses(&simple_config("round_robin", &[&b], "")))
        .await;
    assert_eq!(status, 200, "{body}");
    let response = client()
        .get(format!("{}/after-reload", node.url("web")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    let logs = node.logs();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("fulcrum::access") && l.contains("/after-reload")),
        "{logs}"
    );
}

/// A client that stops reading a response is cut off after `timeouts.send`, which frees
/// the backend connection and the request slot it held (nginx's `send_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    let b = Backend::start("b1", &[]);
    let node = one_slot_node(&b, "500ms");
    let addr = node.listeners["web"];
    // Asks for 32 MiB (more than the sockets on the way hold), reads a little, then
    // reads no more.
    let mut stalled = TcpStream::connect(addr).expect("connect");
    stalled
        .write_all(b"GET /download?bytes=33554432 HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut first = [0u8; 64];
    stalled.read_exact(&mut first).expect("the response starts");
    assert!(first.starts_with(b"HTTP/1.1 200"), "{first:?}");
    the_slot_is_freed_by_one_send_timeout(&node).await;
    drop(stalled);
}

/// `routes[].rate_limit`: over the limit is 429 with `Retry-After` and a JSON error,
/// never forwarded; per-client buckets are separate; a reload keeps the buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_per_route_and_per_client_and_survive_a_reload() {
    let b1 = Backend::start("b1", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - match: {{ path_prefix: /limited }}\n        pool: app\n        rate_limit: {{ rate: 1/h, burst: 3 }}\n      - match: {{ path_prefix: /per-client }}\n        pool: app\n        rate_limit: {{ rate: 1/h, burst: 1, per: client_ip }}\n      - pool: app\npools:\n  app:\n    backends:\n      - address: {}\n",
        b1.address()
    );
    let node = Node::start(&yaml);
    let web = node.url("web");
    let http = client();
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = http
            .get(format!("{web}/limited/{i}"))
            .send()
            .await
            .expect("request");
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            let retry_after: u64 = r.headers()["retry-after"]
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .expect("Retry-After in seconds");
            // One token per hour: the next one is most of an hour away.
            assert!((1..=3600).contains(&retry_after), "{retry_after}");
            let body: serde_json::Value = r.json().await.expect("JSON error");
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("1/h") && message.contains("burst 3"),
                "{message}"
            );
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Other routes are not limited.
    let r = http
        .get(format!("{web}/other"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    // Refused requests never reached the backend: 3 limited + 1 other.
    let v = node.api("/api/pools/app/backends").await;
    assert_eq!(v["backends"][0]["requests"], 4, "{v}");

    // Per client: 127.0.0.1 uses its one token; 127.0.0.2 has its own bucket.
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .expect("client")
    };
    let (a, b) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let status = async |c: &reqwest::Client| {
        c.get(format!("{web}/per-client"))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    };
    assert_eq!(status(&a).await, 200);
    assert_eq!(status(&a).await, 429);
    assert_eq!(status(&b).await, 200);
    assert_eq!(status(&b).await, 429);

    // A reload that rebuilds the routes (a backend added) keeps the buckets of unchanged
    // limits: no fresh burst.
    let b2 = Backend::start("b2", &[]);
    let reloaded = node.pin_addresses(&yaml).replace(
        &format!("      - address: {}\n", b1.address()),
        &format!(
            "      - address: {}\n      - address: {}\n",
            b1.address(),
            b2.address()
        ),
    );
    let (code, body) = node.reload(&reloaded).await;
    assert_eq!(code, 200, "{body}");
    let v = node.api("/api/pools/app/backends").await;
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(2), "{v}");
    let r = http
        .get(format!("{web}/limited/again"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 429);
    let metrics = node.metrics().await;
    assert!(
        metrics.contains(r#"fulcrum_local_replies_total{listener="web",code="429"} 5"#),
        "{metrics}"
    );
}

/// A backend that reads a request's whole `Content-Length` body before answering with
/// the number of bytes it read (a chunked body is read until the connection closes).
fn body_counting_backend() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                loop {
                    let mut length = None;
                    loop {
                        let mut line = String::new();
                        match std::io::BufRead::read_line(&mut reader, &mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse::<usize>().ok();
                        }
                    }
                    let Some(length) = length else {
                        let _ = std::io::copy(&mut reader, &mut std::io::sink());
                        return;
                    };
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let text = length.to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if reader.get_mut().write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `head`, then `parts` with `pause` before each, and returns the answer (read
/// until the proxy closes or 10 s pass).
fn send_slowly(
    addr: std::net::SocketAddr,
    head: &[u8],
    parts: &[&[u8]],
    pause: Duration,
) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(head).expect("write head");
    for part in parts {
        std::thread::sleep(pause);
        stream.write_all(part).expect("write part");
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_problems_are_the_clients_not_the_backends() {
    let backend = body_counting_backend();
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: round_robin\n    backends:\n      - address: {backend}\n    timeouts: {{ response_header: 1s }}\n    outlier_detection: {{ consecutive_failures: 1 }}\n"
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];

    // An upload that takes longer than response_header: the timer runs from its end.
    let part = [b'x'; 500];
    let answer = tokio::task::spawn_blocking(move || {
        send_slowly(
            addr,
            b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3000\r\n\r\n",
            &[&part[..]; 6],
            Duration::from_millis(400),
        )
    })
    .await
    .expect("client thread");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("3000"), "{answer}");

    // An upload that stalls: 408 for the client, nothing against the backend.
    let answer = tokio::task::spawn_blocking(move || {
        send_slowly(
            addr,
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
            &[],
            Duration::ZERO,
        )
    })
    .await
    .expect("client thread");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Malformed chunked framing: 400.
    let answer = raw(
        addr,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The message says what was wrong, not hyper's wrapper around it.
    assert!(answer.contains("Invalid chunk size line"), "{answer}");

    // An upload the client abandons half-way.
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
            .expect("write");
        std::thread::sleep(Duration::from_millis(100));
        drop(stream);
    }

    // None of it counted against the backend: no errors, not ejected (one failure
    // would eject it), and served again.
    let status = node.backend("app", &backend.to_string()).await;
    assert_eq!(status["errors"], 0, "{status}");
    assert_eq!(status["state"], "healthy", "{status}");
    let metrics = node.metrics().await;
    assert!(
        !metrics.contains("fulcrum_upstream_errors_total{") || {
            metrics
                .lines()
                .filter(|l| l.starts_with("fulcrum_upstream_errors_total{"))
                .all(|l| l.ends_with(" 0"))
        },
        "{metrics}"
    );
    let answer = raw(
        addr,
        b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_backend_answer_reaches_http_1_1_clients_reframed() {
    // A backend that answers HTTP/1.0 without a length and closes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            loop {
                let mut line = String::new();
                match std::io::BufRead::read_line(&mut reader, &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => {
                        let _ = reader.get_mut().write_all(
                            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello-1.0",
                        );
                        break;
                    }
                    Ok(_) => {}
                }
            }
        }
    });
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: round_robin\n    backends:\n      - address: {backend}\n"
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];
    // Two requests on one keep-alive connection: both answered in HTTP/1.1, the body
    // re-framed (chunked), and the connection kept.
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut all = Vec::new();
        for last in [false, true] {
            let close = if last { "Connection: close\r\n" } else { "" };
            stream
                .write_all(format!("GET /a HTTP/1.1\r\nHost: x\r\n{close}\r\n").as_bytes())
                .expect("write");
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).unwrap_or(0);
                all.extend_from_slice(&buf[..n]);
                if n == 0 || all.ends_with(b"0\r\n\r\n") {
                    break;
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    })
    .await
    .expect("client thread");
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert!(!answer.contains("HTTP/1.0"), "{answer}");
    assert_eq!(answer.matches("hello-1.0").count(), 2, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_reading_an_upload_is_the_backends_timeout() {
    // Accepts connections and never reads from them.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: round_robin\n    backends:\n      - address: {backend}\n    timeouts: {{ response_header: 1s }}\n"
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];
    let answer = tokio::task::spawn_blocking(move || {
        const SIZE: usize = 64 << 20;
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(common::DEADLINE))
            .expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        // The body goes out until the buffers on the way fill; the write fails once the
        // proxy answers and closes.
        std::thread::spawn(move || {
            let head = format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n");
            let _ = writer.write_all(head.as_bytes());
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..SIZE >> 20 {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("client thread");
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("upstream_timeout"), "{answer}");
    let status = node.backend("app", &backend.to_string()).await;
    assert_eq!(status["errors"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_and_ipv6_listeners_can_share_a_port() {
    let b = Backend::start("b1", &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let yaml = simple_config("round_robin", &[&b], "").replacen(
        "  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\n",
        &format!(
            "  - name: web\n    listen: 127.0.0.1:{port}\n    routes:\n      - pool: app\n  - name: web6\n    listen: \"[::]:{port}\"\n    routes:\n      - pool: app\n"
        ),
        1,
    );
    let node = Node::start(&yaml);
    assert_eq!(node.listeners["web"].port(), port);
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let response = client()
            .get(format!("http://{addr}/x"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(response.status(), 200, "{addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_close_idle_connections_and_count_backend_resets() {
    // A backend that resets each connection once the client's bytes arrive (it closes
    // with unread data, so the kernel answers with RST).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let resetting = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                drop(stream);
            });
        }
    });
    let b = Backend::start("b1", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: tcp\n    listen: 127.0.0.1:0\n    protocol: tcp\n    timeouts: {{ idle: 500ms }}\n    routes:\n      - pool: app\n\
         pools:\n  app:\n    outlier_detection: {{ consecutive_failures: 2, max_ejection_percent: 50 }}\n    backends:\n      - address: {resetting}\n      - address: {}\n",
        b.addr
    );
    let node = Node::start(&yaml);
    let addr = node.listeners["tcp"];

    // Connections the backend resets count against it, and eject it.
    for _ in 0..4 {
        let _ = tokio::task::spawn_blocking(move || {
            raw(
                addr,
                b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        })
        .await;
    }
    let status = common::eventually(
        common::DEADLINE,
        "the resetting backend ejected",
        async || {
            let v = node.backend("app", &resetting.to_string()).await;
            (v["state"] == "ejected").then_some(v)
        },
    )
    .await;
    assert!(status["errors"].as_u64() >= Some(2), "{status}");

    // A connection on which nothing moves for `idle` is closed.
    let mut quiet = TcpStream::connect(addr).expect("connect");
    let got = tokio::task::block_in_place(|| read_until_closed(&mut quiet));
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

/// What the HTTP/2-only backend of `pools_can_speak_http2_to_backends` saw.
#[derive(Default)]
struct H2Seen {
    connections: usize,
    /// Per request: version, `:authority`, `te`, whether a `host` field came too, path.
    requests: Vec<(http::Version, String, String, bool, String)>,
}

/// An HTTP/2-only backend (as a gRPC server is: it refuses HTTP/1.1) that answers every
/// request with its path as body and a `grpc-status: 0` trailer; except `/big` (64 MiB),
/// `/unavailable` (UNAVAILABLE, trailers-only) and `/late-failure` (a message, then
/// INTERNAL in the trailers).
async fn h2_only_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<H2Seen>>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(H2Seen::default()));
    let record = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            record.lock().expect("not poisoned").connections += 1;
            let record = std::sync::Arc::clone(&record);
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = std::sync::Arc::clone(&record);
                    async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let path = req.uri().path().to_owned();
                        record.lock().expect("not poisoned").requests.push((
                            req.version(),
                            authority,
                            header("te"),
                            req.headers().contains_key("host"),
                            path.clone(),
                        ));
                        if path == "/big" {
                            // 64 MiB in 1 MiB chunks sharing one buffer: as fast as the
                            // connection takes it.
                            let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
                            let frames = (0..64).map(move |_| {
                                Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                    chunk.clone(),
                                ))
                            });
                            let body = http_body_util::StreamBody::new(futures_util::stream::iter(
                                frames.collect::<Vec<_>>(),
                            ));
                            return Ok(http::Response::builder()
                                .body(body)
                                .expect("valid response"));
                        }
                        if path == "/unavailable" {
                            // A trailers-only gRPC failure: the status in the head, no body.
                            let none: Vec<
                                Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
                            > = Vec::new();
                            let body =
                                http_body_util::StreamBody::new(futures_util::stream::iter(none));
                            return Ok(http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "14")
                                .body(body)
                                .expect("valid response"));
                        }
                        if path == "/late-failure" {
                            // A message, then INTERNAL in the trailers.
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                    bytes::Bytes::from_static(b"\0\0\0\0\x01x"),
                                )),
                                Ok(http_body::Frame::trailers(trailers)),
                            ];
                            return Ok(http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(http_body_util::StreamBody::new(futures_util::stream::iter(
                                    frames,
                                )))
                                .expect("valid response"));
                        }
                        // The request body is read to the end and its length echoed.
                        let length = req
                            .into_body()
                            .collect()
                            .await
                            .map_or(0, |b| b.to_bytes().len());
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                bytes::Bytes::from(format!("{path} {length}")),
                            )),
                            Ok(http_body::Frame::trailers(trailers)),
                        ];
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .expect("valid response"),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, seen)
}

/// `pools.*.protocol: http2`: requests from HTTP/1.1 and HTTP/2 clients reach an
/// HTTP/2-only backend as HTTP/2 streams with `:authority` from the client's host,
/// multiplexed on one connection per worker; a gRPC-style exchange keeps `te: trailers`
/// and the response trailers; health checks speak HTTP/2 too; and a `tcp` listener
/// cannot use such a pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_can_speak_http2_to_backends() {
    use http_body_util::BodyExt;
    let (backend, seen) = h2_only_backend().await;
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: grpc\npools:\n  grpc:\n    protocol: http2\n    health_check: {{ path: /health, interval: 300ms, timeout: 250ms, rise: 1, fall: 1 }}\n    backends:\n      - address: {backend}\n"
    ));

    // HTTP/1.1 client: its Host becomes the backend's :authority, with no host field.
    let r = client()
        .post(format!("{}/h1/0", node.url("web")))
        .body("hello")
        .send()
        .await
        .expect("HTTP/1.1 request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "/h1/0 5");
    {
        let seen = seen.lock().expect("not poisoned");
        // (Health checks interleave: find the request by its path.)
        let (version, authority, te, host, _) = seen
            .requests
            .iter()
            .find(|r| r.4 == "/h1/0")
            .expect("the request reached the backend");
        assert_eq!(*version, http::Version::HTTP_2);
        assert_eq!(*authority, node.listeners["web"].to_string());
        assert!(
            te.is_empty(),
            "te forwarded to a client that did not ask: {te}"
        );
        assert!(!host, "a host field beside :authority");
    }

    // gRPC-style HTTP/2 client: `te: trailers` reaches the backend and the trailer comes
    // back.
    let stream = tokio::net::TcpStream::connect(node.listeners["web"])
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::post("http://grpc.example/pkg.Service/Call")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\0\0\0\0\x03abc",
        )))
        .expect("valid request");
    let response = sender.send_request(request).await.expect("gRPC call");
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "/pkg.Service/Call 8");
    {
        let seen = seen.lock().expect("not poisoned");
        let (_, authority, te, _, path) = seen
            .requests
            .iter()
            .find(|r| r.4 == "/pkg.Service/Call")
            .expect("the call reached the backend");
        assert_eq!(
            (authority.as_str(), te.as_str(), path.as_str()),
            ("grpc.example", "trailers", "/pkg.Service/Call")
        );
    }

    // An HTTP/1.1 client that asked for trailers gets them, in a chunked body (not
    // framed by a Content-Length, which leaves no room for them).
    let answer = raw(
        node.listeners["web"],
        b"POST /pkg.Service/H1 HTTP/1.1\r\nHost: grpc.example\r\nTE: trailers\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let lower = answer.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{answer}");
    assert!(lower.contains("transfer-encoding: chunked"), "{answer}");
    assert!(!lower.contains("content-length"), "{answer}");
    assert!(lower.contains("\r\n0\r\ngrpc-status: 0\r\n"), "{answer}");

    // Concurrent requests share connections: one per worker thread at most (plus one
    // for the control thread's health checks, which open their own).
    let futures = (0..32).map(|i| client().get(format!("{}/c/{i}", node.url("web"))).send());
    for response in futures_util::future::join_all(futures).await {
        assert_eq!(response.expect("request").status(), 200);
    }
    // Health checks over HTTP/2 pass (the backend refuses HTTP/1.1).
    common::eventually(common::DEADLINE, "HTTP/2 health checks ran", async || {
        let seen = seen.lock().expect("not poisoned");
        (seen.requests.iter().filter(|r| r.4 == "/health").count() >= 2).then_some(())
    })
    .await;
    let v = node.api("/api/pools/grpc/backends").await;
    assert_eq!(v["backends"][0]["state"], "healthy", "{v}");
    {
        let seen = seen.lock().expect("not poisoned");
        let health_checks = seen.requests.iter().filter(|r| r.4 == "/health").count();
        let proxied = seen.requests.len() - health_checks;
        assert_eq!(proxied, 35);
        // Every health check opens its own connection; proxied requests reuse theirs.
        let proxy_connections = seen.connections - health_checks;
        assert!(
            proxy_connections <= 3,
            "{proxy_connections} connections for {proxied} requests"
        );
    }

    // gRPC failures answered trailers-only (UNAVAILABLE in the head of a 200) reach the
    // client as they are, and count as the backend's failures: outlier detection ejects
    // it after `consecutive_failures` of them.
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: grpc\npools:\n  grpc:\n    protocol: http2\n    outlier_detection: {{ consecutive_failures: 3 }}\n    backends:\n      - address: {backend}\n"
    ));
    for _ in 0..3 {
        let r = client()
            .post(format!("{}/unavailable", node.url("web")))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
    }
    common::eventually(
        common::DEADLINE,
        "the failing gRPC backend is ejected",
        async || {
            (node.backend_state("grpc", &backend.to_string()).await == "ejected").then_some(())
        },
    )
    .await;

    // A tcp listener cannot forward to an HTTP/2 pool.
    let (code, stderr, _) = common::check(&format!(
        "listeners:\n  - name: raw\n    protocol: tcp\n    listen: 127.0.0.1:0\n    routes:\n      - pool: grpc\npools:\n  grpc:\n    protocol: http2\n    backends:\n      - address: {backend}\n"
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("listeners[0].routes[0].pool") && stderr.contains("protocol: http2"),
        "{stderr}"
    );
}

/// `listeners[].max_connections`: with the limit open, a further connection is not
/// served (the listener stops accepting; `fulcrum_listener_connections_limited_total`
/// counts it) until one of the open ones closes, and then it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_further_connections_until_one_closes() {
    let b = Backend::start("b1", &[]);
    let yaml = simple_config("round_robin", &[&b], "").replace(
        "    listen: 127.0.0.1:0\n    routes:",
        "    listen: 127.0.0.1:0\n    max_connections: 2\n    routes:",
    );
    assert!(yaml.contains("max_connections: 2"), "{yaml}");
    let node = Node::start(&yaml);
    let addr = node.listeners["web"];
    let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    let answered = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).expect("an answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let open_connections = async || {
        let metrics = node.metrics().await;
        common::metric_value(
            &metrics,
            "fulcrum_listener_connections",
            r#"listener="web""#,
        )
    };
    // Two keep-alive connections, served and left open.
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(request).expect("write");
            assert!(answered(&mut s).starts_with("HTTP/1.1 200"));
            s
        })
        .collect();
    assert_eq!(open_connections().await, Some(2.0));
    // A third: accepted by the kernel, but held unserved at the limit.
    let mut third = TcpStream::connect(addr).expect("connect");
    third.write_all(request).expect("write");
    common::eventually(common::DEADLINE, "the limit is counted", async || {
        let m = node.metrics().await;
        let limited = common::metric_value(
            &m,
            "fulcrum_listener_connections_limited_total",
            r#"listener="web""#,
        )?;
        (limited >= 1.0).then_some(())
    })
    .await;
    third.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    match third.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a connection beyond max_connections was served: {other:?}"),
    }
    third.set_nonblocking(false).expect("blocking");
    // One closes: the third is served.
    drop(open.remove(0));
    assert!(answered(&mut third).starts_with("HTTP/1.1 200"));
    assert_eq!(open_connections().await, Some(2.0));
}

/// A response with an empty body (`Content-Length: 0`) is complete at its head: its
/// upstream connection is reused and its endpoint records it. (Never polled, such bodies
/// were taken for cut short: every one closed its connection and went unrecorded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_responses_reuse_the_upstream_connection_and_are_recorded() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = listener.local_addr().expect("address");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match std::io::BufRead::read_line(&mut reader, &mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            if reader
                                .get_mut()
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nruntime:\n  threads: 1\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    backends:\n      - address: {backend}\n"
    ));
    let client = client();
    for _ in 0..20 {
        let r = client
            .get(format!("{}/empty", node.url("web")))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.expect("body").is_empty());
    }
    // One worker: one upstream connection for all twenty.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let empty = node.endpoint("app", "GET /empty").await;
    assert_eq!(empty["count"], 20, "{empty}");
}

/// Over an HTTP/2 pool, clients that stop reading large downloads hold only their own
/// streams' flow-control windows: other responses on the same backend connection still
/// arrive. (With hyper's default connection window, a few stalled 50 MB downloads held
/// all of it and every other body on the connection stalled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_starve_other_streams_on_an_http2_backend_connection() {
    let (backend, seen) = h2_only_backend().await;
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nruntime:\n  threads: 1\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    protocol: http2\n    backends:\n      - address: {backend}\n"
    ));
    let addr = node.listeners["web"];
    // Eight clients ask for 64 MiB each and never read; small receive buffers, so the
    // proxy's writes to them stop early and their streams' windows fill.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut s = socket.connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        stalled.push(s);
    }
    common::eventually(
        common::DEADLINE,
        "the eight downloads started",
        async || {
            let seen = seen.lock().expect("not poisoned");
            (seen.requests.iter().filter(|r| r.4 == "/big").count() >= 8).then_some(())
        },
    )
    .await;
    // Requests keep coming for two seconds while the stalled downloads fill their
    // windows (no observable moment says they are full; this bounds how long the check
    // runs, it is not a timing assertion): each must be answered whole.
    let checking = std::time::Instant::now();
    let mut i = 0;
    while checking.elapsed() < Duration::from_secs(2) {
        i += 1;
        let r = client()
            .post(format!("{}/small/{i}", node.url("web")))
            .body("abc")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status(), 200);
        let body = r
            .text()
            .await
            .unwrap_or_else(|e| panic!("body {i} stalled: {e}"));
        assert_eq!(body, format!("/small/{i} 3"));
    }
    drop(stalled);
}

/// An HTTP/2 backend that closes every connection gracefully after five requests, as
/// nginx does every `keepalive_requests`: a `GOAWAY`, and streams the proxy had already
/// sent above the last processed one refused. Returns its address and how many
/// connections it accepted.
async fn goaway_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                let mut served = 0;
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let response = http::Response::new(());
                    if let Ok(mut body) = respond.send_response(response, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                    }
                    served += 1;
                    if served == 5 {
                        connection.graceful_shutdown();
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// A backend's `GOAWAY` refuses the streams it had not processed: they are sent again
/// on a new connection — to the same backend in a one-backend pool, without drawing on
/// the retry budget — and the backend is not blamed. (Counted as resets, they failed
/// about one request in six against nginx's `keepalive_requests` and ejected it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_by_an_http2_goaway_are_sent_again_and_not_blamed() {
    let (backend, connections) = goaway_backend().await;
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nruntime:\n  threads: 1\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    protocol: http2\n    retry: {{ attempts: 2, budget_percent: 0, min_retry_concurrency: 0 }}\n    outlier_detection: {{ consecutive_failures: 2 }}\n    backends:\n      - address: {backend}\n"
    ));
    let client = client();
    let refused = async || {
        let metrics = node.metrics().await;
        common::metric_value(&metrics, "fulcrum_upstream_errors_total", "kind=\"reset\"")
            .unwrap_or(0.0)
    };
    // At least ten rounds of 20 concurrent requests, and more until a stream was refused
    // (whether one is depends on how the requests race the GOAWAY), up to 200 rounds.
    let mut round = 0;
    loop {
        let batch = (0..20).map(|i| {
            client
                .get(format!("{}/r/{round}/{i}", node.url("web")))
                .send()
        });
        for response in futures_util::future::join_all(batch).await {
            let response = response.expect("response");
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            assert_eq!(status, 200, "round {round}: {body}");
        }
        round += 1;
        if round >= 10 && (refused().await > 0.0 || round >= 200) {
            break;
        }
    }
    // Connections were closed by GOAWAY, and streams were refused (counted as resets,
    // not as the backend's failures).
    assert!(connections.load(std::sync::atomic::Ordering::SeqCst) >= 5);
    let state = node.backend_state("app", &backend.to_string()).await;
    assert_eq!(state, "healthy");
    let metrics = node.metrics().await;
    assert!(
        refused().await > 0.0,
        "no stream was refused in {round} rounds: {metrics}"
    );
    assert_eq!(
        common::metric_value(&metrics, "fulcrum_ejections_total", "pool=\"app\""),
        Some(0.0),
        "{metrics}"
    );
}

/// A gRPC status in the trailers after the messages decides the attempt's outcome (as
/// Envoy defers a gRPC request's success): OK calls are successes, INTERNAL ones are the
/// backend's failures — counted in its errors and its endpoint's, and ejected by
/// outlier detection — though the client gets the backend's answer unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_in_trailers_is_the_attempts_outcome() {
    let (backend, _) = h2_only_backend().await;
    let node = Node::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: grpc\npools:\n  grpc:\n    protocol: http2\n    outlier_detection: {{ consecutive_failures: 3 }}\n    backends:\n      - address: {backend}\n"
    ));
    let counts = async || {
        let v = node.api("/api/pools/grpc/backends").await;
        let b = &v["backends"][0];
        (
            b["requests"].as_u64().unwrap_or(0),
            b["errors"].as_u64().unwrap_or(0),
            b["state"].as_str().unwrap_or("").to_owned(),
        )
    };
    for i in 0..3 {
        let r = client()
            .post(format!("{}/pkg.Service/Ok{i}", node.url("web")))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let (requests, errors, state) =
        common::eventually(common::DEADLINE, "the OK calls are recorded", async || {
            let c = counts().await;
            (c.0 == 3).then_some(c)
        })
        .await;
    assert_eq!((requests, errors, state.as_str()), (3, 0, "healthy"));

    for _ in 0..3 {
        let r = client()
            .post(format!("{}/late-failure", node.url("web")))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "the client gets the backend's answer");
        assert_eq!(r.bytes().await.expect("body").len(), 6);
    }
    let (requests, errors, state) = common::eventually(
        common::DEADLINE,
        "the failed calls are recorded",
        async || {
            let c = counts().await;
            (c.0 == 6).then_some(c)
        },
    )
    .await;
    assert_eq!(
        (requests, errors, state.as_str()),
        (6, 3, "ejected"),
        "INTERNAL in the trailers is the backend's failure"
    );
    let endpoint = node.endpoint("grpc", "POST /late-failure").await;
    assert_eq!(
        (endpoint["count"].as_u64(), endpoint["errors"].as_u64()),
        (Some(3), Some(3))
    );
}
