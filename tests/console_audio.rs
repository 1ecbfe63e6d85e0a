//! An operator with nothing but a browser: the console page in headless Chromium (Debian's
//! `chromium` and `chromium-driver`), its fake microphone playing a 1 kHz tone, logs in with
//! "Audio in this browser" and works a whole call: the page's JsSIP registers over `/sip`, a
//! SIP caller who chose a pothole and typed a ZIP code presses 0, the page rings with who and
//! why, one click on Answer answers the server's INVITE over WebRTC; the caller hears the
//! browser's tone and the page hears the caller's (read from its WebAudio analyser); a request
//! is filed from the prefilled form and found over Open311 with `channel: operator`; the 911
//! button sends the caller to the PSAP with their number; then Not ready, and the next caller
//! is not offered to this operator but to the next one who is ready; and when the server's
//! WebSocket goes, the page says its audio is lost.
//!
//! A screenshot of each step is saved under `target/tmp/browser-shots/` when a step fails.

mod common;
#[path = "common/webrtc_peer.rs"]
mod webrtc_peer;

use common::browser::{tone_wav, Browser, BrowserOptions};
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use webrtc_peer::tone_frames;

/// Poll `GET /admin/queues` until the `general` queue has `want` callers waiting.
async fn until_waiting(http_addr: SocketAddr, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = http(http_addr, "GET", "/admin/queues", &[], b"").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let waiting = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == "general")
            .and_then(|q| q["waiting"].as_u64());
        if waiting == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never had {want} waiting: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POST to the admin API (loopback, no token): the status.
async fn admin_post(http_addr: SocketAddr, path: &str) -> u16 {
    let json = [("Content-Type", "application/json")];
    http(http_addr, "POST", path, &json, b"{}").await.0
}

/// A caller through the trusted trunk (their number asserted) who walks the menu with `keys`.
async fn caller(srv: &ivr311::server::RunningServer, number: &str, keys: &str) -> TestUa {
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let (_, ok) = ua
        .call_with(
            "0 101",
            &format!("P-Asserted-Identity: <sip:{number}@127.0.0.1>\r\n"),
        )
        .await;
    assert_eq!(ok.code, 200);
    ua.until_audio().await;
    ua.keys(keys).await;
    ua
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_with_only_a_browser_answers_talks_files_transfers_to_911_and_goes_not_ready() {
    let psap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut file = agents_config(&["1001", "1002"], 20, 0);
    file.emergency = bridge_911_to(&format!("sip:911@{}", psap.local_addr().unwrap())).emergency;
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let srv = start_server(file).await;
    // Operator 1002 is on a desk phone, logged in but not ready until the end.
    let desk = TestAgent::login(srv.sip_addr, "1002").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let code = admin_post(srv.http_addr, "/admin/agents/1002/pause").await;
        if code / 100 == 2 {
            break;
        }
        assert!(
            code == 404 && tokio::time::Instant::now() < deadline,
            "pausing 1002: {code}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let wav = std::env::temp_dir().join(format!("ivr311-tone-{}.wav", rand::random::<u64>()));
    tone_wav(&wav, 1000.0, 10);
    let b = Browser::start(BrowserOptions {
        fake_audio: Some(wav.clone()),
    })
    .await;
    b.goto(&format!("http://{}/console", srv.http_addr)).await;
    // The fake microphone's tone goes to the caller as it is (no noise suppression).
    b.execute(
        "localStorage.setItem('console311.audio.processing', 'off')",
        vec![],
    )
    .await;

    // Log in with the browser's audio; the page's SIP phone registers over /sip.
    b.type_in("#login-agent", "1001").await;
    b.type_in("#login-password", "pw1001").await;
    b.click("#login-audio").await;
    b.click("#login-form button[type=submit]").await;
    b.text_until("#audio-status", |t| t == "Browser audio ready")
        .await;
    b.text_until("#state", |t| t == "Ready").await;
    assert_eq!(agent_state(srv.http_addr, "1001").await, "available");

    // A caller chose streets, pothole, typed a ZIP code, and pressed 0 at the recording step.
    let mut caller = caller(&srv, "+15550001111", "1111104580").await;
    b.text_until("#banner-number", |t| t == "+15550001111")
        .await;
    b.text_until("#c-path", |t| {
        t == "Streets and infrastructure > Pothole > Operator"
    })
    .await;
    b.text_until("#c-queue", |t| t == "general").await;
    // The request form is prefilled with what the caller entered.
    b.wait_for(
        "the form is prefilled",
        "return document.getElementById('t-service').value === 'pothole' \
         && document.getElementById('t-zip').value === '10458'",
        Duration::from_secs(5),
    )
    .await;
    b.screenshot("offer").await;

    // One click answers: the call is up over WebRTC.
    b.click("#btn-answer").await;
    b.text_until("#state", |t| t == "On a call").await;
    b.wait_for(
        "the browser's call is up",
        "const s = window.console311.audio.status(); return s.failure ? 'failed: ' + s.failure : s.call === 'up'",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        b.execute("return window.console311.audio.status().failure", vec![])
            .await,
        Value::Null
    );

    // The caller hears the browser's microphone: 1 kHz, not just anything.
    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tone_frames(&heard, 1000.0) < 25 {
        if tokio::time::Instant::now() >= deadline {
            b.screenshot("caller-hears-nothing").await;
            panic!(
                "the caller did not hear the browser's 1 kHz tone: {} of {} frames",
                tone_frames(&heard, 1000.0),
                heard.len()
            );
        }
        heard.extend(caller.listen(Duration::from_millis(100)).await);
    }

    // The page hears the caller's 400 Hz (its analyser, as the page's meter reads it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        caller.speak(10).await;
        let level = b
            .execute("return window.console311.audio.level()", vec![])
            .await;
        let f = level["frequency"].as_f64().unwrap_or(0.0);
        let rms = level["rms"].as_f64().unwrap_or(0.0);
        if (f - 400.0).abs() < 30.0 && rms > 0.01 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            b.screenshot("page-hears-nothing").await;
            panic!("the page did not hear the caller's 400 Hz: {level}");
        }
    }

    // A request filed from the form, read back in the page, is public over Open311 with the
    // operator channel.
    b.type_in("#t-address", "100 Main St").await;
    b.click("#ticket-form button[type=submit]").await;
    let shown = b
        .text_until("#filed-number", |t| t.len() == 9)
        .await
        .replace(' ', "");
    let (status, body) = http(
        srv.http_addr,
        "GET",
        &format!("/open311/v2/requests/{shown}.json"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let found: Value = serde_json::from_str(&body).unwrap();
    let found = &found[0];
    assert_eq!(found["service_code"], "pothole", "{found}");
    assert_eq!(found["zipcode"], "10458", "{found}");
    assert_eq!(found["address"], "100 Main St", "{found}");
    let ticket = srv
        .tickets
        .get(shown.parse().unwrap())
        .await
        .unwrap()
        .expect("the ticket is stored");
    assert_eq!(ticket.channel.as_str(), "operator");
    assert_eq!(ticket.agent_id.as_deref(), Some("1001"));

    // 911 from the page: the PSAP is called with the caller's number.
    b.click("#btn-911").await;
    let mut buf = vec![0u8; 65535];
    let invite = loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), psap.recv_from(&mut buf))
            .await
            .expect("an INVITE to 911")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("INVITE ") {
            break text;
        }
    };
    assert!(invite.contains("+15550001111"), "{invite}");
    b.screenshot("transfer-911").await;
    // The caller ends the call there (the PSAP test peer answers nothing).
    caller.bye().await;
    b.text_until("#state", |t| t.starts_with("Wrap-up") || t == "Ready")
        .await;

    // Not ready: the next caller is not offered to this operator...
    b.click("#btn-notready").await;
    b.text_until("#state", |t| t.starts_with("Not ready")).await;
    assert_eq!(agent_state(srv.http_addr, "1001").await, "paused");
    let next = caller_pressing(srv.sip_addr, "110").await;
    until_waiting(srv.http_addr, 1).await;
    assert_eq!(agent_state(srv.http_addr, "1001").await, "paused");
    assert_eq!(
        b.execute("return document.getElementById('banner').hidden", vec![])
            .await,
        Value::Bool(true)
    );
    // ...but to the next one ready.
    assert_eq!(
        admin_post(srv.http_addr, "/admin/agents/1002/unpause").await / 100,
        2
    );
    let offered = desk.request("INVITE", Duration::from_secs(10)).await;
    assert_eq!(offered.header("X-311-Call-ID"), Some(next.call_id.as_str()));
    assert_eq!(
        b.execute("return document.getElementById('banner').hidden", vec![])
            .await,
        Value::Bool(true)
    );
    // The server goes away: the page says its audio connection is lost.
    srv.shutdown().await;
    b.text_until("#audio-status", |t| t.starts_with("Browser audio lost"))
        .await;
    drop(b);
    let _ = std::fs::remove_file(&wav);
}
