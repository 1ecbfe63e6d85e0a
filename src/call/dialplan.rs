//! The operators' dial plan: where a transfer or an operator's own call may go, as a pure
//! function of what was dialled and the configuration.
//!
//! An operator dials (an INVITE from their phone, the user part of a REFER's `Refer-To`) or
//! an admin names (`POST /admin/calls/{id}/transfer`) one of, in this order:
//!
//! | dialled | goes to |
//! | --- | --- |
//! | `911` | the configured emergency routes (never refused by policy) |
//! | a `transfers` entry's `number` or `name` | that line's `uri` |
//! | an agent's id | that agent's phone (not the operator's own) |
//! | a queue's name | that queue, at its front, the caller's wait kept (from a phone: the caller it holds) |
//! | digits not listed | refused: `403` (operators cannot dial through the city's trunk) |
//! | anything else | `404` |
//!
//! The admin API also takes `agent:<id>` and `queue:<name>`, so a name that is both is never
//! ambiguous there. `transfers:` is checked as it is read (a bad entry is refused at its
//! `file:line:col`) and against the agents and queues at start and by `ivr311 check
//! --config` ([`check_transfers`]): no two entries share a name or a number, and no name or
//! number is `911`, an agent's id or a queue's name.
//!
//! ```yaml
//! transfers:
//!   - {name: crisis, number: "988", uri: "sip:988@198.51.100.30:5060", crisis: true}
//!   - {name: interpreter, number: "7002", uri: "sip:interp@198.51.100.40",
//!      headers: {X-Language: "{language}"}}
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;

/// How long a transfer target may ring before the caller goes back to the operator, unless
/// the entry says otherwise.
pub const DEFAULT_RING_SECONDS: u64 = 30;

/// What a header value of a `transfers` entry may name, filled in from the caller's call.
pub const PLACEHOLDERS: [&str; 3] = ["{language}", "{queue}", "{call_id}"];

/// One `transfers:` entry: a line operators may send callers to.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "LineYaml")]
pub struct TransferLine {
    /// What admins and operators call it (`crisis`): letters, digits, `-` and `_`.
    pub name: String,
    /// What operators dial for it (`988`): digits.
    #[serde(deserialize_with = "digits")]
    pub number: String,
    /// Where the call goes: a `sip:` or `sips:` URI whose host is an IP address or a host
    /// name (looked up per call), with an optional port and parameters (`;transport=tcp`).
    pub uri: String,
    /// Extra headers on the INVITE, besides the caller's number and the `X-311-*` context;
    /// `{language}`, `{queue}` and `{call_id}` in a value are the caller's.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How long it may ring before the transfer fails (the caller goes back to the
    /// operator). Default 30.
    #[serde(default = "default_ring")]
    pub ring_timeout_seconds: u64,
    /// A crisis or utility emergency line (988, 211, the water or gas utility's emergency
    /// number): the menu's `transfer` action may send callers here, with the 911 redirect's
    /// fallback and audit. Default false: a line only operators transfer to.
    #[serde(default)]
    pub crisis: bool,
}

fn default_ring() -> u64 {
    DEFAULT_RING_SECONDS
}

/// [`TransferLine`] as written (checked as it is read, so a mistake is placed at its entry).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineYaml {
    name: String,
    #[serde(deserialize_with = "digits")]
    number: String,
    uri: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default = "default_ring")]
    ring_timeout_seconds: u64,
    #[serde(default)]
    crisis: bool,
}

impl TryFrom<LineYaml> for TransferLine {
    type Error = TransferConfigError;

    fn try_from(y: LineYaml) -> Result<Self, Self::Error> {
        let l = TransferLine {
            name: y.name,
            number: y.number,
            uri: y.uri,
            headers: y.headers,
            ring_timeout_seconds: y.ring_timeout_seconds,
            crisis: y.crisis,
        };
        l.check()?;
        Ok(l)
    }
}

/// A number as YAML gives it: `"988"` or `988`.
fn digits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Text(String),
        Number(u64),
    }
    Ok(match N::deserialize(d)? {
        N::Text(s) => s,
        N::Number(n) => n.to_string(),
    })
}

/// The `transfers:` section, checked entry by entry and for duplicates as it is read (a bad
/// entry is placed at that entry, a repeated name or number at the list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransfersConfig(pub Vec<TransferLine>);

impl<'de> Deserialize<'de> for TransfersConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Lines;
        impl<'de> serde::de::Visitor<'de> for Lines {
            type Value = TransfersConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of {name, number, uri} entries")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut lines: Vec<TransferLine> = Vec::new();
                while let Some(l) = seq.next_element::<TransferLine>()? {
                    let dup = |e: TransferConfigError| serde::de::Error::custom(e);
                    if lines.iter().any(|x| x.name.eq_ignore_ascii_case(&l.name)) {
                        return Err(dup(TransferConfigError::DuplicateName(l.name)));
                    }
                    if lines.iter().any(|x| x.number == l.number) {
                        return Err(dup(TransferConfigError::DuplicateNumber(l.number)));
                    }
                    lines.push(l);
                }
                Ok(TransfersConfig(lines))
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(TransfersConfig::default())
            }
        }
        d.deserialize_any(Lines)
    }
}

/// Why `transfers:` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferConfigError {
    #[error("name {0:?} must be letters, digits, '-' or '_'")]
    Name(String),
    #[error("{name}: number {number:?} must be digits")]
    Number { name: String, number: String },
    #[error("{name}: uri {uri:?} must be sip:[user@]host[:port] (an IP address or a host name)")]
    Uri { name: String, uri: String },
    #[error("{name}: header {header:?} {why}")]
    Header {
        name: String,
        header: String,
        why: &'static str,
    },
    #[error("two entries are named {0:?}")]
    DuplicateName(String),
    #[error("two entries have the number {0:?}")]
    DuplicateNumber(String),
    #[error("{0:?} is 911, which always dials the emergency routes")]
    Emergency(String),
    #[error("transfers: {what:?} is also {other}; operators could not reach both")]
    Collides { what: String, other: String },
    #[error("{name}: ring_timeout_seconds must be 1 to 300")]
    RingTimeout { name: String },
}

/// Headers the server writes itself on a transfer's INVITE; an entry may not set them.
const RESERVED: [&str; 14] = [
    "via",
    "from",
    "to",
    "call-id",
    "cseq",
    "contact",
    "route",
    "record-route",
    "max-forwards",
    "content-type",
    "content-length",
    "user-agent",
    "p-asserted-identity",
    "referred-by",
];

impl TransferLine {
    fn check(&self) -> Result<(), TransferConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(TransferConfigError::Name(self.name.clone()));
        }
        if self.number.is_empty()
            || self.number.len() > 15
            || !self.number.chars().all(|c| c.is_ascii_digit())
        {
            return Err(TransferConfigError::Number {
                name: self.name.clone(),
                number: self.number.clone(),
            });
        }
        for v in [&self.number, &self.name] {
            if v.as_str() == "911" {
                return Err(TransferConfigError::Emergency(v.clone()));
            }
        }
        if !valid_target(&self.uri) {
            return Err(TransferConfigError::Uri {
                name: self.name.clone(),
                uri: self.uri.clone(),
            });
        }
        if !(1..=300).contains(&self.ring_timeout_seconds) {
            return Err(TransferConfigError::RingTimeout {
                name: self.name.clone(),
            });
        }
        for (h, v) in &self.headers {
            let bad = |why| TransferConfigError::Header {
                name: self.name.clone(),
                header: h.clone(),
                why,
            };
            let token = !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b));
            if !token {
                return Err(bad("is not a header name"));
            }
            let lower = h.to_ascii_lowercase();
            if RESERVED.contains(&lower.as_str()) || lower.starts_with("x-311-") {
                return Err(bad("is one the server writes itself"));
            }
            if v.chars().any(char::is_control) {
                return Err(bad("has a control character in its value"));
            }
            let mut rest = v.as_str();
            while let Some(i) = rest.find('{') {
                let after = &rest[i..];
                match PLACEHOLDERS.iter().find(|p| after.starts_with(**p)) {
                    Some(p) => rest = &after[p.len()..],
                    None => {
                        return Err(bad(
                            "names a placeholder other than {language}, {queue} or {call_id}",
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// The entry's headers with the caller's `language`, `queue` and `call_id` filled in.
    pub(crate) fn headers_for(
        &self,
        language: &str,
        queue: &str,
        call_id: &str,
    ) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(k, v)| {
                let v = v
                    .replace("{language}", language)
                    .replace("{queue}", queue)
                    .replace("{call_id}", call_id);
                (k.clone(), crate::sip::message::sanitize_quoted(&v))
            })
            .collect()
    }
}

/// A `sip:`/`sips:` URI the server can send an INVITE to: a host that is an IP literal or a
/// host name, an optional port above 0.
fn valid_target(uri: &str) -> bool {
    let lower = uri.to_ascii_lowercase();
    if !(lower.starts_with("sip:") || lower.starts_with("sips:"))
        || uri.contains(char::is_whitespace)
    {
        return false;
    }
    if uri.contains(['<', '>', '"', '?']) {
        return false;
    }
    let Some((host, port)) = crate::sip::message::uri_host_and_port(uri) else {
        return false;
    };
    if port == Some(0) {
        return false;
    }
    let literal = host.trim_matches(['[', ']']);
    literal.parse::<std::net::IpAddr>().is_ok() || crate::sip::resolve::valid_hostname(host)
}

/// `transfers:` against the rest of the config (at start and for `ivr311 check --config`):
/// no name or number is an agent's id or a queue's name.
pub fn check_transfers(
    transfers: &TransfersConfig,
    agents: &[crate::config::AgentConfig],
    queues: &[crate::config::QueueConfig],
) -> Result<(), TransferConfigError> {
    for l in &transfers.0 {
        for what in [&l.number, &l.name] {
            if agents.iter().any(|a| a.id == *what) {
                return Err(TransferConfigError::Collides {
                    what: what.clone(),
                    other: "an agent's id".into(),
                });
            }
            if queues.iter().any(|q| q.name.eq_ignore_ascii_case(what)) {
                return Err(TransferConfigError::Collides {
                    what: what.clone(),
                    other: "a queue's name".into(),
                });
            }
        }
    }
    Ok(())
}

/// Where a transfer (or an operator's call) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// 911: the emergency routes.
    Emergency,
    /// A `transfers` entry.
    Line(TransferLine),
    /// Another agent's phone.
    Agent(String),
    /// A queue, at its front.
    Queue(String),
}

impl Destination {
    /// How the admin API and the logs name it (`911`, `crisis`, `agent:1002`,
    /// `queue:permits`).
    pub fn label(&self) -> String {
        match self {
            Destination::Emergency => "911".into(),
            Destination::Line(l) => l.name.clone(),
            Destination::Agent(a) => format!("agent:{a}"),
            Destination::Queue(q) => format!("queue:{q}"),
        }
    }

    /// Its kind, a `/metrics` label.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Emergency => "911",
            Destination::Line(_) => "line",
            Destination::Agent(_) => "agent",
            Destination::Queue(_) => "queue",
        }
    }
}

/// Why the dial plan has nowhere to send a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// Not in the plan (404).
    #[error("not in the operators' dial plan")]
    NotFound,
    /// A number the plan does not list: operators cannot dial through the city's trunk (403).
    #[error("operators may dial only the numbers of the transfers list")]
    Forbidden,
    /// The operator's own id (403).
    #[error("an operator cannot transfer a call to themselves")]
    Themselves,
}

impl NoRoute {
    /// The SIP (and HTTP) status that refuses it.
    pub fn code(self) -> u16 {
        match self {
            NoRoute::NotFound => 404,
            NoRoute::Forbidden | NoRoute::Themselves => 403,
        }
    }

    /// Its `/metrics` label.
    pub fn label(self) -> &'static str {
        match self {
            NoRoute::NotFound => "not_found",
            NoRoute::Forbidden => "forbidden_number",
            NoRoute::Themselves => "themselves",
        }
    }
}

/// The dial plan: the configured lines, agents and queues.
#[derive(Debug, Clone, Default)]
pub struct DialPlan {
    lines: Vec<TransferLine>,
    agents: Vec<String>,
    queues: Vec<String>,
}

impl DialPlan {
    /// The `transfers` entry named `name`, if it is a crisis line (`crisis: true`): where a
    /// menu's `transfer` action may send a caller.
    pub fn crisis_line(&self, name: &str) -> Option<&TransferLine> {
        self.lines.iter().find(|l| l.name == name && l.crisis)
    }

    /// Every `transfers` entry, for start-up checks.
    pub fn lines(&self) -> &[TransferLine] {
        &self.lines
    }

    pub fn new(lines: &TransfersConfig, agents: &[String], queues: &[String]) -> DialPlan {
        DialPlan {
            lines: lines.0.clone(),
            agents: agents.to_vec(),
            queues: queues.to_vec(),
        }
    }

    /// Where `dialled` (an INVITE's Request-URI user, a REFER target's user part) goes, for
    /// agent `by` (the operator asking, if any).
    pub fn route(&self, dialled: &str, by: Option<&str>) -> Result<Destination, NoRoute> {
        let d = dialled.trim();
        if d == "911" {
            return Ok(Destination::Emergency);
        }
        if let Some(l) = self.lines.iter().find(|l| l.number == d) {
            return Ok(Destination::Line(l.clone()));
        }
        if let Some(l) = self.lines.iter().find(|l| l.name.eq_ignore_ascii_case(d)) {
            return Ok(Destination::Line(l.clone()));
        }
        if let Some(a) = self.agents.iter().find(|a| *a == d) {
            return self.agent(a, by);
        }
        if let Some(q) = self.queues.iter().find(|q| q.eq_ignore_ascii_case(d)) {
            return Ok(Destination::Queue(q.clone()));
        }
        let digits = d.strip_prefix('+').unwrap_or(d);
        if !digits.is_empty()
            && digits
                .chars()
                .all(|c| c.is_ascii_digit() || "*#".contains(c))
        {
            return Err(NoRoute::Forbidden);
        }
        Err(NoRoute::NotFound)
    }

    /// The admin API's `to`: `911`, a line's name or number, `agent:<id>` or `queue:<name>`.
    pub fn route_admin(&self, to: &str, by: Option<&str>) -> Result<Destination, NoRoute> {
        let to = to.trim();
        if let Some(a) = to.strip_prefix("agent:") {
            return match self.agents.iter().find(|x| *x == a.trim()) {
                Some(a) => self.agent(a, by),
                None => Err(NoRoute::NotFound),
            };
        }
        if let Some(q) = to.strip_prefix("queue:") {
            return match self
                .queues
                .iter()
                .find(|x| x.eq_ignore_ascii_case(q.trim()))
            {
                Some(q) => Ok(Destination::Queue(q.clone())),
                None => Err(NoRoute::NotFound),
            };
        }
        match self.route(to, by)? {
            d @ (Destination::Emergency | Destination::Line(_)) => Ok(d),
            // Bare agent ids and queue names are the phones' forms; the API says which.
            Destination::Agent(_) | Destination::Queue(_) => Err(NoRoute::NotFound),
        }
    }

    fn agent(&self, a: &str, by: Option<&str>) -> Result<Destination, NoRoute> {
        if by == Some(a) {
            return Err(NoRoute::Themselves);
        }
        Ok(Destination::Agent(a.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(yaml: &str) -> Result<crate::config::FileConfig, String> {
        crate::config::FileConfig::parse(Path::new("t.yaml"), yaml).map_err(|e| e.to_string())
    }

    fn plan() -> DialPlan {
        let c = parse(
            "transfers:\n  - {name: crisis, number: \"988\", uri: \"sip:988@198.51.100.30:5060\"}\n  - {name: water_emergency, number: 7001, uri: \"sip:+12125550100@carrier.example.net\"}\n  - {name: interpreter, number: \"7002\", uri: \"sip:interp@198.51.100.40\", headers: {X-Language: \"{language}\"}}\n",
        )
        .unwrap();
        DialPlan::new(
            &c.transfers,
            &["1001".into(), "1002".into()],
            &["general".into(), "permits".into()],
        )
    }

    #[test]
    fn the_plan_routes_911_lines_agents_and_queues_and_refuses_the_rest() {
        let p = plan();
        let by = Some("1001");
        assert_eq!(p.route("911", by), Ok(Destination::Emergency));
        assert!(matches!(p.route("988", by), Ok(Destination::Line(l)) if l.name == "crisis"));
        assert!(
            matches!(p.route("7001", by), Ok(Destination::Line(l)) if l.name == "water_emergency")
        );
        assert!(matches!(p.route("Crisis", by), Ok(Destination::Line(l)) if l.number == "988"));
        assert_eq!(p.route("1002", by), Ok(Destination::Agent("1002".into())));
        assert_eq!(p.route("1001", by), Err(NoRoute::Themselves));
        assert_eq!(
            p.route("permits", by),
            Ok(Destination::Queue("permits".into()))
        );
        // Outside numbers: forbidden; names nobody has: not found.
        for n in ["+12125550199", "5550199", "011441234", "*67"] {
            assert_eq!(p.route(n, by), Err(NoRoute::Forbidden), "{n}");
        }
        assert_eq!(p.route("bob", by), Err(NoRoute::NotFound));
        assert_eq!(p.route("", by), Err(NoRoute::NotFound));
        assert_eq!(NoRoute::Forbidden.code(), 403);
        assert_eq!(NoRoute::NotFound.code(), 404);
        // The admin API's forms.
        assert_eq!(p.route_admin("911", None), Ok(Destination::Emergency));
        assert!(matches!(
            p.route_admin("crisis", None),
            Ok(Destination::Line(_))
        ));
        assert!(matches!(
            p.route_admin("988", None),
            Ok(Destination::Line(_))
        ));
        assert_eq!(
            p.route_admin("agent:1002", by),
            Ok(Destination::Agent("1002".into()))
        );
        assert_eq!(p.route_admin("agent:1001", by), Err(NoRoute::Themselves));
        assert_eq!(p.route_admin("agent:9", by), Err(NoRoute::NotFound));
        assert_eq!(
            p.route_admin("queue:permits", by),
            Ok(Destination::Queue("permits".into()))
        );
        assert_eq!(p.route_admin("queue:nope", by), Err(NoRoute::NotFound));
        assert_eq!(p.route_admin("1002", by), Err(NoRoute::NotFound));
        assert_eq!(p.route_admin("5550199", by), Err(NoRoute::Forbidden));
    }

    #[test]
    fn header_placeholders_are_the_callers() {
        let p = plan();
        let Ok(Destination::Line(l)) = p.route("7002", None) else {
            panic!()
        };
        assert_eq!(
            l.headers_for("es", "general", "abc@x"),
            vec![("X-Language".to_owned(), "es".to_owned())]
        );
        assert_eq!(l.ring_timeout_seconds, DEFAULT_RING_SECONDS);
    }

    #[test]
    fn a_broken_transfers_list_is_refused_at_its_location() {
        for (yaml, says) in [
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\"}\n  - {name: A, number: \"2\", uri: \"sip:2@192.0.2.1\"}\n", "two entries are named"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\"}\n  - {name: b, number: 1, uri: \"sip:2@192.0.2.1\"}\n", "two entries have the number"),
            ("transfers:\n  - {name: a, number: \"911\", uri: \"sip:1@192.0.2.1\"}\n", "911"),
            ("transfers:\n  - {name: a, number: \"12a\", uri: \"sip:1@192.0.2.1\"}\n", "must be digits"),
            ("transfers:\n  - {name: \"a b\", number: \"1\", uri: \"sip:1@192.0.2.1\"}\n", "letters, digits"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"http://x\"}\n", "must be sip:"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@bad_host\"}\n", "must be sip:"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1:0\"}\n", "must be sip:"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\", headers: {From: x}}\n", "writes itself"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\", headers: {X-311-Queue: x}}\n", "writes itself"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\", headers: {X-A: \"{caller}\"}}\n", "placeholder"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\", headers: {\"X A\": b}}\n", "not a header name"),
            ("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@192.0.2.1\", ring_timeout_seconds: 0}\n", "ring_timeout_seconds"),
            ("transfers:\n  - {name: a, number: \"1\", url: \"sip:1@192.0.2.1\"}\n", "url"),
        ] {
            let e = parse(yaml).unwrap_err();
            // At the entry; a repeated name or number at the list (serde sees no further).
            let line = if says.starts_with("two entries") { 2 } else { yaml.lines().count() };
            assert!(
                e.starts_with(&format!("t.yaml:{line}:")) && e.contains("transfers") && e.contains(says),
                "{yaml}: {e}"
            );
        }
        // Good forms: a host name, a port, TCP, sips.
        let c = parse("transfers:\n  - {name: a, number: \"1\", uri: \"sip:1@trunk.example.net:5080;transport=tcp\"}\n  - {name: b, number: \"2\", uri: \"sips:[2001:db8::1]:5061\"}\n").unwrap();
        assert_eq!(c.transfers.0.len(), 2);
        assert!(parse("").unwrap().transfers.0.is_empty());
    }

    #[test]
    fn a_line_may_not_share_a_name_or_number_with_an_agent_or_a_queue() {
        let c = parse(
            "agents:\n  - {id: \"7001\", password: p}\nqueues:\n  - {name: permits}\ntransfers:\n  - {name: crisis, number: \"7001\", uri: \"sip:1@192.0.2.1\"}\n",
        )
        .unwrap();
        let e = check_transfers(&c.transfers, &c.agents, &c.queues).unwrap_err();
        assert!(e.to_string().contains("an agent's id"), "{e}");
        let c = parse(
            "queues:\n  - {name: permits}\ntransfers:\n  - {name: Permits, number: \"7001\", uri: \"sip:1@192.0.2.1\"}\n",
        )
        .unwrap();
        let e = check_transfers(&c.transfers, &c.agents, &c.queues).unwrap_err();
        assert!(e.to_string().contains("a queue's name"), "{e}");
        let ok =
            parse("transfers:\n  - {name: crisis, number: \"988\", uri: \"sip:1@192.0.2.1\"}\n")
                .unwrap();
        assert_eq!(
            check_transfers(&ok.transfers, &ok.agents, &ok.queues),
            Ok(())
        );
    }
}
