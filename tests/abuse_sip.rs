//! Integration: attacks on the SIP edge, driven from outside against the real server on
//! loopback, each while a real caller, a trusted trunk and an operator's phone keep working.
//!
//! - An INVITE flood from one source takes at most its share of the call slots
//!   (`limits.max_calls_per_source`, `limits.invites_per_second`): the rest get 503 with
//!   Retry-After, are counted, and another caller, a trunk and an operator still get through.
//! - TCP: one source cannot hold every inbound connection, CRLF keep-alives do not keep an idle
//!   connection open (while an operator's phone registered over TCP keeps its connection), and
//!   peers holding every inbound slot do not stop a 911 bridge over TCP.
//! - Registrar: guesses at an agent's password lock out new addresses, not the agent's phone at
//!   its usual address; spoofed guesses (which cannot see our challenges) count for nothing;
//!   `/admin/agents` shows the lock; a password stored as `password_ha1` logs in.
//! - A call that does not read its events is ended cleanly (BYE) and counted, and a BYE behind
//!   a burst of events is never dropped.
//!
//! 127.0.0.2 and up are other sources: on Linux all of 127.0.0.0/8 is loopback.
mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use ivr311::sip::message::{parse_datagram, Message, Response};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// An INVITE with an SDP offer, from `me`, Call-ID unique per `n`.
fn invite(server: SocketAddr, me: SocketAddr, n: usize, from_user: &str) -> Vec<u8> {
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        ip = me.ip(),
        port = 40000 + (n % 1000) * 2
    );
    format!(
        "INVITE sip:311@{server} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bKflood{n}x{r};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{from_user}@{me}>;tag=f{n}\r\n\
To: <sip:311@{server}>\r\n\
Call-ID: flood-{n}-{r}@test\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:{from_user}@{me}>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {len}\r\n\r\n{sdp}",
        r = rand::random::<u32>(),
        len = sdp.len()
    )
    .into_bytes()
}

/// The final responses that arrive on `sock` until none has for `quiet`, by Call-ID (the last
/// one each: a 200 is retransmitted until ACKed).
async fn finals(sock: &UdpSocket, quiet: Duration) -> std::collections::HashMap<String, Response> {
    let mut out = std::collections::HashMap::new();
    let mut buf = vec![0u8; 65535];
    while let Ok(Ok((n, _))) = tokio::time::timeout(quiet, sock.recv_from(&mut buf)).await {
        if let Ok(Message::Response(r)) = parse_datagram(&buf[..n], 65535) {
            if r.code >= 200 {
                out.insert(r.call_id.clone(), r);
            }
        }
    }
    out
}

/// A counter of `/metrics`, 0 when absent.
async fn counter(http: SocketAddr, series: &str) -> f64 {
    metrics(http).await.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_flood_takes_only_its_sources_share_and_callers_agents_and_trunks_go_on() {
    // 25 call slots in all; the flood's source may hold 20 (the default) of them.
    let mut file = agents_config(&["1001"], 20, 30);
    file.limits.max_calls = 25;
    let per_source = file.limits.max_calls_per_source;
    assert_eq!(per_source, 20, "the shipped default");
    let srv = start_server(file).await;
    let sip = srv.sip_addr;

    // The operator's phone logs in before the attack.
    let agent = TestAgent::login(sip, "1001").await;

    // 1,000 INVITEs from one socket on 127.0.0.2, never acknowledged.
    let attacker = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let me = attacker.local_addr().unwrap();
    let sent = 1000;
    for n in 0..sent {
        attacker
            .send_to(&invite(sip, me, n, "attacker"), sip)
            .await
            .unwrap();
        if n % 20 == 19 {
            // Stay under the socket buffers: the limiter is what is tested, not the kernel.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let got = finals(&attacker, Duration::from_millis(800)).await;
    let answered = got.values().filter(|r| r.code == 200).count();
    let refused: Vec<&Response> = got.values().filter(|r| r.code == 503).collect();
    eprintln!(
        "INVITE flood: {sent} sent, {answered} answered, {} refused with 503",
        refused.len()
    );
    assert!(answered <= per_source, "{answered} calls from one source");
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|r| r
        .header("Retry-After")
        .is_some_and(|v| v.parse::<u32>().is_ok())));
    let limited = counter(
        srv.http_addr,
        "ivr311_sip_invites_limited_total{limit=\"calls_per_source\"}",
    )
    .await
        + counter(
            srv.http_addr,
            "ivr311_sip_invites_limited_total{limit=\"invite_rate\"}",
        )
        .await;
    // Every refusal is counted, answered or not (a datagram the kernel dropped is neither).
    assert!(limited as usize >= refused.len());
    assert!(limited as usize + answered <= sent);
    assert!(limited as usize >= sent * 9 / 10, "{limited} counted");

    // A real caller from another address is answered and hears the menu, and reaches the
    // operator, whose phone still works.
    let mut ua = TestUa::udp(sip).await;
    assert_eq!(
        ua.call("0 101").await.code,
        200,
        "a real caller during the flood"
    );
    let ear = PromptEar::new("en", &["language_menu"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&ua.listen(Duration::from_millis(800)).await),
        ["language_menu"]
    );
    ua.keys("110").await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
    agent.request("ACK", Duration::from_secs(3)).await;
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;

    // A trusted trunk (listed in trunks.allow) is exempt: more calls at once than a source's
    // share, as fast as it sends them, are all answered.
    let mut file = FileConfig::default();
    file.trunks.allow = vec!["127.0.0.3/32".parse().unwrap()];
    file.limits.max_calls_per_source = 2;
    file.limits.invites_burst = 2;
    let srv = start_server(file).await;
    let trunk = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let me = trunk.local_addr().unwrap();
    for n in 0..8 {
        trunk
            .send_to(&invite(srv.sip_addr, me, n, "+15550001111"), srv.sip_addr)
            .await
            .unwrap();
    }
    let got = finals(&trunk, Duration::from_millis(800)).await;
    assert_eq!(got.len(), 8, "{got:?}");
    assert!(got.values().all(|r| r.code == 200), "{got:?}");
    srv.shutdown().await;
}

/// Wait until `cond` holds (polled every 50 ms) or `within` passes; whether it held.
async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP connection to `server` from `ip`.
async fn tcp_from(ip: &str, server: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(server).await.unwrap()
}

/// Whether the server closed `conn` (end of stream or reset) within `within`.
async fn closed_within(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_the_tcp_table_and_keep_alives_do_not_keep_a_connection() {
    let mut file = FileConfig::default();
    file.limits.max_tcp_connections_per_source = 4;
    file.limits.tcp_idle_seconds = 2;
    let srv = start_server(file).await;
    let sip = srv.sip_addr;

    // 50 connections from 127.0.0.2: its 4 are kept, the rest closed at once.
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(tcp_from("127.0.0.2", sip).await);
    }
    let mut open = Vec::new();
    for mut c in conns {
        if !closed_within(&mut c, Duration::from_millis(150)).await {
            open.push(c);
        }
    }
    assert_eq!(open.len(), 4, "connections kept from one source");
    assert_eq!(
        counter(
            srv.http_addr,
            "ivr311_sip_tcp_refused_total{limit=\"per_source\"}"
        )
        .await,
        46.0
    );

    // A caller over TCP from another address is served meanwhile.
    let mut ua = TestUa::tcp(sip).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    let ear = PromptEar::new("en", &["language_menu"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&ua.listen(Duration::from_millis(800)).await),
        ["language_menu"]
    );

    // CRLF keep-alives every 200 ms are not activity: the connection is closed once idle
    // (2 s), however often they come.
    use tokio::io::AsyncWriteExt;
    let mut pinger = open.pop().unwrap();
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(6) {
        if pinger.write_all(b"\r\n\r\n").await.is_err()
            || closed_within(&mut pinger, Duration::from_millis(200)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a connection sending only keep-alives stays open");
    // The call over TCP, quiet on SIP meanwhile, keeps its connection.
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;

    // A trusted trunk may open more than a source's share.
    let mut file = FileConfig::default();
    file.limits.max_tcp_connections_per_source = 2;
    file.trunks.allow = vec!["127.0.0.3/32".parse().unwrap()];
    let srv = start_server(file).await;
    let mut trunk = Vec::new();
    for _ in 0..6 {
        trunk.push(tcp_from("127.0.0.3", srv.sip_addr).await);
    }
    for c in &mut trunk {
        assert!(!closed_within(c, Duration::from_millis(100)).await);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_holding_every_inbound_tcp_slot_do_not_stop_911_over_tcp() {
    use tokio::io::AsyncReadExt;
    let psap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!(
        "sip:911@127.0.0.1:{};transport=tcp",
        psap.local_addr().unwrap().port()
    );
    let mut file = bridge_911_to(&uri);
    file.limits.max_tcp_connections = 8;
    file.limits.max_tcp_connections_per_source = 2;
    let srv = start_server(file).await;
    let sip = srv.sip_addr;

    // Four sources hold two connections each: every inbound slot is taken.
    let mut held = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..2 {
            held.push(tcp_from(ip, sip).await);
        }
    }
    for c in &mut held {
        assert!(!closed_within(c, Duration::from_millis(50)).await);
    }
    let mut one_more = tcp_from("127.0.0.6", sip).await;
    assert!(
        closed_within(&mut one_more, Duration::from_secs(1)).await,
        "the table is full"
    );
    let http = srv.http_addr;
    assert!(
        eventually(Duration::from_secs(2), || async {
            counter(http, "ivr311_sip_tcp_refused_total{limit=\"total\"}").await >= 1.0
        })
        .await
    );

    // A caller presses 9 for 911: the bridge opens its own TCP connection to the PSAP.
    let _ua = caller_pressing(sip, "19").await;
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), psap.accept())
        .await
        .expect("the 911 route over TCP is reached")
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the INVITE arrives")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"INVITE sip:911@"),
        "{:?}",
        &buf[..n.min(80)]
    );
    srv.shutdown().await;
}

/// A bare UA core on loopback (as `tests/uac.rs` runs one) whose calls the test plays itself,
/// so that a call can be made to stop reading its events.
struct BareUa {
    sip: SocketAddr,
    app: tokio::sync::mpsc::Receiver<ivr311::sip::ua::AppEvent>,
    stats: std::sync::Arc<ivr311::sip::ua::UaStats>,
    cancel: tokio_util::sync::CancellationToken,
}

impl Drop for BareUa {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn bare_ua() -> BareUa {
    use ivr311::sip::transport::{self, TransportLimits};
    use ivr311::sip::ua::UaCore;
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(1024);
    let t = transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        TransportLimits::default(),
        in_tx,
        &tracker,
        cancel.clone(),
    )
    .await
    .unwrap();
    let sip = t.local_addr();
    let (app_tx, app) = tokio::sync::mpsc::channel(16);
    let ua = UaCore::new(t, sip, "ivr311-test".into(), app_tx).with_tasks(tracker.clone());
    let stats = ua.stats();
    tracker.spawn(ua.run(in_rx, cancel.clone()));
    BareUa {
        sip,
        app,
        stats,
        cancel,
    }
}

/// A caller calls the bare UA, which answers 200 with SDP; the call (whose events the test
/// reads, or not) and the caller.
async fn answered_call(ua: &mut BareUa) -> (ivr311::sip::ua::IncomingCall, TestUa) {
    use ivr311::sip::ua::AppEvent;
    let mut caller = TestUa::udp(ua.sip).await;
    let answer = async {
        let Some(AppEvent::Invite(call)) = ua.app.recv().await else {
            panic!("no call")
        };
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";
        call.handle
            .respond(
                200,
                "OK",
                vec![],
                Some(("application/sdp".into(), bytes::Bytes::from(sdp))),
            )
            .await;
        call
    };
    let (r, call) = tokio::join!(caller.call("0 101"), answer);
    assert_eq!(r.code, 200);
    (call, caller)
}

fn info(caller: &mut TestUa) -> Vec<u8> {
    caller.in_dialog(
        "INFO",
        "Content-Type: application/dtmf-relay\r\n",
        "Signal=1\r\nDuration=160\r\n",
    )
}

/// Every event a call's channel holds until it closes (or nothing comes for 3 s).
async fn all_events(
    call: &mut ivr311::sip::ua::IncomingCall,
) -> (Vec<ivr311::sip::ua::DialogEvent>, bool) {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), call.events.recv()).await {
            Ok(Some(ev)) => out.push(ev),
            Ok(None) => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bye_behind_a_burst_of_events_reaches_a_call_that_was_not_reading() {
    use ivr311::sip::ua::DialogEvent;
    let mut ua = bare_ua().await;
    let (mut call, mut caller) = answered_call(&mut ua).await;
    // 80 INFO key presses while the call does not read (its channel holds 64), then BYE.
    for _ in 0..80 {
        let i = info(&mut caller);
        caller.send_raw(&i).await;
    }
    for _ in 0..80 {
        caller
            .expect_response("INFO", 200, Duration::from_secs(5))
            .await;
    }
    assert_eq!(caller.bye().await.code, 200);
    let (events, closed) = all_events(&mut call).await;
    let infos = events
        .iter()
        .filter(|e| matches!(e, DialogEvent::Info { .. }))
        .count();
    assert!(
        matches!(events.first(), Some(DialogEvent::Confirmed { .. })),
        "{:?}",
        events.first()
    );
    assert_eq!(infos, 80, "every key press arrives");
    assert!(
        matches!(events.last(), Some(DialogEvent::Bye)),
        "the BYE arrives, last: {:?}",
        events.last()
    );
    assert!(closed, "and then the channel closes");
    assert_eq!(
        ua.stats
            .ended_backlogged
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_keep_up_is_ended_cleanly_and_counted() {
    use ivr311::sip::ua::{DialogEvent, MAX_EVENT_BACKLOG};
    let mut ua = bare_ua().await;
    let (mut call, mut caller) = answered_call(&mut ua).await;
    // Far more events than the channel and the backlog hold, and the call never reads.
    for _ in 0..300 {
        let i = info(&mut caller);
        caller.send_raw(&i).await;
    }
    // The caller is told the call is over, with a BYE.
    let bye = caller.expect_request("BYE", Duration::from_secs(5)).await;
    caller.answer_request(&bye).await;
    assert_eq!(
        ua.stats
            .ended_backlogged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The call gets what was queued, in order, and then its channel closes: it ends too.
    let (events, closed) = all_events(&mut call).await;
    assert!(closed, "the call's channel closes");
    assert!(matches!(
        events.first(),
        Some(DialogEvent::Confirmed { .. })
    ));
    assert_eq!(events.len(), 64 + MAX_EVENT_BACKLOG + 1);
}

fn sha256_hex(data: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One parameter of a `WWW-Authenticate` value.
fn challenge_param(challenge: &str, name: &str) -> Option<String> {
    let rest = challenge.strip_prefix("Digest ")?;
    rest.split(", ").find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// A phone's registration socket on `ip`: REGISTERs as `user`, answering challenges with
/// whatever password it is told.
struct Registering {
    sock: UdpSocket,
    server: SocketAddr,
    user: String,
    cseq: u32,
}

impl Registering {
    async fn new(ip: &str, server: SocketAddr, user: &str) -> Registering {
        Registering {
            sock: UdpSocket::bind(format!("{ip}:0")).await.unwrap(),
            server,
            user: user.into(),
            cseq: 0,
        }
    }

    async fn send(&mut self, auth: Option<String>) -> Response {
        self.cseq += 1;
        let (me, server, user, cseq) = (
            self.sock.local_addr().unwrap(),
            self.server,
            &self.user,
            self.cseq,
        );
        let msg = format!(
            "REGISTER sip:{server} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKr{cseq}x{r};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:{user}@{server}>;tag=r{cseq}\r\nTo: <sip:{user}@{server}>\r\n\
Call-ID: reg-{user}-{me}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@{me}>\r\n{}Content-Length: 0\r\n\r\n",
            auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default(),
            r = rand::random::<u32>(),
        );
        self.sock.send_to(msg.as_bytes(), server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(3), self.sock.recv_from(&mut buf))
                    .await
                    .expect("an answer to REGISTER")
                    .unwrap();
            if let Ok(Message::Response(r)) = parse_datagram(&buf[..n], 65535) {
                if r.cseq == cseq && r.code >= 200 {
                    return r;
                }
            }
        }
    }

    /// The SHA-256 credentials answering `challenge` (a 401) with `password`.
    fn answer(&self, challenge: &Response, password: &str) -> String {
        digest_answer(challenge, &self.user, password, self.server)
    }

    /// REGISTER, then answer the challenge with `password`: the second answer.
    async fn login(&mut self, password: &str) -> Response {
        let challenge = self.send(None).await;
        assert_eq!(challenge.code, 401, "{challenge:?}");
        let auth = self.answer(&challenge, password);
        self.send(Some(auth)).await
    }
}

/// SHA-256 digest credentials of `user` with `password` answering the 401 `challenge` for a
/// REGISTER to `server`.
fn digest_answer(challenge: &Response, user: &str, password: &str, server: SocketAddr) -> String {
    {
        let c = challenge
            .headers_named("WWW-Authenticate")
            .find(|c| c.contains("SHA-256"))
            .expect("a SHA-256 challenge");
        let (realm, nonce, opaque) = (
            challenge_param(c, "realm").unwrap(),
            challenge_param(c, "nonce").unwrap(),
            challenge_param(c, "opaque").unwrap(),
        );
        let uri = format!("sip:{server}");
        let ha1 = sha256_hex(&format!("{user}:{realm}:{password}"));
        let ha2 = sha256_hex(&format!("REGISTER:{uri}"));
        let cnonce = format!("{:08x}", rand::random::<u32>());
        let resp = sha256_hex(&format!("{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}"));
        format!(
            "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
response=\"{resp}\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"{cnonce}\", opaque=\"{opaque}\""
        )
    }
}

/// `login_lock` of agent `id` in `GET /admin/agents`.
async fn login_lock(http: SocketAddr, id: &str) -> serde_json::Value {
    let (status, body) = common::http(http, "GET", "/admin/agents", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no agent {id}: {body}"))["login_lock"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guesses_lock_out_new_addresses_not_the_agents_phone() {
    let srv = start_server(agents_config(&["1001"], 20, 30)).await;
    let (sip, http) = (srv.sip_addr, srv.http_addr);
    // The operator's phone logs in from its usual address, 127.0.0.1.
    let _phone = TestAgent::login(sip, "1001").await;

    // Spoofed guesses: sent as from the phone's address, but whoever sends them never sees
    // our answers there, so they can only use a nonce got elsewhere (127.0.0.2), or none of
    // ours. They count for nothing.
    let mut elsewhere = Registering::new("127.0.0.2", sip, "1001").await;
    let theirs = elsewhere.send(None).await;
    let mut spoofed = Registering::new("127.0.0.1", sip, "1001").await;
    for i in 0..10 {
        let auth = spoofed.answer(&theirs, &format!("guess{i}"));
        assert_eq!(spoofed.send(Some(auth)).await.code, 401);
    }
    assert!(login_lock(http, "1001").await.is_null());

    // Real guesses from 127.0.0.2: after five, that source and the account's new addresses
    // are refused.
    let mut thief = Registering::new("127.0.0.2", sip, "1001").await;
    for i in 0..5 {
        assert_eq!(
            thief.login(&format!("guess{i}")).await.code,
            401,
            "guess {i}"
        );
    }
    assert_eq!(thief.login("guess5").await.code, 403);
    let mut new_place = Registering::new("127.0.0.3", sip, "1001").await;
    assert_eq!(
        new_place.login("pw1001").await.code,
        403,
        "the right password from a new address is refused while locked"
    );
    let lock = login_lock(http, "1001").await;
    assert!(
        lock["new_sources_seconds"]
            .as_u64()
            .is_some_and(|s| s > 0 && s <= 60),
        "{lock}"
    );
    assert!(lock["usual_sources_seconds"].is_null(), "{lock}");

    // The agent's phone at its usual address logs in again (rebooted: a new socket and
    // Call-ID) and takes a call.
    let agent = TestAgent::login(sip, "1001").await;
    let mut ua = TestUa::udp(sip).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    let inv = agent.request("INVITE", Duration::from_secs(5)).await;
    agent.reply(&inv, 200, "OK", Some(agent.answer_sdp())).await;
    agent.request("ACK", Duration::from_secs(3)).await;
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_stored_as_agent_hash_prints_it_logs_in() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ivr311"))
        .args(["agent-hash", "1001"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ivr311 runs");
    child.stdin.take().unwrap().write_all(b"pw1001\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains("pw1001"), "{printed}");
    let yaml = format!("agents:\n{printed}queues:\n  - name: general\n");
    let file = FileConfig::parse(std::path::Path::new("hash.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let srv = start_server(file).await;
    // The phone answers with SHA-256 (TestAgent), and with MD5 (another phone).
    let _agent = TestAgent::login(srv.sip_addr, "1001").await;
    let mut wrong = Registering::new("127.0.0.1", srv.sip_addr, "1001").await;
    assert_eq!(wrong.login("pw1002").await.code, 401);
    srv.shutdown().await;
}

/// The next SIP message on a TCP connection (`buf` keeps what came after it).
async fn read_sip(
    conn: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    within: Duration,
) -> Message {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        while buf.starts_with(b"\r\n") {
            buf.drain(..2);
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let msg: Vec<u8> = buf.drain(..end + 4 + len).collect();
                return parse_datagram(&msg, 65535).expect("a SIP message");
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .expect("a SIP message in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_phone_registered_over_tcp_keeps_its_connection_past_the_idle_time() {
    use ivr311::sip::message::Request;
    use tokio::io::AsyncWriteExt;
    let mut file = agents_config(&["1001"], 20, 30);
    file.limits.tcp_idle_seconds = 1;
    let srv = start_server(file).await;
    let sip = srv.sip_addr;
    let mut conn = tokio::net::TcpStream::connect(sip).await.unwrap();
    let me = conn.local_addr().unwrap();
    let register = |cseq: u32, auth: Option<String>| {
        format!(
            "REGISTER sip:{sip} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bKtcpreg{cseq}\r\n\
Max-Forwards: 70\r\nFrom: <sip:1001@{sip}>;tag=t{cseq}\r\nTo: <sip:1001@{sip}>\r\n\
Call-ID: tcpreg@test\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:1001@{me};transport=tcp>\r\n\
Expires: 600\r\n{}Content-Length: 0\r\n\r\n",
            auth.map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default()
        )
    };
    let mut buf = Vec::new();
    conn.write_all(register(1, None).as_bytes()).await.unwrap();
    let Message::Response(challenge) = read_sip(&mut conn, &mut buf, Duration::from_secs(3)).await
    else {
        panic!("a response")
    };
    assert_eq!(challenge.code, 401);
    let auth = digest_answer(&challenge, "1001", "pw1001", sip);
    conn.write_all(register(2, Some(auth)).as_bytes())
        .await
        .unwrap();
    let Message::Response(ok) = read_sip(&mut conn, &mut buf, Duration::from_secs(3)).await else {
        panic!("a response")
    };
    assert_eq!(ok.code, 200);

    // Three idle times of nothing but keep-alives: the connection stays, as the phone's path.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        conn.write_all(b"\r\n\r\n").await.unwrap();
        // A keep-alive every 300 ms, as the phone sends them: not a wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A caller asks for an operator: the INVITE reaches the phone on that connection.
    let mut ua = TestUa::udp(sip).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    let inv: Request = loop {
        match read_sip(&mut conn, &mut buf, Duration::from_secs(8)).await {
            Message::Request(r) if r.method.as_str() == "INVITE" => break r,
            _ => continue,
        }
    };
    assert_eq!(inv.uri, format!("sip:1001@{me};transport=tcp"));
    assert_eq!(ua.bye().await.code, 200);
    srv.shutdown().await;
}
