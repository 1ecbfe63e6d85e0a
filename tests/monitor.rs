//! Listen, whisper and barge, driven from outside over SIP and RTP against the real server on
//! loopback: a caller (test UA) talks to operator 1001 (a registered test phone); supervisor
//! 1003 (`role: supervisor`) dials `*51`/`*52`/`*53` and 1001 from its own registered phone.
//! Each party sends its own tone (caller 440 Hz, operator 1000 Hz, supervisor 1800 Hz), and
//! what each hears is told by frequency (Goertzel), as a person would tell voices apart.

mod common;

use common::voices::{self, Voice};
use common::*;
use ivr311::config::{AgentRole, FileConfig};
use ivr311::sip::message::{Message, Request, Response};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

const CALLER_HZ: f64 = 440.0;
const OPERATOR_HZ: f64 = 1000.0;
const SUPERVISOR_HZ: f64 = 1800.0;
const TONES: [f64; 3] = [CALLER_HZ, OPERATOR_HZ, SUPERVISOR_HZ];

fn config() -> FileConfig {
    let mut f = agents_config(&["1001", "1002", "1003"], 20, 30);
    f.agents[2].role = AgentRole::Supervisor;
    f.limits.operator_silence_seconds = 0;
    f
}

/// Talk until what each party hears is `want` (caller, operator, supervisor: which tones), at
/// most 8 s.
async fn until_heard(voices: &mut [Voice<'_>], want: &[[bool; 3]], what: &str) {
    voices::until_heard(voices, TONES, want, Duration::from_secs(8), what).await;
}

/// The caller presses 1, 1, 0 and operator 1001 answers: the server's INVITE to the phone.
async fn bridged(srv: &ivr311::server::RunningServer) -> (TestUa, TestAgent, Request) {
    let op = TestAgent::login(srv.sip_addr, "1001").await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    assert_eq!(caller.call("0 101").await.code, 200);
    caller.until_audio().await;
    caller.keys("110").await;
    let inv = op.request("INVITE", Duration::from_secs(10)).await;
    op.reply(&inv, 200, "OK", Some(op.answer_sdp())).await;
    op.request("ACK", Duration::from_secs(3)).await;
    (caller, op, inv)
}

/// A supervisor's own call from its phone.
struct Dialled {
    call_id: String,
    tag: String,
    remote_tag: Option<String>,
    uri: String,
    rtp: UdpSocket,
    branch: String,
    cseq: std::cell::Cell<u32>,
    server_media: Option<SocketAddr>,
}

/// Dial `user` from `phone` (answering the server's digest challenge as a registered phone
/// does); the final answer (ACKed) and the call.
async fn dial(phone: &TestAgent, user: &str) -> (u16, Dialled) {
    let mut c = Dialled {
        call_id: format!("sup-{}@test", rand::random::<u32>()),
        tag: format!("s{}", rand::random::<u32>()),
        remote_tag: None,
        uri: format!("sip:{user}@{}", phone.server),
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        branch: String::new(),
        cseq: 1.into(),
        server_media: None,
    };
    invite(phone, &mut c, None).await;
    let challenge = final_of(phone, &c).await;
    assert_eq!(challenge.code, 401, "an agent's phone is challenged");
    ack(phone, &c, &challenge).await;
    let auth = digest_authorization(&sha256_challenge(&challenge), &phone.id, "INVITE", &c.uri);
    c.cseq.set(2);
    invite(phone, &mut c, Some(auth)).await;
    let r = final_of(phone, &c).await;
    ack(phone, &c, &r).await;
    if r.code == 200 {
        c.remote_tag = r.to.tag().map(str::to_owned);
        c.server_media = Some(ivr311::media::sdp::parse(&r.body).unwrap().addr);
    }
    (r.code, c)
}

async fn invite(phone: &TestAgent, c: &mut Dialled, auth: Option<String>) {
    let me = phone.sip.local_addr().unwrap();
    c.branch = format!("z9hG4bKs{}", rand::random::<u64>());
    let p = c.rtp.local_addr().unwrap().port();
    let sdp = format!("v=0\r\no=phone 2 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {p} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n");
    let msg = format!(
        "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{id}@{srv}>;tag={tag}\r\nTo: <{uri}>\r\nCall-ID: {cid}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:{id}@{me}>\r\n{auth}Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{sdp}",
        uri = c.uri,
        branch = c.branch,
        id = phone.id,
        srv = phone.server,
        tag = c.tag,
        cid = c.call_id,
        cseq = c.cseq.get(),
        auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default(),
        len = sdp.len(),
    );
    phone
        .sip
        .send_to(msg.as_bytes(), phone.server)
        .await
        .unwrap();
}

async fn final_of(phone: &TestAgent, c: &Dialled) -> Response {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match phone.recv(left).await {
            Some(Message::Response(r))
                if r.call_id == c.call_id && r.cseq == c.cseq.get() && r.code >= 200 =>
            {
                return r
            }
            Some(_) => continue,
            None => panic!("no final response to the phone's INVITE to {}", c.uri),
        }
    }
}

async fn ack(phone: &TestAgent, c: &Dialled, r: &Response) {
    let me = phone.sip.local_addr().unwrap();
    let branch = if r.code >= 300 {
        c.branch.clone()
    } else {
        format!("z9hG4bKa{}", rand::random::<u64>())
    };
    let msg = format!(
        "ACK {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{id}@{srv}>;tag={tag}\r\nTo: {to}\r\nCall-ID: {cid}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
        uri = c.uri,
        id = phone.id,
        srv = phone.server,
        tag = c.tag,
        to = r.to.raw,
        cid = c.call_id,
        cseq = c.cseq.get(),
    );
    phone
        .sip
        .send_to(msg.as_bytes(), phone.server)
        .await
        .unwrap();
}

/// Hang up the supervisor's call (BYE), answered 200.
async fn hang_up(phone: &TestAgent, c: &Dialled) {
    let me = phone.sip.local_addr().unwrap();
    c.cseq.set(c.cseq.get() + 1);
    let msg = format!(
        "BYE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKb{rand};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{id}@{srv}>;tag={tag}\r\nTo: <{uri}>;tag={rt}\r\nCall-ID: {cid}\r\nCSeq: {cseq} BYE\r\nContent-Length: 0\r\n\r\n",
        uri = c.uri,
        rand = rand::random::<u64>(),
        id = phone.id,
        srv = phone.server,
        tag = c.tag,
        rt = c.remote_tag.as_deref().unwrap_or(""),
        cid = c.call_id,
        cseq = c.cseq.get(),
    );
    phone
        .sip
        .send_to(msg.as_bytes(), phone.server)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match phone.recv(left).await {
            Some(Message::Response(r)) if r.call_id == c.call_id && r.cseq == c.cseq.get() => {
                assert_eq!(r.code, 200, "BYE answered");
                return;
            }
            Some(_) => continue,
            None => panic!("the supervisor's BYE was not answered"),
        }
    }
}

/// A key on the supervisor's phone (RFC 4733), sent on its call's media.
async fn press(v: &mut Voice<'_>, key: char) {
    v.key(key).await;
}

/// A BYE for the supervisor's call arrives on its phone (answered 200).
async fn until_bye(phone: &TestAgent, c: &Dialled) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match phone.recv(left).await {
            Some(Message::Request(r)) if r.call_id == c.call_id && r.method.as_str() == "BYE" => {
                phone.reply(&r, 200, "OK", None).await;
                return;
            }
            Some(_) => continue,
            None => panic!("the supervisor's phone got no BYE"),
        }
    }
}

fn server_media(inv: &Request) -> SocketAddr {
    ivr311::media::sdp::parse(&inv.body).unwrap().addr
}

const H: bool = true;
const O: bool = false;

/// The three parties' voices: caller, operator (answered `inv`), supervisor (call `c`).
fn three<'a>(
    caller: &'a TestUa,
    op: &'a TestAgent,
    inv: &Request,
    c: &'a Dialled,
) -> Vec<Voice<'a>> {
    vec![
        Voice::new(&caller.rtp, caller.remote_rtp.unwrap(), CALLER_HZ),
        Voice::new(&op.rtp, server_media(inv), OPERATOR_HZ),
        Voice::new(&c.rtp, c.server_media.unwrap(), SUPERVISOR_HZ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_listens_whispers_and_barges_and_each_party_hears_what_the_mode_says() {
    let srv = start_server(config()).await;
    let (mut caller, op, inv) = bridged(&srv).await;
    let sup = TestAgent::login(srv.sip_addr, "1003").await;
    let (code, c) = dial(&sup, "*511001").await;
    assert_eq!(code, 200, "a supervisor may listen to 1001's call");
    let mut voices = three(&caller, &op, &inv, &c);
    // Listen: the supervisor hears both; nobody hears the supervisor.
    until_heard(&mut voices, &[[O, H, O], [H, O, O], [H, H, O]], "listen").await;
    // 5: whisper. The operator hears the supervisor too; the caller does not.
    press(&mut voices[2], '5').await;
    until_heard(&mut voices, &[[O, H, O], [H, O, H], [H, H, O]], "whisper").await;
    // 6: barge. Everyone hears the other two.
    press(&mut voices[2], '6').await;
    until_heard(&mut voices, &[[O, H, H], [H, O, H], [H, H, O]], "barge").await;
    // 4: back to listen on the same call.
    press(&mut voices[2], '4').await;
    until_heard(
        &mut voices,
        &[[O, H, O], [H, O, O], [H, H, O]],
        "listen again",
    )
    .await;
    // The supervisor hangs up: caller and operator go on talking, and the supervisor's port
    // gets nothing more.
    hang_up(&sup, &c).await;
    voices.truncate(2);
    until_heard(
        &mut voices,
        &[[O, H, O], [H, O, O]],
        "after the supervisor left",
    )
    .await;
    drop(voices);
    assert!(
        gets_nothing_more(&c.rtp).await,
        "no audio to a supervisor who left"
    );
    assert_eq!(
        admin_calls(srv.http_addr).await.len(),
        1,
        "the call goes on"
    );
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_supervisor_may_monitor_and_only_an_agent_on_a_call() {
    let srv = start_server(config()).await;
    let (mut caller, _op, _inv) = bridged(&srv).await;
    // An operator dialling the code: 403.
    let other = TestAgent::login(srv.sip_addr, "1002").await;
    assert_eq!(
        dial(&other, "*511001").await.0,
        403,
        "an operator may not listen"
    );
    let sup = TestAgent::login(srv.sip_addr, "1003").await;
    // An agent with no call: 480; no such agent: 404.
    assert_eq!(dial(&sup, "*521002").await.0, 480, "1002 is not on a call");
    assert_eq!(dial(&sup, "*539999").await.0, 404, "no agent 9999");
    let m = metrics(srv.http_addr).await;
    for reason in ["forbidden", "not_on_call", "no_agent"] {
        let key = format!("ivr311_monitor_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(m.get(&key).copied(), Some(1.0), "{reason}");
    }
    caller.bye().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_barging_in_gets_bye_when_the_caller_hangs_up() {
    let srv = start_server(config()).await;
    let (mut caller, op, inv) = bridged(&srv).await;
    let sup = TestAgent::login(srv.sip_addr, "1003").await;
    let (code, c) = dial(&sup, "*531001").await;
    assert_eq!(code, 200);
    let mut voices = three(&caller, &op, &inv, &c);
    until_heard(&mut voices, &[[O, H, H], [H, O, H], [H, H, O]], "barge").await;
    drop(voices);
    caller.bye().await;
    until_bye(&sup, &c).await;
    until_no_calls(srv.http_addr).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_has_the_server_call_the_supervisor_who_then_listens() {
    let srv = start_server(config()).await;
    let (mut caller, op, inv) = bridged(&srv).await;
    let sup = TestAgent::login(srv.sip_addr, "1003").await;
    let json = [("Content-Type", "application/json")];
    let path = format!("/admin/calls/{}/monitor", caller.call_id);
    // An operator is not a supervisor; a call that does not exist is 404.
    let body = br#"{"mode": "listen", "supervisor": "1002"}"#;
    assert_eq!(http(srv.http_addr, "POST", &path, &json, body).await.0, 403);
    let body = br#"{"mode": "listen", "supervisor": "1003"}"#;
    let nope = "/admin/calls/nope/monitor";
    assert_eq!(http(srv.http_addr, "POST", nope, &json, body).await.0, 404);
    let (status, text) = http(srv.http_addr, "POST", &path, &json, body).await;
    assert_eq!(status, 202, "{text}");
    // The supervisor's phone rings and answers.
    let ring = sup.request("INVITE", Duration::from_secs(5)).await;
    sup.reply(&ring, 200, "OK", Some(sup.answer_sdp())).await;
    let mut voices = vec![
        Voice::new(&caller.rtp, caller.remote_rtp.unwrap(), CALLER_HZ),
        Voice::new(&op.rtp, server_media(&inv), OPERATOR_HZ),
        Voice::new(&sup.rtp, server_media(&ring), SUPERVISOR_HZ),
    ];
    until_heard(
        &mut voices,
        &[[O, H, O], [H, O, O], [H, H, O]],
        "listen (API)",
    )
    .await;
    drop(voices);
    caller.bye().await;
    sup.request("BYE", Duration::from_secs(5)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_supervisor_on_the_wallboard_listens_through_their_own_phone() {
    let srv = start_server(config()).await;
    let (mut caller, op, inv) = bridged(&srv).await;
    let sup_phone = TestAgent::login(srv.sip_addr, "1003").await;
    let operator = ConsoleSession::login(srv.http_addr, "1002").await;
    let sup = ConsoleSession::login(srv.http_addr, "1003").await;
    // The wallboard names the operator's call by the queue's caller id.
    let call = until(
        "the operator's call on the wallboard",
        Duration::from_secs(10),
        async || {
            let (_, b) = sup.get("/supervisor/api/wallboard").await;
            b["agents"].as_array()?.iter().find(|a| a["id"] == "1001")?["caller"].as_u64()
        },
    )
    .await;
    let path = format!("/supervisor/api/calls/{call}/monitor");
    // An operator's session cannot; a mode that does not exist is refused.
    assert_eq!(operator.post(&path, json!({"mode": "listen"})).await.0, 403);
    assert_eq!(sup.post(&path, json!({"mode": "spy"})).await.0, 400);
    let (status, v) = sup.post(&path, json!({"mode": "listen"})).await;
    assert_eq!(status, 202, "{v}");
    // The server calls the session's own phone, and it hears both sides.
    let ring = sup_phone.request("INVITE", Duration::from_secs(5)).await;
    sup_phone
        .reply(&ring, 200, "OK", Some(sup_phone.answer_sdp()))
        .await;
    let mut voices = vec![
        Voice::new(&caller.rtp, caller.remote_rtp.unwrap(), CALLER_HZ),
        Voice::new(&op.rtp, server_media(&inv), OPERATOR_HZ),
        Voice::new(&sup_phone.rtp, server_media(&ring), SUPERVISOR_HZ),
    ];
    until_heard(
        &mut voices,
        &[[O, H, O], [H, O, O], [H, H, O]],
        "listen (wallboard)",
    )
    .await;
    drop(voices);
    caller.bye().await;
    sup_phone.request("BYE", Duration::from_secs(5)).await;
    srv.shutdown().await;
}
