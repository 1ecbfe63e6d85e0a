//! Integration: what the server gives away to floods, scanners and callers from the wrong
//! network, against the real server on loopback.
//!
//! - An OPTIONS flood from one source is cut to its token bucket (`limits.options_per_second`,
//!   `limits.options_burst`); another source is still answered and calls still work meanwhile.
//! - A REGISTER flood with no credentials at all (nothing but 401 challenges) is bounded the
//!   same way.
//! - `trunks.allow` takes INVITEs only from the listed networks; others get no answer at all.
//! - A friendly-scanner probe gets nothing, and a REGISTER for an unknown user and one for a
//!   real agent with a wrong password get the same answer.
//!
//! 127.0.0.2 is a second source: on Linux all of 127.0.0.0/8 is loopback.
mod common;

use common::*;
use ivr311::config::{AgentConfig, FileConfig};
use ivr311::media::g711::Codec;
use ivr311::sip::message::Response;
use md5::{Digest, Md5};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

fn options(server: SocketAddr, me: SocketAddr, n: usize, user_agent: &str) -> Vec<u8> {
    format!(
        "OPTIONS sip:311@{server} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bKopt{n}x{r};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:mon@{me}>;tag=o{n}\r\n\
To: <sip:311@{server}>\r\n\
Call-ID: opt-{n}-{r}@test\r\n\
CSeq: {c} OPTIONS\r\n\
User-Agent: {user_agent}\r\n\
Content-Length: 0\r\n\r\n",
        r = rand::random::<u32>(),
        c = n + 1
    )
    .into_bytes()
}

fn register(
    server: SocketAddr,
    me: SocketAddr,
    user: &str,
    n: u32,
    call_id: &str,
    extra: &str,
) -> Vec<u8> {
    format!(
        "REGISTER sip:{server} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bKreg{n}x{r};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{user}@{server}>;tag=r{n}\r\n\
To: <sip:{user}@{server}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {n} REGISTER\r\n\
Contact: <sip:{user}@{me}>\r\n\
{extra}Content-Length: 0\r\n\r\n",
        r = rand::random::<u32>()
    )
    .into_bytes()
}

async fn one_response(sock: &UdpSocket, window: Duration) -> Option<Response> {
    responses(sock, window).await.into_iter().next()
}

/// A counter from `/metrics` (loopback needs no admin token), 0 when absent.
async fn metric(http: SocketAddr, line_prefix: &str) -> u64 {
    let (status, body) = common::http(http, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

const RATE_LIMITED: &str = "ivr311_sip_requests_dropped_total{reason=\"rate_limited\"}";
const NOT_ALLOWED: &str = "ivr311_sip_requests_dropped_total{reason=\"source_not_allowed\"}";
const SCANNER: &str = "ivr311_sip_requests_dropped_total{reason=\"scanner\"}";

/// Send `count` requests from `sock` as fast as it goes; return how many got a final answer and
/// the most the limiter may let through in the time the burst took (burst + rate × elapsed).
async fn flood(
    sock: &UdpSocket,
    server: SocketAddr,
    count: usize,
    build: impl Fn(usize) -> Vec<u8>,
    rate: f64,
    burst: f64,
) -> (Vec<usize>, usize) {
    let started = Instant::now();
    for n in 0..count {
        sock.send_to(&build(n), server).await.unwrap();
        if n % 20 == 19 {
            // Stay under the socket buffers: the limiter is what is tested, not the kernel.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let answered: Vec<usize> = responses(sock, Duration::from_millis(700))
        .await
        .iter()
        .filter(|r| r.code >= 200)
        .map(|r| r.cseq as usize - 1)
        .collect();
    let ceiling = (burst + rate * (elapsed + 0.05)).ceil() as usize;
    (answered, ceiling)
}

fn agent(id: &str, password: &str) -> AgentConfig {
    AgentConfig {
        id: id.into(),
        password: password.into(),
        skills: vec![],
        tier: 1,
        name: None,
        role: Default::default(),
    }
}

#[tokio::test]
async fn an_options_flood_is_cut_to_its_bucket_while_others_and_calls_go_on() {
    // The shipped defaults: 10 per second after a burst of 40.
    let file = FileConfig::default();
    let (rate, burst) = (
        file.limits.options_per_second as f64,
        file.limits.options_burst as f64,
    );
    let srv = start_server(file).await;
    let sip = srv.sip_addr;

    // A call in progress before the flood keeps going through it.
    let mut ua = TestUa::udp(sip).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    let ear = PromptEar::new("en", &["language_menu", "screening"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&ua.listen(Duration::from_millis(800)).await),
        ["language_menu"]
    );

    let scanner = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = scanner.local_addr().unwrap();
    let sent = 400;
    let (answered, ceiling) = flood(
        &scanner,
        sip,
        sent,
        |n| options(sip, me, n, "flood-test"),
        rate,
        burst,
    )
    .await;
    eprintln!(
        "OPTIONS flood: {sent} sent, {} answered (limit allowed at most {ceiling})",
        answered.len()
    );
    // The first ones are answered: the whole burst.
    for n in 0..burst as usize {
        assert!(answered.contains(&n), "OPTIONS {n} of the burst unanswered");
    }
    // The excess is not.
    assert!(answered.len() <= ceiling, "{} > {ceiling}", answered.len());
    assert!(answered.len() < sent);
    let dropped = metric(srv.http_addr, RATE_LIMITED).await;
    assert_eq!(dropped as usize, sent - answered.len());

    // Another source is answered at once.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();
    other
        .send_to(&options(sip, other_addr, 1, "monitor"), sip)
        .await
        .unwrap();
    assert_eq!(
        one_response(&other, Duration::from_secs(2))
            .await
            .map(|r| r.code),
        Some(200)
    );
    // The call in progress still hears its menu and takes keys; a new call is answered too.
    ua.press('1').await;
    assert_eq!(
        ear.playbacks(&ua.listen(Duration::from_millis(1200)).await),
        ["screening"]
    );
    let mut ua2 = TestUa::udp(sip).await;
    assert_eq!(ua2.call("0 101").await.code, 200);
    assert_eq!(
        ear.playbacks(&ua2.listen(Duration::from_millis(800)).await),
        ["language_menu"]
    );
    assert_eq!(ua.bye().await.code, 200);
    assert_eq!(ua2.bye().await.code, 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_register_flood_without_credentials_is_bounded_per_source() {
    let file = FileConfig {
        agents: vec![agent("1001", "right")],
        ..FileConfig::default()
    };
    let (rate, burst) = (
        file.limits.options_per_second as f64,
        file.limits.options_burst as f64,
    );
    let srv = start_server(file).await;
    let sip = srv.sip_addr;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let sent = 300;
    let (answered, ceiling) = flood(
        &sock,
        sip,
        sent,
        |n| register(sip, me, "100", n as u32 + 1, &format!("flood-{n}@test"), ""),
        rate,
        burst,
    )
    .await;
    eprintln!(
        "REGISTER flood (no credentials): {sent} sent, {} challenged (at most {ceiling})",
        answered.len()
    );
    assert!(answered.len() >= burst as usize);
    assert!(answered.len() <= ceiling, "{} > {ceiling}", answered.len());
    assert_eq!(
        metric(srv.http_addr, RATE_LIMITED).await as usize,
        sent - answered.len()
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn trunk_allow_list_takes_calls_only_from_listed_networks() {
    // Only 127.0.0.2 may call: a call from 127.0.0.1 gets no answer at all.
    let mut file = FileConfig::default();
    file.trunks.allow = vec!["127.0.0.2/32".parse().unwrap()];
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    let sdp = ua.offer("0 101");
    let invite = ua.invite_bytes(&sdp);
    ua.send_raw(&invite).await;
    assert!(
        ua.recv(Duration::from_secs(2)).await.is_none(),
        "an INVITE from outside the allow-list is answered"
    );
    assert_eq!(metric(srv.http_addr, NOT_ALLOWED).await, 1);
    assert_eq!(health(srv.http_addr).await["live_calls"], 0);
    // Only INVITEs are screened by source: monitoring from here is still answered.
    let mon = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = mon.local_addr().unwrap();
    mon.send_to(&options(srv.sip_addr, me, 1, "monitor"), srv.sip_addr)
        .await
        .unwrap();
    assert_eq!(
        one_response(&mon, Duration::from_secs(2))
            .await
            .map(|r| r.code),
        Some(200)
    );
    srv.shutdown().await;

    // With 127.0.0.0/8 listed the same call goes through.
    let mut file = FileConfig::default();
    file.trunks.allow = vec!["127.0.0.0/8".parse().unwrap()];
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    let ear = PromptEar::new("en", &["language_menu"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&ua.listen(Duration::from_millis(800)).await),
        ["language_menu"]
    );
    assert_eq!(ua.bye().await.code, 200);
    assert_eq!(metric(srv.http_addr, NOT_ALLOWED).await, 0);
    srv.shutdown().await;
}

/// The parts of a response that may tell a scanner something: status, reason and every header
/// with its value, apart from what differs per request (Via, From, To, Call-ID, CSeq) and the
/// nonce, which is fresh each time.
fn shape(r: &Response) -> (u16, String, Vec<(String, String)>) {
    let per_request = ["via", "from", "to", "call-id", "cseq"];
    let headers = r
        .headers
        .iter()
        .filter(|h| !per_request.contains(&h.name.to_ascii_lowercase().as_str()))
        .map(|h| {
            let v = if h.name.eq_ignore_ascii_case("WWW-Authenticate") {
                blank_param(&h.value, "nonce")
            } else {
                h.value.clone()
            };
            (h.name.clone(), v)
        })
        .collect();
    (r.code, r.reason.clone(), headers)
}

fn blank_param(v: &str, name: &str) -> String {
    v.split(',')
        .map(|p| {
            let t = p.trim();
            if t.to_ascii_lowercase().contains(&format!("{name}=")) {
                let (head, _) = t.split_once(&format!("{name}=")).unwrap();
                format!("{head}{name}=\"-\"")
            } else {
                t.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn param<'a>(challenge: &'a str, name: &str) -> Option<&'a str> {
    challenge.split([',', ' ']).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim_matches('"'))
    })
}

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An MD5 `Authorization` answering the MD5 challenge in `resp` as `user` with `password`.
fn md5_authorization(
    resp: &Response,
    user: &str,
    password: &str,
    server: SocketAddr,
) -> Option<String> {
    let ch = resp
        .headers_named("WWW-Authenticate")
        .find(|v| v.contains("MD5"))?;
    let realm = param(ch, "realm")?;
    let nonce = param(ch, "nonce")?;
    let opaque = param(ch, "opaque");
    let uri = format!("sip:{server}");
    let ha1 = md5_hex(&format!("{user}:{realm}:{password}"));
    let ha2 = md5_hex(&format!("REGISTER:{uri}"));
    let cnonce = "0a4f113b";
    let nc = "00000001";
    let response = md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
    let mut h = format!(
        "Authorization: Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", \
uri=\"{uri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc={nc}, cnonce=\"{cnonce}\""
    );
    if let Some(o) = opaque {
        h.push_str(&format!(", opaque=\"{o}\""));
    }
    h.push_str("\r\n");
    Some(h)
}

/// REGISTER as `user` without credentials, then answer the challenge with `password`; returns
/// both answers.
async fn try_login(server: SocketAddr, user: &str, password: &str) -> (Response, Response) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let call_id = format!("scan-{}@test", rand::random::<u32>());
    sock.send_to(&register(server, me, user, 1, &call_id, ""), server)
        .await
        .unwrap();
    let first = one_response(&sock, Duration::from_secs(2))
        .await
        .expect("a challenge");
    let auth = md5_authorization(&first, user, password, server).expect("an MD5 challenge");
    sock.send_to(&register(server, me, user, 2, &call_id, &auth), server)
        .await
        .unwrap();
    let second = one_response(&sock, Duration::from_secs(2))
        .await
        .expect("an answer to the credentials");
    (first, second)
}

#[tokio::test]
async fn scanners_learn_nothing_and_unknown_users_look_like_wrong_passwords() {
    let file = FileConfig {
        agents: vec![agent("1001", "right-password")],
        ..FileConfig::default()
    };
    let srv = start_server(file).await;
    let sip = srv.sip_addr;

    // friendly-scanner's OPTIONS probe, and its REGISTER: no answer at all.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    sock.send_to(&options(sip, me, 1, "friendly-scanner"), sip)
        .await
        .unwrap();
    sock.send_to(
        &register(
            sip,
            me,
            "100",
            2,
            "fs@test",
            "User-Agent: friendly-scanner\r\n",
        ),
        sip,
    )
    .await
    .unwrap();
    assert!(responses(&sock, Duration::from_secs(1)).await.is_empty());
    assert_eq!(metric(srv.http_addr, SCANNER).await, 2);

    // A scanner that hides its name: REGISTER for user 100 (no such agent) and for agent 1001
    // with a wrong password get the same answers, first the challenge, then the refusal.
    let (unknown_challenge, unknown_refusal) = try_login(sip, "100", "guess").await;
    let (agent_challenge, agent_refusal) = try_login(sip, "1001", "guess").await;
    assert_eq!(unknown_challenge.code, 401);
    assert_eq!(unknown_refusal.code, 401);
    assert_eq!(shape(&unknown_challenge), shape(&agent_challenge));
    assert_eq!(shape(&unknown_refusal), shape(&agent_refusal));
    // Nothing in the refusal names the user or the reason.
    let text = format!("{:?}", unknown_refusal.headers);
    assert!(!text.to_ascii_lowercase().contains("password"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("unknown"), "{text}");
    // And the right password does work, so the comparison above was of real refusals.
    let (_, ok) = try_login(sip, "1001", "right-password").await;
    assert_eq!(ok.code, 200);
    srv.shutdown().await;
}
