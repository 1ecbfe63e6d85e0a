//! Real phones as the operator: baresip (Debian's 1.0, package `baresip-core`) over UDP and TCP,
//! linphonec (`linphone-cli`) over UDP and TCP, and SIPp (`sip-tester`) as a UAS. Each logs in
//! as agent 1001 with digest auth and answers by itself; a caller presses 1 (English), 1 (not an
//! emergency), 0 (operator), is queued and bridged to the phone, talks, hangs up. The caller is
//! the test UA of `tests/common` (see [`call_the_operator`] for why not SIPp); the SIPp agent
//! plays a pcap the caller must hear byte for byte.
//! `scripts/test` installs all three; without them these tests fail and say so.
//!
//! Everything runs on 127.0.0.1 with free ports; the phones and SIPp are killed by guards even
//! when an assertion fails (and the phones quit by themselves when their stdin closes or, for
//! baresip, after `-t` seconds). On a failure the working directory (configs, logs with SIP
//! traces, recordings, SIPp's output) is kept and named.
//!
//! Registration: Debian's baresip 1.0 links libre 1.1, whose digest code understands MD5 only
//! and gives up on a 401 that offers any other algorithm ("reg: ...: Register: Function not
//! implemented", ENOSYS); SIPp's `[authentication]` is MD5 only too. Those tests configure the
//! server as a city with such phones would: `registrar.digest_algorithms: [MD5]`. linphonec
//! logs in against the default (SHA-256, then MD5) and answers with SHA-256.

mod common;
mod peers;

use common::*;
use ivr311::config::{AgentConfig, FileConfig, QueueConfig, RegistrarConfig};
use peers::*;
use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const AGENT: &str = "1001";
const PASSWORD: &str = "pw1001";
const BARESIP_MODULES: &str = "/usr/lib/baresip/modules";
/// baresip quits by itself after this many seconds, should the test process die without
/// running its destructors.
const BARESIP_LIFETIME_S: u32 = 90;
/// The caller's and the SIPp agent's voice: 236 RTP packets of 30 ms PCMA.
const G711A_PCAP: &str = "/usr/share/sip-tester/g711a.pcap";

fn config(md5_only: bool) -> FileConfig {
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
    if md5_only {
        file.registrar = RegistrarConfig {
            digest_algorithms: vec!["MD5".into()],
        };
    }
    file
}

/// Wait until agent 1001 is logged in; panics with `log()` (the phone's log) if not.
async fn logged_in(http_addr: SocketAddr, log: impl Fn() -> String) {
    if let Err(a) = agent_logs_in(http_addr, AGENT, Duration::from_secs(10)).await {
        let text = log();
        let outcome: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("Register")
                    || l.contains("[1 binding]")
                    || l.contains("REGISTER")
                    || l.contains("egistration")
            })
            .collect();
        panic!(
            "the phone did not log in as agent {AGENT} within 10 s ({a});\n\
             its registration lines: {outcome:#?}\nthe end of its log:\n{}",
            tail(&text, 60)
        );
    }
}

/// The caller: the test UA calls 311 offering PCMA, presses 1 (English), 1 (not an emergency),
/// 0 (operator); once the agent's phone has answered it talks for 3 s (a 400 Hz tone), listens
/// for 2 s and hangs up. One RTP stream throughout (one SSRC, continuous sequence numbers), as
/// a phone sends it: the bridge relays the caller's stream unchanged, and baresip 1.0 drops
/// every packet after an SSRC change whose sequence numbers look older (SIPp switches SSRC and
/// sequence between its pcaps, so a SIPp caller whose key press is still playing when the
/// agent answers makes baresip deaf). Returns the payloads heard while listening.
async fn call_the_operator(sip: SocketAddr, http_addr: SocketAddr) -> Vec<Vec<u8>> {
    let mut caller = TestUa::udp(sip).await;
    let r = caller.call("8 101").await;
    assert_eq!(r.code, 200, "the IVR answered");
    caller.listen(Duration::from_secs(1)).await;
    caller.keys("110").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = agent(http_addr, AGENT).await;
        if a["state"] == "on_call" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's phone answered the queued caller within 10 s: {a}"
        );
        caller.listen(Duration::from_millis(100)).await;
    }
    caller.speak(150).await;
    let heard = caller.listen(Duration::from_secs(2)).await;
    caller.bye().await;
    heard
}

/// RMS level (full scale 1.0) of G.711 `payloads`.
fn level(payloads: &[Vec<u8>], codec: ivr311::media::g711::Codec) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    let mut pcm = [0i16; 480];
    for p in payloads.iter().filter(|p| p.len() <= 480) {
        codec.decode(p, &mut pcm[..p.len()]);
        sum += pcm[..p.len()]
            .iter()
            .map(|s| (f64::from(*s) / 32768.0).powi(2))
            .sum::<f64>();
        n += p.len();
    }
    if n == 0 {
        0.0
    } else {
        (sum / n as f64).sqrt()
    }
}

/// After a bridged call: the queue answered one caller, the agent took one call, no call is
/// left, and the caller's leg carried audio and exactly the three keys.
async fn server_saw_one_bridged_call(http_addr: SocketAddr) {
    let (_, q) = http(http_addr, "GET", "/admin/queues", &[], b"").await;
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(q[0]["name"], "general", "{q}");
    assert_eq!(q[0]["answered"], 1, "{q}");
    assert_eq!(q[0]["waiting"], 0, "{q}");
    let a = agent(http_addr, AGENT).await;
    assert_eq!(a["calls_taken"], 1, "{a}");
    assert!(a["state"] == "wrap_up" || a["state"] == "available", "{a}");
    let h = health(http_addr).await;
    assert_eq!(h["live_calls"], 0, "{h}");
    // These counters cover the caller's leg to the IVR only: what the bridge relays is counted
    // in neither.
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 50, "{h}");
    assert_eq!(h["digits_received"], 3, "{h}");
}

// ---------------------------------------------------------------------------------------------
// baresip

/// Write baresip's `config` and `accounts` into `dir` and start it, registered as the agent
/// over `transport`, auto-answering, G.711 only. Its speaker feeds its microphone
/// (`aubridge`), so it sends RTP at 50 packets/s with no sound card, echoing the caller.
fn start_baresip(dir: &Path, server: SocketAddr, transport: Transport) -> Running {
    assert!(
        Path::new(BARESIP_MODULES).join("aubridge.so").exists(),
        "baresip modules missing in {BARESIP_MODULES}: apt-get install baresip-core \
         (.ci/run does this)"
    );
    let config = format!(
        "sip_listen\t\t127.0.0.1:{sip}\n\
net_interface\t\t127.0.0.1\n\
rtp_ports\t\t10000-19998\n\
audio_source\t\taubridge,agent\n\
audio_player\t\taubridge,agent\n\
module_path\t\t{BARESIP_MODULES}\n\
module\t\t\tg711.so\n\
module\t\t\taubridge.so\n\
module\t\t\tsndfile.so\n\
snd_path\t\t{dir}\n\
module_tmp\t\taccount.so\n\
module_app\t\tmenu.so\n",
        sip = free_sip_port(),
        dir = dir.display(),
    );
    fs::write(dir.join("config"), config).unwrap();
    let account = format!(
        "<sip:{AGENT}@{server}{}>;auth_pass={PASSWORD};answermode=auto;regint=600;\
audio_codecs=PCMA,PCMU\n",
        transport.uri_param()
    );
    fs::write(dir.join("accounts"), account).unwrap();
    let log = fs::File::create(dir.join("baresip.log")).unwrap();
    // stdbuf: baresip prints through stdio, which a file would otherwise hold until exit.
    Running::spawn(
        Command::new("stdbuf")
            .args(["-oL", "-eL", "baresip", "-s", "-f"])
            .arg(dir)
            .args(["-t", &BARESIP_LIFETIME_S.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log),
        "baresip",
    )
}

async fn caller_is_bridged_to_baresip(transport: Transport) {
    let work = WorkDir::new("baresip-agent");
    let srv = start_server(config(true)).await;
    let started = Instant::now();

    let _baresip = start_baresip(work.path(), srv.sip_addr, transport);
    let log = work.path().join("baresip.log");
    logged_in(srv.http_addr, || read_log(&log)).await;
    let registered = started.elapsed();

    call_the_operator(srv.sip_addr, srv.http_addr).await;

    // The caller's BYE ends the agent's leg too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !read_log(&log).contains("terminated (duration") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = read_log(&log);
    let why = || tail(&text, 80);
    assert!(
        text.contains("answering call on line 1 from sip:+15550001111@"),
        "baresip auto-answered the caller:\n{}",
        why()
    );
    assert!(
        text.contains("Call established: sip:+15550001111@"),
        "baresip's call was established:\n{}",
        why()
    );
    assert!(
        text.contains("incoming rtp for 'audio' established"),
        "RTP reached baresip:\n{}",
        why()
    );
    assert!(
        text.contains("terminated (duration"),
        "the caller's hang-up ended baresip's call:\n{}",
        why()
    );
    // SIP trace (-s): the caller's context reached the phone, over the transport it registered
    // with.
    let invite = text
        .split("INVITE sip:")
        .find(|m| m.contains("X-311-Queue"))
        .unwrap_or_else(|| panic!("the offer in baresip's SIP trace:\n{}", why()));
    for header in ["X-311-Queue: general", "X-311-Language: en", "+15550001111"] {
        assert!(invite.contains(header), "{header} in the INVITE:\n{invite}");
    }
    assert!(
        invite.contains("X-311-Menu-Path") && invite.contains("main:0"),
        "menu path in the INVITE:\n{invite}"
    );
    assert!(
        invite.contains(transport.via()),
        "the INVITE came over {transport:?}:\n{invite}"
    );

    // What baresip decoded (sndfile): the caller's voice, bridged through the server.
    let (seconds, rms) = recorded_level(work.path(), |n| {
        n.starts_with("dump-") && n.ends_with("-dec.wav")
    })
    .await;
    assert!(
        seconds >= 3.0 && rms >= 0.02,
        "the caller's voice reached baresip: {seconds:.1} s decoded, RMS {rms:.3}"
    );
    server_saw_one_bridged_call(srv.http_addr).await;
    eprintln!(
        "baresip over {transport:?} logged in after {registered:?}, heard {seconds:.1} s at RMS \
         {rms:.3}; whole test {:?}",
        started.elapsed()
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_agent_over_udp_auto_answers_a_caller_who_presses_zero() {
    caller_is_bridged_to_baresip(Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_agent_over_tcp_auto_answers_a_caller_who_presses_zero() {
    caller_is_bridged_to_baresip(Transport::Tcp).await;
}

// ---------------------------------------------------------------------------------------------
// linphonec

async fn caller_is_bridged_to_linphone(transport: Transport) {
    let work = WorkDir::new("linphone-agent");
    let srv = start_server(config(false)).await;
    let started = Instant::now();

    let sip_port = free_sip_port();
    let mut phone = Linphonec::start(
        work.path(),
        &linphonerc(i32::from(sip_port), free_media_port()),
        true,
    );
    phone.ready().await;
    // `register <identity> <proxy> <password>` adds the credentials and registers.
    phone.proc.send(&format!(
        "register sip:{AGENT}@{srv} sip:{srv}{tr} {PASSWORD}\n",
        srv = srv.sip_addr,
        tr = transport.uri_param()
    ));
    logged_in(srv.http_addr, || phone.log()).await;
    let registered = started.elapsed();

    let heard = call_the_operator(srv.sip_addr, srv.http_addr).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while !phone.output().contains("> ended") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Before linphonec quits (and unregisters, logging the agent out).
    server_saw_one_bridged_call(srv.http_addr).await;
    phone.proc.send("quit\n");
    assert!(
        phone.proc.wait(Duration::from_secs(5)).await.is_some(),
        "linphonec quit:\n{}",
        phone.log()
    );
    let out = phone.output();
    for line in [
        "Receiving new incoming call from",
        "auto answering",
        "connected.",
        "Media streams established",
        "> ended",
    ] {
        assert!(out.contains(line), "{line:?} in linphonec's output:\n{out}");
    }
    assert!(
        out.contains("+15550001111"),
        "the caller's number shown:\n{out}"
    );
    // The offer as liblinphone logged it: the caller's context, over the registered transport.
    let debug = phone.debug_log();
    let invite = debug
        .split("INVITE sip:")
        .find(|m| m.contains("X-311-Queue"))
        .unwrap_or_else(|| panic!("the offer in linphonec's log:\n{}", tail(&debug, 80)));
    for header in ["X-311-Queue: general", "X-311-Language: en", "main:0"] {
        assert!(invite.contains(header), "{header} in the INVITE:\n{invite}");
    }
    assert!(
        debug
            .lines()
            .any(|l| l.contains("Authorization:") && l.contains("algorithm=SHA-256")),
        "linphonec answered the SHA-256 challenge (the server offers SHA-256, then MD5)"
    );
    let invite_head = &invite[..invite.len().min(400)];
    assert!(
        invite_head.contains(transport.via()),
        "the INVITE came over {transport:?}:\n{invite_head}"
    );
    // What the caller heard: linphonec's voice (its 1 kHz tone file), through the bridge.
    let caller_heard = level(&heard, ivr311::media::g711::Codec::Pcma);
    assert!(
        caller_heard >= 0.05,
        "linphonec's voice reached the caller: RMS {caller_heard:.3} in {} packets",
        heard.len()
    );
    // What linphonec recorded: the caller's voice, bridged through the server.
    let (seconds, rms) = recorded_level(work.path(), |n| n == "heard.wav").await;
    assert!(
        seconds >= 3.0 && rms >= 0.02,
        "the caller's voice reached linphonec: {seconds:.1} s recorded, RMS {rms:.3}"
    );
    eprintln!(
        "linphonec over {transport:?} logged in after {registered:?}, heard {seconds:.1} s at \
         RMS {rms:.3}, the caller heard it at RMS {caller_heard:.3}; whole test {:?}",
        started.elapsed()
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_agent_over_udp_auto_answers_a_caller_who_presses_zero() {
    caller_is_bridged_to_linphone(Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_agent_over_tcp_auto_answers_a_caller_who_presses_zero() {
    caller_is_bridged_to_linphone(Transport::Tcp).await;
}

// ---------------------------------------------------------------------------------------------
// SIPp as the agent's phone

/// The RTP payloads of a pcap of Ethernet/IPv4/UDP/RTP packets, concatenated. (SIPp's
/// `g711a.pcap`: fixed 12-byte RTP headers, no IP options.)
fn pcap_audio(path: &str) -> Vec<u8> {
    let d = fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; apt-get install sip-tester"));
    assert_eq!(&d[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "little-endian pcap");
    let mut audio = Vec::new();
    let mut off = 24;
    while off + 16 <= d.len() {
        let len = u32::from_le_bytes(d[off + 8..off + 12].try_into().unwrap()) as usize;
        let frame = &d[off + 16..off + 16 + len];
        // Ethernet 14 + IPv4 20 + UDP 8 + RTP 12.
        audio.extend_from_slice(&frame[54..]);
        off += 16 + len;
    }
    audio
}

/// How many of `payloads` start with 16 bytes found in `audio` (so were relayed from it).
fn relayed_from(payloads: &[Vec<u8>], audio: &[u8]) -> usize {
    let windows: HashSet<&[u8]> = audio.windows(16).collect();
    payloads
        .iter()
        .filter(|p| p.len() >= 16 && windows.contains(&p[..16]))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_uas_agent_gets_the_context_headers_and_its_audio_reaches_the_caller() {
    let work = WorkDir::new("sipp-agent");
    let srv = start_server(config(true)).await;

    // The agent's login: SIPp registers with digest auth from the port its UAS will answer on
    // (the server sends the agent's calls along the flow the REGISTER came from).
    let uas_port = free_udp_port();
    let reg_out = work.path().join("sipp-register.out");
    let file = fs::File::create(&reg_out).unwrap();
    let mut register = Running::spawn(
        Command::new("sipp")
            .arg(srv.sip_addr.to_string())
            .arg("-sf")
            .arg(repo().join("tests/sipp/uac_agent_register.xml"))
            .args(["-s", AGENT, "-au", AGENT, "-ap", PASSWORD])
            .args(["-i", "127.0.0.1", "-p"])
            .arg(uas_port.to_string())
            .args(["-m", "1", "-nostdin", "-timeout", "10", "-timeout_error"])
            .stdout(file.try_clone().unwrap())
            .stderr(file),
        "sipp",
    );
    let status = register.wait(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIPp's REGISTER with digest auth failed ({status:?}):\n{}",
        tail(&read_log(&reg_out), 40)
    );
    logged_in(srv.http_addr, || read_log(&reg_out)).await;
    // The agent's phone: SIPp as a UAS on that port, answering one call.
    let uas_out = work.path().join("sipp-uas.out");
    let file = fs::File::create(&uas_out).unwrap();
    let mut uas = Running::spawn(
        Command::new("sipp")
            .arg("-sf")
            .arg(repo().join("tests/sipp/uas_agent.xml"))
            .args(["-s", AGENT, "-i", "127.0.0.1", "-p"])
            .arg(uas_port.to_string())
            .args(["-mi", "127.0.0.1", "-mp"])
            .arg(free_media_port().to_string())
            .args(["-m", "1", "-nostdin", "-timeout", "40", "-timeout_error"])
            .arg("-trace_logs")
            .arg("-log_file")
            .arg(work.path().join("sipp-uas.log"))
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(work.path().join("sipp-uas.msg"))
            .arg("-trace_err")
            .arg("-error_file")
            .arg(work.path().join("sipp-uas.err"))
            .stdout(file.try_clone().unwrap())
            .stderr(file),
        "sipp",
    );

    // The caller: the test UA (PCMA like the agent, so the bridge relays payloads unchanged).
    let mut caller = TestUa::udp(srv.sip_addr).await;
    let r = caller.call("8 101").await;
    assert_eq!(r.code, 200);
    caller.listen(Duration::from_secs(1)).await;
    caller.keys("110").await;
    // Queued, offered to SIPp, answered; then SIPp's pcap (7 s) plays into the bridge.
    let heard = caller.listen(Duration::from_secs(4)).await;
    let audio = pcap_audio(G711A_PCAP);
    let relayed = relayed_from(&heard, &audio);
    let a = agent(srv.http_addr, AGENT).await;
    caller.bye().await;

    let status = uas.wait(Duration::from_secs(10)).await;
    let uas_text = format!(
        "{}\n--- errors ---\n{}\n--- log ---\n{}\n--- messages ---\n{}",
        tail(&read_log(&uas_out), 30),
        read_log(&work.path().join("sipp-uas.err")),
        read_log(&work.path().join("sipp-uas.log")),
        tail(&read_log(&work.path().join("sipp-uas.msg")), 80)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "SIPp as the agent failed ({status:?}; its header checks are in uas_agent.xml):\n{uas_text}"
    );
    assert!(
        uas_text.contains("agent offered: X-311-Queue: general X-311-Language: en"),
        "SIPp logged the caller's context:\n{uas_text}"
    );
    assert!(
        relayed >= 50,
        "the agent's voice (g711a.pcap) reached the caller through the bridge: {relayed} of {} \
         packets heard came from it (agent during the call: {a})",
        heard.len()
    );
    server_saw_one_bridged_call(srv.http_addr).await;
    eprintln!(
        "SIPp agent: {relayed} of {} packets the caller heard in 4 s were the agent's pcap",
        heard.len()
    );
    srv.shutdown().await;
}
