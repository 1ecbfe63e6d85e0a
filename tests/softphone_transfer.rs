//! Transfers from real phones, logged in as agent 1001 and auto-answering the queued caller:
//! baresip (Debian's 1.0, `baresip-core`), whose `/transfer` command sends REFER on the call
//! (a desk phone's transfer key), and linphonec (`linphone-cli`), blind with `transfer 1 <uri>`
//! and attended: it calls the target from the same phone (holding the caller) and joins them
//! with `transfer 1 --to-call 2` (REFER with `Replaces`, RFC 3891). The caller is the test UA of `tests/common`, its number
//! asserted by a trusted trunk (the loopback); the PSAP and the crisis line are test UAs here
//! that record the INVITE they get and talk back.
//!
//! Asserted: the PSAP's INVITE carries the caller's number (From and P-Asserted-Identity), not
//! the operator's; the phone sees `202` and the NOTIFY progress (`message/sipfrag` 100 then
//! 200) in its SIP trace; its leg is released; the caller and the PSAP hear each other; the
//! 911 audit row names the operator and `refer`.
//!
//! SIPp (`sip-tester`) plays the attended case step by step as an operator's phone would
//! (`tests/sipp/uas_operator_attended.xml`): it answers the caller, holds them (re-INVITE
//! `sendonly`), calls the crisis line from the same phone (digest), REFERs on the caller's call
//! with `Replaces` naming that call, and checks the `202`, the NOTIFYs and the BYEs of both
//! of its calls.
//!
//! baresip 1.0 answers digest challenges with MD5 only (see `tests/softphone_agent.rs`), so
//! the server is configured with `registrar.digest_algorithms: [MD5]`.

mod common;
mod peers;

use common::*;
use ivr311::config::{AgentConfig, FileConfig, QueueConfig, RegistrarConfig};
use ivr311::media::g711::Codec;
use ivr311::media::rtp::{self, RtpStream};
use ivr311::sip::message::{parse_datagram, Message, Request, ResponseBuilder};
use peers::*;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

const AGENT: &str = "1001";
const PASSWORD: &str = "pw1001";
const CALLER: &str = "+12125550123";
const BARESIP_MODULES: &str = "/usr/lib/baresip/modules";
const BARESIP_LIFETIME_S: u32 = 90;

/// baresip as agent 1001 over UDP, auto-answering, G.711, with its console on stdin
/// (`stdio`) so the test can type its commands.
fn start_baresip(dir: &Path, server: SocketAddr) -> Running {
    assert!(
        Path::new(BARESIP_MODULES).join("stdio.so").exists(),
        "baresip modules missing in {BARESIP_MODULES}: apt-get install baresip-core"
    );
    let config = format!(
        "sip_listen\t\t127.0.0.1:{sip}\n\
net_interface\t\t127.0.0.1\n\
rtp_ports\t\t10000-19998\n\
audio_source\t\taubridge,agent\n\
audio_player\t\taubridge,agent\n\
module_path\t\t{BARESIP_MODULES}\n\
module\t\t\tstdio.so\n\
module\t\t\tg711.so\n\
module\t\t\taubridge.so\n\
module_tmp\t\taccount.so\n\
module_app\t\tmenu.so\n",
        sip = free_sip_port(),
    );
    fs::write(dir.join("config"), config).unwrap();
    let account = format!(
        "<sip:{AGENT}@{server}>;auth_pass={PASSWORD};answermode=auto;regint=600;\
audio_codecs=PCMU,PCMA\n"
    );
    fs::write(dir.join("accounts"), account).unwrap();
    let log = fs::File::create(dir.join("baresip.log")).unwrap();
    Running::interactive(
        Command::new("stdbuf")
            .args(["-oL", "-eL", "baresip", "-s", "-f"])
            .arg(dir)
            .args(["-t", &BARESIP_LIFETIME_S.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log),
        "baresip",
    )
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

/// A target (the PSAP, a crisis line): takes the server's INVITE, answers it with media of
/// its own.
struct Psap {
    sip: UdpSocket,
    rtp: UdpSocket,
}

impl Psap {
    async fn next(&self, method: &str, t: Duration) -> Option<(Request, SocketAddr)> {
        let deadline = Instant::now() + t;
        let mut buf = vec![0u8; 65535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (n, from) = tokio::time::timeout(left, self.sip.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            if let Ok(Message::Request(r)) = parse_datagram(&buf[..n], 65535) {
                if r.method.as_str() == "BYE" {
                    let resp = ResponseBuilder::new(&r, 200, "OK", Some("psap")).build();
                    self.sip.send_to(&resp, from).await.unwrap();
                }
                if r.method.as_str() == method {
                    return Some((r, from));
                }
            }
        }
    }

    async fn answer(&self, inv: &Request, to: SocketAddr) {
        let p = self.rtp.local_addr().unwrap().port();
        let resp = ResponseBuilder::new(inv, 200, "OK", Some("psap"))
            .header("Contact", format!("<sip:911@{}>", self.sip.local_addr().unwrap()))
            .body(
                "application/sdp",
                format!("v=0\r\no=psap 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {p} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"),
            )
            .build();
        self.sip.send_to(&resp, to).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_operator_transfers_the_caller_to_911_with_its_transfer_command() {
    let work = WorkDir::new("baresip-transfer");
    let psap = Psap {
        sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let mut file = FileConfig {
        agents: vec![AgentConfig {
            id: AGENT.into(),
            password: PASSWORD.into(),
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
        registrar: RegistrarConfig {
            digest_algorithms: vec!["MD5".into()],
        },
        ..FileConfig::default()
    };
    file.trunks.allow = vec!["127.0.0.1/32".parse().unwrap()];
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(format!("sip:911@{}", psap.sip.local_addr().unwrap()));
    let srv = start_server(file).await;
    let mut phone = start_baresip(work.path(), srv.sip_addr);
    let log = work.path().join("baresip.log");
    let why = || tail(&read_log(&log), 80);
    if let Err(e) = agent_logs_in(srv.http_addr, AGENT, Duration::from_secs(10)).await {
        panic!("baresip did not log in ({e}):\n{}", why());
    }

    // The caller reaches the operator; baresip answers by itself.
    let mut caller = TestUa::udp(srv.sip_addr).await;
    caller.from_user = CALLER.into();
    let (_, r) = caller
        .call_with(
            "0 101",
            &format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n"),
        )
        .await;
    assert_eq!(r.code, 200);
    caller.listen(Duration::from_millis(500)).await;
    caller.keys("110").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent(srv.http_addr, AGENT).await["state"] != "on_call" {
        assert!(
            Instant::now() < deadline,
            "baresip took the caller:\n{}",
            why()
        );
        caller.listen(Duration::from_millis(100)).await;
    }

    // The operator's transfer: REFER to 911 from the phone.
    phone.send(&format!("/transfer sip:911@{}\n", srv.sip_addr));
    let (inv, from) = psap
        .next("INVITE", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the PSAP got no INVITE:\n{}", why()));
    assert_eq!(inv.from.user(), Some(CALLER), "From: {}", inv.from.raw);
    assert!(
        inv.header("P-Asserted-Identity")
            .is_some_and(|p| p.contains(CALLER)),
        "{:?}",
        inv.header("P-Asserted-Identity")
    );
    psap.answer(&inv, from).await;
    assert!(
        psap.next("ACK", Duration::from_secs(3)).await.is_some(),
        "ACKed"
    );

    // The phone saw its REFER accepted and the progress, and its leg was released.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = read_log(&log);
        let final_notify = text
            .split("NOTIFY sip:")
            .skip(1)
            .any(|n| n.contains("terminated;reason=noresource") && n.contains("SIP/2.0 200 OK"));
        if text.contains("SIP/2.0 202 Accepted") && final_notify && text.contains("BYE sip:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "REFER accepted, NOTIFY 200, BYE at the phone:\n{}",
            why()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = read_log(&log);
    let notifies: Vec<&str> = text.split("NOTIFY sip:").skip(1).collect();
    assert!(
        notifies
            .iter()
            .any(|n| n.contains("Event: refer") && n.contains("SIP/2.0 100 Trying")),
        "NOTIFY 100 at the phone:\n{}",
        why()
    );
    assert!(
        notifies
            .iter()
            .any(|n| n.contains("SIP/2.0 200 OK") && n.contains("terminated")),
        "the final NOTIFY at the phone:\n{}",
        why()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = agent(srv.http_addr, AGENT).await["state"].clone();
        if state == "wrap_up" || state == "available" {
            break;
        }
        assert!(Instant::now() < deadline, "the operator is free: {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The caller and the PSAP hear each other.
    let leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let pcm: Vec<i16> = (0..160)
        .map(|i| ((i as f32 * std::f32::consts::TAU * 1000.0 / 8000.0).sin() * 12000.0) as i16)
        .collect();
    let mut payload = [0u8; 160];
    Codec::Pcmu.encode(&pcm, &mut payload);
    let mut out = RtpStream::new();
    let send = async {
        let mut buf = [0u8; 200];
        for _ in 0..50 {
            let n = out.write(0, &payload, 160, &mut buf);
            psap.rtp.send_to(&buf[..n], leg).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (_, heard) = tokio::join!(send, caller.listen(Duration::from_millis(1000)));
    assert!(
        level(&heard) > 0.05,
        "the PSAP's voice at the caller: {:.3}",
        level(&heard)
    );
    let hear = async {
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(Ok((n, _))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            psap.rtp.recv_from(&mut buf),
        )
        .await
        {
            if let Ok(p) = rtp::parse(&buf[..n]) {
                got.push(p.payload.to_vec());
            }
        }
        got
    };
    let (_, heard) = tokio::join!(caller.speak(60), hear);
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at the PSAP: {:.3}",
        level(&heard)
    );

    // The audit names the operator and how they asked.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = srv.tickets.emergency_audits(1).await.unwrap().remove(0);
        if a.outcome == "connected via bridge" {
            assert_eq!(a.operator.as_deref(), Some(AGENT));
            assert_eq!(a.requested_via.as_deref(), Some("refer"));
            assert_eq!(a.caller.as_deref(), Some(CALLER));
            break;
        }
        assert!(Instant::now() < deadline, "{}", a.outcome);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    caller.bye().await;
    assert!(
        psap.next("BYE", Duration::from_secs(3)).await.is_some(),
        "the PSAP hears the hang-up"
    );
    srv.shutdown().await;
}

/// `packets` of a 1 kHz tone (PCMU, 20 ms apart) from `sock` to `to`.
async fn send_tone(sock: &UdpSocket, to: SocketAddr, packets: usize) {
    let pcm: Vec<i16> = (0..160)
        .map(|i| ((i as f32 * std::f32::consts::TAU * 1000.0 / 8000.0).sin() * 12000.0) as i16)
        .collect();
    let mut payload = [0u8; 160];
    Codec::Pcmu.encode(&pcm, &mut payload);
    let mut out = RtpStream::new();
    let mut buf = [0u8; 200];
    for _ in 0..packets {
        let n = out.write(0, &payload, 160, &mut buf);
        sock.send_to(&buf[..n], to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RTP payloads received on `sock` for `d`.
async fn hear_on(sock: &UdpSocket, d: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + d;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        sock.recv_from(&mut buf),
    )
    .await
    {
        if let Ok(p) = rtp::parse(&buf[..n]) {
            got.push(p.payload.to_vec());
        }
    }
    got
}

/// The only live call's state, once it is `want`.
async fn call_state(http_addr: SocketAddr, want: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let calls = admin_calls(http_addr).await;
        if calls.len() == 1 && calls[0]["state"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no call {want:?}: {calls:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// linphonec logged in as agent 1001 with the crisis line (988) configured, and a caller with
/// an asserted number who pressed 0 and is talking to it (linphonec answers by itself).
async fn linphone_operator_with_caller(
    work: &WorkDir,
) -> (Psap, ivr311::server::RunningServer, Linphonec, TestUa) {
    let line = Psap {
        sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let mut file = FileConfig {
        agents: vec![AgentConfig {
            id: AGENT.into(),
            password: PASSWORD.into(),
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
        ..FileConfig::default()
    };
    file.trunks.allow = vec!["127.0.0.1/32".parse().unwrap()];
    file.transfers = ivr311::config::TransfersConfig(vec![ivr311::config::TransferLine {
        name: "crisis".into(),
        number: "988".into(),
        uri: format!("sip:988@{}", line.sip.local_addr().unwrap()),
        headers: Default::default(),
        ring_timeout_seconds: 20,
        crisis: true,
    }]);
    let srv = start_server(file).await;
    let mut phone = Linphonec::start(
        work.path(),
        &linphonerc(i32::from(free_sip_port()), free_media_port()),
        true,
    );
    phone.ready().await;
    phone.proc.send(&format!(
        "register sip:{AGENT}@{srv} sip:{srv} {PASSWORD}\n",
        srv = srv.sip_addr
    ));
    if let Err(e) = agent_logs_in(srv.http_addr, AGENT, Duration::from_secs(10)).await {
        panic!("linphonec did not log in ({e}):\n{}", phone.log());
    }

    // The caller reaches the operator; linphonec answers by itself (call 1).
    let mut caller = TestUa::udp(srv.sip_addr).await;
    caller.from_user = CALLER.into();
    let (_, r) = caller
        .call_with(
            "0 101",
            &format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n"),
        )
        .await;
    assert_eq!(r.code, 200);
    caller.listen(Duration::from_millis(500)).await;
    caller.keys("110").await;
    call_state(srv.http_addr, "with operator", || phone.log()).await;
    (line, srv, phone, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_operator_consults_the_crisis_line_then_joins_the_caller_to_it() {
    let work = WorkDir::new("linphone-attended");
    let (line, srv, mut phone, mut caller) = linphone_operator_with_caller(&work).await;

    // The operator holds the caller and calls the crisis line from the same phone (call 2).
    phone.proc.send("pause 1\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !phone.output().to_lowercase().contains("paused") {
        assert!(
            Instant::now() < deadline,
            "linphonec held call 1:\n{}",
            phone.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    phone.proc.send(&format!("call sip:988@{}\n", srv.sip_addr));
    let (inv, from) = line
        .next("INVITE", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the line got no INVITE:\n{}", phone.log()));
    assert_eq!(
        inv.from.user(),
        Some(CALLER),
        "the held caller's number: {}",
        inv.from.raw
    );
    assert_eq!(inv.header("X-311-Transferred-By"), Some(AGENT));
    line.answer(&inv, from).await;
    call_state(srv.http_addr, "consulting", || phone.log()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !phone
        .output()
        .lines()
        .any(|l| l.contains("Call 2 with") && l.contains("connected"))
    {
        assert!(
            Instant::now() < deadline,
            "linphonec's call 2 is up:\n{}",
            phone.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Attended transfer: REFER on call 1 replacing call 2.
    phone.proc.send("transfer 1 --to-call 2\n");
    call_state(srv.http_addr, "transferred", || phone.log()).await;
    let refer = phone
        .debug_log()
        .split("REFER sip:")
        .nth(1)
        .map(|r| r.lines().take(20).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default();
    assert!(refer.contains("Replaces="), "linphonec's REFER: {refer}");
    assert!(
        line.next("INVITE", Duration::from_millis(500))
            .await
            .is_none(),
        "the line is not called again: the consultation's leg is joined"
    );
    // Both of the phone's calls end; the operator is free.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = agent(srv.http_addr, AGENT).await["state"].clone();
        let ended = phone.output().matches("ended").count() >= 2
            || phone.output().matches("Call ended").count() >= 2;
        if (state == "wrap_up" || state == "available") && ended {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator's calls ended ({state}):\n{}",
            phone.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The caller and the line hear each other.
    let leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let (_, heard) = tokio::join!(
        send_tone(&line.rtp, leg, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the line's voice at the caller: {:.3}",
        level(&heard)
    );
    let (_, heard) = tokio::join!(
        caller.speak(60),
        hear_on(&line.rtp, Duration::from_millis(1500))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at the line: {:.3}",
        level(&heard)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = srv.tickets.transfers_of(&caller.call_id).await.unwrap();
        if rows.iter().any(|r| r.outcome == "connected") {
            assert_eq!(rows.last().unwrap().requested_via, "phone_call", "{rows:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    phone.proc.send("quit\n");
    caller.bye().await;
    assert!(
        line.next("BYE", Duration::from_secs(3)).await.is_some(),
        "the line hears the hang-up"
    );
    srv.shutdown().await;
}

/// linphonec's blind transfer (`transfer 1 <uri>`: REFER on the caller's call) to the crisis
/// line: the line is called with the caller's number, answers, and the operator is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_operator_blind_transfers_the_caller_to_the_crisis_line() {
    let work = WorkDir::new("linphone-blind");
    let (line, srv, mut phone, mut caller) = linphone_operator_with_caller(&work).await;

    // Blind transfer: REFER on call 1 to the line's number.
    phone
        .proc
        .send(&format!("transfer 1 sip:988@{}\n", srv.sip_addr));
    let (inv, from) = line
        .next("INVITE", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the line got no INVITE:\n{}", phone.log()));
    assert_eq!(
        inv.from.user(),
        Some(CALLER),
        "the caller's number: {}",
        inv.from.raw
    );
    assert_eq!(inv.header("X-311-Transferred-By"), Some(AGENT));
    line.answer(&inv, from).await;
    call_state(srv.http_addr, "transferred", || phone.log()).await;
    // The operator's call ends and they are free.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = agent(srv.http_addr, AGENT).await["state"].clone();
        if state == "wrap_up" || state == "available" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator is released ({state}):\n{}",
            phone.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The line hears the caller.
    let (_, heard) = tokio::join!(
        caller.speak(60),
        hear_on(&line.rtp, Duration::from_millis(1500))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at the line: {:.3}",
        level(&heard)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = srv.tickets.transfers_of(&caller.call_id).await.unwrap();
        if rows.iter().any(|r| r.outcome == "connected") {
            assert_eq!(rows.last().unwrap().requested_via, "refer", "{rows:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    phone.proc.send("quit\n");
    caller.bye().await;
    assert!(
        line.next("BYE", Duration::from_secs(3)).await.is_some(),
        "the line hears the hang-up"
    );
    srv.shutdown().await;
}

/// Whether a socket is bound to UDP port `port` of 127.0.0.1 (read from /proc/net/udp).
fn udp_bound(port: u16) -> bool {
    let table = fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_operator_holds_consults_the_crisis_line_and_transfers_with_replaces() {
    let work = WorkDir::new("sipp-attended");
    let line = Psap {
        sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let mut file = FileConfig {
        agents: vec![AgentConfig {
            id: AGENT.into(),
            password: PASSWORD.into(),
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
        // SIPp's `[authentication]` is MD5 only.
        registrar: RegistrarConfig {
            digest_algorithms: vec!["MD5".into()],
        },
        ..FileConfig::default()
    };
    file.trunks.allow = vec!["127.0.0.1/32".parse().unwrap()];
    // The scenario's phone sends no audio: its leg is not watched for silence.
    file.limits.operator_silence_seconds = 0;
    file.transfers = ivr311::config::TransfersConfig(vec![ivr311::config::TransferLine {
        name: "crisis".into(),
        number: "988".into(),
        uri: format!("sip:988@{}", line.sip.local_addr().unwrap()),
        headers: Default::default(),
        ring_timeout_seconds: 20,
        crisis: true,
    }]);
    let srv = start_server(file).await;

    // The operator's phone logs in (digest), then takes calls on the port it registered from.
    let port = free_udp_port();
    let reg_out = work.path().join("sipp-register.out");
    let out = fs::File::create(&reg_out).unwrap();
    let mut register = Running::spawn(
        Command::new("sipp")
            .arg(srv.sip_addr.to_string())
            .arg("-sf")
            .arg(repo().join("tests/sipp/uac_agent_register.xml"))
            .args(["-s", AGENT, "-au", AGENT, "-ap", PASSWORD])
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", "1", "-nostdin", "-timeout", "10", "-timeout_error"])
            .stdout(out.try_clone().unwrap())
            .stderr(out),
        "sipp",
    );
    let status = register.wait(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIPp's REGISTER failed ({status:?}):\n{}",
        tail(&read_log(&reg_out), 40)
    );
    if let Err(a) = agent_logs_in(srv.http_addr, AGENT, Duration::from_secs(10)).await {
        panic!("SIPp did not log in as {AGENT}: {a}");
    }
    let phone_out = work.path().join("sipp-operator.out");
    let (log, msgs, errs) = (
        work.path().join("sipp-operator.log"),
        work.path().join("sipp-operator.msg"),
        work.path().join("sipp-operator.err"),
    );
    let out = fs::File::create(&phone_out).unwrap();
    let mut phone = Running::spawn(
        Command::new("sipp")
            .arg(srv.sip_addr.to_string())
            .arg("-sf")
            .arg(repo().join("tests/sipp/uas_operator_attended.xml"))
            .args(["-s", AGENT, "-au", AGENT, "-ap", PASSWORD])
            .args(["-key", "target", "988"])
            // SIPp's digest `uri` is `sip:<remote host:port>` unless told: the INVITE's.
            .args(["-auth_uri", &format!("988@{}", srv.sip_addr)])
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-mi", "127.0.0.1", "-mp", &free_media_port().to_string()])
            .args(["-m", "1", "-nostdin", "-timeout", "40", "-timeout_error"])
            .arg("-trace_logs")
            .arg("-log_file")
            .arg(&log)
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(&msgs)
            .arg("-trace_err")
            .arg("-error_file")
            .arg(&errs)
            .stdout(out.try_clone().unwrap())
            .stderr(out),
        "sipp",
    );
    let sipp_text = || {
        format!(
            "{}\n--- errors ---\n{}\n--- log ---\n{}\n--- messages ---\n{}",
            tail(&read_log(&phone_out), 30),
            read_log(&errs),
            read_log(&log),
            tail(&read_log(&msgs), 150)
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !udp_bound(port) {
        assert!(Instant::now() < deadline, "SIPp listens:\n{}", sipp_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The caller reaches the operator; SIPp answers, holds them and calls 988.
    let mut caller = TestUa::udp(srv.sip_addr).await;
    caller.from_user = CALLER.into();
    let (_, r) = caller
        .call_with(
            "0 101",
            &format!("P-Asserted-Identity: <sip:{CALLER}@127.0.0.1>\r\n"),
        )
        .await;
    assert_eq!(r.code, 200);
    caller.listen(Duration::from_millis(500)).await;
    caller.keys("110").await;
    let (inv, from) = line
        .next("INVITE", Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("the line got no INVITE:\n{}", sipp_text()));
    assert_eq!(
        inv.from.user(),
        Some(CALLER),
        "the held caller's number: {}",
        inv.from.raw
    );
    assert!(
        inv.header("P-Asserted-Identity")
            .is_some_and(|p| p.contains(CALLER)),
        "{:?}",
        inv.header("P-Asserted-Identity")
    );
    assert_eq!(inv.header("X-311-Transferred-By"), Some(AGENT));
    assert_eq!(inv.header("X-311-Call-ID"), Some(caller.call_id.as_str()));
    line.answer(&inv, from).await;

    // SIPp REFERs with Replaces; its scenario checks the 202, the NOTIFYs (100, then 200)
    // and that both of its calls get BYE, and ends only then.
    let status = phone.wait(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIPp as the operator failed ({status:?}):\n{}",
        sipp_text()
    );
    assert!(
        read_log(&log).contains(&format!("operator offered: {}", caller.call_id)),
        "SIPp was offered the caller's call with its context:\n{}",
        sipp_text()
    );
    call_state(srv.http_addr, "transferred", sipp_text).await;
    let state = agent(srv.http_addr, AGENT).await["state"].clone();
    assert!(
        state == "wrap_up" || state == "available",
        "the operator is free: {state}"
    );
    assert!(
        line.next("INVITE", Duration::from_millis(300))
            .await
            .is_none(),
        "the line is not called again: the consultation's leg is joined"
    );

    // The caller and the line hear each other.
    let leg = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    let (_, heard) = tokio::join!(
        send_tone(&line.rtp, leg, 50),
        caller.listen(Duration::from_millis(1000))
    );
    assert!(
        level(&heard) > 0.05,
        "the line's voice at the caller: {:.3}",
        level(&heard)
    );
    let (_, heard) = tokio::join!(
        caller.speak(60),
        hear_on(&line.rtp, Duration::from_millis(1500))
    );
    assert!(
        level(&heard) > 0.05,
        "the caller's voice at the line: {:.3}",
        level(&heard)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = srv.tickets.transfers_of(&caller.call_id).await.unwrap();
        if let Some(r) = rows.iter().find(|r| r.outcome == "connected") {
            assert_eq!(
                (
                    r.target.as_str(),
                    r.operator.as_deref(),
                    r.requested_via.as_str()
                ),
                ("crisis", Some(AGENT), "phone_call"),
                "{rows:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    caller.bye().await;
    assert!(
        line.next("BYE", Duration::from_secs(3)).await.is_some(),
        "the line hears the hang-up"
    );
    srv.shutdown().await;
}
