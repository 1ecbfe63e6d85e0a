//! `GET /sip`: SIP over WebSocket (RFC 7118) for browsers, on the HTTP listener.
//!
//! A WebRTC SIP phone (JsSIP, SIP.js, the operator console) opens `ws://HOST:PORT/sip` (or
//! `wss://` through a reverse proxy that terminates TLS) with the `sip` subprotocol; an
//! upgrade that does not offer `sip` is refused with 400. Each text or binary frame is one SIP
//! message, handed to [`crate::sip::transport::WsConn`], which parses it as the UDP and TCP
//! transports do and holds the bounds (frames no larger than `limits.max_message_bytes`, the
//! inbound connection limits, the idle time). What the UA sends to the browser goes back as
//! one text frame per message. REGISTER, INVITE and the rest are authenticated by the SIP
//! layer as on any transport (agents log in with their digest passwords).
//!
//! The upgraded connection leaves the HTTP server's own bounds (its header and idle timeouts
//! and connection cap, [`super::serve`]): once upgraded it is a SIP connection, with SIP's.
//! Its task is tracked by the server's [`TaskTracker`] and stops at shutdown.

use crate::sip::transport::{TransportHandle, WsConn};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// What the route needs: the SIP transport to hand connections to, and the server's tracker
/// and stop token for their tasks.
#[derive(Clone)]
pub struct SipWebSocket {
    pub transport: TransportHandle,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

/// Whether the browser reached us over TLS (a proxy in front says so in `X-Forwarded-Proto`
/// or `Forwarded`): its flow is then `WSS`, as RFC 7118 names it in Via.
fn behind_tls(headers: &HeaderMap) -> bool {
    let says_https = |v: &str| v.to_ascii_lowercase().contains("https");
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(says_https)
        || headers
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("proto=https"))
}

pub(crate) async fn upgrade(
    State(state): State<super::ApiState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(sip) = state.sip_ws.clone() else {
        return (
            StatusCode::NOT_FOUND,
            "SIP over WebSocket is not served here",
        )
            .into_response();
    };
    let ws = ws.protocols(["sip"]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "SIP over WebSocket needs the \"sip\" subprotocol (RFC 7118)",
        )
            .into_response();
    }
    let Some(conn) = sip.transport.open_websocket(remote, behind_tls(&headers)) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("Retry-After", "5")],
            "too many SIP connections",
        )
            .into_response();
    };
    let max = sip.transport.max_message_bytes();
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let task = serve(socket, conn, sip.cancel.clone());
            sip.tracker.track_future(task)
        })
}

/// Carry SIP both ways until either side closes, the connection idles out, or the server
/// stops. Dropping `conn` reports the flow closed.
async fn serve(mut socket: WebSocket, mut conn: WsConn, cancel: CancellationToken) {
    let flow = conn.flow();
    loop {
        let idle_at = conn.idle_at();
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = socket.send(Message::Close(Some(CloseFrame { code: 1001, reason: "server stopping".into() }))).await;
                break;
            }
            out = conn.outgoing() => match out {
                Some(bytes) => {
                    // SIP is text; a message that is not UTF-8 (a binary body) goes binary.
                    let msg = match std::str::from_utf8(&bytes) {
                        Ok(text) => Message::Text(text.into()),
                        Err(_) => Message::Binary(bytes),
                    };
                    if socket.send(msg).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    if !conn.on_frame(t.as_bytes()).await {
                        break;
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if !conn.on_frame(&b).await {
                        break;
                    }
                }
                // Pings are answered by the library; pongs need nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    // Oversized frames and protocol errors end the connection.
                    debug!(remote = %flow.remote, error = %e, "SIP websocket error");
                    break;
                }
            },
            _ = tokio::time::sleep_until(idle_at) => {
                if conn.idle() {
                    debug!(remote = %flow.remote, "SIP websocket idle; closing");
                    let _ = socket.send(Message::Close(Some(CloseFrame { code: 1000, reason: "idle".into() }))).await;
                    break;
                }
            }
        }
    }
}
