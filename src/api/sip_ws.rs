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
//! Browsers name the page that opens the connection in `Origin`: an upgrade from a page on
//! another site than this server's own host (the request's `Host`) is refused with 403 unless
//! its origin is in `http.allowed_origins`. Without the check, any web page an operator visits
//! could open `/sip` from their browser. Clients that send no `Origin` are not browsers (SIP
//! phones, tests, servers) and pass, to be authenticated by SIP digest like any other.
//!
//! The upgraded connection leaves the HTTP server's own bounds (its header and idle timeouts
//! and connection cap, [`super::serve`]): once upgraded it is a SIP connection, with SIP's.
//! Its task is tracked by the server's [`TaskTracker`] and stops at shutdown.

use crate::config::WebOrigin;
use crate::sip::transport::{TransportHandle, WsConn};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
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
    /// `http.allowed_origins`: other sites' pages allowed to open `/sip`.
    pub allowed_origins: Arc<[WebOrigin]>,
}

/// Whether a browser's `Origin` may open `/sip`: it is this server's own host (the `Host`
/// the browser asked for, with the same port), or listed. `None`: no `Origin` (not a browser).
fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[WebOrigin]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim().to_ascii_lowercase();
    if allowed.iter().any(|a| a.as_str() == origin) {
        return true;
    }
    // `null` (a sandboxed or file page) and anything that is not scheme://authority fail here.
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match (authority, host) {
        (Some(a), Some(h)) => !a.is_empty() && a == h.trim().to_ascii_lowercase(),
        _ => false,
    }
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
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if !origin_allowed(
        header(header::ORIGIN),
        header(header::HOST),
        &sip.allowed_origins,
    ) {
        debug!(remote = %remote, "SIP websocket from another site's page refused");
        return (
            StatusCode::FORBIDDEN,
            "this page's origin may not open SIP over WebSocket here (http.allowed_origins)",
        )
            .into_response();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Vec<WebOrigin> {
        list.iter()
            .map(|s| WebOrigin::try_from((*s).to_owned()).unwrap())
            .collect()
    }

    #[test]
    fn the_own_host_and_listed_origins_pass_and_other_sites_do_not() {
        let none = origins(&[]);
        let host = Some("10.0.0.5:8080");
        // Not a browser.
        assert!(origin_allowed(None, host, &none));
        // The console's own page, over http or https, whatever the case.
        assert!(origin_allowed(Some("http://10.0.0.5:8080"), host, &none));
        assert!(origin_allowed(Some("https://10.0.0.5:8080"), host, &none));
        assert!(origin_allowed(
            Some("HTTP://Console.Example.org"),
            Some("console.example.org"),
            &none
        ));
        // Another site, another port of the same host, a sandboxed page, no Host.
        assert!(!origin_allowed(Some("https://evil.example"), host, &none));
        assert!(!origin_allowed(Some("http://10.0.0.5:9999"), host, &none));
        assert!(!origin_allowed(Some("null"), host, &none));
        assert!(!origin_allowed(Some("http://10.0.0.5:8080"), None, &none));
        // Listed.
        let crm = origins(&["https://CRM.example.org"]);
        assert!(origin_allowed(Some("https://crm.example.org"), host, &crm));
        assert!(!origin_allowed(Some("http://crm.example.org"), host, &crm));
    }

    #[test]
    fn an_allowed_origin_must_be_scheme_and_host() {
        for bad in [
            "crm.example.org",
            "https://",
            "https://crm.example.org/app",
            "ftp://x",
        ] {
            assert!(WebOrigin::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        assert_eq!(
            WebOrigin::try_from("https://[::1]:8443".to_owned())
                .unwrap()
                .as_str(),
            "https://[::1]:8443"
        );
    }
}
