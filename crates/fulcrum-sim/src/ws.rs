//! `/ws`: a WebSocket echo, for checking that a proxy passes upgrades through.
//!
//! The handshake is answered on the hyper request (RFC 6455 §4.2.2); the upgraded
//! connection is then handed to tokio-tungstenite in a task tracked by the server, so
//! shutdown closes it like any other connection.

use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::routes::{ResBody, error};
use crate::server::Spawner;
use crate::state::SimState;

/// Answers the upgrade request with `101 Switching Protocols` and starts the echo, or
/// `426 Upgrade Required` when the request is not a WebSocket version 13 handshake.
pub(crate) fn upgrade(
    mut req: Request<Incoming>,
    state: &SimState,
    spawner: &Spawner,
) -> Response<ResBody> {
    let Some(key) = handshake_key(req.headers()) else {
        let mut response = error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "/ws is a WebSocket echo: send a WebSocket (version 13) handshake",
        );
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    };
    state.requests.fetch_add(1, Ordering::Relaxed);
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = state.name.clone();
    spawner.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => echo(TokioIo::new(upgraded), &name).await,
            Err(err) => tracing::debug!(backend = %name, error = %err, "websocket upgrade failed"),
        }
    });

    let mut response = Response::new(ResBody::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("a base64 digest is a valid header value"),
    );
    response
}

/// The client's `Sec-WebSocket-Key` when the request is a version 13 upgrade.
fn handshake_key(headers: &HeaderMap) -> Option<&HeaderValue> {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    let version_13 = headers
        .get(SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    (has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade") && version_13)
        .then(|| headers.get(SEC_WEBSOCKET_KEY))
        .flatten()
}

/// Sends every text and binary message back; pings are answered and the closing handshake
/// completed by tungstenite itself while the stream is read to its end.
async fn echo(io: TokioIo<hyper::upgrade::Upgraded>, name: &str) {
    let mut socket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    while let Some(message) = socket.next().await {
        match message {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                if let Err(err) = socket.send(message).await {
                    tracing::debug!(backend = %name, error = %err, "websocket echo send failed");
                    break;
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(backend = %name, error = %err, "websocket read failed");
                break;
            }
        }
    }
}
