//! What every leg the server places has in common (the 911 trunk, an operator's phone, a
//! called-back caller): its id, our SDP on it and how we answer its re-offers, the request
//! that places it and what the driver reports back, and how the caller is bridged to it.
//!
//! Sans-IO: no handle, no socket. The driver ([`super::driver`]) turns a [`PlaceLeg`] into an
//! RTP port and an INVITE, and a [`BridgeTo`] into the media clock's bridge on that port.

use crate::media::g711::Codec;
use crate::media::rtp::LatchScope;
use crate::media::sdp;
use crate::sip::message::{sanitize_quoted, Method};
use std::net::{IpAddr, SocketAddr};
use tracing::{info, warn, Span};

/// A leg's id, unique on the server (the driver keys the leg's dialog, port and events on
/// it; events of a leg the call has let go of are not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LegId(pub(crate) u64);

impl std::fmt::Display for LegId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "leg-{}", self.0)
    }
}

/// A leg's media as agreed: the codec and where its media goes.
pub(crate) type Media = (sdp::Negotiated, SocketAddr);

/// Our side of an outbound leg's SDP: where the leg's media is, and the `o=` line's session
/// id and version, which every later SDP of ours on the leg must carry (RFC 3264 §8: the same
/// id, the version one more than the last).
///
/// A leg to a browser (an agent registered over a WebSocket) is WebRTC: our SDP carries the
/// leg's ICE credentials, DTLS fingerprint and role ([`sdp::WebRtcLocal`]), and only a WebRTC
/// answer or re-offer is taken on it (a plain RTP one is refused, as WebRTC is on a phone's).
#[derive(Debug, Clone)]
pub(crate) struct LegSdp {
    pub(crate) local: SocketAddr,
    id: u64,
    version: u64,
    /// Our 2xx to a re-INVITE without SDP carried our offer: the ACK brings the answer.
    answer_in_ack: bool,
    /// A browser's leg: what our SDP says of its ICE and DTLS (the role as settled by the
    /// browser's answer).
    webrtc: Option<sdp::WebRtcLocal>,
}

/// What to reply to a re-INVITE or UPDATE on an outbound leg (the far phone put the call on
/// hold or took it off, moved its media, or refreshed the session), and the leg's media after.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LegReoffer {
    /// An UPDATE without an offer (a session refresh, RFC 4028): 200 with no body, since a
    /// 2xx to UPDATE may only carry an answer (RFC 3311 §5.2).
    Refresh,
    /// A re-INVITE without an offer: 200 with our SDP for the media as it is (RFC 3261
    /// §14.2); the ACK's answer leaves it as it is.
    OfferOurs(String),
    /// An offer we can take: 200 with this answer; the leg's media is now `neg` at `addr`.
    Answer {
        sdp: String,
        neg: sdp::Negotiated,
        addr: SocketAddr,
    },
    /// An offer we cannot take: 488, and the leg keeps its media (RFC 3261 §14.2).
    Refused(String),
}

impl LegReoffer {
    /// The final response to send: its code and body (logging a refusal).
    pub(crate) fn response(&self) -> (u16, Option<(String, bytes::Bytes)>) {
        let sdp = |s: &String| Some(("application/sdp".to_owned(), bytes::Bytes::from(s.clone())));
        match self {
            LegReoffer::Refresh => (200, None),
            LegReoffer::OfferOurs(s) => (200, sdp(s)),
            LegReoffer::Answer { sdp: s, neg, .. } => {
                info!(direction = ?neg.direction, codec = ?neg.codec, "leg media renegotiated");
                (200, sdp(s))
            }
            LegReoffer::Refused(e) => {
                warn!(error = %e, "leg re-offer refused; 488 and the call goes on");
                (488, None)
            }
        }
    }
}

impl LegSdp {
    /// A new leg with its media at `local`.
    pub(crate) fn new(local: SocketAddr) -> Self {
        LegSdp {
            local,
            id: rand::random::<u32>() as u64,
            version: 1,
            answer_in_ack: false,
            webrtc: None,
        }
    }

    /// A new leg to a browser with its media at `local`, ICE and DTLS as `webrtc` says.
    pub(crate) fn new_webrtc(local: SocketAddr, webrtc: sdp::WebRtcLocal) -> Self {
        LegSdp {
            webrtc: Some(webrtc),
            ..LegSdp::new(local)
        }
    }

    /// The far end's answer to our offer (or the answer in an ACK): the codec agreed and where
    /// its media is. A browser's leg takes only WebRTC, a phone's only plain RTP; a browser's
    /// answer also settles the DTLS role our later SDP states.
    pub(crate) fn answer(&mut self, body: &[u8]) -> Result<Media, sdp::SdpError> {
        let Some(ours) = &mut self.webrtc else {
            return leg_answer(body);
        };
        match sdp::parse_any(body)? {
            sdp::Remote::WebRtc(a, theirs) => {
                ours.setup = match theirs.setup {
                    sdp::Setup::Passive => sdp::Setup::Active,
                    _ => sdp::Setup::Passive,
                };
                Ok((sdp::negotiate(&a, &super::SUPPORTED_CODECS)?, a.addr))
            }
            sdp::Remote::Plain(_) => Err(sdp::SdpError::WebRtc("fingerprint")),
        }
    }

    fn build_offer(&self, codecs: &[Codec], direction: sdp::Direction) -> String {
        match &self.webrtc {
            Some(w) => sdp::build_webrtc_offer(
                self.local,
                self.id,
                self.version,
                codecs,
                Some(101),
                direction,
                w,
            ),
            None => sdp::build_offer(
                self.local,
                self.id,
                self.version,
                codecs,
                Some(101),
                direction,
            ),
        }
    }

    /// The leg's INVITE offer: the caller's codec first (so the bridge need not transcode
    /// when the far end takes it), the other G.711 law second, and RFC 4733 events at 101.
    pub(crate) fn offer(&self, caller_codec: Codec) -> String {
        let other = if caller_codec == Codec::Pcmu {
            Codec::Pcma
        } else {
            Codec::Pcmu
        };
        self.build_offer(&[caller_codec, other], sdp::Direction::SendRecv)
    }

    /// Read a re-INVITE or UPDATE (`method`, `body`) on the leg, whose media is `current`.
    pub(crate) fn reoffer(
        &mut self,
        method: &Method,
        body: &[u8],
        current: &sdp::Negotiated,
    ) -> LegReoffer {
        if body.is_empty() {
            if *method == Method::Invite {
                self.version += 1;
                self.answer_in_ack = true;
                if self.webrtc.is_some() {
                    return LegReoffer::OfferOurs(
                        self.build_offer(&[current.codec], current.direction),
                    );
                }
                return LegReoffer::OfferOurs(sdp::build_answer(
                    self.local,
                    self.id,
                    self.version,
                    current,
                ));
            }
            return LegReoffer::Refresh;
        }
        let parsed = match &self.webrtc {
            None => sdp::parse(body).and_then(|offer| {
                let neg = sdp::negotiate(&offer, &super::SUPPORTED_CODECS)?;
                let answer =
                    sdp::build_answer_for_offer(body, self.local, self.id, self.version + 1, &neg)?;
                Ok((answer, neg, offer.addr))
            }),
            // A browser's re-offer (hold, resume) keeps the transport: same ICE, same DTLS.
            Some(ours) => sdp::parse_any(body).and_then(|offer| match offer {
                sdp::Remote::WebRtc(offer, _) => {
                    let neg = sdp::negotiate(&offer, &super::SUPPORTED_CODECS)?;
                    let answer = sdp::build_webrtc_answer(
                        body,
                        self.local,
                        self.id,
                        self.version + 1,
                        &neg,
                        ours,
                    )?;
                    Ok((answer, neg, offer.addr))
                }
                sdp::Remote::Plain(_) => Err(sdp::SdpError::WebRtc("fingerprint")),
            }),
        };
        match parsed {
            Ok((sdp, neg, addr)) => {
                self.version += 1;
                LegReoffer::Answer { sdp, neg, addr }
            }
            Err(e) => LegReoffer::Refused(e.to_string()),
        }
    }
}

impl LegSdp {
    /// The ACK for our 2xx arrived with `body` ([`DialogEvent::Confirmed`](crate::sip::ua::DialogEvent::Confirmed)). When that 2xx
    /// carried our offer (a re-INVITE without SDP: [`LegReoffer::OfferOurs`]) the body is the
    /// answer, and the leg's media from now on (RFC 3264 §5: it may move or hold the call):
    /// `answered` takes it if the leg has answered. No answer due, or none in the ACK, or an
    /// unusable one: the media stays as it was.
    pub(crate) fn ack(&mut self, body: &[u8], answered: &mut Option<Media>) {
        if !std::mem::take(&mut self.answer_in_ack) || body.is_empty() {
            return;
        }
        match self.answer(body) {
            Ok(media) if answered.is_some() => {
                info!(codec = ?media.0.codec, direction = ?media.0.direction, remote_media = %media.1, "the leg's ACK answered our offer");
                *answered = Some(media);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "unusable answer in the leg's ACK; its media stays as it was")
            }
        }
    }
}

/// The far end's answer to an offer of ours (a leg's INVITE, our 2xx to a delayed offer): the
/// codec agreed among those we support, and where the far end's media goes.
pub(crate) fn leg_answer(body: &[u8]) -> Result<Media, sdp::SdpError> {
    let a = sdp::parse(body)?;
    Ok((sdp::negotiate(&a, &super::SUPPORTED_CODECS)?, a.addr))
}

/// `P-Asserted-Identity: <sip:NUMBER@HOST>` with the number as the trunk gave it.
pub(crate) fn asserted_identity(number: &str, host: IpAddr) -> (String, String) {
    (
        "P-Asserted-Identity".to_owned(),
        format!("<sip:{}@{host}>", sanitize_quoted(number)),
    )
}

/// Where a leg is placed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Dial {
    /// The phone an agent registered (its contact, along the flow it registered over).
    Agent(String),
    /// A `sip:` URI: at `at` when its name was looked up already; else its name is looked up
    /// now and the INVITE goes to the `pick`th address (counted round), which [`Placed`]
    /// reports with the others.
    Uri {
        uri: String,
        at: Option<SocketAddr>,
        pick: usize,
    },
}

/// Place an outbound leg: an RTP port, our SDP offer on it (the caller's codec first, the
/// other G.711 law second, RFC 4733 events at 101), and an INVITE.
#[derive(Debug)]
pub(crate) struct PlaceLeg {
    pub(crate) leg: LegId,
    pub(crate) to: Dial,
    /// From's user part and display name.
    pub(crate) from_user: String,
    pub(crate) from_display: &'static str,
    /// `P-Asserted-Identity` with this number, first of the headers (its host is our media
    /// address on the leg).
    pub(crate) asserted: Option<String>,
    /// The other headers (`X-311-*`).
    pub(crate) headers: Vec<(String, String)>,
    /// The caller's codec, offered first.
    pub(crate) codec: Codec,
    /// Our address as the caller's media uses it: the leg's media address, unless the far end
    /// is of the other family (see `driver::leg_media_ip`).
    pub(crate) local_ip: IpAddr,
    /// What the leg logs in.
    pub(crate) span: Span,
}

/// The INVITE of a [`PlaceLeg`] is out.
#[derive(Debug)]
pub(crate) struct Placed {
    /// Our SDP on the leg (its offer went in the INVITE).
    pub(crate) sdp: LegSdp,
    /// Where the INVITE went: the address an agent's phone registered from, or the address a
    /// URI's name was looked up to (the far end's media may come from there).
    pub(crate) toward: Option<IpAddr>,
    /// A name looked up for [`Dial::Uri`]: all its addresses, or why it did not resolve (the
    /// INVITE then fails with 503 as its first event).
    pub(crate) looked_up: Option<Result<Vec<SocketAddr>, String>>,
}

/// Why a [`PlaceLeg`] sent no INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotPlaced {
    /// The agent has no registered phone (logged out meanwhile).
    #[error("the operator has no registered phone")]
    NoPhone,
    /// The RTP port pool is empty.
    #[error("no RTP port free")]
    NoPort,
}

/// How a leg is let go of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegEnd {
    /// It is over already (failed): forget it.
    Forget,
    /// It is over on the far end's side (a BYE): end its dialog in the UA and forget it.
    Release,
    /// CANCEL it (ringing) or BYE it (answered), then forget it.
    HangUp,
    /// Hang it up and end its dialog in the UA (BYE or CANCEL, whatever it needs).
    HangUpAndRelease,
}

/// Bridge the caller to a leg: the media clock relays RTP both ways between the caller's port
/// and the leg's (see `driver::leg_bridge` for how each kind is relayed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BridgeTo {
    pub(crate) leg: LegId,
    pub(crate) media: Media,
    /// Where the leg's packets may come from.
    pub(crate) scope: LatchScope,
    /// The leg answered (else this is its early media: our player fills its silences).
    pub(crate) answered: bool,
    /// An operator's phone (watched for silence), not a trunk.
    pub(crate) operator: bool,
    /// The talk is recorded (an operator of a queue with `record: true`).
    pub(crate) record: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leg_offer_puts_the_callers_codec_first() {
        let o = LegSdp::new("127.0.0.1:40000".parse().unwrap()).offer(Codec::Pcma);
        let m = o.lines().find(|l| l.starts_with("m=audio")).unwrap();
        assert_eq!(m, "m=audio 40000 RTP/AVP 8 0 101");
    }

    fn origin(sdp: &str) -> (String, u64) {
        let o: Vec<&str> = sdp
            .lines()
            .find(|l| l.starts_with("o="))
            .unwrap()
            .split(' ')
            .collect();
        (o[1].to_owned(), o[2].parse().unwrap())
    }

    #[test]
    fn a_leg_answers_hold_refresh_and_garbage_as_rfc_3264_and_3311_say() {
        let mut leg = LegSdp::new("127.0.0.1:40000".parse().unwrap());
        let first = origin(&leg.offer(Codec::Pcmu));
        let (current, _) = leg_answer(b"v=0\r\no=- 1 1 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n").unwrap();
        // An UPDATE with no body refreshes the session: 200, no offer of ours.
        assert_eq!(
            leg.reoffer(&Method::Update, b"", &current),
            LegReoffer::Refresh
        );
        // Hold: the phone offers sendonly from a new port; we answer recvonly, same session
        // id, next version, and the leg's media moves.
        let hold = b"v=0\r\no=- 1 2 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4002 RTP/AVP 8 0\r\na=sendonly\r\n";
        let LegReoffer::Answer { sdp, neg, addr } = leg.reoffer(&Method::Invite, hold, &current)
        else {
            panic!("an answer")
        };
        assert!(sdp.contains("a=recvonly"), "{sdp}");
        assert_eq!(origin(&sdp), (first.0.clone(), first.1 + 1));
        assert_eq!(neg.direction, sdp::Direction::RecvOnly);
        assert_eq!(
            addr,
            "192.0.2.7:4002".parse::<std::net::SocketAddr>().unwrap()
        );
        // A re-INVITE with no body gets our SDP as an offer, the version again one more.
        let LegReoffer::OfferOurs(ours) = leg.reoffer(&Method::Invite, b"", &neg) else {
            panic!("our offer")
        };
        assert_eq!(origin(&ours), (first.0.clone(), first.1 + 2));
        // An offer we cannot take: 488, and the version does not move.
        let g729 = b"v=0\r\no=- 1 3 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4002 RTP/AVP 18\r\n";
        assert!(matches!(
            leg.reoffer(&Method::Invite, g729, &neg),
            LegReoffer::Refused(_)
        ));
        let LegReoffer::OfferOurs(ours) = leg.reoffer(&Method::Invite, b"", &neg) else {
            panic!("our offer")
        };
        assert_eq!(origin(&ours).1, first.1 + 3);
    }

    #[test]
    fn an_answer_gives_the_agreed_codec_and_where_media_goes() {
        let body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8 101\r\na=rtpmap:101 telephone-event/8000\r\n";
        let (neg, addr) = leg_answer(body).unwrap();
        assert_eq!(neg.codec, Codec::Pcma);
        assert_eq!(
            addr,
            "192.0.2.7:4000".parse::<std::net::SocketAddr>().unwrap()
        );
        assert!(leg_answer(b"garbage").is_err());
    }
}
