//! Media abuse from outside, over real SIP and RTP: a caller's port cannot be hijacked by a
//! third party (ports are drawn at random, and only the caller's own addresses are heard),
//! and an INVITE nobody confirms cannot turn the server into an RTP reflector. Legitimate
//! callers keep working: behind NAT, through a carrier whose media gateway is not its
//! signalling address, with a delayed offer, and with an ACK that never arrives but media
//! that does.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::dtmf::{digit_to_event, TelephoneEvent};
use ivr311::media::g711::Codec;
use ivr311::media::rtp::RtpStream;
use ivr311::media::sdp;
use ivr311::sip::message::{Message, Response};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// An offer whose `c=` and `m=` name `media` (which need not be the caller's RTP socket).
fn offer_at(media: SocketAddr) -> String {
    format!(
        "v=0\r\no=test 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n",
        ip = media.ip(),
        port = media.port()
    )
}

/// Send an INVITE offering `media`, and wait for the 200; the caller's view of the call is set
/// up (To tag, the server's RTP address) but no ACK is sent.
async fn invite_without_ack(ua: &mut TestUa, media: SocketAddr) -> Response {
    let inv = ua.invite_bytes(&offer_at(media));
    ua.send_raw(&inv).await;
    loop {
        match ua.recv(Duration::from_secs(5)).await {
            Some(Message::Response(r)) if r.cseq_method.as_str() == "INVITE" && r.code >= 200 => {
                assert_eq!(r.code, 200);
                ua.to_tag = r.to.tag().map(str::to_owned);
                ua.remote_rtp = Some(sdp::parse(&r.body).expect("answer SDP").addr);
                ua.codec = Codec::Pcmu;
                return r;
            }
            Some(_) => continue,
            None => panic!("no answer to the INVITE"),
        }
    }
}

/// How many datagrams reach `sock` within `dur`.
async fn packets_within(sock: &UdpSocket, dur: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + dur;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
        n += 1;
    }
    n
}

/// One RFC 4733 key press, as a phone sends it, from `sock` to `to`.
async fn press_from(sock: &UdpSocket, stream: &mut RtpStream, to: SocketAddr, digit: char) {
    let event = digit_to_event(digit).unwrap();
    let ts = stream.timestamp();
    let mut buf = [0u8; 64];
    for i in 0..4u16 {
        let ev = TelephoneEvent {
            event,
            end: false,
            volume: 10,
            duration: (i + 1) * 160,
        };
        let n = stream.write_at(101, ts, i == 0, &ev.write(), &mut buf);
        sock.send_to(&buf[..n], to).await.unwrap();
        // Paced as a phone sends, one packet each 20 ms: not a wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let ev = TelephoneEvent {
            event,
            end: true,
            volume: 10,
            duration: 800,
        };
        let n = stream.write_at(101, ts, false, &ev.write(), &mut buf);
        sock.send_to(&buf[..n], to).await.unwrap();
    }
    stream.skip(960);
    // The pause between two presses, as a person makes: not a wait.
    tokio::time::sleep(Duration::from_millis(150)).await;
}

fn ear() -> PromptEar {
    PromptEar::new(
        "en",
        &["language_menu", "screening", "main_menu", "connecting_911"],
        Codec::Pcmu,
    )
}

/// One INVITE, never acknowledged, whose SDP names a third party (with a forged source it
/// would be someone else's address entirely): the third party gets no RTP at all, where the
/// server used to stream it the greeting (8 kB/s) for as long as it waited for the ACK. A
/// caller who does acknowledge hears the greeting at once.
#[tokio::test]
async fn an_unacknowledged_invite_does_not_make_the_server_stream_to_its_sdp_address() {
    let srv = start_server(FileConfig::default()).await;
    let victim = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let mut attacker = TestUa::udp(srv.sip_addr).await;
    invite_without_ack(&mut attacker, victim.local_addr().unwrap()).await;
    // Meanwhile a real caller is answered and greeted.
    let mut caller = TestUa::udp(srv.sip_addr).await;
    assert_eq!(caller.call("0 101").await.code, 200);
    let heard = caller.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["language_menu"]);
    let reflected = packets_within(&victim, Duration::from_millis(1500)).await;
    assert_eq!(reflected, 0, "RTP sent to an address nobody confirmed");
    caller.bye().await;
    srv.shutdown().await;
}

/// A caller whose ACK is lost (every retransmission of it) but whose media arrives is there:
/// its first RTP packet starts the greeting, and its keys work.
#[tokio::test]
async fn a_caller_whose_ack_is_lost_but_whose_media_arrives_is_greeted_and_heard() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let media = ua.rtp.local_addr().unwrap();
    invite_without_ack(&mut ua, media).await;
    // Before it sends anything it hears nothing.
    assert_eq!(packets_within(&ua.rtp, Duration::from_millis(600)).await, 0);
    // `listen` streams silence to the server, as a phone does once it answers.
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["language_menu"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["screening"]);
    srv.shutdown().await;
}

/// A delayed offer (no SDP in the INVITE: our offer goes in the 200, the ACK answers) is
/// confirmed by that ACK: greeted at once, keys heard.
#[tokio::test]
async fn a_delayed_offer_call_is_greeted_once_its_ack_answers() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call_delayed_offer(Some("0 101")).await.code, 200);
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["language_menu"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["screening"]);
    ua.bye().await;
    srv.shutdown().await;
}

/// A third party that learns a call's port and sends to it before the caller does (RTP,
/// then the keys 1 and 9, which would send the call to 911) is not heard at all: it gets none
/// of the caller's prompts, its keys move nothing, and no 911 redirect is made. The caller,
/// whose media comes once the call is up, hears the greeting and its own keys work.
#[tokio::test]
async fn a_third_party_sending_first_to_a_callers_port_neither_hears_it_nor_presses_its_keys() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let media = ua.rtp.local_addr().unwrap();
    invite_without_ack(&mut ua, media).await;
    let port = ua.remote_rtp.unwrap();
    let third = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let mut stream = RtpStream::new();
    let mut buf = [0u8; 200];
    for _ in 0..10 {
        let n = stream.write(0, &[0xff; 160], 160, &mut buf);
        third.send_to(&buf[..n], port).await.unwrap();
        // Paced as a phone sends: not a wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    press_from(&third, &mut stream, port, '1').await;
    press_from(&third, &mut stream, port, '9').await;
    assert_eq!(
        packets_within(&third, Duration::from_millis(500)).await,
        0,
        "the third party got the caller's audio"
    );
    // The caller confirms and is greeted from the start: the stranger's keys did nothing.
    ua.ack().await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["language_menu"]);
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["screening"]);
    assert!(srv.tickets.emergency_audits(10).await.unwrap().is_empty());
    assert_eq!(packets_within(&third, Duration::from_millis(300)).await, 0);
    // The 200 was sent again while the ACK was held back: those copies go unread.
    while ua.recv(Duration::from_millis(50)).await.is_some() {}
    ua.bye().await;
    srv.shutdown().await;
}

/// The NAT cases the latch keeps working: a phone whose SDP names a private address it cannot
/// be reached at, whose media comes from the public address its SIP came from (here: the
/// same loopback address, another port); and a carrier whose signalling comes from its proxy
/// (a source in `trunks.allow`) while its SDP names a media gateway at another address, from
/// which the media comes.
#[tokio::test]
async fn a_phone_behind_nat_and_a_carrier_with_a_separate_media_gateway_are_heard() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    invite_without_ack(&mut ua, "10.99.0.7:4000".parse().unwrap()).await;
    ua.ack().await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["language_menu"], "NAT: heard");
    ua.press('1').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["screening"], "NAT: keys");
    ua.bye().await;
    srv.shutdown().await;

    let mut file = FileConfig::default();
    file.trunks.allow = vec!["127.0.0.1".parse().unwrap()];
    let srv = start_server(file).await;
    let mut trunk = TestUa::udp(srv.sip_addr).await;
    // The gateway's RTP socket, at another address than the proxy's signalling.
    trunk.rtp = UdpSocket::bind("127.0.0.5:0").await.unwrap();
    let gateway = trunk.rtp.local_addr().unwrap();
    invite_without_ack(&mut trunk, gateway).await;
    trunk.ack().await;
    let heard = trunk.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["language_menu"], "carrier: heard");
    trunk.press('1').await;
    let heard = trunk.listen(Duration::from_millis(1500)).await;
    assert_eq!(ear().playbacks(&heard), ["screening"], "carrier: keys");
    trunk.bye().await;
    srv.shutdown().await;
}

/// Calls one after another do not get their ports in order: knowing one call's port says
/// nothing about where the next caller's media will be.
#[tokio::test]
async fn the_next_calls_port_cannot_be_told_from_the_last() {
    let srv = start_server(FileConfig::default()).await;
    let mut ports = Vec::new();
    for _ in 0..8 {
        let mut ua = TestUa::udp(srv.sip_addr).await;
        assert_eq!(ua.call("0 101").await.code, 200);
        ports.push(ua.remote_rtp.unwrap().port());
        ua.bye().await;
    }
    let next_in_line = ports.windows(2).filter(|w| w[1] == w[0] + 2).count();
    assert!(
        next_in_line <= 3,
        "{next_in_line} of 7 calls got the port after the last: {ports:?}"
    );
    srv.shutdown().await;
}
