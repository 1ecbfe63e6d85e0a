//! Call-backs that keep the caller's place: the tokio driver.
//!
//! A caller waiting for an operator presses 2 and hangs up; with `callback.trunk_uri`
//! configured their queue entry stays where it was (see "Call-backs" in
//! [`crate::dispatch::queue`] for the sans-IO rules: when the caller is dialled, retries, the
//! agent held back meanwhile). The call hands the entry to [`Callbacks::keep_place`], which
//! starts one task per call-back, owned by the server's tracker. The task:
//!
//! 1. waits for [`CallbackEvent::DialBack`], then INVITEs `sip:<number>@<trunk>` with From
//!    `<from_user>` (the 311 number) and reports the outcome to the queue (ring timeout:
//!    CANCEL and report a failure; the queue retries or gives up);
//! 2. on answer plays `callback_hello` ("This is 311 calling you back; please hold for an
//!    operator") in the caller's language, then hold music;
//! 3. rings each agent the queue offers, with the same `X-311-*` headers as a live caller's
//!    offer plus `X-311-Callback: yes`, From and P-Asserted-Identity the caller's number (one
//!    phone at a time: with `ring_all`, the round's other offers are withdrawn at no cost);
//! 4. on the agent's 200 bridges the two outbound legs: RTP is relayed with
//!    [`crate::media::bridge::relay`] (PCMU⇄PCMA transcoding, RFC 4733 events passed on);
//!    either side's BYE hangs up the other.
//!
//! The answered caller's leg is a slot on the [`MediaClock`], like a live caller's: the
//! shards pace its prompts and hold music, watch it for silence
//! ([`MediaNote::NoMedia`]) and, once an operator answers, relay the bridge themselves
//! ([`SlotState::set_bridge`](crate::media::clock::SlotState::set_bridge)). The first
//! version ran its own 20 ms tokio interval and read both legs in this task: two reactor
//! wake-ups per relayed packet and prompt timing at the mercy of the runtime, which is what
//! the live calls' bridges had moved away from already.
//!
//! Nobody is lost: when every dial failed ([`CallbackEvent::Unreached`]), when the answered
//! caller can be taken by no logged-in operator (`MaxWait`: they hear `callback_confirmed`),
//! and when the server stops (or the queue goes away) before an operator took the call, the
//! task files a ticket flagged for call-back with the caller's number. So pending call-backs
//! do not survive a restart as queue entries, but each becomes a flagged ticket at shutdown
//! (`ivr311 serve` allows 5 s for tasks to finish after the drain). A caller who answers and
//! hangs up before an operator takes the call counts as abandoned, like a live caller who
//! hangs up (there is no answering-machine detection: a voicemail that answers is treated as
//! the caller).
//!
//! Who is called back at all is decided before any of this, when the caller presses 2
//! ([`CallbackConfig::callback_number`]): only a number a trusted trunk asserted (see
//! [`crate::call::CallerIdentity`]), inside `callback.allowed_numbers` ([`NumberPattern`]) and
//! outside `callback.refused_numbers`, and within `callback.per_number_per_day` (counted by the
//! ticket store). A call-back costs the city a call to whatever number it dials, so a number a
//! caller merely typed into From is never one; [`Callbacks::keep_place`] checks the patterns
//! again where the dialling is.
//!
//! Bounds: at most `callback.max_pending` call-backs at once (more requests become flagged
//! tickets at once), one trunk leg and one agent leg per task, `limits.no_media_seconds`
//! without RTP from the answered caller and `limits.max_call_seconds` end the call.
//!
//! This module owns no queue logic and no SIP: it uses [`QueueHandle`] and
//! [`OutboundHandle`], and must not reach into a live call's state ([`crate::call`] only
//! calls [`Callbacks::keep_place`]). Call-back legs do not show in `/admin/calls` and the
//! shutdown drain does not wait for a bridged call-back (it is hung up when the server stops);
//! their entries show in `/admin/queues` (`waiting`, `callbacks_pending`).

use crate::call::{MenuHolder, SUPPORTED_CODECS};
use crate::config::{CallbackConfig, Limits, LogConfig};
use crate::dispatch::offer::{
    agent_leg_step, asserted_identity, probe_says_gone, AgentLegStep, LegProbe, LegReoffer, LegSdp,
    OperatorOffer, PROBE_ANSWER_WITHIN,
};
use crate::dispatch::queue::{CallbackEvent, CallerId, OfferFailure, QueueEvent, QueueHandle};
use crate::dispatch::tickets::{Channel, NewTicket, TicketStore};
use crate::media::clock::{MediaClock, MediaHandle, MediaNote};
use crate::media::ports::{PortPool, RtpPort};
use crate::media::prompt::Prompt;
use crate::media::rtp::LatchScope;
use crate::media::sdp::{self, Negotiated};
use crate::media::session::MediaSession;
use crate::sip::message::Method;
use crate::sip::transport::Flow;
use crate::sip::ua::{DialogEvent, DialogHandle, LegEvent, OutboundHandle};
use bytes::Bytes;
use dashmap::DashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

/// Events buffered per call-back (the queue drops, never blocks, when full).
const EVENTS: usize = 16;

/// Why a call-back request could not keep the caller's place (the call files a flagged
/// ticket instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotKept {
    /// The caller's number is not one a trunk can dial (anonymous, a name...).
    #[error("the caller's number cannot be dialled")]
    NotDialable,
    /// The caller's number is not one `callback.allowed_numbers` lets call-backs dial.
    #[error("the caller's number is not one call-backs may dial")]
    NotAllowed,
    /// `callback.max_pending` call-backs are pending already.
    #[error("too many call-backs pending")]
    TooMany,
    /// The caller was no longer waiting (answered, gone) or the queue has stopped.
    #[error("the caller is not waiting in a queue")]
    NotWaiting,
}

/// What the call knows that the call-back needs.
#[derive(Debug, Clone)]
pub struct CallbackRequest {
    /// The caller's queue entry.
    pub caller: CallerId,
    /// The number to call back (the call's caller id).
    pub number: String,
    /// The original call's Call-ID (for `X-311-Call-ID` and the ticket).
    pub call_id: String,
    pub language: String,
    pub menu_path: String,
    pub queue: String,
    /// When the caller entered the queue (`X-311-Waited` counts from here).
    pub entered: Instant,
    /// Our media address family/interface as the caller's call used it.
    pub local_ip: IpAddr,
}

/// A number a trunk can dial: an optional `+`, then 3 to 20 digits.
pub fn dialable(number: &str) -> bool {
    let digits = number.strip_prefix('+').unwrap_or(number);
    (3..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `number` without the visual separators a `tel:` URI may carry (RFC 3966: `-`, `.`,
/// `(`, `)`; and spaces): `+1-212-200-0123` → `+12122000123`.
fn without_separators(number: &str) -> String {
    number
        .chars()
        .filter(|c| !matches!(c, '-' | '.' | '(' | ')' | ' '))
        .collect()
}

/// A caller's number in E.164 form (`+`, country code, number: at most 15 digits), or `None`
/// when it cannot be read as one. A number without `+` is read in the North American
/// numbering plan, the 311 service's: 11 digits starting with 1, or 10 digits starting
/// with 2-9 (`2125550123` → `+12125550123`). Anything else without `+` (an international
/// access code such as `011...`, an extension) is not a number call-backs dial.
pub fn e164(number: &str) -> Option<String> {
    let cleaned = without_separators(number);
    let (plus, digits) = match cleaned.strip_prefix('+') {
        Some(d) => (true, d),
        None => (false, cleaned.as_str()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match (plus, digits.len(), digits.as_bytes()[0]) {
        (true, 3..=15, _) => Some(format!("+{digits}")),
        (false, 11, b'1') => Some(format!("+{digits}")),
        (false, 10, b'2'..=b'9') => Some(format!("+1{digits}")),
        _ => None,
    }
}

/// NANP area codes that are not a place in the US or Canada: N11 service codes, 456
/// (inbound international), 5XX personal-communications codes, 555, 600 and 622 (Canadian
/// non-geographic), 700, 710 (US government), toll-free (800, 822, 833, 844, 855, 866, 877,
/// 888, and the 88X block), 900 (premium), and the Caribbean and Atlantic countries that
/// share +1 but are international calls (Bahamas 242, Barbados 246, Anguilla 264, Antigua
/// 268, British Virgin Islands 284, Cayman 345, Bermuda 441, Grenada 473, Turks and Caicos
/// 649, Jamaica 658 and 876, Montserrat 664, Sint Maarten 721, St Lucia 758, Dominica 767,
/// St Vincent 784, Dominican Republic 809, 829 and 849, Trinidad 868, St Kitts 869: the
/// area codes of the "one ring" toll-fraud scams). US territories (340, 670, 671, 684, 787,
/// 939) are domestic and stay allowed.
const NANP_NOT_GEOGRAPHIC: &[&str] = &[
    "456", "500", "521", "522", "523", "524", "525", "526", "527", "528", "529", "533", "544",
    "555", "566", "577", "588", "600", "622", "700", "710", "800", "822", "833", "844", "855",
    "866", "877", "880", "881", "882", "883", "884", "885", "886", "887", "888", "889", "900",
    "242", "246", "264", "268", "284", "345", "441", "473", "649", "658", "664", "721", "758",
    "767", "784", "809", "829", "849", "868", "869", "876",
];

/// Exchange codes (the NXX after the area code) that are not a subscriber's line in any
/// area: N11 service codes, 555 (directory assistance and fictional numbers), 950, 958 and
/// 959 (carrier access and test codes) and 976 (premium information services).
const NANP_NOT_SUBSCRIBER: &[&str] = &["555", "950", "958", "959", "976"];

/// Whether an E.164 number is a geographic number in the US or Canada: `+1`, an area code
/// (`NPA`: 2-9, 0-8, any digit) that is not in [`NANP_NOT_GEOGRAPHIC`], an exchange (`NXX`:
/// 2-9, then any two) that is neither N11 nor in [`NANP_NOT_SUBSCRIBER`], and four digits.
pub fn nanp_geographic(e164: &str) -> bool {
    let Some(d) = e164.strip_prefix("+1") else {
        return false;
    };
    let b = d.as_bytes();
    if b.len() != 10 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let (npa, nxx) = (&d[..3], &d[3..6]);
    let n = |c: u8| (b'2'..=b'9').contains(&c);
    n(b[0])
        && b[1] != b'9'
        && &npa[1..] != "11"
        && !NANP_NOT_GEOGRAPHIC.contains(&npa)
        && n(b[3])
        && &nxx[1..] != "11"
        && !NANP_NOT_SUBSCRIBER.contains(&nxx)
}

/// A pattern of numbers for `callback.allowed_numbers` and `callback.refused_numbers`,
/// matched against the caller's number in E.164 form ([`e164`]). Written as a dial plan is
/// (Asterisk's notation):
///
/// - `+` first, then the number, position by position: a digit matches itself, `X` any
///   digit, `N` 2-9, `Z` 1-9, `[...]` one digit of a set (`[2-9]`, `[0-35]`);
/// - `.` at the end: one or more further digits (`+44X.`: any UK number);
/// - spaces and `-` between positions are only for reading (`+1 NXX-NXX-XXXX`);
/// - or the name `nanp-geographic`: a US or Canadian geographic number ([`nanp_geographic`]).
///
/// A pattern that does not parse is refused at start with its line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumberPattern {
    /// `nanp-geographic`.
    NanpGeographic,
    /// A dial-plan pattern: the digits each position takes (bit `d` for digit `d`), and
    /// whether further digits may follow.
    Digits {
        text: String,
        positions: Vec<u16>,
        open: bool,
    },
}

/// Why a number pattern did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("number pattern {0:?} must start with + (numbers are matched as +<country code><number>) or be nanp-geographic")]
    NoPlus(String),
    #[error("number pattern {0:?}: {1:?} is not a digit, X, N, Z, [set] or a final .")]
    Character(String, char),
    #[error("number pattern {0:?} has an unclosed or empty [set]")]
    Set(String),
    #[error("number pattern {0:?}: . may only end a pattern")]
    Dot(String),
    #[error("number pattern {0:?} has no digits")]
    Empty(String),
}

impl std::str::FromStr for NumberPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, PatternError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("nanp-geographic") {
            return Ok(NumberPattern::NanpGeographic);
        }
        let err_char = |c| PatternError::Character(text.to_owned(), c);
        let rest = text
            .strip_prefix('+')
            .ok_or_else(|| PatternError::NoPlus(text.to_owned()))?;
        let mut positions = Vec::new();
        let mut open = false;
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            if open && !matches!(c, ' ' | '-') {
                return Err(PatternError::Dot(text.to_owned()));
            }
            let set = match c {
                ' ' | '-' => continue,
                '.' => {
                    open = true;
                    continue;
                }
                '0'..='9' => 1u16 << (c as u8 - b'0'),
                'X' | 'x' => 0x3ff,
                'N' | 'n' => 0x3fc,
                'Z' | 'z' => 0x3fe,
                '[' => {
                    let mut set = 0u16;
                    let mut prev: Option<u8> = None;
                    let mut range = false;
                    let mut closed = false;
                    for c in chars.by_ref() {
                        match c {
                            ']' => {
                                closed = true;
                                break;
                            }
                            '-' if prev.is_some() && !range => range = true,
                            '0'..='9' => {
                                let d = c as u8 - b'0';
                                if range {
                                    let lo = prev.unwrap_or(d);
                                    if lo > d {
                                        return Err(PatternError::Set(text.to_owned()));
                                    }
                                    for x in lo..=d {
                                        set |= 1 << x;
                                    }
                                    range = false;
                                    prev = None;
                                } else {
                                    set |= 1 << d;
                                    prev = Some(d);
                                }
                            }
                            _ => return Err(err_char(c)),
                        }
                    }
                    if !closed || range || set == 0 {
                        return Err(PatternError::Set(text.to_owned()));
                    }
                    set
                }
                c => return Err(err_char(c)),
            };
            positions.push(set);
        }
        if positions.is_empty() {
            return Err(PatternError::Empty(text.to_owned()));
        }
        Ok(NumberPattern::Digits {
            text: text.to_owned(),
            positions,
            open,
        })
    }
}

impl<'de> serde::Deserialize<'de> for NumberPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for NumberPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumberPattern::NanpGeographic => f.write_str("nanp-geographic"),
            NumberPattern::Digits { text, .. } => f.write_str(text),
        }
    }
}

impl NumberPattern {
    /// Whether `e164` (`+` and digits, as [`e164`] gives) is one of this pattern's numbers.
    pub fn matches(&self, e164: &str) -> bool {
        match self {
            NumberPattern::NanpGeographic => nanp_geographic(e164),
            NumberPattern::Digits {
                positions, open, ..
            } => {
                let Some(digits) = e164.strip_prefix('+') else {
                    return false;
                };
                let fits = if *open {
                    digits.len() > positions.len()
                } else {
                    digits.len() == positions.len()
                };
                fits && digits.bytes().all(|b| b.is_ascii_digit())
                    && digits
                        .bytes()
                        .zip(positions)
                        .all(|(b, set)| set & (1 << (b - b'0')) != 0)
            }
        }
    }
}

/// Why a caller cannot be called back (they hear that a call-back is not available for
/// their line, and may leave a request instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The number is only claimed (From, or P-Asserted-Identity from a source outside
    /// `trunks.allow`): anyone can write any number there.
    #[error("the caller's number is not asserted by a trusted trunk")]
    Unverified,
    /// Anonymous, a name, or not a number the server can read as E.164.
    #[error("the caller's number cannot be dialled")]
    NotDialable,
    /// Outside `callback.allowed_numbers`, or inside `callback.refused_numbers`.
    #[error("the caller's number is not one call-backs may dial")]
    NotAllowed,
    /// `callback.per_number_per_day` call-backs in the last 24 hours already.
    #[error("the caller's number had its call-backs for today")]
    DailyLimit,
}

/// A number the server may call back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackNumber {
    /// As the trunk asserted it, without visual separators: what the call-back dials (the
    /// trunk's own format).
    pub dial: String,
    /// Its E.164 form: what the patterns match and the daily count keys on.
    pub e164: String,
}

impl CallbackConfig {
    /// Whether call-backs may dial `e164`: one of `allowed_numbers` and none of
    /// `refused_numbers`.
    pub fn allows(&self, e164: &str) -> bool {
        self.allowed_numbers.iter().any(|p| p.matches(e164))
            && !self.refused_numbers.iter().any(|p| p.matches(e164))
    }

    /// The number to call `caller` back at, if they may be called back at all (the daily
    /// count is the store's: [`crate::dispatch::tickets::TicketStore::claim_callback`]).
    pub fn callback_number(
        &self,
        caller: &crate::call::CallerIdentity,
    ) -> Result<CallbackNumber, Unavailable> {
        let asserted = caller.asserted().ok_or(Unavailable::Unverified)?;
        let dial = without_separators(asserted);
        let e164 = e164(&dial).ok_or(Unavailable::NotDialable)?;
        if !dialable(&dial) {
            return Err(Unavailable::NotDialable);
        }
        if !self.allows(&e164) {
            return Err(Unavailable::NotAllowed);
        }
        if self.per_number_per_day == 0 {
            return Err(Unavailable::DailyLimit);
        }
        Ok(CallbackNumber { dial, e164 })
    }
}

/// Starts call-backs; cheap to clone. Built by the server when `callback.trunk_uri` and
/// agents are configured.
#[derive(Clone)]
pub struct Callbacks {
    inner: Arc<Inner>,
}

struct Inner {
    config: CallbackConfig,
    queues: QueueHandle,
    outbound: OutboundHandle,
    ports: Arc<PortPool>,
    clock: Arc<MediaClock>,
    agent_contacts: Arc<DashMap<String, (String, Flow)>>,
    menu: Arc<MenuHolder>,
    default_language: String,
    tickets: TicketStore,
    limits: Limits,
    log: LogConfig,
    tracker: TaskTracker,
    cancel: CancellationToken,
    pending: AtomicUsize,
}

/// Everything [`Callbacks`] uses that the server owns.
pub struct CallbackDeps {
    pub queues: QueueHandle,
    pub outbound: OutboundHandle,
    pub ports: Arc<PortPool>,
    /// Plays to the answered caller and relays the bridge.
    pub clock: Arc<MediaClock>,
    pub agent_contacts: Arc<DashMap<String, (String, Flow)>>,
    pub menu: Arc<MenuHolder>,
    pub default_language: String,
    pub tickets: TicketStore,
    pub limits: Limits,
    /// How log lines show the caller's number.
    pub log: LogConfig,
    pub tracker: TaskTracker,
    /// Server stop: pending call-backs become flagged tickets.
    pub cancel: CancellationToken,
}

impl Callbacks {
    /// `None` without a trunk (`config` must have passed [`CallbackConfig::check`]).
    pub fn new(config: &CallbackConfig, deps: CallbackDeps) -> Option<Self> {
        config.trunk_uri.as_ref()?;
        Some(Callbacks {
            inner: Arc::new(Inner {
                config: config.clone(),
                queues: deps.queues,
                outbound: deps.outbound,
                ports: deps.ports,
                clock: deps.clock,
                agent_contacts: deps.agent_contacts,
                menu: deps.menu,
                default_language: deps.default_language,
                tickets: deps.tickets,
                limits: deps.limits,
                log: deps.log,
                tracker: deps.tracker,
                cancel: deps.cancel,
                pending: AtomicUsize::new(0),
            }),
        })
    }

    /// Call-backs pending now.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// Take over the waiting caller's queue entry: from now on it is a call-back that keeps
    /// its place, and the call may hang up. On `Err` nothing changed in the queue.
    pub async fn keep_place(&self, req: CallbackRequest) -> Result<(), NotKept> {
        let inner = &self.inner;
        if !dialable(&req.number) {
            return Err(NotKept::NotDialable);
        }
        // The call checked this before asking; checked again here, where the dialling is.
        if !e164(&req.number).is_some_and(|n| inner.config.allows(&n)) {
            return Err(NotKept::NotAllowed);
        }
        let target = inner
            .config
            .target_for(&req.number)
            .ok_or(NotKept::NotDialable)?;
        let slot = inner
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < inner.config.max_pending).then_some(n + 1)
            });
        if slot.is_err() {
            return Err(NotKept::TooMany);
        }
        let guard = Pending(self.inner.clone());
        let (tx, rx) = mpsc::channel(EVENTS);
        if !inner.queues.request_callback(req.caller, tx).await {
            return Err(NotKept::NotWaiting);
        }
        // Its own root span: the call that asked is about to end.
        let log = &inner.log;
        let span = info_span!(parent: None, "callback", caller = %log.number(&req.number), call_id = %req.call_id);
        span.in_scope(|| info!(target = %log.uri(&target), queue = %req.queue, "call-back keeps the caller's place"));
        let run = Run::new(self.inner.clone(), req, target, span.clone());
        inner.tracker.spawn(
            async move {
                let _guard = guard;
                run.run(rx).await;
            }
            .instrument(span),
        );
        Ok(())
    }
}

/// Counts one pending call-back while alive.
struct Pending(Arc<Inner>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a call-back ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// An operator took the call and one side hung up.
    Served,
    /// The caller hung up (or went silent) before an operator took the call.
    CallerLeft,
    /// Every dial failed.
    Unreached,
    /// Answered, but no operator who could take it is logged in any more.
    NoOperator,
    /// The server is stopping, or the queue went away.
    Shutdown,
}

/// The caller's leg (through the trunk).
struct TrunkLeg {
    handle: DialogHandle,
    /// While ringing: when to give up.
    ring_until: Option<tokio::time::Instant>,
    /// Once answered: the leg's slot on the media clock.
    media: Option<MediaHandle>,
    /// Once answered: when `limits.max_call_seconds` hangs up.
    hang_up_at: Option<tokio::time::Instant>,
    /// The trunk address the INVITE went to (the caller's media may come from there as
    /// well as from its SDP's address).
    trunk_ip: Option<IpAddr>,
}

/// The operator's leg.
struct AgentLeg {
    id: String,
    handle: DialogHandle,
    ring_until: Option<tokio::time::Instant>,
    answered: Option<(Negotiated, SocketAddr)>,
    /// Our SDP on the leg (for answering its re-INVITEs and UPDATEs).
    sdp: LegSdp,
    /// The in-dialog OPTIONS asking a silent phone whether it is still there.
    probe: Option<LegProbe>,
    /// The address the phone registered from (its media may come from there, behind NAT).
    registered_from: IpAddr,
    span: Span,
}

impl AgentLeg {
    /// The operator put the caller on hold (we answered its offer recvonly or inactive).
    fn holds(&self) -> bool {
        self.answered.is_some_and(|(n, _)| !n.direction.sends())
    }
}

struct Run {
    inner: Arc<Inner>,
    req: CallbackRequest,
    target: String,
    span: Span,
    trunk: Option<TrunkLeg>,
    trunk_events: Option<mpsc::Receiver<LegEvent>>,
    /// The caller's port while their phone rings (the clock takes it on answer).
    trunk_port: Option<RtpPort>,
    /// What the clock tells us about the answered caller's media.
    notes: Option<mpsc::Receiver<MediaNote>>,
    agent: Option<AgentLeg>,
    agent_events: Option<mpsc::Receiver<LegEvent>>,
    /// The operator's port (shared with the clock's bridge once they answer).
    agent_port: Option<Arc<RtpPort>>,
    /// An operator answered: the call is theirs.
    served: bool,
    /// End once the prompts queued now have played.
    end_after_play: Option<End>,
    /// The flagged ticket that stands in for this call-back is already written.
    ticket_filed: bool,
}

fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Run {
    fn new(inner: Arc<Inner>, req: CallbackRequest, target: String, span: Span) -> Self {
        Run {
            inner,
            req,
            target,
            span,
            trunk: None,
            trunk_events: None,
            trunk_port: None,
            notes: None,
            agent: None,
            agent_events: None,
            agent_port: None,
            served: false,
            end_after_play: None,
            ticket_filed: false,
        }
    }

    async fn run(mut self, events: mpsc::Receiver<CallbackEvent>) {
        let mut events = Some(events);
        let cancel = self.inner.cancel.clone();
        let end = loop {
            let trunk_ring = self.trunk.as_ref().and_then(|t| t.ring_until);
            let agent_ring = self.agent.as_ref().and_then(|a| a.ring_until);
            let hang_up_at = self.trunk.as_ref().and_then(|t| t.hang_up_at);
            let probe_deadline = self.agent.as_ref().and_then(|a| Some(a.probe?.give_up_at));
            let step = tokio::select! {
                biased;
                () = cancel.cancelled() => Some(End::Shutdown),
                ev = recv_opt(&mut events) => match ev {
                    Some(ev) => self.on_queue_event(ev).await,
                    // The queue forgot us (stopped, or the operator logged out mid-call): a
                    // call in progress goes on; a caller not yet served is filed.
                    None if self.served => {
                        events = None;
                        None
                    }
                    None => Some(End::Shutdown),
                },
                ev = recv_opt(&mut self.trunk_events) => self.on_trunk_event(ev).await,
                ev = recv_opt(&mut self.agent_events) => {
                    let span = self.agent.as_ref().map_or_else(Span::none, |a| a.span.clone());
                    self.on_agent_event(ev).instrument(span).await
                }
                () = sleep_opt(trunk_ring) => {
                    info!("the caller did not answer the call-back in time");
                    self.drop_trunk().await;
                    self.inner.queues.callback_failed(self.req.caller).await;
                    None
                }
                () = sleep_opt(agent_ring) => {
                    if let Some(agent) = self.agent.as_ref().map(|a| a.id.clone()) {
                        info!(%agent, "operator did not answer in time");
                        self.drop_agent().await;
                        self.inner.queues.offer_failed(self.req.caller, &agent, OfferFailure::NoAnswer).await;
                    }
                    None
                }
                note = recv_opt(&mut self.notes) => self.on_note(note).await,
                () = sleep_opt(probe_deadline) => {
                    // No answer to the OPTIONS in time: as good as its transaction's 408.
                    let span = self.agent.as_ref().map_or_else(Span::none, |a| a.span.clone());
                    span.in_scope(|| info!(seconds = PROBE_ANSWER_WITHIN.as_secs(), "the operator's phone did not answer the OPTIONS"));
                    self.on_probe_answer(408).instrument(span).await
                }
                () = sleep_opt(hang_up_at) => {
                    info!("call-back reached the maximum call length; hanging up");
                    self.caller_gone().await
                }
            };
            if let Some(end) = step {
                break end;
            }
        };
        self.finish(end).await;
    }

    fn prompts(&self, names: &[&str]) -> Vec<Arc<Prompt>> {
        let store = self.inner.menu.get().prompts.clone();
        names
            .iter()
            .filter_map(|n| {
                let p = store
                    .get(&self.req.language, n)
                    .or_else(|| store.get(&self.inner.default_language, n));
                if p.is_none() {
                    warn!(prompt = %n, language = %self.req.language, "prompt missing; skipped");
                }
                p
            })
            .collect()
    }

    async fn on_queue_event(&mut self, ev: CallbackEvent) -> Option<End> {
        match ev {
            CallbackEvent::DialBack {
                attempt,
                ring_timeout,
            } => {
                if self.trunk.is_none() {
                    self.dial(attempt, ring_timeout).await;
                }
                None
            }
            CallbackEvent::Unreached => Some(End::Unreached),
            CallbackEvent::Queue(QueueEvent::Offer {
                agent,
                ring_timeout,
            }) => {
                self.offer_agent(agent, ring_timeout).await;
                None
            }
            CallbackEvent::Queue(QueueEvent::CancelOffer { agent }) => {
                let ringing = self
                    .agent
                    .as_ref()
                    .is_some_and(|a| a.id == agent && a.answered.is_none());
                if ringing {
                    self.drop_agent().await;
                    self.hold_music();
                }
                None
            }
            CallbackEvent::Queue(QueueEvent::Announce(_)) => None,
            CallbackEvent::Queue(QueueEvent::MaxWait) => {
                if self.served {
                    return None;
                }
                info!("no operator can take the called-back caller; filing a ticket instead");
                self.drop_agent().await;
                self.inner.queues.abandon(self.req.caller).await;
                // The flagged ticket is written first: only a saved request is promised.
                self.ticket_filed = true;
                let saved = self
                    .file_ticket("Call-back answered, but no operator could take the call")
                    .await;
                let p = self.prompts(&[if saved {
                    "callback_confirmed"
                } else {
                    "db_error"
                }]);
                let queued = self.trunk_media().map(|m| {
                    let mut st = m.lock();
                    st.media.stop();
                    st.media.play(p);
                });
                if queued.is_some() {
                    self.end_after_play = Some(End::NoOperator);
                    None
                } else {
                    Some(End::NoOperator)
                }
            }
        }
    }

    /// Ring the caller back through the trunk.
    async fn dial(&mut self, attempt: u32, ring_timeout: Duration) {
        let Some(port) = self.inner.ports.allocate() else {
            warn!("no RTP port for the call-back; counted as unanswered");
            self.inner.queues.callback_failed(self.req.caller).await;
            return;
        };
        // The trunk may be reached in the other address family than the caller's call
        // came in on (a dual-stack server): offer media in the trunk's.
        // A trunk named with several addresses is dialled at each in turn, an attempt each
        // (the name looked up afresh every time): one address down costs an attempt, not
        // every one.
        let destination = (self.inner.outbound.destinations(&self.target).await)
            .map(|a| a[(attempt.max(1) as usize - 1) % a.len()]);
        let trunk_ip = destination.as_ref().ok().map(|a| a.ip());
        let ip = crate::call::leg_media_ip(self.req.local_ip, &port, trunk_ip);
        let local = SocketAddr::new(ip, port.port);
        let offer = sdp::build_offer(
            local,
            rand::random::<u32>() as u64,
            1,
            &SUPPORTED_CODECS,
            Some(101),
            sdp::Direction::SendRecv,
        );
        let from = self.inner.config.from_user.clone();
        let headers = vec![
            asserted_identity(&from, ip),
            ("X-311-Callback".to_owned(), "yes".to_owned()),
            ("X-311-Call-ID".to_owned(), self.req.call_id.clone()),
        ];
        info!(target = %self.inner.log.uri(&self.target), attempt, "calling the caller back");
        let call = self
            .inner
            .outbound
            .invite_to(
                &self.target,
                destination,
                &from,
                Some("311"),
                headers,
                Bytes::from(offer),
            )
            .await;
        self.trunk = Some(TrunkLeg {
            handle: call.handle,
            ring_until: Some(tokio::time::Instant::now() + ring_timeout),
            media: None,
            hang_up_at: None,
            trunk_ip,
        });
        self.trunk_events = Some(call.events);
        self.trunk_port = Some(port);
    }

    async fn on_trunk_event(&mut self, ev: Option<LegEvent>) -> Option<End> {
        let Some(ev) = ev else {
            // The UA forgot the leg: treat as the caller gone.
            self.trunk_events = None;
            return self.caller_gone().await;
        };
        match ev {
            LegEvent::Provisional { code, .. } => {
                debug!(code, "call-back ringing");
                None
            }
            LegEvent::Answered { sdp: body } => {
                let parsed = crate::dispatch::offer::leg_answer(&body);
                match (parsed, self.trunk_port.take()) {
                    (Ok((neg, addr)), Some(port)) => {
                        info!(codec = ?neg.codec, "the caller answered the call-back");
                        let inner = &self.inner;
                        let no_media = Duration::from_secs(inner.limits.no_media_seconds);
                        let max_call = Duration::from_secs(inner.limits.max_call_seconds);
                        // Early media (the trunk's ringback) is not the caller.
                        port.discard_queued();
                        let scope = match self.trunk.as_ref().and_then(|t| t.trunk_ip) {
                            Some(ip) => LatchScope::SdpOr(ip),
                            None => LatchScope::Sdp,
                        };
                        let session = MediaSession::new(clock(), neg, addr).latch_scope(scope);
                        let (media, notes) =
                            inner
                                .clock
                                .attach(port, session, no_media, self.span.clone());
                        let greeting = self.prompts(&["callback_hello", "hold_music"]);
                        media.lock().media.play(greeting);
                        if let Some(t) = &mut self.trunk {
                            t.ring_until = None;
                            t.media = Some(media);
                            t.hang_up_at = Some(tokio::time::Instant::now() + max_call);
                        }
                        self.notes = Some(notes);
                        self.inner.queues.callback_answered(self.req.caller).await;
                    }
                    (Ok(_), None) => {
                        // Answered twice (a forked INVITE): the first answer has the port.
                        warn!("a second answer to the call-back ignored");
                    }
                    (Err(e), _) => {
                        warn!(error = %e, "the call-back was answered with unusable SDP");
                        self.drop_trunk().await;
                        self.inner.queues.callback_failed(self.req.caller).await;
                    }
                }
                None
            }
            LegEvent::Failed { code, reason } => {
                info!(code, %reason, "the call-back did not get through");
                self.drop_trunk().await;
                self.inner.queues.callback_failed(self.req.caller).await;
                None
            }
            LegEvent::Dialog(DialogEvent::Bye | DialogEvent::Timeout) => {
                info!("the caller hung up");
                if let Some(t) = self.trunk.take() {
                    t.handle.release();
                }
                self.trunk_events = None;
                self.caller_gone().await
            }
            LegEvent::Dialog(_) => None,
        }
    }

    /// The answered caller left: end the operator's side too.
    async fn caller_gone(&mut self) -> Option<End> {
        if self.served {
            return Some(End::Served);
        }
        self.drop_agent().await;
        self.inner.queues.abandon(self.req.caller).await;
        Some(End::CallerLeft)
    }

    /// Ring an operator for the answered caller.
    async fn offer_agent(&mut self, agent: String, ring_timeout: Duration) {
        let codec = self.trunk_media().map(|m| m.lock().media.codec());
        let contact = self
            .inner
            .agent_contacts
            .get(&agent)
            .map(|c| c.value().clone());
        if self.agent.is_some() {
            // One operator leg at a time: the other phones of a `ring_all` round are not
            // rung for a call-back, and that costs their agents nothing.
            debug!(%agent, "already ringing an operator; offer withdrawn");
            self.inner
                .queues
                .offer_withdrawn(self.req.caller, &agent)
                .await;
            return;
        }
        let port = if codec.is_some() && contact.is_some() {
            self.inner.ports.allocate().map(Arc::new)
        } else {
            None
        };
        let (Some(codec), Some((contact, flow)), Some(port)) = (codec, contact, port) else {
            warn!(%agent, "cannot ring the operator for the call-back (no phone, leg or port)");
            self.inner
                .queues
                .offer_failed(self.req.caller, &agent, OfferFailure::Unreachable)
                .await;
            return;
        };
        let ip = crate::call::leg_media_ip(self.req.local_ip, &port, Some(flow.remote.ip()));
        let registered_from = flow.remote.ip();
        let sdp = LegSdp::new(SocketAddr::new(ip, port.port));
        let offer = sdp.offer(codec);
        let number = self.req.number.clone();
        let headers = OperatorOffer {
            number: &number,
            host: ip,
            language: &self.req.language,
            menu_path: &self.req.menu_path,
            queue: &self.req.queue,
            waited: self.req.entered.elapsed().as_secs(),
            call_id: &self.req.call_id,
            callback: true,
        }
        .headers();
        let span = info_span!(parent: &self.span, "agent_leg", %agent);
        span.in_scope(|| info!(%contact, "offering the called-back caller to an operator"));
        let call = self
            .inner
            .outbound
            .invite_via(
                &contact,
                flow,
                &number,
                Some("311 caller"),
                headers,
                Bytes::from(offer),
            )
            .instrument(span.clone())
            .await;
        self.agent = Some(AgentLeg {
            id: agent,
            handle: call.handle,
            ring_until: Some(tokio::time::Instant::now() + ring_timeout),
            answered: None,
            sdp,
            probe: None,
            registered_from,
            span,
        });
        self.agent_events = Some(call.events);
        self.agent_port = Some(port);
    }

    /// Bridge the caller to the operator's leg as it now is (answered, perhaps on hold).
    fn bridge_agent(&self) {
        let (Some(m), Some(port), Some(a)) = (self.trunk_media(), &self.agent_port, &self.agent)
        else {
            return;
        };
        let Some((neg, addr)) = a.answered else {
            return;
        };
        let silence = Duration::from_secs(self.inner.limits.operator_silence_seconds);
        let scope = LatchScope::SdpOr(a.registered_from);
        let bridge = crate::call::leg_bridge(port.clone(), (addr, scope), neg, true, true, silence);
        m.lock().set_bridge(Some(bridge));
    }

    /// A re-INVITE or UPDATE from the operator's phone (hold, resume, a session refresh):
    /// answered as a live call's operator leg is (see `Call::on_leg_reoffer`).
    async fn on_agent_reoffer(&mut self, txn: u64, method: &Method, body: &[u8]) {
        let Some(a) = &mut self.agent else { return };
        let Some((current, before)) = a.answered else {
            // Not answered yet: nothing of ours to renegotiate (RFC 3311 §5.2).
            a.handle.answer_reoffer(txn, 491, None).await;
            return;
        };
        let was_held = a.holds();
        let reoffer = a.sdp.reoffer(method, body, &current);
        if let LegReoffer::Answer { neg, addr, .. } = reoffer {
            a.answered = Some((neg, addr));
        }
        let (code, body) = reoffer.response();
        a.handle.answer_reoffer(txn, code, body).await;
        self.agent_media_changed(Some((current, before)), was_held);
    }

    /// The ACK to our 2xx on the operator's leg: if that 2xx carried our offer (a re-INVITE
    /// without SDP), the ACK's answer is the leg's media now.
    fn on_agent_ack(&mut self, body: &[u8]) {
        let Some(a) = &mut self.agent else { return };
        let (before, was_held) = (a.answered, a.holds());
        a.sdp.ack(body, &mut a.answered);
        self.agent_media_changed(before, was_held);
    }

    /// After the operator's leg renegotiated (its media was `before`): the bridge follows
    /// it, and the caller hears hold music while the operator holds the call.
    fn agent_media_changed(&mut self, before: Option<(Negotiated, SocketAddr)>, was_held: bool) {
        let Some(a) = &self.agent else { return };
        let held = a.holds();
        if a.answered != before {
            self.bridge_agent();
        }
        if held && !was_held {
            info!("the operator holds the call; the caller hears hold music");
            if let Some(m) = self.trunk_media() {
                m.lock().media.stop();
            }
            self.hold_music();
        } else if was_held && !held {
            if let Some(m) = self.trunk_media() {
                m.lock().media.stop();
            }
        }
    }

    async fn on_agent_event(&mut self, ev: Option<LegEvent>) -> Option<End> {
        if let Some(LegEvent::Dialog(DialogEvent::RequestOutcome { req, code, .. })) = &ev {
            let probed = self.agent.as_ref().and_then(|a| a.probe);
            if probed.is_some_and(|p| p.req == *req) {
                return self.on_probe_answer(*code).await;
            }
            return None;
        }
        if let Some(LegEvent::Dialog(DialogEvent::Reoffer {
            txn, method, body, ..
        })) = &ev
        {
            self.on_agent_reoffer(*txn, method, body).await;
            return None;
        }
        if let Some(LegEvent::Dialog(DialogEvent::Confirmed { sdp })) = &ev {
            self.on_agent_ack(sdp);
            return None;
        }
        let agent = self
            .agent
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        let Some(ev) = ev else {
            self.agent_events = None;
            return None;
        };
        match agent_leg_step(&agent, ev) {
            AgentLegStep::Nothing => {}
            AgentLegStep::Answered(neg, addr) => {
                if let Some(a) = &mut self.agent {
                    a.answered = Some((neg, addr));
                    a.ring_until = None;
                }
                // From the clock's next pass the caller hears the operator (and nothing the
                // operator's phone sent before it answered: the clock drops that).
                if let Some(m) = self.trunk_media() {
                    m.lock().media.stop();
                }
                self.bridge_agent();
                self.served = true;
                self.inner
                    .queues
                    .offer_answered(self.req.caller, &agent)
                    .await;
            }
            AgentLegStep::Unusable => {
                self.drop_agent().await;
                self.agent_failed(&agent, OfferFailure::NoCommonCodec).await;
            }
            AgentLegStep::Failed(why) => {
                self.agent = None;
                self.agent_events = None;
                self.agent_port = None;
                self.agent_failed(&agent, why).await;
            }
            AgentLegStep::HungUp => {
                if let Some(m) = self.trunk_media() {
                    m.lock().set_bridge(None);
                }
                if let Some(a) = self.agent.take() {
                    a.handle.release();
                }
                self.agent_events = None;
                self.agent_port = None;
                return Some(End::Served);
            }
        }
        None
    }

    /// The silent operator's phone answered the OPTIONS (or did not in time: 408): keep the
    /// bridge, or hang the phone up and end the call-back (the caller was served).
    async fn on_probe_answer(&mut self, code: u16) -> Option<End> {
        let a = self.agent.as_mut()?;
        a.probe = None;
        if !probe_says_gone(code) {
            info!(
                code,
                "the operator's phone is still there; the bridge stays"
            );
            if let Some(m) = self.trunk_media() {
                m.lock().rearm_leg_watch(std::time::Instant::now());
            }
            return None;
        }
        warn!(
            agent = %a.id,
            options = code,
            "the operator's phone is gone (no audio, OPTIONS failed); ending the call-back"
        );
        self.drop_agent().await;
        Some(End::Served)
    }

    async fn agent_failed(&mut self, agent: &str, why: OfferFailure) {
        self.inner
            .queues
            .offer_failed(self.req.caller, agent, why)
            .await;
        self.hold_music();
    }

    /// The answered caller's media, if they answered.
    fn trunk_media(&self) -> Option<&MediaHandle> {
        self.trunk.as_ref()?.media.as_ref()
    }

    /// Back to hold music while the next operator is tried.
    fn hold_music(&mut self) {
        let playing = self
            .trunk_media()
            .is_none_or(|m| m.lock().media.is_playing());
        if !playing {
            let p = self.prompts(&["hold_music"]);
            if let Some(m) = self.trunk_media() {
                m.lock().media.play(p);
            }
        }
    }

    /// What the media clock noticed on the answered caller's leg.
    async fn on_note(&mut self, note: Option<MediaNote>) -> Option<End> {
        match note {
            // The clock stopped (the server is stopping; the cancel token ends us).
            None => {
                self.notes = None;
                None
            }
            Some(MediaNote::PlayDone { stops }) => {
                // A note from before the queue changed, or from before the bridge, is stale
                // (unless the operator holds the call: then the hold music loops).
                let held = self.agent.as_ref().is_some_and(AgentLeg::holds);
                let current = self.trunk_media().is_some_and(|m| {
                    let st = m.lock();
                    (!st.bridged() || held) && !st.media.is_playing() && st.media.stops() == stops
                });
                if !current {
                    return None;
                }
                if let Some(end) = self.end_after_play {
                    return Some(end);
                }
                self.hold_music();
                None
            }
            Some(MediaNote::NoMedia) => {
                info!(
                    seconds = self.inner.limits.no_media_seconds,
                    "no media from the called-back caller; hanging up"
                );
                self.caller_gone().await
            }
            Some(MediaNote::LegSilent) => {
                // As for a live call's operator (`Call::probe_operator_leg`): ask first.
                let a = self.agent.as_mut().filter(|a| a.probe.is_none())?;
                let probe = LegProbe::new(tokio::time::Instant::now());
                a.probe = Some(probe);
                info!(
                    agent = %a.id,
                    seconds = self.inner.limits.operator_silence_seconds,
                    "no audio from the operator's phone; asking whether it is still there"
                );
                a.handle
                    .request(probe.req, Method::Options, vec![], None)
                    .await;
                None
            }
            // Keys reach the operator through the bridge; nothing records a call-back.
            Some(MediaNote::Digit(_) | MediaNote::RecordingData | MediaNote::RecordingEnded) => {
                None
            }
        }
    }

    async fn drop_trunk(&mut self) {
        if let Some(t) = self.trunk.take() {
            // Nothing more is sent to a phone we are hanging up on.
            if let Some(m) = &t.media {
                m.end();
            }
            t.handle.hangup().await;
            t.handle.release();
        }
        self.trunk_events = None;
        self.trunk_port = None;
        self.notes = None;
    }

    async fn drop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            if a.answered.is_some() {
                if let Some(m) = self.trunk_media() {
                    m.lock().set_bridge(None);
                }
            }
            a.handle.hangup().await;
            a.handle.release();
        }
        self.agent_events = None;
        self.agent_port = None;
    }

    async fn finish(mut self, end: End) {
        let agent = self.agent.as_ref().map(|a| a.id.clone());
        self.drop_agent().await;
        self.drop_trunk().await;
        let queues = &self.inner.queues;
        match (end, self.served) {
            (_, true) => {
                if let Some(agent) = agent {
                    queues.call_ended(&agent).await;
                } else {
                    // The agent's BYE already dropped the leg: the queue knows the agent by
                    // the caller.
                    queues.abandon(self.req.caller).await;
                }
            }
            (End::Shutdown, false) => {
                // The queue may be gone already; if not, free the place.
                queues.abandon(self.req.caller).await;
            }
            _ => {}
        }
        info!(?end, served = self.served, "call-back finished");
        let why = match (end, self.served) {
            (_, true) | (End::CallerLeft, _) | (End::Served, _) => return,
            (End::Unreached, _) => "Call-back requested; the caller did not answer any attempt",
            (End::NoOperator, _) if self.ticket_filed => return,
            (End::NoOperator, _) => "Call-back answered, but no operator could take the call",
            (End::Shutdown, _) => "Call-back still pending when the server stopped",
        };
        self.file_ticket(why).await;
    }

    /// The flagged ticket that stands in for a call-back that did not happen; whether it
    /// was saved.
    async fn file_ticket(&self, why: &str) -> bool {
        let t = flagged_ticket(why, &self.req.number, &self.req.language, &self.req.call_id);
        file_flagged(&self.inner.tickets, t).await
    }
}

/// A ticket flagged for call-back: the general service, the caller's number to call, `why`
/// as its description. It stands in for a call-back the server could not make (or was not
/// configured to make).
pub fn flagged_ticket(why: &str, number: &str, language: &str, call_id: &str) -> NewTicket {
    NewTicket {
        service_code: crate::menu::engine::GENERAL_SERVICE.into(),
        service_name: crate::menu::engine::GENERAL_SERVICE_NAME.into(),
        description: Some(why.to_owned()),
        phone: Some(number.to_owned()),
        channel: Channel::Phone,
        language: Some(language.to_owned()),
        call_id: Some(call_id.to_owned()),
        callback_requested: true,
        ..NewTicket::default()
    }
}

/// Write a flagged ticket, logging the outcome; whether it is durable.
pub async fn file_flagged(store: &TicketStore, t: NewTicket) -> bool {
    match store.file(t).await {
        Ok(t) => {
            info!(id = t.service_request_id, "call-back ticket filed");
            true
        }
        Err(e) => {
            error!(error = %e, "call-back ticket could not be filed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialable_numbers() {
        for ok in ["+15550001111", "5551234", "311"] {
            assert!(dialable(ok), "{ok}");
        }
        for bad in [
            "anonymous",
            "",
            "+",
            "12",
            "555 1234",
            "+1555x",
            "123456789012345678901",
        ] {
            assert!(!dialable(bad), "{bad}");
        }
    }

    #[test]
    fn numbers_are_read_as_e164() {
        for (raw, e) in [
            ("+12122000123", Some("+12122000123")),
            ("+1-212-200-0123", Some("+12122000123")),
            ("12122000123", Some("+12122000123")),
            ("2122000123", Some("+12122000123")),
            ("(212) 200.0123", Some("+12122000123")),
            ("+442079460000", Some("+442079460000")),
            ("0114420794600", None),
            ("1125550123", None),
            ("5550123", None),
            ("anonymous", None),
            ("+", None),
            ("+1234567890123456", None),
        ] {
            assert_eq!(e164(raw).as_deref(), e, "{raw}");
        }
    }

    #[test]
    fn nanp_geographic_is_us_and_canada_lines_only() {
        for ok in [
            "+12122000123", // New York
            "+14162000123", // Toronto
            "+17872000123", // Puerto Rico (US)
            "+13402000123", // US Virgin Islands
            "+15102000123", // a 5XX area code that is a place (Oakland)
        ] {
            assert!(nanp_geographic(ok), "{ok}");
        }
        for bad in [
            "+19002000123", // premium
            "+12129760123", // 976 exchange: premium
            "+18002000123", // toll-free
            "+18882000123",
            "+18762000123",  // Jamaica
            "+18092000123",  // Dominican Republic
            "+12842000123",  // British Virgin Islands
            "+15002000123",  // personal communications
            "+14562000123",  // inbound international
            "+13112000123",  // N11 area code
            "+12124110123",  // N11 exchange
            "+12120550123",  // exchange starting 0
            "+12125550123",  // 555: directory assistance and fictional numbers
            "+11122000123",  // area code starting 1
            "+19922000123",  // area code with 9 in the middle
            "+882345678901", // international network
            "+442079460000", // UK
            "+1212200012",   // too short
        ] {
            assert!(!nanp_geographic(bad), "{bad}");
        }
    }

    #[test]
    fn dial_plan_patterns() {
        let p = |t: &str| t.parse::<NumberPattern>().unwrap();
        assert!(p("+1 NXX-NXX-XXXX").matches("+12122000123"));
        assert!(!p("+1NXXNXXXXXX").matches("+11125550123"));
        assert!(!p("+1NXXNXXXXXX").matches("+121220001234"));
        assert!(p("+44X.").matches("+442079460000"));
        assert!(!p("+44X.").matches("+44"));
        assert!(!p("+44X.").matches("+4"));
        assert!(p("+1[2-46]12ZXXXXXX").matches("+16121555012"));
        assert!(!p("+1[2-46]12ZXXXXXX").matches("+15121555012"));
        assert!(!p("+1[2-46]12ZXXXXXX").matches("+16120555012"));
        assert!(p("nanp-geographic").matches("+12122000123"));
        assert_eq!(p("NANP-Geographic"), NumberPattern::NanpGeographic);
        assert_eq!(p("+1NXX").to_string(), "+1NXX");
        for bad in [
            "1NXXNXXXXXX",
            "+1NXQ",
            "+1[2-",
            "+1[]",
            "+1[9-2]",
            "+1.X",
            "+",
            "+--",
        ] {
            assert!(bad.parse::<NumberPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_an_asserted_allowed_number_is_called_back() {
        use crate::call::CallerIdentity::{Asserted, Claimed};
        let c = CallbackConfig::default();
        assert_eq!(
            c.callback_number(&Asserted("+1-212-200-0123".into())),
            Ok(CallbackNumber {
                dial: "+12122000123".into(),
                e164: "+12122000123".into()
            })
        );
        // Dialled as the trunk wrote it; counted and matched as E.164.
        assert_eq!(
            c.callback_number(&Asserted("2122000123".into())),
            Ok(CallbackNumber {
                dial: "2122000123".into(),
                e164: "+12122000123".into()
            })
        );
        assert_eq!(
            c.callback_number(&Claimed("+12122000123".into())),
            Err(Unavailable::Unverified)
        );
        assert_eq!(
            c.callback_number(&Asserted("anonymous".into())),
            Err(Unavailable::NotDialable)
        );
        assert_eq!(
            c.callback_number(&Asserted("+882345678901".into())),
            Err(Unavailable::NotAllowed)
        );
        assert_eq!(
            c.callback_number(&Asserted("+19002000123".into())),
            Err(Unavailable::NotAllowed)
        );
        let mut c = CallbackConfig {
            allowed_numbers: vec!["nanp-geographic".parse().unwrap(), "+44X.".parse().unwrap()],
            refused_numbers: vec!["+1212XXXXXXX".parse().unwrap()],
            ..CallbackConfig::default()
        };
        assert!(c.callback_number(&Asserted("+442079460000".into())).is_ok());
        assert_eq!(
            c.callback_number(&Asserted("+12122000123".into())),
            Err(Unavailable::NotAllowed)
        );
        c.per_number_per_day = 0;
        assert_eq!(
            c.callback_number(&Asserted("+442079460000".into())),
            Err(Unavailable::DailyLimit)
        );
    }
}
