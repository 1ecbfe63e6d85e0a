//! Real peer: SIPp (the `sip-tester` package) calls the real server over loopback, plays
//! `g711a.pcap`, presses RFC 4733 digits from SIPp's own DTMF pcaps, and hangs up.
//! `.ci/run` installs SIPp; without it these tests fail and say so.

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
        .expect("sipp is installed (apt-get install sip-tester; .ci/run does this)");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_caller_with_pcap_audio_and_dtmf() {
    let srv = start_server(FileConfig::default()).await;
    let scenario = repo().join("tests/sipp/uac_dtmf.xml");
    let args: Vec<String> = vec![
        srv.sip_addr.to_string(),
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
        "30".into(),
        "-timeout_error".into(),
    ];
    let out = tokio::task::spawn_blocking(move || sipp(&args))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "sipp failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = health(srv.http_addr).await;
    assert_eq!(h["live_calls"], 0, "call ended: {h}");
    assert_eq!(h["calls_completed"], 1, "{h}");
    // Three key presses (1, 2, and 1 again from the identical pcap), each heard once.
    assert_eq!(h["digits_received"], 3, "{h}");
    // The caller's pcap audio arrived and the server streamed back to SIPp's media port.
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 50, "{h}");
    assert!(h["rtp_packets_sent"].as_u64().unwrap() > 150, "{h}");
    srv.shutdown().await;
}
