//! Real softphones as callers, over UDP and over TCP: baresip (Debian's 1.0, `baresip-core`),
//! linphonec (`linphone-cli`, liblinphone 5.1) and SIPp (`sip-tester`) dial 311 on the real
//! server, press 1 (English), 1 (not an emergency) and 1 (streets) as RFC 4733 events, and the
//! test watches the call walk the menu in `/admin/calls`: `language` → `screening` → `main` →
//! `streets` (a menu no timeout leads to, so the keys were heard). What the phone heard is
//! recorded by the phone itself and must not be silence. `scripts/test` installs the three.
//!
//! No sound card: baresip's `aubridge` feeds what it hears back in as its microphone and
//! `sndfile` records the call; linphonec runs in its file mode (`soundcard use files`), playing
//! a tone as the caller's voice and recording what it hears. Everything binds 127.0.0.1 on free
//! ports; the phones are killed when the test ends (and quit by themselves when their stdin
//! closes, or, for baresip, after `-t` seconds). On a failure the working directory (configs,
//! logs with the SIP trace, recordings) is kept and named.

mod common;
mod peers;

use common::*;
use ivr311::config::FileConfig;
use peers::*;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BARESIP_MODULES: &str = "/usr/lib/baresip/modules";
/// baresip quits by itself after this many seconds, should the test process die without
/// running its destructors.
const BARESIP_LIFETIME_S: u32 = 60;
/// How long a step of the menu walk may take (a key press reaching the server and the menu).
const STEP: Duration = Duration::from_secs(5);

/// The menu walk every caller does: after each key, the menu the call must be in.
const WALK: [(&str, &str); 3] = [("1", "screening"), ("1", "main"), ("1", "streets")];

/// A softphone driven through its command line on stdin.
trait Phone {
    /// Whether the phone says its call is answered: a key typed before that goes nowhere.
    fn in_call(&self) -> bool;
    /// Whether the phone is still sending one of the keys typed so far (one that is drops the
    /// next key typed).
    fn sending_a_key(&self) -> bool {
        false
    }
    /// Type one DTMF key.
    fn press(&mut self, key: &str);
    /// Hang up and quit.
    fn hang_up(&mut self);
    /// Everything the phone logged so far (with its SIP trace).
    fn log(&self) -> String;
}

/// Wait for the phone's call to show up in `/admin/calls` in the language menu, walk the
/// menu, listen for a while, hang up; panics with the phone's log on the first step that fails.
async fn walk_the_menu(phone: &mut impl Phone, http_addr: SocketAddr) {
    if let Err(calls) = call_reaches(http_addr, "language", Duration::from_secs(10)).await {
        panic!(
            "the phone's call did not reach the language menu within 10 s (calls: {calls});\n\
             the end of its log:\n{}",
            tail(&phone.log(), 60)
        );
    }
    // The server's call is up once it answers; the phone's, once the answer reaches it.
    phone_until(phone, "says its call is answered", |p| p.in_call()).await;
    for (key, menu) in WALK {
        phone_until(phone, "finishes sending its key", |p| !p.sending_a_key()).await;
        phone.press(key);
        if let Err(calls) = call_reaches(http_addr, menu, STEP).await {
            panic!(
                "after key {key} the call is not in menu {menu} (calls: {calls});\n\
                 the end of the phone's log:\n{}",
                tail(&phone.log(), 60)
            );
        }
    }
    // Hear the streets menu for a while (not a wait: the caller stays on, then hangs up).
    tokio::time::sleep(Duration::from_secs(2)).await;
    phone.hang_up();
    let deadline = std::time::Instant::now() + STEP;
    while !live_calls(http_addr).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the phone's hang-up ended the call:\n{}",
            tail(&phone.log(), 60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait (at most [`STEP`]) until `done` holds for the phone; panics with its log otherwise.
async fn phone_until<P: Phone>(phone: &P, what: &str, done: impl Fn(&P) -> bool) {
    let deadline = std::time::Instant::now() + STEP;
    while !done(phone) {
        assert!(
            std::time::Instant::now() < deadline,
            "the phone never {what}:\n{}",
            tail(&phone.log(), 60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the walk: the server heard exactly the three keys and the call is over.
async fn server_saw_the_walk(http_addr: SocketAddr) {
    let h = health(http_addr).await;
    assert_eq!(h["live_calls"], 0, "{h}");
    assert_eq!(h["calls_completed"], 1, "{h}");
    assert_eq!(h["digits_received"], 3, "each key heard once: {h}");
    assert!(
        h["rtp_packets_received"].as_u64().unwrap() > 100,
        "the phone's audio: {h}"
    );
}

// ---------------------------------------------------------------------------------------------
// baresip

struct Baresip {
    proc: Running,
    log: std::path::PathBuf,
}

impl Baresip {
    /// Start baresip in `dir` dialing 311 on `server` over `transport`.
    fn dial(dir: &Path, server: SocketAddr, transport: Transport) -> Baresip {
        assert!(
            Path::new(BARESIP_MODULES).join("aubridge.so").exists(),
            "baresip modules missing in {BARESIP_MODULES}: apt-get install baresip-core \
             (scripts/test does this)"
        );
        let config = format!(
            "sip_listen\t\t127.0.0.1:{sip}\n\
net_interface\t\t127.0.0.1\n\
rtp_ports\t\t10000-19998\n\
audio_source\t\taubridge,caller\n\
audio_player\t\taubridge,caller\n\
module_path\t\t{BARESIP_MODULES}\n\
module\t\t\tstdio.so\n\
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
        fs::write(
            dir.join("accounts"),
            "<sip:+15550002222@127.0.0.1>;regint=0;audio_codecs=PCMU,PCMA\n",
        )
        .unwrap();
        let log = dir.join("baresip.log");
        let out = fs::File::create(&log).unwrap();
        let target = format!("sip:311@{server}{}", transport.uri_param());
        // stdbuf: baresip prints through stdio, which a file would otherwise hold until exit.
        let proc = Running::interactive(
            Command::new("stdbuf")
                .args(["-oL", "-eL", "baresip", "-s", "-f"])
                .arg(dir)
                .args(["-t", &BARESIP_LIFETIME_S.to_string()])
                .arg("-e")
                .arg(format!("/dial {target}"))
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            "baresip",
        );
        Baresip { proc, log }
    }
}

impl Phone for Baresip {
    fn in_call(&self) -> bool {
        self.log().contains("Call established")
    }

    fn press(&mut self, key: &str) {
        // The `stdio` module reads single keys; in a call a digit is sent as RFC 4733.
        self.proc.send(key);
    }

    fn hang_up(&mut self) {
        self.proc.send("/hangup\n");
    }

    fn log(&self) -> String {
        read_log(&self.log)
    }
}

async fn baresip_walks_the_menu(transport: Transport) {
    let work = WorkDir::new("baresip-caller");
    let srv = start_server(FileConfig::default()).await;
    let mut phone = Baresip::dial(work.path(), srv.sip_addr, transport);
    walk_the_menu(&mut phone, srv.http_addr).await;
    phone.proc.send("/quit\n");
    let status = phone.proc.wait(STEP).await;
    let log = phone.log();
    assert!(status.is_some(), "baresip quit:\n{}", tail(&log, 40));
    assert!(
        log.contains("Call established: sip:311@"),
        "baresip's call was established:\n{}",
        tail(&log, 60)
    );
    // The SIP trace (-s): the INVITE went over the transport asked for.
    let invite = log
        .split("INVITE sip:311@")
        .nth(1)
        .unwrap_or_else(|| panic!("INVITE in baresip's SIP trace:\n{}", tail(&log, 60)));
    assert!(
        invite.contains(&format!("Via: {} 127.0.0.1:", transport.via())),
        "INVITE over {transport:?}:\n{invite}"
    );
    // What baresip decoded (sndfile, written when the call ends): the menus' prompts.
    let (seconds, rms) = recorded_level(work.path(), |n| {
        n.starts_with("dump-") && n.ends_with("-dec.wav")
    })
    .await;
    assert!(
        seconds >= 2.0 && rms >= 0.01,
        "baresip heard the prompts: {seconds:.1} s decoded, RMS {rms:.4}"
    );
    eprintln!("baresip over {transport:?} heard {seconds:.1} s at RMS {rms:.3}");
    server_saw_the_walk(srv.http_addr).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_caller_walks_the_menu_over_udp() {
    baresip_walks_the_menu(Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_caller_walks_the_menu_over_tcp() {
    baresip_walks_the_menu(Transport::Tcp).await;
}

// ---------------------------------------------------------------------------------------------
// linphonec

/// linphonec as a caller, with what it was told to do with keys.
struct LinphoneCaller {
    phone: Linphonec,
    /// Keys sent as RFC 4733 events (`use_rfc2833=1`), not as tones.
    rfc4733: bool,
    pressed: usize,
}

impl Phone for LinphoneCaller {
    fn in_call(&self) -> bool {
        self.phone.output().contains("connected.")
    }

    fn sending_a_key(&self) -> bool {
        // linphone logs the end of each RFC 4733 key (of tones, nothing).
        self.rfc4733
            && self
                .phone
                .debug_log()
                .matches("Finished sending RFC2833 dtmf")
                .count()
                < self.pressed
    }

    fn press(&mut self, key: &str) {
        // A lone digit on the command line is a DTMF key (RFC 4733 with use_rfc2833).
        self.phone.proc.send(&format!("{key}\n"));
        self.pressed += 1;
    }

    fn hang_up(&mut self) {
        self.phone.proc.send("terminate\n");
    }

    fn log(&self) -> String {
        self.phone.log()
    }
}

async fn linphone_walks_the_menu(transport: Transport) {
    linphone_walks_the_menu_with(transport, linphonerc(-1, free_media_port()), false).await;
}

/// With `quiet`, the phone's voice is a faint hum (−36 dBFS, a quiet room) instead of the loud
/// tone the other tests give it.
async fn linphone_walks_the_menu_with(transport: Transport, rc: String, quiet: bool) {
    let work = WorkDir::new("linphone-caller");
    let srv = start_server(FileConfig::default()).await;
    let rfc4733 = rc.contains("use_rfc2833=1");
    let mut phone = Linphonec::start(work.path(), &rc, false);
    if quiet {
        let hum = work.path().join("hum.wav");
        write_tone_at(&hum, 120.0, 20, 500.0);
        phone.proc.send(&format!("play {}\n", hum.display()));
    }
    phone.ready().await;
    phone.proc.send(&format!(
        "call sip:311@{}{}\n",
        srv.sip_addr,
        transport.uri_param()
    ));
    let mut caller = LinphoneCaller {
        phone,
        rfc4733,
        pressed: 0,
    };
    walk_the_menu(&mut caller, srv.http_addr).await;
    let mut phone = caller.phone;
    phone.proc.send("quit\n");
    let status = phone.proc.wait(STEP).await;
    assert!(status.is_some(), "linphonec quit:\n{}", phone.log());
    let out = phone.output();
    assert!(
        out.contains("connected.") && out.contains("Media streams established"),
        "linphonec's call was established:\n{out}"
    );
    let debug = phone.debug_log();
    assert!(
        debug.contains(&format!("Via: {} 127.0.0.1:", transport.via())),
        "linphonec's INVITE went over {transport:?}:\n{}",
        tail(&debug, 60)
    );
    let (seconds, rms) = recorded_level(work.path(), |n| n == "heard.wav").await;
    assert!(
        seconds >= 2.0 && rms >= 0.01,
        "linphonec heard the prompts: {seconds:.1} s recorded, RMS {rms:.4}"
    );
    eprintln!("linphonec over {transport:?} heard {seconds:.1} s at RMS {rms:.3}");
    server_saw_the_walk(srv.http_addr).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_caller_walks_the_menu_over_udp() {
    linphone_walks_the_menu(Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_caller_walks_the_menu_over_tcp() {
    linphone_walks_the_menu(Transport::Tcp).await;
}

/// linphonec set to send its keys as tones in the audio (no RFC 4733, no INFO), as a phone
/// behind a PBX or gateway that does in-band DTMF: it walks the same menu.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linphone_caller_with_in_band_keys_walks_the_menu() {
    let rc = linphonerc(-1, free_media_port()).replace("use_rfc2833=1", "use_rfc2833=0");
    linphone_walks_the_menu_with(Transport::Udp, rc, true).await;
}

// ---------------------------------------------------------------------------------------------
// SIPp over TCP (tests/sipp.rs runs the UDP scenarios)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_caller_with_dtmf_over_tcp() {
    let work = WorkDir::new("sipp-tcp");
    let srv = start_server(FileConfig::default()).await;
    let out = work.path().join("sipp.out");
    let file = fs::File::create(&out).unwrap();
    let mut sipp = Running::spawn(
        Command::new("sipp")
            .arg(srv.sip_addr.to_string())
            .arg("-sf")
            .arg(repo().join("tests/sipp/uac_dtmf.xml"))
            .args(["-t", "t1", "-s", "311", "-i", "127.0.0.1", "-p"])
            .arg(free_sip_port().to_string())
            .args(["-mi", "127.0.0.1", "-mp"])
            .arg(free_media_port().to_string())
            .args([
                "-m",
                "1",
                "-l",
                "1",
                "-nostdin",
                "-timeout",
                "30",
                "-timeout_error",
            ])
            .stdout(file.try_clone().unwrap())
            .stderr(file),
        "sipp",
    );
    let status = sipp.wait(Duration::from_secs(35)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "sipp over TCP failed ({status:?}):\n{}",
        tail(&read_log(&out), 40)
    );
    let h = until_no_calls(srv.http_addr).await;
    assert_eq!(h["calls_completed"], 1, "{h}");
    assert_eq!(h["digits_received"], 3, "{h}");
    assert!(h["rtp_packets_received"].as_u64().unwrap() > 50, "{h}");
    srv.shutdown().await;
}
