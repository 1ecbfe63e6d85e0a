//! Transfers, driven from outside over SIP, RTP and HTTP against the real server on loopback:
//! a caller (the test UA) talks to an operator (a test phone registered as agent 1001), whose
//! phone sends REFER (its transfer key), or an admin asks over the API; the targets (a crisis
//! line, the PSAP, a second agent) are test UAs that record what they receive.
//!
//! What is asserted is what a caller, an operator and a target would see: the target's INVITE
//! carries the caller's number and context, audio flows both ways between caller and target
//! (not silence), the operator's leg is released, NOTIFY progress reaches the operator's
//! phone, and when a transfer fails the caller ends up with the operator or first in line,
//! never in silence or dropped.

mod common;

use common::*;
use ivr311::config::{FileConfig, TransferLine, TransfersConfig};
use ivr311::media::g711::Codec;
use ivr311::media::rtp::{self, RtpStream};
use ivr311::sip::message::{parse_datagram, Message, Request, Response, ResponseBuilder};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// The caller's number, asserted by the trusted trunk (the test UA's address).
const CALLER: &str = "+12125550123";

/// A line operators may transfer to: `name`, `number`, at `target`, ringing `ring` seconds.
fn line(name: &str, number: &str, target: SocketAddr, ring: u64) -> TransferLine {
    TransferLine {
        name: name.into(),
        number: number.into(),
        uri: format!("sip:{number}@{target}"),
        headers: [("X-Language".to_owned(), "{language}".to_owned())].into(),
        ring_timeout_seconds: ring,
        crisis: false,
    }
}

/// Agents 1001 and 1002, one queue, these lines; the loopback trunk is trusted (so the
/// caller's P-Asserted-Identity is believed).
fn config(lines: Vec<TransferLine>) -> FileConfig {
    let mut f = agents_config(&["1001", "1002"], 20, 30);
    f.transfers = TransfersConfig(lines);
    f.trunks.allow = vec!["127.0.0.1/32".parse().unwrap()];
    f.limits.operator_silence_seconds = 0;
    f
}

/// An operator's phone: a registered test agent that keeps what the server sends it, answers
/// its in-dialog requests (NOTIFY, BYE, OPTIONS) 200 as a phone does, and sends requests in
/// the dialog of the call it answered.
struct Phone {
    a: TestAgent,
    /// The server's INVITE it answered.
    inv: Option<Request>,
    /// Messages received and not looked at yet.
    pending: VecDeque<Message>,
    cseq: u32,
}

impl Phone {
    async fn login(srv: &ivr311::server::RunningServer, id: &str) -> Phone {
        Phone::login_at(srv.sip_addr, id).await
    }

    async fn login_at(server: SocketAddr, id: &str) -> Phone {
        Phone {
            a: TestAgent::login(server, id).await,
            inv: None,
            pending: VecDeque::new(),
            cseq: 1,
        }
    }

    /// The next message matching `want`, within `t` (every request read meanwhile but INVITE
    /// and ACK is answered 200; what does not match waits in `pending`).
    async fn wait_for(&mut self, t: Duration, want: impl Fn(&Message) -> bool) -> Option<Message> {
        if let Some(i) = self.pending.iter().position(&want) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.a.recv(left).await?;
            if let Message::Request(r) = &m {
                if !matches!(r.method.as_str(), "INVITE" | "ACK") {
                    let resp = ResponseBuilder::new(r, 200, "OK", None).build();
                    self.a.sip.send_to(&resp, self.a.server).await.unwrap();
                }
            }
            if want(&m) {
                return Some(m);
            }
            self.pending.push_back(m);
        }
    }

    async fn request(&mut self, method: &str, t: Duration) -> Request {
        match self
            .wait_for(
                t,
                |m| matches!(m, Message::Request(r) if r.method.as_str() == method),
            )
            .await
        {
            Some(Message::Request(r)) => r,
            _ => panic!("agent {} got no {method} within {t:?}", self.a.id),
        }
    }

    /// The next NOTIFY's sipfrag status and Subscription-State.
    async fn notify(&mut self, t: Duration) -> (u16, String) {
        let (code, state, event) = self.notify_event(t).await;
        assert!(
            event == "refer" || event.starts_with("refer;id="),
            "Event: {event}"
        );
        (code, state)
    }

    /// The next NOTIFY's sipfrag status, Subscription-State and Event.
    async fn notify_event(&mut self, t: Duration) -> (u16, String, String) {
        let n = self.request("NOTIFY", t).await;
        let event = n.header("Event").unwrap_or("").to_owned();
        assert!(
            n.content_type()
                .is_some_and(|c| c.starts_with("message/sipfrag")),
            "{:?}",
            n.content_type()
        );
        let body = String::from_utf8_lossy(&n.body).to_string();
        let code = body
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let state = n.header("Subscription-State").unwrap_or("").to_owned();
        (code, state, event)
    }

    /// Answer the server's offer (the caller, queued) with 200 and our SDP.
    async fn answer_offer(&mut self) -> Request {
        let inv = self.request("INVITE", Duration::from_secs(10)).await;
        self.a
            .reply(&inv, 200, "OK", Some(self.a.answer_sdp()))
            .await;
        self.request("ACK", Duration::from_secs(3)).await;
        self.inv = Some(inv.clone());
        inv
    }

    /// Send `method` in the answered call's dialog with `extra` header lines; its CSeq.
    async fn send(&mut self, method: &str, extra: &str) -> u32 {
        let inv = self.inv.clone().expect("a call answered");
        self.cseq += 1;
        let me = self.a.sip.local_addr().unwrap();
        let msg = format!(
            "{method} sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{rand}\r\nMax-Forwards: 70\r\nFrom: {to};tag=ag{id}\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: {cseq} {method}\r\nContact: <sip:{id}@{me}>\r\n{extra}Content-Length: 0\r\n\r\n",
            srv = self.a.server,
            rand = rand::random::<u64>(),
            to = inv.to.raw,
            id = self.a.id,
            fr = inv.from.raw,
            cid = inv.call_id,
            cseq = self.cseq,
        );
        self.a
            .sip
            .send_to(msg.as_bytes(), self.a.server)
            .await
            .unwrap();
        self.cseq
    }

    /// The final response to our request with CSeq `cseq`.
    async fn response(&mut self, cseq: u32) -> Response {
        match self
            .wait_for(
                Duration::from_secs(5),
                |m| matches!(m, Message::Response(r) if r.cseq == cseq && r.code >= 200),
            )
            .await
        {
            Some(Message::Response(r)) => r,
            _ => panic!("no final response to CSeq {cseq}"),
        }
    }

    /// REFER to `refer_to` (the `Refer-To` value), answered with this status.
    async fn refer(&mut self, refer_to: &str) -> Response {
        let cseq = self
            .send(
                "REFER",
                &format!(
                    "Refer-To: {refer_to}\r\nReferred-By: <sip:{}@127.0.0.1>\r\n",
                    self.a.id
                ),
            )
            .await;
        self.response(cseq).await
    }

    /// Send `method` in the answered call's dialog with this SDP body.
    async fn send_sdp(&mut self, method: &str, sdp: &str) -> u32 {
        let inv = self.inv.clone().expect("a call answered");
        self.cseq += 1;
        let me = self.a.sip.local_addr().unwrap();
        let msg = format!(
            "{method} sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{rand}\r\nMax-Forwards: 70\r\nFrom: {to};tag=ag{id}\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: {cseq} {method}\r\nContact: <sip:{id}@{me}>\r\nContent-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{sdp}",
            srv = self.a.server,
            rand = rand::random::<u64>(),
            to = inv.to.raw,
            id = self.a.id,
            fr = inv.from.raw,
            cid = inv.call_id,
            cseq = self.cseq,
            len = sdp.len(),
        );
        self.a
            .sip
            .send_to(msg.as_bytes(), self.a.server)
            .await
            .unwrap();
        self.cseq
    }

    /// Put the caller on hold (`a=sendonly`) or take them off it (`a=sendrecv`): a
    /// re-INVITE on the answered call, ACKed.
    async fn hold(&mut self, on: bool) {
        let dir = if on { "sendonly" } else { "sendrecv" };
        let sdp = self
            .a
            .answer_sdp()
            .replace("t=0 0\r\n", &format!("t=0 0\r\na={dir}\r\n"));
        let cseq = self.send_sdp("INVITE", &sdp).await;
        assert_eq!(self.response(cseq).await.code, 200, "re-INVITE ({dir})");
        let inv = self.inv.clone().unwrap();
        let me = self.a.sip.local_addr().unwrap();
        let ack = format!(
            "ACK sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{rand}\r\nMax-Forwards: 70\r\nFrom: {to};tag=ag{id}\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
            srv = self.a.server,
            rand = rand::random::<u64>(),
            to = inv.to.raw,
            id = self.a.id,
            fr = inv.from.raw,
            cid = inv.call_id,
        );
        self.a
            .sip
            .send_to(ack.as_bytes(), self.a.server)
            .await
            .unwrap();
    }

    /// Call `user` from the phone (its own call, not the caller's), answering the server's
    /// digest challenge as a registered phone does; then [`Phone::dialled`] for the answer.
    async fn dial(&mut self, user: &str) -> Consultation {
        let mut c = Consultation {
            call_id: format!("consult-{}@test", rand::random::<u32>()),
            tag: format!("c{}", rand::random::<u32>()),
            remote_tag: None,
            uri: format!("sip:{user}@{}", self.a.server),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            branch: String::new(),
            cseq: 1,
            server_media: None,
        };
        self.invite(&mut c, None).await;
        let challenge = self.final_of(&c, Duration::from_secs(3)).await;
        assert_eq!(challenge.code, 401, "an agent's phone is challenged");
        self.ack(&c, &challenge).await;
        let auth =
            digest_authorization(&sha256_challenge(&challenge), &self.a.id, "INVITE", &c.uri);
        c.cseq = 2;
        self.invite(&mut c, Some(auth)).await;
        c
    }

    async fn invite(&mut self, c: &mut Consultation, auth: Option<String>) {
        let me = self.a.sip.local_addr().unwrap();
        c.branch = format!("z9hG4bKc{}", rand::random::<u64>());
        let p = c.rtp.local_addr().unwrap().port();
        let sdp = format!("v=0\r\no=phone 2 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {p} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n");
        let msg = format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{id}@{srv}>;tag={tag}\r\nTo: <{uri}>\r\nCall-ID: {cid}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:{id}@{me}>\r\n{auth}Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{sdp}",
            uri = c.uri,
            branch = c.branch,
            id = self.a.id,
            srv = self.a.server,
            tag = c.tag,
            cid = c.call_id,
            cseq = c.cseq,
            auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default(),
            len = sdp.len(),
        );
        self.a
            .sip
            .send_to(msg.as_bytes(), self.a.server)
            .await
            .unwrap();
    }

    /// The final response to the phone's INVITE `c` (provisional ones skipped), within `t`.
    async fn final_of(&mut self, c: &Consultation, t: Duration) -> Response {
        let (cid, cseq) = (c.call_id.clone(), c.cseq);
        match self
            .wait_for(t, |m| {
                matches!(m, Message::Response(r) if r.call_id == cid && r.cseq == cseq && r.code >= 200)
            })
            .await
        {
            Some(Message::Response(r)) => r,
            _ => panic!("no final response to the phone's INVITE to {}", c.uri),
        }
    }

    /// ACK a final response to the phone's INVITE.
    async fn ack(&self, c: &Consultation, r: &Response) {
        let me = self.a.sip.local_addr().unwrap();
        let branch = if r.code >= 300 {
            c.branch.clone()
        } else {
            format!("z9hG4bKa{}", rand::random::<u64>())
        };
        let msg = format!(
            "ACK {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{id}@{srv}>;tag={tag}\r\nTo: {to}\r\nCall-ID: {cid}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
            uri = c.uri,
            id = self.a.id,
            srv = self.a.server,
            tag = c.tag,
            to = r.to.raw,
            cid = c.call_id,
            cseq = c.cseq,
        );
        self.a
            .sip
            .send_to(msg.as_bytes(), self.a.server)
            .await
            .unwrap();
    }

    /// The answer to the phone's call `c` (ACKed): its status; on 200 the dialog is up.
    async fn dialled(&mut self, c: &mut Consultation, t: Duration) -> u16 {
        let r = self.final_of(c, t).await;
        self.ack(c, &r).await;
        if r.code == 200 {
            c.remote_tag = r.to.tag().map(str::to_owned);
            c.server_media = Some(ivr311::media::sdp::parse(&r.body).unwrap().addr);
        }
        r.code
    }

    /// Hang up the phone's own call `c` (BYE), answered 200.
    async fn hang_up(&mut self, c: &mut Consultation) {
        let me = self.a.sip.local_addr().unwrap();
        c.cseq += 1;
        let msg = format!(
            "BYE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKb{rand};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{id}@{srv}>;tag={tag}\r\nTo: <{uri}>;tag={rt}\r\nCall-ID: {cid}\r\nCSeq: {cseq} BYE\r\nContent-Length: 0\r\n\r\n",
            uri = c.uri,
            rand = rand::random::<u64>(),
            id = self.a.id,
            srv = self.a.server,
            tag = c.tag,
            rt = c.remote_tag.as_deref().unwrap_or(""),
            cid = c.call_id,
            cseq = c.cseq,
        );
        self.a
            .sip
            .send_to(msg.as_bytes(), self.a.server)
            .await
            .unwrap();
        let cseq = c.cseq;
        let r = self
            .wait_for(
                Duration::from_secs(3),
                |m| matches!(m, Message::Response(r) if r.cseq == cseq && r.code >= 200),
            )
            .await;
        assert!(
            matches!(r, Some(Message::Response(r)) if r.code == 200),
            "BYE answered"
        );
    }

    /// REFER on the caller's call with `Replaces` naming the phone's own call `c` to
    /// `user` (the phone's attended transfer, RFC 3891).
    async fn refer_replacing(&mut self, c: &Consultation, user: &str) -> Response {
        let replaces = format!(
            "{}%3Bto-tag%3D{}%3Bfrom-tag%3D{}",
            c.call_id,
            c.remote_tag.as_deref().unwrap_or(""),
            c.tag
        );
        self.refer(&format!(
            "<sip:{user}@{}?Replaces={replaces}>",
            self.a.server
        ))
        .await
    }

    /// Send our voice (a 1 kHz tone) to the server's media address of the answered call.
    async fn speak(&self, out: &mut RtpStream, packets: usize) {
        let inv = self.inv.as_ref().unwrap();
        let to = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
        send_tone(&self.a.rtp, to, out, 1000.0, packets).await;
    }
}

/// The phone's own call (a consultation, or 911 for the caller it holds).
struct Consultation {
    call_id: String,
    tag: String,
    remote_tag: Option<String>,
    uri: String,
    /// The phone's media for this call.
    rtp: UdpSocket,
    /// The last INVITE's branch (a non-2xx is ACKed on it).
    branch: String,
    cseq: u32,
    /// The server's media for this call, from its 200.
    server_media: Option<SocketAddr>,
}

/// RTP payloads received on `sock` for `d`.
async fn hear_on(sock: &UdpSocket, d: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        sock.recv_from(&mut buf),
    )
    .await
    {
        if let Ok(p) = rtp::parse(&buf[..n]) {
            out.push(p.payload.to_vec());
        }
    }
    out
}

/// `packets` of a `hz` tone (PCMU, 20 ms apart) from `sock` to `to`.
async fn send_tone(sock: &UdpSocket, to: SocketAddr, out: &mut RtpStream, hz: f32, packets: usize) {
    let pcm: Vec<i16> = (0..160)
        .map(|i| ((i as f32 * std::f32::consts::TAU * hz / 8000.0).sin() * 12000.0) as i16)
        .collect();
    let mut payload = [0u8; 160];
    Codec::Pcmu.encode(&pcm, &mut payload);
    let mut buf = [0u8; 200];
    for _ in 0..packets {
        let n = out.write(0, &payload, 160, &mut buf);
        sock.send_to(&buf[..n], to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RMS level (full scale 1.0) of PCMU payloads.
fn level(payloads: &[Vec<u8>]) -> f64 {
    let mut pcm = [0i16; 160];
    let (mut sum, mut n) = (0.0, 0usize);
    for p in payloads.iter().filter(|p| p.len() == 160) {
        Codec::Pcmu.decode(p, &mut pcm);
        sum += pcm
            .iter()
            .map(|s| (f64::from(*s) / 32768.0).powi(2))
            .sum::<f64>();
        n += 160;
    }
    if n == 0 {
        0.0
    } else {
        (sum / n as f64).sqrt()
    }
}

/// A target a caller is transferred to (the crisis line, the PSAP): it records the INVITEs
/// it receives and answers as the test says, with media of its own.
struct Target {
    sip: UdpSocket,
    rtp: UdpSocket,
    /// The server's address the INVITE came from (where responses go).
    from: Option<SocketAddr>,
}

impl Target {
    async fn bind() -> Target {
        Target {
            sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            from: None,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sip.local_addr().unwrap()
    }

    /// The next request with `method`, within `t` (`None` if none came).
    async fn next(&mut self, method: &str, t: Duration) -> Option<Request> {
        let deadline = Instant::now() + t;
        let mut buf = vec![0u8; 65535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (n, from) = tokio::time::timeout(left, self.sip.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            if let Ok(Message::Request(r)) = parse_datagram(&buf[..n], 65535) {
                self.from = Some(from);
                if matches!(r.method.as_str(), "BYE" | "CANCEL") {
                    let resp = ResponseBuilder::new(&r, 200, "OK", Some("tg")).build();
                    self.sip.send_to(&resp, from).await.unwrap();
                }
                if r.method.as_str() == method {
                    return Some(r);
                }
            }
        }
    }

    async fn invite(&mut self) -> Request {
        self.next("INVITE", Duration::from_secs(10))
            .await
            .expect("the target got an INVITE")
    }

    async fn respond(&self, inv: &Request, code: u16, reason: &str) {
        let mut b = ResponseBuilder::new(inv, code, reason, Some("tg"))
            .header("Contact", format!("<sip:target@{}>", self.addr()));
        if code == 200 {
            let p = self.rtp.local_addr().unwrap().port();
            b = b.body(
                "application/sdp",
                format!("v=0\r\no=t 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {p} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"),
            );
        }
        self.sip
            .send_to(&b.build(), self.from.unwrap())
            .await
            .unwrap();
    }

    /// RTP payloads received for `d`.
    async fn hear(&self, d: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(Ok((n, _))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.rtp.recv_from(&mut buf),
        )
        .await
        {
            if let Ok(p) = rtp::parse(&buf[..n]) {
                out.push(p.payload.to_vec());
            }
        }
        out
    }
}

/// A header of `r`.
fn h<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.header(name)
}

/// The caller (asserted by the trusted trunk) presses 1, 1, 0 and operator 1001 answers.
async fn caller_with_1001(srv: &ivr311::server::RunningServer) -> (TestUa, Phone) {
    let mut op = Phone::login(srv, "1001").await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    caller.from_user = CALLER.into();
    let (_, r) = caller
        .call_with(
            "0 101",
            &format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n"),
        )
        .await;
    assert_eq!(r.code, 200);
    caller.listen(Duration::from_millis(200)).await;
    caller.keys("110").await;
    op.answer_offer().await;
    (caller, op)
}

/// Wait until the only live call is in `state`; returns the call.
async fn call_state(srv: &ivr311::server::RunningServer, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let calls = admin_calls(srv.http_addr).await;
        if let [c] = calls.as_slice() {
            if c["state"] == state {
                return c.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no call in state {state:?}: {calls:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pause (or let take calls again) agent `id` over the admin API.
async fn set_paused(srv: &ivr311::server::RunningServer, id: &str, paused: bool) {
    let (path, body): (String, &[u8]) = if paused {
        (
            format!("/admin/agents/{id}/pause"),
            br#"{"reason": "test"}"#,
        )
    } else {
        (format!("/admin/agents/{id}/unpause"), b"")
    };
    // The agent's REGISTER reaches the queue a moment after its 200: until then the queue
    // answers 404 (not logged in).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, resp) = http(
            srv.http_addr,
            "POST",
            &path,
            &[("Content-Type", "application/json")],
            body,
        )
        .await;
        if s == 204 {
            return;
        }
        assert!(s == 404 && Instant::now() < deadline, "{path}: {s} {resp}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The call's transfer records once none is `started` any more (they are written as the
/// transfer goes, beside the call).
async fn transfers_done(
    srv: &ivr311::server::RunningServer,
    call_id: &str,
) -> Vec<ivr311::dispatch::tickets::TransferRow> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = srv.tickets.transfers_of(call_id).await.unwrap();
        if !rows.is_empty() && rows.iter().all(|r| r.outcome != "started") {
            return rows;
        }
        assert!(Instant::now() < deadline, "transfers still going: {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `metric` reaches `want`.
async fn metric_is(srv: &ivr311::server::RunningServer, metric: &str, want: f64) {
    let got = settle_metric(srv.http_addr, metric, want, Duration::from_secs(5)).await;
    assert_eq!(got, want, "{metric}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_refer_to_a_line_connects_the_caller_with_their_number_and_two_way_audio() {
    let mut crisis = Target::bind().await;
    let args = serve_args();
    let srv = start_server_with(
        args.clone(),
        config(vec![line("crisis", "988", crisis.addr(), 20)]),
    )
    .await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    let call_id = caller.call_id.clone();

    // The operator's transfer key: REFER to the line's number, on our server's domain.
    let r = op.refer(&format!("<sip:988@{}>", srv.sip_addr)).await;
    assert_eq!(r.code, 202, "REFER accepted");
    assert_eq!(
        op.notify(Duration::from_secs(3)).await,
        (100, "active;expires=60".into())
    );
    call_state(&srv, "transferring").await;

    // The line gets the caller's number and context.
    let inv = crisis.invite().await;
    assert_eq!(inv.from.user(), Some(CALLER), "From: {}", inv.from.raw);
    assert!(
        h(&inv, "P-Asserted-Identity").is_some_and(|p| p.contains(CALLER)),
        "{:?}",
        h(&inv, "P-Asserted-Identity")
    );
    assert_eq!(h(&inv, "X-311-Transferred-By"), Some("1001"));
    assert_eq!(h(&inv, "X-311-Call-ID"), Some(call_id.as_str()));
    assert_eq!(h(&inv, "X-311-Queue"), Some("general"));
    assert_eq!(h(&inv, "X-Language"), Some("en"));
    crisis.respond(&inv, 180, "Ringing").await;
    // Meanwhile the caller hears ringback, not silence.
    let heard = caller.listen(Duration::from_millis(1500)).await;
    assert!(
        level(&heard) > 0.01,
        "ringback: RMS {:.3} over {} packets",
        level(&heard),
        heard.len()
    );

    crisis.respond(&inv, 200, "OK").await;
    crisis
        .next("ACK", Duration::from_secs(3))
        .await
        .expect("ACKed");
    assert_eq!(
        op.notify(Duration::from_secs(3)).await,
        (200, "terminated;reason=noresource".into())
    );
    op.request("BYE", Duration::from_secs(3)).await;
    call_state(&srv, "transferred").await;

    // Audio both ways, caller ⇄ line.
    let server_leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let (_, heard_by_line) =
        tokio::join!(caller.speak(100), crisis.hear(Duration::from_millis(2000)));
    assert!(
        level(&heard_by_line) > 0.05,
        "the caller's voice reached the line: {:.3} over {} packets",
        level(&heard_by_line),
        heard_by_line.len()
    );
    let mut line_out = RtpStream::new();
    let (_, heard) = tokio::join!(
        send_tone(&crisis.rtp, server_leg, &mut line_out, 1000.0, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the line's voice reached the caller: {:.3} over {} packets",
        level(&heard),
        heard.len()
    );

    // The operator is free; the call's record names the transfer.
    let state = agent_state(srv.http_addr, "1001").await;
    assert!(state == "wrap_up" || state == "available", "{state}");
    let record = transfers_done(&srv, &call_id).await;
    assert_eq!(record.len(), 1, "{record:?}");
    assert_eq!(record[0].target, "crisis");
    assert_eq!(record[0].operator.as_deref(), Some("1001"));
    assert_eq!(record[0].requested_via, "refer");
    assert_eq!(record[0].outcome, "connected");
    metric_is(
        &srv,
        "ivr311_transfers_total{outcome=\"connected\",target=\"line\"}",
        1.0,
    )
    .await;

    // The caller hangs up: the line hears BYE.
    caller.bye().await;
    assert!(crisis.next("BYE", Duration::from_secs(3)).await.is_some());
    srv.shutdown().await;

    // The call history has the transfer among the call's queue events, by the operator.
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", args.db.display()))
        .await
        .unwrap();
    let events: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event, agent FROM queue_events WHERE call_id = ? ORDER BY id")
            .bind(&call_id)
            .fetch_all(&db)
            .await
            .unwrap();
    db.close().await;
    assert!(
        events.contains(&("transfer".to_owned(), Some("1001".to_owned()))),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_transfers_the_caller_to_another_agent_and_watches_its_progress() {
    let srv = start_server(config(vec![])).await;
    let mut second = Phone::login(&srv, "1002").await;
    // 1002 logged in first: the queue offers the caller to whoever is idle longest. Pause
    // 1002 so the caller goes to 1001, then let 1002 take calls again.
    set_paused(&srv, "1002", true).await;
    let (caller, mut op) = caller_with_1001(&srv).await;
    set_paused(&srv, "1002", false).await;

    let path = format!("/admin/calls/{}/transfer", caller.call_id);
    let json = [("Content-Type", "application/json")];
    let (s, body) = http(
        srv.http_addr,
        "POST",
        &path,
        &json,
        br#"{"to": "agent:1002"}"#,
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["transfer_id"]
        .as_u64()
        .expect("a transfer id");
    let progress = |id: u64| async move {
        let (s, body) = http(
            srv.http_addr,
            "GET",
            &format!("/admin/transfers/{id}"),
            &[],
            b"",
        )
        .await;
        assert_eq!(s, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let inv = second.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(h(&inv, "X-311-Transferred-By"), Some("1001"));
    assert_eq!(inv.from.user(), Some(CALLER));
    // The leg's INVITE may arrive before its progress is reported: wait for the report.
    let p = until("the transfer calling", Duration::from_secs(5), async || {
        let p = progress(id).await;
        (p["state"] != "claiming").then_some(p)
    })
    .await;
    assert_eq!(p["target"], "agent:1002");
    assert_eq!(p["requested_via"], "admin");
    assert_eq!(p["operator"], "1001");
    assert!(p["state"] == "calling" || p["state"] == "ringing", "{p}");
    assert_eq!(p["done"], false);
    // A second transfer meanwhile (not to 911, which never waits): refused.
    let (s, _) = http(
        srv.http_addr,
        "POST",
        &path,
        &json,
        br#"{"to": "queue:general"}"#,
    )
    .await;
    assert_eq!(s, 409);

    second
        .a
        .reply(&inv, 200, "OK", Some(second.a.answer_sdp()))
        .await;
    second.inv = Some(inv);
    op.request("BYE", Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let p = loop {
        let p = progress(id).await;
        if p["done"] == true || Instant::now() >= deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(p["state"], "connected", "{p}");
    assert_eq!(p["done"], true);
    assert_eq!(p["caller_state"], "with operator");
    assert_eq!(agent_state(srv.http_addr, "1002").await, "on_call");
    // Unknown calls, targets and forbidden numbers.
    let (s, _) = http(
        srv.http_addr,
        "POST",
        "/admin/calls/nope/transfer",
        &json,
        br#"{"to": "911"}"#,
    )
    .await;
    assert_eq!(s, 404);
    for (to, code) in [("queue:nope", 404), ("5550199", 403), ("agent:1002", 403)] {
        let (s, body) = http(
            srv.http_addr,
            "POST",
            &path,
            &json,
            format!(r#"{{"to": "{to}"}}"#).as_bytes(),
        )
        .await;
        assert_eq!(s, code, "{to}: {body}");
    }
    let (s, _) = http(srv.http_addr, "POST", &path, &json, b"{}").await;
    assert_eq!(s, 400);
    // The admin API's usual guard: JSON only.
    let (s, _) = http(srv.http_addr, "POST", &path, &[], br#"{"to": "911"}"#).await;
    assert_eq!(s, 415);
    let (s, _) = http(srv.http_addr, "GET", "/admin/transfers/12345", &[], b"").await;
    assert_eq!(s, 404);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_or_silent_target_returns_the_caller_to_the_operator_who_hears_why() {
    let mut busy = Target::bind().await;
    // Nothing listens here: the INVITE goes unanswered.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let srv = start_server(config(vec![
        line("permits_desk", "7001", busy.addr(), 20),
        line("nowhere", "7002", silent.local_addr().unwrap(), 20),
    ]))
    .await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;

    assert_eq!(op.refer("<sip:7001@127.0.0.1>").await.code, 202);
    assert_eq!(op.notify_event(Duration::from_secs(3)).await.2, "refer");
    let inv = busy.invite().await;
    busy.respond(&inv, 486, "Busy Here").await;
    assert_eq!(
        op.notify(Duration::from_secs(3)).await,
        (486, "terminated;reason=noresource".into())
    );
    call_state(&srv, "with operator").await;
    // Back with the operator: they hear each other again.
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        op.speak(&mut out, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the operator's voice after the failed transfer: {:.3}",
        level(&heard)
    );

    // A target that says nothing: unreachable after 5 s. The NOTIFYs of this second REFER in
    // the dialog name it by its CSeq (RFC 3515 §2.4.6); the first REFER's did not.
    let started = Instant::now();
    assert_eq!(op.refer("<sip:nowhere@127.0.0.1>").await.code, 202);
    let id = format!("refer;id={}", op.cseq);
    let (code, _, event) = op.notify_event(Duration::from_secs(3)).await;
    assert_eq!((code, event.as_str()), (100, id.as_str()));
    let (code, _, event) = op.notify_event(Duration::from_secs(8)).await;
    assert_eq!((code, event.as_str()), (408, id.as_str()));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    call_state(&srv, "with operator").await;
    metric_is(
        &srv,
        "ivr311_transfers_total{outcome=\"returned_to_operator\",target=\"line\"}",
        2.0,
    )
    .await;
    drop(silent);
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_hanging_up_mid_transfer_then_no_answer_puts_the_caller_first_in_line() {
    let mut crisis = Target::bind().await;
    let srv = start_server(config(vec![line("crisis", "988", crisis.addr(), 2)])).await;
    let mut second = Phone::login(&srv, "1002").await;
    set_paused(&srv, "1002", true).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    assert_eq!(op.refer("<sip:988@127.0.0.1>").await.code, 202);
    // A blind transfer: the phone hangs up once the REFER is accepted.
    let bye = op.send("BYE", "").await;
    assert_eq!(op.response(bye).await.code, 200);
    let inv = crisis.invite().await;
    crisis.respond(&inv, 180, "Ringing").await;
    // Still transferring, the agent freed.
    call_state(&srv, "transferring").await;
    // Nobody answers within the line's 2 s: CANCEL, and the caller waits first in line.
    crisis
        .next("CANCEL", Duration::from_secs(5))
        .await
        .expect("CANCELled");
    crisis.respond(&inv, 487, "Request Terminated").await;
    let call = call_state(&srv, "waiting for operator").await;
    assert!(call["seconds"].as_u64().unwrap() >= 2);
    // The next operator gets the caller, with the original wait.
    set_paused(&srv, "1002", false).await;
    let offer = second.request("INVITE", Duration::from_secs(5)).await;
    let waited: u64 = h(&offer, "X-311-Waited").unwrap().parse().unwrap();
    assert!(waited >= 2, "waited {waited}");
    let record = transfers_done(&srv, &caller.call_id).await;
    assert_eq!(
        record[0].outcome, "failed: no answer; back to the front of the queue",
        "{record:?}"
    );
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_hanging_up_mid_transfer_cancels_the_target_and_the_operator_hears_it() {
    let mut crisis = Target::bind().await;
    let srv = start_server(config(vec![line("crisis", "988", crisis.addr(), 20)])).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    assert_eq!(op.refer("<sip:988@127.0.0.1>").await.code, 202);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    let inv = crisis.invite().await;
    crisis.respond(&inv, 180, "Ringing").await;
    caller.bye().await;
    crisis
        .next("CANCEL", Duration::from_secs(3))
        .await
        .expect("the line is cancelled");
    crisis.respond(&inv, 487, "Request Terminated").await;
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 487);
    op.request("BYE", Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !admin_calls(srv.http_addr).await.is_empty() {
        assert!(Instant::now() < deadline, "the call ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refer_to_911_reaches_the_psap_with_the_callers_number_and_the_audit_names_the_operator()
{
    let mut psap = Target::bind().await;
    let mut file = config(vec![]);
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", psap.addr()));
    let srv = start_server(file).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    assert_eq!(op.refer("<sip:911@ivr311.example>").await.code, 202);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    let inv = psap.invite().await;
    assert_eq!(inv.from.user(), Some(CALLER), "From: {}", inv.from.raw);
    assert!(h(&inv, "P-Asserted-Identity").is_some_and(|p| p.contains(CALLER)));
    psap.respond(&inv, 200, "OK").await;
    assert_eq!(op.notify(Duration::from_secs(5)).await.0, 200);
    op.request("BYE", Duration::from_secs(3)).await;
    call_state(&srv, "emergency").await;
    let audit = srv.tickets.emergency_audits(1).await.unwrap().remove(0);
    assert_eq!(audit.operator.as_deref(), Some("1001"));
    assert_eq!(audit.requested_via.as_deref(), Some("refer"));
    assert_eq!(audit.caller.as_deref(), Some(CALLER));
    assert_eq!(audit.caller_verified, Some(true));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = srv.tickets.emergency_audits(1).await.unwrap().remove(0);
        if a.outcome == "connected via bridge" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", a.outcome);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two-way audio with the PSAP.
    let leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        send_tone(&psap.rtp, leg, &mut out, 1000.0, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the PSAP's voice: {:.3}",
        level(&heard)
    );
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_911_route_down_leaves_the_caller_with_the_operator_never_a_refusal() {
    let down1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut down2 = Target::bind().await;
    let mut file = config(vec![]);
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", down1.local_addr().unwrap()));
    file.emergency.backup_uris = vec![format!("sip:911@{}", down2.addr())];
    let srv = start_server(file).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    assert_eq!(
        op.refer("<tel:911>").await.code,
        202,
        "never a 4xx by policy"
    );
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    // The first route says nothing for 5 s; the backup refuses.
    let inv = down2
        .next("INVITE", Duration::from_secs(10))
        .await
        .expect("backup tried");
    down2.respond(&inv, 503, "Service Unavailable").await;
    assert_eq!(op.notify(Duration::from_secs(5)).await.0, 503);
    call_state(&srv, "with operator").await;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        op.speak(&mut out, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller is with the operator again: {:.3}",
        level(&heard)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = srv.tickets.emergency_audits(1).await.unwrap().remove(0);
        if a.outcome.starts_with("returned to operator") {
            assert_eq!(a.operator.as_deref(), Some("1001"));
            break;
        }
        assert!(Instant::now() < deadline, "{}", a.outcome);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(down1);
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refers_the_server_cannot_take_are_refused_counted_and_the_call_goes_on() {
    let srv = start_server(config(vec![])).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    // From the caller's side.
    let refer = caller.in_dialog("REFER", "Refer-To: <sip:988@127.0.0.1>\r\n", "");
    caller.send_raw(&refer).await;
    caller
        .expect_response("REFER", 403, Duration::from_secs(3))
        .await;
    // Outside any dialog.
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = raw.local_addr().unwrap();
    let out_of_dialog = format!(
        "REFER sip:311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKood1\r\nMax-Forwards: 70\r\nFrom: <sip:x@{me}>;tag=1\r\nTo: <sip:311@{srv}>\r\nCall-ID: ood@x\r\nCSeq: 1 REFER\r\nContact: <sip:x@{me}>\r\nRefer-To: <sip:911@{srv}>\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr
    );
    raw.send_to(out_of_dialog.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    let r = responses(&raw, Duration::from_millis(500)).await;
    assert!(
        r.iter().any(|r| r.code == 403),
        "{:?}",
        r.iter().map(|r| r.code).collect::<Vec<_>>()
    );
    // From the operator: malformed, outside numbers, nobody, a call we do not hold.
    for (refer_to, code) in [
        ("<http://example.com/>", 400),
        ("<sip:+12125550199@127.0.0.1>", 403),
        ("<sip:bob@127.0.0.1>", 404),
        (
            "<sip:1002@127.0.0.1?Replaces=nope%3Bto-tag%3D1%3Bfrom-tag%3D2>",
            481,
        ),
    ] {
        let r = op.refer(refer_to).await;
        assert_eq!(r.code, code, "{refer_to}");
        if code == 400 {
            assert!(r.header("Warning").is_some(), "a Warning says why");
        }
    }
    let cseq = op.send("REFER", "").await;
    assert_eq!(op.response(cseq).await.code, 400, "no Refer-To at all");
    for reason in [
        "not_operator",
        "outside_dialog",
        "bad_refer_to",
        "forbidden_number",
        "not_found",
        "no_such_dialog",
    ] {
        let want = if reason == "bad_refer_to" { 2.0 } else { 1.0 };
        metric_is(
            &srv,
            &format!("ivr311_transfer_refusals_total{{reason=\"{reason}\"}}"),
            want,
        )
        .await;
    }
    // The call goes on.
    call_state(&srv, "with operator").await;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        op.speak(&mut out, 40),
        caller.listen(Duration::from_millis(900))
    );
    assert!(level(&heard) > 0.05);
    caller.bye().await;
    srv.shutdown().await;
}

/// The call's transfer records once none is `started` any more, at least `n` of them.
async fn transfers_n(
    srv: &ivr311::server::RunningServer,
    call_id: &str,
    n: usize,
) -> Vec<ivr311::dispatch::tickets::TransferRow> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = transfers_done(srv, call_id).await;
        if rows.len() >= n {
            return rows;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The latest 911 audit row once its outcome satisfies `done`.
async fn audit_when(
    srv: &ivr311::server::RunningServer,
    done: impl Fn(&str) -> bool,
) -> ivr311::dispatch::tickets::EmergencyAuditRow {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = srv.tickets.emergency_audits(1).await.unwrap().remove(0);
        if done(&a.outcome) {
            return a;
        }
        assert!(Instant::now() < deadline, "{}", a.outcome);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_dials_911_for_the_held_caller_then_hands_them_over_with_replaces() {
    let mut psap = Target::bind().await;
    let mut file = config(vec![]);
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", psap.addr()));
    let srv = start_server(file).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    op.hold(true).await;

    // The operator's own call to 911 presents the caller's number, not the operator's.
    let mut c = op.dial("911").await;
    let inv = psap.invite().await;
    assert_eq!(inv.from.user(), Some(CALLER), "From: {}", inv.from.raw);
    assert!(h(&inv, "P-Asserted-Identity").is_some_and(|p| p.contains(CALLER)));
    call_state(&srv, "consulting").await;
    psap.respond(&inv, 200, "OK").await;
    assert_eq!(op.dialled(&mut c, Duration::from_secs(5)).await, 200);
    let audit = audit_when(&srv, |o| o == "connected via bridge").await;
    assert_eq!(audit.operator.as_deref(), Some("1001"));
    assert_eq!(audit.requested_via.as_deref(), Some("phone_call"));
    assert_eq!(audit.caller.as_deref(), Some(CALLER));
    // The operator talks to the PSAP.
    let psap_leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        send_tone(&psap.rtp, psap_leg, &mut out, 1000.0, 50),
        hear_on(&c.rtp, Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the PSAP's voice at the operator: {:.3}",
        level(&heard)
    );

    // The transfer key: REFER on the caller's call, replacing the call to 911.
    assert_eq!(op.refer_replacing(&c, "911").await.code, 202);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    assert_eq!(
        op.notify(Duration::from_secs(3)).await,
        (200, "terminated;reason=noresource".into())
    );
    // Both of the operator's calls are released.
    let byes = [
        op.request("BYE", Duration::from_secs(3)).await,
        op.request("BYE", Duration::from_secs(3)).await,
    ];
    assert!(
        byes.iter().any(|b| b.call_id == c.call_id),
        "the call to 911 released"
    );
    assert!(
        byes.iter().any(|b| b.call_id != c.call_id),
        "the caller's operator leg released"
    );
    call_state(&srv, "emergency").await;
    // The caller and the PSAP hear each other.
    let (_, heard) = tokio::join!(
        send_tone(&psap.rtp, psap_leg, &mut out, 1000.0, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the PSAP's voice at the caller: {:.3}",
        level(&heard)
    );
    let (_, heard) = tokio::join!(caller.speak(60), psap.hear(Duration::from_millis(1500)));
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at the PSAP: {:.3}",
        level(&heard)
    );
    let rows = transfers_n(&srv, &caller.call_id, 1).await;
    assert_eq!(
        (
            rows[0].target.as_str(),
            rows[0].requested_via.as_str(),
            rows[0].outcome.as_str()
        ),
        ("911", "phone_call", "connected"),
        "{rows:?}"
    );
    caller.bye().await;
    assert!(psap.next("BYE", Duration::from_secs(3)).await.is_some());
    metric_is(&srv, "ivr311_calls_total{outcome=\"emergency\"}", 1.0).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_911_route_down_on_the_operators_own_call_leaves_the_caller_with_them() {
    let mut psap = Target::bind().await;
    let mut file = config(vec![]);
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", psap.addr()));
    let srv = start_server(file).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    op.hold(true).await;
    let mut c = op.dial("911").await;
    let inv = psap.invite().await;
    psap.respond(&inv, 503, "Service Unavailable").await;
    assert_eq!(
        op.dialled(&mut c, Duration::from_secs(5)).await,
        503,
        "the phone hears why"
    );
    let audit = audit_when(&srv, |o| o.starts_with("returned to operator")).await;
    assert_eq!(audit.operator.as_deref(), Some("1001"));
    call_state(&srv, "with operator").await;
    op.hold(false).await;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        op.speak(&mut out, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller is with the operator: {:.3}",
        level(&heard)
    );
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consultation_abandoned_resumes_the_caller_and_a_second_one_is_joined_by_replaces() {
    let mut crisis = Target::bind().await;
    let srv = start_server(config(vec![line("crisis", "988", crisis.addr(), 20)])).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    let call_id = caller.call_id.clone();
    op.hold(true).await;

    // First consultation: the line answers, the operator hangs up on it.
    let mut c = op.dial("988").await;
    let inv = crisis.invite().await;
    assert_eq!(
        inv.from.user(),
        Some(CALLER),
        "the caller's number: {}",
        inv.from.raw
    );
    assert_eq!(h(&inv, "X-311-Transferred-By"), Some("1001"));
    assert_eq!(h(&inv, "X-311-Call-ID"), Some(call_id.as_str()));
    crisis.respond(&inv, 180, "Ringing").await;
    crisis.respond(&inv, 200, "OK").await;
    assert_eq!(op.dialled(&mut c, Duration::from_secs(5)).await, 200);
    call_state(&srv, "consulting").await;
    op.hang_up(&mut c).await;
    assert!(
        crisis.next("BYE", Duration::from_secs(3)).await.is_some(),
        "the line is released"
    );
    call_state(&srv, "with operator").await;
    // The operator takes the caller off hold: they talk again.
    op.hold(false).await;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        op.speak(&mut out, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(level(&heard) > 0.05, "resumed: {:.3}", level(&heard));

    // Second consultation, then the transfer key: the caller and the line are joined.
    op.hold(true).await;
    let mut c = op.dial("988").await;
    let inv = crisis.invite().await;
    crisis.respond(&inv, 200, "OK").await;
    assert_eq!(op.dialled(&mut c, Duration::from_secs(5)).await, 200);
    assert_eq!(op.refer_replacing(&c, "988").await.code, 202);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 200);
    op.request("BYE", Duration::from_secs(3)).await;
    op.request("BYE", Duration::from_secs(3)).await;
    call_state(&srv, "transferred").await;
    let line_leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let mut line_out = RtpStream::new();
    let (_, heard) = tokio::join!(
        send_tone(&crisis.rtp, line_leg, &mut line_out, 1000.0, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the line's voice at the caller: {:.3}",
        level(&heard)
    );
    let (_, heard) = tokio::join!(caller.speak(60), crisis.hear(Duration::from_millis(1500)));
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at the line: {:.3}",
        level(&heard)
    );
    let state = agent_state(srv.http_addr, "1001").await;
    assert!(state == "wrap_up" || state == "available", "{state}");
    let rows = transfers_n(&srv, &call_id, 2).await;
    assert!(
        rows[0]
            .outcome
            .starts_with("consultation ended by the operator"),
        "{rows:?}"
    );
    assert_eq!(
        (rows[1].requested_via.as_str(), rows[1].outcome.as_str()),
        ("phone_call", "connected")
    );
    metric_is(
        &srv,
        "ivr311_transfers_total{outcome=\"connected\",target=\"line\"}",
        1.0,
    )
    .await;
    caller.bye().await;
    assert!(crisis.next("BYE", Duration::from_secs(3)).await.is_some());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_phone_dialling_outside_the_plan_is_refused_and_counted() {
    let srv = start_server(config(vec![])).await;
    let mut op = Phone::login(&srv, "1001").await;
    for (user, code) in [
        ("5550199", 403),
        ("bob", 404),
        ("general", 403),
        ("1001", 403),
    ] {
        let mut c = op.dial(user).await;
        assert_eq!(
            op.dialled(&mut c, Duration::from_secs(3)).await,
            code,
            "{user}"
        );
    }
    for reason in [
        "forbidden_number",
        "not_found",
        "queue_by_phone",
        "themselves",
    ] {
        metric_is(
            &srv,
            &format!("ivr311_transfer_refusals_total{{reason=\"{reason}\"}}"),
            1.0,
        )
        .await;
    }
    // None of these reached the menu.
    assert!(admin_calls(srv.http_addr).await.is_empty());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sends_the_caller_to_911_even_while_another_transfer_rings() {
    let mut crisis = Target::bind().await;
    let mut psap = Target::bind().await;
    let mut file = config(vec![line("crisis", "988", crisis.addr(), 20)]);
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", psap.addr()));
    let srv = start_server(file).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    let call_id = caller.call_id.clone();
    assert_eq!(op.refer("<sip:988@127.0.0.1>").await.code, 202);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    let inv = crisis.invite().await;
    crisis.respond(&inv, 180, "Ringing").await;

    // The caller mentions a fire: the supervisor sends them to 911 at once.
    let path = format!("/admin/calls/{call_id}/transfer");
    let json = [("Content-Type", "application/json")];
    let (s, body) = http(srv.http_addr, "POST", &path, &json, br#"{"to": "911"}"#).await;
    assert_eq!(s, 202, "never refused for 911: {body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["transfer_id"]
        .as_u64()
        .unwrap();
    crisis
        .next("CANCEL", Duration::from_secs(3))
        .await
        .expect("the line is called off");
    crisis.respond(&inv, 487, "Request Terminated").await;
    assert_eq!(
        op.notify(Duration::from_secs(3)).await.0,
        487,
        "the phone's REFER is over"
    );
    let inv = psap.invite().await;
    assert_eq!(inv.from.user(), Some(CALLER), "From: {}", inv.from.raw);
    assert!(h(&inv, "P-Asserted-Identity").is_some_and(|p| p.contains(CALLER)));
    psap.respond(&inv, 200, "OK").await;
    op.request("BYE", Duration::from_secs(5)).await;
    call_state(&srv, "emergency").await;
    let audit = audit_when(&srv, |o| o == "connected via bridge").await;
    assert_eq!(audit.operator.as_deref(), Some("1001"));
    assert_eq!(audit.requested_via.as_deref(), Some("admin"));
    let (s, body) = http(
        srv.http_addr,
        "GET",
        &format!("/admin/transfers/{id}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (p["target"].as_str(), p["requested_via"].as_str()),
        (Some("911"), Some("admin"))
    );
    let psap_leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        send_tone(&psap.rtp, psap_leg, &mut out, 1000.0, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the PSAP's voice at the caller: {:.3}",
        level(&heard)
    );
    let rows = transfers_n(&srv, &call_id, 2).await;
    let outcome = |target: &str| {
        rows.iter()
            .find(|r| r.target == target)
            .map(|r| r.outcome.clone())
            .unwrap_or_default()
    };
    assert_eq!(outcome("crisis"), "called off for a transfer to 911");
    assert_eq!(outcome("911"), "connected");
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_consults_another_operator_who_then_takes_the_caller() {
    let srv = start_server(config(vec![])).await;
    let mut second = Phone::login(&srv, "1002").await;
    set_paused(&srv, "1002", true).await;
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    set_paused(&srv, "1002", false).await;
    op.hold(true).await;

    let mut c = op.dial("1002").await;
    let inv = second.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(
        inv.from.user(),
        Some(CALLER),
        "the held caller's number: {}",
        inv.from.raw
    );
    assert_eq!(h(&inv, "X-311-Transferred-By"), Some("1001"));
    assert_eq!(h(&inv, "X-311-Call-ID"), Some(caller.call_id.as_str()));
    second
        .a
        .reply(&inv, 200, "OK", Some(second.a.answer_sdp()))
        .await;
    second.inv = Some(inv.clone());
    assert_eq!(op.dialled(&mut c, Duration::from_secs(5)).await, 200);
    assert_eq!(agent_state(srv.http_addr, "1002").await, "on_call");
    call_state(&srv, "consulting").await;
    // One call from the phone at a time (besides 911).
    let mut again = op.dial("1002").await;
    assert_eq!(op.dialled(&mut again, Duration::from_secs(3)).await, 486);
    metric_is(&srv, "ivr311_transfer_refusals_total{reason=\"busy\"}", 1.0).await;

    assert_eq!(op.refer_replacing(&c, "1002").await.code, 202);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 100);
    assert_eq!(op.notify(Duration::from_secs(3)).await.0, 200);
    op.request("BYE", Duration::from_secs(3)).await;
    op.request("BYE", Duration::from_secs(3)).await;
    // 1002 is the caller's operator now, on the leg it answered.
    call_state(&srv, "with operator").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let first = agent_state(srv.http_addr, "1001").await;
        if first == "wrap_up" || first == "available" {
            break;
        }
        assert!(Instant::now() < deadline, "1001 is free: {first}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent_state(srv.http_addr, "1002").await, "on_call");
    let mut out = RtpStream::new();
    let (_, heard) = tokio::join!(
        second.speak(&mut out, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "1002's voice at the caller: {:.3}",
        level(&heard)
    );
    let (_, heard) = tokio::join!(
        caller.speak(60),
        hear_on(&second.a.rtp, Duration::from_millis(1500))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at 1002: {:.3}",
        level(&heard)
    );
    caller.bye().await;
    second.request("BYE", Duration::from_secs(3)).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_dials_a_queue_and_the_held_caller_goes_to_its_front_with_their_wait() {
    let srv = start_server(config(vec![])).await;
    let mut second = Phone::login(&srv, "1002").await;
    set_paused(&srv, "1002", true).await;
    let queued_by = Instant::now();
    let (mut caller, mut op) = caller_with_1001(&srv).await;
    let call_id = caller.call_id.clone();
    // Another caller comes in meanwhile and waits in the same queue (1001 is busy, 1002
    // paused): a caller sent back to the queue goes before them.
    let mut other = TestUa::udp(srv.sip_addr).await;
    let (_, r) = other.call_with("0 101", "").await;
    assert_eq!(r.code, 200);
    other.listen(Duration::from_millis(200)).await;
    other.keys("110").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin_calls(srv.http_addr)
        .await
        .iter()
        .any(|c| c["call_id"] == other.call_id.as_str() && c["state"] == "waiting for operator")
    {
        assert!(Instant::now() < deadline, "the other caller waits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator talks with the caller for a while, holds them, and dials the queue.
    let mut out = RtpStream::new();
    op.speak(&mut out, 150).await;
    op.hold(true).await;
    let mut c = op.dial("general").await;
    assert_eq!(
        op.dialled(&mut c, Duration::from_secs(5)).await,
        200,
        "the phone's call to a queue is answered"
    );
    // The phone hears the confirmation, and both of its calls are hung up.
    let heard = hear_on(&c.rtp, Duration::from_millis(1500)).await;
    assert!(
        level(&heard) > 0.01,
        "the confirmation: RMS {:.3} over {} packets",
        level(&heard),
        heard.len()
    );
    let byes = [
        op.request("BYE", Duration::from_secs(5)).await,
        op.request("BYE", Duration::from_secs(5)).await,
    ];
    assert!(
        byes.iter().any(|b| b.call_id == c.call_id),
        "the phone's call to the queue hung up"
    );
    assert!(
        byes.iter().any(|b| b.call_id != c.call_id),
        "the operator's leg with the caller released"
    );
    let state = agent_state(srv.http_addr, "1001").await;
    assert!(state == "wrap_up" || state == "available", "{state}");
    let rows = transfers_done(&srv, &call_id).await;
    assert_eq!(
        (
            rows[0].target.as_str(),
            rows[0].operator.as_deref(),
            rows[0].requested_via.as_str(),
            rows[0].outcome.as_str()
        ),
        ("queue:general", Some("1001"), "phone_call", "connected"),
        "{rows:?}"
    );

    // The next operator free gets the caller first, ahead of the one who waited meanwhile,
    // and sees their whole wait (since they first joined the queue).
    set_paused(&srv, "1002", false).await;
    let inv = second.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(h(&inv, "X-311-Call-ID"), Some(call_id.as_str()));
    assert_eq!(h(&inv, "X-311-Queue"), Some("general"));
    let waited: u64 = h(&inv, "X-311-Waited").unwrap().parse().unwrap();
    let least = queued_by.elapsed().as_secs().saturating_sub(2).max(3);
    assert!(
        waited >= least,
        "X-311-Waited {waited}, the caller has waited at least {least} s"
    );
    second
        .a
        .reply(&inv, 200, "OK", Some(second.a.answer_sdp()))
        .await;
    second.inv = Some(inv);
    second.request("ACK", Duration::from_secs(3)).await;
    let (_, heard) = tokio::join!(
        second.speak(&mut out, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller talks to 1002: {:.3}",
        level(&heard)
    );
    caller.bye().await;
    other.bye().await;
    srv.shutdown().await;
}

/// The server's CPU time so far (utime + stime, in clock ticks of 10 ms), from /proc.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// BENCHMARKS.md's "Transfers": K blind transfers against a server started by hand (release
/// build, `bench/transfers.yaml`) while `ivr311-load --target` keeps its IVR load on it; for
/// each, REFER sent by the operator's phone -> INVITE received at the line, and the server's
/// CPU per transferred call over the IVR load's own (measured for as long just before).
///
/// `IVR311_BENCH_SIP` (default 127.0.0.1:5060), `IVR311_BENCH_PID` (the server's pid),
/// `IVR311_BENCH_TRANSFERS` (K, default 50); the line listens on 127.0.0.1:5990 as the
/// config says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark against a server started by hand; see BENCHMARKS.md"]
async fn bench_refer_to_first_invite_under_ivr_load() {
    let env = |k: &str| std::env::var(k).ok();
    let server: SocketAddr = env("IVR311_BENCH_SIP")
        .unwrap_or_else(|| "127.0.0.1:5060".into())
        .parse()
        .unwrap();
    let pid: u32 = env("IVR311_BENCH_PID")
        .expect("IVR311_BENCH_PID")
        .parse()
        .unwrap();
    let k: usize = env("IVR311_BENCH_TRANSFERS")
        .map(|v| v.parse().unwrap())
        .unwrap_or(50);
    let mut line = Target {
        sip: UdpSocket::bind("127.0.0.1:5990").await.unwrap(),
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        from: None,
    };
    let mut op = Phone::login_at(server, "1001").await;

    let one = async |op: &mut Phone, line: &mut Target| -> Duration {
        let mut caller = TestUa::udp(server).await;
        caller.from_user = CALLER.into();
        let (_, r) = caller
            .call_with(
                "0 101",
                &format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n"),
            )
            .await;
        assert_eq!(r.code, 200);
        caller.listen(Duration::from_millis(200)).await;
        caller.keys("110").await;
        op.answer_offer().await;
        op.pending.clear();
        let sent = Instant::now();
        let cseq = op
            .send(
                "REFER",
                &format!("Refer-To: <sip:988@{server}>\r\nReferred-By: <sip:1001@127.0.0.1>\r\n"),
            )
            .await;
        let inv = line.invite().await;
        let took = sent.elapsed();
        assert_eq!(op.response(cseq).await.code, 202);
        line.respond(&inv, 200, "OK").await;
        line.next("ACK", Duration::from_secs(3)).await.expect("ACK");
        op.request("BYE", Duration::from_secs(5)).await;
        caller.bye().await;
        line.next("BYE", Duration::from_secs(5)).await.expect("BYE");
        // The operator's wrap-up (bench/transfers.yaml: none) is over when it is offered again.
        took
    };

    // The IVR load alone, for as long as the transfers will take (estimated from one).
    let t = Instant::now();
    let _ = one(&mut op, &mut line).await;
    let window = t.elapsed() * k as u32;
    let c0 = cpu_ticks(pid);
    tokio::time::sleep(window).await;
    let baseline = cpu_ticks(pid) - c0;

    let mut took = Vec::with_capacity(k);
    let c0 = cpu_ticks(pid);
    let t = Instant::now();
    for _ in 0..k {
        took.push(one(&mut op, &mut line).await);
    }
    let elapsed = t.elapsed();
    let with = cpu_ticks(pid) - c0;
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| took[((took.len() as f64 * p).ceil() as usize).clamp(1, took.len()) - 1];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{k} blind transfers in {:.1} s: REFER -> INVITE at the line p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64(),
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*took.last().unwrap())
    );
    let scaled = baseline as f64 * elapsed.as_secs_f64() / window.as_secs_f64();
    println!(
        "server CPU: {:.2} s with the transfers, {:.2} s for the IVR load alone over as long; \
         {:.1} ms per transferred call; load average {}",
        with as f64 / 100.0,
        scaled / 100.0,
        (with as f64 - scaled) * 10.0 / k as f64,
        load.trim()
    );
}
