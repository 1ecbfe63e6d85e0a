//! The UA core driven by hand, with no socket and on virtual time: what a far end sends goes
//! in as parsed messages with the time of our choosing, what the core sends comes out as
//! actions, and nothing waits.

use super::acceptor::Acceptor;
use super::core::{Action, Core};
use super::events::{AppEvent, DialogEvent, IncomingCall, LegEvent};
use super::handle::{Command, InviteCommand};
use super::{DialogId, Screening, ALLOW, ALLOW_WITH_REGISTER};
use crate::metrics::Metrics;
use crate::sip::message::{
    new_branch, parse_datagram, Message, Method, Request, RequestBuilder, Response, ResponseBuilder,
};
use crate::sip::registrar::{AgentEvent, Registrar};
use crate::sip::transport::{Flow, Transport};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Our SIP address.
fn ua_addr() -> SocketAddr {
    "127.0.0.1:5060".parse().unwrap()
}

/// A UA core and a far end at 127.0.0.1:5070 (UDP).
struct Rig {
    core: Core,
    /// Calls the UA core passes up (inbound INVITEs).
    app: mpsc::Receiver<AppEvent>,
    _commands: mpsc::Receiver<Command>,
    /// What the core sent, oldest first, not looked at yet.
    sent: VecDeque<Bytes>,
    /// What else it asked of the driver (holds, waits, look-ups...), oldest first.
    asked: Vec<Action>,
    far: SocketAddr,
    target: String,
}

fn rig() -> Rig {
    rig_with(|_| {})
}

/// A rig whose UA core lets agent 1001 (password "pw") log in.
fn rig_with_agent() -> Rig {
    rig_with(|core| {
        let agents = [("1001".to_owned(), "pw".to_owned().into())];
        core.agents.registrar =
            Some(Registrar::new("ivr311".into(), &agents, [7; 32]).with_algorithms(&[]));
    })
}

fn rig_with(setup: impl FnOnce(&mut Core)) -> Rig {
    let (app_tx, app) = mpsc::channel(4);
    let (cmd_tx, commands) = mpsc::channel(64);
    let mut core = Core::new(
        ua_addr(),
        ua_addr(),
        "ivr311-test".into(),
        app_tx,
        cmd_tx,
        Box::new(|_: &Flow| true),
    );
    setup(&mut core);
    let far: SocketAddr = "127.0.0.1:5070".parse().unwrap();
    Rig {
        core,
        app,
        _commands: commands,
        sent: VecDeque::new(),
        asked: Vec::new(),
        far,
        target: format!("sip:911@{far}"),
    }
}

impl Rig {
    /// Take what the core asks for: what it sends is kept for the far end to read.
    fn pump(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Transmit(flow, bytes) => {
                    assert_eq!(flow.remote, self.far, "sent to the far end");
                    self.sent.push_back(bytes);
                }
                other => self.asked.push(other),
            }
        }
    }

    fn command(&mut self, c: Command) {
        self.core.handle_command(Instant::now(), c);
        self.pump();
    }

    fn on_timers(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.pump();
    }

    fn respond_invite(
        &mut self,
        d: DialogId,
        code: u16,
        reason: &str,
        headers: Vec<(String, String)>,
        body: Option<(String, Bytes)>,
        now: Instant,
    ) {
        self.core
            .respond_invite(d, code, reason, headers, body, now);
        self.pump();
    }

    fn agent_events(&mut self) -> mpsc::Receiver<AgentEvent> {
        let (tx, rx) = mpsc::channel(16);
        self.core.agents.events = Some(tx);
        rx
    }

    /// Start an outbound call to `target`.
    fn invite(&mut self) -> (DialogId, mpsc::Receiver<LegEvent>) {
        let (events, rx) = mpsc::channel(64);
        let (reply, mut reply_rx) = oneshot::channel();
        let target = self.target.clone();
        self.command(Command::Invite(Box::new(InviteCommand {
            target,
            via: None,
            resolved: None,
            from_user: "+15551234567".into(),
            from_display: Some("Caller".into()),
            headers: vec![],
            sdp: Bytes::from_static(b"v=0\r\n"),
            events,
            reply,
        })));
        (reply_rx.try_recv().unwrap(), rx)
    }

    /// The next message the far end receives, if it is a request, with where it came from.
    fn far_recv(&mut self) -> Option<(Request, SocketAddr)> {
        match parse_datagram(&self.sent.pop_front()?, 65535) {
            Ok(Message::Request(r)) => Some((r, ua_addr())),
            _ => None,
        }
    }

    /// The far end answers `req`; the UA core takes the response in.
    fn answer(&mut self, req: &Request, _to: SocketAddr, code: u16, reason: &str) {
        let bytes = ResponseBuilder::new(req, code, reason, Some("far")).build();
        self.far_send(&bytes);
    }

    /// The far end sends `bytes` to the UA core, which takes them in.
    fn far_send(&mut self, bytes: &[u8]) {
        let msg = parse_datagram(bytes, 65535).expect("the far end sends SIP");
        let flow = Flow {
            transport: Transport::Udp,
            remote: self.far,
            conn: 0,
        };
        self.core.handle_message(Instant::now(), msg, flow);
        self.pump();
    }

    /// The next message the far end receives, if it is a response.
    fn far_response(&mut self) -> Option<Response> {
        match parse_datagram(&self.sent.pop_front()?, 65535) {
            Ok(Message::Response(r)) => Some(r),
            _ => None,
        }
    }

    /// REGISTER from the far end as agent 1001; `auth` is an Authorization value.
    fn register(&mut self, cseq: u32, auth: Option<&str>) -> Response {
        let mut b = RequestBuilder::new(
            &Method::Register,
            "sip:127.0.0.1",
            "UDP",
            self.far,
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
        self.far_send(&b.build());
        self.far_response().expect("a response to REGISTER")
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

#[test]
fn register_without_agents_is_forbidden() {
    let mut r = rig();
    let resp = r.register(1, None);
    assert_eq!(resp.code, 403);
    assert_eq!(r.core.allow(), ALLOW);
}

#[test]
fn agent_logs_in_is_reachable_through_its_flow_and_expires() {
    let mut r = rig_with_agent();
    let mut events = r.agent_events();
    let contacts = r.core.agents.contacts.clone();
    assert_eq!(r.core.allow(), ALLOW_WITH_REGISTER);
    let challenge = r.register(1, None);
    assert_eq!(challenge.code, 401);
    assert_eq!(challenge.headers_named("WWW-Authenticate").count(), 2);
    let ok = r.register(2, Some(&md5_authorization(&challenge)));
    assert_eq!(ok.code, 200, "{ok:?}");
    assert_eq!(ok.contacts()[0].uri, "sip:1001@10.255.0.7:5062");
    let far = r.far;
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
    let (reply, mut reply_rx) = oneshot::channel();
    let (ev_tx, _leg) = mpsc::channel(8);
    r.command(Command::Invite(Box::new(InviteCommand {
        target: contact.clone(),
        via: Some(flow),
        resolved: None,
        from_user: "+15551234567".into(),
        from_display: None,
        headers: vec![],
        sdp: Bytes::from_static(b"v=0\r\n"),
        events: ev_tx,
        reply,
    })));
    assert!(reply_rx.try_recv().is_ok());
    let Some((inv, _)) = r.far_recv() else {
        panic!("INVITE expected at the registration's address")
    };
    assert_eq!(inv.method, Method::Invite);
    assert_eq!(inv.uri, "sip:1001@10.255.0.7:5062");

    // The binding runs out on the timer heap.
    assert!(r.core.agents.timer.is_some());
    r.on_timers(Instant::now() + Duration::from_secs(3601));
    assert!(matches!(
        events.try_recv(),
        Ok(AgentEvent::LoggedOut { agent }) if agent == "1001"
    ));
    assert!(contacts.is_empty());
}

#[test]
fn invite_via_refuses_unusable_flows() {
    let mut r = rig();
    for (target, remote) in [
        ("sip:1001@10.0.0.1", "[::1]:5060"),
        ("sip:1001@10.0.0.1", "127.0.0.1:0"),
        ("tel:1001", "127.0.0.1:5060"),
        ("sip:1001@10.0.0.1>\r\nX: y", "127.0.0.1:5060"),
    ] {
        let (reply, _) = oneshot::channel();
        let (ev_tx, mut events) = mpsc::channel(8);
        r.command(Command::Invite(Box::new(InviteCommand {
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
        })));
        assert!(
            matches!(events.try_recv(), Ok(LegEvent::Failed { code: 503, .. })),
            "{target} via {remote}"
        );
    }
    assert!(r.core.client.is_empty());
}

/// The far end answers `req` with `code` and a digest challenge in `header`.
fn challenge(r: &mut Rig, req: &Request, to: SocketAddr, code: u16, header: &str) {
    let value = "Digest realm=\"trunk\", nonce=\"n1\", qop=\"auth\"";
    challenge_with(r, req, to, code, header, value);
}

fn challenge_with(
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
    let _ = to;
    r.far_send(&bytes);
}

/// The next request of `method` the far end receives (skipping the ACKs of finals).
fn far_request(r: &mut Rig, method: Method) -> Option<(Request, SocketAddr)> {
    loop {
        let (req, from) = r.far_recv()?;
        if req.method == method {
            return Some((req, from));
        }
    }
}

/// A rig with trunk credentials (user `city`) whose INVITE the far end challenged once
/// with `code` and `header`: the leg's events, the first INVITE, and the one sent again
/// (with where it came from).
fn challenged_once(
    code: u16,
    header: &str,
) -> (Rig, mpsc::Receiver<LegEvent>, Request, Request, SocketAddr) {
    let creds = crate::sip::registrar::Credentials {
        username: "city".into(),
        password: "pw".into(),
        realm: None,
    };
    let mut r = rig_with(|core| core.initiator.auth = creds.into());
    let (_, events) = r.invite();
    let (inv, src) = far_request(&mut r, Method::Invite).expect("INVITE");
    challenge(&mut r, &inv, src, code, header);
    let (again, src) = far_request(&mut r, Method::Invite).expect("INVITE again");
    (r, events, inv, again, src)
}

#[test]
fn a_challenged_trunk_invite_is_sent_once_more_with_credentials_then_fails() {
    let (mut r, mut events, inv, again, src) = challenged_once(401, "WWW-Authenticate");
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
    challenge(&mut r, &again, src, 401, "WWW-Authenticate");
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 401, .. }) => {}
        other => panic!("expected Failed 401, got {other:?}"),
    }
    assert!(far_request(&mut r, Method::Invite).is_none());
}

#[test]
fn a_stale_nonce_on_the_retried_invite_is_answered_once_more() {
    let (mut r, mut events, _, again, src) = challenged_once(407, "Proxy-Authenticate");
    // The nonce expired between the two (RFC 7616 §3.3): answered with the new one.
    let stale = "Digest realm=\"trunk\", nonce=\"n2\", qop=\"auth\", stale=true";
    challenge_with(&mut r, &again, src, 407, "Proxy-Authenticate", stale);
    let (third, src) = far_request(&mut r, Method::Invite).expect("a third INVITE");
    assert_eq!(third.cseq, 3);
    let auth = third.header("Proxy-Authorization").expect("credentials");
    assert!(auth.contains("nonce=\"n2\""), "{auth}");
    assert!(events.try_recv().is_err(), "the leg goes on");
    // Stale again: no loop.
    challenge_with(&mut r, &third, src, 407, "Proxy-Authenticate", stale);
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 407, .. }) => {}
        other => panic!("expected Failed 407, got {other:?}"),
    }
    assert!(far_request(&mut r, Method::Invite).is_none());
}

#[test]
fn without_trunk_credentials_a_407_fails_the_leg() {
    let mut r = rig();
    let (_, mut events) = r.invite();
    let (inv, src) = far_request(&mut r, Method::Invite).expect("INVITE");
    challenge(&mut r, &inv, src, 407, "Proxy-Authenticate");
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 407, .. }) => {}
        other => panic!("expected Failed 407, got {other:?}"),
    }
}

#[test]
fn no_answer_fails_with_408_on_timer_b() {
    let mut r = rig();
    let (_, mut events) = r.invite();
    let Some((inv, _)) = r.far_recv() else {
        panic!("INVITE expected")
    };
    assert_eq!(inv.method, Method::Invite);
    r.on_timers(Instant::now() + Duration::from_secs(31));
    assert!(events.try_recv().is_err(), "nothing before 64*T1");
    r.on_timers(Instant::now() + Duration::from_secs(33));
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 408, .. }) => {}
        other => panic!("expected Failed 408, got {other:?}"),
    }
    assert!(r.core.initiator.legs.is_empty());
    assert!(r.core.client.is_empty());
}

#[test]
fn ringing_outlives_timer_b_until_cancelled_then_gives_up_after_64_t1() {
    let mut r = rig();
    let (d, mut events) = r.invite();
    let Some((inv, src)) = r.far_recv() else {
        panic!("INVITE expected")
    };
    r.answer(&inv, src, 180, "Ringing");
    assert!(matches!(
        events.try_recv(),
        Ok(LegEvent::Provisional {
            code: 180,
            sdp: None
        })
    ));
    // Timer B is not allowed to end a ringing call.
    r.on_timers(Instant::now() + Duration::from_secs(40));
    assert!(events.try_recv().is_err());
    assert!(r.core.initiator.legs.contains_key(&d));
    // Cancel: a CANCEL with the INVITE's branch and CSeq number.
    r.command(Command::Hangup { dialog: d });
    let Some((cancel, _)) = r.far_recv() else {
        panic!("CANCEL expected")
    };
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(cancel.top_via().branch, inv.top_via().branch);
    assert_eq!(cancel.cseq, inv.cseq);
    assert_eq!(cancel.uri, inv.uri);
    assert_eq!(cancel.to.tag(), None);
    // The far end never answers: 64*T1 later the UA gives up on the INVITE.
    r.on_timers(Instant::now() + Duration::from_secs(20));
    assert!(events.try_recv().is_err());
    r.on_timers(Instant::now() + Duration::from_secs(33));
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 487, .. }) => {}
        other => panic!("expected Failed 487, got {other:?}"),
    }
    assert!(r.core.initiator.legs.is_empty());
    assert!(r.core.client.is_empty());
}

#[test]
fn cancel_before_any_provisional_waits_for_one() {
    let mut r = rig();
    let (d, mut events) = r.invite();
    let Some((inv, src)) = r.far_recv() else {
        panic!("INVITE expected")
    };
    r.command(Command::Drop { dialog: d });
    assert!(r.far_recv().is_none(), "no CANCEL before a provisional");
    r.answer(&inv, src, 100, "Trying");
    assert!(events.try_recv().is_err(), "100 is not reported");
    let Some((cancel, _)) = r.far_recv() else {
        panic!("CANCEL expected after the 100")
    };
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(cancel.top_via().branch, inv.top_via().branch);
}

#[test]
fn cancel_pending_and_no_response_at_all_reports_487() {
    let mut r = rig();
    let (d, mut events) = r.invite();
    assert!(r.far_recv().is_some());
    r.command(Command::Hangup { dialog: d });
    r.on_timers(Instant::now() + Duration::from_secs(33));
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 487, .. }) => {}
        other => panic!("expected Failed 487, got {other:?}"),
    }
}

#[test]
fn unusable_targets_fail_with_503_at_once() {
    let mut r = rig();
    for target in [
        "sip:911@psap.example.org",
        "tel:911",
        "sip:911@127.0.0.1:5080;transport=tcp",
        "sip:911@[::1]:5080",
        "sip:911@127.0.0.1:5080>\r\nX: y",
    ] {
        r.target = target.to_owned();
        let (_, mut events) = r.invite();
        match events.try_recv() {
            Ok(LegEvent::Failed { code: 503, .. }) => {}
            other => panic!("{target}: expected Failed 503, got {other:?}"),
        }
    }
    assert!(r.core.initiator.legs.is_empty());
    assert!(r.core.client.is_empty());
}

/// The far end calls us with `extra` session-timer headers; we answer 200 (and the far end
/// ACKs when `ack`). Returns the call and our 200 (or the final response we sent).
fn called_with(r: &mut Rig, extra: &str, ack: bool) -> (Option<IncomingCall>, Response) {
    let ua = ua_addr();
    let far = r.far;
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
    let inv = format!(
        "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst1\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: <sip:311@{ua}>\r\nCall-ID: st1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    r.far_send(inv.as_bytes());
    let first = r.far_response().expect("a response");
    if first.code >= 200 {
        return (None, first);
    }
    let Ok(AppEvent::Invite(mut call)) = r.app.try_recv() else {
        panic!("no call passed up")
    };
    let body = Bytes::from_static(sdp.as_bytes());
    r.respond_invite(
        call.handle.id,
        200,
        "OK",
        vec![],
        Some(("application/sdp".into(), body)),
        Instant::now(),
    );
    let ok = r.far_response().expect("200");
    if ack {
        let to = ok.to.raw.clone();
        let ack = format!(
            "ACK sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst1ack\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: {to}\r\nCall-ID: st1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        );
        r.far_send(ack.as_bytes());
        assert!(matches!(
            call.events.try_recv(),
            Ok(DialogEvent::Confirmed { .. })
        ));
    }
    (Some(call), ok)
}

#[test]
fn a_carriers_session_timer_is_agreed_refreshed_and_a_silent_caller_hung_up() {
    let mut r = rig();
    let t0 = Instant::now();
    let (call, ok) = called_with(
        &mut r,
        "Supported: timer\r\nRequire: timer\r\nSession-Expires: 120;refresher=uac\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
        true,
    );
    let mut call = call.unwrap();
    assert_eq!(ok.code, 200, "Require: timer is no longer refused");
    assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uac"));
    assert_eq!(ok.header("Require"), Some("timer"));
    // The carrier refreshes by UPDATE, asking for 600 s from now on.
    let ua = ua_addr();
    let far = r.far;
    let update = format!(
        "UPDATE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKst2\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=c1\r\nTo: {}\r\nCall-ID: st1\r\nCSeq: 2 UPDATE\r\n\
Supported: timer\r\nSession-Expires: 600;refresher=uac\r\nContent-Length: 0\r\n\r\n",
        ok.to.raw
    );
    r.far_send(update.as_bytes());
    let Ok(DialogEvent::Reoffer { txn, .. }) = call.events.try_recv() else {
        panic!("the UPDATE reaches the call")
    };
    r.command(Command::ReofferAnswer {
        dialog: call.handle.id,
        txn,
        code: 200,
        body: None,
    });
    let refreshed = r.far_response().expect("200 to UPDATE");
    assert_eq!(
        refreshed.header("Session-Expires"),
        Some("600;refresher=uac")
    );
    // Without that refresh the call would have ended 88 s in (120 - 32); it does not.
    r.on_timers(t0 + Duration::from_secs(100));
    assert!(r.far_recv().is_none(), "nothing sent yet");
    assert!(call.events.try_recv().is_err());
    // No refresh after that: 568 s on, BYE to the caller, and the call hears it ended.
    r.on_timers(t0 + Duration::from_secs(600));
    let (bye, _) = r.far_recv().expect("BYE");
    assert_eq!(bye.method, Method::Bye);
    assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
}

#[test]
fn we_refresh_when_asked_and_a_caller_that_forgot_the_call_is_hung_up() {
    let mut r = rig();
    let t0 = Instant::now();
    let (call, ok) = called_with(
        &mut r,
        "Supported: timer\r\nSession-Expires: 120;refresher=uas\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n",
        true,
    );
    let mut call = call.unwrap();
    assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uas"));
    r.on_timers(t0 + Duration::from_secs(59));
    assert!(r.far_recv().is_none(), "not before half the interval");
    r.on_timers(t0 + Duration::from_secs(61));
    let (update, src) = r.far_recv().expect("our refresh");
    assert_eq!(update.method, Method::Update);
    assert_eq!(update.header("Session-Expires"), Some("120;refresher=uas"));
    assert!(update.body.is_empty());
    // The far end no longer knows the call.
    r.answer(&update, src, 481, "Call/Transaction Does Not Exist");
    assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
    let (bye, _) = r.far_recv().expect("BYE");
    assert_eq!(bye.method, Method::Bye);
}

#[test]
fn without_update_our_refresh_is_a_reinvite_with_the_same_sdp() {
    let mut r = rig();
    let t0 = Instant::now();
    // A proxy asked for a timer the caller knows nothing of: we refresh, by re-INVITE.
    let (call, ok) = called_with(&mut r, "Session-Expires: 100\r\n", true);
    assert!(call.is_some());
    assert_eq!(ok.header("Session-Expires"), Some("100;refresher=uas"));
    assert_eq!(
        ok.header("Require"),
        None,
        "the caller does not support timers"
    );
    r.on_timers(t0 + Duration::from_secs(51));
    let (reinvite, _) = r.far_recv().expect("our refresh");
    assert_eq!(reinvite.method, Method::Invite);
    assert_eq!(reinvite.body, ok.body, "the SDP of our 200, unchanged");
}

#[test]
fn an_interval_under_90_s_gets_422_with_min_se() {
    let mut r = rig();
    let (call, refused) = called_with(&mut r, "Supported: timer\r\nSession-Expires: 60\r\n", false);
    assert!(call.is_none());
    assert_eq!(refused.code, 422);
    assert_eq!(refused.header("Min-SE"), Some("90"));
}

#[test]
fn invites_over_a_sources_limit_get_a_stateless_503_and_its_calls_count_until_they_end() {
    let metrics = Arc::new(Metrics::default());
    let mut r = rig_with(|core| {
        core.acceptor = Acceptor::new(Screening {
            max_calls_per_source: 1,
            invites_per_second: 100,
            invites_burst: 100,
            ..Screening::default()
        });
        core.metrics = Some(metrics.clone());
    });
    let ua = ua_addr();
    let far = r.far;
    let invite = |n: u32| {
        format!(
            "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKlim{n}\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=l{n}\r\nTo: <sip:311@{ua}>\r\nCall-ID: lim{n}\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    r.far_send(invite(1).as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(100));
    let Ok(AppEvent::Invite(call)) = r.app.try_recv() else {
        panic!("the first call is passed up")
    };
    let held = r.core.server.len();
    // The second call from the same source: 503 with Retry-After, no transaction, no call.
    r.far_send(invite(2).as_bytes());
    let refused = r.far_response().expect("an answer");
    assert_eq!(refused.code, 503);
    assert_eq!(refused.header("Retry-After"), Some("10"));
    assert!(refused.to.tag().is_some());
    assert_eq!(
        r.core.server.len(),
        held,
        "no transaction kept for a refusal"
    );
    assert!(r.app.try_recv().is_err());
    assert_eq!(
        metrics.get(
            "ivr311_sip_invites_limited_total",
            &[("limit", "calls_per_source")]
        ),
        1
    );
    // The first call is refused by its task: its source may call again.
    r.respond_invite(
        call.handle.id,
        486,
        "Busy Here",
        vec![],
        None,
        Instant::now(),
    );
    assert_eq!(r.far_response().map(|x| x.code), Some(486));
    r.far_send(invite(3).as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(100));
}

/// The far end's INVITE number `n` (Call-ID `c<n>`, From tag `f<n>`), no SDP.
fn far_invite(n: u32) -> String {
    let (ua, far) = (ua_addr(), "127.0.0.1:5070");
    format!(
        "INVITE sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bKin{n}\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=f{n}\r\nTo: <sip:311@{ua}>\r\nCall-ID: c{n}\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:caller@{far}>\r\nContent-Length: 0\r\n\r\n"
    )
}

/// A request of call `n` from the far end, inside the dialog our tag `to_tag` made.
fn far_in_dialog(n: u32, method: &str, cseq: u32, to_tag: &str, branch: &str) -> String {
    let (ua, far) = (ua_addr(), "127.0.0.1:5070");
    format!(
        "{method} sip:311@{ua} SIP/2.0\r\nVia: SIP/2.0/UDP {far};branch=z9hG4bK{branch}\r\nMax-Forwards: 70\r\n\
From: <sip:caller@{far}>;tag=f{n}\r\nTo: <sip:311@{ua}>;tag={to_tag}\r\nCall-ID: c{n}\r\nCSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n"
    )
}

/// The far end calls (call `n`); the call is passed up after our 100.
fn call_in(r: &mut Rig, n: u32) -> IncomingCall {
    r.far_send(far_invite(n).as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(100));
    let Ok(AppEvent::Invite(call)) = r.app.try_recv() else {
        panic!("the call is passed up")
    };
    call
}

/// The far end calls (call `n`), we answer 200 and it ACKs: the call and our tag.
fn answered(r: &mut Rig, n: u32) -> (IncomingCall, String) {
    let mut call = call_in(r, n);
    r.respond_invite(call.handle.id, 200, "OK", vec![], None, Instant::now());
    let ok = r.far_response().expect("200");
    let tag = ok.to.tag().unwrap().to_owned();
    r.far_send(far_in_dialog(n, "ACK", 1, &tag, &format!("ack{n}")).as_bytes());
    assert!(matches!(
        call.events.try_recv(),
        Ok(DialogEvent::Confirmed { .. })
    ));
    (call, tag)
}

#[test]
fn a_retransmitted_invite_gets_our_last_answer_again_and_is_never_a_second_call() {
    let mut r = rig();
    let call = call_in(&mut r, 1);
    r.far_send(far_invite(1).as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(100), "the 100 again");
    assert!(r.app.try_recv().is_err(), "no second call");
    r.respond_invite(
        call.handle.id,
        486,
        "Busy Here",
        vec![],
        None,
        Instant::now(),
    );
    assert_eq!(r.far_response().map(|x| x.code), Some(486));
    r.far_send(far_invite(1).as_bytes());
    assert_eq!(
        r.far_response().map(|x| x.code),
        Some(486),
        "the final again"
    );
    assert!(r.app.try_recv().is_err());
}

#[test]
fn a_cancel_before_the_answer_gets_200_then_487_and_the_call_hears_it_after_only_200() {
    let mut r = rig();
    let mut call = call_in(&mut r, 1);
    let cancel = far_invite(1)
        .replacen("INVITE sip", "CANCEL sip", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    r.far_send(cancel.as_bytes());
    let ok = r.far_response().expect("200 for the CANCEL");
    assert_eq!((ok.code, ok.cseq_method.clone()), (200, Method::Cancel));
    let terminated = r.far_response().expect("487 for the INVITE");
    assert_eq!(
        (terminated.code, terminated.cseq_method.clone()),
        (487, Method::Invite)
    );
    assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Cancelled)));
    assert!(r.core.dialogs.is_empty());
    // The call answers too late: nothing goes out.
    r.respond_invite(call.handle.id, 200, "OK", vec![], None, Instant::now());
    assert!(r.far_response().is_none());

    // Answered first: the CANCEL gets its 200 and changes nothing.
    let (mut call, _) = answered(&mut r, 2);
    let cancel = far_invite(2)
        .replacen("INVITE sip", "CANCEL sip", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    r.far_send(cancel.as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(200));
    assert!(r.far_response().is_none(), "no 487 after the answer");
    assert!(call.events.try_recv().is_err());
    // A CANCEL for no INVITE we know.
    let stray = far_invite(9)
        .replacen("INVITE sip", "CANCEL sip", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    r.far_send(stray.as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(481));
}

#[test]
fn requests_in_a_dialog_bye_info_a_cseq_going_back_and_an_unknown_dialog() {
    let mut r = rig();
    let (mut call, tag) = answered(&mut r, 1);
    r.far_send(far_in_dialog(1, "INFO", 2, &tag, "i2").as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(200));
    assert!(matches!(
        call.events.try_recv(),
        Ok(DialogEvent::Info { .. })
    ));
    // CSeq going backwards: 500, nothing passed up.
    r.far_send(far_in_dialog(1, "INFO", 1, &tag, "i1").as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(500));
    assert!(call.events.try_recv().is_err());
    // A dialog we do not hold.
    r.far_send(far_in_dialog(1, "INFO", 3, "not-ours", "i3").as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(481));
    // The caller hangs up: 200, the call hears it, the dialog is gone.
    r.far_send(far_in_dialog(1, "BYE", 4, &tag, "b4").as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(200));
    assert!(matches!(call.events.try_recv(), Ok(DialogEvent::Bye)));
    assert!(r.core.dialogs.is_empty());
}

#[test]
fn a_reinvite_while_an_offer_is_being_answered_is_asked_to_retry() {
    let mut r = rig();
    let (mut call, tag) = answered(&mut r, 1);
    r.far_send(far_in_dialog(1, "INVITE", 2, &tag, "r2").as_bytes());
    let Ok(DialogEvent::Reoffer { txn, .. }) = call.events.try_recv() else {
        panic!("the re-INVITE reaches the call")
    };
    r.far_send(far_in_dialog(1, "UPDATE", 3, &tag, "u3").as_bytes());
    let busy = r.far_response().expect("an answer");
    assert_eq!((busy.code, busy.header("Retry-After")), (500, Some("1")));
    r.command(Command::ReofferAnswer {
        dialog: call.handle.id,
        txn,
        code: 200,
        body: None,
    });
    let ok = r.far_response().expect("200 to the re-INVITE");
    assert_eq!((ok.code, ok.cseq), (200, 2));
}

/// An outbound leg whose INVITE the far end has received: the leg, its events, the INVITE.
fn leg_ringing(r: &mut Rig) -> (DialogId, mpsc::Receiver<LegEvent>, Request) {
    let (d, mut events) = r.invite();
    let (inv, src) = r.far_recv().expect("INVITE");
    r.answer(&inv, src, 180, "Ringing");
    assert!(matches!(
        events.try_recv(),
        Ok(LegEvent::Provisional { code: 180, .. })
    ));
    (d, events, inv)
}

/// The far end answers `inv` with 200 and its To tag `tag`.
fn far_2xx(r: &mut Rig, inv: &Request, tag: &str) {
    let ok = ResponseBuilder::new(inv, 200, "OK", Some(tag))
        .header("Contact", format_args!("<sip:911@{}>", r.far))
        .body("application/sdp", Bytes::from_static(b"v=0\r\n"))
        .build();
    r.far_send(&ok);
}

#[test]
fn a_2xx_that_crosses_our_cancel_is_acked_then_byed_and_the_leg_fails_with_487() {
    let mut r = rig();
    let (d, mut events, inv) = leg_ringing(&mut r);
    r.command(Command::Hangup { dialog: d });
    let (cancel, _) = r.far_recv().expect("CANCEL");
    assert_eq!(cancel.method, Method::Cancel);
    // The far end answered before the CANCEL reached it.
    far_2xx(&mut r, &inv, "far1");
    let (ack, _) = r.far_recv().expect("ACK");
    assert_eq!(
        (ack.method.clone(), ack.to.tag()),
        (Method::Ack, Some("far1"))
    );
    let (bye, _) = r.far_recv().expect("BYE");
    assert_eq!(
        (bye.method.clone(), bye.to.tag()),
        (Method::Bye, Some("far1"))
    );
    match events.try_recv() {
        Ok(LegEvent::Failed { code: 487, .. }) => {}
        other => panic!("expected Failed 487, got {other:?}"),
    }
    assert!(r.core.initiator.legs.is_empty());
}

#[test]
fn the_first_2xx_answers_the_leg_another_forks_is_acked_and_byed_and_a_repeat_acked_again() {
    let mut r = rig();
    let (_, mut events, inv) = leg_ringing(&mut r);
    far_2xx(&mut r, &inv, "fork1");
    let (ack, _) = r.far_recv().expect("ACK");
    assert_eq!(ack.to.tag(), Some("fork1"));
    assert!(matches!(events.try_recv(), Ok(LegEvent::Answered { .. })));
    // The same 2xx again (our ACK was lost): the same ACK again, nothing for the owner.
    far_2xx(&mut r, &inv, "fork1");
    let (again, _) = r.far_recv().expect("ACK again");
    assert_eq!(again.to.tag(), Some("fork1"));
    assert!(r.far_recv().is_none());
    // A second fork answers as well: ACK and BYE it; the owner keeps the first.
    far_2xx(&mut r, &inv, "fork2");
    let (ack2, _) = r.far_recv().expect("ACK of the other fork");
    let (bye2, _) = r.far_recv().expect("BYE of the other fork");
    assert_eq!(
        (ack2.to.tag(), bye2.to.tag()),
        (Some("fork2"), Some("fork2"))
    );
    assert_eq!(bye2.method, Method::Bye);
    assert!(events.try_recv().is_err());
}

#[test]
fn a_call_that_stops_reading_its_events_is_ended_with_bye_and_counted() {
    let metrics = Arc::new(Metrics::default());
    let mut r = rig_with(|core| core.metrics = Some(metrics.clone()));
    let (call, tag) = answered(&mut r, 1);
    // The call reads nothing: 64 INFOs fill its channel, 64 more its backlog (the driver is
    // asked once to wait for room), and the next ends the call.
    for cseq in 2..(2 + 64 + 64) {
        r.far_send(far_in_dialog(1, "INFO", cseq, &tag, &format!("i{cseq}")).as_bytes());
        assert_eq!(r.far_response().map(|x| x.code), Some(200));
    }
    assert!(r.far_recv().is_none(), "still up at the bound");
    let waits = r
        .asked
        .iter()
        .filter(|a| matches!(a, Action::WaitForRoom(d, _) if *d == call.handle.id))
        .count();
    assert_eq!(waits, 1);
    r.far_send(far_in_dialog(1, "INFO", 200, &tag, "i200").as_bytes());
    assert_eq!(r.far_response().map(|x| x.code), Some(200));
    let (bye, _) = r.far_recv().expect("BYE");
    assert_eq!(bye.method, Method::Bye);
    assert_eq!(
        r.core
            .stats
            .ended_backlogged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(metrics.get("ivr311_calls_ended_backlogged_total", &[]), 1);
    // The BYE is answered: what the call has not read is handed over in order, by the driver.
    r.answer(&bye, ua_addr(), 200, "OK");
    assert!(r.core.dialogs.is_empty());
    assert!(matches!(r.asked.last(), Some(Action::Drain(_))));
}

#[test]
fn the_trunk_registration_looks_its_registrar_up_registers_and_unbinds_when_draining() {
    let mut r = rig_with(|core| {
        let cfg = crate::sip::trunk::RegisterConfig {
            registrar: "sip:registrar.test:5070".into(),
            user: "city311".into(),
            domain: None,
            expires: 600,
        };
        core.register_with_trunk(cfg, Instant::now()).unwrap();
    });
    let t0 = Instant::now();
    r.on_timers(t0);
    assert!(
        matches!(r.asked.as_slice(), [Action::ResolveTrunk(u)] if u == "sip:registrar.test:5070"),
        "{:?}",
        r.asked
    );
    assert!(
        r.far_recv().is_none(),
        "nothing sent before the look-up answers"
    );
    let far = r.far;
    r.command(Command::TrunkResolved(Ok(vec![far])));
    let (reg, src) = r.far_recv().expect("REGISTER to the address found");
    assert_eq!(reg.method, Method::Register);
    let ok = ResponseBuilder::new(&reg, 200, "OK", Some("reg"))
        .header("Expires", "600")
        .build();
    let _ = src;
    r.far_send(&ok);
    let status = r.core.stats.trunk_registration().expect("a status");
    assert_eq!(status.state, "registered");
    r.core.unregister_trunk(Instant::now());
    r.pump();
    let (unbind, _) = r.far_recv().expect("the binding removed");
    assert_eq!(unbind.header("Expires"), Some("0"));
}
