//! Integration: a flood of malformed requests from one source is not answered in full (the
//! transport's stateless 400s are rate-limited per source, see `src/sip/transport.rs`), is
//! still counted, and does not stop the server serving others.
//!
//! 127.0.0.2 is a second source: on Linux all of 127.0.0.0/8 is loopback.
mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::sip::transport::TransportLimits;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// An INVITE whose CSeq names another method: it fails to parse, but Via, From, To, Call-ID
/// and CSeq survive, so the server can answer it with a 400 whose `Warning` names the CSeq.
fn bad_invite(server: SocketAddr, me: SocketAddr, n: usize) -> Vec<u8> {
    format!(
        "INVITE sip:311@{server} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bKbad{n}\r\n\
Max-Forwards: 70\r\n\
From: <sip:x@{me}>;tag=b{n}\r\n\
To: <sip:311@{server}>\r\n\
Call-ID: bad-{n}@flood\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn options(server: SocketAddr, me: SocketAddr) -> Vec<u8> {
    format!(
        "OPTIONS sip:311@{server} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bKalive{r}\r\n\
Max-Forwards: 70\r\n\
From: <sip:mon@{me}>;tag=m\r\n\
To: <sip:311@{server}>\r\n\
Call-ID: alive-{r}@test\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n",
        r = rand::random::<u32>()
    )
    .into_bytes()
}

#[tokio::test]
async fn a_malformed_flood_is_answered_only_up_to_its_limit_and_all_counted() {
    let limits = TransportLimits::default();
    let (rate, burst) = (
        f64::from(limits.malformed_answers_per_second),
        f64::from(limits.malformed_answers_burst),
    );
    let srv = start_server(FileConfig::default()).await;
    let sip = srv.sip_addr;

    let flooder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = flooder.local_addr().unwrap();
    let sent = 1000;
    let started = Instant::now();
    for n in 0..sent {
        flooder.send_to(&bad_invite(sip, me, n), sip).await.unwrap();
        if n % 20 == 19 {
            // Stay under the socket buffers: the limiter is what is tested, not the kernel.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The limiter's clock runs until the server has read the last one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut malformed = 0.0;
    while Instant::now() < deadline {
        malformed = metric(srv.http_addr, "ivr311_sip_messages_malformed").await;
        if malformed >= sent as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // (c) every one is counted as malformed.
    assert_eq!(malformed, sent as f64, "malformed messages counted");

    // (a) far fewer than all are answered, the burst is, and each answer says why.
    let answers = responses(&flooder, Duration::from_millis(500)).await;
    let ceiling = (burst + rate * elapsed).ceil() as usize + 5;
    eprintln!(
        "malformed flood: {sent} sent in {elapsed:.3} s, {} answered (at most {ceiling})",
        answers.len()
    );
    assert!(!answers.is_empty(), "no 400 at all");
    assert!(
        answers.len() <= ceiling,
        "{} answers > {ceiling}",
        answers.len()
    );
    assert!(answers.len() < sent / 2, "{} answers", answers.len());
    for r in &answers {
        assert_eq!(r.code, 400, "{r:?}");
        let warning = r.header("Warning").unwrap_or("");
        assert!(warning.contains("CSeq"), "the 400 says why: {warning:?}");
    }
    for n in 0..burst as usize {
        let call_id = format!("bad-{n}@flood");
        assert!(
            answers.iter().any(|r| r.call_id == call_id),
            "request {n} of the burst unanswered"
        );
    }

    // (b) the server still serves: a valid OPTIONS from another socket gets its 200...
    let mon = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mon_addr = mon.local_addr().unwrap();
    mon.send_to(&options(sip, mon_addr), sip).await.unwrap();
    let codes: Vec<u16> = responses(&mon, Duration::from_secs(2))
        .await
        .iter()
        .map(|r| r.code)
        .collect();
    assert_eq!(codes, [200], "OPTIONS after the flood");
    // ...and another source's malformed request still gets its own 400.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();
    other
        .send_to(&bad_invite(sip, other_addr, 5000), sip)
        .await
        .unwrap();
    let codes: Vec<u16> = responses(&other, Duration::from_secs(2))
        .await
        .iter()
        .map(|r| r.code)
        .collect();
    assert_eq!(codes, [400], "another source's malformed request");

    // (c) the ones not answered are counted, in /metrics and /health alike.
    let unanswered = metric(srv.http_addr, "ivr311_sip_malformed_unanswered").await;
    assert!(unanswered > 0.0, "unanswered counter is {unanswered}");
    assert_eq!(
        unanswered as usize + answers.len(),
        sent,
        "each malformed request answered or counted as unanswered"
    );
    assert_eq!(
        metric(srv.http_addr, "ivr311_sip_messages_malformed").await,
        (sent + 1) as f64
    );
    let h = health(srv.http_addr).await;
    assert_eq!(
        h["sip_messages_malformed_unanswered"].as_u64(),
        Some(unanswered as u64)
    );
    srv.shutdown().await;
}
