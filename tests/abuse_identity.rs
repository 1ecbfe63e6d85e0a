//! Caller identity abuse from outside, over real SIP and RTP: a caller who writes a number
//! into From or P-Asserted-Identity cannot make the city's trunk (or its staff) call it, nor
//! have it asserted to 911. What keeps working: a trunk in `trunks.allow` asserting its
//! callers' numbers (call-backs through the call-back trunk, the number presented to 911), and
//! the 911 redirect itself for every caller.

mod common;

use common::*;
use ivr311::config::{CallbackConfig, FileConfig};
use ivr311::dispatch::emergency::EmergencyMethod;
use ivr311::media::g711::Codec;
use ivr311::server::RunningServer;
use ivr311::sip::message::{parse_datagram, Message, Request, ResponseBuilder};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// A number a trunk asserts for its caller: a New York line.
const ASSERTED: &str = "+12122000123";
/// International premium-rate: the toll-fraud destination.
const PREMIUM: &str = "+882345678901";

fn pai(number: &str) -> String {
    format!("P-Asserted-Identity: <sip:{number}@127.0.0.1>\r\n")
}

/// Operator 1001 and a call-back trunk at `trunk`; `trusted`: the callers' trunk (loopback)
/// is in `trunks.allow`.
fn callback_config(trunk: SocketAddr, trusted: bool) -> FileConfig {
    let mut file = agents_config(&["1001"], 20, 2);
    file.callback = CallbackConfig {
        trunk_uri: Some(format!("sip:{trunk}")),
        ring_timeout_seconds: 30,
        first_delay_seconds: 0,
        ..CallbackConfig::default()
    };
    if trusted {
        file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    }
    file
}

async fn pause(srv: &RunningServer, paused: bool) {
    let what = if paused { "pause" } else { "unpause" };
    let path = format!("/admin/agents/1001/{what}");
    let json = [("Content-Type", "application/json")];
    let (code, _) = http(srv.http_addr, "POST", &path, &json, br#"{"reason":"test"}"#).await;
    assert_eq!(code / 100, 2, "{path}");
}

/// A caller (From `from`, and the header lines `extra`) who reaches the operator queue and
/// presses 2 for a call-back; what they heard next.
async fn asks_for_a_callback(
    srv: &RunningServer,
    from: &str,
    extra: &str,
) -> (TestUa, Vec<String>) {
    let mut ua = TestUa::udp(srv.sip_addr).await;
    ua.from_user = from.to_owned();
    assert_eq!(ua.call_with("0 101", extra).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    ua.until_state(srv.http_addr, "waiting for operator").await;
    ua.press('2').await;
    let heard = ua.listen(Duration::from_millis(2500)).await;
    let ear = PromptEar::new(
        "en",
        &[
            "callback_kept",
            "callback_confirmed",
            "callback_unavailable",
            "hold_music",
        ],
        Codec::Pcmu,
    );
    (ua, ear.playbacks(&heard))
}

/// Whether `sock` receives a SIP request within `t`.
async fn any_request(sock: &UdpSocket, t: Duration) -> Option<Request> {
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + t;
    loop {
        let (n, _) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if let Ok(Message::Request(r)) = parse_datagram(&buf[..n], 65536) {
            return Some(r);
        }
    }
}

/// A caller on a public line (no `trunks.allow`) claims an international premium number in
/// From and in a forged P-Asserted-Identity and asks for a call-back: they hear that a
/// call-back is not available for their line and keep their place; the call-back trunk is
/// never dialled and no ticket asks staff to call the number; pressing 1 offers them a
/// service request instead.
#[tokio::test]
async fn a_claimed_number_is_never_called_back_and_the_caller_is_offered_a_request_instead() {
    let trunk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let srv = start_server(callback_config(trunk.local_addr().unwrap(), false)).await;
    let _agent = TestAgent::login(srv.sip_addr, "1001").await;
    pause(&srv, true).await;
    let (mut ua, heard) = asks_for_a_callback(&srv, PREMIUM, &pai(PREMIUM)).await;
    assert_eq!(
        heard.first().map(String::as_str),
        Some("callback_unavailable"),
        "{heard:?}"
    );
    assert!(!heard.iter().any(|p| p == "callback_kept"), "{heard:?}");
    // Still in the queue, offered a request: 1 leaves for one.
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(2500)).await;
    let ear = PromptEar::new(
        "en",
        &["operator_unavailable", "offer_general_ticket"],
        Codec::Pcmu,
    );
    assert_eq!(
        ear.playbacks(&heard).first().map(String::as_str),
        Some("operator_unavailable"),
        "offered a request instead"
    );
    // An operator is free now: nobody is called back.
    pause(&srv, false).await;
    assert!(
        any_request(&trunk, Duration::from_millis(1500))
            .await
            .is_none(),
        "the call-back trunk was dialled"
    );
    let flagged: Vec<_> = (srv.tickets.list(&Default::default()).await.unwrap())
        .into_iter()
        .filter(|t| t.callback_requested)
        .collect();
    assert!(flagged.is_empty(), "staff asked to call {flagged:?}");
    ua.bye().await;
    srv.shutdown().await;
}

/// Through a trusted trunk: its caller's asserted North American number is called back
/// through the call-back trunk; an asserted international premium number is not; and a
/// number past `callback.per_number_per_day` is not, also after the server restarts on the
/// same database.
#[tokio::test]
async fn a_trunks_caller_is_called_back_unless_the_number_is_premium_or_had_its_call_backs_today() {
    let trunk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut file = callback_config(trunk.local_addr().unwrap(), true);
    file.callback.per_number_per_day = 1;
    let args = serve_args();
    let srv = start_server_with(args.clone(), file.clone()).await;
    let _agent = TestAgent::login(srv.sip_addr, "1001").await;
    pause(&srv, true).await;
    let (mut ua, heard) = asks_for_a_callback(&srv, "+15550001111", &pai(ASSERTED)).await;
    assert_eq!(
        heard.first().map(String::as_str),
        Some("callback_kept"),
        "{heard:?}"
    );
    ua.expect_request("BYE", Duration::from_secs(15)).await;
    // The asserted number, not the one in From, is dialled once an operator is free.
    pause(&srv, false).await;
    let inv = any_request(&trunk, Duration::from_secs(5))
        .await
        .expect("the call-back INVITE");
    assert_eq!(inv.method.as_str(), "INVITE");
    assert_eq!(
        inv.uri,
        format!("sip:{ASSERTED}@{}", trunk.local_addr().unwrap())
    );
    // It rings on as the server stops: the request survives as a flagged ticket.
    srv.shutdown().await;

    // Restarted on the same database: the number had its one call-back today.
    let srv = start_server_with(args, file).await;
    let _agent = TestAgent::login(srv.sip_addr, "1001").await;
    pause(&srv, true).await;
    let (mut ua, heard) = asks_for_a_callback(&srv, "+15550001111", &pai(ASSERTED)).await;
    assert_eq!(
        heard.first().map(String::as_str),
        Some("callback_unavailable"),
        "past the daily limit: {heard:?}"
    );
    ua.bye().await;
    // A premium number, asserted or not, is never dialled.
    let (mut ua, heard) = asks_for_a_callback(&srv, PREMIUM, &pai(PREMIUM)).await;
    assert_eq!(
        heard.first().map(String::as_str),
        Some("callback_unavailable"),
        "premium: {heard:?}"
    );
    ua.bye().await;
    let flagged: Vec<_> = (srv.tickets.list(&Default::default()).await.unwrap())
        .into_iter()
        .filter(|t| t.callback_requested)
        .map(|t| t.phone)
        .collect();
    assert_eq!(
        flagged,
        [Some(ASSERTED.to_owned())],
        "only the first request"
    );
    srv.shutdown().await;
}

/// A stand-in 911 side: the bridge's INVITE (parsed, and as it came), answered 200 with
/// media.
async fn psap_answers(psap: &UdpSocket, rtp: &UdpSocket) -> (Request, String) {
    let mut buf = vec![0u8; 65535];
    let (inv, from, text) = loop {
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), psap.recv_from(&mut buf))
            .await
            .expect("INVITE to 911")
            .unwrap();
        if let Ok(Message::Request(r)) = parse_datagram(&buf[..n], 65536) {
            if r.method.as_str() == "INVITE" {
                break (r, from, String::from_utf8_lossy(&buf[..n]).to_string());
            }
        }
    };
    let sdp = format!(
        "v=0\r\no=psap 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        rtp.local_addr().unwrap().port()
    );
    let ok = ResponseBuilder::new(&inv, 200, "OK", Some("psap1"))
        .header(
            "Contact",
            format!("<sip:911@{}>", psap.local_addr().unwrap()),
        )
        .body("application/sdp", sdp)
        .build();
    psap.send_to(&ok, from).await.unwrap();
    (inv, text)
}

/// The emergency audit row, once its outcome is `connected`.
async fn connected_audit(srv: &RunningServer) -> ivr311::dispatch::tickets::EmergencyAuditRow {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = srv.tickets.emergency_audits(1).await.unwrap();
        if let Some(r) = rows
            .into_iter()
            .find(|r| r.outcome.starts_with("connected"))
        {
            return r;
        }
        assert!(Instant::now() < deadline, "the 911 bridge did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bridge_to(psap: &UdpSocket) -> FileConfig {
    let mut file = FileConfig::default();
    file.emergency.method = Some(EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", psap.local_addr().unwrap()));
    file
}

/// A caller on a public line claims someone else's number (in From, and in a forged
/// P-Asserted-Identity) and presses 9: they are connected to 911, but 911 is told neither
/// number (no P-Asserted-Identity; From is the 311 line's own), so responders cannot be sent
/// to the address of a number the caller made up. The audit keeps the claimed number, marked
/// unverified. A trunk's caller is presented to 911 with the number the trunk asserted.
#[tokio::test]
async fn only_a_trunk_asserted_number_is_presented_to_911_and_every_caller_is_connected() {
    let psap = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let psap_rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let victim = "+12122000999";
    let srv = start_server(bridge_to(&psap)).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call_with("0 101", &pai(victim)).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("19").await;
    let (inv, text) = psap_answers(&psap, &psap_rtp).await;
    assert_eq!(inv.header("P-Asserted-Identity"), None, "asserted to 911");
    assert_eq!(inv.from.user(), Some("311"));
    for n in [victim, "+15550001111"] {
        assert!(!text.contains(n), "{n} told to 911:\n{text}");
    }
    // The caller and 911 hear each other.
    let leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let mut out = ivr311::media::rtp::RtpStream::new();
    let mut buf = [0u8; 200];
    for _ in 0..15 {
        let n = out.write(0, &[0x55; 160], 160, &mut buf);
        psap_rtp.send_to(&buf[..n], leg).await.unwrap();
        // Paced as a phone sends, one packet each 20 ms: not a wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard = ua.listen(Duration::from_millis(300)).await;
    let from_911 = heard.iter().filter(|p| p[..] == [0x55; 160][..]).count();
    assert!(from_911 >= 5, "911 heard by the caller: {from_911}");
    let row = connected_audit(&srv).await;
    assert_eq!(row.caller.as_deref(), Some("+15550001111"));
    assert_eq!(row.caller_verified, Some(false));
    ua.bye().await;
    srv.shutdown().await;

    // Through a trusted trunk the asserted number goes to 911 in From and PAI.
    let mut file = bridge_to(&psap);
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call_with("0 101", &pai(ASSERTED)).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("19").await;
    let (inv, _) = psap_answers(&psap, &psap_rtp).await;
    let asserted = inv.header("P-Asserted-Identity").expect("PAI to 911");
    assert!(asserted.contains(ASSERTED), "{asserted}");
    assert_eq!(inv.from.user(), Some(ASSERTED));
    let row = connected_audit(&srv).await;
    assert_eq!(row.caller.as_deref(), Some(ASSERTED));
    assert_eq!(row.caller_verified, Some(true));
    ua.bye().await;
    srv.shutdown().await;
}

/// `ivr311 check --config` warns, and still passes, when call-backs are configured with no
/// trusted trunk (nobody could be called back) or the 911 bridge is (911 would be told no
/// number); with the carrier's addresses in `trunks.allow` it does not.
#[test]
fn check_config_warns_about_call_backs_and_a_911_bridge_without_trusted_trunks() {
    let dir = std::env::temp_dir().join(format!("ivr311-check-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, yaml: &str| {
        let path = dir.join(name);
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ivr311"))
            .args(["check", "--config"])
            .arg(&path)
            .current_dir(repo())
            .env("RUST_LOG", "warn")
            .output()
            .expect("binary runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = check(
        "open.yaml",
        "callback:\n  trunk_uri: \"sip:192.0.2.10\"\nemergency:\n  method: bridge\n  uri: \"sip:911@192.0.2.20\"\n",
    );
    assert_eq!(code, Some(0), "{out}");
    // The settings' own warnings (the menu's come on lines of its own path).
    let warnings: Vec<&str> = (out.lines())
        .filter(|l| l.contains("open.yaml: warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(warnings[0].contains("callback.trunk_uri") && warnings[0].contains("trunks.allow"));
    assert!(warnings[1].contains("911") && warnings[1].contains("trunks.allow"));
    let (code, out) = check(
        "trusted.yaml",
        "callback:\n  trunk_uri: \"sip:192.0.2.10\"\ntrunks:\n  allow: [\"192.0.2.0/24\"]\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("trusted.yaml: warning"), "{out}");
    // A broken file is refused with its location.
    let (code, out) = check("bad.yaml", "callback:\n  allowed_numbers: [\"1NXX\"]\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("bad.yaml:2:"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
