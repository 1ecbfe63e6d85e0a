//! A small SIP/RTP test user agent and helpers to run the real server on port 0.
//!
//! The UA speaks real SIP over UDP (or TCP) and real RTP to the server, sends RFC 4733 digits
//! the way phones do (start, continuations, three End packets), and recognises which prompt the
//! server is playing by matching the RTP payload against the prompt files themselves.
#![allow(dead_code)]

pub mod browser;
pub mod dns;
pub mod kamailio;
pub mod postgres;
pub mod voices;

use ivr311::config::{parse_port_range, FileConfig, ServeArgs};
use ivr311::media::dtmf::{digit_to_event, TelephoneEvent};
use ivr311::media::g711::Codec;
use ivr311::media::prompt::PromptStore;
use ivr311::media::rtp::{self, RtpStream};
use ivr311::media::sdp;
use ivr311::menu::schedule::WallClock;
use ivr311::server::{self, RunningServer};
use ivr311::sip::message::{parse_datagram, Message, Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A random RTP port range so parallel test binaries rarely meet (the pool skips busy ports).
/// A 200-port RTP range of its own for each server a test binary starts: servers of one binary
/// run side by side, and two with the same range handed out the same ports, so one call's RTP
/// (still sent by a test's phone as its server stopped) reached another test's call.
fn rtp_range() -> String {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(u16::MAX);
    let _ = NEXT.compare_exchange(
        u16::MAX,
        rand::random::<u16>() % 200,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let slot = NEXT.fetch_add(1, Ordering::Relaxed) % 200;
    let lo = 20000 + slot * 200;
    format!("{lo}-{}", lo + 198)
}

pub fn serve_args() -> ServeArgs {
    ServeArgs {
        sip: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        menu: repo().join("menus/311.yaml"),
        prompts: repo().join("prompts"),
        db: std::env::temp_dir().join(format!("ivr311-test-{}.db", rand::random::<u64>())),
        rtp_ports: parse_port_range(&rtp_range()).unwrap(),
        config: None,
    }
}

/// Start the real server on loopback, port 0.
pub async fn start_server(file: FileConfig) -> RunningServer {
    start_server_with(serve_args(), file).await
}

/// Start the real server with these flags (loopback, port 0). Its clock reads a Monday at
/// 10:00 in New York, whenever the tests run, so that the shipped menu's call centre is open
/// (its operator key reaches the queue); [`start_server_at`] sets another time.
pub async fn start_server_with(args: ServeArgs, file: FileConfig) -> RunningServer {
    start_server_at(args, file, in_hours()).await
}

/// A clock that reads Monday 2026-12-07 10:00 in New York as a test starts, and runs on.
pub fn in_hours() -> WallClock {
    WallClock::starting_at("2026-12-07T15:00:00Z".parse().unwrap())
}

/// Start the real server with its schedules read by `clock` (e.g. a Monday at 20:00).
pub async fn start_server_at(args: ServeArgs, file: FileConfig, clock: WallClock) -> RunningServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let mut file = file;
    file.limits.drain_seconds = 0;
    if file.storage.recordings_dir == std::path::Path::new("recordings") {
        file.storage.recordings_dir =
            std::env::temp_dir().join(format!("ivr311-rec-{}", rand::random::<u64>()));
    }
    server::start_with_clock(&args, file, clock)
        .await
        .expect("server starts")
}

/// The shipped prompts, loaded once per test binary.
pub fn prompts() -> Arc<PromptStore> {
    static P: OnceLock<Arc<PromptStore>> = OnceLock::new();
    P.get_or_init(|| Arc::new(PromptStore::load_dir(&repo().join("prompts")).unwrap()))
        .clone()
}

/// Recognises prompts from RTP payloads: every 20 ms frame that belongs to exactly one prompt.
pub struct PromptEar {
    frames: HashMap<Vec<u8>, (String, usize)>,
}

impl PromptEar {
    pub fn new(lang: &str, names: &[&str], codec: Codec) -> Self {
        let store = prompts();
        let mut count: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut frames = HashMap::new();
        for n in names {
            let p = store
                .get(lang, n)
                .unwrap_or_else(|| panic!("prompt {lang}/{n}"));
            for i in 0..p.frames() {
                let mut f = [0u8; 160];
                p.frame(codec, i, &mut f);
                *count.entry(f.to_vec()).or_default() += 1;
                frames.insert(f.to_vec(), (n.to_string(), i));
            }
        }
        // A frame heard in one prompt only, and not (nearly) silent: the quiet frames at the
        // edges of words (peak under -50 dBFS) recur across prompts by chance.
        let audible = |f: &[u8]| {
            let mut pcm = [0i16; 160];
            codec.decode(f, &mut pcm);
            pcm.iter().any(|s| s.unsigned_abs() >= 100)
        };
        frames.retain(|f, _| count[f] == 1 && audible(f));
        PromptEar { frames }
    }

    /// How many of `payloads` are frames of the prompts this ear knows.
    pub fn frames_heard(&self, payloads: &[Vec<u8>]) -> usize {
        payloads
            .iter()
            .filter(|p| self.frames.contains_key(*p))
            .count()
    }

    /// The sequence of prompt playbacks heard in `payloads` (a new playback when the prompt
    /// changes or its frame index goes backwards).
    pub fn playbacks(&self, payloads: &[Vec<u8>]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut last: Option<(String, usize)> = None;
        for p in payloads {
            if let Some((name, idx)) = self.frames.get(p) {
                let new = match &last {
                    Some((n, i)) => n != name || idx < i,
                    None => true,
                };
                if new {
                    out.push(name.clone());
                }
                last = Some((name.clone(), *idx));
            }
        }
        out
    }
}

enum Sip {
    Udp(UdpSocket),
    Tcp(tokio::sync::Mutex<TcpStream>, tokio::sync::Mutex<Vec<u8>>),
}

/// A test user agent: one SIP socket, one RTP socket.
pub struct TestUa {
    sip: Sip,
    pub local: SocketAddr,
    pub server: SocketAddr,
    pub rtp: UdpSocket,
    pub call_id: String,
    pub from_tag: String,
    pub to_tag: Option<String>,
    pub cseq: u32,
    pub invite_branch: String,
    pub remote_rtp: Option<SocketAddr>,
    pub codec: Codec,
    pub rtp_out: RtpStream,
    /// The user part of our From (the number the caller claims). Default `+15550001111`.
    pub from_user: String,
    /// The user part of the INVITE's Request-URI (the number dialled). Default `311`.
    pub request_user: String,
    /// The user part of our To. Default `311`.
    pub to_user: String,
    /// SIP messages received but not consumed yet.
    backlog: Vec<Message>,
    /// When the answer came through a proxy that record-routes: the far end's Contact and the
    /// route set, which in-dialog requests then follow (RFC 3261 12.1.2).
    route: Option<(String, Vec<String>)>,
    /// The Via branches of the requests we sent: responses to others are strays.
    branches: std::sync::Mutex<Vec<String>>,
}

impl TestUa {
    pub async fn udp(server: SocketAddr) -> TestUa {
        let sock = UdpSocket::bind(loopback_like(server)).await.unwrap();
        let local = sock.local_addr().unwrap();
        Self::with(Sip::Udp(sock), local, server).await
    }

    pub async fn tcp(server: SocketAddr) -> TestUa {
        let s = TcpStream::connect(server).await.unwrap();
        Self::tcp_accepted(s, server).await
    }

    /// A test user agent on a TCP connection the server opened to us (`stream`, accepted by
    /// the test): a trunk that the server registered with, sending calls back along it.
    pub async fn tcp_accepted(stream: TcpStream, server: SocketAddr) -> TestUa {
        let local = stream.local_addr().unwrap();
        Self::with(
            Sip::Tcp(
                tokio::sync::Mutex::new(stream),
                tokio::sync::Mutex::new(Vec::new()),
            ),
            local,
            server,
        )
        .await
    }

    async fn with(sip: Sip, local: SocketAddr, server: SocketAddr) -> TestUa {
        let rtp = UdpSocket::bind(loopback_like(server)).await.unwrap();
        TestUa {
            sip,
            local,
            server,
            rtp,
            call_id: format!("{}@test", rand::random::<u64>()),
            from_tag: format!("{}", rand::random::<u32>()),
            to_tag: None,
            cseq: 1,
            invite_branch: String::new(),
            remote_rtp: None,
            codec: Codec::Pcmu,
            rtp_out: RtpStream::new(),
            from_user: "+15550001111".to_owned(),
            request_user: "311".to_owned(),
            to_user: "311".to_owned(),
            backlog: Vec::new(),
            route: None,
            branches: Default::default(),
        }
    }

    fn transport(&self) -> &'static str {
        match self.sip {
            Sip::Udp(_) => "UDP",
            Sip::Tcp(..) => "TCP",
        }
    }

    pub async fn send_raw(&self, bytes: &[u8]) {
        // The Via branches we send (found loosely, so that requests broken on purpose count).
        let text = String::from_utf8_lossy(bytes);
        for part in text.split("branch=").skip(1) {
            let branch: String = part
                .chars()
                .take_while(|c| !matches!(c, ';' | ',' | ' ' | '\r' | '\n'))
                .collect();
            let mut ours = self.branches.lock().unwrap();
            if !branch.is_empty() && !ours.contains(&branch) {
                ours.push(branch);
            }
        }
        match &self.sip {
            Sip::Udp(s) => {
                s.send_to(bytes, self.server).await.unwrap();
            }
            Sip::Tcp(s, _) => {
                s.lock().await.write_all(bytes).await.unwrap();
            }
        }
    }

    /// A response to a request this UA never sent (its top Via branch is none of ours). Over
    /// UDP, a port this UA was given may have been another socket's a moment ago, in this test
    /// process or another: a server that answered that socket's INVITE with an error
    /// retransmits the response until it is ACKed (RFC 3261 section 17.2.1, for up to 64·T1),
    /// to this port. A phone discards such a response (section 18.1.2), and so does this UA.
    fn stray(&self, m: &Message) -> bool {
        let Message::Response(r) = m else {
            return false;
        };
        let branch = r.header("Via").and_then(|v| {
            v.split(';')
                .find_map(|p| p.trim().strip_prefix("branch="))
                .map(|b| b.split(',').next().unwrap_or(b).trim().to_owned())
        });
        branch.is_some_and(|b| !self.branches.lock().unwrap().contains(&b))
    }

    /// Receive the next SIP message within `timeout`. Datagrams from anything but the server,
    /// and responses to requests this UA never sent, are not for this UA and are dropped.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Message> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        match &self.sip {
            Sip::Udp(s) => {
                let mut buf = vec![0u8; 65535];
                loop {
                    let (n, from) = tokio::time::timeout_at(deadline, s.recv_from(&mut buf))
                        .await
                        .ok()?
                        .ok()?;
                    let m = match parse_datagram(&buf[..n], 65536) {
                        Ok(m) => m,
                        Err(e) if from == self.server => panic!("server sent unparseable SIP: {e}"),
                        Err(_) => continue,
                    };
                    if from == self.server && !self.stray(&m) {
                        return Some(m);
                    }
                }
            }
            Sip::Tcp(s, pending) => {
                let mut pending = pending.lock().await;
                loop {
                    if let Ok(ivr311::sip::message::Frame::Complete(n)) =
                        ivr311::sip::message::frame_stream(&pending, 65536)
                    {
                        let msg: Vec<u8> = pending.drain(..n).collect();
                        return Some(
                            ivr311::sip::message::parse_stream_message(&msg, 65536).expect("parse"),
                        );
                    }
                    let mut buf = [0u8; 4096];
                    let n = tokio::time::timeout_at(deadline, s.lock().await.read(&mut buf))
                        .await
                        .ok()?
                        .ok()?;
                    if n == 0 {
                        return None;
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    /// Wait for a response with `code` to the request with CSeq `method`.
    pub async fn expect_response(
        &mut self,
        method: &str,
        code: u16,
        timeout: Duration,
    ) -> Response {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(Message::Response(r))
                    if r.cseq_method.as_str() == method && r.code == code =>
                {
                    return r
                }
                Some(Message::Response(r)) if r.cseq_method.as_str() == method && r.code < 200 => {
                    continue
                }
                Some(Message::Response(r)) => {
                    panic!(
                        "expected {code} to {method}, got {} to {}",
                        r.code, r.cseq_method
                    )
                }
                Some(Message::Request(req)) => {
                    self.answer_request(&req).await;
                }
                None => panic!("no {code} to {method} within {timeout:?}"),
            }
        }
    }

    /// Wait for a request with `method` from the server (answering it 200).
    pub async fn expect_request(&mut self, method: &str, timeout: Duration) -> Request {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(Message::Request(r)) => {
                    self.answer_request(&r).await;
                    if r.method.as_str() == method {
                        return r;
                    }
                }
                Some(Message::Response(_)) => continue,
                None => panic!("no {method} within {timeout:?}"),
            }
        }
    }

    /// Answer a request from the server with 200 OK.
    pub async fn answer_request(&self, req: &Request) {
        if req.method.as_str() == "ACK" {
            return;
        }
        let resp = ivr311::sip::message::ResponseBuilder::new(req, 200, "OK", None).build();
        self.send_raw(&resp).await;
    }

    pub fn offer(&self, codecs: &str) -> String {
        let a = self.rtp.local_addr().unwrap();
        let mut s = format!(
            "v=0\r\no=test 1 1 IN {fam} {ip}\r\ns=-\r\nc=IN {fam} {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP {codecs}\r\n",
            fam = if a.is_ipv6() { "IP6" } else { "IP4" },
            ip = a.ip(),
            port = a.port()
        );
        for pt in codecs.split(' ') {
            match pt {
                "0" => s.push_str("a=rtpmap:0 PCMU/8000\r\n"),
                "8" => s.push_str("a=rtpmap:8 PCMA/8000\r\n"),
                "18" => s.push_str("a=rtpmap:18 G729/8000\r\n"),
                "101" => s.push_str("a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n"),
                _ => {}
            }
        }
        s.push_str("a=ptime:20\r\na=sendrecv\r\n");
        s
    }

    pub fn invite_bytes(&mut self, sdp: &str) -> Vec<u8> {
        self.invite_bytes_with(sdp, "")
    }

    /// [`TestUa::invite_bytes`] with `extra` header lines (each ending in CRLF).
    pub fn invite_bytes_with(&mut self, sdp: &str, extra: &str) -> Vec<u8> {
        self.invite_branch = format!("z9hG4bK{}", rand::random::<u64>());
        format!(
            "INVITE sip:{ruser}@{srv} SIP/2.0\r\n\
Via: SIP/2.0/{tr} {me};branch={br};rport\r\n\
Max-Forwards: 70\r\n\
From: \"Test Caller\" <sip:{user}@{me}>;tag={tag}\r\n\
To: <sip:{tuser}@{srv}>\r\n\
Call-ID: {cid}\r\n\
CSeq: {cseq} INVITE\r\n\
Contact: <sip:caller@{me}>\r\n\
{extra}Content-Type: application/sdp\r\n\
Content-Length: {len}\r\n\r\n{sdp}",
            srv = self.server,
            tr = self.transport(),
            me = self.local,
            br = self.invite_branch,
            user = self.from_user,
            ruser = self.request_user,
            tuser = self.to_user,
            tag = self.from_tag,
            cid = self.call_id,
            cseq = self.cseq,
            len = sdp.len(),
        )
        .into_bytes()
    }

    /// INVITE with our offer; returns the final response (after ACKing a 2xx).
    pub async fn call(&mut self, codecs: &str) -> Response {
        self.call_with(codecs, "").await.1
    }

    /// [`TestUa::call`] with `extra` header lines in the INVITE; also returns the codes of the
    /// provisional responses that came before the final one.
    pub async fn call_with(&mut self, codecs: &str, extra: &str) -> (Vec<u16>, Response) {
        let sdp = self.offer(codecs);
        let inv = self.invite_bytes_with(&sdp, extra);
        self.send_raw(&inv).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut provisional = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(Message::Response(r))
                    if r.cseq_method.as_str() == "INVITE" && r.code < 200 =>
                {
                    provisional.push(r.code);
                    continue;
                }
                Some(Message::Response(r)) if r.cseq_method.as_str() == "INVITE" => {
                    if r.code < 300 {
                        self.to_tag = r.to.tag().map(str::to_owned);
                        self.keep_route_set(&r);
                        let remote = sdp::parse(&r.body).expect("answer SDP parses");
                        self.remote_rtp = Some(remote.addr);
                        let neg = sdp::negotiate(&remote, &[Codec::Pcmu, Codec::Pcma]).unwrap();
                        self.codec = neg.codec;
                        self.ack().await;
                    }
                    return (provisional, r);
                }
                Some(other) => self.backlog.push(other),
                None => panic!("no final response to INVITE"),
            }
        }
    }

    /// INVITE without SDP (a delayed offer, as many trunks send): the server's 200 carries its
    /// offer, and our ACK carries the answer, `Some(codecs)` (payload types, as for
    /// [`TestUa::offer`]), or no body at all. Returns the final response.
    pub async fn call_delayed_offer(&mut self, answer: Option<&str>) -> Response {
        let inv = self.invite_bytes("");
        self.send_raw(&inv).await;
        let r = loop {
            match self.recv(Duration::from_secs(5)).await {
                Some(Message::Response(r))
                    if r.cseq_method.as_str() == "INVITE" && r.code >= 200 =>
                {
                    break r
                }
                Some(Message::Response(_)) => continue,
                Some(other) => self.backlog.push(other),
                None => panic!("no final response to INVITE"),
            }
        };
        if r.code < 300 {
            self.to_tag = r.to.tag().map(str::to_owned);
            let offer = sdp::parse(&r.body).expect("the 200 carries an offer");
            self.remote_rtp = Some(offer.addr);
            let body = match answer {
                Some(codecs) => {
                    let a = self.offer(codecs);
                    let neg = sdp::negotiate(
                        &sdp::parse(a.as_bytes()).unwrap(),
                        &[Codec::Pcmu, Codec::Pcma],
                    )
                    .unwrap();
                    self.codec = neg.codec;
                    a
                }
                None => String::new(),
            };
            let extra = if body.is_empty() {
                ""
            } else {
                "Content-Type: application/sdp\r\n"
            };
            let ack = self.in_dialog("ACK", extra, &body);
            self.send_raw(&ack).await;
        }
        r
    }

    /// Keep the route set of a 2xx that came through a record-routing proxy.
    fn keep_route_set(&mut self, r: &Response) {
        let mut routes: Vec<String> = r
            .headers_named("Record-Route")
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        routes.reverse();
        if let (false, Some(contact)) = (routes.is_empty(), r.contacts().first()) {
            self.route = Some((contact.uri.clone(), routes));
        }
    }

    /// From now on send in-dialog requests as a phone with an outbound proxy that ignores
    /// Record-Route does: to the proxy, addressed to the far end's Contact, with no Route.
    pub fn ignore_record_route(&mut self) {
        if let Some((_, routes)) = self.route.as_mut() {
            routes.clear();
        }
    }

    pub fn in_dialog(&mut self, method: &str, extra: &str, body: &str) -> Vec<u8> {
        if method != "ACK" {
            self.cseq += 1;
        }
        let (target, routes) = match &self.route {
            Some((target, routes)) => (
                target.clone(),
                routes.iter().map(|r| format!("Route: {r}\r\n")).collect(),
            ),
            None => (format!("sip:ivr311@{}", self.server), String::new()),
        };
        let branch = if method == "ACK" {
            format!("z9hG4bKack{}", rand::random::<u32>())
        } else {
            format!("z9hG4bK{}", rand::random::<u64>())
        };
        format!(
            "{method} {target} SIP/2.0\r\n\
Via: SIP/2.0/{tr} {me};branch={branch};rport\r\n\
{routes}Max-Forwards: 70\r\n\
From: <sip:{user}@{me}>;tag={tag}\r\n\
To: <sip:{tuser}@{srv}>;tag={tt}\r\n\
Call-ID: {cid}\r\n\
CSeq: {cseq} {method}\r\n\
Contact: <sip:caller@{me}>\r\n\
{extra}Content-Length: {len}\r\n\r\n{body}",
            srv = self.server,
            tr = self.transport(),
            me = self.local,
            user = self.from_user,
            tuser = self.to_user,
            tag = self.from_tag,
            tt = self.to_tag.clone().unwrap_or_default(),
            cid = self.call_id,
            cseq = self.cseq,
            len = body.len(),
        )
        .into_bytes()
    }

    pub async fn ack(&mut self) {
        let ack = self.in_dialog("ACK", "", "");
        self.send_raw(&ack).await;
    }

    pub async fn bye(&mut self) -> Response {
        let bye = self.in_dialog("BYE", "", "");
        self.send_raw(&bye).await;
        self.expect_response("BYE", 200, Duration::from_secs(5))
            .await
    }

    /// Send one RFC 4733 key press as a phone does: start + continuations, then End three times.
    pub async fn press(&mut self, digit: char) {
        let remote = self.remote_rtp.expect("call is up");
        let event = digit_to_event(digit).expect("digit");
        let ts = self.rtp_out.timestamp();
        let mut buf = [0u8; 64];
        for i in 0..4u16 {
            let ev = TelephoneEvent {
                event,
                end: false,
                volume: 10,
                duration: (i + 1) * 160,
            };
            let n = self
                .rtp_out
                .write_at(101, ts, i == 0, &ev.write(), &mut buf);
            self.rtp.send_to(&buf[..n], remote).await.unwrap();
            // Paced as a phone sends, one packet each 20 ms: not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..3 {
            let ev = TelephoneEvent {
                event,
                end: true,
                volume: 10,
                duration: 800,
            };
            let n = self.rtp_out.write_at(101, ts, false, &ev.write(), &mut buf);
            self.rtp.send_to(&buf[..n], remote).await.unwrap();
        }
        self.rtp_out.skip(960);
        self.drain_rtp();
    }

    /// Press a key as a phone without RFC 4733 does: 100 ms of its two DTMF tones (−10 dBFS
    /// each) in the call's audio, then 60 ms of silence.
    pub async fn press_tone(&mut self, digit: char) {
        let remote = self.remote_rtp.expect("call is up");
        let mut buf = [0u8; 200];
        let mut payload = [0u8; 160];
        for p in 0..8usize {
            let pcm = match p {
                0..5 => ivr311::media::inband::tone(digit, p * 160, 160, 10_000.0).expect("a key"),
                _ => vec![0; 160],
            };
            self.codec.encode(&pcm, &mut payload);
            let n = self
                .rtp_out
                .write(self.codec.payload_type(), &payload, 160, &mut buf);
            self.rtp.send_to(&buf[..n], remote).await.unwrap();
            // Paced as a phone sends, one packet each 20 ms: not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.drain_rtp();
    }

    /// Discard RTP already received (what was playing before a key press).
    pub fn drain_rtp(&self) {
        let mut buf = [0u8; 2048];
        while self.rtp.try_recv_from(&mut buf).is_ok() {}
    }

    /// Send `packets` of audio (silence) at 20 ms pacing.
    pub async fn send_audio(&mut self, packets: usize) {
        let remote = self.remote_rtp.expect("call is up");
        let mut buf = [0u8; 200];
        let payload = [self.codec.silence_byte(); 160];
        for _ in 0..packets {
            let n = self
                .rtp_out
                .write(self.codec.payload_type(), &payload, 160, &mut buf);
            self.rtp.send_to(&buf[..n], remote).await.unwrap();
            // Paced as a phone sends, one packet each 20 ms: not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Send `packets` of loud speech-like audio (a 400 Hz tone) at 20 ms pacing.
    pub async fn speak(&mut self, packets: usize) {
        let remote = self.remote_rtp.expect("call is up");
        let mut buf = [0u8; 200];
        let pcm: Vec<i16> = (0..160)
            .map(|i| ((i as f32 * std::f32::consts::TAU * 400.0 / 8000.0).sin() * 12000.0) as i16)
            .collect();
        let mut payload = [0u8; 160];
        self.codec.encode(&pcm, &mut payload);
        for _ in 0..packets {
            let n = self
                .rtp_out
                .write(self.codec.payload_type(), &payload, 160, &mut buf);
            self.rtp.send_to(&buf[..n], remote).await.unwrap();
            // Paced as a phone sends, one packet each 20 ms: not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Press keys one after another with a short pause (as a person does).
    pub async fn keys(&mut self, keys: &str) {
        for k in keys.chars() {
            self.press(k).await;
            // The pause between two presses, as a person makes: not a wait.
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    }

    /// Listen until the prompt `name` (in `lang`) has been playing for half a second, at most
    /// `within`; returns everything heard.
    pub async fn listen_for(&mut self, lang: &str, name: &str, within: Duration) -> Vec<Vec<u8>> {
        let ear = PromptEar::new(lang, &[name], self.codec);
        let deadline = tokio::time::Instant::now() + within;
        let mut heard = Vec::new();
        while tokio::time::Instant::now() < deadline {
            heard.extend(self.listen(Duration::from_millis(100)).await);
            // Ten frames of it: one or two quiet frames may be shared with another prompt.
            if ear.frames_heard(&heard) >= 10 {
                heard.extend(self.listen(Duration::from_millis(500)).await);
                break;
            }
        }
        heard
    }

    /// After a ticket's digit entries: wait for the recording prompt ("After the tone,
    /// describe... To skip, press pound now.") and press pound there to skip the description.
    /// (Pound pressed right after a ZIP code that filled its five digits is the ZIP's own
    /// terminator, and skips nothing.)
    pub async fn skip_description(&mut self, lang: &str) -> Vec<Vec<u8>> {
        let heard = self
            .listen_for(lang, "record_description", Duration::from_secs(15))
            .await;
        self.press('#').await;
        heard
    }

    /// Collect RTP payloads (and count packets) for `dur`, while also keeping our stream alive.
    /// For a window whose content is what a test checks; to wait for something, use
    /// [`TestUa::listen_until`] and the helpers built on it.
    pub async fn listen(&mut self, dur: Duration) -> Vec<Vec<u8>> {
        self.hear(dur, |_| false).await.0
    }

    /// Listen (our own audio flowing, as [`TestUa::listen`]) until `done` holds for what was
    /// heard, at most `within`; panics saying the call never got `what` otherwise. Returns what
    /// was heard.
    pub async fn listen_until(
        &mut self,
        what: &str,
        within: Duration,
        done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let (heard, ok) = self.hear(within, done).await;
        assert!(
            ok,
            "the caller never got {what} within {within:?} ({} packets heard)",
            heard.len()
        );
        heard
    }

    /// Listen until `n` packets of the server's audio have arrived (at most 10 s).
    pub async fn until_packets(&mut self, n: usize) -> Vec<Vec<u8>> {
        self.listen_until(
            &format!("{n} audio packets"),
            Duration::from_secs(10),
            |h| h.len() >= n,
        )
        .await
    }

    /// Listen until the server's audio reaches us (at most 10 s): the call's media is up and
    /// its first prompt playing, as a caller hears before pressing a key.
    pub async fn until_audio(&mut self) -> Vec<Vec<u8>> {
        self.until_packets(1).await
    }

    /// Listen (our own audio flowing) until `GET /admin/calls` on `http_addr` shows this call in
    /// `state` (a menu's name, `recording`, `waiting for operator`...), at most 10 s: the keys
    /// pressed so far have been acted on. Returns what was heard.
    pub async fn until_state(&mut self, http_addr: SocketAddr, state: &str) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut heard = Vec::new();
        loop {
            let calls = admin_calls(http_addr).await;
            if calls
                .iter()
                .any(|c| c["call_id"] == self.call_id.as_str() && c["state"] == state)
            {
                return heard;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the call never reached {state}: {calls:?}"
            );
            heard.extend(self.listen(Duration::from_millis(50)).await);
        }
    }

    /// Listen until no audio has come for `quiet` (at most 10 s): the server stopped sending
    /// (on hold, after a BYE). Returns what came before.
    pub async fn until_quiet(&mut self, quiet: Duration) -> Vec<Vec<u8>> {
        let within = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + within;
        let mut heard = Vec::new();
        loop {
            let got = self.listen(quiet).await;
            if got.is_empty() {
                return heard;
            }
            heard.extend(got);
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server's audio never stopped for {quiet:?} within {within:?}"
            );
        }
    }

    /// Listen for at most `dur`, stopping early once `done` holds for what was heard; returns
    /// what was heard and whether `done` held.
    async fn hear(
        &mut self,
        dur: Duration,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> (Vec<Vec<u8>>, bool) {
        let deadline = tokio::time::Instant::now() + dur;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        let remote = self.remote_rtp;
        let mut next_send = tokio::time::Instant::now();
        let mut sbuf = [0u8; 200];
        let payload = [self.codec.silence_byte(); 160];
        loop {
            tokio::select! {
                r = tokio::time::timeout_at(deadline, self.rtp.recv_from(&mut buf)) => {
                    let Ok(Ok((n, _))) = r else { break };
                    if let Ok(p) = rtp::parse(&buf[..n]) {
                        out.push(p.payload.to_vec());
                        if done(&out) {
                            return (out, true);
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_send) => {
                    if let Some(remote) = remote {
                        let n = self.rtp_out.write(self.codec.payload_type(), &payload, 160, &mut sbuf);
                        let _ = self.rtp.send_to(&sbuf[..n], remote).await;
                    }
                    next_send += Duration::from_millis(20);
                }
            }
        }
        let ok = done(&out);
        (out, ok)
    }
}

/// Port 0 on the loopback address of `server`'s family (`[::1]` for an IPv6 server).
pub fn loopback_like(server: SocketAddr) -> SocketAddr {
    if server.is_ipv6() {
        "[::1]:0".parse().unwrap()
    } else {
        "127.0.0.1:0".parse().unwrap()
    }
}

/// Read `/health` as JSON.
pub async fn health(http: SocketAddr) -> serde_json::Value {
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(
        format!("GET /health HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let json = body.split("\r\n\r\n").nth(1).expect("body");
    // chunked encoding is not used by axum for Json with known length
    serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("health JSON: {e}: {json}"))
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// A minimal HTTP/1.1 request over loopback: returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_head(addr, method, path, headers, body).await;
    (status, body)
}

/// [`http`], with the response's head (status line and headers) too.
pub async fn http_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, mut body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or_default();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

/// A console or wallboard log-in (`POST /console/login`, password `pw<id>`): its cookie and
/// CSRF token, sent with every request as the page does.
pub struct ConsoleSession {
    pub http: SocketAddr,
    pub cookie: String,
    pub csrf: String,
}

impl ConsoleSession {
    pub async fn login(http: SocketAddr, agent: &str) -> ConsoleSession {
        let body = serde_json::json!({"agent": agent, "password": format!("pw{agent}")});
        let (status, head, body) = http_head(
            http,
            "POST",
            "/console/login",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{head}\n{body}");
        let cookie = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .and_then(|l| l.split_once(':'))
            .and_then(|(_, v)| v.trim().split(';').next())
            .expect("a session cookie")
            .to_owned();
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        ConsoleSession {
            http,
            cookie,
            csrf: body["csrf_token"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = http(self.http, "GET", path, &[("Cookie", &self.cookie)], b"").await;
        (status, serde_json::from_str(&body).unwrap_or_default())
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let headers = [
            ("X-CSRF-Token", self.csrf.as_str()),
            ("Content-Type", "application/json"),
        ];
        self.post_with(path, &headers, body).await
    }

    /// A POST with the session's cookie and only the other `headers` given (to leave out the
    /// CSRF token, or send a wrong one).
    pub async fn post_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut all = vec![("Cookie", self.cookie.as_str())];
        all.extend_from_slice(headers);
        let (status, body) = http(self.http, "POST", path, &all, body.to_string().as_bytes()).await;
        (status, serde_json::from_str(&body).unwrap_or_default())
    }

    /// The session's server-sent events at `path` (`/console/events`, `/supervisor/events`).
    pub async fn events(&self, path: &str) -> SseStream {
        let mut stream = TcpStream::connect(self.http).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\nAccept: text/event-stream\r\n\r\n",
            self.http, self.cookie
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        SseStream {
            stream,
            text: String::new(),
            at: 0,
            name: None,
        }
    }
}

/// A server-sent events stream, read line by line (chunk-size lines are skipped).
pub struct SseStream {
    stream: TcpStream,
    text: String,
    at: usize,
    name: Option<String>,
}

impl SseStream {
    /// The next event called `name` within `within` (others are skipped).
    pub async fn next(&mut self, name: &str, within: Duration) -> serde_json::Value {
        self.next_where(name, within, |_| true).await
    }

    /// The first event called `name` whose data `pred` accepts, within `within`.
    pub async fn next_where(
        &mut self,
        name: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = serde_json::Value::Null;
        loop {
            while let Some(end) = self.text[self.at..].find('\n') {
                let line = self.text[self.at..self.at + end].trim_end().to_owned();
                self.at += end + 1;
                if let Some(n) = line.strip_prefix("event:") {
                    self.name = Some(n.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    if self.name.take().as_deref() == Some(name) {
                        last = serde_json::from_str(d.trim()).unwrap();
                        if pred(&last) {
                            return last;
                        }
                    }
                }
            }
            let mut buf = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => panic!("no such {name:?} event within {within:?}; the last:\n{last:#}"),
            }
        }
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

// ---- Resilience helpers (loss, crash, hung peers, soak) -------------------------------------

/// Every SIP response that arrives on `sock` until none has for `quiet`.
pub async fn responses(sock: &UdpSocket, quiet: Duration) -> Vec<Response> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65535];
    while let Ok(Ok((n, _))) = tokio::time::timeout(quiet, sock.recv_from(&mut buf)).await {
        if let Ok(Message::Response(r)) = parse_datagram(&buf[..n], 65535) {
            out.push(r);
        }
    }
    out
}

/// The gauges of `GET /metrics` (Prometheus text), by name.
pub async fn metrics(http_addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http(http_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// One gauge of `/metrics` (panics if the server does not export it).
pub async fn metric(http_addr: SocketAddr, name: &str) -> f64 {
    *metrics(http_addr)
        .await
        .get(name)
        .unwrap_or_else(|| panic!("/metrics has no {name}"))
}

/// Poll gauge `name` every 250 ms until it equals `want` or `within` has passed; returns the
/// last value read (the caller asserts on it, so a failure shows the value).
pub async fn settle_metric(http_addr: SocketAddr, name: &str, want: f64, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = metric(http_addr, name).await;
        if v == want || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Poll `probe` every 20 ms until it gives a value, at most `within`; panics saying `what`
/// never happened otherwise.
pub async fn until<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll `GET /health` until `done` holds for it (at most 10 s); returns it. Panics with the
/// last one read, saying `what` never happened.
pub async fn health_until(
    http_addr: SocketAddr,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(http_addr).await;
        if done(&h) {
            return h;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: never: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the server has no call left (`live_calls` 0 in `/health`: every call that
/// ended has been counted); returns that `/health`.
pub async fn until_no_calls(http_addr: SocketAddr) -> serde_json::Value {
    health_until(http_addr, "every call ended", |h| h["live_calls"] == 0).await
}

/// Wait until the server is draining: `/health/ready` answers 503 and says so.
pub async fn until_draining(http_addr: SocketAddr) {
    until("the server drains", Duration::from_secs(10), async || {
        let (status, body) = http(http_addr, "GET", "/health/ready", &[], b"").await;
        (status == 503 && body.contains("draining")).then_some(())
    })
    .await
}

/// `GET /admin/calls` as JSON (loopback needs no token).
pub async fn admin_calls(http_addr: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http(http_addr, "GET", "/admin/calls", &[], b"").await;
    assert_eq!(status, 200, "/admin/calls: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/admin/calls JSON: {e}: {body}"))
}

/// The state word of agent `id` in `GET /admin/agents`.
pub async fn agent_state(http_addr: SocketAddr, id: &str) -> String {
    let (_, body) = http(http_addr, "GET", "/admin/agents", &[], b"").await;
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/admin/agents JSON: {e}: {body}"));
    v.as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"] == id)
        .and_then(|a| a["state"].as_str())
        .unwrap_or_else(|| panic!("no agent {id} in {body}"))
        .to_owned()
}

/// A config with these agents (password `pw<id>`) and one `general` queue.
pub fn agents_config(agents: &[&str], ring_timeout: u64, no_answer_pause: u64) -> FileConfig {
    FileConfig {
        agents: agents
            .iter()
            .map(|id| ivr311::config::AgentConfig {
                id: (*id).into(),
                password: format!("pw{id}").into(),
                skills: vec![],
                tier: 1,
                name: None,
                role: Default::default(),
            })
            .collect(),
        queues: vec![ivr311::config::QueueConfig {
            name: "general".into(),
            ring_timeout_seconds: ring_timeout,
            no_answer_pause_seconds: no_answer_pause,
            ..ivr311::config::QueueConfig::default()
        }],
        ..FileConfig::default()
    }
}

/// An operator's SIP phone over UDP that logs in with SHA-256 digest (password `pw<id>`).
pub struct TestAgent {
    pub id: String,
    pub sip: UdpSocket,
    pub rtp: UdpSocket,
    pub server: SocketAddr,
}

fn digest_param(challenge: &str, name: &str) -> Option<String> {
    let rest = challenge.strip_prefix("Digest ")?;
    rest.split(", ").find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn sha256_hex(data: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `Authorization` value agent `id` (password `pw<id>`) answers a SHA-256 digest
/// `challenge` (a `WWW-Authenticate` value) with, for `method` on `uri`.
pub fn digest_authorization(challenge: &str, id: &str, method: &str, uri: &str) -> String {
    let (realm, nonce, opaque) = (
        digest_param(challenge, "realm").unwrap(),
        digest_param(challenge, "nonce").unwrap(),
        digest_param(challenge, "opaque").unwrap(),
    );
    let ha1 = sha256_hex(&format!("{id}:{realm}:pw{id}"));
    let ha2 = sha256_hex(&format!("{method}:{uri}"));
    let resp = sha256_hex(&format!("{ha1}:{nonce}:00000001:abcdef:auth:{ha2}"));
    format!(
        "Digest username=\"{id}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", \
algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"abcdef\", opaque=\"{opaque}\""
    )
}

/// The SHA-256 challenge among a 401's `WWW-Authenticate` values.
pub fn sha256_challenge(r: &Response) -> String {
    r.headers_named("WWW-Authenticate")
        .find(|c| digest_param(c, "algorithm").as_deref() == Some("SHA-256"))
        .expect("SHA-256 challenge")
        .to_owned()
}

impl TestAgent {
    pub async fn login(server: SocketAddr, id: &str) -> TestAgent {
        let a = TestAgent {
            id: id.into(),
            sip: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
        };
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
        let challenge = a.response().await;
        assert_eq!(challenge.code, 401);
        let c = challenge
            .headers_named("WWW-Authenticate")
            .find(|c| digest_param(c, "algorithm").as_deref() == Some("SHA-256"))
            .expect("SHA-256 challenge")
            .to_owned();
        let (realm, nonce, opaque) = (
            digest_param(&c, "realm").unwrap(),
            digest_param(&c, "nonce").unwrap(),
            digest_param(&c, "opaque").unwrap(),
        );
        let ha1 = sha256_hex(&format!("{id}:{realm}:pw{id}"));
        let ha2 = sha256_hex(&format!("REGISTER:{uri}"));
        let resp = sha256_hex(&format!("{ha1}:{nonce}:00000001:abcdef:auth:{ha2}"));
        let auth = format!(
            "Digest username=\"{id}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", \
algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"abcdef\", opaque=\"{opaque}\""
        );
        a.sip
            .send_to(reg(2, Some(auth)).as_bytes(), server)
            .await
            .unwrap();
        assert_eq!(a.response().await.code, 200, "agent {id} logged in");
        a
    }

    pub async fn recv(&self, t: Duration) -> Option<Message> {
        let mut buf = vec![0u8; 65535];
        let (n, _) = tokio::time::timeout(t, self.sip.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(parse_datagram(&buf[..n], 65536).unwrap())
    }

    pub async fn response(&self) -> Response {
        match self.recv(Duration::from_secs(3)).await {
            Some(Message::Response(r)) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Wait for a request with `method` (answering nothing; other messages are skipped).
    pub async fn request(&self, method: &str, t: Duration) -> Request {
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(Message::Request(r)) if r.method.as_str() == method => return r,
                Some(_) => continue,
                None => panic!("agent {} got no {method} within {t:?}", self.id),
            }
        }
    }

    pub async fn reply(&self, req: &Request, code: u16, reason: &str, sdp: Option<String>) {
        let mut b = ivr311::sip::message::ResponseBuilder::new(
            req,
            code,
            reason,
            Some(&format!("ag{}", self.id)),
        )
        .header(
            "Contact",
            format!("<sip:{}@{}>", self.id, self.sip.local_addr().unwrap()),
        );
        if let Some(sdp) = sdp {
            b = b.body("application/sdp", sdp);
        }
        self.sip.send_to(&b.build(), self.server).await.unwrap();
    }

    pub fn answer_sdp(&self) -> String {
        let p = self.rtp.local_addr().unwrap().port();
        format!("v=0\r\no=agent 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {p} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n")
    }
}

/// Resident set size of this process, KiB (`VmRSS` of /proc/self/status).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The prompt names heard in `payloads`, consecutive repeats collapsed (robust to frames
/// lost, duplicated or swapped in transit, where [`PromptEar::playbacks`] would count a
/// reordered frame as a new playback).
pub fn prompts_heard(ear: &PromptEar, payloads: &[Vec<u8>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in ear.playbacks(payloads) {
        if out.last() != Some(&name) {
            out.push(name);
        }
    }
    out
}

/// A request the called party sends inside the dialog that `inv` (our server's INVITE to it,
/// answered with tag `ag1001`) created: `method`, CSeq `cseq`, with an SDP body or none.
pub fn from_agent(
    srv: &ivr311::server::RunningServer,
    sip: &UdpSocket,
    inv: &Request,
    method: &str,
    cseq: u32,
    sdp: Option<&str>,
) -> String {
    let body = sdp.unwrap_or("");
    let ctype = if sdp.is_some() {
        "Content-Type: application/sdp\r\n"
    } else {
        ""
    };
    format!(
        "{method} sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKag{method}{cseq}\r\nMax-Forwards: 70\r\nFrom: {to};tag=ag1001\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: {cseq} {method}\r\nContact: <sip:1001@{me}>\r\n{ctype}Content-Length: {len}\r\n\r\n{body}",
        srv = srv.sip_addr,
        me = sip.local_addr().unwrap(),
        to = inv.to.raw,
        fr = inv.from.raw,
        cid = inv.call_id,
        len = body.len(),
    )
}

/// The final response that arrives on `sip` for the request with CSeq `cseq` (other traffic
/// is skipped).
/// An out-of-dialog OPTIONS to `target` (a monitor's or a load balancer's probe) from a new
/// socket: its final response, or `None` when none comes within `within`.
pub async fn options_probe(target: SocketAddr, within: Duration) -> Option<Response> {
    let sock = UdpSocket::bind(loopback_like(target)).await.unwrap();
    let me = sock.local_addr().unwrap();
    let probe = format!(
        "OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@{me}>;tag=1\r\nTo: <sip:{target}>\r\n\
         Call-ID: {}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    sock.send_to(probe.as_bytes(), target).await.unwrap();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
        else {
            return None;
        };
        if let Ok(Message::Response(r)) = parse_datagram(&buf[..n], 65536) {
            if r.code >= 200 {
                return Some(r);
            }
        }
    }
}

pub async fn final_response(sip: &UdpSocket, cseq: u32) -> Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65535];
    loop {
        let got = tokio::time::timeout_at(deadline, sip.recv_from(&mut buf)).await;
        let Ok(Ok((n, _))) = got else {
            panic!("no final response to CSeq {cseq}")
        };
        if let Ok(Message::Response(r)) = parse_datagram(&buf[..n], 65536) {
            if r.code >= 200 && r.cseq == cseq {
                return r;
            }
        }
    }
}

/// Send `method` (CSeq `cseq`, SDP `sdp` or no body) inside the dialog of `inv` from the called
/// party's socket `sip` (see [`from_agent`]), wait for its final response, ACK it if it
/// answered an INVITE, and return it.
pub async fn agent_request(
    srv: &ivr311::server::RunningServer,
    sip: &UdpSocket,
    inv: &Request,
    method: &str,
    cseq: u32,
    sdp: Option<&str>,
) -> Response {
    let req = from_agent(srv, sip, inv, method, cseq, sdp);
    sip.send_to(req.as_bytes(), srv.sip_addr).await.unwrap();
    let r = final_response(sip, cseq).await;
    if method == "INVITE" {
        let ack = from_agent(srv, sip, inv, "ACK", cseq, None);
        sip.send_to(ack.as_bytes(), srv.sip_addr).await.unwrap();
    }
    r
}

/// RTP from elsewhere reaching a call's media port `media` before the caller's own: a far end
/// still sending to a port its call gave up, now given to another call. Five packets, 20 ms
/// apart; returns the stray source's socket. Over loopback a datagram is in the server's
/// socket queue when `send_to` returns, so whatever the caller sends after this reaches the
/// server after the stray packets.
pub async fn stray_stream(media: SocketAddr) -> tokio::net::UdpSocket {
    let stray = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut out = ivr311::media::rtp::RtpStream::new();
    let mut buf = [0u8; 200];
    for _ in 0..5 {
        let n = out.write(0, &[0xFF; 160], 160, &mut buf);
        stray.send_to(&buf[..n], media).await.unwrap();
        // Paced as a far end sends: not a wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stray
}

/// Whether `sock` gets nothing for 300 ms, after what it already has is dropped.
pub async fn gets_nothing_more(sock: &tokio::net::UdpSocket) -> bool {
    let mut rx = [0u8; 2048];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(1), sock.recv_from(&mut rx)).await
    {}
    tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut rx))
        .await
        .is_err()
}

/// The default config with 911 as a bridge to `uri`.
pub fn bridge_911_to(uri: &str) -> FileConfig {
    let mut file = FileConfig::default();
    file.emergency.method = Some(ivr311::dispatch::emergency::EmergencyMethod::Bridge);
    file.emergency.uri = Some(uri.to_owned());
    file
}

/// A caller (PCMU, RFC 4733) on `server` who hears the menu start and presses `keys`.
pub async fn caller_pressing(server: SocketAddr, keys: &str) -> TestUa {
    let mut ua = TestUa::udp(server).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys(keys).await;
    ua
}

/// Listen (the caller's RTP flowing) until the server is recording this caller: the read-back
/// of the ZIP, the recording prompt and its beep have played. Returns what was heard.
pub async fn until_recording(ua: &mut TestUa, srv: &ivr311::server::RunningServer) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut heard = Vec::new();
    loop {
        heard.extend(ua.listen(Duration::from_millis(100)).await);
        let recording = srv
            .registry
            .snapshot()
            .iter()
            .any(|c| c.call_id == ua.call_id && c.state == "recording");
        if recording {
            return heard;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the caller was never recorded"
        );
    }
}

/// The prompts a caller filing a ticket may hear when the store fails or works: the apology,
/// the operator queue (or that no operator is free, or to call again), the ticket read back.
pub fn filing_ear() -> PromptEar {
    PromptEar::new(
        "en",
        &[
            "db_error",
            "operator_queue",
            "operator_unavailable",
            "call_again_later",
            "ticket_filed",
        ],
        ivr311::media::g711::Codec::Pcmu,
    )
}

/// A caller files a pothole report at `sip` (English, not an emergency, streets, pothole,
/// ZIP, no description) and listens for `listen`: the call and the [`filing_ear`] prompts heard.
pub async fn file_pothole(sip: SocketAddr, listen: Duration) -> (TestUa, Vec<String>) {
    let mut ua = TestUa::udp(sip).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94107").await;
    ua.skip_description("en").await;
    let heard = ua.listen(listen).await;
    (ua, prompts_heard(&filing_ear(), &heard))
}
