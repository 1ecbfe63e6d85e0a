//! Call-backs that keep the caller's place, over real SIP and RTP: a waiting caller presses
//! 2 and hangs up; when an operator is free the server calls them back through the trunk
//! (a stand-in UAS here), then offers them to the operator and bridges the two legs.

mod common;

use common::*;
use ivr311::config::{AgentConfig, CallbackConfig, FileConfig, QueueConfig};
use ivr311::media::g711::Codec;
use ivr311::media::rtp;
use ivr311::sip::message::{parse_datagram, Message, Request, ResponseBuilder};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// The caller's number, as the trunk asserts it (P-Asserted-Identity from a source in
/// `trunks.allow`): only such a number is called back.
const CALLER: &str = "+12122000123";

/// The P-Asserted-Identity header line the trunk (loopback, trusted here) sends.
fn asserted() -> String {
    format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n")
}

fn config(trunk: SocketAddr, attempts: u32) -> FileConfig {
    FileConfig {
        agents: vec![AgentConfig {
            id: "1001".into(),
            password: "pw1001".into(),
            skills: vec![],
            tier: 1,
            name: None,
            role: Default::default(),
        }],
        queues: vec![QueueConfig {
            name: "general".into(),
            ring_timeout_seconds: 20,
            ..QueueConfig::default()
        }],
        callback: CallbackConfig {
            trunk_uri: Some(format!("sip:{trunk}")),
            ring_timeout_seconds: 2,
            attempts,
            retry_after_seconds: 1,
            first_delay_seconds: 0,
            ..CallbackConfig::default()
        },
        // The callers come through a trunk on loopback, which vouches for their numbers.
        trunks: ivr311::config::TrunksConfig {
            allow: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        },
        ..FileConfig::default()
    }
}

/// A SIP endpoint in the test: a phone (agent) or the trunk. One SIP socket, one RTP socket.
struct Peer {
    sip: UdpSocket,
    rtp: UdpSocket,
    server: SocketAddr,
    tag: String,
}

fn param(challenge: &str, name: &str) -> Option<String> {
    let rest = challenge.strip_prefix("Digest ")?;
    rest.split(", ").find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn sha256(data: &str) -> String {
    Sha256::digest(data.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Peer {
    async fn new(server: SocketAddr, tag: &str) -> Peer {
        Peer {
            sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            tag: tag.into(),
        }
    }

    /// An operator's phone: REGISTER with SHA-256 digest.
    async fn agent(server: SocketAddr, id: &str) -> Peer {
        let a = Peer::new(server, &format!("ag{id}")).await;
        let uri = format!("sip:{server}");
        let me = a.sip.local_addr().unwrap();
        let reg = |cseq: u32, auth: Option<String>| {
            format!(
                "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKreg{cseq}{id};rport\r\nMax-Forwards: 70\r\n\
From: <sip:{id}@{server}>;tag=a{id}\r\nTo: <sip:{id}@{server}>\r\nCall-ID: reg-{id}@{me}\r\nCSeq: {cseq} REGISTER\r\n\
Contact: <sip:{id}@{me}>\r\nExpires: 600\r\n{}Content-Length: 0\r\n\r\n",
                auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default()
            )
        };
        a.sip
            .send_to(reg(1, None).as_bytes(), server)
            .await
            .unwrap();
        let Some(Message::Response(challenge)) = a.recv(Duration::from_secs(3)).await else {
            panic!("no challenge")
        };
        let c = challenge
            .headers_named("WWW-Authenticate")
            .find(|c| param(c, "algorithm").as_deref() == Some("SHA-256"))
            .expect("SHA-256 challenge")
            .to_owned();
        let (realm, nonce, opaque) = (
            param(&c, "realm").unwrap(),
            param(&c, "nonce").unwrap(),
            param(&c, "opaque").unwrap(),
        );
        let ha1 = sha256(&format!("{id}:{realm}:pw{id}"));
        let ha2 = sha256(&format!("REGISTER:{uri}"));
        let resp = sha256(&format!("{ha1}:{nonce}:00000001:abcdef:auth:{ha2}"));
        let auth = format!(
            "Digest username=\"{id}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", \
algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"abcdef\", opaque=\"{opaque}\""
        );
        a.sip
            .send_to(reg(2, Some(auth)).as_bytes(), server)
            .await
            .unwrap();
        let Some(Message::Response(ok)) = a.recv(Duration::from_secs(3)).await else {
            panic!("no answer to REGISTER")
        };
        assert_eq!(ok.code, 200, "agent {id} logged in");
        a
    }

    async fn recv(&self, t: Duration) -> Option<Message> {
        let mut buf = vec![0u8; 65535];
        let (n, _) = tokio::time::timeout(t, self.sip.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(parse_datagram(&buf[..n], 65536).unwrap())
    }

    /// Wait for a request with `method` (other messages are skipped).
    async fn request(&self, method: &str, t: Duration) -> Request {
        self.try_request(method, t)
            .await
            .unwrap_or_else(|| panic!("{} got no {method} within {t:?}", self.tag))
    }

    async fn try_request(&self, method: &str, t: Duration) -> Option<Request> {
        let deadline = std::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.recv(left).await? {
                Message::Request(r) if r.method.as_str() == method => return Some(r),
                _ => continue,
            }
        }
    }

    async fn reply(&self, req: &Request, code: u16, reason: &str, sdp: Option<String>) {
        let mut b = ResponseBuilder::new(req, code, reason, Some(&self.tag)).header(
            "Contact",
            format!("<sip:peer@{}>", self.sip.local_addr().unwrap()),
        );
        if let Some(sdp) = sdp {
            b = b.body("application/sdp", sdp);
        }
        self.sip.send_to(&b.build(), self.server).await.unwrap();
    }

    /// SDP answering with one codec (PCMU `0` or PCMA `8`) and telephone-event.
    fn answer_sdp(&self, pt: u8) -> String {
        let p = self.rtp.local_addr().unwrap().port();
        let name = if pt == 0 { "PCMU" } else { "PCMA" };
        format!("v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {p} RTP/AVP {pt} 101\r\na=rtpmap:{pt} {name}/8000\r\na=rtpmap:101 telephone-event/8000\r\n")
    }

    /// Send `n` packets of `payload` (`pt`) to `to`, 20 ms apart.
    async fn send_rtp(&self, to: SocketAddr, pt: u8, payload: u8, n: usize) {
        let mut s = rtp::RtpStream::new();
        let mut out = [0u8; 200];
        for _ in 0..n {
            let len = s.write(pt, &[payload; 160], 160, &mut out);
            self.rtp.send_to(&out[..len], to).await.unwrap();
            // Paced as a phone sends, one packet each 20 ms: not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// RTP payloads of type `pt` that arrive within `dur`.
    async fn hear(&self, pt: u8, dur: Duration) -> Vec<Vec<u8>> {
        self.hear_until(pt, usize::MAX, dur).await
    }

    /// RTP payloads of type `pt` until `n` have arrived, or `dur` has passed.
    async fn hear_until(&self, pt: u8, n: usize, dur: Duration) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + dur;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < n {
            let Ok(Ok((len, _))) =
                tokio::time::timeout_at(deadline, self.rtp.recv_from(&mut buf)).await
            else {
                break;
            };
            if let Ok(p) = rtp::parse(&buf[..len]) {
                if p.payload_type == pt {
                    got.push(p.payload.to_vec());
                }
            }
        }
        got
    }

    fn drain_rtp(&self) {
        let mut buf = [0u8; 2048];
        while self.rtp.try_recv_from(&mut buf).is_ok() {}
    }

    /// BYE in the dialog `inv` established with us as the callee.
    async fn bye(&self, inv: &Request) {
        let bye = format!(
            "BYE sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{tag}bye\r\nMax-Forwards: 70\r\nFrom: {to};tag={tag}\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            srv = self.server,
            me = self.sip.local_addr().unwrap(),
            tag = self.tag,
            to = inv.to.raw,
            fr = inv.from.raw,
            cid = inv.call_id
        );
        self.sip.send_to(bye.as_bytes(), self.server).await.unwrap();
    }
}

async fn admin(srv: &ivr311::server::RunningServer, path: &str) -> (u16, String) {
    let json = [("Content-Type", "application/json")];
    http(
        srv.http_addr,
        "POST",
        path,
        &json,
        br#"{"reason":"meeting"}"#,
    )
    .await
}

/// Poll the general queue until `done` holds for it (at most 10 s); returns it. Panics with
/// the last one read, saying `what` never happened.
async fn queue_until(
    srv: &ivr311::server::RunningServer,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let q = general_queue(srv).await;
        if done(&q) {
            return q;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: never: {q}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn general_queue(srv: &ivr311::server::RunningServer) -> serde_json::Value {
    let (_, q) = http(srv.http_addr, "GET", "/admin/queues", &[], b"").await;
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    q.as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "general")
        .cloned()
        .unwrap()
}

/// The agent is paused; a caller presses 0, waits, presses 2 (call-back), hears that they
/// keep their place, and is hung up on. Returns once the server's BYE came.
async fn caller_asks_for_a_callback(srv: &ivr311::server::RunningServer) {
    assert_eq!(admin(srv, "/admin/agents/1001/pause").await.0 / 100, 2);
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call_with("0 101", &asserted()).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    ua.until_state(srv.http_addr, "waiting for operator").await;
    ua.press('2').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    let ear = PromptEar::new(
        "en",
        &["callback_kept", "callback_confirmed", "hold_music"],
        Codec::Pcmu,
    );
    assert_eq!(
        ear.playbacks(&heard).first().map(String::as_str),
        Some("callback_kept"),
        "the caller is told they keep their place"
    );
    ua.expect_request("BYE", Duration::from_secs(15)).await;
}

/// The trunk's stand-in: `sip` (bound before the server was configured with its address)
/// and a fresh RTP socket.
async fn trunk_peer(sip: UdpSocket, srv: &ivr311::server::RunningServer, tag: &str) -> Peer {
    Peer {
        sip,
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        server: srv.sip_addr,
        tag: tag.into(),
    }
}

/// What the called-back caller heard (in `codec`) starts with the call-back greeting.
fn assert_greeted(heard: &[Vec<u8>], codec: Codec) {
    let ear = PromptEar::new("en", &["callback_hello", "hold_music"], codec);
    assert_eq!(
        ear.playbacks(heard).first().map(String::as_str),
        Some("callback_hello"),
        "{} packets",
        heard.len()
    );
}

/// A waiting caller asks for a call-back, the operator comes back, and the trunk answers the
/// call-back in PCMU: the call-back's INVITE.
async fn call_back_answered(srv: &ivr311::server::RunningServer, trunk: &Peer) -> Request {
    caller_asks_for_a_callback(srv).await;
    assert_eq!(admin(srv, "/admin/agents/1001/unpause").await.0 / 100, 2);
    let inv = trunk.request("INVITE", Duration::from_secs(5)).await;
    trunk
        .reply(&inv, 200, "OK", Some(trunk.answer_sdp(0)))
        .await;
    trunk.request("ACK", Duration::from_secs(3)).await;
    inv
}

/// The caller is called back and answers, then the operator answers: the caller's RTP
/// address at the server (from the call-back INVITE) and the operator's INVITE.
async fn operator_answers_call_back(
    srv: &ivr311::server::RunningServer,
    trunk: &Peer,
    agent: &Peer,
) -> (ivr311::media::sdp::RemoteMedia, Request) {
    let inv = call_back_answered(srv, trunk).await;
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    let ainv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent
        .reply(&ainv, 200, "OK", Some(agent.answer_sdp(0)))
        .await;
    agent.request("ACK", Duration::from_secs(3)).await;
    (offer, ainv)
}

/// The operator's ringing phone gets CANCEL for `ainv`, and the queue counts the called-back
/// caller as abandoned.
async fn offer_withdrawn_caller_abandoned(
    srv: &ivr311::server::RunningServer,
    agent: &Peer,
    ainv: &Request,
) {
    let cancel = agent.request("CANCEL", Duration::from_secs(5)).await;
    assert_eq!(cancel.call_id, ainv.call_id);
    agent.reply(&cancel, 200, "OK", None).await;
    agent.reply(ainv, 487, "Request Terminated", None).await;
    queue_until(srv, "the caller counted as abandoned", |q| {
        (q["waiting"].as_u64(), q["abandoned"].as_u64()) == (Some(0), Some(1))
    })
    .await;
}

#[tokio::test]
async fn a_callback_keeps_the_place_rings_the_caller_back_and_bridges_them_to_the_operator() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let trunk_addr = trunk_sip.local_addr().unwrap();
    let srv = start_server(config(trunk_addr, 3)).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk1").await;
    let agent = Peer::agent(srv.sip_addr, "1001").await;
    caller_asks_for_a_callback(&srv).await;

    // The place is kept while no operator is free: nobody is called yet.
    let q = general_queue(&srv).await;
    assert_eq!(
        (q["waiting"].as_u64(), q["callbacks_pending"].as_u64()),
        (Some(1), Some(1)),
        "{q}"
    );
    assert!(
        trunk
            .try_request("INVITE", Duration::from_millis(500))
            .await
            .is_none(),
        "no call-back while the operator is paused"
    );

    // The operator is back: the caller is called back through the trunk, From 311.
    assert_eq!(admin(&srv, "/admin/agents/1001/unpause").await.0 / 100, 2);
    let inv = trunk.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(inv.uri, format!("sip:{CALLER}@{trunk_addr}"));
    assert_eq!(inv.from.user(), Some("311"));
    assert_eq!(inv.header("X-311-Callback"), Some("yes"));
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    trunk.reply(&inv, 180, "Ringing", None).await;
    // The trunk side answers in PCMA; the operator will answer in PCMU.
    trunk
        .reply(&inv, 200, "OK", Some(trunk.answer_sdp(8)))
        .await;
    trunk.request("ACK", Duration::from_secs(3)).await;
    // The caller hears the call-back greeting (and sends media, as a phone does).
    let (greeting, _) = tokio::join!(
        trunk.hear(8, Duration::from_millis(1000)),
        trunk.send_rtp(offer.addr, 8, 0xd5, 10)
    );
    assert_greeted(&greeting, Codec::Pcma);

    // The operator is offered the called-back caller with the context headers.
    let ainv = agent.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(ainv.from.user(), Some(CALLER));
    assert!(ainv.header("P-Asserted-Identity").unwrap().contains(CALLER));
    assert_eq!(ainv.header("X-311-Callback"), Some("yes"));
    assert_eq!(ainv.header("X-311-Language"), Some("en"));
    assert_eq!(ainv.header("X-311-Queue"), Some("general"));
    assert!(
        ainv.header("X-311-Menu-Path").unwrap().contains("main:0"),
        "{:?}",
        ainv.header("X-311-Menu-Path")
    );
    assert!(ainv.header("X-311-Waited").unwrap().parse::<u64>().is_ok());
    let agent_offer = ivr311::media::sdp::parse(&ainv.body).unwrap();
    // The operator's phone sends early media while it rings: the caller never gets it.
    agent.reply(&ainv, 180, "Ringing", None).await;
    agent.send_rtp(agent_offer.addr, 0, 0x11, 10).await;
    trunk.drain_rtp();
    agent
        .reply(&ainv, 200, "OK", Some(agent.answer_sdp(0)))
        .await;
    agent.request("ACK", Duration::from_secs(3)).await;
    let after_answer = trunk.hear(8, Duration::from_millis(300)).await;
    let mut early = [0u8; 160];
    Codec::transcode(Codec::Pcmu, Codec::Pcma, &[0x11; 160], &mut early);
    let stale = after_answer.iter().filter(|p| p[..] == early[..]).count();
    assert_eq!(stale, 0, "early media relayed after the answer");
    trunk.drain_rtp();

    // Caller (PCMA) -> operator (PCMU), transcoded.
    let (to_agent, _) = tokio::join!(
        agent.hear(0, Duration::from_millis(900)),
        trunk.send_rtp(offer.addr, 8, 0x2a, 25)
    );
    let mut expect = [0u8; 160];
    Codec::transcode(Codec::Pcma, Codec::Pcmu, &[0x2a; 160], &mut expect);
    let n = to_agent.iter().filter(|p| p[..] == expect[..]).count();
    assert!(
        n >= 15,
        "caller audio reached the operator: {n} of {}",
        to_agent.len()
    );
    // Operator (PCMU) -> caller (PCMA).
    let (to_caller, _) = tokio::join!(
        trunk.hear(8, Duration::from_millis(900)),
        agent.send_rtp(agent_offer.addr, 0, 0x55, 25)
    );
    Codec::transcode(Codec::Pcmu, Codec::Pcma, &[0x55; 160], &mut expect);
    let n = to_caller.iter().filter(|p| p[..] == expect[..]).count();
    assert!(
        n >= 15,
        "operator audio reached the caller: {n} of {}",
        to_caller.len()
    );

    // The operator hangs up: the caller's leg gets BYE; the queue counts one answered.
    agent.bye(&ainv).await;
    trunk.request("BYE", Duration::from_secs(5)).await;
    let q = queue_until(&srv, "the call counted as answered", |q| q["answered"] == 1).await;
    assert_eq!(
        (q["waiting"].as_u64(), q["callbacks_pending"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
    assert!(
        srv.tickets
            .list(&Default::default())
            .await
            .unwrap()
            .is_empty(),
        "a served call-back files no ticket"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_callback_nobody_answers_is_retried_then_filed_as_a_flagged_ticket() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let trunk_addr = trunk_sip.local_addr().unwrap();
    let srv = start_server(config(trunk_addr, 2)).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk2").await;
    let _agent = Peer::agent(srv.sip_addr, "1001").await;
    caller_asks_for_a_callback(&srv).await;
    assert_eq!(admin(&srv, "/admin/agents/1001/unpause").await.0 / 100, 2);

    // First attempt: rings, nobody answers within 2 s: CANCEL.
    let inv1 = trunk.request("INVITE", Duration::from_secs(5)).await;
    trunk.reply(&inv1, 180, "Ringing", None).await;
    let cancel = trunk.request("CANCEL", Duration::from_secs(5)).await;
    trunk.reply(&cancel, 200, "OK", None).await;
    trunk.reply(&inv1, 487, "Request Terminated", None).await;
    // Second (last) attempt, a second later: busy.
    let inv2 = trunk.request("INVITE", Duration::from_secs(5)).await;
    assert_ne!(inv2.call_id, inv1.call_id, "a new call");
    assert_eq!(inv2.uri, format!("sip:{CALLER}@{trunk_addr}"));
    trunk.reply(&inv2, 486, "Busy Here", None).await;

    // Nobody is lost: a ticket flagged for call-back with the caller's number.
    let mut tickets = Vec::new();
    for _ in 0..50 {
        tickets = srv.tickets.list(&Default::default()).await.unwrap();
        if !tickets.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tickets.len(), 1, "{tickets:?}");
    assert!(tickets[0].callback_requested);
    assert_eq!(tickets[0].phone.as_deref(), Some(CALLER));
    let q = general_queue(&srv).await;
    assert_eq!(q["waiting"], 0, "{q}");
    assert_eq!(q["callbacks_unreached"], 1, "{q}");
    assert!(
        trunk
            .try_request("INVITE", Duration::from_millis(1500))
            .await
            .is_none(),
        "no third attempt"
    );
    // The call history keeps the request and how it ended.
    let mut total = serde_json::Value::Null;
    for _ in 0..50 {
        let (_, body) = http(srv.http_addr, "GET", "/admin/reports/calls", &[], b"").await;
        total = serde_json::from_str::<serde_json::Value>(&body).unwrap()["total"].clone();
        if total["callbacks_unreached"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total["callbacks_requested"], 1, "{total}");
    assert_eq!(total["callbacks_unreached"], 1, "{total}");
    assert_eq!(total["callbacks_completed"], 0, "{total}");
    srv.shutdown().await;
}

/// A trunk named with two addresses, the first of them down: the first attempt goes there and
/// gets nothing, the second goes to the other address (one address down costs an attempt, not
/// the call-back).
#[tokio::test]
async fn a_callback_whose_trunk_name_has_a_dead_first_address_tries_the_next_one() {
    let dns = common::dns::TestDns::start().await;
    dns.address("trunk.test", [127, 0, 0, 2].into())
        .address("trunk.test", [127, 0, 0, 1].into());
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = trunk_sip.local_addr().unwrap().port();
    let dead = UdpSocket::bind(("127.0.0.2", port))
        .await
        .expect("127.0.0.2 is loopback on Linux");
    let mut cfg = config(trunk_sip.local_addr().unwrap(), 2);
    cfg.callback.trunk_uri = Some(format!("sip:trunk.test:{port}"));
    cfg.dns = dns.config();
    let srv = start_server(cfg).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk2").await;
    let _agent = Peer::agent(srv.sip_addr, "1001").await;
    caller_asks_for_a_callback(&srv).await;
    assert_eq!(admin(&srv, "/admin/agents/1001/unpause").await.0 / 100, 2);

    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), dead.recv_from(&mut buf))
        .await
        .expect("the first attempt goes to the first address")
        .unwrap();
    assert!(buf[..n].starts_with(b"INVITE "));
    let inv = trunk.request("INVITE", Duration::from_secs(8)).await;
    assert_eq!(inv.uri, format!("sip:{CALLER}@trunk.test:{port}"));
    trunk.reply(&inv, 486, "Busy Here", None).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_callback_pending_at_shutdown_becomes_a_flagged_ticket() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let srv = start_server(config(trunk_sip.local_addr().unwrap(), 3)).await;
    let _agent = Peer::agent(srv.sip_addr, "1001").await;
    caller_asks_for_a_callback(&srv).await;
    let tickets = srv.tickets.clone();
    srv.shutdown().await;
    let all = tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(all[0].callback_requested);
    assert_eq!(all[0].phone.as_deref(), Some(CALLER));
}

#[tokio::test]
async fn a_called_back_caller_who_hangs_up_before_an_operator_answers_cancels_the_offer() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let srv = start_server(config(trunk_sip.local_addr().unwrap(), 3)).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk3").await;
    let agent = Peer::agent(srv.sip_addr, "1001").await;
    let inv = call_back_answered(&srv, &trunk).await;
    let ainv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&ainv, 180, "Ringing", None).await;
    // The caller hangs up while the operator's phone rings.
    trunk.bye(&inv).await;
    offer_withdrawn_caller_abandoned(&srv, &agent, &ainv).await;
    let (_, agents) = http(srv.http_addr, "GET", "/admin/agents", &[], b"").await;
    assert!(
        agents.contains("\"available\""),
        "the operator is free again: {agents}"
    );
    assert!(
        srv.tickets
            .list(&Default::default())
            .await
            .unwrap()
            .is_empty(),
        "a caller who hung up is not filed"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_called_back_phone_that_sends_no_audio_is_hung_up_and_the_offer_withdrawn() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut file = config(trunk_sip.local_addr().unwrap(), 3);
    file.limits.no_media_seconds = 3;
    let srv = start_server(file).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk4").await;
    let agent = Peer::agent(srv.sip_addr, "1001").await;
    call_back_answered(&srv, &trunk).await;
    let answered = tokio::time::Instant::now();
    // A line that answers but carries no audio back (a fax tone, a broken gateway): the
    // greeting still plays to it...
    let greeting = trunk.hear(0, Duration::from_millis(800)).await;
    assert_greeted(&greeting, Codec::Pcmu);
    let ainv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&ainv, 180, "Ringing", None).await;
    // ...and after `limits.no_media_seconds` without a packet from it, the server hangs up
    // and withdraws the operator's offer.
    trunk.request("BYE", Duration::from_secs(6)).await;
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "hung up after {waited:?}, before the caller was silent for 3 s"
    );
    offer_withdrawn_caller_abandoned(&srv, &agent, &ainv).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_called_back_callers_operator_whose_phone_goes_silent_is_hung_up() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut file = config(trunk_sip.local_addr().unwrap(), 3);
    file.limits.operator_silence_seconds = 3;
    let srv = start_server(file).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk5").await;
    let agent = Peer::agent(srv.sip_addr, "1001").await;
    let (offer, ainv) = operator_answers_call_back(&srv, &trunk, &agent).await;
    let answered = tokio::time::Instant::now();
    // The caller talks; the operator's phone sends nothing and no BYE (it lost its network).
    // After `operator_silence_seconds` it is asked with an in-dialog OPTIONS; it answers
    // nothing, and a few seconds later (not at the OPTIONS' Timer F, 32 s) its leg is hung
    // up, and so is the call-back.
    let ((bye, silent, asked), ()) = tokio::join!(
        async {
            agent.request("OPTIONS", Duration::from_secs(8)).await;
            let silent = answered.elapsed();
            let asked = tokio::time::Instant::now();
            let bye = agent.request("BYE", Duration::from_secs(8)).await;
            (bye, silent, asked.elapsed())
        },
        trunk.send_rtp(offer.addr, 0, 0xff, 400)
    );
    assert_eq!(bye.call_id, ainv.call_id);
    assert!(
        silent >= Duration::from_millis(2500),
        "asked after {silent:?}, before the operator was silent for 3 s"
    );
    assert!(
        asked >= Duration::from_secs(3),
        "hung up {asked:?} after asking, before the phone had time to answer"
    );
    trunk.request("BYE", Duration::from_secs(3)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_called_back_callers_operator_can_refresh_and_hold_the_call() {
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let srv = start_server(config(trunk_sip.local_addr().unwrap(), 3)).await;
    let trunk = trunk_peer(trunk_sip, &srv, "trunk6").await;
    let agent = Peer::agent(srv.sip_addr, "1001").await;
    let (offer, ainv) = operator_answers_call_back(&srv, &trunk, &agent).await;

    // A session refresh (UPDATE, no body): 200 without an offer.
    let r = agent_request(&srv, &agent.sip, &ainv, "UPDATE", 2, None).await;
    assert_eq!((r.code, r.body.is_empty()), (200, true));

    // Hold: 200 recvonly, and the called-back caller hears our hold music meanwhile.
    let hold = agent
        .answer_sdp(0)
        .replace("a=rtpmap:0", "a=sendonly\r\na=rtpmap:0");
    let r = agent_request(&srv, &agent.sip, &ainv, "INVITE", 3, Some(&hold)).await;
    assert_eq!(r.code, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("a=recvonly"));
    let (heard, ()) = tokio::join!(
        trunk.hear(0, Duration::from_millis(1500)),
        trunk.send_rtp(offer.addr, 0, 0xff, 75)
    );
    let ear = PromptEar::new("en", &["hold_music"], Codec::Pcmu);
    assert_eq!(ear.playbacks(&heard), vec!["hold_music".to_string()]);

    // Off hold by a re-INVITE without SDP: our offer in the 200, the answer (sendrecv) in the
    // ACK. The caller's audio reaches the operator's phone again.
    let reinvite = from_agent(&srv, &agent.sip, &ainv, "INVITE", 4, None);
    agent
        .sip
        .send_to(reinvite.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    let r = final_response(&agent.sip, 4).await;
    assert_eq!(r.code, 200);
    assert!(!r.body.is_empty(), "our offer in the 200");
    let resume = agent.answer_sdp(0);
    let ack = from_agent(&srv, &agent.sip, &ainv, "ACK", 4, Some(&resume));
    agent
        .sip
        .send_to(ack.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    agent.drain_rtp();
    // The caller talks on (up to 5 s) until twenty packets reach the phone.
    let to_phone = tokio::select! {
        heard = agent.hear_until(0, 20, Duration::from_secs(5)) => heard,
        () = trunk.send_rtp(offer.addr, 0, 0xff, 250) => Vec::new(),
    };
    assert!(
        to_phone.len() >= 20,
        "the caller is heard again: {}",
        to_phone.len()
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn without_a_trunk_a_callback_request_is_a_flagged_ticket_at_once() {
    let mut file = config("127.0.0.1:9".parse().unwrap(), 3);
    file.callback.trunk_uri = None;
    let srv = start_server(file).await;
    let _agent = Peer::agent(srv.sip_addr, "1001").await;
    assert_eq!(admin(&srv, "/admin/agents/1001/pause").await.0 / 100, 2);
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call_with("0 101", &asserted()).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    ua.until_state(srv.http_addr, "waiting for operator").await;
    ua.press('2').await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    let ear = PromptEar::new(
        "en",
        &["callback_kept", "callback_confirmed", "hold_music"],
        Codec::Pcmu,
    );
    assert_eq!(
        ear.playbacks(&heard).first().map(String::as_str),
        Some("callback_confirmed")
    );
    ua.expect_request("BYE", Duration::from_secs(15)).await;
    let all = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(all[0].callback_requested);
    assert_eq!(all[0].phone.as_deref(), Some(CALLER));
    let q = general_queue(&srv).await;
    assert_eq!(
        (q["waiting"].as_u64(), q["callbacks_pending"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
    srv.shutdown().await;
}
