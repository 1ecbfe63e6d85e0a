//! Operator log-in: a sans-IO SIP registrar (RFC 3261 §10) with digest authentication
//! (RFC 7616, compatible with RFC 2617 clients).
//!
//! Operators log in by registering a SIP phone: the address-of-record is `sip:<agent id>@...`
//! (the To URI's user part is the agent id) and the digest user name must be that same id.
//! Nothing here does I/O or reads a clock: the UA core passes the time in, sends the reply, and
//! hands the [`AgentEvent`]s on.
//!
//! Bindings (§10.3):
//! - each Contact's `expires` parameter, else the `Expires` header, else 3600 s; anything from
//!   1 to 59 s is refused with `423 Interval Too Brief` and `Min-Expires: 60`; more than 7200 s
//!   is cut to 7200;
//! - `expires=0` removes that contact; `Contact: *` with `Expires: 0` removes them all;
//! - a known contact is refreshed when the Call-ID differs or the CSeq is higher; the same
//!   Call-ID with a CSeq not higher fails the whole request with 500 (step 7), nothing changed;
//! - an agent may have several phones (up to 10 contacts; the oldest is dropped beyond that). The
//!   newest registration (a new contact, or a known one under a new Call-ID, i.e. a rebooted
//!   phone) is the preferred contact; a plain refresh does not change the preference;
//! - the 200 lists every current binding of the agent with its remaining `expires`.
//!
//! Authentication: a REGISTER without credentials gets `401 Unauthorized` with two
//! `WWW-Authenticate` challenges, `algorithm=SHA-256` first and `algorithm=MD5` (RFC 8760),
//! both `qop="auth"`, sharing one nonce. The nonce is stateless: its creation time, a counter,
//! and an HMAC-SHA-256 of both under a secret made at start, so a restart (new secret) simply
//! makes old nonces stale. A nonce lives 5 minutes; after that, a request whose digest is
//! right gets a fresh challenge with `stale=true` (the phone retries without asking the user).
//! Replays are refused: the nonce count `nc` of each nonce in use must strictly increase. Only
//! `qop=auth` is accepted: the RFC 2069 form (no qop) has no nonce count, hence no replay
//! protection, and every client that understands our challenge does `qop=auth`.
//!
//! A wrong password, an unknown agent id and a malformed `Authorization` all get the same answer,
//! a 401 with a fresh challenge, computed the same way (an unknown id is checked against a dummy
//! password, and digests are compared in constant time), so the server never tells whether an
//! agent id exists.
//!
//! Credentials: an agent's password, or only its stored digest hashes (`HA1 =
//! H(id:realm:password)` for each algorithm offered, [`AgentSecret::Ha1`], made by
//! `ivr311 agent-hash`), so that the config need not hold the password. A stored HA1 still
//! lets whoever reads it log in as that agent here (digest needs no more), but it does not give
//! away the password, which people reuse elsewhere, and it is bound to this realm ([`REALM`]).
//!
//! Guessing. Nonces are bound to the source they were sent to (an IPv4 address or an IPv6 /64,
//! `Source`): the HMAC covers it, and a nonce answered from another source is not ours. A
//! failed attempt counts only when it answers a nonce we sent to that same source, i.e. from
//! a peer that receives our answers there: spoofed UDP, which never sees the challenge, counts
//! for nothing and can lock nobody out. What counts:
//!
//! - per source: 5 failures within 60 s and the source is refused for 60 s (`403`, no
//!   evaluation), for every account except those whose usual address it is (below);
//! - per account, in two classes, as "smart lockout" does: attempts from the agent's usual
//!   addresses (sources it logged in from successfully in the last 30 days, up to 8) and
//!   attempts from anywhere else. 5 failures of a class within 10 minutes lock that class for
//!   60 s, doubling with each further lock up to an hour; a success in the class resets it. So
//!   guesses from elsewhere lock out new addresses only, and the agent's phone at its usual
//!   address keeps logging in with the right password. A locked class gets `403` without its
//!   digest being looked at. Names that are no agent are tracked the same way (bounded), so
//!   the answers never tell whether an agent exists. `Registrar::locks` lists the agents
//!   locked now (for `/admin/agents`).
//!
//! A request without credentials always gets a challenge (a phone behind a blocked source
//! needs one to prove itself); stale nonces, replays and successes do not count as failures.
//! At most 10,000 sources and 10,000 names are tracked (the oldest forgotten first; configured
//! agents never are), and at most 10,000 nonces in use. Usual addresses are learned since
//! start: after a restart an agent's first log-in comes from a new address.
//!
//! The client side of the same digest lives here too (`answer_challenge`): the UA answers a
//! SIP trunk's `401`/`407` to our outbound INVITEs (911 bridges, call-backs) with the
//! configured [`Credentials`].

use crate::sip::guard::Source;
use crate::sip::message::{sanitize_quoted, split_list, NameAddr, Request};
use crate::sip::transport::Flow;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tracing::{debug, info, warn};

/// How agents' phones authenticate (the `registrar:` section).
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrarConfig {
    /// Digest algorithms offered, in order. Default `[SHA-256, MD5]`. Phones built on libre
    /// 1.x (Debian's baresip 1.0) give up when offered SHA-256: use `[MD5]` for them.
    pub digest_algorithms: Vec<String>,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            digest_algorithms: vec!["SHA-256".into(), "MD5".into()],
        }
    }
}

/// Expiry given to a binding when the REGISTER names none, in seconds.
pub(crate) const DEFAULT_EXPIRES: u64 = 3600;
/// Shortest binding accepted (shorter gets 423 with this as `Min-Expires`), in seconds.
pub(crate) const MIN_EXPIRES: u64 = 60;
/// Longest binding granted (longer requests are cut to this), in seconds.
pub(crate) const MAX_EXPIRES: u64 = 7200;
/// How long a nonce may be used.
pub(crate) const NONCE_LIFETIME: Duration = Duration::from_secs(300);
/// The digest realm of the registrar (and of the `password_ha1` hashes `ivr311 agent-hash`
/// makes).
pub const REALM: &str = "ivr311";
/// Failed attempts from one source within [`FAILURE_WINDOW`] that get it blocked.
pub(crate) const MAX_FAILURES: usize = 5;
/// The window failed attempts of a source are counted in.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a blocked source gets 403.
pub(crate) const BLOCK_FOR: Duration = Duration::from_secs(60);
/// Failed attempts on one account, from one class of sources, within [`ACCOUNT_WINDOW`] that
/// lock that class.
pub(crate) const ACCOUNT_MAX_FAILURES: usize = 5;
/// The window an account's failures are counted in.
pub(crate) const ACCOUNT_WINDOW: Duration = Duration::from_secs(600);
/// The first lock of an account's class; each further one doubles, up to [`LOCK_MAX`].
pub(crate) const LOCK_BASE: Duration = Duration::from_secs(60);
/// The longest lock.
pub(crate) const LOCK_MAX: Duration = Duration::from_secs(3600);
/// How long a source an agent logged in from stays one of its usual addresses.
pub(crate) const USUAL_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most usual addresses per agent (the oldest is forgotten first).
const MAX_USUAL: usize = 8;

/// Most sources whose failures are tracked.
const MAX_TRACKED_IPS: usize = 10_000;
/// Most names that are no agent whose failures are tracked.
const MAX_TRACKED_NAMES: usize = 10_000;
/// Longest user name tracked as is (longer ones share one entry per prefix).
const MAX_NAME_LEN: usize = 64;
/// Most nonces whose count is tracked.
const MAX_TRACKED_NONCES: usize = 10_000;
/// Most contacts per agent.
const MAX_BINDINGS_PER_AGENT: usize = 10;
/// Longest contact URI kept.
const MAX_CONTACT_LEN: usize = 256;
/// Unknown agent ids are checked against this, so that they cost the same as known ones.
const DUMMY_PASSWORD: &str = "\u{1}ivr311-no-such-agent\u{1}";
/// How often the failure and nonce tables are pruned.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// An agent's log-in state changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The agent's preferred contact is now `contact`, reached over `flow` (the path the REGISTER
    /// came in on, which works through NAT where the Contact may not). Raised on the first
    /// registration, and again whenever the preferred contact or its flow changes.
    LoggedIn {
        agent: String,
        contact: String,
        flow: Flow,
    },
    /// The agent's last binding is gone (unregistered or expired).
    LoggedOut { agent: String },
}

/// What [`Registrar::authorize_call`] makes of an INVITE.
#[derive(Debug, PartialEq)]
pub(crate) enum CallAuth {
    /// Not an agent's phone: a caller like any other.
    NotAgent,
    /// Agent `0`'s phone, authenticated.
    Agent(String),
    /// Answer this (401 with a challenge, or 403) and drop the INVITE.
    Refuse(RegisterReply),
}

/// The answer to a REGISTER: status, reason, and the headers to add to the response (the UA
/// core writes Via, From, To, Call-ID and CSeq itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterReply {
    pub code: u16,
    pub reason: &'static str,
    pub headers: Vec<(String, String)>,
}

impl RegisterReply {
    fn new(code: u16, reason: &'static str) -> RegisterReply {
        RegisterReply {
            code,
            reason,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> RegisterReply {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

#[derive(Debug, Clone)]
struct Binding {
    /// The Contact URI as registered.
    uri: String,
    call_id: String,
    cseq: u32,
    expires_at: Instant,
    /// Registration order: higher is newer.
    seq: u64,
    flow: Flow,
}

#[derive(Debug, Clone, Copy)]
struct NonceUse {
    created_ms: u64,
    last_nc: u32,
}

/// An agent's secret as the config gives it: the password, or its digest hashes.
#[derive(Clone, PartialEq, Eq)]
pub enum AgentSecret {
    /// The password itself (`password:` in the config; start-up warns about it).
    Password(String),
    /// `HA1 = H(id:realm:password)` per algorithm, lower-case hex (`password_ha1:`).
    Ha1(PasswordHa1),
}

/// Stored digest hashes of an agent's password, one per algorithm, for the realm [`REALM`].
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordHa1 {
    /// `MD5(id:realm:password)`, 32 hex digits.
    #[serde(rename = "MD5", default, deserialize_with = "hex_md5")]
    pub md5: Option<String>,
    /// `SHA-256(id:realm:password)`, 64 hex digits.
    #[serde(rename = "SHA-256", default, deserialize_with = "hex_sha256")]
    pub sha256: Option<String>,
}

fn hex_of_len<'de, D: serde::Deserializer<'de>>(
    d: D,
    len: usize,
) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(d)?;
    let v = v.trim().to_ascii_lowercase();
    if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(serde::de::Error::custom(format!(
            "expected {len} hex digits (as `ivr311 agent-hash` prints)"
        )));
    }
    Ok(Some(v))
}

fn hex_md5<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    hex_of_len(d, 32)
}

fn hex_sha256<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    hex_of_len(d, 64)
}

use serde::Deserialize as _;

impl PasswordHa1 {
    /// The hashes of `password` for agent `id` in `realm`.
    pub fn of(id: &str, realm: &str, password: &str) -> PasswordHa1 {
        let data = format!("{id}:{realm}:{password}");
        PasswordHa1 {
            md5: Some(Algorithm::Md5.hex(&data)),
            sha256: Some(Algorithm::Sha256.hex(&data)),
        }
    }

    /// The names of the algorithms (as `registrar.digest_algorithms` spells them) with a hash.
    pub(crate) fn algorithms(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.sha256.is_some() {
            v.push("SHA-256");
        }
        if self.md5.is_some() {
            v.push("MD5");
        }
        v
    }

    fn get(&self, a: Algorithm) -> Option<&str> {
        match a {
            Algorithm::Md5 => self.md5.as_deref(),
            Algorithm::Sha256 => self.sha256.as_deref(),
        }
    }
}

impl fmt::Debug for PasswordHa1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PasswordHa1({:?})", self.algorithms())
    }
}

impl fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentSecret::Password(_) => f.write_str("Password(..)"),
            AgentSecret::Ha1(h) => h.fmt(f),
        }
    }
}

impl From<String> for AgentSecret {
    fn from(p: String) -> Self {
        AgentSecret::Password(p)
    }
}

impl From<&str> for AgentSecret {
    fn from(p: &str) -> Self {
        AgentSecret::Password(p.to_owned())
    }
}

impl AgentSecret {
    /// Whether there is nothing to check a log-in against.
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            AgentSecret::Password(p) => p.is_empty(),
            AgentSecret::Ha1(h) => h.md5.is_none() && h.sha256.is_none(),
        }
    }

    /// The hashes for agent `id` in `realm`.
    fn ha1(&self, id: &str, realm: &str) -> PasswordHa1 {
        match self {
            AgentSecret::Password(p) => PasswordHa1::of(id, realm, p),
            AgentSecret::Ha1(h) => h.clone(),
        }
    }
}

/// Back-off of one class of an account's attempts.
#[derive(Debug, Default, Clone)]
struct Backoff {
    /// Failures within [`ACCOUNT_WINDOW`], oldest first.
    recent: VecDeque<Instant>,
    locked_until: Option<Instant>,
    /// Locks in a row: the next lasts [`LOCK_BASE`] × 2^level.
    level: u32,
    last_failure: Option<Instant>,
}

impl Backoff {
    fn locked(&self, now: Instant) -> Option<Instant> {
        self.locked_until.filter(|t| now < *t)
    }

    /// Count a failure; the new lock's end, if it locks the class.
    fn fail(&mut self, now: Instant) -> Option<Instant> {
        if self
            .last_failure
            .is_some_and(|t| now.saturating_duration_since(t) >= LOCK_MAX)
        {
            self.level = 0;
        }
        self.last_failure = Some(now);
        self.recent
            .retain(|t| now.saturating_duration_since(*t) < ACCOUNT_WINDOW);
        self.recent.push_back(now);
        if self.recent.len() < ACCOUNT_MAX_FAILURES {
            return None;
        }
        self.recent.clear();
        let lock = LOCK_BASE
            .checked_mul(1u32 << self.level.min(16))
            .unwrap_or(LOCK_MAX)
            .min(LOCK_MAX);
        self.level = self.level.saturating_add(1);
        self.locked_until = now.checked_add(lock);
        self.locked_until
    }

    fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Whether it holds nothing worth keeping at `now`.
    fn idle(&self, now: Instant) -> bool {
        self.locked(now).is_none()
            && self
                .last_failure
                .is_none_or(|t| now.saturating_duration_since(t) >= LOCK_MAX)
    }
}

/// Attempts on one account (an agent, or a name that is none).
#[derive(Debug, Default, Clone)]
struct AccountGuard {
    /// Sources the agent logged in from, with when it last did.
    usual: Vec<(Source, Instant)>,
    /// Attempts from usual sources.
    familiar: Backoff,
    /// Attempts from any other source.
    unfamiliar: Backoff,
}

impl AccountGuard {
    fn is_usual(&self, src: Source, now: Instant) -> bool {
        self.usual
            .iter()
            .any(|(s, at)| *s == src && now.saturating_duration_since(*at) < USUAL_FOR)
    }

    fn class(&mut self, familiar: bool) -> &mut Backoff {
        if familiar {
            &mut self.familiar
        } else {
            &mut self.unfamiliar
        }
    }

    fn learn(&mut self, src: Source, now: Instant) {
        self.usual.retain(|(s, _)| *s != src);
        self.usual.push((src, now));
        if self.usual.len() > MAX_USUAL {
            self.usual.remove(0);
        }
    }
}

/// An agent locked out (a class of its sources), as `Registrar::locks` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountLock {
    pub agent: String,
    /// Until when log-ins from addresses the agent has not used are refused.
    pub new_sources_until: Option<Instant>,
    /// Until when log-ins from the agent's usual addresses are refused too.
    pub usual_sources_until: Option<Instant>,
}

#[derive(Debug)]
struct FailRecord {
    /// Failures within the window, oldest first (never more than [`MAX_FAILURES`]).
    recent: VecDeque<Instant>,
    blocked_until: Option<Instant>,
    /// Insertion order, for eviction.
    seq: u64,
}

/// What the Authorization header amounted to.
enum Auth {
    /// The digest is right for this agent id, the nonce fresh and the count new.
    Ok(String),
    /// Ask (again), without counting a failure: no credentials, unusable ones, right
    /// credentials on a nonce that is stale or not ours (`stale`), a replay, or wrong ones on
    /// a nonce this source was never sent.
    Challenge { stale: bool },
    /// Wrong credentials for `user` answering a nonce sent to this source: a failure.
    Failed { user: String, why: &'static str },
    /// Refused unseen: `user`'s class of sources, or this source, is locked.
    Locked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// Lower-case hex of the hash of `data`.
    fn hex(self, data: &str) -> String {
        match self {
            Algorithm::Md5 => hex(&Md5::digest(data.as_bytes())),
            Algorithm::Sha256 => hex(&Sha256::digest(data.as_bytes())),
        }
    }
}

/// The registrar: agents' credentials, their bindings, nonce counts and failure counts.
pub struct Registrar {
    realm: String,
    /// Each agent's HA1 per algorithm.
    agents: HashMap<String, PasswordHa1>,
    /// What an unknown name is checked against, so that it costs the same as an agent.
    dummy: PasswordHa1,
    secret: [u8; 32],
    opaque: String,
    /// The first instant seen; nonce times are milliseconds since then.
    epoch: Option<Instant>,
    nonce_seq: u64,
    nonces: HashMap<String, NonceUse>,
    /// Nonces created at or before this were evicted from `nonces`: treated as stale.
    nonce_floor_ms: Option<u64>,
    bindings: HashMap<String, Vec<Binding>>,
    /// The contact last announced per agent (by [`AgentEvent::LoggedIn`]).
    published: HashMap<String, (String, Flow)>,
    binding_seq: u64,
    failures: HashMap<Source, FailRecord>,
    failure_order: VecDeque<(Source, u64)>,
    failure_seq: u64,
    /// Attempts per account: every agent, and names that are none (bounded, oldest first).
    accounts: HashMap<String, AccountGuard>,
    name_order: VecDeque<String>,
    last_housekeeping: Option<Instant>,
    /// Digest algorithms offered in challenges, in order.
    algorithms: Vec<&'static str>,
}

impl fmt::Debug for Registrar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registrar")
            .field("realm", &self.realm)
            .field("agents", &self.agents.len())
            .field("registered", &self.bindings.len())
            .finish_non_exhaustive()
    }
}

impl Registrar {
    /// `agents` are `(agent id, secret)` pairs; `secret` keys the nonces (make it random at
    /// start). Entries with an empty id or secret are skipped with a warning; agents given a
    /// plain password are named in one warning (store `password_ha1` instead).
    pub(crate) fn new(
        realm: String,
        agents: &[(String, AgentSecret)],
        secret: [u8; 32],
    ) -> Registrar {
        let realm = sanitize_quoted(&realm);
        let realm = if realm.trim().is_empty() {
            REALM.to_owned()
        } else {
            realm
        };
        let mut table = HashMap::new();
        let mut plain = Vec::new();
        for (id, s) in agents {
            let id = id.trim();
            if id.is_empty() || s.is_empty() {
                warn!(agent = %id, "agent without an id or a password; it cannot log in");
                continue;
            }
            if matches!(s, AgentSecret::Password(_)) {
                plain.push(id.to_owned());
            }
            if table.insert(id.to_owned(), s.ha1(id, &realm)).is_some() {
                warn!(agent = %id, "agent listed twice; the last password wins");
            }
        }
        if !plain.is_empty() {
            warn!(
                agents = ?plain,
                "agents with a plain-text password in the config: store its hash instead \
                 (password_ha1, made by `ivr311 agent-hash <id>`)"
            );
        }
        let accounts = table
            .keys()
            .map(|id| (id.clone(), AccountGuard::default()))
            .collect();
        let mut r = Registrar {
            dummy: PasswordHa1::of("", &realm, DUMMY_PASSWORD),
            realm,
            agents: table,
            secret,
            opaque: String::new(),
            epoch: None,
            nonce_seq: 0,
            nonces: HashMap::new(),
            nonce_floor_ms: None,
            bindings: HashMap::new(),
            published: HashMap::new(),
            binding_seq: 0,
            failures: HashMap::new(),
            accounts,
            name_order: VecDeque::new(),
            algorithms: vec!["SHA-256", "MD5"],
            failure_order: VecDeque::new(),
            failure_seq: 0,
            last_housekeeping: None,
        };
        r.opaque = hex(&r.mac(b"opaque", &[])[..8]);
        r
    }

    /// Answer one REGISTER that arrived over `flow`. The events include those of bindings that
    /// expired before `now`.
    pub(crate) fn handle(
        &mut self,
        now: Instant,
        req: &Request,
        flow: Flow,
    ) -> (RegisterReply, Vec<AgentEvent>) {
        let mut events = self.expire(now);
        self.housekeeping(now);
        let src = Source::of(flow.remote.ip());
        let agent = match self.authenticate(now, req, src) {
            Auth::Ok(agent) => agent,
            Auth::Challenge { stale } => return (self.challenge(now, stale, src), events),
            Auth::Failed { user, why } => {
                self.record_failure(src, &user, now, why);
                return (self.challenge(now, false, src), events);
            }
            Auth::Locked => return (RegisterReply::new(403, "Forbidden"), events),
        };
        // §10.3 step 3: an agent registers its own address-of-record only.
        if req.to.user() != Some(agent.as_str()) {
            info!(%agent, to = %req.to.uri, "agent tried to register another address");
            return (RegisterReply::new(403, "Forbidden"), events);
        }
        let reply = match self.update(now, &agent, req, flow) {
            Ok(()) => {
                self.publish(&agent, &mut events);
                self.ok(now, &agent)
            }
            Err(reply) => reply,
        };
        (reply, events)
    }

    /// Whether an INVITE is an agent's phone calling out, and if so whether it proved it:
    /// its From names an agent with a binding registered from the INVITE's source address,
    /// and it carries that agent's digest credentials for the Request-URI (the same
    /// nonces, counts and lock-outs as REGISTER). Any other INVITE is a caller's
    /// ([`CallAuth::NotAgent`]), so a caller who writes an agent's id in From reaches the
    /// menu, never the operators' dial plan.
    pub(crate) fn authorize_call(&mut self, now: Instant, req: &Request, flow: Flow) -> CallAuth {
        let Some(user) = req.from.user() else {
            return CallAuth::NotAgent;
        };
        let from_binding = self.bindings.get(user).is_some_and(|list| {
            list.iter()
                .any(|b| b.expires_at > now && b.flow.remote.ip() == flow.remote.ip())
        });
        if !from_binding {
            return CallAuth::NotAgent;
        }
        let user = user.to_owned();
        self.housekeeping(now);
        let src = Source::of(flow.remote.ip());
        match self.authenticate(now, req, src) {
            Auth::Ok(agent) if agent == user => CallAuth::Agent(agent),
            Auth::Ok(agent) => {
                info!(%agent, from = %user, "an agent's credentials on a call from another agent's id");
                CallAuth::Refuse(RegisterReply::new(403, "Forbidden"))
            }
            Auth::Challenge { stale } => CallAuth::Refuse(self.challenge(now, stale, src)),
            Auth::Failed { user, why } => {
                self.record_failure(src, &user, now, why);
                CallAuth::Refuse(self.challenge(now, false, src))
            }
            Auth::Locked => CallAuth::Refuse(RegisterReply::new(403, "Forbidden")),
        }
    }

    /// Drop the bindings whose time is up (at or before `now`); an agent left with none is
    /// [`AgentEvent::LoggedOut`], one whose preferred contact went falls back to the next newest.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<AgentEvent> {
        let mut changed = Vec::new();
        self.bindings.retain(|agent, list| {
            let before = list.len();
            list.retain(|b| b.expires_at > now);
            if list.len() != before {
                changed.push(agent.clone());
            }
            !list.is_empty()
        });
        changed.sort();
        let mut events = Vec::new();
        for agent in changed {
            self.publish(&agent, &mut events);
        }
        events
    }

    /// The connection `flow` names closed (a browser's WebSocket): the bindings registered
    /// over it cannot be reached any more and go, as if expired (RFC 5626 §5.1 treats a
    /// failed flow so; a browser that reconnects registers again over its new connection).
    pub(crate) fn flow_closed(&mut self, flow: Flow) -> Vec<AgentEvent> {
        let mut changed = Vec::new();
        self.bindings.retain(|agent, list| {
            let before = list.len();
            list.retain(|b| b.flow != flow);
            if list.len() != before {
                changed.push(agent.clone());
            }
            !list.is_empty()
        });
        changed.sort();
        let mut events = Vec::new();
        for agent in changed {
            self.publish(&agent, &mut events);
        }
        events
    }

    /// When the next binding expires (call [`Registrar::expire`] then).
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.bindings.values().flatten().map(|b| b.expires_at).min()
    }

    /// The agent's preferred contact (its newest binding) and the flow it registered over.
    pub(crate) fn contact(&self, agent: &str) -> Option<(String, Flow)> {
        self.bindings
            .get(agent)?
            .iter()
            .max_by_key(|b| b.seq)
            .map(|b| (b.uri.clone(), b.flow))
    }

    /// Each registered agent and when its last binding expires.
    pub(crate) fn expiries(&self) -> impl Iterator<Item = (&str, Instant)> + '_ {
        self.bindings.iter().filter_map(|(agent, bindings)| {
            let last = bindings.iter().map(|b| b.expires_at).max()?;
            Some((agent.as_str(), last))
        })
    }

    /// The agents with at least one binding, sorted.
    #[cfg(test)]
    pub(crate) fn registered(&self) -> Vec<String> {
        let mut v: Vec<String> = self.bindings.keys().cloned().collect();
        v.sort();
        v
    }

    // ---- authentication --------------------------------------------------------------------

    fn authenticate(&mut self, now: Instant, req: &Request, src: Source) -> Auth {
        let mut offered = false;
        let mut params = None;
        for value in req.headers_named("Authorization") {
            offered = true;
            if let Some(p) = parse_digest(value) {
                if p.get("realm").map(String::as_str) == Some(self.realm.as_str()) {
                    params = Some(p);
                    break;
                }
            }
        }
        if !offered {
            return Auth::Challenge { stale: false };
        }
        // Unusable credentials prove nothing about the password: asked again, not counted.
        let unusable = |why: &'static str| {
            debug!(why, "REGISTER credentials unusable");
            Auth::Challenge { stale: false }
        };
        let Some(p) = params else {
            return unusable("no usable Digest credentials for our realm");
        };
        let get = |k: &str| p.get(k).map(String::as_str);
        let (Some(username), Some(nonce), Some(uri), Some(response)) =
            (get("username"), get("nonce"), get("uri"), get("response"))
        else {
            return unusable("missing digest parameter");
        };
        let algorithm = match get("algorithm") {
            None => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("MD5") => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Algorithm::Sha256,
            Some(_) => return unusable("unsupported algorithm"),
        };
        if get("userhash").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return unusable("userhash not supported");
        }
        let (Some(qop), Some(cnonce), Some(nc_raw)) = (get("qop"), get("cnonce"), get("nc")) else {
            return unusable("qop=auth required");
        };
        if !qop.eq_ignore_ascii_case("auth") || cnonce.is_empty() {
            return unusable("qop=auth required");
        }
        let nc = match parse_nc(nc_raw) {
            Some(n) => n,
            None => return unusable("bad nonce count"),
        };
        if !uri_matches(uri, &req.uri) {
            return unusable("digest uri does not match the Request-URI");
        }
        // Locked (this account's class of sources, or this source) before the digest is
        // looked at: a locked class learns nothing, right password or not.
        let user = account_key(username);
        let usual = self
            .accounts
            .get(&user)
            .is_some_and(|a| a.is_usual(src, now));
        let class_locked = self.accounts.get(&user).is_some_and(|a| {
            if usual {
                a.familiar.locked(now).is_some()
            } else {
                a.unfamiliar.locked(now).is_some()
            }
        });
        if class_locked || (self.blocked(src, now) && !usual) {
            debug!(%src, user = %user, usual, "REGISTER refused: locked");
            return Auth::Locked;
        }
        // The same work for an unknown id as for a known one.
        let known = self.agents.get(username).and_then(|h| h.get(algorithm));
        let dummy = self.dummy.get(algorithm).unwrap_or_default();
        let ha1 = known.unwrap_or(dummy);
        let ha2 = algorithm.hex(&format!("{}:{uri}", req.method));
        let expected = algorithm.hex(&format!("{ha1}:{nonce}:{nc_raw}:{cnonce}:{qop}:{ha2}"));
        let given = response.to_ascii_lowercase();
        let right = bool::from(expected.as_bytes().ct_eq(given.as_bytes()));
        // Is the nonce one we sent to this source (and our opaque)?
        let ours = self
            .nonce_time(nonce, src)
            .filter(|_| get("opaque").is_none_or(|o| o == self.opaque));
        if !(right & known.is_some()) {
            return match ours {
                Some(_) => Auth::Failed {
                    user,
                    why: "wrong credentials",
                },
                // Not an answer to our challenge to this source: proves nothing, counts for
                // nothing (spoofed, or a phone that moved between challenge and answer).
                None => Auth::Challenge { stale: false },
            };
        }
        // The credentials are right; is the nonce fresh, and this count new?
        let now_ms = self.millis(now);
        let Some(created) = ours else {
            return Auth::Challenge { stale: true };
        };
        if created > now_ms || now_ms - created > millis(NONCE_LIFETIME) {
            return Auth::Challenge { stale: true };
        }
        match self.nonces.get_mut(nonce) {
            Some(u) if nc <= u.last_nc => {
                debug!(%src, "REGISTER nonce count replayed");
                return Auth::Challenge { stale: false };
            }
            Some(u) => u.last_nc = nc,
            None if self.nonce_floor_ms.is_some_and(|f| created <= f) => {
                return Auth::Challenge { stale: true }
            }
            None => {
                self.nonces.insert(
                    nonce.to_owned(),
                    NonceUse {
                        created_ms: created,
                        last_nc: nc,
                    },
                );
                self.evict_nonces(now_ms);
            }
        }
        // A success: this source is one of the agent's usual addresses, and its class starts
        // afresh.
        if let Some(a) = self.accounts.get_mut(&user) {
            a.class(usual).reset();
            a.learn(src, now);
        }
        Auth::Ok(username.to_owned())
    }

    /// Offer only these digest algorithms (`SHA-256`, `MD5`), in this order. Some phones
    /// (libre 1.x, hence Debian's baresip 1.0) give up on a 401 that offers any algorithm they
    /// do not know, so a city with such phones offers MD5 alone. Unknown names are ignored;
    /// an empty list keeps the default (SHA-256 then MD5).
    pub(crate) fn with_algorithms(mut self, names: &[String]) -> Self {
        let chosen: Vec<&'static str> = names
            .iter()
            .filter_map(|n| match n.to_ascii_uppercase().as_str() {
                "SHA-256" => Some("SHA-256"),
                "MD5" => Some("MD5"),
                _ => None,
            })
            .collect();
        if !chosen.is_empty() {
            self.algorithms = chosen;
        }
        self
    }

    /// A 401 with a fresh nonce: one challenge per offered algorithm (SHA-256 first, then MD5,
    /// by default).
    fn challenge(&mut self, now: Instant, stale: bool, src: Source) -> RegisterReply {
        let nonce = self.new_nonce(now, src);
        let stale = if stale { ", stale=true" } else { "" };
        let mut reply = RegisterReply::new(401, "Unauthorized");
        for algorithm in self.algorithms.clone() {
            reply = reply.header(
                "WWW-Authenticate",
                format!(
                    "Digest realm=\"{}\", qop=\"auth\", algorithm={algorithm}, nonce=\"{nonce}\", opaque=\"{}\"{stale}",
                    self.realm, self.opaque
                ),
            );
        }
        reply
    }

    /// Milliseconds since the first instant this registrar saw.
    fn millis(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        millis(now.saturating_duration_since(epoch))
    }

    fn mac(&self, label: &[u8], data: &[u8]) -> [u8; 32] {
        // HMAC pads keys to the block size with zeros; doing it here makes `new` infallible.
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&self.secret);
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&key.into());
        mac.update(label);
        mac.update(&[0]);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// time (8 bytes) ‖ counter (8 bytes) ‖ HMAC of both and of the source it is sent to
    /// (16 bytes), in hex.
    fn new_nonce(&mut self, now: Instant, src: Source) -> String {
        let ts = self.millis(now);
        self.nonce_seq = self.nonce_seq.wrapping_add(1);
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&ts.to_be_bytes());
        body[8..].copy_from_slice(&self.nonce_seq.to_be_bytes());
        let mac = self.mac(b"nonce", &nonce_input(&body, src));
        let mut out = hex(&body);
        out.push_str(&hex(&mac[..16]));
        out
    }

    /// The creation time of a nonce we made and sent to `src` (None: not ours, altered, or
    /// sent to another source).
    fn nonce_time(&self, nonce: &str, src: Source) -> Option<u64> {
        let raw = unhex(nonce)?;
        if raw.len() != 32 {
            return None;
        }
        let mac = self.mac(b"nonce", &nonce_input(&raw[..16], src));
        if !bool::from(mac[..16].ct_eq(&raw[16..])) {
            return None;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        Some(u64::from_be_bytes(ts))
    }

    /// Keep the nonce table bounded: drop expired nonces, then the oldest tenth. Nonces not
    /// newer than the newest dropped are stale from then on, so dropping never allows a replay.
    fn evict_nonces(&mut self, now_ms: u64) {
        if self.nonces.len() <= MAX_TRACKED_NONCES {
            return;
        }
        let life = millis(NONCE_LIFETIME);
        self.nonces
            .retain(|_, u| now_ms.saturating_sub(u.created_ms) <= life);
        if self.nonces.len() <= MAX_TRACKED_NONCES {
            return;
        }
        let mut created: Vec<u64> = self.nonces.values().map(|u| u.created_ms).collect();
        created.sort_unstable();
        let cut = created[created.len() / 10];
        self.nonces.retain(|_, u| u.created_ms > cut);
        self.nonce_floor_ms = Some(self.nonce_floor_ms.map_or(cut, |f| f.max(cut)));
        warn!(
            tracked = self.nonces.len(),
            "nonce table full; the oldest nonces are now stale"
        );
    }

    // ---- failures ----------------------------------------------------------------------------

    fn blocked(&mut self, ip: Source, now: Instant) -> bool {
        let Some(r) = self.failures.get_mut(&ip) else {
            return false;
        };
        match r.blocked_until {
            Some(until) if now < until => true,
            Some(_) => {
                r.blocked_until = None;
                r.recent.clear();
                info!(%ip, "registration block lifted");
                false
            }
            None => false,
        }
    }

    /// A failed attempt on `user` from `ip` (that answered a nonce sent there): counted for
    /// the source and for the account's class of sources.
    fn record_failure(&mut self, ip: Source, user: &str, now: Instant, why: &'static str) {
        self.record_account_failure(ip, user, now);
        self.record_source_failure(ip, now, why);
    }

    fn record_account_failure(&mut self, src: Source, user: &str, now: Instant) {
        if !self.accounts.contains_key(user) {
            self.accounts
                .insert(user.to_owned(), AccountGuard::default());
            self.name_order.push_back(user.to_owned());
            self.evict_names();
        }
        let Some(a) = self.accounts.get_mut(user) else {
            return;
        };
        let usual = a.is_usual(src, now);
        if let Some(until) = a.class(usual).fail(now) {
            let secs = until.saturating_duration_since(now).as_secs();
            let from = if usual {
                "its usual addresses too"
            } else {
                "new addresses"
            };
            warn!(
                user = %user,
                %src,
                seconds = secs,
                "{ACCOUNT_MAX_FAILURES} failed registrations within {} min; refusing log-ins from {from} for {secs} s",
                ACCOUNT_WINDOW.as_secs() / 60
            );
        }
    }

    /// Keep the names that are no agent bounded: forget the oldest. Agents are never in
    /// `name_order`, so never forgotten; names with nothing left to remember go at the next
    /// housekeeping anyway.
    fn evict_names(&mut self) {
        while self.accounts.len().saturating_sub(self.agents.len()) > MAX_TRACKED_NAMES {
            let Some(n) = self.name_order.pop_front() else {
                break;
            };
            if !self.agents.contains_key(&n) {
                self.accounts.remove(&n);
            }
        }
    }

    /// The agents locked out now (for `/admin/agents`), sorted by id.
    pub(crate) fn locks(&self, now: Instant) -> Vec<AccountLock> {
        let mut v: Vec<AccountLock> = self
            .agents
            .keys()
            .filter_map(|id| {
                let a = self.accounts.get(id)?;
                let new_sources_until = a.unfamiliar.locked(now);
                let usual_sources_until = a.familiar.locked(now);
                (new_sources_until.is_some() || usual_sources_until.is_some()).then(|| {
                    AccountLock {
                        agent: id.clone(),
                        new_sources_until,
                        usual_sources_until,
                    }
                })
            })
            .collect();
        v.sort_by(|a, b| a.agent.cmp(&b.agent));
        v
    }

    fn record_source_failure(&mut self, ip: Source, now: Instant, why: &'static str) {
        if !self.failures.contains_key(&ip) {
            self.failure_seq += 1;
            let seq = self.failure_seq;
            self.failures.insert(
                ip,
                FailRecord {
                    recent: VecDeque::new(),
                    blocked_until: None,
                    seq,
                },
            );
            self.failure_order.push_back((ip, seq));
            self.evict_failures();
        }
        let Some(r) = self.failures.get_mut(&ip) else {
            return;
        };
        r.recent
            .retain(|t| now.saturating_duration_since(*t) < FAILURE_WINDOW);
        r.recent.push_back(now);
        debug!(%ip, why, failures = r.recent.len(), "REGISTER not authenticated");
        if r.recent.len() >= MAX_FAILURES {
            r.recent.clear();
            r.blocked_until = Some(now.checked_add(BLOCK_FOR).unwrap_or(now));
            warn!(
                %ip,
                "{MAX_FAILURES} failed registrations within {} s; refusing this source for {} s",
                FAILURE_WINDOW.as_secs(),
                BLOCK_FOR.as_secs()
            );
        }
    }

    fn evict_failures(&mut self) {
        while self.failures.len() > MAX_TRACKED_IPS {
            let Some((ip, seq)) = self.failure_order.pop_front() else {
                break;
            };
            if self.failures.get(&ip).is_some_and(|r| r.seq == seq) {
                self.failures.remove(&ip);
            }
        }
        self.compact_failure_order();
    }

    /// Forget queue entries of addresses no longer tracked, once they are the majority.
    fn compact_failure_order(&mut self) {
        if self.failure_order.len() > 2 * self.failures.len() + 64 {
            let failures = &self.failures;
            self.failure_order
                .retain(|(ip, seq)| failures.get(ip).is_some_and(|r| r.seq == *seq));
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        if self
            .last_housekeeping
            .is_some_and(|t| now.saturating_duration_since(t) < HOUSEKEEPING_EVERY)
        {
            return;
        }
        self.last_housekeeping = Some(now);
        self.failures.retain(|_, r| {
            r.blocked_until.is_some_and(|t| now < t)
                || r.recent
                    .iter()
                    .any(|t| now.saturating_duration_since(*t) < FAILURE_WINDOW)
        });
        self.compact_failure_order();
        let agents = &self.agents;
        self.accounts.retain(|n, a| {
            agents.contains_key(n) || !(a.familiar.idle(now) && a.unfamiliar.idle(now))
        });
        let accounts = &self.accounts;
        self.name_order.retain(|n| accounts.contains_key(n));
        let now_ms = self.millis(now);
        let life = millis(NONCE_LIFETIME);
        self.nonces
            .retain(|_, u| now_ms.saturating_sub(u.created_ms) <= life);
    }

    // ---- bindings ------------------------------------------------------------------------------

    /// Apply the request's Contacts to the agent's bindings, all or nothing.
    fn update(
        &mut self,
        now: Instant,
        agent: &str,
        req: &Request,
        flow: Flow,
    ) -> Result<(), RegisterReply> {
        let bad = |why: &str| {
            RegisterReply::new(400, "Bad Request").header(
                "Warning",
                format!("399 ivr311 \"{}\"", sanitize_quoted(why)),
            )
        };
        let values: Vec<&str> = req.headers_named("Contact").flat_map(split_list).collect();
        let header_expires = req.header("Expires").and_then(parse_delta);
        let original = self.bindings.get(agent).cloned().unwrap_or_default();
        let server_error = || {
            RegisterReply::new(500, "Server Internal Error").header(
                "Warning",
                "399 ivr311 \"CSeq not higher than the one of this registration\"",
            )
        };

        if values.contains(&"*") {
            if values.len() != 1 || header_expires != Some(0) {
                return Err(bad("Contact: * needs Expires: 0 and no other contact"));
            }
            if original
                .iter()
                .any(|b| b.call_id == req.call_id && req.cseq <= b.cseq)
            {
                return Err(server_error());
            }
            if !original.is_empty() {
                info!(%agent, "all contacts unregistered");
            }
            self.bindings.remove(agent);
            return Ok(());
        }

        // Parse and check every contact before changing anything.
        let mut wanted: Vec<(String, u64)> = Vec::new();
        for v in &values {
            let contact = NameAddr::parse(v).map_err(|_| bad("malformed Contact"))?;
            let uri = contact.uri.clone();
            let scheme_ok = uri.split_once(':').is_some_and(|(s, _)| {
                s.eq_ignore_ascii_case("sip") || s.eq_ignore_ascii_case("sips")
            });
            let clean = !uri
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'));
            if !scheme_ok || !clean || uri.len() > MAX_CONTACT_LEN {
                return Err(bad("Contact must be a sip: URI"));
            }
            let expires = contact
                .param("expires")
                .and_then(parse_delta)
                .or(header_expires)
                .unwrap_or(DEFAULT_EXPIRES);
            if expires > 0 && expires < MIN_EXPIRES {
                return Err(RegisterReply::new(423, "Interval Too Brief")
                    .header("Min-Expires", MIN_EXPIRES.to_string()));
            }
            let expires = expires.min(MAX_EXPIRES);
            match wanted.iter_mut().find(|(u, _)| same_uri(u, &uri)) {
                Some(w) => w.1 = expires,
                None => wanted.push((uri, expires)),
            }
        }

        let mut list = original.clone();
        for (uri, expires) in wanted {
            if original
                .iter()
                .any(|b| same_uri(&b.uri, &uri) && b.call_id == req.call_id && req.cseq <= b.cseq)
            {
                return Err(server_error());
            }
            let at = list.iter().position(|b| same_uri(&b.uri, &uri));
            if expires == 0 {
                if let Some(i) = at {
                    list.remove(i);
                    info!(%agent, contact = %uri, "contact unregistered");
                }
                continue;
            }
            let expires_at = now.checked_add(Duration::from_secs(expires)).unwrap_or(now);
            match at {
                Some(i) => {
                    let b = &mut list[i];
                    if b.call_id != req.call_id {
                        // Another Call-ID: the phone restarted; a new registration.
                        self.binding_seq += 1;
                        b.seq = self.binding_seq;
                        b.call_id = req.call_id.clone();
                    }
                    b.uri = uri;
                    b.cseq = req.cseq;
                    b.expires_at = expires_at;
                    b.flow = flow;
                }
                None => {
                    self.binding_seq += 1;
                    list.push(Binding {
                        uri,
                        call_id: req.call_id.clone(),
                        cseq: req.cseq,
                        expires_at,
                        seq: self.binding_seq,
                        flow,
                    });
                }
            }
        }
        if list.len() > MAX_BINDINGS_PER_AGENT {
            list.sort_by_key(|b| std::cmp::Reverse(b.seq));
            list.truncate(MAX_BINDINGS_PER_AGENT);
            info!(%agent, "too many contacts; the oldest were dropped");
        }
        if list.is_empty() {
            self.bindings.remove(agent);
        } else {
            self.bindings.insert(agent.to_owned(), list);
        }
        Ok(())
    }

    /// Announce the agent's preferred contact if it changed.
    fn publish(&mut self, agent: &str, events: &mut Vec<AgentEvent>) {
        let newest = self.contact(agent);
        if newest.as_ref() == self.published.get(agent) {
            return;
        }
        match newest {
            Some((contact, flow)) => {
                info!(%agent, %contact, remote = %flow.remote, "agent logged in");
                self.published
                    .insert(agent.to_owned(), (contact.clone(), flow));
                events.push(AgentEvent::LoggedIn {
                    agent: agent.to_owned(),
                    contact,
                    flow,
                });
            }
            None => {
                info!(%agent, "agent logged out");
                self.published.remove(agent);
                events.push(AgentEvent::LoggedOut {
                    agent: agent.to_owned(),
                });
            }
        }
    }

    /// 200 with every binding of the agent, newest first, and its remaining time.
    fn ok(&self, now: Instant, agent: &str) -> RegisterReply {
        let mut reply = RegisterReply::new(200, "OK");
        let mut list: Vec<&Binding> = self.bindings.get(agent).into_iter().flatten().collect();
        list.sort_by_key(|b| std::cmp::Reverse(b.seq));
        for b in list {
            let left = b.expires_at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            reply = reply.header("Contact", format!("<{}>;expires={secs}", b.uri));
        }
        reply
    }
}

/// What a nonce's MAC covers: its body and the source it is sent to.
fn nonce_input(body: &[u8], src: Source) -> Vec<u8> {
    let mut v = body.to_vec();
    match src {
        Source::V4(a) => {
            v.push(4);
            v.extend_from_slice(&a.octets());
        }
        Source::V6Net(segs) => {
            v.push(6);
            for s in segs {
                v.extend_from_slice(&s.to_be_bytes());
            }
        }
    }
    v
}

/// The key an attempt's user name is tracked under (long names cut, on a char boundary).
fn account_key(username: &str) -> String {
    match username.char_indices().nth(MAX_NAME_LEN) {
        Some((i, _)) => username[..i].to_owned(),
        None => username.to_owned(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// A delta-seconds value; absurdly large ones saturate (and are cut to the maximum later).
fn parse_delta(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse().unwrap_or(u64::MAX))
}

/// `nc`: exactly 8 hex digits, not zero.
fn parse_nc(v: &str) -> Option<u32> {
    if v.len() != 8 {
        return None;
    }
    u32::from_str_radix(v, 16).ok().filter(|n| *n > 0)
}

/// Contact URI equality, simplified (RFC 3261 §19.1.4 compares most parts case-insensitively).
fn same_uri(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The digest `uri` against the Request-URI, loosely: case, URI parameters, headers and the
/// default port do not matter.
fn uri_matches(digest_uri: &str, request_uri: &str) -> bool {
    fn norm(u: &str) -> String {
        let u = u.trim().trim_start_matches('<').trim_end_matches('>');
        let u = u.split([';', '?']).next().unwrap_or(u).to_ascii_lowercase();
        match u.strip_suffix(":5060") {
            Some(s) if u.starts_with("sip:") => s.to_owned(),
            _ => u,
        }
    }
    norm(digest_uri) == norm(request_uri)
}

/// Parse `Digest name=value, name="quoted value", ...` into lower-case names and unquoted
/// values. None when the scheme is not Digest, the syntax is broken, or a name repeats.
fn parse_digest(value: &str) -> Option<HashMap<String, String>> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("Digest") {
        return None;
    }
    let b = rest.as_bytes();
    let mut i = 0;
    let mut out = HashMap::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b[i])) {
            i += 1;
        }
        let name = rest.get(start..i)?.to_ascii_lowercase();
        if name.is_empty() {
            return None;
        }
        skip_ws(&mut i);
        if b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let mut val = String::new();
        if b.get(i) == Some(&b'"') {
            i += 1;
            let mut closed = false;
            let mut bytes = Vec::new();
            while i < b.len() {
                match b[i] {
                    b'\\' if i + 1 < b.len() => {
                        bytes.push(b[i + 1]);
                        i += 2;
                    }
                    b'"' => {
                        closed = true;
                        i += 1;
                        break;
                    }
                    c => {
                        bytes.push(c);
                        i += 1;
                    }
                }
            }
            if !closed {
                return None;
            }
            val = String::from_utf8(bytes).ok()?;
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' && b[i] != b' ' && b[i] != b'\t' {
                i += 1;
            }
            val.push_str(rest.get(start..i)?);
            if val.is_empty() {
                return None;
            }
        }
        if out.insert(name, val).is_some() {
            return None;
        }
        skip_ws(&mut i);
        match b.get(i) {
            None => break,
            Some(b',') => i += 1,
            Some(_) => return None,
        }
    }
    Some(out)
}

/// What our UA answers a trunk's digest challenge with (`trunks.auth` in the config).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// Answer only challenges of this realm (a phone or proxy elsewhere on the path cannot
    /// then collect a digest of the trunk's password). Default: any realm.
    #[serde(default)]
    pub realm: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

/// `trunks.auth`: one set of [`Credentials`], or a list of them, one per realm: a second
/// carrier (the backup 911 route) has its own account. A challenge is answered with the first
/// credentials for its realm, else with the first that name no realm.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrunkCredentials(pub Vec<Credentials>);

impl From<Credentials> for TrunkCredentials {
    fn from(c: Credentials) -> Self {
        TrunkCredentials(vec![c])
    }
}

impl TrunkCredentials {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// [`answer_challenge`] with the credentials that fit: those for the challenge's realm
    /// first, then those for any realm.
    pub(crate) fn answer(
        &self,
        challenges: &[&str],
        method: &str,
        uri: &str,
        cnonce: &str,
    ) -> Option<String> {
        let (for_realm, any): (Vec<&Credentials>, Vec<&Credentials>) =
            self.0.iter().partition(|c| c.realm.is_some());
        for_realm
            .into_iter()
            .chain(any)
            .find_map(|c| answer_challenge(challenges.iter().copied(), c, method, uri, cnonce))
    }
}

impl<'de> serde::Deserialize<'de> for TrunkCredentials {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = TrunkCredentials;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("{username, password, realm} or a list of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                <Credentials as serde::Deserialize>::deserialize(MapAccessDeserializer::new(m))
                    .map(TrunkCredentials::from)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                s: A,
            ) -> Result<Self::Value, A::Error> {
                <Vec<Credentials> as serde::Deserialize>::deserialize(SeqAccessDeserializer::new(s))
                    .map(TrunkCredentials)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(TrunkCredentials::default())
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

/// The `Authorization` (or `Proxy-Authorization`) value that answers one of `challenges` (the
/// values of a 401's `WWW-Authenticate` or a 407's `Proxy-Authenticate`) for `method` on
/// `uri`, as a client (RFC 7616 §3.4): SHA-256 preferred to MD5, `qop=auth` with `cnonce` and
/// `nc=00000001` when the challenge offers it, else the RFC 2069 form; `opaque` echoed. `None`
/// when no challenge is a Digest one we can answer (unknown algorithm, `auth-int` only, another
/// realm than the credentials').
pub(crate) fn answer_challenge<'a>(
    challenges: impl Iterator<Item = &'a str>,
    creds: &Credentials,
    method: &str,
    uri: &str,
    cnonce: &str,
) -> Option<String> {
    let mut best: Option<(Algorithm, HashMap<String, String>)> = None;
    for c in challenges {
        let Some(p) = parse_digest(c) else { continue };
        let algorithm = match p.get("algorithm").map(String::as_str) {
            None => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("MD5") => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Algorithm::Sha256,
            Some(_) => continue,
        };
        let (Some(realm), Some(_)) = (p.get("realm"), p.get("nonce")) else {
            continue;
        };
        if creds.realm.as_ref().is_some_and(|r| r != realm) {
            continue;
        }
        let offers_auth = |q: &String| q.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth"));
        if p.get("qop").is_some_and(|q| !offers_auth(q)) {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(a, _)| *a == Algorithm::Md5 && algorithm == Algorithm::Sha256)
        {
            best = Some((algorithm, p));
        }
    }
    let (algorithm, p) = best?;
    let (realm, nonce) = (&p["realm"], &p["nonce"]);
    let user = &creds.username;
    let ha1 = algorithm.hex(&format!("{user}:{realm}:{}", creds.password));
    let ha2 = algorithm.hex(&format!("{method}:{uri}"));
    let name = match algorithm {
        Algorithm::Md5 => "MD5",
        Algorithm::Sha256 => "SHA-256",
    };
    // A quoted-string (RFC 3261 §25.1): backslash before `"` and `\`, no control characters.
    let q = |v: &str| -> String {
        let mut o = String::with_capacity(v.len());
        for c in v.chars().filter(|c| !c.is_control()) {
            if c == '"' || c == '\\' {
                o.push('\\');
            }
            o.push(c);
        }
        o
    };
    let mut out = format!(
        "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", algorithm={name}",
        q(user),
        q(realm),
        q(nonce),
        q(uri)
    );
    if p.contains_key("qop") {
        let nc = "00000001";
        let response = algorithm.hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
        let _ = write!(
            out,
            ", response=\"{response}\", qop=auth, nc={nc}, cnonce=\"{}\"",
            q(cnonce)
        );
    } else {
        let response = algorithm.hex(&format!("{ha1}:{nonce}:{ha2}"));
        let _ = write!(out, ", response=\"{response}\"");
    }
    if let Some(o) = p.get("opaque") {
        let _ = write!(out, ", opaque=\"{}\"", q(o));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse_datagram, Message};
    use crate::sip::transport::Transport;

    const SECRET: [u8; 32] = [7; 32];

    fn registrar() -> Registrar {
        Registrar::new(
            "ivr311".into(),
            &[
                ("1001".into(), "pw".into()),
                ("1002".into(), "other".into()),
            ],
            SECRET,
        )
    }

    fn flow(port: u16) -> Flow {
        Flow {
            transport: Transport::Udp,
            remote: format!("192.0.2.1:{port}").parse().expect("addr"),
            conn: 0,
        }
    }

    /// A REGISTER for `user`; `contacts` are full Contact values; `extra` more header lines.
    fn register(
        user: &str,
        call_id: &str,
        cseq: u32,
        contacts: &[&str],
        extra: &[String],
    ) -> Request {
        let mut s = format!(
            "REGISTER sip:127.0.0.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-{cseq}{call_id}\r\n\
From: <sip:{user}@127.0.0.1>;tag=ft\r\n\
To: <sip:{user}@127.0.0.1>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} REGISTER\r\n\
Max-Forwards: 70\r\n"
        );
        for c in contacts {
            s.push_str(&format!("Contact: {c}\r\n"));
        }
        for e in extra {
            s.push_str(e);
            s.push_str("\r\n");
        }
        s.push_str("Content-Length: 0\r\n\r\n");
        match parse_datagram(s.as_bytes(), 65536) {
            Ok(Message::Request(r)) => r,
            other => panic!("test REGISTER does not parse: {other:?}"),
        }
    }

    fn challenge_params(reply: &RegisterReply, algorithm: &str) -> HashMap<String, String> {
        reply
            .headers
            .iter()
            .filter(|(k, _)| k == "WWW-Authenticate")
            .filter_map(|(_, v)| parse_digest(v))
            .find(|p| p.get("algorithm").map(String::as_str) == Some(algorithm))
            .expect("challenge for the algorithm")
    }

    /// The client side of digest: an Authorization value answering `reply`'s challenge.
    fn authorization(
        reply: &RegisterReply,
        algorithm: &str,
        user: &str,
        password: &str,
        nc: u32,
    ) -> String {
        let p = challenge_params(reply, algorithm);
        let alg = if algorithm == "MD5" {
            Algorithm::Md5
        } else {
            Algorithm::Sha256
        };
        let (realm, nonce, opaque) = (&p["realm"], &p["nonce"], &p["opaque"]);
        let uri = "sip:127.0.0.1";
        let nc = format!("{nc:08x}");
        let cnonce = "c0ffee";
        let ha1 = alg.hex(&format!("{user}:{realm}:{password}"));
        let ha2 = alg.hex(&format!("REGISTER:{uri}"));
        let resp = alg.hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
        format!(
            "Authorization: Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", \
uri=\"{uri}\", response=\"{resp}\", algorithm={algorithm}, qop=auth, nc={nc}, \
cnonce=\"{cnonce}\", opaque=\"{opaque}\""
        )
    }

    struct Phone {
        user: &'static str,
        password: &'static str,
        call_id: String,
        cseq: u32,
        flow: Flow,
    }

    impl Phone {
        fn new(user: &'static str, password: &'static str, port: u16) -> Phone {
            Phone {
                user,
                password,
                call_id: format!("reg-{user}-{port}"),
                cseq: 0,
                flow: flow(port),
            }
        }

        fn send(
            &mut self,
            r: &mut Registrar,
            now: Instant,
            contacts: &[&str],
            extra: &[String],
        ) -> (RegisterReply, Vec<AgentEvent>) {
            self.cseq += 1;
            let req = register(self.user, &self.call_id, self.cseq, contacts, extra);
            r.handle(now, &req, self.flow)
        }

        /// REGISTER, 401, REGISTER with credentials: the second reply.
        fn login(
            &mut self,
            r: &mut Registrar,
            now: Instant,
            contacts: &[&str],
            extra: &[String],
        ) -> (RegisterReply, Vec<AgentEvent>) {
            let (challenge, _) = self.send(r, now, contacts, extra);
            assert_eq!(challenge.code, 401);
            let mut extra = extra.to_vec();
            extra.push(authorization(
                &challenge,
                "SHA-256",
                self.user,
                self.password,
                1,
            ));
            self.send(r, now, contacts, &extra)
        }
    }

    fn contacts(reply: &RegisterReply) -> Vec<&str> {
        reply
            .headers
            .iter()
            .filter(|(k, _)| k == "Contact")
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn logged_in(agent: &str, contact: &str, flow: Flow) -> AgentEvent {
        AgentEvent::LoggedIn {
            agent: agent.into(),
            contact: contact.into(),
            flow,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn creds(password: &str, realm: Option<&str>) -> Credentials {
        Credentials {
            username: "1001".into(),
            password: password.into(),
            realm: realm.map(str::to_owned),
        }
    }

    /// Answer a registrar's 401 with [`answer_challenge`], as a trunk's challenge is answered.
    fn login_as_client(r: &mut Registrar, c: &Credentials, challenges: &[String]) -> u16 {
        let now = Instant::now();
        let mut phone = Phone::new("1001", "unused", 5071);
        let (challenge, _) = phone.send(r, now, &["<sip:1001@192.0.2.1:5071>"], &[]);
        assert_eq!(challenge.code, 401);
        let offered: Vec<String> = if challenges.is_empty() {
            challenge
                .headers
                .iter()
                .filter(|(k, _)| k == "WWW-Authenticate")
                .map(|(_, v)| v.clone())
                .collect()
        } else {
            challenges.to_vec()
        };
        let Some(value) = answer_challenge(
            offered.iter().map(String::as_str),
            c,
            "REGISTER",
            "sip:127.0.0.1",
            "ab\"cd",
        ) else {
            return 0;
        };
        let extra = [format!("Authorization: {value}")];
        phone
            .send(r, now, &["<sip:1001@192.0.2.1:5071>"], &extra)
            .0
            .code
    }

    #[test]
    fn our_client_digest_is_accepted_by_a_verifier_and_prefers_sha256() {
        // Both algorithms offered: the answer is SHA-256, and our own registrar (which real
        // phones log in to) accepts it.
        let mut r = registrar();
        assert_eq!(login_as_client(&mut r, &creds("pw", None), &[]), 200);
        // MD5 alone (as `digest_algorithms: [MD5]` offers): accepted too.
        let mut r = registrar().with_algorithms(&["MD5".into()]);
        assert_eq!(
            login_as_client(&mut r, &creds("pw", Some("ivr311")), &[]),
            200
        );
        // A wrong password is computed all the same, and refused.
        let mut r = registrar();
        assert_eq!(login_as_client(&mut r, &creds("nope", None), &[]), 401);
    }

    #[test]
    fn each_carrier_realm_gets_its_own_credentials() {
        let carrier_a = Credentials {
            username: "a-acct".into(),
            password: "pa".into(),
            realm: Some("carrier-a".into()),
        };
        let any = Credentials {
            username: "default".into(),
            password: "pd".into(),
            realm: None,
        };
        let both = TrunkCredentials(vec![any.clone(), carrier_a.clone()]);
        let user = |ch: &str, c: &TrunkCredentials| {
            c.answer(&[ch], "INVITE", "sip:911@192.0.2.10", "x")
                .map(|v| v.split('"').nth(1).unwrap_or_default().to_owned())
        };
        // The realm's own account wins over the catch-all, whatever the order listed.
        let a = "Digest realm=\"carrier-a\", nonce=\"n\"";
        let b = "Digest realm=\"carrier-b\", nonce=\"n\"";
        assert_eq!(user(a, &both).as_deref(), Some("a-acct"));
        assert_eq!(user(b, &both).as_deref(), Some("default"));
        // Only carrier A's account: carrier B's challenge gets nothing.
        assert_eq!(user(b, &TrunkCredentials::from(carrier_a)), None);
        assert_eq!(user(a, &TrunkCredentials::default()), None);
    }

    #[test]
    fn challenges_we_cannot_or_must_not_answer_get_no_credentials() {
        let c = creds("pw", Some("city-trunk"));
        let answer = |ch: &str, c: &Credentials| {
            answer_challenge(std::iter::once(ch), c, "INVITE", "sip:911@192.0.2.10", "x")
        };
        // Another realm than the credentials are for: a phone or proxy fishing for a digest.
        assert!(answer("Digest realm=\"other\", nonce=\"n\", qop=\"auth\"", &c).is_none());
        // auth-int only, an unknown algorithm, Basic.
        let any = creds("pw", None);
        assert!(answer("Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\"", &any).is_none());
        assert!(answer(
            "Digest realm=\"r\", nonce=\"n\", algorithm=SHA-512-256",
            &any
        )
        .is_none());
        assert!(answer("Basic realm=\"r\"", &any).is_none());
        // RFC 2069 form (no qop): response = H(HA1:nonce:HA2), no nc or cnonce.
        let v = answer("Digest realm=\"r\", nonce=\"n\", opaque=\"o\"", &any).unwrap();
        let ha1 = Algorithm::Md5.hex("1001:r:pw");
        let ha2 = Algorithm::Md5.hex("INVITE:sip:911@192.0.2.10");
        let want = Algorithm::Md5.hex(&format!("{ha1}:n:{ha2}"));
        assert!(v.contains(&format!("response=\"{want}\"")), "{v}");
        assert!(v.contains("opaque=\"o\"") && !v.contains("nc="), "{v}");
    }

    #[test]
    fn challenge_then_sha256_digest_logs_in() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let (challenge, events) = phone.send(&mut r, t0, &["<sip:1001@10.0.0.5:5062>"], &[]);
        assert_eq!((challenge.code, challenge.reason), (401, "Unauthorized"));
        assert!(events.is_empty());
        let www: Vec<&str> = challenge
            .headers
            .iter()
            .filter(|(k, _)| k == "WWW-Authenticate")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(www.len(), 2);
        assert!(www[0]
            .starts_with("Digest realm=\"ivr311\", qop=\"auth\", algorithm=SHA-256, nonce=\""));
        assert!(www[1].contains("algorithm=MD5"));
        assert!(!www[0].contains("stale"));
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        let (ok, events) = phone.send(&mut r, t0, &["<sip:1001@10.0.0.5:5062>"], &[auth]);
        assert_eq!(ok.code, 200);
        assert_eq!(contacts(&ok), vec!["<sip:1001@10.0.0.5:5062>;expires=3600"]);
        assert_eq!(
            events,
            vec![logged_in("1001", "sip:1001@10.0.0.5:5062", phone.flow)]
        );
        assert_eq!(r.registered(), vec!["1001".to_owned()]);
        assert_eq!(
            r.contact("1001"),
            Some(("sip:1001@10.0.0.5:5062".to_owned(), phone.flow))
        );
        assert_eq!(r.next_expiry(), Some(t0 + secs(3600)));
    }

    #[test]
    fn md5_works_too() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1002", "other", 5062);
        let (challenge, _) = phone.send(&mut r, t0, &["<sip:1002@10.0.0.6>"], &[]);
        let auth = authorization(&challenge, "MD5", "1002", "other", 1);
        let (ok, events) = phone.send(&mut r, t0, &["<sip:1002@10.0.0.6>"], &[auth]);
        assert_eq!(ok.code, 200);
        assert_eq!(events.len(), 1);
        // No algorithm parameter means MD5 as well (RFC 2617).
        let (challenge, _) = phone.send(&mut r, t0, &["<sip:1002@10.0.0.6>"], &[]);
        let auth =
            authorization(&challenge, "MD5", "1002", "other", 1).replace(", algorithm=MD5", "");
        let (ok, events) = phone.send(&mut r, t0, &["<sip:1002@10.0.0.6>"], &[auth]);
        assert_eq!(ok.code, 200);
        assert!(events.is_empty(), "a refresh is not a new log-in");
    }

    /// The reply with the nonce and opaque values blanked.
    fn shape(reply: &RegisterReply) -> RegisterReply {
        let mut reply = reply.clone();
        for (_, v) in &mut reply.headers {
            let mut p = parse_digest(v).expect("digest challenge");
            for (k, x) in [("nonce", "N"), ("opaque", "O")] {
                let old = p.remove(k).expect("param");
                *v = v.replace(&old, x);
            }
        }
        reply
    }

    #[test]
    fn wrong_password_unknown_agent_and_garbage_look_the_same() {
        let mut r = registrar();
        let t0 = Instant::now();
        let contact = ["<sip:1001@10.0.0.5>"];
        let mut answers = Vec::new();
        for (user, password) in [("1001", "wrong"), ("9999", "pw"), ("1001", "")] {
            let mut phone = Phone::new(user, password, 5070);
            let (challenge, _) = phone.send(&mut r, t0, &contact, &[]);
            let auth = authorization(&challenge, "SHA-256", user, password, 1);
            let (reply, events) = phone.send(&mut r, t0, &contact, &[auth]);
            assert!(events.is_empty());
            answers.push(reply);
        }
        let mut phone = Phone::new("1001", "pw", 5071);
        let garbage =
            "Authorization: Digest username=\"1001\", realm=\"ivr311\", nonce=".to_owned();
        answers.push(phone.send(&mut r, t0, &contact, &[garbage]).0);
        let basic = "Authorization: Basic MTAwMTpwdw==".to_owned();
        answers.push(phone.send(&mut r, t0, &contact, &[basic]).0);
        let first = shape(&answers[0]);
        assert_eq!(first.code, 401);
        for a in &answers {
            assert_eq!(shape(a), first, "{a:?}");
        }
        assert!(r.registered().is_empty());
    }

    #[test]
    fn stale_nonce_gets_stale_true_and_a_fresh_nonce_works() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let c = ["<sip:1001@10.0.0.5>"];
        let (challenge, _) = phone.send(&mut r, t0, &c, &[]);
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        let later = t0 + secs(301);
        let (stale, _) = phone.send(&mut r, later, &c, &[auth]);
        assert_eq!(stale.code, 401);
        assert!(stale
            .headers
            .iter()
            .all(|(_, v)| v.ends_with(", stale=true")));
        let auth = authorization(&stale, "SHA-256", "1001", "pw", 1);
        assert_eq!(phone.send(&mut r, later, &c, &[auth]).0.code, 200);
        // Within the lifetime the same nonce is still good (with a higher count).
        let auth = authorization(&stale, "SHA-256", "1001", "pw", 2);
        assert_eq!(
            phone.send(&mut r, later + secs(299), &c, &[auth]).0.code,
            200
        );
        // A nonce from another registrar (a restart) with the right password: stale, too.
        let mut other = Registrar::new("ivr311".into(), &[("1001".into(), "pw".into())], [9; 32]);
        let (foreign, _) = phone.send(&mut other, t0, &c, &[]);
        let auth = authorization(&foreign, "SHA-256", "1001", "pw", 1);
        let (reply, _) = phone.send(&mut r, later, &c, &[auth]);
        assert_eq!(reply.code, 401);
        assert!(reply.headers[0].1.ends_with("stale=true"));
        // ... but with a wrong password it is a plain failure.
        let auth = authorization(&foreign, "SHA-256", "1001", "nope", 1);
        let (reply, _) = phone.send(&mut r, later, &c, &[auth]);
        assert!(!reply.headers[0].1.contains("stale"));
    }

    #[test]
    fn replayed_nonce_count_is_refused() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let c = ["<sip:1001@10.0.0.5>"];
        let (challenge, _) = phone.send(&mut r, t0, &c, &[]);
        let auth1 = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        assert_eq!(
            phone
                .send(&mut r, t0, &c, std::slice::from_ref(&auth1))
                .0
                .code,
            200
        );
        // The very same credentials again (a captured request replayed).
        let (replay, _) = phone.send(&mut r, t0 + secs(1), &c, &[auth1]);
        assert_eq!(replay.code, 401);
        assert!(!replay.headers[0].1.contains("stale"));
        let auth3 = authorization(&challenge, "SHA-256", "1001", "pw", 3);
        assert_eq!(phone.send(&mut r, t0 + secs(2), &c, &[auth3]).0.code, 200);
        let auth2 = authorization(&challenge, "SHA-256", "1001", "pw", 2);
        assert_eq!(phone.send(&mut r, t0 + secs(3), &c, &[auth2]).0.code, 401);
    }

    #[test]
    fn qop_is_required_and_the_uri_must_match() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let c = ["<sip:1001@10.0.0.5>"];
        let (challenge, _) = phone.send(&mut r, t0, &c, &[]);
        let p = challenge_params(&challenge, "MD5");
        // RFC 2069 style: no qop, nc or cnonce.
        let ha1 = Algorithm::Md5.hex("1001:ivr311:pw");
        let ha2 = Algorithm::Md5.hex("REGISTER:sip:127.0.0.1");
        let resp = Algorithm::Md5.hex(&format!("{ha1}:{}:{ha2}", p["nonce"]));
        let auth = format!(
            "Authorization: Digest username=\"1001\", realm=\"ivr311\", nonce=\"{}\", uri=\"sip:127.0.0.1\", response=\"{resp}\"",
            p["nonce"]
        );
        assert_eq!(phone.send(&mut r, t0, &c, &[auth]).0.code, 401);
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1)
            .replace("sip:127.0.0.1", "sip:10.9.9.9");
        assert_eq!(phone.send(&mut r, t0, &c, &[auth]).0.code, 401);
        assert!(uri_matches(
            "sip:127.0.0.1:5060;transport=udp",
            "SIP:127.0.0.1"
        ));
        assert!(!uri_matches("sip:127.0.0.2", "sip:127.0.0.1"));
    }

    #[test]
    fn expires_header_and_param_refresh_and_unregister() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let (ok, _) = phone.login(
            &mut r,
            t0,
            &["<sip:1001@10.0.0.5>"],
            &["Expires: 120".into()],
        );
        assert_eq!(contacts(&ok), vec!["<sip:1001@10.0.0.5>;expires=120"]);
        assert_eq!(r.next_expiry(), Some(t0 + secs(120)));
        // The parameter wins over the header; too long is cut to 7200.
        let (ok, _) = phone.login(
            &mut r,
            t0 + secs(10),
            &["<sip:1001@10.0.0.5>;expires=100000"],
            &["Expires: 120".into()],
        );
        assert_eq!(contacts(&ok), vec!["<sip:1001@10.0.0.5>;expires=7200"]);
        assert_eq!(r.next_expiry(), Some(t0 + secs(7210)));
        // A refresh from the same Call-ID with a lower CSeq: 500, nothing changes.
        let saved = phone.cseq;
        phone.cseq = 0;
        let (challenge, _) = phone.send(&mut r, t0 + secs(20), &["<sip:1001@10.0.0.5>"], &[]);
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        let (err, _) = phone.send(
            &mut r,
            t0 + secs(20),
            &["<sip:1001@10.0.0.5>;expires=0"],
            &[auth],
        );
        assert_eq!(err.code, 500);
        assert_eq!(r.registered(), vec!["1001".to_owned()]);
        phone.cseq = saved;
        // A query (no Contact) lists the binding with its remaining time.
        let (ok, events) = phone.login(&mut r, t0 + secs(30), &[], &[]);
        assert_eq!(ok.code, 200);
        assert!(events.is_empty());
        assert_eq!(contacts(&ok), vec!["<sip:1001@10.0.0.5>;expires=7180"]);
        // expires=0 removes it: logged out.
        let (ok, events) = phone.login(
            &mut r,
            t0 + secs(40),
            &["<sip:1001@10.0.0.5>;expires=0"],
            &[],
        );
        assert_eq!(ok.code, 200);
        assert!(contacts(&ok).is_empty());
        assert_eq!(
            events,
            vec![AgentEvent::LoggedOut {
                agent: "1001".into()
            }]
        );
        assert!(r.registered().is_empty());
        assert_eq!(r.next_expiry(), None);
    }

    #[test]
    fn star_unregisters_everything() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let (ok, _) = phone.login(
            &mut r,
            t0,
            &["<sip:1001@10.0.0.5>", "<sip:1001@10.0.0.6>"],
            &[],
        );
        assert_eq!(contacts(&ok).len(), 2);
        // `*` needs Expires: 0.
        let (bad, _) = phone.login(&mut r, t0, &["*"], &["Expires: 60".into()]);
        assert_eq!(bad.code, 400);
        let (ok, events) = phone.login(&mut r, t0, &["*"], &["Expires: 0".into()]);
        assert_eq!(ok.code, 200);
        assert!(contacts(&ok).is_empty());
        assert_eq!(
            events,
            vec![AgentEvent::LoggedOut {
                agent: "1001".into()
            }]
        );
        assert!(r.registered().is_empty());
    }

    #[test]
    fn newest_contact_wins_and_removing_it_falls_back() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut desk = Phone::new("1001", "pw", 5062);
        let mut soft = Phone::new("1001", "pw", 5064);
        let (_, events) = desk.login(&mut r, t0, &["<sip:1001@10.0.0.5>"], &[]);
        assert_eq!(
            events,
            vec![logged_in("1001", "sip:1001@10.0.0.5", desk.flow)]
        );
        let (ok, events) = soft.login(&mut r, t0 + secs(5), &["<sip:1001@10.0.0.9>"], &[]);
        assert_eq!(
            contacts(&ok),
            vec![
                "<sip:1001@10.0.0.9>;expires=3600",
                "<sip:1001@10.0.0.5>;expires=3595"
            ]
        );
        assert_eq!(
            events,
            vec![logged_in("1001", "sip:1001@10.0.0.9", soft.flow)]
        );
        // The desk phone refreshing does not take the preference back.
        let (_, events) = desk.login(&mut r, t0 + secs(10), &["<sip:1001@10.0.0.5>"], &[]);
        assert!(events.is_empty());
        assert_eq!(
            r.contact("1001").map(|c| c.0),
            Some("sip:1001@10.0.0.9".into())
        );
        // The soft phone leaves: back to the desk phone.
        let (_, events) = soft.login(
            &mut r,
            t0 + secs(20),
            &["<sip:1001@10.0.0.9>;expires=0"],
            &[],
        );
        assert_eq!(
            events,
            vec![logged_in("1001", "sip:1001@10.0.0.5", desk.flow)]
        );
        // The desk phone moves behind another NAT port: the flow changed, announced again.
        desk.flow = flow(6000);
        let (_, events) = desk.login(&mut r, t0 + secs(30), &["<sip:1001@10.0.0.5>"], &[]);
        assert_eq!(
            events,
            vec![logged_in("1001", "sip:1001@10.0.0.5", flow(6000))]
        );
    }

    #[test]
    fn expiry_logs_out() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut a = Phone::new("1001", "pw", 5062);
        let mut b = Phone::new("1002", "other", 5063);
        a.login(&mut r, t0, &["<sip:1001@10.0.0.5>;expires=60"], &[]);
        b.login(&mut r, t0, &["<sip:1002@10.0.0.6>"], &[]);
        let mut a2 = Phone::new("1001", "pw", 5064);
        a2.login(&mut r, t0, &["<sip:1001@10.0.0.7>;expires=120"], &[]);
        assert_eq!(r.next_expiry(), Some(t0 + secs(60)));
        assert!(r.expire(t0 + secs(59)).is_empty());
        // The older binding goes: the preferred one stays, nothing to say.
        assert!(r.expire(t0 + secs(60)).is_empty());
        assert_eq!(r.next_expiry(), Some(t0 + secs(120)));
        assert_eq!(
            r.expire(t0 + secs(120)),
            vec![AgentEvent::LoggedOut {
                agent: "1001".into()
            }]
        );
        assert_eq!(r.registered(), vec!["1002".to_owned()]);
        assert_eq!(r.contact("1001"), None);
    }

    #[test]
    fn too_brief_gets_423() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let (reply, events) = phone.login(&mut r, t0, &["<sip:1001@10.0.0.5>;expires=30"], &[]);
        assert_eq!((reply.code, reply.reason), (423, "Interval Too Brief"));
        assert_eq!(
            reply.headers,
            vec![("Min-Expires".to_owned(), "60".to_owned())]
        );
        assert!(events.is_empty());
        let (reply, _) = phone.login(
            &mut r,
            t0,
            &["<sip:1001@10.0.0.5>"],
            &["Expires: 59".into()],
        );
        assert_eq!(reply.code, 423);
        assert!(r.registered().is_empty());
    }

    #[test]
    fn an_agent_registers_only_its_own_address() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1002", "pw", 5062);
        let (challenge, _) = phone.send(&mut r, t0, &["<sip:1002@10.0.0.5>"], &[]);
        // Right credentials of 1001, To is 1002.
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        let (reply, _) = phone.send(&mut r, t0, &["<sip:1002@10.0.0.5>"], &[auth]);
        assert_eq!(reply.code, 403);
        assert!(r.registered().is_empty());
    }

    /// A phone at `ip:port`.
    fn phone_at(user: &'static str, password: &'static str, addr: &str) -> Phone {
        let mut p = Phone::new(user, password, 5060);
        p.flow.remote = addr.parse().expect("addr");
        p.call_id = format!("reg-{user}-{addr}");
        p
    }

    #[test]
    fn five_failures_block_the_source_for_a_minute_but_it_is_still_challenged() {
        let mut r = registrar();
        let t0 = Instant::now();
        let c = ["<sip:1001@10.0.0.5>"];
        // 1002 logs in from here first: this address is usual for 1002, not for 1001.
        let mut colleague = phone_at("1002", "other", "192.0.2.1:7009");
        assert_eq!(colleague.login(&mut r, t0, &c, &[]).0.code, 200);
        let mut thief = phone_at("1001", "guess", "192.0.2.1:7000");
        for i in 0..5 {
            let (reply, _) = thief.login(&mut r, t0 + secs(i), &c, &[]);
            assert_eq!(reply.code, 401, "attempt {i}");
        }
        // Blocked: still challenged (a phone there needs a challenge to prove itself), but
        // every answer is refused unseen, the right password of 1001 included.
        let (challenge, _) = thief.send(&mut r, t0 + secs(5), &c, &[]);
        assert_eq!(challenge.code, 401);
        let mut same_ip = phone_at("1001", "pw", "192.0.2.1:7001");
        let (challenge, _) = same_ip.send(&mut r, t0 + secs(30), &c, &[]);
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        assert_eq!(
            same_ip.send(&mut r, t0 + secs(30), &c, &[auth]).0,
            RegisterReply::new(403, "Forbidden")
        );
        // An agent whose usual address this is keeps logging in from it.
        assert_eq!(colleague.login(&mut r, t0 + secs(31), &c, &[]).0.code, 200);
        // 60 s after the fifth failure the source is free again (1001's new-address lock,
        // 60 s from its fifth failure too, is over as well).
        assert_eq!(same_ip.login(&mut r, t0 + secs(65), &c, &[]).0.code, 200);
    }

    #[test]
    fn guesses_lock_new_addresses_out_of_an_account_but_not_the_agents_phone() {
        let mut r = registrar();
        let t0 = Instant::now();
        let c = ["<sip:1001@10.0.0.5>"];
        let mut phone = phone_at("1001", "pw", "198.51.100.7:5060");
        assert_eq!(phone.login(&mut r, t0, &c, &[]).0.code, 200);
        // Guesses from five different sources (a botnet): no source reaches its own limit,
        // but the account's new-address class does.
        for i in 0..5u64 {
            let mut thief = phone_at("1001", "guess", &format!("203.0.113.{}:5060", i + 1));
            assert_eq!(thief.login(&mut r, t0 + secs(i), &c, &[]).0.code, 401);
        }
        let locks = r.locks(t0 + secs(5));
        assert_eq!(locks.len(), 1);
        assert_eq!(locks[0].agent, "1001");
        assert_eq!(locks[0].new_sources_until, Some(t0 + secs(4) + LOCK_BASE));
        assert_eq!(locks[0].usual_sources_until, None);
        // From a new address even the right password is refused, unseen.
        let mut elsewhere = phone_at("1001", "pw", "203.0.113.99:5060");
        let (challenge, _) = elsewhere.send(&mut r, t0 + secs(6), &c, &[]);
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        assert_eq!(
            elsewhere.send(&mut r, t0 + secs(6), &c, &[auth]).0.code,
            403
        );
        // The agent's phone at its usual address logs in, even rebooted (a new Call-ID).
        phone.call_id = "rebooted".into();
        assert_eq!(phone.login(&mut r, t0 + secs(7), &c, &[]).0.code, 200);
        // Another agent is not affected.
        let mut other = phone_at("1002", "other", "203.0.113.99:5061");
        assert_eq!(other.login(&mut r, t0 + secs(8), &c, &[]).0.code, 200);
        // The lock ends; five more failures lock for twice as long.
        let t1 = t0 + secs(4) + LOCK_BASE;
        assert!(r.locks(t1).is_empty());
        for i in 0..5u64 {
            let mut thief = phone_at("1001", "guess", &format!("203.0.113.{}:5060", i + 20));
            assert_eq!(thief.login(&mut r, t1 + secs(i), &c, &[]).0.code, 401);
        }
        assert_eq!(
            r.locks(t1 + secs(5))[0].new_sources_until,
            Some(t1 + secs(4) + 2 * LOCK_BASE)
        );
    }

    #[test]
    fn spoofed_guesses_count_for_nothing() {
        let mut r = registrar();
        let t0 = Instant::now();
        let c = ["<sip:1001@10.0.0.5>"];
        let mut phone = phone_at("1001", "pw", "198.51.100.7:5060");
        assert_eq!(phone.login(&mut r, t0, &c, &[]).0.code, 200);
        // An attacker gets challenges at its own address, and sends guesses that claim to
        // come from the phone's address (spoofed UDP: our answers go to the phone, not to
        // it), with its nonces, or with made-up ones.
        let mut attacker = phone_at("1001", "guess", "203.0.113.5:5060");
        let (theirs, _) = attacker.send(&mut r, t0, &c, &[]);
        let mut spoofed = phone_at("1001", "guess", "198.51.100.7:6000");
        for i in 0..50u32 {
            let auth = authorization(&theirs, "SHA-256", "1001", &format!("guess{i}"), i + 1);
            let (reply, _) = spoofed.send(&mut r, t0 + secs(1), &c, &[auth]);
            assert_eq!(reply.code, 401);
            let made_up = format!(
                "Authorization: Digest username=\"1001\", realm=\"ivr311\", nonce=\"{:064x}\", \
uri=\"sip:127.0.0.1\", response=\"{:064x}\", algorithm=SHA-256, qop=auth, nc=00000001, \
cnonce=\"x\"",
                i, i
            );
            assert_eq!(
                spoofed.send(&mut r, t0 + secs(1), &c, &[made_up]).0.code,
                401
            );
        }
        assert!(r.locks(t0 + secs(2)).is_empty());
        assert!(r.failures.is_empty());
        assert_eq!(phone.login(&mut r, t0 + secs(2), &c, &[]).0.code, 200);
        // A nonce sent to the attacker, answered with the right password from elsewhere, is
        // not ours there either: asked again (stale), never let in on it.
        let auth = authorization(&theirs, "SHA-256", "1001", "pw", 99);
        let (reply, _) = phone.send(&mut r, t0 + secs(3), &c, &[auth]);
        assert_eq!(reply.code, 401);
        assert!(reply.headers[0].1.ends_with("stale=true"));
    }

    #[test]
    fn ipv6_sources_are_one_slash_64() {
        let mut r = registrar();
        let t0 = Instant::now();
        let c = ["<sip:1001@10.0.0.5>"];
        // A thief hopping through its /64, an address per guess.
        for i in 0..5u64 {
            let mut thief = phone_at(
                "1002",
                "guess",
                &format!("[2001:db8:1:2::{:x}]:5060", i + 1),
            );
            assert_eq!(thief.login(&mut r, t0 + secs(i), &c, &[]).0.code, 401);
        }
        // The whole /64 is blocked, for every account it is not usual for.
        let mut next = phone_at("1001", "pw", "[2001:db8:1:2:ffff::1]:5060");
        let (challenge, _) = next.send(&mut r, t0 + secs(6), &c, &[]);
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        assert_eq!(next.send(&mut r, t0 + secs(6), &c, &[auth]).0.code, 403);
        // The next /64 is another source; a nonce sent to one address of a /64 is good from
        // another of the same /64 (privacy addresses change).
        let mut neighbour = phone_at("1001", "pw", "[2001:db8:1:3::1]:5060");
        let (challenge, _) = neighbour.send(&mut r, t0 + secs(7), &c, &[]);
        neighbour.flow.remote = "[2001:db8:1:3::2]:5060".parse().unwrap();
        let auth = authorization(&challenge, "SHA-256", "1001", "pw", 1);
        assert_eq!(
            neighbour.send(&mut r, t0 + secs(7), &c, &[auth]).0.code,
            200
        );
    }

    #[test]
    fn failures_spread_out_do_not_block_and_successes_do_not_count() {
        let mut r = registrar();
        let t0 = Instant::now();
        let c = ["<sip:1001@10.0.0.5>"];
        let mut thief = Phone::new("1001", "guess", 7000);
        thief.flow.remote = "203.0.113.5:7000".parse().unwrap();
        let mut good = Phone::new("1001", "pw", 7001);
        // One guess every 3 minutes: fewer than five in any 10 minutes.
        for i in 0..12 {
            let (reply, _) = thief.login(&mut r, t0 + secs(i * 180), &c, &[]);
            assert_eq!(reply.code, 401, "attempt {i}");
            let (reply, _) = good.login(&mut r, t0 + secs(i * 180 + 1), &c, &[]);
            assert_eq!(reply.code, 200, "attempt {i}");
        }
    }

    #[test]
    fn failure_and_name_tables_are_bounded() {
        let mut r = registrar();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED_IPS as u32 + 500) {
            let mut f = flow(5060);
            f.remote = std::net::SocketAddr::new(std::net::IpAddr::from(i.to_be_bytes()), 5060);
            let user = format!("u{i}");
            let first = register(&user, "x", 1, &[], &[]);
            let (challenge, _) = r.handle(t0, &first, f);
            let auth = authorization(&challenge, "SHA-256", &user, "guess", 1);
            let (reply, _) = r.handle(t0, &register(&user, "x", 2, &[], &[auth]), f);
            assert_eq!(reply.code, 401);
        }
        assert_eq!(r.failures.len(), MAX_TRACKED_IPS);
        assert!(r.failure_order.len() <= 2 * MAX_TRACKED_IPS + 64);
        assert_eq!(
            r.accounts.len(),
            MAX_TRACKED_NAMES + 2,
            "the names and both agents"
        );
        assert!(r.accounts.contains_key("1001") && r.accounts.contains_key("1002"));
    }

    #[test]
    fn stored_hashes_log_in_and_plain_passwords_still_do() {
        let t0 = Instant::now();
        let c = ["<sip:1001@10.0.0.5>"];
        let hashed = PasswordHa1::of("1001", REALM, "s3cret");
        let mut r = Registrar::new(
            REALM.into(),
            &[
                ("1001".into(), AgentSecret::Ha1(hashed.clone())),
                ("1002".into(), "other".into()),
            ],
            SECRET,
        );
        for alg in ["SHA-256", "MD5"] {
            let mut phone = Phone::new("1001", "s3cret", 5070);
            phone.call_id = format!("ha1-{alg}");
            let (challenge, _) = phone.send(&mut r, t0, &c, &[]);
            let auth = authorization(&challenge, alg, "1001", "s3cret", 1);
            assert_eq!(phone.send(&mut r, t0, &c, &[auth]).0.code, 200, "{alg}");
        }
        let mut wrong = Phone::new("1001", "S3cret", 5071);
        assert_eq!(wrong.login(&mut r, t0, &c, &[]).0.code, 401);
        let mut plain = Phone::new("1002", "other", 5072);
        assert_eq!(plain.login(&mut r, t0, &c, &[]).0.code, 200);
        // Known vectors: the hashes are H(id:realm:password).
        assert_eq!(
            hashed.md5.as_deref(),
            Some(Algorithm::Md5.hex("1001:ivr311:s3cret").as_str())
        );
        assert_eq!(hashed.algorithms(), ["SHA-256", "MD5"]);
        assert_eq!(format!("{:?}", AgentSecret::from("s3cret")), "Password(..)");
        // A hash of one algorithm only: the other cannot log in.
        let md5_only = PasswordHa1 {
            sha256: None,
            ..hashed
        };
        let mut r = Registrar::new(
            REALM.into(),
            &[("1001".into(), AgentSecret::Ha1(md5_only))],
            SECRET,
        );
        let mut phone = Phone::new("1001", "s3cret", 5073);
        assert_eq!(phone.login(&mut r, t0, &c, &[]).0.code, 401);
    }

    #[test]
    fn nonce_table_is_bounded_and_forgotten_nonces_are_stale() {
        let mut r = registrar();
        let t0 = Instant::now();
        let mut phone = Phone::new("1001", "pw", 5062);
        let c = ["<sip:1001@10.0.0.5>"];
        let (first, _) = phone.send(&mut r, t0, &c, &[]);
        let auth = authorization(&first, "SHA-256", "1001", "pw", 1);
        assert_eq!(phone.send(&mut r, t0, &c, &[auth]).0.code, 200);
        for i in 0..MAX_TRACKED_NONCES as u64 {
            let at = t0 + Duration::from_millis(i + 1);
            assert_eq!(phone.login(&mut r, at, &c, &[]).0.code, 200);
        }
        assert!(r.nonces.len() <= MAX_TRACKED_NONCES);
        // Still within its lifetime, and the count is new: were it remembered, it would pass.
        // Forgotten, it is stale: the phone is asked again, never let in on an unknown count.
        let auth = authorization(&first, "SHA-256", "1001", "pw", 2);
        let (reply, _) = phone.send(&mut r, t0 + secs(20), &c, &[auth]);
        assert_eq!(reply.code, 401);
        assert!(reply.headers[0].1.ends_with("stale=true"));
    }

    #[test]
    fn digest_parsing() {
        let p = parse_digest(
            r#"Digest username="a\"b", realm="r", nc=00000001 , qop=auth,uri="sip:x;a=b,c""#,
        )
        .expect("parses");
        assert_eq!(p["username"], "a\"b");
        assert_eq!(p["nc"], "00000001");
        assert_eq!(p["qop"], "auth");
        assert_eq!(p["uri"], "sip:x;a=b,c");
        assert!(parse_digest("Digest realm=\"a\", realm=\"b\"").is_none());
        assert!(parse_digest("Digest realm=\"a").is_none());
        assert!(parse_digest("Digest realm").is_none());
        assert!(parse_digest("Basic abc").is_none());
        assert_eq!(parse_nc("00000000"), None);
        assert_eq!(parse_nc("0000000a"), Some(10));
        assert_eq!(parse_nc("1"), None);
        assert_eq!(unhex("0aFF"), Some(vec![10, 255]));
        assert_eq!(unhex("0g"), None);
    }
}
