//! Browser operators (WebRTC): an agent whose phone is a browser registers over SIP over
//! WebSocket (RFC 7118), is offered a caller who pressed 0 with a WebRTC offer, answers from a
//! real WebRTC stack (webrtc-rs's `rtc` peer connection: full ICE, DTLS client, SRTP), and
//! talks with the caller through the server's media clock; then its WebSocket is lost and the
//! caller goes back to the front of the queue. And the same from headless Chromium with JsSIP.

mod common;
#[path = "common/webrtc_peer.rs"]
mod webrtc_peer;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use webrtc_peer::*;
async fn admin_post(srv: &ivr311::server::RunningServer, path: &str) -> u16 {
    let json = [("Content-Type", "application/json")];
    http(srv.http_addr, "POST", path, &json, b"{}").await.0
}

/// Poll `GET /admin/queues` until the `general` queue has `want` callers waiting.
async fn until_waiting(http_addr: SocketAddr, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = http(http_addr, "GET", "/admin/queues", &[], b"").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_agent_answers_over_webrtc_hears_and_is_heard_and_a_lost_websocket_requeues_the_caller(
) {
    let srv = start_server(agents_config(&["1001", "1002"], 20, 0)).await;
    // A desk phone logged in but paused keeps the queue open without taking calls.
    let phone = TestAgent::login(srv.sip_addr, "1002").await;
    // The REGISTER reaches the queue a moment after its 200: until then pausing is a 404.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let code = admin_post(&srv, "/admin/agents/1002/pause").await;
        if code / 100 == 2 {
            break;
        }
        assert!(
            code == 404 && tokio::time::Instant::now() < deadline,
            "pausing 1002: {code}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut agent = WsAgent::login(srv.http_addr, srv.sip_addr, "1001").await;
    let mut caller = caller_pressing(srv.sip_addr, "110").await;

    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    let offer = String::from_utf8(inv.body.to_vec()).unwrap();
    for part in [
        "m=audio ",
        "UDP/TLS/RTP/SAVPF",
        "a=ice-lite",
        "a=ice-ufrag:",
        "a=ice-pwd:",
        "a=fingerprint:sha-256 ",
        "a=setup:actpass",
        "a=rtcp-mux",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "telephone-event/8000",
        "a=candidate:",
    ] {
        assert!(offer.contains(part), "the offer has {part:?}:\n{offer}");
    }
    assert_eq!(inv.header("X-311-Queue"), Some("general"));
    let (browser, answer) = Browser::answer(&offer).await;
    agent.reply(&inv, 200, "OK", Some(answer)).await;
    agent.request("ACK", Duration::from_secs(3)).await;

    // ICE and DTLS-SRTP come up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !browser.connected.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The browser's tone reaches the caller, through SRTP and the media clock.
    let mut caller_heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tone_frames(&caller_heard, 1000.0) < 25 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the caller did not hear the browser's tone: {} of {} frames",
            tone_frames(&caller_heard, 1000.0),
            caller_heard.len()
        );
        caller_heard.extend(caller.listen(Duration::from_millis(100)).await);
    }
    // And the caller's 400 Hz reaches the browser.
    caller.speak(50).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tone_frames(&browser.heard(), 400.0) < 25 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser did not hear the caller's tone: {} of {} frames",
            tone_frames(&browser.heard(), 400.0),
            browser.heard().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A key the caller presses reaches the browser as RFC 4733 events (the console's
    // operator sees it; an IVR behind a transfer would act on it).
    caller.press('5').await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let got: Vec<_> = browser.events.lock().unwrap().clone();
        let fives = got
            .iter()
            .filter_map(|p| ivr311::media::dtmf::TelephoneEvent::parse(p).ok())
            .filter(|e| e.event == 5)
            .count();
        if fives >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser got no key 5 as RFC 4733 events: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A second caller waits behind the first.
    let second = caller_pressing(srv.sip_addr, "110").await;
    until_waiting(srv.http_addr, 1).await;

    // The browser's connection drops mid-call: after the grace the first caller is back in
    // line, ahead of the second, and the next operator to be ready is offered that caller.
    drop(agent);
    until_waiting(srv.http_addr, 2).await;
    assert_eq!(
        admin_post(&srv, "/admin/agents/1002/unpause").await / 100,
        2
    );
    let offered = phone.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(
        offered.header("X-311-Call-ID"),
        Some(caller.call_id.as_str()),
        "the first caller is offered first (the second is {})",
        second.call_id
    );
    drop(browser);
}

/// Headless Chromium as the agent's phone: JsSIP, served by ivr311 itself, registers over
/// `ws://` and answers a caller who pressed 0 with the fake microphone, which plays a 1 kHz
/// tone; the caller hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_jssip_registers_over_websocket_answers_and_the_caller_hears_its_microphone()
{
    use common::browser::{tone_wav, Browser, BrowserOptions};
    let srv = start_server(agents_config(&["1001"], 20, 0)).await;
    let wav = std::env::temp_dir().join(format!("ivr311-tone-{}.wav", rand::random::<u64>()));
    tone_wav(&wav, 1000.0, 5);
    let browser = Browser::start(BrowserOptions {
        fake_audio: Some(wav.clone()),
    })
    .await;
    // The page: any of ivr311's own (a secure context on 127.0.0.1, the same origin as /sip),
    // with JsSIP loaded from where ivr311 serves it.
    browser
        .goto(&format!("http://{}/health", srv.http_addr))
        .await;
    browser
        .execute(
            "const s = document.createElement('script'); \
             s.src = '/console/assets/jssip.min.js'; document.head.appendChild(s);",
            vec![],
        )
        .await;
    browser
        .wait_for(
            "JsSIP loaded",
            "return typeof JsSIP !== 'undefined' && JsSIP.version",
            Duration::from_secs(10),
        )
        .await;
    let agent_js =
        std::fs::read_to_string(repo().join("tests/fixtures/browser/jssip-agent.js")).unwrap();
    browser
        .execute(
            &agent_js,
            vec![
                format!("ws://{}/sip", srv.http_addr).into(),
                srv.sip_addr.to_string().into(),
                "1001".into(),
                "pw1001".into(),
            ],
        )
        .await;
    browser
        .wait_for(
            "the agent registered",
            "return window.agent.state.failed || window.agent.state.registered",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        browser
            .execute("return window.agent.state.failed", vec![])
            .await,
        serde_json::Value::Null
    );
    assert_eq!(agent_state(srv.http_addr, "1001").await, "available");

    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let incoming = browser
        .wait_for(
            "the call is offered",
            "return window.agent.state.incoming",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(incoming["queue"], "general", "{incoming}");
    assert_eq!(incoming["from"], "+15550001111", "{incoming}");
    browser.execute("window.agent.answer()", vec![]).await;
    browser
        .wait_for(
            "the call is up",
            "const s = window.agent.state; return s.failed || s.confirmed",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        browser
            .execute("return window.agent.state.failed", vec![])
            .await,
        serde_json::Value::Null
    );

    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tone_frames(&heard, 1000.0) < 25 {
        if tokio::time::Instant::now() >= deadline {
            let log = browser
                .execute("return window.agent.state.log", vec![])
                .await;
            browser.screenshot("silent").await;
            panic!(
                "the caller did not hear the browser's microphone: {} tone frames of {} (page: {log})",
                tone_frames(&heard, 1000.0),
                heard.len()
            );
        }
        heard.extend(caller.listen(Duration::from_millis(100)).await);
    }

    // The operator holds the call and resumes it (JsSIP re-INVITEs, sendonly then sendrecv):
    // the browser's audio reaches the caller again on the same DTLS-SRTP session.
    browser
        .execute("window.agent.state.session.hold()", vec![])
        .await;
    browser
        .wait_for(
            "the call is held",
            "return window.agent.state.session.isOnHold().local",
            Duration::from_secs(10),
        )
        .await;
    caller.listen(Duration::from_millis(600)).await;
    browser
        .execute("window.agent.state.session.unhold()", vec![])
        .await;
    browser
        .wait_for(
            "the call is resumed",
            "return !window.agent.state.session.isOnHold().local",
            Duration::from_secs(10),
        )
        .await;
    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tone_frames(&heard, 1000.0) < 25 {
        if tokio::time::Instant::now() >= deadline {
            let log = browser
                .execute("return window.agent.state.log", vec![])
                .await;
            panic!(
                "after resuming, the caller did not hear the browser: {} tone frames of {} (page: {log})",
                tone_frames(&heard, 1000.0),
                heard.len()
            );
        }
        heard.extend(caller.listen(Duration::from_millis(100)).await);
    }
    let _ = std::fs::remove_file(&wav);
}

/// The embedded JsSIP is served as the vendored file, revalidated by its entity tag.
#[tokio::test]
async fn jssip_is_served_from_the_binary() {
    let srv = start_server(ivr311::config::FileConfig::default()).await;
    let (status, body) = http(
        srv.http_addr,
        "GET",
        "/console/assets/jssip.min.js",
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let vendored = std::fs::read_to_string(repo().join("web/vendor/jssip/jssip.min.js")).unwrap();
    assert_eq!(body.len(), vendored.len());
    assert!(body.contains("JsSIP"));
}

/// A browser whose DTLS certificate is not the one its SDP names is never heard: the leg
/// fails, the browser gets a BYE, and the caller waits in line again (with hold music) rather
/// than in a dead bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_certificate_does_not_match_its_fingerprint_is_dropped_and_the_caller_requeued(
) {
    let srv = start_server(agents_config(&["1001"], 20, 0)).await;
    let mut agent = WsAgent::login(srv.http_addr, srv.sip_addr, "1001").await;
    let mut caller = caller_pressing(srv.sip_addr, "110").await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    let offer = String::from_utf8(inv.body.to_vec()).unwrap();
    let (browser, answer) = Browser::answer(&offer).await;
    // Another certificate's fingerprint in place of the browser's own.
    let theirs = answer
        .lines()
        .find_map(|l| l.strip_prefix("a=fingerprint:sha-256 "))
        .expect("the browser's answer names its fingerprint")
        .trim()
        .to_owned();
    let other: String = theirs
        .chars()
        .map(|c| match c {
            '0' => '1',
            '1' => '0',
            c => c,
        })
        .collect();
    assert_ne!(other, theirs);
    let forged = answer.replace(&theirs, &other);
    agent.reply(&inv, 200, "OK", Some(forged)).await;
    agent.request("ACK", Duration::from_secs(3)).await;
    // The browser completes its side of the handshake (our certificate is the one we named);
    // ours refuses it: the leg is hung up.
    agent.request("BYE", Duration::from_secs(10)).await;
    until_waiting(srv.http_addr, 1).await;
    let heard = caller.listen(Duration::from_millis(500)).await;
    assert_eq!(
        tone_frames(&heard, 1000.0),
        0,
        "the caller heard the browser whose certificate failed"
    );
    assert!(
        heard.len() >= 15,
        "the caller hears hold music, not silence"
    );
    drop(browser);
}

/// The status of a WebSocket upgrade to `/sip` with these extra header lines.
async fn sip_upgrade(http_addr: SocketAddr, extra: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let req = format!(
        "GET /sip HTTP/1.1\r\nHost: {http_addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: sip\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer to the upgrade")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text}"))
}

/// A page on another site cannot open SIP over WebSocket from an operator's browser: its
/// `Origin` is refused with 403, unless listed in `http.allowed_origins`. The console's own
/// pages (this host) and clients that send no `Origin` (SIP phones) are let through.
#[tokio::test]
async fn sip_over_websocket_refuses_pages_from_other_sites() {
    let mut file = ivr311::config::FileConfig::default();
    file.http.allowed_origins = vec!["https://crm.example.org".to_owned().try_into().unwrap()];
    let srv = start_server(file).await;
    let own = format!("Origin: http://{}\r\n", srv.http_addr);
    assert_eq!(sip_upgrade(srv.http_addr, &own).await, 101);
    assert_eq!(
        sip_upgrade(srv.http_addr, "").await,
        101,
        "no Origin: not a browser"
    );
    assert_eq!(
        sip_upgrade(srv.http_addr, "Origin: https://crm.example.org\r\n").await,
        101,
        "a listed origin"
    );
    for other in [
        "Origin: https://evil.example\r\n",
        "Origin: null\r\n",
        "Origin: http://127.0.0.1:1\r\n",
    ] {
        assert_eq!(sip_upgrade(srv.http_addr, other).await, 403, "{other}");
    }
    srv.shutdown().await;
}

/// A browser agent's own call (JsSIP dialling 911 with its WebRTC offer) is not answered
/// with WebRTC, even with a 911 route configured: it is refused with 488 and a Warning that
/// says why (the console transfers through its API instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_agents_own_call_is_refused_with_488_and_says_why() {
    use common::browser::{Browser, BrowserOptions};
    let psap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut file = agents_config(&["1001"], 20, 0);
    file.emergency = bridge_911_to(&format!("sip:911@{}", psap.local_addr().unwrap())).emergency;
    let srv = start_server(file).await;
    let browser = Browser::start(BrowserOptions::default()).await;
    browser
        .goto(&format!("http://{}/health", srv.http_addr))
        .await;
    browser
        .execute(
            "const s = document.createElement('script'); \
             s.src = '/console/assets/jssip.min.js'; document.head.appendChild(s);",
            vec![],
        )
        .await;
    browser
        .wait_for(
            "JsSIP loaded",
            "return typeof JsSIP !== 'undefined' && JsSIP.version",
            Duration::from_secs(10),
        )
        .await;
    let agent_js =
        std::fs::read_to_string(repo().join("tests/fixtures/browser/jssip-agent.js")).unwrap();
    browser
        .execute(
            &agent_js,
            vec![
                format!("ws://{}/sip", srv.http_addr).into(),
                srv.sip_addr.to_string().into(),
                "1001".into(),
                "pw1001".into(),
            ],
        )
        .await;
    browser
        .wait_for(
            "the agent registered",
            "return window.agent.state.failed || window.agent.state.registered",
            Duration::from_secs(10),
        )
        .await;
    browser
        .execute(
            "window.out = {}; \
             const s = window.agent.ua.call(arguments[0], { \
               mediaConstraints: { audio: true, video: false }, pcConfig: { iceServers: [] } }); \
             s.on('failed', (e) => { window.out.failed = { cause: e.cause, \
               code: e.message && e.message.status_code, \
               warning: e.message && e.message.getHeader ? e.message.getHeader('Warning') : null }; }); \
             s.on('confirmed', () => { window.out.confirmed = true; });",
            vec![format!("sip:911@{}", srv.sip_addr).into()],
        )
        .await;
    let out = browser
        .wait_for(
            "the call is answered or refused",
            "return window.out.failed || window.out.confirmed",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(out["code"], 488, "{out}");
    assert!(
        out["warning"]
            .as_str()
            .is_some_and(|w| w.contains("only encrypted")),
        "{out}"
    );
    drop(browser);
    srv.shutdown().await;
}
