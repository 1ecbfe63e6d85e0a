//! Integration: SIP over IPv6. The server listens on `[::1]` (and on `[::]`), and a caller on
//! `::1` goes through the shipped menu over UDP and over TCP: it hears the language menu,
//! presses 1, hears the 911 screening, presses 1, hears the main menu, and hangs up. The
//! server's answer must carry `c=IN IP6 ::1` and a bracketed IPv6 Contact, and its RTP must
//! latch to where the caller's RTP really comes from.
//!
//! On a machine with no IPv6 loopback (`::1` cannot be bound) each test says so and passes.
mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use ivr311::server::RunningServer;
use ivr311::sip::message::Response;
use std::net::SocketAddr;
use std::time::Duration;

fn ipv6_loopback() -> bool {
    match std::net::UdpSocket::bind("[::1]:0") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: this machine has no IPv6 loopback ([::1] cannot be bound: {e})");
            false
        }
    }
}

async fn server_on(sip: &str) -> RunningServer {
    let mut args = serve_args();
    args.sip = sip.parse().unwrap();
    start_server_with(args, FileConfig::default()).await
}

fn body(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The answer names `::1` for media and in its Contact, bracketed.
fn assert_ipv6_answer(ok: &Response, sip_port: u16) {
    assert_eq!(ok.code, 200);
    let sdp = body(ok);
    assert!(sdp.contains("c=IN IP6 ::1\r\n"), "{sdp}");
    assert!(sdp.contains(" IN IP6 ::1\r\n"), "o= line: {sdp}");
    let contact = ok.header("Contact").unwrap_or_default();
    assert!(
        contact.contains(&format!("@[::1]:{sip_port}")),
        "Contact {contact}"
    );
}

/// Language menu, 1, screening, 1, main menu, BYE.
async fn walk_the_menu(ua: &mut TestUa) {
    let ear = PromptEar::new(
        "en",
        &["language_menu", "screening", "main_menu"],
        Codec::Pcmu,
    );
    let heard = ua.listen(Duration::from_millis(1200)).await;
    assert_eq!(ear.playbacks(&heard), ["language_menu"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear.playbacks(&heard), ["screening"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1200)).await;
    assert_eq!(ear.playbacks(&heard), ["main_menu"]);
    assert_eq!(ua.bye().await.code, 200);
}

#[tokio::test]
async fn a_call_over_ipv6_udp_walks_the_menu_and_rtp_latches() {
    if !ipv6_loopback() {
        return;
    }
    let srv = server_on("[::1]:0").await;
    assert!(srv.sip_addr.is_ipv6());
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert!(ua.local.is_ipv6() && ua.rtp.local_addr().unwrap().is_ipv6());
    // The offer names a decoy port that never answers: the server must send its audio where
    // our RTP actually comes from (symmetric RTP latching), not where the SDP said.
    let decoy = std::net::UdpSocket::bind("[::1]:0").unwrap();
    let real_port = ua.rtp.local_addr().unwrap().port();
    let decoy_port = decoy.local_addr().unwrap().port();
    let offer = ua.offer("0 101").replace(
        &format!("m=audio {real_port} "),
        &format!("m=audio {decoy_port} "),
    );
    let invite = ua.invite_bytes(&offer);
    ua.send_raw(&invite).await;
    let ok = ua
        .expect_response("INVITE", 200, Duration::from_secs(5))
        .await;
    assert_ipv6_answer(&ok, srv.sip_addr.port());
    ua.to_tag = ok.to.tag().map(str::to_owned);
    let answer = ivr311::media::sdp::parse(&ok.body).expect("answer SDP parses");
    assert!(answer.addr.is_ipv6());
    ua.remote_rtp = Some(answer.addr);
    ua.ack().await;
    walk_the_menu(&mut ua).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_call_over_ipv6_tcp_walks_the_menu() {
    if !ipv6_loopback() {
        return;
    }
    let srv = server_on("[::1]:0").await;
    let mut ua = TestUa::tcp(srv.sip_addr).await;
    assert!(ua.local.is_ipv6());
    let ok = ua.call("0 101").await;
    assert_ipv6_answer(&ok, srv.sip_addr.port());
    assert!(
        ok.header("Contact")
            .unwrap_or_default()
            .contains(";transport=tcp"),
        "{:?}",
        ok.header("Contact")
    );
    walk_the_menu(&mut ua).await;
    srv.shutdown().await;
}

/// Bound to `[::]`: IPv6 callers get IPv6 answers, and (dual-stack, where the system allows
/// it) IPv4 callers still get IPv4 ones on the same port.
#[tokio::test]
async fn a_server_on_the_ipv6_wildcard_answers_each_family_in_its_own() {
    if !ipv6_loopback() {
        return;
    }
    let srv = server_on("[::]:0").await;
    let port = srv.sip_addr.port();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let mut ua = TestUa::udp(v6).await;
    let ok = ua.call("0 101").await;
    assert_ipv6_answer(&ok, port);
    walk_the_menu(&mut ua).await;

    let v6only = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    if v6only {
        eprintln!("IPv4 part skipped: net.ipv6.bindv6only=1, [::] is IPv6 only here");
    } else {
        let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut ua = TestUa::tcp(v4).await;
        let ok = ua.call("0 101").await;
        assert_eq!(ok.code, 200);
        let sdp = body(&ok);
        assert!(sdp.contains("c=IN IP4 127.0.0.1\r\n"), "{sdp}");
        let contact = ok.header("Contact").unwrap_or_default();
        assert!(contact.contains(&format!("@127.0.0.1:{port}")), "{contact}");
        walk_the_menu(&mut ua).await;
        let mut udp = TestUa::udp(v4).await;
        assert_eq!(udp.call("0 101").await.code, 200);
        walk_the_menu(&mut udp).await;
    }
    srv.shutdown().await;
}

/// Bound to `[::]` (dual-stack), an IPv4 caller's RTP arrives from an IPv4-mapped address
/// (`::ffff:127.0.0.1`) while its SDP names `127.0.0.1`. The latch must see them as the same
/// address: RTP from elsewhere that reaches the call's port first (a far end still sending to
/// a port its call gave up) must not keep the caller's audio from them.
#[tokio::test]
async fn on_the_ipv6_wildcard_an_ipv4_callers_rtp_takes_its_port_back_from_a_stray_stream() {
    if !ipv6_loopback() {
        return;
    }
    if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1") {
        eprintln!("skipped: net.ipv6.bindv6only=1, [::] is IPv6 only here");
        return;
    }
    let srv = server_on("[::]:0").await;
    let v4: SocketAddr = format!("127.0.0.1:{}", srv.sip_addr.port())
        .parse()
        .unwrap();
    let mut ua = TestUa::udp(v4).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    let media = ua.remote_rtp.expect("answer names our media port");
    assert!(media.is_ipv4(), "{media}");

    let stray = stray_stream(media).await;

    // The caller sends from the address its SDP names: the menu is theirs from then on.
    let ear = PromptEar::new("en", &["language_menu", "screening"], Codec::Pcmu);
    let heard = ua.listen(Duration::from_millis(1200)).await;
    assert_eq!(ear.playbacks(&heard), ["language_menu"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(
        ear.playbacks(&heard),
        ["screening"],
        "the caller's key is heard"
    );
    assert!(
        gets_nothing_more(&stray).await,
        "audio still goes to the stray source"
    );
    ua.bye().await;
    srv.shutdown().await;
}
