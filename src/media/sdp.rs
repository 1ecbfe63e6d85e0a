//! SDP offer/answer for the audio leg of a call (RFC 4566/8866 syntax, RFC 3264 model).
//!
//! This module owns turning a peer's SDP body into the few facts the media layer needs
//! ([`parse`] → [`RemoteMedia`]), choosing what to speak ([`negotiate`] → [`Negotiated`]),
//! and printing our own SDP ([`build_answer`], [`build_answer_for_offer`], [`build_offer`]).
//! It is pure and synchronous: it opens no sockets, knows nothing of SIP (dialogs, headers,
//! Content-Type, retransmissions), allocates no ports, and never touches RTP. The SIP layer
//! hands it bodies and addresses; the RTP layer consumes the results.
//!
//! Syntax is parsed and printed with webrtc-rs's sans-IO `rtc-sdp` crate
//! ([`SessionDescription::unmarshal`] / [`SessionDescription::marshal`]); only the SIP
//! offer/answer semantics (which `m=` line, which codec, which direction, RFC 2543 hold)
//! live here.
//!
//! # Scope
//! * Plain RTP only: `RTP/AVP`, and `RTP/AVPF` treated as `RTP/AVP` (we send no feedback).
//!   Offers whose only enabled audio stream is SRTP (`RTP/SAVP`, `RTP/SAVPF`,
//!   `UDP/TLS/RTP/SAVPF`) are rejected with [`SdpError::Encrypted`]. An `RTP/AVP` stream
//!   carrying `a=crypto` ("best-effort SRTP", as baresip `mediaenc=srtp` sends) is accepted
//!   as plain RTP and answered without crypto.
//! * G.711 (PCMU/PCMA at 8 kHz, mono) and RFC 4733 `telephone-event/8000` only.
//! * WebRTC (browser) audio, `UDP/TLS/RTP/SAVPF` with ICE and DTLS-SRTP, is read by
//!   [`parse_any`] only (never by [`parse`], so a phone that offers it gets 488 where only plain
//!   RTP can be used), into the ICE credentials, DTLS fingerprint and setup role
//!   [`crate::media::webrtc`] needs ([`WebRtcRemote`]); [`build_webrtc_offer`] and
//!   [`build_webrtc_answer`] write ours: ICE-lite, one host candidate, `rtcp-mux`, BUNDLE of
//!   the one audio section. See "WebRTC" below.
//! * The first enabled (port ≠ 0) audio `m=` line with a plain RTP profile is used; other
//!   streams (video, disabled audio, SRTP alternatives) are ignored by [`parse`] and rejected
//!   with port 0 by [`build_answer_for_offer`].
//!
//! # rtc-sdp quirks and how they are handled
//! `rtc-sdp` is a WebRTC-oriented parser. Checked against its 0.21.1 source and against real
//! captures (see the tests), it reads SIPp, baresip and linphone offers as sent, but it is
//! stricter than RFC 8866 / real phones in a few places. [`parse`] first runs a small
//! *line-level* normalisation (it never interprets values) before handing the text to
//! `unmarshal`:
//! * Line endings: bare `LF` is fine in rtc-sdp, but bare `CR` endings, blank lines, a
//!   UTF-8 BOM, leading/trailing whitespace and trailing NULs/spaces after the last line make
//!   it fail (it reads the leftover bytes as a line type). Lines are re-joined with CRLF,
//!   trimmed, and empty lines dropped.
//! * It requires UTF-8 (`read_line` into `String`); a Latin-1 `s=`/`i=` from an old phone
//!   would abort the parse. Input is converted lossily.
//! * `o=` session id/version must fit `u64`. RFC 4566 allows any numeric string; longer
//!   digit strings are replaced by a 64-bit FNV-1a hash of the digits, so "the offer changed"
//!   (inequality) still works but ordering of such values is meaningless.
//! * The session-level part must be in exact RFC order (`v o s i u e p c b t r z k a`) and
//!   must contain `t=`; some gateways put `c=` after `t=`, `b=` before `c=`, or omit `t=`.
//!   Session-level lines are stably re-ordered by type and `t=0 0` is added if missing.
//!   (Media sections are already parsed leniently by rtc-sdp.)
//! * `u=` must be an absolute URL (rtc-sdp parses it with `url`); `u=` lines are dropped,
//!   as we never use them.
//! * `c=` TTL/range suffixes (`224.2.1.1/127`) are left in the address string, so they are
//!   stripped here before the IP is parsed; host names are not resolved (no DNS here) and
//!   give [`SdpError::BadConnectionAddress`].
//! * `MediaDescription::codecs()` returns a `HashMap` (no order), knows nothing of static
//!   payload types (0 = PCMU, 8 = PCMA without `a=rtpmap`), silently skips `a=fmtp` whose
//!   parameters contain spaces and `a=rtcp-fb:*` wildcards. We only use it as a PT → rtpmap
//!   lookup; order comes from the `m=` format list and static PTs are mapped here.
//! * Unknown line types (e.g. `y=`) and an `m=` media token other than lower-case
//!   `audio|video|text|application|message|image` are rejected by rtc-sdp; RFC 8866 says to
//!   ignore such a description, so these stay [`SdpError::Parse`].
//!
//! # Building
//! Our SDP is assembled as an rtc-sdp [`SessionDescription`] and printed with `marshal`
//! (CRLF line endings). The session-level `c=` carries our media address; IPv4-mapped IPv6
//! addresses are written as `IN IP4`.

use std::borrow::Cow;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};

use rtc_sdp::description::common::{Address, ConnectionInformation};
use rtc_sdp::description::media::{MediaDescription, MediaName, RangedPort};
use rtc_sdp::description::session::{Origin, TimeDescription, Timing};
use rtc_sdp::SessionDescription;

use crate::media::g711::Codec;

/// Largest SDP body [`parse`] accepts. Real audio offers are well under 2 KiB; this only
/// bounds the work done on hostile input.
pub(crate) const MAX_SDP_LEN: usize = 64 * 1024;

/// RTP clock rate of G.711 and of the only `telephone-event` we accept.
pub(crate) const G711_CLOCK_RATE: u32 = 8000;

/// Packetization time we ask for and send, in milliseconds.
pub(crate) const PTIME_MS: u32 = 20;

/// The payload type conventionally used for `telephone-event/8000` in our own offers.
#[cfg(test)]
pub(crate) const DEFAULT_TELEPHONE_EVENT_PT: u8 = 101;

/// The RFC 4733 events we accept: DTMF 0-9, *, #, A-D (0-15) and flash (16).
const TELEPHONE_EVENT_FMTP: &str = "0-16";

/// Name written in our `o=` username and `s=` session name.
const SDP_USER: &str = "ivr311";

/// Direction of a media stream, as seen by the side whose SDP it is (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `a=sendrecv` (also the default when no direction attribute is present).
    SendRecv,
    /// `a=sendonly`: the SDP's author sends, does not want to receive (hold).
    SendOnly,
    /// `a=recvonly`: the SDP's author receives only.
    RecvOnly,
    /// `a=inactive`: no media either way.
    Inactive,
}

impl Direction {
    /// The direction an answerer uses for a stream offered with `self`:
    /// sendonly → recvonly, recvonly → sendonly, sendrecv and inactive unchanged.
    pub(crate) fn answer(self) -> Direction {
        match self {
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            other => other,
        }
    }

    /// The SDP attribute name (`sendrecv`, `sendonly`, `recvonly`, `inactive`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// Whether the side with this direction sends RTP media.
    pub(crate) fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the side with this direction expects to receive RTP media.
    #[cfg(test)]
    pub(crate) fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }

    /// Attribute names are case-sensitive in RFC 8866; accept any case anyway.
    fn from_attribute(key: &str) -> Option<Direction> {
        [
            Direction::SendRecv,
            Direction::SendOnly,
            Direction::RecvOnly,
            Direction::Inactive,
        ]
        .into_iter()
        .find(|d| key.eq_ignore_ascii_case(d.as_str()))
    }

    /// Combine with an RFC 2543 hold address (`c=0.0.0.0`): the author does not want to
    /// receive, whatever the attribute says.
    fn without_receive(self) -> Direction {
        match self {
            Direction::SendRecv | Direction::SendOnly => Direction::SendOnly,
            Direction::RecvOnly | Direction::Inactive => Direction::Inactive,
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What we need from a remote offer (or answer): the first usable audio `m=` line.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteMedia {
    /// Where to send RTP: the `c=` address (media-level overrides session-level) and the
    /// `m=` port. IPv4 or IPv6. With RFC 2543 hold this is `0.0.0.0:port` (or `[::]:port`):
    /// do not send there; `direction` is then `SendOnly`/`Inactive`.
    pub addr: SocketAddr,
    /// Every RTP payload type on the `m=` line (0..=127), in the offer's preference order.
    pub(crate) payload_types: Vec<u8>,
    /// G.711 formats offered, in preference order: static 0/8 even without `a=rtpmap`,
    /// dynamic PTs mapped by `a=rtpmap` name PCMU/PCMA at 8000 Hz (mono).
    pub codecs: Vec<(u8, Codec)>,
    /// PT of `telephone-event/8000` if offered (the first one, whatever its number).
    /// Other clock rates (linphone also offers /48000 and /16000) are ignored.
    pub telephone_event: Option<u8>,
    /// `a=sendrecv/sendonly/recvonly/inactive` from the SDP author's point of view,
    /// media-level over session-level, default `SendRecv`; `c=0.0.0.0` (RFC 2543 hold)
    /// removes the receive half (sendrecv → sendonly, recvonly → inactive).
    pub(crate) direction: Direction,
    /// `a=ptime` (media-level over session-level), in milliseconds.
    pub(crate) ptime: Option<u32>,
    /// `o=` session version; changes when the author changes its SDP (RFC 3264 §8).
    pub(crate) session_version: u64,
    /// `o=` session id.
    pub(crate) session_id: u64,
}

/// The result of offer/answer: what we send and what we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The one G.711 codec we send and expect.
    pub codec: Codec,
    /// Its payload type as numbered by the offerer (usually 0 or 8, may be dynamic).
    pub payload_type: u8,
    /// The offerer's `telephone-event/8000` PT, if any; we use the same number both ways.
    pub telephone_event: Option<u8>,
    /// Our direction (the answer's), i.e. `offer.direction.answer()`.
    pub direction: Direction,
}

/// Why an SDP body could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SdpError {
    /// The body is empty or whitespace only.
    #[error("SDP body is empty")]
    Empty,
    /// The body is larger than [`MAX_SDP_LEN`] bytes.
    #[error("SDP body is {0} bytes, more than the {max} allowed", max = MAX_SDP_LEN)]
    TooLarge(usize),
    /// rtc-sdp rejected the syntax (message from rtc-sdp).
    #[error("malformed SDP: {0}")]
    Parse(String),
    /// There is no `m=audio` line with a non-zero port.
    #[error("SDP has no enabled audio stream")]
    NoAudio,
    /// The only enabled audio streams use SRTP (profile given); we do not do SRTP yet.
    #[error("audio is offered only encrypted ({0}); SRTP is not supported")]
    Encrypted(String),
    /// The enabled audio streams use a transport profile other than RTP/AVP(F) or SRTP,
    /// e.g. `TCP/RTP/AVP` or `udp` (profile given).
    #[error("unsupported audio transport profile {0}")]
    UnsupportedProfile(String),
    /// The chosen audio stream has no `c=` line at media or session level, or it has no
    /// address.
    #[error("no c= connection address for the audio stream")]
    NoConnectionAddress,
    /// The `c=` address is not an IP literal (host names are not resolved here).
    #[error("c= connection address {0:?} is not an IP address")]
    BadConnectionAddress(String),
    /// The `m=` port is not a valid port number.
    #[error("invalid m= port {0}")]
    BadPort(isize),
    /// None of the offered formats is a G.711 codec we support.
    #[error("no codec in common (we support G.711 only)")]
    NoCommonCodec,
    /// A WebRTC audio stream (`UDP/TLS/RTP/SAVPF`) without what ICE-lite and DTLS-SRTP need:
    /// the attribute named is missing or unusable (`ice-ufrag`, `ice-pwd`, `fingerprint`,
    /// `setup`, `rtcp-mux`).
    #[error("WebRTC audio without a usable a={0}")]
    WebRtc(&'static str),
}

/// Parse a peer's SDP (offer or answer) and extract the first usable audio stream.
///
/// Tolerates CRLF, bare LF or bare CR line endings, a missing final newline, blank lines
/// and non-UTF-8 bytes (see the module docs for the full list of edge fixes).
pub fn parse(sdp: &[u8]) -> Result<RemoteMedia, SdpError> {
    let desc = unmarshal(sdp)?;
    let index = select_audio(&desc)?;
    remote_media(&desc, index)
}

/// Pick the caller's most preferred G.711 codec among `supported` (the caller's preference
/// order wins); `telephone-event` at the offer's PT; our direction is the offer's answered.
pub fn negotiate(offer: &RemoteMedia, supported: &[Codec]) -> Result<Negotiated, SdpError> {
    let (payload_type, codec) = offer
        .codecs
        .iter()
        .copied()
        .find(|(_, codec)| supported.contains(codec))
        .ok_or(SdpError::NoCommonCodec)?;
    Ok(Negotiated {
        codec,
        payload_type,
        telephone_event: offer.telephone_event,
        direction: offer.direction.answer(),
    })
}

/// Build our SDP answer (`RTP/AVP`) with a single audio `m=` line: `o=` with our session
/// id/version, `c=` our IP, `m=audio <port> RTP/AVP <pt> [<te-pt>]`, an `a=rtpmap` for each,
/// `a=fmtp:<te> 0-16`, `a=ptime:20` and the answered direction.
///
/// RFC 3264 requires the answer to have as many `m=` lines as the offer; when the offer may
/// have several (video, disabled or SRTP audio streams), use [`build_answer_for_offer`].
pub(crate) fn build_answer(
    local: SocketAddr,
    session_id: u64,
    session_version: u64,
    neg: &Negotiated,
) -> String {
    let audio = audio_media(
        local.port(),
        PROTO_AVP,
        &[(neg.payload_type, neg.codec)],
        neg.telephone_event,
        neg.direction,
    );
    session(local.ip(), session_id, session_version, vec![audio]).marshal()
}

/// Build our answer to `offer_sdp` (the same bytes given to [`parse`]) with one `m=` line
/// per offered `m=` line, as RFC 3264 §6 requires: the audio stream [`parse`] picked gets
/// our audio description (echoing `RTP/AVPF` if that was offered), every other stream is
/// rejected with port 0.
pub fn build_answer_for_offer(
    offer_sdp: &[u8],
    local: SocketAddr,
    session_id: u64,
    session_version: u64,
    neg: &Negotiated,
) -> Result<String, SdpError> {
    let offer = unmarshal(offer_sdp)?;
    let chosen = select_audio(&offer)?;
    let media = offer
        .media_descriptions
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i == chosen {
                let proto = if proto_string(m).eq_ignore_ascii_case(PROTO_AVPF) {
                    PROTO_AVPF
                } else {
                    PROTO_AVP
                };
                audio_media(
                    local.port(),
                    proto,
                    &[(neg.payload_type, neg.codec)],
                    neg.telephone_event,
                    neg.direction,
                )
            } else {
                rejected_media(m)
            }
        })
        .collect();
    Ok(session(local.ip(), session_id, session_version, media).marshal())
}

/// Build our own offer (re-INVITE, outbound legs): `m=audio <port> RTP/AVP` with `codecs` in
/// the given preference order at their static PTs (duplicates dropped; PCMU if empty, since
/// an `m=` line needs a format), then `telephone_event` (skipped if it collides with a codec
/// PT), `a=fmtp:<te> 0-16`, `a=ptime:20` and `direction`.
pub(crate) fn build_offer(
    local: SocketAddr,
    session_id: u64,
    session_version: u64,
    codecs: &[Codec],
    telephone_event: Option<u8>,
    direction: Direction,
) -> String {
    let mut formats: Vec<(u8, Codec)> = Vec::with_capacity(2);
    for &codec in codecs {
        if !formats.iter().any(|&(_, c)| c == codec) {
            formats.push((codec.payload_type(), codec));
        }
    }
    if formats.is_empty() {
        formats.push((Codec::Pcmu.payload_type(), Codec::Pcmu));
    }
    let telephone_event = telephone_event.filter(|te| {
        let clash = formats.iter().any(|&(pt, _)| pt == *te) || *te > 127;
        if clash {
            tracing::warn!(pt = te, "telephone-event PT unusable in offer; omitted");
        }
        !clash
    });
    let audio = audio_media(
        local.port(),
        PROTO_AVP,
        &formats,
        telephone_event,
        direction,
    );
    session(local.ip(), session_id, session_version, vec![audio]).marshal()
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

const PROTO_AVP: &str = "RTP/AVP";
const PROTO_AVPF: &str = "RTP/AVPF";

/// Normalise at the line level (see module docs) and unmarshal with rtc-sdp.
fn unmarshal(sdp: &[u8]) -> Result<SessionDescription, SdpError> {
    if sdp.len() > MAX_SDP_LEN {
        return Err(SdpError::TooLarge(sdp.len()));
    }
    let text = normalize(&String::from_utf8_lossy(sdp));
    if text.is_empty() {
        return Err(SdpError::Empty);
    }
    SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes()))
        .map_err(|e| SdpError::Parse(e.to_string()))
}

/// Line-level clean-up so rtc-sdp's strict lexer accepts what real peers send. Never
/// interprets values except the two `o=` numbers (overflow fix).
fn normalize(text: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split(['\r', '\n'])
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c == '\0'))
        .filter(|l| !l.is_empty())
        .collect();

    // Session-level part: everything before the first m=.
    let media_start = lines
        .iter()
        .position(|l| l.starts_with("m="))
        .unwrap_or(lines.len());
    let (session_lines, media_lines) = lines.split_at(media_start);

    let mut session: Vec<Cow<'_, str>> = session_lines
        .iter()
        .filter(|l| !l.starts_with("u="))
        .map(|l| fix_origin(l))
        .collect();
    // Stable sort by the RFC 8866 order; t= and r= share a rank so each r= stays after
    // its t=. Unknown types sort last and are left for rtc-sdp to reject.
    session.sort_by_key(|l| session_rank(l));
    let has_v = session.iter().any(|l| l.starts_with("v="));
    if has_v && !session.iter().any(|l| l.starts_with("t=")) {
        let at = session
            .iter()
            .position(|l| session_rank(l) > session_rank("t="))
            .unwrap_or(session.len());
        session.insert(at, Cow::Borrowed("t=0 0"));
    }

    let mut out = String::with_capacity(text.len() + 32);
    for line in session
        .iter()
        .map(|l| l.as_ref())
        .chain(media_lines.iter().copied())
    {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

fn session_rank(line: &str) -> u8 {
    match line.as_bytes().first() {
        Some(b'v') => 0,
        Some(b'o') => 1,
        Some(b's') => 2,
        Some(b'i') => 3,
        Some(b'u') => 4,
        Some(b'e') => 5,
        Some(b'p') => 6,
        Some(b'c') => 7,
        Some(b'b') => 8,
        Some(b't') | Some(b'r') => 9,
        Some(b'z') => 10,
        Some(b'k') => 11,
        Some(b'a') => 12,
        _ => 13,
    }
}

/// rtc-sdp parses `o=` id and version as `u64`; hash longer digit strings instead.
fn fix_origin(line: &str) -> Cow<'_, str> {
    let Some(rest) = line.strip_prefix("o=") else {
        return Cow::Borrowed(line);
    };
    let mut fields: Vec<Cow<'_, str>> = rest.split_whitespace().map(Cow::Borrowed).collect();
    if fields.len() != 6 {
        return Cow::Borrowed(line);
    }
    let mut changed = false;
    for field in &mut fields[1..3] {
        let digits = field.as_ref();
        if !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u64>().is_err()
        {
            tracing::debug!(value = digits, "o= number exceeds u64; hashed");
            *field = Cow::Owned(fnv1a64(digits.as_bytes()).to_string());
            changed = true;
        }
    }
    if changed {
        Cow::Owned(format!("o={}", fields.join(" ")))
    } else {
        Cow::Borrowed(line)
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn proto_string(m: &MediaDescription) -> String {
    m.media_name.protos.join("/")
}

enum Profile {
    Plain,
    Secure,
    Other,
}

fn classify(proto: &str) -> Profile {
    let upper = proto.to_ascii_uppercase();
    if upper == PROTO_AVP || upper == PROTO_AVPF {
        Profile::Plain
    } else if upper.contains("SAVP") {
        Profile::Secure
    } else {
        Profile::Other
    }
}

/// Index of the first enabled audio `m=` line with a plain RTP profile.
fn select_audio(desc: &SessionDescription) -> Result<usize, SdpError> {
    let mut secure: Option<String> = None;
    let mut other: Option<String> = None;
    for (i, m) in desc.media_descriptions.iter().enumerate() {
        if !m.media_name.media.eq_ignore_ascii_case("audio") {
            continue;
        }
        if m.media_name.port.value == 0 {
            tracing::debug!(index = i, "skipping disabled (port 0) audio stream");
            continue;
        }
        let proto = proto_string(m);
        match classify(&proto) {
            Profile::Plain => return Ok(i),
            Profile::Secure => {
                tracing::debug!(index = i, proto = %proto, "skipping SRTP audio stream");
                secure.get_or_insert(proto);
            }
            Profile::Other => {
                tracing::debug!(index = i, proto = %proto, "skipping audio stream with unknown profile");
                other.get_or_insert(proto);
            }
        }
    }
    match (secure, other) {
        (Some(proto), _) => Err(SdpError::Encrypted(proto)),
        (None, Some(proto)) => Err(SdpError::UnsupportedProfile(proto)),
        (None, None) => Err(SdpError::NoAudio),
    }
}

fn remote_media(desc: &SessionDescription, index: usize) -> Result<RemoteMedia, SdpError> {
    let m = desc
        .media_descriptions
        .get(index)
        .ok_or(SdpError::NoAudio)?;

    let ip = connection_ip(desc, m)?;
    let port = u16::try_from(m.media_name.port.value)
        .map_err(|_| SdpError::BadPort(m.media_name.port.value))?;

    let (payload_types, codecs, telephone_event) = formats(m);

    let mut direction = media_direction(desc, m);
    if ip.is_unspecified() {
        // RFC 2543 hold: "do not send to me".
        direction = direction.without_receive();
    }

    let ptime = m
        .attribute("ptime")
        .flatten()
        .or_else(|| desc.attribute("ptime").map(String::as_str))
        .and_then(parse_ptime);

    Ok(RemoteMedia {
        addr: SocketAddr::new(ip, port),
        payload_types,
        codecs,
        telephone_event,
        direction,
        ptime,
        session_version: desc.origin.session_version,
        session_id: desc.origin.session_id,
    })
}

/// The `m=` line's payload types in order, its G.711 formats (static 0/8 even without
/// `a=rtpmap`), and its `telephone-event/8000` PT.
fn formats(m: &MediaDescription) -> (Vec<u8>, Vec<(u8, Codec)>, Option<u8>) {
    let rtpmaps = m.codecs();
    let mut payload_types = Vec::with_capacity(m.media_name.formats.len());
    let mut codecs = Vec::new();
    let mut telephone_event = None;
    for format in &m.media_name.formats {
        let Some(pt) = format.parse::<u8>().ok().filter(|pt| *pt <= 127) else {
            tracing::debug!(format = %format, "ignoring non-RTP format");
            continue;
        };
        if payload_types.contains(&pt) {
            continue;
        }
        payload_types.push(pt);
        match rtpmaps.get(&pt).filter(|c| !c.name.is_empty()) {
            Some(map) => {
                let mono = map.encoding_parameters.is_empty() || map.encoding_parameters == "1";
                // An rtpmap without a clock rate is malformed; G.711 is always 8 kHz.
                let clock_ok = map.clock_rate == G711_CLOCK_RATE || map.clock_rate == 0;
                if map.name.eq_ignore_ascii_case("telephone-event") {
                    if map.clock_rate == G711_CLOCK_RATE && telephone_event.is_none() {
                        telephone_event = Some(pt);
                    }
                } else if let Some(codec) = Codec::from_encoding_name(&map.name) {
                    if mono && clock_ok {
                        codecs.push((pt, codec));
                    }
                }
            }
            None => match pt {
                0 => codecs.push((pt, Codec::Pcmu)),
                8 => codecs.push((pt, Codec::Pcma)),
                _ => {}
            },
        }
    }
    (payload_types, codecs, telephone_event)
}

/// `c=` of the media section, else the session's; TTL/range suffix stripped.
fn connection_ip(desc: &SessionDescription, m: &MediaDescription) -> Result<IpAddr, SdpError> {
    let conn = m
        .connection_information
        .as_ref()
        .or(desc.connection_information.as_ref())
        .ok_or(SdpError::NoConnectionAddress)?;
    let raw = conn
        .address
        .as_ref()
        .map(|a| a.address.as_str())
        .ok_or(SdpError::NoConnectionAddress)?;
    let host = raw.split('/').next().unwrap_or(raw);
    // Tolerate a bracketed IPv6 literal, which some stacks copy from their SIP URIs.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host
        .parse()
        .map_err(|_| SdpError::BadConnectionAddress(raw.to_owned()))?;
    let declared_v6 = conn.address_type.eq_ignore_ascii_case("IP6");
    if declared_v6 != ip.is_ipv6() {
        tracing::debug!(addrtype = %conn.address_type, address = %raw, "c= address type mismatch; using the literal");
    }
    // An IPv4-mapped IPv6 address (`c=IN IP6 ::ffff:192.0.2.2`, RFC 5118 §4.9) names an IPv4
    // host: send to it as one, which an IPv4 RTP socket can.
    Ok(ip.to_canonical())
}

fn media_direction(desc: &SessionDescription, m: &MediaDescription) -> Direction {
    let find = |attrs: &[rtc_sdp::description::common::Attribute]| {
        attrs
            .iter()
            .find_map(|a| Direction::from_attribute(a.key.as_str()))
    };
    find(&m.attributes)
        .or_else(|| find(&desc.attributes))
        .unwrap_or(Direction::SendRecv)
}

fn parse_ptime(value: &str) -> Option<u32> {
    let value = value.trim();
    value.parse::<u32>().ok().or_else(|| {
        // Some stacks write "20.0".
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 1.0 && *v <= 10_000.0)
            .map(|v| v.round() as u32)
    })
}

// ---------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------

fn session(
    ip: IpAddr,
    session_id: u64,
    session_version: u64,
    media: Vec<MediaDescription>,
) -> SessionDescription {
    // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; advertise plain IPv4.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() {
        tracing::warn!(%ip, "advertising an unspecified media address (means hold to peers)");
    }
    let address_type = if ip.is_ipv4() { "IP4" } else { "IP6" };
    SessionDescription {
        version: 0,
        origin: Origin {
            username: SDP_USER.to_owned(),
            session_id,
            session_version,
            network_type: "IN".to_owned(),
            address_type: address_type.to_owned(),
            unicast_address: ip.to_string(),
        },
        session_name: SDP_USER.to_owned(),
        connection_information: Some(ConnectionInformation {
            network_type: "IN".to_owned(),
            address_type: address_type.to_owned(),
            address: Some(Address {
                address: ip.to_string(),
                ttl: None,
                range: None,
            }),
        }),
        time_descriptions: vec![TimeDescription {
            timing: Timing {
                start_time: 0,
                stop_time: 0,
            },
            repeat_times: vec![],
        }],
        media_descriptions: media,
        ..Default::default()
    }
}

fn audio_media(
    port: u16,
    proto: &str,
    formats: &[(u8, Codec)],
    telephone_event: Option<u8>,
    direction: Direction,
) -> MediaDescription {
    let mut md = MediaDescription {
        media_name: MediaName {
            media: "audio".to_owned(),
            port: RangedPort {
                value: port as isize,
                range: None,
            },
            protos: proto.split('/').map(str::to_owned).collect(),
            formats: vec![],
        },
        ..Default::default()
    };
    for &(pt, codec) in formats {
        md = md.with_codec(
            pt,
            codec.encoding_name().to_owned(),
            G711_CLOCK_RATE,
            0,
            String::new(),
        );
    }
    // A telephone-event PT equal to a codec PT would make the m= line ambiguous.
    let telephone_event = telephone_event.filter(|te| formats.iter().all(|&(pt, _)| pt != *te));
    if let Some(te) = telephone_event {
        md = md.with_codec(
            te,
            "telephone-event".to_owned(),
            G711_CLOCK_RATE,
            0,
            TELEPHONE_EVENT_FMTP.to_owned(),
        );
    }
    md.with_value_attribute("ptime".to_owned(), PTIME_MS.to_string())
        .with_property_attribute(direction.as_str().to_owned())
}

/// An answer `m=` line rejecting an offered stream (RFC 3264 §6): same media and
/// transport, port 0, the offered formats, no attributes.
fn rejected_media(offered: &MediaDescription) -> MediaDescription {
    let mut formats = offered.media_name.formats.clone();
    if formats.is_empty() {
        formats.push("0".to_owned());
    }
    MediaDescription {
        media_name: MediaName {
            media: offered.media_name.media.clone(),
            port: RangedPort {
                value: 0,
                range: None,
            },
            protos: offered.media_name.protos.clone(),
            formats,
        },
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// WebRTC
// ---------------------------------------------------------------------------------------
//
// A browser's audio section is `UDP/TLS/RTP/SAVPF` with `a=ice-ufrag`, `a=ice-pwd`,
// `a=fingerprint` and `a=setup` (media level, or session level as some stacks write them),
// `a=rtcp-mux`, `a=mid` and usually a BUNDLE group. Its `c=` line often names no usable
// address (`0.0.0.0`, port 9, its candidates hidden behind mDNS names): as an ICE-lite agent we
// never send before the browser's connectivity checks reach us, and answer to where they come
// from, so the address is read leniently and `c=0.0.0.0` is not taken for RFC 2543 hold.

const PROTO_WEBRTC: &str = "UDP/TLS/RTP/SAVPF";
/// ICE credentials longer than this are refused (RFC 8839 allows up to 256 characters).
const MAX_ICE_CREDENTIAL: usize = 256;

/// The DTLS role an `a=setup` attribute asks for (RFC 4145, RFC 5763 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// The SDP's author starts the DTLS handshake (it is the client).
    Active,
    /// The author waits for the handshake (it is the server).
    Passive,
    /// Either; the answerer chooses (offers only).
    ActPass,
}

impl Setup {
    pub fn as_str(self) -> &'static str {
        match self {
            Setup::Active => "active",
            Setup::Passive => "passive",
            Setup::ActPass => "actpass",
        }
    }

    fn parse(value: &str) -> Option<Setup> {
        [Setup::Active, Setup::Passive, Setup::ActPass]
            .into_iter()
            .find(|s| value.trim().eq_ignore_ascii_case(s.as_str()))
    }
}

/// A certificate fingerprint (`a=fingerprint`, RFC 8122): the hash function's name, lower case,
/// and the digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub algorithm: String,
    pub value: Vec<u8>,
}

impl Fingerprint {
    /// Read `sha-256 AB:CD:...` (the value of `a=fingerprint`).
    pub fn parse(value: &str) -> Option<Fingerprint> {
        let (alg, hex) = value.trim().split_once(char::is_whitespace)?;
        let bytes: Option<Vec<u8>> = hex
            .trim()
            .split(':')
            .map(|b| {
                (b.len() == 2)
                    .then(|| u8::from_str_radix(b, 16).ok())
                    .flatten()
            })
            .collect();
        let value = bytes.filter(|v| (16..=64).contains(&v.len()))?;
        Some(Fingerprint {
            algorithm: alg.to_ascii_lowercase(),
            value,
        })
    }

    /// `sha-256 AB:CD:...`, as written in `a=fingerprint`.
    pub fn to_sdp(&self) -> String {
        let hex: Vec<String> = self.value.iter().map(|b| format!("{b:02X}")).collect();
        format!("{} {}", self.algorithm, hex.join(":"))
    }
}

/// What a WebRTC peer's SDP says of its transport: how its connectivity checks authenticate,
/// which certificate its DTLS handshake must present, and which side starts that handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRtcRemote {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    pub fingerprint: Fingerprint,
    pub setup: Setup,
    /// The audio section's `a=mid`, echoed in our answer.
    pub mid: Option<String>,
}

/// Our side of a WebRTC leg's SDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRtcLocal {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    /// Our certificate's (always SHA-256).
    pub fingerprint: Fingerprint,
    /// `actpass` in our offers; `active` or `passive` in answers and later offers.
    pub setup: Setup,
    /// The SSRC we send under (`a=ssrc`), so the browser ties the stream to its track.
    pub ssrc: u32,
}

/// A peer's SDP as [`parse_any`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Remote {
    /// Plain RTP, as [`parse`] reads it.
    Plain(RemoteMedia),
    /// A WebRTC audio section: its media, and its ICE and DTLS parameters.
    WebRtc(RemoteMedia, WebRtcRemote),
}

impl Remote {
    pub fn media(&self) -> &RemoteMedia {
        match self {
            Remote::Plain(m) | Remote::WebRtc(m, _) => m,
        }
    }
}

/// Parse a peer's SDP, plain RTP ([`parse`]) or WebRTC: a plain audio stream is preferred when
/// both are offered; a `UDP/TLS/RTP/SAVPF` one is read only with ICE credentials, a
/// fingerprint and `rtcp-mux` ([`SdpError::WebRtc`] names what is missing). Other SRTP
/// (`RTP/SAVP` with `a=crypto`) is [`SdpError::Encrypted`], as for [`parse`].
pub fn parse_any(sdp: &[u8]) -> Result<Remote, SdpError> {
    let desc = unmarshal(sdp)?;
    match select_audio(&desc) {
        Ok(index) => remote_media(&desc, index).map(Remote::Plain),
        Err(SdpError::Encrypted(proto)) => {
            let Some(index) = select_webrtc_audio(&desc) else {
                return Err(SdpError::Encrypted(proto));
            };
            let m = &desc.media_descriptions[index];
            let security = webrtc_remote(&desc, m)?;
            let media = webrtc_media(&desc, m)?;
            Ok(Remote::WebRtc(media, security))
        }
        Err(e) => Err(e),
    }
}

/// The first enabled audio section whose profile is `UDP/TLS/RTP/SAVPF`.
fn select_webrtc_audio(desc: &SessionDescription) -> Option<usize> {
    desc.media_descriptions.iter().position(|m| {
        m.media_name.media.eq_ignore_ascii_case("audio")
            && m.media_name.port.value != 0
            && proto_string(m).eq_ignore_ascii_case(PROTO_WEBRTC)
    })
}

/// An attribute's value, media level over session level.
fn attribute_value<'a>(
    desc: &'a SessionDescription,
    m: &'a MediaDescription,
    key: &str,
) -> Option<&'a str> {
    m.attribute(key)
        .flatten()
        .or_else(|| desc.attribute(key).map(String::as_str))
}

fn webrtc_remote(
    desc: &SessionDescription,
    m: &MediaDescription,
) -> Result<WebRtcRemote, SdpError> {
    let credential = |key: &'static str, min: usize| {
        attribute_value(desc, m, key)
            .map(str::trim)
            .filter(|v| {
                (min..=MAX_ICE_CREDENTIAL).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
            })
            .map(str::to_owned)
            .ok_or(SdpError::WebRtc(key))
    };
    let ice_ufrag = credential("ice-ufrag", 4)?;
    let ice_pwd = credential("ice-pwd", 22)?;
    let fingerprint = attribute_value(desc, m, "fingerprint")
        .and_then(Fingerprint::parse)
        .ok_or(SdpError::WebRtc("fingerprint"))?;
    // RFC 5763 §5: an offer without `a=setup` means active; browsers always write it.
    let setup = match attribute_value(desc, m, "setup") {
        Some(v) => Setup::parse(v).ok_or(SdpError::WebRtc("setup"))?,
        None => Setup::Active,
    };
    // Media and RTCP share the one port we give (RFC 5761); browsers require it too.
    if m.attribute("rtcp-mux").is_none() {
        return Err(SdpError::WebRtc("rtcp-mux"));
    }
    let mid = m
        .attribute("mid")
        .flatten()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 32)
        .map(str::to_owned);
    Ok(WebRtcRemote {
        ice_ufrag,
        ice_pwd,
        fingerprint,
        setup,
        mid,
    })
}

/// A WebRTC section's formats and direction (as [`remote_media`]), with its address read
/// leniently: `0.0.0.0` or a name gives the unspecified address, never hold.
fn webrtc_media(desc: &SessionDescription, m: &MediaDescription) -> Result<RemoteMedia, SdpError> {
    let port = u16::try_from(m.media_name.port.value)
        .map_err(|_| SdpError::BadPort(m.media_name.port.value))?;
    let ip = connection_ip(desc, m).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let (payload_types, codecs, telephone_event) = formats(m);
    Ok(RemoteMedia {
        addr: SocketAddr::new(ip, port),
        payload_types,
        codecs,
        telephone_event,
        direction: media_direction(desc, m),
        ptime: attribute_value(desc, m, "ptime").and_then(parse_ptime),
        session_version: desc.origin.session_version,
        session_id: desc.origin.session_id,
    })
}

/// Our WebRTC offer to a browser: ICE-lite, the one audio section `UDP/TLS/RTP/SAVPF` with
/// `codecs` (at their static PTs) and `telephone_event`, `rtcp-mux`, `mid` 0 in a BUNDLE group,
/// our ICE credentials, fingerprint and setup role, one host candidate at `local`, and our
/// SSRC.
pub fn build_webrtc_offer(
    local: SocketAddr,
    session_id: u64,
    session_version: u64,
    codecs: &[Codec],
    telephone_event: Option<u8>,
    direction: Direction,
    ours: &WebRtcLocal,
) -> String {
    let mut formats: Vec<(u8, Codec)> = Vec::with_capacity(2);
    for &codec in codecs {
        if !formats.iter().any(|&(_, c)| c == codec) {
            formats.push((codec.payload_type(), codec));
        }
    }
    if formats.is_empty() {
        formats.push((Codec::Pcmu.payload_type(), Codec::Pcmu));
    }
    let audio = webrtc_audio(local, &formats, telephone_event, direction, ours, "0");
    webrtc_session(local.ip(), session_id, session_version, vec![audio], &["0"]).marshal()
}

/// Our answer to a browser's WebRTC offer (`offer_sdp`, the bytes given to [`parse_any`]): its
/// audio section answered with `neg` as [`build_webrtc_offer`] writes it (its `mid` echoed),
/// every other section rejected with port 0.
pub fn build_webrtc_answer(
    offer_sdp: &[u8],
    local: SocketAddr,
    session_id: u64,
    session_version: u64,
    neg: &Negotiated,
    ours: &WebRtcLocal,
) -> Result<String, SdpError> {
    let offer = unmarshal(offer_sdp)?;
    let chosen = select_webrtc_audio(&offer).ok_or(SdpError::NoAudio)?;
    let mid_of = |m: &MediaDescription| {
        m.attribute("mid")
            .flatten()
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 32)
            .map(str::to_owned)
    };
    let mut bundle = Vec::new();
    let media = offer
        .media_descriptions
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mid = mid_of(m);
            if i == chosen {
                let mid = mid.unwrap_or_else(|| "0".to_owned());
                bundle.push(mid.clone());
                webrtc_audio(
                    local,
                    &[(neg.payload_type, neg.codec)],
                    neg.telephone_event,
                    neg.direction,
                    ours,
                    &mid,
                )
            } else {
                let r = rejected_media(m);
                match mid {
                    Some(mid) => r.with_value_attribute("mid".to_owned(), mid),
                    None => r,
                }
            }
        })
        .collect();
    let bundle: Vec<&str> = bundle.iter().map(String::as_str).collect();
    Ok(webrtc_session(local.ip(), session_id, session_version, media, &bundle).marshal())
}

fn webrtc_session(
    ip: IpAddr,
    session_id: u64,
    session_version: u64,
    media: Vec<MediaDescription>,
    bundle: &[&str],
) -> SessionDescription {
    let mut s = session(ip, session_id, session_version, media)
        .with_property_attribute("ice-lite".to_owned());
    if !bundle.is_empty() {
        s = s.with_value_attribute("group".to_owned(), format!("BUNDLE {}", bundle.join(" ")));
    }
    s.with_value_attribute("msid-semantic".to_owned(), " WMS ivr311".to_owned())
}

fn webrtc_audio(
    local: SocketAddr,
    formats: &[(u8, Codec)],
    telephone_event: Option<u8>,
    direction: Direction,
    ours: &WebRtcLocal,
    mid: &str,
) -> MediaDescription {
    let ip = local.ip().to_canonical();
    let candidate = format!(
        "1 1 udp 2130706431 {ip} {port} typ host",
        port = local.port()
    );
    let msid = "ivr311 ivr311-audio";
    audio_media(
        local.port(),
        PROTO_WEBRTC,
        formats,
        telephone_event,
        direction,
    )
    .with_value_attribute("mid".to_owned(), mid.to_owned())
    .with_value_attribute("ice-ufrag".to_owned(), ours.ice_ufrag.clone())
    .with_value_attribute("ice-pwd".to_owned(), ours.ice_pwd.clone())
    .with_value_attribute("fingerprint".to_owned(), ours.fingerprint.to_sdp())
    .with_value_attribute("setup".to_owned(), ours.setup.as_str().to_owned())
    .with_property_attribute("rtcp-mux".to_owned())
    .with_value_attribute("candidate".to_owned(), candidate)
    .with_property_attribute("end-of-candidates".to_owned())
    .with_value_attribute("msid".to_owned(), msid.to_owned())
    .with_value_attribute("ssrc".to_owned(), format!("{} cname:ivr311", ours.ssrc))
    .with_value_attribute("ssrc".to_owned(), format!("{} msid:{msid}", ours.ssrc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Test literals are written with LF; real peers send CRLF, as the fixture files do.
    fn crlf(s: &str) -> String {
        s.replace('\n', "\r\n")
    }

    fn parse_lf(s: &str) -> Result<RemoteMedia, SdpError> {
        parse(crlf(s).as_bytes())
    }

    const BOTH: &[Codec] = &[Codec::Pcmu, Codec::Pcma];

    // --- Real captures (bodies byte-for-byte, CRLF restored by `crlf`) ------------------

    /// `sipp -sn uac` (SIPp 3.6, built-in scenario) INVITE body.
    const SIPP_UAC: &str = "v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
";

    /// `sipp -sn uac_pcap` INVITE body.
    const SIPP_UAC_PCAP: &str = "v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6004 RTP/AVP 8 101
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-11,16
";

    /// baresip 1.0.0 (modules opus, g722, g711) initial INVITE.
    const BARESIP_OFFER: &str = "v=0
o=- 3437035516 874498431 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
m=audio 8512 RTP/AVP 96 9 0 8 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1;maxaveragebitrate=28000
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:513780823 cname:sip:resident@127.0.0.1
a=minptime:20
a=ptime:20
";

    /// baresip `/hold` re-INVITE in the same call.
    const BARESIP_HOLD: &str = "v=0
o=- 3437035516 874498432 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
m=audio 8512 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendonly
a=label:1
a=rtcp-rsize
a=ssrc:513780823 cname:sip:resident@127.0.0.1
a=minptime:20
a=ptime:20
";

    /// baresip `/resume` re-INVITE in the same call.
    const BARESIP_RESUME: &str = "v=0
o=- 3437035516 874498433 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
m=audio 8512 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:513780823 cname:sip:resident@127.0.0.1
a=minptime:20
a=ptime:20
";

    /// baresip with account `mediaenc=srtp-mand`.
    const BARESIP_SRTP_MANDATORY: &str = "v=0
o=- 3071703659 866022544 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
m=audio 4890 RTP/SAVP 96 9 0 8 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1;maxaveragebitrate=28000
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:2544801385 cname:sip:resident@127.0.0.1
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:SOMf/owYryy73d3ImXgJ7K7RNzcRI9cbOIntblDQ
a=minptime:20
a=ptime:20
";

    /// baresip with account `mediaenc=srtp` (best effort: RTP/AVP plus a=crypto).
    const BARESIP_SRTP_BEST_EFFORT: &str = "v=0
o=- 3211860378 653088251 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
m=audio 34972 RTP/AVP 96 9 0 8 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1;maxaveragebitrate=28000
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:1861339669 cname:sip:resident@127.0.0.1
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:A6Vks8jgS4iv/7ZDPjwJygQ6C5/2Y4S5OXV2bROu
a=minptime:20
a=ptime:20
";

    /// baresip with account `mediaenc=dtls_srtp`.
    const BARESIP_DTLS_SRTP: &str = "v=0
o=- 3979242692 422619003 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
a=setup:actpass
a=fingerprint:SHA-256 C7:C3:1F:07:D0:4A:4B:ED:A3:45:56:80:00:2A:F7:74:DD:33:83:BD:7B:D1:4F:B2:1A:0D:AE:DB:D6:F4:01:32
m=audio 27674 UDP/TLS/RTP/SAVPF 96 9 0 8 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1;maxaveragebitrate=28000
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:1700985701 cname:sip:resident@127.0.0.1
a=minptime:20
a=ptime:20
";

    /// baresip with video modules (vp8, fakevideo) loaded: audio + video.
    const BARESIP_AUDIO_VIDEO: &str = "v=0
o=- 1973136285 2025487036 IN IP4 192.0.2.2
s=-
c=IN IP4 192.0.2.2
t=0 0
a=tool:baresip 1.0.0
m=audio 22522 RTP/AVP 96 9 0 8 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1;maxaveragebitrate=28000
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:750092689 cname:sip:resident@127.0.0.1
a=minptime:20
a=ptime:20
m=video 35470 RTP/AVP 96
a=rtpmap:96 VP8/90000
a=fmtp:96 max-fs=3600
a=sendrecv
a=label:2
a=rtcp-rsize
a=ssrc:862807242 cname:sip:resident@127.0.0.1
a=framerate:25.00
a=rtcp-fb:* nack pli
a=content:main
";

    /// linphonec 5.1.65 (Debian linphone-cli) initial INVITE; media on IPv6.
    const LINPHONE_OFFER: &str = "v=0
o=linphone 1623 149 IN IP6 fd00::2
s=Talk
c=IN IP6 fd00::2
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
m=audio 7078 RTP/AVP 96 97 98 0 8 18 99 100 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:99 telephone-event/48000
a=rtpmap:100 telephone-event/16000
a=rtpmap:101 telephone-event/8000
a=rtcp-fb:* trr-int 5000
a=rtcp-fb:* ccm tmmbr
";

    /// linphonec `pause` re-INVITE in the same call.
    const LINPHONE_HOLD: &str = "v=0
o=linphone 1623 150 IN IP6 fd00::2
s=Talk
c=IN IP6 fd00::2
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
m=audio 7078 RTP/AVP 96 97 98 0 8 18 99 100 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:99 telephone-event/48000
a=rtpmap:100 telephone-event/16000
a=rtpmap:101 telephone-event/8000
a=sendonly
a=rtcp-fb:* trr-int 5000
a=rtcp-fb:* ccm tmmbr
";

    /// linphonec `resume` re-INVITE in the same call.
    const LINPHONE_RESUME: &str = "v=0
o=linphone 1623 151 IN IP6 fd00::2
s=Talk
c=IN IP6 fd00::2
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
m=audio 7078 RTP/AVP 96 97 98 0 8 18 99 100 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:99 telephone-event/48000
a=rtpmap:100 telephone-event/16000
a=rtpmap:101 telephone-event/8000
a=rtcp-fb:* trr-int 5000
a=rtcp-fb:* ccm tmmbr
";

    // --- Hand-written cases --------------------------------------------------------------

    /// linphone's documented desktop offer shape: telephone-event at 48k/16k/8k, where
    /// the 8 kHz one (PT 100 here) must be chosen.
    const LINPHONE_DOCUMENTED: &str = "v=0
o=alice 2890 1234 IN IP4 198.51.100.7
s=Talk
c=IN IP4 198.51.100.7
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=record:off
m=audio 7078 RTP/AVP 96 97 98 0 8 18 101 99 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
";

    const G729_OPUS_ONLY: &str = "v=0
o=- 10 1 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
m=audio 5004 RTP/AVP 111 18 101
a=rtpmap:111 opus/48000/2
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
";

    const PCMA_FIRST: &str = "v=0
o=- 11 1 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
m=audio 5006 RTP/AVP 8 0 101
a=rtpmap:8 PCMA/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
";

    /// RFC 2543-style hold (old Cisco/Asterisk): c=0.0.0.0, no direction attribute.
    const C0_HOLD: &str = "v=0
o=- 12 2 IN IP4 203.0.113.5
s=-
c=IN IP4 0.0.0.0
t=0 0
m=audio 5008 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
";

    /// PCMU on a dynamic payload type, telephone-event at an unusual PT, no static PTs.
    const DYNAMIC_PCMU: &str = "v=0
o=- 13 1 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
m=audio 5010 RTP/AVP 112 126
a=rtpmap:112 pcmu/8000/1
a=rtpmap:126 telephone-event/8000
a=fmtp:126 0-15
";

    const IPV6_LOOPBACK: &str = "v=0
o=- 14 1 IN IP6 ::1
s=-
c=IN IP6 ::1
t=0 0
m=audio 5012 RTP/AVP 0 8 101
a=rtpmap:101 telephone-event/8000
a=sendrecv
";

    /// Session-level c= overridden by media-level c=, session-level sendonly overridden
    /// by media-level recvonly, a disabled first audio stream.
    const OVERRIDES: &str = "v=0
o=- 15 3 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
a=sendonly
m=audio 0 RTP/AVP 0
m=audio 5014 RTP/AVP 0
c=IN IP4 198.51.100.9
a=recvonly
a=ptime:30
";

    /// Only a disabled audio stream and a video stream.
    const ONLY_DISABLED_AUDIO: &str = "v=0
o=- 16 1 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
m=audio 0 RTP/AVP 0
m=video 5016 RTP/AVP 96
a=rtpmap:96 H264/90000
";

    /// SRTP stream first, plain RTP alternative second (old "duplicate m=" best effort).
    const SAVP_WITH_AVP_ALTERNATIVE: &str = "v=0
o=- 17 1 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
m=audio 5018 RTP/SAVP 0 101
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA
a=rtpmap:101 telephone-event/8000
m=audio 5020 RTP/AVP 0 101
a=rtpmap:101 telephone-event/8000
";

    const AVPF: &str = "v=0
o=- 18 1 IN IP4 203.0.113.5
s=-
c=IN IP4 203.0.113.5
t=0 0
m=audio 5022 RTP/AVPF 0 8
a=rtcp-fb:* nack
";

    fn fixture_pairs() -> Vec<(&'static str, &'static str)> {
        vec![
            ("sipp_uac_pcmu.sdp", SIPP_UAC),
            ("sipp_uac_pcap_pcma_te.sdp", SIPP_UAC_PCAP),
            ("baresip_offer.sdp", BARESIP_OFFER),
            ("baresip_hold.sdp", BARESIP_HOLD),
            ("baresip_resume.sdp", BARESIP_RESUME),
            ("baresip_srtp_mandatory.sdp", BARESIP_SRTP_MANDATORY),
            ("baresip_srtp_best_effort.sdp", BARESIP_SRTP_BEST_EFFORT),
            ("baresip_dtls_srtp.sdp", BARESIP_DTLS_SRTP),
            ("baresip_audio_video.sdp", BARESIP_AUDIO_VIDEO),
            ("linphone_offer.sdp", LINPHONE_OFFER),
            ("linphone_hold.sdp", LINPHONE_HOLD),
            ("linphone_resume.sdp", LINPHONE_RESUME),
            ("linphone_documented.sdp", LINPHONE_DOCUMENTED),
            ("g729_opus_only.sdp", G729_OPUS_ONLY),
            ("pcma_first.sdp", PCMA_FIRST),
            ("c0_hold.sdp", C0_HOLD),
            ("dynamic_pcmu.sdp", DYNAMIC_PCMU),
            ("ipv6_loopback.sdp", IPV6_LOOPBACK),
            ("overrides.sdp", OVERRIDES),
            ("only_disabled_audio.sdp", ONLY_DISABLED_AUDIO),
            ("savp_with_avp_alternative.sdp", SAVP_WITH_AVP_ALTERNATIVE),
            ("avpf.sdp", AVPF),
        ]
    }

    #[test]
    fn fixture_files_match_literals() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdp");
        for (file, literal) in fixture_pairs() {
            let bytes =
                std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("fixture {file}: {e}"));
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                crlf(literal),
                "fixture {file} differs from the test literal"
            );
        }
    }

    #[test]
    fn sipp_uac_pcmu() {
        let r = parse_lf(SIPP_UAC).unwrap();
        assert_eq!(
            r.addr,
            "127.0.0.1:6000".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(r.payload_types, vec![0]);
        assert_eq!(r.codecs, vec![(0, Codec::Pcmu)]);
        assert_eq!(r.telephone_event, None);
        assert_eq!(r.direction, Direction::SendRecv);
        assert_eq!(r.ptime, None);
        assert_eq!(r.session_id, 53655765);
        assert_eq!(r.session_version, 2353687637);
        let n = negotiate(&r, BOTH).unwrap();
        assert_eq!(
            n,
            Negotiated {
                codec: Codec::Pcmu,
                payload_type: 0,
                telephone_event: None,
                direction: Direction::SendRecv
            }
        );
    }

    #[test]
    fn sipp_uac_pcap_pcma_with_te() {
        let r = parse_lf(SIPP_UAC_PCAP).unwrap();
        assert_eq!(
            r.addr,
            "127.0.0.1:6004".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(r.payload_types, vec![8, 101]);
        assert_eq!(r.codecs, vec![(8, Codec::Pcma)]);
        assert_eq!(r.telephone_event, Some(101));
        let n = negotiate(&r, BOTH).unwrap();
        assert_eq!((n.codec, n.payload_type), (Codec::Pcma, 8));
        assert_eq!(n.telephone_event, Some(101));
        assert!(matches!(
            negotiate(&r, &[Codec::Pcmu]),
            Err(SdpError::NoCommonCodec)
        ));
    }

    #[test]
    fn baresip_offer_preference_order() {
        let r = parse_lf(BARESIP_OFFER).unwrap();
        assert_eq!(
            r.addr,
            "192.0.2.2:8512".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(r.payload_types, vec![96, 9, 0, 8, 101]);
        assert_eq!(r.codecs, vec![(0, Codec::Pcmu), (8, Codec::Pcma)]);
        assert_eq!(r.telephone_event, Some(101));
        assert_eq!(r.ptime, Some(20));
        assert_eq!(r.direction, Direction::SendRecv);
        assert_eq!(r.session_id, 3437035516);
        // Caller's order wins over ours.
        let n = negotiate(&r, &[Codec::Pcma, Codec::Pcmu]).unwrap();
        assert_eq!((n.codec, n.payload_type), (Codec::Pcmu, 0));
        let n = negotiate(&r, &[Codec::Pcma]).unwrap();
        assert_eq!((n.codec, n.payload_type), (Codec::Pcma, 8));
    }

    #[test]
    fn baresip_hold_and_resume() {
        let offer = parse_lf(BARESIP_OFFER).unwrap();
        let hold = parse_lf(BARESIP_HOLD).unwrap();
        let resume = parse_lf(BARESIP_RESUME).unwrap();
        assert_eq!(hold.session_id, offer.session_id);
        assert!(hold.session_version > offer.session_version);
        assert_eq!(hold.direction, Direction::SendOnly);
        let n = negotiate(&hold, BOTH).unwrap();
        assert_eq!(n.direction, Direction::RecvOnly);
        assert!(!n.direction.sends() && n.direction.receives());
        let answer = build_answer("198.51.100.1:30000".parse().unwrap(), 1, 2, &n);
        assert!(answer.contains("a=recvonly\r\n"), "{answer}");
        assert_eq!(resume.direction, Direction::SendRecv);
        assert_ne!(resume.session_version, hold.session_version);
        assert_eq!(
            negotiate(&resume, BOTH).unwrap().direction,
            Direction::SendRecv
        );
    }

    #[test]
    fn baresip_srtp_mandatory_rejected() {
        let err = parse_lf(BARESIP_SRTP_MANDATORY).unwrap_err();
        assert!(
            matches!(&err, SdpError::Encrypted(p) if p == "RTP/SAVP"),
            "{err}"
        );
        assert!(err.to_string().contains("SRTP"));
    }

    #[test]
    fn baresip_dtls_srtp_rejected() {
        let err = parse_lf(BARESIP_DTLS_SRTP).unwrap_err();
        assert!(
            matches!(&err, SdpError::Encrypted(p) if p == "UDP/TLS/RTP/SAVPF"),
            "{err}"
        );
    }

    #[test]
    fn baresip_best_effort_srtp_is_plain_rtp() {
        let r = parse_lf(BARESIP_SRTP_BEST_EFFORT).unwrap();
        assert_eq!(r.addr.port(), 34972);
        assert_eq!(negotiate(&r, BOTH).unwrap().codec, Codec::Pcmu);
        let n = negotiate(&r, BOTH).unwrap();
        let answer = build_answer("198.51.100.1:30000".parse().unwrap(), 1, 1, &n);
        assert!(!answer.contains("crypto"));
    }

    #[test]
    fn baresip_audio_video_answer_rejects_video() {
        let offer = crlf(BARESIP_AUDIO_VIDEO);
        let r = parse(offer.as_bytes()).unwrap();
        assert_eq!(r.addr.port(), 22522);
        let n = negotiate(&r, BOTH).unwrap();
        let local: SocketAddr = "198.51.100.1:30000".parse().unwrap();
        let answer = build_answer_for_offer(offer.as_bytes(), local, 7, 1, &n).unwrap();
        let m_lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            m_lines,
            vec!["m=audio 30000 RTP/AVP 0 101", "m=video 0 RTP/AVP 96"]
        );
        // The video section carries no attributes.
        let after_video = answer.split("m=video").nth(1).unwrap();
        assert!(!after_video.contains("a="), "{answer}");
        let back = parse(answer.as_bytes()).unwrap();
        assert_eq!(back.addr, local);
        assert_eq!(back.codecs, vec![(0, Codec::Pcmu)]);
    }

    #[test]
    fn linphone_real_offer_ipv6_and_te_8000() {
        let r = parse_lf(LINPHONE_OFFER).unwrap();
        assert_eq!(
            r.addr,
            SocketAddr::new("fd00::2".parse::<Ipv6Addr>().unwrap().into(), 7078)
        );
        assert_eq!(r.payload_types, vec![96, 97, 98, 0, 8, 18, 99, 100, 101]);
        assert_eq!(r.codecs, vec![(0, Codec::Pcmu), (8, Codec::Pcma)]);
        // 99 is /48000, 100 is /16000: only the 8 kHz one counts.
        assert_eq!(r.telephone_event, Some(101));
        assert_eq!(r.direction, Direction::SendRecv);
        assert_eq!((r.session_id, r.session_version), (1623, 149));
        let n = negotiate(&r, BOTH).unwrap();
        assert_eq!(
            (n.codec, n.payload_type, n.telephone_event),
            (Codec::Pcmu, 0, Some(101))
        );
    }

    #[test]
    fn linphone_hold_and_resume() {
        let hold = parse_lf(LINPHONE_HOLD).unwrap();
        assert_eq!(hold.direction, Direction::SendOnly);
        assert_eq!(hold.session_version, 150);
        assert_eq!(
            negotiate(&hold, BOTH).unwrap().direction,
            Direction::RecvOnly
        );
        let resume = parse_lf(LINPHONE_RESUME).unwrap();
        assert_eq!(resume.direction, Direction::SendRecv);
        assert_eq!(resume.session_version, 151);
    }

    #[test]
    fn linphone_documented_picks_te_8000_not_48000() {
        let r = parse_lf(LINPHONE_DOCUMENTED).unwrap();
        assert_eq!(r.telephone_event, Some(100));
        let n = negotiate(&r, BOTH).unwrap();
        assert_eq!(n.telephone_event, Some(100));
        let answer = build_answer("198.51.100.1:30000".parse().unwrap(), 1, 1, &n);
        assert!(
            answer.contains("m=audio 30000 RTP/AVP 0 100\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:100 telephone-event/8000\r\n"));
    }

    #[test]
    fn g729_opus_only_no_common_codec() {
        let r = parse_lf(G729_OPUS_ONLY).unwrap();
        assert!(r.codecs.is_empty());
        assert_eq!(r.payload_types, vec![111, 18, 101]);
        assert!(matches!(negotiate(&r, BOTH), Err(SdpError::NoCommonCodec)));
    }

    #[test]
    fn pcma_preferred_before_pcmu() {
        let r = parse_lf(PCMA_FIRST).unwrap();
        assert_eq!(r.codecs, vec![(8, Codec::Pcma), (0, Codec::Pcmu)]);
        let n = negotiate(&r, &[Codec::Pcmu, Codec::Pcma]).unwrap();
        assert_eq!((n.codec, n.payload_type), (Codec::Pcma, 8));
    }

    #[test]
    fn rfc2543_c0_hold() {
        let r = parse_lf(C0_HOLD).unwrap();
        assert_eq!(r.addr, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 5008));
        assert_eq!(r.direction, Direction::SendOnly);
        assert_eq!(negotiate(&r, BOTH).unwrap().direction, Direction::RecvOnly);
        // c=0.0.0.0 together with a=recvonly: nobody sends.
        let inactive = parse_lf(&C0_HOLD.replace("t=0 0\n", "t=0 0\na=recvonly\n")).unwrap();
        assert_eq!(inactive.direction, Direction::Inactive);
        assert_eq!(inactive.direction.answer(), Direction::Inactive);
    }

    #[test]
    fn dynamic_pt_pcmu() {
        let r = parse_lf(DYNAMIC_PCMU).unwrap();
        assert_eq!(r.codecs, vec![(112, Codec::Pcmu)]);
        assert_eq!(r.telephone_event, Some(126));
        let n = negotiate(&r, BOTH).unwrap();
        assert_eq!(
            (n.codec, n.payload_type, n.telephone_event),
            (Codec::Pcmu, 112, Some(126))
        );
        let answer = build_answer("198.51.100.1:30000".parse().unwrap(), 1, 1, &n);
        assert!(
            answer.contains("m=audio 30000 RTP/AVP 112 126\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:112 PCMU/8000\r\n"));
        assert!(answer.contains("a=fmtp:126 0-16\r\n"));
    }

    #[test]
    fn static_pt_remapped_by_rtpmap_is_not_g711() {
        let sdp = "v=0\no=- 1 1 IN IP4 203.0.113.5\ns=-\nc=IN IP4 203.0.113.5\nt=0 0\n\
                   m=audio 5000 RTP/AVP 0 8 97\na=rtpmap:0 G729/8000\na=rtpmap:8 PCMA/16000\n\
                   a=rtpmap:97 PCMA/8000/2\n";
        let r = parse_lf(sdp).unwrap();
        assert!(r.codecs.is_empty(), "{:?}", r.codecs);
    }

    #[test]
    fn ipv6_loopback() {
        let r = parse_lf(IPV6_LOOPBACK).unwrap();
        assert_eq!(
            r.addr,
            "[::1]:5012".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(r.codecs, vec![(0, Codec::Pcmu), (8, Codec::Pcma)]);
        assert_eq!(r.telephone_event, Some(101));
        let n = negotiate(&r, BOTH).unwrap();
        let local: SocketAddr = "[::1]:31000".parse().unwrap();
        let answer = build_answer(local, 5, 6, &n);
        assert!(answer.contains("o=ivr311 5 6 IN IP6 ::1\r\n"), "{answer}");
        assert!(answer.contains("c=IN IP6 ::1\r\n"), "{answer}");
        assert_eq!(parse(answer.as_bytes()).unwrap().addr, local);
    }

    #[test]
    fn media_level_overrides_and_disabled_stream_skipped() {
        let r = parse_lf(OVERRIDES).unwrap();
        assert_eq!(
            r.addr,
            "198.51.100.9:5014".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(r.direction, Direction::RecvOnly);
        assert_eq!(r.ptime, Some(30));
        let n = negotiate(&r, BOTH).unwrap();
        assert_eq!(n.direction, Direction::SendOnly);
        // The answer keeps the disabled stream in place, rejected.
        let offer = crlf(OVERRIDES);
        let answer = build_answer_for_offer(
            offer.as_bytes(),
            "198.51.100.1:30000".parse().unwrap(),
            1,
            1,
            &n,
        )
        .unwrap();
        let m_lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            m_lines,
            vec!["m=audio 0 RTP/AVP 0", "m=audio 30000 RTP/AVP 0"]
        );
        // Session-level direction applies when the media has none.
        let sess = parse_lf(&OVERRIDES.replace("a=recvonly\n", "")).unwrap();
        assert_eq!(sess.direction, Direction::SendOnly);
    }

    #[test]
    fn only_disabled_audio_is_no_audio() {
        assert!(matches!(
            parse_lf(ONLY_DISABLED_AUDIO),
            Err(SdpError::NoAudio)
        ));
    }

    #[test]
    fn savp_with_avp_alternative_uses_avp() {
        let offer = crlf(SAVP_WITH_AVP_ALTERNATIVE);
        let r = parse(offer.as_bytes()).unwrap();
        assert_eq!(r.addr.port(), 5020);
        let n = negotiate(&r, BOTH).unwrap();
        let answer = build_answer_for_offer(
            offer.as_bytes(),
            "198.51.100.1:30000".parse().unwrap(),
            1,
            1,
            &n,
        )
        .unwrap();
        let m_lines: Vec<&str> = answer.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            m_lines,
            vec!["m=audio 0 RTP/SAVP 0 101", "m=audio 30000 RTP/AVP 0 101"]
        );
    }

    #[test]
    fn avpf_accepted_and_echoed() {
        let offer = crlf(AVPF);
        let r = parse(offer.as_bytes()).unwrap();
        assert_eq!(r.codecs, vec![(0, Codec::Pcmu), (8, Codec::Pcma)]);
        let n = negotiate(&r, BOTH).unwrap();
        let local = "198.51.100.1:30000".parse().unwrap();
        let answer = build_answer_for_offer(offer.as_bytes(), local, 1, 1, &n).unwrap();
        assert!(answer.contains("m=audio 30000 RTP/AVPF 0\r\n"), "{answer}");
        // The plain builder always says RTP/AVP.
        assert!(build_answer(local, 1, 1, &n).contains("m=audio 30000 RTP/AVP 0\r\n"));
    }

    #[test]
    fn other_profile_rejected() {
        let sdp = SIPP_UAC.replace("RTP/AVP", "TCP/RTP/AVP");
        assert!(
            matches!(parse_lf(&sdp), Err(SdpError::UnsupportedProfile(p)) if p == "TCP/RTP/AVP")
        );
    }

    #[test]
    fn round_trip_answer() {
        let offer = parse_lf(BARESIP_OFFER).unwrap();
        let n = negotiate(&offer, BOTH).unwrap();
        let local: SocketAddr = "198.51.100.1:30000".parse().unwrap();
        let answer = build_answer(local, 4242, 1, &n);
        assert!(answer.starts_with("v=0\r\n"), "{answer}");
        assert!(answer.contains("o=ivr311 4242 1 IN IP4 198.51.100.1\r\n"));
        assert!(answer.contains("c=IN IP4 198.51.100.1\r\n"));
        assert!(answer.contains("t=0 0\r\n"));
        assert!(
            answer.contains("m=audio 30000 RTP/AVP 0 101\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:0 PCMU/8000\r\n"));
        assert!(answer.contains("a=rtpmap:101 telephone-event/8000\r\n"));
        assert!(answer.contains("a=fmtp:101 0-16\r\n"));
        assert!(answer.contains("a=ptime:20\r\n"));
        assert!(answer.contains("a=sendrecv\r\n"));
        assert!(answer.ends_with("\r\n"));
        assert!(!answer.replace("\r\n", "").contains('\n'));

        let back = parse(answer.as_bytes()).unwrap();
        assert_eq!(back.addr, local);
        assert_eq!(back.codecs, vec![(0, Codec::Pcmu)]);
        assert_eq!(back.telephone_event, Some(101));
        assert_eq!(back.direction, Direction::SendRecv);
        assert_eq!(back.ptime, Some(20));
        assert_eq!((back.session_id, back.session_version), (4242, 1));
        // Parsing our answer as the offerer would and negotiating yields the same result.
        assert_eq!(negotiate(&back, BOTH).unwrap(), n);
    }

    #[test]
    fn round_trip_answer_directions() {
        let local: SocketAddr = "198.51.100.1:30000".parse().unwrap();
        for dir in [
            Direction::SendRecv,
            Direction::SendOnly,
            Direction::RecvOnly,
            Direction::Inactive,
        ] {
            let n = Negotiated {
                codec: Codec::Pcma,
                payload_type: 8,
                telephone_event: None,
                direction: dir,
            };
            let answer = build_answer(local, 1, 1, &n);
            assert!(answer.contains("m=audio 30000 RTP/AVP 8\r\n"), "{answer}");
            assert!(!answer.contains("telephone-event"));
            let back = parse(answer.as_bytes()).unwrap();
            assert_eq!(back.direction, dir);
            assert_eq!(back.codecs, vec![(8, Codec::Pcma)]);
        }
    }

    #[test]
    fn build_offer_round_trip() {
        let local: SocketAddr = "203.0.113.20:40000".parse().unwrap();
        let offer = build_offer(
            local,
            99,
            3,
            &[Codec::Pcma, Codec::Pcmu, Codec::Pcma],
            Some(DEFAULT_TELEPHONE_EVENT_PT),
            Direction::SendOnly,
        );
        assert!(
            offer.contains("m=audio 40000 RTP/AVP 8 0 101\r\n"),
            "{offer}"
        );
        assert!(offer.contains("a=sendonly\r\n"));
        let r = parse(offer.as_bytes()).unwrap();
        assert_eq!(r.addr, local);
        assert_eq!(r.codecs, vec![(8, Codec::Pcma), (0, Codec::Pcmu)]);
        assert_eq!(r.telephone_event, Some(101));
        assert_eq!(r.direction, Direction::SendOnly);
        assert_eq!((r.session_id, r.session_version), (99, 3));

        // Empty codec list still yields a valid m= line; a clashing te PT is dropped.
        let offer = build_offer(local, 1, 1, &[], Some(0), Direction::SendRecv);
        assert!(offer.contains("m=audio 40000 RTP/AVP 0\r\n"), "{offer}");
        assert!(!offer.contains("telephone-event"));
    }

    #[test]
    fn ipv4_mapped_local_written_as_ip4() {
        let local: SocketAddr = "[::ffff:198.51.100.1]:30000".parse().unwrap();
        let offer = build_offer(local, 1, 1, &[Codec::Pcmu], None, Direction::SendRecv);
        assert!(offer.contains("c=IN IP4 198.51.100.1\r\n"), "{offer}");
    }

    #[test]
    fn bare_lf_and_missing_trailing_newline() {
        // Literal with LF only, as some phones send.
        let r = parse(PCMA_FIRST.as_bytes()).unwrap();
        assert_eq!(r.codecs[0], (8, Codec::Pcma));
        let r = parse(PCMA_FIRST.trim_end().as_bytes()).unwrap();
        assert_eq!(r.ptime, Some(20));
        let r = parse(crlf(SIPP_UAC).trim_end().as_bytes()).unwrap();
        assert_eq!(r.codecs, vec![(0, Codec::Pcmu)]);
        // Bare CR, blank lines, trailing junk whitespace/NULs, BOM, indentation.
        let cr = SIPP_UAC.replace('\n', "\r");
        assert!(parse(cr.as_bytes()).is_ok());
        let messy = format!(
            "\u{feff}{}\r\n\r\n  \0\0",
            crlf(SIPP_UAC).replace("a=", "  a=")
        );
        assert_eq!(
            parse(messy.as_bytes()).unwrap().codecs,
            vec![(0, Codec::Pcmu)]
        );
    }

    #[test]
    fn non_utf8_session_name() {
        let mut bytes = crlf(SIPP_UAC).into_bytes();
        let at = bytes.windows(3).position(|w| w == b"s=-").unwrap();
        bytes.splice(at + 2..at + 3, [b'C', b'a', b'f', 0xe9]); // Latin-1 "Café"
        assert!(parse(&bytes).is_ok());
    }

    #[test]
    fn oversized_origin_numbers_are_hashed() {
        let sdp = SIPP_UAC.replace(
            "o=user1 53655765 2353687637",
            "o=user1 123456789012345678901234567890 98765432109876543210987",
        );
        let a = parse_lf(&sdp).unwrap();
        let b =
            parse_lf(&sdp.replace("98765432109876543210987", "98765432109876543210988")).unwrap();
        assert_eq!(a.session_id, b.session_id);
        assert_ne!(a.session_version, b.session_version);
    }

    #[test]
    fn session_lines_out_of_order_or_missing_t() {
        // c= after t=, b= before c=, session a= before t=, u= that is not a URL.
        let sdp = "v=0\no=- 1 1 IN IP4 203.0.113.5\ns=-\nu=see website\nb=AS:84\na=sendonly\n\
                   t=0 0\nc=IN IP4 203.0.113.5\nm=audio 5000 RTP/AVP 8\n";
        let r = parse_lf(sdp).unwrap();
        assert_eq!(
            r.addr,
            "203.0.113.5:5000".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(r.direction, Direction::SendOnly);
        let no_t = SIPP_UAC.replace("t=0 0\n", "");
        assert_eq!(parse_lf(&no_t).unwrap().addr.port(), 6000);
    }

    #[test]
    fn connection_address_variants() {
        let ttl = SIPP_UAC.replace("c=IN IP4 127.0.0.1", "c=IN IP4 127.0.0.1/127");
        assert_eq!(
            parse_lf(&ttl).unwrap().addr,
            "127.0.0.1:6000".parse::<std::net::SocketAddr>().unwrap()
        );
        let host = SIPP_UAC.replace("c=IN IP4 127.0.0.1", "c=IN IP4 pbx.example.org");
        assert!(
            matches!(parse_lf(&host), Err(SdpError::BadConnectionAddress(a)) if a == "pbx.example.org")
        );
        let none = SIPP_UAC.replace("c=IN IP4 127.0.0.1\n", "");
        assert!(matches!(
            parse_lf(&none),
            Err(SdpError::NoConnectionAddress)
        ));
        let bare = SIPP_UAC.replace("c=IN IP4 127.0.0.1", "c=IN IP4");
        assert!(matches!(
            parse_lf(&bare),
            Err(SdpError::NoConnectionAddress)
        ));
    }

    #[test]
    fn errors() {
        assert!(matches!(parse(b""), Err(SdpError::Empty)));
        assert!(matches!(parse(b" \r\n\r\n"), Err(SdpError::Empty)));
        assert!(matches!(parse(b"hello world"), Err(SdpError::Parse(_))));
        assert!(matches!(
            parse(&vec![b'a'; MAX_SDP_LEN + 1]),
            Err(SdpError::TooLarge(_))
        ));
        let no_media = "v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\n";
        assert!(matches!(parse_lf(no_media), Err(SdpError::NoAudio)));
        let image = format!("{no_media}m=image 5000 udptl t38\n");
        assert!(matches!(parse_lf(&image), Err(SdpError::NoAudio)));
    }

    #[test]
    fn ptime_forms() {
        assert_eq!(parse_ptime("20"), Some(20));
        assert_eq!(parse_ptime(" 30 "), Some(30));
        assert_eq!(parse_ptime("20.0"), Some(20));
        assert_eq!(parse_ptime("x"), None);
        assert_eq!(parse_ptime("-5"), None);
    }

    #[test]
    fn direction_answer() {
        assert_eq!(Direction::SendRecv.answer(), Direction::SendRecv);
        assert_eq!(Direction::SendOnly.answer(), Direction::RecvOnly);
        assert_eq!(Direction::RecvOnly.answer(), Direction::SendOnly);
        assert_eq!(Direction::Inactive.answer(), Direction::Inactive);
        assert_eq!(Direction::RecvOnly.to_string(), "recvonly");
        let upper = SIPP_UAC.replace(
            "a=rtpmap:0 PCMU/8000\n",
            "a=rtpmap:0 PCMU/8000\na=SendOnly\n",
        );
        assert_eq!(parse_lf(&upper).unwrap().direction, Direction::SendOnly);
    }

    #[test]
    fn telephone_event_colliding_with_codec_pt_is_dropped() {
        let n = Negotiated {
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event: Some(0),
            direction: Direction::SendRecv,
        };
        let answer = build_answer("198.51.100.1:30000".parse().unwrap(), 1, 1, &n);
        assert!(answer.contains("m=audio 30000 RTP/AVP 0\r\n"), "{answer}");
        assert!(!answer.contains("telephone-event"));
    }

    /// Cheap deterministic fuzzing: mutate real offers and check nothing panics.
    #[test]
    fn mutated_inputs_do_not_panic() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"=: /\r\n0123456789amcvotsbk-*.\xff\x00";
        for (_, base) in fixture_pairs() {
            let base = crlf(base).into_bytes();
            for _ in 0..300 {
                let mut bytes = base.clone();
                for _ in 0..(next() % 6 + 1) {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = (next() as usize) % bytes.len();
                    match next() % 4 {
                        0 => bytes[at] = alphabet[(next() as usize) % alphabet.len()],
                        1 => {
                            bytes.remove(at);
                        }
                        2 => bytes.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                        _ => bytes.truncate(at),
                    }
                }
                if let Ok(r) = parse(&bytes) {
                    let _ = negotiate(&r, BOTH).map(|n| {
                        build_answer_for_offer(&bytes, r.addr, 1, 1, &n)
                            .expect("answer for a parsed offer")
                    });
                }
            }
        }
    }

    /// The SDP bodies of RFC 5118 §4.6, §4.8 and §4.9 (tests/torture), as the RFC prints them.
    fn rfc5118_body(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/torture")
            .join(format!("{name}.dat"));
        let bytes = std::fs::read(path).unwrap();
        let at = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        bytes[at + 4..].to_vec()
    }

    #[test]
    fn rfc5118_ipv6_sdp_bodies() {
        let r = parse(&rfc5118_body("ipv6-in-sdp")).unwrap();
        assert_eq!(
            r.addr,
            "[2001:db8::20]:6000"
                .parse::<std::net::SocketAddr>()
                .unwrap()
        );
        // Per-media c= lines: the audio one (IPv4) is ours, the IPv6 one is the video's.
        let r = parse(&rfc5118_body("mult-ip-in-sdp")).unwrap();
        assert_eq!(
            r.addr,
            "192.0.2.1:22334".parse::<std::net::SocketAddr>().unwrap()
        );
        // An IPv4-mapped address is the IPv4 host.
        let r = parse(&rfc5118_body("ipv4-mapped-ipv6")).unwrap();
        assert_eq!(
            r.addr,
            "192.0.2.2:6000".parse::<std::net::SocketAddr>().unwrap()
        );
    }
}

#[cfg(test)]
mod webrtc_tests {
    use super::*;

    /// Chromium's offer as JsSIP sends it (ICE gathered, host candidates behind mDNS names,
    /// `c=0.0.0.0`), trimmed of its Opus-only lines.
    const CHROME_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=extmap-allow-mixed\r\n\
a=msid-semantic: WMS 7a7c2f0e\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=candidate:1467250027 1 udp 2122260223 4a1b6f0e-7c5d-4c3e-9d6a-1c2b3d4e5f60.local 56143 typ host generation 0 network-id 1\r\n\
a=ice-ufrag:Qx9/\r\n\
a=ice-pwd:4rXk2m+LpQ1uVz8sYt3wN0aB\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
a=sendrecv\r\n\
a=msid:7a7c2f0e 3c1d\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=rtcp-fb:111 transport-cc\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=rtpmap:63 red/48000/2\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:13 CN/8000\r\n\
a=rtpmap:110 telephone-event/48000\r\n\
a=rtpmap:126 telephone-event/8000\r\n\
a=ssrc:3735928559 cname:abcdEFGHijklMNOP\r\n";

    fn ours() -> WebRtcLocal {
        WebRtcLocal {
            ice_ufrag: "ufrg".to_owned(),
            ice_pwd: "0123456789abcdefghijklmn".to_owned(),
            fingerprint: Fingerprint {
                algorithm: "sha-256".to_owned(),
                value: (0..32).collect(),
            },
            setup: Setup::ActPass,
            ssrc: 1234,
        }
    }

    #[test]
    fn a_chromium_offer_is_webrtc_with_its_ice_dtls_and_g711() {
        let Remote::WebRtc(media, sec) = parse_any(CHROME_OFFER.as_bytes()).unwrap() else {
            panic!("WebRTC")
        };
        assert_eq!(sec.ice_ufrag, "Qx9/");
        assert_eq!(sec.ice_pwd, "4rXk2m+LpQ1uVz8sYt3wN0aB");
        assert_eq!(sec.setup, Setup::ActPass);
        assert_eq!(sec.mid.as_deref(), Some("0"));
        assert_eq!(sec.fingerprint.algorithm, "sha-256");
        assert_eq!(sec.fingerprint.value.len(), 32);
        assert_eq!(sec.fingerprint.value[0], 0x7b);
        // Not hold, whatever c= says; PCMU first of the G.711 formats, events at 8 kHz.
        assert_eq!(media.direction, Direction::SendRecv);
        assert_eq!(media.codecs, vec![(0, Codec::Pcmu), (8, Codec::Pcma)]);
        assert_eq!(media.telephone_event, Some(126));
        let neg = negotiate(&media, &[Codec::Pcmu, Codec::Pcma]).unwrap();
        // The plain parser still refuses it: a phone leg cannot take WebRTC media.
        assert!(matches!(
            parse(CHROME_OFFER.as_bytes()),
            Err(SdpError::Encrypted(_))
        ));
        // Our answer: its mid, BUNDLE, ICE-lite, our credentials and role, one host candidate.
        let mut w = ours();
        w.setup = Setup::Passive;
        let answer = build_webrtc_answer(
            CHROME_OFFER.as_bytes(),
            "198.51.100.1:30000".parse().unwrap(),
            7,
            1,
            &neg,
            &w,
        )
        .unwrap();
        for line in [
            "a=ice-lite",
            "a=group:BUNDLE 0",
            "m=audio 30000 UDP/TLS/RTP/SAVPF 0 126",
            "a=mid:0",
            "a=ice-ufrag:ufrg",
            "a=setup:passive",
            "a=rtcp-mux",
            "a=candidate:1 1 udp 2130706431 198.51.100.1 30000 typ host",
            "a=ssrc:1234 cname:ivr311",
        ] {
            assert!(
                answer.contains(&format!("{line}\r\n")),
                "{line} in\n{answer}"
            );
        }
        let Remote::WebRtc(back, sec) = parse_any(answer.as_bytes()).unwrap() else {
            panic!("our answer reads back as WebRTC")
        };
        assert_eq!(back.codecs, vec![(0, Codec::Pcmu)]);
        assert_eq!(sec.fingerprint, w.fingerprint);
        assert_eq!(
            back.addr,
            "198.51.100.1:30000"
                .parse::<std::net::SocketAddr>()
                .unwrap()
        );
    }

    #[test]
    fn our_offer_reads_back_and_without_ice_or_rtcp_mux_webrtc_is_refused() {
        let offer = build_webrtc_offer(
            "203.0.113.5:40000".parse().unwrap(),
            1,
            1,
            &[Codec::Pcma, Codec::Pcmu],
            Some(101),
            Direction::SendRecv,
            &ours(),
        );
        assert!(
            offer.contains("m=audio 40000 UDP/TLS/RTP/SAVPF 8 0 101\r\n"),
            "{offer}"
        );
        assert!(offer.contains("a=setup:actpass\r\n"));
        let Remote::WebRtc(m, sec) = parse_any(offer.as_bytes()).unwrap() else {
            panic!("WebRTC")
        };
        assert_eq!(m.telephone_event, Some(101));
        assert_eq!(sec.setup, Setup::ActPass);
        for (drop, missing) in [
            ("a=ice-ufrag:", "ice-ufrag"),
            ("a=ice-pwd:", "ice-pwd"),
            ("a=fingerprint:", "fingerprint"),
            ("a=rtcp-mux", "rtcp-mux"),
        ] {
            let cut: String = offer
                .split_inclusive("\r\n")
                .filter(|l| !l.starts_with(drop))
                .collect();
            assert!(
                matches!(parse_any(cut.as_bytes()), Err(SdpError::WebRtc(m)) if m == missing),
                "{missing}"
            );
        }
        // DTLS-SRTP without ICE (baresip's) stays "encrypted, unsupported".
        let baresip = "v=0\r\no=- 1 1 IN IP4 192.0.2.2\r\ns=-\r\nc=IN IP4 192.0.2.2\r\nt=0 0\r\na=setup:actpass\r\na=fingerprint:SHA-256 C7:C3:1F:07:D0:4A:4B:ED:A3:45:56:80:00:2A:F7:74:DD:33:83:BD:7B:D1:4F:B2:1A:0D:AE:DB:D6:F4:01:32\r\nm=audio 27674 UDP/TLS/RTP/SAVPF 0\r\n";
        assert!(matches!(
            parse_any(baresip.as_bytes()),
            Err(SdpError::WebRtc("ice-ufrag"))
        ));
        // A plain offer is plain.
        let plain = "v=0\r\no=- 1 1 IN IP4 192.0.2.2\r\ns=-\r\nc=IN IP4 192.0.2.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert!(matches!(parse_any(plain.as_bytes()), Ok(Remote::Plain(_))));
    }

    #[test]
    fn fingerprints_round_trip_and_bad_ones_are_refused() {
        let f =
            Fingerprint::parse("SHA-256 0A:ff:10:20:30:40:50:60:70:80:90:A0:B0:C0:D0:E0").unwrap();
        assert_eq!(f.algorithm, "sha-256");
        assert_eq!(Fingerprint::parse(&f.to_sdp()).unwrap(), f);
        for bad in [
            "sha-256",
            "sha-256 0A:FF",
            "sha-256 0A:GG:10:20:30:40:50:60:70:80:90:A0:B0:C0:D0:E0",
            "sha-256 0AFF10",
        ] {
            assert!(Fingerprint::parse(bad).is_none(), "{bad}");
        }
    }
}
