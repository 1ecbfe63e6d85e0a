//! A transfer: an operator (or an admin) sends the caller they are talking to on to another
//! line, another operator, a queue or 911, while the caller hears ringback and the operator
//! stays on the call until the target answers.
//!
//! A sans-IO state machine ([`Transfer`]) that the call core ([`super::core`]) starts beside
//! the operator's leg when the operator's phone sends REFER ([`Via::Refer`], RFC 3515) or an
//! admin asks ([`Via::Admin`]), and that an operator's own call from their phone
//! ([`super::consult`], [`Via::PhoneCall`]) rings its target with; a consultation's
//! connected target is handed to the caller's core on an attended transfer. What the target
//! is told of the caller is a [`Context`], and [`start_for`] builds the start for either
//! side. Inputs and `now` go in, [`Out`]s come out, and
//! [`Transfer::next_deadline`] says when time matters. What it does, by target
//! ([`super::dialplan::Destination`]):
//!
//! - **a line** (`transfers` entry): an INVITE to its URI with the caller's number and
//!   context ([`Out::Place`]); ringing, then connected on its 200 ([`Connected::Line`]);
//! - **an agent**: the queue is asked first whether the agent is free to ring
//!   ([`Out::RingDirect`]: an agent on a call or paused is "busy"), then their phone is rung
//!   as an [`OperatorLeg`]; on the answer they are the caller's operator
//!   ([`Connected::Agent`]);
//! - **911**: the menu's own redirect machine ([`Emergency::for_operator`]: the configured
//!   routes with their fallback, the audit naming the operator), whose outputs pass through
//!   ([`Out::Emergency`]); connected when a route answers ([`Connected::Emergency`]); when
//!   every route fails the caller goes back ([`Out::Failed`] with 503), never to the
//!   announcement and never refused by policy;
//! - **a queue**: the queue takes the caller at its front with their wait kept
//!   ([`Out::Rejoin`], [`Connected::Queue`]).
//!
//! While a target rings the caller hears ringback, or the target's early media (a 183 with
//! SDP: [`Transfer::bridge`]). A target that says nothing for [`FIRST_RESPONSE`] is
//! unreachable (408), one that rings past its ring timeout is cancelled (480), one that
//! refuses is reported with its status (486, 603, 404...). A transfer asked for by REFER
//! reports its progress on the REFER's implicit subscription ([`Out::Notify`]: `100 Trying`,
//! then the final status).
//!
//! Where the caller goes when a transfer fails (back to the operator, or to the front of the
//! queue when the operator has hung up meanwhile) is the core's decision: this machine only
//! says that it failed and why. It never touches the caller's dialog or media, nor the
//! operator's leg: it asks, through [`Out`].

use super::emergency::{self, Emergency, LegIds};
use super::leg::{leg_answer, BridgeTo, LegEnd, LegId, Media, NotPlaced, PlaceLeg, Placed};
use super::operator_leg::{LegStep, OperatorLeg};
use crate::media::rtp::LatchScope;
use crate::sip::ua::LegEvent;
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// A transfer's id, unique on the server (`GET /admin/transfers/{id}`): random, below 2^52
/// so that JSON readers keep it exact.
pub(crate) type TransferId = u64;

/// A new [`TransferId`].
pub(crate) fn new_id() -> TransferId {
    (rand::random::<u64>() >> 12) | 1
}

/// How long a target may say nothing (no ringing, no answer) before it counts as unreachable.
pub(crate) const FIRST_RESPONSE: Duration = Duration::from_secs(5);

/// How long the REFER's implicit subscription is said to last while the transfer goes on
/// (`Subscription-State: active;expires=`); it ends with the final NOTIFY.
pub(crate) const SUBSCRIPTION_SECONDS: u64 = 60;

/// The outcome of a transfer called off for one to 911.
pub(crate) const SUPERSEDED: &str = "called off for a transfer to 911";

/// How a transfer was asked for (the audit's and the record's `requested_via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// The operator's phone sent REFER (its transfer key).
    Refer,
    /// The operator called the target from their phone and joined the caller to that call.
    PhoneCall,
    /// `POST /admin/calls/{call_id}/transfer`.
    Admin,
    /// The operator's console (`POST /console/api/call/transfer`).
    Console,
    /// A supervisor's wallboard (`POST /supervisor/api/calls/{call}/transfer`).
    Supervisor,
}

impl Via {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Via::Refer => "refer",
            Via::PhoneCall => "phone_call",
            Via::Admin => "admin",
            Via::Console => "console",
            Via::Supervisor => "supervisor",
        }
    }
}

/// What a transfer starts with (the core builds the legs: it knows the caller).
#[derive(Debug)]
pub(crate) enum Start {
    /// A `transfers` line: place this leg, ringing up to `ring`.
    Line {
        name: String,
        place: Box<PlaceLeg>,
        ring: Duration,
    },
    /// Another agent's phone: claim the agent from the queue, then place this leg.
    Agent {
        agent: String,
        place: Box<PlaceLeg>,
        ring: Duration,
    },
    /// 911: this redirect (started with [`Emergency::for_operator`]).
    Emergency(Box<Emergency>),
    /// The front of this queue.
    Queue(String),
}

/// What a transfer's target is told of the caller, and what its legs need: built by whoever
/// starts the transfer (the caller's call, or an operator's consultation from their phone).
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// The caller's call's Call-ID (the record's and the audit's).
    pub(crate) call_id: String,
    /// The caller's number as best known (From, the audit).
    pub(crate) number: String,
    /// The number a trusted trunk asserted, if any (P-Asserted-Identity onward).
    pub(crate) asserted: Option<String>,
    /// The city line's own number (From toward 911 when the caller's is not asserted).
    pub(crate) line: String,
    pub(crate) language: String,
    pub(crate) queue: String,
    /// The `X-311-*` headers, `X-311-Transferred-By` among them.
    pub(crate) headers: Vec<(String, String)>,
    /// Who asked (`admin` when no operator did).
    pub(crate) by: String,
    /// The codec offered first on the target's leg, and our address toward it.
    pub(crate) codec: crate::media::g711::Codec,
    pub(crate) local_ip: std::net::IpAddr,
}

/// How a transfer to `dest` starts (`None` for none: a queue), its legs' ids from `ids`.
pub(crate) fn start_for(
    id: TransferId,
    dest: super::dialplan::Destination,
    cx: &Context,
    via: Via,
    (emergency, agent_ring, menu_path): (
        &crate::dispatch::emergency::EmergencyConfig,
        Duration,
        &str,
    ),
    ids: &mut emergency::LegIds,
) -> Start {
    use super::dialplan::Destination;
    use super::leg::Dial;
    match dest {
        Destination::Line(l) => {
            let mut headers = cx.headers.clone();
            headers.extend(l.headers_for(&cx.language, &cx.queue, &cx.call_id));
            let span = tracing::info_span!("transfer_leg", transfer = id, line = %l.name);
            let place = PlaceLeg {
                leg: ids.next(),
                to: Dial::Uri {
                    uri: l.uri.clone(),
                    at: None,
                    pick: 0,
                },
                from_user: cx.number.clone(),
                from_display: "311 caller",
                // The caller's number is asserted onward only if a trusted trunk asserted
                // it to us.
                asserted: cx.asserted.clone(),
                headers,
                codec: cx.codec,
                local_ip: cx.local_ip,
                span,
            };
            Start::Line {
                name: l.name.clone(),
                place: Box::new(place),
                ring: Duration::from_secs(l.ring_timeout_seconds),
            }
        }
        Destination::Agent(agent) => {
            let span = tracing::info_span!("transfer_leg", transfer = id, %agent);
            let place = PlaceLeg {
                leg: ids.next(),
                to: Dial::Agent(agent.clone()),
                from_user: cx.number.clone(),
                from_display: "311 caller",
                asserted: Some(cx.number.clone()),
                headers: cx.headers.clone(),
                codec: cx.codec,
                local_ip: cx.local_ip,
                span,
            };
            Start::Agent {
                agent,
                place: Box::new(place),
                ring: agent_ring,
            }
        }
        Destination::Emergency => {
            let caller = emergency::Caller {
                call_id: cx.call_id.clone(),
                number: cx.number.clone(),
                asserted: cx.asserted.clone(),
                line: cx.line.clone(),
                language: cx.language.clone(),
                codec: cx.codec,
                local_ip: cx.local_ip,
            };
            let by = &cx.by;
            Start::Emergency(Box::new(Emergency::for_operator(
                emergency,
                caller,
                Some(format!(
                    "operator {by} transferred the caller ({})",
                    via.as_str()
                )),
                format!("{menu_path} > operator:{by}"),
                emergency::ByOperator {
                    agent: by.clone(),
                    via: via.as_str(),
                    consult: via == Via::PhoneCall,
                },
            )))
        }
        Destination::Queue(queue) => Start::Queue(queue),
    }
}

/// What the caller is connected to when a transfer succeeds: what the call becomes.
#[derive(Debug)]
pub(crate) enum Connected {
    /// A line answered: the caller talks to it until either hangs up.
    Line { leg: OperatorLeg, name: String },
    /// Another agent answered: they are the caller's operator now.
    Agent(OperatorLeg),
    /// 911 answered (the redirect goes on as the menu's does).
    Emergency(Box<Emergency>),
    /// The queue took the caller at its front.
    Queue(String),
}

/// What the transfer asks of the call.
#[derive(Debug)]
pub(crate) enum Out {
    /// Ask the queue to ring `agent` for the caller if the agent is free; answer with
    /// [`Transfer::claimed`].
    RingDirect {
        agent: String,
        ring_timeout: Duration,
    },
    /// Place the target's leg; answer with [`Transfer::placed`].
    Place(Box<PlaceLeg>),
    /// Let go of the target's leg.
    DropLeg { leg: LegId, how: LegEnd },
    /// Answer the target's re-INVITE or UPDATE.
    ReplyLeg {
        leg: LegId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    /// The agent rung directly did not take the call: the queue forgets the ring (the agent
    /// was not offered a queue's caller, so it costs them nothing).
    Withdraw(String),
    /// Ask the queue to take the caller at the front of this queue; answer with
    /// [`Transfer::queued`].
    Rejoin(String),
    /// What the 911 redirect asks (the core carries it out as for the menu's redirect).
    Emergency(emergency::Out),
    /// Tell the operator's phone how the transfer goes: a NOTIFY with this status
    /// (`message/sipfrag`), the subscription terminated with a final one.
    Notify(u16),
    /// The caller reached the target.
    Connected(Connected),
    /// The transfer failed with `code` (what the operator's phone is told), for `why`.
    Failed { code: u16, why: String },
}

/// Where the transfer is.
#[derive(Debug)]
enum State {
    /// The queue is asked whether `agent` is free to ring.
    Claiming {
        agent: String,
        place: Box<PlaceLeg>,
        ring: Duration,
    },
    /// A line's or an agent's phone is being called.
    Calling {
        leg: Box<OperatorLeg>,
        /// The agent rung (else a line).
        agent: Option<String>,
        /// The target's early media, relayed to the caller until it answers.
        early: Option<Media>,
        /// A provisional response came (the target is there).
        heard: bool,
        /// Unreachable if nothing is heard by then (set when the INVITE is out).
        first_by: Option<Instant>,
        /// The final status of a refusal, as it came.
        refused: Option<(u16, String)>,
    },
    /// 911: the redirect machine.
    Emergency(Box<Emergency>),
    /// Waiting for the queue to take the caller.
    Queueing { queue: String },
    /// Finished.
    Done,
}

/// A transfer in progress (see the module docs).
#[derive(Debug)]
pub(crate) struct Transfer {
    pub(crate) id: TransferId,
    /// Where to, as the admin API names it (`911`, `crisis`, `agent:1002`, `queue:permits`).
    pub(crate) target: String,
    /// The target's kind (a `/metrics` label: `911`, `line`, `agent`, `queue`).
    pub(crate) kind: &'static str,
    pub(crate) via: Via,
    /// The operator who asked (`None`: an admin with no operator on the call).
    pub(crate) operator: Option<String>,
    /// NOTIFYs go to the operator's phone (the transfer was asked by REFER), until the final.
    notify: bool,
    /// When it started.
    pub(crate) started: Instant,
    /// How it ended, once it has.
    pub(crate) outcome: Option<String>,
    state: State,
    out: VecDeque<Out>,
}

impl Transfer {
    /// Start a transfer to `target` (`kind`), asked `via`, by `operator`.
    pub(crate) fn start(
        now: Instant,
        id: TransferId,
        (target, kind): (String, &'static str),
        via: Via,
        operator: Option<String>,
        start: Start,
    ) -> Transfer {
        info!(transfer = id, %target, via = via.as_str(), operator = operator.as_deref(), "transfer started");
        let mut out = VecDeque::new();
        let notify = via == Via::Refer;
        if notify {
            out.push_back(Out::Notify(100));
        }
        let state = match start {
            Start::Line { name, place, ring } => {
                let leg = Box::new(OperatorLeg::dial(&place, name, ring));
                out.push_back(Out::Place(place));
                State::Calling {
                    leg,
                    agent: None,
                    early: None,
                    heard: false,
                    first_by: None,
                    refused: None,
                }
            }
            Start::Agent { agent, place, ring } => {
                out.push_back(Out::RingDirect {
                    agent: agent.clone(),
                    ring_timeout: ring,
                });
                State::Claiming { agent, place, ring }
            }
            Start::Emergency(e) => State::Emergency(e),
            Start::Queue(queue) => {
                out.push_back(Out::Rejoin(queue.clone()));
                State::Queueing { queue }
            }
        };
        Transfer {
            id,
            target,
            kind,
            via,
            operator,
            notify,
            started: now,
            outcome: None,
            state,
            out,
        }
    }

    /// The next thing the transfer asks of the call.
    pub(crate) fn poll(&mut self) -> Option<Out> {
        if let Some(o) = self.out.pop_front() {
            return Some(o);
        }
        let State::Emergency(e) = &mut self.state else {
            return None;
        };
        match e.poll() {
            Some(emergency::Out::BackToOperator) => {
                self.state = State::Done;
                self.fail(503, "every 911 route failed".into());
                self.out.pop_front()
            }
            Some(emergency::Out::End) if self.outcome.is_none() => {
                // Transferred by REFER to the caller's phone: the call is over.
                self.finish_notify(200);
                self.outcome = Some("connected".into());
                self.out.push_back(Out::Emergency(emergency::Out::End));
                self.out.pop_front()
            }
            Some(o) => Some(Out::Emergency(o)),
            None if e.connected() => {
                let State::Emergency(e) = std::mem::replace(&mut self.state, State::Done) else {
                    return None;
                };
                info!(transfer = self.id, "911 answered; the caller is connected");
                self.finish_notify(200);
                self.outcome = Some("connected".into());
                self.out.push_back(Out::Connected(Connected::Emergency(e)));
                self.out.pop_front()
            }
            None => None,
        }
    }

    /// The 911 redirect, while it is this transfer's (for its inputs).
    pub(crate) fn emergency_mut(&mut self) -> Option<&mut Emergency> {
        match &mut self.state {
            State::Emergency(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the transfer is over (connected or failed).
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// What the admin API shows: `claiming`, `calling`, `ringing`, `calling 911`,
    /// `queueing`, then the outcome.
    pub(crate) fn state_word(&self) -> &str {
        match &self.state {
            State::Claiming { .. } => "claiming",
            State::Calling { heard: false, .. } => "calling",
            State::Calling { heard: true, .. } => "ringing",
            State::Emergency(_) => "calling 911",
            State::Queueing { .. } => "queueing",
            State::Done => self.outcome.as_deref().unwrap_or("done"),
        }
    }

    /// Where the caller's bridge goes while the target rings: its early media, or the 911
    /// leg's (ringback plays otherwise).
    pub(crate) fn bridge(&self) -> Option<BridgeTo> {
        match &self.state {
            State::Calling {
                leg,
                early: Some(media),
                ..
            } => Some(BridgeTo {
                leg: leg.id,
                media: *media,
                scope: LatchScope::Anywhere,
                answered: false,
                operator: false,
                record: false,
            }),
            State::Emergency(e) => e.bridge(),
            _ => None,
        }
    }

    /// Whether the caller should hear our ringback now (the target rings with no early media
    /// of its own; 911 plays its own sounds).
    pub(crate) fn wants_ringback(&self) -> bool {
        match &self.state {
            State::Claiming { .. } | State::Queueing { .. } => true,
            State::Calling { early, .. } => early.is_none(),
            State::Emergency(_) | State::Done => false,
        }
    }

    /// When [`Transfer::on_timeout`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Calling {
                leg,
                heard,
                first_by,
                ..
            } => {
                let first = first_by.filter(|_| !heard);
                [first, leg.next_deadline()].into_iter().flatten().min()
            }
            State::Emergency(e) => e.next_deadline(),
            _ => None,
        }
    }

    /// Time passed: the target said nothing, or rang too long.
    pub(crate) fn on_timeout(&mut self, now: Instant, ids: &mut LegIds) {
        match &mut self.state {
            State::Calling {
                leg,
                heard,
                first_by,
                ..
            } => {
                if !*heard && first_by.is_some_and(|t| now >= t) {
                    warn!(transfer = self.id, target = %self.target, "transfer target did not respond; unreachable");
                    let id = leg.id;
                    leg.drop_leg();
                    self.out.push_back(Out::DropLeg {
                        leg: id,
                        how: LegEnd::HangUpAndRelease,
                    });
                    self.fail(408, "no response".into());
                    return;
                }
                if leg.on_timeout(now) == LegStep::NoAnswer {
                    let id = leg.id;
                    self.out.push_back(Out::DropLeg {
                        leg: id,
                        how: LegEnd::HangUpAndRelease,
                    });
                    self.fail(480, "no answer".into());
                }
            }
            State::Emergency(e) => e.on_timeout(now, ids),
            _ => {}
        }
    }

    /// The queue's answer to [`Out::RingDirect`]: the agent is rung, or is busy (`Err` with
    /// their state).
    pub(crate) fn claimed(&mut self, result: Result<(), &str>) {
        let State::Claiming { .. } = &self.state else {
            return;
        };
        let State::Claiming { agent, place, ring } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        match result {
            Ok(()) => {
                let leg = Box::new(OperatorLeg::dial(&place, agent.clone(), ring));
                self.out.push_back(Out::Place(place));
                self.state = State::Calling {
                    leg,
                    agent: Some(agent),
                    early: None,
                    heard: false,
                    first_by: None,
                    refused: None,
                };
            }
            Err(state) => {
                info!(transfer = self.id, %agent, state, "the agent cannot take the caller now");
                self.fail(486, format!("agent {agent} is {}", state.replace('_', " ")));
            }
        }
    }

    /// The target leg's INVITE is out (or could not be sent).
    pub(crate) fn placed(
        &mut self,
        now: Instant,
        id: LegId,
        placed: Result<Placed, NotPlaced>,
        ids: &mut LegIds,
    ) {
        match &mut self.state {
            State::Calling { leg, first_by, .. } if leg.id == id => match placed {
                Ok(p) => {
                    leg.placed(now, p.sdp, p.toward);
                    *first_by = Some(now + FIRST_RESPONSE);
                }
                Err(why) => {
                    leg.drop_leg();
                    let code = match why {
                        NotPlaced::NoPhone => 480,
                        NotPlaced::NoPort => 503,
                    };
                    self.fail(code, why.to_string());
                }
            },
            State::Emergency(e) => e.placed(now, id, placed, ids),
            _ => {}
        }
    }

    /// An event of leg `id` (`None`: the UA forgot it).
    pub(crate) fn on_leg_event(
        &mut self,
        now: Instant,
        id: LegId,
        ev: Option<LegEvent>,
        ids: &mut LegIds,
    ) {
        let (step, agent) = match &mut self.state {
            State::Emergency(e) => {
                e.on_leg_event(now, id, ev, ids);
                return;
            }
            State::Calling {
                leg,
                agent,
                early,
                heard,
                refused,
                ..
            } if leg.id == id => {
                match &ev {
                    Some(LegEvent::Provisional { code, sdp }) => {
                        *heard = true;
                        if let Some(media) = sdp.as_deref().and_then(|b| leg_answer(b).ok()) {
                            if *early != Some(media) {
                                debug!(code, codec = ?media.0.codec, "transfer target's early media relayed to the caller");
                            }
                            *early = Some(media);
                        }
                    }
                    Some(LegEvent::Failed { code, reason }) => {
                        *refused = Some((*code, reason.clone()));
                    }
                    None => {
                        leg.drop_leg();
                        let agent = agent.clone();
                        if let Some(a) = agent {
                            self.out.push_back(Out::Withdraw(a));
                        }
                        self.fail(503, "the leg was lost".into());
                        return;
                    }
                    _ => {}
                }
                (leg.on_event(ev), agent.clone())
            }
            _ => return,
        };
        match step {
            LegStep::Answered => self.answered(),
            LegStep::Unusable => {
                self.out.push_back(Out::DropLeg {
                    leg: id,
                    how: LegEnd::HangUpAndRelease,
                });
                if let Some(a) = agent {
                    self.out.push_back(Out::Withdraw(a));
                }
                self.fail(488, "no common codec".into());
            }
            LegStep::Failed(_) => {
                let (code, reason) = match &self.state {
                    State::Calling {
                        refused: Some(r), ..
                    } => r.clone(),
                    _ => (503, String::new()),
                };
                self.out.push_back(Out::DropLeg {
                    leg: id,
                    how: LegEnd::Forget,
                });
                if let Some(a) = agent {
                    self.out.push_back(Out::Withdraw(a));
                }
                self.fail(code, format!("answered {code} {reason}").trim().to_owned());
            }
            LegStep::HungUp | LegStep::Gone { .. } | LegStep::Lost => {
                self.out.push_back(Out::DropLeg {
                    leg: id,
                    how: LegEnd::Release,
                });
                if let Some(a) = agent {
                    self.out.push_back(Out::Withdraw(a));
                }
                self.fail(487, "the target hung up".into());
            }
            LegStep::Reply {
                txn, code, body, ..
            } => self.out.push_back(Out::ReplyLeg {
                leg: id,
                txn,
                code,
                body,
            }),
            LegStep::Nothing
            | LegStep::NoAnswer
            | LegStep::MediaChanged(_)
            | LegStep::Probe { .. }
            | LegStep::StillThere
            | LegStep::Refer(_) => {}
        }
    }

    /// The target answered with media we can use: the caller is connected.
    fn answered(&mut self) {
        let State::Calling { leg, agent, .. } = std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        info!(transfer = self.id, target = %self.target, "transfer target answered; the caller is connected");
        self.finish_notify(200);
        self.outcome = Some("connected".into());
        let c = match agent {
            Some(_) => Connected::Agent(*leg),
            None => Connected::Line {
                name: leg.agent.clone(),
                leg: *leg,
            },
        };
        self.out.push_back(Out::Connected(c));
    }

    /// The queue's answer to [`Out::Rejoin`].
    pub(crate) fn queued(&mut self, result: Result<(), String>) {
        let State::Queueing { queue } = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        match result {
            Ok(()) => {
                info!(transfer = self.id, %queue, "the caller is at the front of the queue");
                self.finish_notify(200);
                self.outcome = Some("connected".into());
                self.out.push_back(Out::Connected(Connected::Queue(queue)));
            }
            Err(why) => self.fail(480, why),
        }
    }

    /// The call ends (the caller hung up, or the call was stopped) with the transfer still
    /// going: the target is let go of and the operator's phone told (487). A 911 redirect is
    /// the core's to end, as the menu's is.
    pub(crate) fn cancel(&mut self) {
        if self.is_done() {
            return;
        }
        info!(transfer = self.id, "the caller left during the transfer");
        self.call_off("caller hung up");
    }

    /// Let go of the target and tell the operator's phone (487); the outcome is `outcome`.
    fn call_off(&mut self, outcome: &str) {
        if self.is_done() {
            return;
        }
        match std::mem::replace(&mut self.state, State::Done) {
            State::Calling { mut leg, agent, .. } => {
                leg.drop_leg();
                self.out.push_back(Out::DropLeg {
                    leg: leg.id,
                    how: LegEnd::HangUpAndRelease,
                });
                if let Some(a) = agent {
                    self.out.push_back(Out::Withdraw(a));
                }
            }
            State::Claiming { agent, .. } => self.out.push_back(Out::Withdraw(agent)),
            State::Emergency(e) => self.state = State::Emergency(e),
            State::Queueing { .. } | State::Done => {}
        }
        self.finish_notify(487);
        self.outcome = Some(outcome.into());
    }

    /// A transfer to 911 replaces this one: the target is let go of and the operator's phone
    /// told (487).
    pub(crate) fn supersede(&mut self) {
        info!(transfer = self.id, "transfer called off for 911");
        self.call_off(SUPERSEDED);
    }

    /// The transfer failed: the operator's phone is told `code`, the core hears why.
    fn fail(&mut self, code: u16, why: String) {
        warn!(transfer = self.id, target = %self.target, code, reason = %why, "transfer failed");
        self.state = State::Done;
        self.finish_notify(code);
        self.outcome = Some(format!("failed: {why}"));
        self.out.push_back(Out::Failed { code, why });
    }

    /// The last NOTIFY (`code`), once.
    fn finish_notify(&mut self, code: u16) {
        if std::mem::take(&mut self.notify) {
            self.out.push_back(Out::Notify(code));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every path of a transfer on virtual time.

    use super::*;
    use crate::call::emergency::{ByOperator, Caller};
    use crate::call::leg::{Dial, LegSdp};
    use crate::dispatch::emergency::{EmergencyConfig, EmergencyMethod};
    use crate::media::g711::Codec;
    use tracing::Span;

    const RING: Duration = Duration::from_secs(20);

    fn place(leg: u64, to: Dial) -> Box<PlaceLeg> {
        Box::new(PlaceLeg {
            leg: LegId(leg),
            to,
            from_user: "+12125550123".into(),
            from_display: "311 caller",
            asserted: Some("+12125550123".into()),
            headers: vec![("X-311-Transferred-By".into(), "1001".into())],
            codec: Codec::Pcmu,
            local_ip: "192.0.2.1".parse().unwrap(),
            span: Span::none(),
        })
    }

    fn line() -> Start {
        Start::Line {
            name: "crisis".into(),
            place: place(
                5,
                Dial::Uri {
                    uri: "sip:988@198.51.100.30".into(),
                    at: None,
                    pick: 0,
                },
            ),
            ring: RING,
        }
    }

    /// A transfer under test, on its own clock.
    struct Run {
        t: Transfer,
        ids: LegIds,
        t0: Instant,
        now: Instant,
    }

    impl Run {
        fn start(start: Start, via: Via) -> (Run, Vec<Out>) {
            let t0 = Instant::now();
            let t = Transfer::start(
                t0,
                7,
                ("crisis".into(), "line"),
                via,
                Some("1001".into()),
                start,
            );
            let mut r = Run {
                t,
                ids: LegIds,
                t0,
                now: t0,
            };
            let out = r.out();
            (r, out)
        }

        fn out(&mut self) -> Vec<Out> {
            std::iter::from_fn(|| self.t.poll()).collect()
        }

        fn at(&mut self, secs: f64) -> Vec<Out> {
            self.now = self.t0 + Duration::from_secs_f64(secs);
            self.t.on_timeout(self.now, &mut self.ids);
            self.out()
        }

        fn placed(&mut self, leg: u64) -> Vec<Out> {
            let p = Placed {
                sdp: LegSdp::new("192.0.2.1:40000".parse().unwrap()),
                toward: None,
                looked_up: None,
            };
            self.t.placed(self.now, LegId(leg), Ok(p), &mut self.ids);
            self.out()
        }

        fn leg(&mut self, leg: u64, ev: LegEvent) -> Vec<Out> {
            self.t
                .on_leg_event(self.now, LegId(leg), Some(ev), &mut self.ids);
            self.out()
        }
    }

    fn notifies(out: &[Out]) -> Vec<u16> {
        out.iter()
            .filter_map(|o| match o {
                Out::Notify(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    fn failed(out: &[Out]) -> Option<(u16, &str)> {
        out.iter().find_map(|o| match o {
            Out::Failed { code, why } => Some((*code, why.as_str())),
            _ => None,
        })
    }

    fn dropped(out: &[Out]) -> Option<(LegId, LegEnd)> {
        out.iter().find_map(|o| match o {
            Out::DropLeg { leg, how } => Some((*leg, *how)),
            _ => None,
        })
    }

    fn sdp(port: u16) -> Bytes {
        format!("v=0\r\no=t 1 1 IN IP4 198.51.100.30\r\ns=-\r\nc=IN IP4 198.51.100.30\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n").into()
    }

    fn ringing(early: Option<Bytes>) -> LegEvent {
        LegEvent::Provisional {
            code: if early.is_some() { 183 } else { 180 },
            sdp: early,
        }
    }

    fn refused(code: u16, reason: &str) -> LegEvent {
        LegEvent::Failed {
            code,
            reason: reason.into(),
        }
    }

    #[test]
    fn a_refer_to_a_line_notifies_trying_rings_and_connects_on_the_answer() {
        let (mut r, out) = Run::start(line(), Via::Refer);
        assert_eq!(notifies(&out), vec![100], "100 Trying at once");
        let Some(Out::Place(p)) = out.iter().find(|o| matches!(o, Out::Place(_))) else {
            panic!("{out:?}")
        };
        assert!(matches!(&p.to, Dial::Uri { uri, .. } if uri == "sip:988@198.51.100.30"));
        assert!(r.t.wants_ringback() && r.t.bridge().is_none());
        assert_eq!(r.t.state_word(), "calling");
        r.placed(5);
        assert_eq!(r.t.next_deadline(), Some(r.t0 + FIRST_RESPONSE));
        r.leg(5, ringing(None));
        assert_eq!(r.t.state_word(), "ringing");
        assert_eq!(
            r.t.next_deadline(),
            Some(r.t0 + RING),
            "ringing: its ring timeout"
        );
        let out = r.leg(5, LegEvent::Answered { sdp: sdp(4000) });
        assert_eq!(notifies(&out), vec![200]);
        let Some(Out::Connected(Connected::Line { leg, name })) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!((leg.id, name.as_str()), (LegId(5), "crisis"));
        assert!(leg.answered());
        assert!(r.t.is_done() && r.t.next_deadline().is_none());
        assert_eq!(r.t.state_word(), "connected");
    }

    #[test]
    fn the_targets_early_media_is_relayed_instead_of_ringback() {
        let (mut r, _) = Run::start(line(), Via::Admin);
        r.placed(5);
        r.leg(5, ringing(Some(sdp(4002))));
        let b = r.t.bridge().expect("early media bridged");
        assert!(!b.answered && !b.operator && b.leg == LegId(5));
        assert_eq!(b.media.1.port(), 4002);
        assert!(!r.t.wants_ringback());
    }

    #[test]
    fn a_busy_target_fails_with_its_status_and_an_admin_transfer_sends_no_notify() {
        let (mut r, out) = Run::start(line(), Via::Admin);
        assert!(notifies(&out).is_empty());
        r.placed(5);
        r.leg(5, ringing(None));
        let out = r.leg(5, refused(486, "Busy Here"));
        assert_eq!(failed(&out), Some((486, "answered 486 Busy Here")));
        assert_eq!(dropped(&out), Some((LegId(5), LegEnd::Forget)));
        assert!(notifies(&out).is_empty());
        assert_eq!(r.t.state_word(), "failed: answered 486 Busy Here");
    }

    #[test]
    fn a_target_that_rings_too_long_is_cancelled_and_a_silent_one_is_unreachable() {
        let (mut r, _) = Run::start(line(), Via::Refer);
        r.placed(5);
        r.leg(5, ringing(None));
        assert!(r.at(19.9).is_empty());
        let out = r.at(20.0);
        assert_eq!(dropped(&out), Some((LegId(5), LegEnd::HangUpAndRelease)));
        assert_eq!(failed(&out), Some((480, "no answer")));
        assert_eq!(notifies(&out), vec![480]);

        let (mut r, _) = Run::start(line(), Via::Refer);
        r.placed(5);
        assert!(r.at(4.9).is_empty());
        let out = r.at(5.0);
        assert_eq!(dropped(&out), Some((LegId(5), LegEnd::HangUpAndRelease)));
        assert_eq!(failed(&out), Some((408, "no response")));
        assert_eq!(notifies(&out), vec![408]);

        // No RTP port for the leg: at once.
        let (mut r, _) = Run::start(line(), Via::Refer);
        r.t.placed(r.now, LegId(5), Err(NotPlaced::NoPort), &mut r.ids);
        assert_eq!(failed(&r.out()).map(|f| f.0), Some(503));
    }

    #[test]
    fn an_agent_is_claimed_from_the_queue_first_and_becomes_the_operator() {
        let agent = || Start::Agent {
            agent: "1002".into(),
            place: place(6, Dial::Agent("1002".into())),
            ring: RING,
        };
        // Busy in the queue: nothing is rung.
        let (mut r, out) = Run::start(agent(), Via::Refer);
        assert!(
            matches!(&out[1], Out::RingDirect { agent, .. } if agent == "1002"),
            "{out:?}"
        );
        assert!(!out.iter().any(|o| matches!(o, Out::Place(_))));
        r.t.claimed(Err("on_call"));
        let out = r.out();
        assert_eq!(failed(&out), Some((486, "agent 1002 is on call")));
        assert!(!out
            .iter()
            .any(|o| matches!(o, Out::Place(_) | Out::Withdraw(_))));
        // Free: rung; a refusal withdraws the ring.
        let (mut r, _) = Run::start(agent(), Via::Refer);
        r.t.claimed(Ok(()));
        let out = r.out();
        assert!(matches!(out.as_slice(), [Out::Place(p)] if p.to == Dial::Agent("1002".into())));
        r.placed(6);
        let out = r.leg(6, refused(603, "Decline"));
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Withdraw(a) if a == "1002")));
        assert_eq!(failed(&out).map(|f| f.0), Some(603));
        // Answered: the operator's leg for the caller from now on.
        let (mut r, _) = Run::start(agent(), Via::Refer);
        r.t.claimed(Ok(()));
        r.out();
        r.placed(6);
        let out = r.leg(6, LegEvent::Answered { sdp: sdp(4000) });
        assert!(
            matches!(out.last(), Some(Out::Connected(Connected::Agent(l))) if l.agent == "1002")
        );
    }

    #[test]
    fn the_caller_hanging_up_cancels_the_ringing_target_and_tells_the_phone() {
        let (mut r, _) = Run::start(line(), Via::Refer);
        r.placed(5);
        r.leg(5, ringing(None));
        r.t.cancel();
        let out = r.out();
        assert_eq!(dropped(&out), Some((LegId(5), LegEnd::HangUpAndRelease)));
        assert_eq!(notifies(&out), vec![487]);
        assert!(failed(&out).is_none(), "not a failure to recover from");
        assert_eq!(r.t.outcome.as_deref(), Some("caller hung up"));
    }

    #[test]
    fn a_transfer_to_a_queue_waits_for_the_queue() {
        let (mut r, out) = Run::start(Start::Queue("permits".into()), Via::Refer);
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Rejoin(q) if q == "permits")));
        r.t.queued(Ok(()));
        let out = r.out();
        assert_eq!(notifies(&out), vec![200]);
        assert!(matches!(out.last(), Some(Out::Connected(Connected::Queue(q))) if q == "permits"));
        let (mut r, _) = Run::start(Start::Queue("permits".into()), Via::Refer);
        r.t.queued(Err("no operator can take the caller".into()));
        assert_eq!(failed(&r.out()).map(|f| f.0), Some(480));
    }

    fn emergency(uris: &[&str]) -> Start {
        let config = EmergencyConfig {
            method: Some(EmergencyMethod::Bridge),
            uri: uris.first().map(|u| u.to_string()),
            backup_uris: uris.iter().skip(1).map(|u| u.to_string()).collect(),
            ..EmergencyConfig::default()
        };
        let caller = Caller {
            call_id: "call-1@test".into(),
            number: "+12125550123".into(),
            asserted: Some("+12125550123".into()),
            line: "311".into(),
            language: "en".into(),
            codec: Codec::Pcmu,
            local_ip: "192.0.2.1".parse().unwrap(),
        };
        Start::Emergency(Box::new(Emergency::for_operator(
            &config,
            caller,
            Some("operator 1001 transferred the caller".into()),
            "main:0".into(),
            ByOperator {
                agent: "1001".into(),
                via: "refer",
                consult: false,
            },
        )))
    }

    /// The 911 leg the redirect placed.
    fn placed_911(out: &[Out]) -> Option<LegId> {
        out.iter().find_map(|o| match o {
            Out::Emergency(emergency::Out::Place(p)) => Some(p.leg),
            _ => None,
        })
    }

    #[test]
    fn a_transfer_to_911_runs_the_redirect_and_connects_when_a_route_answers() {
        let (mut r, out) = Run::start(emergency(&["sip:911@198.51.100.20"]), Via::Refer);
        assert_eq!(notifies(&out), vec![100], "never refused");
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Emergency(emergency::Out::WriteAudit(a)) if a.operator.as_deref() == Some("1001"))));
        r.t.emergency_mut()
            .unwrap()
            .audited(r.now, Some(3), &mut r.ids);
        let leg = placed_911(&r.out()).expect("the route is called");
        r.t.placed(
            r.now,
            leg,
            Ok(Placed {
                sdp: LegSdp::new("192.0.2.1:40000".parse().unwrap()),
                toward: None,
                looked_up: None,
            }),
            &mut r.ids,
        );
        r.out();
        assert_eq!(r.t.state_word(), "calling 911");
        let out = r.leg(leg.0, LegEvent::Answered { sdp: sdp(4000) });
        assert_eq!(notifies(&out), vec![200]);
        let Some(Out::Connected(Connected::Emergency(e))) = out.last() else {
            panic!("{out:?}")
        };
        assert!(e.connected());
    }

    #[test]
    fn every_911_route_failing_sends_the_caller_back_with_503() {
        let (mut r, _) = Run::start(emergency(&["sip:911@198.51.100.20"]), Via::Refer);
        r.t.emergency_mut()
            .unwrap()
            .audited(r.now, Some(3), &mut r.ids);
        let leg = placed_911(&r.out()).unwrap();
        // "Connecting you to 911" has played.
        r.t.emergency_mut().unwrap().played(r.now, &mut r.ids);
        r.out();
        let out = r.leg(leg.0, refused(503, "Service Unavailable"));
        assert_eq!(failed(&out), Some((503, "every 911 route failed")));
        assert_eq!(notifies(&out), vec![503]);
        assert!(!out.iter().any(|o| matches!(
            o,
            Out::Emergency(emergency::Out::Play(emergency::Sound::Announcement))
        )));
        assert!(r.t.is_done() && r.out().is_empty());
    }
}
