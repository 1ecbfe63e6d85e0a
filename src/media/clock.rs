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
//! shard of the calls and, every 20 ms on a fixed grid:
//!
//! 1. drain each call's socket with one `recvmmsg` (caller audio, RFC 4733 events: one system
//!    call per call per tick, no wake-up at all when nothing arrived),
//! 2. let its [`MediaSession`] write the next packet and send it (one `sendto`),
//! 3. tell the call's task only what it must act on ([`MediaNote`]: a key, the prompt queue
//!    ran dry, a second of recording to write, the recording ended, the caller went silent).
//!
//! No file or database work happens on these threads: a recording is metered here (silence,
//! length) and its samples handed to the call's task, which writes the file.
//!
//! The call task wakes for notes and signalling, not for packets. Every call in a shard is
//! served in the same order each tick, so each stream keeps a steady 20 ms spacing even when
//! the whole pass takes milliseconds. A shard that falls behind by whole packet times skips
//! them (the RTP timestamp jumps, [`MediaSession::skip_ticks`]) rather than sending a burst.
//!
//! A call's packets are read up to one tick after they arrive; a key press therefore reaches
//! the menu within 20 ms, and the prompt it starts goes out on the next tick.
//!
//! While a call is bridged to another leg (an operator, the 911 trunk), its task relays the
//! caller's packets itself the moment they arrive (relay latency matters in a conversation);
//! the clock leaves that socket alone and only watches for a silent caller.
//!
//! # Ownership
//!
//! [`MediaClock::attach`] moves the call's [`RtpPort`] and session into a shared slot and
//! returns the call's [`MediaHandle`] and note receiver. Dropping the handle detaches the
//! slot; its shard lets go of it at the next tick, and the port goes back to the pool then
//! (at most one packet time after the call ends). The threads stop when the clock is dropped.

use crate::media::ports::RtpPort;
use crate::media::record::{RecordState, VoiceMeter};
use crate::media::session::{MediaEvent, MediaSession, MAX_PACKET};
use std::io;
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn, Span};

/// One packet time.
pub const PTIME: Duration = Duration::from_millis(20);
/// Datagrams read from one socket per system call.
const BATCH: usize = 8;
/// Largest datagram we read (RTP from a phone is ~200 bytes; anything larger is not ours).
const MAX_DATAGRAM: usize = 2048;
/// Notes a call may have unread before the clock drops one (and logs it).
const NOTE_CAPACITY: usize = 64;
/// How often an idle shard (no calls) looks at its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// What the clock tells a call's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaNote {
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
}

/// A call's media state, shared between its task and its shard.
pub struct SlotState {
    pub media: MediaSession,
    /// The caller's recording while it runs: metered here, written by the call's task.
    tap: Option<Tap>,
    /// The call's task relays this port's packets itself (bridged to another leg).
    pub bridged: bool,
    record_ended: bool,
    no_media_reported: bool,
    logged_foreign: bool,
    logged_malformed: bool,
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
    /// Start recording the caller: samples are kept for [`SlotState::take_recorded`] and the
    /// meter decides when it ends ([`MediaNote::RecordingEnded`]).
    pub fn start_recording(&mut self, meter: VoiceMeter) {
        self.tap = Some(Tap {
            meter,
            pending: Vec::with_capacity(TAP_FLUSH + 160),
            asked: false,
        });
        self.record_ended = false;
    }

    /// Swap the samples recorded since the last call into `into` (which should be empty; its
    /// allocation is reused next time).
    pub fn take_recorded(&mut self, into: &mut Vec<i16>) {
        if let Some(t) = &mut self.tap {
            std::mem::swap(&mut t.pending, into);
            t.asked = false;
        }
    }

    /// Stop recording; the samples not yet taken go into `into`.
    pub fn stop_recording(&mut self, into: &mut Vec<i16>) {
        self.take_recorded(into);
        self.tap = None;
    }
}

struct Slot {
    state: Mutex<SlotState>,
    port: RtpPort,
    notes: mpsc::Sender<MediaNote>,
    detached: AtomicBool,
    no_media: Duration,
    /// The call's span, so what the clock logs is filed under the call.
    span: Span,
}

/// The call task's side of its slot.
pub struct MediaHandle {
    slot: Arc<Slot>,
}

impl MediaHandle {
    /// The call's media state (held briefly, never across an `.await`).
    pub fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The call's RTP port (for relaying while bridged).
    pub fn rtp_port(&self) -> &RtpPort {
        &self.slot.port
    }

    /// The call's RTP port number.
    pub fn port(&self) -> u16 {
        self.slot.port.port
    }
}

impl Drop for MediaHandle {
    fn drop(&mut self) {
        self.slot.detached.store(true, Ordering::Release);
    }
}

/// The shard threads.
pub struct MediaClock {
    shards: Mutex<Vec<std_mpsc::Sender<Arc<Slot>>>>,
    next: AtomicUsize,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl MediaClock {
    /// Start `shards` threads (at least one) at normal priority.
    pub fn start(shards: usize) -> io::Result<Arc<MediaClock>> {
        Self::start_with(shards, false)
    }

    /// Start `shards` threads (at least one), at real-time priority when `realtime` (and the
    /// process may; otherwise a warning and normal priority).
    pub fn start_with(shards: usize, realtime: bool) -> io::Result<Arc<MediaClock>> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for i in 0..shards.max(1) {
            let (tx, rx) = std_mpsc::channel();
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ivr311-media-{i}"))
                    .spawn(move || {
                        if realtime {
                            set_realtime(i);
                        }
                        run_shard(rx, stop)
                    })?,
            );
            senders.push(tx);
        }
        Ok(Arc::new(MediaClock {
            shards: Mutex::new(senders),
            next: AtomicUsize::new(0),
            stop,
            threads: Mutex::new(threads),
        }))
    }

    /// One shard per core.
    pub fn per_core() -> io::Result<Arc<MediaClock>> {
        Self::start(cores())
    }

    /// Hand a call's port and session to a shard.
    pub fn attach(
        &self,
        port: RtpPort,
        media: MediaSession,
        no_media: Duration,
        span: Span,
    ) -> (MediaHandle, mpsc::Receiver<MediaNote>) {
        let (tx, rx) = mpsc::channel(NOTE_CAPACITY);
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                media,
                tap: None,
                bridged: false,
                record_ended: false,
                no_media_reported: false,
                logged_foreign: false,
                logged_malformed: false,
            }),
            port,
            notes: tx,
            detached: AtomicBool::new(false),
            no_media,
            span,
        });
        let shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        if !shards.is_empty() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % shards.len();
            let _ = shards[i].send(slot.clone());
        }
        (MediaHandle { slot }, rx)
    }

    /// Stop the threads (calls still attached stop getting media).
    pub fn stop(&self) {
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
pub fn cores() -> usize {
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

/// One shard: tick every 20 ms on a fixed grid while it has calls.
fn run_shard(rx: std_mpsc::Receiver<Arc<Slot>>, stop: Arc<AtomicBool>) {
    let mut slots: Vec<Arc<Slot>> = Vec::new();
    let mut io = Box::new(Batch::new());
    let mut due = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if slots.is_empty() {
            match rx.recv_timeout(IDLE_POLL) {
                Ok(s) => {
                    slots.push(s);
                    due = Instant::now();
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            slots.push(s);
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let now = Instant::now();
        // Late by whole packet times (the machine stalled us): skip them, no burst.
        let missed = (now.saturating_duration_since(due).as_nanos() / PTIME.as_nanos()) as u32;
        due += PTIME * (missed + 1);
        slots.retain(|s| !s.detached.load(Ordering::Acquire));
        for s in &slots {
            s.tick(now, missed, &mut io);
        }
    }
}

impl Slot {
    fn note(&self, n: MediaNote) {
        if let Err(e) = self.notes.try_send(n) {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                self.span
                    .in_scope(|| warn!(note = ?n, "call is not reading its media notes; dropped"));
            }
        }
    }

    fn tick(&self, now: Instant, missed: u32, io: &mut Batch) {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *guard;
        if !st.bridged {
            if missed > 0 {
                st.media.skip_ticks(missed);
            }
            self.receive(st, now, io);
            let (n, ev) = st.media.on_tick(&mut io.out);
            if n > 0 {
                // Non-blocking: a full socket buffer drops the packet, as a late one would be.
                let _ = self.port.socket.send_to(&io.out[..n], st.media.remote());
            }
            if ev == Some(MediaEvent::PlayDone) {
                self.note(MediaNote::PlayDone {
                    stops: st.media.stops(),
                });
            }
            if let Some(tap) = &st.tap {
                if !st.record_ended && tap.meter.state(now) != RecordState::Recording {
                    st.record_ended = true;
                    self.note(MediaNote::RecordingEnded);
                }
            }
        }
        if !st.no_media_reported
            && now.saturating_duration_since(st.media.last_rx()) > self.no_media
        {
            st.no_media_reported = true;
            self.note(MediaNote::NoMedia);
        }
    }

    /// Read everything the caller sent since the last tick.
    fn receive(&self, st: &mut SlotState, now: Instant, io: &mut Batch) {
        loop {
            let n = match io.recv(&self.port.socket) {
                Ok(n) => n,
                Err(e) => {
                    self.span
                        .in_scope(|| debug!(error = %e, "RTP receive failed"));
                    return;
                }
            };
            for i in 0..n {
                let (buf, from) = io.packet(i);
                self.on_packet(st, now, from, buf);
            }
            if n < BATCH {
                return;
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
    #[cfg(target_os = "linux")]
    sys: linux::Headers,
}

impl Batch {
    fn new() -> Self {
        Batch {
            bufs: [[0; MAX_DATAGRAM]; BATCH],
            lens: [0; BATCH],
            froms: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            out: [0; MAX_PACKET],
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
                    self.froms[n] = from;
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

#[cfg(target_os = "linux")]
mod linux {
    //! `recvmmsg(2)`: the only unsafe code of the media path, kept to this module.
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
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
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
    use crate::config::PortRange;
    use crate::media::dtmf::TelephoneEvent;
    use crate::media::g711::Codec;
    use crate::media::ports::PortPool;
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
        let mut s = RtpStream::with_origin(9, seq, 4000);
        let ev = TelephoneEvent {
            event: 5,
            end,
            volume: 10,
            duration: 800,
        };
        let mut out = [0u8; 64];
        let n = s.write_at(101, 4000, seq == 1, &ev.write(), &mut out);
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
        for _ in 0..50 {
            if pool.available() == before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.available(), before);
        clock.stop();
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
