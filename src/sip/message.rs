//! SIP messages at the edge: bytes in, typed [`Request`]/[`Response`] out, and back to bytes.
//!
//! This module owns everything about the SIP wire format and is the only place that touches
//! `rsip`. The pipeline for one message is:
//!
//! 1. **Framing** ([`frame_stream`] for TCP, [`parse_datagram`] for UDP): find the end of the
//!    header section and take exactly `Content-Length` body bytes. On UDP, trailing octets past
//!    the body are ignored (RFC 4475 §3.1.1.8) and a Content-Length larger than the datagram is
//!    an error (§3.1.2.2).
//! 2. **Normalisation** ([`normalise_headers`]): unfold continuation lines and expand the compact
//!    header forms (`v: f: t: i: m: l: c: k: s: e: o: r: u: x: y: b:`), which `rsip` does not
//!    know, into their long names.
//! 3. **Parsing**: `rsip` parses the normalised start line and headers; we then lift the headers
//!    every layer needs (Via, From, To, Call-ID, CSeq, Contact, Record-Route, Content-Type,
//!    Max-Forwards) into typed fields once, so nothing above this module re-parses text.
//!
//! Methods `rsip` does not know (any RFC 3261 `token`) are kept as [`Method::Other`] so that
//! they can be answered 501 rather than 400.
//!
//! A message that fails gets a [`ParseError`] that says why and, when the headers needed to
//! answer survived, carries them so the transport can send a stateless `400` with a `Warning`.
//!
//! This module never does I/O and knows nothing of transactions or dialogs.

use bytes::Bytes;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;

/// The SIP version we speak.
pub(crate) const SIP_VERSION: &str = "SIP/2.0";
/// The magic cookie of RFC 3261 branch parameters.
pub(crate) const BRANCH_COOKIE: &str = "z9hG4bK";

/// A SIP request method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Register,
    Info,
    Update,
    Refer,
    Notify,
    Prack,
    Subscribe,
    Message,
    Publish,
    /// Any other well-formed token; answered 501 Not Implemented.
    Other(String),
}

impl Method {
    /// Parse a method token (case-sensitive, as RFC 3261 §7.1 says).
    pub(crate) fn from_token(s: &str) -> Option<Method> {
        Some(match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "REFER" => Method::Refer,
            "NOTIFY" => Method::Notify,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            other if !other.is_empty() && other.bytes().all(is_token_byte) => {
                Method::Other(other.to_owned())
            }
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Refer => "REFER",
            Method::Notify => "NOTIFY",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RFC 3261 `token` characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Why a message could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// The bytes end before the header section does (TCP: wait for more).
    #[error("incomplete message")]
    Incomplete,
    /// The message is larger than the configured limit.
    #[error("message larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The start line is neither a request line nor a status line.
    #[error("bad start line: {0}")]
    StartLine(String),
    /// The protocol version is not SIP/2.0 (answered 505).
    #[error("unsupported SIP version {0}")]
    Version(String),
    /// The Request-URI scheme is not sip, sips or tel (answered 416).
    #[error("unsupported URI scheme {0}")]
    UriScheme(String),
    /// A header line that is not `name: value`, or a header value that does not parse.
    #[error("bad header {name}: {reason}")]
    Header { name: String, reason: String },
    /// A header that every request must carry is missing.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// Content-Length is not a number, is negative, or promises more than was sent.
    #[error("bad Content-Length: {0}")]
    ContentLength(String),
    /// The CSeq method differs from the request method (RFC 4475 §3.1.2.17).
    #[error("CSeq method {cseq} does not match request method {method}")]
    CSeqMismatch { method: String, cseq: String },
    /// rsip refused the message.
    #[error("malformed message: {0}")]
    Rsip(String),
    /// The status code is out of range (100..=699).
    #[error("bad status code {0}")]
    StatusCode(String),
}

/// A parse failure, with what survived of the headers so a stateless answer can be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    pub kind: ParseErrorKind,
    /// Present when the message was a request whose Via/From/To/Call-ID/CSeq could be read:
    /// enough to send a stateless error response.
    pub salvage: Option<Box<Salvage>>,
}

impl ParseError {
    fn new(kind: ParseErrorKind) -> Self {
        ParseError {
            kind,
            salvage: None,
        }
    }

    /// The status code a UAS should answer this failure with.
    pub(crate) fn status(&self) -> u16 {
        match self.kind {
            ParseErrorKind::Version(_) => 505,
            ParseErrorKind::UriScheme(_) => 416,
            ParseErrorKind::TooLarge { .. } => 513,
            _ => 400,
        }
    }
}

/// The raw header values needed to answer a request that failed to parse.
#[derive(Debug, Clone)]
pub struct Salvage {
    pub method: String,
    pub vias: Vec<String>,
    pub from: String,
    pub to: String,
    pub call_id: String,
    pub cseq: String,
}

impl Salvage {
    /// Build a stateless error response (e.g. 400 with a Warning saying why).
    pub(crate) fn response(&self, code: u16, reason: &str, warning: &str, to_tag: &str) -> Bytes {
        let mut out = String::with_capacity(512);
        let _ = write!(out, "{SIP_VERSION} {code} {reason}\r\n");
        for v in &self.vias {
            let _ = write!(out, "Via: {v}\r\n");
        }
        // A header the request lacked is left out (insuf has no From, To or Call-ID).
        if !self.from.is_empty() {
            let _ = write!(out, "From: {}\r\n", self.from);
        }
        if !self.to.is_empty() {
            if self.to.contains(";tag=") || to_tag.is_empty() {
                let _ = write!(out, "To: {}\r\n", self.to);
            } else {
                let _ = write!(out, "To: {};tag={to_tag}\r\n", self.to);
            }
        }
        if !self.call_id.is_empty() {
            let _ = write!(out, "Call-ID: {}\r\n", self.call_id);
        }
        if !self.cseq.is_empty() {
            let _ = write!(out, "CSeq: {}\r\n", self.cseq);
        }
        let _ = write!(
            out,
            "Warning: 399 ivr311 \"{}\"\r\n",
            sanitize_quoted(warning)
        );
        out.push_str("Content-Length: 0\r\n\r\n");
        Bytes::from(out)
    }
}

/// Strip characters that cannot appear inside a quoted string of a header.
pub(crate) fn sanitize_quoted(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .map(|c| if c == '"' || c == '\\' { '\'' } else { c })
        .take(200)
        .collect()
}

/// One header as it arrived, after normalisation (long name, unfolded value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A parsed Via header value (one hop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// `UDP`, `TCP`, ...
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub branch: Option<String>,
    /// The value as it arrived; echoed byte for byte in responses.
    pub raw: String,
}

impl Via {
    pub(crate) fn parse(raw: &str) -> Result<Via, String> {
        let raw = raw.trim();
        // RFC 3261 allows LWS around the slashes of the sent-protocol (`SIP / 2.0 / UDP`,
        // RFC 4475 wsinv): close it up before splitting off the sent-by.
        let compact = compact_slashes(raw);
        let (proto, rest) = compact
            .split_once([' ', '\t'])
            .ok_or_else(|| "no sent-by".to_owned())?;
        let mut parts = proto.split('/').map(str::trim);
        let (name, version, transport) = (parts.next(), parts.next(), parts.next());
        if !matches!(name, Some(n) if n.eq_ignore_ascii_case("SIP")) || version != Some("2.0") {
            return Err(format!("bad protocol {proto}"));
        }
        let transport = transport
            .filter(|t| !t.is_empty())
            .ok_or_else(|| "no transport".to_owned())?
            .to_ascii_uppercase();
        let rest = rest.trim();
        let mut params = rest.split(';');
        let sent_by = params.next().unwrap_or("").trim();
        let (host, port) =
            split_host_port(sent_by).ok_or_else(|| format!("bad sent-by {sent_by}"))?;
        let mut branch = None;
        for p in params {
            let p = p.trim();
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("branch") {
                    branch = Some(v.trim().to_owned());
                }
            }
        }
        Ok(Via {
            transport,
            host: host.to_owned(),
            port,
            branch,
            raw: raw.to_owned(),
        })
    }

    /// The sent-by as `host:port` (port defaulted), used in transaction keys.
    pub fn sent_by(&self) -> String {
        format!("{}:{}", self.host, self.port.unwrap_or(5060))
    }

    /// True when the branch carries the RFC 3261 magic cookie and something after it.
    pub fn has_rfc3261_branch(&self) -> bool {
        matches!(&self.branch, Some(b) if b.len() > BRANCH_COOKIE.len() && b.starts_with(BRANCH_COOKIE))
    }
}

/// Remove whitespace next to the `/` separators of a Via's sent-protocol (parameters, after
/// the first `;`, are left alone).
fn compact_slashes(raw: &str) -> String {
    let (head, params) = match raw.find(';') {
        Some(i) => raw.split_at(i),
        None => (raw, ""),
    };
    let mut out = String::with_capacity(raw.len());
    let mut chars = head.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '/' {
            while out.ends_with([' ', '\t']) {
                out.pop();
            }
            out.push('/');
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out.push_str(params);
    out
}

/// Split `host[:port]`, including `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &s[..end + 2];
        let after = &rest[end + 1..];
        if after.is_empty() {
            return Some((host, None));
        }
        let port = after.strip_prefix(':')?.trim().parse().ok()?;
        return Some((host, Some(port)));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.trim(), Some(p.trim().parse().ok()?))),
        Some(_) => None,
        None => Some((s.trim(), None)),
    }
}

/// A `name-addr` or `addr-spec` with its parameters (From, To, Contact, Route...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    /// The URI without angle brackets.
    pub uri: String,
    /// Header parameters (after the URI), e.g. `tag`, `expires`.
    pub params: Vec<(String, Option<String>)>,
    /// The value as it arrived.
    pub raw: String,
}

impl NameAddr {
    pub(crate) fn parse(raw: &str) -> Result<NameAddr, String> {
        let raw = raw.trim();
        let (display, uri, rest) = if let Some(lt) = find_unquoted(raw, b'<') {
            let gt = raw[lt..].find('>').ok_or_else(|| "unclosed <".to_owned())? + lt;
            let display = raw[..lt].trim();
            let display = display.trim_matches('"').trim();
            (
                (!display.is_empty()).then(|| display.to_owned()),
                raw[lt + 1..gt].trim().to_owned(),
                &raw[gt + 1..],
            )
        } else {
            // addr-spec: parameters after the first ';' belong to the header (RFC 3261 §20.10).
            match raw.split_once(';') {
                Some((u, rest)) => (None, u.trim().to_owned(), rest),
                None => (None, raw.to_owned(), ""),
            }
        };
        if uri.is_empty() || !uri.contains(':') {
            return Err(format!("bad URI {uri:?}"));
        }
        if uri.contains(|c: char| c.is_whitespace()) {
            return Err(format!("whitespace in URI {uri:?}"));
        }
        let params = rest
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().to_owned())),
                None => (p.to_ascii_lowercase(), None),
            })
            .collect();
        Ok(NameAddr {
            display,
            uri,
            params,
            raw: raw.to_owned(),
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn tag(&self) -> Option<&str> {
        self.param("tag")
    }

    /// The user part of the URI (`sip:user@host` → `user`), if any.
    pub fn user(&self) -> Option<&str> {
        uri_user(&self.uri)
    }
}

/// The user part of a SIP or tel URI.
pub fn uri_user(uri: &str) -> Option<&str> {
    let (_, rest) = uri.split_once(':')?;
    if uri.starts_with("tel:") {
        return Some(rest.split(';').next().unwrap_or(rest));
    }
    let (user, _) = rest.split_once('@')?;
    let user = user.split(':').next().unwrap_or(user);
    let user = user.split(';').next().unwrap_or(user);
    (!user.is_empty()).then_some(user)
}

/// The `transport` parameter of a URI, lower-cased (`sip:a@h;transport=TCP` → `tcp`).
pub(crate) fn uri_transport(uri: &str) -> Option<String> {
    let lower = uri.to_ascii_lowercase();
    let i = lower.find(";transport=")?;
    lower[i + ";transport=".len()..]
        .split([';', '?', '>'])
        .next()
        .map(|v| v.trim().to_owned())
}

/// Whether a target URI asks for TCP (`;transport=tcp`, any case).
pub(crate) fn wants_tcp(target: &str) -> bool {
    uri_transport(target).as_deref() == Some("tcp")
}

/// `host` and `port` of a SIP URI (5060 when none is given); the host as written (a name, an
/// IPv4 address, or an IPv6 reference in brackets).
pub(crate) fn uri_host_port(uri: &str) -> Option<(&str, u16)> {
    let (host, port) = uri_host_and_port(uri)?;
    Some((host, port.unwrap_or(5060)))
}

/// The host of a SIP URI and its port if the URI gives one (RFC 3263 looks up SRV records
/// only for a name without a port).
pub(crate) fn uri_host_and_port(uri: &str) -> Option<(&str, Option<u16>)> {
    let rest = uri.split_once(':')?.1;
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split([';', '?']).next()?;
    let (host, port) = split_host_port(hostport)?;
    (!host.is_empty()).then_some((host, port))
}

/// `host[:port]` of a SIP URI as a socket address, when the host is an IP literal.
pub(crate) fn uri_socket_addr(uri: &str) -> Option<SocketAddr> {
    let rest = uri.split_once(':')?.1;
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split([';', '?']).next()?;
    let (host, port) = split_host_port(hostport)?;
    let literal = host.trim_matches(['[', ']']);
    // RFC 3261's ABNF (from RFC 2373) allows a third colon before an embedded IPv4 address,
    // `[2001:db8:::192.0.2.1]`; RFC 5118 §4.10 asks receivers to tolerate it.
    let ip: std::net::IpAddr = literal
        .parse()
        .or_else(|_| literal.replacen(":::", "::", 1).parse())
        .ok()?;
    Some(SocketAddr::new(ip, port.unwrap_or(5060)))
}

fn find_unquoted(s: &str, needle: u8) -> Option<usize> {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            _ if b == needle && !in_quote => return Some(i),
            _ => {}
        }
    }
    None
}

/// Split a header value on commas that are not inside quotes or angle brackets.
pub(crate) fn split_list(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut in_quote, mut in_angle, mut escaped) = (false, false, false);
    let mut start = 0;
    for (i, b) in value.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'<' if !in_quote => in_angle = true,
            b'>' if !in_quote => in_angle = false,
            b',' if !in_quote && !in_angle => {
                out.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The headers every message carries, lifted into types once.
#[derive(Debug, Clone)]
pub struct Common {
    /// All Via values, top first.
    pub vias: Vec<Via>,
    pub from: NameAddr,
    pub to: NameAddr,
    pub call_id: String,
    pub cseq: u32,
    pub cseq_method: Method,
    /// Every header in arrival order (long names).
    pub headers: Vec<Header>,
    pub body: Bytes,
}

impl Common {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    pub fn content_type(&self) -> Option<&str> {
        self.header("Content-Type")
    }

    pub fn top_via(&self) -> &Via {
        // Parsing guarantees at least one Via.
        &self.vias[0]
    }

    /// Contact URIs, in order.
    pub fn contacts(&self) -> Vec<NameAddr> {
        self.headers_named("Contact")
            .flat_map(split_list)
            .filter_map(|v| NameAddr::parse(v).ok())
            .collect()
    }

    /// Record-Route entries, in order, as they appeared (each `<uri;lr>`).
    pub(crate) fn record_routes(&self) -> Vec<String> {
        self.headers_named("Record-Route")
            .flat_map(split_list)
            .map(str::to_owned)
            .collect()
    }
}

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub uri: String,
    pub max_forwards: Option<u32>,
    pub common: Common,
}

impl std::ops::Deref for Request {
    type Target = Common;
    fn deref(&self) -> &Common {
        &self.common
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub code: u16,
    pub reason: String,
    pub common: Common,
}

impl std::ops::Deref for Response {
    type Target = Common;
    fn deref(&self) -> &Common {
        &self.common
    }
}

/// A parsed SIP message.
#[derive(Debug, Clone)]
pub enum Message {
    Request(Request),
    Response(Response),
}

impl Message {
    pub fn common(&self) -> &Common {
        match self {
            Message::Request(r) => &r.common,
            Message::Response(r) => &r.common,
        }
    }
}

/// Compact header forms (RFC 3261 §7.3.3 and later RFCs) and their long names.
const COMPACT: &[(u8, &str)] = &[
    (b'a', "Accept-Contact"),
    (b'b', "Referred-By"),
    (b'c', "Content-Type"),
    (b'e', "Content-Encoding"),
    (b'f', "From"),
    (b'i', "Call-ID"),
    (b'k', "Supported"),
    (b'l', "Content-Length"),
    (b'm', "Contact"),
    (b'o', "Event"),
    (b'r', "Refer-To"),
    (b's', "Subject"),
    (b't', "To"),
    (b'u', "Allow-Events"),
    (b'v', "Via"),
    (b'x', "Session-Expires"),
    (b'y', "Identity"),
];

/// The canonical spelling of a header name: compact forms expanded, well-known names in their
/// usual case (so that `rsip` recognises them), others kept as sent.
pub(crate) fn canonical_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() == 1 {
        let b = name.as_bytes()[0].to_ascii_lowercase();
        if let Some((_, long)) = COMPACT.iter().find(|(c, _)| *c == b) {
            return (*long).into();
        }
    }
    const KNOWN: &[&str] = &[
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Max-Forwards",
        "Content-Length",
        "Content-Type",
        "Record-Route",
        "Route",
        "Expires",
        "Allow",
        "Supported",
        "Require",
        "Authorization",
        "WWW-Authenticate",
        "User-Agent",
        "Event",
        "Refer-To",
        "Subject",
    ];
    for k in KNOWN {
        if k.eq_ignore_ascii_case(name) {
            return (*k).into();
        }
    }
    name.into()
}

/// Where the header section ends: (index of the first body byte, length of the separator used).
fn header_end(buf: &[u8]) -> Option<usize> {
    let crlf = find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Split the header section into unfolded `name: value` pairs (names canonicalised).
/// Returns the start line and the headers.
pub fn normalise_headers(head: &str) -> Result<(String, Vec<Header>), ParseError> {
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let start = lines
        .next()
        .ok_or_else(|| ParseError::new(ParseErrorKind::StartLine("empty".into())))?
        .to_owned();
    let mut headers: Vec<Header> = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // Continuation (folded) line: join to the previous value with one space.
            match headers.last_mut() {
                Some(h) => {
                    h.value.push(' ');
                    h.value.push_str(line.trim());
                }
                None => {
                    return Err(ParseError::new(ParseErrorKind::Header {
                        name: String::new(),
                        reason: "continuation line before any header".into(),
                    }))
                }
            }
            continue;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| {
            ParseError::new(ParseErrorKind::Header {
                name: line.chars().take(40).collect(),
                reason: "no colon".into(),
            })
        })?;
        let name = name.trim_end();
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(ParseError::new(ParseErrorKind::Header {
                name: name.chars().take(40).collect(),
                reason: "bad header name".into(),
            }));
        }
        headers.push(Header {
            name: canonical_name(name).into_owned(),
            value: value.trim().to_owned(),
        });
    }
    Ok((start, headers))
}

/// Result of looking for one message at the front of a TCP byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet.
    Incomplete,
    /// A whole message occupies the first `n` bytes.
    Complete(usize),
    /// Leading CRLFs (keep-alives, RFC 5626) occupying `n` bytes: skip them.
    KeepAlive(usize),
}

/// Find the first message in a stream buffer. `limit` bounds the message size.
pub fn frame_stream(buf: &[u8], limit: usize) -> Result<Frame, ParseError> {
    let ka = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if ka > 0 {
        return Ok(Frame::KeepAlive(ka));
    }
    let Some(body_at) = header_end(buf) else {
        if buf.len() > limit {
            return Err(ParseError::new(ParseErrorKind::TooLarge { limit }));
        }
        return Ok(Frame::Incomplete);
    };
    let head = String::from_utf8_lossy(&buf[..body_at]);
    let (_, headers) = normalise_headers(&head)?;
    // On a stream, Content-Length is mandatory (RFC 3261 §18.3); a missing one means no body.
    let len = content_length(&headers)?.unwrap_or(0);
    let total = body_at
        .checked_add(len)
        .ok_or_else(|| ParseError::new(ParseErrorKind::ContentLength("overflow".into())))?;
    if total > limit {
        return Err(ParseError::new(ParseErrorKind::TooLarge { limit }));
    }
    if buf.len() < total {
        return Ok(Frame::Incomplete);
    }
    Ok(Frame::Complete(total))
}

fn content_length(headers: &[Header]) -> Result<Option<usize>, ParseError> {
    let mut all = headers.iter().filter(|h| h.name == "Content-Length");
    let Some(h) = all.next() else {
        return Ok(None);
    };
    // Two Content-Length values leave the framing unknown (RFC 4475 §3.3.9, mcl01).
    if all.next().is_some() {
        return Err(ParseError::new(ParseErrorKind::ContentLength(
            "appears more than once".into(),
        )));
    }
    h.value
        .trim()
        .parse::<usize>()
        .map(Some)
        .map_err(|_| ParseError::new(ParseErrorKind::ContentLength(h.value.clone())))
}

/// Parse one UDP datagram (or one framed TCP message when `stream` is true).
pub fn parse_datagram(buf: &[u8], limit: usize) -> Result<Message, ParseError> {
    parse(buf, limit, false)
}

/// Parse one message already framed by [`frame_stream`].
pub fn parse_stream_message(buf: &[u8], limit: usize) -> Result<Message, ParseError> {
    parse(buf, limit, true)
}

fn parse(buf: &[u8], limit: usize, stream: bool) -> Result<Message, ParseError> {
    if buf.len() > limit {
        return Err(ParseError::new(ParseErrorKind::TooLarge { limit }));
    }
    // Leading CRLFs before a message are allowed (RFC 3261 §7.5).
    let skip = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    let buf = &buf[skip..];
    let (head_bytes, rest) = match header_end(buf) {
        Some(i) => (&buf[..i], &buf[i..]),
        // A datagram whose header section is not closed: treat the whole as headers (baddn.dat).
        None => (buf, &buf[buf.len()..]),
    };
    let head = std::str::from_utf8(head_bytes).map_err(|_| {
        ParseError::new(ParseErrorKind::Header {
            name: String::new(),
            reason: "header section is not UTF-8".into(),
        })
    })?;
    let (start, headers) = normalise_headers(head)?;
    let salvage = salvage(&start, &headers);
    let with_salvage = |kind: ParseErrorKind| ParseError {
        kind,
        salvage: salvage.clone().map(Box::new),
    };

    let body = match content_length(&headers).map_err(|e| with_salvage(e.kind))? {
        Some(n) if n <= rest.len() => Bytes::copy_from_slice(&rest[..n]),
        Some(n) => {
            return Err(with_salvage(ParseErrorKind::ContentLength(format!(
                "{n} bytes promised, {} sent",
                rest.len()
            ))))
        }
        None if stream => Bytes::new(),
        None => Bytes::copy_from_slice(rest),
    };

    if start.starts_with("SIP/") {
        return parse_response(&start, headers, body)
            .map(Message::Response)
            .map_err(ParseError::new);
    }
    parse_request(&start, headers, body)
        .map(Message::Request)
        .map_err(with_salvage)
}

/// Pull out the raw values needed to answer a broken request.
fn salvage(start: &str, headers: &[Header]) -> Option<Salvage> {
    if start.starts_with("SIP/") {
        return None;
    }
    let method = start.split(' ').next()?.to_owned();
    let get = |n: &str| {
        headers
            .iter()
            .find(|h| h.name == n)
            .map(|h| h.value.clone())
    };
    let vias: Vec<String> = headers
        .iter()
        .filter(|h| h.name == "Via")
        .flat_map(|h| split_list(&h.value).into_iter().map(str::to_owned))
        .collect();
    // The answer goes back to where the datagram came from (or down the TCP connection), so
    // the Via only has to be there, not to parse (badvers has `SIP/7.0/UDP`). Missing From/To/
    // Call-ID/CSeq are left out of the answer rather than leaving the request unanswered
    // (RFC 4475 §3.3.1, insuf).
    if vias.is_empty() {
        return None;
    }
    Some(Salvage {
        method,
        vias,
        from: get("From").unwrap_or_default(),
        to: get("To").unwrap_or_default(),
        call_id: get("Call-ID").unwrap_or_default(),
        cseq: get("CSeq").unwrap_or_default(),
    })
}

/// Rebuild a normalised header section for rsip (it cannot read compact forms or folding).
fn normalised_text(start_line: &str, headers: &[Header]) -> String {
    let mut s = String::with_capacity(start_line.len() + headers.len() * 48 + 4);
    s.push_str(start_line);
    s.push_str("\r\n");
    for h in headers {
        s.push_str(&h.name);
        s.push_str(": ");
        s.push_str(&h.value);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

fn parse_request(
    start: &str,
    headers: Vec<Header>,
    body: Bytes,
) -> Result<Request, ParseErrorKind> {
    let parts: Vec<&str> = start.split(' ').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(ParseErrorKind::StartLine(start.chars().take(80).collect()));
    }
    let (method_tok, uri, version) = (parts[0], parts[1], parts[2]);
    if version != SIP_VERSION {
        if version.starts_with("SIP/") {
            return Err(ParseErrorKind::Version(version.to_owned()));
        }
        return Err(ParseErrorKind::StartLine(start.chars().take(80).collect()));
    }
    let method = Method::from_token(method_tok)
        .ok_or_else(|| ParseErrorKind::StartLine(format!("bad method {method_tok:?}")))?;
    let scheme = uri.split_once(':').map(|(s, _)| s).unwrap_or("");
    let scheme_ok = scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips");
    let is_tel = scheme.eq_ignore_ascii_case("tel");

    let common = common(headers, body)?;
    if common.cseq_method != method {
        return Err(ParseErrorKind::CSeqMismatch {
            method: method.to_string(),
            cseq: common.cseq_method.to_string(),
        });
    }
    if !scheme_ok && !is_tel {
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(ParseErrorKind::StartLine(format!(
                "bad Request-URI {uri:?}"
            )));
        }
        return Err(ParseErrorKind::UriScheme(scheme.to_owned()));
    }

    // rsip parses the normalised message. It does not know every method, so an unknown method
    // is presented to it as OPTIONS (we keep ours). Its SIP-URI grammar is stricter than RFC
    // 3261's (it refuses the `user;par=u%40example.net` user part of RFC 4475 semiuri and the
    // unreserved marks of intmeth), so the Request-URI is checked by `request_uri_ok` and rsip
    // is shown a placeholder; rsip still checks every header.
    let rsip_method = match method {
        Method::Other(_) => "OPTIONS",
        ref m => m.as_str(),
    };
    if !request_uri_ok(uri, is_tel) {
        return Err(ParseErrorKind::StartLine(format!(
            "bad Request-URI {:?}",
            uri.chars().take(80).collect::<String>()
        )));
    }
    let rsip_uri = "sip:request-uri@invalid";
    let text = normalised_text(
        &format!("{rsip_method} {rsip_uri} {SIP_VERSION}"),
        &common.headers,
    );
    rsip::Request::try_from(text.as_bytes()).map_err(|e| ParseErrorKind::Rsip(rsip_reason(&e)))?;

    let max_forwards = match common.header("Max-Forwards") {
        Some(v) => Some(
            v.trim()
                .parse::<u32>()
                .map_err(|_| ParseErrorKind::Header {
                    name: "Max-Forwards".into(),
                    reason: format!("not a number: {v}"),
                })?,
        ),
        None => None,
    };
    Ok(Request {
        method,
        uri: uri.to_owned(),
        max_forwards,
        common,
    })
}

/// The RFC 3261 §25.1 Request-URI checks that matter to us: a `sip:`/`sips:` URI has a
/// non-empty host (after the userinfo, if any) with an optional numeric port, and no character
/// outside the URI grammar (no spaces, controls, quotes or angle brackets). `tel:` needs a
/// non-empty number.
fn request_uri_ok(uri: &str, is_tel: bool) -> bool {
    let Some((_, rest)) = uri.split_once(':') else {
        return false;
    };
    if rest.is_empty()
        || !rest
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"<>\"{}|\\^`".contains(&b))
    {
        return false;
    }
    if is_tel {
        return true;
    }
    // userinfo ends at the last '@' before any URI parameters or headers.
    let hostport_etc = match rest.rfind('@') {
        Some(i) => &rest[i + 1..],
        None => rest,
    };
    let hostport = hostport_etc.split([';', '?']).next().unwrap_or_default();
    match split_host_port(hostport) {
        Some((host, _)) => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
        }
        None => false,
    }
}

fn rsip_reason(e: &rsip::Error) -> String {
    let s = e.to_string();
    s.chars().filter(|c| !c.is_control()).take(120).collect()
}

fn parse_response(
    start: &str,
    headers: Vec<Header>,
    body: Bytes,
) -> Result<Response, ParseErrorKind> {
    let mut parts = start.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if version != SIP_VERSION {
        return Err(ParseErrorKind::Version(version.to_owned()));
    }
    let code_s = parts.next().unwrap_or("");
    let code: u16 = code_s
        .parse()
        .ok()
        .filter(|c| (100..=699).contains(c))
        .ok_or_else(|| ParseErrorKind::StatusCode(code_s.chars().take(20).collect()))?;
    let reason = parts.next().unwrap_or("").to_owned();
    let common = common(headers, body)?;
    Ok(Response {
        code,
        reason,
        common,
    })
}

fn common(headers: Vec<Header>, body: Bytes) -> Result<Common, ParseErrorKind> {
    let one = |name: &'static str| -> Result<&str, ParseErrorKind> {
        let mut it = headers.iter().filter(|h| h.name == name);
        let h = it.next().ok_or(ParseErrorKind::Missing(name))?;
        if it.next().is_some() {
            return Err(ParseErrorKind::Header {
                name: name.into(),
                reason: "appears more than once".into(),
            });
        }
        Ok(h.value.as_str())
    };
    let bad = |name: &str, reason: String| ParseErrorKind::Header {
        name: name.into(),
        reason,
    };
    let mut vias = Vec::new();
    for h in headers.iter().filter(|h| h.name == "Via") {
        for v in split_list(&h.value) {
            vias.push(Via::parse(v).map_err(|r| bad("Via", r))?);
        }
    }
    if vias.is_empty() {
        return Err(ParseErrorKind::Missing("Via"));
    }
    let from = NameAddr::parse(one("From")?).map_err(|r| bad("From", r))?;
    let to = NameAddr::parse(one("To")?).map_err(|r| bad("To", r))?;
    let call_id = one("Call-ID")?.trim().to_owned();
    if call_id.is_empty() || call_id.contains(char::is_whitespace) {
        return Err(bad("Call-ID", "empty or has spaces".into()));
    }
    let cseq_v = one("CSeq")?;
    let (num, meth) = cseq_v
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| bad("CSeq", "expected <number> <method>".into()))?;
    // RFC 3261 §8.1.1.5: the sequence number must be less than 2**31.
    let cseq = num
        .parse::<u32>()
        .ok()
        .filter(|n| *n < (1 << 31))
        .ok_or_else(|| bad("CSeq", format!("bad sequence number {num}")))?;
    let cseq_method =
        Method::from_token(meth.trim()).ok_or_else(|| bad("CSeq", format!("bad method {meth}")))?;
    Ok(Common {
        vias,
        from,
        to,
        call_id,
        cseq,
        cseq_method,
        headers,
        body,
    })
}

/// Builds a response to `req`, echoing Via, From, To (with our tag), Call-ID and CSeq.
pub struct ResponseBuilder {
    out: String,
    body: Option<(String, Bytes)>,
}

impl ResponseBuilder {
    pub fn new(req: &Request, code: u16, reason: &str, to_tag: Option<&str>) -> Self {
        let mut out = String::with_capacity(600);
        let _ = write!(out, "{SIP_VERSION} {code} {reason}\r\n");
        for v in &req.vias {
            let _ = write!(out, "Via: {}\r\n", v.raw);
        }
        let _ = write!(out, "From: {}\r\n", req.from.raw);
        match (req.to.tag(), to_tag) {
            (None, Some(tag)) if code > 100 => {
                let _ = write!(out, "To: {};tag={tag}\r\n", req.to.raw);
            }
            _ => {
                let _ = write!(out, "To: {}\r\n", req.to.raw);
            }
        }
        let _ = write!(out, "Call-ID: {}\r\n", req.call_id);
        let _ = write!(out, "CSeq: {} {}\r\n", req.cseq, req.cseq_method);
        // A response that establishes a dialog carries the request's Record-Route, so the far
        // end's in-dialog requests pass the same proxies (RFC 3261 12.1.1): a proxy in front of
        // several nodes (Kamailio's dispatcher) finds the node that has the call that way.
        let establishes = (101..300).contains(&code)
            && req.to.tag().is_none()
            && matches!(
                req.method,
                Method::Invite | Method::Subscribe | Method::Refer
            );
        if establishes {
            for rr in req.headers_named("Record-Route") {
                let _ = write!(out, "Record-Route: {rr}\r\n");
            }
        }
        ResponseBuilder { out, body: None }
    }

    pub fn header(mut self, name: &str, value: impl fmt::Display) -> Self {
        let _ = write!(self.out, "{name}: {value}\r\n");
        self
    }

    pub fn body(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        self.body = Some((content_type.to_owned(), body.into()));
        self
    }

    pub fn build(self) -> Bytes {
        finish(self.out, self.body)
    }
}

/// The message as one exactly-sized buffer. Built messages can outlive the call by 32 s (a
/// server transaction keeps its last response for retransmissions, timers J and L; a client
/// transaction its request), so they are copied out of the builder's string, whose capacity
/// grows by doubling (a 2xx with SDP would otherwise keep up to twice its size).
fn finish(mut out: String, body: Option<(String, Bytes)>) -> Bytes {
    match body {
        Some((ct, b)) => {
            let _ = write!(
                out,
                "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                b.len()
            );
            let mut v = Vec::with_capacity(out.len() + b.len());
            v.extend_from_slice(out.as_bytes());
            v.extend_from_slice(&b);
            Bytes::from(v)
        }
        None => {
            out.push_str("Content-Length: 0\r\n\r\n");
            Bytes::copy_from_slice(out.as_bytes())
        }
    }
}

/// Builds a request (in-dialog or out-of-dialog).
pub struct RequestBuilder {
    out: String,
    body: Option<(String, Bytes)>,
}

impl RequestBuilder {
    /// Start line and the Via for `branch`; `via_transport` is `UDP`/`TCP`, `sent_by` our address.
    pub fn new(
        method: &Method,
        uri: &str,
        via_transport: &str,
        sent_by: SocketAddr,
        branch: &str,
    ) -> Self {
        let mut out = String::with_capacity(600);
        let _ = write!(out, "{method} {uri} {SIP_VERSION}\r\n");
        let _ = write!(
            out,
            "Via: SIP/2.0/{via_transport} {sent_by};branch={branch};rport\r\n"
        );
        out.push_str("Max-Forwards: 70\r\n");
        RequestBuilder { out, body: None }
    }

    pub fn header(mut self, name: &str, value: impl fmt::Display) -> Self {
        let _ = write!(self.out, "{name}: {value}\r\n");
        self
    }

    pub fn body(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        self.body = Some((content_type.to_owned(), body.into()));
        self
    }

    pub fn build(self) -> Bytes {
        finish(self.out, self.body)
    }
}

/// A fresh RFC 3261 branch.
pub fn new_branch() -> String {
    format!("{BRANCH_COOKIE}{}", random_token(16))
}

/// A fresh tag or Call-ID token of `n` hex characters.
pub(crate) fn random_token(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:311@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport\r\n\
From: \"Caller\" <sip:alice@127.0.0.1:5070>;tag=abc\r\n\
To: <sip:311@127.0.0.1:5060>\r\n\
Call-ID: call-1@test\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5070>\r\n\
Max-Forwards: 70\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

    fn req(s: &str) -> Request {
        match parse_datagram(s.as_bytes(), 65536).expect("parses") {
            Message::Request(r) => r,
            Message::Response(_) => panic!("not a request"),
        }
    }

    #[test]
    fn parses_invite_into_types() {
        let r = req(INVITE);
        assert_eq!(r.method, Method::Invite);
        assert_eq!(r.uri, "sip:311@127.0.0.1:5060");
        assert_eq!(r.from.tag(), Some("abc"));
        assert_eq!(r.from.display.as_deref(), Some("Caller"));
        assert_eq!(r.from.user(), Some("alice"));
        assert_eq!(r.to.tag(), None);
        assert_eq!(r.call_id, "call-1@test");
        assert_eq!((r.cseq, &r.cseq_method), (1, &Method::Invite));
        assert_eq!(r.top_via().branch.as_deref(), Some("z9hG4bK-1"));
        assert_eq!(r.top_via().sent_by(), "127.0.0.1:5070");
        assert_eq!(&r.body[..], b"v=0\n");
        assert_eq!(r.max_forwards, Some(70));
    }

    #[test]
    fn compact_forms_and_folding_are_normalised() {
        let s = "OPTIONS sip:311@h SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n\
f: <sip:a@h>;tag=1\r\n\
t: <sip:311@h>\r\n\
i: cid\r\n\
CSeq: 7\r\n OPTIONS\r\n\
m: <sip:a@10.0.0.1>\r\n\
k: timer\r\n\
s: folded\r\n\tsubject\r\n\
c: text/plain\r\n\
l: 2\r\n\r\nhi";
        let r = req(s);
        assert_eq!(r.method, Method::Options);
        assert_eq!(r.call_id, "cid");
        assert_eq!(r.cseq, 7);
        assert_eq!(r.header("Subject"), Some("folded subject"));
        assert_eq!(r.header("Supported"), Some("timer"));
        assert_eq!(r.content_type(), Some("text/plain"));
        assert_eq!(r.contacts()[0].uri, "sip:a@10.0.0.1");
        assert_eq!(&r.body[..], b"hi");
        for (c, long) in COMPACT {
            assert_eq!(canonical_name(&(*c as char).to_string()), *long);
        }
    }

    #[test]
    fn unknown_method_is_kept_for_501() {
        let s = INVITE
            .replace("INVITE sip", "FOOBAR sip")
            .replace("1 INVITE", "1 FOOBAR");
        let r = req(&s);
        assert_eq!(r.method, Method::Other("FOOBAR".into()));
    }

    #[test]
    fn broken_requests_are_salvaged_for_400() {
        let s = INVITE.replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS");
        let e = parse_datagram(s.as_bytes(), 65536).unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::CSeqMismatch { .. }));
        let salvage = e.salvage.expect("headers salvaged");
        let resp = salvage.response(400, "Bad Request", &e.kind.to_string(), "t1");
        let resp = String::from_utf8(resp.to_vec()).unwrap();
        assert!(resp.starts_with("SIP/2.0 400 Bad Request\r\n"));
        assert!(resp.contains("Warning: 399 ivr311 \"CSeq method"));
        assert!(resp.contains("To: <sip:311@127.0.0.1:5060>;tag=t1\r\n"));
        // and the response parses as SIP itself
        assert!(matches!(
            parse_datagram(resp.as_bytes(), 65536),
            Ok(Message::Response(r)) if r.code == 400
        ));
    }

    #[test]
    fn content_length_larger_than_datagram_is_an_error() {
        let s = INVITE.replace("Content-Length: 4", "Content-Length: 9999");
        let e = parse_datagram(s.as_bytes(), 65536).unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::ContentLength(_)));
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn version_and_scheme_errors_map_to_505_and_416() {
        let e = parse_datagram(
            INVITE
                .replace(" SIP/2.0\r\nVia", " SIP/7.0\r\nVia")
                .as_bytes(),
            65536,
        )
        .unwrap_err();
        assert_eq!(e.status(), 505);
        let e = parse_datagram(
            INVITE
                .replace("INVITE sip:311@", "INVITE nobody:311@")
                .as_bytes(),
            65536,
        )
        .unwrap_err();
        assert_eq!(e.status(), 416);
    }

    #[test]
    fn missing_headers_are_reported() {
        let s = INVITE.replace("Call-ID: call-1@test\r\n", "");
        let e = parse_datagram(s.as_bytes(), 65536).unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::Missing("Call-ID"));
    }

    #[test]
    fn rfc4475_leniencies_and_strictness() {
        // LWS around the sent-protocol slashes (wsinv).
        let v =
            Via::parse("SIP  / 2.0  / TCP     spindle.example.com   ;branch=z9hG4bK9ikj8").unwrap();
        assert_eq!(
            (v.transport.as_str(), v.host.as_str()),
            ("TCP", "spindle.example.com")
        );
        assert_eq!(v.branch.as_deref(), Some("z9hG4bK9ikj8"));
        // A `;` in the user part of the Request-URI (semiuri), which rsip's grammar refuses.
        let s = INVITE.replace(
            "INVITE sip:311@127.0.0.1:5060",
            "INVITE sip:user;par=u%40example.net@example.com",
        );
        assert_eq!(req(&s).uri, "sip:user;par=u%40example.net@example.com");
        // Embedded LWS or angle brackets in the Request-URI are still refused.
        for bad in ["INVITE <sip:311@127.0.0.1:5060>", "INVITE sip:311@"] {
            let s = INVITE.replace("INVITE sip:311@127.0.0.1:5060", bad);
            assert_eq!(
                parse_datagram(s.as_bytes(), 65536).unwrap_err().status(),
                400
            );
        }
        // Two Content-Length values (mcl01).
        let s = INVITE.replace("Content-Length: 4\r\n", "Content-Length: 4\r\nl: 3\r\n");
        let e = parse_datagram(s.as_bytes(), 65536).unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::ContentLength(_)));
        // A request missing From/To/Call-ID is still answered, without them (insuf).
        let s = INVITE.replace("Call-ID: call-1@test\r\n", "").replace(
            "From: \"Caller\" <sip:alice@127.0.0.1:5070>;tag=abc\r\n",
            "",
        );
        let e = parse_datagram(s.as_bytes(), 65536).unwrap_err();
        let resp = e
            .salvage
            .expect("answerable")
            .response(400, "Bad Request", "x", "t");
        let text = String::from_utf8_lossy(&resp);
        assert!(text.contains("CSeq: 1 INVITE") && !text.contains("From:"));
    }

    #[test]
    fn trailing_octets_after_body_are_ignored_on_udp() {
        let s = format!("{INVITE}INVITE sip:junk SIP/2.0\r\n\r\n");
        let r = req(&s);
        assert_eq!(&r.body[..], b"v=0\n");
    }

    #[test]
    fn stream_framing() {
        let two = format!("\r\n\r\n{INVITE}{INVITE}");
        let b = two.as_bytes();
        assert_eq!(frame_stream(b, 65536).unwrap(), Frame::KeepAlive(4));
        let b = &b[4..];
        let Frame::Complete(n) = frame_stream(b, 65536).unwrap() else {
            panic!("frame")
        };
        assert_eq!(n, INVITE.len());
        assert_eq!(frame_stream(&b[..n - 1], 65536).unwrap(), Frame::Incomplete);
        assert!(matches!(
            frame_stream(b, 100).unwrap_err().kind,
            ParseErrorKind::TooLarge { limit: 100 }
        ));
    }

    #[test]
    fn response_builder_round_trips() {
        let r = req(INVITE);
        let bytes = ResponseBuilder::new(&r, 200, "OK", Some("srv"))
            .header("Contact", "<sip:311@127.0.0.1:5060>")
            .body("application/sdp", "v=0\r\n")
            .build();
        let Message::Response(resp) = parse_datagram(&bytes, 65536).unwrap() else {
            panic!()
        };
        assert_eq!(resp.code, 200);
        assert_eq!(resp.to.tag(), Some("srv"));
        assert_eq!(resp.from.tag(), Some("abc"));
        assert_eq!(resp.top_via().branch.as_deref(), Some("z9hG4bK-1"));
        assert_eq!(&resp.body[..], b"v=0\r\n");
    }

    #[test]
    fn a_response_establishing_a_dialog_carries_the_record_route_set() {
        let with_rr = INVITE.replacen(
            "Call-ID:",
            "Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n\
             Record-Route: <sip:p3.example;lr>\r\nCall-ID:",
            1,
        );
        let r = req(&with_rr);
        let routes = |code: u16| {
            let bytes = ResponseBuilder::new(&r, code, "X", Some("srv")).build();
            let Message::Response(resp) = parse_datagram(&bytes, 65536).unwrap() else {
                panic!()
            };
            resp.record_routes()
        };
        let all = [
            "<sip:p1.example;lr>",
            "<sip:p2.example;lr>",
            "<sip:p3.example;lr>",
        ];
        assert_eq!(routes(200), all, "in order, as received");
        assert_eq!(routes(180), all);
        assert!(routes(100).is_empty(), "100 Trying makes no dialog");
        assert!(routes(486).is_empty(), "nor does a failure");
    }

    #[test]
    fn uri_helpers() {
        assert_eq!(uri_user("sip:311@city.gov"), Some("311"));
        assert_eq!(
            uri_user("sip:+15551234567;npdi@h;user=phone"),
            Some("+15551234567")
        );
        assert_eq!(
            uri_user("tel:+15551234567;phone-context=x"),
            Some("+15551234567")
        );
        assert_eq!(
            uri_socket_addr("sip:a@127.0.0.1:5070;transport=udp"),
            Some("127.0.0.1:5070".parse().unwrap())
        );
        assert_eq!(
            uri_socket_addr("sip:[::1]:5080"),
            Some("[::1]:5080".parse().unwrap())
        );
        assert_eq!(
            split_list("<sip:a,b>;x, \"c,d\" <sip:e>"),
            vec!["<sip:a,b>;x", "\"c,d\" <sip:e>"]
        );
    }

    fn rfc5118(name: &str) -> Request {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/torture")
            .join(format!("{name}.dat"));
        match parse_datagram(&std::fs::read(path).unwrap(), 65536) {
            Ok(Message::Request(r)) => r,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// RFC 5118 section 4: what the IPv6 references parse to.
    #[test]
    fn rfc5118_ipv6_references() {
        let r = rfc5118("ipv6-good");
        assert_eq!(uri_socket_addr(&r.uri), Some(addr("[2001:db8::10]:5060")));
        assert_eq!(
            (r.top_via().host.as_str(), r.top_via().port),
            ("[2001:db8::9:1]", None)
        );
        assert_eq!(
            uri_socket_addr(&r.contacts()[0].uri),
            Some(addr("[2001:db8::1]:5060"))
        );
        // §4.2: the undelimited address is refused with 400.
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torture/ipv6-bad.dat");
        let e = parse_datagram(&std::fs::read(path).unwrap(), 65536).unwrap_err();
        assert_eq!(e.status(), 400);
        // §4.3: the "port" inside the brackets is part of the address, as the RFC predicts.
        let r = rfc5118("port-ambiguous");
        assert_eq!(
            uri_socket_addr(&r.uri),
            Some(addr("[2001:db8::10:5070]:5060"))
        );
        // §4.4: port after the bracket.
        let r = rfc5118("port-unambiguous");
        assert_eq!(uri_socket_addr(&r.uri), Some(addr("[2001:db8::10]:5070")));
        // §4.5: `received` with and without brackets; the sent-by is what matters to us.
        for name in [
            "via-received-param-with-delim",
            "via-received-param-no-delim",
        ] {
            let r = rfc5118(name);
            assert_eq!(r.top_via().host, "[2001:db8::9:1]", "{name}");
            assert!(r.top_via().has_rfc3261_branch(), "{name}");
        }
        // §4.7: three Vias, IPv6 with a port, IPv4, IPv6 over TCP.
        let r = rfc5118("mult-ip-in-header");
        let vias: Vec<(&str, Option<u16>, &str)> = r
            .vias
            .iter()
            .map(|v| (v.host.as_str(), v.port, v.transport.as_str()))
            .collect();
        assert_eq!(
            vias,
            [
                ("[2001:db8::9:1]", Some(6050), "UDP"),
                ("192.0.2.1", None, "UDP"),
                ("[2001:db8::9:255]", None, "TCP")
            ]
        );
        // §4.9: IPv4-mapped addresses.
        let r = rfc5118("ipv4-mapped-ipv6");
        assert_eq!(r.top_via().sent_by(), "[::ffff:192.0.2.10]:19823");
        assert_eq!(
            uri_socket_addr(&r.contacts()[0].uri),
            Some(addr("[::ffff:192.0.2.2]:5060"))
        );
        // §4.10: three colons are tolerated and mean the same address as two.
        let three = rfc5118("ipv6-bug-abnf-3-colons");
        let two = rfc5118("ipv6-correct-abnf-2-colons");
        assert_eq!(
            uri_socket_addr(&three.uri),
            Some(addr("[2001:db8::c000:201]:5060"))
        );
        assert_eq!(uri_socket_addr(&three.uri), uri_socket_addr(&two.uri));
    }
}
