//! Who may talk to the SIP core, and how often: source networks ([`IpNet`], for the trunk
//! allow-list), per-source token buckets (`RateLimiter`, for floods of OPTIONS, REGISTER and
//! other out-of-dialog requests, and for the transport's answers to malformed messages),
//! per-source log windows (`LogThrottle`, one log line per source and window for a flood of
//! garbage), per-source limits on new calls from untrusted sources (`CallLimiter`: calls at
//! once and INVITE rate), per-source caps on inbound TCP connections (`ConnectionLimiter`)
//! and the User-Agent names of known SIP scanners.
//!
//! Sans-IO: the UA core (or the transport) passes the source address and the time in and gets a
//! yes or no back. Nothing here answers, logs per packet or reads a clock.

use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// An IP network: an address and a prefix length (`203.0.113.0/24`, `2001:db8::/32`). A bare
/// address is a network of one (`/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a network did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("prefix length {0:?} is not a number from 0 to {1}")]
    Prefix(String, u8),
}

impl IpNet {
    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, as a
    /// dual-stack socket reports IPv4 peers) counts as the IPv4 address it carries.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| IpNetError::Address(addr.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| IpNetError::Prefix(p.to_owned(), max))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether `ip` is in any of `nets`; an empty list allows everyone.
pub fn allowed(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.is_empty() || nets.iter().any(|n| n.contains(ip))
}

/// User-Agent names of SIP scanning and password-guessing tools (matched case-insensitively
/// anywhere in the header). No phone, PBX or monitoring probe calls itself any of these.
const SCANNER_AGENTS: &[&str] = &[
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sundayddr",
    "iwar",
    "sivus",
];

/// Whether this User-Agent value names a known SIP scanner.
pub(crate) fn is_scanner(user_agent: &str) -> bool {
    let ua = user_agent.to_ascii_lowercase();
    SCANNER_AGENTS.iter().any(|s| ua.contains(s))
}

/// The unit a rate limit applies to: an IPv4 address, or an IPv6 /64 (one site or one
/// subscriber holds a whole /64, so per-address buckets would be no limit at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(Ipv4Addr),
    V6Net([u16; 4]),
}

/// `192.0.2.1`, or `2001:db8:1:2::/64`.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(a) => write!(f, "{a}"),
            Source::V6Net([a, b, c, d]) => {
                let net = std::net::Ipv6Addr::new(*a, *b, *c, *d, 0, 0, 0, 0);
                write!(f, "{net}/64")
            }
        }
    }
}

impl Source {
    /// The source `ip` belongs to (an IPv4-mapped address is its IPv4 address).
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(a) => Source::V4(a),
            IpAddr::V6(a) => {
                let s = a.segments();
                Source::V6Net([s[0], s[1], s[2], s[3]])
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most sources with a bucket of their own.
pub(crate) const MAX_SOURCES: usize = 10_000;
/// How often, at most, a full table is swept for buckets that have refilled.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Whether a table's sweep, last run at `last`, is due at `now` (at most every
/// [`PRUNE_EVERY`]); if so `last` becomes `now`.
fn sweep_due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < PRUNE_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// Token buckets per source: each source may send `burst` requests at once, then `rate` per
/// second. A source that has been quiet long enough to refill is forgotten, so the table holds
/// only sources active in the last `burst / rate` seconds, and never more than `max_sources`.
/// When it is full of active sources (a flood from very many addresses), new sources share
/// one overflow bucket: the flood as a whole gets `rate` per second, and the sources already
/// known keep theirs.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: HashMap<Source, Bucket>,
    overflow: Option<Bucket>,
    last_prune: Option<Instant>,
}

impl RateLimiter {
    /// `rate` requests per second after a burst of `burst`; a rate of 0 turns limiting off.
    pub(crate) fn new(rate: u32, burst: u32, max_sources: usize) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
            overflow: None,
            last_prune: None,
        }
    }

    /// Whether a request from `ip` at `now` is within its source's limit (and count it).
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        let src = Source::of(ip);
        if let Some(b) = self.buckets.get_mut(&src) {
            b.refill(now, rate, burst);
            return b.take();
        }
        if self.buckets.len() >= self.max_sources {
            self.prune(now);
        }
        if self.buckets.len() >= self.max_sources {
            let b = self.overflow.get_or_insert(Bucket {
                tokens: burst,
                at: now,
            });
            b.refill(now, rate, burst);
            return b.take();
        }
        let mut b = Bucket {
            tokens: burst,
            at: now,
        };
        let ok = b.take();
        self.buckets.insert(src, b);
        ok
    }

    /// Forget sources whose bucket is full again (they are as good as new).
    fn prune(&mut self, now: Instant) {
        if !sweep_due(&mut self.last_prune, now) {
            return;
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + dt * rate < burst
        });
    }

    /// Sources with a bucket of their own.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Whole seconds until an empty bucket holds a token again (at least 1).
    pub(crate) fn seconds_to_token(&self) -> u32 {
        if self.rate <= 0.0 {
            return 1;
        }
        (1.0 / self.rate).ceil().clamp(1.0, 3600.0) as u32
    }
}

/// One log window of a source: when it opened and how many events in it were not logged.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    suppressed: u64,
}

impl Window {
    fn open(now: Instant) -> Window {
        Window {
            start: now,
            suppressed: 0,
        }
    }
}

/// Events of one source (or of the overflow) that were not logged in a window now over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Suppressed {
    /// `None`: sources that arrived while the table was full, counted together.
    pub source: Option<Source>,
    pub count: u64,
    /// From the start of the window to when it was found over.
    pub over: Duration,
}

impl Suppressed {
    /// The source for a log line: its address or /64, or `other sources` for the overflow.
    pub(crate) fn from(&self) -> String {
        match self.source {
            Some(s) => s.to_string(),
            None => "other sources".to_owned(),
        }
    }
}

/// What to do with the log line of one event ([`LogThrottle::note`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogVerdict {
    /// Log it: the first of its source in a new window.
    Log,
    /// Log it, after one summary line for the window before, which ended with events unlogged.
    LogAfter(Suppressed),
    /// Do not log it; it is counted for the window's summary.
    Quiet,
}

/// Per-source log windows: the first event of a source is logged, further ones within `window`
/// are only counted, and when the window is over (the source's next event, or
/// [`LogThrottle::sweep`], whichever comes first) one summary says how many were left out. A
/// flood from one source thus costs two log lines per window, not one per packet.
///
/// Bounded like [`RateLimiter`]: at most `max_sources` windows; when the table is full of open
/// windows, newcomers share one overflow window (logged as "other sources"). [`sweep`] is meant
/// to be called every second or so; it closes windows that are over and returns their
/// summaries. A window of zero turns throttling off (every event is logged).
///
/// [`sweep`]: LogThrottle::sweep
#[derive(Debug)]
pub(crate) struct LogThrottle {
    window: Duration,
    max_sources: usize,
    windows: HashMap<Source, Window>,
    overflow: Option<Window>,
    last_prune: Option<Instant>,
}

impl LogThrottle {
    pub(crate) fn new(window: Duration, max_sources: usize) -> LogThrottle {
        LogThrottle {
            window,
            max_sources: max_sources.max(1),
            windows: HashMap::new(),
            overflow: None,
            last_prune: None,
        }
    }

    /// An event from `ip` at `now`: whether to log it (and a summary of the window before).
    pub(crate) fn note(&mut self, ip: IpAddr, now: Instant) -> LogVerdict {
        if self.window.is_zero() {
            return LogVerdict::Log;
        }
        let src = Source::of(ip);
        let window = self.window;
        if let Some(w) = self.windows.get_mut(&src) {
            return step(w, Some(src), now, window);
        }
        if self.windows.len() >= self.max_sources {
            self.prune(now);
        }
        if self.windows.len() >= self.max_sources {
            return match &mut self.overflow {
                Some(w) => step(w, None, now, window),
                None => {
                    self.overflow = Some(Window::open(now));
                    LogVerdict::Log
                }
            };
        }
        self.windows.insert(src, Window::open(now));
        LogVerdict::Log
    }

    /// Close every window that is over at `now`; the summaries of those with events unlogged.
    pub(crate) fn sweep(&mut self, now: Instant) -> Vec<Suppressed> {
        let window = self.window;
        let mut out = Vec::new();
        let mut close = |source: Option<Source>, w: &Window| {
            let age = now.saturating_duration_since(w.start);
            if age < window {
                return false;
            }
            if w.suppressed > 0 {
                out.push(Suppressed {
                    source,
                    count: w.suppressed,
                    over: age,
                });
            }
            true
        };
        self.windows.retain(|s, w| !close(Some(*s), w));
        if self.overflow.as_ref().is_some_and(|w| close(None, w)) {
            self.overflow = None;
        }
        out
    }

    /// Forget windows that are over with nothing unlogged (a table left unswept stays usable).
    fn prune(&mut self, now: Instant) {
        if !sweep_due(&mut self.last_prune, now) {
            return;
        }
        let window = self.window;
        self.windows
            .retain(|_, w| w.suppressed > 0 || now.saturating_duration_since(w.start) < window);
    }

    /// Sources with a window of their own.
    pub(crate) fn tracked(&self) -> usize {
        self.windows.len()
    }
}

/// One event in window `w`: counted if the window is open, else a new window starts with it.
fn step(w: &mut Window, source: Option<Source>, now: Instant, window: Duration) -> LogVerdict {
    let age = now.saturating_duration_since(w.start);
    if age < window {
        w.suppressed += 1;
        return LogVerdict::Quiet;
    }
    let before = std::mem::replace(w, Window::open(now));
    if before.suppressed == 0 {
        LogVerdict::Log
    } else {
        LogVerdict::LogAfter(Suppressed {
            source,
            count: before.suppressed,
            over: age,
        })
    }
}

/// Which per-source limit refused a new call ([`CallLimiter::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallLimit {
    /// The source already has `max_calls_per_source` calls up (or being set up).
    Concurrent,
    /// The source is past its INVITE rate (`invites_per_second` after `invites_burst`).
    Rate,
}

impl CallLimit {
    /// The label in `/metrics`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            CallLimit::Concurrent => "calls_per_source",
            CallLimit::Rate => "invite_rate",
        }
    }
}

/// What [`CallLimiter::admit`] says about a new INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallVerdict {
    /// Take the call; it now counts against its source until [`CallLimiter::ended`].
    Admit,
    /// Refuse it with 503 and this `Retry-After` (seconds), if `answer` (else drop it: the
    /// source is past the refusals it gets answered, so a spoofed flood is not reflected at
    /// whoever owns the address); `log` says whether to log it.
    Refuse {
        limit: CallLimit,
        retry_after: u32,
        answer: bool,
        log: LogVerdict,
    },
}

/// Refusals (503) one source gets answered at once, then [`REFUSALS_PER_SECOND`].
pub(crate) const REFUSALS_BURST: u32 = 20;
/// Refusals answered per second and source after [`REFUSALS_BURST`].
pub(crate) const REFUSALS_PER_SECOND: u32 = 5;
/// Retry-After of a refusal for too many calls from one source, seconds.
pub(crate) const RETRY_AFTER_CONCURRENT: u32 = 10;

/// Per-source limits on new calls from sources that are not trusted trunks: at most
/// `max_per_source` calls at once per source, and INVITEs at `rate` per second after a burst
/// of `burst` ([`RateLimiter`]). Sources are IPv4 addresses or IPv6 /64s ([`Source`]).
///
/// A refused INVITE is answered (503 with Retry-After) within a bucket of its own per source
/// ([`REFUSALS_BURST`], [`REFUSALS_PER_SECOND`]), and logged once per source and window
/// ([`LogThrottle`], summaries from [`CallLimiter::sweep`]).
///
/// Bounded: a source has an entry in the concurrency table only while it has calls (each of
/// which is a dialog the UA core holds); the buckets and log windows are bounded as their
/// types are.
#[derive(Debug)]
pub(crate) struct CallLimiter {
    max_per_source: usize,
    rate: RateLimiter,
    active: HashMap<Source, usize>,
    answers: RateLimiter,
    logs: LogThrottle,
}

impl CallLimiter {
    /// `max_per_source` 0 and `rate` 0 each turn their limit off.
    pub(crate) fn new(max_per_source: usize, rate: u32, burst: u32, log_window: Duration) -> Self {
        CallLimiter {
            max_per_source,
            rate: RateLimiter::new(rate, burst, MAX_SOURCES),
            active: HashMap::new(),
            answers: RateLimiter::new(REFUSALS_PER_SECOND, REFUSALS_BURST, MAX_SOURCES),
            logs: LogThrottle::new(log_window, MAX_SOURCES),
        }
    }

    /// A new INVITE from `ip` at `now`: admit it (and count it), or refuse it.
    pub(crate) fn admit(&mut self, ip: IpAddr, now: Instant) -> CallVerdict {
        let src = Source::of(ip);
        let busy = self.active.get(&src).copied().unwrap_or(0);
        let limit = if self.max_per_source > 0 && busy >= self.max_per_source {
            Some(CallLimit::Concurrent)
        } else if !self.rate.allow(ip, now) {
            Some(CallLimit::Rate)
        } else {
            None
        };
        match limit {
            None => {
                *self.active.entry(src).or_insert(0) += 1;
                CallVerdict::Admit
            }
            Some(limit) => CallVerdict::Refuse {
                limit,
                retry_after: match limit {
                    CallLimit::Concurrent => RETRY_AFTER_CONCURRENT,
                    CallLimit::Rate => self.rate.seconds_to_token(),
                },
                answer: self.answers.allow(ip, now),
                log: self.logs.note(ip, now),
            },
        }
    }

    /// A call [`CallLimiter::admit`] let in from `ip` is over.
    pub(crate) fn ended(&mut self, ip: IpAddr) {
        let src = Source::of(ip);
        if let Some(n) = self.active.get_mut(&src) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.active.remove(&src);
            }
        }
    }

    /// Calls up from the source of `ip`.
    pub(crate) fn active(&self, ip: IpAddr) -> usize {
        self.active.get(&Source::of(ip)).copied().unwrap_or(0)
    }

    /// Close the log windows that are over (see [`LogThrottle::sweep`]).
    pub(crate) fn sweep(&mut self, now: Instant) -> Vec<Suppressed> {
        self.logs.sweep(now)
    }

    /// Whether any log window is open (a sweep is then due later).
    pub(crate) fn has_log_windows(&self) -> bool {
        self.logs.tracked() > 0
    }
}

/// Why an inbound TCP connection was refused ([`ConnectionLimiter::open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnRefusal {
    /// Every inbound slot (`max_tcp_connections`) is taken.
    Total,
    /// The source has `max_tcp_connections_per_source` open already.
    PerSource,
}

impl ConnRefusal {
    /// The label in `/metrics`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ConnRefusal::Total => "total",
            ConnRefusal::PerSource => "per_source",
        }
    }
}

/// Inbound TCP connections: at most `max_total`, and at most `max_per_source` from one source
/// (an IPv4 address or an IPv6 /64) unless the source is in `trusted` (the trunks' networks,
/// which may open many). Connections we open ourselves are not counted here.
#[derive(Debug)]
pub(crate) struct ConnectionLimiter {
    max_total: usize,
    max_per_source: usize,
    trusted: Vec<IpNet>,
    total: usize,
    per_source: HashMap<Source, usize>,
}

impl ConnectionLimiter {
    /// `max_per_source` 0: no per-source limit.
    pub(crate) fn new(max_total: usize, max_per_source: usize, trusted: Vec<IpNet>) -> Self {
        ConnectionLimiter {
            max_total,
            max_per_source,
            trusted,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    /// Count a connection from `ip`, or say why not.
    pub(crate) fn open(&mut self, ip: IpAddr) -> Result<(), ConnRefusal> {
        if self.total >= self.max_total {
            return Err(ConnRefusal::Total);
        }
        let src = Source::of(ip);
        let n = self.per_source.get(&src).copied().unwrap_or(0);
        let trusted = self.trusted.iter().any(|t| t.contains(ip));
        if self.max_per_source > 0 && n >= self.max_per_source && !trusted {
            return Err(ConnRefusal::PerSource);
        }
        self.per_source.insert(src, n + 1);
        self.total += 1;
        Ok(())
    }

    /// A connection [`ConnectionLimiter::open`] counted is closed.
    pub(crate) fn close(&mut self, ip: IpAddr) {
        let src = Source::of(ip);
        if let Some(n) = self.per_source.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&src);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Inbound connections open.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.total
    }
}

/// Turn an IPv4-mapped IPv6 socket address into the IPv4 one it stands for.
pub(crate) fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "203.0.113.0/24".parse().unwrap();
        assert!(n.contains(ip("203.0.113.77")));
        assert!(!n.contains(ip("203.0.114.1")));
        assert!(n.contains(ip("::ffff:203.0.113.9")), "mapped IPv4 counts");
        assert!(!n.contains(ip("2001:db8::1")));
        let one: IpNet = "127.0.0.2".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.2/32");
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.1")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        let lo: IpNet = "[::1]/128".parse().unwrap();
        assert!(lo.contains(ip("::1")));
        let odd: IpNet = "10.0.0.0/9".parse().unwrap();
        assert!(odd.contains(ip("10.127.255.255")) && !odd.contains(ip("10.128.0.0")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("198.51.100.1")) && !all.contains(ip("::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("example.com/24".parse::<IpNet>().is_err());
        assert!("10.0.0.0/x".parse::<IpNet>().is_err());
        assert!(allowed(&[], ip("192.0.2.1")));
        assert!(!allowed(&[one], ip("192.0.2.1")));
    }

    #[test]
    fn scanners_are_recognised() {
        assert!(is_scanner("friendly-scanner"));
        assert!(is_scanner("SIPVicious 0.3.4"));
        assert!(!is_scanner("Linphone/5.2.0 (belle-sip/5.2.0)"));
        assert!(!is_scanner("baresip v1.0.0 (x86_64/linux)"));
    }

    #[test]
    fn a_burst_then_the_rate_on_virtual_time() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(2, 5, 100);
        let a = ip("192.0.2.1");
        let answered = (0..20).filter(|_| l.allow(a, t0)).count();
        assert_eq!(answered, 5, "the burst, and nothing more at one instant");
        // Half a second later one more token (2 per second).
        let t = t0 + Duration::from_millis(500);
        assert!(l.allow(a, t));
        assert!(!l.allow(a, t));
        // Another source is not affected.
        assert!(l.allow(ip("192.0.2.2"), t));
        // Steady 2 per second for a minute: all allowed; 3 per second: a third dropped.
        let mut ok = 0;
        for i in 1..=120u64 {
            if l.allow(a, t + Duration::from_millis(500 * i)) {
                ok += 1;
            }
        }
        assert_eq!(ok, 120);
        let t = t + Duration::from_secs(600);
        let mut ok = 0;
        for i in 1..=180u64 {
            if l.allow(a, t + Duration::from_millis(1000 * i / 3)) {
                ok += 1;
            }
        }
        // 60 s at 2/s, plus the refilled burst of 5.
        assert!((120..=126).contains(&ok), "{ok}");
    }

    #[test]
    fn a_monitor_pinging_every_few_seconds_is_never_limited() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10, 40, 100);
        for i in 0..10_000u64 {
            assert!(l.allow(ip("198.51.100.9"), t0 + Duration::from_secs(2 * i)));
        }
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 2, 100);
        assert!(l.allow(ip("2001:db8:1:2::1"), t0));
        assert!(l.allow(ip("2001:db8:1:2::ffff"), t0));
        assert!(!l.allow(ip("2001:db8:1:2:abcd::9"), t0));
        assert!(l.allow(ip("2001:db8:1:3::1"), t0));
        // A mapped IPv4 peer is the IPv4 source.
        assert!(l.allow(ip("192.0.2.7"), t0));
        assert!(l.allow(ip("::ffff:192.0.2.7"), t0));
        assert!(!l.allow(ip("192.0.2.7"), t0));
    }

    #[test]
    fn rate_zero_is_no_limit() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(0, 0, 1);
        assert!((0..1000).all(|_| l.allow(ip("192.0.2.1"), t0)));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_a_crowd_shares_one_bucket() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 3, 50);
        for i in 0..50u32 {
            assert!(l.allow(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0));
        }
        assert_eq!(l.tracked(), 50);
        // The table is full of active sources: newcomers share the overflow bucket.
        let newcomers = (0..100u32)
            .filter(|i| l.allow(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), t0))
            .count();
        assert_eq!(newcomers, 3);
        assert_eq!(l.tracked(), 50);
        // Known sources keep their own bucket meanwhile.
        assert!(l.allow(IpAddr::V4(Ipv4Addr::from(0x0a00_0000)), t0));
        // Once the crowd has been quiet long enough to refill, its entries are forgotten and a
        // newcomer gets its own bucket again.
        let later = t0 + Duration::from_secs(10);
        assert!(l.allow(ip("203.0.113.1"), later));
        assert!(l.tracked() <= 2, "{}", l.tracked());
    }

    #[test]
    fn a_flood_logs_once_per_window_then_a_summary() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut t = LogThrottle::new(w, 100);
        let a = ip("192.0.2.1");
        assert_eq!(t.note(a, t0), LogVerdict::Log);
        let quiet = (1..1000u64)
            .map(|i| t.note(a, t0 + Duration::from_millis(i)))
            .filter(|v| *v == LogVerdict::Quiet)
            .count();
        assert_eq!(quiet, 999, "the rest of the window is only counted");
        // Another source has its own window.
        assert_eq!(t.note(ip("192.0.2.2"), t0), LogVerdict::Log);
        // The next event after the window: logged, after the summary of the one before.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            t.note(a, later),
            LogVerdict::LogAfter(Suppressed {
                source: Some(Source::of(a)),
                count: 999,
                over: Duration::from_secs(11),
            })
        );
        assert_eq!(t.note(a, later), LogVerdict::Quiet);
        // The sweep closes windows that are over: a's new one has one event to report, b's
        // has none; the table is empty afterwards and the next event is logged again.
        assert_eq!(t.sweep(later + Duration::from_secs(5)), vec![]);
        let done = t.sweep(later + w);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].from().as_str(), done[0].count), ("192.0.2.1", 1));
        assert_eq!(t.tracked(), 0);
        assert_eq!(t.note(a, later + w), LogVerdict::Log);
    }

    #[test]
    fn log_windows_are_bounded_and_ipv6_counts_per_slash_64() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(10), 3);
        assert_eq!(t.note(ip("2001:db8:1:2::1"), t0), LogVerdict::Log);
        assert_eq!(t.note(ip("2001:db8:1:2::9"), t0), LogVerdict::Quiet);
        assert_eq!(t.note(ip("192.0.2.7"), t0), LogVerdict::Log);
        assert_eq!(t.note(ip("::ffff:192.0.2.7"), t0), LogVerdict::Quiet);
        assert_eq!(t.note(ip("192.0.2.8"), t0), LogVerdict::Log);
        // Full: newcomers share one window.
        assert_eq!(t.note(ip("198.51.100.1"), t0), LogVerdict::Log);
        assert_eq!(t.note(ip("198.51.100.2"), t0), LogVerdict::Quiet);
        assert_eq!(t.note(ip("198.51.100.3"), t0), LogVerdict::Quiet);
        assert_eq!(t.tracked(), 3);
        let done = t.sweep(t0 + Duration::from_secs(10));
        let seen: Vec<(String, u64)> = done.iter().map(|s| (s.from(), s.count)).collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen.contains(&("2001:db8:1:2::/64".to_owned(), 1)),
            "{seen:?}"
        );
        assert!(seen.contains(&("192.0.2.7".to_owned(), 1)), "{seen:?}");
        assert!(seen.contains(&("other sources".to_owned(), 2)), "{seen:?}");
        assert_eq!(t.tracked(), 0);
        // Unswept windows with nothing to report make room for newcomers once over.
        let t1 = t0 + Duration::from_secs(20);
        for i in 0..3u32 {
            assert_eq!(t.note(IpAddr::V4(Ipv4Addr::from(i)), t1), LogVerdict::Log);
        }
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(t.note(ip("203.0.113.1"), t2), LogVerdict::Log);
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn a_zero_window_logs_everything() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::ZERO, 1);
        assert!((0..100).all(|_| t.note(ip("192.0.2.1"), t0) == LogVerdict::Log));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn calls_per_source_and_invite_rate_on_virtual_time() {
        let t0 = Instant::now();
        let mut l = CallLimiter::new(3, 2, 5, Duration::from_secs(10));
        let a = ip("192.0.2.1");
        let verdicts: Vec<CallVerdict> = (0..5).map(|_| l.admit(a, t0)).collect();
        assert!(verdicts[..3].iter().all(|v| *v == CallVerdict::Admit));
        // The fourth and fifth: three calls are up already; logged once, then counted.
        let CallVerdict::Refuse {
            limit,
            retry_after,
            answer,
            log,
        } = verdicts[3]
        else {
            panic!("{:?}", verdicts[3])
        };
        assert_eq!(
            (limit, retry_after, answer, log),
            (
                CallLimit::Concurrent,
                RETRY_AFTER_CONCURRENT,
                true,
                LogVerdict::Log
            )
        );
        assert!(matches!(
            verdicts[4],
            CallVerdict::Refuse {
                limit: CallLimit::Concurrent,
                log: LogVerdict::Quiet,
                ..
            }
        ));
        assert_eq!(l.active(a), 3);
        // Another source is not affected.
        assert_eq!(l.admit(ip("192.0.2.2"), t0), CallVerdict::Admit);
        // Two calls end: room for two, but the burst of 5 INVITEs is spent (3 admitted, and
        // refusals for concurrency take no token): two more fit, and once every call has ended
        // the rate refuses the next.
        l.ended(a);
        l.ended(a);
        assert_eq!(l.admit(a, t0), CallVerdict::Admit);
        assert_eq!(l.admit(a, t0), CallVerdict::Admit);
        l.ended(a);
        l.ended(a);
        l.ended(a);
        assert_eq!(l.active(a), 0);
        assert!(matches!(
            l.admit(a, t0),
            CallVerdict::Refuse {
                limit: CallLimit::Rate,
                retry_after: 1,
                ..
            }
        ));
        // Half a second later one token more (2 per second).
        assert_eq!(
            l.admit(a, t0 + Duration::from_millis(500)),
            CallVerdict::Admit
        );
    }

    #[test]
    fn refusals_are_answered_only_within_their_own_bucket() {
        let t0 = Instant::now();
        let mut l = CallLimiter::new(1, 0, 0, Duration::from_secs(10));
        let a = ip("198.51.100.4");
        assert_eq!(l.admit(a, t0), CallVerdict::Admit);
        let answered = (0..1000)
            .filter(|_| matches!(l.admit(a, t0), CallVerdict::Refuse { answer: true, .. }))
            .count();
        assert_eq!(answered, REFUSALS_BURST as usize);
        // The flood's log: one line, the rest counted for the window's summary.
        let done = l.sweep(t0 + Duration::from_secs(10));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].count, 999);
        assert!(!l.has_log_windows());
        // IPv6: one /64 is one source.
        assert_eq!(l.admit(ip("2001:db8:1:2::1"), t0), CallVerdict::Admit);
        assert!(matches!(
            l.admit(ip("2001:db8:1:2::99"), t0),
            CallVerdict::Refuse { .. }
        ));
        assert_eq!(l.admit(ip("2001:db8:1:3::1"), t0), CallVerdict::Admit);
    }

    #[test]
    fn zero_turns_call_limits_off() {
        let t0 = Instant::now();
        let mut l = CallLimiter::new(0, 0, 0, Duration::from_secs(10));
        assert!((0..5000).all(|_| l.admit(ip("192.0.2.1"), t0) == CallVerdict::Admit));
    }

    #[test]
    fn inbound_connections_per_source_total_and_trusted_sources() {
        let trunk: IpNet = "203.0.113.0/24".parse().unwrap();
        let mut c = ConnectionLimiter::new(10, 3, vec![trunk]);
        let a = ip("192.0.2.1");
        assert!((0..3).all(|_| c.open(a).is_ok()));
        assert_eq!(c.open(a), Err(ConnRefusal::PerSource));
        assert_eq!(c.open(ip("::ffff:192.0.2.1")), Err(ConnRefusal::PerSource));
        // A trunk may open more than a source's share.
        assert!((0..5).all(|_| c.open(ip("203.0.113.9")).is_ok()));
        assert_eq!(c.total(), 8);
        assert!(c.open(ip("2001:db8::1")).is_ok());
        assert!(c.open(ip("2001:db8::2")).is_ok());
        assert_eq!(c.open(ip("192.0.2.99")), Err(ConnRefusal::Total));
        c.close(a);
        assert_eq!(c.total(), 9);
        assert!(c.open(a).is_ok());
        // Closing what was never counted changes nothing.
        c.close(ip("198.51.100.1"));
        assert_eq!(c.total(), 10);
    }
}
