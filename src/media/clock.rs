//! The media clock: one paced 20 ms loop per shard thread sends every call's next RTP packet
//! and reads what each caller sent since the last tick.
//!
//! This is the media path's IO driver; the per-call logic stays in the sans-IO
//! [`MediaSession`] (player, RTP stream, DTMF, latching) and [`VoiceMeter`].
//!
//! # Why a shared clock instead of a timer per call
//!
//! The first driver gave every call its own tokio task with a 20 ms interval and an `await` on
//! its RTP socket: two task wake-ups per call per packet time (one for the tick, one for the
//! caller's packet), each polling a large `select!`. At a few thousand calls that is hundreds
//! of thousands of wake-ups a second on a 2-core machine, and pacing depends on how late the
//! runtime gets round to each task. Here a few threads (one per core by default) each own a
//! shard of the calls, spread over [`PHASES`] groups 4 ms apart (see [`Phases`]),
//! and serve each group every 20 ms on a fixed grid:
//!
//! 1. let each call's [`MediaSession`] write its next packet, and send the phase's packets
//!    together at the end of the pass ([`Outbox`]: one io_uring submission for up to 256 of
//!    them on Linux, one `send` each elsewhere),
//! 2. then drain each call's socket with one `recvmmsg` (caller audio, RFC 4733 events: one
//!    system call per call per tick, no wake-up at all when nothing arrived), except for
//!    callers that have gone quiet (see "Quiet callers" below). Sending every call's packet
//!    before reading any keeps each send's offset from the tick independent of how much the
//!    callers before it sent, so a stream's spacing does not wobble with their traffic,
//! 3. tell the call's task only what it must act on ([`MediaNote`]: a key, the prompt queue
//!    ran dry, a second of recording to write, the recording ended, the caller went silent).
//!
//! No file or database work happens on these threads: a recording is metered here (silence,
//! length) and its samples handed to the call's task, which writes the file.
//!
//! The call task wakes for notes and signalling, not for packets. Every call keeps its phase
//! and its place in it, so each stream keeps a steady 20 ms spacing; a phase's pass is a fifth
//! of the shard's calls, so the sends before a call in its pass move its spacing little. A
//! shard that falls behind by whole packet times skips them (the RTP timestamp jumps,
//! [`MediaSession::skip_ticks`]) rather than sending a burst.
//!
//! A call's packets are read up to one tick after they arrive; a key press therefore reaches
//! the menu within 20 ms, and the prompt it starts goes out on the next tick.
//!
//! # Quiet callers
//!
//! A caller that sends nothing (a phone with silence suppression, a muted or held phone,
//! SIPp's pcap callers between their pcaps) would cost an empty `recvmmsg` every tick. After
//! [`QUIET_AFTER`] empty reads in a row its socket moves to its phase's quiet set and is no
//! longer read; each time the phase is served the set is asked once with one `poll(2)` that
//! does not wait, and the sockets that received anything are read at that same tick and go
//! back to being read every tick. So a quiet caller's first packet is read as early as before
//! (at its phase's next pass), and a streaming caller, the usual case, is never in the set.
//!
//! Why `poll` with a zero timeout and not epoll: a socket registered with an epoll instance
//! sits on the socket's wait queue, and Linux then runs a wake-up over that queue for every
//! packet the socket *sends* (`sock_wfree` → write space), whatever events were asked for.
//! The quiet callers are the ones we still play prompts to, so with a one-shot epoll set
//! every prompt packet to a quiet caller paid a locked wake-up (3% of the server's samples
//! under SIPp at 100 calls/s). A zero-timeout `poll` registers nothing: it only
//! looks at each socket's receive queue. (It costs about what it saves: the look at each
//! quiet socket is a cache miss, as the wake-up was. It is kept for the simpler code: no
//! registration to arm, mend or undo.) Before either, every playing call's socket was
//! watched edge-triggered, which saved SIPp's empty reads but, with full media, every socket
//! was ready every tick and the per-packet epoll work cost about 20% more CPU at 3,000 calls.
//!
//! # Bridged calls
//!
//! While a call is bridged to another leg (an operator, the 911 trunk), the call's task hands
//! the leg's port to its slot ([`SlotState::set_bridge`]) and the shard relays both directions
//! ([`crate::media::bridge`]: transcoding, payload renumbering, [`Restamp`]). Relaying at the
//! next tick would add up to 20 ms each way to a conversation, so on Linux each shard watches
//! its bridged sockets with epoll between ticks and forwards a packet when it arrives (one
//! `recvmmsg` per ready socket; the packets go out on sockets `connect`ed to their far ends
//! once those are latched where their SDP said, which skips the route lookup `sendto` costs
//! per packet, 3.7% of the server's samples at ~500 bridges, and all that one wake-up read
//! goes out through the [`Outbox`] together); after a wake-up it waits
//! [`RELAY_HOLD`] (0.5 ms) before looking again, so under load one wake-up carries many
//! packets: at ~494 bridges the server took 55.7% of a core with the hold against 77.7%
//! woken for every packet (BENCHMARKS.md, "Design choices"). The first version relayed in the
//! call's task: two task wake-ups per packet through tokio's reactor, 200 a second per bridge,
//! which is what a 1,500-bridge load cannot afford. The wait for the next tick is an
//! `epoll_pwait2` with a nanosecond timeout, so pacing of the shard's other calls keeps the
//! precision of the plain sleep used when a shard has no bridges. Elsewhere than Linux the
//! bridge is relayed at each tick.
//!
//! # Ownership
//!
//! [`MediaClock::attach`] moves the call's [`RtpPort`] and session into a shared slot and
//! returns the call's [`MediaHandle`] and note receiver. Dropping the handle detaches the
//! slot; its shard lets go of it at the next tick, and the port goes back to the pool then
//! (at most one packet time after the call ends). The threads stop when the clock is dropped.

use crate::media::bridge::{relay, Relay, Restamp};
use crate::media::dtmf::DtmfDetector;
use crate::media::mix::{Mixer, MonitorMode, Party, FRAME};
use crate::media::ports::RtpPort;
use crate::media::record::{RecordState, VoiceMeter};
use crate::media::rtp::{self, Latch, LatchDecision, LatchScope, RtpStream};
use crate::media::sdp::Negotiated;
use crate::media::session::{MediaEvent, MediaSession, MAX_PACKET};
use crate::media::webrtc::{Datagram, WebRtcEvent, WebRtcLeg};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn, Span};

/// One packet time.
pub(crate) const PTIME: Duration = Duration::from_millis(20);
/// Datagrams read from one socket per system call.
const BATCH: usize = 8;
/// Largest datagram we read (RTP from a phone is ~200 bytes; anything larger is not ours).
const MAX_DATAGRAM: usize = 2048;
/// Notes a call may have unread before the clock drops one (and logs it).
const NOTE_CAPACITY: usize = 64;
/// How often an idle shard (no calls) looks at its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Empty reads in a row after which a caller counts as quiet: its socket moves to the
/// shard's quiet set instead of being read every tick (100 ms: a streaming phone's jitter
/// leaves at most one or two empty ticks).
pub(crate) const QUIET_AFTER: u32 = 5;

/// What the clock tells a call's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaNote {
    /// A key press (RFC 4733), reported once.
    Digit(char),
    /// The prompt queue ran dry, with [`MediaSession::stops`] at that moment. Stale if the
    /// call stopped playback or queued more since.
    PlayDone { stops: u64 },
    /// About a second of the caller's recording is waiting: take it with
    /// [`SlotState::take_recorded`] and write it.
    RecordingData,
    /// The recording reached its limit or the caller fell silent.
    RecordingEnded,
    /// No valid RTP from the caller for the configured time.
    NoMedia,
    /// No RTP from the bridged leg for its limit ([`Bridge::watch_leg`]), reported once per
    /// bridge.
    LegSilent,
    /// The bridged browser leg's media failed for good ([`Bridge::webrtc`]: no ICE and DTLS in
    /// time, a failed handshake, DTLS closed, consent expired), reported once per leg; why is
    /// logged in the call's span.
    LegMediaFailed,
}

/// A browser leg as its bridges share it: its ICE, DTLS and SRTP ([`WebRtcLeg`]), and the
/// stream we send it. Made by the call's task with our offer (which settles the leg's far end
/// from the answer) and shared with every bridge the call sets to the leg (hold, resume, a
/// moved leg), so the leg keeps its DTLS association and keys, and our stream keeps the one
/// SSRC our SDP announced with sequence numbers that go on from bridge to bridge (SRTP's
/// replay window and rollover count follow them: restarting them would get our packets
/// dropped as replays). Locked per packet by the shard, never contended in practice.
pub struct BrowserMedia {
    pub leg: WebRtcLeg,
    to_leg: Restamp,
}

impl BrowserMedia {
    pub fn new(leg: WebRtcLeg) -> Self {
        let to_leg = Restamp::new(leg.local().ssrc);
        BrowserMedia { leg, to_leg }
    }
}

/// See [`BrowserMedia`].
pub type SharedWebRtc = Arc<Mutex<BrowserMedia>>;

fn lock_webrtc(w: &SharedWebRtc) -> MutexGuard<'_, BrowserMedia> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A call's media state, shared between its task and its shard.
pub(crate) struct SlotState {
    pub(crate) media: MediaSession,
    /// The caller's recording while it runs: metered here, written by the call's task.
    tap: Option<Tap>,
    /// Bridged to another leg: the shard relays instead of playing.
    bridge: Option<Bridge>,
    /// A supervisor on the bridge ([`SlotState::set_monitor`]); ends with the bridge.
    monitor: Option<Box<Monitor>>,
    /// The operator's talk with the caller being recorded ([`crate::media::call_record`]);
    /// ends with the bridge.
    call_tap: Option<Box<crate::media::call_record::CallTap>>,
    /// Bumped by every [`SlotState::set_bridge`]; the shard compares it with `relay_epoch`.
    bridge_epoch: u64,
    /// The `bridge_epoch` the shard last acted on (written by the shard only).
    relay_epoch: u64,
    /// The latched caller address the socket is `connect`ed to (written by the shard only).
    connected: Option<SocketAddr>,
    record_ended: bool,
    no_media_reported: bool,
    logged_foreign: bool,
    logged_malformed: bool,
    logged_send_error: bool,
    /// Reads in a row that found nothing (shard only).
    empty_ticks: u32,
    /// The socket is in the shard's quiet set (shard only): not read at ticks until it
    /// reports input.
    quiet_armed: bool,
    /// The shard phase the call is served in (set by the shard when it takes the call).
    phase: usize,
}

/// The other leg of a bridged call, as the shard relays it.
pub(crate) struct Bridge {
    /// The leg's port (shared with the call's task; it goes back to the pool when both let go).
    pub(crate) leg: Arc<RtpPort>,
    /// Where the leg's media goes: its SDP address until its first RTP packet, then that
    /// packet's source (symmetric RTP, as for the caller: an operator working from home sits
    /// behind NAT, and the private address in its phone's SDP is unreachable; before this,
    /// such an operator heard nothing while the caller heard them). After latching, packets
    /// from elsewhere are dropped.
    leg_latch: Latch,
    /// Where the leg's socket is `connect`ed (Linux, shard only): once the leg is latched at
    /// the address its SDP gave, as for the caller's socket. Sends then skip a route lookup
    /// each, and the kernel drops what comes from elsewhere before we read it.
    leg_connected: Option<SocketAddr>,
    /// What the leg negotiated.
    pub(crate) leg_neg: Negotiated,
    /// The caller's stream as the leg sees it, and the leg's as the caller sees it.
    pub(crate) to_leg: Restamp,
    pub(crate) to_caller: Restamp,
    /// Early media ([`Bridge::filling`]): after this long without a packet from the leg (or
    /// before its first), the caller hears the call's own player again.
    fill_gap: Option<Duration>,
    /// When the leg's last packet was relayed (shard only).
    leg_heard: Option<Instant>,
    /// Packet times the player sat out while the leg had the caller's ear (shard only).
    paused_ticks: u32,
    /// [`Bridge::watch_leg`]: the longest the leg may send nothing.
    leg_limit: Option<Duration>,
    /// When the leg last sent anything (any packet, relayed or not), or the watch started.
    leg_alive: Option<Instant>,
    leg_silence_reported: bool,
    /// A browser's leg ([`Bridge::webrtc`]): its datagrams go through ICE, DTLS and SRTP, and
    /// it decides where the browser is (the latch is not used).
    webrtc: Option<SharedWebRtc>,
}

impl Bridge {
    /// A bridge to the leg on `leg`, answered from `leg_remote` with `leg_neg`; each direction
    /// gets its own random SSRC.
    /// The leg's media is taken from the SDP's address only; see [`Bridge::latch_scope`].
    pub(crate) fn new(leg: Arc<RtpPort>, leg_remote: SocketAddr, leg_neg: Negotiated) -> Self {
        Bridge {
            leg,
            leg_latch: Latch::new(leg_remote, LatchScope::Sdp),
            leg_connected: None,
            leg_neg,
            to_leg: Restamp::new(rand::random()),
            to_caller: Restamp::new(rand::random()),
            fill_gap: None,
            leg_heard: None,
            paused_ticks: 0,
            leg_limit: None,
            leg_alive: None,
            leg_silence_reported: false,
            webrtc: None,
        }
    }

    /// The leg is a browser's: what arrives on its port is STUN, DTLS and SRTP for `leg`,
    /// which answers the checks, runs the handshake and unprotects the media; what goes to it
    /// is protected and sent where ICE found the browser, as the leg's one stream
    /// ([`BrowserMedia`]).
    pub fn webrtc(mut self, leg: SharedWebRtc) -> Self {
        lock_webrtc(&leg).to_leg.resume();
        self.webrtc = Some(leg);
        self
    }

    /// Take the leg's media from the sources `scope` admits (an operator's phone: its SDP's
    /// address or the address it registered from; the 911 leg: anywhere).
    pub(crate) fn latch_scope(mut self, scope: LatchScope) -> Self {
        self.leg_latch.set_scope(scope);
        self
    }

    /// Report [`MediaNote::LegSilent`] when the leg sends nothing for `limit` (counted from the
    /// bridge's start, or from [`SlotState::rearm_leg_watch`]): a phone that crashed or lost
    /// its network sends no BYE, and without this the caller would sit in a silent bridge
    /// until they gave up. (A phone with silence suppression also goes quiet: the call asks
    /// it over SIP before it acts.)
    pub(crate) fn watch_leg(mut self, limit: Duration) -> Self {
        self.leg_limit = Some(limit);
        self
    }

    /// A bridge to a leg's early media (a 183 with SDP, RFC 3960), which a trunk may offer
    /// and then never send, or send and stop before it answers. The call's player (our
    /// ringback) keeps playing to the caller until the leg's first packet, and again once the
    /// leg has sent nothing for `gap`, so the caller never sits in silence: what the leg does
    /// send is relayed, with nothing of ours over it. (Relaying blindly, a 911 caller heard
    /// dead air for as long as the 911 side stayed silent, which invites a hang-up.)
    pub(crate) fn filling(mut self, gap: Duration) -> Self {
        self.fill_gap = Some(gap);
        self
    }

    /// Whether a packet from `from` on the leg's socket is the leg's: before latching, any RTP
    /// packet (which latches the leg to its source); after, only those from the latched source.
    fn accept_leg_packet(&mut self, from: SocketAddr, packet: &[u8]) -> bool {
        if !self.leg_latch.is_latched() && rtp::parse(packet).is_err() {
            return false;
        }
        self.leg_latch.on_packet(from) != LatchDecision::Foreign
    }

    /// `connect` the leg's socket once the leg is latched where its SDP said ([`Latch::is_settled`]).
    /// A bridge never undoes it: a new bridge on the same port (the leg moved) starts from a
    /// port the shard disconnected when it took the old bridge down ([`Watch::forget_bridge`]).
    fn connect_leg(&mut self) {
        #[cfg(target_os = "linux")]
        if self.webrtc.is_none() && self.leg_latch.is_settled() && self.leg_connected.is_none() {
            let to = self.leg_latch.remote();
            if self.leg.socket.connect(to).is_ok() {
                self.leg_connected = Some(to);
            }
        }
    }

    /// One packet time (`missed` more were skipped): what the shard should do for the bridge.
    fn tick(&mut self, now: Instant, missed: u32) -> BridgeTick {
        let fill_after = if self.leg_silent(now) {
            Some(std::mem::take(&mut self.paused_ticks) + missed)
        } else {
            if self.fill_gap.is_some() {
                self.paused_ticks = self.paused_ticks.saturating_add(1 + missed);
            }
            None
        };
        let mut report_silent = false;
        if let (Some(limit), false) = (self.leg_limit, self.leg_silence_reported) {
            let last = self.leg_alive.unwrap_or(now);
            if now.saturating_duration_since(last) > limit {
                self.leg_silence_reported = true;
                report_silent = true;
            }
        }
        BridgeTick {
            fill_after,
            report_silent,
        }
    }

    /// Whether the caller should hear our player at `now` rather than wait for the leg.
    fn leg_silent(&self, now: Instant) -> bool {
        self.fill_gap.is_some_and(|gap| {
            self.leg_heard
                .is_none_or(|t| now.saturating_duration_since(t) >= gap)
        })
    }
}

/// What a supervisor's call and the shard share about a monitor: its mode (switched by the
/// supervisor's keys on the shard, or by the supervisor's call) and whether the supervisor
/// left.
#[derive(Debug)]
pub(crate) struct MonitorLink {
    mode: AtomicU8,
    gone: AtomicBool,
}

impl MonitorLink {
    pub(crate) fn new(mode: MonitorMode) -> Arc<MonitorLink> {
        Arc::new(MonitorLink {
            mode: AtomicU8::new(mode.to_u8()),
            gone: AtomicBool::new(false),
        })
    }

    pub(crate) fn mode(&self) -> MonitorMode {
        MonitorMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Switch the mode; the shard mixes in it from its next packet time.
    pub(crate) fn set_mode(&self, mode: MonitorMode) {
        self.mode.store(mode.to_u8(), Ordering::Release);
    }

    /// The supervisor left: the shard takes the monitor off the bridge at its next tick.
    pub(crate) fn leave(&self) {
        self.gone.store(true, Ordering::Release);
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
}

/// What the shard tells a supervisor's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MonitorNote {
    /// A key on the supervisor's phone (4, 5 and 6 have already switched the mode).
    Key(char),
    /// The supervisor's browser leg's media failed for good (no ICE and DTLS in time, a
    /// failed handshake, consent expired): the supervisor's call ends.
    MediaFailed,
}

/// A supervisor's leg on a bridged call, as the shard mixes it ([`crate::media::mix`]): the
/// supervisor's port, where its phone is, what it negotiated, our stream to it, its keys,
/// and the mixer. The supervisor's packets are read at each tick; what it hears is sent at
/// each tick. Dropped with the bridge or the call, which closes `notes`: the supervisor's
/// call then ends.
pub(crate) struct Monitor {
    port: RtpPort,
    latch: Latch,
    neg: Negotiated,
    out: RtpStream,
    dtmf: DtmfDetector,
    mixer: Mixer,
    link: Arc<MonitorLink>,
    notes: mpsc::Sender<MonitorNote>,
    /// The mixed streams to the operator and to the caller: each bridge direction's
    /// [`Restamp`] continues them under the stream the phone already knows.
    to_leg: RtpStream,
    to_caller: RtpStream,
    /// A supervisor in a browser ([`Monitor::webrtc`]): what reaches its port is STUN, DTLS
    /// and SRTP, and what it hears is protected and sent where ICE found it.
    webrtc: Option<SharedWebRtc>,
    /// The browser leg's failure was told to the supervisor's call.
    failure_told: bool,
}

impl Monitor {
    /// A supervisor's phone at `remote` (taking its media from the sources `scope` admits),
    /// which negotiated `neg` with us on `port`.
    pub(crate) fn new(
        port: RtpPort,
        (remote, scope): (SocketAddr, LatchScope),
        neg: Negotiated,
        link: Arc<MonitorLink>,
        notes: mpsc::Sender<MonitorNote>,
    ) -> Monitor {
        Monitor {
            port,
            latch: Latch::new(remote, scope),
            neg,
            out: RtpStream::new(),
            dtmf: DtmfDetector::new(),
            mixer: Mixer::default(),
            link,
            notes,
            to_leg: RtpStream::new(),
            to_caller: RtpStream::new(),
            webrtc: None,
            failure_told: false,
        }
    }

    /// The supervisor is a browser (registered over a WebSocket): its port carries `leg`'s
    /// ICE checks, DTLS handshake and SRTP, and our stream to it is the one SSRC our SDP
    /// announced ([`BrowserMedia`]). The latch is not used: ICE decides where the browser is.
    pub(crate) fn webrtc(mut self, leg: SharedWebRtc) -> Self {
        lock_webrtc(&leg).to_leg.resume();
        self.webrtc = Some(leg);
        self
    }

    /// Send what the browser leg queued (STUN answers, DTLS records), and tell the
    /// supervisor's call once that its media failed (tried again at each tick until the
    /// call takes the note).
    fn webrtc_out(&mut self, w: &mut WebRtcLeg, span: &Span) {
        while let Some((to, bytes)) = w.poll_transmit() {
            let _ = self.port.socket.send_to(&bytes, to);
        }
        while let Some(event) = w.poll_event() {
            match event {
                WebRtcEvent::Connected { remote, profile } => span.in_scope(
                    || debug!(%remote, profile, "the supervisor's browser DTLS-SRTP is up"),
                ),
                WebRtcEvent::Failed(e) => {
                    span.in_scope(|| warn!(error = %e, "the supervisor's browser media failed"));
                }
            }
        }
        if w.is_failed() && !self.failure_told {
            self.failure_told = self.notes.try_send(MonitorNote::MediaFailed).is_ok();
        }
    }

    /// Send `packet` (plain RTP from our stream to the supervisor) to the supervisor: as it
    /// is to a phone, protected (under the leg's announced stream) to a browser.
    fn send_to_supervisor(&mut self, packet: &mut [u8]) {
        match &self.webrtc {
            Some(w) => {
                let mut w = lock_webrtc(w);
                w.to_leg.apply(packet, false);
                if let Some((srtp, to)) = w.leg.protect(packet) {
                    let _ = self.port.socket.send_to(&srtp, to);
                }
            }
            None => {
                let _ = self.port.socket.send_to(packet, self.latch.remote());
            }
        }
    }

    /// Queue `talker`'s audio from a packet received on a leg that negotiated `neg` (anything
    /// but audio of its codec is ignored).
    fn hear(&mut self, talker: Party, packet: &[u8], neg: &Negotiated) {
        if let Ok(p) = rtp::parse(packet) {
            if p.payload_type == neg.payload_type {
                self.mixer.push_g711(talker, neg.codec, p.payload);
            }
        }
    }

    /// Whether `listener` hears the mixer now (else the bridge's relay).
    fn mixes_for(&self, listener: Party) -> bool {
        self.link.mode().mixed_for(listener)
    }

    /// A mixed packet for `listener`, encoded as `neg` asks, written with `stream` into
    /// `out`; its length.
    fn packet_for(
        mixer: &Mixer,
        mode: MonitorMode,
        listener: Party,
        neg: &Negotiated,
        stream: &mut RtpStream,
        out: &mut [u8],
    ) -> usize {
        let mut payload = [0u8; FRAME];
        mixer.encode_for(mode, listener, neg.codec, &mut payload);
        stream.write(neg.payload_type, &payload, FRAME as u32, out)
    }
}

/// What a bridge asks of its shard at one packet time ([`Bridge::tick`]).
struct BridgeTick {
    /// Play the call's player to the caller (the leg is silent and we fill in), after moving
    /// its stream on by this many packet times it sat out.
    fill_after: Option<u32>,
    /// Tell the call the leg has sent nothing for its limit ([`MediaNote::LegSilent`]).
    report_silent: bool,
}

/// A recording in progress, on the clock's side.
struct Tap {
    meter: VoiceMeter,
    /// Decoded samples not yet taken by the call.
    pending: Vec<i16>,
    /// `RecordingData` was sent and the samples not taken yet.
    asked: bool,
}

/// Samples (one second) after which the call is asked to write what was recorded.
const TAP_FLUSH: usize = 8000;
/// Samples kept at most for a call that does not take them (then the newest are dropped).
const TAP_MAX: usize = 8000 * 10;

impl SlotState {
    /// Bridge the caller to another leg (`Some`: the shard relays both ways from its next
    /// tick and stops playing), or end the bridge (`None`: prompts play again).
    pub(crate) fn set_bridge(&mut self, bridge: Option<Bridge>) {
        if bridge.is_none() {
            // Nothing left to monitor: dropping the monitor tells the supervisor's call.
            self.monitor = None;
            self.call_tap = None;
        }
        self.bridge = bridge;
        self.bridge_epoch += 1;
    }

    /// Put a supervisor on the bridge (listen, whisper, barge: [`crate::media::mix`]). Refused
    /// (given back) when the call is not bridged or already has a supervisor.
    pub(crate) fn set_monitor(&mut self, m: Box<Monitor>) -> Result<(), Box<Monitor>> {
        if self.bridge.is_none() || self.monitor.as_ref().is_some_and(|m| !m.link.is_gone()) {
            return Err(m);
        }
        self.monitor = Some(m);
        Ok(())
    }

    /// Record the bridge (both sides, [`crate::media::call_record`]), or stop recording
    /// (`None`: the writer finalises the file).
    pub(crate) fn set_call_tap(&mut self, tap: Option<crate::media::call_record::CallTap>) {
        self.call_tap = tap.map(Box::new);
    }

    /// Whether the bridge is being recorded.
    pub(crate) fn recording_call(&self) -> bool {
        self.call_tap.is_some()
    }

    /// Whether a supervisor is on the bridge.
    pub(crate) fn monitored(&self) -> bool {
        self.monitor.as_ref().is_some_and(|m| !m.link.is_gone())
    }

    /// The leg's silence was looked into (the phone still answers over SIP): watch it afresh
    /// from `now`.
    pub(crate) fn rearm_leg_watch(&mut self, now: Instant) {
        if let Some(b) = &mut self.bridge {
            b.leg_alive = Some(now);
            b.leg_silence_reported = false;
        }
    }

    /// Whether the shard relays this call to another leg.
    #[cfg(test)]
    pub(crate) fn bridged(&self) -> bool {
        self.bridge.is_some()
    }

    /// Start recording the caller: samples are kept for [`SlotState::take_recorded`] and the
    /// meter decides when it ends ([`MediaNote::RecordingEnded`]).
    pub(crate) fn start_recording(&mut self, meter: VoiceMeter) {
        self.tap = Some(Tap {
            meter,
            pending: Vec::with_capacity(TAP_FLUSH + 160),
            asked: false,
        });
        self.record_ended = false;
    }

    /// Swap the samples recorded since the last call into `into` (which should be empty; its
    /// allocation is reused next time).
    pub(crate) fn take_recorded(&mut self, into: &mut Vec<i16>) {
        if let Some(t) = &mut self.tap {
            std::mem::swap(&mut t.pending, into);
            t.asked = false;
        }
    }

    /// Stop recording; the samples not yet taken go into `into`.
    pub(crate) fn stop_recording(&mut self, into: &mut Vec<i16>) {
        self.take_recorded(into);
        self.tap = None;
    }
}

impl Slot {
    fn new(
        id: u64,
        port: RtpPort,
        media: MediaSession,
        notes: mpsc::Sender<MediaNote>,
        no_media: Duration,
        span: Span,
    ) -> Arc<Slot> {
        Arc::new(Slot {
            id,
            state: Mutex::new(SlotState {
                media,
                tap: None,
                bridge: None,
                monitor: None,
                call_tap: None,
                bridge_epoch: 0,
                relay_epoch: 0,
                connected: None,
                record_ended: false,
                no_media_reported: false,
                logged_foreign: false,
                logged_malformed: false,
                logged_send_error: false,
                empty_ticks: 0,
                quiet_armed: false,
                phase: 0,
            }),
            port,
            notes,
            detached: AtomicBool::new(false),
            no_media,
            span,
        })
    }
}

struct Slot {
    /// Unique within the clock: the slot's epoll tokens.
    id: u64,
    state: Mutex<SlotState>,
    port: RtpPort,
    notes: mpsc::Sender<MediaNote>,
    detached: AtomicBool,
    no_media: Duration,
    /// The call's span, so what the clock logs is filed under the call.
    span: Span,
}

/// The call task's side of its slot.
pub(crate) struct MediaHandle {
    slot: Arc<Slot>,
}

impl MediaHandle {
    /// The call's media state (held briefly, never across an `.await`).
    pub(crate) fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The call is over: the shard sends nothing more and lets go of the slot when its
    /// phase's turn comes (dropping the handle does the same; this is for a call that still
    /// reads its statistics while it winds down).
    pub(crate) fn end(&self) {
        self.slot.detached.store(true, Ordering::Release);
    }
}

impl Drop for MediaHandle {
    fn drop(&mut self) {
        self.slot.detached.store(true, Ordering::Release);
    }
}

/// How the shard threads run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockOptions {
    /// `SCHED_FIFO` 10 (see `media.realtime` in the config). Default false.
    pub(crate) realtime: bool,
    /// Send each pass's packets together through io_uring where the kernel allows
    /// ([`Outbox`]); false: one `send` per packet. Default true.
    pub(crate) batch_sends: bool,
}

impl Default for ClockOptions {
    fn default() -> Self {
        ClockOptions {
            realtime: false,
            batch_sends: true,
        }
    }
}

/// The shard threads.
pub(crate) struct MediaClock {
    shards: Mutex<Vec<std_mpsc::Sender<Arc<Slot>>>>,
    next: AtomicUsize,
    ids: AtomicU64,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// One per shard, beaten on every turn of its loop (read by `/health/ready`).
    beats: Vec<Arc<crate::heartbeat::Heartbeat>>,
}

impl MediaClock {
    /// Start `shards` threads (at least one) at normal priority.
    #[cfg(test)]
    pub(crate) fn start(shards: usize) -> io::Result<Arc<MediaClock>> {
        Self::start_with(shards, false)
    }

    /// Start `shards` threads (at least one), at real-time priority when `realtime` (and the
    /// process may; otherwise a warning and normal priority).
    #[cfg(test)]
    pub(crate) fn start_with(shards: usize, realtime: bool) -> io::Result<Arc<MediaClock>> {
        Self::start_opts(
            shards,
            ClockOptions {
                realtime,
                ..ClockOptions::default()
            },
        )
    }

    /// Start `shards` threads (at least one) as `opts` says.
    pub(crate) fn start_opts(shards: usize, opts: ClockOptions) -> io::Result<Arc<MediaClock>> {
        let ClockOptions {
            realtime,
            batch_sends,
        } = opts;
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        let mut beats = Vec::new();
        for i in 0..shards.max(1) {
            let (tx, rx) = std_mpsc::channel();
            let stop = stop.clone();
            let beat = Arc::new(crate::heartbeat::Heartbeat::new(Instant::now()));
            beats.push(beat.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ivr311-media-{i}"))
                    .spawn(move || {
                        if realtime {
                            set_realtime(i);
                        }
                        run_shard(rx, stop, batch_sends, beat)
                    })?,
            );
            senders.push(tx);
        }
        Ok(Arc::new(MediaClock {
            shards: Mutex::new(senders),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            stop,
            threads: Mutex::new(threads),
            beats,
        }))
    }

    /// Each shard's heartbeat: how long ago its loop last turned (idle or not, a running shard
    /// turns at least every [`IDLE_POLL`]).
    pub(crate) fn heartbeats(&self) -> &[Arc<crate::heartbeat::Heartbeat>] {
        &self.beats
    }

    /// Hand a call's port and session to a shard.
    pub(crate) fn attach(
        &self,
        port: RtpPort,
        media: MediaSession,
        no_media: Duration,
        span: Span,
    ) -> (MediaHandle, mpsc::Receiver<MediaNote>) {
        let (tx, rx) = mpsc::channel(NOTE_CAPACITY);
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::new(id, port, media, tx, no_media, span);
        let shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        if !shards.is_empty() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % shards.len();
            let _ = shards[i].send(slot.clone());
        }
        (MediaHandle { slot }, rx)
    }

    /// Stop the threads (calls still attached stop getting media).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.shards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for MediaClock {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The machine's cores (the default number of shards).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Real-time priority for the calling thread (Linux `SCHED_FIFO`).
#[cfg(target_os = "linux")]
fn set_realtime(shard: usize) {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        warn!(shard, error = %e, "media clock stays at normal priority (real-time refused)");
    } else {
        debug!(shard, "media clock at real-time priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn set_realtime(shard: usize) {
    warn!(shard, "real-time priority is only supported on Linux");
}

/// Phases a shard spreads its calls over within each packet time: phase `p` is served
/// `p` × [`PHASE_SPAN`] after the start of each 20 ms round.
pub(crate) const PHASES: usize = 5;
/// Time between two phases.
const PHASE_SPAN: Duration = Duration::from_nanos(PTIME.as_nanos() as u64 / PHASES as u64);
/// Calls a phase takes before a new call goes to the next phase. Below this many calls per
/// phase a shard wakes only for the phases in use; above, calls are spread evenly.
const PHASE_FILL: usize = 256;

/// A shard's calls, in [`PHASES`] groups served one after another within each round.
///
/// Why phases: serving every call of a shard at the same instant made a pass of 1,500 sends
/// (about 3 ms at 3,000 calls on two cores), and each stream's spacing then moved with how
/// long the sends before it took that round. Serving one phase every 4 ms keeps a pass to a
/// fifth of the calls, so a stream's spacing moves only with those sends, and the shard's
/// traffic goes out in five groups instead of one burst. A call keeps its phase for life,
/// so its own spacing stays 20 ms.
///
/// Measured at 3,000 calls, builds alternated (`cargo run --release -p ivr311-load --
/// --spawn-server --server-realtime --ramp 2500,3000 --step-seconds 20 --threads 2
/// --keep-going --server-bin B`; BENCHMARKS.md, "Design choices"): pacing p99 went from
/// 1.41–4.25 ms to 0.83–0.85 ms. Twenty phases 1 ms apart paced about as well (0.81–1.00
/// ms, and a better p99.9) but cost about 7% more CPU at 3,000 calls, for four times the
/// wake-ups; five cost none we could measure. Small loads fill a phase first
/// ([`PHASE_FILL`]), so a shard with a few hundred calls still wakes once or twice per round.
struct Phases {
    groups: Vec<Vec<Arc<Slot>>>,
    /// The round each phase was last served in (`None`: not since it was empty).
    served: [Option<u64>; PHASES],
    len: usize,
    /// Where round 0 starts.
    origin: Instant,
    /// The next phase to serve and its round.
    round: u64,
    phase: usize,
}

impl Phases {
    fn new() -> Self {
        Phases {
            groups: vec![Vec::new(); PHASES],
            served: [None; PHASES],
            len: 0,
            origin: Instant::now(),
            round: 0,
            phase: 0,
        }
    }

    /// Give a new call a phase: the first with room (up to [`PHASE_FILL`]), else the one
    /// with the fewest calls. The first call of an idle shard starts a new grid at `now`.
    fn place(&mut self, slot: Arc<Slot>, now: Instant) {
        if self.len == 0 {
            self.origin = now;
            self.round = 0;
            self.phase = 0;
        }
        let p = (0..PHASES)
            .find(|&p| self.groups[p].len() < PHASE_FILL)
            .unwrap_or_else(|| {
                (0..PHASES)
                    .min_by_key(|&p| self.groups[p].len())
                    .unwrap_or(0)
            });
        slot.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase = p;
        if self.groups[p].is_empty() {
            self.served[p] = None;
        }
        self.groups[p].push(slot);
        self.len += 1;
    }

    /// The next phase with calls and when it is due (the cursor moves to it).
    fn next_due(&mut self) -> Option<(usize, Instant)> {
        if self.len == 0 {
            return None;
        }
        // At most one round of empty phases (`len` says one has calls; never spin on it).
        for _ in 0..PHASES {
            if !self.groups[self.phase].is_empty() {
                break;
            }
            self.advance();
        }
        if self.groups[self.phase].is_empty() {
            self.len = 0;
            return None;
        }
        let round = Duration::from_nanos(PTIME.as_nanos() as u64 * self.round);
        let at = self.origin + round + PHASE_SPAN * self.phase as u32;
        Some((self.phase, at))
    }

    fn advance(&mut self) {
        self.phase += 1;
        if self.phase == PHASES {
            self.phase = 0;
            self.round += 1;
        }
    }

    /// The shard woke `late` after the current phase was due: drop the phase's calls that
    /// ended (before the pass, so an ended call is sent nothing more: its port may already be
    /// another program's), skip the whole rounds it missed (no burst), and return how many
    /// packet times the phase's calls missed since they were last served.
    fn start_serving(&mut self, late: Duration, watch: &mut Watch) -> u32 {
        let g = &mut self.groups[self.phase];
        let before = g.len();
        g.retain(|s| {
            let keep = !s.detached.load(Ordering::Acquire);
            if !keep {
                watch.forget_bridge(s.id);
                watch.forget_quiet(s);
            }
            keep
        });
        self.len -= before - g.len();
        let skipped = (late.as_nanos() / PTIME.as_nanos()) as u64;
        self.round += skipped;
        let p = self.phase;
        let missed = self.served[p].map_or(0, |last| self.round.saturating_sub(last + 1));
        self.served[p] = Some(self.round);
        missed.min(u32::MAX as u64) as u32
    }

    /// The current phase was served: move the cursor past it.
    fn finish_serving(&mut self) {
        self.advance();
    }
}

/// One shard: serve each phase of its calls every 20 ms on a fixed grid while it has calls,
/// relaying bridged calls' packets as they arrive in between.
fn run_shard(
    rx: std_mpsc::Receiver<Arc<Slot>>,
    stop: Arc<AtomicBool>,
    batch_sends: bool,
    beat: Arc<crate::heartbeat::Heartbeat>,
) {
    let mut phases = Phases::new();
    let mut io = Box::new(Batch::new(batch_sends));
    let mut watch = Watch::new();
    let mut busy: Vec<usize> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        beat.beat(Instant::now());
        if let Some(d) = beat.take_stall() {
            std::thread::sleep(d);
        }
        if phases.len == 0 {
            match rx.recv_timeout(IDLE_POLL) {
                Ok(s) => phases.place(s, Instant::now()),
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            phases.place(s, Instant::now());
        }
        let Some((p, due)) = phases.next_due() else {
            continue;
        };
        watch.wait_until(due, &mut io);
        let now = Instant::now();
        // Late by whole packet times (the machine stalled us): skip them, no burst.
        let missed = phases.start_serving(now.saturating_duration_since(due), &mut watch);
        let slots = &phases.groups[p];
        watch.poll_quiet(p);
        // Every call's packet first, then what the callers sent: each send's offset from the
        // phase's start then depends only on the sends before it, not on how much each
        // caller sent. A slot whose call's task holds its lock is left for the end of the
        // pass rather than waited for: that task runs at normal priority and may have been
        // preempted while holding it, and waiting would stall every call after it.
        for (i, s) in slots.iter().enumerate() {
            if let Some(next) = slots.get(i + PREFETCH_AHEAD) {
                next.prefetch();
            }
            if !s.tick(now, missed, &mut io, &mut watch, false) {
                busy.push(i);
            }
        }
        for i in busy.drain(..) {
            slots[i].tick(now, missed, &mut io, &mut watch, true);
        }
        io.outbox.flush();
        for (i, s) in slots.iter().enumerate() {
            if let Some(next) = slots.get(i + PREFETCH_AHEAD) {
                next.prefetch();
            }
            if !s.drain(now, &mut io, &mut watch, false) {
                busy.push(i);
            }
        }
        for i in busy.drain(..) {
            slots[i].drain(now, &mut io, &mut watch, true);
        }
        phases.finish_serving();
    }
}

/// What a shard watches with epoll (Linux): its bridged calls' sockets (the relay set) and
/// its quiet callers' sockets (the quiet set).
struct Watch {
    /// Bridged slots, by id, with the leg port registered for each and whether epoll
    /// watches the pair (otherwise the bridge is relayed at each tick).
    relays: HashMap<u64, (Arc<Slot>, Arc<RtpPort>, bool)>,
    #[cfg(target_os = "linux")]
    relay: Option<linux::Poller>,
    /// Quiet callers' sockets, by slot id, one set per phase.
    #[cfg(target_os = "linux")]
    quiet: Vec<linux::QuietSet>,
    /// The slots whose quiet socket reported input at this tick's [`Watch::poll_quiet`].
    woken: HashSet<u64>,
}

/// After relaying what one wake-up found, the shard waits this long before looking again.
/// A packet arriving on a quiet shard is relayed at once; under load a packet waits at most
/// this long, and a wake-up carries tens of packets instead of one. Waking for every packet
/// cost 500 bridges (50,000 packets a second in) about 30% of the server's CPU in context
/// switches alone.
const RELAY_HOLD: Duration = Duration::from_micros(500);

/// Which socket of a bridge an epoll token names.
const CALLER_SIDE: u64 = 0;
const LEG_SIDE: u64 = 1;

impl Watch {
    fn new() -> Self {
        Watch {
            relays: HashMap::new(),
            #[cfg(target_os = "linux")]
            relay: linux::Poller::new()
                .map_err(|e| warn!(error = %e, "no epoll: bridged calls are relayed at each tick"))
                .ok(),
            #[cfg(target_os = "linux")]
            quiet: (0..PHASES).map(|_| linux::QuietSet::default()).collect(),
            woken: HashSet::new(),
        }
    }

    /// Ask phase `p`'s quiet set, without waiting, which sockets received something; those
    /// leave the set and are read at this tick.
    fn poll_quiet(&mut self, p: usize) {
        self.woken.clear();
        #[cfg(target_os = "linux")]
        self.quiet[p].take_ready(|id| {
            self.woken.insert(id);
        });
        #[cfg(not(target_os = "linux"))]
        let _ = p;
    }

    /// Whether to read the slot's socket at this tick: unless it is armed and reported
    /// nothing (a socket that reported input is read and leaves the quiet set).
    fn should_read(&self, id: u64, st: &mut SlotState) -> bool {
        if !st.quiet_armed {
            return true;
        }
        if self.woken.contains(&id) {
            st.quiet_armed = false;
            st.empty_ticks = 0;
            return true;
        }
        false
    }

    /// Count a read of `got` packets; after [`QUIET_AFTER`] empty ones, arm the socket.
    fn after_read(&mut self, slot: &Slot, st: &mut SlotState, got: usize) {
        if got > 0 {
            st.empty_ticks = 0;
            return;
        }
        st.empty_ticks = st.empty_ticks.saturating_add(1);
        if st.empty_ticks < QUIET_AFTER {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            self.quiet[st.phase].insert(slot.port.socket.as_raw_fd(), slot.id);
            st.quiet_armed = true;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = slot;
    }

    /// Read the slot's socket every tick again (the relay took it over, or the slot is gone
    /// and its port may be bound again for another call).
    fn unquiet(&mut self, id: u64, st: &mut SlotState) {
        if std::mem::take(&mut st.quiet_armed) {
            #[cfg(target_os = "linux")]
            self.quiet[st.phase].remove(id);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = id;
    }

    /// The slot is gone: take its socket out of the quiet set.
    fn forget_quiet(&mut self, slot: &Slot) {
        let mut st = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.unquiet(slot.id, &mut st);
    }

    /// Whether slot `id`'s bridge is relayed as packets arrive (otherwise at each tick).
    fn immediate(&self, id: u64) -> bool {
        self.relays.get(&id).is_some_and(|r| r.2)
    }

    /// Sleep until `due`, relaying bridged packets as they arrive if there are bridges.
    fn wait_until(&mut self, due: Instant, io: &mut Batch) {
        #[cfg(target_os = "linux")]
        if !self.relays.is_empty() {
            if let Some(poll) = &mut self.relay {
                loop {
                    let now = Instant::now();
                    if now >= due {
                        return;
                    }
                    let n = poll.wait(due - now);
                    for i in 0..n {
                        let token = poll.token(i);
                        if let Some((slot, _, _)) = self.relays.get(&(token >> 1)) {
                            slot.relay(token & 1, Instant::now(), io);
                        }
                    }
                    io.outbox.flush();
                    // Hold off before waiting again, so that under load one wake-up relays
                    // what arrived over RELAY_HOLD rather than one packet.
                    if n > 0 {
                        let left = due.saturating_duration_since(Instant::now());
                        std::thread::sleep(RELAY_HOLD.min(left));
                    }
                }
            }
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }

    /// Start or stop relaying `slot` to match its bridge (called with the slot's state
    /// locked).
    fn sync(&mut self, slot: &Arc<Slot>, st: &mut SlotState) {
        st.relay_epoch = st.bridge_epoch;
        self.forget_bridge(slot.id);
        let Some(b) = &st.bridge else { return };
        #[allow(unused_mut)]
        let mut watched = Err(());
        #[cfg(target_os = "linux")]
        if let Some(poll) = &mut self.relay {
            use std::os::fd::AsRawFd;
            let caller = poll.add(slot.port.socket.as_raw_fd(), slot.id << 1 | CALLER_SIDE);
            let leg = poll.add(b.leg.socket.as_raw_fd(), slot.id << 1 | LEG_SIDE);
            watched = caller.and(leg).map_err(|e| {
                slot.span
                    .in_scope(|| warn!(error = %e, "cannot watch the bridge; relayed per tick"))
            });
        }
        let watched = watched.is_ok();
        self.relays
            .insert(slot.id, (slot.clone(), b.leg.clone(), watched));
    }

    /// Stop relaying slot `id` (its bridge ended or the call is gone).
    fn forget_bridge(&mut self, id: u64) {
        let Some((_slot, _leg, _)) = self.relays.remove(&id) else {
            return;
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            if let Some(poll) = &mut self.relay {
                poll.remove(_slot.port.socket.as_raw_fd());
                poll.remove(_leg.socket.as_raw_fd());
            }
            // The bridge may have `connect`ed the leg's port ([`Bridge::connect_leg`]); the
            // port may serve on (a bridge to the moved leg, the call's own use of it).
            let _ = linux::disconnect(_leg.socket.as_raw_fd());
        }
    }
}

/// How many slots ahead a pass asks the CPU to load. Between two visits of a slot the
/// kernel's send and receive paths for every other call of the shard have gone through the
/// caches, so each slot is cold when its turn comes: at 1,000 calls a shard, the first touch
/// of a slot's lock was two thirds of the shard's own (user-space) time.
const PREFETCH_AHEAD: usize = 2;

impl Slot {
    /// Ask the CPU to start loading this slot (its lock and media state) into the cache.
    #[inline]
    fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let base = (self as *const Slot).cast::<i8>();
            let lines = std::mem::size_of::<Slot>().div_ceil(64).min(24);
            for line in 0..lines {
                // SAFETY: SSE is part of x86_64; a prefetch is only a hint, it never faults
                // (whatever the address) and changes no memory.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(line * 64)) };
            }
        }
    }

    fn note(&self, n: MediaNote) {
        if let Err(e) = self.notes.try_send(n) {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                self.span
                    .in_scope(|| warn!(note = ?n, "call is not reading its media notes; dropped"));
            }
        }
    }

    /// The slot's state if nobody holds it now (the call's task, briefly), else `None`.
    fn try_state(&self) -> Option<MutexGuard<'_, SlotState>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Tick the slot with its state locked: at once if it is free (`wait` false: false when
    /// it is not, to be tried again later in the pass), or waiting for it.
    fn tick(
        self: &Arc<Self>,
        now: Instant,
        missed: u32,
        io: &mut Batch,
        watch: &mut Watch,
        wait: bool,
    ) -> bool {
        let mut guard = match self.try_state() {
            Some(g) => g,
            None if wait => self.state.lock().unwrap_or_else(PoisonError::into_inner),
            None => return false,
        };
        let st = &mut *guard;
        if st.relay_epoch != st.bridge_epoch {
            watch.sync(self, st);
            if let Some(b) = &mut st.bridge {
                b.leg_alive = Some(now);
                // The leg's port was not read while its phone rang: what waits there is early
                // media from before the answer (a ringback tone, an announcement), up to a
                // socket buffer of it. Relayed, it would reach the caller as one burst of
                // stale audio, which a phone's jitter buffer drops or plays late, pushing the
                // answerer's first words back. So it goes; what the caller sent meanwhile is
                // theirs and is relayed.
                // A browser's port holds its ICE checks and DTLS handshake instead, which are
                // read (what media is among them is dropped until the keys are in place).
                if b.webrtc.is_some() {
                    self.relay_locked(st, LEG_SIDE, now, io);
                } else {
                    let early = b.leg.discard_queued();
                    if early > 0 {
                        self.span
                            .in_scope(|| debug!(packets = early, "the leg's early media dropped"));
                    }
                }
                self.relay_locked(st, CALLER_SIDE, now, io);
            }
        }
        if st.bridge.is_none() {
            if missed > 0 {
                st.media.skip_ticks(missed);
            }
            self.connect(st);
            self.play(st, io);
            if let Some(tap) = &st.tap {
                if !st.record_ended && tap.meter.state(now) != RecordState::Recording {
                    st.record_ended = true;
                    self.note(MediaNote::RecordingEnded);
                }
            }
        } else {
            // The relay reads the caller's socket; when the bridge ends it is read every tick
            // again.
            watch.unquiet(self.id, st);
            st.empty_ticks = 0;
            if !watch.immediate(self.id) {
                self.relay_locked(st, CALLER_SIDE, now, io);
                self.relay_locked(st, LEG_SIDE, now, io);
            }
            // A re-INVITE during the bridge may have moved the caller.
            self.connect(st);
            if let Some(b) = &mut st.bridge {
                b.connect_leg();
            }
            self.webrtc_timers(st, now);
            self.monitor_tick(st, now, io);
            if let Some(t) = &mut st.call_tap {
                for _ in 0..=missed {
                    t.tick();
                }
            }
            if let Some(t) = st.bridge.as_mut().map(|b| b.tick(now, missed)) {
                if t.report_silent {
                    self.note(MediaNote::LegSilent);
                }
                // Early media that is not coming, or a leg on hold: the caller hears our
                // player meanwhile.
                if let Some(paused) = t.fill_after {
                    if paused > 0 {
                        st.media.pause_ticks(paused);
                    }
                    self.play(st, io);
                }
            }
        }
        if !st.no_media_reported
            && now.saturating_duration_since(st.media.last_rx()) > self.no_media
        {
            st.no_media_reported = true;
            self.note(MediaNote::NoMedia);
        }
        true
    }

    /// One packet time of the call's player: send its packet to the caller, and say when the
    /// prompt queue ran dry.
    fn play(self: &Arc<Self>, st: &mut SlotState, io: &mut Batch) {
        let remote = st.media.remote();
        // To a connected caller the packet joins the pass's outbox; otherwise it goes now.
        let queue = io.outbox.batching() && st.connected == Some(remote);
        let out = if queue {
            let buf = io.outbox.next();
            (&mut buf[..MAX_PACKET])
                .try_into()
                .unwrap_or_else(|_| unreachable!("MAX_PACKET <= MAX_DATAGRAM"))
        } else {
            &mut io.out
        };
        let (n, ev) = st.media.on_tick(out);
        if n > 0 {
            if queue {
                io.outbox.commit(self, None, n);
            } else {
                // Non-blocking: a full socket buffer drops the packet, as a late one would be.
                let sent = if st.connected == Some(remote) {
                    self.port.socket.send(&io.out[..n])
                } else {
                    self.port.socket.send_to(&io.out[..n], remote)
                };
                if let Err(e) = sent {
                    Self::log_send_error(&self.span, st, e);
                }
            }
        }
        if ev == Some(MediaEvent::PlayDone) {
            self.note(MediaNote::PlayDone {
                stops: st.media.stops(),
            });
        }
    }

    /// A packet of this call's from the outbox was not sent.
    fn send_failed(&self, e: io::Error) {
        if let Some(mut st) = self.try_state() {
            Self::log_send_error(&self.span, &mut st, e);
        }
    }

    /// Log a call's first failed send (a phone that went away fails every one after).
    fn log_send_error(span: &Span, st: &mut SlotState, e: io::Error) {
        if !st.logged_send_error {
            st.logged_send_error = true;
            let remote = st.media.remote();
            span.in_scope(
                || debug!(error = %e, %remote, connected = ?st.connected, "RTP send failed"),
            );
        }
    }

    /// Read what a playing call's caller sent since the last tick (unless the caller is quiet
    /// and its socket reported nothing); bridged calls are read by the relay.
    /// (Same `wait` and result as [`Slot::tick`].)
    fn drain(&self, now: Instant, io: &mut Batch, watch: &mut Watch, wait: bool) -> bool {
        let mut guard = match self.try_state() {
            Some(g) => g,
            None if wait => self.state.lock().unwrap_or_else(PoisonError::into_inner),
            None => return false,
        };
        let st = &mut *guard;
        if st.bridge.is_none() && watch.should_read(self.id, st) {
            let got = self.receive(st, now, io);
            watch.after_read(self, st, got);
        }
        true
    }

    /// Keep the socket `connect`ed to the latched caller (Linux), and return where it is
    /// connected. A connected UDP socket sends without a route lookup per packet, and the
    /// kernel then drops packets from other sources, which the latch would drop anyway (so
    /// they are no longer counted in `foreign_in`).
    ///
    /// Only once the caller is latched at the address its SDP names: until then (before the
    /// first packet, after a re-INVITE names a new address, or latched to another source as
    /// behind NAT) a packet from the SDP's address may still take the latch, so the kernel
    /// must let it through. Connecting to whatever came first let a stray stream that reached
    /// a freshly given port keep the caller's audio for the whole call.
    fn connect(&self, st: &mut SlotState) -> Option<SocketAddr> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let want = st.media.is_settled().then(|| st.media.remote());
            if want != st.connected {
                let ok = match want {
                    Some(a) => self.port.socket.connect(a).is_ok(),
                    None => linux::disconnect(self.port.socket.as_raw_fd()).is_ok(),
                };
                st.connected = if ok { want } else { None };
            }
        }
        st.connected
    }

    /// Relay what waits on one side of the bridge (the socket epoll reported ready).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn relay(self: &Arc<Self>, side: u64, now: Instant, io: &mut Batch) {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.relay_locked(&mut guard, side, now, io);
    }

    /// A browser leg's timers (DTLS retransmissions, the handshake and consent deadlines), at
    /// each tick of its bridge.
    fn webrtc_timers(&self, st: &mut SlotState, now: Instant) {
        let Some(b) = &mut st.bridge else { return };
        let Some(w) = b.webrtc.clone() else { return };
        let mut w = lock_webrtc(&w);
        if w.leg.poll_timeout().is_some_and(|t| t <= now) {
            w.leg.handle_timeout(now);
        }
        self.webrtc_out(b, &mut w.leg);
    }

    /// Send what a browser leg queued (STUN answers, DTLS records) and act on its events.
    fn webrtc_out(&self, b: &mut Bridge, w: &mut WebRtcLeg) {
        while let Some((to, bytes)) = w.poll_transmit() {
            let _ = b.leg.socket.send_to(&bytes, to);
        }
        while let Some(event) = w.poll_event() {
            match event {
                WebRtcEvent::Connected { remote, profile } => self
                    .span
                    .in_scope(|| debug!(%remote, profile, "the browser leg's DTLS-SRTP is up")),
                WebRtcEvent::Failed(e) => {
                    self.span
                        .in_scope(|| warn!(error = %e, "the browser leg's media failed"));
                    self.note(MediaNote::LegMediaFailed);
                }
            }
        }
    }

    /// Read everything waiting on one side of the bridge and forward it to the other side.
    /// The caller's packets still go through its session (latching, statistics, the silence
    /// watch); keys pass through to the leg as RFC 4733 events.
    fn relay_locked(self: &Arc<Self>, st: &mut SlotState, side: u64, now: Instant, io: &mut Batch) {
        let batching = io.outbox.batching();
        let caller_neg = st.media.negotiated();
        let caller_remote = st.media.remote();
        let caller_connected = st.connected == Some(caller_remote);
        let Some(leg) = st.bridge.as_ref().map(|b| b.leg.clone()) else {
            return;
        };
        let from_socket = if side == CALLER_SIDE {
            &self.port.socket
        } else {
            &leg.socket
        };
        loop {
            let n = match io.recv(from_socket) {
                Ok(n) => n,
                Err(e) => {
                    self.span
                        .in_scope(|| debug!(error = %e, "RTP receive failed (bridge)"));
                    return;
                }
            };
            for i in 0..n {
                let (len, from) = (io.lens[i], io.froms[i]);
                let buf = &mut io.bufs[i];
                if side == CALLER_SIDE {
                    if st.media.on_rtp(now, from, &buf[..len]).is_err() {
                        continue;
                    }
                    // A supervisor hears the caller; the operator hears the caller through the
                    // mixer when it also hears the supervisor (keys still pass through).
                    if let Some(t) = &mut st.call_tap {
                        if let Ok(p) = rtp::parse(&buf[..len]) {
                            if p.payload_type == caller_neg.payload_type {
                                t.push_g711(false, caller_neg.codec, p.payload);
                            }
                        }
                    }
                    let mut mixed = false;
                    if let Some(m) = &mut st.monitor {
                        m.hear(Party::Caller, &buf[..len], &caller_neg);
                        mixed = m.mixes_for(Party::Operator);
                    }
                    let Some(b) = &mut st.bridge else { return };
                    // A leg that holds the call (we answered it recvonly or inactive) is sent
                    // nothing (RFC 3264 §6.1).
                    if !b.leg_neg.direction.sends() {
                        continue;
                    }
                    if let Relay::Forward { len, event } = relay(buf, len, &caller_neg, &b.leg_neg)
                    {
                        if mixed && !event {
                            continue;
                        }
                        if let Some(w) = &b.webrtc {
                            let mut w = lock_webrtc(w);
                            w.to_leg.apply(&mut buf[..len], event);
                            if let Some((srtp, to)) = w.leg.protect(&buf[..len]) {
                                let _ = leg.socket.send_to(&srtp, to);
                            }
                            continue;
                        }
                        b.to_leg.apply(&mut buf[..len], event);
                        let to = b.leg_latch.remote();
                        if b.leg_connected != Some(to) {
                            let _ = leg.socket.send_to(&buf[..len], to);
                        } else if batching {
                            io.outbox.push(self, Some(&leg), &buf[..len]);
                        } else {
                            let _ = leg.socket.send(&buf[..len]);
                        }
                    }
                } else {
                    // Nothing reaches a caller that has not confirmed the call (see
                    // `MediaSession::until_confirmed`).
                    let confirmed = st.media.is_confirmed();
                    let Some(b) = &mut st.bridge else { return };
                    let len = match b.webrtc.clone() {
                        Some(w) => {
                            let mut w = lock_webrtc(&w);
                            let got = w.leg.handle_datagram(now, from, buf, len);
                            self.webrtc_out(b, &mut w.leg);
                            match got {
                                Datagram::Media { len } => len,
                                Datagram::Handled => {
                                    b.leg_alive = Some(now);
                                    continue;
                                }
                                Datagram::Dropped => continue,
                            }
                        }
                        None if b.accept_leg_packet(from, &buf[..len]) => len,
                        None => continue,
                    };
                    b.leg_alive = Some(now);
                    if let Some(t) = &mut st.call_tap {
                        if let Ok(p) = rtp::parse(&buf[..len]) {
                            if p.payload_type == b.leg_neg.payload_type {
                                t.push_g711(true, b.leg_neg.codec, p.payload);
                            }
                        }
                    }
                    let mut mixed = false;
                    if let Some(m) = &mut st.monitor {
                        m.hear(Party::Operator, &buf[..len], &b.leg_neg);
                        mixed = m.mixes_for(Party::Caller);
                    }
                    if let Relay::Forward { len, event } = relay(buf, len, &b.leg_neg, &caller_neg)
                    {
                        b.leg_heard = Some(now);
                        if mixed && !event {
                            continue;
                        }
                        // Nor is a caller who holds the call.
                        if !caller_neg.direction.sends() || !confirmed {
                            continue;
                        }
                        b.to_caller.apply(&mut buf[..len], event);
                        if !caller_connected {
                            let _ = self.port.socket.send_to(&buf[..len], caller_remote);
                        } else if batching {
                            io.outbox.push(self, None, &buf[..len]);
                        } else {
                            let _ = self.port.socket.send(&buf[..len]);
                        }
                    }
                }
            }
            if n < BATCH {
                return;
            }
        }
    }

    /// One packet time of a supervisor on the bridge ([`Monitor`]): read what its phone sent
    /// (audio, keys: 4, 5 and 6 switch the mode), take a frame of every talker, and send each
    /// party that hears two others its mix: the supervisor always, the operator in whisper and
    /// barge, the caller in barge.
    fn monitor_tick(self: &Arc<Self>, st: &mut SlotState, now: Instant, io: &mut Batch) {
        if st.monitor.as_ref().is_some_and(|m| m.link.is_gone()) {
            st.monitor = None;
            self.span
                .in_scope(|| debug!("the supervisor left the bridge"));
        }
        let caller_neg = st.media.negotiated();
        let caller_remote = st.media.remote();
        let caller_connected = st.connected == Some(caller_remote);
        let confirmed = st.media.is_confirmed();
        let (Some(m), Some(b)) = (&mut st.monitor, &mut st.bridge) else {
            return;
        };
        loop {
            let n = match io.recv(&m.port.socket) {
                Ok(n) => n,
                Err(e) => {
                    self.span
                        .in_scope(|| debug!(error = %e, "RTP receive failed (supervisor)"));
                    break;
                }
            };
            for i in 0..n {
                let (mut len, from) = (io.lens[i], io.froms[i]);
                if let Some(w) = m.webrtc.clone() {
                    let mut w = lock_webrtc(&w);
                    let got = w.leg.handle_datagram(now, from, &mut io.bufs[i], len);
                    m.webrtc_out(&mut w.leg, &self.span);
                    match got {
                        Datagram::Media { len: plain } => len = plain,
                        Datagram::Handled | Datagram::Dropped => continue,
                    }
                } else if m.latch.on_packet(from) == LatchDecision::Foreign {
                    continue;
                }
                let Ok(p) = rtp::parse(&io.bufs[i][..len]) else {
                    continue;
                };
                if p.payload_type == m.neg.payload_type {
                    m.mixer.push_g711(Party::Supervisor, m.neg.codec, p.payload);
                } else if Some(p.payload_type) == m.neg.telephone_event {
                    if let Ok(Some(key)) = m.dtmf.on_packet(now, p.timestamp, p.payload) {
                        if let Some(mode) = MonitorMode::from_key(key) {
                            m.link.set_mode(mode);
                        }
                        let _ = m.notes.try_send(MonitorNote::Key(key));
                    }
                }
            }
            if n < BATCH {
                break;
            }
        }
        if let Some(w) = m.webrtc.clone() {
            let mut w = lock_webrtc(&w);
            if w.leg.poll_timeout().is_some_and(|t| t <= now) {
                w.leg.handle_timeout(now);
            }
            m.webrtc_out(&mut w.leg, &self.span);
        }
        m.mixer.tick();
        let mode = m.link.mode();
        let mut out = [0u8; rtp::HEADER_LEN + FRAME];
        if m.neg.direction.sends() {
            let n = Monitor::packet_for(
                &m.mixer,
                mode,
                Party::Supervisor,
                &m.neg,
                &mut m.out,
                &mut out,
            );
            m.send_to_supervisor(&mut out[..n]);
        }
        if mode.mixed_for(Party::Operator) && b.leg_neg.direction.sends() {
            let n = Monitor::packet_for(
                &m.mixer,
                mode,
                Party::Operator,
                &b.leg_neg,
                &mut m.to_leg,
                &mut out,
            );
            if let Some(w) = &b.webrtc {
                let mut w = lock_webrtc(w);
                w.to_leg.apply(&mut out[..n], false);
                if let Some((srtp, to)) = w.leg.protect(&out[..n]) {
                    let _ = b.leg.socket.send_to(&srtp, to);
                }
            } else {
                b.to_leg.apply(&mut out[..n], false);
                let to = b.leg_latch.remote();
                let _ = if b.leg_connected == Some(to) {
                    b.leg.socket.send(&out[..n])
                } else {
                    b.leg.socket.send_to(&out[..n], to)
                };
            }
        }
        if mode.mixed_for(Party::Caller) && caller_neg.direction.sends() && confirmed {
            let n = Monitor::packet_for(
                &m.mixer,
                mode,
                Party::Caller,
                &caller_neg,
                &mut m.to_caller,
                &mut out,
            );
            b.to_caller.apply(&mut out[..n], false);
            let _ = if caller_connected {
                self.port.socket.send(&out[..n])
            } else {
                self.port.socket.send_to(&out[..n], caller_remote)
            };
        }
    }

    /// Read everything the caller sent since the last tick; the number of datagrams read.
    fn receive(&self, st: &mut SlotState, now: Instant, io: &mut Batch) -> usize {
        let mut got = 0;
        loop {
            let n = match io.recv(&self.port.socket) {
                Ok(n) => n,
                Err(e) => {
                    self.span
                        .in_scope(|| debug!(error = %e, "RTP receive failed"));
                    return got;
                }
            };
            got += n;
            for i in 0..n {
                let (buf, from) = io.packet(i);
                self.on_packet(st, now, from, buf);
            }
            if n < BATCH {
                return got;
            }
        }
    }

    fn on_packet(&self, st: &mut SlotState, now: Instant, from: SocketAddr, buf: &[u8]) {
        match st.media.on_rtp(now, from, buf) {
            Ok(Some(MediaEvent::Digit(d))) => {
                self.span.in_scope(|| debug!(digit = %d, "digit"));
                self.note(MediaNote::Digit(d));
            }
            Ok(_) => {
                if st.media.stats.foreign_in > 0 && !st.logged_foreign {
                    st.logged_foreign = true;
                    self.span.in_scope(
                        || warn!(%from, "RTP from an unexpected address after latching; dropped"),
                    );
                }
                if let (Some(tap), false) = (&mut st.tap, st.record_ended) {
                    if let Ok(p) = crate::media::rtp::parse(buf) {
                        if p.payload_type == st.media.negotiated().payload_type {
                            let mut pcm = [0i16; 1024];
                            let n = p.payload.len().min(pcm.len());
                            st.media.codec().decode(&p.payload[..n], &mut pcm[..n]);
                            if tap.pending.len() + n <= TAP_MAX {
                                tap.pending.extend_from_slice(&pcm[..n]);
                            }
                            if tap.pending.len() >= TAP_FLUSH && !tap.asked {
                                tap.asked = true;
                                self.note(MediaNote::RecordingData);
                            }
                            if tap.meter.hear(now, &pcm[..n]) != RecordState::Recording {
                                st.record_ended = true;
                                self.note(MediaNote::RecordingEnded);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if !st.logged_malformed {
                    st.logged_malformed = true;
                    self.span
                        .in_scope(|| warn!(%from, error = %e, "garbage on the RTP port; dropped"));
                }
            }
        }
    }
}

/// Receive buffers for one shard, reused for every call.
struct Batch {
    bufs: [[u8; MAX_DATAGRAM]; BATCH],
    lens: [usize; BATCH],
    froms: [SocketAddr; BATCH],
    out: [u8; MAX_PACKET],
    /// The pass's packets to connected callers, sent together at the end of the pass.
    outbox: Outbox,
    #[cfg(target_os = "linux")]
    sys: linux::Headers,
}

impl Batch {
    fn new(batch_sends: bool) -> Self {
        Batch {
            bufs: [[0; MAX_DATAGRAM]; BATCH],
            lens: [0; BATCH],
            froms: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            out: [0; MAX_PACKET],
            outbox: Outbox::new(batch_sends),
            #[cfg(target_os = "linux")]
            sys: linux::Headers::new(),
        }
    }

    fn packet(&self, i: usize) -> (&[u8], SocketAddr) {
        (&self.bufs[i][..self.lens[i]], self.froms[i])
    }

    /// Up to [`BATCH`] datagrams waiting on `socket`: one `recvmmsg` on Linux.
    #[cfg(target_os = "linux")]
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        linux::recv(
            socket.as_raw_fd(),
            &mut self.bufs,
            &mut self.lens,
            &mut self.froms,
            &mut self.sys,
        )
    }

    /// Elsewhere: one `recv_from` per datagram.
    #[cfg(not(target_os = "linux"))]
    fn recv(&mut self, s: &UdpSocket) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            match s.recv_from(&mut self.bufs[n]) {
                Ok((len, from)) => {
                    self.lens[n] = len;
                    // As on Linux: an IPv4-mapped source is the IPv4 address its SDP names.
                    self.froms[n] = SocketAddr::new(from.ip().to_canonical(), from.port());
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// Packets one [`Outbox`] holds before it is sent.
const OUTBOX: usize = 256;

/// A pass's RTP packets to connected callers, handed to the kernel together: one
/// `io_uring_enter` for up to [`OUTBOX`] sends (Linux), instead of one `send` system call each.
///
/// Why: with the callers' reads batched and quiet callers polled together, the sends were the
/// one system call per packet left on the clock's path. Each paid the syscall entry and exit
/// and the file lookup (`fdget` alone was 3% of the server's samples under SIPp at 100
/// calls/s). Sending 800 connected sockets' packets to a socket nobody reads, as SIPp's media
/// port is, costs 4.9–5.1 µs a packet in io_uring batches against 5.6–6.2 µs with a `send`
/// each (`cargo run --release -p ivr311-load --example loopback_floor -- sipp 800 0 15 2 1`,
/// and without the last `1`). The kernel's own UDP path is unchanged. In the server, under
/// SIPp at 100 calls/s, five alternated pairs of runs measured 35.9% of a core against 39.4%
/// (BENCHMARKS.md, "Design choices").
///
/// A packet to a caller not yet latched where its SDP said (the socket is not `connect`ed) is
/// sent at once with `sendto`, as before; so is everything when the ring cannot be had (an old
/// kernel, a container that forbids io_uring) or when `media.batch_sends` is off. The queued
/// packets keep their slot (so its socket stays open) until they are sent, at the end of the
/// pass, and within the same pass as before, ahead of every read.
struct Outbox {
    /// Relayed packets can be as large as anything read ([`MAX_DATAGRAM`]). [`OUTBOX`] of them
    /// when batching, none otherwise (512 KiB a shard that would never be touched).
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    lens: [usize; OUTBOX],
    results: [i32; OUTBOX],
    /// Whose packet each one is, and the bridge's leg port it goes out on (else the call's
    /// own): holding them keeps the sockets open until the packets are sent.
    slots: Vec<(Arc<Slot>, Option<Arc<RtpPort>>)>,
    #[cfg(target_os = "linux")]
    ring: Option<linux::Ring>,
}

impl Outbox {
    fn new(batch_sends: bool) -> Self {
        let mut outbox = Outbox {
            bufs: Vec::new(),
            lens: [0; OUTBOX],
            results: [0; OUTBOX],
            slots: Vec::new(),
            #[cfg(target_os = "linux")]
            ring: batch_sends
                .then(|| {
                    linux::Ring::new(OUTBOX as u32)
                        .map_err(|e| {
                            warn!(error = %e, "no io_uring: RTP is sent one system call a packet")
                        })
                        .ok()
                })
                .flatten(),
        };
        #[cfg(not(target_os = "linux"))]
        let _ = batch_sends;
        if outbox.batching() {
            outbox.bufs = vec![[0; MAX_DATAGRAM]; OUTBOX];
            outbox.slots = Vec::with_capacity(OUTBOX);
        }
        outbox
    }

    /// Whether packets are queued (otherwise each is sent at once).
    fn batching(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.ring.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// The buffer for the next queued packet (sending what is queued first if it is full).
    fn next(&mut self) -> &mut [u8; MAX_DATAGRAM] {
        if self.slots.len() == OUTBOX {
            self.flush();
        }
        &mut self.bufs[self.slots.len()]
    }

    /// Queue the packet just written into [`Outbox::next`]'s buffer, `len` bytes, to go out on
    /// `leg` (a bridge's leg port) or else on `slot`'s own port.
    fn commit(&mut self, slot: &Arc<Slot>, leg: Option<&Arc<RtpPort>>, len: usize) {
        self.lens[self.slots.len()] = len;
        self.slots.push((slot.clone(), leg.cloned()));
    }

    /// Queue a copy of `packet`, as [`Outbox::commit`].
    fn push(&mut self, slot: &Arc<Slot>, leg: Option<&Arc<RtpPort>>, packet: &[u8]) {
        let len = packet.len().min(MAX_DATAGRAM);
        self.next()[..len].copy_from_slice(&packet[..len]);
        self.commit(slot, leg, len);
    }

    /// Send every queued packet; a failed send is logged once per call, as a direct one is.
    fn flush(&mut self) {
        let n = self.slots.len();
        if n == 0 {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Some(ring) = &mut self.ring {
            use std::os::fd::{AsRawFd, RawFd};
            let mut fds: [RawFd; OUTBOX] = [-1; OUTBOX];
            for (fd, (slot, leg)) in fds.iter_mut().zip(&self.slots) {
                *fd = leg.as_deref().unwrap_or(&slot.port).socket.as_raw_fd();
            }
            if let Err(e) = ring.send_all(
                &fds[..n],
                &self.bufs[..n],
                &self.lens[..n],
                &mut self.results,
            ) {
                // Not seen; if it happens, the shard goes on with one `send` a packet. The
                // ring is kept (never dropped) so a send it may still hold has its buffer.
                warn!(error = %e, "io_uring failed: RTP is sent one system call a packet from now");
                std::mem::forget(self.ring.take());
                self.results[..n].fill(-libc::EIO);
            }
        }
        for (i, (slot, leg)) in self.slots.drain(..).enumerate() {
            let r = self.results[i];
            // A failed send to the leg is not logged (nor was it when sent directly).
            if r < 0 && leg.is_none() {
                slot.send_failed(io::Error::from_raw_os_error(-r));
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    //! `recvmmsg(2)`, `poll(2)`, epoll and io_uring: the only unsafe code of the media path,
    //! kept to this module.
    use super::{BATCH, MAX_DATAGRAM};
    use std::io;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::RawFd;

    pub(super) struct Headers {
        addrs: [libc::sockaddr_storage; BATCH],
        iov: [libc::iovec; BATCH],
        hdrs: [libc::mmsghdr; BATCH],
    }

    // SAFETY: the raw pointers inside are only set and used within one `recv` call.
    unsafe impl Send for Headers {}

    impl Headers {
        pub(super) fn new() -> Self {
            // SAFETY: all-zero is a valid value of these plain C structs.
            unsafe { std::mem::zeroed() }
        }
    }

    pub(super) fn recv(
        fd: RawFd,
        bufs: &mut [[u8; MAX_DATAGRAM]; BATCH],
        lens: &mut [usize; BATCH],
        froms: &mut [SocketAddr; BATCH],
        h: &mut Headers,
    ) -> io::Result<usize> {
        for (i, buf) in bufs.iter_mut().enumerate() {
            h.iov[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            // SAFETY: zero is valid for msghdr; the pointers set below outlive the call.
            let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
            m.msg_name = (&mut h.addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_iov = &mut h.iov[i];
            m.msg_iovlen = 1;
            h.hdrs[i] = libc::mmsghdr {
                msg_hdr: m,
                msg_len: 0,
            };
        }
        // SAFETY: every header points into buffers borrowed for the duration of the call, with
        // their true lengths; MSG_DONTWAIT makes it return at once.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                h.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = n as usize;
        for i in 0..n {
            lens[i] = h.hdrs[i].msg_len as usize;
            // A UDP socket only reports IPv4/IPv6 sources; anything else counts as foreign.
            froms[i] = to_socket_addr(&h.addrs[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        }
        Ok(n)
    }

    /// The quiet callers' sockets of one shard, asked together with one `poll(2)` that does
    /// not wait (which, unlike an epoll registration, puts nothing on the sockets' wait
    /// queues; see the module docs).
    #[derive(Default)]
    pub(super) struct QuietSet {
        fds: Vec<libc::pollfd>,
        ids: Vec<u64>,
    }

    impl QuietSet {
        /// Add slot `id`'s socket `fd` (open as long as the slot is in the shard).
        pub(super) fn insert(&mut self, fd: RawFd, id: u64) {
            self.fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            self.ids.push(id);
        }

        pub(super) fn remove(&mut self, id: u64) {
            if let Some(i) = self.ids.iter().position(|&x| x == id) {
                self.fds.swap_remove(i);
                self.ids.swap_remove(i);
            }
        }

        /// Give `woke` each socket that has input (or an error to read), taking it out of
        /// the set. If `poll` itself fails, every socket is given back, to be read.
        pub(super) fn take_ready(&mut self, mut woke: impl FnMut(u64)) {
            if self.fds.is_empty() {
                return;
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd; timeout 0 returns at once.
            let n = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, 0) };
            if n == 0 {
                return;
            }
            let mut i = 0;
            while i < self.fds.len() {
                if n < 0 || self.fds[i].revents != 0 {
                    woke(self.ids[i]);
                    self.fds.swap_remove(i);
                    self.ids.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }

        #[cfg(test)]
        pub(super) fn len(&self) -> usize {
            self.fds.len()
        }
    }

    /// An epoll set of bridged calls' sockets, waited on with a nanosecond timeout
    /// (`epoll_pwait2`, Linux 5.11; older kernels get `epoll_wait`'s milliseconds, the rest
    /// slept precisely).
    pub(super) struct Poller {
        fd: RawFd,
        events: Vec<libc::epoll_event>,
        ready: usize,
        ms_only: bool,
    }

    /// Events taken per wait.
    pub(super) const EVENTS: usize = 256;

    impl Poller {
        pub(super) fn new() -> io::Result<Poller> {
            // SAFETY: plain system call; the result is checked.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Poller {
                fd,
                events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
                ready: 0,
                ms_only: false,
            })
        }

        /// Watch `fd` for input (level-triggered), reported with `token`.
        pub(super) fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: token,
            };
            // SAFETY: `ev` is a valid epoll_event for the duration of the call.
            let rc = unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        /// Stop watching `fd` (still open: the caller holds it).
        pub(super) fn remove(&mut self, fd: RawFd) {
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: as above; a fd that was never added just gives ENOENT.
            unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
        }

        /// Wait at most `timeout` for input; the number of ready sockets ([`Poller::token`]).
        pub(super) fn wait(&mut self, timeout: std::time::Duration) -> usize {
            let n = if self.ms_only || timeout.is_zero() {
                let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
                if ms == 0 && !timeout.is_zero() {
                    std::thread::sleep(timeout);
                    return 0;
                }
                // SAFETY: `events` has EVENTS entries.
                unsafe { libc::epoll_wait(self.fd, self.events.as_mut_ptr(), EVENTS as i32, ms) }
            } else {
                let ts = libc::timespec {
                    tv_sec: timeout.as_secs() as libc::time_t,
                    tv_nsec: timeout.subsec_nanos() as libc::c_long,
                };
                // SAFETY: `events` has EVENTS entries; `ts` outlives the call; no signal mask.
                let n = unsafe {
                    libc::epoll_pwait2(
                        self.fd,
                        self.events.as_mut_ptr(),
                        EVENTS as i32,
                        &ts,
                        std::ptr::null(),
                    )
                };
                if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                    self.ms_only = true;
                    return 0;
                }
                n
            };
            self.ready = n.max(0) as usize;
            self.ready
        }

        /// The token of the `i`th ready socket of the last wait.
        pub(super) fn token(&self, i: usize) -> u64 {
            self.events[i].u64
        }
    }

    impl Drop for Poller {
        fn drop(&mut self) {
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(self.fd) };
        }
    }

    /// An io_uring that sends a pass's packets in one system call ([`super::Outbox`]).
    pub(super) struct Ring {
        ring: io_uring::IoUring,
    }

    impl Ring {
        /// A ring for up to `entries` sends at once; fails where io_uring is missing (Linux
        /// before 5.6) or refused (`kernel.io_uring_disabled`, a container's seccomp filter).
        pub(super) fn new(entries: u32) -> io::Result<Ring> {
            Ok(Ring {
                ring: io_uring::IoUring::new(entries)?,
            })
        }

        /// Send `bufs[i][..lens[i]]` on the connected socket `fds[i]` for every `i`, all in one
        /// `io_uring_enter`, and put each send's result (bytes sent, or minus the errno) in
        /// `results[i]`. At most the ring's size at once. `MSG_DONTWAIT` makes every send
        /// finish within the call (a full socket buffer fails it with `EAGAIN`, as
        /// `send(2)` does here), so the buffers are free again when this returns.
        pub(super) fn send_all(
            &mut self,
            fds: &[RawFd],
            bufs: &[[u8; MAX_DATAGRAM]],
            lens: &[usize],
            results: &mut [i32],
        ) -> io::Result<()> {
            let n = fds.len();
            {
                let mut sq = self.ring.submission();
                for i in 0..n {
                    let e = io_uring::opcode::Send::new(
                        io_uring::types::Fd(fds[i]),
                        bufs[i].as_ptr(),
                        lens[i] as u32,
                    )
                    .flags(libc::MSG_DONTWAIT)
                    .build()
                    .user_data(i as u64);
                    // SAFETY: the buffer stays borrowed (and unmoved) until every completion
                    // has been reaped below, before this function returns.
                    if unsafe { sq.push(&e) }.is_err() {
                        return Err(io::Error::other("io_uring submission queue full"));
                    }
                }
            }
            results[..n].fill(-libc::EINPROGRESS);
            let mut reaped = 0;
            while reaped < n {
                match self.ring.submit_and_wait(n - reaped) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for c in self.ring.completion() {
                    if let Some(r) = results.get_mut(c.user_data() as usize) {
                        *r = c.result();
                        reaped += 1;
                    }
                }
            }
            Ok(())
        }
    }

    /// Undo `connect` on a UDP socket (connect to `AF_UNSPEC`).
    pub(super) fn disconnect(fd: RawFd) -> io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr; only its family is read.
        let mut a: libc::sockaddr = unsafe { std::mem::zeroed() };
        a.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        // SAFETY: `a` is a valid sockaddr of the given length.
        let rc = unsafe {
            libc::connect(
                fd,
                &a,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says this storage holds a sockaddr_in.
                let a =
                    unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this storage holds a sockaddr_in6.
                let a =
                    unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let port = u16::from_be(a.sin6_port);
                // An IPv4 peer of a dual-stack socket (bound to `[::]`) comes from its mapped
                // address; its SDP names the plain IPv4 one, and the latch compares the two.
                if let Some(v4) = ip.to_ipv4_mapped() {
                    return Some(SocketAddr::V4(SocketAddrV4::new(v4, port)));
                }
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::dtmf::TelephoneEvent;
    use crate::media::g711::Codec;
    use crate::media::ports::PortPool;
    use crate::media::ports::PortRange;
    use crate::media::prompt::Prompt;
    use crate::media::rtp::RtpStream;
    use crate::media::sdp::{Direction, Negotiated};

    fn neg() -> Negotiated {
        Negotiated {
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event: Some(101),
            direction: Direction::SendRecv,
        }
    }

    fn pool() -> Arc<PortPool> {
        // Ports the OS hands out are free now; a small range around one keeps the test local.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = probe.local_addr().unwrap().port() & !1;
        drop(probe);
        PortPool::new(PortRange { lo: p, hi: p + 8 }, "127.0.0.1".parse().unwrap())
    }

    fn dtmf(seq: u16, end: bool) -> Vec<u8> {
        dtmf_at(seq, end, 4000)
    }

    /// Key 5 as an RFC 4733 event starting at RTP timestamp `ts`.
    fn dtmf_at(seq: u16, end: bool, ts: u32) -> Vec<u8> {
        let mut s = RtpStream::with_origin(9, seq, ts);
        let ev = TelephoneEvent {
            event: 5,
            end,
            volume: 10,
            duration: 800,
        };
        let mut out = [0u8; 64];
        let n = s.write_at(101, ts, seq == 1, &ev.write(), &mut out);
        out[..n].to_vec()
    }

    #[tokio::test]
    async fn plays_to_the_caller_hears_a_key_once_and_frees_the_port_when_detached() {
        let clock = MediaClock::start(1).unwrap();
        let pool = pool();
        let before = pool.available();
        let port = pool.allocate().unwrap();
        let ours = SocketAddr::new("127.0.0.1".parse().unwrap(), port.port);
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        let tone: Vec<i16> = (0..1600).map(|i| ((i % 16) * 500) as i16).collect();
        session.play([Arc::new(Prompt::from_pcm("tone", &tone, 8000, 1).unwrap())]);
        let (media, mut notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());

        // Our packets reach the caller without the call's task doing anything.
        let mut buf = [0u8; 512];
        for _ in 0..5 {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(2), caller.recv_from(&mut buf))
                    .await
                    .expect("the clock sends")
                    .unwrap();
            assert_eq!(from, ours);
            assert_eq!(n, crate::media::rtp::HEADER_LEN + 160);
        }
        // A key (start, continuation, three Ends) is one note; the prompt runs dry later.
        for (seq, end) in [(1, false), (2, false), (3, true), (4, true), (5, true)] {
            caller.send_to(&dtmf(seq, end), ours).await.unwrap();
        }
        let mut seen = Vec::new();
        while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(400), notes.recv()).await
        {
            seen.push(n);
        }
        assert_eq!(
            seen,
            vec![MediaNote::Digit('5'), MediaNote::PlayDone { stops: 0 }]
        );
        assert_eq!(media.lock().media.stats.digits, 1);

        // Detached: the shard lets go and the port is back in the pool within a tick or two.
        drop(media);
        until_available(&pool, before).await;
        assert_eq!(pool.available(), before);
        clock.stop();
    }

    /// Once the caller is latched and its socket `connect`ed, the shard's packets to it go
    /// through the outbox (io_uring here) or one `send` each: either way the caller hears
    /// every frame of the prompt once, in order, on one continuous stream.
    async fn a_connected_caller_hears_every_frame_in_order(opts: ClockOptions) {
        let clock = MediaClock::start_opts(1, opts).unwrap();
        let pool = pool();
        let port = pool.allocate().unwrap();
        let ours = SocketAddr::new("127.0.0.1".parse().unwrap(), port.port);
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        let (media, mut notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());
        // The caller speaks first: latched where its SDP said, so the socket is connected.
        let mut s = RtpStream::with_origin(3, 1, 0);
        let mut pkt = [0u8; 200];
        let n = s.write(0, &[0xff; 160], 160, &mut pkt);
        caller.send_to(&pkt[..n], ours).await.unwrap();
        for _ in 0..100 {
            if media.lock().connected.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(media.lock().connected, caller.local_addr().ok());

        // 30 frames, each a different level, so the order shows in the payloads.
        let pcm: Vec<i16> = (0..30 * 160)
            .map(|i| (i / 160) as i16 * 900 - 13000)
            .collect();
        let prompt = Arc::new(Prompt::from_pcm("steps", &pcm, 8000, 1).unwrap());
        media.lock().media.play([prompt.clone()]);
        let frames: Vec<&[u8]> = prompt.encoded(Codec::Pcmu).chunks(160).collect();
        let mut buf = [0u8; 512];
        let mut last: Option<(u16, u32)> = None;
        let mut heard = 0;
        while heard < frames.len() {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(2), caller.recv_from(&mut buf))
                    .await
                    .expect("the clock sends")
                    .unwrap();
            assert_eq!(from, ours);
            let p = crate::media::rtp::parse(&buf[..n]).unwrap();
            if let Some((seq, ts)) = last {
                assert_eq!(
                    p.sequence,
                    seq.wrapping_add(1),
                    "no packet lost or repeated"
                );
                assert_eq!(p.timestamp, ts.wrapping_add(160), "one frame later");
            }
            last = Some((p.sequence, p.timestamp));
            // Silence until the prompt starts; then its frames, each once and in order.
            if heard > 0 || p.payload == frames[0] {
                assert_eq!(p.payload, frames[heard], "frame {heard}");
                heard += 1;
            }
        }
        let done = tokio::time::timeout(Duration::from_secs(1), notes.recv()).await;
        assert_eq!(done.unwrap(), Some(MediaNote::PlayDone { stops: 0 }));
        clock.stop();
    }

    #[tokio::test]
    async fn a_connected_caller_hears_every_frame_in_order_with_batched_sends() {
        a_connected_caller_hears_every_frame_in_order(ClockOptions::default()).await;
    }

    #[tokio::test]
    async fn a_connected_caller_hears_every_frame_in_order_with_one_send_a_packet() {
        a_connected_caller_hears_every_frame_in_order(ClockOptions {
            batch_sends: false,
            ..ClockOptions::default()
        })
        .await;
    }

    /// The ring sends each packet on its own socket and reports each result: the bytes
    /// sent, or the error a `send` would have given (a caller whose port is gone).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_ring_sends_each_packet_on_its_socket_and_reports_failures() {
        use std::os::fd::AsRawFd;
        let mut ring = match linux::Ring::new(8) {
            Ok(r) => r,
            // The server then sends one packet a system call; nothing to test here.
            Err(e) => return eprintln!("io_uring refused here ({e}): not tested"),
        };
        let rx: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone_at = gone.local_addr().unwrap();
        drop(gone);
        let tx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        tx[0].connect(rx[0].local_addr().unwrap()).unwrap();
        tx[1].connect(rx[1].local_addr().unwrap()).unwrap();
        tx[2].connect(gone_at).unwrap();
        // The closed port answers the first packet with ICMP; the next send reports it.
        let _ = tx[2].send(b"probe");
        let mut bufs = vec![[0u8; MAX_DATAGRAM]; 3];
        bufs[0][..5].copy_from_slice(b"first");
        bufs[1][..6].copy_from_slice(b"second");
        let fds: Vec<_> = tx.iter().map(|s| s.as_raw_fd()).collect();
        let mut results = [0i32; 3];
        ring.send_all(&fds, &bufs, &[5, 6, 4], &mut results)
            .unwrap();
        assert_eq!(&results[..2], &[5, 6]);
        assert_eq!(results[2], -libc::ECONNREFUSED);
        let mut got = [0u8; 16];
        let n = rx[0].recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"first");
        let n = rx[1].recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"second");
    }

    #[tokio::test]
    async fn a_recording_is_handed_to_the_call_a_second_at_a_time_and_ends_on_silence() {
        let clock = MediaClock::start(1).unwrap();
        let pool = pool();
        let port = pool.allocate().unwrap();
        let ours = SocketAddr::new("127.0.0.1".parse().unwrap(), port.port);
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        let (media, mut notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());
        media.lock().start_recording(VoiceMeter::new(
            Instant::now(),
            Duration::from_secs(30),
            Duration::from_millis(400),
        ));
        // 60 loud packets (1.2 s), then silence: one "data" note, then the end.
        let pcm: Vec<i16> = (0..160)
            .map(|i| if i % 2 == 0 { 8000 } else { -8000 })
            .collect();
        let mut loud = [0u8; 160];
        Codec::Pcmu.encode(&pcm, &mut loud);
        let mut s = RtpStream::with_origin(3, 1, 0);
        let mut buf = [0u8; 200];
        for i in 0..90 {
            let payload = if i < 60 { loud } else { [0xff; 160] };
            let n = s.write(0, &payload, 160, &mut buf);
            caller.send_to(&buf[..n], ours).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut seen = Vec::new();
        while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(600), notes.recv()).await
        {
            if n != (MediaNote::PlayDone { stops: 0 }) {
                seen.push(n);
            }
        }
        assert_eq!(
            seen,
            vec![MediaNote::RecordingData, MediaNote::RecordingEnded]
        );
        let mut got = Vec::new();
        media.lock().stop_recording(&mut got);
        assert!(
            got.len() >= 8000,
            "a second of audio at least: {}",
            got.len()
        );
        let mut expect = [0i16; 160];
        Codec::Pcmu.decode(&loud, &mut expect);
        assert_eq!(&got[..160], &expect[..], "the caller's audio, decoded");
        clock.stop();
    }

    #[tokio::test]
    async fn a_bridge_is_relayed_both_ways_transcoded_and_restamped_then_prompts_resume() {
        a_bridge_is_relayed_both_ways(ClockOptions::default()).await;
    }

    #[tokio::test]
    async fn a_bridge_is_relayed_both_ways_with_one_send_a_packet() {
        a_bridge_is_relayed_both_ways(ClockOptions {
            batch_sends: false,
            ..ClockOptions::default()
        })
        .await;
    }

    async fn a_bridge_is_relayed_both_ways(opts: ClockOptions) {
        let clock = MediaClock::start_opts(1, opts).unwrap();
        let pool = pool();
        let before = pool.available();
        let port = pool.allocate().unwrap();
        let ours = SocketAddr::new("127.0.0.1".parse().unwrap(), port.port);
        let leg_port = Arc::new(pool.allocate().unwrap());
        let leg_ours = SocketAddr::new("127.0.0.1".parse().unwrap(), leg_port.port);
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let agent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        let tone: Vec<i16> = (0..800).map(|i| ((i % 16) * 500) as i16).collect();
        let tone = Arc::new(Prompt::from_pcm("tone", &tone, 8000, 1).unwrap());
        session.play([tone.clone()]);
        let (media, _notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());
        // The operator's phone answered with PCMA at payload type 8, events at 96.
        let agent_neg = Negotiated {
            codec: Codec::Pcma,
            payload_type: 8,
            telephone_event: Some(96),
            direction: Direction::SendRecv,
        };
        media.lock().set_bridge(Some(Bridge::new(
            leg_port.clone(),
            agent.local_addr().unwrap(),
            agent_neg,
        )));
        assert!(media.lock().bridged());
        // Let the shard see the bridge, then drop what the caller was sent before it.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut buf = [0u8; 512];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(30), caller.recv_from(&mut buf)).await
        {
        }

        // Caller → operator: PCMU 0 becomes PCMA 8 under the bridge's own SSRC.
        let mut pcmu = [0u8; 160];
        Codec::Pcmu.encode(&[1000i16; 160], &mut pcmu);
        let mut s = RtpStream::with_origin(7, 100, 0);
        let mut pkt = [0u8; 200];
        for _ in 0..3 {
            let n = s.write(0, &pcmu, 160, &mut pkt);
            caller.send_to(&pkt[..n], ours).await.unwrap();
        }
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let (n, from) = tokio::time::timeout(Duration::from_secs(1), agent.recv_from(&mut buf))
                .await
                .expect("relayed to the operator")
                .unwrap();
            assert_eq!(from, leg_ours);
            let p = crate::media::rtp::parse(&buf[..n]).unwrap();
            assert_eq!(p.payload_type, 8);
            assert_ne!(p.ssrc, 7, "the bridge's own SSRC");
            let mut expect = [0u8; 160];
            Codec::transcode(Codec::Pcmu, Codec::Pcma, &pcmu, &mut expect);
            assert_eq!(p.payload, &expect[..]);
            seqs.push(p.sequence);
        }
        assert_eq!(seqs[1], seqs[0].wrapping_add(1));
        assert_eq!(seqs[2], seqs[1].wrapping_add(1));
        // A key from the caller reaches the operator as an event at their payload type.
        caller.send_to(&dtmf(1, false), ours).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(1), agent.recv_from(&mut buf))
            .await
            .expect("key relayed")
            .unwrap();
        assert_eq!(
            crate::media::rtp::parse(&buf[..n]).unwrap().payload_type,
            96
        );

        // Operator → caller: PCMA 8 becomes PCMU 0; the clock plays nothing meanwhile.
        let mut pcma = [0u8; 160];
        Codec::Pcma.encode(&[-2000i16; 160], &mut pcma);
        let mut s = RtpStream::with_origin(55, 9, 0);
        let n = s.write(8, &pcma, 160, &mut pkt);
        agent.send_to(&pkt[..n], leg_ours).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(1), caller.recv_from(&mut buf))
            .await
            .expect("relayed to the caller")
            .unwrap();
        assert_eq!(from, ours);
        let p = crate::media::rtp::parse(&buf[..n]).unwrap();
        assert_eq!(p.payload_type, 0);
        let mut expect = [0u8; 160];
        Codec::transcode(Codec::Pcma, Codec::Pcmu, &pcma, &mut expect);
        assert_eq!(p.payload, &expect[..]);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), caller.recv_from(&mut buf))
                .await
                .is_err(),
            "nothing but the relayed packet while bridged"
        );

        // The bridge ends: the caller hears prompts again and the leg's port goes back.
        {
            let mut st = media.lock();
            st.set_bridge(None);
            st.media.play([tone]);
        }
        drop(leg_port);
        let (n, _) = tokio::time::timeout(Duration::from_secs(1), caller.recv_from(&mut buf))
            .await
            .expect("prompts again")
            .unwrap();
        assert_eq!(n, crate::media::rtp::HEADER_LEN + 160);
        drop(media);
        until_available(&pool, before).await;
        assert_eq!(pool.available(), before, "both ports back in the pool");
        clock.stop();
    }

    /// A one-shard clock, its port pool, the caller's port, a leg's port and the address it
    /// listens on, and the caller's socket: what the bridge tests start from.
    async fn bridge_rig() -> (
        Arc<MediaClock>,
        Arc<PortPool>,
        RtpPort,
        Arc<RtpPort>,
        SocketAddr,
        tokio::net::UdpSocket,
    ) {
        let clock = MediaClock::start(1).unwrap();
        let pool = pool();
        let port = pool.allocate().unwrap();
        let leg_port = Arc::new(pool.allocate().unwrap());
        let leg_ours = SocketAddr::new("127.0.0.1".parse().unwrap(), leg_port.port);
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (clock, pool, port, leg_port, leg_ours, caller)
    }

    /// An agent's phone that moves (a re-INVITE with a new address) is bridged again on the
    /// same leg port. The shard `connect`s a leg's port once the leg is latched where its SDP
    /// said; the new bridge must not inherit that, or the kernel drops the moved phone's audio.
    #[tokio::test]
    async fn a_leg_that_moves_on_the_same_port_is_heard_and_the_port_is_let_go_after() {
        let (clock, _pool, port, leg_port, leg_ours, caller) = bridge_rig().await;
        let session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        let (media, _notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());
        let mut buf = [0u8; 512];
        let mut pcmu = [0u8; 160];
        Codec::Pcmu.encode(&[1000i16; 160], &mut pcmu);
        // Whether `phone`'s audio reaches the caller within a few packet times.
        async fn heard(
            phone: &tokio::net::UdpSocket,
            leg_ours: SocketAddr,
            caller: &tokio::net::UdpSocket,
            ssrc: u32,
            pcmu: &[u8],
            buf: &mut [u8],
        ) -> bool {
            let mut s = RtpStream::with_origin(ssrc, 1, 0);
            let mut pkt = [0u8; 200];
            for _ in 0..5 {
                let n = s.write(0, pcmu, 160, &mut pkt);
                phone.send_to(&pkt[..n], leg_ours).await.unwrap();
                tokio::time::sleep(PTIME).await;
            }
            tokio::time::timeout(Duration::from_millis(200), caller.recv_from(buf))
                .await
                .is_ok()
        }

        let first = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let bridge = Bridge::new(leg_port.clone(), first.local_addr().unwrap(), neg());
        media.lock().set_bridge(Some(bridge));
        tokio::time::sleep(Duration::from_millis(60)).await;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(30), caller.recv_from(&mut buf)).await
        {
        }
        assert!(heard(&first, leg_ours, &caller, 1, &pcmu, &mut buf).await);
        #[cfg(target_os = "linux")]
        assert_eq!(
            leg_port.socket.peer_addr().ok(),
            first.local_addr().ok(),
            "latched where its SDP said: connected"
        );

        // The phone moved: a bridge to its new address on the same port.
        let moved = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let bridge = Bridge::new(leg_port.clone(), moved.local_addr().unwrap(), neg());
        media.lock().set_bridge(Some(bridge));
        tokio::time::sleep(Duration::from_millis(60)).await;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(30), caller.recv_from(&mut buf)).await
        {
        }
        assert!(
            heard(&moved, leg_ours, &caller, 2, &pcmu, &mut buf).await,
            "the moved phone is heard"
        );

        // The bridge ends: the port is the call's again, open to whoever it calls next.
        media.lock().set_bridge(None);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            leg_port.socket.peer_addr().is_err(),
            "not connected any more"
        );
        drop(media);
        clock.stop();
    }

    #[tokio::test]
    async fn early_media_that_stops_gives_the_caller_our_prompt_again_in_time() {
        let (clock, _pool, port, leg_port, leg_ours, caller) = bridge_rig().await;
        let trunk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        // Ten seconds of "ringback".
        let ring = Arc::new(Prompt::from_pcm("ring", &[3000i16; 80_000], 8000, 1).unwrap());
        session.play([ring]);
        let (media, _notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());
        media.lock().set_bridge(Some(
            Bridge::new(leg_port.clone(), trunk.local_addr().unwrap(), neg())
                .filling(Duration::from_millis(500)),
        ));
        /// The next packet the caller hears: SSRC, timestamp, marker, first payload byte.
        async fn heard(caller: &tokio::net::UdpSocket) -> (u32, u32, bool, u8) {
            let mut buf = [0u8; 512];
            let (n, _) = tokio::time::timeout(Duration::from_secs(1), caller.recv_from(&mut buf))
                .await
                .expect("the caller hears something")
                .unwrap();
            let p = crate::media::rtp::parse(&buf[..n]).unwrap();
            (p.ssrc, p.timestamp, p.marker, p.payload[0])
        }
        let next = || heard(&caller);
        // The leg sends nothing yet: the caller hears our prompt.
        let mut ours_last = next().await;
        for _ in 0..5 {
            ours_last = next().await;
        }
        let ours_ssrc = ours_last.0;

        // The leg's early media arrives (0x2a): relayed, with none of ours over it.
        let mut s = RtpStream::with_origin(77, 1, 0);
        let mut pkt = [0u8; 200];
        let sent_at = tokio::time::Instant::now();
        for _ in 0..10 {
            let n = s.write(0, &[0x2a; 160], 160, &mut pkt);
            trunk.send_to(&pkt[..n], leg_ours).await.unwrap();
            tokio::time::sleep(PTIME).await;
        }
        let (mut relayed, mut ours_after) = (0, 0);
        let resumed = loop {
            let p = next().await;
            if p.3 == 0x2a {
                relayed += 1;
                assert_ne!(p.0, ours_ssrc, "relayed under the bridge's SSRC");
            } else if relayed == 0 {
                ours_last = p; // in flight before the leg's first packet
            } else if p.0 == ours_ssrc {
                break p;
            } else {
                ours_after += 1;
            }
        };
        assert_eq!(relayed, 10);
        assert_eq!(ours_after, 0);
        // Our prompt came back after the gap, as the start of a talkspurt whose timestamp
        // counts the time it sat out (not a burst, not a jump back).
        let gap = sent_at.elapsed();
        assert!(gap >= Duration::from_millis(650), "resumed after {gap:?}");
        assert!(resumed.2, "marker bit on the first packet after the pause");
        let ticks = resumed.1.wrapping_sub(ours_last.1) / 160;
        let expect = (gap.as_millis() / 20) as u32;
        assert!(
            ticks + 10 >= expect && ticks <= expect + 10,
            "timestamp moved {ticks} packet times over {gap:?}"
        );
        drop(media);
        clock.stop();
    }

    #[tokio::test]
    async fn after_latching_only_the_caller_is_heard_until_a_reinvite_moves_it() {
        let clock = MediaClock::start(1).unwrap();
        let pool = pool();
        let port = pool.allocate().unwrap();
        let ours = SocketAddr::new("127.0.0.1".parse().unwrap(), port.port);
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
        let (media, mut notes) = clock.attach(port, session, Duration::from_secs(60), Span::none());
        let mut buf = [0u8; 512];
        // The caller's key latches; the stranger's key afterwards is not heard.
        for (seq, end) in [(1, false), (2, true)] {
            caller.send_to(&dtmf(seq, end), ours).await.unwrap();
        }
        let first = tokio::time::timeout(Duration::from_secs(1), notes.recv()).await;
        assert_eq!(first.unwrap(), Some(MediaNote::Digit('5')));
        tokio::time::sleep(Duration::from_millis(60)).await;
        for (seq, end) in [(10, false), (11, true)] {
            stranger
                .send_to(&dtmf_at(seq, end, 8000), ours)
                .await
                .unwrap();
        }
        let n = tokio::time::timeout(Duration::from_millis(200), notes.recv()).await;
        assert!(n.is_err(), "a stranger's key after latching: {n:?}");
        // Our packets still reach the caller.
        let (_, from) = tokio::time::timeout(Duration::from_secs(1), caller.recv_from(&mut buf))
            .await
            .expect("packets to the caller")
            .unwrap();
        assert_eq!(from, ours);

        // A re-INVITE moves the caller to the stranger's address: it is heard and served.
        media
            .lock()
            .media
            .renegotiate(neg(), stranger.local_addr().unwrap());
        tokio::time::sleep(Duration::from_millis(60)).await;
        for (seq, end) in [(20, false), (21, true)] {
            stranger
                .send_to(&dtmf_at(seq, end, 12000), ours)
                .await
                .unwrap();
        }
        let n = tokio::time::timeout(Duration::from_secs(1), notes.recv()).await;
        assert_eq!(
            n.unwrap(),
            Some(MediaNote::Digit('5')),
            "heard at the new address"
        );
        let (_, from) = tokio::time::timeout(Duration::from_secs(1), stranger.recv_from(&mut buf))
            .await
            .expect("packets follow the caller")
            .unwrap();
        assert_eq!(from, ours);
        clock.stop();
    }

    /// Waits (up to 1 s) until the pool has `n` ports free (a detached slot's port goes back at
    /// the shard's next tick).
    async fn until_available(pool: &PortPool, n: usize) {
        for _ in 0..50 {
            if pool.available() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to 2 s) until the slot's quiet state is `armed`.
    async fn until_armed(media: &MediaHandle, armed: bool) {
        for _ in 0..200 {
            if media.lock().quiet_armed == armed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the caller's socket never became {}",
            if armed { "armed" } else { "read again" }
        );
    }

    #[tokio::test]
    async fn a_quiet_caller_is_not_read_until_it_sends_and_then_is_heard_at_once() {
        let clock = MediaClock::start(1).unwrap();
        // One port only, so the second call gets the first call's port number again.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = probe.local_addr().unwrap().port() & !1;
        drop(probe);
        let pool = PortPool::new(PortRange { lo: p, hi: p }, "127.0.0.1".parse().unwrap());
        let caller = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for call in 0..2 {
            let port = pool.allocate().expect("the port is back in the pool");
            let ours = SocketAddr::new("127.0.0.1".parse().unwrap(), port.port);
            let session = MediaSession::new(Instant::now(), neg(), caller.local_addr().unwrap());
            let (media, mut notes) =
                clock.attach(port, session, Duration::from_secs(60), Span::none());
            // Silent for QUIET_AFTER ticks: the shard stops reading the socket.
            until_armed(&media, true).await;
            // A key from the quiet caller is heard, once, and the socket is read every tick
            // again.
            for (seq, end) in [(1, false), (2, false), (3, true), (4, true), (5, true)] {
                caller.send_to(&dtmf(seq, end), ours).await.unwrap();
            }
            let n = tokio::time::timeout(Duration::from_secs(2), notes.recv()).await;
            assert_eq!(n.unwrap(), Some(MediaNote::Digit('5')), "call {call}");
            until_armed(&media, false).await;
            // Quiet again: back in the quiet set.
            until_armed(&media, true).await;
            let mut s = RtpStream::with_origin(9, 6, 8000);
            let mut out = [0u8; 256];
            let k = s.write_at(
                101,
                8000,
                true,
                &TelephoneEvent {
                    event: 7,
                    end: true,
                    volume: 10,
                    duration: 800,
                }
                .write(),
                &mut out,
            );
            caller.send_to(&out[..k], ours).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(2), notes.recv()).await;
            assert_eq!(n.unwrap(), Some(MediaNote::Digit('7')), "call {call}");
            drop(media);
            // The port goes back to the pool at the shard's next tick.
            until_available(&pool, 1).await;
            assert_eq!(
                pool.available(),
                1,
                "call {call}: the port is back in the pool"
            );
        }
    }

    /// A slot as the clock makes it, not attached to any shard.
    fn loose_slot(pool: &Arc<PortPool>, id: u64) -> Arc<Slot> {
        let port = pool.allocate().expect("a free port");
        let remote = "127.0.0.1:9".parse().unwrap();
        let (notes, _) = mpsc::channel(1);
        let media = MediaSession::new(Instant::now(), neg(), remote);
        let slot = Slot::new(
            id,
            port,
            media,
            notes,
            Duration::from_secs(60),
            Span::none(),
        );
        slot.state.lock().unwrap().phase = usize::MAX;
        slot
    }

    #[test]
    fn calls_fill_a_phase_then_the_next_keep_their_grid_and_skip_whole_missed_rounds() {
        // Above the ephemeral ports and the integration tests' RTP ranges; ports another
        // program holds are skipped.
        let pool = PortPool::new(
            PortRange {
                lo: 62000,
                hi: 63999,
            },
            "127.0.0.1".parse().unwrap(),
        );
        let mut watch = Watch::new();
        let mut phases = Phases::new();
        let slots: Vec<_> = (0..PHASE_FILL as u64 + 1)
            .map(|id| loose_slot(&pool, id))
            .collect();
        let origin = Instant::now();
        for s in &slots {
            phases.place(s.clone(), origin);
        }
        assert_eq!(phases.origin, origin, "the first call starts the grid");
        assert_eq!(
            phases.groups[0].len(),
            PHASE_FILL,
            "the first phase fills first"
        );
        assert_eq!(phases.groups[1].len(), 1, "then the next one");
        assert_eq!(slots[PHASE_FILL].state.lock().unwrap().phase, 1);
        let span = |rounds: u64, phase: u32| {
            origin + Duration::from_nanos(PTIME.as_nanos() as u64 * rounds) + PHASE_SPAN * phase
        };

        // Round 0: phase 0 at the origin, phase 1 a span later; empty phases are not waited
        // for, so the next is phase 0 of round 1.
        assert_eq!(phases.next_due(), Some((0, span(0, 0))));
        assert_eq!(phases.start_serving(Duration::ZERO, &mut watch), 0);
        phases.finish_serving();
        assert_eq!(phases.next_due(), Some((1, span(0, 1))));
        assert_eq!(
            phases.start_serving(Duration::from_micros(300), &mut watch),
            0
        );
        phases.finish_serving();
        assert_eq!(phases.next_due(), Some((0, span(1, 0))));

        // The shard wakes 45 ms late: two whole rounds are skipped (no burst) and each phase
        // reports the two packet times its calls missed, once.
        assert_eq!(
            phases.start_serving(Duration::from_millis(45), &mut watch),
            2
        );
        phases.finish_serving();
        assert_eq!(phases.next_due(), Some((1, span(3, 1))));
        assert_eq!(phases.start_serving(Duration::ZERO, &mut watch), 2);
        phases.finish_serving();

        // The call in phase 1 hangs up: it leaves when its phase's turn comes, before that
        // pass sends anything, and the emptied phase is not waited for after that.
        slots[PHASE_FILL].detached.store(true, Ordering::Release);
        assert_eq!(phases.next_due(), Some((0, span(4, 0))));
        assert_eq!(phases.start_serving(Duration::ZERO, &mut watch), 0);
        phases.finish_serving();
        assert_eq!(phases.next_due(), Some((1, span(4, 1))));
        assert_eq!(phases.start_serving(Duration::ZERO, &mut watch), 0);
        assert!(phases.groups[1].is_empty(), "dropped before the pass");
        assert_eq!(phases.len, PHASE_FILL);
        phases.finish_serving();
        assert_eq!(phases.next_due(), Some((0, span(5, 0))));
        assert_eq!(phases.start_serving(Duration::ZERO, &mut watch), 0);
        phases.finish_serving();

        // A new call goes to the phase with room; having been empty, the phase reports no
        // missed packet times for it.
        phases.place(loose_slot(&pool, 100), span(5, 3));
        assert_eq!(phases.groups[1].len(), 1);
        assert_eq!(phases.next_due(), Some((1, span(5, 1))));
        assert_eq!(phases.start_serving(Duration::ZERO, &mut watch), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_quiet_set_reports_only_sockets_with_input_and_lets_them_go() {
        use std::os::fd::AsRawFd;
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut set = linux::QuietSet::default();
        set.insert(a.as_raw_fd(), 1);
        set.insert(b.as_raw_fd(), 2);
        set.insert(c.as_raw_fd(), 3);
        let ready = |set: &mut linux::QuietSet| {
            let mut got = Vec::new();
            set.take_ready(|id| got.push(id));
            got.sort();
            got
        };
        assert!(ready(&mut set).is_empty(), "nothing arrived yet");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"x", b.local_addr().unwrap()).unwrap();
        peer.send_to(b"y", c.local_addr().unwrap()).unwrap();
        set.remove(3);
        assert_eq!(ready(&mut set), vec![2], "only b has input; c was removed");
        assert_eq!(set.len(), 1, "b left the set when it reported");
        peer.send_to(b"z", a.local_addr().unwrap()).unwrap();
        assert_eq!(ready(&mut set), vec![1]);
        assert_eq!(set.len(), 0);
        assert!(ready(&mut set).is_empty());
    }

    #[tokio::test]
    async fn a_silent_caller_is_reported_once() {
        let clock = MediaClock::start(1).unwrap();
        let pool = pool();
        let port = pool.allocate().unwrap();
        let session = MediaSession::new(Instant::now(), neg(), "127.0.0.1:9".parse().unwrap());
        let (_media, mut notes) =
            clock.attach(port, session, Duration::from_millis(100), Span::none());
        let n = tokio::time::timeout(Duration::from_secs(2), notes.recv()).await;
        assert_eq!(n.unwrap(), Some(MediaNote::NoMedia));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), notes.recv())
                .await
                .is_err(),
            "reported once"
        );
    }
}
