//! What an operator's phone (or the 911 trunk) is sent when the server calls it for a caller:
//! the SDP offer of the new leg and the headers that carry the caller's context.
//!
//! One place for both, because a live caller's offer ([`crate::call`]) and a called-back
//! caller's ([`crate::callback`]) must look the same to the operator's phone; the README's
//! table of `X-311-*` headers documents what these build. What the operator's phone answers
//! is read here for both too ([`agent_leg_step`]).

use crate::dispatch::queue::OfferFailure;
use crate::media::g711::Codec;
use crate::media::sdp;
use crate::sip::message::{sanitize_quoted, Method};
use crate::sip::ua::{DialogEvent, LegEvent};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Our side of an outbound leg's SDP: where the leg's media is, and the `o=` line's session
/// id and version, which every later SDP of ours on the leg must carry (RFC 3264 §8: the same
/// id, the version one more than the last).
#[derive(Debug, Clone, Copy)]
pub struct LegSdp {
    pub local: SocketAddr,
    id: u64,
    version: u64,
    /// Our 2xx to a re-INVITE without SDP carried our offer: the ACK brings the answer.
    answer_in_ack: bool,
}

/// What to reply to a re-INVITE or UPDATE on an outbound leg (the far phone put the call on
/// hold or took it off, moved its media, or refreshed the session), and the leg's media after.
#[derive(Debug, Clone, PartialEq)]
pub enum LegReoffer {
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
    pub fn response(&self) -> (u16, Option<(String, bytes::Bytes)>) {
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
    pub fn new(local: SocketAddr) -> Self {
        LegSdp {
            local,
            id: rand::random::<u32>() as u64,
            version: 1,
            answer_in_ack: false,
        }
    }

    /// The leg's INVITE offer: the caller's codec first (so the bridge need not transcode
    /// when the far end takes it), the other G.711 law second, and RFC 4733 events at 101.
    pub fn offer(&self, caller_codec: Codec) -> String {
        let other = if caller_codec == Codec::Pcmu {
            Codec::Pcma
        } else {
            Codec::Pcmu
        };
        sdp::build_offer(
            self.local,
            self.id,
            self.version,
            &[caller_codec, other],
            Some(101),
            sdp::Direction::SendRecv,
        )
    }

    /// Read a re-INVITE or UPDATE (`method`, `body`) on the leg, whose media is `current`.
    pub fn reoffer(
        &mut self,
        method: &Method,
        body: &[u8],
        current: &sdp::Negotiated,
    ) -> LegReoffer {
        if body.is_empty() {
            if *method == Method::Invite {
                self.version += 1;
                self.answer_in_ack = true;
                return LegReoffer::OfferOurs(sdp::build_answer(
                    self.local,
                    self.id,
                    self.version,
                    current,
                ));
            }
            return LegReoffer::Refresh;
        }
        let parsed = sdp::parse(body).and_then(|offer| {
            let neg = sdp::negotiate(&offer, &crate::call::SUPPORTED_CODECS)?;
            let answer =
                sdp::build_answer_for_offer(body, self.local, self.id, self.version + 1, &neg)?;
            Ok((answer, neg, offer.addr))
        });
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
    /// The ACK for our 2xx arrived with `body` ([`DialogEvent::Confirmed`]). When that 2xx
    /// carried our offer (a re-INVITE without SDP: [`LegReoffer::OfferOurs`]) the body is the
    /// answer, and the leg's media from now on (RFC 3264 §5: it may move or hold the call):
    /// `answered` takes it if the leg has answered. No answer due, or none in the ACK, or an
    /// unusable one: the media stays as it was.
    pub fn ack(&mut self, body: &[u8], answered: &mut Option<(sdp::Negotiated, SocketAddr)>) {
        if !std::mem::take(&mut self.answer_in_ack) || body.is_empty() {
            return;
        }
        match leg_answer(body) {
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
pub fn leg_answer(body: &[u8]) -> Result<(sdp::Negotiated, SocketAddr), sdp::SdpError> {
    let a = sdp::parse(body)?;
    Ok((sdp::negotiate(&a, &crate::call::SUPPORTED_CODECS)?, a.addr))
}

/// What an event on an operator's leg means to whoever rang that operator: a live call or a
/// call-back. Each keeps its own state; the reading of the event, and its log line, is this.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentLegStep {
    /// Nothing to do (the phone rings, or in-dialog traffic).
    Nothing,
    /// The operator answered with media we can use: bridge the caller to it.
    Answered(sdp::Negotiated, SocketAddr),
    /// The operator answered with SDP we cannot use: hang the leg up and report
    /// [`OfferFailure::NoCommonCodec`].
    Unusable,
    /// The phone did not take the call (the leg is over): report this to the queue.
    Failed(OfferFailure),
    /// The operator hung up (or their dialog died).
    HungUp,
}

/// Read `ev`, from the leg that rang `agent`, and log it.
pub fn agent_leg_step(agent: &str, ev: LegEvent) -> AgentLegStep {
    match ev {
        LegEvent::Provisional { code, .. } => {
            debug!(%agent, code, "operator phone ringing");
            AgentLegStep::Nothing
        }
        LegEvent::Answered { sdp: body } => match leg_answer(&body) {
            Ok((neg, addr)) => {
                info!(%agent, codec = ?neg.codec, "operator answered; caller bridged");
                AgentLegStep::Answered(neg, addr)
            }
            Err(e) => {
                warn!(%agent, error = %e, "operator answered with unusable SDP");
                AgentLegStep::Unusable
            }
        },
        LegEvent::Failed { code, reason } => {
            info!(%agent, code, %reason, "operator phone did not take the call");
            AgentLegStep::Failed(OfferFailure::from_status(code))
        }
        LegEvent::Dialog(DialogEvent::Bye | DialogEvent::Timeout) => {
            info!(%agent, "operator hung up");
            AgentLegStep::HungUp
        }
        LegEvent::Dialog(_) => AgentLegStep::Nothing,
    }
}

/// How long a silent operator's phone has to answer the OPTIONS that asks whether it is still
/// there ([`LegProbe`]). The request's own transaction would report no answer (408) only at
/// Timer F, 32 s; a caller should not sit that long in a silent bridge. Over UDP the request
/// goes out four times in these 4 s (T1 = 0.5 s, doubling), enough for a live phone on a
/// lossy line; a phone's SIP stack answers OPTIONS at once.
pub const PROBE_ANSWER_WITHIN: Duration = Duration::from_secs(4);

/// The in-dialog OPTIONS asking a silent operator's phone whether it still holds the call:
/// the request id its outcome comes back with, and when to stop waiting for that outcome and
/// take the phone for gone (as a 408).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegProbe {
    pub req: u64,
    pub give_up_at: tokio::time::Instant,
}

impl LegProbe {
    /// A probe sent at `now`.
    pub fn new(now: tokio::time::Instant) -> Self {
        LegProbe {
            req: rand::random(),
            give_up_at: now + PROBE_ANSWER_WITHIN,
        }
    }
}

/// The answer to an in-dialog OPTIONS sent to a leg that went silent: whether its phone is
/// gone. No answer (408) or no such dialog any more (481, a phone that restarted) is gone;
/// any other answer, even 405 or 501 from a phone that takes no OPTIONS, came from a phone
/// that still holds the call (silence suppression, a muted operator).
pub fn probe_says_gone(code: u16) -> bool {
    matches!(code, 408 | 481)
}

/// `P-Asserted-Identity: <sip:NUMBER@HOST>` with the caller's number as the trunk gave it.
pub fn asserted_identity(number: &str, host: IpAddr) -> (String, String) {
    (
        "P-Asserted-Identity".to_owned(),
        format!("<sip:{}@{host}>", sanitize_quoted(number)),
    )
}

/// The caller's context, as an operator's phone receives it.
#[derive(Debug, Clone)]
pub struct OperatorOffer<'a> {
    /// The caller's number (P-Asserted-Identity).
    pub number: &'a str,
    /// The host put in P-Asserted-Identity (our address facing the operator).
    pub host: IpAddr,
    pub language: &'a str,
    pub menu_path: &'a str,
    pub queue: &'a str,
    /// Seconds waited in the queue.
    pub waited: u64,
    /// The caller's Call-ID.
    pub call_id: &'a str,
    /// The server called the caller back.
    pub callback: bool,
}

impl OperatorOffer<'_> {
    /// The INVITE's extra headers.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            asserted_identity(self.number, self.host),
            ("X-311-Language".to_owned(), self.language.to_owned()),
            ("X-311-Menu-Path".to_owned(), self.menu_path.to_owned()),
            ("X-311-Queue".to_owned(), self.queue.to_owned()),
            ("X-311-Waited".to_owned(), self.waited.to_string()),
            ("X-311-Call-ID".to_owned(), self.call_id.to_owned()),
        ];
        if self.callback {
            h.push(("X-311-Callback".to_owned(), "yes".to_owned()));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_legs_answer_failure_and_hang_up_read_the_same_for_every_caller() {
        let sdp = |codecs: &str, maps: &str| {
            LegEvent::Answered {
                sdp: format!(
                    "v=0\r\no=op 1 1 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP {codecs}\r\n{maps}"
                )
                .into(),
            }
        };
        match agent_leg_step(
            "1001",
            sdp("8 101", "a=rtpmap:101 telephone-event/8000\r\n"),
        ) {
            AgentLegStep::Answered(neg, addr) => {
                assert_eq!(neg.codec, Codec::Pcma);
                assert_eq!(addr, "192.0.2.7:4000".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        // A phone that answers with G.729 only cannot be bridged.
        assert_eq!(
            agent_leg_step("1001", sdp("18", "a=rtpmap:18 G729/8000\r\n")),
            AgentLegStep::Unusable
        );
        let failed = |code| LegEvent::Failed {
            code,
            reason: "x".into(),
        };
        assert_eq!(
            agent_leg_step("1001", failed(486)),
            AgentLegStep::Failed(OfferFailure::Busy)
        );
        assert_eq!(
            agent_leg_step("1001", failed(408)),
            AgentLegStep::Failed(OfferFailure::from_status(408))
        );
        for ev in [DialogEvent::Bye, DialogEvent::Timeout] {
            assert_eq!(
                agent_leg_step("1001", LegEvent::Dialog(ev)),
                AgentLegStep::HungUp
            );
        }
        assert_eq!(
            agent_leg_step(
                "1001",
                LegEvent::Provisional {
                    code: 183,
                    sdp: Some("v=0\r\n".into())
                }
            ),
            AgentLegStep::Nothing
        );
        assert_eq!(
            agent_leg_step(
                "1001",
                LegEvent::Dialog(DialogEvent::Confirmed {
                    sdp: bytes::Bytes::new()
                })
            ),
            AgentLegStep::Nothing
        );
    }

    #[test]
    fn an_operator_sees_the_callers_context_and_a_spoofed_number_cannot_inject_headers() {
        let o = OperatorOffer {
            number: "5551234\r\nX-Evil: 1",
            host: "192.0.2.1".parse().unwrap(),
            language: "es",
            menu_path: "language:2 > screening:1 > main:0",
            queue: "general",
            waited: 42,
            call_id: "abc@host",
            callback: true,
        };
        let h = o.headers();
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("X-311-Language"), Some("es"));
        assert_eq!(
            get("X-311-Menu-Path"),
            Some("language:2 > screening:1 > main:0")
        );
        assert_eq!(get("X-311-Queue"), Some("general"));
        assert_eq!(get("X-311-Waited"), Some("42"));
        assert_eq!(get("X-311-Call-ID"), Some("abc@host"));
        assert_eq!(get("X-311-Callback"), Some("yes"));
        let pai = get("P-Asserted-Identity").unwrap();
        assert!(
            pai.starts_with("<sip:") && pai.ends_with("@192.0.2.1>"),
            "{pai}"
        );
        assert!(!pai.contains('\r') && !pai.contains('\n'), "{pai}");
        let live = OperatorOffer {
            callback: false,
            ..o
        };
        assert!(!live.headers().iter().any(|(k, _)| k == "X-311-Callback"));
    }

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
        assert_eq!(addr, "192.0.2.7:4002".parse().unwrap());
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
        assert_eq!(addr, "192.0.2.7:4000".parse().unwrap());
        assert!(leg_answer(b"garbage").is_err());
    }
}
