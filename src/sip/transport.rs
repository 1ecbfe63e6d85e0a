//! SIP transports: UDP and TCP on the same address, framing and parsing at the edge.
//!
//! Owns the SIP sockets. Every datagram or framed stream message is parsed here (through
//! [`crate::sip::message`]) and handed to the UA core as an [`Inbound`]; a request that cannot be
//! parsed but whose Via/From/To/Call-ID/CSeq survived gets a stateless error answer from here
//! (400 with a `Warning` saying why, 505, 416, 513), and nothing else happens. Garbage without
//! those headers is dropped. Responses that fail to parse are dropped. Every one is counted
//! (`TransportStats::malformed`, `ivr311_sip_messages_malformed`).
//!
//! Malformed messages are rate-limited per source, both their answers and their log lines,
//! because otherwise they are an amplifier: a spoofed UDP source can make the server answer
//! every datagram of a garbage flood (to a victim, at the server's bandwidth and CPU), and even
//! an unanswerable flood would write a log line per packet, filling disks and burying real
//! events. So (per IPv4 address or IPv6 /64, as `crate::sip::guard::RateLimiter` keys them):
//!
//! - error answers follow a token bucket, by default a burst of 50 and then 20 per second
//!   ([`TransportLimits::malformed_answers_burst`], `malformed_answers_per_second`); past it the
//!   request is not answered, only counted (`TransportStats::malformed_unanswered`,
//!   `ivr311_sip_malformed_unanswered`). A peer that sends the odd broken request (or the RFC
//!   4475 torture suite, one message at a time) is answered every time.
//! - the first malformed message of a source is logged (`warn`) with its reason; further ones
//!   within 10 s ([`TransportLimits::malformed_log_window`]) are not, and when the window is
//!   over one line says "N malformed messages from X suppressed in the last Ts"
//!   (`crate::sip::guard::LogThrottle`; a task checks once a second).
//!
//! Both tables hold at most `crate::sip::guard::MAX_SOURCES` sources (beyond that newcomers
//! share one bucket and one window). They sit behind one `std::sync::Mutex` in the
//! [`TransportHandle`], shared by the UDP and TCP readers and held only for the look-up.
//!
//! TCP connections are bounded, so that no peer can take the table (and with it the 911 route):
//!
//! - inbound connections (those peers open) at most [`TransportLimits::max_tcp_connections`],
//!   and at most [`TransportLimits::max_tcp_connections_per_source`] from one source (IPv4
//!   address or IPv6 /64) unless it is a trusted trunk ([`TransportLimits::trusted`]); further
//!   ones are closed at once, counted (`ivr311_sip_tcp_refused_total{limit}`) and logged once
//!   per source and window (`crate::sip::guard::ConnectionLimiter`);
//! - connections we open (`TransportHandle::connect_tcp`: `transport=tcp` 911 routes,
//!   trunks, call-backs) have a budget of the same size of their own, so peers holding every
//!   inbound slot cannot make a 911 bridge fail;
//! - a connection the far end sends no SIP message on for [`TransportLimits::tcp_idle`] is
//!   closed: CRLF keep-alives (RFC 5626) are consumed but are not activity, so a peer cannot
//!   hold a slot with them alone. A connection a dialog or an operator's registration runs over
//!   is kept (`TransportHandle::hold`).
//!
//! Sending goes through `TransportHandle::send` on a [`Flow`]: UDP sends to the flow's remote
//! address; TCP writes to the connection the flow names (each connection has a writer task with a
//! bounded queue).
//!
//! IPv6: bind `[::1]` (IPv6 only) or `[::]`. On `[::]` the sockets are dual-stack where the
//! system allows it, and IPv4 peers arrive as IPv4-mapped addresses (`::ffff:192.0.2.1`); they
//! are turned back into plain IPv4 addresses here, at the edge, so that everything above sees
//! one address per peer, and mapped again when sending.
//!
//! This module knows nothing of transactions, dialogs or calls.

use crate::metrics::Metrics;
use crate::sip::guard::{
    self, ConnRefusal, ConnectionLimiter, IpNet, LogThrottle, LogVerdict, RateLimiter, Suppressed,
};
use crate::sip::message::{self, Frame, Message, ParseError};
use crate::sockopt::{set_dscp, Dscp};
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Which transport a message travelled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    /// A WebSocket on the HTTP listener (RFC 7118): a browser's SIP.
    Ws,
    /// The same, reached through a reverse proxy that terminates TLS (`wss://`).
    Wss,
}

impl Transport {
    pub(crate) fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Ws => "WS",
            Transport::Wss => "WSS",
        }
    }

    /// Reliable transports do not need SIP-level retransmission of requests.
    pub(crate) fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// A WebSocket (a browser's): its far end is reached along the connection only, and its
    /// media is WebRTC.
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    /// A connection (TCP or WebSocket): `Flow::conn` names it.
    fn is_connection(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// A path to a peer: the transport, the remote address, and for TCP the connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub remote: SocketAddr,
    /// TCP connection id; 0 for UDP.
    pub conn: u64,
}

/// A parsed message and where it came from.
#[derive(Debug)]
pub struct Inbound {
    pub msg: Message,
    pub flow: Flow,
}

/// Transport limits.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// Largest message accepted on TCP (and UDP), in bytes.
    pub max_message_bytes: usize,
    /// Most simultaneous inbound TCP connections; the connections we open have a budget of
    /// this size of their own.
    pub max_tcp_connections: usize,
    /// Most simultaneous inbound TCP connections from one source not in `trusted`; 0: no limit.
    pub max_tcp_connections_per_source: usize,
    /// Sources exempt from `max_tcp_connections_per_source` (the trunks, `trunks.allow`).
    pub trusted: Vec<IpNet>,
    /// A TCP connection with no SIP message from the far end for this long is closed (unless
    /// held, see `TransportHandle::hold`); keep-alives do not count.
    pub tcp_idle: Duration,
    /// Error answers to malformed requests per second and source, after the burst; 0: no limit.
    pub malformed_answers_per_second: u32,
    /// Error answers one source may get at once.
    pub malformed_answers_burst: u32,
    /// After a source's first malformed message is logged, how long its further ones are only
    /// counted (then summarised in one line); zero logs every one.
    pub malformed_log_window: Duration,
    /// How SIP packets are marked (`qos.sip_dscp`; 0: unmarked). Set on the UDP socket and
    /// the TCP listener, whose accepted connections inherit it.
    pub dscp: Dscp,
    /// Where refused TCP connections are counted (`/metrics`); none: not counted.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            max_message_bytes: 64 * 1024,
            max_tcp_connections: 1024,
            max_tcp_connections_per_source: 64,
            trusted: Vec::new(),
            tcp_idle: Duration::from_secs(300),
            malformed_answers_per_second: 20,
            malformed_answers_burst: 50,
            malformed_log_window: Duration::from_secs(10),
            dscp: Dscp::CS3,
            metrics: None,
        }
    }
}

/// Counters read by the HTTP API.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub received: AtomicU64,
    pub malformed: AtomicU64,
    /// Malformed requests that would have been answered but were not: their source was over
    /// the error-answer rate limit.
    pub malformed_unanswered: AtomicU64,
    pub dropped: AtomicU64,
}

/// Per-source state of the reject path: error answers left, and log windows (for malformed
/// messages, and for refused TCP connections).
#[derive(Debug)]
struct RejectGuard {
    answers: RateLimiter,
    logs: LogThrottle,
    tcp_logs: LogThrottle,
}

/// Who opened a TCP connection: which budget it counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// A peer (counted in the inbound [`ConnectionLimiter`]).
    Peer,
    /// We did ([`TransportHandle::connect_tcp`]).
    Us,
}

/// What a TCP connection's task needs of the limits.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    max_message_bytes: usize,
    tcp_idle: Duration,
}

impl From<&TransportLimits> for StreamLimits {
    fn from(l: &TransportLimits) -> Self {
        StreamLimits {
            max_message_bytes: l.max_message_bytes,
            tcp_idle: l.tcp_idle,
        }
    }
}

/// What opening a TCP connection of our own needs: what the accept loop has.
struct Connector {
    limits: TransportLimits,
    inbound: mpsc::Sender<Inbound>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Connections we opened, by where they go: reused while open, and opened again when a
    /// request is sent after the last one closed.
    opened: DashMap<SocketAddr, u64>,
    /// Connections we opened that are open now (their own budget, `max_tcp_connections`).
    ours: AtomicUsize,
    /// Inbound connections, per source and in all. Locked only for the count.
    inbound_limits: Mutex<ConnectionLimiter>,
}

/// How long a TCP connection to a target may take to open before the request fails (a 911
/// route that does not answer must give way to the next one quickly).
pub(crate) const CONNECT_WITHIN: Duration = Duration::from_secs(2);

/// Connection ids, shared by accepted and opened connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Cloneable handle for sending.
#[derive(Clone)]
pub struct TransportHandle {
    udp: Arc<UdpSocket>,
    tcp: Arc<DashMap<u64, mpsc::Sender<Bytes>>>,
    /// TCP connections that carry a dialog, with how many: not closed for idleness
    /// ([`TransportHandle::hold`]).
    held: Arc<DashMap<u64, usize>>,
    connector: Arc<Connector>,
    local: SocketAddr,
    pub stats: Arc<TransportStats>,
    /// Locked briefly by [`reject`] and the summary task; never held across an `.await`.
    reject: Arc<Mutex<RejectGuard>>,
    /// Where a closed WebSocket's flow is reported ([`TransportHandle::lost_flows`]).
    lost: Arc<Mutex<Option<mpsc::Sender<Flow>>>>,
}

impl std::fmt::Debug for TransportHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportHandle")
            .field("local", &self.local)
            .field("tcp_connections", &self.tcp.len())
            .finish()
    }
}

impl TransportHandle {
    /// The address the SIP sockets are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A TCP flow to `remote` for requests we send to a `transport=tcp` target (RFC 3261
    /// §18.1.1): the connection we opened there before if it is still open, else a new one
    /// (at most [`CONNECT_WITHIN`] to open). It is read like an accepted connection, so the
    /// responses and the far end's requests come back along it, and closed after the same idle
    /// time.
    pub(crate) async fn connect_tcp(&self, remote: SocketAddr) -> std::io::Result<Flow> {
        let c = &self.connector;
        let flow = |conn| Flow {
            transport: Transport::Tcp,
            remote,
            conn,
        };
        if let Some(conn) = c.opened.get(&remote).map(|e| *e) {
            if self.tcp.contains_key(&conn) {
                return Ok(flow(conn));
            }
        }
        // Our own budget: peers' connections, however many, never stand in the way.
        if c.ours.fetch_add(1, Ordering::Relaxed) >= c.limits.max_tcp_connections {
            c.ours.fetch_sub(1, Ordering::Relaxed);
            return Err(std::io::Error::other(
                "too many TCP connections of our own open",
            ));
        }
        let opened = self.open_ours(remote).await;
        if opened.is_err() {
            c.ours.fetch_sub(1, Ordering::Relaxed);
        }
        opened
    }

    /// Open a TCP connection to `remote` (counted in `ours` by the caller) and start its task.
    async fn open_ours(&self, remote: SocketAddr) -> std::io::Result<Flow> {
        let c = &self.connector;
        let flow = |conn| Flow {
            transport: Transport::Tcp,
            remote,
            conn,
        };
        let stream = tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect(remote))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting took over {CONNECT_WITHIN:?}"),
                )
            })??;
        let _ = stream.set_nodelay(true);
        if c.limits.dscp.0 != 0 {
            let _ = set_dscp(&stream, remote.is_ipv6(), c.limits.dscp);
        }
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        // Registered before the first send can look for it.
        let rx = self.register(conn);
        c.opened.insert(remote, conn);
        c.tracker.spawn(tcp_connection(
            self.clone(),
            stream,
            rx,
            remote,
            conn,
            Opener::Us,
            StreamLimits::from(&c.limits),
            c.inbound.clone(),
            c.cancel.clone(),
        ));
        Ok(flow(conn))
    }

    /// [`TransportHandle::connect_tcp`] for [`TransportHandle::send`], boxed: sending may open
    /// a connection whose reader may send (an error answer), and the compiler needs the cycle
    /// cut with a type it knows to be `Send`.
    fn reconnect(
        &self,
        remote: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Flow>> + Send + '_>>
    {
        Box::pin(self.connect_tcp(remote))
    }

    /// A dialog (or an operator's registration) now runs over `flow`: if it is a TCP
    /// connection, keep it open however long it stays quiet, until
    /// [`TransportHandle::release`] (or the far end closes it).
    ///
    /// Why: a caller waiting in an operator queue, or talking to an operator, sends nothing on
    /// SIP for many minutes, and the idle timer (`limits.tcp_idle_seconds`) closed the
    /// connection under the call. A phone's connection cannot be opened again from our side
    /// (its port is ephemeral, its Contact usually behind NAT), so our BYE when the call ended
    /// here was dropped and the phone stayed in a dead call. Idle connections without a
    /// dialog are still closed, so a peer that opens many and walks away costs nothing.
    pub(crate) fn hold(&self, flow: &Flow) {
        if flow.transport.is_connection() && flow.conn != 0 {
            *self.held.entry(flow.conn).or_insert(0) += 1;
        }
    }

    /// A dialog over `flow` ended ([`TransportHandle::hold`]).
    pub(crate) fn release(&self, flow: &Flow) {
        if flow.transport.is_connection() && flow.conn != 0 {
            self.held.remove_if_mut(&flow.conn, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }

    /// Whether `flow` can be sent on as it is: UDP, or a TCP or WebSocket connection still open.
    pub(crate) fn is_open(&self, flow: &Flow) -> bool {
        flow.transport == Transport::Udp || (flow.conn != 0 && self.tcp.contains_key(&flow.conn))
    }

    /// Whether a dialog runs over TCP connection `conn`.
    fn is_held(&self, conn: u64) -> bool {
        self.held.contains_key(&conn)
    }

    /// Make connection `conn` reachable by [`TransportHandle::send`]; its writer reads the
    /// returned queue.
    fn register(&self, conn: u64) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        self.tcp.insert(conn, tx);
        rx
    }

    /// Send bytes along a flow. Errors are logged, not returned: SIP retransmission covers loss.
    pub(crate) async fn send(&self, flow: &Flow, data: Bytes) {
        match flow.transport {
            Transport::Udp => {
                let to = match (self.local, flow.remote) {
                    // An IPv4 peer of a dual-stack IPv6 socket is reached at its mapped address.
                    (SocketAddr::V6(_), SocketAddr::V4(a)) => {
                        SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
                    }
                    _ => flow.remote,
                };
                if let Err(e) = self.udp.send_to(&data, to).await {
                    debug!(remote = %flow.remote, error = %e, "udp send failed");
                }
            }
            Transport::Ws | Transport::Wss => {
                let tx = self.tcp.get(&flow.conn).map(|s| s.clone());
                match tx {
                    Some(tx) => {
                        if tx.try_send(data).is_err() {
                            warn!(remote = %flow.remote, "websocket backlogged or closed; message dropped");
                        }
                    }
                    // A browser's connection cannot be opened again from our side.
                    None => debug!(remote = %flow.remote, "websocket gone; message dropped"),
                }
            }
            Transport::Tcp => {
                let tx = self.tcp.get(&flow.conn).map(|s| s.clone());
                match tx {
                    Some(tx) => {
                        if tx.try_send(data).is_err() {
                            warn!(remote = %flow.remote, "tcp connection backlogged or closed; message dropped");
                        }
                    }
                    // A connection we opened to a target that closed (its idle time or ours:
                    // a 911 call outlasts both) is opened again for what we send next, as
                    // RFC 3261 §18.1.1 lets a client; the far end matches it by its dialog.
                    // In a task of its own: the UA task sends, and must not wait up to
                    // CONNECT_WITHIN on a far end that does not answer.
                    None if self.connector.opened.contains_key(&flow.remote) => {
                        let handle = self.clone();
                        let remote = flow.remote;
                        self.connector.tracker.spawn(async move {
                            match handle.reconnect(remote).await {
                                Ok(again) => match handle.tcp.get(&again.conn).map(|s| s.clone()) {
                                    Some(tx) if tx.try_send(data).is_ok() => {
                                        debug!(%remote, "tcp connection opened again")
                                    }
                                    _ => {
                                        warn!(%remote, "tcp connection opened again but closed at once; message dropped")
                                    }
                                },
                                Err(e) => {
                                    warn!(%remote, error = %e, "tcp connection gone and cannot be opened again; message dropped")
                                }
                            }
                        });
                    }
                    None => debug!(remote = %flow.remote, "tcp connection gone; message dropped"),
                }
            }
        }
    }
}

/// The local IP that routes to `remote` (a UDP connect picks the route; nothing is sent).
pub(crate) fn local_ip_towards(remote: IpAddr) -> Option<IpAddr> {
    let bind = if remote.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(SocketAddr::new(remote, 9)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Bind UDP and TCP on `addr` (port 0 picks one port free for both) and start the receive tasks.
pub async fn bind(
    addr: SocketAddr,
    limits: TransportLimits,
    inbound: mpsc::Sender<Inbound>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<TransportHandle> {
    let (udp, tcp) = bind_pair(addr).await?;
    let local = udp.local_addr()?;
    if limits.dscp.0 != 0 {
        let marked = set_dscp(&udp, local.is_ipv6(), limits.dscp)
            .and_then(|()| set_dscp(&tcp, local.is_ipv6(), limits.dscp));
        if let Err(e) = marked {
            warn!(error = %e, dscp = limits.dscp.0, "cannot mark SIP packets; sent unmarked");
        }
    }
    let udp = Arc::new(udp);
    let inbound_limits = ConnectionLimiter::new(
        limits.max_tcp_connections,
        limits.max_tcp_connections_per_source,
        limits.trusted.clone(),
    );
    let handle = TransportHandle {
        udp: udp.clone(),
        tcp: Arc::new(DashMap::new()),
        held: Arc::new(DashMap::new()),
        connector: Arc::new(Connector {
            limits: limits.clone(),
            inbound: inbound.clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
            opened: DashMap::new(),
            ours: AtomicUsize::new(0),
            inbound_limits: Mutex::new(inbound_limits),
        }),
        local,
        stats: Arc::new(TransportStats::default()),
        reject: Arc::new(Mutex::new(RejectGuard {
            answers: RateLimiter::new(
                limits.malformed_answers_per_second,
                limits.malformed_answers_burst,
                guard::MAX_SOURCES,
            ),
            logs: LogThrottle::new(limits.malformed_log_window, guard::MAX_SOURCES),
            tcp_logs: LogThrottle::new(limits.malformed_log_window, guard::MAX_SOURCES),
        })),
        lost: Arc::new(Mutex::new(None)),
    };
    tracker.spawn(summarise_suppressed(handle.clone(), cancel.clone()));
    tracker.spawn(udp_loop(
        handle.clone(),
        limits.max_message_bytes,
        inbound.clone(),
        cancel.clone(),
    ));
    tracker.spawn(tcp_accept_loop(
        handle.clone(),
        tcp,
        StreamLimits::from(&limits),
        inbound,
        tracker.clone(),
        cancel,
    ));
    Ok(handle)
}

/// What the SIP UDP socket asks of the kernel for its receive queue.
const SIP_RECEIVE_BUFFER: usize = 4 << 20;

/// Give the SIP UDP socket room for a burst: hundreds of INVITEs at once, or every peer's
/// retransmissions after the process was held up. With the kernel's default queue (208 KiB,
/// about 300 datagrams) a 1,500-call load run lost thousands of requests and answers on this
/// socket, each then costing the sender a retransmission timer (500 ms and up) of call setup.
/// The kernel caps the size at `net.core.rmem_max`; what was granted is logged.
fn grow_receive_buffer(udp: &UdpSocket) {
    use crate::sockopt::{get_int, set_int};
    use std::os::fd::AsRawFd;
    let fd = udp.as_raw_fd();
    let want = SIP_RECEIVE_BUFFER as libc::c_int;
    let asked = set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, want);
    let granted = get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF);
    debug!(asked = want, granted = ?granted.ok(), ok = asked.is_ok(), "SIP UDP receive buffer");
}

/// Bind UDP and TCP to the same port; with port 0, retry until one port is free for both.
async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last_err = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind(addr).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => {
                grow_receive_buffer(&udp);
                return Ok((udp, tcp));
            }
            Err(e) if addr.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no free port")))
}

async fn udp_loop(
    handle: TransportHandle,
    max_message_bytes: usize,
    inbound: mpsc::Sender<Inbound>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = handle.udp.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP port unreachable surfaces here on some platforms; keep serving.
                    debug!(error = %e, "udp recv error");
                    continue;
                }
            },
        };
        let data = &buf[..n];
        let remote = crate::sip::guard::canonical(remote);
        // Keep-alives (RFC 5626 CRLF) and stray empty datagrams.
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        handle.stats.received.fetch_add(1, Ordering::Relaxed);
        let flow = Flow {
            transport: Transport::Udp,
            remote,
            conn: 0,
        };
        match message::parse_datagram(data, max_message_bytes) {
            Ok(msg) => {
                if inbound.try_send(Inbound { msg, flow }).is_err() {
                    handle.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    debug!(%remote, "sip core backlogged; datagram dropped (peer will retransmit)");
                }
            }
            Err(e) => reject(&handle, &flow, e).await,
        }
    }
}

impl TransportHandle {
    /// Lock the reject path's per-source state (a panic elsewhere leaves it usable).
    fn reject_guard(&self) -> std::sync::MutexGuard<'_, RejectGuard> {
        self.reject.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Answer (or drop) a message that failed to parse, within its source's limits (module docs).
async fn reject(handle: &TransportHandle, flow: &Flow, e: ParseError) {
    handle.stats.malformed.fetch_add(1, Ordering::Relaxed);
    let status = e.status();
    let salvage = e.salvage.as_ref().filter(|s| s.method != "ACK");
    let ip = flow.remote.ip();
    let now = Instant::now();
    let (answer, log) = {
        let mut g = handle.reject_guard();
        let answer = salvage.is_some() && g.answers.allow(ip, now);
        (answer, g.logs.note(ip, now))
    };
    if salvage.is_some() && !answer {
        handle
            .stats
            .malformed_unanswered
            .fetch_add(1, Ordering::Relaxed);
    }
    if let LogVerdict::LogAfter(s) = &log {
        log_suppressed(s);
    }
    if log != LogVerdict::Quiet {
        match salvage {
            Some(s) if answer => {
                warn!(remote = %flow.remote, call_id = %s.call_id, status, reason = %e.kind, "malformed request answered")
            }
            Some(s) => {
                warn!(remote = %flow.remote, call_id = %s.call_id, status, reason = %e.kind, "malformed request not answered: source over its error-answer rate limit")
            }
            None => warn!(remote = %flow.remote, reason = %e.kind, "malformed message dropped"),
        }
    }
    if let (Some(s), true) = (salvage, answer) {
        let reason = match status {
            505 => "Version Not Supported",
            416 => "Unsupported URI Scheme",
            513 => "Message Too Large",
            _ => "Bad Request",
        };
        let tag = message::random_token(10);
        handle
            .send(flow, s.response(status, reason, &e.kind.to_string(), &tag))
            .await;
    }
}

/// The summary line of a log window that ended with malformed messages left unlogged.
fn log_suppressed(s: &Suppressed) {
    let from = s.from();
    let secs = s.over.as_secs_f64().round() as u64;
    warn!(
        source = %from,
        suppressed = s.count,
        "{} malformed messages from {from} suppressed in the last {secs}s",
        s.count
    );
}

/// Once a second, close the log windows that are over and log their summaries, so that the
/// last window of a flood is reported even when its source goes quiet.
async fn summarise_suppressed(handle: TransportHandle, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (done, tcp) = {
            let mut g = handle.reject_guard();
            (
                g.logs.sweep(Instant::now()),
                g.tcp_logs.sweep(Instant::now()),
            )
        };
        for s in &done {
            log_suppressed(s);
        }
        for s in &tcp {
            log_tcp_suppressed(s);
        }
    }
}

/// The summary line of a log window that ended with refused connections left unlogged.
fn log_tcp_suppressed(s: &Suppressed) {
    let from = s.from();
    let secs = s.over.as_secs_f64().round() as u64;
    warn!(
        source = %from,
        suppressed = s.count,
        "{} more TCP connections from {from} refused in the last {secs}s",
        s.count
    );
}

impl TransportHandle {
    /// Count an inbound connection from `remote`, or refuse it: counted in `/metrics`, logged
    /// once per source and window.
    fn admit_inbound(&self, remote: SocketAddr) -> bool {
        let ip = remote.ip();
        let refused = {
            let mut l = self
                .connector
                .inbound_limits
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            l.open(ip).err()
        };
        let Some(why) = refused else {
            return true;
        };
        if let Some(m) = &self.connector.limits.metrics {
            m.add(
                "ivr311_sip_tcp_refused_total",
                "Inbound SIP TCP connections closed at once: all inbound slots taken (total), or their source's (per_source).",
                &[("limit", why.label())],
                1,
            );
        }
        let log = self.reject_guard().tcp_logs.note(ip, Instant::now());
        if let LogVerdict::LogAfter(s) = &log {
            log_tcp_suppressed(s);
        }
        if log != LogVerdict::Quiet {
            match why {
                ConnRefusal::Total => {
                    warn!(%remote, "every inbound TCP slot is taken; connection refused")
                }
                ConnRefusal::PerSource => {
                    warn!(%remote, "too many TCP connections from this source; connection refused")
                }
            }
        }
        false
    }

    /// An inbound connection from `remote` closed.
    fn inbound_closed(&self, remote: SocketAddr) {
        self.connector
            .inbound_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .close(remote.ip());
    }
}

async fn tcp_accept_loop(
    handle: TransportHandle,
    listener: TcpListener,
    limits: StreamLimits,
    inbound: mpsc::Sender<Inbound>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let remote = crate::sip::guard::canonical(remote);
        if !handle.admit_inbound(remote) {
            drop(stream);
            continue;
        }
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let rx = handle.register(conn);
        tracker.spawn(tcp_connection(
            handle.clone(),
            stream,
            rx,
            remote,
            conn,
            Opener::Peer,
            limits,
            inbound.clone(),
            cancel.clone(),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
async fn tcp_connection(
    handle: TransportHandle,
    stream: TcpStream,
    mut rx: mpsc::Receiver<Bytes>,
    remote: SocketAddr,
    conn: u64,
    opener: Opener,
    limits: StreamLimits,
    inbound: mpsc::Sender<Inbound>,
    cancel: CancellationToken,
) {
    let (mut rd, mut wr) = stream.into_split();
    let flow = Flow {
        transport: Transport::Tcp,
        remote,
        conn,
    };
    let writer = handle.connector.tracker.spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let mut buf = BytesMut::with_capacity(8192);
    // The last SIP message from the far end (keep-alives are not activity).
    let mut active = tokio::time::Instant::now();
    'conn: loop {
        let read = tokio::select! {
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout_at(active + limits.tcp_idle, rd.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            // Idle: closed unless a call or a registration runs over it (see
            // `TransportHandle::hold`).
            Err(_) if handle.is_held(conn) => {
                active = tokio::time::Instant::now();
                continue;
            }
            Err(_) => {
                debug!(%remote, "tcp connection idle; closing");
                break;
            }
            Ok(Ok(_)) => {}
        }
        loop {
            match message::frame_stream(&buf, limits.max_message_bytes) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::KeepAlive(n)) => {
                    let _ = buf.split_to(n);
                }
                Ok(Frame::Complete(n)) => {
                    let bytes = buf.split_to(n).freeze();
                    active = tokio::time::Instant::now();
                    handle.stats.received.fetch_add(1, Ordering::Relaxed);
                    match message::parse_stream_message(&bytes, limits.max_message_bytes) {
                        Ok(msg) => {
                            if inbound.send(Inbound { msg, flow }).await.is_err() {
                                break 'conn;
                            }
                        }
                        Err(e) => reject(&handle, &flow, e).await,
                    }
                }
                Err(e) => {
                    // Framing is lost (oversize or bad Content-Length): answer if we can, close.
                    let head =
                        Bytes::copy_from_slice(&buf[..buf.len().min(limits.max_message_bytes)]);
                    let e = match message::parse_datagram(&head, usize::MAX) {
                        Err(mut pe) => {
                            pe.kind = e.kind;
                            pe
                        }
                        Ok(_) => e,
                    };
                    reject(&handle, &flow, e).await;
                    break 'conn;
                }
            }
        }
    }
    handle.tcp.remove(&conn);
    match opener {
        Opener::Peer => handle.inbound_closed(remote),
        Opener::Us => {
            handle.connector.ours.fetch_sub(1, Ordering::Relaxed);
        }
    }
    // Let queued responses drain before the socket closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    debug!(%remote, "tcp connection closed");
}

// ---- SIP over WebSocket (RFC 7118) ---------------------------------------------------------
//
// The HTTP server accepts the upgrade (`GET /sip`, subprotocol `sip`) and owns the socket; each
// frame it reads comes here, one SIP message per frame, and is parsed exactly as a UDP
// datagram is (same parser, same limits, same stateless 400s, same per-source error budget).
// The connection counts as an inbound connection (`limits.max_tcp_connections`, per source
// `limits.max_tcp_connections_per_source`), is closed after `limits.tcp_idle_seconds` with no
// SIP message unless a registration or a dialog runs over it, and its flow is a
// [`Transport::Ws`] (or [`Transport::Wss`] behind a TLS proxy) flow like a TCP connection's:
// what is sent to it goes back along the connection. When it closes, its flow is reported on
// [`TransportHandle::lost_flows`]: the UA logs out agents registered over it and ends the
// dialogs that ran over it after a grace period.

/// One browser's SIP-over-WebSocket connection, as the HTTP server hands it to SIP. Dropping
/// it closes the flow.
pub struct WsConn {
    handle: TransportHandle,
    flow: Flow,
    outgoing: mpsc::Receiver<Bytes>,
    /// When the far end last sent a SIP message.
    active: tokio::time::Instant,
    limits: StreamLimits,
}

impl std::fmt::Debug for WsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConn").field("flow", &self.flow).finish()
    }
}

impl TransportHandle {
    /// Take a WebSocket connection from `remote` (`secure`: the browser reached us over TLS,
    /// through a proxy), if the inbound connection limits leave room; `None` refuses it (counted
    /// and logged as a refused TCP connection).
    pub fn open_websocket(&self, remote: SocketAddr, secure: bool) -> Option<WsConn> {
        let remote = guard::canonical(remote);
        if !self.admit_inbound(remote) {
            return None;
        }
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let outgoing = self.register(conn);
        let flow = Flow {
            transport: if secure {
                Transport::Wss
            } else {
                Transport::Ws
            },
            remote,
            conn,
        };
        debug!(%remote, conn, "SIP websocket open");
        Some(WsConn {
            handle: self.clone(),
            flow,
            outgoing,
            active: tokio::time::Instant::now(),
            limits: StreamLimits::from(&self.connector.limits),
        })
    }

    /// The largest SIP message taken (`limits.max_message_bytes`): a WebSocket frame's bound.
    pub fn max_message_bytes(&self) -> usize {
        self.connector.limits.max_message_bytes
    }

    /// Closed WebSocket flows, in order; the UA core takes this once, before it runs. (A
    /// second call takes the reports from the first.)
    pub(crate) fn lost_flows(&self) -> mpsc::Receiver<Flow> {
        let (tx, rx) = mpsc::channel(self.connector.limits.max_tcp_connections.max(16));
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }
}

/// What one WebSocket frame from a browser carries (RFC 7118 §5: one SIP message per frame,
/// no framing by Content-Length across frames): `None` for a keep-alive (whitespace only, as
/// CRLF pings are), else the message as the datagram parser reads it, no larger than `limit`.
pub fn ws_frame(data: &[u8], limit: usize) -> Option<Result<Message, message::ParseError>> {
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(message::parse_datagram(data, limit))
}

impl WsConn {
    pub fn flow(&self) -> Flow {
        self.flow
    }

    /// The next message for the browser (each one frame). `None` once nothing more can come.
    pub async fn outgoing(&mut self) -> Option<Bytes> {
        self.outgoing.recv().await
    }

    /// One frame from the browser: a SIP message for the UA core, or a stateless error answer;
    /// CRLF keep-alives are taken and are not activity. `false`: the UA core is gone, close.
    pub async fn on_frame(&mut self, data: &[u8]) -> bool {
        let Some(parsed) = ws_frame(data, self.limits.max_message_bytes) else {
            return true;
        };
        self.active = tokio::time::Instant::now();
        let h = &self.handle;
        h.stats.received.fetch_add(1, Ordering::Relaxed);
        match parsed {
            Ok(msg) => {
                let inbound = Inbound {
                    msg,
                    flow: self.flow,
                };
                h.connector.inbound.send(inbound).await.is_ok()
            }
            Err(e) => {
                reject(h, &self.flow, e).await;
                true
            }
        }
    }

    /// When the connection is to close for want of SIP messages, unless it is held (a
    /// registration or a dialog runs over it): then it is asked again a full idle time later.
    pub fn idle_at(&mut self) -> tokio::time::Instant {
        if self.handle.is_held(self.flow.conn) {
            let now = tokio::time::Instant::now();
            if self.active + self.limits.tcp_idle <= now {
                self.active = now;
            }
        }
        self.active + self.limits.tcp_idle
    }

    /// Whether the idle time is up now (see [`WsConn::idle_at`]).
    pub fn idle(&mut self) -> bool {
        self.idle_at() <= tokio::time::Instant::now()
    }
}

impl Drop for WsConn {
    fn drop(&mut self) {
        let h = &self.handle;
        h.tcp.remove(&self.flow.conn);
        h.held.remove(&self.flow.conn);
        h.inbound_closed(self.flow.remote);
        debug!(remote = %self.flow.remote, conn = self.flow.conn, "SIP websocket closed");
        let tx = h
            .lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(tx) = tx {
            if tx.try_send(self.flow).is_err() {
                warn!(remote = %self.flow.remote, "websocket closed but the UA core was not told (backlogged)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockopt::dscp_of;

    #[tokio::test]
    async fn sip_over_udp_and_accepted_tcp_connections_carry_the_configured_dscp() {
        let (tx, _rx) = mpsc::channel(8);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let limits = TransportLimits {
            dscp: Dscp(40),
            ..TransportLimits::default()
        };
        let t = bind(
            "127.0.0.1:0".parse().unwrap(),
            limits,
            tx,
            &tracker,
            cancel.clone(),
        )
        .await
        .unwrap();
        assert_eq!(dscp_of(&*t.udp), 40);
        // The listener is marked the same way; Linux copies that to each connection it
        // accepts (checked here on a listener of our own, since the loop owns the real one).
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        set_dscp(&l, false, Dscp(40)).unwrap();
        let addr = l.local_addr().unwrap();
        let (accepted, _client) = tokio::join!(l.accept(), TcpStream::connect(addr));
        assert_eq!(dscp_of(&accepted.unwrap().0), 40);
        cancel.cancel();
    }
}
