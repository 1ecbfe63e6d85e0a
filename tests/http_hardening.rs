//! The HTTP server under abuse, driven from outside with raw TCP clients against the real
//! server: a client that sends half a header or stops sending its body is cut off, connections
//! past the cap get 503 while others keep working, and the admin API refuses what a reverse
//! proxy, DNS rebinding or a cross-site form would send it, while a local admin keeps working.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, NewTicket, Status};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (EOF or reset), or `within` passes.
/// Returns what was read and how long the close took, or `None` if it stayed open.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<(Vec<u8>, Duration)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((got, start.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A server with short HTTP timeouts.
fn quick(header_read: u64, idle: u64, max_connections: usize) -> FileConfig {
    let mut file = FileConfig::default();
    file.http.header_read_timeout_seconds = header_read;
    file.http.idle_timeout_seconds = idle;
    file.http.max_connections = max_connections;
    file
}

#[tokio::test]
async fn half_a_header_is_cut_off_after_the_header_timeout() {
    let srv = start_server(quick(1, 30, 256)).await;
    let mut slow = TcpStream::connect(srv.http_addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    // Meanwhile another client is served.
    let (code, _) = http(srv.http_addr, "GET", "/health", &[], b"").await;
    assert_eq!(code, 200);
    let (_, took) = closed_within(&mut slow, Duration::from_secs(5))
        .await
        .expect("a half-sent header holds the connection open");
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");

    // A connection that never sends a byte is closed too.
    let mut silent = TcpStream::connect(srv.http_addr).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection stays open");

    // A kept-alive connection is served, then closed when it asks nothing more.
    let mut kept = TcpStream::connect(srv.http_addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = closed_within(&mut kept, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection stays open");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_cut_off_when_idle() {
    let mut file = quick(10, 1, 256);
    file.open311.api_keys = vec!["k1".into()];
    let srv = start_server(file).await;
    let mut s = TcpStream::connect(srv.http_addr).await.unwrap();
    s.write_all(
        b"POST /open311/v2/requests.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n\
          api_key=k1&service_code=pothole",
    )
    .await
    .unwrap();
    let (_, took) = closed_within(&mut s, Duration::from_secs(6))
        .await
        .expect("a stalled body holds the connection open");
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    assert!(srv
        .tickets
        .list(&Default::default())
        .await
        .unwrap()
        .is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_cap_get_503_and_others_keep_working() {
    let srv = start_server(quick(2, 30, 3)).await;
    let a = srv.http_addr;
    // Three clients take every slot with half a header each.
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        hogs.push(s);
    }
    // The fourth is told, at once, to come back later.
    let mut late = TcpStream::connect(a).await.unwrap();
    let _ = late
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await;
    let (answer, took) = closed_within(&mut late, Duration::from_secs(1))
        .await
        .expect("the connection past the cap is answered and closed at once");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");
    assert!(took < Duration::from_secs(1));
    // The header timeout frees the slots, and clients are served again.
    for s in &mut hogs {
        closed_within(s, Duration::from_secs(5))
            .await
            .expect("the hog is cut off");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _) = http(a, "GET", "/health", &[], b"").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back ({code})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.shutdown().await;
}

/// `GET /admin/calls` with `headers` (the `Host` replaced when one is given): the status.
async fn admin_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn without_a_token_the_admin_api_refuses_proxied_and_rebound_requests() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    let port = a.port();
    // A local admin, by address or by name.
    let localhost = format!("localhost:{port}");
    for host in [a.to_string(), localhost.clone(), "127.0.0.1".into()] {
        assert_eq!(
            admin_get(a, "/admin/calls", &[("Host", &host)]).await,
            200,
            "{host}"
        );
    }
    // Through a reverse proxy on this host: the peer is loopback, the client is not.
    for proxied in [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9;proto=https"),
        ("X-Real-IP", "203.0.113.9"),
    ] {
        assert_eq!(
            admin_get(a, "/admin/calls", &[proxied]).await,
            403,
            "{proxied:?}"
        );
        assert_eq!(admin_get(a, "/metrics", &[proxied]).await, 403);
    }
    // DNS rebinding: a page at attacker.example whose name now points at 127.0.0.1.
    let rebound = format!("attacker.example:{port}");
    for host in [
        rebound.as_str(),
        "attacker.example",
        "127.0.0.1.attacker.example",
        "localhost.attacker.example",
        "",
    ] {
        assert_eq!(
            admin_get(a, "/admin/calls", &[("Host", host)]).await,
            403,
            "Host: {host:?}"
        );
    }
    // An absolute request URI naming another host.
    let absolute = format!("http://attacker.example:{port}/admin/calls");
    assert_eq!(
        admin_get(a, &absolute, &[("Host", &localhost)]).await,
        403,
        "{absolute}"
    );
    // What is public stays public.
    let (code, _) = http(
        a,
        "GET",
        "/health",
        &[("X-Forwarded-For", "203.0.113.9")],
        b"",
    )
    .await;
    assert_eq!(code, 200);
    srv.shutdown().await;

    // With a token, a proxy may forward and any Host is fine: the token is the proof.
    let mut file = FileConfig::default();
    file.admin.token = Some("s3cret".into());
    let srv = start_server(file).await;
    let a = srv.http_addr;
    let through_proxy = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Host", "311-admin.city.example"),
    ];
    assert_eq!(admin_get(a, "/admin/calls", &through_proxy).await, 403);
    let with_token = [
        through_proxy[0],
        through_proxy[1],
        ("Authorization", "Bearer s3cret"),
    ];
    assert_eq!(admin_get(a, "/admin/calls", &with_token).await, 200);
    // The scheme is case-insensitive (RFC 7235); a token of another length is just wrong.
    assert_eq!(
        admin_get(a, "/admin/calls", &[("Authorization", "bearer s3cret")]).await,
        200
    );
    for wrong in ["Bearer s3cre", "Bearer s3cret!", "Bearer ", "Basic s3cret"] {
        assert_eq!(
            admin_get(a, "/admin/calls", &[("Authorization", wrong)]).await,
            403,
            "{wrong}"
        );
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn state_changes_need_a_json_body_so_a_cross_site_form_cannot_close_tickets() {
    for token in [None, Some("s3cret")] {
        let mut file = FileConfig::default();
        file.admin.token = token.map(str::to_owned);
        let srv = start_server(file).await;
        let a = srv.http_addr;
        let auth = token.map(|t| format!("Bearer {t}"));
        let with = |ct: &'static str| -> Vec<(&str, String)> {
            let mut h = vec![("Content-Type", ct.to_owned())];
            if let Some(auth) = &auth {
                h.push(("Authorization", auth.clone()));
            }
            h
        };
        let t = srv
            .tickets
            .file(NewTicket {
                service_code: "streetlight".into(),
                service_name: "Streetlight out".into(),
                channel: Channel::Web,
                ..Default::default()
            })
            .await
            .unwrap();
        let path = format!("/admin/requests/{}", t.service_request_id);
        let body = br#"{"status":"closed","status_notes":"closed by a web page"}"#;
        // What a form on another site can make a browser send without asking.
        for ct in [
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            let h = with(ct);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (code, text) = http(a, "POST", &path, &h, body).await;
            assert_eq!(code, 415, "{ct} (token {token:?}): {text}");
        }
        // No type at all (a no-cors fetch with no body).
        let mut h: Vec<(&str, &str)> = Vec::new();
        if let Some(auth) = &auth {
            h.push(("Authorization", auth));
        }
        let (code, _) = http(a, "POST", "/admin/calls/x/hangup", &h, b"").await;
        assert_eq!(code, 415);
        let (code, _) = http(a, "POST", "/admin/menu/reload", &h, b"").await;
        assert_eq!(code, 415);
        let stored = srv
            .tickets
            .get(t.service_request_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.status, Status::Open, "nothing was changed");

        // The admin's own JSON request works.
        let h = with("application/json");
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, text) = http(a, "POST", &path, &h, body).await;
        assert_eq!(code, 200, "{text}");
        let stored = srv
            .tickets
            .get(t.service_request_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.status, Status::Closed);
        srv.shutdown().await;
    }
}
