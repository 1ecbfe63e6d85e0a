//! Integration: outbound calls (UAC) from the UA core, over real UDP on loopback.
//!
//! The UA core runs on its own (transport + `UaCore::run`, wired as the server wires it), and
//! the far end (a 911 centre, an operator's phone) is played by a plain UDP socket that parses
//! what it receives and answers with `ResponseBuilder`. What the far end sees on the wire is
//! asserted, as is what the owner of the leg hears as `LegEvent`s.
//!
//! Timer B (no answer at all) takes 32 s of real time, so it is covered by the unit tests in
//! `src/sip/ua.rs`, which drive the UA core's clock by hand.

use bytes::Bytes;
use ivr311::sip::message::{
    parse_datagram, Message, Method, Request, RequestBuilder, Response, ResponseBuilder,
};
use ivr311::sip::transport::{self, TransportLimits};
use ivr311::sip::ua::{AppEvent, DialogEvent, LegEvent, OutboundCall, OutboundHandle, UaCore};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const OFFER: &[u8] = b"v=0\r\no=ivr311 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
const ANSWER: &[u8] = b"v=0\r\no=psap 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 42000 RTP/AVP 0\r\n";

/// The UA core under test, wired like `server::start` does.
struct Ua {
    out: OutboundHandle,
    local: SocketAddr,
    cancel: CancellationToken,
    _app: mpsc::Receiver<AppEvent>,
}

impl Drop for Ua {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start_ua() -> Ua {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (in_tx, in_rx) = mpsc::channel(1024);
    let t = transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        TransportLimits::default(),
        in_tx,
        &tracker,
        cancel.clone(),
    )
    .await
    .expect("SIP transport binds");
    let local = t.local_addr();
    let (app_tx, app_rx) = mpsc::channel(16);
    let ua = UaCore::new(t, local, "ivr311-test".into(), app_tx);
    let out = ua.outbound();
    tracker.spawn(ua.run(in_rx, cancel.clone()));
    Ua {
        out,
        local,
        cancel,
        _app: app_rx,
    }
}

/// The far end: a bare UDP socket speaking just enough SIP.
struct Far {
    sock: UdpSocket,
    addr: SocketAddr,
}

impl Far {
    async fn new() -> Far {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        Far { sock, addr }
    }

    fn target(&self) -> String {
        format!("sip:911@{}", self.addr)
    }

    async fn recv_msg(&self, within: Duration) -> Option<(Message, SocketAddr)> {
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (n, from) = timeout(
                deadline.saturating_duration_since(tokio::time::Instant::now()),
                self.sock.recv_from(&mut buf),
            )
            .await
            .ok()?
            .ok()?;
            if let Ok(m) = parse_datagram(&buf[..n], 65535) {
                return Some((m, from));
            }
        }
    }

    /// The next request with this method, skipping anything else (INVITE retransmissions...).
    async fn expect(&self, method: Method) -> (Request, SocketAddr) {
        self.next(method.clone(), Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("far end expected a {method}"))
    }

    async fn next(&self, method: Method, within: Duration) -> Option<(Request, SocketAddr)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_msg(left).await? {
                (Message::Request(r), from) if r.method == method => return Some((r, from)),
                _ => continue,
            }
        }
    }

    /// The next response (to a request the far end sent).
    async fn expect_response(&self) -> Response {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_msg(left).await {
                Some((Message::Response(r), _)) => return r,
                Some(_) => continue,
                None => panic!("far end expected a response"),
            }
        }
    }

    async fn send(&self, bytes: Bytes, to: SocketAddr) {
        self.sock.send_to(&bytes, to).await.unwrap();
    }

    async fn respond(&self, req: &Request, to: SocketAddr, code: u16, reason: &str) {
        let b = ResponseBuilder::new(req, code, reason, Some("far"));
        self.send(b.build(), to).await;
    }

    /// The 200 that answers `invite`: SDP, a Contact, and two Record-Routes.
    fn ok_2xx(&self, invite: &Request) -> Bytes {
        ResponseBuilder::new(invite, 200, "OK", Some("far"))
            .header("Record-Route", "<sip:p1.example;lr>, <sip:p2.example;lr>")
            .header("Contact", format_args!("<sip:psap@{}>", self.addr))
            .body("application/sdp", Bytes::from_static(ANSWER))
            .build()
    }

    /// A request from the far end inside the dialog `invite` created.
    fn in_dialog(&self, invite: &Request, method: Method, cseq: u32) -> RequestBuilder {
        let branch = ivr311::sip::message::new_branch();
        RequestBuilder::new(
            &method,
            &format!("sip:ivr311@{}", invite.top_via().sent_by()),
            "UDP",
            self.addr,
            &branch,
        )
        .header("From", format_args!("{};tag=far", invite.to.raw))
        .header("To", &invite.from.raw)
        .header("Call-ID", &invite.call_id)
        .header("CSeq", format_args!("{cseq} {method}"))
        .header("Contact", format_args!("<sip:psap@{}>", self.addr))
    }
}

async fn event(call: &mut OutboundCall) -> LegEvent {
    timeout(Duration::from_secs(5), call.events.recv())
        .await
        .expect("a leg event in time")
        .expect("the leg's events are open")
}

async fn no_event(call: &mut OutboundCall, within: Duration) {
    if let Ok(Some(ev)) = timeout(within, call.events.recv()).await {
        panic!("unexpected leg event {ev:?}");
    }
}

async fn call(ua: &Ua, far: &Far) -> OutboundCall {
    ua.out
        .invite(
            &far.target(),
            "+15551234567",
            Some("Jane \"JD\" Doe"),
            vec![
                (
                    "P-Asserted-Identity".into(),
                    "<sip:+15551234567@city>".into(),
                ),
                ("X-311-Case-Id".into(), "311-2024-0042".into()),
                ("X-311-Reason".into(), "emergency\r\nVia: injected".into()),
            ],
            Bytes::from_static(OFFER),
        )
        .await
}

/// Call, ring, answer; returns the leg, the INVITE as the far end saw it, the first ACK, and
/// where the UA sends from.
async fn answered(ua: &Ua, far: &Far) -> (OutboundCall, Request, Request, SocketAddr) {
    let mut leg = call(ua, far).await;
    let (invite, src) = far.expect(Method::Invite).await;
    far.respond(&invite, src, 100, "Trying").await;
    far.respond(&invite, src, 180, "Ringing").await;
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Provisional {
            code: 180,
            sdp: None
        }
    ));
    far.send(far.ok_2xx(&invite), src).await;
    match event(&mut leg).await {
        LegEvent::Answered { sdp } => assert_eq!(&sdp[..], ANSWER),
        other => panic!("expected Answered, got {other:?}"),
    }
    let (ack, _) = far.expect(Method::Ack).await;
    (leg, invite, ack, src)
}

#[tokio::test]
async fn invite_carries_the_callers_identity_and_context_headers() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let _leg = call(&ua, &far).await;
    let (inv, src) = far.expect(Method::Invite).await;
    assert_eq!(src, ua.local, "sent from the SIP socket");
    assert_eq!(inv.uri, far.target());
    assert_eq!(
        inv.from.user(),
        Some("+15551234567"),
        "caller's number in From"
    );
    assert_eq!(inv.from.uri, format!("sip:+15551234567@{}", ua.local));
    assert_eq!(inv.from.display.as_deref(), Some("Jane 'JD' Doe"));
    assert!(inv.from.tag().is_some_and(|t| !t.is_empty()));
    assert_eq!(inv.to.uri, far.target());
    assert_eq!(inv.to.tag(), None);
    assert_eq!(inv.cseq_method, Method::Invite);
    assert_eq!(inv.max_forwards, Some(70));
    assert!(inv.top_via().has_rfc3261_branch());
    assert_eq!(
        inv.header("P-Asserted-Identity"),
        Some("<sip:+15551234567@city>")
    );
    assert_eq!(inv.header("X-311-Case-Id"), Some("311-2024-0042"));
    // CR/LF cannot smuggle a header in.
    assert_eq!(inv.header("X-311-Reason"), Some("emergencyVia: injected"));
    assert_eq!(inv.vias.len(), 1);
    assert_eq!(
        inv.contacts().first().map(|c| c.uri.clone()),
        Some(format!("sip:ivr311@{}", ua.local))
    );
    assert_eq!(inv.header("User-Agent"), Some("ivr311-test"));
    assert_eq!(inv.content_type(), Some("application/sdp"));
    assert_eq!(&inv.body[..], OFFER);
}

#[tokio::test]
async fn answer_is_acked_and_reacked_and_far_end_bye_ends_the_leg() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let (mut leg, invite, ack, src) = answered(&ua, &far).await;

    // The ACK for a 2xx: a new transaction to the remote target, along the reversed route set.
    assert_eq!(ack.uri, format!("sip:psap@{}", far.addr));
    assert_eq!(ack.cseq, invite.cseq);
    assert_eq!(ack.cseq_method, Method::Ack);
    assert_ne!(ack.top_via().branch, invite.top_via().branch);
    assert_eq!(ack.call_id, invite.call_id);
    assert_eq!(ack.from.tag(), invite.from.tag());
    assert_eq!(ack.to.tag(), Some("far"));
    let routes: Vec<&str> = ack.headers_named("Route").collect();
    assert_eq!(routes, vec!["<sip:p2.example;lr>", "<sip:p1.example;lr>"]);

    // The 200 again (our ACK was "lost"): the same ACK again, and no second Answered.
    far.send(far.ok_2xx(&invite), src).await;
    let (again, _) = far.expect(Method::Ack).await;
    assert_eq!(again.top_via().branch, ack.top_via().branch);
    assert_eq!(again.cseq, ack.cseq);

    // The far end hangs up.
    let bye = far.in_dialog(&invite, Method::Bye, 1).build();
    far.send(bye, src).await;
    let ok = far.expect_response().await;
    assert_eq!(ok.code, 200);
    assert_eq!(ok.cseq_method, Method::Bye);
    assert_eq!(ok.to.tag(), invite.from.tag());
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Dialog(DialogEvent::Bye)
    ));
    // The dialog is gone: a second BYE gets 481.
    let bye = far.in_dialog(&invite, Method::Bye, 2).build();
    far.send(bye, src).await;
    assert_eq!(far.expect_response().await.code, 481);
    leg.handle.release();
}

#[tokio::test]
async fn in_dialog_requests_both_ways_then_our_hangup_sends_bye() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let (mut leg, invite, _ack, src) = answered(&ua, &far).await;

    // INFO from the far end reaches the leg.
    let info = far
        .in_dialog(&invite, Method::Info, 1)
        .body("application/dtmf-relay", "Signal=5\r\nDuration=160\r\n")
        .build();
    far.send(info, src).await;
    assert_eq!(far.expect_response().await.code, 200);
    match event(&mut leg).await {
        LegEvent::Dialog(DialogEvent::Info { content_type, .. }) => {
            assert_eq!(content_type, "application/dtmf-relay")
        }
        other => panic!("expected Info, got {other:?}"),
    }

    // A re-INVITE from the far end is a reoffer the leg answers.
    let reinvite = far
        .in_dialog(&invite, Method::Invite, 2)
        .body("application/sdp", Bytes::from_static(ANSWER))
        .build();
    far.send(reinvite, src).await;
    let txn = match event(&mut leg).await {
        LegEvent::Dialog(DialogEvent::Reoffer { txn, method, .. }) => {
            assert_eq!(method, Method::Invite);
            txn
        }
        other => panic!("expected Reoffer, got {other:?}"),
    };
    leg.handle
        .answer_reoffer(
            txn,
            200,
            Some(("application/sdp".into(), Bytes::from_static(OFFER))),
        )
        .await;
    let ok = far.expect_response().await;
    assert_eq!((ok.code, ok.cseq_method.clone()), (200, Method::Invite));
    assert_eq!(&ok.body[..], OFFER);
    far.send(far.in_dialog(&invite, Method::Ack, 2).build(), src)
        .await;
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Dialog(DialogEvent::Confirmed { .. })
    ));

    // A request we send inside the dialog, and its outcome.
    leg.handle
        .request(
            7,
            Method::Info,
            vec![],
            Some((
                "application/dtmf-relay".into(),
                Bytes::from_static(b"Signal=1\r\n"),
            )),
        )
        .await;
    let (info, from) = far.expect(Method::Info).await;
    assert_eq!(info.uri, format!("sip:psap@{}", far.addr));
    assert_eq!(info.cseq, invite.cseq + 1);
    far.respond(&info, from, 200, "OK").await;
    match event(&mut leg).await {
        LegEvent::Dialog(DialogEvent::RequestOutcome {
            req: 7,
            code: 200,
            method,
        }) => {
            assert_eq!(method, Method::Info)
        }
        other => panic!("expected RequestOutcome, got {other:?}"),
    }

    // Our hang-up: BYE with our tag in From, theirs in To, along the reversed route set.
    leg.handle.hangup().await;
    let (bye, from) = far.expect(Method::Bye).await;
    assert_eq!(bye.uri, format!("sip:psap@{}", far.addr));
    assert_eq!(bye.call_id, invite.call_id);
    assert_eq!(bye.from.tag(), invite.from.tag());
    assert_eq!(bye.to.tag(), Some("far"));
    assert_eq!(bye.cseq, invite.cseq + 2);
    let routes: Vec<&str> = bye.headers_named("Route").collect();
    assert_eq!(routes, vec!["<sip:p2.example;lr>", "<sip:p1.example;lr>"]);
    far.respond(&bye, from, 200, "OK").await;
    // A hang-up again (or a release) sends nothing more.
    leg.handle.hangup().await;
    leg.handle.release();
    assert!(far
        .next(Method::Bye, Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test]
async fn busy_is_reported_and_acked_on_the_invite_branch() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let mut leg = call(&ua, &far).await;
    let (invite, src) = far.expect(Method::Invite).await;
    far.respond(&invite, src, 486, "Busy Here").await;
    match event(&mut leg).await {
        LegEvent::Failed { code, reason } => {
            assert_eq!(code, 486);
            assert_eq!(reason, "Busy Here");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let (ack, _) = far.expect(Method::Ack).await;
    assert_eq!(ack.top_via().branch, invite.top_via().branch);
    assert_eq!(ack.uri, invite.uri);
    assert_eq!(ack.cseq, invite.cseq);
    assert_eq!(ack.cseq_method, Method::Ack);
    assert_eq!(ack.call_id, invite.call_id);
    assert_eq!(ack.from.raw, invite.from.raw);
    assert_eq!(ack.to.tag(), Some("far"));
    // The 486 again: ACKed again by the transaction, not reported again.
    far.respond(&invite, src, 486, "Busy Here").await;
    let (again, _) = far.expect(Method::Ack).await;
    assert_eq!(again.top_via().branch, invite.top_via().branch);
    no_event(&mut leg, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn cancel_while_ringing_ends_with_487() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let mut leg = call(&ua, &far).await;
    let (invite, src) = far.expect(Method::Invite).await;
    far.respond(&invite, src, 180, "Ringing").await;
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Provisional {
            code: 180,
            sdp: None
        }
    ));
    ua.out.cancel(leg.handle.id).await;
    let (cancel, from) = far.expect(Method::Cancel).await;
    assert_eq!(cancel.top_via().branch, invite.top_via().branch);
    assert_eq!(cancel.uri, invite.uri);
    assert_eq!(cancel.cseq, invite.cseq);
    assert_eq!(cancel.cseq_method, Method::Cancel);
    assert_eq!(cancel.call_id, invite.call_id);
    assert_eq!(cancel.from.raw, invite.from.raw);
    assert_eq!(cancel.to.raw, invite.to.raw);
    far.respond(&cancel, from, 200, "OK").await;
    far.respond(&invite, src, 487, "Request Terminated").await;
    let (ack, _) = far.expect(Method::Ack).await;
    assert_eq!(ack.top_via().branch, invite.top_via().branch);
    assert_eq!(ack.cseq, invite.cseq);
    match event(&mut leg).await {
        LegEvent::Failed { code, .. } => assert_eq!(code, 487),
        other => panic!("expected Failed 487, got {other:?}"),
    }
}

#[tokio::test]
async fn answer_crossing_the_cancel_is_acked_then_byed() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let mut leg = call(&ua, &far).await;
    let (invite, src) = far.expect(Method::Invite).await;
    far.respond(&invite, src, 180, "Ringing").await;
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Provisional {
            code: 180,
            sdp: None
        }
    ));
    leg.handle.hangup().await;
    let (cancel, from) = far.expect(Method::Cancel).await;
    // The far end had already answered: 200 to the INVITE, then 481 to the CANCEL.
    far.send(far.ok_2xx(&invite), src).await;
    far.respond(&cancel, from, 481, "Call/Transaction Does Not Exist")
        .await;
    let (ack, _) = far.expect(Method::Ack).await;
    assert_eq!(ack.cseq, invite.cseq);
    assert_ne!(ack.top_via().branch, invite.top_via().branch);
    assert_eq!(ack.to.tag(), Some("far"));
    let (bye, from) = far.expect(Method::Bye).await;
    assert_eq!(bye.call_id, invite.call_id);
    assert_eq!(bye.to.tag(), Some("far"));
    assert_eq!(bye.from.tag(), invite.from.tag());
    assert_eq!(bye.cseq, invite.cseq + 1);
    far.respond(&bye, from, 200, "OK").await;
    match event(&mut leg).await {
        LegEvent::Failed { code, .. } => assert_eq!(code, 487),
        other => panic!("expected Failed 487, got {other:?}"),
    }
    no_event(&mut leg, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn releasing_a_ringing_leg_cancels_it() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let mut leg = call(&ua, &far).await;
    let (invite, src) = far.expect(Method::Invite).await;
    // Session Progress with early media: its SDP reaches the leg's owner.
    let progress = ResponseBuilder::new(&invite, 183, "Session Progress", Some("far"))
        .body("application/sdp", Bytes::from_static(ANSWER))
        .build();
    far.send(progress, src).await;
    match event(&mut leg).await {
        LegEvent::Provisional {
            code: 183,
            sdp: Some(sdp),
        } => assert_eq!(&sdp[..], ANSWER),
        other => panic!("expected 183 with SDP, got {other:?}"),
    }
    leg.handle.release();
    let (cancel, _) = far.expect(Method::Cancel).await;
    assert_eq!(cancel.top_via().branch, invite.top_via().branch);
}

#[tokio::test]
async fn cancel_before_ringing_waits_for_the_first_provisional() {
    let ua = start_ua().await;
    let far = Far::new().await;
    let mut leg = call(&ua, &far).await;
    let (invite, src) = far.expect(Method::Invite).await;
    leg.handle.hangup().await;
    assert!(
        far.next(Method::Cancel, Duration::from_millis(300))
            .await
            .is_none(),
        "no CANCEL before a provisional response (RFC 3261 §9.1)"
    );
    far.respond(&invite, src, 100, "Trying").await;
    let (cancel, from) = far.expect(Method::Cancel).await;
    far.respond(&cancel, from, 200, "OK").await;
    far.respond(&invite, src, 487, "Request Terminated").await;
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Failed { code: 487, .. }
    ));
}

#[tokio::test]
async fn a_target_without_an_ip_host_fails_with_503() {
    let ua = start_ua().await;
    let mut leg = ua
        .out
        .invite(
            "sip:911@psap.example.org",
            "+15551234567",
            None,
            vec![],
            Bytes::from_static(OFFER),
        )
        .await;
    assert!(matches!(
        event(&mut leg).await,
        LegEvent::Failed { code: 503, .. }
    ));
}
