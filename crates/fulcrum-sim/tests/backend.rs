//! The simulator over real sockets on 127.0.0.1 with a real HTTP client.
//!
//! No test sleeps to synchronise: each waits for an observable state (`/stats`, a closed
//! port) with a deadline, and none asserts on elapsed time, only on order and counts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use fulcrum_sim::{BackendArgs, BackendHandle, DownloadPattern, start_backend};

/// How long a test waits for a state before failing; generous for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(20);

async fn start(configure: impl FnOnce(&mut BackendArgs)) -> BackendHandle {
    let mut args = BackendArgs {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        name: Some("sim-test".into()),
        ..BackendArgs::default()
    };
    configure(&mut args);
    start_backend(args).await.expect("backend starts")
}

/// Polls `check` until it holds; panics naming `what` after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn get_json(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.expect("json body");
    (status, body)
}

fn hex_sha256(bytes: impl AsRef<[u8]>) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn ready_line_names_the_bound_address() {
    let backend = start(|_| {}).await;
    assert_ne!(backend.local_addr.port(), 0);
    let line: Value = serde_json::from_str(&backend.ready_line()).expect("ready line is JSON");
    assert_eq!(line["event"], "listening");
    assert_eq!(line["name"], "sim-test");
    assert_eq!(line["address"], backend.local_addr.to_string());
    assert!(
        backend
            .ready_line()
            .starts_with(r#"{"event":"listening","name":"#)
    );

    let unnamed = start(|args| args.name = None).await;
    assert_eq!(unnamed.name(), unnamed.local_addr.to_string());
}

#[tokio::test]
async fn work_endpoint_answers_with_its_name_path_and_method() {
    let backend = start(|_| {}).await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/users/42?page=2", backend.url()))
        .body("ignored")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "sim-test");
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        serde_json::json!({"backend": "sim-test", "path": "/v1/users/42", "method": "POST"})
    );

    let (status, stats) = get_json(&client, format!("{}/stats", backend.url())).await;
    assert_eq!(status, 200);
    assert_eq!(stats["name"], "sim-test");
    assert_eq!(stats["requests"], 1, "/stats itself is not counted");
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["queued"], 0);
    assert_eq!(stats["errors"], 0);
    assert_eq!(stats["settings"]["latency"], "fixed:0ms");
    assert_eq!(stats["settings"]["capacity"], 0);
    assert_eq!(backend.stats().requests, 1);

    let (status, body) = get_json(&client, format!("{}/x?delay_ms=soon", backend.url())).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("delay_ms")),
        "{body}"
    );
}

#[tokio::test]
async fn capacity_queue_serves_in_arrival_order() {
    let backend = start(|args| {
        args.capacity = 1;
        args.latency = "fixed:200ms".parse().expect("spec");
    })
    .await;
    let client = reqwest::Client::new();
    let completed = Arc::new(Mutex::new(Vec::new()));
    let mut requests = Vec::new();
    for i in 0..3u64 {
        let url = format!("{}/job/{i}", backend.url());
        let (client, completed) = (client.clone(), completed.clone());
        requests.push(tokio::spawn(async move {
            let response = client.get(url).send().await.expect("request");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("json");
            completed.lock().expect("not poisoned").push(i);
            (status, body)
        }));
        // Each request must have arrived (and joined the queue) before the next is sent,
        // so arrival order is the order of `i`.
        eventually(&format!("request {i} to arrive"), || {
            let stats = backend.stats();
            async move { stats.requests == i + 1 && stats.in_flight == 1 && stats.queued == i }
        })
        .await;
    }

    let (status, stats) = get_json(&client, format!("{}/stats", backend.url())).await;
    assert_eq!(status, 200);
    assert_eq!(stats["in_flight"], 1);
    assert_eq!(stats["queued"], 2);

    for (i, request) in requests.into_iter().enumerate() {
        let (status, body) = request.await.expect("request task");
        assert_eq!(status, 200);
        assert_eq!(body["path"], format!("/job/{i}"));
    }
    assert_eq!(*completed.lock().expect("not poisoned"), [0, 1, 2]);
    let stats = backend.stats();
    assert_eq!((stats.in_flight, stats.queued, stats.requests), (0, 0, 3));
}

#[tokio::test]
async fn fail_rate_one_answers_503_and_counts_errors() {
    let backend = start(|args| args.fail_rate = 1.0).await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let response = client
            .get(format!("{}/anything", backend.url()))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-backend"], "sim-test");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "injected_failure");
    }
    // Health checks are never failed by the fail rate.
    let (status, health) = get_json(&client, format!("{}/health", backend.url())).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let stats = backend.stats();
    assert_eq!((stats.requests, stats.errors), (5, 5));
}

#[tokio::test]
async fn control_changes_latency_failures_and_health() {
    let backend = start(|_| {}).await;
    let client = reqwest::Client::new();
    let base = backend.url();

    let (status, settings) = get_json(
        &client,
        format!("{base}/control?delay_ms=250&fail=0&slow_factor=2"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(settings["latency"], "fixed:250ms");
    assert_eq!(settings["slow_factor"], 2.0);
    let (_, stats) = get_json(&client, format!("{base}/stats")).await;
    assert_eq!(stats["settings"]["latency"], "fixed:250ms");

    let response = client
        .post(format!(
            "{base}/control?latency=lognormal%3A20ms%2C0.5&capacity=3"
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let settings: Value = response.json().await.expect("json");
    assert_eq!(settings["latency"], "lognormal:20ms,0.5");
    assert_eq!(settings["capacity"], 3);
    assert_eq!(backend.stats().settings.capacity, 3);

    // A form body (what `curl -d` sends) works as well as the query string.
    let response = client
        .post(format!("{base}/control"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("fail=0.25&slow_factor=1")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let settings: Value = response.json().await.expect("json");
    assert_eq!(
        (
            settings["fail_rate"].as_f64(),
            settings["capacity"].as_u64()
        ),
        (Some(0.25), Some(3))
    );
    let response = client
        .post(format!("{base}/control"))
        .header("content-type", "application/json")
        .body(r#"{"fail":1}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 400);
    get_json(&client, format!("{base}/control?fail=0")).await;

    let (status, health) = get_json(&client, format!("{base}/health")).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, _) = get_json(&client, format!("{base}/control?healthy=false")).await;
    assert_eq!(status, 200);
    let (status, health) = get_json(&client, format!("{base}/health")).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("unhealthy"))
    );
    assert_eq!(health["name"], "sim-test");
    // Unhealthy only changes what /health says; work is still served.
    let (status, _) = get_json(&client, format!("{base}/still-works?delay_ms=0")).await;
    assert_eq!(status, 200);
    get_json(&client, format!("{base}/control?healthy=true")).await;
    let (status, _) = get_json(&client, format!("{base}/health")).await;
    assert_eq!(status, 200);
    assert_eq!(
        backend.stats().requests,
        1,
        "/health and /control are not counted"
    );
}

#[tokio::test]
async fn cache_counts_hits_and_misses_by_header_or_query_key() {
    let backend = start(|args| {
        args.cache_size = 2;
        args.cache_miss_ms = 1;
    })
    .await;
    let client = reqwest::Client::new();
    let base = backend.url();
    let by_header = |key: &'static str| {
        client
            .get(format!("{base}/item"))
            .header(fulcrum_sim::CACHE_KEY_HEADER, key)
            .send()
    };
    for key in ["a", "b", "a"] {
        assert_eq!(by_header(key).await.expect("request").status(), 200);
    }
    let stats = backend.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (1, 2));

    // The query parameter is a key too; `b` is cached from the header requests.
    let (status, _) = get_json(&client, format!("{base}/item?key=b")).await;
    assert_eq!(status, 200);
    // No key at all: no lookup.
    get_json(&client, format!("{base}/item")).await;
    let (_, stats) = get_json(&client, format!("{base}/stats")).await;
    assert_eq!(
        (stats["cache_hits"].as_u64(), stats["cache_misses"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(stats["settings"]["cache_size"], 2);
    assert_eq!(stats["settings"]["cache_miss_ms"], 1);

    // `c` evicts the least recently used key, `a`.
    by_header("c").await.expect("request");
    by_header("a").await.expect("request");
    assert_eq!(backend.stats().cache_misses, 4);

    // Turned off at run time: keys are no longer looked up or counted.
    let (status, settings) = get_json(
        &client,
        format!("{base}/control?cache_size=0&cache_miss_ms=50"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            settings["cache_size"].as_u64(),
            settings["cache_miss_ms"].as_u64()
        ),
        (Some(0), Some(50))
    );
    by_header("a").await.expect("request");
    let stats = backend.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (2, 4));

    // And on again, empty.
    get_json(&client, format!("{base}/control?cache_size=10")).await;
    by_header("a").await.expect("request");
    assert_eq!(backend.stats().cache_misses, 5);
}

#[tokio::test]
async fn handle_control_applies_the_control_parameters() {
    let backend = start(|_| {}).await;
    let settings = backend.control("slow_factor=20&capacity=2").expect("valid");
    assert_eq!((settings.slow_factor, settings.capacity), (20.0, 2));
    assert_eq!(backend.stats().settings, settings);
    let err = backend
        .control("fail=0.5&slow_factor=x")
        .expect_err("bad parameter");
    assert!(err.to_string().contains("`slow_factor`"), "{err}");
    assert_eq!(backend.stats().settings, settings, "nothing changed");
}

#[tokio::test]
async fn bad_control_parameter_is_400_naming_it_and_changes_nothing() {
    let backend = start(|_| {}).await;
    let client = reqwest::Client::new();
    // Each query has a valid change before the bad one: it must not be applied either.
    for (query, parameter) in [
        ("slow_factor=3&fail=2", "fail"),
        ("slow_factor=3&delay_ms=abc", "delay_ms"),
        ("slow_factor=3&healthy=maybe", "healthy"),
        ("slow_factor=3&latency=gamma:1ms", "latency"),
        ("slow_factor=3&capacity=-1", "capacity"),
        ("slow_factor=3&cache_size=x", "cache_size"),
        ("slow_factor=3&cache_miss_ms=-5", "cache_miss_ms"),
        ("capacity=5&slow_factor=x", "slow_factor"),
        ("slow_factor=3&nonsense=1", "nonsense"),
    ] {
        let (status, body) = get_json(&client, format!("{}/control?{query}", backend.url())).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["error"]["code"], "bad_request");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            message.contains(&format!("`{parameter}`")),
            "{query}: {message}"
        );
    }
    assert_eq!(backend.stats().settings, fulcrum_sim::Settings::default());
}

#[tokio::test]
async fn echo_streams_a_20_mib_upload_back_byte_for_byte() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 320; // 20 MiB
    let backend = start(|_| {}).await;

    let mut pattern = DownloadPattern::new();
    let mut sent = Sha256::new();
    let chunks: Vec<bytes::Bytes> = (0..CHUNKS)
        .map(|_| {
            let mut chunk = vec![0u8; CHUNK];
            pattern.fill(&mut chunk);
            sent.update(&chunk);
            bytes::Bytes::from(chunk)
        })
        .collect();
    let sent = format!("{:x}", sent.finalize());
    let upload = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));

    let response = reqwest::Client::new()
        .post(format!("{}/echo", backend.url()))
        .header("content-type", "application/octet-stream")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "shop.example")
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-backend"], "sim-test");
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(headers["x-echo-x-forwarded-for"], "203.0.113.7");
    assert_eq!(headers["x-echo-x-forwarded-proto"], "https");
    assert_eq!(headers["x-echo-x-forwarded-host"], "shop.example");
    assert_eq!(
        headers["x-echo-host"],
        backend.local_addr.to_string().as_str()
    );

    let mut received = Sha256::new();
    let mut len = 0usize;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("body chunk");
        len += chunk.len();
        received.update(&chunk);
    }
    assert_eq!(len, CHUNK * CHUNKS);
    assert_eq!(format!("{:x}", received.finalize()), sent);
}

#[tokio::test]
async fn download_matches_its_checksum_header() {
    let backend = start(|_| {}).await;
    let client = reqwest::Client::new();
    for len in [0usize, 1, 64 * 1024, 3 * 1024 * 1024 + 17] {
        let response = client
            .get(format!("{}/download?bytes={len}", backend.url()))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let announced = response.headers()["x-content-sha256"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(response.content_length(), Some(len as u64));
        let body = response.bytes().await.expect("body");
        assert_eq!(body.len(), len);
        assert_eq!(hex_sha256(&body), announced, "{len} bytes");
        let mut expected = vec![0u8; len];
        DownloadPattern::new().fill(&mut expected);
        assert!(
            body == expected,
            "{len} bytes differ from the documented pattern"
        );
    }
    let (status, body) = get_json(
        &client,
        format!("{}/download?bytes=99999999999", backend.url()),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`bytes`")),
        "{body}"
    );
}

#[tokio::test]
async fn websocket_echoes_text_and_binary_then_closes() {
    let backend = start(|_| {}).await;
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", backend.local_addr))
            .await
            .expect("websocket handshake");
    assert_eq!(response.headers()["x-backend"], "sim-test");

    socket
        .send(Message::text("hello fulcrum"))
        .await
        .expect("send text");
    let echoed = socket.next().await.expect("a message").expect("no error");
    assert_eq!(echoed, Message::text("hello fulcrum"));

    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    socket
        .send(Message::binary(payload.clone()))
        .await
        .expect("send binary");
    let echoed = socket.next().await.expect("a message").expect("no error");
    assert_eq!(echoed, Message::binary(payload));

    socket.close(None).await.expect("close");
    // The server answers the close frame; the stream then ends cleanly.
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("unexpected message after close: {other:?}"),
            Err(err) => panic!("close was not clean: {err}"),
        }
    }
    assert_eq!(backend.stats().requests, 1);

    let plain = reqwest::get(format!("{}/ws", backend.url()))
        .await
        .expect("request");
    assert_eq!(plain.status(), 426);
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let backend = start(|_| {}).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = client
        .get(format!("{}/h2", backend.url()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "sim-test");
}

/// Sends a slow request on a raw connection and returns the connection.
async fn open_request(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /slow?delay_ms=600000 HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    stream
}

/// True once the peer has closed `stream` (EOF or reset).
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn shutdown_closes_the_listener_and_open_connections() {
    let backend = start(|_| {}).await;
    let addr = backend.local_addr;
    let mut open = open_request(addr).await;
    eventually("the slow request to be served", || {
        let in_flight = backend.stats().in_flight;
        async move { in_flight == 1 }
    })
    .await;

    backend.shutdown().await;
    assert!(
        closed_by_peer(&mut open).await,
        "open connection was not closed"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn dropping_the_handle_stops_the_backend() {
    let backend = start(|_| {}).await;
    let addr = backend.local_addr;
    let mut open = open_request(addr).await;
    eventually("the slow request to be served", || {
        let in_flight = backend.stats().in_flight;
        async move { in_flight == 1 }
    })
    .await;

    drop(backend);
    assert!(
        closed_by_peer(&mut open).await,
        "open connection was not closed"
    );
    eventually("the listener to close", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn bind_failure_names_the_address() {
    let first = start(|_| {}).await;
    let addr = first.local_addr;
    let err = start_backend(BackendArgs {
        listen: addr,
        ..BackendArgs::default()
    })
    .await
    .err()
    .expect("second bind on the same port fails");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let err = start_backend(BackendArgs {
        listen: "127.0.0.1:0".parse().expect("literal"),
        fail_rate: 7.0,
        ..BackendArgs::default()
    })
    .await
    .err()
    .expect("out-of-range fail rate is refused");
    assert!(err.to_string().contains("--fail-rate"), "{err}");
}
