//! The operator's leg: the call the server places to an agent's phone for a caller, from the
//! offer to its end. Live callers ([`super::core`]) and called-back callers
//! ([`super::callback`]) ring operators through this one type, so an operator's phone is
//! treated the same whoever it rings for.
//!
//! Sans-IO: events of the leg and `now` go in, a [`LegStep`] comes out, which the leg's owner
//! turns into its own actions (report to the queue, bridge, hold music, end the call). The
//! leg owns:
//! - the offer: [`OperatorOffer`] (the caller's context in `X-311-*` headers; the README's
//!   table documents them) and the ring deadline;
//! - reading the answer (bridge, or an unusable SDP), a failure, the phone's BYE;
//! - re-INVITEs and UPDATEs (hold, resume, a moved address, a session refresh) and the ACK
//!   that answers an offer of ours ([`LegSdp`]);
//! - the silent-phone probe: a phone that sends no audio for
//!   `limits.operator_silence_seconds` is asked with an in-dialog OPTIONS whether it still
//!   holds the call ([`LegProbe`]), and taken for gone on 408 (or no answer in
//!   [`PROBE_ANSWER_WITHIN`]) or 481.
//!
//! It must not touch the caller's side (prompts, the queue, the bridge): that is the owner's.

use super::leg::{Dial, LegId, LegReoffer, LegSdp, Media, PlaceLeg};
use crate::dispatch::queue::OfferFailure;
use crate::media::g711::Codec;
use crate::media::rtp::LatchScope;
use crate::sip::message::Method;
use crate::sip::ua::{DialogEvent, LegEvent, Refer};
use bytes::Bytes;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn, Span};

/// How long a silent operator's phone has to answer the OPTIONS that asks whether it is still
/// there ([`LegProbe`]). The request's own transaction would report no answer (408) only at
/// Timer F, 32 s; a caller should not sit that long in a silent bridge. Over UDP the request
/// goes out four times in these 4 s (T1 = 0.5 s, doubling), enough for a live phone on a
/// lossy line; a phone's SIP stack answers OPTIONS at once.
pub(crate) const PROBE_ANSWER_WITHIN: Duration = Duration::from_secs(4);

/// The in-dialog OPTIONS asking a silent operator's phone whether it still holds the call:
/// the request id its outcome comes back with, and when to stop waiting for that outcome and
/// take the phone for gone (as a 408).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LegProbe {
    pub(crate) req: u64,
    pub(crate) give_up_at: Instant,
}

impl LegProbe {
    /// A probe sent at `now`.
    pub(crate) fn new(now: Instant) -> Self {
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
pub(crate) fn probe_says_gone(code: u16) -> bool {
    matches!(code, 408 | 481)
}

/// The caller's context, as an operator's phone receives it (besides From and
/// P-Asserted-Identity, which carry the caller's number).
#[derive(Debug, Clone)]
pub(crate) struct OperatorOffer<'a> {
    pub(crate) language: &'a str,
    pub(crate) menu_path: &'a str,
    pub(crate) queue: &'a str,
    /// Seconds waited in the queue.
    pub(crate) waited: u64,
    /// The caller's Call-ID.
    pub(crate) call_id: &'a str,
    /// The server called the caller back.
    pub(crate) callback: bool,
}

impl OperatorOffer<'_> {
    /// The INVITE's `X-311-*` headers.
    pub(crate) fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
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

/// Where the leg is.
#[derive(Debug)]
enum State {
    /// The INVITE is being sent; the phone may ring this long once it is out.
    Dialling { ring_timeout: Duration },
    /// The phone rings until `until`.
    Ringing { sdp: LegSdp, until: Instant },
    /// The operator took the call: their phone's media, and the OPTIONS probe in flight.
    Answered {
        sdp: LegSdp,
        media: Media,
        probe: Option<LegProbe>,
    },
    /// The leg is over (failed, hung up, found gone, or dropped).
    Over,
}

/// How the leg's media changed (a re-INVITE, an UPDATE, or the ACK answering our offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MediaChange {
    /// The phone held the call before, and holds it now (we answered its offer recvonly or
    /// inactive: it wants none of our media).
    pub(crate) was_held: bool,
    pub(crate) held: bool,
    /// Its codec, direction or address changed: a bridge to it must follow.
    pub(crate) moved: bool,
}

/// What an event on the leg means to its owner. The leg has already updated itself; the
/// owner carries the step out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LegStep {
    /// Nothing to do (the phone rings, or in-dialog traffic).
    Nothing,
    /// The operator answered with media we can use: bridge the caller to it.
    Answered,
    /// The operator answered with SDP we cannot use: hang the leg up, and report
    /// [`OfferFailure::NoCommonCodec`].
    Unusable,
    /// The phone did not take the call (the leg is over): report this to the queue.
    Failed(OfferFailure),
    /// The phone rang past its ring timeout: hang the leg up (CANCEL) and report
    /// [`OfferFailure::NoAnswer`].
    NoAnswer,
    /// The operator hung up (or their dialog died): the leg is over.
    HungUp,
    /// The operator's browser is gone with the call (its WebSocket closed and did not come
    /// back; or, reported by the media clock, its media failed): the leg is over, and the
    /// caller did not choose to end the call.
    Lost,
    /// Answer the phone's re-INVITE or UPDATE `txn` with `code` and `body`; its media changed
    /// as `change` says.
    Reply {
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
        change: Option<MediaChange>,
    },
    /// The ACK to our 2xx answered our offer, and the leg's media changed.
    MediaChanged(MediaChange),
    /// The phone went silent: send it an in-dialog OPTIONS with this request id.
    Probe { req: u64 },
    /// The silent phone answered the OPTIONS: it holds the call; watch it afresh.
    StillThere,
    /// The silent phone is gone (the OPTIONS got `code`, or nothing in time: 408): hang the
    /// leg up.
    Gone { code: u16 },
    /// The phone asks for the call to be transferred (its transfer key sent REFER): the owner
    /// answers it ([`crate::call::transfer`]).
    Refer(Box<Refer>),
}

/// An operator's leg (see the module docs).
#[derive(Debug)]
pub(crate) struct OperatorLeg {
    pub(crate) id: LegId,
    pub(crate) agent: String,
    /// The leg's span, a child of whoever rang it.
    pub(crate) span: Span,
    /// Where the phone's media may come from: its SDP's address, or the address it
    /// registered from (a phone behind NAT sends from there).
    scope: LatchScope,
    state: State,
}

impl OperatorLeg {
    /// Ring `agent` for a caller whose number is `number` (From and P-Asserted-Identity),
    /// with the caller's context in `offer`; the caller's media is `codec`, our address
    /// towards them `local_ip`. The leg, and the request that places it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn offer(
        id: LegId,
        agent: String,
        number: &str,
        offer: &OperatorOffer<'_>,
        codec: Codec,
        local_ip: IpAddr,
        ring_timeout: Duration,
        span: Span,
    ) -> (OperatorLeg, PlaceLeg) {
        let place = PlaceLeg {
            leg: id,
            to: Dial::Agent(agent.clone()),
            from_user: number.to_owned(),
            from_display: "311 caller",
            asserted: Some(number.to_owned()),
            headers: offer.headers(),
            codec,
            local_ip,
            span: span.clone(),
        };
        (OperatorLeg::dial(&place, agent, ring_timeout), place)
    }

    /// A leg that `place` places to `who` (an agent's id, or the name of a line a caller is
    /// transferred to), ringing for up to `ring_timeout` once the INVITE is out.
    pub(crate) fn dial(place: &PlaceLeg, who: String, ring_timeout: Duration) -> OperatorLeg {
        OperatorLeg {
            id: place.leg,
            agent: who,
            span: place.span.clone(),
            scope: LatchScope::Sdp,
            state: State::Dialling { ring_timeout },
        }
    }

    /// The INVITE is out (at `now`) with our SDP `sdp`, to a phone that registered from
    /// `registered_from`.
    pub(crate) fn placed(&mut self, now: Instant, sdp: LegSdp, registered_from: Option<IpAddr>) {
        if let State::Dialling { ring_timeout } = self.state {
            self.scope = registered_from.map_or(LatchScope::Sdp, LatchScope::SdpOr);
            self.state = State::Ringing {
                sdp,
                until: now + ring_timeout,
            };
        }
    }

    /// Whether the operator took the call (and the leg is not over).
    pub(crate) fn answered(&self) -> bool {
        matches!(self.state, State::Answered { .. })
    }

    /// Whether the phone is still ringing (or being rung).
    pub(crate) fn ringing(&self) -> bool {
        matches!(self.state, State::Dialling { .. } | State::Ringing { .. })
    }

    /// The phone's media, once answered.
    pub(crate) fn media(&self) -> Option<Media> {
        match self.state {
            State::Answered { media, .. } => Some(media),
            _ => None,
        }
    }

    /// Where the phone's packets may come from.
    pub(crate) fn scope(&self) -> LatchScope {
        self.scope
    }

    /// The operator put the caller on hold: their phone wants none of our media.
    pub(crate) fn holds(&self) -> bool {
        self.media().is_some_and(|(n, _)| !n.direction.sends())
    }

    /// The leg is dropped by its owner (the caller left, another operator took the call...).
    pub(crate) fn drop_leg(&mut self) {
        self.state = State::Over;
    }

    /// When [`OperatorLeg::on_timeout`] has something to do: the ring deadline, or the
    /// probe's.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Ringing { until, .. } => Some(*until),
            State::Answered { probe, .. } => probe.map(|p| p.give_up_at),
            State::Dialling { .. } | State::Over => None,
        }
    }

    /// Time passed: the phone rang too long, or the silent phone did not answer the OPTIONS.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> LegStep {
        match &self.state {
            State::Ringing { until, .. } if now >= *until => {
                self.span
                    .in_scope(|| info!(agent = %self.agent, "operator did not answer in time"));
                self.state = State::Over;
                LegStep::NoAnswer
            }
            State::Answered { probe: Some(p), .. } if now >= p.give_up_at => {
                self.span.in_scope(|| {
                    info!(
                        seconds = PROBE_ANSWER_WITHIN.as_secs(),
                        "the operator's phone did not answer the OPTIONS"
                    )
                });
                self.probe_answer(408)
            }
            _ => LegStep::Nothing,
        }
    }

    /// The media clock heard nothing from the bridged phone for `silence`: ask it over SIP
    /// before doing anything (a phone that suppresses silence, a muted operator).
    pub(crate) fn on_silent(&mut self, now: Instant, silence: Duration) -> LegStep {
        let State::Answered { probe, .. } = &mut self.state else {
            return LegStep::Nothing;
        };
        if probe.is_some() {
            return LegStep::Nothing;
        }
        let p = LegProbe::new(now);
        *probe = Some(p);
        self.span.in_scope(|| {
            info!(
                seconds = silence.as_secs(),
                "no audio from the operator's phone; asking whether it is still there"
            )
        });
        LegStep::Probe { req: p.req }
    }

    /// An event of the leg's dialog (`None`: the UA forgot the leg).
    pub(crate) fn on_event(&mut self, ev: Option<LegEvent>) -> LegStep {
        let _span = self.span.clone().entered();
        let agent = self.agent.as_str();
        // The UA forgot the leg: it rings out, or its silence is found out, as for a phone
        // that vanished.
        let Some(ev) = ev else {
            return LegStep::Nothing;
        };
        match ev {
            LegEvent::Provisional { code, .. } => {
                debug!(%agent, code, "operator phone ringing");
                LegStep::Nothing
            }
            LegEvent::Answered { sdp: body } => {
                let mut sdp = match std::mem::replace(&mut self.state, State::Over) {
                    State::Ringing { sdp, .. } | State::Answered { sdp, .. } => sdp,
                    other => {
                        self.state = other;
                        return LegStep::Nothing;
                    }
                };
                match sdp.answer(&body) {
                    Ok(media) => {
                        info!(%agent, codec = ?media.0.codec, "operator answered; caller bridged");
                        self.state = State::Answered {
                            sdp,
                            media,
                            probe: None,
                        };
                        LegStep::Answered
                    }
                    Err(e) => {
                        warn!(%agent, error = %e, "operator answered with unusable SDP");
                        LegStep::Unusable
                    }
                }
            }
            LegEvent::Failed { code, reason } => {
                info!(%agent, code, %reason, "operator phone did not take the call");
                self.state = State::Over;
                LegStep::Failed(OfferFailure::from_status(code))
            }
            LegEvent::Dialog(DialogEvent::Bye | DialogEvent::Timeout) => {
                info!(%agent, "operator hung up");
                self.state = State::Over;
                LegStep::HungUp
            }
            LegEvent::Dialog(DialogEvent::Lost) => {
                warn!(%agent, "the operator's browser is gone (its connection closed)");
                self.state = State::Over;
                LegStep::Lost
            }
            LegEvent::Dialog(DialogEvent::Reoffer {
                txn, method, body, ..
            }) => self.reoffer(txn, &method, &body),
            LegEvent::Dialog(DialogEvent::Confirmed { sdp: body }) => self.ack(&body),
            LegEvent::Dialog(DialogEvent::RequestOutcome { req, code, .. }) => {
                let probed =
                    matches!(self.state, State::Answered { probe: Some(p), .. } if p.req == req);
                if probed {
                    self.probe_answer(code)
                } else {
                    LegStep::Nothing
                }
            }
            LegEvent::Dialog(DialogEvent::Refer(r)) => LegStep::Refer(r),
            LegEvent::Dialog(
                DialogEvent::Cancelled | DialogEvent::Info { .. } | DialogEvent::Notify { .. },
            ) => LegStep::Nothing,
        }
    }

    /// The media clock gave up on the leg's media (a browser's DTLS failed or its consent
    /// expired, `why`): an answered leg is lost.
    pub(crate) fn on_media_failed(&mut self, why: &str) -> LegStep {
        if !self.answered() {
            return LegStep::Nothing;
        }
        self.span
            .in_scope(|| warn!(agent = %self.agent, %why, "the operator's media failed"));
        self.state = State::Over;
        LegStep::Lost
    }

    /// The silent phone's OPTIONS was answered with `code` (408: not in time).
    fn probe_answer(&mut self, code: u16) -> LegStep {
        if probe_says_gone(code) {
            self.span.in_scope(|| {
                warn!(
                    agent = %self.agent,
                    options = code,
                    "the operator's phone is gone (no audio, OPTIONS failed); ending its leg"
                )
            });
            self.state = State::Over;
            return LegStep::Gone { code };
        }
        if let State::Answered { probe, .. } = &mut self.state {
            *probe = None;
        }
        self.span.in_scope(|| {
            info!(
                code,
                "the operator's phone is still there (silence suppression?); the bridge stays"
            )
        });
        LegStep::StillThere
    }

    /// A re-INVITE or UPDATE from the phone (the operator holds the caller or takes them off
    /// hold, the phone moves its media or refreshes the session). Left unanswered, the phone
    /// would retransmit it for 32 s and then end the call.
    fn reoffer(&mut self, txn: u64, method: &Method, body: &[u8]) -> LegStep {
        let State::Answered { sdp, media, .. } = &mut self.state else {
            // Not answered yet: nothing of ours to renegotiate (RFC 3311 §5.2).
            return LegStep::Reply {
                txn,
                code: 491,
                body: None,
                change: None,
            };
        };
        let before = *media;
        let was_held = !before.0.direction.sends();
        let reoffer = sdp.reoffer(method, body, &before.0);
        if let LegReoffer::Answer { neg, addr, .. } = reoffer {
            *media = (neg, addr);
        }
        let (code, body) = reoffer.response();
        let after = *media;
        LegStep::Reply {
            txn,
            code,
            body,
            change: Some(MediaChange {
                was_held,
                held: !after.0.direction.sends(),
                moved: after != before,
            }),
        }
    }

    /// The ACK to our 2xx: if that 2xx carried our offer (a re-INVITE without SDP), its answer
    /// is the phone's media now.
    fn ack(&mut self, body: &[u8]) -> LegStep {
        let State::Answered { sdp, media, .. } = &mut self.state else {
            return LegStep::Nothing;
        };
        let before = *media;
        let mut answered = Some(before);
        sdp.ack(body, &mut answered);
        let after = answered.unwrap_or(before);
        *media = after;
        if after == before {
            return LegStep::Nothing;
        }
        LegStep::MediaChanged(MediaChange {
            was_held: !before.0.direction.sends(),
            held: !after.0.direction.sends(),
            moved: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::sdp::Direction;

    fn t0() -> Instant {
        Instant::now()
    }

    fn answer(codecs: &str, maps: &str) -> LegEvent {
        LegEvent::Answered {
            sdp: format!(
                "v=0\r\no=op 1 1 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP {codecs}\r\n{maps}"
            )
            .into(),
        }
    }

    fn pcma() -> LegEvent {
        answer("8 101", "a=rtpmap:101 telephone-event/8000\r\n")
    }

    fn offer() -> OperatorOffer<'static> {
        OperatorOffer {
            language: "es",
            menu_path: "language:2 > screening:1 > main:0",
            queue: "general",
            waited: 42,
            call_id: "abc@host",
            callback: false,
        }
    }

    /// A leg to 1001 placed at `now`, ringing for 20 s.
    fn ringing(now: Instant) -> OperatorLeg {
        let (mut leg, place) = OperatorLeg::offer(
            LegId(1),
            "1001".into(),
            "+12125550123",
            &offer(),
            Codec::Pcmu,
            "127.0.0.1".parse().unwrap(),
            Duration::from_secs(20),
            Span::none(),
        );
        assert_eq!(place.to, Dial::Agent("1001".into()));
        let sdp = LegSdp::new("127.0.0.1:40000".parse().unwrap());
        leg.placed(now, sdp, Some("198.51.100.9".parse().unwrap()));
        leg
    }

    fn in_dialog(ev: DialogEvent) -> Option<LegEvent> {
        Some(LegEvent::Dialog(ev))
    }

    #[test]
    fn the_offer_carries_the_callers_number_and_context() {
        let (_, place) = OperatorLeg::offer(
            LegId(7),
            "1001".into(),
            "+12125550123",
            &OperatorOffer {
                callback: true,
                ..offer()
            },
            Codec::Pcma,
            "127.0.0.1".parse().unwrap(),
            Duration::from_secs(20),
            Span::none(),
        );
        assert_eq!(place.from_user, "+12125550123");
        assert_eq!(place.asserted.as_deref(), Some("+12125550123"));
        assert_eq!(place.codec, Codec::Pcma);
        let get = |n: &str| {
            (place.headers.iter())
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("X-311-Language"), Some("es"));
        assert_eq!(
            get("X-311-Menu-Path"),
            Some("language:2 > screening:1 > main:0")
        );
        assert_eq!(get("X-311-Queue"), Some("general"));
        assert_eq!(get("X-311-Waited"), Some("42"));
        assert_eq!(get("X-311-Call-ID"), Some("abc@host"));
        assert_eq!(get("X-311-Callback"), Some("yes"));
        assert!(!offer().headers().iter().any(|(k, _)| k == "X-311-Callback"));
        // A spoofed number cannot inject headers through P-Asserted-Identity.
        let (k, pai) = super::super::leg::asserted_identity(
            "5551234\r\nX-Evil: 1",
            "192.0.2.1".parse().unwrap(),
        );
        assert_eq!(k, "P-Asserted-Identity");
        assert!(
            pai.starts_with("<sip:") && pai.ends_with("@192.0.2.1>"),
            "{pai}"
        );
        assert!(!pai.contains('\r') && !pai.contains('\n'), "{pai}");
    }

    #[test]
    fn an_answer_bridges_with_the_phones_codec_and_address() {
        let now = t0();
        let mut leg = ringing(now);
        assert!(leg.ringing());
        assert_eq!(leg.next_deadline(), Some(now + Duration::from_secs(20)));
        assert_eq!(
            leg.on_event(Some(LegEvent::Provisional {
                code: 180,
                sdp: None
            })),
            LegStep::Nothing
        );
        assert_eq!(leg.on_event(Some(pcma())), LegStep::Answered);
        let (neg, addr) = leg.media().unwrap();
        assert_eq!(neg.codec, Codec::Pcma);
        assert_eq!(
            addr,
            "192.0.2.7:4000".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(
            leg.scope(),
            LatchScope::SdpOr("198.51.100.9".parse().unwrap())
        );
        // Answered: no ring deadline any more.
        assert_eq!(leg.next_deadline(), None);
        assert_eq!(
            leg.on_timeout(now + Duration::from_secs(60)),
            LegStep::Nothing
        );
    }

    #[test]
    fn busy_no_answer_and_unusable_sdp_each_end_the_offer_with_their_reason() {
        let now = t0();
        let mut leg = ringing(now);
        assert_eq!(
            leg.on_event(Some(LegEvent::Failed {
                code: 486,
                reason: "Busy Here".into()
            })),
            LegStep::Failed(OfferFailure::Busy)
        );
        assert!(!leg.ringing() && leg.next_deadline().is_none());

        let mut leg = ringing(now);
        assert_eq!(
            leg.on_timeout(now + Duration::from_secs(19)),
            LegStep::Nothing
        );
        assert_eq!(
            leg.on_timeout(now + Duration::from_secs(20)),
            LegStep::NoAnswer
        );
        assert_eq!(leg.next_deadline(), None);

        // A phone that answers with G.729 only cannot be bridged.
        let mut leg = ringing(now);
        assert_eq!(
            leg.on_event(Some(answer("18", "a=rtpmap:18 G729/8000\r\n"))),
            LegStep::Unusable
        );
        assert!(!leg.answered());
    }

    #[test]
    fn the_operators_bye_or_a_dead_dialog_ends_the_leg() {
        for ev in [DialogEvent::Bye, DialogEvent::Timeout] {
            let mut leg = ringing(t0());
            leg.on_event(Some(pcma()));
            assert_eq!(leg.on_event(in_dialog(ev)), LegStep::HungUp);
            assert!(!leg.answered());
        }
    }

    fn hold_offer(direction: &str, port: u16) -> Bytes {
        format!("v=0\r\no=- 1 2 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio {port} RTP/AVP 8 0\r\na={direction}\r\n").into()
    }

    #[test]
    fn hold_and_resume_are_answered_and_reported() {
        let mut leg = ringing(t0());
        leg.on_event(Some(pcma()));
        let step = leg.on_event(in_dialog(DialogEvent::Reoffer {
            txn: 5,
            method: Method::Invite,
            content_type: Some("application/sdp".into()),
            body: hold_offer("sendonly", 4002),
        }));
        let LegStep::Reply {
            txn: 5,
            code: 200,
            body: Some((ct, answer)),
            change: Some(change),
        } = step
        else {
            panic!("{step:?}")
        };
        assert_eq!(ct, "application/sdp");
        assert!(String::from_utf8_lossy(&answer).contains("a=recvonly"));
        assert_eq!(
            change,
            MediaChange {
                was_held: false,
                held: true,
                moved: true
            }
        );
        assert!(leg.holds());
        assert_eq!(leg.media().unwrap().0.direction, Direction::RecvOnly);
        assert_eq!(
            leg.media().unwrap().1,
            "192.0.2.7:4002".parse::<std::net::SocketAddr>().unwrap()
        );
        let step = leg.on_event(in_dialog(DialogEvent::Reoffer {
            txn: 6,
            method: Method::Invite,
            content_type: Some("application/sdp".into()),
            body: hold_offer("sendrecv", 4002),
        }));
        assert!(
            matches!(
                step,
                LegStep::Reply {
                    code: 200,
                    change: Some(MediaChange {
                        was_held: true,
                        held: false,
                        ..
                    }),
                    ..
                }
            ),
            "{step:?}"
        );
        assert!(!leg.holds());
    }

    #[test]
    fn an_update_without_sdp_refreshes_and_a_reinvite_without_sdp_gets_our_offer() {
        let mut leg = ringing(t0());
        // Before the answer there is nothing of ours to renegotiate.
        assert!(matches!(
            leg.on_event(in_dialog(DialogEvent::Reoffer {
                txn: 1,
                method: Method::Update,
                content_type: None,
                body: Bytes::new(),
            })),
            LegStep::Reply { code: 491, .. }
        ));
        leg.on_event(Some(pcma()));
        let refresh = leg.on_event(in_dialog(DialogEvent::Reoffer {
            txn: 2,
            method: Method::Update,
            content_type: None,
            body: Bytes::new(),
        }));
        assert!(
            matches!(
                refresh,
                LegStep::Reply {
                    code: 200,
                    body: None,
                    change: Some(MediaChange { moved: false, .. }),
                    ..
                }
            ),
            "{refresh:?}"
        );
        // A re-INVITE without SDP: 200 with our offer; the ACK's answer moves the media.
        let offer = leg.on_event(in_dialog(DialogEvent::Reoffer {
            txn: 3,
            method: Method::Invite,
            content_type: None,
            body: Bytes::new(),
        }));
        assert!(
            matches!(
                offer,
                LegStep::Reply {
                    code: 200,
                    body: Some(_),
                    ..
                }
            ),
            "{offer:?}"
        );
        let moved = leg.on_event(in_dialog(DialogEvent::Confirmed {
            sdp: hold_offer("sendonly", 4010),
        }));
        assert_eq!(
            moved,
            LegStep::MediaChanged(MediaChange {
                was_held: false,
                held: true,
                moved: true
            })
        );
        assert_eq!(
            leg.media().unwrap().1,
            "192.0.2.7:4010".parse::<std::net::SocketAddr>().unwrap()
        );
        // An ACK with nothing due changes nothing.
        assert_eq!(
            leg.on_event(in_dialog(DialogEvent::Confirmed { sdp: Bytes::new() })),
            LegStep::Nothing
        );
        // An offer we cannot take: 488, the media stays.
        let g729 = Bytes::from_static(b"v=0\r\no=- 1 3 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\nm=audio 4002 RTP/AVP 18\r\n");
        assert!(matches!(
            leg.on_event(in_dialog(DialogEvent::Reoffer {
                txn: 4,
                method: Method::Invite,
                content_type: Some("application/sdp".into()),
                body: g729,
            })),
            LegStep::Reply {
                code: 488,
                change: Some(MediaChange { moved: false, .. }),
                ..
            }
        ));
    }

    #[test]
    fn a_silent_phone_is_asked_once_and_is_gone_without_an_answer_in_time() {
        let now = t0();
        let silence = Duration::from_secs(10);
        let mut leg = ringing(now);
        // Not answered: nothing to probe.
        assert_eq!(leg.on_silent(now, silence), LegStep::Nothing);
        leg.on_event(Some(pcma()));
        let LegStep::Probe { req } = leg.on_silent(now, silence) else {
            panic!("a probe")
        };
        // Asked once, not again while the question is open.
        assert_eq!(leg.on_silent(now, silence), LegStep::Nothing);
        assert_eq!(leg.next_deadline(), Some(now + PROBE_ANSWER_WITHIN));
        // Another request's outcome is not the probe's.
        assert_eq!(
            leg.on_event(in_dialog(DialogEvent::RequestOutcome {
                req: req.wrapping_add(1),
                method: Method::Options,
                code: 408
            })),
            LegStep::Nothing
        );
        assert_eq!(
            leg.on_timeout(now + PROBE_ANSWER_WITHIN - Duration::from_millis(1)),
            LegStep::Nothing
        );
        assert_eq!(
            leg.on_timeout(now + PROBE_ANSWER_WITHIN),
            LegStep::Gone { code: 408 }
        );
        assert!(!leg.answered());
    }

    #[test]
    fn a_silent_phone_that_answers_the_probe_stays_and_481_is_gone() {
        let now = t0();
        let silence = Duration::from_secs(10);
        for (code, step) in [
            (200, LegStep::StillThere),
            (405, LegStep::StillThere),
            (481, LegStep::Gone { code: 481 }),
            (408, LegStep::Gone { code: 408 }),
        ] {
            let mut leg = ringing(now);
            leg.on_event(Some(pcma()));
            let LegStep::Probe { req } = leg.on_silent(now, silence) else {
                panic!("a probe")
            };
            let got = leg.on_event(in_dialog(DialogEvent::RequestOutcome {
                req,
                method: Method::Options,
                code,
            }));
            assert_eq!(got, step, "{code}");
            if step == LegStep::StillThere {
                assert!(leg.answered() && leg.next_deadline().is_none());
                // Asked again the next time it falls silent.
                assert!(matches!(leg.on_silent(now, silence), LegStep::Probe { .. }));
            }
        }
    }
}
