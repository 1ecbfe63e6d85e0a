//! Real peer: SIPp (the `sip-tester` package) calls the real server over loopback, plays
//! `g711a.pcap`, presses RFC 4733 digits from SIPp's own DTMF pcaps, and hangs up.
//! `scripts/test` installs SIPp; without it these tests fail and say so.

mod common;

use common::*;
use ivr311::config::FileConfig;
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

/// A free even UDP port with the next three free too (SIPp uses mp..mp+3 for RTP/RTCP).
pub fn free_media_port() -> u16 {
    for _ in 0..200 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port() & !1;
        drop(s);
        if !(1024..=65530).contains(&p) {
            continue;
        }
        let all: Vec<_> = (0..4)
            .map(|i| UdpSocket::bind(("127.0.0.1", p + i)))
            .collect();
        if all.iter().all(|r| r.is_ok()) {
            return p;
        }
    }
    panic!("no free media port")
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sipp(args: &[String]) -> std::process::Output {
    let out = Command::new("sipp")
        .args(args)
        .output()
        .expect("sipp is installed (apt-get install sip-tester; scripts/test does this)");
    out
}

/// Run one SIPp UAC scenario against the server; panics with SIPp's output if it fails.
async fn run_sipp(sip: std::net::SocketAddr, scenario: &str, timeout_s: u32) {
    let scenario = repo().join("tests/sipp").join(scenario);
    let args: Vec<String> = vec![
        sip.to_string(),
        "-sf".into(),
        scenario.display().to_string(),
        "-s".into(),
        "311".into(),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        free_udp_port().to_string(),
        "-mi".into(),
        "127.0.0.1".into(),
        "-mp".into(),
        free_media_port().to_string(),
        "-m".into(),
        "1".into(),
        "-l".into(),
        "1".into(),
        "-nostdin".into(),
        "-timeout".into(),
        timeout_s.to_string(),
        "-timeout_error".into(),
    ];
    let out = tokio::task::spawn_blocking(move || sipp(&args))
        .await
        .unwrap();
    assert!(out.status.success(), "sipp failed: {}", report(&out));
}

/// The end of SIPp's screen (last 30 lines, newest first) and its stderr.
fn report(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One SIPp call of `scenario` against a server with the default config; `/health` after it.
async fn one_sipp_call(scenario: &str, timeout_s: u32) -> serde_json::Value {
    let srv = start_server(FileConfig::default()).await;
    run_sipp(srv.sip_addr, scenario, timeout_s).await;
    let h = until_no_calls(srv.http_addr).await;
    srv.shutdown().await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_caller_with_pcap_audio_and_dtmf() {
    let h = one_sipp_call("uac_dtmf.xml", 30).await;
    assert_eq!(h["live_calls"], 0, "call ended: {h}");
    assert_eq!(h["calls_completed"], 1, "{h}");
    // Three key presses (1, 2, and 1 again from the identical pcap), each heard once.
    assert_eq!(h["digits_received"], 3, "{h}");
    // The caller's pcap audio arrived and the server streamed back to SIPp's media port.
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 50, "{h}");
    assert!(h["rtp_packets_sent"].as_u64().unwrap() > 150, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_caller_with_a_delayed_offer_is_answered_and_heard() {
    // INVITE without SDP: the 200 carries our offer and SIPp's ACK the answer (PCMA, events
    // at 101); then the same media as above. Before, such a call got 488.
    let h = one_sipp_call("uac_delayed_offer.xml", 30).await;
    assert_eq!(h["calls_completed"], 1, "{h}");
    assert_eq!(h["digits_received"], 3, "{h}");
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 50, "{h}");
    assert!(h["rtp_packets_sent"].as_u64().unwrap() > 150, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_carrier_requiring_session_timers_is_answered_with_one_and_refreshes() {
    // Require: timer and Session-Expires: 90;refresher=uac; the scenario checks our 200 and
    // the 200 to its UPDATE refresh (uac_session_timer.xml). Before, the INVITE got 420.
    let h = one_sipp_call("uac_session_timer.xml", 20).await;
    assert_eq!(h["calls_completed"], 1, "{h}");
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 20, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_pothole_path_files_a_ticket() {
    let srv = start_server(FileConfig::default()).await;
    run_sipp(srv.sip_addr, "uac_pothole.xml", 60).await;
    let tickets = until("the ticket is filed", Duration::from_secs(10), async || {
        let t = srv.tickets.list(&Default::default()).await.unwrap();
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(tickets.len(), 1, "one ticket");
    let t = &tickets[0];
    assert_eq!(t.service_code, "pothole");
    assert_eq!(t.zipcode.as_deref(), Some("94103"));
    assert_eq!(t.phone.as_deref(), Some("+15557654321"));
    assert!(
        t.recording.is_some(),
        "SIPp's pcap audio was recorded as the description"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_emergency_path_is_told_to_dial_911_and_audited() {
    let srv = start_server(FileConfig::default()).await;
    run_sipp(srv.sip_addr, "uac_emergency.xml", 60).await;
    let audits = settled_audits(&srv).await;
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0].caller.as_deref(), Some("+15557654321"));
    assert!(
        audits[0].outcome.starts_with("announced"),
        "{}",
        audits[0].outcome
    );
    assert_eq!(
        srv.tickets.list(&Default::default()).await.unwrap().len(),
        0
    );
    srv.shutdown().await;
}

/// The 911 audit rows once the first has an outcome (up to 15 s: "connecting you to 911"
/// plays before a bridge starts).
async fn settled_audits(
    srv: &ivr311::server::RunningServer,
) -> Vec<ivr311::dispatch::tickets::EmergencyAuditRow> {
    let mut audits = vec![];
    for _ in 0..150 {
        audits = srv.tickets.emergency_audits(10).await.unwrap();
        if audits.first().is_some_and(|a| a.outcome != "started") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    audits
}

/// Whether a socket is bound to UDP port `port` of 127.0.0.1 (read from /proc/net/udp).
fn udp_bound(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
}

/// Whether something listens on TCP port `port` of 127.0.0.1 (read from /proc/net/tcp, so
/// that nothing connects to it to find out).
fn tcp_listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == local && f[3] == "0A"
    })
}

/// A 911 route that takes TCP only (`;transport=tcp`, as an ESInet border or some carriers
/// ask), played by SIPp's own UAS over TCP: the bridge opens a connection, SIPp answers on it,
/// and our BYE reaches it there when the caller hangs up. (Before, a TCP route failed at once
/// and the caller got the announcement.) SIPp ends a call whose connection closes, so the
/// connection opened again for a later BYE is tested against our own TCP peer, in menu_calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_psap_over_tcp_is_bridged_and_hung_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args: Vec<String> = [
        "-sn",
        "uas",
        "-t",
        "t1",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-mi",
        "127.0.0.1",
        "-mp",
        &free_media_port().to_string(),
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "40",
        "-timeout_error",
    ]
    .map(String::from)
    .to_vec();
    let psap = tokio::task::spawn_blocking(move || sipp(&args));
    for _ in 0..100 {
        if tcp_listening(port) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tcp_listening(port), "SIPp listens on TCP {port}");

    let uri = format!("sip:911@127.0.0.1:{port};transport=tcp");
    let srv = start_server(bridge_911_to(&uri)).await;
    let mut ua = caller_pressing(srv.sip_addr, "19").await;
    let audits = settled_audits(&srv).await;
    assert!(
        audits[0].outcome.starts_with("connected via bridge"),
        "{}",
        audits[0].outcome
    );
    assert_eq!(ua.bye().await.code, 200);
    let out = psap.await.unwrap();
    assert!(out.status.success(), "SIPp as the PSAP: {}", report(&out));
    srv.shutdown().await;
}

/// A registration-based trunk played by SIPp: its own digest code checks our MD5 answer (no
/// qop), it grants less than we asked, and it sees the binding removed when we drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_trunk_registrar_checks_our_digest_and_sees_the_binding_removed() {
    let port = free_udp_port();
    let dir = std::env::temp_dir().join(format!("ivr311-sipp-reg-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("registrar.log");
    let args: Vec<String> = vec![
        "-sf".into(),
        repo()
            .join("tests/sipp/uas_registrar.xml")
            .display()
            .to_string(),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-m".into(),
        "1".into(),
        "-nostdin".into(),
        "-timeout".into(),
        "30".into(),
        "-timeout_error".into(),
        "-trace_logs".into(),
        "-log_file".into(),
        log.display().to_string(),
    ];
    let registrar = tokio::task::spawn_blocking(move || sipp(&args));
    until("SIPp binds its port", Duration::from_secs(10), async || {
        udp_bound(port).then_some(())
    })
    .await;

    let mut file = FileConfig::default();
    file.trunks.register = Some(ivr311::sip::trunk::RegisterConfig {
        registrar: format!("sip:127.0.0.1:{port}"),
        user: "city311".into(),
        domain: Some("carrier.example.net".into()),
        expires: 600,
    });
    file.trunks.auth = ivr311::sip::registrar::Credentials {
        username: "city311".into(),
        password: "s3cret".into(),
        realm: Some("carrier.example.net".into()),
    }
    .into();
    let srv = start_server(file).await;
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = health(srv.http_addr).await["trunk_registration"].clone();
        if status["state"] == "registered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["state"], "registered", "{status}");
    assert_eq!(status["aor"], "sip:city311@carrier.example.net");
    // SIPp granted 120 s of the 600 asked: that is what we keep (and refresh at 60 s).
    let left = status["expires_in"].as_u64().unwrap();
    assert!((110..=120).contains(&left), "{status}");

    srv.shutdown().await;
    let out = registrar.await.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "SIPp as the trunk's registrar failed (wrong digest, or no removal on drain):\n{}\n{logged}",
        report(&out)
    );
    assert!(logged.contains("digest verified for city311"), "{logged}");
    let _ = std::fs::remove_dir_all(&dir);
}
