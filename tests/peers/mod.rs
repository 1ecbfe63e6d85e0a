//! Helpers for the real-peer tests (baresip, linphonec, SIPp as separate processes): child
//! processes killed on drop, a scratch directory kept on failure, free loopback ports, logs,
//! WAV levels and the admin views the tests watch. The server side is `tests/common`.
#![allow(dead_code)]

use crate::common::http;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed and reaped when dropped (also on panic). Its stdin is a pipe when
/// spawned with [`Running::interactive`]: closing it (the test process dying) makes the
/// softphones quit by themselves.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    what: &'static str,
}

impl Running {
    pub fn spawn(cmd: &mut Command, what: &'static str) -> Running {
        Self::start(cmd.stdin(Stdio::null()), what)
    }

    /// Spawn with a pipe on stdin, for [`Running::send`].
    pub fn interactive(cmd: &mut Command, what: &'static str) -> Running {
        Self::start(cmd.stdin(Stdio::piped()), what)
    }

    fn start(cmd: &mut Command, what: &'static str) -> Running {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({e}); scripts/test installs it"));
        let stdin = child.stdin.take();
        Running { child, stdin, what }
    }

    /// Type `text` on the program's stdin.
    pub fn send(&mut self, text: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .expect("spawned with Running::interactive");
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{} stopped reading its stdin: {e}", self.what));
    }

    /// Wait for the exit, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
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
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed when dropped unless the test failed (then its path is printed).
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    pub fn new(tag: &str) -> WorkDir {
        let dir = std::env::temp_dir().join(format!(
            "ivr311-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        WorkDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("real-peer test files kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (softphones listen on both).
pub fn free_sip_port() -> u16 {
    for _ in 0..200 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free SIP port")
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free even UDP port with the next three free too (RTP and RTCP; SIPp uses mp..mp+3).
pub fn free_media_port() -> u16 {
    for _ in 0..200 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port() & !1;
        drop(s);
        if !(1024..=65530).contains(&p) {
            continue;
        }
        let all: Vec<_> = (0..4)
            .map(|i| UdpSocket::bind(("127.0.0.1", p + i)))
            .collect();
        if all.iter().all(|r| r.is_ok()) {
            return p;
        }
    }
    panic!("no free media port")
}

/// What a log file holds so far, with carriage returns (baresip's status line) as line breaks.
pub fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace("\r\n", "\n")
                .replace('\r', "\n")
        })
        .unwrap_or_default()
}

/// The last `lines` lines of `text`, without baresip's repeated `[0:00:07] audio=...` status.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("[0:") && !l.trim().is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Length in seconds and RMS level (full scale 1.0) of a 16-bit WAV file.
pub fn wav_level(wav: &Path) -> Result<(f64, f64), String> {
    let r = hound::WavReader::open(wav).map_err(|e| format!("{}: {e}", wav.display()))?;
    let spec = r.spec();
    let rate = f64::from(spec.sample_rate) * f64::from(spec.channels);
    let samples: Vec<f64> = r
        .into_samples::<i16>()
        .map_while(Result::ok)
        .map(|s| f64::from(s) / 32768.0)
        .collect();
    if samples.is_empty() {
        return Err(format!("{} is empty", wav.display()));
    }
    let rms = (samples.iter().map(|s| s * s).sum::<f64>() / samples.len() as f64).sqrt();
    Ok((samples.len() as f64 / rate, rms))
}

/// The first file in `dir` whose name satisfies `pick`, read as in [`wav_level`] once it is
/// complete (retrying for up to 3 s: phones write the header when the call ends).
pub async fn recorded_level(dir: &Path, pick: impl Fn(&str) -> bool) -> (f64, f64) {
    let mut last = String::from("no recording");
    for _ in 0..30 {
        let wav = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pick));
        if let Some(wav) = wav {
            match wav_level(&wav) {
                Ok(level) => return level,
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("recording in {}: {last}", dir.display())
}

/// `/admin/calls` as JSON (`call_id`, `caller`, `language`, `state` (the menu), `seconds`...).
pub async fn live_calls(http_addr: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http(http_addr, "GET", "/admin/calls", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/admin/calls: {e}: {body}"))
}

/// Wait until the only live call is in `state` (a menu name); returns it, or the calls seen
/// last as the error.
pub async fn call_reaches(
    http_addr: SocketAddr,
    state: &str,
    limit: Duration,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + limit;
    loop {
        let calls = live_calls(http_addr).await;
        if let [call] = calls.as_slice() {
            if call["state"] == state {
                return Ok(call.clone());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("{calls:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Agent `id` in `/admin/agents` (an `AgentView`: `state`, `calls_taken`...).
pub async fn agent(http_addr: SocketAddr, id: &str) -> serde_json::Value {
    let (status, body) = http(http_addr, "GET", "/admin/agents", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    agents
        .as_array()
        .and_then(|a| a.iter().find(|a| a["id"] == id))
        .unwrap_or_else(|| panic!("agent {id} in {body}"))
        .clone()
}

/// Wait until agent `id` is logged in (`available`); `Err` with the agent's view if not.
pub async fn agent_logs_in(
    http_addr: SocketAddr,
    id: &str,
    limit: Duration,
) -> Result<(), serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let a = agent(http_addr, id).await;
        if a["state"] == "available" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(a);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIP transport as a test parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The URI parameter that selects it (`;transport=tcp`, nothing for UDP).
    pub fn uri_param(self) -> &'static str {
        match self {
            Transport::Udp => "",
            Transport::Tcp => ";transport=tcp",
        }
    }

    /// As it appears in a Via header.
    pub fn via(self) -> &'static str {
        match self {
            Transport::Udp => "SIP/2.0/UDP",
            Transport::Tcp => "SIP/2.0/TCP",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// linphonec

/// A linphonec config for a headless phone on 127.0.0.1: SIP on `sip_port` (UDP and TCP; -1 for
/// a random port), RTP on `rtp_port`, RFC 4733 keys, no echo canceller, no TLS, no IPv6.
pub fn linphonerc(sip_port: i32, rtp_port: u16) -> String {
    format!(
        "[sip]\n\
sip_port={sip_port}\n\
sip_tcp_port={sip_port}\n\
sip_tls_port=0\n\
bind_address=127.0.0.1\n\
use_ipv6=0\n\
use_rfc2833=1\n\
use_info=0\n\
contact=\"Linphone caller\" <sip:+15550003333@127.0.0.1>\n\
[rtp]\n\
audio_rtp_port={rtp_port}\n\
bind_address=127.0.0.1\n\
[sound]\n\
echocancellation=0\n\
[video]\n\
capture=0\n\
display=0\n"
    )
}

/// Write `seconds` of a `hz` tone at a third of full scale as a 16-bit 8 kHz mono WAV: the
/// voice of a file-mode linphonec.
pub fn write_tone(path: &Path, hz: f32, seconds: u32) {
    write_tone_at(path, hz, seconds, 10000.0);
}

/// [`write_tone`] at `amplitude` (of 32767).
pub fn write_tone_at(path: &Path, hz: f32, seconds: u32, amplitude: f32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..8000 * seconds {
        let t = i as f32 / 8000.0;
        w.write_sample(((t * hz * std::f32::consts::TAU).sin() * amplitude) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

pub struct Linphonec {
    pub proc: Running,
    out: std::path::PathBuf,
    debug: std::path::PathBuf,
}

impl Linphonec {
    /// Start linphonec with `rc` in `dir` (its HOME too: it keeps a database there), in file
    /// mode: it says `tone.wav` and records what it hears to `heard.wav`.
    pub fn start(dir: &Path, rc: &str, auto_answer: bool) -> Linphonec {
        // liblinphone does not start its SIP transports when it cannot open its database.
        fs::create_dir_all(dir.join(".local/share/linphone")).unwrap();
        fs::write(dir.join("linphonerc"), rc).unwrap();
        write_tone(&dir.join("tone.wav"), 1000.0, 20);
        let out = dir.join("linphonec.out");
        let debug = dir.join("linphonec.log");
        let file = fs::File::create(&out).unwrap();
        let mut cmd = Command::new("linphonec");
        cmd.env("HOME", dir)
            .arg("-c")
            .arg(dir.join("linphonerc"))
            .args(["-d", "6", "-l"])
            .arg(&debug)
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if auto_answer {
            cmd.arg("-a");
        }
        let mut proc = Running::interactive(&mut cmd, "linphonec");
        proc.send(&format!(
            "soundcard use files\nplay {}\nrecord {}\n",
            dir.join("tone.wav").display(),
            dir.join("heard.wav").display()
        ));
        Linphonec { proc, out, debug }
    }

    /// Wait until liblinphone listens for SIP (it does so on its first iteration, once it finds
    /// the network up; a call placed before that fails at once). Up to 30 s: before that it
    /// loads every mediastreamer plugin (H.264 and OpenGL ones included), which took over 10 s
    /// in a CI run with the rest of the suite running beside it.
    pub async fn ready(&self) {
        for _ in 0..300 {
            if self.debug_log().contains("Creating listening point") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "linphonec did not start listening within 30 s:\n{}",
            self.log()
        );
    }

    /// Its output and the end of its debug log, for a failure message.
    pub fn log(&self) -> String {
        format!(
            "{}\n--- linphonec's debug log ---\n{}",
            self.output(),
            tail(&self.debug_log(), 40)
        )
    }

    /// What linphonec printed (call progress).
    pub fn output(&self) -> String {
        read_log(&self.out)
    }

    /// liblinphone's debug log, with every SIP message.
    pub fn debug_log(&self) -> String {
        read_log(&self.debug)
    }
}
