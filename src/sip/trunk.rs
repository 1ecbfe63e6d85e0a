//! Registering with a SIP trunk (RFC 3261 §10.2), sans-IO: `trunks.register` in the config.
//!
//! Registration-based trunks (most carriers' "SIP trunk with credentials" offers, and a PBX in
//! front of a city's lines) only send calls to a number once its PBX has REGISTERed a contact
//! for it, and forget that contact when the registration lapses. Without this the 311 number
//! would ring nowhere: the trunk answers its callers with 404 or 480 while ivr311 sits idle.
//!
//! `TrunkRegistration` decides what to send and when. `TrunkClient` wraps it with where the
//! REGISTERs go: a registrar named by a host name is looked up before each REGISTER, a TCP
//! connection is opened when none is, and what the REGISTER that is due waits for is one enum
//! (`Reach`: idle, resolving, connecting). Both are sans-IO: the UA core
//! (`crate::sip::ua::registration`) does the look-ups and connections off its task, carries each
//! REGISTER in a client transaction (retransmissions, timer F) and hands back its final
//! response or timeout.
//! - The first REGISTER goes out at start. Its 2xx says how long the binding lasts (the
//!   `expires` of our Contact in it, else its `Expires`, else what we asked), and the refresh
//!   goes at half that, so a lost refresh still has a retransmission window before the binding
//!   ends.
//! - A 401/407 is answered once with `trunks.auth` (same Call-ID, CSeq + 1, as §22.2 asks),
//!   again only if the registrar says the nonce was `stale`. A second plain challenge means the
//!   credentials were refused.
//! - 423 Interval Too Brief is retried at once with the registrar's `Min-Expires`.
//! - A registrar name with several addresses (A/AAAA records, or SRV targets): after no
//!   answer (timer F), a TCP connection refused or a 503, the next REGISTER goes at once to the
//!   name's next address (RFC 3263 §4.3), until each address has failed once. A carrier's
//!   primary that answers `503` with `Retry-After: 300` must not keep the 311 number
//!   unreachable for five minutes while its secondary is up.
//! - Any other failure (403, other 5xx, and every address of the name failed) is retried after
//!   a back-off of 30 s doubling to 30 min with jitter (the schedule of RFC 5626 §4.5), or after
//!   the `Retry-After` the answer names, so a carrier's outage is not met with a REGISTER storm
//!   from every node. The next round starts at the address after the last one tried.
//! - When the server starts draining, the binding is removed (`Expires: 0`): the trunk stops
//!   sending new calls to a node that would refuse them and, with a second node registered,
//!   sends them there.
//!
//! Every REGISTER of one registration shares a Call-ID and increments CSeq (§10.2.4): a
//! registrar orders refreshes by them.
//!
//! A registrar named with `;transport=tcp` (carriers that take SIP over TCP only) is sent the
//! REGISTERs over a TCP connection the UA core opens and keeps open while the binding lasts;
//! Via says TCP and our Contact carries `;transport=tcp`, so the trunk sends its calls back
//! over TCP (most along that same connection, which is how they reach a node behind NAT).

use crate::sip::message::{new_branch, random_token, wants_tcp, RequestBuilder, Response};
use crate::sip::registrar::TrunkCredentials;
use crate::sip::transport::{Flow, Transport};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Where calls may come from, and our account with the carrier (the `trunks:` section).
///
/// With `allow` empty (the default) INVITEs are taken from any address, as a public SIP line
/// must be when callers reach it directly. A city that receives calls only through its carrier's
/// SIP trunk lists the carrier's signalling networks, and INVITEs from anywhere else are
/// dropped without an answer (counted in `/metrics` as
/// `ivr311_sip_requests_dropped_total{reason="source_not_allowed"}`): a scanner learns nothing,
/// not even that a SIP server is there to refuse it, and costs us no transaction. A 403 would
/// tell it both, and invite it to try other sources or spoofed ones.
///
/// Sources listed here are trusted trunks: the per-source call and TCP connection limits
/// (`limits.max_calls_per_source`, `invites_per_second`, `max_tcp_connections_per_source`)
/// do not apply to them, since a trunk or an SBC carries many callers from one address.
///
/// Agents' phones are not covered: they log in with digest authentication (with guessing
/// slowed per source and per account, see `sip::registrar`), receive calls rather than make
/// them, and work from wherever operators sit, so an address list would only lock out home
/// workers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrunksConfig {
    /// Source networks INVITEs are accepted from, e.g. `["203.0.113.0/24", "2001:db8::/32",
    /// "198.51.100.7"]` (a bare address is one host). Empty: any source.
    pub allow: Vec<crate::sip::guard::IpNet>,
    /// Digest credentials for a trunk that challenges our outbound INVITEs (the 911 bridge,
    /// call-backs) or our REGISTER with 401 or 407, as registration-based SIP trunks do:
    /// `{username, password, realm}` (`realm` optional: when set, only that realm's
    /// challenges are answered), or a list of them, one per carrier's realm. Operators'
    /// phones are never sent them. Default: none, and a challenged INVITE fails (the 911
    /// method then falls back to the next route).
    pub auth: TrunkCredentials,
    /// Register with a registration-based trunk so that it sends us the 311 line's calls:
    /// `{registrar, user, domain, expires}` (see the module docs); its challenges are
    /// answered with `auth`. Default: none (an IP-authenticated trunk sends calls unasked).
    pub register: Option<RegisterConfig>,
}

/// `trunks.register` in the config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// Where REGISTERs are sent: a `sip:` URI with an IP address or a host name, e.g.
    /// `sip:198.51.100.10:5060` or `sip:sip.carrier.example.net` (looked up before each
    /// REGISTER, A/AAAA: see [`crate::sip::resolve`]); `;transport=tcp` registers over TCP.
    pub registrar: String,
    /// User part of our address of record: the trunk account or the 311 line's number.
    pub user: String,
    /// Domain of the address of record (Request-URI, From and To), when the trunk wants its
    /// name there rather than the registrar's address, e.g. `sip.carrier.example.net`.
    /// Default: the registrar's host and port.
    #[serde(default)]
    pub domain: Option<String>,
    /// Seconds the binding is asked to last (the registrar may grant less). Default 600.
    #[serde(default = "default_expires")]
    pub expires: u32,
}

fn default_expires() -> u32 {
    600
}

impl RegisterConfig {
    /// Refuse what would make a malformed REGISTER (the registrar's address is checked by the
    /// UA core, which knows which address family it is bound to).
    pub(crate) fn check(&self) -> Result<(), String> {
        let user_ok = !self.user.is_empty()
            && self
                .user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-._~".contains(c));
        if !user_ok {
            return Err(format!(
                "trunks.register.user {:?}: letters, digits and + - . _ ~ only",
                self.user
            ));
        }
        if let Some(d) = &self.domain {
            let ok = !d.is_empty()
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
            if !ok {
                return Err(format!(
                    "trunks.register.domain {d:?}: a host name or address (and port)"
                ));
            }
        }
        if self.expires < 60 {
            return Err(format!(
                "trunks.register.expires {}: at least 60 seconds",
                self.expires
            ));
        }
        Ok(())
    }
}

/// First retry after a failure, doubled per consecutive failure up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_BASE: Duration = Duration::from_secs(30);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1800);

/// What `/health` shows of the registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistrationStatus {
    /// `registering`, `registered`, `failed` (retrying later), `unregistering` (draining, the
    /// binding's removal not answered yet) or `unregistered`.
    pub state: String,
    pub aor: String,
    pub registrar: String,
    /// Seconds until the binding lapses, while registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    /// Why the last attempt failed, while failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Seconds until the next attempt, while failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in: Option<u64>,
}

impl RegistrationStatus {
    /// This status `secs` seconds later (the countdowns run down, to zero).
    pub(crate) fn aged(&self, secs: u64) -> Self {
        RegistrationStatus {
            expires_in: self.expires_in.map(|e| e.saturating_sub(secs)),
            retry_in: self.retry_in.map(|r| r.saturating_sub(secs)),
            ..self.clone()
        }
    }
}

/// A REGISTER to send: its bytes and its Via branch (the client transaction's key).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub bytes: Bytes,
    pub branch: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Send a REGISTER at this time; `bound_until` is when the current binding lapses.
    Idle {
        at: Instant,
        bound_until: Option<Instant>,
    },
    /// A REGISTER is in its transaction.
    InFlight { bound_until: Option<Instant> },
    /// The last attempt failed; the next goes at `at`.
    Failed { at: Instant, error: String },
    /// Unbound for good (the server is draining).
    Stopped,
}

/// One registration with the trunk's registrar (see the module docs).
#[derive(Debug)]
pub(crate) struct TrunkRegistration {
    cfg: RegisterConfig,
    creds: TrunkCredentials,
    /// `sip:domain`, the Request-URI.
    request_uri: String,
    /// `sip:user@domain`, in From and To.
    aor: String,
    call_id: String,
    from_tag: String,
    cseq: u32,
    /// What we ask for (raised by a 423's `Min-Expires`).
    expires: u32,
    phase: Phase,
    /// Credentials the REGISTER in flight carries (a second challenge then refuses them),
    /// and challenges already answered with `stale=true`.
    answered: bool,
    stale_retries: u8,
    /// A 423 was already followed once for the REGISTER in flight.
    raised: bool,
    /// The REGISTER in flight removes the binding.
    removing: bool,
    /// Consecutive back-offs (the exponent of [`backoff`]).
    failures: u32,
    /// How many addresses the registrar's name had at its last lookup (1 for an IP address).
    addresses: usize,
    /// Addresses that failed in a row since the last success or back-off; while fewer than
    /// `addresses`, a failure moves on to the next address at once.
    failed_over: usize,
    /// What the REGISTER in flight was built with, to send it again with credentials.
    local: Option<SocketAddr>,
}

impl TrunkRegistration {
    /// A registration that sends its first REGISTER at `now`. The registrar URI must already
    /// have been checked (the UA core refuses unusable targets before this).
    pub(crate) fn new(cfg: RegisterConfig, creds: TrunkCredentials, now: Instant) -> Self {
        let domain = cfg
            .domain
            .clone()
            .unwrap_or_else(|| registrar_hostport(&cfg.registrar));
        TrunkRegistration {
            request_uri: format!("sip:{domain}"),
            aor: format!("sip:{}@{domain}", cfg.user),
            call_id: format!("{}@ivr311", random_token(20)),
            from_tag: random_token(12),
            cseq: 0,
            expires: cfg.expires.max(1),
            cfg,
            creds,
            phase: Phase::Idle {
                at: now,
                bound_until: None,
            },
            answered: false,
            stale_retries: 0,
            raised: false,
            removing: false,
            failures: 0,
            addresses: 1,
            failed_over: 0,
            local: None,
        }
    }

    pub(crate) fn registrar(&self) -> &str {
        &self.cfg.registrar
    }

    /// Whether the last REGISTER failed (and the next is a retry, at the name's next address).
    pub(crate) fn failing(&self) -> bool {
        self.failures > 0 || self.failed_over > 0
    }

    /// The registrar's name was looked up and has `n` addresses.
    pub(crate) fn set_addresses(&mut self, n: usize) {
        self.addresses = n.max(1);
    }

    /// Whether the registrar is reached over TCP (`;transport=tcp`).
    pub(crate) fn over_tcp(&self) -> bool {
        wants_tcp(&self.cfg.registrar)
    }

    /// When the next REGISTER is due; `None` while one is in flight or after unbinding.
    pub(crate) fn due(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Idle { at, .. } | Phase::Failed { at, .. } => Some(*at),
            Phase::InFlight { .. } | Phase::Stopped => None,
        }
    }

    /// The REGISTER that is due at `now` (refresh or retry), sent from `local`.
    pub(crate) fn poll(&mut self, now: Instant, local: SocketAddr) -> Option<Outgoing> {
        if self.due().is_none_or(|at| at > now) {
            return None;
        }
        let bound_until = self.bound_until(now);
        self.phase = Phase::InFlight { bound_until };
        self.answered = false;
        self.stale_retries = 0;
        self.raised = false;
        Some(self.build(local, self.expires, None))
    }

    /// Remove the binding (draining): `Expires: 0` now if we may hold one (bound, or a
    /// REGISTER in flight), and nothing after.
    pub(crate) fn unregister(&mut self, local: SocketAddr) -> Option<Outgoing> {
        let had = match &self.phase {
            Phase::Idle { bound_until, .. } => bound_until.is_some(),
            Phase::InFlight { bound_until } => bound_until.is_some(),
            Phase::Failed { .. } | Phase::Stopped => false,
        };
        self.phase = Phase::Stopped;
        if !had {
            return None;
        }
        self.removing = true;
        self.answered = false;
        self.stale_retries = 0;
        Some(self.build(local, 0, None))
    }

    /// The final response to our REGISTER; returns a REGISTER to send at once (the challenge
    /// answered, or a longer interval after 423).
    pub(crate) fn on_final(&mut self, now: Instant, resp: &Response) -> Option<Outgoing> {
        let local = self.local?;
        let bound_until = self.bound_until(now);
        if self.removing {
            // Unbinding: answer a challenge once; whatever else comes, we are done.
            if matches!(resp.code, 401 | 407) && !self.answered {
                return self.answer(resp, local, 0);
            }
            self.removing = false;
            return None;
        }
        if self.phase == Phase::Stopped {
            // The first REGISTER was still unanswered when the stop began. Bound after all:
            // unbind at once. (A challenge is left unanswered: nothing is bound.)
            if (200..300).contains(&resp.code) {
                self.removing = true;
                self.answered = false;
                return Some(self.build(local, 0, None));
            }
            return None;
        }
        match resp.code {
            200..=299 => {
                let granted = self.granted(resp, local);
                self.failures = 0;
                self.failed_over = 0;
                // Refresh halfway through (at least a second from now).
                let refresh = Duration::from_secs(u64::from(granted / 2).max(1));
                self.phase = Phase::Idle {
                    at: now + refresh,
                    bound_until: Some(now + Duration::from_secs(u64::from(granted))),
                };
                None
            }
            401 | 407 => {
                let stale = resp.headers_named(challenge_header(resp.code)).any(|c| {
                    c.to_ascii_lowercase()
                        .replace(' ', "")
                        .contains("stale=true")
                });
                let again = !self.answered || (stale && self.stale_retries == 0);
                if self.creds.is_empty() {
                    self.fail(
                        now,
                        resp,
                        "the registrar asks for credentials: set trunks.auth",
                    );
                    return None;
                }
                if !again {
                    self.fail(now, resp, "the registrar refused trunks.auth");
                    return None;
                }
                if self.answered {
                    self.stale_retries += 1;
                }
                let expires = self.expires;
                let out = self.answer(resp, local, expires);
                if out.is_none() {
                    self.fail(now, resp, "no digest challenge we can answer");
                } else {
                    self.phase = Phase::InFlight { bound_until };
                }
                out
            }
            423 => {
                let min = resp
                    .header("Min-Expires")
                    .and_then(|v| v.trim().parse::<u32>().ok());
                match min {
                    Some(min) if !self.raised && min > self.expires => {
                        self.raised = true;
                        self.expires = min;
                        self.answered = false;
                        Some(self.build(local, min, None))
                    }
                    _ => {
                        self.fail(now, resp, "423 without a usable Min-Expires");
                        None
                    }
                }
            }
            _ => {
                self.fail(now, resp, "");
                None
            }
        }
    }

    /// Our REGISTER got no final answer (timer F).
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if self.removing || self.phase == Phase::Stopped {
            self.removing = false;
            return;
        }
        self.failed_with(now, "no answer from the registrar".into(), None, true);
    }

    /// The registrar's host name did not resolve: the REGISTER that was due is retried later.
    pub(crate) fn unreachable(&mut self, now: Instant, why: String) {
        if matches!(self.phase, Phase::Idle { .. } | Phase::Failed { .. }) {
            self.failed_with(now, why, None, false);
        }
    }

    /// The REGISTER that was due could not be sent to the address chosen (a TCP connection
    /// refused): the name's next address is tried at once, as after a timeout.
    pub(crate) fn transport_error(&mut self, now: Instant, why: String) {
        if matches!(self.phase, Phase::Idle { .. } | Phase::Failed { .. }) {
            self.failed_with(now, why, None, true);
        }
    }

    /// What `/health` shows.
    pub(crate) fn status(&self, now: Instant) -> RegistrationStatus {
        let mut s = RegistrationStatus {
            state: "registering".into(),
            aor: self.aor.clone(),
            registrar: self.cfg.registrar.clone(),
            expires_in: None,
            last_error: None,
            retry_in: None,
        };
        match &self.phase {
            Phase::Stopped if self.removing => s.state = "unregistering".into(),
            Phase::Stopped => s.state = "unregistered".into(),
            Phase::Failed { at, error } => {
                s.state = "failed".into();
                s.last_error = Some(error.clone());
                s.retry_in = Some(at.saturating_duration_since(now).as_secs());
            }
            Phase::Idle { .. } | Phase::InFlight { .. } => {
                if let Some(until) = self.bound_until(now) {
                    s.state = "registered".into();
                    s.expires_in = Some(until.saturating_duration_since(now).as_secs());
                }
            }
        }
        s
    }

    /// Bound now (a binding we were granted has not lapsed).
    #[cfg(test)]
    pub(crate) fn is_registered(&self, now: Instant) -> bool {
        self.bound_until(now).is_some()
    }

    fn bound_until(&self, now: Instant) -> Option<Instant> {
        match &self.phase {
            Phase::Idle { bound_until, .. } | Phase::InFlight { bound_until } => {
                bound_until.filter(|u| *u > now)
            }
            Phase::Failed { .. } | Phase::Stopped => None,
        }
    }

    fn fail(&mut self, now: Instant, resp: &Response, why: &str) {
        let what = if why.is_empty() {
            format!("{} {}", resp.code, resp.reason)
        } else {
            format!("{} {}: {why}", resp.code, resp.reason)
        };
        let retry_after = resp
            .header("Retry-After")
            .and_then(|v| v.split([';', '(']).next())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // RFC 3263 section 4.3: a 503 sends the request to the name's next address. (Its
        // Retry-After is about the address that sent it.)
        self.failed_with(now, what, retry_after, resp.code == 503);
    }

    /// Count a failure. With `next_address` (no answer, transport error, 503) and an address
    /// of the name not yet failed in this round, the next REGISTER goes at once (to the next
    /// address: [`TrunkRegistration::failing`]); otherwise after the back-off.
    fn failed_with(
        &mut self,
        now: Instant,
        error: String,
        retry_after: Option<Duration>,
        next_address: bool,
    ) {
        if next_address && self.failed_over + 1 < self.addresses {
            self.failed_over += 1;
            self.phase = Phase::Failed {
                at: now,
                error: format!("{error}; trying the registrar's next address"),
            };
            return;
        }
        self.failed_over = 0;
        self.failures = self.failures.saturating_add(1);
        let wait = retry_after
            .map(|r| r.clamp(Duration::from_secs(1), BACKOFF_MAX))
            .unwrap_or_else(|| backoff(self.failures, rand::random::<f64>()));
        self.phase = Phase::Failed {
            at: now + wait,
            error,
        };
    }

    /// How long the 2xx says our binding lasts.
    fn granted(&self, resp: &Response, local: SocketAddr) -> u32 {
        let ours = self.contact_uri(local);
        let from_contact = resp
            .contacts()
            .into_iter()
            .find(|c| same_contact(&c.uri, &ours))
            .and_then(|c| {
                c.param("expires")
                    .and_then(|e| e.trim().parse::<u32>().ok())
            });
        from_contact
            .or_else(|| {
                resp.header("Expires")
                    .and_then(|e| e.trim().parse::<u32>().ok())
            })
            .unwrap_or(self.expires)
    }

    fn answer(&mut self, resp: &Response, local: SocketAddr, expires: u32) -> Option<Outgoing> {
        let value = self.creds.answer(
            &resp
                .headers_named(challenge_header(resp.code))
                .collect::<Vec<_>>(),
            "REGISTER",
            &self.request_uri,
            &random_token(16),
        )?;
        let header = if resp.code == 407 {
            "Proxy-Authorization"
        } else {
            "Authorization"
        };
        self.answered = true;
        Some(self.build(local, expires, Some((header, value))))
    }

    fn contact_uri(&self, local: SocketAddr) -> String {
        if self.over_tcp() {
            format!("sip:{}@{local};transport=tcp", self.cfg.user)
        } else {
            format!("sip:{}@{local}", self.cfg.user)
        }
    }

    fn build(&mut self, local: SocketAddr, expires: u32, auth: Option<(&str, String)>) -> Outgoing {
        self.cseq += 1;
        self.local = Some(local);
        let branch = new_branch();
        let mut b = RequestBuilder::new(
            &crate::sip::message::Method::Register,
            &self.request_uri,
            if self.over_tcp() { "TCP" } else { "UDP" },
            local,
            &branch,
        )
        .header("From", format_args!("<{}>;tag={}", self.aor, self.from_tag))
        .header("To", format_args!("<{}>", self.aor))
        .header("Call-ID", &self.call_id)
        .header("CSeq", format_args!("{} REGISTER", self.cseq))
        .header("Contact", format_args!("<{}>", self.contact_uri(local)))
        .header("Expires", expires);
        if let Some((name, value)) = auth {
            b = b.header(name, value);
        }
        Outgoing {
            bytes: b
                .header("User-Agent", concat!("ivr311/", env!("CARGO_PKG_VERSION")))
                .build(),
            branch,
        }
    }
}

/// What a registration needs of the network it runs over (the UA core answers).
pub(crate) trait Network {
    /// Our address as a peer at `remote` sees it (Via, Contact).
    fn local_for(&self, remote: SocketAddr) -> SocketAddr;
    /// Whether `flow` can be sent on as it is: UDP, or a TCP connection still open.
    fn is_open(&self, flow: &Flow) -> bool;
}

/// What the UA core does for a [`TrunkClient`].
#[derive(Debug)]
pub(crate) enum TrunkNeed {
    /// Look the registrar's name up (every address, in order:
    /// [`crate::sip::resolve::Resolver::resolve_all`]), then [`TrunkClient::on_resolved`].
    Resolve(String),
    /// Open a TCP connection to this address, then [`TrunkClient::on_connected`].
    Connect(SocketAddr),
    /// Send this REGISTER along the flow in a client transaction of its own; its final
    /// response goes to [`TrunkClient::on_final`], its timeout to [`TrunkClient::on_timeout`].
    Send(Flow, Outgoing),
    /// Keep this TCP connection open however quiet it is: the trunk sends our calls along it.
    Hold(Flow),
    /// No longer keep this connection open.
    Release(Flow),
}

/// Where the REGISTER that is due stands on its way to the registrar.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// Nothing under way: when a REGISTER falls due, a registrar named by a host name is
    /// looked up, a TCP connection that is not open is opened, and the REGISTER goes.
    Idle,
    /// The registrar's name is being looked up. `current` is the address the last REGISTER
    /// went to and `failed` whether it failed there: the look-up's answer picks the next one.
    Resolving { current: SocketAddr, failed: bool },
    /// The TCP connection to the flow's address is being opened; `looked_up`: the name was
    /// looked up for this REGISTER already.
    Connecting { looked_up: bool },
}

/// Our registration with the trunk as the UA core runs it: the REGISTER protocol
/// ([`TrunkRegistration`]), where its REGISTERs go (the registrar's address, looked up before
/// each REGISTER when it is a name, and over TCP the connection held open for it), and the
/// REGISTER in flight. Sans-IO: time, look-up and connection results, final responses and
/// timeouts go in; [`TrunkNeed`]s come out.
#[derive(Debug)]
pub(crate) struct TrunkClient {
    reg: TrunkRegistration,
    /// Where REGISTERs go: UDP, or TCP (`conn` 0 while no connection is open).
    flow: Flow,
    /// The registrar is named by a host name, looked up before each REGISTER.
    by_name: bool,
    /// The name's addresses a REGISTER failed at since the last success, so that the next
    /// goes to one not yet tried ([`crate::sip::resolve::choose_untried`]).
    tried: Vec<SocketAddr>,
    reach: Reach,
    /// The Via branch of the REGISTER in flight: answers to older ones are ignored.
    in_flight: Option<String>,
}

impl TrunkClient {
    /// A registration whose first REGISTER is due at `now`, going to `remote` (for a
    /// registrar named by a host name, a stand-in until the first look-up).
    pub(crate) fn new(
        cfg: RegisterConfig,
        creds: TrunkCredentials,
        remote: SocketAddr,
        now: Instant,
    ) -> Self {
        let by_name = crate::sip::resolve::needs_lookup(&cfg.registrar);
        let reg = TrunkRegistration::new(cfg, creds, now);
        let transport = if reg.over_tcp() {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        TrunkClient {
            reg,
            flow: Flow {
                transport,
                remote,
                conn: 0,
            },
            by_name,
            tried: Vec::new(),
            reach: Reach::Idle,
            in_flight: None,
        }
    }

    /// When [`TrunkClient::poll`] next has something to do: the next REGISTER is due
    /// ([`TrunkRegistration::due`]), unless a look-up or a connection for it is under way
    /// (its result moves the registration on).
    pub(crate) fn due(&self) -> Option<Instant> {
        match self.reach {
            Reach::Idle => self.reg.due(),
            Reach::Resolving { .. } | Reach::Connecting { .. } => None,
        }
    }

    /// What `/health` shows.
    pub(crate) fn status(&self, now: Instant) -> RegistrationStatus {
        self.reg.status(now)
    }

    /// The REGISTER's timer: send the one that is due, after looking the registrar up and
    /// opening its connection where needed.
    pub(crate) fn poll(&mut self, now: Instant, net: &impl Network) -> Vec<TrunkNeed> {
        self.advance(now, net, false)
    }

    fn advance(&mut self, now: Instant, net: &impl Network, looked_up: bool) -> Vec<TrunkNeed> {
        if self.reach != Reach::Idle {
            return Vec::new(); // a look-up or a connection is under way; it carries on
        }
        let due = self.reg.due().is_some_and(|at| at <= now);
        if due && self.by_name && !looked_up {
            // A registrar name with several addresses: stay at the one that works, move to one
            // not yet tried when it failed (RFC 3263 section 4.3).
            let (current, failed) = (self.flow.remote, self.reg.failing());
            if !failed {
                self.tried.clear();
            } else if !self.tried.contains(&current) {
                self.tried.push(current);
            }
            self.reach = Reach::Resolving { current, failed };
            return vec![TrunkNeed::Resolve(self.reg.registrar().to_owned())];
        }
        if due && self.flow.transport == Transport::Tcp && !net.is_open(&self.flow) {
            self.reach = Reach::Connecting { looked_up };
            return vec![TrunkNeed::Connect(self.flow.remote)];
        }
        let local = net.local_for(self.flow.remote);
        self.reg
            .poll(now, local)
            .map(|out| self.send(out))
            .into_iter()
            .collect()
    }

    fn send(&mut self, out: Outgoing) -> TrunkNeed {
        self.in_flight = Some(out.branch.clone());
        TrunkNeed::Send(self.flow, out)
    }

    /// The registrar's name was looked up: send the REGISTER that waited for it to the address
    /// chosen, or count the failure (retried later, as any other).
    pub(crate) fn on_resolved(
        &mut self,
        now: Instant,
        found: Result<Vec<SocketAddr>, String>,
        net: &impl Network,
    ) -> Vec<TrunkNeed> {
        let Reach::Resolving { current, failed } = self.reach.clone() else {
            return Vec::new();
        };
        self.reach = Reach::Idle;
        match found {
            Ok(all) if !all.is_empty() => {
                let addr =
                    crate::sip::resolve::choose_untried(&all, &self.tried, Some(current), failed);
                self.reg.set_addresses(all.len());
                let mut needs = Vec::new();
                if self.flow.remote != addr && self.flow.conn != 0 {
                    // The name moved: a TCP registration opens a connection to the new address.
                    needs.push(TrunkNeed::Release(self.flow));
                    self.flow.conn = 0;
                }
                self.flow.remote = addr;
                needs.extend(self.advance(now, net, true));
                needs
            }
            Ok(_) => {
                self.reg.unreachable(now, "the name has no address".into());
                Vec::new()
            }
            Err(why) => {
                self.reg.unreachable(now, why);
                Vec::new()
            }
        }
    }

    /// The registrar's TCP connection was opened: hold it open (the trunk sends our calls
    /// along it) and send the REGISTER that waited for it; or count the failure, so that the
    /// next REGISTER goes at once to the name's next address.
    pub(crate) fn on_connected(
        &mut self,
        now: Instant,
        opened: Result<Flow, String>,
        net: &impl Network,
    ) -> Vec<TrunkNeed> {
        let Reach::Connecting { looked_up } = self.reach else {
            return Vec::new();
        };
        self.reach = Reach::Idle;
        match opened {
            // Opened to an address the registrar's name no longer has: open one to the new.
            Ok(new) if new.remote != self.flow.remote => self.advance(now, net, looked_up),
            Ok(new) => {
                let mut needs = Vec::new();
                if new.conn != self.flow.conn {
                    needs.push(TrunkNeed::Release(self.flow));
                    needs.push(TrunkNeed::Hold(new));
                    self.flow = new;
                }
                needs.extend(self.advance(now, net, looked_up));
                needs
            }
            Err(why) => {
                self.reg.transport_error(now, why);
                Vec::new()
            }
        }
    }

    /// The final response to the REGISTER with Via branch `branch`: a REGISTER to send at once
    /// (a challenge answered, a longer interval after 423), or none.
    pub(crate) fn on_final(
        &mut self,
        now: Instant,
        branch: &str,
        resp: &Response,
    ) -> Vec<TrunkNeed> {
        if self.in_flight.as_deref() != Some(branch) {
            return Vec::new(); // superseded (an unbinding went out meanwhile)
        }
        self.in_flight = None;
        self.reg
            .on_final(now, resp)
            .map(|out| self.send(out))
            .into_iter()
            .collect()
    }

    /// The REGISTER with Via branch `branch` got no final response (timer F).
    pub(crate) fn on_timeout(&mut self, now: Instant, branch: &str) {
        if self.in_flight.as_deref() == Some(branch) {
            self.in_flight = None;
            self.reg.on_timeout(now);
        }
    }

    /// The server is draining: remove our binding (if we may hold one), along the flow the
    /// REGISTERs took.
    pub(crate) fn unregister(&mut self, net: &impl Network) -> Vec<TrunkNeed> {
        let local = net.local_for(self.flow.remote);
        self.reg
            .unregister(local)
            .map(|out| self.send(out))
            .into_iter()
            .collect()
    }
}

/// Wait before retry number `failures` (1 = the first failure): 30 s doubling to 30 min, times
/// `jitter` in [0.5, 1] (RFC 5626 §4.5), so nodes that failed together do not retry together.
pub(crate) fn backoff(failures: u32, unit: f64) -> Duration {
    let doubled = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    doubled
        .min(BACKOFF_MAX)
        .mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

fn challenge_header(code: u16) -> &'static str {
    if code == 407 {
        "Proxy-Authenticate"
    } else {
        "WWW-Authenticate"
    }
}

/// `sip:198.51.100.10:5060;transport=udp` → `198.51.100.10:5060`.
fn registrar_hostport(uri: &str) -> String {
    let rest = uri.split_once(':').map_or(uri, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    rest.split([';', '?']).next().unwrap_or(rest).to_owned()
}

/// Whether a Contact URI in a 2xx is ours (user and host:port; parameters ignored, as a
/// registrar may add some).
fn same_contact(theirs: &str, ours: &str) -> bool {
    let strip = |u: &str| u.split([';', '?']).next().unwrap_or(u).to_ascii_lowercase();
    strip(theirs) == strip(ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse_datagram, Message, Request};
    use crate::sip::registrar::{Credentials, Registrar};

    fn cfg() -> RegisterConfig {
        RegisterConfig {
            registrar: "sip:127.0.0.1:5090".into(),
            user: "city311".into(),
            domain: None,
            expires: 600,
        }
    }

    fn creds() -> Credentials {
        Credentials {
            username: "city311".into(),
            password: "s3cret".into(),
            realm: None,
        }
    }

    fn local() -> SocketAddr {
        "127.0.0.1:5060".parse().unwrap()
    }

    fn request(o: &Outgoing) -> Request {
        match parse_datagram(&o.bytes, 65535).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => panic!("a request"),
        }
    }

    fn response(req: &Request, code: u16, extra: &str) -> Response {
        let text = format!(
            "SIP/2.0 {code} X\r\nVia: {}\r\nFrom: {}\r\nTo: {};tag=r1\r\nCall-ID: {}\r\nCSeq: {} REGISTER\r\n{extra}Content-Length: 0\r\n\r\n",
            req.top_via().raw,
            req.from.raw,
            req.to.raw,
            req.call_id,
            req.cseq
        );
        match parse_datagram(text.as_bytes(), 65535).unwrap() {
            Message::Response(r) => r,
            Message::Request(_) => panic!("a response"),
        }
    }

    #[test]
    fn registers_answers_the_challenge_and_refreshes_halfway() {
        let t0 = Instant::now();
        let mut reg = TrunkRegistration::new(cfg(), creds().into(), t0);
        let first = reg.poll(t0, local()).expect("due at start");
        let r1 = request(&first);
        assert_eq!(r1.uri, "sip:127.0.0.1:5090");
        assert_eq!(r1.header("Expires"), Some("600"));
        assert_eq!(r1.contacts()[0].uri, "sip:city311@127.0.0.1:5060");
        assert!(reg.poll(t0, local()).is_none(), "one REGISTER at a time");

        // Our own registrar (the one agents log in to) is the far end.
        let mut registrar = Registrar::new(
            "carrier".into(),
            &[("city311".into(), "s3cret".into())],
            [7; 32],
        );
        let flow = Flow {
            transport: Transport::Udp,
            remote: local(),
            conn: 0,
        };
        let (challenge, _) = registrar.handle(t0, &r1, flow);
        assert_eq!(challenge.code, 401);
        let extra: String = challenge
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        let again = reg
            .on_final(t0, &response(&r1, 401, &extra))
            .expect("answers the challenge");
        let r2 = request(&again);
        assert_eq!(r2.call_id, r1.call_id, "same Call-ID");
        assert_eq!(r2.cseq, r1.cseq + 1, "CSeq + 1");
        let (ok, _) = registrar.handle(t0, &r2, flow);
        assert_eq!(ok.code, 200, "our registrar takes the digest");
        // Granted 120 s in our Contact's expires: refresh at 60 s.
        let ok = response(
            &r2,
            200,
            "Contact: <sip:city311@127.0.0.1:5060>;expires=120\r\n",
        );
        assert!(reg.on_final(t0, &ok).is_none());
        assert!(reg.is_registered(t0));
        assert_eq!(reg.status(t0).expires_in, Some(120));
        assert_eq!(reg.due(), Some(t0 + Duration::from_secs(60)));
        assert!(reg.poll(t0 + Duration::from_secs(59), local()).is_none());
        let refresh = reg.poll(t0 + Duration::from_secs(60), local()).unwrap();
        assert_eq!(request(&refresh).cseq, r2.cseq + 1);
        assert!(
            reg.is_registered(t0 + Duration::from_secs(60)),
            "still bound while refreshing"
        );
    }

    #[test]
    fn a_name_with_several_addresses_moves_on_at_once_and_backs_off_after_the_round() {
        let t0 = Instant::now();
        let mut reg = TrunkRegistration::new(cfg(), creds().into(), t0);
        reg.set_addresses(3);
        // The first address answers 503 with a long Retry-After: the second is tried now.
        let r1 = request(&reg.poll(t0, local()).unwrap());
        assert!(reg
            .on_final(t0, &response(&r1, 503, "Retry-After: 300\r\n"))
            .is_none());
        assert_eq!(reg.due(), Some(t0), "the next address at once");
        assert!(reg.failing(), "so the lookup moves on to the next address");
        let s = reg.status(t0);
        assert_eq!(s.state, "failed");
        assert!(s.last_error.unwrap().contains("next address"));
        // The second is silent (timer F): the third is tried now.
        let t1 = t0 + Duration::from_secs(32);
        reg.poll(t0, local()).unwrap();
        reg.on_timeout(t1);
        assert_eq!(reg.due(), Some(t1));
        // The third refuses the TCP connection: every address failed, back off.
        reg.transport_error(t1, "TCP to 192.0.2.3:5060: refused".into());
        let wait = reg.due().unwrap() - t1;
        assert!((Duration::from_secs(15)..=Duration::from_secs(30)).contains(&wait));
        assert!(
            reg.failing(),
            "the next round starts after the last address"
        );

        // A 403 is the registrar's answer, not an outage: back off, same address.
        let mut reg = TrunkRegistration::new(cfg(), creds().into(), t0);
        reg.set_addresses(2);
        let r1 = request(&reg.poll(t0, local()).unwrap());
        assert!(reg.on_final(t0, &response(&r1, 403, "")).is_none());
        assert!(reg.due().unwrap() - t0 >= Duration::from_secs(15));

        // Registered at the second address, the round starts again: its failure later moves
        // on at once again.
        let mut reg = TrunkRegistration::new(cfg(), creds().into(), t0);
        reg.set_addresses(2);
        reg.poll(t0, local()).unwrap();
        reg.on_timeout(t0);
        let r2 = request(&reg.poll(t0, local()).unwrap());
        assert!(reg.on_final(t0, &response(&r2, 200, "")).is_none());
        assert!(reg.is_registered(t0) && !reg.failing());
        let t2 = reg.due().unwrap();
        reg.poll(t2, local()).unwrap();
        reg.on_timeout(t2);
        assert_eq!(reg.due(), Some(t2));
    }

    #[test]
    fn refused_credentials_and_outages_back_off_and_say_why() {
        let t0 = Instant::now();
        let mut reg = TrunkRegistration::new(cfg(), creds().into(), t0);
        let r1 = request(&reg.poll(t0, local()).unwrap());
        let ch = "WWW-Authenticate: Digest realm=\"carrier\", nonce=\"n1\", qop=\"auth\"\r\n";
        let r2 = request(&reg.on_final(t0, &response(&r1, 401, ch)).unwrap());
        assert!(r2.header("Authorization").is_some());
        // A second plain challenge: the password is wrong. No loop, a clear reason.
        assert!(reg.on_final(t0, &response(&r2, 401, ch)).is_none());
        let s = reg.status(t0);
        assert_eq!(s.state, "failed");
        assert!(s.last_error.unwrap().contains("refused trunks.auth"));
        let wait = reg.due().unwrap() - t0;
        assert!((Duration::from_secs(15)..=Duration::from_secs(30)).contains(&wait));

        // A stale nonce is answered once more.
        let t1 = reg.due().unwrap();
        let r3 = request(&reg.poll(t1, local()).unwrap());
        let r4 = request(&reg.on_final(t1, &response(&r3, 401, ch)).unwrap());
        let stale = "WWW-Authenticate: Digest realm=\"carrier\", nonce=\"n2\", stale=true\r\n";
        assert!(reg.on_final(t1, &response(&r4, 401, stale)).is_some());

        // 503 with Retry-After: the registrar's time, not ours.
        let mut reg = TrunkRegistration::new(cfg(), creds().into(), t0);
        let r1 = request(&reg.poll(t0, local()).unwrap());
        assert!(reg
            .on_final(t0, &response(&r1, 503, "Retry-After: 120\r\n"))
            .is_none());
        assert_eq!(reg.due(), Some(t0 + Duration::from_secs(120)));
        // No answer at all, again and again: 30 s doubling, never past 30 min.
        let mut reg = TrunkRegistration::new(cfg(), TrunkCredentials::default(), t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            reg.poll(now, local()).unwrap();
            reg.on_timeout(now);
            let at = reg.due().unwrap();
            waits.push((at - now).as_secs());
            now = at;
        }
        assert!(waits[0] >= 15 && waits[0] <= 30, "{waits:?}");
        assert!(waits[3] >= 120 && waits[3] <= 240, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 1800), "{waits:?}");
        assert!(waits[8] >= 900, "{waits:?}");
        // Never bound: a stop sends nothing to the unreachable registrar.
        assert!(reg.unregister(local()).is_none());
        assert_eq!(reg.status(now).state, "unregistered");
    }

    #[test]
    fn no_credentials_interval_too_brief_and_unbinding() {
        let t0 = Instant::now();
        let mut reg = TrunkRegistration::new(cfg(), TrunkCredentials::default(), t0);
        let r1 = request(&reg.poll(t0, local()).unwrap());
        let ch = "WWW-Authenticate: Digest realm=\"carrier\", nonce=\"n1\"\r\n";
        assert!(reg.on_final(t0, &response(&r1, 401, ch)).is_none());
        assert!(reg
            .status(t0)
            .last_error
            .unwrap()
            .contains("set trunks.auth"));

        let mut reg = TrunkRegistration::new(cfg(), TrunkCredentials::default(), t0);
        let r1 = request(&reg.poll(t0, local()).unwrap());
        let r2 = request(
            &reg.on_final(t0, &response(&r1, 423, "Min-Expires: 1800\r\n"))
                .expect("asks again for longer"),
        );
        assert_eq!(r2.header("Expires"), Some("1800"));
        // Granted by Expires (no Contact in the 2xx).
        assert!(reg
            .on_final(t0, &response(&r2, 200, "Expires: 1800\r\n"))
            .is_none());
        assert_eq!(reg.due(), Some(t0 + Duration::from_secs(900)));

        let bye = request(&reg.unregister(local()).expect("removes the binding"));
        assert_eq!(bye.header("Expires"), Some("0"));
        assert_eq!(reg.status(t0).state, "unregistering");
        assert!(reg.on_final(t0, &response(&bye, 200, "")).is_none());
        assert_eq!(reg.status(t0).state, "unregistered");
        assert_eq!(reg.due(), None, "nothing after unbinding");
        assert!(reg.unregister(local()).is_none(), "once");

        // The stop begins while the first REGISTER is unanswered: nothing to remove yet, and
        // nothing is sent to a registrar that may be down; if the 200 still comes, the
        // binding it made is removed at once.
        let mut reg = TrunkRegistration::new(cfg(), TrunkCredentials::default(), t0);
        let r1 = request(&reg.poll(t0, local()).unwrap());
        assert!(reg.unregister(local()).is_none());
        assert_eq!(reg.status(t0).state, "unregistered");
        let late = reg
            .on_final(t0, &response(&r1, 200, "Expires: 600\r\n"))
            .expect("the late binding is removed");
        assert_eq!(request(&late).header("Expires"), Some("0"));
        assert_eq!(reg.due(), None);
        reg.on_timeout(t0);
        assert_eq!(reg.status(t0).state, "unregistered");
    }

    #[test]
    fn backoff_doubles_from_30_s_to_30_min_with_jitter() {
        assert_eq!(backoff(1, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(1, 0.0), Duration::from_secs(15));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(120));
        assert_eq!(backoff(7, 1.0), Duration::from_secs(1800));
        assert_eq!(backoff(40, 1.0), Duration::from_secs(1800));
    }

    /// The network as a [`TrunkClient`] sees it in these tests: TCP connections in `open`
    /// are open.
    struct Net {
        open: Vec<u64>,
    }

    impl Network for Net {
        fn local_for(&self, _: SocketAddr) -> SocketAddr {
            local()
        }
        fn is_open(&self, flow: &Flow) -> bool {
            flow.transport == Transport::Udp || self.open.contains(&flow.conn)
        }
    }

    fn named(registrar: &str) -> RegisterConfig {
        RegisterConfig {
            registrar: registrar.into(),
            ..cfg()
        }
    }

    const STAND_IN: &str = "192.0.2.1:5060";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The REGISTER a need sends, and the flow it goes along.
    fn sent(needs: Vec<TrunkNeed>) -> (Flow, Request) {
        match needs.as_slice() {
            [.., TrunkNeed::Send(flow, out)] => (*flow, request(out)),
            other => panic!("expected a REGISTER, got {other:?}"),
        }
    }

    #[test]
    fn a_registrar_name_is_looked_up_before_each_register_and_a_silent_address_left_for_the_next() {
        let t0 = Instant::now();
        let net = Net { open: vec![] };
        let (a, b) = (addr("127.0.0.2:5090"), addr("127.0.0.1:5090"));
        let mut c = TrunkClient::new(
            named("sip:registrar.test:5090"),
            creds().into(),
            addr(STAND_IN),
            t0,
        );
        let needs = c.poll(t0, &net);
        assert!(
            matches!(needs.as_slice(), [TrunkNeed::Resolve(u)] if u == "sip:registrar.test:5090")
        );
        assert_eq!(c.due(), None, "nothing to do until the look-up answers");
        assert!(c.poll(t0, &net).is_empty(), "one look-up at a time");
        let (flow, r1) = sent(c.on_resolved(t0, Ok(vec![a, b]), &net));
        assert_eq!((flow.transport, flow.remote), (Transport::Udp, a));
        // No answer there (timer F): the next REGISTER goes at once, looked up again, to the
        // address not yet tried.
        c.on_timeout(t0, &r1.top_via().branch.clone().unwrap());
        assert_eq!(c.due(), Some(t0));
        assert!(matches!(
            c.poll(t0, &net).as_slice(),
            [TrunkNeed::Resolve(_)]
        ));
        let (flow, _) = sent(c.on_resolved(t0, Ok(vec![a, b]), &net));
        assert_eq!(flow.remote, b);
        // A name that does not resolve: retried after the back-off, not at once.
        let mut c = TrunkClient::new(
            named("sip:registrar.test:5090"),
            creds().into(),
            addr(STAND_IN),
            t0,
        );
        c.poll(t0, &net);
        assert!(c.on_resolved(t0, Err("NXDOMAIN".into()), &net).is_empty());
        assert_eq!(c.status(t0).state, "failed");
        assert!(c.due().is_some_and(|at| at >= t0 + BACKOFF_BASE / 2));
    }

    #[test]
    fn over_tcp_a_refused_connection_moves_the_register_to_the_names_next_address() {
        let t0 = Instant::now();
        let (a, b) = (addr("127.0.0.2:5090"), addr("127.0.0.1:5090"));
        let mut net = Net { open: vec![] };
        let mut c = TrunkClient::new(
            named("sip:registrar.test:5090;transport=tcp"),
            creds().into(),
            addr(STAND_IN),
            t0,
        );
        assert!(matches!(
            c.poll(t0, &net).as_slice(),
            [TrunkNeed::Resolve(_)]
        ));
        let needs = c.on_resolved(t0, Ok(vec![a, b]), &net);
        assert!(matches!(needs.as_slice(), [TrunkNeed::Connect(r)] if *r == a));
        assert!(c.poll(t0, &net).is_empty(), "one connection at a time");
        // Refused: the name is looked up again at once and the other address is tried.
        assert!(c.on_connected(t0, Err("refused".into()), &net).is_empty());
        assert!(matches!(
            c.poll(t0, &net).as_slice(),
            [TrunkNeed::Resolve(_)]
        ));
        let needs = c.on_resolved(t0, Ok(vec![a, b]), &net);
        assert!(matches!(needs.as_slice(), [TrunkNeed::Connect(r)] if *r == b));
        let opened = Flow {
            transport: Transport::Tcp,
            remote: b,
            conn: 7,
        };
        net.open.push(7);
        let needs = c.on_connected(t0, Ok(opened), &net);
        assert!(
            matches!(needs.first(), Some(TrunkNeed::Release(f)) if f.conn == 0),
            "{needs:?}"
        );
        assert!(matches!(needs.get(1), Some(TrunkNeed::Hold(f)) if *f == opened));
        let (flow, r) = sent(needs);
        assert_eq!(flow, opened);
        assert!(
            r.top_via().raw.starts_with("SIP/2.0/TCP"),
            "{}",
            r.top_via().raw
        );
        // Registered there; the refresh looks the name up and goes along the same connection.
        let ok = response(&r, 200, "Expires: 120\r\n");
        assert!(c
            .on_final(t0, &r.top_via().branch.clone().unwrap(), &ok)
            .is_empty());
        let t1 = t0 + Duration::from_secs(60);
        assert!(matches!(
            c.poll(t1, &net).as_slice(),
            [TrunkNeed::Resolve(_)]
        ));
        let (flow, r) = sent(c.on_resolved(t1, Ok(vec![a, b]), &net));
        assert_eq!(flow, opened, "no new connection while this one is open");
        let ok = response(&r, 200, "Expires: 120\r\n");
        assert!(c
            .on_final(t1, &r.top_via().branch.clone().unwrap(), &ok)
            .is_empty());
        // The name moved to another address: the old connection is let go, a new one opened.
        let t2 = t1 + Duration::from_secs(60);
        assert!(matches!(
            c.poll(t2, &net).as_slice(),
            [TrunkNeed::Resolve(_)]
        ));
        let moved = addr("127.0.0.3:5090");
        let needs = c.on_resolved(t2, Ok(vec![moved]), &net);
        assert!(
            matches!(needs.as_slice(), [TrunkNeed::Release(f), TrunkNeed::Connect(r)] if *f == opened && *r == moved),
            "{needs:?}"
        );
    }

    #[test]
    fn answers_to_a_superseded_register_are_ignored_and_draining_unbinds_along_the_flow() {
        let t0 = Instant::now();
        let net = Net { open: vec![] };
        let mut c = TrunkClient::new(cfg(), creds().into(), addr("127.0.0.1:5090"), t0);
        let (flow, r1) = sent(c.poll(t0, &net));
        assert_eq!(
            flow.remote,
            addr("127.0.0.1:5090"),
            "an address: no look-up"
        );
        let ok = response(&r1, 200, "Expires: 600\r\n");
        assert!(c.on_final(t0, "z9hG4bK-not-ours", &ok).is_empty());
        assert_eq!(c.status(t0).state, "registering");
        let b1 = r1.top_via().branch.clone().unwrap();
        assert!(c.on_final(t0, &b1, &ok).is_empty());
        assert_eq!(c.status(t0).state, "registered");
        let (flow, unbind) = sent(c.unregister(&net));
        assert_eq!(flow.remote, addr("127.0.0.1:5090"));
        assert_eq!(unbind.header("Expires"), Some("0"));
        // A late answer to the first REGISTER changes nothing.
        assert!(c.on_final(t0, &b1, &ok).is_empty());
        assert_eq!(c.status(t0).state, "unregistering");
        let b2 = unbind.top_via().branch.clone().unwrap();
        assert!(c.on_final(t0, &b2, &response(&unbind, 200, "")).is_empty());
        assert_eq!(c.status(t0).state, "unregistered");
        assert!(c.poll(t0 + Duration::from_secs(3600), &net).is_empty());
    }
}
