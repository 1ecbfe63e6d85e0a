//! The 911 redirect: a caller who pressed the emergency key (or chose an entry marked as an
//! emergency) is sent on to 911, and nothing may stand in the way, not even our own database.
//!
//! A sans-IO state machine ([`Emergency`]): inputs and `now` go in, [`Out`]s come out, and
//! [`Emergency::next_deadline`] says when time matters. The call core ([`super::core`]) turns
//! the outputs into its actions; the unit tests below drive every path on virtual time.
//!
//! What it does, in order:
//! 1. **Audit first.** The caller hears "connecting you to 911" ([`Sound::Notice`]) while the
//!    audit row is written ([`Out::WriteAudit`], state [`State::Auditing`]). Nothing starts
//!    before the row is durable; if it cannot be written the redirect goes ahead anyway (the
//!    outcome is then not recorded: there is no row to record it on).
//! 2. **The plan** of [`EmergencyConfig::plan`]: refer → bridge → announce, the bridge once
//!    for each route (`emergency.uri`, then `backup_uris`).
//!    - **refer**: after the notice (a REFER takes the caller's phone out of the call), a REFER
//!      with `Refer-To: <uri>`; the phone's NOTIFY `message/sipfrag` says how it went. A
//!      refusal, a failed transfer or no final NOTIFY within `timeout_seconds` is a failure.
//!    - **bridge**: at once, during the notice: an INVITE to the route; its ringback (or the
//!      911 side's early media, relayed once the notice has played) until it answers, then the
//!      caller is bridged to it. A route that says nothing for [`BRIDGE_FIRST_RESPONSE`] is
//!      down; one that rings has `timeout_seconds` to answer. A route whose name has several
//!      addresses is tried at each (RFC 3263 section 4.3: after no answer, a transport error,
//!      408 or 503) before the backup routes; an address that answers for itself (any other
//!      final response, or ringing) ends that name's turn.
//!    - **announce**: after the notice, "hang up and dial 911", `announce_repeats` times, then
//!      the call ends.
//! 3. **The outcome** (`connected via bridge after refer: REFER answered 501`...) goes to the
//!    audit row and the `ivr311_emergency_redirects_total` counter once: when the caller is
//!    connected, announced to, or hangs up first.
//!
//! A caller whose number a trusted trunk asserted is presented with it on the bridge (From
//! and P-Asserted-Identity: 911 location lookup keys on it); a claimed number is not (From
//! is the line's own number, `callback.from_user`), so a forged number cannot send responders
//! to someone else's address. Either way the caller is connected.
//!
//! This module must not touch the caller's dialog, media or the menu: it asks, through
//! [`Out`], and the core does.

use super::leg::{
    leg_answer, BridgeTo, Dial, LegId, LegReoffer, LegSdp, Media, NotPlaced, PlaceLeg, Placed,
};
use crate::dispatch::emergency::{EmergencyConfig, EmergencyMethod};
use crate::dispatch::tickets::EmergencyAudit;
use crate::media::g711::Codec;
use crate::media::rtp::LatchScope;
use crate::media::sdp;
use crate::sip::ua::{DialogEvent, LegEvent};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How long a 911 trunk may stay silent (no ringing, no answer) before the next method.
pub(crate) const BRIDGE_FIRST_RESPONSE: Duration = Duration::from_secs(5);

/// Hands out leg ids (the call core owns one and lends it). They are unique on the server,
/// not only within the call, so that a leg can move from one call to another (an operator's
/// consultation joined to the caller they hold) and keep its id.
#[derive(Debug, Default)]
pub(crate) struct LegIds;

/// The last leg id handed out on this server.
static LAST_LEG: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl LegIds {
    pub(crate) fn next(&mut self) -> LegId {
        LegId(LAST_LEG.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
    }
}

/// What the caller hears, as the redirect asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sound {
    /// "Connecting you to 911" (`connecting_911`).
    Notice,
    /// "Hang up and dial 911" (`emergency_announce`).
    Announcement,
    /// The ringing tone, while the 911 leg rings.
    Ringback,
}

/// What the redirect asks of the call.
#[derive(Debug)]
pub(crate) enum Out {
    /// Queue this sound after whatever plays.
    Play(Sound),
    /// Stop playing.
    Stop,
    /// Write the audit row; answer with [`Emergency::audited`].
    WriteAudit(EmergencyAudit),
    /// Record the outcome on audit row `id`.
    AuditOutcome { id: i64, outcome: String },
    /// Count the redirect in `ivr311_emergency_redirects_total`.
    Counted {
        method: &'static str,
        outcome: &'static str,
    },
    /// Send REFER to the caller's phone with these headers; its final response and the
    /// NOTIFYs come back as [`Emergency::refer_answered`] and [`Emergency::refer_notify`].
    Refer { headers: Vec<(String, String)> },
    /// Place the 911 leg; answer with [`Emergency::placed`].
    Place(Box<PlaceLeg>),
    /// Let go of a leg: CANCEL or BYE it first when `hang_up`.
    DropLeg { leg: LegId, hang_up: bool },
    /// Answer the 911 leg's re-INVITE or UPDATE.
    Reply {
        leg: LegId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    /// The 911 side put the caller on hold (`held`), or took them off it.
    Held(bool),
    /// The call is over (transferred, announced to, or the 911 side hung up).
    End,
    /// Every route failed on a redirect an operator asked for: the caller goes back to them
    /// (instead of the announcement).
    BackToOperator,
}

/// A redirect an operator asked for (their phone's transfer key, a call from their phone,
/// the admin API) rather than the menu: the audit names them and how, and when every route
/// fails the caller goes back to the operator instead of hearing "hang up and dial 911".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ByOperator {
    /// The operator's agent id.
    pub(crate) agent: String,
    /// How they asked: `refer`, `phone_call` or `admin`.
    pub(crate) via: &'static str,
    /// The operator's own call to 911 from their phone (a consultation before the caller is
    /// handed over): only the bridge routes are tried, and nothing is played (the phone is
    /// not answered until 911 is).
    pub(crate) consult: bool,
}

/// A menu's `transfer` to a crisis or utility line: the redirect's routes are the line's
/// URI, and what the caller hears names no 911.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LineRedirect {
    /// The `transfers` entry's name (the audit's `destination`).
    pub(crate) name: String,
    /// The prompt said when the line cannot be reached.
    pub(crate) announce: String,
}

/// Who is being redirected, and from where.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) call_id: String,
    /// The number as best known, for the audit.
    pub(crate) number: String,
    /// The number a trusted trunk asserted, if any: presented to 911.
    pub(crate) asserted: Option<String>,
    /// From's user part on the bridge when the number is not asserted (the line's own).
    pub(crate) line: String,
    pub(crate) language: String,
    /// The caller's codec (offered first on the bridge).
    pub(crate) codec: Codec,
    /// Our address as the caller's media uses it (the bridge's media, and Referred-By).
    pub(crate) local_ip: IpAddr,
}

/// One way the 911 bridge calls: a configured route, and once its name is looked up, one of
/// the name's addresses.
///
/// A PSAP or carrier that names its gateway with several addresses (DNS A/AAAA records) is
/// reached at the next when one is down (RFC 3263 section 4.3: no response in time, a
/// transport error, or 503) before the bridge moves on to the backup routes. Each address is
/// one bridge attempt of the plan, with its own first-response deadline, so a dead first
/// address costs a 911 caller [`BRIDGE_FIRST_RESPONSE`], not the whole route.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    uri: String,
    /// The address this attempt calls; `None` until the name is looked up.
    at: Option<SocketAddr>,
    /// How many addresses the name had (1 for an IP literal or a name with one).
    of: usize,
}

impl Route {
    fn new(uri: String) -> Route {
        Route {
            uri,
            at: None,
            of: 1,
        }
    }
}

impl std::fmt::Display for Route {
    /// The URI, with the address when its name has several (the audit says which was down).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            Some(a) if self.of > 1 => write!(f, "{} at {a}", self.uri),
            _ => f.write_str(&self.uri),
        }
    }
}

/// The 911 leg: our SDP on it, and its media (early, then answered).
#[derive(Debug)]
struct Leg {
    id: LegId,
    /// Our SDP; `None` until the INVITE is out.
    sdp: Option<LegSdp>,
    /// The 911 side's early media (a 183 with SDP), relayed to the caller until it answers.
    early: Option<Media>,
    answered: Option<Media>,
}

impl Leg {
    /// Where the caller's bridge goes: the answer, else the early media.
    fn media(&self) -> Option<Media> {
        self.answered.or(self.early)
    }

    /// The 911 side holds the call (it wants none of our media).
    fn holds(&self) -> bool {
        self.answered.is_some_and(|(n, _)| !n.direction.sends())
    }
}

/// Where the redirect is.
#[derive(Debug)]
enum State {
    /// The audit row is being written; the notice plays.
    Auditing,
    /// Between methods: the next starts now (a bridge), or once the notice has played.
    Next,
    /// A REFER is out; the caller's phone has until `until` to report the transfer done.
    Referring { until: Instant, accepted: bool },
    /// Calling route `route`: the leg rings until `until` (`None`: the leg is gone, waiting for
    /// `until` no more); early media offered during the notice is `held` until it has played.
    Bridging {
        route: Route,
        leg: Option<Leg>,
        until: Instant,
        held: Option<Media>,
    },
    /// The caller is with 911 over the bridge (`leg` `None`: the UA forgot the leg).
    Connected { leg: Option<Leg> },
    /// Telling the caller to hang up and dial 911: `left` more times after this one.
    Announcing { left: u32 },
    /// Finished: transferred by REFER, announced to, or the caller hung up.
    Done,
}

/// A 911 redirect in progress (see the module docs).
#[derive(Debug)]
pub(crate) struct Emergency {
    caller: Caller,
    /// `emergency.uri` (the REFER target).
    uri: Option<String>,
    timeout: Duration,
    repeats: u32,
    /// Methods still to try, in order (ends with announce).
    plan: VecDeque<EmergencyMethod>,
    /// Where the next bridge attempts call.
    routes: VecDeque<Route>,
    /// "Connecting you to 911" has played to its end.
    notice_played: bool,
    /// The audit row, once written (`None` before, or if it could not be).
    audit: Option<i64>,
    failures: Vec<String>,
    /// Who asked, when an operator did.
    operator: Option<ByOperator>,
    /// The crisis or utility line a menu's `transfer` sends the caller to; `None`: 911.
    line: Option<LineRedirect>,
    state: State,
    out: VecDeque<Out>,
}

impl Emergency {
    /// Start redirecting `caller` (who got here by `menu_path`, for `reason`): the notice
    /// plays and the audit row is written.
    pub(crate) fn start(
        config: &EmergencyConfig,
        caller: Caller,
        reason: Option<String>,
        menu_path: String,
    ) -> Emergency {
        Self::begin(config, caller, reason, menu_path, None, None)
    }

    /// Send `caller` to a crisis or utility line as the menu sends them to 911: `config`
    /// holds the line's URI as its only route (no `uri`: straight to the announcement), the
    /// audit row names the line.
    pub(crate) fn to_line(
        config: &EmergencyConfig,
        caller: Caller,
        line: LineRedirect,
        menu_path: String,
    ) -> Emergency {
        Self::begin(config, caller, None, menu_path, None, Some(line))
    }

    /// The line this redirect goes to, when it is not 911.
    pub(crate) fn line(&self) -> Option<&LineRedirect> {
        self.line.as_ref()
    }

    /// Start a redirect operator `by` asked for: as [`Emergency::start`], with the operator
    /// in the audit, and [`Out::BackToOperator`] where the menu's redirect would announce.
    pub(crate) fn for_operator(
        config: &EmergencyConfig,
        caller: Caller,
        reason: Option<String>,
        menu_path: String,
        by: ByOperator,
    ) -> Emergency {
        Self::begin(config, caller, reason, menu_path, Some(by), None)
    }

    fn begin(
        config: &EmergencyConfig,
        caller: Caller,
        reason: Option<String>,
        menu_path: String,
        operator: Option<ByOperator>,
        line: Option<LineRedirect>,
    ) -> Emergency {
        let mut plan: VecDeque<EmergencyMethod> = config.plan().into();
        let consult = operator.as_ref().is_some_and(|o| o.consult);
        if consult {
            // The operator's phone is the one calling: nobody to REFER, nothing to announce.
            plan.retain(|m| *m == EmergencyMethod::Bridge);
        }
        let destination = line.as_ref().map(|l| l.name.clone());
        warn!(?reason, %menu_path, plan = ?plan, operator = operator.as_ref().map(|o| o.agent.as_str()), destination = destination.as_deref().unwrap_or("911"), "redirecting caller");
        let method = plan.front().copied().unwrap_or(EmergencyMethod::Announce);
        let audit = EmergencyAudit {
            caller: Some(caller.number.clone()),
            call_id: caller.call_id.clone(),
            menu_path,
            reason,
            method: method.as_str().to_owned(),
            caller_verified: caller.asserted.is_some(),
            operator: operator.as_ref().map(|o| o.agent.clone()),
            requested_via: operator.as_ref().map(|o| o.via.to_owned()),
            destination,
        };
        let out = if consult {
            VecDeque::from([Out::WriteAudit(audit)])
        } else {
            VecDeque::from([Out::Stop, Out::Play(Sound::Notice), Out::WriteAudit(audit)])
        };
        Emergency {
            operator,
            line,
            notice_played: consult,
            out,
            uri: config.uri.clone(),
            timeout: Duration::from_secs(config.timeout_seconds),
            repeats: config.announce_repeats.max(1),
            plan,
            routes: config
                .bridge_targets()
                .into_iter()
                .map(Route::new)
                .collect(),
            audit: None,
            failures: Vec::new(),
            state: State::Auditing,
            caller,
        }
    }

    /// Whether the redirect is over without reaching 911 (the caller went back to the
    /// operator) or with the call ended.
    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The caller is ringing 911 (a leg is out and has not answered).
    #[cfg(test)]
    pub(crate) fn ringing(&self) -> bool {
        matches!(self.state, State::Bridging { leg: Some(_), .. })
    }

    /// The next thing the redirect asks of the call.
    pub(crate) fn poll(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    /// When [`Emergency::on_timeout`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Referring { until, .. } | State::Bridging { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// Where the caller's bridge goes: the 911 leg's answer, or its early media.
    pub(crate) fn bridge(&self) -> Option<BridgeTo> {
        let leg = self.leg()?;
        Some(BridgeTo {
            leg: leg.id,
            media: leg.media()?,
            // A PSAP's audio is never refused for where it comes from.
            scope: LatchScope::Anywhere,
            answered: leg.answered.is_some(),
            operator: false,
            record: false,
        })
    }

    /// The caller is bridged to 911 (it answered).
    pub(crate) fn connected(&self) -> bool {
        self.leg().is_some_and(|l| l.answered.is_some())
    }

    /// The 911 side holds the call.
    pub(crate) fn holds(&self) -> bool {
        self.leg().is_some_and(Leg::holds)
    }

    fn leg(&self) -> Option<&Leg> {
        match &self.state {
            State::Bridging { leg, .. } | State::Connected { leg } => leg.as_ref(),
            _ => None,
        }
    }

    fn leg_mut(&mut self, id: LegId) -> Option<&mut Leg> {
        match &mut self.state {
            State::Bridging { leg, .. } | State::Connected { leg } => {
                leg.as_mut().filter(|l| l.id == id)
            }
            _ => None,
        }
    }

    /// The audit row is durable (`Some(id)`), or could not be written: the redirect goes
    /// ahead either way.
    pub(crate) fn audited(&mut self, now: Instant, id: Option<i64>, ids: &mut LegIds) {
        self.audit = id;
        if matches!(self.state, State::Auditing) {
            self.state = State::Next;
            self.advance(now, ids);
        }
    }

    /// What the call queued has played to its end (the notice, an announcement, ringback).
    pub(crate) fn played(&mut self, now: Instant, ids: &mut LegIds) {
        let notice_ended = !std::mem::replace(&mut self.notice_played, true);
        match &mut self.state {
            State::Auditing | State::Referring { .. } | State::Connected { .. } | State::Done => {}
            State::Next => self.advance(now, ids),
            State::Announcing { left } => {
                if *left > 1 {
                    *left -= 1;
                    self.out.push_back(Out::Play(Sound::Announcement));
                } else {
                    self.finish("announced");
                    self.state = State::Done;
                    self.out.push_back(Out::End);
                }
            }
            // The 911 leg rings on: so does the caller's line (see `prompt::ringback`), or the
            // caller hears the early media the 911 side offered while the notice played.
            State::Bridging { leg, held, .. } => {
                let held = if notice_ended { held.take() } else { None };
                if let Some(l) = leg.as_mut().filter(|l| l.answered.is_none()) {
                    if let Some(media) = held {
                        info!(codec = ?media.0.codec, "911 side's early media relayed to the caller");
                        l.early = Some(media);
                    }
                    self.out.push_back(Out::Play(Sound::Ringback));
                }
            }
        }
    }

    /// The final response to our REFER.
    pub(crate) fn refer_answered(&mut self, now: Instant, code: u16, ids: &mut LegIds) {
        let State::Referring { accepted, .. } = &mut self.state else {
            return;
        };
        if (200..300).contains(&code) {
            *accepted = true;
            info!(code, "REFER accepted; waiting for the transfer's outcome");
        } else {
            self.failed(now, &format!("REFER answered {code}"), ids);
        }
    }

    /// A NOTIFY of the REFER's progress (`message/sipfrag`: `SIP/2.0 200 OK`).
    pub(crate) fn refer_notify(&mut self, now: Instant, body: &[u8], ids: &mut LegIds) {
        if !matches!(self.state, State::Referring { .. }) {
            return;
        }
        let text = String::from_utf8_lossy(body);
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        match code {
            100..=199 => debug!(code, "911 transfer in progress"),
            200..=299 => {
                info!("caller transferred to 911");
                self.finish("connected");
                self.state = State::Done;
                self.out.push_back(Out::End);
            }
            _ => self.failed(now, &format!("transfer failed: {}", text.trim()), ids),
        }
    }

    /// The 911 leg's INVITE went out (or could not).
    pub(crate) fn placed(
        &mut self,
        now: Instant,
        id: LegId,
        placed: Result<Placed, NotPlaced>,
        ids: &mut LegIds,
    ) {
        let State::Bridging {
            route,
            leg: Some(leg),
            ..
        } = &mut self.state
        else {
            return;
        };
        if leg.id != id {
            return;
        }
        let placed = match placed {
            Ok(p) => p,
            Err(why) => {
                self.forget_leg();
                self.failed(now, &why.to_string(), ids);
                return;
            }
        };
        leg.sdp = Some(placed.sdp);
        if let Some(Ok(all)) = placed
            .looked_up
            .filter(|a| a.as_ref().is_ok_and(|a| !a.is_empty()))
        {
            // This attempt called the first address; each other becomes an attempt of its own,
            // next in line (before the backup routes).
            route.at = Some(all[0]);
            route.of = all.len();
            for &a in all[1..].iter().rev() {
                let next = Route {
                    at: Some(a),
                    ..route.clone()
                };
                self.routes.push_front(next);
                self.plan.push_front(EmergencyMethod::Bridge);
            }
            if all.len() > 1 {
                info!(uri = %route.uri, addresses = ?all, "911 route has several addresses; the next is tried if one is down");
            }
        }
        // From the INVITE on, the caller hears ringing until 911 answers (after the notice,
        // if it is still playing: see `played`).
        if self.notice_played {
            self.out.push_back(Out::Play(Sound::Ringback));
        }
    }

    /// An event of leg `id` (`None`: the UA forgot the leg).
    pub(crate) fn on_leg_event(
        &mut self,
        now: Instant,
        id: LegId,
        ev: Option<LegEvent>,
        ids: &mut LegIds,
    ) {
        if self.leg_mut(id).is_none() {
            return;
        }
        let Some(ev) = ev else {
            self.forget_leg();
            return;
        };
        match ev {
            LegEvent::Provisional { code, sdp } => {
                debug!(code, early_media = sdp.is_some(), "911 leg ringing");
                // The address answers: it is up, and its name's other addresses are not needed
                // (whatever it says next, RFC 3263 section 4.3).
                self.skip_other_addresses();
                // Early media (RFC 3960): what the 911 side plays before it answers (its
                // ringback, "all lines are busy, stay on the line") is what the caller must
                // hear, in place of our own ringback, which fills in while it sends nothing.
                let early = sdp.and_then(|b| leg_answer(&b).ok());
                let notice_playing = !self.notice_played;
                let timeout = self.timeout;
                if let State::Bridging {
                    leg: Some(l),
                    until,
                    held,
                    ..
                } = &mut self.state
                {
                    *until = now + timeout;
                    match early {
                        // "Connecting you to 911" is heard to its end first.
                        Some(media) if notice_playing => {
                            debug!(codec = ?media.0.codec, "911 side offers early media; relayed once the notice has played");
                            *held = Some(media);
                        }
                        Some(media) if l.answered.is_none() && l.early != Some(media) => {
                            info!(codec = ?media.0.codec, "911 side offers early media; relayed to the caller");
                            l.early = Some(media);
                        }
                        _ => {}
                    }
                }
            }
            LegEvent::Answered { sdp: body } => match leg_answer(&body) {
                // A second 2xx (a forked INVITE answered twice): the UA BYEs it.
                Ok(_) | Err(_) if matches!(self.state, State::Connected { .. }) => {}
                Ok(media) => {
                    info!(codec = ?media.0.codec, "911 answered; caller bridged");
                    let leg = match std::mem::replace(&mut self.state, State::Done) {
                        State::Bridging { leg, .. } | State::Connected { leg } => leg,
                        _ => None,
                    };
                    self.state = State::Connected {
                        leg: leg.map(|l| Leg {
                            answered: Some(media),
                            ..l
                        }),
                    };
                    self.out.push_back(Out::Stop);
                    self.finish("connected");
                }
                Err(e) => {
                    self.out.push_back(Out::DropLeg {
                        leg: id,
                        hang_up: true,
                    });
                    self.forget_leg();
                    self.failed(now, &format!("unusable answer: {e}"), ids);
                }
            },
            LegEvent::Failed { .. } if !matches!(self.state, State::Bridging { .. }) => {}
            LegEvent::Failed { code, reason } => {
                self.out.push_back(Out::DropLeg {
                    leg: id,
                    hang_up: false,
                });
                self.forget_leg();
                if !matches!(code, 408 | 503) {
                    self.skip_other_addresses();
                }
                self.failed(now, &format!("answered {code} {reason}"), ids);
            }
            LegEvent::Dialog(DialogEvent::Bye) => {
                info!("911 side hung up");
                self.out.push_back(Out::DropLeg {
                    leg: id,
                    hang_up: false,
                });
                self.forget_leg();
                self.out.push_back(Out::End);
            }
            LegEvent::Dialog(DialogEvent::Reoffer {
                txn, method, body, ..
            }) => {
                let Some(l) = self.leg_mut(id) else { return };
                let was_held = l.holds();
                let current = l.media().map_or(
                    sdp::Negotiated {
                        codec: Codec::Pcmu,
                        payload_type: 0,
                        telephone_event: Some(101),
                        direction: sdp::Direction::SendRecv,
                    },
                    |(n, _)| n,
                );
                let Some(ours) = l.sdp.as_mut() else { return };
                let reoffer = ours.reoffer(&method, &body, &current);
                if let LegReoffer::Answer { neg, addr, .. } = reoffer {
                    if l.answered.is_some() {
                        l.answered = Some((neg, addr));
                    } else {
                        // The 911 side's early media moved.
                        l.early = Some((neg, addr));
                    }
                }
                let (code, body) = reoffer.response();
                let held = l.holds();
                self.out.push_back(Out::Reply {
                    leg: id,
                    txn,
                    code,
                    body,
                });
                if held != was_held {
                    self.out.push_back(Out::Held(held));
                }
            }
            LegEvent::Dialog(DialogEvent::Confirmed { sdp: body }) => {
                let Some(l) = self.leg_mut(id) else { return };
                let was_held = l.holds();
                if let Some(ours) = l.sdp.as_mut() {
                    ours.ack(&body, &mut l.answered);
                }
                let held = l.holds();
                if held != was_held {
                    self.out.push_back(Out::Held(held));
                }
            }
            LegEvent::Dialog(_) => {}
        }
    }

    /// Time passed: the REFER or the bridge got no answer in time.
    pub(crate) fn on_timeout(&mut self, now: Instant, ids: &mut LegIds) {
        if self.next_deadline().is_some_and(|at| now >= at) {
            self.failed(now, "no answer in time", ids);
        }
    }

    /// The call ends (for any reason; `caller_hung_up` when the caller hung up): the outcome
    /// is recorded if it was not yet, and the 911 leg let go of.
    pub(crate) fn end_call(&mut self, caller_hung_up: bool) {
        if caller_hung_up && !matches!(self.state, State::Connected { .. } | State::Done) {
            let outcome = if matches!(self.state, State::Referring { accepted: true, .. }) {
                "caller left during transfer"
            } else {
                "caller hung up"
            };
            self.finish(outcome);
        }
        if let Some(l) = self.leg() {
            let leg = l.id;
            self.out.push_back(Out::DropLeg { leg, hang_up: true });
        }
        self.state = State::Done;
    }

    /// The leg is gone (failed, hung up, or forgotten by the UA).
    fn forget_leg(&mut self) {
        if let State::Bridging { leg, .. } | State::Connected { leg } = &mut self.state {
            *leg = None;
        }
    }

    /// Start the next method: a bridge at once (its INVITE goes out while "connecting you to
    /// 911" plays), a REFER or the announcement once the notice has played (a REFER takes the
    /// caller's phone out of the call, so the notice comes first).
    fn advance(&mut self, now: Instant, ids: &mut LegIds) {
        if !matches!(self.state, State::Next) {
            return;
        }
        let next = self
            .plan
            .front()
            .copied()
            .unwrap_or(EmergencyMethod::Announce);
        if next != EmergencyMethod::Bridge && !self.notice_played {
            return;
        }
        let method = self.plan.pop_front().unwrap_or(EmergencyMethod::Announce);
        match method {
            EmergencyMethod::Refer => {
                let uri = self.uri.clone().unwrap_or_default();
                info!(%uri, "REFER to 911");
                self.state = State::Referring {
                    until: now + self.timeout,
                    accepted: false,
                };
                self.out.push_back(Out::Refer {
                    headers: vec![
                        ("Refer-To".into(), format!("<{uri}>")),
                        (
                            "Referred-By".into(),
                            format!("<sip:311@{}>", self.caller.local_ip),
                        ),
                    ],
                });
            }
            EmergencyMethod::Bridge => self.bridge_next(now, ids),
            EmergencyMethod::Announce if self.operator.is_some() => self.back_to_operator(),
            EmergencyMethod::Announce => {
                info!("announcing: hang up and dial 911");
                self.state = State::Announcing { left: self.repeats };
                self.out.push_back(Out::Play(Sound::Announcement));
            }
        }
    }

    /// Every route of a redirect an operator asked for failed: the caller goes back to the
    /// operator, and the audit says so.
    fn back_to_operator(&mut self) {
        warn!(
            failures = ?self.failures,
            "every 911 route failed; the caller goes back to the operator"
        );
        self.out.push_back(Out::Counted {
            method: "operator",
            outcome: "returned to operator",
        });
        if let Some(id) = self.audit {
            let mut text = "returned to operator".to_owned();
            if !self.failures.is_empty() {
                text.push_str(&format!(" after {}", self.failures.join("; ")));
            }
            self.out.push_back(Out::AuditOutcome { id, outcome: text });
        }
        self.state = State::Done;
        self.out.push_back(Out::BackToOperator);
    }

    /// Call the next 911 route (see the module docs for whose number it carries).
    fn bridge_next(&mut self, now: Instant, ids: &mut LegIds) {
        let Some(route) = self.routes.pop_front() else {
            warn!(
                reason = "no route left",
                "911 method failed; trying the next"
            );
            if self.notice_played {
                self.out.push_back(Out::Stop);
            }
            self.failures.push("bridge: no route left".into());
            self.state = State::Next;
            self.advance(now, ids);
            return;
        };
        // A healthy trunk rings or answers within moments; one that says nothing for a few
        // seconds is down, and the caller must not wait on it.
        let until = now + BRIDGE_FIRST_RESPONSE.min(self.timeout);
        let headers = vec![
            ("X-311-Call-ID".to_owned(), self.caller.call_id.clone()),
            ("X-311-Language".to_owned(), self.caller.language.clone()),
        ];
        let from_user = match &self.caller.asserted {
            Some(number) => number.clone(),
            None => {
                info!("the caller's number is not verified: 911 is not told it");
                self.caller.line.clone()
            }
        };
        info!(uri = %route.uri, "bridging the caller to 911");
        let id = ids.next();
        let place = PlaceLeg {
            leg: id,
            to: Dial::Uri {
                uri: route.uri.clone(),
                at: route.at,
                pick: 0,
            },
            from_user,
            from_display: "311 caller",
            asserted: self.caller.asserted.clone(),
            headers,
            codec: self.caller.codec,
            local_ip: self.caller.local_ip,
            span: tracing::info_span!("emergency_leg", uri = %route.uri),
        };
        self.state = State::Bridging {
            route,
            leg: Some(Leg {
                id,
                sdp: None,
                early: None,
                answered: None,
            }),
            until,
            held: None,
        };
        self.out.push_back(Out::Place(Box::new(place)));
    }

    /// The current 911 route answered for itself (a final response other than 408 or 503, or
    /// ringing; RFC 3263 section 4.3): its name's other addresses would say the same, so they
    /// are not tried; the backup routes still are.
    fn skip_other_addresses(&mut self) {
        let State::Bridging { route, .. } = &self.state else {
            return;
        };
        while self
            .routes
            .front()
            .is_some_and(|r| r.uri == route.uri && r.at.is_some())
        {
            self.routes.pop_front();
            if let Some(i) = self.plan.iter().position(|m| *m == EmergencyMethod::Bridge) {
                self.plan.remove(i);
            }
        }
    }

    /// The current method failed (`why`): the next one.
    fn failed(&mut self, now: Instant, why: &str, ids: &mut LegIds) {
        let state = std::mem::replace(&mut self.state, State::Next);
        // A leg still ringing is CANCELled.
        if let State::Bridging { leg: Some(l), .. } = &state {
            if l.answered.is_none() {
                self.out.push_back(Out::DropLeg {
                    leg: l.id,
                    hang_up: true,
                });
            }
        }
        // Ringback for a leg that failed stops; the next method brings its own sound. The
        // notice, if it is still playing (a route that failed at once), is heard to its end.
        if self.notice_played {
            self.out.push_back(Out::Stop);
        }
        let failure = match &state {
            State::Bridging { route, .. } => {
                warn!(method = "bridge", target = %route, reason = why, "911 method failed; trying the next");
                format!("bridge to {route}: {why}")
            }
            State::Referring { .. } => {
                warn!(
                    method = "refer",
                    reason = why,
                    "911 method failed; trying the next"
                );
                format!("refer: {why}")
            }
            State::Announcing { .. } => format!("announce: {why}"),
            _ => format!("?: {why}"),
        };
        self.failures.push(failure);
        self.advance(now, ids);
    }

    /// The method that is being (or was last) tried, for the outcome.
    fn method(&self) -> EmergencyMethod {
        match self.state {
            State::Referring { .. } => EmergencyMethod::Refer,
            State::Bridging { .. } | State::Connected { .. } => EmergencyMethod::Bridge,
            State::Announcing { .. } => EmergencyMethod::Announce,
            State::Auditing | State::Next | State::Done => self
                .plan
                .front()
                .copied()
                .unwrap_or(EmergencyMethod::Announce),
        }
    }

    /// Record the outcome (`connected`, `announced`, `caller hung up`...): counted, and on the
    /// audit row with the method and what failed before it.
    fn finish(&mut self, outcome: &'static str) {
        let method = self.method().as_str();
        self.out.push_back(Out::Counted { method, outcome });
        let mut text = format!("{outcome} via {method}");
        if !self.failures.is_empty() {
            text.push_str(&format!(" after {}", self.failures.join("; ")));
        }
        if let Some(id) = self.audit {
            self.out.push_back(Out::AuditOutcome { id, outcome: text });
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every path of the redirect on virtual time: `now` is an `Instant` the test moves.

    use super::*;
    use crate::dispatch::emergency::EmergencyMethod::{Announce, Bridge};

    const PSAP: &str = "sip:911@psap.example.gov";
    const BACKUP: &str = "sip:911@198.51.100.20";

    fn config(method: Option<EmergencyMethod>, backups: &[&str]) -> EmergencyConfig {
        EmergencyConfig {
            method,
            uri: Some(PSAP.into()),
            backup_uris: backups.iter().map(|s| s.to_string()).collect(),
            announce_repeats: 2,
            timeout_seconds: 30,
        }
    }

    fn caller(asserted: bool) -> Caller {
        Caller {
            call_id: "call-1@test".into(),
            number: "+12125550123".into(),
            asserted: asserted.then(|| "+12125550123".into()),
            line: "311".into(),
            language: "en".into(),
            codec: Codec::Pcma,
            local_ip: "192.0.2.1".parse().unwrap(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A redirect under test, on its own clock.
    struct Run {
        e: Emergency,
        ids: LegIds,
        t0: Instant,
        now: Instant,
    }

    impl Run {
        fn start(config: &EmergencyConfig, asserted: bool) -> (Run, Vec<Out>) {
            let t0 = Instant::now();
            let e = Emergency::start(
                config,
                caller(asserted),
                Some("caller pressed 9".into()),
                "language:1 > screening:9".into(),
            );
            let mut r = Run {
                e,
                ids: LegIds,
                t0,
                now: t0,
            };
            let out = r.out();
            (r, out)
        }

        /// A redirect operator 1001 asked for (`consult`: by calling 911 from their phone).
        fn by_operator(config: &EmergencyConfig, consult: bool) -> (Run, Vec<Out>) {
            let t0 = Instant::now();
            let by = ByOperator {
                agent: "1001".into(),
                via: if consult { "phone_call" } else { "refer" },
                consult,
            };
            let e = Emergency::for_operator(
                config,
                caller(true),
                Some("operator 1001 transferred the caller".into()),
                "language:1 > screening:1 > main:0".into(),
                by,
            );
            let mut r = Run {
                e,
                ids: LegIds,
                t0,
                now: t0,
            };
            let out = r.out();
            (r, out)
        }

        fn out(&mut self) -> Vec<Out> {
            std::iter::from_fn(|| self.e.poll()).collect()
        }

        /// Move the clock to `secs` after the start, firing what is due.
        fn at(&mut self, secs: f64) -> Vec<Out> {
            self.now = self.t0 + Duration::from_secs_f64(secs);
            self.e.on_timeout(self.now, &mut self.ids);
            self.out()
        }

        fn audited(&mut self, id: Option<i64>) -> Vec<Out> {
            self.e.audited(self.now, id, &mut self.ids);
            self.out()
        }

        fn played(&mut self) -> Vec<Out> {
            self.e.played(self.now, &mut self.ids);
            self.out()
        }

        fn placed(
            &mut self,
            leg: LegId,
            looked_up: Option<Result<Vec<SocketAddr>, String>>,
        ) -> Vec<Out> {
            let placed = Placed {
                sdp: LegSdp::new(addr("192.0.2.1:40000")),
                toward: None,
                looked_up,
            };
            self.e.placed(self.now, leg, Ok(placed), &mut self.ids);
            self.out()
        }

        fn leg(&mut self, leg: LegId, ev: LegEvent) -> Vec<Out> {
            self.e.on_leg_event(self.now, leg, Some(ev), &mut self.ids);
            self.out()
        }

        fn refer_answered(&mut self, code: u16) -> Vec<Out> {
            self.e.refer_answered(self.now, code, &mut self.ids);
            self.out()
        }

        fn notify(&mut self, frag: &str) -> Vec<Out> {
            self.e
                .refer_notify(self.now, frag.as_bytes(), &mut self.ids);
            self.out()
        }

        fn hang_up(&mut self) -> Vec<Out> {
            self.e.end_call(true);
            self.out()
        }
    }

    /// The leg placed, and where to.
    fn placed_leg(out: &[Out]) -> Option<(LegId, Dial)> {
        out.iter().find_map(|o| match o {
            Out::Place(p) => Some((p.leg, p.to.clone())),
            _ => None,
        })
    }

    fn place(out: &[Out]) -> &PlaceLeg {
        out.iter()
            .find_map(|o| match o {
                Out::Place(p) => Some(&**p),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no leg placed: {out:?}"))
    }

    fn outcome(out: &[Out]) -> Option<&str> {
        out.iter().find_map(|o| match o {
            Out::AuditOutcome { id: 7, outcome } => Some(outcome.as_str()),
            _ => None,
        })
    }

    fn counted(out: &[Out]) -> Option<(&'static str, &'static str)> {
        out.iter().find_map(|o| match o {
            Out::Counted { method, outcome } => Some((*method, *outcome)),
            _ => None,
        })
    }

    fn plays(out: &[Out], sound: Sound) -> bool {
        out.iter().any(|o| matches!(o, Out::Play(s) if *s == sound))
    }

    fn ends(out: &[Out]) -> bool {
        out.iter().any(|o| matches!(o, Out::End))
    }

    fn drops(out: &[Out], leg: LegId, hang_up: bool) -> bool {
        out.iter()
            .any(|o| matches!(o, Out::DropLeg { leg: l, hang_up: h } if *l == leg && *h == hang_up))
    }

    fn sdp_body(port: u16) -> Bytes {
        format!("v=0\r\no=psap 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio {port} RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\n").into()
    }

    fn failed(code: u16, reason: &str) -> LegEvent {
        LegEvent::Failed {
            code,
            reason: reason.into(),
        }
    }

    fn ringing(sdp: Option<Bytes>) -> LegEvent {
        LegEvent::Provisional { code: 183, sdp }
    }

    fn answered() -> LegEvent {
        LegEvent::Answered {
            sdp: sdp_body(4000),
        }
    }

    #[test]
    fn the_audit_is_written_first_and_nothing_starts_before_it_is_durable() {
        let (mut r, out) = Run::start(&config(Some(Bridge), &[]), true);
        assert!(matches!(out[0], Out::Stop));
        assert!(plays(&out, Sound::Notice));
        let Some(Out::WriteAudit(a)) = out.iter().find(|o| matches!(o, Out::WriteAudit(_))) else {
            panic!("{out:?}")
        };
        assert_eq!(a.method, "bridge");
        assert_eq!(a.menu_path, "language:1 > screening:9");
        assert_eq!(a.reason.as_deref(), Some("caller pressed 9"));
        assert!(a.caller_verified);
        assert!(placed_leg(&out).is_none(), "no INVITE before the audit row");
        // The notice ending before the audit is durable starts nothing either.
        assert!(r.played().is_empty());
        assert_eq!(r.e.next_deadline(), None);
        // Durable: the bridge's INVITE leaves at once.
        let out = r.audited(Some(7));
        assert!(placed_leg(&out).is_some(), "{out:?}");
    }

    #[test]
    fn an_operators_redirect_names_them_and_returns_the_caller_when_every_route_fails() {
        let (mut r, out) = Run::by_operator(&config(Some(Bridge), &[BACKUP]), false);
        assert!(plays(&out, Sound::Notice), "the caller hears 911 is called");
        let Some(Out::WriteAudit(a)) = out.iter().find(|o| matches!(o, Out::WriteAudit(_))) else {
            panic!("{out:?}")
        };
        assert_eq!(a.operator.as_deref(), Some("1001"));
        assert_eq!(a.requested_via.as_deref(), Some("refer"));
        let out = r.audited(Some(7));
        let (first, _) = placed_leg(&out).unwrap();
        r.placed(first, None);
        r.played();
        let out = r.leg(first, failed(503, "Service Unavailable"));
        let (second, to) = placed_leg(&out).expect("the backup route");
        assert!(matches!(to, Dial::Uri { uri, .. } if uri == BACKUP));
        r.placed(second, None);
        let out = r.leg(second, failed(486, "Busy Here"));
        assert!(
            !plays(&out, Sound::Announcement),
            "no announcement: {out:?}"
        );
        assert!(
            out.iter().any(|o| matches!(o, Out::BackToOperator)),
            "{out:?}"
        );
        assert!(!ends(&out));
        assert_eq!(counted(&out), Some(("operator", "returned to operator")));
        assert_eq!(
            outcome(&out),
            Some("returned to operator after bridge to sip:911@psap.example.gov: answered 503 Service Unavailable; bridge to sip:911@198.51.100.20: answered 486 Busy Here")
        );
        assert!(r.e.is_done() && r.e.next_deadline().is_none());
        // No route configured at all: straight back, never a refusal.
        let (mut r, _) = Run::by_operator(&EmergencyConfig::default(), false);
        r.audited(Some(7));
        let out = r.played();
        assert!(
            out.iter().any(|o| matches!(o, Out::BackToOperator)),
            "{out:?}"
        );
    }

    #[test]
    fn an_operators_own_call_to_911_tries_the_bridge_routes_only_and_plays_nothing() {
        // REFER first in the config: a consultation has nobody to REFER.
        let (mut r, out) = Run::by_operator(&config(None, &[]), true);
        assert!(!plays(&out, Sound::Notice), "{out:?}");
        let Some(Out::WriteAudit(a)) = out.iter().find(|o| matches!(o, Out::WriteAudit(_))) else {
            panic!("{out:?}")
        };
        assert_eq!(
            (a.method.as_str(), a.requested_via.as_deref()),
            ("bridge", Some("phone_call"))
        );
        let out = r.audited(Some(7));
        let p = place(&out);
        assert_eq!(
            p.asserted.as_deref(),
            Some("+12125550123"),
            "the caller's number"
        );
        let leg = p.leg;
        r.placed(leg, None);
        assert!(r.e.ringing());
        let out = r.leg(leg, answered());
        assert_eq!(counted(&out), Some(("bridge", "connected")));
        assert!(r.e.connected());
    }

    #[test]
    fn a_failed_audit_write_does_not_hold_the_redirect_back() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let out = r.audited(None);
        let (leg, _) = placed_leg(&out).expect("the bridge goes ahead");
        r.placed(leg, None);
        let out = r.leg(leg, answered());
        assert_eq!(counted(&out), Some(("bridge", "connected")));
        assert!(
            !out.iter().any(|o| matches!(o, Out::AuditOutcome { .. })),
            "no row to record the outcome on: {out:?}"
        );
    }

    #[test]
    fn the_bridge_invites_during_the_notice_and_the_caller_hears_ringing_after_it() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let out = r.audited(Some(7));
        let p = place(&out);
        let leg = p.leg;
        assert_eq!(
            p.to,
            Dial::Uri {
                uri: PSAP.into(),
                at: None,
                pick: 0
            }
        );
        // The verified number goes to 911, in From and P-Asserted-Identity.
        assert_eq!(p.from_user, "+12125550123");
        assert_eq!(p.asserted.as_deref(), Some("+12125550123"));
        assert_eq!(p.codec, Codec::Pcma);
        assert!(p
            .headers
            .contains(&("X-311-Call-ID".to_owned(), "call-1@test".to_owned())));
        // The notice is still playing: no ringback over it.
        let out = r.placed(leg, None);
        assert!(!plays(&out, Sound::Ringback), "{out:?}");
        let out = r.played();
        assert!(plays(&out, Sound::Ringback), "{out:?}");
        // Ringback loops while the leg rings.
        assert!(plays(&r.played(), Sound::Ringback));
        let out = r.leg(leg, answered());
        assert!(matches!(out[0], Out::Stop), "{out:?}");
        assert_eq!(counted(&out), Some(("bridge", "connected")));
        assert_eq!(outcome(&out), Some("connected via bridge"));
        let b = r.e.bridge().expect("bridged");
        assert!(b.answered && !b.operator && b.scope == LatchScope::Anywhere);
        assert_eq!(b.media.1, addr("198.51.100.7:4000"));
        assert!(r.e.connected());
        assert_eq!(r.e.next_deadline(), None);
        // The caller hanging up later records nothing more; the leg is hung up.
        let out = r.hang_up();
        assert!(counted(&out).is_none() && drops(&out, leg, true), "{out:?}");
    }

    #[test]
    fn a_claimed_number_is_not_told_to_911_but_the_caller_is_connected() {
        let (mut r, out) = Run::start(&config(Some(Bridge), &[]), false);
        let Some(Out::WriteAudit(a)) = out.iter().find(|o| matches!(o, Out::WriteAudit(_))) else {
            panic!()
        };
        assert!(!a.caller_verified);
        assert_eq!(a.caller.as_deref(), Some("+12125550123"));
        let out = r.audited(Some(7));
        let p = place(&out);
        assert_eq!(p.from_user, "311");
        assert_eq!(p.asserted, None);
    }

    #[test]
    fn a_silent_route_costs_five_seconds_and_a_ringing_one_its_timeout() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[BACKUP]), true);
        let out = r.audited(Some(7));
        let (first, _) = placed_leg(&out).unwrap();
        r.placed(first, None);
        r.played();
        assert_eq!(
            r.e.next_deadline(),
            Some(r.t0 + BRIDGE_FIRST_RESPONSE),
            "a trunk that says nothing is down"
        );
        assert!(r.at(4.9).is_empty());
        let out = r.at(5.0);
        assert!(
            drops(&out, first, true),
            "the silent leg is CANCELled: {out:?}"
        );
        let (second, to) = placed_leg(&out).expect("the backup route");
        assert_eq!(
            to,
            Dial::Uri {
                uri: BACKUP.into(),
                at: None,
                pick: 0
            }
        );
        r.placed(second, None);
        // Ringing: it has the whole timeout to answer.
        r.at(6.0);
        r.leg(second, ringing(None));
        assert_eq!(r.e.next_deadline(), Some(r.t0 + Duration::from_secs(36)));
        assert!(r.at(35.0).is_empty());
        let out = r.at(36.0);
        assert!(drops(&out, second, true));
        assert!(
            plays(&out, Sound::Announcement),
            "then the announcement: {out:?}"
        );
        r.played();
        let out = r.played();
        assert_eq!(counted(&out), Some(("announce", "announced")));
        assert_eq!(
            outcome(&out),
            Some(&*format!(
                "announced via announce after bridge to {PSAP}: no answer in time; bridge to {BACKUP}: no answer in time"
            ))
        );
        assert!(ends(&out));
    }

    #[test]
    fn refer_after_the_notice_then_the_notify_says_it_is_done() {
        let (mut r, out) = Run::start(&config(None, &[]), true);
        let Some(Out::WriteAudit(a)) = out.iter().find(|o| matches!(o, Out::WriteAudit(_))) else {
            panic!()
        };
        assert_eq!(a.method, "refer");
        // Durable, but the REFER waits for the notice: it takes the phone out of the call.
        assert!(r.audited(Some(7)).is_empty());
        let out = r.played();
        let Some(Out::Refer { headers }) = out.first() else {
            panic!("{out:?}")
        };
        assert!(headers.contains(&("Refer-To".into(), format!("<{PSAP}>"))));
        assert!(headers.contains(&("Referred-By".into(), "<sip:311@192.0.2.1>".into())));
        assert_eq!(r.e.next_deadline(), Some(r.t0 + Duration::from_secs(30)));
        assert!(r.refer_answered(202).is_empty());
        assert!(r.notify("SIP/2.0 100 Trying\r\n").is_empty());
        let out = r.notify("SIP/2.0 200 OK\r\n");
        assert_eq!(counted(&out), Some(("refer", "connected")));
        assert_eq!(outcome(&out), Some("connected via refer"));
        assert!(ends(&out));
        // Nothing is recorded twice.
        assert!(r.hang_up().is_empty());
    }

    #[test]
    fn a_refused_refer_falls_back_to_the_bridge_then_the_announcement() {
        let (mut r, _) = Run::start(&config(None, &[]), true);
        r.audited(Some(7));
        r.played();
        let out = r.refer_answered(501);
        assert!(matches!(out[0], Out::Stop), "{out:?}");
        let (leg, _) = placed_leg(&out).expect("the bridge next");
        // The notice has played: ringback as soon as the INVITE is out.
        assert!(plays(&r.placed(leg, None), Sound::Ringback));
        let out = r.leg(leg, failed(503, "Service Unavailable"));
        assert!(drops(&out, leg, false));
        assert!(plays(&out, Sound::Announcement));
        r.played();
        let out = r.played();
        assert_eq!(
            outcome(&out),
            Some(&*format!(
                "announced via announce after refer: REFER answered 501; bridge to {PSAP}: answered 503 Service Unavailable"
            ))
        );
    }

    #[test]
    fn a_refer_with_no_outcome_in_time_or_a_failed_transfer_is_a_failure() {
        for (what, fail) in [
            ("timeout", None),
            ("notify", Some("SIP/2.0 486 Busy Here\r\n")),
        ] {
            let (mut r, _) = Run::start(&config(None, &[]), true);
            r.audited(Some(7));
            r.played();
            r.refer_answered(202);
            let out = match fail {
                None => r.at(30.0),
                Some(frag) => r.notify(frag),
            };
            let (leg, _) = placed_leg(&out).unwrap_or_else(|| panic!("{what}: {out:?}"));
            r.placed(leg, None);
            let out = r.leg(leg, answered());
            let want = match fail {
                None => "connected via bridge after refer: no answer in time".to_owned(),
                Some(_) => {
                    "connected via bridge after refer: transfer failed: SIP/2.0 486 Busy Here"
                        .to_owned()
                }
            };
            assert_eq!(outcome(&out), Some(want.as_str()), "{what}");
        }
    }

    #[test]
    fn a_name_with_several_addresses_is_tried_at_the_next_after_no_answer_408_or_503() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[BACKUP]), true);
        let out = r.audited(Some(7));
        let (first, _) = placed_leg(&out).unwrap();
        let all = vec![
            addr("203.0.113.1:5060"),
            addr("203.0.113.2:5060"),
            addr("203.0.113.3:5060"),
        ];
        r.placed(first, Some(Ok(all.clone())));
        r.played();
        // The first address says nothing: the next one, not the backup route.
        let out = r.at(5.0);
        let (second, to) = placed_leg(&out).unwrap();
        assert_eq!(
            to,
            Dial::Uri {
                uri: PSAP.into(),
                at: Some(all[1]),
                pick: 0
            }
        );
        r.placed(second, None);
        let out = r.leg(second, failed(408, "Request Timeout"));
        let (third, to) = placed_leg(&out).unwrap();
        assert!(
            matches!(to, Dial::Uri { at: Some(a), .. } if a == all[2]),
            "{to:?}"
        );
        r.placed(third, None);
        let out = r.leg(third, failed(503, "Service Unavailable"));
        let (fourth, to) = placed_leg(&out).unwrap();
        assert!(
            matches!(&to, Dial::Uri { uri, at: None, .. } if uri == BACKUP),
            "then the backup route: {to:?}"
        );
        r.placed(fourth, None);
        let out = r.leg(fourth, answered());
        assert_eq!(
            outcome(&out),
            Some(&*format!(
                "connected via bridge after bridge to {PSAP} at 203.0.113.1:5060: no answer in time; bridge to {PSAP} at 203.0.113.2:5060: answered 408 Request Timeout; bridge to {PSAP} at 203.0.113.3:5060: answered 503 Service Unavailable"
            ))
        );
    }

    #[test]
    fn an_address_that_answers_for_itself_ends_its_names_turn() {
        // A refusal (486) speaks for every address of the name.
        let (mut r, _) = Run::start(&config(Some(Bridge), &[BACKUP]), true);
        let (first, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(
            first,
            Some(Ok(vec![addr("203.0.113.1:5060"), addr("203.0.113.2:5060")])),
        );
        let out = r.leg(first, failed(486, "Busy Here"));
        let (_, to) = placed_leg(&out).unwrap();
        assert!(
            matches!(&to, Dial::Uri { uri, .. } if uri == BACKUP),
            "{to:?}"
        );

        // So does ringing: the address is up, and if it then never answers the next is the
        // backup route.
        let (mut r, _) = Run::start(&config(Some(Bridge), &[BACKUP]), true);
        let (first, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(
            first,
            Some(Ok(vec![addr("203.0.113.1:5060"), addr("203.0.113.2:5060")])),
        );
        r.leg(first, ringing(None));
        let out = r.at(30.0);
        let (_, to) = placed_leg(&out).unwrap();
        assert!(
            matches!(&to, Dial::Uri { uri, .. } if uri == BACKUP),
            "{to:?}"
        );
    }

    #[test]
    fn a_name_that_does_not_resolve_gives_way_to_the_backup_route() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[BACKUP]), true);
        let (first, _) = placed_leg(&r.audited(Some(7))).unwrap();
        // The lookup failed: the INVITE fails with 503 at once (the UA says why).
        r.placed(first, Some(Err("psap.example.gov: no such name".into())));
        let out = r.leg(first, failed(503, "psap.example.gov: no such name"));
        let (second, to) = placed_leg(&out).unwrap();
        assert!(matches!(&to, Dial::Uri { uri, at: None, .. } if uri == BACKUP));
        r.placed(second, None);
        let out = r.leg(second, answered());
        assert_eq!(
            outcome(&out),
            Some(&*format!(
                "connected via bridge after bridge to {PSAP}: answered 503 psap.example.gov: no such name"
            ))
        );
    }

    #[test]
    fn no_rtp_port_or_an_unusable_answer_is_a_failed_route() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[BACKUP]), true);
        let (first, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.e.placed(r.now, first, Err(NotPlaced::NoPort), &mut r.ids);
        let out = r.out();
        let (second, _) = placed_leg(&out).expect("the backup route");
        assert!(
            !drops(&out, first, true),
            "no INVITE went out: nothing to CANCEL"
        );
        r.placed(second, None);
        let out = r.leg(
            second,
            LegEvent::Answered {
                sdp: Bytes::from_static(b"v=0\r\nm=audio 4000 RTP/AVP 18\r\n"),
            },
        );
        assert!(drops(&out, second, true), "{out:?}");
        assert!(
            !plays(&out, Sound::Announcement),
            "the announcement waits for the notice: {out:?}"
        );
        r.played();
        r.played();
        let out = r.played();
        let text = outcome(&out).unwrap();
        assert!(
            text.starts_with(&format!(
                "announced via announce after bridge to {PSAP}: no RTP port free; bridge to {BACKUP}: unusable answer"
            )),
            "{text}"
        );
    }

    #[test]
    fn early_media_is_relayed_after_the_notice_and_ringback_fills_in_before_it() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let (leg, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(leg, None);
        // Offered while the notice plays: held until it has played.
        r.leg(leg, ringing(Some(sdp_body(4100))));
        assert!(
            r.e.bridge().is_none(),
            "the notice is heard to its end first"
        );
        let out = r.played();
        assert!(
            plays(&out, Sound::Ringback),
            "ringback fills the early media's silences"
        );
        let b = r.e.bridge().expect("early media bridged");
        assert!(!b.answered);
        assert_eq!(b.media.1, addr("198.51.100.7:4100"));
        // Moved early media is followed.
        r.leg(leg, ringing(Some(sdp_body(4200))));
        assert_eq!(r.e.bridge().unwrap().media.1, addr("198.51.100.7:4200"));
        r.leg(leg, answered());
        let b = r.e.bridge().unwrap();
        assert!(b.answered);
        assert_eq!(b.media.1, addr("198.51.100.7:4000"));
    }

    #[test]
    fn the_psap_hanging_up_ends_the_call() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let (leg, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(leg, None);
        r.leg(leg, answered());
        let out = r.leg(leg, LegEvent::Dialog(DialogEvent::Bye));
        assert!(drops(&out, leg, false) && ends(&out), "{out:?}");
        assert!(r.e.bridge().is_none());
    }

    #[test]
    fn a_psap_that_holds_the_caller_is_answered_and_reported() {
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let (leg, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(leg, None);
        r.leg(leg, answered());
        let hold = Bytes::from_static(b"v=0\r\no=psap 1 2 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8\r\na=sendonly\r\n");
        let out = r.leg(
            leg,
            LegEvent::Dialog(DialogEvent::Reoffer {
                txn: 3,
                method: crate::sip::message::Method::Invite,
                content_type: Some("application/sdp".into()),
                body: hold,
            }),
        );
        assert!(
            matches!(
                out[0],
                Out::Reply {
                    txn: 3,
                    code: 200,
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(matches!(out[1], Out::Held(true)), "{out:?}");
        assert!(r.e.holds());
    }

    #[test]
    fn the_caller_hanging_up_at_each_step_is_recorded_once_with_where_it_was() {
        // While the audit is written: counted; no row id to record it on yet.
        let (mut r, _) = Run::start(&config(None, &[]), true);
        let out = r.hang_up();
        assert_eq!(counted(&out), Some(("refer", "caller hung up")));
        assert!(outcome(&out).is_none());

        // Waiting for the notice to end.
        let (mut r, _) = Run::start(&config(None, &[]), true);
        r.audited(Some(7));
        assert_eq!(outcome(&r.hang_up()), Some("caller hung up via refer"));

        // After the REFER was accepted: the phone left to call 911.
        let (mut r, _) = Run::start(&config(None, &[]), true);
        r.audited(Some(7));
        r.played();
        r.refer_answered(202);
        assert_eq!(
            outcome(&r.hang_up()),
            Some("caller left during transfer via refer")
        );

        // While the bridge rings: the leg is CANCELled.
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let (leg, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(leg, None);
        let out = r.hang_up();
        assert_eq!(outcome(&out), Some("caller hung up via bridge"));
        assert!(drops(&out, leg, true));

        // During the announcement, after the bridge failed.
        let (mut r, _) = Run::start(&config(Some(Bridge), &[]), true);
        let (leg, _) = placed_leg(&r.audited(Some(7))).unwrap();
        r.placed(leg, None);
        r.leg(leg, failed(404, "Not Found"));
        r.played();
        assert_eq!(
            outcome(&r.hang_up()),
            Some(&*format!(
                "caller hung up via announce after bridge to {PSAP}: answered 404 Not Found"
            ))
        );
        // Nothing more once the call is over.
        assert!(r.hang_up().is_empty());
    }

    #[test]
    fn with_no_uri_the_instruction_is_announced_as_many_times_as_configured() {
        let config = EmergencyConfig {
            announce_repeats: 3,
            ..EmergencyConfig::default()
        };
        let (mut r, out) = Run::start(&config, true);
        let Some(Out::WriteAudit(a)) = out.iter().find(|o| matches!(o, Out::WriteAudit(_))) else {
            panic!()
        };
        assert_eq!(a.method, Announce.as_str());
        assert!(r.audited(Some(7)).is_empty(), "after the notice");
        assert!(plays(&r.played(), Sound::Announcement));
        assert!(plays(&r.played(), Sound::Announcement));
        assert!(plays(&r.played(), Sound::Announcement));
        let out = r.played();
        assert_eq!(outcome(&out), Some("announced via announce"));
        assert!(ends(&out));
    }
}
