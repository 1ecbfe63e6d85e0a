//! The UA core driven by hand, against a far end on a UDP socket.

use super::*;
use crate::sip::message::parse_datagram;
use crate::sip::transport::{self, TransportLimits};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tokio_util::task::TaskTracker;

/// A UA core driven by hand (no `run`), so that tests choose the time its timers see.
struct Rig {
    ua: UaCore,
    inbound: mpsc::Receiver<Inbound>,
    /// Calls the UA core passes up (inbound INVITEs).
    app: mpsc::Receiver<AppEvent>,
    far: UdpSocket,
    target: String,
    _cancel: CancellationToken,
}

async fn rig() -> Rig {
    rig_with(|ua| ua).await
}

/// A rig whose UA core lets agent 1001 (password "pw") log in.
async fn rig_with_agent() -> Rig {
    rig_with(|ua| ua.with_agents("ivr311", [("1001".to_owned(), "pw".to_owned())], &[])).await
}

async fn rig_with(setup: impl FnOnce(UaCore) -> UaCore) -> Rig {
    let (in_tx, inbound) = mpsc::channel(64);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let t = transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        TransportLimits::default(),
        in_tx,
        &tracker,
        cancel.clone(),
    )
    .await
    .unwrap();
    let (app_tx, app) = mpsc::channel(4);
    let ua = setup(UaCore::new(
        t.clone(),
        t.local_addr(),
        "ivr311-test".into(),
        app_tx,
    ));
    let far = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = format!("sip:911@{}", far.local_addr().unwrap());
    Rig {
        ua,
        inbound,
        app,
        far,
        target,
        _cancel: cancel,
    }
}

impl Rig {
    async fn invite(&mut self) -> (DialogId, mpsc::Receiver<LegEvent>) {
        let (events, rx) = mpsc::channel(64);
        let (reply, reply_rx) = oneshot::channel();
        let target = self.target.clone();
        self.ua
            .on_command(Command::Invite(Box::new(InviteCommand {
                target,
                via: None,
                resolved: None,
                from_user: "+15551234567".into(),
                from_display: Some("Caller".into()),
                headers: vec![],
                sdp: Bytes::from_static(b"v=0\r\n"),
                events,
                reply,
            })))
            .await;
        (reply_rx.await.unwrap(), rx)
    }

    /// The next request the far end receives, with its source.
    async fn far_recv(&self) -> Option<(Request, SocketAddr)> {
        let mut buf = vec![0u8; 65535];
        let (n, from) = timeout(Duration::from_millis(300), self.far.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        match parse_datagram(&buf[..n], 65535) {
            Ok(Message::Request(r)) => Some((r, from)),
            _ => None,
        }
    }

    /// The far end answers `req`; the UA core takes the response in.
    async fn answer(&mut self, req: &Request, to: SocketAddr, code: u16, reason: &str) {
        let bytes = ResponseBuilder::new(req, code, reason, Some("far")).build();
        self.far.send_to(&bytes, to).await.unwrap();
        let m = timeout(Duration::from_secs(2), self.inbound.recv())
            .await
            .unwrap()
            .unwrap();
        self.ua.on_inbound(m).await;
    }
}

impl Rig {
    /// The far end sends `bytes` to the UA core, which takes them in.
    async fn far_send(&mut self, bytes: &[u8]) {
        let to = self.ua.transport.local_addr();
        self.far.send_to(bytes, to).await.unwrap();
        let m = timeout(Duration::from_secs(2), self.inbound.recv())
            .await
            .unwrap()
            .unwrap();
        self.ua.on_inbound(m).await;
    }

    /// The next response the far end receives.
    async fn far_response(&self) -> Option<Response> {
        let mut buf = vec![0u8; 65535];
        let (n, _) = timeout(Duration::from_millis(300), self.far.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        match parse_datagram(&buf[..n], 65535) {
            Ok(Message::Response(r)) => Some(r),
            _ => None,
        }
    }

    /// REGISTER from the far end as agent 1001; `auth` is an Authorization value.
    async fn register(&mut self, cseq: u32, auth: Option<&str>) -> Response {
        let from = self.far.local_addr().unwrap();
        let mut b = RequestBuilder::new(
            &Method::Register,
            "sip:127.0.0.1",
            "UDP",
            from,
            &new_branch(),
        )
        .header("From", "<sip:1001@127.0.0.1>;tag=reg")
        .header("To", "<sip:1001@127.0.0.1>")
        .header("Call-ID", "reg-1001")
        .header("CSeq", format_args!("{cseq} REGISTER"))
        .header("Contact", "<sip:1001@10.255.0.7:5062>");
        if let Some(a) = auth {
            b = b.header("Authorization", a);
        }
        self.far_send(&b.build()).await;
        self.far_response().await.expect("a response to REGISTER")
    }
}

/// The MD5 answer to the challenge in `resp`.
fn md5_authorization(resp: &Response) -> String {
    use md5::{Digest, Md5};
    let h = |s: String| -> String {
        Md5::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let challenge = resp
        .headers_named("WWW-Authenticate")
        .find(|v| v.contains("algorithm=MD5"))
        .expect("MD5 challenge");
    let param = |name: &str| {
        let at = challenge.find(&format!("{name}=\"")).expect("param") + name.len() + 2;
        let len = challenge[at..].find('"').expect("closing quote");
        challenge[at..at + len].to_owned()
    };
    let (nonce, opaque) = (param("nonce"), param("opaque"));
    let ha1 = h("1001:ivr311:pw".to_owned());
    let ha2 = h("REGISTER:sip:127.0.0.1".to_owned());
    let response = h(format!("{ha1}:{nonce}:00000001:abc:auth:{ha2}"));
    format!(
        "Digest username=\"1001\", realm=\"ivr311\", nonce=\"{nonce}\", uri=\"sip:127.0.0.1\", \
         response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"abc\", \
         opaque=\"{opaque}\""
    )
}

#[tokio::test]
async fn register_without_agents_is_forbidden() {
    let mut r = rig().await;
    let resp = r.register(1, None).await;
    assert_eq!(resp.code, 403);
    assert_eq!(r.ua.allow(), ALLOW);
}

#[tokio::test]
async fn agent_logs_in_is_reachable_through_its_flow_and_expires() {
    let mut r = rig_with_agent().await;
    let mut events = r.ua.agent_events();
    let contacts = r.ua.agent_contacts();
    assert_eq!(r.ua.allow(), ALLOW_WITH_REGISTER);
    let challenge = r.register(1, None).await;
    assert_eq!(challenge.code, 401);
    assert_eq!(challenge.headers_named("WWW-Authenticate").count(), 2);
    let ok = r.register(2, Some(&md5_authorization(&challenge))).await;
    assert_eq!(ok.code, 200, "{ok:?}");
    assert_eq!(ok.contacts()[0].uri, "sip:1001@10.255.0.7:5062");
    let far = r.far.local_addr().unwrap();
    let Ok(AgentEvent::LoggedIn {
        agent,
        contact,
        flow,
    }) = events.try_recv()
    else {
        panic!("LoggedIn expected");
    };
    assert_eq!(
        (agent.as_str(), contact.as_str()),
        ("1001", "sip:1001@10.255.0.7:5062")
    );
    assert_eq!(flow.remote, far);
    assert_eq!(
        contacts.get("1001").map(|c| c.value().clone()),
        Some((contact.clone(), flow))
    );

    // An INVITE to the agent goes along the flow, with the registered contact as target.
    let (reply, reply_rx) = oneshot::channel();
    let (ev_tx, _leg) = mpsc::channel(8);
    r.ua.on_command(Command::Invite(Box::new(InviteCommand {
        target: contact.clone(),
        via: Some(flow),
        resolved: None,
        from_user: "+15551234567".into(),
        from_display: None,
        headers: vec![],
        sdp: Bytes::from_static(b"v=0\r\n"),
        events: ev_tx,
        reply,
    })))
    .await;
    assert!(reply_rx.await.is_ok());
    let Some((inv, _)) = r.far_recv().await else {
        panic!("INVITE expected at the registration's address")
    };
    assert_eq!(inv.method, Method::Invite);
    assert_eq!(inv.uri, "sip:1001@10.255.0.7:5062");

    // The binding runs out on the timer heap.
    assert!(r.ua.registrar_timer.is_some());
    r.ua.on_timers(Instant::now() + Duration::from_secs(3601))
        .await;
    assert!(matches!(
        events.try_recv(),
        Ok(AgentEvent::LoggedOut { agent }) if agent == "1001"
    ));
    assert!(contacts.is_empty());
}

#[tokio::test]
async fn invite_via_refuses_unusable_flows() {
    let mut r = rig().await;
    for (target, remote) in [
        ("sip:1001@10.0.0.1", "[::1]:5060"),
        ("sip:1001@10.0.0.1", "127.0.0.1:0"),
        ("tel:1001", "127.0.0.1:5060"),
        ("sip:1001@10.0.0.1>\r\nX: y", "127.0.0.1:5060"),
    ] {
        let (reply, _) = oneshot::channel();
        let (ev_tx, mut events) = mpsc::channel(8);
        r.ua.on_command(Command::Invite(Box::new(InviteCommand {
            target: target.into(),
            via: Some(Flow {
                transport: Transport::Udp,
                remote: remote.parse().unwrap(),
                conn: 0,
            }),
            resolved: None,
            from_user: "x".into(),
            from_display: None,
            headers: vec![],
            sdp: Bytes::new(),
            events: ev_tx,
            reply,
        })))
        .await;
        assert!(
            matches!(events.try_recv(), Ok(LegEvent::Failed { code: 503, .. })),
            "{target} via {remote}"
        );
    }
    assert!(r.ua.client.is_empty());
}

/// The far end answers `req` with `code` and a digest challenge in `header`.
async fn challenge(r: &mut Rig, req: &Request, to: SocketAddr, code: u16, header: &str) {
    let value = "Digest realm=\"trunk\", nonce=\"n1\", qop=\"auth\"";
    challenge_with(r, req, to, code, header, value).await;
}

async fn challenge_with(
    r: &mut Rig,
    req: &Request,
    to: SocketAddr,
    code: u16,
    header: &str,
    value: &str,
) {
    let bytes = ResponseBuilder::new(req, code, "Authentication Required", Some("far"))
        .header(header, value)
        .build();
    r.far.send_to(&bytes, to).await.unwrap();
    let m = timeout(Duration::from_secs(2), r.inbound.recv())
        .await
        .unwrap()
        .unwrap();
    r.ua.on_inbound(m).await;
}

/// The next request of `method` the far end receives (skipping the ACKs of finals).
async fn far_request(r: &Rig, method: Method) -> Option<(Request, SocketAddr)> {
    loop {
        let (req, from) = r.far_recv().await?;
        if req.method == method {
            return Some((req, from));
        }
    }
}

/// A rig with trunk credentials (user `city`) whose INVITE the far end challenged once
/// with `code` and `header`: the leg's events, the first INVITE, and the one sent again
/// (with where it came from).
async fn challenged_once(
    code: u16,
    header: &str,
) -> (Rig, mpsc::Receiver<LegEvent>, Request, Request, SocketAddr) {
    let creds = crate::sip::registrar::Credentials {
        username: "city".into(),
        password: "pw".into(),
        realm: None,
    };
    let mut r = rig_with(|ua| ua.with_trunk_auth(creds.into())).await;
    let (_, events) = r.invite().await;
    let (inv, src) = far_request(&r, Method::Invite).await.expect("INVITE");
    challenge(&mut r, &inv, src, code, header).await;
    let (again, src) = far_request(&r, Method::Invite).await.expect("INVITE again");
    (r, events, inv, again, src)
}

#[tokio::test]
async fn a_challenged_trunk_invite_is_sent_once_more_with_credentials_then_fails() {
    let (mut r, mut events, inv, again, src) = challenged_once(401, "WWW-Authenticate").await;
    assert_eq!(
        (again.call_id.as_str(), again.cseq),
        (inv.call_id.as_str(), 2)
    );
    assert_ne!(
        again.vias[0].branch, inv.vias[0].branch,
        "a new transaction"
    );
    let auth = again.header("Authorization").expect("Authorization");
    assert!(
        auth.contains("username=\"city\"") && auth.contains("realm=\"trunk\""),
        "{auth}"
    );
    assert!(events.try_recv().is_err(), "the leg goes on");
    // Challenged again (a wrong password): no third try; the leg fails with the code.
    challenge(&mut r, &again, src, 401, "WWW-Authenticate").await;
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 401, .. }) => {}
        other => panic!("expected Failed 401, got {other:?}"),
    }
    assert!(far_request(&r, Method::Invite).await.is_none());
}

#[tokio::test]
async fn a_stale_nonce_on_the_retried_invite_is_answered_once_more() {
    let (mut r, mut events, _, again, src) = challenged_once(407, "Proxy-Authenticate").await;
    // The nonce expired between the two (RFC 7616 §3.3): answered with the new one.
    let stale = "Digest realm=\"trunk\", nonce=\"n2\", qop=\"auth\", stale=true";
    challenge_with(&mut r, &again, src, 407, "Proxy-Authenticate", stale).await;
    let (third, src) = far_request(&r, Method::Invite)
        .await
        .expect("a third INVITE");
    assert_eq!(third.cseq, 3);
    let auth = third.header("Proxy-Authorization").expect("credentials");
    assert!(auth.contains("nonce=\"n2\""), "{auth}");
    assert!(events.try_recv().is_err(), "the leg goes on");
    // Stale again: no loop.
    challenge_with(&mut r, &third, src, 407, "Proxy-Authenticate", stale).await;
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 407, .. }) => {}
        other => panic!("expected Failed 407, got {other:?}"),
    }
    assert!(far_request(&r, Method::Invite).await.is_none());
}

#[tokio::test]
async fn without_trunk_credentials_a_407_fails_the_leg() {
    let mut r = rig().await;
    let (_, mut events) = r.invite().await;
    let (inv, src) = far_request(&r, Method::Invite).await.expect("INVITE");
    challenge(&mut r, &inv, src, 407, "Proxy-Authenticate").await;
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 407, .. }) => {}
        other => panic!("expected Failed 407, got {other:?}"),
    }
}

#[tokio::test]
async fn no_answer_fails_with_408_on_timer_b() {
    let mut r = rig().await;
    let (_, mut events) = r.invite().await;
    let Some((inv, _)) = r.far_recv().await else {
        panic!("INVITE expected")
    };
    assert_eq!(inv.method, Method::Invite);
    r.ua.on_timers(Instant::now() + Duration::from_secs(31))
        .await;
    assert!(events.try_recv().is_err(), "nothing before 64*T1");
    r.ua.on_timers(Instant::now() + Duration::from_secs(33))
        .await;
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 408, .. }) => {}
        other => panic!("expected Failed 408, got {other:?}"),
    }
    assert!(r.ua.outbound.is_empty());
    assert!(r.ua.client.is_empty());
}

#[tokio::test]
async fn ringing_outlives_timer_b_until_cancelled_then_gives_up_after_64_t1() {
    let mut r = rig().await;
    let (d, mut events) = r.invite().await;
    let Some((inv, src)) = r.far_recv().await else {
        panic!("INVITE expected")
    };
    r.answer(&inv, src, 180, "Ringing").await;
    assert!(matches!(
        events.try_recv(),
        Ok(LegEvent::Provisional {
            code: 180,
            sdp: None
        })
    ));
    // Timer B is not allowed to end a ringing call.
    r.ua.on_timers(Instant::now() + Duration::from_secs(40))
        .await;
    assert!(events.try_recv().is_err());
    assert!(r.ua.outbound.contains_key(&d));
    // Cancel: a CANCEL with the INVITE's branch and CSeq number.
    r.ua.on_command(Command::Hangup { dialog: d }).await;
    let Some((cancel, _)) = r.far_recv().await else {
        panic!("CANCEL expected")
    };
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(cancel.top_via().branch, inv.top_via().branch);
    assert_eq!(cancel.cseq, inv.cseq);
    assert_eq!(cancel.uri, inv.uri);
    assert_eq!(cancel.to.tag(), None);
    // The far end never answers: 64*T1 later the UA gives up on the INVITE.
    r.ua.on_timers(Instant::now() + Duration::from_secs(20))
        .await;
    assert!(events.try_recv().is_err());
    r.ua.on_timers(Instant::now() + Duration::from_secs(33))
        .await;
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 487, .. }) => {}
        other => panic!("expected Failed 487, got {other:?}"),
    }
    assert!(r.ua.outbound.is_empty());
    assert!(r.ua.client.is_empty());
}

#[tokio::test]
async fn cancel_before_any_provisional_waits_for_one() {
    let mut r = rig().await;
    let (d, mut events) = r.invite().await;
    let Some((inv, src)) = r.far_recv().await else {
        panic!("INVITE expected")
    };
    r.ua.on_command(Command::Drop { dialog: d }).await;
    assert!(
        r.far_recv().await.is_none(),
        "no CANCEL before a provisional"
    );
    r.answer(&inv, src, 100, "Trying").await;
    assert!(events.try_recv().is_err(), "100 is not reported");
    let Some((cancel, _)) = r.far_recv().await else {
        panic!("CANCEL expected after the 100")
    };
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(cancel.top_via().branch, inv.top_via().branch);
}

#[tokio::test]
async fn cancel_pending_and_no_response_at_all_reports_487() {
    let mut r = rig().await;
    let (d, mut events) = r.invite().await;
    assert!(r.far_recv().await.is_some());
    r.ua.on_command(Command::Hangup { dialog: d }).await;
    r.ua.on_timers(Instant::now() + Duration::from_secs(33))
        .await;
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 487, .. }) => {}
        other => panic!("expected Failed 487, got {other:?}"),
    }
}

#[test]
fn a_target_asks_for_tcp_with_its_transport_parameter_only() {
    assert!(wants_tcp("sip:911@192.0.2.1;transport=tcp"));
    assert!(wants_tcp("sip:911@psap.example.gov:5060;Transport=TCP;lr"));
    assert!(!wants_tcp("sip:911@192.0.2.1;transport=tcpx"));
    assert!(!wants_tcp("sip:911@192.0.2.1;transport=udp"));
    assert!(!wants_tcp("sip:tcp@192.0.2.1"));
}

#[tokio::test]
async fn unusable_targets_fail_with_503_at_once() {
    let mut r = rig().await;
    for target in [
        "sip:911@psap.example.org",
        "tel:911",
        "sip:911@127.0.0.1:5080;transport=tcp",
        "sip:911@[::1]:5080",
        "sip:911@127.0.0.1:5080>\r\nX: y",
    ] {
        r.target = target.to_owned();
        let (_, mut events) = r.invite().await;
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 503, .. }) => {}
            other => panic!("{target}: expected Failed 503, got {other:?}"),
        }
    }
    assert!(r.ua.outbound.is_empty());
    assert!(r.ua.client.is_empty());
}

#[test]
fn from_user_is_escaped_and_extra_headers_are_checked() {
    assert_eq!(escape_user("+1 (555) 123"), "+1%20(555)%20123");
    assert_eq!(escape_user("a@b;c"), "a%40b%3Bc");
    assert_eq!(escape_user(""), "anonymous");
    assert_eq!(
        extra_header("X-311-Case", "42\r\nVia: evil"),
        Some(("X-311-Case".to_owned(), "42Via: evil".to_owned()))
    );
    assert_eq!(extra_header("Call-ID", "x"), None);
    assert_eq!(extra_header("f", "x"), None);
    assert_eq!(extra_header("Bad Name", "x"), None);
    assert!(extra_header("P-Asserted-Identity", "<sip:+15551234567@city>").is_some());
}

/// The far end calls us with `extra` session-timer headers; we answer 200 (and the far end
/// ACKs when `ack`). Returns the call and our 200 (or the final response we sent).
async fn called_with(r: &mut Rig, extra: &str, ack: bool) -> (Option<IncomingCall>, Response) {
    let ua = r.ua.transport.local_addr();
    let far = r.far.local_addr().unwrap();
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let inv = format!(
        "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst1\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: <sip:311@{ua}>\r\nCall-ID: st1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    r.far_send(inv.as_bytes()).await;
    let first = r.far_response().await.expect("a response");
    if first.code >= 200 {
        return (None, first);
    }
    let Ok(AppEvent::Invite(mut call)) = r.app.try_recv() else {
        panic!("no call passed up")
    };
    let body = Bytes::from_static(sdp.as_bytes());
    r.ua.respond_invite(
        call.handle.id,
        200,
        "OK",
        vec![],
        Some(("application/sdp".into(), body)),
        Instant::now(),
    )
    .await;
    let ok = r.far_response().await.expect("200");
    if ack {
        let to = ok.to.raw.clone();
        let ack = format!(
            "ACK sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst1ack\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: {to}\r\nCall-ID: st1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        );
        r.far_send(ack.as_bytes()).await;
        assert!(matches!(
            call.events.try_recv(),
            Ok(DialogEvent::Confirmed { .. })
        ));
    }
    (Some(call), ok)
}

#[tokio::test]
async fn a_carriers_session_timer_is_agreed_refreshed_and_a_silent_caller_hung_up() {
    let mut r = rig().await;
    let t0 = Instant::now();
    let (call, ok) = called_with(
        &mut r,
        "Supported: timer\r\nRequire: timer\r\nSession-Expires: 120;refresher=uac\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
        true,
    )
    .await;
    let mut call = call.unwrap();
    assert_eq!(ok.code, 200, "Require: timer is no longer refused");
    assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uac"));
    assert_eq!(ok.header("Require"), Some("timer"));
    // The carrier refreshes by UPDATE, asking for 600 s from now on.
    let ua = r.ua.transport.local_addr();
    let far = r.far.local_addr().unwrap();
    let update = format!(
        "UPDATE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst2\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: {}\r\nCall-ID: st1\r\nCSeq: 2 UPDATE\r\n\
Supported: timer\r\nSession-Expires: 600;refresher=uac\r\nContent-Length: 0\r\n\r\n",
        ok.to.raw
    );
    r.far_send(update.as_bytes()).await;
    let Ok(DialogEvent::Reoffer { txn, .. }) = call.events.try_recv() else {
        panic!("the UPDATE reaches the call")
    };
    r.ua.on_command(Command::ReofferAnswer {
        dialog: call.handle.id,
        txn,
        code: 200,
        body: None,
    })
    .await;
    let refreshed = r.far_response().await.expect("200 to UPDATE");
    assert_eq!(
        refreshed.header("Session-Expires"),
        Some("600;refresher=uac")
    );
    // Without that refresh the call would have ended 88 s in (120 - 32); it does not.
    r.ua.on_timers(t0 + Duration::from_secs(100)).await;
    assert!(r.far_recv().await.is_none(), "nothing sent yet");
    assert!(call.events.try_recv().is_err());
    // No refresh after that: 568 s on, BYE to the caller, and the call hears it ended.
    r.ua.on_timers(t0 + Duration::from_secs(600)).await;
    let (bye, _) = r.far_recv().await.expect("BYE");
    assert_eq!(bye.method, Method::Bye);
    assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
}

#[tokio::test]
async fn we_refresh_when_asked_and_a_caller_that_forgot_the_call_is_hung_up() {
    let mut r = rig().await;
    let t0 = Instant::now();
    let (call, ok) = called_with(
        &mut r,
        "Supported: timer\r\nSession-Expires: 120;refresher=uas\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
        true,
    )
    .await;
    let mut call = call.unwrap();
    assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uas"));
    r.ua.on_timers(t0 + Duration::from_secs(59)).await;
    assert!(r.far_recv().await.is_none(), "not before half the interval");
    r.ua.on_timers(t0 + Duration::from_secs(61)).await;
    let (update, src) = r.far_recv().await.expect("our refresh");
    assert_eq!(update.method, Method::Update);
    assert_eq!(update.header("Session-Expires"), Some("120;refresher=uas"));
    assert!(update.body.is_empty());
    // The far end no longer knows the call.
    r.answer(&update, src, 481, "Call/Transaction Does Not Exist")
        .await;
    assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
    let (bye, _) = r.far_recv().await.expect("BYE");
    assert_eq!(bye.method, Method::Bye);
}

#[tokio::test]
async fn without_update_our_refresh_is_a_reinvite_with_the_same_sdp() {
    let mut r = rig().await;
    let t0 = Instant::now();
    // A proxy asked for a timer the caller knows nothing of: we refresh, by re-INVITE.
    let (call, ok) = called_with(&mut r, "Session-Expires: 100\r\n", true).await;
    assert!(call.is_some());
    assert_eq!(ok.header("Session-Expires"), Some("100;refresher=uas"));
    assert_eq!(
        ok.header("Require"),
        None,
        "the caller does not support timers"
    );
    r.ua.on_timers(t0 + Duration::from_secs(51)).await;
    let (reinvite, _) = r.far_recv().await.expect("our refresh");
    assert_eq!(reinvite.method, Method::Invite);
    assert_eq!(reinvite.body, ok.body, "the SDP of our 200, unchanged");
}

#[tokio::test]
async fn an_interval_under_90_s_gets_422_with_min_se() {
    let mut r = rig().await;
    let (call, refused) =
        called_with(&mut r, "Supported: timer\r\nSession-Expires: 60\r\n", false).await;
    assert!(call.is_none());
    assert_eq!(refused.code, 422);
    assert_eq!(refused.header("Min-SE"), Some("90"));
}

#[tokio::test]
async fn invites_over_a_sources_limit_get_a_stateless_503_and_its_calls_count_until_they_end() {
    let metrics = Arc::new(Metrics::default());
    let mut r = rig_with(|ua| {
        ua.with_screening(
            Screening {
                max_calls_per_source: 1,
                invites_per_second: 100,
                invites_burst: 100,
                ..Screening::default()
            },
            metrics.clone(),
        )
    })
    .await;
    let ua = r.ua.transport.local_addr();
    let far = r.far.local_addr().unwrap();
    let invite = |n: u32| {
        format!(
            "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKlim{n}\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=l{n}\r\nTo: <sip:311@{ua}>\r\nCall-ID: lim{n}\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    r.far_send(invite(1).as_bytes()).await;
    assert_eq!(r.far_response().await.map(|x| x.code), Some(100));
    let Ok(AppEvent::Invite(call)) = r.app.try_recv() else {
        panic!("the first call is passed up")
    };
    let held = r.ua.server.len();
    // The second call from the same source: 503 with Retry-After, no transaction, no call.
    r.far_send(invite(2).as_bytes()).await;
    let refused = r.far_response().await.expect("an answer");
    assert_eq!(refused.code, 503);
    assert_eq!(refused.header("Retry-After"), Some("10"));
    assert!(refused.to.tag().is_some());
    assert_eq!(r.ua.server.len(), held, "no transaction kept for a refusal");
    assert!(r.app.try_recv().is_err());
    assert_eq!(
        metrics.get(
            "ivr311_sip_invites_limited_total",
            &[("limit", "calls_per_source")]
        ),
        1
    );
    // The first call is refused by its task: its source may call again.
    r.ua.respond_invite(
        call.handle.id,
        486,
        "Busy Here",
        vec![],
        None,
        Instant::now(),
    )
    .await;
    assert_eq!(r.far_response().await.map(|x| x.code), Some(486));
    r.far_send(invite(3).as_bytes()).await;
    assert_eq!(r.far_response().await.map(|x| x.code), Some(100));
}
