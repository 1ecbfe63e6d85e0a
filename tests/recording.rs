//! Recording operator calls, driven from outside over SIP and RTP against the real server on
//! loopback: a caller (test UA) sending 440 Hz talks to operator 1001 (a registered test phone)
//! sending 1000 Hz in a queue with `record: true`; the stereo WAV fetched from the admin API
//! afterwards holds each side in its own channel, told apart by frequency (Goertzel).

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::media::g711::Codec;
use ivr311::media::rtp::{self, RtpStream};
use ivr311::sip::message::Request;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

const CALLER_HZ: f64 = 440.0;
const OPERATOR_HZ: f64 = 1000.0;
const TOKEN: &str = "s3cret";

fn config(record: bool) -> (FileConfig, PathBuf) {
    let mut f = agents_config(&["1001"], 20, 30);
    f.limits.operator_silence_seconds = 0;
    f.queues[0].record = record;
    f.admin.token = Some(TOKEN.into());
    let dir = std::env::temp_dir().join(format!("ivr311-callrec-{}", rand::random::<u64>()));
    f.storage.recordings_dir = dir.clone();
    (f, dir)
}

/// The amplitude of `hz` in one 20 ms frame (Goertzel).
fn amplitude(frame: &[i16], hz: f64) -> f64 {
    let coeff = 2.0 * (std::f64::consts::TAU * hz / 8000.0).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in frame {
        let s = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    2.0 * power.max(0.0).sqrt() / frame.len() as f64
}

/// Whether `hz` is in `pcm`: its median amplitude over the 20 ms frames is over a quarter of
/// what was sent (8000).
fn has_tone(pcm: &[i16], hz: f64) -> bool {
    let mut a: Vec<f64> = pcm.chunks_exact(160).map(|f| amplitude(f, hz)).collect();
    if a.is_empty() {
        return false;
    }
    a.sort_by(|x, y| x.total_cmp(y));
    a[a.len() / 2] > 2000.0
}

/// One party's media: its socket, where the server wants its RTP, its stream and its tone.
struct Voice<'a> {
    sock: &'a UdpSocket,
    to: SocketAddr,
    out: RtpStream,
    hz: f64,
    n: u64,
}

impl Voice<'_> {
    async fn send(&mut self) {
        let pcm: Vec<i16> = (0..160)
            .map(|i| {
                let t = (self.n + i) as f64 / 8000.0;
                ((t * std::f64::consts::TAU * self.hz).sin() * 8000.0) as i16
            })
            .collect();
        self.n += 160;
        let mut payload = [0u8; 160];
        Codec::Pcmu.encode(&pcm, &mut payload);
        let mut buf = [0u8; 200];
        let n = self.out.write(0, &payload, 160, &mut buf);
        self.sock.send_to(&buf[..n], self.to).await.unwrap();
    }

    /// Read (and drop) what arrived, so the socket's buffer never fills.
    fn drain(&self) {
        let mut buf = [0u8; 2048];
        while self.sock.try_recv_from(&mut buf).is_ok() {}
    }
}

/// The RTP payloads (PCMU) the caller receives until operator 1001's phone gets the server's
/// INVITE; the INVITE.
async fn hear_until_offered(caller: &TestUa, op: &TestAgent) -> (Vec<Vec<u8>>, Request) {
    hear_at_until_offered(&caller.rtp, op).await
}

/// The RTP payloads (PCMU) arriving at `rtp` until operator 1001's phone gets the server's
/// INVITE; the INVITE.
async fn hear_at_until_offered(rtp: &UdpSocket, op: &TestAgent) -> (Vec<Vec<u8>>, Request) {
    let mut heard = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = rtp.try_recv_from(&mut buf) {
            if let Ok(p) = rtp::parse(&buf[..n]) {
                if p.payload_type == 0 {
                    heard.push(p.payload.to_vec());
                }
            }
        }
        if let Some(ivr311::sip::message::Message::Request(r)) =
            op.recv(Duration::from_millis(20)).await
        {
            if r.method.as_str() == "INVITE" {
                return (heard, r);
            }
        }
        assert!(Instant::now() < deadline, "the operator's phone never rang");
    }
}

/// The caller presses 1, 1, 0 (English, not an emergency, an operator); what the caller heard
/// until the operator's phone rang, then the phone answers: the server's INVITE.
async fn to_operator(
    srv: &ivr311::server::RunningServer,
) -> (TestUa, TestAgent, Vec<Vec<u8>>, Request) {
    let op = TestAgent::login(srv.sip_addr, "1001").await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    assert_eq!(caller.call("0 101").await.code, 200);
    caller.until_audio().await;
    caller.keys("110").await;
    let (heard, inv) = hear_until_offered(&caller, &op).await;
    op.reply(&inv, 200, "OK", Some(op.answer_sdp())).await;
    op.request("ACK", Duration::from_secs(3)).await;
    (caller, op, heard, inv)
}

/// Both talk (one packet each 20 ms, as phones send) for `window`.
async fn talk(caller: &TestUa, op: &TestAgent, inv: &Request, window: Duration) {
    let at_op = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    talk_between(
        (&caller.rtp, caller.remote_rtp.unwrap()),
        (&op.rtp, at_op),
        window,
    )
    .await;
}

/// The caller (its socket, where the server wants its RTP) sends 440 Hz and the operator
/// 1000 Hz, one packet each 20 ms, for `window`.
async fn talk_between(
    caller: (&UdpSocket, SocketAddr),
    op: (&UdpSocket, SocketAddr),
    window: Duration,
) {
    let mut voices = [
        Voice {
            sock: caller.0,
            to: caller.1,
            out: RtpStream::new(),
            hz: CALLER_HZ,
            n: 0,
        },
        Voice {
            sock: op.0,
            to: op.1,
            out: RtpStream::new(),
            hz: OPERATOR_HZ,
            n: 0,
        },
    ];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        for v in voices.iter_mut() {
            v.send().await;
            v.drain();
        }
    }
}

/// `GET path` with these headers: status and body bytes.
async fn get_bytes(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw[split + 4..].to_vec())
}

/// The call's recording from the admin API, once it is there (at most 20 s: it is finished
/// after the call ends, off the call's path, which on a loaded machine takes a while).
async fn fetch_recording(addr: SocketAddr, call_id: &str) -> Vec<u8> {
    let path = format!("/admin/calls/{call_id}/recording");
    let auth = format!("Bearer {TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get_bytes(addr, &path, &[("Authorization", &auth)]).await;
        if status == 200 {
            return body;
        }
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
        assert!(Instant::now() < deadline, "no recording of the call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_call_is_recorded_in_stereo_caller_left_operator_right_for_staff_only() {
    let (file, dir) = config(true);
    let srv = start_server(file).await;
    let (mut caller, op, _heard, inv) = to_operator(&srv).await;
    let answered = Instant::now();
    talk(&caller, &op, &inv, Duration::from_secs(3)).await;
    caller.bye().await;
    let talk_time = answered.elapsed().as_secs_f64();

    let wav = fetch_recording(srv.http_addr, &caller.call_id).await;
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).expect("a WAV file");
    let spec = reader.spec();
    assert_eq!(spec.channels, 2, "stereo");
    assert_eq!(spec.sample_rate, 8000);
    assert_eq!(spec.bits_per_sample, 16);
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
    let right: Vec<i16> = samples.iter().skip(1).step_by(2).copied().collect();
    assert!(has_tone(&left, CALLER_HZ), "the caller is on the left");
    assert!(!has_tone(&left, OPERATOR_HZ), "only the caller on the left");
    assert!(
        has_tone(&right, OPERATOR_HZ),
        "the operator is on the right"
    );
    assert!(
        !has_tone(&right, CALLER_HZ),
        "only the operator on the right"
    );
    let seconds = left.len() as f64 / 8000.0;
    assert!(
        (seconds - talk_time).abs() < 1.0,
        "{seconds:.2} s recorded for {talk_time:.2} s of talk"
    );

    // Staff only: no token, no recording.
    let path = format!("/admin/calls/{}/recording", caller.call_id);
    let (status, _) = get_bytes(srv.http_addr, &path, &[]).await;
    assert_eq!(status, 403, "the recording needs the admin token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let calls = dir.join("calls");
        for e in std::fs::read_dir(&calls).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "a call recording is private");
        }
    }
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_without_record_writes_no_recording() {
    let (file, dir) = config(false);
    let srv = start_server(file).await;
    let (mut caller, op, _heard, inv) = to_operator(&srv).await;
    talk(&caller, &op, &inv, Duration::from_secs(1)).await;
    caller.bye().await;
    // The call is over once it leaves the live calls.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !admin_calls_token(srv.http_addr).await.is_empty() {
        assert!(Instant::now() < deadline, "the call did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = format!("/admin/calls/{}/recording", caller.call_id);
    let auth = format!("Bearer {TOKEN}");
    let (status, _) = get_bytes(srv.http_addr, &path, &[("Authorization", &auth)]).await;
    assert_eq!(status, 404);
    let files = std::fs::read_dir(dir.join("calls")).map_or(0, |d| d.count());
    assert_eq!(files, 0, "no file written");
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn admin_calls_token(addr: SocketAddr) -> Vec<serde_json::Value> {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        addr,
        "GET",
        "/admin/calls",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Every 20 ms frame of prompt `name` in English, as PCMU.
fn prompt_frames(name: &str) -> Vec<Vec<u8>> {
    let p = prompts().get("en", name).expect("the prompt ships");
    (0..p.frames())
        .map(|i| {
            let mut f = [0u8; 160];
            p.frame(Codec::Pcmu, i, &mut f);
            f.to_vec()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_hears_the_whole_recording_announcement_before_an_operator_is_rung() {
    let (mut file, dir) = config(true);
    file.queues[0].record_announcement = Some("call_recorded".into());
    let srv = start_server(file).await;
    let op = TestAgent::login(srv.sip_addr, "1001").await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    assert_eq!(caller.call("0 101").await.code, 200);
    caller.until_audio().await;
    caller.keys("110").await;
    let mut heard = caller
        .listen_for("en", "call_recorded", Duration::from_secs(10))
        .await;
    // A key (1 would leave a queue for a ticket) does not skip the announcement.
    caller.press('1').await;
    let (rest, inv) = hear_until_offered(&caller, &op).await;
    heard.extend(rest);

    let ear = PromptEar::new("en", &["call_recorded"], Codec::Pcmu);
    assert_eq!(ear.playbacks(&heard), ["call_recorded"], "heard once");
    // The announcement's recognisable frames in order; its end must be heard before the ring.
    // (Under a loaded machine the media clock may drop a late frame here and there, so the
    // test asks for the end and for most of the rest, not for every frame.)
    let marks: Vec<Vec<u8>> = prompt_frames("call_recorded")
        .into_iter()
        .filter(|f| ear.frames_heard(std::slice::from_ref(f)) == 1)
        .collect();
    let got = ear.frames_heard(&heard);
    assert!(
        got * 100 >= marks.len() * 85,
        "{got} of the announcement's {} frames heard before the operator's phone rang",
        marks.len()
    );
    let tail = &marks[marks.len() - 10..];
    let tail_heard = tail.iter().filter(|f| heard.contains(f)).count();
    assert!(
        tail_heard >= 7,
        "only {tail_heard} of the announcement's last 10 frames heard before the operator's phone rang"
    );
    // And the call goes on to the operator, recorded.
    op.reply(&inv, 200, "OK", Some(op.answer_sdp())).await;
    op.request("ACK", Duration::from_secs(3)).await;
    talk(&caller, &op, &inv, Duration::from_secs(1)).await;
    caller.bye().await;
    fetch_recording(srv.http_addr, &caller.call_id).await;
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_during_a_recorded_call_leaves_a_whole_wav() {
    let (file, dir) = config(true);
    let srv = start_server(file).await;
    let (caller, op, _heard, inv) = to_operator(&srv).await;
    talk(&caller, &op, &inv, Duration::from_secs(1)).await;
    srv.shutdown().await;
    let path = dir
        .join("calls")
        .join(format!("call-{}.wav", call_hash(&caller.call_id)));
    let reader =
        hound::WavReader::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(reader.spec().channels, 2);
    assert!(
        reader.duration() >= 8000 / 2,
        "{} samples per channel",
        reader.duration()
    );
    let parts = std::fs::read_dir(dir.join("calls"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".part")
        })
        .count();
    assert_eq!(parts, 0, "no unfinished file left");
    let _ = std::fs::remove_dir_all(dir);
}

/// The first 16 bytes of the SHA-256 of `call_id`, in hex: the recording's file name.
fn call_hash(call_id: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(call_id.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The number the trunk asserts for the caller (P-Asserted-Identity from a trusted source):
/// only such a number is called back.
const CALLER_NUMBER: &str = "+12122000123";

/// `POST path` as the admin.
async fn admin_post(addr: SocketAddr, path: &str) -> u16 {
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    http(addr, "POST", path, &headers, br#"{"reason":"meeting"}"#)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_is_announced_then_recorded_in_stereo_as_the_call_that_asked_for_it() {
    // The trunk's stand-in is a bare SIP endpoint: bound first, so the config can name it.
    let trunk_sip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (mut file, dir) = config(true);
    file.queues[0].record_announcement = Some("call_recorded".into());
    file.callback = ivr311::config::CallbackConfig {
        trunk_uri: Some(format!("sip:{}", trunk_sip.local_addr().unwrap())),
        ring_timeout_seconds: 5,
        attempts: 1,
        first_delay_seconds: 0,
        ..Default::default()
    };
    file.trunks = ivr311::config::TrunksConfig {
        allow: vec!["127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    let srv = start_server(file).await;
    let op = TestAgent::login(srv.sip_addr, "1001").await;
    let trunk = TestAgent {
        id: "trunk".into(),
        sip: trunk_sip,
        rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        server: srv.sip_addr,
    };

    // The operator is busy elsewhere: the caller waits, asks for a call-back and hangs up.
    // (The queue learns of the registration just after the REGISTER is answered: until
    // then the agent is unknown to it.)
    until(
        "the operator is paused",
        Duration::from_secs(10),
        async || {
            (admin_post(srv.http_addr, "/admin/agents/1001/pause").await / 100 == 2).then_some(())
        },
    )
    .await;
    let mut caller = TestUa::udp(srv.sip_addr).await;
    let pai = format!("P-Asserted-Identity: <sip:{CALLER_NUMBER}@127.0.0.1>\r\n");
    assert_eq!(caller.call_with("0 101", &pai).await.1.code, 200);
    caller.until_audio().await;
    caller.keys("110").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let calls = admin_calls_token(srv.http_addr).await;
        let waiting = calls.iter().any(|c| {
            c["call_id"] == caller.call_id.as_str() && c["state"] == "waiting for operator"
        });
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "never waiting: {calls:?}");
        caller.listen(Duration::from_millis(50)).await;
    }
    caller.press('2').await;
    caller.expect_request("BYE", Duration::from_secs(15)).await;

    // The operator is back: the caller is called back and answers.
    assert_eq!(
        admin_post(srv.http_addr, "/admin/agents/1001/unpause").await / 100,
        2
    );
    let inv = trunk.request("INVITE", Duration::from_secs(5)).await;
    assert_eq!(inv.header("X-311-Call-ID"), Some(caller.call_id.as_str()));
    let at_caller = ivr311::media::sdp::parse(&inv.body).unwrap().addr;
    trunk.reply(&inv, 200, "OK", Some(trunk.answer_sdp())).await;
    trunk.request("ACK", Duration::from_secs(3)).await;

    // The greeting, then the whole recording announcement, before the operator's phone rings.
    let (heard, ainv) = hear_at_until_offered(&trunk.rtp, &op).await;
    let ear = PromptEar::new("en", &["callback_hello", "call_recorded"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&heard),
        ["callback_hello", "call_recorded"],
        "{} packets heard before the operator's phone rang",
        heard.len()
    );
    let marks: Vec<Vec<u8>> = prompt_frames("call_recorded")
        .into_iter()
        .filter(|f| ear.frames_heard(std::slice::from_ref(f)) == 1)
        .collect();
    let tail_heard = marks[marks.len() - 10..]
        .iter()
        .filter(|f| heard.contains(f))
        .count();
    assert!(
        tail_heard >= 7,
        "only {tail_heard} of the announcement's last 10 frames heard before the operator's phone rang"
    );

    // The operator answers; they talk; the called-back caller hangs up.
    op.reply(&ainv, 200, "OK", Some(op.answer_sdp())).await;
    op.request("ACK", Duration::from_secs(3)).await;
    let at_op = ivr311::media::sdp::parse(&ainv.body).unwrap().addr;
    talk_between(
        (&trunk.rtp, at_caller),
        (&op.rtp, at_op),
        Duration::from_secs(3),
    )
    .await;
    let me = trunk.sip.local_addr().unwrap();
    let bye = format!(
        "BYE sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKtrunkbye;rport\r\nMax-Forwards: 70\r\n\
From: {to};tag=agtrunk\r\nTo: {from}\r\nCall-ID: {cid}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        to = inv.to.raw,
        from = inv.from.raw,
        cid = inv.call_id,
    );
    trunk
        .sip
        .send_to(bye.as_bytes(), srv.sip_addr)
        .await
        .unwrap();

    // The recording is the original call's: the caller left, the operator right.
    let wav = fetch_recording(srv.http_addr, &caller.call_id).await;
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).expect("a WAV file");
    assert_eq!(reader.spec().channels, 2, "stereo");
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
    let right: Vec<i16> = samples.iter().skip(1).step_by(2).copied().collect();
    assert!(has_tone(&left, CALLER_HZ), "the caller is on the left");
    assert!(!has_tone(&left, OPERATOR_HZ), "only the caller on the left");
    assert!(
        has_tone(&right, OPERATOR_HZ),
        "the operator is on the right"
    );
    assert!(
        !has_tone(&right, CALLER_HZ),
        "only the operator on the right"
    );
    let seconds = left.len() as f64 / 8000.0;
    assert!(
        (2.0..5.0).contains(&seconds),
        "{seconds:.2} s recorded for 3 s of talk"
    );
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
