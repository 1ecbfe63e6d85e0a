//! The operator side: agents (operators' SIP phones) that log in to the server and take the
//! calls its queue offers them.
//!
//! One thread holds a share of the agents, one SIP socket for all of them (each agent's
//! Contact is `sip:load-NNNN@<that socket>`), one RTP socket per agent call (read at the call's
//! turn on the wheel, not waited on: see [`net::RecvBatch`]), one epoll set and a 1 ms timerfd,
//! like the callers' workers. Each agent REGISTERs with digest authentication
//! (SHA-256 when offered, else MD5; every registration answers a fresh 401 challenge, so nonce
//! counts never repeat) and refreshes at 80 % of its expiry. An INVITE is answered at once
//! with 200 OK and an SDP answer in the law the server offered first (PCMU or PCMA) plus
//! telephone-event; the 200 is retransmitted (timer G) until the ACK. From the answer until
//! the server's BYE the call streams G.711 at 50 packets/s from a 1 ms slot of a 20-slot wheel,
//! each frame marked with its send time (see `payload`), and measures the caller's audio that
//! the server relays: pacing from kernel receive stamps, bursts, sequence gaps, transit time.
//! CANCEL, OPTIONS and other requests get 200 OK. Nothing on the per-packet path allocates.

use crate::net::{self, CmsgBuf, Epoll, RecvBatch, Ticker};
use crate::payload;
use crate::stats::{LastHeard, Stats};
use crate::worker::{due_turns, law, tone, Shared};
use ivr311::media::g711::Codec;
use ivr311::media::rtp::RtpStream;
use ivr311::sip::message::{parse_datagram, uri_user, Message, Request, Response, ResponseBuilder};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

const T1_MS: u64 = 500;
const T2_MS: u64 = 4000;
const PERIOD_MS: u64 = 20;
const SAMPLES: u32 = 160;
/// REGISTER retransmission starts slower than T1: a retransmitted REGISTER with credentials
/// reuses its nonce count, which the registrar counts as a failed login (5 of them within 60 s
/// block the source address, i.e. the whole generator).
const REG_RETRANS_MS: u64 = 2000;
const REG_TIMEOUT_MS: u64 = 32_000;
/// After a failed registration, wait this long before trying again.
const REG_RETRY_MS: u64 = 5000;
/// How often the registrations are looked over.
const REG_SCAN_MS: u64 = 20;

const SIP_TOKEN: u64 = u64::MAX;
const TICK_TOKEN: u64 = u64::MAX - 1;

/// The agent's id for number `n` (1-based): `load-0001`.
pub fn agent_id(n: usize) -> String {
    format!("load-{n:04}")
}

pub struct Config {
    /// Index of this thread's messages to the main thread.
    pub id: usize,
    /// Agents `first..first + count` (1-based numbers).
    pub first: usize,
    pub count: usize,
    pub target: SocketAddr,
    pub local_ip: IpAddr,
    pub password: String,
    /// Registration expiry asked for, seconds (60..=7200).
    pub expires: u32,
    /// REGISTERs per second this thread may send.
    pub register_rate: f64,
    pub run: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    /// Send a REGISTER (without credentials) at or after this ms.
    Due(u64),
    /// A REGISTER is out (`auth`: with credentials).
    Sent {
        auth: bool,
        retrans_ms: u64,
        interval_ms: u64,
        deadline_ms: u64,
    },
    /// Registered; refresh at this ms.
    Registered(u64),
}

struct Agent {
    id: String,
    call_id: String,
    cseq: u32,
    reg: Reg,
    /// The REGISTER last sent (for retransmission).
    request: Vec<u8>,
    registered: bool,
    /// The call this agent has up, if any.
    call: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// 200 sent, no ACK yet.
    Answered,
    Up,
}

struct AgentCall {
    bucket: usize,
    pos: usize,
    agent: usize,
    call_id: String,
    phase: Phase,
    ok: Vec<u8>,
    retrans_ms: u64,
    interval_ms: u64,
    deadline_ms: u64,
    sock: UdpSocket,
    codec: Codec,
    pt: u8,
    /// The telephone-event payload type we answered.
    te_pt: u8,
    rtp: RtpStream,
    ts0: u32,
    media_start_ms: u64,
    last_k: Option<u64>,
    /// The caller's audio heard so far.
    heard: LastHeard,
    /// The socket's drop count last seen.
    drops: u32,
    tx: u64,
    /// When our 200 went out (realtime ns).
    answered_rt: i64,
    /// The caller's Call-ID the server names (X-311-Call-ID), for diagnostics.
    caller_call_id: String,
}

struct Io {
    target: SocketAddr,
    sip: UdpSocket,
    sip_local: SocketAddr,
    stats: Stats,
    pkt: [u8; 256],
    rx: Box<[u8; 65536]>,
    cmsg: CmsgBuf,
    audio: [Vec<[u8; 160]>; 2],
    /// The SIP socket's drop count last seen.
    sip_drops: u32,
}

impl Io {
    fn send_sip(&mut self, bytes: &[u8]) {
        if self.sip.send_to(bytes, self.target).is_err() {
            self.stats.send_errors += 1;
        }
    }
}

pub struct AgentWorker {
    cfg: Config,
    shared: Arc<Shared>,
    tx: Sender<(usize, u32, Stats)>,
    io: Io,
    /// What an agent call's RTP socket held at its last turn.
    rtp_in: RecvBatch,
    epoll: Epoll,
    ticker: Ticker,
    agents: Vec<Agent>,
    calls: Vec<Option<Box<AgentCall>>>,
    free: Vec<usize>,
    by_call_id: HashMap<String, usize>,
    buckets: [Vec<usize>; PERIOD_MS as usize],
    epoch: Instant,
    done_ms: u64,
    last_scan_ms: u64,
    reg_tokens: f64,
    step: u32,
    live: u64,
}

impl AgentWorker {
    pub fn new(
        cfg: Config,
        shared: Arc<Shared>,
        tx: Sender<(usize, u32, Stats)>,
    ) -> std::io::Result<AgentWorker> {
        let sip = UdpSocket::bind((cfg.local_ip, 0))?;
        sip.set_nonblocking(true)?;
        net::enable_rx_timestamps(sip.as_raw_fd())?;
        net::buffer_and_count_drops(sip.as_raw_fd(), net::SIP_RCVBUF)?;
        let sip_local = sip.local_addr()?;
        let epoll = Epoll::new()?;
        epoll.add(sip.as_raw_fd(), SIP_TOKEN)?;
        let ticker = Ticker::every_ms()?;
        epoll.add(ticker.raw(), TICK_TOKEN)?;
        let agents = (0..cfg.count)
            .map(|i| {
                let n = cfg.first + i;
                Agent {
                    id: agent_id(n),
                    call_id: format!("reg-{:08x}-{n}@ivr311-load", cfg.run),
                    cseq: 0,
                    // Spread the first registrations over the rate.
                    reg: Reg::Due(0),
                    request: Vec::new(),
                    registered: false,
                    call: None,
                }
            })
            .collect();
        let step = shared.step.load(Ordering::Acquire);
        Ok(AgentWorker {
            io: Io {
                target: cfg.target,
                sip,
                sip_local,
                stats: Stats::default(),
                pkt: [0; 256],
                rx: Box::new([0; 65536]),
                cmsg: [0; 8],
                audio: [tone(Codec::Pcmu), tone(Codec::Pcma)],
                sip_drops: 0,
            },
            cfg,
            shared,
            tx,
            rtp_in: RecvBatch::new(),
            epoll,
            ticker,
            agents,
            calls: Vec::new(),
            free: Vec::new(),
            by_call_id: HashMap::new(),
            buckets: Default::default(),
            epoch: Instant::now(),
            done_ms: 0,
            last_scan_ms: 0,
            reg_tokens: 1.0,
            step,
            live: 0,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; net::EVENTS];
        loop {
            let step = self.shared.step.load(Ordering::Acquire);
            if step != self.step {
                let stats = std::mem::take(&mut self.io.stats);
                let _ = self.tx.send((self.cfg.id, self.step, stats));
                self.step = step;
            }
            if self.shared.exit.load(Ordering::Acquire) {
                return;
            }
            if self.shared.abort.load(Ordering::Acquire) && self.live > 0 {
                self.cut_all();
            }
            let now_ms = self.now_ms();
            self.registrations(now_ms);
            self.run_wheel(now_ms);
            let n = match self.epoll.wait(&mut events, 50) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; agent thread stops");
                    return;
                }
            };
            let now_ms = self.now_ms();
            for ev in &events[..n] {
                match ev.u64 {
                    TICK_TOKEN => self.ticker.clear(),
                    SIP_TOKEN => self.recv_sip(now_ms),
                    _ => {}
                }
            }
        }
    }

    // ---- registration ------------------------------------------------------------------------

    fn registrations(&mut self, now_ms: u64) {
        if now_ms < self.last_scan_ms + REG_SCAN_MS {
            return;
        }
        let dt = (now_ms - self.last_scan_ms) as f64 / 1000.0;
        self.last_scan_ms = now_ms;
        let cap = (self.cfg.register_rate * REG_SCAN_MS as f64 / 1000.0).max(1.0);
        self.reg_tokens = (self.reg_tokens + dt * self.cfg.register_rate).min(cap);
        for i in 0..self.agents.len() {
            match self.agents[i].reg {
                Reg::Due(at) if now_ms >= at => {
                    if self.reg_tokens < 1.0 {
                        continue;
                    }
                    self.reg_tokens -= 1.0;
                    self.send_register(i, None, now_ms);
                }
                Reg::Registered(refresh) if now_ms >= refresh => {
                    self.agents[i].reg = Reg::Due(now_ms);
                }
                Reg::Sent {
                    auth,
                    retrans_ms,
                    interval_ms,
                    deadline_ms,
                } => {
                    if now_ms >= deadline_ms {
                        self.io.stats.bridge.register_failures += 1;
                        self.set_registered(i, false);
                        self.agents[i].reg = Reg::Due(now_ms + REG_RETRY_MS);
                    } else if now_ms >= retrans_ms {
                        let req = std::mem::take(&mut self.agents[i].request);
                        self.io.send_sip(&req);
                        let a = &mut self.agents[i];
                        a.request = req;
                        let interval_ms = (interval_ms * 2).min(T2_MS.max(REG_RETRANS_MS));
                        a.reg = Reg::Sent {
                            auth,
                            retrans_ms: now_ms + interval_ms,
                            interval_ms,
                            deadline_ms,
                        };
                    }
                }
                _ => {}
            }
        }
    }

    fn set_registered(&mut self, i: usize, on: bool) {
        let a = &mut self.agents[i];
        if a.registered != on {
            a.registered = on;
            if on {
                self.shared.registered.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.registered.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Send a REGISTER for agent `i`, with `auth` (an Authorization value) or without.
    fn send_register(&mut self, i: usize, auth: Option<String>, now_ms: u64) {
        let me = self.io.sip_local;
        let srv = self.cfg.target;
        let a = &mut self.agents[i];
        a.cseq += 1;
        let has_auth = auth.is_some();
        a.request = format!(
            "REGISTER sip:{srv} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bK{branch:x}r;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{id}@{srv}>;tag={tag:x}\r\n\
To: <sip:{id}@{srv}>\r\n\
Call-ID: {cid}\r\n\
CSeq: {cseq} REGISTER\r\n\
Contact: <sip:{id}@{me}>\r\n\
Expires: {exp}\r\n\
{auth}User-Agent: ivr311-load agent\r\n\
Content-Length: 0\r\n\r\n",
            branch = rand::random::<u64>(),
            id = a.id,
            tag = rand::random::<u32>(),
            cid = a.call_id,
            cseq = a.cseq,
            exp = self.cfg.expires,
            auth = auth
                .map(|v| format!("Authorization: {v}\r\n"))
                .unwrap_or_default(),
        )
        .into_bytes();
        a.reg = Reg::Sent {
            auth: has_auth,
            retrans_ms: now_ms + REG_RETRANS_MS,
            interval_ms: REG_RETRANS_MS,
            deadline_ms: now_ms + REG_TIMEOUT_MS,
        };
        let req = std::mem::take(&mut a.request);
        self.io.send_sip(&req);
        self.agents[i].request = req;
    }

    fn agent_for_registration(&self, call_id: &str) -> Option<usize> {
        let rest = call_id.strip_prefix("reg-")?.strip_suffix("@ivr311-load")?;
        let (run, n) = rest.split_once('-')?;
        if u32::from_str_radix(run, 16).ok()? != self.cfg.run {
            return None;
        }
        let n: usize = n.parse().ok()?;
        let i = n.checked_sub(self.cfg.first)?;
        (i < self.agents.len()).then_some(i)
    }

    fn on_register_response(&mut self, i: usize, r: &Response, now_ms: u64) {
        let Reg::Sent { auth, .. } = self.agents[i].reg else {
            return; // a retransmission's answer
        };
        if r.cseq != self.agents[i].cseq || r.code < 200 {
            return;
        }
        match r.code {
            200..=299 => {
                self.io.stats.bridge.registrations += 1;
                self.set_registered(i, true);
                let refresh = u64::from(self.cfg.expires) * 800;
                self.agents[i].reg = Reg::Registered(now_ms + refresh);
            }
            401 | 407 => {
                let stale = r.headers_named("WWW-Authenticate").any(|c| {
                    digest_param(c, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true"))
                });
                if auth && !stale {
                    // Our credentials were refused: wrong password, or the agent is unknown.
                    tracing::warn!(agent = %self.agents[i].id, "registration refused (401 to our credentials)");
                    self.io.stats.bridge.register_failures += 1;
                    self.set_registered(i, false);
                    self.agents[i].reg = Reg::Due(now_ms + REG_RETRY_MS);
                    return;
                }
                let uri = format!("sip:{}", self.cfg.target);
                match authorization(r, &self.agents[i].id, &self.cfg.password, &uri) {
                    Some(v) => self.send_register(i, Some(v), now_ms),
                    None => {
                        tracing::warn!(agent = %self.agents[i].id, "no usable digest challenge");
                        self.io.stats.bridge.register_failures += 1;
                        self.agents[i].reg = Reg::Due(now_ms + REG_RETRY_MS);
                    }
                }
            }
            code => {
                tracing::warn!(agent = %self.agents[i].id, code, "registration failed");
                self.io.stats.bridge.register_failures += 1;
                self.set_registered(i, false);
                self.agents[i].reg = Reg::Due(now_ms + REG_RETRY_MS);
            }
        }
    }

    // ---- SIP ---------------------------------------------------------------------------------

    fn recv_sip(&mut self, now_ms: u64) {
        loop {
            let fd = self.io.sip.as_raw_fd();
            let n = match net::recv_stamped_drops(fd, &mut self.io.rx[..], &mut self.io.cmsg) {
                Ok((n, stamp, drops)) => {
                    if stamp > 0 {
                        let late = (net::realtime_ns() - stamp).max(0) / 1000;
                        self.io.stats.bridge.agent_sip_delay.record(late as u64);
                    }
                    if drops > self.io.sip_drops {
                        self.io.stats.sip_dropped_here += u64::from(drops - self.io.sip_drops);
                        self.io.sip_drops = drops;
                    }
                    n
                }
                Err(_) => return,
            };
            let Ok(msg) = parse_datagram(&self.io.rx[..n], 65536) else {
                continue;
            };
            match msg {
                Message::Response(r) => {
                    if r.cseq_method.as_str() == "REGISTER" {
                        if let Some(i) = self.agent_for_registration(&r.call_id) {
                            self.on_register_response(i, &r, now_ms);
                        }
                    }
                }
                Message::Request(req) => self.on_request(&req, now_ms),
            }
        }
    }

    fn reply(&mut self, req: &Request, code: u16, reason: &str) {
        let b = ResponseBuilder::new(req, code, reason, Some("agent")).build();
        self.io.send_sip(&b);
    }

    fn on_request(&mut self, req: &Request, now_ms: u64) {
        let known = self.by_call_id.get(&req.call_id).copied();
        match req.method.as_str() {
            "INVITE" => match known {
                // A retransmission (or a re-INVITE): the same answer again.
                Some(slot) => {
                    if let Some(c) = self.calls[slot].as_ref() {
                        let ok = c.ok.clone();
                        self.io.send_sip(&ok);
                    }
                }
                None => self.on_invite(req, now_ms),
            },
            "ACK" => {
                if let Some(c) = known.and_then(|s| self.calls[s].as_mut()) {
                    if c.phase == Phase::Answered {
                        c.phase = Phase::Up;
                        c.ok = Vec::new();
                        self.io.stats.bridge.acks += 1;
                        let us = (net::realtime_ns() - c.answered_rt).max(0) / 1000;
                        self.io.stats.bridge.answer_to_ack.record(us as u64);
                    }
                }
            }
            "BYE" => {
                self.reply(req, 200, "OK");
                match known {
                    Some(slot) => {
                        self.io.stats.bridge.byes += 1;
                        self.end_call(slot, End::Bye);
                    }
                    None => self.io.stats.bridge.late_byes += 1,
                }
            }
            "CANCEL" => {
                // We answer every INVITE at once, so a CANCEL always comes after our 200: it
                // changes nothing (RFC 3261 §9.2); the server ACKs and sends BYE.
                self.io.stats.bridge.cancels += 1;
                self.reply(req, 200, "OK");
            }
            _ => self.reply(req, 200, "OK"),
        }
    }

    fn on_invite(&mut self, req: &Request, now_ms: u64) {
        let agent = uri_user(&req.uri)
            .and_then(|u| u.strip_prefix("load-"))
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(self.cfg.first))
            .filter(|&i| i < self.agents.len());
        let Some(agent) = agent else {
            self.io.stats.bridge.unknown_requests += 1;
            self.reply(req, 404, "Not Found");
            return;
        };
        let offer = ivr311::media::sdp::parse(&req.body)
            .ok()
            .and_then(|m| Some((m.addr, *m.codecs.first()?, m.telephone_event)));
        let Some((addr, (pt, codec), te)) = offer else {
            self.reply(req, 488, "Not Acceptable Here");
            return;
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.calls.push(None);
                self.calls.len() - 1
            }
        };
        let sock = match self.rtp_socket(addr) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an agent RTP socket");
                self.free.push(slot);
                self.reply(req, 503, "Service Unavailable");
                return;
            }
        };
        let local = sock
            .local_addr()
            .unwrap_or(SocketAddr::new(self.cfg.local_ip, 0));
        let ip = local.ip();
        let name = match codec {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
        };
        let te = te.unwrap_or(101);
        let sdp = format!(
            "v=0\r\no=ivr311-load-agent {slot} 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
m=audio {port} RTP/AVP {pt} {te}\r\na=rtpmap:{pt} {name}/8000\r\n\
a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\na=ptime:20\r\na=sendrecv\r\n",
            port = local.port()
        );
        let id = &self.agents[agent].id;
        let ok = ResponseBuilder::new(
            req,
            200,
            "OK",
            Some(&format!("ag{:x}", rand::random::<u64>())),
        )
        .header("Contact", format!("<sip:{id}@{}>", self.io.sip_local))
        .header("User-Agent", "ivr311-load agent")
        .body("application/sdp", sdp)
        .build()
        .to_vec();
        self.io.send_sip(&ok);
        let b = &mut self.io.stats.bridge;
        b.offers += 1;
        if let Some(other) = self.agents[agent].call {
            if self.calls[other].is_some() {
                b.offers_to_busy_agent += 1;
            }
        }
        self.agents[agent].call = Some(slot);
        let rtp = RtpStream::new();
        let ts0 = rtp.timestamp();
        let bucket = (now_ms % PERIOD_MS) as usize;
        let pos = self.buckets[bucket].len();
        self.buckets[bucket].push(slot);
        let mut media_start_ms =
            now_ms + (bucket as u64 + PERIOD_MS - now_ms % PERIOD_MS) % PERIOD_MS;
        if media_start_ms <= now_ms {
            media_start_ms += PERIOD_MS;
        }
        self.by_call_id.insert(req.call_id.clone(), slot);
        self.calls[slot] = Some(Box::new(AgentCall {
            bucket,
            pos,
            agent,
            call_id: req.call_id.clone(),
            phase: Phase::Answered,
            ok,
            retrans_ms: now_ms + T1_MS,
            interval_ms: T1_MS,
            deadline_ms: now_ms + 64 * T1_MS,
            sock,
            codec,
            pt,
            te_pt: te,
            rtp,
            ts0,
            media_start_ms,
            last_k: None,
            heard: LastHeard::default(),
            drops: 0,
            tx: 0,
            answered_rt: net::realtime_ns(),
            caller_call_id: req.header("X-311-Call-ID").unwrap_or_default().to_owned(),
        }));
        self.live += 1;
        self.shared.bridges.fetch_add(1, Ordering::Relaxed);
    }

    fn rtp_socket(&self, remote: SocketAddr) -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((self.cfg.local_ip, 0))?;
        s.set_nonblocking(true)?;
        net::enable_rx_timestamps(s.as_raw_fd())?;
        net::buffer_and_count_drops(s.as_raw_fd(), net::RTP_RCVBUF)?;
        s.connect(remote)?;
        Ok(s)
    }

    // ---- calls -------------------------------------------------------------------------------

    fn end_call(&mut self, slot: usize, why: End) {
        let Some(call) = self.calls[slot].take() else {
            return;
        };
        let bucket = &mut self.buckets[call.bucket];
        bucket.swap_remove(call.pos);
        if let Some(&moved) = bucket.get(call.pos) {
            if let Some(c) = self.calls[moved].as_mut() {
                c.pos = call.pos;
            }
        }
        self.by_call_id.remove(&call.call_id);
        tracing::debug!(
            caller = %call.caller_call_id,
            agent = %self.agents[call.agent].id,
            local = ?call.sock.local_addr().ok(),
            server_leg = ?call.sock.peer_addr().ok(),
            sent = call.tx,
            received = call.heard.rx,
            ?why,
            "agent call ended"
        );
        if self.agents[call.agent].call == Some(slot) {
            self.agents[call.agent].call = None;
        }
        let b = &mut self.io.stats.bridge;
        match why {
            End::NoAck => b.agent_no_ack += 1,
            End::Cut => b.agent_calls_cut += 1,
            End::Bye if call.heard.rx == 0 => b.agent_no_caller_audio += 1,
            End::Bye => b.agent_calls_ok += 1,
        }
        self.free.push(slot);
        self.live -= 1;
        self.shared.bridges.fetch_sub(1, Ordering::Relaxed);
    }

    fn cut_all(&mut self) {
        for slot in 0..self.calls.len() {
            if self.calls[slot].is_some() {
                self.end_call(slot, End::Cut);
            }
        }
    }

    fn run_wheel(&mut self, now_ms: u64) {
        for m in due_turns(self.done_ms, now_ms, self.epoch, &mut self.io.stats) {
            let b = (m % PERIOD_MS) as usize;
            let mut i = 0;
            while i < self.buckets[b].len() {
                let slot = self.buckets[b][i];
                let end = match self.calls[slot].as_mut() {
                    Some(call) => {
                        // What the agent heard since the call's last turn.
                        let io = &mut self.io;
                        self.rtp_in
                            .drain(call.sock.as_raw_fd(), |pkt, stamp, drops| {
                                on_rtp(io, call, pkt, stamp, drops)
                            });
                        visit(&mut self.io, call, m)
                    }
                    None => Some(End::Cut),
                };
                match end {
                    Some(why) => self.end_call(slot, why),
                    None => i += 1,
                }
            }
        }
        self.done_ms = self.done_ms.max(now_ms);
    }
}

/// Account one datagram of the caller's relayed audio, received at `stamp` (kernel realtime
/// ns, 0: none), with the socket's drop count so far.
fn on_rtp(io: &mut Io, call: &mut AgentCall, pkt: &[u8], stamp: i64, drops: u32) {
    if drops > call.drops {
        io.stats.bridge.at_agent.dropped_here += u64::from(drops - call.drops);
        call.drops = drops;
    }
    let stamp = if stamp == 0 {
        io.stats.unstamped += 1;
        net::realtime_ns()
    } else {
        stamp
    };
    let n = pkt.len();
    if n < 12 || pkt[0] >> 6 != 2 || (200..=204).contains(&pkt[1]) {
        return;
    }
    let b = &mut io.stats.bridge;
    let seq = u16::from_be_bytes([pkt[2], pkt[3]]);
    let Some((payload::FROM_CALLER, sent)) = payload::rtp_payload(pkt).and_then(payload::read)
    else {
        if pkt[1] & 0x7f == call.te_pt {
            // The caller's key into the queue, relayed (its End packets outlast the
            // answer). Not audio: no pacing, but the numbering goes on.
            b.at_agent_events += 1;
            if call.heard.rx > 0 {
                call.heard.seq = seq;
            }
        } else {
            b.at_agent.foreign += 1;
        }
        return;
    };
    b.at_agent.packet(&mut call.heard, stamp, sent, seq);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Bye,
    NoAck,
    Cut,
}

/// One visit of an agent call in its wheel slot at ms `m`: retransmit the 200 until the ACK,
/// send this period's audio. Returns why the call ends, if it does.
fn visit(io: &mut Io, call: &mut AgentCall, m: u64) -> Option<End> {
    if call.phase == Phase::Answered {
        if m >= call.deadline_ms {
            return Some(End::NoAck);
        }
        if m >= call.retrans_ms {
            // Timer G: T1 doubling up to T2.
            let ok = std::mem::take(&mut call.ok);
            io.send_sip(&ok);
            call.ok = ok;
            call.interval_ms = (call.interval_ms * 2).min(T2_MS);
            call.retrans_ms = m + call.interval_ms;
        }
    }
    if m < call.media_start_ms {
        return None;
    }
    let k = (m - call.media_start_ms) / PERIOD_MS;
    if call.last_k.is_some_and(|l| k <= l) {
        return None;
    }
    call.last_k = Some(k);
    let ts = call.ts0.wrapping_add(SAMPLES.wrapping_mul(k as u32));
    let mut frame: [u8; 160] = io.audio[law(call.codec)][(k % 50) as usize];
    payload::stamp(&mut frame, payload::FROM_AGENT, net::realtime_ns());
    let n = call.rtp.write_at(call.pt, ts, k == 0, &frame, &mut io.pkt);
    match call.sock.send(&io.pkt[..n]) {
        Ok(_) => {
            io.stats.bridge.agent_tx += 1;
            call.tx += 1;
        }
        Err(_) => io.stats.bridge.agent_send_errors += 1,
    }
    None
}

/// A parameter of a `Digest` challenge (quoted or not).
fn digest_param(challenge: &str, name: &str) -> Option<String> {
    let rest = challenge.trim().strip_prefix("Digest")?;
    rest.split(',').find_map(|part| {
        let (k, v) = part.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The `Authorization` value answering the 401 `r` (SHA-256 if offered, else MD5), qop=auth.
fn authorization(r: &Response, user: &str, password: &str, uri: &str) -> Option<String> {
    let challenges: Vec<&str> = r.headers_named("WWW-Authenticate").collect();
    let pick = |alg: &str| {
        challenges.iter().copied().find(|c| {
            digest_param(c, "algorithm")
                .unwrap_or_else(|| "MD5".into())
                .eq_ignore_ascii_case(alg)
        })
    };
    let (alg, c) = match pick("SHA-256") {
        Some(c) => ("SHA-256", c),
        None => ("MD5", pick("MD5")?),
    };
    let h = |s: &str| -> String {
        if alg == "MD5" {
            hex(&Md5::digest(s.as_bytes()))
        } else {
            hex(&Sha256::digest(s.as_bytes()))
        }
    };
    let realm = digest_param(c, "realm")?;
    let nonce = digest_param(c, "nonce")?;
    let opaque = digest_param(c, "opaque")
        .map(|o| format!(", opaque=\"{o}\""))
        .unwrap_or_default();
    let cnonce = format!("{:016x}", rand::random::<u64>());
    let nc = "00000001";
    let ha1 = h(&format!("{user}:{realm}:{password}"));
    let ha2 = h(&format!("REGISTER:{uri}"));
    let resp = h(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
    Some(format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
response=\"{resp}\", algorithm={alg}, qop=auth, nc={nc}, cnonce=\"{cnonce}\"{opaque}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_and_challenge_parameters() {
        assert_eq!(agent_id(1), "load-0001");
        assert_eq!(agent_id(12345), "load-12345");
        let c = "Digest realm=\"ivr311\", qop=\"auth\", algorithm=MD5, nonce=\"abc\", opaque=\"o\", stale=true";
        assert_eq!(digest_param(c, "realm").as_deref(), Some("ivr311"));
        assert_eq!(digest_param(c, "algorithm").as_deref(), Some("MD5"));
        assert_eq!(digest_param(c, "stale").as_deref(), Some("true"));
        assert_eq!(digest_param(c, "nope"), None);
    }
}
