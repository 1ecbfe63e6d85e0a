//! Admin API, live menu reload and metrics, against the real server with live calls.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, NewTicket};
use ivr311::media::g711::Codec;
use std::time::Duration;

/// Admin requests that change state declare a JSON body (even an empty one).
const JSON: [(&str, &str); 1] = [("Content-Type", "application/json")];

#[tokio::test]
async fn live_calls_are_listed_and_can_be_hung_up() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("211").await; // Spanish, continue, streets
    ua.until_state(srv.http_addr, "streets").await;
    let (code, body) = http(srv.http_addr, "GET", "/admin/calls", &[], b"").await;
    assert_eq!(code, 200, "{body}");
    let calls: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(calls.as_array().unwrap().len(), 1);
    assert_eq!(calls[0]["call_id"], ua.call_id.as_str());
    assert_eq!(calls[0]["caller"], "+15550001111");
    assert_eq!(calls[0]["language"], "es");
    assert_eq!(calls[0]["state"], "streets");

    let (code, _) = http(
        srv.http_addr,
        "POST",
        &format!("/admin/calls/{}/hangup", ua.call_id),
        &JSON,
        b"",
    )
    .await;
    assert_eq!(code, 204);
    ua.expect_request("BYE", Duration::from_secs(3)).await;
    let (code, _) = http(
        srv.http_addr,
        "POST",
        "/admin/calls/nope/hangup",
        &JSON,
        b"",
    )
    .await;
    assert_eq!(code, 404);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_token_is_required_when_configured() {
    let mut file = FileConfig::default();
    file.admin.token = Some("s3cret".into());
    let srv = start_server(file).await;
    assert_eq!(
        http(srv.http_addr, "GET", "/admin/calls", &[], b"").await.0,
        403
    );
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(
        http(srv.http_addr, "GET", "/admin/calls", &wrong, b"")
            .await
            .0,
        403
    );
    assert_eq!(
        http(srv.http_addr, "GET", "/metrics", &wrong, b"").await.0,
        403
    );
    let right = [("Authorization", "Bearer s3cret")];
    assert_eq!(
        http(srv.http_addr, "GET", "/admin/calls", &right, b"")
            .await
            .0,
        200
    );
    assert_eq!(
        http(srv.http_addr, "POST", "/admin/menu/reload", &wrong, b"")
            .await
            .0,
        403
    );
    srv.shutdown().await;
}

/// A copy of the shipped menu in a temp file the test may edit.
fn menu_copy() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ivr311-menu-{}.yaml", rand::random::<u64>()));
    std::fs::copy(repo().join("menus/311.yaml"), &p).unwrap();
    p
}

#[tokio::test]
async fn reload_swaps_the_menu_for_new_calls_only_and_refuses_a_broken_one() {
    let menu = menu_copy();
    let mut args = serve_args();
    args.menu = menu.clone();
    let srv = start_server_with(args, FileConfig::default()).await;
    let ear = PromptEar::new(
        "en",
        &["main_menu", "main_menu_short", "screening"],
        Codec::Pcmu,
    );

    // A call in progress, still at the language menu.
    let mut old = TestUa::udp(srv.sip_addr).await;
    assert_eq!(old.call("0 101").await.code, 200);
    old.until_audio().await;

    // The admin changes the main menu's greeting and reloads.
    let text = std::fs::read_to_string(&menu).unwrap();
    let changed = text.replacen(
        "greet_long: main_menu\n",
        "greet_long: main_menu_short\n",
        1,
    );
    assert_ne!(text, changed, "the edit applies");
    std::fs::write(&menu, &changed).unwrap();
    let (code, body) = http(srv.http_addr, "POST", "/admin/menu/reload", &JSON, b"").await;
    assert_eq!(code, 200, "{body}");

    // The call in progress finishes on the menu it started with.
    old.keys("11").await;
    let heard = old.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear.playbacks(&heard), vec!["main_menu"]);
    // A new call gets the new menu.
    let mut new = TestUa::udp(srv.sip_addr).await;
    assert_eq!(new.call("0 101").await.code, 200);
    new.until_audio().await;
    new.keys("11").await;
    let heard = new.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear.playbacks(&heard), vec!["main_menu_short"]);

    // A broken menu is refused with path:line:col errors and the last good one stays.
    std::fs::write(
        &menu,
        changed.replacen("{goto: streets}", "{goto: streetz}", 1),
    )
    .unwrap();
    let (code, body) = http(srv.http_addr, "POST", "/admin/menu/reload", &JSON, b"").await;
    assert_eq!(code, 422, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "refused");
    let first = v["errors"][0].as_str().unwrap();
    let prefix = format!("{}:", menu.display());
    assert!(
        first.starts_with(&prefix) && first.contains("streetz"),
        "{first}"
    );
    let mut after = TestUa::udp(srv.sip_addr).await;
    assert_eq!(after.call("0 101").await.code, 200);
    after.until_audio().await;
    after.keys("11").await;
    let heard = after.listen(Duration::from_millis(1500)).await;
    assert_eq!(
        ear.playbacks(&heard),
        vec!["main_menu_short"],
        "the last good menu serves"
    );
    for ua in [&mut old, &mut new, &mut after] {
        ua.bye().await;
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn staff_status_updates_reach_the_phone_lookup() {
    let srv = start_server(FileConfig::default()).await;
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
    let (code, body) = http(
        srv.http_addr,
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        br#"{"status":"closed","status_notes":"Lamp replaced"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = http(
        srv.http_addr,
        "POST",
        &path,
        &JSON,
        br#"{"status":"maybe"}"#,
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = http(
        srv.http_addr,
        "POST",
        "/admin/requests/99999999",
        &JSON,
        br#"{"status":"closed"}"#,
    )
    .await;
    assert_eq!(code, 404);
    let stored = srv
        .tickets
        .get(t.service_request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status_notes.as_deref(), Some("Lamp replaced"));

    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("116").await;
    ua.keys(&t.service_request_id.to_string()).await;
    let ear = PromptEar::new(
        "en",
        &["ticket_status_closed", "ticket_status_open"],
        Codec::Pcmu,
    );
    let heard = ua
        .listen_until("the status", Duration::from_secs(20), |h| {
            !ear.playbacks(h).is_empty()
        })
        .await;
    assert_eq!(ear.playbacks(&heard), vec!["ticket_status_closed"]);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn metrics_count_outcomes_menus_and_emergencies() {
    let srv = start_server(FileConfig::default()).await;
    // One caller presses 9 at screening; one hears recycling information and hangs up.
    let mut a = TestUa::udp(srv.sip_addr).await;
    assert_eq!(a.call("0 101").await.code, 200);
    a.until_audio().await;
    a.keys("19").await;
    a.listen(Duration::from_millis(300)).await;
    a.bye().await;
    let mut b = TestUa::udp(srv.sip_addr).await;
    assert_eq!(b.call("0 101").await.code, 200);
    b.until_audio().await;
    b.keys("11237").await; // trash, recycling information, then an invalid key in trash
    b.listen(Duration::from_millis(300)).await;
    b.bye().await;
    // Both calls ended: their figures are in the metrics.
    until_no_calls(srv.http_addr).await;
    let (code, text) = http(srv.http_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(code, 200);
    for line in [
        "ivr311_calls_total{outcome=\"emergency\"} 1",
        "ivr311_calls_total{outcome=\"info\"} 1",
        "ivr311_menu_visits_total{line=\"default\",menu=\"screening\"} 2",
        "ivr311_menu_visits_total{line=\"default\",menu=\"trash\"} 1",
        "ivr311_dtmf_invalid_total{line=\"default\",menu=\"trash\"} 1",
        "ivr311_emergency_redirects_total{method=\"announce\",outcome=\"caller hung up\"} 1",
        "ivr311_live_calls 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(text.contains("# TYPE ivr311_rtp_packets_sent_total counter"));
    srv.shutdown().await;
}

/// A caller's recorded description is for staff: the Open311 API never shows it, the admin API
/// serves it (with the token), and on disk only the server's user may read it.
#[tokio::test]
async fn a_callers_recording_is_for_staff_only() {
    let recordings =
        std::env::temp_dir().join(format!("ivr311-rec-staff-{}", rand::random::<u64>()));
    let mut file = FileConfig::default();
    file.admin.token = Some("s3cret".into());
    file.open311.public_url = Some("https://311.example.gov".into());
    file.storage.recordings_dir = recordings.clone();
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    // English, not an emergency, streets, pothole, ZIP 94103, then a spoken description.
    ua.keys("1111").await;
    ua.keys("94103").await;
    until_recording(&mut ua, &srv).await;
    ua.speak(50).await;
    ua.press('#').await;
    let mut filed = Vec::new();
    for _ in 0..100 {
        filed = srv.tickets.list(&Default::default()).await.unwrap();
        if !filed.is_empty() {
            break;
        }
        ua.listen(Duration::from_millis(100)).await;
    }
    assert_eq!(filed.len(), 1, "one ticket filed");
    let t = &filed[0];
    let name = t.recording.clone().expect("the description was recorded");
    let id = t.service_request_id;

    // Not in the public API.
    let (code, body) = http(
        srv.http_addr,
        "GET",
        &format!("/open311/v2/requests/{id}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v[0]["media_url"].is_null(), "{body}");
    assert!(!body.contains(&name), "{body}");

    // Staff fetch it with the token.
    let path = format!("/admin/requests/{id}/recording");
    assert_eq!(http(srv.http_addr, "GET", &path, &[], b"").await.0, 403);
    let auth = [("Authorization", "Bearer s3cret")];
    let (status, head, wav) = http_bytes(srv.http_addr, &path, &auth).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: audio/wav"),
        "{head}"
    );
    let reader = hound::WavReader::new(std::io::Cursor::new(wav)).expect("a WAV file");
    assert_eq!(reader.spec().sample_rate, 8000);
    assert!(
        reader.duration() >= 8000 / 2,
        "{} samples",
        reader.duration()
    );

    // A ticket without a recording, and one that does not exist.
    let web = srv
        .tickets
        .file(NewTicket {
            service_code: "pothole".into(),
            service_name: "Pothole".into(),
            channel: Channel::Web,
            ..Default::default()
        })
        .await
        .unwrap();
    let none = format!("/admin/requests/{}/recording", web.service_request_id);
    assert_eq!(http(srv.http_addr, "GET", &none, &auth, b"").await.0, 404);
    let missing = "/admin/requests/99999999/recording";
    assert_eq!(http(srv.http_addr, "GET", missing, &auth, b"").await.0, 404);

    // Only the server's user may read the file, or list the directory it created.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&recordings.join(&name)), 0o600);
        assert_eq!(mode(&recordings), 0o700);
    }
    ua.bye().await;
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&recordings);
}

/// GET `path` with `headers`: status, response head and the body as bytes.
async fn http_bytes(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "a WAV is sent with its length: {head}"
    );
    (status, head, raw[split + 4..].to_vec())
}
