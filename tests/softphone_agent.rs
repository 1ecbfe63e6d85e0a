//! A real softphone as the operator: baresip (Debian's 1.0, package `baresip-core`) logs in as
//! agent 1001 with digest auth and auto-answer; SIPp calls 311, presses 1 (English), 1 (not an
//! emergency), 0 (operator), is queued and bridged to baresip, talks (g711a.pcap), hangs up.
//! `.ci/run` installs both; without them these tests fail and say so.
//!
//! Everything runs on 127.0.0.1 with free ports; baresip and SIPp are killed by guards even
//! when an assertion fails (and baresip quits by itself after `-t` seconds in any case). On a
//! failure the working directory (baresip's config and log, SIPp's output) is kept and named.
//!
//! Registration: Debian's baresip 1.0 links libre 1.1, whose digest code understands MD5 only
//! and gives up on a 401 that offers any other algorithm ("reg: ...: Register: Function not
//! implemented", ENOSYS). The server is therefore configured as a city with such phones would
//! do it: `registrar.digest_algorithms: [MD5]`.

mod common;

use common::*;
use ivr311::config::{AgentConfig, FileConfig, QueueConfig};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = "1001";
const PASSWORD: &str = "pw1001";
const MODULES: &str = "/usr/lib/baresip/modules";
/// baresip quits by itself after this many seconds, should the test process die without
/// running its destructors.
const BARESIP_LIFETIME_S: u32 = 90;

fn config() -> FileConfig {
    FileConfig {
        agents: vec![AgentConfig {
            id: AGENT.into(),
            password: PASSWORD.into(),
            skills: vec![],
            tier: 1,
            name: None,
        }],
        queues: vec![QueueConfig {
            name: "general".into(),
            ring_timeout_seconds: 20,
            ..QueueConfig::default()
        }],
        registrar: ivr311::config::RegistrarConfig {
            digest_algorithms: vec!["MD5".into()],
        },
        ..FileConfig::default()
    }
}

/// A child process, killed and reaped when dropped (also on panic).
struct Running {
    child: Child,
}

impl Running {
    fn spawn(cmd: &mut Command, what: &str) -> Running {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({e}); .ci/run installs it"));
        Running { child }
    }

    /// Wait for the exit, at most `limit`.
    async fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed when dropped unless the test failed (then its path is printed).
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> WorkDir {
        let dir = std::env::temp_dir().join(format!(
            "ivr311-softphone-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        WorkDir(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("softphone test files kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (baresip listens on both).
fn free_sip_port() -> u16 {
    for _ in 0..200 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free SIP port")
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free even UDP port with the next three free too (SIPp uses mp..mp+3 for RTP/RTCP).
fn free_media_port() -> u16 {
    for _ in 0..200 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port() & !1;
        drop(s);
        if !(1024..=65530).contains(&p) {
            continue;
        }
        let all: Vec<_> = (0..4)
            .map(|i| std::net::UdpSocket::bind(("127.0.0.1", p + i)))
            .collect();
        if all.iter().all(|r| r.is_ok()) {
            return p;
        }
    }
    panic!("no free media port")
}

/// What a log file holds so far, with baresip's carriage returns as line breaks.
fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace("\r\n", "\n")
                .replace('\r', "\n")
        })
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Write baresip's `config` and `accounts` into `dir` and start it, registered as the agent
/// (through `outbound` if given), auto-answering, G.711 only. Its speaker feeds its microphone
/// (`aubridge`), so it sends RTP at 50 packets/s with no sound card, echoing the caller.
fn start_baresip(dir: &Path, server: SocketAddr, outbound: Option<SocketAddr>) -> Running {
    assert!(
        Path::new(MODULES).join("aubridge.so").exists(),
        "baresip modules missing in {MODULES}: apt-get install baresip-core (.ci/run does this)"
    );
    let config = format!(
        "sip_listen\t\t127.0.0.1:{sip}\n\
net_interface\t\t127.0.0.1\n\
rtp_ports\t\t10000-19998\n\
audio_source\t\taubridge,agent\n\
audio_player\t\taubridge,agent\n\
module_path\t\t{MODULES}\n\
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
    let outbound = outbound
        .map(|o| format!(";outbound=\"sip:{o}\""))
        .unwrap_or_default();
    let account = format!(
        "<sip:{AGENT}@{server}>;auth_pass={PASSWORD};answermode=auto;regint=600;\
audio_codecs=PCMA,PCMU{outbound}\n"
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

/// Length in seconds and RMS level (full scale 1.0) of what baresip's `sndfile` module recorded
/// from the call (`dump-<time>-dec.wav`, written out when the call ends).
async fn decoded_audio(dir: &Path) -> (f64, f64) {
    let mut last = String::from("no recording");
    for _ in 0..30 {
        let wav = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("dump-") && n.ends_with("-dec.wav"))
            });
        if let Some(wav) = wav {
            match hound::WavReader::open(&wav) {
                Ok(r) => {
                    let rate = f64::from(r.spec().sample_rate);
                    let samples: Vec<f64> = r
                        .into_samples::<i16>()
                        .map_while(Result::ok)
                        .map(|s| f64::from(s) / 32768.0)
                        .collect();
                    if !samples.is_empty() {
                        let rms = (samples.iter().map(|s| s * s).sum::<f64>()
                            / samples.len() as f64)
                            .sqrt();
                        return (samples.len() as f64 / rate, rms);
                    }
                    last = format!("{} is empty", wav.display());
                }
                Err(e) => last = format!("{}: {e}", wav.display()),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("baresip's recording: {last}")
}

/// Agent 1001 in `/admin/agents` (an `AgentView`: `state`, `calls_taken`...).
async fn agent(http_addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http(http_addr, "GET", "/admin/agents", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    agents
        .as_array()
        .and_then(|a| a.iter().find(|a| a["id"] == AGENT))
        .unwrap_or_else(|| panic!("agent {AGENT} in {body}"))
        .clone()
}

/// Run `scenario` as the caller; panics with SIPp's output if it fails.
async fn run_sipp(dir: &Path, sip: SocketAddr, scenario: &str, timeout_s: u32) {
    let out = dir.join("sipp.out");
    let file = fs::File::create(&out).unwrap();
    let mut sipp = Running::spawn(
        Command::new("sipp")
            .arg(sip.to_string())
            .arg("-sf")
            .arg(repo().join("tests/sipp").join(scenario))
            .args(["-s", "311", "-i", "127.0.0.1", "-p"])
            .arg(free_udp_port().to_string())
            .args(["-mi", "127.0.0.1", "-mp"])
            .arg(free_media_port().to_string())
            .args(["-m", "1", "-l", "1", "-nostdin", "-timeout"])
            .arg(timeout_s.to_string())
            .arg("-timeout_error")
            .stdout(file.try_clone().unwrap())
            .stderr(file),
        "sipp",
    );
    let status = sipp
        .wait(Duration::from_secs(u64::from(timeout_s) + 5))
        .await;
    assert!(
        status.is_some_and(|s| s.success()),
        "sipp failed ({status:?}):\n{}",
        tail(&read_log(&out), 40)
    );
}

async fn caller_is_bridged_to_baresip() {
    let work = WorkDir::new();
    let srv = start_server(config()).await;
    let started = Instant::now();

    let outbound = None;
    let _baresip = start_baresip(&work.0, srv.sip_addr, outbound);
    let log = work.0.join("baresip.log");

    // Logged in: the agent is available.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = agent(srv.http_addr).await;
        if a["state"] == "available" {
            break;
        }
        if Instant::now() >= deadline {
            let text = read_log(&log);
            let outcome: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Register") || l.contains("[1 binding]"))
                .collect();
            panic!(
                "baresip did not log in as agent {AGENT} within 10 s ({a});\n\
                 its registration outcome: {outcome:#?}\nthe end of its log:\n{}",
                tail(&text, 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let registered = started.elapsed();

    run_sipp(&work.0, srv.sip_addr, "uac_operator.xml", 40).await;

    // The caller's BYE ends the agent's leg too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !read_log(&log).contains("terminated (duration") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = read_log(&log);
    let why = || tail(&text, 80);
    assert!(
        text.contains("answering call on line 1 from sip:+15557654321@"),
        "baresip auto-answered the caller:\n{}",
        why()
    );
    assert!(
        text.contains("Call established: sip:+15557654321@"),
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
    // SIP trace (-s): the caller's context reached the phone.
    for header in ["X-311-Queue: general", "X-311-Language: en", "+15557654321"] {
        assert!(text.contains(header), "{header} in the INVITE:\n{}", why());
    }
    let invite = text
        .split("INVITE sip:")
        .find(|m| m.contains("X-311-Queue"))
        .unwrap_or_default();
    assert!(
        invite.contains("X-311-Menu-Path") && invite.contains("main:0"),
        "menu path in the INVITE:\n{invite}"
    );

    // What baresip decoded (sndfile): the caller's voice, bridged through the server.
    let (seconds, rms) = decoded_audio(&work.0).await;
    assert!(
        seconds >= 3.0 && rms >= 0.02,
        "the caller's voice reached baresip: {seconds:.1} s decoded, RMS {rms:.3}"
    );

    let (_, q) = http(srv.http_addr, "GET", "/admin/queues", &[], b"").await;
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(q[0]["name"], "general", "{q}");
    assert_eq!(q[0]["answered"], 1, "{q}");
    assert_eq!(q[0]["waiting"], 0, "{q}");
    let a = agent(srv.http_addr).await;
    assert_eq!(a["calls_taken"], 1, "{a}");
    assert!(a["state"] == "wrap_up" || a["state"] == "available", "{a}");
    let h = health(srv.http_addr).await;
    assert_eq!(h["live_calls"], 0, "{h}");
    // The caller's side: about 220 packets of g711a.pcap and 30 of digits. (These counters
    // cover the caller's leg to the IVR only: what the bridge relays is counted in neither.)
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 150, "{h}");
    assert_eq!(h["digits_received"], 3, "{h}");
    eprintln!(
        "baresip logged in after {registered:?}; whole test {:?}",
        started.elapsed()
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_agent_auto_answers_a_sipp_caller_who_presses_zero() {
    caller_is_bridged_to_baresip().await;
}
