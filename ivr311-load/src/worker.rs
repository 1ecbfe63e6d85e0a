//! One worker thread: a share of the calls, one SIP socket, one RTP socket per call, one epoll
//! set and a 1 ms timerfd.
//!
//! Every call sits in one of 20 one-millisecond slots of a wheel (its phase inside the 20 ms
//! packet period, fixed when it is placed). Each millisecond the worker visits that slot's
//! calls once: send this period's RTP packet (audio, or a DTMF event packet), run the script,
//! retransmit INVITE/BYE per RFC 3261 timers A/E. The SIP socket is read as it becomes ready
//! (epoll); a call's RTP socket is read at the call's turn, before its visit, with one
//! `recvmmsg` (see [`net::RecvBatch`] for why nobody sleeps on it), and every datagram
//! carries its kernel receive stamp. Nothing on the per-packet path allocates: packets are
//! written into one buffer, the histograms are fixed arrays.

use crate::net::{self, CmsgBuf, Epoll, RecvBatch, Ticker};
use crate::payload;
use crate::script::{Action, At, Script};
use crate::stats::{Failure, LastHeard, Stats};
use ivr311::media::dtmf::{digit_to_event, TelephoneEvent};
use ivr311::media::g711::Codec;
use ivr311::media::rtp::RtpStream;
use ivr311::sip::message::{parse_datagram, Message, Method, Request, Response, ResponseBuilder};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

/// RFC 3261 T1 and T2, ms.
const T1_MS: u64 = 500;
const T2_MS: u64 = 4000;
/// Timers B and F: 64·T1.
const TIMER_B_MS: u64 = 64 * T1_MS;
/// The packet period.
const PERIOD_MS: u64 = 20;
const SAMPLES: u32 = 160;
/// A key is held for this many packets (100 ms) ...
const HOLD_PACKETS: u64 = 5;
/// ... then ended with this many End packets, one per period, same timestamp and duration.
const END_PACKETS: u64 = 3;
/// A key that expects a response and gets none within this is counted unanswered.
const RESPONSE_TIMEOUT_MS: u64 = 3000;

const SIP_TOKEN: u64 = u64::MAX;
const TICK_TOKEN: u64 = u64::MAX - 1;

/// What the main thread and the workers share.
pub struct Shared {
    /// Bumped by the main thread at each step boundary; each worker then sends its counts.
    pub step: AtomicU32,
    /// Place new calls.
    pub placing: AtomicBool,
    /// Drain timed out: end every call now.
    pub abort: AtomicBool,
    /// Stop the thread (after the last step was collected).
    pub exit: AtomicBool,
    pub threads: Vec<PerThread>,
    /// Agent calls up (answered, no BYE yet), over all agent threads.
    pub bridges: AtomicU64,
    /// Agents whose registration holds.
    pub registered: AtomicU64,
}

#[derive(Default)]
pub struct PerThread {
    /// Calls this thread keeps up (u64::MAX: no limit, rate mode).
    pub concurrent: AtomicU64,
    pub live: AtomicU64,
}

impl Shared {
    pub fn new(threads: usize) -> Shared {
        Shared {
            step: AtomicU32::new(0),
            placing: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            exit: AtomicBool::new(false),
            threads: (0..threads).map(|_| PerThread::default()).collect(),
            bridges: AtomicU64::new(0),
            registered: AtomicU64::new(0),
        }
    }

    pub fn live(&self) -> u64 {
        self.threads
            .iter()
            .map(|t| t.live.load(Ordering::Relaxed))
            .sum()
    }
}

pub struct Config {
    pub id: usize,
    pub target: SocketAddr,
    pub local_ip: IpAddr,
    pub script: Arc<Script>,
    /// New calls per second from this thread (0: no cap).
    pub rate: f64,
    /// Calls this thread places in all (None: no limit).
    pub calls: Option<u64>,
    /// Distinguishes this run's Call-IDs.
    pub run: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Inviting,
    Up,
    Ending,
}

#[derive(Debug, Clone, Copy)]
struct Digit {
    /// Period index of the start packet.
    k0: u64,
    /// RTP timestamp of the event (its start).
    ts: u32,
    event: u8,
    expect: bool,
    /// End packets sent so far.
    ends_sent: u64,
    /// The duration the End packets carry (fixed by the first one).
    end_duration: u16,
}

#[derive(Debug, Clone, Copy)]
struct Await {
    start_rt: i64,
    end_rt: Option<i64>,
    deadline_ms: u64,
}

struct Call {
    gen: u32,
    bucket: usize,
    pos: usize,
    phase: Phase,
    call_id: String,
    from_tag: String,
    /// The caller's number: the From user of every request of the call.
    number: u64,
    to_tag: String,
    remote_uri: String,
    invite: Vec<u8>,
    bye: Vec<u8>,
    invite_rt: i64,
    retrans_ms: u64,
    interval_ms: u64,
    deadline_ms: u64,
    provisional: bool,
    outcome: Option<Failure>,
    sock: UdpSocket,
    codec: Codec,
    pt: u8,
    te_pt: u8,
    rtp: RtpStream,
    ts0: u32,
    media_start_ms: u64,
    last_k: Option<u64>,
    marker_next: bool,
    step: usize,
    next_step_ms: Option<u64>,
    digit: Option<Digit>,
    awaiting: Option<Await>,
    rx: u64,
    last_rx_ns: i64,
    last_seq: u16,
    /// When the last key's first packet was sent (realtime ns).
    last_press_rt: i64,
    /// Waiting for an operator: give up at this ms.
    bridge_deadline_ms: Option<u64>,
    /// The operator's audio heard so far (operator script): packets, the last one's stamps
    /// and sequence number.
    agent: LastHeard,
    /// The socket's drop count last seen.
    drops: u32,
}

/// Sockets, buffers and counters (kept apart from the calls so both can be borrowed at once).
struct Io {
    target: SocketAddr,
    sip: UdpSocket,
    sip_local: SocketAddr,
    stats: Stats,
    pkt: [u8; 256],
    rx: Box<[u8; 65536]>,
    cmsg: CmsgBuf,
    /// 50 frames (1 s) of a quiet 440 Hz tone in each law, sent in turn.
    audio: [Vec<[u8; 160]>; 2],
    /// Mark the audio with its send time (the script talks to our agents).
    stamp_audio: bool,
    /// The SIP socket's drop count last seen.
    sip_drops: u32,
}

pub struct Worker {
    cfg: Config,
    shared: Arc<Shared>,
    tx: Sender<(usize, u32, Stats)>,
    io: Io,
    /// What a call's RTP socket held at its last turn.
    rtp_in: RecvBatch,
    epoll: Epoll,
    ticker: Ticker,
    calls: Vec<Option<Box<Call>>>,
    gens: Vec<u32>,
    free: Vec<usize>,
    buckets: [Vec<usize>; PERIOD_MS as usize],
    epoch: Instant,
    done_ms: u64,
    live: u64,
    placed: u64,
    next_place_ms: f64,
    step: u32,
}

pub(crate) fn tone(codec: Codec) -> Vec<[u8; 160]> {
    (0..50)
        .map(|f| {
            let pcm: Vec<i16> = (0..160)
                .map(|i| {
                    let t = (f * 160 + i) as f32 / 8000.0;
                    ((t * std::f32::consts::TAU * 440.0).sin() * 1500.0) as i16
                })
                .collect();
            let mut out = [0u8; 160];
            codec.encode(&pcm, &mut out);
            out
        })
        .collect()
}

pub(crate) fn law(c: Codec) -> usize {
    match c {
        Codec::Pcmu => 0,
        Codec::Pcma => 1,
    }
}

impl Worker {
    pub fn new(
        cfg: Config,
        shared: Arc<Shared>,
        tx: Sender<(usize, u32, Stats)>,
    ) -> std::io::Result<Worker> {
        let sip = UdpSocket::bind((cfg.local_ip, 0))?;
        sip.set_nonblocking(true)?;
        net::enable_rx_timestamps(sip.as_raw_fd())?;
        net::buffer_and_count_drops(sip.as_raw_fd(), net::SIP_RCVBUF)?;
        let sip_local = sip.local_addr()?;
        let epoll = Epoll::new()?;
        epoll.add(sip.as_raw_fd(), SIP_TOKEN)?;
        let ticker = Ticker::every_ms()?;
        epoll.add(ticker.raw(), TICK_TOKEN)?;
        let step = shared.step.load(Ordering::Acquire);
        Ok(Worker {
            io: Io {
                target: cfg.target,
                sip,
                sip_local,
                stats: Stats::default(),
                pkt: [0; 256],
                rx: Box::new([0; 65536]),
                cmsg: [0; 8],
                audio: [tone(Codec::Pcmu), tone(Codec::Pcma)],
                stamp_audio: cfg.script.bridges(),
                sip_drops: 0,
            },
            cfg,
            shared,
            tx,
            rtp_in: RecvBatch::new(),
            epoll,
            ticker,
            calls: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            buckets: Default::default(),
            epoch: Instant::now(),
            done_ms: 0,
            live: 0,
            placed: 0,
            next_place_ms: 0.0,
            step,
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
                self.abort_all();
            }
            let now_ms = self.now_ms();
            self.place(now_ms);
            self.run_wheel(now_ms);
            let n = match self.epoll.wait(&mut events, 50) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; worker stops");
                    return;
                }
            };
            let now_ms = self.now_ms();
            for ev in &events[..n] {
                let token = ev.u64;
                match token {
                    TICK_TOKEN => self.ticker.clear(),
                    SIP_TOKEN => self.recv_sip(now_ms),
                    _ => {}
                }
            }
        }
    }

    fn set_live(&self) {
        self.shared.threads[self.cfg.id]
            .live
            .store(self.live, Ordering::Relaxed);
    }

    fn place(&mut self, now_ms: u64) {
        if !self.shared.placing.load(Ordering::Relaxed) {
            return;
        }
        let target = self.shared.threads[self.cfg.id]
            .concurrent
            .load(Ordering::Relaxed);
        let now = now_ms as f64;
        loop {
            if self.live >= target || self.cfg.calls.is_some_and(|n| self.placed >= n) {
                return;
            }
            if self.cfg.rate > 0.0 {
                if now < self.next_place_ms {
                    return;
                }
                // Never make up for more than 100 ms of lost placements in one burst.
                self.next_place_ms = self.next_place_ms.max(now - 100.0) + 1000.0 / self.cfg.rate;
            }
            self.place_call(now_ms);
        }
    }

    fn place_call(&mut self, now_ms: u64) {
        self.placed += 1;
        self.io.stats.placed += 1;
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.calls.push(None);
                self.gens.push(0);
                self.calls.len() - 1
            }
        };
        self.gens[slot] = self.gens[slot].wrapping_add(1).max(1);
        let gen = self.gens[slot];
        let sock = match self.rtp_socket() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an RTP socket; call not placed");
                self.io.stats.fail(Failure::No200);
                self.free.push(slot);
                return;
            }
        };
        let rtp_addr = sock
            .local_addr()
            .unwrap_or(SocketAddr::new(self.cfg.local_ip, 0));
        let call_id = format!(
            "{:08x}-{}-{}-{}@ivr311-load",
            self.cfg.run, self.cfg.id, slot, gen
        );
        let from_tag = format!("{:x}", rand::random::<u64>());
        let invite = self.invite(&call_id, &from_tag, rtp_addr, slot);
        let rtp = RtpStream::new();
        let ts0 = rtp.timestamp();
        let bucket = (now_ms % PERIOD_MS) as usize;
        let pos = self.buckets[bucket].len();
        self.buckets[bucket].push(slot);
        let mut call = Box::new(Call {
            gen,
            bucket,
            pos,
            phase: Phase::Inviting,
            call_id,
            from_tag,
            number: slot as u64 % 10_000_000,
            to_tag: String::new(),
            remote_uri: format!("sip:311@{}", self.cfg.target),
            invite,
            bye: Vec::new(),
            invite_rt: 0,
            retrans_ms: now_ms + T1_MS,
            interval_ms: T1_MS,
            deadline_ms: now_ms + TIMER_B_MS,
            provisional: false,
            outcome: None,
            sock,
            codec: Codec::Pcma,
            pt: 8,
            te_pt: 101,
            rtp,
            ts0,
            media_start_ms: 0,
            last_k: None,
            marker_next: true,
            step: 0,
            next_step_ms: None,
            digit: None,
            awaiting: None,
            rx: 0,
            last_rx_ns: 0,
            last_seq: 0,
            last_press_rt: 0,
            bridge_deadline_ms: None,
            agent: LastHeard::default(),
            drops: 0,
        });
        call.invite_rt = net::realtime_ns();
        self.io.send_sip(&call.invite);
        self.calls[slot] = Some(call);
        self.live += 1;
        self.set_live();
    }

    fn rtp_socket(&self) -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((self.cfg.local_ip, 0))?;
        s.set_nonblocking(true)?;
        net::enable_rx_timestamps(s.as_raw_fd())?;
        net::buffer_and_count_drops(s.as_raw_fd(), net::RTP_RCVBUF)?;
        Ok(s)
    }

    fn invite(&self, call_id: &str, tag: &str, rtp: SocketAddr, slot: usize) -> Vec<u8> {
        let ip = rtp.ip();
        // Callers who talk to our agents prefer PCMU, the law the server offers the agent leg
        // first, so it passes their audio (and its marks) through untranscoded.
        let laws = if self.io.stamp_audio {
            "0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000"
        } else {
            "8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000"
        };
        let sdp = format!(
            "v=0\r\no=ivr311-load {slot} 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
m=audio {port} RTP/AVP {laws}\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n",
            port = rtp.port()
        );
        let me = self.io.sip_local;
        format!(
            "INVITE sip:311@{srv} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch=z9hG4bK{call_id_hash:x}i;rport\r\n\
Max-Forwards: 70\r\n\
From: \"ivr311-load\" <sip:+1555{num:07}@{ip}>;tag={tag}\r\n\
To: <sip:311@{srv}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:load@{me}>\r\n\
User-Agent: ivr311-load\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {len}\r\n\r\n{sdp}",
            srv = self.cfg.target,
            call_id_hash = rand::random::<u64>(),
            num = slot % 10_000_000,
            ip = me.ip(),
            len = sdp.len(),
        )
        .into_bytes()
    }

    fn run_wheel(&mut self, now_ms: u64) {
        for m in due_turns(self.done_ms, now_ms, self.epoch, &mut self.io.stats) {
            let b = (m % PERIOD_MS) as usize;
            let mut i = 0;
            while i < self.buckets[b].len() {
                let slot = self.buckets[b][i];
                let finished = match self.calls[slot].as_mut() {
                    Some(call) => {
                        // What the call heard since its last turn.
                        let (io, script) = (&mut self.io, &self.cfg.script);
                        self.rtp_in
                            .drain(call.sock.as_raw_fd(), |pkt, stamp, drops| {
                                on_rtp(io, script, call, pkt, stamp, drops, m)
                            });
                        visit(&mut self.io, &self.cfg.script, call, m)
                    }
                    None => true,
                };
                if finished {
                    self.finish(slot);
                } else {
                    i += 1;
                }
            }
        }
        self.done_ms = self.done_ms.max(now_ms);
    }

    /// Take a call out: count its outcome, free its slot (closing its socket).
    fn finish(&mut self, slot: usize) {
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
        if call.rx == 0 && call.agent.rx == 0 && call.phase != Phase::Inviting {
            self.io.stats.silent_calls += 1;
        }
        if call.outcome == Some(Failure::NotBridged) {
            tracing::debug!(
                call_id = %call.call_id,
                local = ?call.sock.local_addr().ok(),
                server_media = ?call.sock.peer_addr().ok(),
                server_packets = call.rx,
                "caller heard no operator"
            );
        }
        if call.agent.rx > 0 {
            tracing::debug!(call_id = %call.call_id, agent_packets = call.agent.rx, "caller heard an operator");
        }
        match call.outcome {
            Some(f) => self.io.stats.fail(f),
            None if call.rx == 0 => self.io.stats.fail(Failure::NoRtp),
            None => self.io.stats.ok += 1,
        }
        self.free.push(slot);
        self.live -= 1;
        self.set_live();
    }

    fn abort_all(&mut self) {
        for slot in 0..self.calls.len() {
            if let Some(call) = self.calls[slot].as_mut() {
                match call.phase {
                    Phase::Inviting => call.outcome = Some(Failure::No200),
                    Phase::Ending => call.outcome = Some(Failure::ByeUnanswered),
                    Phase::Up => {
                        let bye = bye_bytes(&self.io, call);
                        self.io.send_sip(&bye);
                    }
                }
                self.finish(slot);
            }
        }
    }

    fn call_for(&mut self, call_id: &str) -> Option<usize> {
        let id = call_id.split('@').next()?;
        let mut parts = id.split('-');
        let run = u32::from_str_radix(parts.next()?, 16).ok()?;
        let thread: usize = parts.next()?.parse().ok()?;
        let slot: usize = parts.next()?.parse().ok()?;
        let gen: u32 = parts.next()?.parse().ok()?;
        if run != self.cfg.run || thread != self.cfg.id {
            return None;
        }
        self.calls
            .get(slot)?
            .as_ref()
            .filter(|c| c.gen == gen)
            .map(|_| slot)
    }

    fn recv_sip(&mut self, now_ms: u64) {
        loop {
            let fd = self.io.sip.as_raw_fd();
            let (n, stamp, drops) =
                match net::recv_stamped_drops(fd, &mut self.io.rx[..], &mut self.io.cmsg) {
                    Ok(x) => x,
                    Err(_) => return,
                };
            if drops > self.io.sip_drops {
                self.io.stats.sip_dropped_here += u64::from(drops - self.io.sip_drops);
                self.io.sip_drops = drops;
            }
            let stamp = if stamp == 0 {
                self.io.stats.unstamped += 1;
                net::realtime_ns()
            } else {
                stamp
            };
            let Ok(msg) = parse_datagram(&self.io.rx[..n], 65536) else {
                continue;
            };
            let slot = self.call_for(&msg.common().call_id);
            match msg {
                Message::Request(req) => self.on_request(slot, &req),
                Message::Response(resp) => match slot {
                    Some(slot) => self.on_response(slot, &resp, stamp, now_ms),
                    None => end_late_answer(&mut self.io, &resp),
                },
            }
        }
    }

    fn on_request(&mut self, slot: Option<usize>, req: &Request) {
        let method = req.method.as_str();
        if method == "ACK" {
            return;
        }
        let ok = ResponseBuilder::new(req, 200, "OK", None).build();
        self.io.send_sip(&ok);
        if method != "BYE" {
            return;
        }
        self.io.stats.server_byes_seen += 1;
        let Some(slot) = slot else { return };
        if let Some(call) = self.calls[slot].as_mut() {
            if call.phase != Phase::Ending {
                call.outcome = Some(Failure::ServerBye);
            }
        }
        self.finish(slot);
    }

    fn on_response(&mut self, slot: usize, r: &Response, stamp: i64, now_ms: u64) {
        let Some(call) = self.calls[slot].as_mut() else {
            return;
        };
        let finished = match r.cseq_method.as_str() {
            "INVITE" => on_invite_response(&mut self.io, &self.cfg.script, call, r, stamp, now_ms),
            "BYE" if call.phase == Phase::Ending => {
                if r.code < 200 {
                    call.provisional = true;
                    false
                } else {
                    if r.code >= 300 {
                        call.outcome = Some(Failure::Non2xx(r.code));
                    }
                    true
                }
            }
            _ => false,
        };
        if finished {
            self.finish(slot);
        }
    }
}

/// Account one datagram from the call's RTP socket, received at `stamp` (kernel realtime ns,
/// 0: none) and read at ms `now_ms`, with the socket's drop count so far.
/// The wheel's 1 ms turns that are due: those after `done_ms` up to `now_ms`, or only the last
/// period's when the thread fell a whole period behind (a stall: the missed turns are skipped,
/// not sent in a burst). Each turn's lateness goes to `send_lag`. (The callers' and the agents'
/// wheels both turn this way.)
pub fn due_turns(
    done_ms: u64,
    now_ms: u64,
    epoch: Instant,
    stats: &mut Stats,
) -> std::ops::Range<u64> {
    if now_ms <= done_ms {
        return 0..0;
    }
    let from = done_ms + 1;
    let start = if now_ms - from >= PERIOD_MS {
        stats.stalls += 1;
        now_ms + 1 - PERIOD_MS
    } else {
        from
    };
    let real_us = epoch.elapsed().as_micros() as u64;
    for m in start..=now_ms {
        stats.send_lag.record(real_us.saturating_sub(m * 1000));
    }
    start..now_ms + 1
}

fn on_rtp(
    io: &mut Io,
    script: &Script,
    call: &mut Call,
    b: &[u8],
    stamp: i64,
    drops: u32,
    now_ms: u64,
) {
    let stamp = if stamp == 0 {
        io.stats.unstamped += 1;
        net::realtime_ns()
    } else {
        stamp
    };
    if drops > call.drops {
        // Once the operator is heard, whatever is lost is theirs.
        let lost = u64::from(drops - call.drops);
        if call.agent.rx > 0 {
            io.stats.bridge.at_caller.dropped_here += lost;
        } else {
            io.stats.rtp_dropped_here += lost;
        }
        call.drops = drops;
    }
    let n = b.len();
    if n < 12 || b[0] >> 6 != 2 || (200..=204).contains(&b[1]) {
        return;
    }
    let marker = b[1] & 0x80 != 0;
    let seq = u16::from_be_bytes([b[2], b[3]]);
    let s = &mut io.stats;
    let mark = payload::rtp_payload(b).and_then(payload::read);
    if let (Some((payload::FROM_AGENT, _)), Phase::Inviting) = (mark, call.phase) {
        // No operator can be heard before our call is answered: this is another call's
        // bridge, still relayed to the address our socket took over from it (the kernel
        // reuses a closed call's ephemeral port, and a server that has not yet handled
        // that call's BYE still sends there). Until the 200 connects our socket to the
        // server's port, such frames would be taken for our operator: the call would
        // then count the server's prompts as foreign, its keys as unanswered and itself
        // as silent.
        s.bridge.at_caller.foreign += 1;
        return;
    }
    if let Some((payload::FROM_AGENT, sent)) = mark {
        let bs = &mut s.bridge;
        if call.agent.rx == 0 {
            bs.bridged += 1;
            if call.last_press_rt > 0 {
                bs.press_to_agent_audio
                    .record(((stamp - call.last_press_rt).max(0) / 1000) as u64);
            }
            if call.bridge_deadline_ms.take().is_some() {
                anchor(script, call, now_ms);
            }
        }
        bs.at_caller.packet(&mut call.agent, stamp, sent, seq);
        return;
    }
    if call.agent.rx > 0 {
        // Bridged: anything else from the server is not the operator's audio.
        s.bridge.at_caller.foreign += 1;
        return;
    }
    if call.rx > 0 {
        let d = stamp - call.last_rx_ns;
        s.pacing.record((d - 20_000_000).unsigned_abs() / 1000);
        if d < 5_000_000 {
            s.bursts += 1;
        }
        let expected = call.last_seq.wrapping_add(1);
        let gap = seq.wrapping_sub(expected);
        if gap != 0 && gap < 1000 {
            s.rtp_gaps += u64::from(gap);
        }
    }
    call.rx += 1;
    call.last_rx_ns = stamp;
    call.last_seq = seq;
    s.rtp_rx += 1;
    if marker {
        if let Some(a) = call.awaiting {
            if stamp > a.start_rt {
                s.press_to_response
                    .record(((stamp - a.start_rt) / 1000) as u64);
                match a.end_rt {
                    Some(end) if stamp > end => {
                        s.end_to_response.record(((stamp - end) / 1000) as u64)
                    }
                    _ => {
                        s.answered_before_end += 1;
                        s.end_to_response.record(0);
                    }
                }
                call.awaiting = None;
                anchor(script, call, now_ms);
            }
        }
    }
}

impl Io {
    fn send_sip(&mut self, bytes: &[u8]) {
        if self.sip.send_to(bytes, self.target).is_err() {
            self.stats.send_errors += 1;
        }
    }

    fn send_rtp(&mut self, call: &mut Call, pt: u8, ts: u32, marker: bool, payload: &[u8]) {
        let n = call.rtp.write_at(pt, ts, marker, payload, &mut self.pkt);
        match call.sock.send(&self.pkt[..n]) {
            Ok(_) => self.stats.rtp_tx += 1,
            Err(_) => self.stats.send_errors += 1,
        }
    }
}

/// The previous step settled at `now_ms`: schedule a step that waits for that.
fn anchor(script: &Script, call: &mut Call, now_ms: u64) {
    if call.next_step_ms.is_some() {
        return;
    }
    if let Some(step) = script.steps.get(call.step) {
        if let At::AfterPrevious(ms) = step.at {
            call.next_step_ms = Some(now_ms + u64::from(ms));
        }
    }
}

/// When step `i` is due, if that is known yet.
fn schedule(script: &Script, call: &Call, i: usize) -> Option<u64> {
    match script.steps.get(i)?.at {
        At::FromAnswer(ms) => Some(call.media_start_ms + u64::from(ms)),
        At::AfterPrevious(ms) if i == 0 => Some(call.media_start_ms + u64::from(ms)),
        At::AfterPrevious(_) => None,
    }
}

fn via_branch() -> String {
    format!("z9hG4bK{:x}", rand::random::<u64>())
}

fn in_dialog(io: &Io, call: &Call, method: &str, cseq: u32, branch: &str, uri: &str) -> Vec<u8> {
    format!(
        "{method} {uri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch={branch};rport\r\n\
Max-Forwards: 70\r\n\
From: \"ivr311-load\" <sip:+1555{num:07}@{ip}>;tag={tag}\r\n\
To: <sip:311@{srv}>;tag={tt}\r\n\
Call-ID: {cid}\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n",
        me = io.sip_local,
        tag = call.from_tag,
        num = call.number,
        ip = io.sip_local.ip(),
        srv = io.target,
        tt = call.to_tag,
        cid = call.call_id,
    )
    .into_bytes()
}

/// A 2xx to an INVITE of a call we no longer have (it gave up waiting for the answer):
/// acknowledge it and hang up at once, as RFC 3261 §13.2.2.4 asks of a UAC that does not want
/// the session, so the server does not hold a call nobody is on. Built from the response
/// alone; a retransmitted 2xx is acknowledged again and its BYE gets a 481, which is harmless.
fn end_late_answer(io: &mut Io, r: &Response) {
    if r.code / 100 != 2 || r.cseq_method != Method::Invite {
        return;
    }
    for (method, cseq) in [("ACK", r.cseq), ("BYE", r.cseq.wrapping_add(1))] {
        let m = late_answer_request(io.sip_local, io.target, r, method, cseq);
        io.send_sip(&m);
    }
    io.stats.late_answers_ended += 1;
}

/// `method` from `me` in the dialog a 2xx `r` set up (to its Contact, or to `server` if it
/// had none).
fn late_answer_request(
    me: SocketAddr,
    server: SocketAddr,
    r: &Response,
    method: &str,
    cseq: u32,
) -> Vec<u8> {
    let target = r
        .contacts()
        .first()
        .map(|c| c.uri.clone())
        .unwrap_or_else(|| format!("sip:311@{server}"));
    format!(
        "{method} {target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {me};branch={branch};rport\r\n\
Max-Forwards: 70\r\n\
From: {from}\r\n\
To: {to}\r\n\
Call-ID: {cid}\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n",
        branch = via_branch(),
        from = r.from.raw,
        to = r.to.raw,
        cid = r.call_id,
    )
    .into_bytes()
}

fn bye_bytes(io: &Io, call: &Call) -> Vec<u8> {
    in_dialog(io, call, "BYE", 2, &via_branch(), &call.remote_uri)
}

fn on_invite_response(
    io: &mut Io,
    script: &Script,
    call: &mut Call,
    r: &Response,
    stamp: i64,
    now_ms: u64,
) -> bool {
    if r.code < 200 {
        call.provisional = true;
        return false;
    }
    if r.code >= 300 {
        if call.phase != Phase::Inviting {
            return false;
        }
        // ACK for a non-2xx final response: same branch as the INVITE (hop-by-hop).
        call.to_tag = r.to.tag().unwrap_or_default().to_owned();
        let branch = r.top_via().branch.clone().unwrap_or_default();
        let uri = format!("sip:311@{}", io.target);
        let ack = in_dialog(io, call, "ACK", 1, &branch, &uri);
        io.send_sip(&ack);
        call.outcome = Some(Failure::Non2xx(r.code));
        return true;
    }
    if call.phase != Phase::Inviting {
        // A retransmitted 200: our ACK was lost; send it again.
        let ack = in_dialog(io, call, "ACK", 1, &via_branch(), &call.remote_uri);
        io.send_sip(&ack);
        return false;
    }
    io.stats
        .setup
        .record(((stamp - call.invite_rt).max(0) / 1000) as u64);
    call.to_tag = r.to.tag().unwrap_or_default().to_owned();
    if let Some(c) = r.contacts().into_iter().next() {
        call.remote_uri = c.uri;
    }
    let ack = in_dialog(io, call, "ACK", 1, &via_branch(), &call.remote_uri);
    io.send_sip(&ack);
    call.invite = Vec::new();
    let media = ivr311::media::sdp::parse(&r.body)
        .ok()
        .and_then(|m| Some((m.addr, *m.codecs.first()?, m.telephone_event)));
    let Some((addr, (pt, codec), te)) = media else {
        // No usable answer: nothing can flow; hang up at once.
        call.outcome = Some(Failure::NoRtp);
        start_bye(io, call, now_ms);
        return false;
    };
    if call.sock.connect(addr).is_err() {
        call.outcome = Some(Failure::NoRtp);
        start_bye(io, call, now_ms);
        return false;
    }
    call.codec = codec;
    call.pt = pt;
    call.te_pt = te.unwrap_or(101);
    call.phase = Phase::Up;
    // Media starts at this call's next slot of the wheel.
    call.media_start_ms =
        now_ms + (call.bucket as u64 + PERIOD_MS - now_ms % PERIOD_MS) % PERIOD_MS;
    if call.media_start_ms <= now_ms {
        call.media_start_ms += PERIOD_MS;
    }
    call.step = 0;
    call.next_step_ms = schedule(script, call, 0);
    false
}

fn start_bye(io: &mut Io, call: &mut Call, now_ms: u64) {
    call.bye = bye_bytes(io, call);
    io.send_sip(&call.bye);
    call.phase = Phase::Ending;
    call.provisional = false;
    call.interval_ms = T1_MS;
    call.retrans_ms = now_ms + T1_MS;
    call.deadline_ms = now_ms + TIMER_B_MS;
}

/// One visit of a call in its wheel slot at ms `m`. Returns true when the call is over.
fn visit(io: &mut Io, script: &Script, call: &mut Call, m: u64) -> bool {
    match call.phase {
        Phase::Inviting => {
            if m >= call.deadline_ms {
                call.outcome = Some(Failure::No200);
                return true;
            }
            if !call.provisional && m >= call.retrans_ms {
                // Timer A: T1, 2·T1, 4·T1...
                let inv = std::mem::take(&mut call.invite);
                io.send_sip(&inv);
                call.invite = inv;
                call.interval_ms *= 2;
                call.retrans_ms = m + call.interval_ms;
            }
            false
        }
        Phase::Ending => {
            if m >= call.deadline_ms {
                call.outcome = Some(Failure::ByeUnanswered);
                return true;
            }
            if m >= call.retrans_ms {
                // Timer E: T1 doubling up to T2 (T2 once a provisional came).
                io.send_sip(&call.bye);
                call.interval_ms = if call.provisional {
                    T2_MS
                } else {
                    (call.interval_ms * 2).min(T2_MS)
                };
                call.retrans_ms = m + call.interval_ms;
            }
            false
        }
        Phase::Up => {
            media_tick(io, script, call, m);
            false
        }
    }
}

fn media_tick(io: &mut Io, script: &Script, call: &mut Call, m: u64) {
    if m < call.media_start_ms {
        return;
    }
    let k = (m - call.media_start_ms) / PERIOD_MS;
    if call.last_k.is_some_and(|l| k <= l) {
        return;
    }
    call.last_k = Some(k);
    let ts = call.ts0.wrapping_add(SAMPLES.wrapping_mul(k as u32));
    if let Some(a) = call.awaiting {
        if m >= a.deadline_ms {
            io.stats.digits_unanswered += 1;
            call.awaiting = None;
            anchor(script, call, m);
        }
    }
    if call.bridge_deadline_ms.is_some_and(|d| m >= d) {
        call.bridge_deadline_ms = None;
        call.outcome = Some(Failure::NotBridged);
        start_bye(io, call, m);
        return;
    }
    if let Some(mut d) = call.digit {
        // Progress is counted in packets sent, not periods elapsed, so a stall of this thread
        // never skips the End packets (their duration then says how long the key really was
        // held).
        let held = k - d.k0;
        if d.ends_sent < END_PACKETS {
            send_event(io, script, call, &mut d, held, m);
            call.digit = Some(d);
            return;
        }
        call.digit = None;
        // The audio after an event starts a new talk spurt.
        call.marker_next = true;
    }
    if call.next_step_ms.is_some_and(|due| m >= due) {
        let Some(step) = script.steps.get(call.step) else {
            return;
        };
        call.step += 1;
        call.next_step_ms = schedule(script, call, call.step);
        match step.action {
            Action::Press {
                key,
                expect_response,
            } => {
                let Some(event) = digit_to_event(key) else {
                    return;
                };
                let mut d = Digit {
                    k0: k,
                    ts,
                    event,
                    expect: expect_response,
                    ends_sent: 0,
                    end_duration: 0,
                };
                io.stats.digits_sent += 1;
                send_event(io, script, call, &mut d, 0, m);
                call.digit = Some(d);
                return;
            }
            Action::AwaitBridge { timeout_ms } => {
                if call.agent.rx > 0 {
                    // The operator came while the key's End packets were still going out.
                    anchor(script, call, m);
                } else {
                    call.bridge_deadline_ms = Some(m + u64::from(timeout_ms));
                }
            }
            Action::Hangup => {
                start_bye(io, call, m);
                return;
            }
        }
    }
    let frame = &io.audio[law(call.codec)][(k % 50) as usize];
    let mut frame: [u8; 160] = *frame;
    if io.stamp_audio {
        payload::stamp(&mut frame, payload::FROM_CALLER, net::realtime_ns());
    }
    let marker = std::mem::take(&mut call.marker_next);
    io.send_rtp(call, call.pt, ts, marker, &frame);
}

/// The next packet of a key press `held` periods after it started: the start (marker) and
/// continuations while held, then the End packets, all with the event's start timestamp.
/// Returns the payload, the marker bit, and whether this is the first End packet.
fn event_packet(d: &mut Digit, held: u64) -> (TelephoneEvent, bool, bool) {
    let end = d.ends_sent > 0 || held >= HOLD_PACKETS;
    let first_end = end && d.ends_sent == 0;
    if first_end {
        d.end_duration = (held.max(1) * u64::from(SAMPLES)).min(u64::from(u16::MAX)) as u16;
    }
    let duration = if end {
        d.end_duration
    } else {
        ((held + 1) * u64::from(SAMPLES)) as u16
    };
    if end {
        d.ends_sent += 1;
    }
    let ev = TelephoneEvent {
        event: d.event,
        end,
        volume: 10,
        duration,
    };
    (ev, held == 0, first_end)
}

/// Send the next packet of a key press (audio is suspended meanwhile) and note the times the
/// latency figures start from.
fn send_event(io: &mut Io, script: &Script, call: &mut Call, d: &mut Digit, held: u64, m: u64) {
    let (ev, marker, first_end) = event_packet(d, held);
    let now_rt = net::realtime_ns();
    io.send_rtp(call, call.te_pt, d.ts, marker, &ev.write());
    if marker {
        call.last_press_rt = now_rt;
    }
    if marker && d.expect {
        call.awaiting = Some(Await {
            start_rt: now_rt,
            end_rt: None,
            deadline_ms: m + RESPONSE_TIMEOUT_MS,
        });
    }
    if first_end {
        if let Some(a) = call.awaiting.as_mut() {
            a.end_rt = Some(now_rt);
        }
        if !d.expect {
            anchor(script, call, m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digit() -> Digit {
        Digit {
            k0: 0,
            ts: 1234,
            event: 1,
            expect: true,
            ends_sent: 0,
            end_duration: 0,
        }
    }

    /// (end, duration, marker) for each period the worker got to run.
    fn packets(periods: &[u64]) -> Vec<(bool, u16, bool)> {
        let mut d = digit();
        let mut out = Vec::new();
        for &h in periods {
            if d.ends_sent == END_PACKETS {
                break;
            }
            let (ev, marker, _) = event_packet(&mut d, h);
            out.push((ev.end, ev.duration, marker));
        }
        out
    }

    #[test]
    fn a_late_answer_is_acknowledged_and_hung_up_in_its_dialog() {
        let ok = b"SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport=5070\r\n\
From: \"ivr311-load\" <sip:+15550000001@127.0.0.1>;tag=ours\r\n\
To: <sip:311@127.0.0.1:5060>;tag=theirs\r\n\
Call-ID: late-1@ivr311-load\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:311@127.0.0.1:5060;transport=udp>\r\n\
Content-Length: 0\r\n\r\n";
        let Ok(Message::Response(r)) = parse_datagram(ok, 65536) else {
            panic!("the 200 parses");
        };
        let me: SocketAddr = "127.0.0.1:5070".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        for (method, m, cseq) in [("ACK", Method::Ack, 1), ("BYE", Method::Bye, 2)] {
            let bytes = late_answer_request(me, server, &r, method, cseq);
            let Ok(Message::Request(q)) = parse_datagram(&bytes, 65536) else {
                panic!("the {method} parses");
            };
            assert_eq!(q.method, m);
            assert_eq!(q.uri, "sip:311@127.0.0.1:5060;transport=udp");
            assert_eq!(q.call_id, "late-1@ivr311-load");
            assert_eq!((q.cseq, q.cseq_method.clone()), (cseq, m));
            assert_eq!(q.from.param("tag"), Some("ours"));
            assert_eq!(q.to.param("tag"), Some("theirs"));
        }
    }

    #[test]
    fn a_key_is_start_four_continuations_and_three_ends() {
        let p = packets(&(0..20).collect::<Vec<_>>());
        assert_eq!(
            p,
            vec![
                (false, 160, true),
                (false, 320, false),
                (false, 480, false),
                (false, 640, false),
                (false, 800, false),
                (true, 800, false),
                (true, 800, false),
                (true, 800, false),
            ]
        );
    }

    #[test]
    fn a_stall_of_the_worker_never_skips_the_end_packets() {
        // The thread ran at periods 0, 1, then not until 9.
        let p = packets(&[0, 1, 9, 10, 11, 12]);
        assert_eq!(
            p,
            vec![
                (false, 160, true),
                (false, 320, false),
                (true, 1440, false),
                (true, 1440, false),
                (true, 1440, false),
            ]
        );
    }
}
