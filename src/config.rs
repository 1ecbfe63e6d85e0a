//! Server settings: the `serve` flags (each also an `IVR311_*` environment variable) and the
//! `--config` YAML for everything else. Every setting has a documented default, so
//! `ivr311 serve` with no flags at all runs the shipped menu.
//!
//! The YAML is parsed with `deny_unknown_fields`: a misspelt key is an error naming the file,
//! line and column, never silently ignored.
//!
//! This module aggregates: a section whose settings belong to one part of the server is that
//! part's type ([`QosConfig`] in [`crate::sockopt`], [`PortRange`] in [`crate::media::ports`],
//! [`LogConfig`] in [`crate::logging`], [`RegistrarConfig`] in [`crate::sip::registrar`],
//! [`TrunksConfig`] in [`crate::sip::trunk`], [`DnsConfig`] in [`crate::sip::resolve`],
//! `emergency` in [`crate::dispatch::emergency`], [`TransfersConfig`] in
//! [`crate::call::dialplan`]), re-exported here. `sip`, `media` and `menu`
//! never import this module; it imports their types.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use crate::api::console::ConsoleConfig;
pub use crate::call::dialplan::{TransferLine, TransfersConfig};
pub use crate::call::monitor::MonitorConfig;
pub use crate::logging::LogConfig;
pub use crate::media::ports::{parse_port_range, PortRange};
pub use crate::sip::registrar::RegistrarConfig;
pub use crate::sip::resolve::DnsConfig;
pub use crate::sip::trunk::TrunksConfig;
pub use crate::sockopt::{Dscp, QosConfig};

/// `ivr311 serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// SIP listen address, UDP and TCP on the same port.
    #[arg(long, env = "IVR311_SIP", default_value = "0.0.0.0:5060")]
    pub sip: SocketAddr,
    /// HTTP listen address (health, API).
    #[arg(long, env = "IVR311_HTTP", default_value = "127.0.0.1:8311")]
    pub http: SocketAddr,
    /// The menu file.
    #[arg(long, env = "IVR311_MENU", default_value = "menus/311.yaml")]
    pub menu: PathBuf,
    /// The prompts directory (`<dir>/<lang>/<name>.wav`).
    #[arg(long, env = "IVR311_PROMPTS", default_value = "prompts")]
    pub prompts: PathBuf,
    /// The store: a SQLite database file (one node), or a `postgres://user@host/db` URL (a
    /// PostgreSQL database shared by several nodes).
    #[arg(long, env = "IVR311_DB", default_value = "ivr311.db")]
    pub db: PathBuf,
    /// RTP port range, `LO-HI` (one port per call).
    #[arg(long, env = "IVR311_RTP_PORTS", default_value = "10000-20000", value_parser = parse_port_range)]
    pub rtp_ports: PortRange,
    /// YAML file with the remaining settings (limits, media, emergency...).
    #[arg(long, env = "IVR311_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The `--config` YAML.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub limits: Limits,
    pub media: MediaConfig,
    /// How callers are sent to 911 (see [`crate::dispatch::emergency`]).
    pub emergency: crate::dispatch::emergency::EmergencyConfig,
    pub storage: StorageConfig,
    pub open311: Open311Config,
    pub admin: AdminConfig,
    pub http: HttpConfig,
    /// Operators who log in by registering a SIP phone.
    pub agents: Vec<AgentConfig>,
    /// Operator queues (the menu's `{queue: name}` actions refer to these by name).
    pub queues: Vec<QueueConfig>,
    /// The operator console in the browser (`/console`).
    pub console: ConsoleConfig,
    pub callback: CallbackConfig,
    /// Lines operators may transfer callers to (see [`crate::call::dialplan`]).
    pub transfers: TransfersConfig,
    pub registrar: RegistrarConfig,
    pub trunks: TrunksConfig,
    pub qos: QosConfig,
    /// Where host names are looked up (see [`crate::sip::resolve`]).
    pub dns: DnsConfig,
    pub log: LogConfig,
    /// Call history: hashing of callers' numbers and the writer's queue (see
    /// [`crate::history`]).
    pub history: crate::history::HistoryConfig,
    /// How long recordings, callers' numbers and call history are kept (see
    /// [`crate::privacy`]).
    pub retention: crate::privacy::RetentionConfig,
    /// Report settings: service-level targets, short abandons (see [`crate::history::report`]).
    pub reports: crate::history::report::ReportsConfig,
    /// Forwarding tickets to the city's Open311 CRM, and the outbox's retries (see
    /// [`crate::forward`]).
    pub forward: crate::forward::ForwardConfig,
    /// Signed JSON webhooks, delivered through the outbox (see [`crate::forward`]).
    pub webhooks: Vec<crate::forward::WebhookConfig>,
    /// The feature codes supervisors dial to listen, whisper or barge (see
    /// [`crate::call::monitor`]).
    pub monitor: MonitorConfig,
    /// Speech of dynamic text with espeak-ng: voices per language, the cache (see
    /// [`crate::media::tts`]).
    pub speech: crate::media::tts::SpeechConfig,
    /// Numbers answered with menus of their own; every other number gets `--menu` (see
    /// [`crate::call::lines`]).
    pub lines: Vec<crate::call::lines::LineConfig>,
    /// How the lines' numbers are matched in E.164 and national forms.
    pub numbering: crate::call::lines::NumberingConfig,
}

impl FileConfig {
    /// Settings that work but leave the line open to abuse, one sentence each: `ivr311 check
    /// --config` prints them and `ivr311 serve` logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = crate::forward::ForwardConfig::warnings(&self.webhooks);
        if self.callback.trunk_uri.is_some() && self.trunks.allow.is_empty() {
            w.push(
                "callback.trunk_uri is set but trunks.allow is empty: no caller's number is \
                 verified (P-Asserted-Identity is trusted only from trunks.allow), so no caller \
                 can be called back; list the carrier's signalling addresses in trunks.allow"
                    .to_owned(),
            );
        }
        let bridges =
            (self.emergency.plan()).contains(&crate::dispatch::emergency::EmergencyMethod::Bridge);
        if bridges && self.trunks.allow.is_empty() {
            w.push(
                "the 911 bridge is configured but trunks.allow is empty: no caller's number is \
                 verified, so the bridge asserts none to 911 (P-Asserted-Identity is trusted \
                 only from trunks.allow); list the carrier's signalling addresses in \
                 trunks.allow so callers' numbers reach 911"
                    .to_owned(),
            );
        }
        w
    }
}

/// One operator.
///
/// In YAML the secret is either `password: "..."` (plain text: start-up warns) or
/// `password_ha1: {SHA-256: "<64 hex>", MD5: "<32 hex>"}`, the digest hashes
/// `H(id:realm:password)` that `ivr311 agent-hash <id>` prints (realm `ivr311`), one for
/// each algorithm `registrar.digest_algorithms` offers; never both.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "AgentYaml")]
pub struct AgentConfig {
    /// SIP user name the phone registers with (e.g. "1001").
    pub id: String,
    /// The digest password, or its stored hashes.
    pub password: crate::sip::registrar::AgentSecret,
    /// Skills/languages the agent can take (e.g. [en, es]). Empty: any call.
    pub skills: Vec<String>,
    /// Lower tiers are offered calls first. Default 1.
    pub tier: u32,
    /// Display name for the admin view.
    pub name: Option<String>,
    /// What the person may do with the console's log-in. Default `operator`.
    pub role: AgentRole,
}

/// What an agent's log-in opens (`agents[].role`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentRole {
    /// Takes calls: the console at `/console`.
    #[default]
    Operator,
    /// Also watches and steers the centre: the wallboard at `/supervisor`, its actions on
    /// every agent and call, and listening, whispering and barging on operators' calls
    /// ([`crate::call::monitor`]). A supervisor whose phone registers takes calls like an
    /// operator.
    Supervisor,
}

/// [`AgentConfig`] as written in YAML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentYaml {
    id: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_ha1: Option<crate::sip::registrar::PasswordHa1>,
    #[serde(default)]
    skills: Vec<String>,
    #[serde(default = "one")]
    tier: u32,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: AgentRole,
}

impl TryFrom<AgentYaml> for AgentConfig {
    type Error = String;

    fn try_from(a: AgentYaml) -> Result<Self, String> {
        use crate::sip::registrar::AgentSecret;
        let password = match (a.password, a.password_ha1) {
            (Some(p), None) => AgentSecret::Password(p),
            (None, Some(h)) if h.md5.is_some() || h.sha256.is_some() => AgentSecret::Ha1(h),
            (None, Some(_)) => {
                return Err(format!(
                    "agent {:?}: password_ha1 needs `SHA-256:` and/or `MD5:`",
                    a.id
                ))
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "agent {:?}: give `password` or `password_ha1`, not both",
                    a.id
                ))
            }
            (None, None) => {
                return Err(format!(
                    "agent {:?}: missing `password_ha1` (from `ivr311 agent-hash`) or `password`",
                    a.id
                ))
            }
        };
        Ok(AgentConfig {
            id: a.id,
            password,
            skills: a.skills,
            tier: a.tier,
            name: a.name,
            role: a.role,
        })
    }
}

impl FileConfig {
    /// Agents whose stored hashes lack an algorithm the registrar offers (a phone answering
    /// that challenge could never log in): one line per agent, empty when all is well.
    pub(crate) fn agent_hash_problems(&self) -> Vec<String> {
        use crate::sip::registrar::AgentSecret;
        let offered: Vec<String> = self
            .registrar
            .digest_algorithms
            .iter()
            .map(|a| a.to_ascii_uppercase())
            .collect();
        self.agents
            .iter()
            .filter_map(|a| {
                let AgentSecret::Ha1(h) = &a.password else {
                    return None;
                };
                let has = h.algorithms();
                let missing: Vec<&str> = ["SHA-256", "MD5"]
                    .into_iter()
                    .filter(|alg| offered.iter().any(|o| o == alg) && !has.contains(alg))
                    .collect();
                (!missing.is_empty()).then(|| {
                    format!(
                        "agent {:?}: password_ha1 has no {} hash, which registrar.digest_algorithms offers (add it with `ivr311 agent-hash`, or offer only {})",
                        a.id,
                        missing.join(" or "),
                        has.join(", ")
                    )
                })
            })
            .collect()
    }
}

fn one() -> u32 {
    1
}

/// How a queue picks an agent.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The agent idle longest (default; fairest for agents).
    #[default]
    LongestIdle,
    RoundRobin,
    FewestCalls,
    /// Ring every available agent; the first to answer takes the call.
    RingAll,
}

/// One operator queue.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub name: String,
    pub strategy: Strategy,
    /// Seconds an agent rests after each call before the next offer. Default 10.
    pub wrap_up_seconds: u64,
    /// Seconds an agent's phone rings before the next agent is tried. Default 20.
    pub ring_timeout_seconds: u64,
    /// Seconds an agent who did not answer is skipped. Default 30.
    pub no_answer_pause_seconds: u64,
    /// Longest wait before the caller is offered a ticket or a call back. Default 600.
    pub max_wait_seconds: u64,
    /// Most callers waiting; beyond it callers are offered a ticket or a call back. Default 50.
    pub max_length: usize,
    /// Position and estimated wait are announced this often. Default 60.
    pub announce_every_seconds: u64,
    /// The agents (ids, e.g. `[1001, 1002]`) who take this queue's callers. Absent (the
    /// default): every agent. Skills still apply within the members.
    #[serde(deserialize_with = "agent_ids")]
    pub members: Option<Vec<String>>,
    /// The share of callers to answer within the service-level time
    /// (`reports.service_level_seconds`, or this queue's `reports.queue_service_level_seconds`),
    /// from 0 to 1; the wallboard shows the service level against it and raises an alarm
    /// when the last 15 minutes fall under it. Default 0.8.
    pub service_level_target: f64,
    /// A caller waiting this many seconds raises an alarm on the wallboard (0: never).
    /// Default 120.
    pub max_wait_alarm: u64,
    /// Record the caller's talk with the operator: one stereo WAV per call (caller left,
    /// operator right), private, served by the admin API only. Default false.
    pub record: bool,
    /// The prompt (a name in `prompts/<language>/`) played to every caller who enters the
    /// queue, before any operator is offered the call and whatever keys they press (consent to
    /// recording). Default none.
    pub record_announcement: Option<String>,
}

/// Agent ids as YAML gives them: `"1001"` or `1001`.
fn agent_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    let ids: Option<Vec<Id>> = Option::deserialize(d)?;
    Ok(ids.map(|ids| {
        ids.into_iter()
            .map(|id| match id {
                Id::Text(s) => s,
                Id::Number(n) => n.to_string(),
            })
            .collect()
    }))
}

/// Why a `queues` entry cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueueConfigError {
    /// `members` names an id no agent has (a typo would leave the queue short of operators).
    #[error("queue {queue:?}: member {member:?} is not one of the agents")]
    UnknownMember { queue: String, member: String },
    /// `service_level_target` outside 0..=1 (a share, not a percentage).
    #[error(
        "queue {queue:?}: service_level_target {target} must be a share from 0 to 1 (0.8 for 80%)"
    )]
    ServiceLevelTarget { queue: String, target: f64 },
    /// `members: []`: nobody could ever take the queue's callers.
    #[error("queue {queue:?}: members is empty (leave it out to let every agent take the queue)")]
    NoMembers { queue: String },
}

impl QueueConfig {
    /// Problems with this queue against the configured `agents`, for start-up.
    pub(crate) fn check(&self, agents: &[AgentConfig]) -> Result<(), QueueConfigError> {
        if !(0.0..=1.0).contains(&self.service_level_target) {
            return Err(QueueConfigError::ServiceLevelTarget {
                queue: self.name.clone(),
                target: self.service_level_target,
            });
        }
        let Some(members) = &self.members else {
            return Ok(());
        };
        if members.is_empty() {
            return Err(QueueConfigError::NoMembers {
                queue: self.name.clone(),
            });
        }
        match members.iter().find(|m| !agents.iter().any(|a| &a.id == *m)) {
            Some(m) => Err(QueueConfigError::UnknownMember {
                queue: self.name.clone(),
                member: m.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: "general".into(),
            strategy: Strategy::LongestIdle,
            wrap_up_seconds: 10,
            ring_timeout_seconds: 20,
            no_answer_pause_seconds: 30,
            max_wait_seconds: 600,
            max_length: 50,
            announce_every_seconds: 60,
            members: None,
            service_level_target: 0.8,
            max_wait_alarm: 120,
            record: false,
            record_announcement: None,
        }
    }
}

/// Calling callers back who asked to keep their place in the queue (see `crate::call::callback`).
///
/// ```yaml
/// callback:
///   trunk_uri: "sip:{number}@192.0.2.10:5060"   # or "sip:192.0.2.10:5060"
///   from_user: "311"
///   ring_timeout_seconds: 30
///   attempts: 3
///   retry_after_seconds: 300
///   first_delay_seconds: 10
///   max_pending: 200
///   allowed_numbers: [nanp-geographic]
///   refused_numbers: []
///   per_number_per_day: 3
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Where call-backs go: a `sip:` URI whose host is an IP literal or a host name (looked up
    /// for each call, A/AAAA), with optional port.
    /// `{number}` in it is replaced by the caller's number; without it the number becomes the
    /// URI's user part. With none, a call-back request becomes a ticket flagged for call-back.
    pub trunk_uri: Option<String>,
    /// The user part of From on call-backs (what the caller's phone shows). Default `311`.
    pub from_user: String,
    /// How long the caller's phone may ring before the attempt counts as unanswered. Default 30.
    pub ring_timeout_seconds: u64,
    /// Attempts before giving up and filing a ticket flagged for call-back. Default 3, at least 1.
    pub attempts: u32,
    /// Wait between attempts. Default 300.
    pub retry_after_seconds: u64,
    /// The earliest a first attempt is made after the request (the caller is still hanging
    /// up). Default 10.
    pub first_delay_seconds: u64,
    /// Call-backs pending at once; beyond this a request becomes a flagged ticket. Default 200.
    pub max_pending: usize,
    /// The numbers the server calls back (or files a ticket asking staff to call back): a
    /// caller's number must match one of these patterns and none of `refused_numbers` (see
    /// [`crate::dispatch::numbers::NumberPattern`]: `+1NXXNXXXXXX`, `+44X.`, or the named set
    /// `nanp-geographic`). Only a number asserted by a trunk in `trunks.allow` is called
    /// back at all. Default `[nanp-geographic]`: US and Canadian geographic numbers, not
    /// toll-free, premium (900, 976), personal-communications or Caribbean NANP numbers, and
    /// nothing outside +1.
    pub allowed_numbers: Vec<crate::dispatch::numbers::NumberPattern>,
    /// Patterns refused even when `allowed_numbers` matches (a block of numbers that
    /// abused call-backs). Default none.
    pub refused_numbers: Vec<crate::dispatch::numbers::NumberPattern>,
    /// Call-backs one number may get in 24 hours (requests taken, whether dialled or filed
    /// as a flagged ticket). Counted in the database, so a restart does not reset it; past
    /// it the caller hears that a call-back is not available for their line. Default 3; 0
    /// turns call-backs off.
    pub per_number_per_day: u32,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            trunk_uri: None,
            from_user: "311".into(),
            ring_timeout_seconds: 30,
            attempts: 3,
            retry_after_seconds: 300,
            first_delay_seconds: 10,
            max_pending: 200,
            allowed_numbers: vec![crate::dispatch::numbers::NumberPattern::NanpGeographic],
            refused_numbers: Vec::new(),
            per_number_per_day: 3,
        }
    }
}

/// Why the `callback` section cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackConfigError {
    /// `trunk_uri` is not `sip:[{number}@]host[:port]`.
    #[error("callback.trunk_uri {0:?} must be sip:[{{number}}@]host[:port] (an IP address or a host name)")]
    TrunkUri(String),
    /// `from_user` is empty or has characters a SIP user part cannot carry unescaped.
    #[error("callback.from_user {0:?} must be digits, letters, '+', '-', '.' or '_'")]
    FromUser(String),
}

impl CallbackConfig {
    /// Problems with the section, for start-up.
    pub fn check(&self) -> Result<(), CallbackConfigError> {
        let ok_user = !self.from_user.is_empty()
            && self
                .from_user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c));
        if !ok_user {
            return Err(CallbackConfigError::FromUser(self.from_user.clone()));
        }
        if let Some(u) = &self.trunk_uri {
            if self.target_for("5550100").is_none() {
                return Err(CallbackConfigError::TrunkUri(u.clone()));
            }
        }
        Ok(())
    }

    /// The Request-URI that reaches `number` through the trunk, or `None` without a (usable)
    /// trunk. `number` must already be dialable (see `crate::dispatch::numbers::dialable`).
    pub(crate) fn target_for(&self, number: &str) -> Option<String> {
        let uri = self.trunk_uri.as_deref()?;
        let rest = uri.strip_prefix("sip:")?;
        let (user, host) = match rest.split_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if user.is_some_and(|u| u != "{number}") {
            return None;
        }
        // An IP literal or a host name (looked up per call), with an optional port.
        let named = |h: &str| {
            let (name, port) = match h.rsplit_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (h, None),
            };
            crate::sip::resolve::valid_hostname(name)
                && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
        };
        let ok_host = host.parse::<SocketAddr>().is_ok()
            || host.parse::<std::net::IpAddr>().is_ok()
            || host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
            || named(host);
        ok_host.then(|| format!("sip:{number}@{host}"))
    }
}

/// The Open311 GeoReport v2 API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Open311Config {
    /// Keys accepted for `POST requests` (`api_key`). With none, POST is refused (403).
    pub api_keys: Vec<String>,
    /// Our jurisdiction (accepted and ignored when it matches; any value is accepted if unset).
    pub jurisdiction_id: Option<String>,
    /// Base URL of this server as residents reach it (the endpoint URL in discovery).
    pub public_url: Option<String>,
    /// `POST requests` allowed per minute for each API key, after `post_burst`; past it the
    /// answer is 429 with `Retry-After`. One key per app: raise it for an app that forwards
    /// every resident's reports under one key. 0: no limit. Default 60.
    pub post_rate_per_minute: u32,
    /// Requests one key may post at once before `post_rate_per_minute` applies. Default 20.
    pub post_burst: u32,
}

impl Default for Open311Config {
    fn default() -> Self {
        Open311Config {
            api_keys: Vec::new(),
            jurisdiction_id: None,
            public_url: None,
            post_rate_per_minute: 60,
            post_burst: 20,
        }
    }
}

/// The admin API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/*` and `/metrics`. With none, the admin API serves only
    /// clients on loopback that name a loopback `Host` and carry no proxy headers
    /// (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`): set a token before putting a reverse
    /// proxy in front of it.
    pub token: Option<String>,
}

/// The HTTP server (`--http`): how long a client may take and how many may connect, so that
/// slow or idle clients cannot hold its connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request's header must arrive in full within this many seconds of the connection
    /// opening or of the previous response; otherwise the connection is closed (a client
    /// sending half a header, or keeping a connection open between requests, is cut off).
    /// Default 10.
    pub header_read_timeout_seconds: u64,
    /// A connection on which nothing moves either way (no request body arriving, no response
    /// being read) for this many seconds is closed. Default 30.
    pub idle_timeout_seconds: u64,
    /// Most connections open at once; a connection past it gets 503 with `Retry-After` and is
    /// closed. Default 256.
    pub max_connections: usize,
    /// Web pages on other sites allowed to open SIP over WebSocket (`/sip`), as origins
    /// (`https://crm.example.org`, `http://localhost:8080`). A browser names the page's origin
    /// in every WebSocket upgrade; one from this server's own host (the request's `Host`) is
    /// always allowed, any other not listed here is refused with 403, so a page elsewhere
    /// cannot drive an operator's SIP log-in from their browser. Clients that send no `Origin`
    /// (SIP phones, servers) are not browsers and are not affected: SIP digest still
    /// authenticates them. A reverse proxy in front must pass the `Host` it was asked for, or
    /// the console's own origin must be listed. Default empty: this host only.
    pub allowed_origins: Vec<WebOrigin>,
}

/// A web origin, `scheme://host[:port]` (RFC 6454), lower-cased, as browsers send it in
/// `Origin`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct WebOrigin(String);

impl WebOrigin {
    /// The origin as browsers write it (`https://crm.example.org`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why an `allowed_origins` entry is not an origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a web origin: write scheme://host[:port] (http or https), with no path")]
pub struct BadOrigin(String);

impl TryFrom<String> for WebOrigin {
    type Error = BadOrigin;
    fn try_from(s: String) -> Result<Self, BadOrigin> {
        let lower = s.trim().to_ascii_lowercase();
        let rest = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"));
        let ok = rest.is_some_and(|host| {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        });
        if ok {
            Ok(WebOrigin(lower))
        } else {
            Err(BadOrigin(s))
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_seconds: 10,
            idle_timeout_seconds: 30,
            max_connections: 256,
            allowed_origins: Vec::new(),
        }
    }
}

/// Where files go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Caller recordings (WAV); operator-call recordings in `<recordings_dir>/calls`. Kept
    /// for `retention.recordings_days`. Default `recordings`.
    pub recordings_dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            recordings_dir: PathBuf::from("recordings"),
        }
    }
}

/// Bounds on everything that grows with traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most simultaneous calls; INVITEs past it get 503 with Retry-After. Default 5000.
    pub max_calls: usize,
    /// Largest SIP message accepted, bytes. Default 65536.
    pub max_message_bytes: usize,
    /// A call with no RTP from the caller for this long is ended with BYE. Default 60.
    pub no_media_seconds: u64,
    /// A bridged operator's phone (a live call's or a call-back's) that sends nothing for this
    /// long is asked with an in-dialog OPTIONS whether it is still there; with no answer
    /// within 4 s, or 481, its leg is hung up and the caller offered what a caller with no
    /// operator gets. A phone that answers (silence suppression while the operator listens)
    /// keeps the call and is asked again after as long. Shorter than `no_media_seconds`
    /// because the caller is the one left in silence: a crashed phone sends no BYE. Default
    /// 10.
    pub operator_silence_seconds: u64,
    /// Longest call, seconds (a stuck caller cannot hold a port forever). Default 3600.
    pub max_call_seconds: u64,
    /// On shutdown, how long calls in progress may continue. Default 30.
    pub drain_seconds: u64,
    /// Most simultaneous inbound TCP connections for SIP (those peers open to us). The
    /// connections we open (to `transport=tcp` 911 routes, trunks, call-backs) have a budget
    /// of the same size of their own, so peers holding every inbound slot cannot make a 911
    /// bridge over TCP fail. Default 1024.
    pub max_tcp_connections: usize,
    /// A SIP TCP connection the far end sends no SIP message on for this long is closed
    /// (CRLF keep-alives do not count: a peer cannot hold a slot with them alone), unless a
    /// call runs over it (a caller on hold in a queue for half an hour keeps its connection,
    /// so our BYE reaches the phone) or an operator's phone is registered over it (so calls
    /// reach it). One we opened (a `transport=tcp` 911 route or trunk) that the far end
    /// closed is opened again when we next send on it. Default 300.
    pub tcp_idle_seconds: u64,
    /// Out-of-dialog requests other than INVITE (OPTIONS, REGISTER, MESSAGE, SUBSCRIBE..., and
    /// requests naming a dialog that does not exist) accepted per second from one source (an
    /// IPv4 address or an IPv6 /64). Past it they are dropped without an answer and counted in
    /// `/metrics` (`ivr311_sip_requests_dropped_total{reason="rate_limited"}`). A monitor
    /// pinging every second, a trunk's keep-alive OPTIONS and agents' phones registering stay
    /// far below it; a scanner does not. Sources in `trunks.allow` are not limited (an edge
    /// proxy relays every operator's REGISTER from its one address). 0 turns the limit off.
    /// Default 10.
    pub options_per_second: u32,
    /// How many such requests one source may send at once before `options_per_second`
    /// applies. Default 40.
    pub options_burst: u32,
    /// Most calls at once from one source (an IPv4 address or an IPv6 /64) that is not in
    /// `trunks.allow`, counted from the INVITE until the call ends. Past it a new INVITE gets
    /// `503` with `Retry-After: 10`, is counted in `/metrics`
    /// (`ivr311_sip_invites_limited_total{limit="calls_per_source"}`) and logged once per
    /// source and 10 s. So one source cannot take every call slot (`max_calls`) and keep
    /// other callers out. A phone makes one call at a time; a PBX or SBC that forwards many
    /// callers from one address belongs in `trunks.allow`, which is exempt. 0 turns the limit
    /// off. Default 20.
    pub max_calls_per_source: usize,
    /// New INVITEs accepted per second from one source not in `trunks.allow`, after
    /// `invites_burst`; past it `503` with Retry-After (`{limit="invite_rate"}` in
    /// `/metrics`). 0 turns the limit off. Default 5.
    pub invites_per_second: u32,
    /// How many INVITEs one such source may send at once before `invites_per_second`
    /// applies. Default 20.
    pub invites_burst: u32,
    /// Most inbound SIP TCP connections from one source (an IPv4 address or an IPv6 /64) not
    /// in `trunks.allow`; further ones are closed at once and counted in `/metrics`
    /// (`ivr311_sip_tcp_refused_total{limit="per_source"}`). Connections we open (911
    /// routes, trunks, call-backs) never count against `max_tcp_connections` or this. An
    /// office whose operators' phones all use TCP from behind one NAT address needs this
    /// above their number. 0 turns the limit off. Default 64.
    pub max_tcp_connections_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_calls: 5000,
            max_message_bytes: 64 * 1024,
            no_media_seconds: 60,
            operator_silence_seconds: 10,
            max_call_seconds: 3600,
            drain_seconds: 30,
            max_tcp_connections: 1024,
            tcp_idle_seconds: 300,
            options_per_second: 10,
            options_burst: 40,
            max_calls_per_source: 20,
            invites_per_second: 5,
            invites_burst: 20,
            max_tcp_connections_per_source: 64,
        }
    }
}

/// Media settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// The IP put in SDP and Contact. Default: the SIP address if it is specific, else the
    /// local address that routes to each caller.
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Default language of prompts. Default `en`.
    pub default_language: String,
    /// Ring (180 Ringing) for this many milliseconds before answering. Default 0.
    pub answer_after_ms: u64,
    /// Threads that pace every call's RTP (src/media/clock.rs). Default: one per core.
    pub clock_threads: Option<usize>,
    /// Run those threads at real-time priority (`SCHED_FIFO` 10, like Asterisk's `-p` and
    /// FreeSWITCH's `-rp`), so other work on the machine cannot delay packets. Needs
    /// `CAP_SYS_NICE` (root, or `AmbientCapabilities=CAP_SYS_NICE` under systemd); without it
    /// the server logs a warning and runs at normal priority. Default false.
    pub realtime: bool,
    /// Hand each 20 ms pass's RTP packets to the kernel together, in one io_uring system call
    /// per 256 packets, where the kernel allows io_uring (Linux 5.6 and later, not disabled by
    /// `kernel.io_uring_disabled` or a container's seccomp profile; otherwise the server logs
    /// a warning and sends one packet per system call). False: always one per packet.
    /// Default true.
    pub batch_sends: bool,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            advertise_ip: None,
            default_language: "en".into(),
            answer_after_ms: 0,
            clock_threads: None,
            realtime: false,
            batch_sends: true,
        }
    }
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax or schema error, with line and column where known.
    #[error("{path}:{line}:{column}: {message}")]
    Yaml {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            // serde_yaml ends its message with the location, which `path:line:col` already
            // gives.
            let message = e.to_string();
            let message = message
                .strip_suffix(&format!(" at line {line} column {column}"))
                .unwrap_or(&message)
                .to_owned();
            ConfigError::Yaml {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example an admin copies is a config the server takes: every key in it is one the
    /// server knows (a misspelt or stale key would refuse the whole file at start).
    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
        let c = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.media.batch_sends);
        assert!(!c.media.realtime);
        let off = FileConfig::parse(&path, "media:\n  batch_sends: false\n").unwrap();
        assert!(!off.media.batch_sends);
        assert!(FileConfig::default().media.batch_sends);
    }

    /// The outbox settings the example shows are the defaults, and its commented-out CRM and
    /// webhook, uncommented, are a config the server takes.
    #[test]
    fn the_example_shows_the_forward_defaults_and_a_valid_crm_and_webhook() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
        let c = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.forward, crate::forward::ForwardConfig::default());
        assert!(c.webhooks.is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        let tail = &text[text.find("\nforward:").expect("a forward section")..];
        let uncommented: String = tail
            .lines()
            .map(|l| match l.strip_prefix("  # ") {
                Some(rest) if rest.starts_with("open311:") || rest.starts_with("  ") => {
                    format!("  {rest}")
                }
                _ => match l.strip_prefix('#') {
                    Some(rest) if rest.starts_with("  ") => rest.to_owned(),
                    _ if l == "webhooks: []" => "webhooks:".to_owned(),
                    _ => l.to_owned(),
                },
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = FileConfig::parse(&path, &uncommented).unwrap_or_else(|e| panic!("{e}"));
        let crm = c.forward.open311.as_ref().expect("the CRM example");
        assert_eq!(crm.service_map["pothole"], "4fd3b167e750846744000005");
        assert_eq!(c.webhooks.len(), 1);
        assert_eq!(c.webhooks[0].events.len(), 4);
        c.forward.check(&c.webhooks).unwrap();
    }

    /// The console settings the example shows are the defaults.
    #[test]
    fn the_example_shows_the_console_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
        let c = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.console, ConsoleConfig::default());
        let bad = FileConfig::parse(&path, "console:\n  not_ready_reason: [x]\n").unwrap_err();
        assert!(bad.to_string().contains("not_ready_reason"), "{bad}");
    }

    /// The HTTP and Open311 limits the example shows are the defaults, as it says.
    #[test]
    fn the_example_shows_the_http_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
        let c = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let d = FileConfig::default();
        assert_eq!(
            (
                c.http.header_read_timeout_seconds,
                c.http.idle_timeout_seconds,
                c.http.max_connections
            ),
            (
                d.http.header_read_timeout_seconds,
                d.http.idle_timeout_seconds,
                d.http.max_connections
            )
        );
        assert_eq!(
            (c.open311.post_rate_per_minute, c.open311.post_burst),
            (d.open311.post_rate_per_minute, d.open311.post_burst)
        );
        assert_eq!(c.admin.token, None, "no token ships: loopback only");
    }

    #[test]
    fn queue_members_are_agent_ids_as_text_or_numbers_and_must_be_agents() {
        let parse = |t: &str| FileConfig::parse(Path::new("q.yaml"), t);
        let c = parse(
            "agents:\n  - {id: \"1001\", password: p}\n  - {id: alice, password: p}\nqueues:\n  - {name: general}\n  - {name: permits, members: [1001, alice]}\n",
        )
        .unwrap();
        assert_eq!(c.queues[0].members, None, "absent: every agent");
        assert_eq!(
            c.queues[1].members.as_deref(),
            Some(&["1001".to_owned(), "alice".to_owned()][..])
        );
        for q in &c.queues {
            assert_eq!(q.check(&c.agents), Ok(()));
        }
        let typo = parse(
            "agents:\n  - {id: \"1001\", password: p}\nqueues:\n  - {name: permits, members: [1010]}\n",
        )
        .unwrap();
        assert_eq!(
            typo.queues[0].check(&typo.agents),
            Err(QueueConfigError::UnknownMember {
                queue: "permits".into(),
                member: "1010".into()
            })
        );
        let empty = parse("queues:\n  - {name: permits, members: []}\n").unwrap();
        assert!(empty.queues[0].check(&empty.agents).is_err());
        let err = parse("queues:\n  - {name: permits, members: {a: 1}}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("q.yaml:2:"), "{err}");
    }

    #[test]
    fn trunk_credentials_one_or_a_list_per_realm() {
        let parse = |t: &str| FileConfig::parse(Path::new("t.yaml"), t);
        let one = parse("trunks:\n  auth: {username: u, password: p}\n").unwrap();
        assert_eq!(one.trunks.auth.0.len(), 1);
        let two = parse(
            "trunks:\n  auth:\n    - {username: a, password: p, realm: carrier-a}\n    - {username: b, password: q, realm: carrier-b}\n",
        )
        .unwrap();
        assert_eq!(two.trunks.auth.0[1].realm.as_deref(), Some("carrier-b"));
        assert!(FileConfig::default().trunks.auth.is_empty());
        // A misspelt key is named, at its line.
        let err = parse("trunks:\n  auth:\n    - {username: a, pasword: p}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pasword") && err.contains("t.yaml:3:"),
            "{err}"
        );
    }

    #[test]
    fn qos_marks_voice_ef_and_signalling_cs3_unless_told_and_refuses_a_code_point_past_63() {
        let path = Path::new("server.yaml");
        let c = FileConfig::parse(path, "limits:\n  max_calls: 10\n").unwrap();
        assert_eq!(c.qos, QosConfig::default());
        assert_eq!((c.qos.rtp_dscp, c.qos.sip_dscp), (Dscp(46), Dscp(24)));
        let c = FileConfig::parse(path, "qos:\n  sip_dscp: 40\n  rtp_dscp: 0\n").unwrap();
        assert_eq!((c.qos.rtp_dscp, c.qos.sip_dscp), (Dscp(0), Dscp(40)));
        let e = FileConfig::parse(path, "qos:\n  rtp_dscp: 184\n").unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("server.yaml:2:") && shown.contains("DSCP 184 is out of range"),
            "{shown}"
        );
    }

    #[test]
    fn agents_take_a_password_or_its_stored_hashes_and_refuse_both_or_neither() {
        use crate::sip::registrar::{AgentSecret, PasswordHa1, REALM};
        let parse = |t: &str| FileConfig::parse(Path::new("a.yaml"), t);
        let h = PasswordHa1::of("1001", REALM, "s3cret");
        let (md5, sha) = (h.md5.clone().unwrap(), h.sha256.clone().unwrap());
        let c = parse(&format!(
            "agents:\n  - id: \"1001\"\n    password_ha1:\n      SHA-256: \"{sha}\"\n      MD5: \"{md5}\"\n  - {{id: \"1002\", password: pw, tier: 2}}\n"
        ))
        .unwrap();
        assert_eq!(c.agents[0].password, AgentSecret::Ha1(h));
        assert_eq!(c.agents[1].password, AgentSecret::Password("pw".into()));
        assert_eq!(c.agents[1].tier, 2);
        assert!(c.agent_hash_problems().is_empty());
        // Only MD5 stored while SHA-256 is offered: named at start.
        let c = parse(&format!(
            "agents:\n  - id: \"1001\"\n    password_ha1: {{MD5: \"{md5}\"}}\n"
        ))
        .unwrap();
        let p = c.agent_hash_problems();
        assert!(p.len() == 1 && p[0].contains("no SHA-256"), "{p:?}");
        let c = parse(&format!(
            "registrar: {{digest_algorithms: [MD5]}}\nagents:\n  - id: \"1001\"\n    password_ha1: {{MD5: \"{md5}\"}}\n"
        ))
        .unwrap();
        assert!(c.agent_hash_problems().is_empty());
        for (bad, says) in [
            (
                "agents:\n  - {id: \"1\", password: a, password_ha1: {MD5: x}}\n",
                "a.yaml:2:",
            ),
            ("agents:\n  - {id: \"1\"}\n", "missing"),
            (
                "agents:\n  - {id: \"1\", password_ha1: {MD5: \"abc\"}}\n",
                "32 hex digits",
            ),
            (
                "agents:\n  - {id: \"1\", password_ha1: {SHA1: \"abc\"}}\n",
                "SHA1",
            ),
            ("agents:\n  - {id: \"1\", pasword: a}\n", "pasword"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.starts_with("a.yaml:"), "{bad}: {e}");
        }
        // Debug output never shows a password.
        let c = parse("agents:\n  - {id: \"1\", password: hunter2}\n").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn empty_config_is_all_defaults() {
        let c = FileConfig::parse(Path::new("x.yaml"), "").unwrap();
        assert_eq!(c.limits.max_calls, 5000);
        assert_eq!(c.limits.no_media_seconds, 60);
        assert_eq!(c.limits.operator_silence_seconds, 10);
        assert_eq!(c.media.default_language, "en");
        assert_eq!(c.limits.options_per_second, 10);
        assert_eq!(c.limits.options_burst, 40);
        assert!(c.trunks.allow.is_empty());
    }

    #[test]
    fn trunk_allow_lists_parse_and_bad_networks_are_refused_with_a_location() {
        let c = FileConfig::parse(
            Path::new("t.yaml"),
            "trunks:\n  allow: [\"203.0.113.0/24\", \"::1/128\", 198.51.100.7]\n",
        )
        .unwrap();
        let allow: Vec<String> = c.trunks.allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(allow, ["203.0.113.0/24", "::1/128", "198.51.100.7/32"]);
        let e = FileConfig::parse(Path::new("t.yaml"), "trunks:\n  allow: [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.yaml:2:"), "{e}");
        let e = FileConfig::parse(Path::new("t.yaml"), "trunks:\n  alow: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("alow"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_with_a_location() {
        let e = FileConfig::parse(
            Path::new("c.yaml"),
            "limits:\n  max_calls: 10\n  max_cals: 3\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("c.yaml:3:"), "{s}");
        assert!(s.contains("max_cals"), "{s}");
    }

    #[test]
    fn every_shipped_sample_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "yaml") {
                FileConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n > 0, "no sample configs in {}", dir.display());
    }

    #[test]
    fn callback_trunk_uris() {
        let c = |u: &str| CallbackConfig {
            trunk_uri: Some(u.into()),
            ..CallbackConfig::default()
        };
        assert_eq!(
            c("sip:192.0.2.1:5070")
                .target_for("+15550001111")
                .as_deref(),
            Some("sip:+15550001111@192.0.2.1:5070")
        );
        assert_eq!(
            c("sip:{number}@192.0.2.1").target_for("5551234").as_deref(),
            Some("sip:5551234@192.0.2.1")
        );
        assert_eq!(
            c("sip:[::1]:5070").target_for("1").as_deref(),
            Some("sip:1@[::1]:5070")
        );
        assert_eq!(
            c("sip:{number}@trunk.example.com:5080")
                .target_for("5551234")
                .as_deref(),
            Some("sip:5551234@trunk.example.com:5080")
        );
        for bad in [
            "sip:trunk_example.com",
            "sip:trunk.example.com:0",
            "tel:+1555",
            "sip:911@192.0.2.1",
            "http://x",
        ] {
            assert_eq!(
                c(bad).check(),
                Err(CallbackConfigError::TrunkUri(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(CallbackConfig::default().target_for("1"), None);
        assert!(CallbackConfig::default().check().is_ok());
        let bad_from = CallbackConfig {
            from_user: "3 11".into(),
            ..CallbackConfig::default()
        };
        assert!(bad_from.check().is_err());
    }

    #[test]
    fn callback_numbers_default_to_north_american_geographic_and_bad_patterns_are_located() {
        let c = CallbackConfig::default();
        assert_eq!(c.per_number_per_day, 3);
        assert!(c.allows("+12122000123"));
        assert!(!c.allows("+882345678901"));
        let f = FileConfig::parse(
            Path::new("c.yaml"),
            "callback:\n  allowed_numbers: [\"+1NXXNXXXXXX\", \"+44X.\"]\n  refused_numbers: [\"+1NXX976XXXX\"]\n  per_number_per_day: 1\n",
        )
        .unwrap();
        assert!(f.callback.allows("+442079460000"));
        assert!(!f.callback.allows("+12129760123"));
        assert_eq!(f.callback.per_number_per_day, 1);
        let e = FileConfig::parse(
            Path::new("c.yaml"),
            "callback:\n  allowed_numbers:\n    - \"+1NXXNXXXXXX\"\n    - \"1NXX\"\n",
        )
        .unwrap_err()
        .to_string();
        // serde_yaml places the error at the list the pattern is in.
        assert!(
            e.starts_with("c.yaml:3:") && e.contains("\"1NXX\" must start with +"),
            "{e}"
        );
    }

    #[test]
    fn a_callback_trunk_or_a_911_bridge_without_trusted_trunks_is_warned_about() {
        let parse = |t: &str| FileConfig::parse(Path::new("c.yaml"), t).unwrap();
        assert!(FileConfig::default().warnings().is_empty());
        let w = parse("callback:\n  trunk_uri: \"sip:192.0.2.1\"\n").warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("trunks.allow"), "{w:?}");
        let w = parse("emergency:\n  method: bridge\n  uri: \"sip:911@192.0.2.9\"\n").warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            parse("emergency:\n  method: announce\n  uri: \"sip:911@192.0.2.9\"\n")
                .warnings()
                .is_empty()
        );
        let trusted =
            parse("callback:\n  trunk_uri: \"sip:192.0.2.1\"\ntrunks:\n  allow: [192.0.2.0/24]\n");
        assert!(trusted.warnings().is_empty());
    }

    #[test]
    fn the_log_section_turns_redaction_on() {
        assert!(!FileConfig::default().log.redact_numbers);
        let f = FileConfig::parse(Path::new("c.yaml"), "log:\n  redact_numbers: true\n").unwrap();
        assert!(f.log.redact_numbers);
    }
}
