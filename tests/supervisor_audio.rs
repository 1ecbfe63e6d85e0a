//! A supervisor with nothing but a browser: the wallboard in headless Chromium (Debian's
//! `chromium` and `chromium-driver`, through [`common::browser`]), logged in with "Audio in
//! this browser", listens, whispers and barges on an operator's call. A caller (test UA, tone
//! A 440 Hz) talks with operator 1001 (a registered test phone, tone B 1000 Hz); the
//! supervisor's fake microphone plays tone C (1800 Hz). What each SIP party hears is told by
//! frequency at its RTP socket: in listen nobody hears C, in whisper the operator does and the
//! caller does not, in barge both do; the page hears A and B (its WebAudio analyser). The
//! page answers only the INVITE it asked for: another is declined. And a supervisor's browser
//! whose DTLS fails (webrtc-rs's peer answering with another certificate's fingerprint) is hung
//! up while the call goes on; one that offers its media again in a re-INVITE gets a WebRTC
//! answer with the same ICE and DTLS.
//!
//! A screenshot of the page is saved under `target/tmp/browser-shots/` when a step fails.

mod common;
#[path = "common/webrtc_peer.rs"]
mod webrtc_peer;

use common::browser::{tone_wav, Browser, BrowserOptions};
use common::voices::{until_heard, Voice};
use common::*;
use ivr311::config::{AgentRole, FileConfig};
use ivr311::sip::message::Request;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

const CALLER_HZ: f64 = 440.0;
const OPERATOR_HZ: f64 = 1000.0;
const SUPERVISOR_HZ: f64 = 1800.0;
const TONES: [f64; 3] = [CALLER_HZ, OPERATOR_HZ, SUPERVISOR_HZ];
const H: bool = true;
const O: bool = false;
const WITHIN: Duration = Duration::from_secs(15);

fn config() -> FileConfig {
    let mut f = agents_config(&["1001", "1002", "1003"], 20, 30);
    f.agents[2].role = AgentRole::Supervisor;
    f.limits.operator_silence_seconds = 0;
    f
}

fn server_media(inv: &Request) -> SocketAddr {
    ivr311::media::sdp::parse(&inv.body).unwrap().addr
}

/// The caller presses 1, 1, 0 and operator 1001 answers: the server's INVITE to the phone.
async fn bridged(srv: &ivr311::server::RunningServer) -> (TestUa, TestAgent, Request) {
    let op = TestAgent::login(srv.sip_addr, "1001").await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    assert_eq!(caller.call("0 101").await.code, 200);
    caller.until_audio().await;
    caller.keys("110").await;
    let inv = op.request("INVITE", Duration::from_secs(10)).await;
    op.reply(&inv, 200, "OK", Some(op.answer_sdp())).await;
    op.request("ACK", Duration::from_secs(3)).await;
    (caller, op, inv)
}

/// Click a button of the wallboard once it is there (the tables are redrawn at each update).
async fn click_when_there(b: &Browser, css: &str, what: &str) {
    let script = format!(
        "const e = document.querySelector({}); if (!e || e.disabled || e.closest('[hidden]')) return false; e.click(); return true;",
        Value::String(css.to_owned())
    );
    b.wait_for(what, &script, WITHIN).await;
}

/// The page's level (dB) of the caller's, the operator's and the supervisor's tones, read while
/// the caller and the operator talk.
async fn page_hears(b: &Browser, voices: &mut [Voice<'_>]) -> [f64; 3] {
    common::voices::talk(voices, Duration::from_millis(300), TONES).await;
    let v = b
        .execute(
            "return window.console311.audio.spectrum(arguments[0])",
            vec![serde_json::json!(TONES)],
        )
        .await;
    [0, 1, 2].map(|i| v[i].as_f64().unwrap_or(-200.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_on_the_wallboard_listens_whispers_and_barges_in_the_browser() {
    let srv = start_server(config()).await;
    let (mut caller, op, inv) = bridged(&srv).await;

    let wav = std::env::temp_dir().join(format!("ivr311-tone-{}.wav", rand::random::<u64>()));
    tone_wav(&wav, SUPERVISOR_HZ as f32, 10);
    let b = Browser::start(BrowserOptions {
        fake_audio: Some(wav.clone()),
    })
    .await;
    b.goto(&format!("http://{}/supervisor", srv.http_addr))
        .await;
    // The fake microphone's tone goes out as it is (no noise suppression, no gain control).
    b.execute(
        "localStorage.setItem('console311.audio.processing', 'off')",
        vec![],
    )
    .await;
    b.wait_for(
        "the log-in form",
        "return !document.getElementById('login').hidden",
        WITHIN,
    )
    .await;
    b.type_in("#login-agent", "1003").await;
    b.type_in("#login-password", "pw1003").await;
    b.click("#login-audio").await;
    b.click("#login-form button[type=submit]").await;
    b.text_until("#audio-status", |t| t == "Browser audio ready")
        .await;

    // An INVITE the page did not ask for (here the admin API's, which carries no token of the
    // page's) is declined, not answered.
    let path = format!("/admin/calls/{}/monitor", caller.call_id);
    let json = [("Content-Type", "application/json")];
    let body = br#"{"mode": "listen", "supervisor": "1003"}"#;
    let (status, text) = http(srv.http_addr, "POST", &path, &json, body).await;
    assert_eq!(status, 202, "{text}");
    b.wait_for(
        "the page declines the INVITE it did not ask for",
        "const s = window.console311.audio.status(); return s.declined === 1 && s.call === null",
        WITHIN,
    )
    .await;

    // Listen: the server's INVITE (WebRTC) is answered by the page by itself.
    click_when_there(
        &b,
        "#agents tr[data-agent='1001'] .m-listen",
        "Listen on 1001's call",
    )
    .await;
    b.wait_for(
        "the browser's monitor call is up",
        "const s = window.console311.audio.status(); return s.failure ? 'failed: ' + s.failure : s.call === 'up'",
        WITHIN,
    )
    .await;
    assert_eq!(
        b.execute("return window.console311.audio.status().failure", vec![])
            .await,
        Value::Null
    );
    b.text_until("#monitor-what", |t| t.starts_with("Listening to call"))
        .await;
    let mut voices = vec![
        Voice::new(&caller.rtp, caller.remote_rtp.unwrap(), CALLER_HZ),
        Voice::new(&op.rtp, server_media(&inv), OPERATOR_HZ),
    ];
    // The page hears both sides, and not its own tone.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let [a, bb, c] = page_hears(&b, &mut voices).await;
        if a > -60.0 && bb > -60.0 && c < a.min(bb) - 20.0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            b.screenshot("page-hears-nothing").await;
            panic!("the page did not hear both sides: {a:.0} dB at 440 Hz, {bb:.0} at 1000, {c:.0} at 1800");
        }
    }
    // Nobody hears the listening supervisor.
    until_heard(
        &mut voices,
        TONES,
        &[[O, H, O], [H, O, O]],
        WITHIN,
        "listen",
    )
    .await;

    // Whisper: the operator hears the supervisor, the caller does not.
    b.click("#mon-whisper").await;
    until_heard(
        &mut voices,
        TONES,
        &[[O, H, O], [H, O, H]],
        WITHIN,
        "whisper",
    )
    .await;
    b.text_until("#monitor-what", |t| t.starts_with("Whispering"))
        .await;

    // Barge: both hear the supervisor.
    b.click("#mon-barge").await;
    until_heard(&mut voices, TONES, &[[O, H, H], [H, O, H]], WITHIN, "barge").await;

    // Back to listen: the microphone is off again, nobody hears it.
    b.click("#mon-listen").await;
    until_heard(
        &mut voices,
        TONES,
        &[[O, H, O], [H, O, O]],
        WITHIN,
        "listen again",
    )
    .await;

    // Stop: the page's call ends, the caller and the operator talk on.
    b.click("#mon-stop").await;
    b.wait_for(
        "the monitor bar is gone",
        "return document.getElementById('monitor').hidden && window.console311.audio.status().call === null",
        WITHIN,
    )
    .await;
    until_heard(
        &mut voices,
        TONES,
        &[[O, H, O], [H, O, O]],
        WITHIN,
        "after the supervisor left",
    )
    .await;
    drop(voices);
    caller.bye().await;
    drop(b);
    srv.shutdown().await;
    let _ = std::fs::remove_file(&wav);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisors_browser_whose_media_fails_is_hung_up_and_the_call_goes_on() {
    let srv = start_server(config()).await;
    let (mut caller, op, inv) = bridged(&srv).await;
    let mut sup = webrtc_peer::WsAgent::login(srv.http_addr, srv.sip_addr, "1003").await;
    let path = format!("/admin/calls/{}/monitor", caller.call_id);
    let json = [("Content-Type", "application/json")];
    let body = br#"{"mode": "listen", "supervisor": "1003", "token": "t0k3n-for-this"}"#;
    let (status, text) = http(srv.http_addr, "POST", &path, &json, body).await;
    assert_eq!(status, 202, "{text}");
    let ring = sup.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(ring.header("X-311-Monitor-Token"), Some("t0k3n-for-this"));
    assert_eq!(ring.header("X-311-Monitor"), Some("listen 1001"));
    let offer = String::from_utf8(ring.body.to_vec()).unwrap();
    assert!(
        offer.contains("a=fingerprint:sha-256 ") && offer.contains("UDP/TLS/RTP/SAVPF"),
        "a browser is offered WebRTC: {offer}"
    );
    let (browser, answer) = webrtc_peer::Browser::answer(&offer).await;
    // Another certificate's fingerprint in place of the browser's own: our side of the DTLS
    // handshake refuses it.
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
    sup.reply(&ring, 200, "OK", Some(answer.replace(&theirs, &other)))
        .await;
    sup.request("ACK", Duration::from_secs(3)).await;
    sup.request("BYE", Duration::from_secs(10)).await;
    // The caller and the operator still hear each other.
    let mut voices = vec![
        Voice::new(&caller.rtp, caller.remote_rtp.unwrap(), CALLER_HZ),
        Voice::new(&op.rtp, server_media(&inv), OPERATOR_HZ),
    ];
    until_heard(
        &mut voices,
        TONES,
        &[[O, H, O], [H, O, O]],
        WITHIN,
        "after the supervisor's browser failed",
    )
    .await;
    drop(voices);
    caller.bye().await;
    drop(browser);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisors_browser_that_offers_its_media_again_gets_a_webrtc_answer() {
    let srv = start_server(config()).await;
    let (mut caller, _op, _inv) = bridged(&srv).await;
    let mut sup = webrtc_peer::WsAgent::login(srv.http_addr, srv.sip_addr, "1003").await;
    let path = format!("/admin/calls/{}/monitor", caller.call_id);
    let json = [("Content-Type", "application/json")];
    let body = br#"{"mode": "listen", "supervisor": "1003"}"#;
    assert_eq!(http(srv.http_addr, "POST", &path, &json, body).await.0, 202);
    let ring = sup.request("INVITE", Duration::from_secs(5)).await;
    let offer = String::from_utf8(ring.body.to_vec()).unwrap();
    let (browser, answer) = webrtc_peer::Browser::answer(&offer).await;
    sup.reply(&ring, 200, "OK", Some(answer.clone())).await;
    sup.request("ACK", Duration::from_secs(3)).await;

    // The browser offers its media again in a re-INVITE (as a browser does to refresh or
    // after a change of its own), its ICE and DTLS as they are.
    let header = |name: &str| ring.header(name).unwrap().to_owned();
    let target = header("Contact");
    let target = target
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_owned();
    let reinvite = |method: &str, body: &str| {
        format!(
            "{method} {target} SIP/2.0\r\nVia: SIP/2.0/WS b1003.invalid;branch=z9hG4bKre{method}{}\r\n\
Max-Forwards: 70\r\nFrom: {};tag=br1003\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 2 {method}\r\n\
Contact: <sip:1003@b1003.invalid;transport=ws>\r\n{}Content-Length: {}\r\n\r\n{body}",
            rand::random::<u32>(),
            header("To"),
            header("From"),
            header("Call-ID"),
            if body.is_empty() {
                ""
            } else {
                "Content-Type: application/sdp\r\n"
            },
            body.len(),
        )
    };
    sup.send(reinvite("INVITE", &answer).into()).await;
    let ok = loop {
        match sup.recv(Duration::from_secs(5)).await {
            Some(ivr311::sip::message::Message::Response(r)) if r.code >= 200 => break r,
            Some(_) => continue,
            None => panic!("no final answer to the browser's re-INVITE"),
        }
    };
    assert_eq!(ok.code, 200);
    let ours = String::from_utf8(ok.body.to_vec()).unwrap();
    let line = |sdp: &str, key: &str| {
        sdp.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    // An answer (our DTLS role settled by the browser's first answer, not offered again), with
    // the same ICE credentials and certificate as before.
    assert!(ours.contains("UDP/TLS/RTP/SAVPF"), "{ours}");
    let setup = line(&ours, "a=setup:");
    assert!(
        matches!(setup.as_deref(), Some("active" | "passive")),
        "a=setup in an answer is active or passive: {ours}"
    );
    assert_eq!(line(&ours, "a=ice-ufrag:"), line(&offer, "a=ice-ufrag:"));
    assert_eq!(
        line(&ours, "a=fingerprint:"),
        line(&offer, "a=fingerprint:")
    );
    sup.send(reinvite("ACK", "").into()).await;
    drop(browser);
    caller.bye().await;
    sup.request("BYE", Duration::from_secs(5)).await;
    srv.shutdown().await;
}
