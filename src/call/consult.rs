//! An operator's own call from their phone: a consultation before an attended transfer, or a
//! call to 911 for the caller they hold. A small sans-IO core ([`ConsultCore`]) and its
//! driver ([`run_consult`]), in the shape of the call-back's.
//!
//! An INVITE whose From names a logged-in agent, sent from that agent's registered address
//! and digest-authenticated (the UA core checks: see `Registrar::authorize_call`), never
//! reaches the menu. Its Request-URI user is routed by the operators' dial plan
//! ([`super::dialplan`]): `911`, a `transfers` line's number or name, another agent's id,
//! a queue's name. A number the plan does not list is refused (`403`), anything else `404`,
//! a second call while the phone has one going `486`, each refusal counted in
//! `ivr311_transfer_refusals_total`. `911` is never refused by policy.
//!
//! A queue's name, dialled with a caller on hold, sends that caller to the front of the queue
//! with their wait kept ([`send_to_queue`]: the caller's call transfers them, which hangs up
//! the operator's leg with them); the phone's call is answered, hears "Thank you." and is
//! hung up. Dialled with no caller, a queue's name is `403`.
//!
//! The target is rung by the same [`Transfer`] machine a blind transfer uses
//! ([`Via::PhoneCall`]), with the context of the caller the operator holds (found in the
//! call registry): their number in From and P-Asserted-Identity as the identity rules
//! allow, the `X-311-*` headers, `X-311-Transferred-By`. A call to 911 is the menu's own
//! redirect machine ([`super::emergency::Emergency::for_operator`], bridge routes only, the
//! audit naming the operator and `phone_call`). The phone hears `180` while the target
//! rings, gets `200` when it answers (the server then relays RTP between the phone and the
//! target, on the media clock like any bridge), or the target's failure status (`486`,
//! `408` unreachable, `480` no answer, `503` every 911 route down). Whatever happens here,
//! the caller on hold stays with the operator.
//!
//! The consultation ends in one of three ways:
//! - the operator hangs it up (abandoned): the target is hung up, the caller is still on
//!   hold with the operator, who resumes them;
//! - the target hangs up: the phone gets BYE;
//! - the operator's phone transfers (REFER on the held caller's leg with `Replaces` naming
//!   this dialog, RFC 3891): the caller's call asks for the target ([`Input::HandOver`]),
//!   gets the target's leg and its state ([`Action::HandOver`]), bridges the caller to it
//!   and releases the operator; this dialog gets BYE.
//!
//! It owns the operator's phone dialog for this call and the target's leg until handed over;
//! it never touches the held caller's call except through the registry
//! ([`super::registry::CallCommand::Consulting`] for `/admin/calls`, and the hand-over).

use super::core::TransferView;
use super::dialplan::Destination;
use super::driver::{bridge_for, now, place_leg, CallContext, LegDeps, LegIo, Legs};
use super::emergency::{self, LegIds};
use super::leg::{BridgeTo, LegEnd, LegId, Media, NotPlaced, PlaceLeg, Placed};
use super::operator_leg::LegStep;
use super::registry::{CallCommand, ConsultCommand, Joined};
use super::transfer::{self, Connected, Transfer, Via};
use super::SUPPORTED_CODECS;
use crate::dispatch::tickets::{EmergencyAudit, TransferRecord};
use crate::media::clock::{MediaHandle, MediaNote};
use crate::media::rtp::LatchScope;
use crate::media::sdp::{self, Negotiated};
use crate::media::session::MediaSession;
use crate::sip::message::sanitize_quoted;
use crate::sip::refer::reason_phrase;
use crate::sip::ua::{DialogEvent, IncomingCall, LegEvent};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument, Span};

/// Calls from one operator's phone at a time (911 is never refused).
const MAX_CONSULTS_PER_AGENT: usize = 1;

/// How a consultation's outcome is counted in `ivr311_transfers_total` when it does not end
/// in a transfer (the caller's call counts the transfer when it is joined).
const FAILED: &str = "consult_failed";
const ENDED: &str = "consult_ended";

/// What happened, for the core.
#[derive(Debug)]
pub(crate) enum Input {
    /// The target's INVITE is out (or could not be sent).
    Placed(LegId, Result<Placed, NotPlaced>),
    /// An event of the target's leg (`None`: the UA forgot it).
    Leg(LegId, Option<LegEvent>),
    /// The queue's answer to [`Action::RingDirect`].
    Claimed(Result<(), &'static str>),
    /// The 911 audit row was written (its id), or could not be.
    Audited(Option<i64>),
    /// An event of the operator's phone's dialog (`None`: the dialog is gone).
    Phone(Option<DialogEvent>),
    /// No RTP from the phone for `limits.no_media_seconds`.
    NoMedia,
    /// The held caller's call asks for the target (the phone transferred with `Replaces`).
    HandOver,
    /// The server stops.
    Shutdown,
}

/// What the core asks of the driver, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// `180 Ringing` to the phone.
    Ringing,
    /// A final failure to the phone's INVITE, with a Warning saying why.
    Refuse {
        code: u16,
        why: String,
    },
    /// `200` with our SDP; the phone's media joins the media clock.
    Answer,
    /// Answer the phone's re-INVITE or UPDATE.
    ReplyPhone {
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    /// Answer a request the phone's dialog passed up (a REFER on this dialog).
    AnswerPhoneRequest {
        txn: u64,
        code: u16,
        headers: Vec<(String, String)>,
    },
    /// The phone's ACK came: our stream to it may start.
    ConfirmMedia,
    /// The phone's media moved (hold, a new address).
    Renegotiate(Media),
    /// BYE the phone.
    HangUpPhone,
    PlaceLeg(Box<PlaceLeg>),
    DropLeg {
        leg: LegId,
        how: LegEnd,
    },
    ReplyLeg {
        leg: LegId,
        txn: u64,
        code: u16,
        body: Option<(String, Bytes)>,
    },
    SetBridge(Option<BridgeTo>),
    /// Ask the queue to ring `agent` directly; answer with [`Input::Claimed`].
    RingDirect {
        agent: String,
        ring_timeout: Duration,
    },
    /// The agent rung directly will not take the call.
    Withdraw(String),
    /// The agent rung directly answered: on a call.
    DirectAnswered(String),
    /// The agent's call is over.
    CallEnded(String),
    AuditStart(Box<EmergencyAudit>),
    AuditOutcome {
        id: i64,
        outcome: String,
    },
    CountEmergency {
        method: &'static str,
        outcome: &'static str,
    },
    RecordTransfer(TransferView),
    /// The transfer's progress for `/admin/transfers/{id}` (its end).
    ShowTransfer(TransferView),
    TransferOutcome {
        record: TransferRecord,
        outcome: String,
    },
    CountTransfer {
        kind: &'static str,
        outcome: &'static str,
    },
    /// Give the target to the held caller's call: the transfer (connected), the target, and
    /// the legs whose IO goes with them.
    HandOver(Box<(Transfer, Connected)>, Vec<LegId>),
    /// The target cannot be handed over (yet): the held caller's call is told this status.
    RefuseHandOver(u16, String),
    /// Count a REFER refused on this dialog.
    CountTransferRefusal,
    /// The consultation is over.
    End,
}

/// Our side of the phone's media.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PhoneMedia {
    pub(crate) local: SocketAddr,
    pub(crate) session_id: u64,
    pub(crate) neg: Negotiated,
}

/// One consultation (see the module docs).
#[derive(Debug)]
pub(crate) struct ConsultCore {
    agent: String,
    /// The held caller's call id (the transfers record's), if the operator holds one.
    held_call: Option<String>,
    /// The transfer ringing the target; kept (finished) once connected, for the hand-over.
    transfer: Option<Transfer>,
    /// The target, once it answered.
    connected: Option<Connected>,
    ids: LegIds,
    media: PhoneMedia,
    /// Our SDP version on the phone's dialog.
    version: u64,
    rang: bool,
    bridged: Option<BridgeTo>,
    ended: bool,
    actions: VecDeque<Action>,
}

impl ConsultCore {
    /// Start ringing `dest` for `agent`, with the context `cx` (of the caller they hold, if
    /// any: `held_call`).
    pub(crate) fn new(
        now: Instant,
        agent: String,
        dest: Destination,
        cx: &transfer::Context,
        held_call: Option<String>,
        (emergency, agent_ring, menu_path): (
            &crate::dispatch::emergency::EmergencyConfig,
            Duration,
            &str,
        ),
        media: PhoneMedia,
    ) -> ConsultCore {
        let id = transfer::new_id();
        let (label, kind) = (dest.label(), dest.kind());
        let is_911 = dest == Destination::Emergency;
        let mut ids = LegIds;
        let start = transfer::start_for(
            id,
            dest,
            cx,
            Via::PhoneCall,
            (emergency, agent_ring, menu_path),
            &mut ids,
        );
        let t = Transfer::start(
            now,
            id,
            (label, kind),
            Via::PhoneCall,
            Some(agent.clone()),
            start,
        );
        let mut c = ConsultCore {
            agent,
            held_call,
            transfer: None,
            connected: None,
            ids,
            media,
            version: 1,
            rang: false,
            bridged: None,
            ended: false,
            actions: VecDeque::new(),
        };
        if let Some(call_id) = &c.held_call {
            c.actions.push_back(Action::RecordTransfer(TransferView {
                id,
                call_id: call_id.clone(),
                target: t.target.clone(),
                via: Via::PhoneCall.as_str(),
                operator: Some(c.agent.clone()),
                state: t.state_word().to_owned(),
                caller: "consulting".into(),
                started: now,
                done: false,
            }));
        }
        if is_911 {
            // The phone hears ringing at once: 911 is being called, whatever route answers.
            c.rang = true;
            c.actions.push_back(Action::Ringing);
        }
        c.transfer = Some(t);
        c.settle(now);
        c
    }

    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        match (&self.connected, &self.transfer) {
            (Some(Connected::Emergency(e)), _) => e.next_deadline(),
            (Some(_), _) => None,
            (None, Some(t)) => t.next_deadline(),
            (None, None) => None,
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        match (&mut self.connected, &mut self.transfer) {
            (Some(Connected::Emergency(e)), _) => e.on_timeout(now, &mut self.ids),
            (None, Some(t)) => t.on_timeout(now, &mut self.ids),
            _ => {}
        }
        self.settle(now);
    }

    pub(crate) fn handle(&mut self, now: Instant, input: Input) {
        if self.ended {
            return;
        }
        match input {
            Input::Placed(id, placed) => match (&mut self.connected, &mut self.transfer) {
                (None, Some(t)) => t.placed(now, id, placed, &mut self.ids),
                (Some(Connected::Emergency(e)), _) => e.placed(now, id, placed, &mut self.ids),
                _ => {}
            },
            Input::Leg(id, ev) => self.on_leg(now, id, ev),
            Input::Claimed(result) => {
                if let Some(t) = &mut self.transfer {
                    t.claimed(result);
                }
            }
            Input::Audited(audit) => {
                if let Some(e) = self.transfer.as_mut().and_then(Transfer::emergency_mut) {
                    e.audited(now, audit, &mut self.ids);
                }
            }
            Input::Phone(ev) => self.on_phone(ev),
            Input::NoMedia => {
                info!(agent = %self.agent, "no audio from the operator's phone; the consultation ends");
                self.phone_left(true);
            }
            Input::HandOver => self.hand_over(),
            Input::Shutdown => self.phone_left(true),
        }
        self.settle(now);
    }

    /// Carry out what the transfer (or the connected 911 redirect) asks, then the bridge.
    fn settle(&mut self, _now: Instant) {
        loop {
            if self.ended {
                return;
            }
            if self.connected.is_none() {
                let Some(out) = self.transfer.as_mut().and_then(Transfer::poll) else {
                    break;
                };
                self.transfer_out(out);
            } else {
                let Some(Connected::Emergency(e)) = &mut self.connected else {
                    break;
                };
                let Some(out) = e.poll() else { break };
                self.emergency_out(out);
            }
        }
        if !self.rang
            && self
                .transfer
                .as_ref()
                .is_some_and(|t| t.state_word() == "ringing")
        {
            self.rang = true;
            self.actions.push_back(Action::Ringing);
        }
        let bridge = self.bridge_target();
        if bridge != self.bridged {
            self.bridged = bridge;
            self.actions.push_back(Action::SetBridge(bridge));
        }
    }

    fn bridge_target(&self) -> Option<BridgeTo> {
        match self.connected.as_ref()? {
            Connected::Line { leg, .. } | Connected::Agent(leg) => Some(BridgeTo {
                leg: leg.id,
                media: leg.media()?,
                scope: leg.scope(),
                answered: true,
                operator: false,
                record: false,
            }),
            Connected::Emergency(e) => e.bridge(),
            Connected::Queue(_) => None,
        }
    }

    fn transfer_out(&mut self, out: transfer::Out) {
        match out {
            transfer::Out::RingDirect {
                agent,
                ring_timeout,
            } => self.actions.push_back(Action::RingDirect {
                agent,
                ring_timeout,
            }),
            transfer::Out::Place(p) => self.actions.push_back(Action::PlaceLeg(p)),
            transfer::Out::DropLeg { leg, how } => {
                self.actions.push_back(Action::DropLeg { leg, how })
            }
            transfer::Out::ReplyLeg {
                leg,
                txn,
                code,
                body,
            } => self.actions.push_back(Action::ReplyLeg {
                leg,
                txn,
                code,
                body,
            }),
            transfer::Out::Withdraw(agent) => self.actions.push_back(Action::Withdraw(agent)),
            transfer::Out::Emergency(o) => self.emergency_out(o),
            // A consultation has no REFER subscription, and never goes to a queue.
            transfer::Out::Notify(_) | transfer::Out::Rejoin(_) => {}
            transfer::Out::Connected(c) => {
                info!(agent = %self.agent, "the consulted party answered");
                if let Connected::Agent(leg) = &c {
                    self.actions
                        .push_back(Action::DirectAnswered(leg.agent.clone()));
                }
                self.connected = Some(c);
                self.actions.push_back(Action::Answer);
            }
            transfer::Out::Failed { code, why } => {
                info!(agent = %self.agent, code, reason = %why, "the consultation failed; the caller stays with the operator");
                self.actions.push_back(Action::Refuse {
                    code,
                    why: why.clone(),
                });
                self.record(
                    format!("failed: {why}; the caller stays with the operator"),
                    FAILED,
                );
                self.ended = true;
                self.actions.push_back(Action::End);
            }
        }
    }

    fn emergency_out(&mut self, out: emergency::Out) {
        match out {
            emergency::Out::WriteAudit(a) => {
                self.actions.push_back(Action::AuditStart(Box::new(a)))
            }
            emergency::Out::AuditOutcome { id, outcome } => {
                self.actions.push_back(Action::AuditOutcome { id, outcome })
            }
            emergency::Out::Counted { method, outcome } => self
                .actions
                .push_back(Action::CountEmergency { method, outcome }),
            emergency::Out::Place(p) => self.actions.push_back(Action::PlaceLeg(p)),
            emergency::Out::DropLeg { leg, hang_up } => self.actions.push_back(Action::DropLeg {
                leg,
                how: if hang_up {
                    LegEnd::HangUp
                } else {
                    LegEnd::Forget
                },
            }),
            emergency::Out::Reply {
                leg,
                txn,
                code,
                body,
            } => self.actions.push_back(Action::ReplyLeg {
                leg,
                txn,
                code,
                body,
            }),
            // 911 hung up on the operator.
            emergency::Out::End if self.connected.is_some() => self.target_left(),
            // Nothing is played on the operator's own call; a consultation has no REFER.
            emergency::Out::End
            | emergency::Out::Play(_)
            | emergency::Out::Stop
            | emergency::Out::Held(_)
            | emergency::Out::Refer { .. }
            | emergency::Out::BackToOperator => {}
        }
    }

    fn on_leg(&mut self, now: Instant, id: LegId, ev: Option<LegEvent>) {
        match &mut self.connected {
            None => {
                if let Some(t) = &mut self.transfer {
                    t.on_leg_event(now, id, ev, &mut self.ids);
                }
            }
            Some(Connected::Emergency(e)) => e.on_leg_event(now, id, ev, &mut self.ids),
            Some(Connected::Line { leg, .. } | Connected::Agent(leg)) if leg.id == id => {
                match leg.on_event(ev) {
                    LegStep::HungUp | LegStep::Gone { .. } => self.target_left(),
                    LegStep::Reply {
                        txn, code, body, ..
                    } => self.actions.push_back(Action::ReplyLeg {
                        leg: id,
                        txn,
                        code,
                        body,
                    }),
                    _ => {}
                }
            }
            Some(_) => {}
        }
    }

    /// The consulted party hung up: so does the phone.
    fn target_left(&mut self) {
        info!(agent = %self.agent, "the consulted party hung up");
        match self.connected.take() {
            Some(Connected::Line { mut leg, .. }) => {
                leg.drop_leg();
                self.actions.push_back(Action::DropLeg {
                    leg: leg.id,
                    how: LegEnd::Release,
                });
            }
            Some(Connected::Agent(mut leg)) => {
                leg.drop_leg();
                self.actions.push_back(Action::DropLeg {
                    leg: leg.id,
                    how: LegEnd::Release,
                });
                self.actions.push_back(Action::CallEnded(leg.agent.clone()));
            }
            Some(Connected::Emergency(mut e)) => {
                e.end_call(false);
                while let Some(o) = e.poll() {
                    if !matches!(o, emergency::Out::End) {
                        self.emergency_out(o);
                    }
                }
            }
            Some(Connected::Queue(_)) | None => {}
        }
        self.actions.push_back(Action::HangUpPhone);
        self.record(
            "the consulted party hung up; the caller stays with the operator".into(),
            ENDED,
        );
        self.ended = true;
        self.actions.push_back(Action::End);
    }

    fn on_phone(&mut self, ev: Option<DialogEvent>) {
        match ev {
            None
            | Some(
                DialogEvent::Bye
                | DialogEvent::Cancelled
                | DialogEvent::Timeout
                | DialogEvent::Lost,
            ) => self.phone_left(false),
            Some(DialogEvent::Reoffer { txn, body, .. }) => self.reoffer(txn, &body),
            Some(DialogEvent::Confirmed { .. }) => self.actions.push_back(Action::ConfirmMedia),
            Some(DialogEvent::Refer(r)) => {
                self.actions.push_back(Action::AnswerPhoneRequest {
                    txn: r.txn,
                    code: 403,
                    headers: vec![(
                        "Warning".into(),
                        "399 ivr311 \"transfer the held caller from their call (REFER with Replaces naming this one)\"".into(),
                    )],
                });
                self.actions.push_back(Action::CountTransferRefusal);
            }
            Some(
                DialogEvent::Info { .. }
                | DialogEvent::RequestOutcome { .. }
                | DialogEvent::Notify { .. },
            ) => {}
        }
    }

    /// The phone's re-INVITE or UPDATE (hold, resume).
    fn reoffer(&mut self, txn: u64, body: &[u8]) {
        self.version += 1;
        let m = self.media;
        let answer = if body.is_empty() {
            Ok(sdp::build_answer(
                m.local,
                m.session_id,
                self.version,
                &m.neg,
            ))
        } else {
            sdp::parse(body).and_then(|offer| {
                let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
                self.media.neg = neg;
                self.actions
                    .push_back(Action::Renegotiate((neg, offer.addr)));
                sdp::build_answer_for_offer(body, m.local, m.session_id, self.version, &neg)
            })
        };
        let (code, body) = match answer {
            Ok(sdp) => (200, Some(("application/sdp".to_owned(), Bytes::from(sdp)))),
            Err(e) => {
                warn!(error = %e, "the operator's phone offered what we cannot take; 488");
                (488, None)
            }
        };
        self.actions
            .push_back(Action::ReplyPhone { txn, code, body });
    }

    /// The operator hung the consultation up (or it must end): the target is let go of and
    /// the caller stays on hold with the operator.
    fn phone_left(&mut self, hang_up: bool) {
        info!(agent = %self.agent, "the operator ended the consultation; the caller stays with them");
        match self.connected.take() {
            Some(Connected::Line { mut leg, .. }) => {
                leg.drop_leg();
                self.actions.push_back(Action::DropLeg {
                    leg: leg.id,
                    how: LegEnd::HangUpAndRelease,
                });
            }
            Some(Connected::Agent(mut leg)) => {
                leg.drop_leg();
                self.actions.push_back(Action::DropLeg {
                    leg: leg.id,
                    how: LegEnd::HangUpAndRelease,
                });
                self.actions.push_back(Action::CallEnded(leg.agent.clone()));
            }
            Some(Connected::Emergency(mut e)) => {
                e.end_call(true);
                while let Some(o) = e.poll() {
                    if !matches!(o, emergency::Out::End) {
                        self.emergency_out(o);
                    }
                }
            }
            Some(Connected::Queue(_)) => {}
            None => {
                if let Some(t) = &mut self.transfer {
                    if let Some(e) = t.emergency_mut() {
                        e.end_call(true);
                    }
                    t.cancel();
                }
                while let Some(o) = self.transfer.as_mut().and_then(Transfer::poll) {
                    {
                        match o {
                            transfer::Out::DropLeg { leg, how } => {
                                self.actions.push_back(Action::DropLeg { leg, how })
                            }
                            transfer::Out::Withdraw(a) => {
                                self.actions.push_back(Action::Withdraw(a))
                            }
                            transfer::Out::Emergency(o) => self.emergency_out(o),
                            _ => {}
                        }
                    }
                }
            }
        }
        if hang_up {
            self.actions.push_back(Action::HangUpPhone);
        }
        self.record(
            "consultation ended by the operator; the caller stays with them".into(),
            ENDED,
        );
        self.ended = true;
        self.actions.push_back(Action::End);
    }

    /// The held caller's call asks for the target: it is theirs once it answered.
    fn hand_over(&mut self) {
        if self.connected.is_none() || self.transfer.is_none() {
            self.actions.push_back(Action::RefuseHandOver(
                480,
                "the consulted party has not answered".into(),
            ));
            return;
        }
        let (Some(c), Some(t)) = (self.connected.take(), self.transfer.take()) else {
            return;
        };
        let legs: Vec<LegId> = match &c {
            Connected::Line { leg, .. } | Connected::Agent(leg) => vec![leg.id],
            Connected::Emergency(e) => e.bridge().map(|b| b.leg).into_iter().collect(),
            Connected::Queue(_) => Vec::new(),
        };
        info!(agent = %self.agent, target = %t.target, "the consulted party is handed to the held caller");
        self.bridged = None;
        self.actions.push_back(Action::SetBridge(None));
        self.actions
            .push_back(Action::HandOver(Box::new((t, c)), legs));
        self.actions.push_back(Action::HangUpPhone);
        self.ended = true;
        self.actions.push_back(Action::End);
    }

    /// The record of the held caller's transfer, when the consultation did not become one.
    fn record(&mut self, outcome: String, counted: &'static str) {
        let Some(t) = &self.transfer else { return };
        let kind = t.kind;
        let record = self.held_call.as_ref().map(|call_id| {
            let record = TransferRecord {
                id: t.id,
                call_id: call_id.clone(),
                operator: Some(self.agent.clone()),
                target: t.target.clone(),
                requested_via: t.via.as_str().to_owned(),
            };
            let view = TransferView {
                id: t.id,
                call_id: call_id.clone(),
                target: t.target.clone(),
                via: t.via.as_str(),
                operator: Some(self.agent.clone()),
                state: outcome.clone(),
                caller: "with operator".into(),
                started: t.started,
                done: true,
            };
            (record, view)
        });
        self.actions.push_back(Action::CountTransfer {
            kind,
            outcome: counted,
        });
        if let Some((record, view)) = record {
            self.actions.push_back(Action::ShowTransfer(view));
            self.actions
                .push_back(Action::TransferOutcome { record, outcome });
        }
    }
}

/// Answer an agent's INVITE: route it by the dial plan and run the consultation.
pub(crate) async fn run_consult(
    mut call: IncomingCall,
    agent: String,
    ctx: CallContext,
    cancel: CancellationToken,
) {
    let dialled = crate::sip::message::uri_user(&call.request_uri)
        .unwrap_or_default()
        .to_owned();
    let refuse = |code: u16, why: String| {
        let w = vec![(
            "Warning".to_owned(),
            format!("399 ivr311 \"{}\"", sanitize_quoted(&why)),
        )];
        (code, w)
    };
    let count = |reason: &str| {
        ctx.metrics.add(
            "ivr311_transfer_refusals_total",
            "Transfer requests (REFER, an agent's call, the admin API) refused, by reason.",
            &[("reason", reason)],
            1,
        )
    };
    if let Some((mode, target)) = ctx.monitoring.codes.parse(&dialled) {
        let target = target.to_owned();
        return super::monitor::run_monitor(call, agent, (mode, target), ctx, cancel).await;
    }
    let dest = match ctx.dialplan.route(&dialled, Some(&agent)) {
        Ok(Destination::Queue(q)) => {
            if let Some((held, _, _)) = ctx.registry.caller_of(&agent) {
                return send_to_queue(call, agent, q, held, ctx, cancel).await;
            }
            info!(%dialled, queue = %q, "an operator with no caller dialled a queue; refused");
            count("queue_by_phone");
            let (code, w) = refuse(
                403,
                format!("queue {q} takes callers: dial it with your caller on hold"),
            );
            call.handle
                .respond(code, reason_phrase(code), w, None)
                .await;
            return;
        }
        Ok(d) => d,
        Err(no) => {
            info!(%dialled, reason = %no, "an operator's call the dial plan refuses");
            count(no.label());
            let (code, w) = refuse(no.code(), no.to_string());
            call.handle
                .respond(code, reason_phrase(code), w, None)
                .await;
            return;
        }
    };
    let is_911 = dest == Destination::Emergency;
    // One call from a phone at a time besides 911 (which is never refused by policy).
    if !is_911 && ctx.registry.consults_of(&agent) >= MAX_CONSULTS_PER_AGENT {
        info!(%agent, "the operator's phone has a call of its own going already; 486");
        count("busy");
        let (code, w) = refuse(486, "one call from the phone at a time".into());
        call.handle
            .respond(code, reason_phrase(code), w, None)
            .await;
        return;
    }
    if ctx.draining.is_cancelled() && !is_911 {
        call.handle
            .respond(
                503,
                "Service Unavailable",
                vec![("Retry-After".into(), "30".into())],
                None,
            )
            .await;
        return;
    }
    let offered = sdp::parse(&call.body).and_then(|offer| {
        let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
        Ok((offer, neg))
    });
    let (offer, neg) = match offered {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "an operator's call without an offer we can take; 488");
            count("no_offer");
            let (_, w) = refuse(488, e.to_string());
            call.handle
                .respond(488, "Not Acceptable Here", w, None)
                .await;
            return;
        }
    };
    let Some(port) = ctx.ports.allocate() else {
        warn!("no RTP port free for an operator's call; 503");
        call.handle
            .respond(503, "Service Unavailable", vec![], None)
            .await;
        return;
    };
    let ip = ctx
        .advertise_ip
        .or_else(|| {
            let bound = port.socket.local_addr().ok()?.ip();
            (!bound.is_unspecified()).then_some(bound)
        })
        .or_else(|| crate::sip::transport::local_ip_towards(offer.addr.ip()))
        .unwrap_or(call.local.ip());
    let local = SocketAddr::new(ip, port.port);
    let media = PhoneMedia {
        local,
        session_id: u64::from(rand::random::<u32>()),
        neg,
    };
    let answer = sdp::build_answer_for_offer(&call.body, local, media.session_id, 1, &neg)
        .unwrap_or_else(|_| sdp::build_answer(local, media.session_id, 1, &neg));

    // The caller the operator holds, if any: their context goes to the target.
    let held = ctx.registry.caller_of(&agent);
    let t0 = now();
    let cx = match &held {
        Some((_, view, _)) => {
            let mut headers = view.context.clone();
            headers.push((
                "X-311-Waited".into(),
                t0.saturating_duration_since(view.entered)
                    .as_secs()
                    .to_string(),
            ));
            headers.push(("X-311-Transferred-By".into(), agent.clone()));
            let call_id = view
                .context
                .iter()
                .find(|(k, _)| k == "X-311-Call-ID")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            transfer::Context {
                call_id,
                number: view.number.clone(),
                asserted: view.asserted.then(|| view.number.clone()),
                line: ctx.callback.from_user.clone(),
                language: view.language.clone(),
                queue: view.queue.clone(),
                headers,
                by: agent.clone(),
                codec: neg.codec,
                local_ip: ip,
            }
        }
        None => transfer::Context {
            call_id: call.call_id.clone(),
            number: agent.clone(),
            asserted: None,
            line: ctx.callback.from_user.clone(),
            language: ctx.default_language.clone(),
            queue: String::new(),
            headers: vec![("X-311-Transferred-By".into(), agent.clone())],
            by: agent.clone(),
            codec: neg.codec,
            local_ip: ip,
        },
    };
    let menu_path = held
        .as_ref()
        .map(|(_, v, _)| v.menu_path.clone())
        .unwrap_or_default();
    let held_id = held.as_ref().map(|(id, _, _)| *id);
    let held_call = held.as_ref().map(|_| cx.call_id.clone());
    info!(%agent, %dialled, target = %dest.label(), holding = held_call.is_some(), "an operator's call from their phone");
    let label = dest.label();
    let mut core = ConsultCore::new(
        t0,
        agent.clone(),
        dest,
        &cx,
        held_call,
        (&ctx.emergency, ctx.agent_ring, &menu_path),
        media,
    );
    let (tx, mut commands) = mpsc::channel(4);
    let dialog = call.handle.id;
    ctx.registry.add_consult(dialog, &agent, tx);
    if let Some(id) = held_id {
        ctx.registry
            .tell(id, CallCommand::Consulting(Some(label)))
            .await;
    }
    let scope = LatchScope::SdpOr(call.source.ip());
    let mut d = ConsultDriver {
        ctx: ctx.clone(),
        held_id,
        legs: Legs::default(),
        port: Some(port),
        phone_media: None,
        notes: None,
        answer: Bytes::from(answer),
        remote: (neg, offer.addr, scope),
        hand_over: None,
        answered: false,
        final_sent: false,
        ended: false,
    };
    loop {
        while let Some(a) = core.poll_action() {
            if let Some(input) = d.carry_out(a, &call).await {
                core.handle(now(), input);
            }
        }
        if d.ended {
            break;
        }
        let deadline = core.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            biased;
            () = cancel.cancelled() => core.handle(now(), Input::Shutdown),
            ev = call.events.recv() => core.handle(now(), Input::Phone(ev)),
            Some(cmd) = commands.recv() => match cmd {
                ConsultCommand::HandOver { reply } => {
                    d.hand_over = Some(reply);
                    core.handle(now(), Input::HandOver);
                }
            },
            (leg, ev) = d.legs.next() => core.handle(now(), Input::Leg(leg, ev)),
            note = recv_opt(&mut d.notes) => match note {
                None => d.notes = None,
                Some(MediaNote::NoMedia) => core.handle(now(), Input::NoMedia),
                Some(_) => {}
            },
            () = sleep_opt(deadline) => core.handle_timeout(now()),
        }
    }
    ctx.registry.remove_consult(dialog);
    if let Some(id) = held_id {
        ctx.registry.tell(id, CallCommand::Consulting(None)).await;
    }
    if let Some(m) = &d.phone_media {
        m.end();
    }
    if !d.answered && !d.final_sent {
        call.handle
            .respond(480, "Temporarily Unavailable", vec![], None)
            .await;
    }
    d.legs.hang_up_all().await;
    call.handle.release();
}

/// What the operator's call to a queue hears once the caller is in the queue.
const QUEUED_CONFIRMATION: &str = "thank_you";

/// Longest the operator's call to a queue lasts (ACK, then the confirmation).
const QUEUED_CALL_WITHIN: Duration = Duration::from_secs(10);

/// The operator dialled a queue's name with their caller on hold: the caller goes to the
/// front of that queue with their wait kept (a transfer of the caller's call, asked
/// [`Via::PhoneCall`], which hangs up the operator's leg with the caller); the phone's call
/// is then answered, hears a short confirmation, and is hung up. When the caller's call
/// refuses (no caller of theirs, a transfer already going, the queue will not take them),
/// the phone's call is refused with its status and the caller stays with the operator.
async fn send_to_queue(
    mut call: IncomingCall,
    agent: String,
    queue: String,
    held: u64,
    ctx: CallContext,
    cancel: CancellationToken,
) {
    let refuse = async |call: &IncomingCall, code: u16, why: &str| {
        let w = vec![(
            "Warning".to_owned(),
            format!("399 ivr311 \"{}\"", sanitize_quoted(why)),
        )];
        call.handle
            .respond(code, reason_phrase(code), w, None)
            .await;
    };
    let offered = sdp::parse(&call.body).and_then(|offer| {
        let neg = sdp::negotiate(&offer, &SUPPORTED_CODECS)?;
        Ok((offer, neg))
    });
    let (offer, neg) = match offered {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "an operator's call to a queue without an offer we can take; 488");
            ctx.metrics.add(
                "ivr311_transfer_refusals_total",
                "Transfer requests (REFER, an agent's call, the admin API) refused, by reason.",
                &[("reason", "no_offer")],
                1,
            );
            return refuse(&call, 488, &e.to_string()).await;
        }
    };
    let Some(port) = ctx.ports.allocate() else {
        warn!("no RTP port free for an operator's call to a queue; 503");
        return refuse(&call, 503, "no media port free").await;
    };
    if let Err((code, why)) = ctx.registry.queue_by_phone(held, &agent, &queue).await {
        info!(%agent, %queue, code, reason = %why, "the caller was not sent to the queue; they stay with the operator");
        return refuse(&call, code, &why).await;
    }
    info!(%agent, %queue, "the caller waits at the front of the queue; the operator hears it confirmed");
    let ip = ctx
        .advertise_ip
        .or_else(|| {
            let bound = port.socket.local_addr().ok()?.ip();
            (!bound.is_unspecified()).then_some(bound)
        })
        .or_else(|| crate::sip::transport::local_ip_towards(offer.addr.ip()))
        .unwrap_or(call.local.ip());
    let local = SocketAddr::new(ip, port.port);
    let session_id = u64::from(rand::random::<u32>());
    let answer = sdp::build_answer_for_offer(&call.body, local, session_id, 1, &neg)
        .unwrap_or_else(|_| sdp::build_answer(local, session_id, 1, &neg));
    call.handle
        .respond(
            200,
            "OK",
            vec![],
            Some(("application/sdp".into(), Bytes::from(answer.clone()))),
        )
        .await;
    let session = MediaSession::new(now(), neg, offer.addr)
        .latch_scope(LatchScope::SdpOr(call.source.ip()))
        .until_confirmed();
    let no_media = Duration::from_secs(ctx.limits.no_media_seconds);
    let (media, mut notes) = ctx.clock.attach(port, session, no_media, Span::current());
    let confirmation = ctx
        .menu
        .get()
        .prompts
        .get(&ctx.default_language, QUEUED_CONFIRMATION);
    let until = tokio::time::Instant::now() + QUEUED_CALL_WITHIN;
    let mut phone_left = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(until) => {
                debug!("the operator's call to a queue is over (time)");
                break;
            }
            ev = call.events.recv() => match ev {
                Some(DialogEvent::Confirmed { .. }) => {
                    let mut slot = media.lock();
                    slot.media.confirm();
                    match &confirmation {
                        Some(p) => slot.media.play([p.clone()]),
                        None => break,
                    }
                }
                None | Some(
                    DialogEvent::Bye
                    | DialogEvent::Cancelled
                    | DialogEvent::Timeout
                    | DialogEvent::Lost,
                ) => {
                    phone_left = true;
                    break;
                }
                Some(DialogEvent::Reoffer { txn, .. }) => {
                    let body = Some(("application/sdp".to_owned(), Bytes::from(answer.clone())));
                    call.handle.answer_reoffer(txn, 200, body).await;
                }
                Some(DialogEvent::Refer(r)) => {
                    call.handle.answer_request(r.txn, 403, vec![]).await;
                }
                Some(_) => {}
            },
            note = notes.recv() => match note {
                Some(MediaNote::PlayDone { .. }) | None => break,
                Some(_) => {}
            },
        }
    }
    media.end();
    if !phone_left {
        call.handle.hangup().await;
    }
    call.handle.release();
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The IO of one consultation.
struct ConsultDriver {
    ctx: CallContext,
    /// The held caller's registry id (the queue's caller id for an agent rung directly).
    held_id: Option<u64>,
    legs: Legs,
    /// The phone's RTP port until it answers, then its slot on the media clock.
    port: Option<crate::media::ports::RtpPort>,
    phone_media: Option<MediaHandle>,
    notes: Option<mpsc::Receiver<MediaNote>>,
    /// Our SDP answer to the phone's offer.
    answer: Bytes,
    remote: (Negotiated, SocketAddr, LatchScope),
    /// Where the hand-over goes (set while the core decides).
    hand_over: Option<oneshot::Sender<Result<Joined, (u16, String)>>>,
    answered: bool,
    final_sent: bool,
    ended: bool,
}

impl ConsultDriver {
    /// The queue's caller id for this consultation's direct rings: the held caller's, so
    /// the rung agent is on a call with them; a fresh one when the operator holds nobody.
    fn queue_caller(&mut self) -> u64 {
        *self
            .held_id
            .get_or_insert_with(|| (rand::random::<u64>() >> 1) | (1 << 62))
    }

    async fn carry_out(&mut self, a: Action, call: &IncomingCall) -> Option<Input> {
        match a {
            Action::Ringing => call.handle.respond(180, "Ringing", vec![], None).await,
            Action::Refuse { code, why } => {
                self.final_sent = true;
                let w = vec![(
                    "Warning".to_owned(),
                    format!("399 ivr311 \"{}\"", sanitize_quoted(&why)),
                )];
                call.handle
                    .respond(code, reason_phrase(code), w, None)
                    .await;
            }
            Action::Answer => {
                self.answered = true;
                call.handle
                    .respond(
                        200,
                        "OK",
                        vec![],
                        Some(("application/sdp".into(), self.answer.clone())),
                    )
                    .await;
                if let Some(port) = self.port.take() {
                    let (neg, addr, scope) = self.remote;
                    let session = MediaSession::new(now(), neg, addr)
                        .latch_scope(scope)
                        .until_confirmed();
                    let no_media = Duration::from_secs(self.ctx.limits.no_media_seconds);
                    let (m, notes) =
                        self.ctx
                            .clock
                            .attach(port, session, no_media, Span::current());
                    self.phone_media = Some(m);
                    self.notes = Some(notes);
                }
            }
            Action::ReplyPhone { txn, code, body } => {
                call.handle.answer_reoffer(txn, code, body).await
            }
            Action::AnswerPhoneRequest { txn, code, headers } => {
                call.handle.answer_request(txn, code, headers).await
            }
            Action::ConfirmMedia => {
                if let Some(m) = &self.phone_media {
                    m.lock().media.confirm();
                }
            }
            Action::Renegotiate((neg, addr)) => {
                if let Some(m) = &self.phone_media {
                    m.lock().media.renegotiate(neg, addr);
                }
            }
            Action::HangUpPhone => {
                if self.answered {
                    call.handle.hangup().await;
                } else if !self.final_sent {
                    self.final_sent = true;
                    call.handle
                        .respond(480, "Temporarily Unavailable", vec![], None)
                        .await;
                }
            }
            Action::PlaceLeg(p) => {
                let leg = p.leg;
                let deps = LegDeps {
                    ports: &self.ctx.ports,
                    outbound: &self.ctx.outbound,
                    agent_contacts: &self.ctx.agent_contacts,
                };
                let (placed, io) = place_leg(&deps, *p).await;
                if let Some(io) = io {
                    self.legs.add(io);
                }
                return Some(Input::Placed(leg, placed));
            }
            Action::DropLeg { leg, how } => self.legs.drop_leg(leg, how).await,
            Action::ReplyLeg {
                leg,
                txn,
                code,
                body,
            } => {
                if let Some(l) = self.legs.get(leg) {
                    l.handle.answer_reoffer(txn, code, body).await;
                }
            }
            Action::SetBridge(b) => {
                let bridge = b.and_then(|b| bridge_for(self.legs.get(b.leg)?, &b, Duration::ZERO));
                if let Some(m) = &self.phone_media {
                    m.lock().set_bridge(bridge);
                }
            }
            Action::RingDirect {
                agent,
                ring_timeout,
            } => {
                let caller = self.queue_caller();
                let result = match &self.ctx.queues {
                    Some(q) => q.ring_direct(caller, &agent, ring_timeout).await,
                    None => Err("unknown"),
                };
                return Some(Input::Claimed(result));
            }
            Action::Withdraw(agent) => {
                let caller = self.queue_caller();
                if let Some(q) = &self.ctx.queues {
                    q.offer_withdrawn(caller, &agent).await;
                }
            }
            Action::DirectAnswered(agent) => {
                let caller = self.queue_caller();
                if let Some(q) = &self.ctx.queues {
                    q.direct_answered(caller, &agent).await;
                }
            }
            Action::CallEnded(agent) => {
                if let Some(q) = &self.ctx.queues {
                    q.call_ended(&agent).await;
                }
            }
            Action::AuditStart(audit) => {
                // Awaited here: nothing else happens on this call before 911 is called.
                let id = match self.ctx.tickets.audit_emergency_start(&audit).await {
                    Ok(id) => Some(id),
                    Err(e) => {
                        error!(error = %e, "911 audit row could not be written; calling 911 anyway");
                        None
                    }
                };
                return Some(Input::Audited(id));
            }
            Action::AuditOutcome { id, outcome } => {
                let store = self.ctx.tickets.clone();
                self.ctx.tracker.spawn(
                    async move {
                        if let Err(e) = store.audit_emergency_outcome(id, &outcome).await {
                            error!(error = %e, "911 audit outcome not written");
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::CountEmergency { method, outcome } => self.ctx.metrics.add(
                "ivr311_emergency_redirects_total",
                "Callers redirected to 911, by method and outcome.",
                &[("method", method), ("outcome", outcome)],
                1,
            ),
            Action::CountTransferRefusal => self.ctx.metrics.add(
                "ivr311_transfer_refusals_total",
                "Transfer requests (REFER, an agent's call, the admin API) refused, by reason.",
                &[("reason", "refer_on_consultation")],
                1,
            ),
            Action::RecordTransfer(view) => {
                self.ctx.registry.show_transfer(&view);
                let store = self.ctx.tickets.clone();
                self.ctx.tracker.spawn(
                    async move {
                        let record = TransferRecord {
                            id: view.id,
                            call_id: view.call_id,
                            operator: view.operator,
                            target: view.target,
                            requested_via: view.via.to_owned(),
                        };
                        if let Err(e) = store.record_transfer(&record).await {
                            error!(error = %e, "transfer record not written");
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::ShowTransfer(view) => self.ctx.registry.show_transfer(&view),
            Action::TransferOutcome { record, outcome } => {
                let store = self.ctx.tickets.clone();
                self.ctx.tracker.spawn(
                    async move {
                        if let Err(e) = store.transfer_outcome(&record, &outcome).await {
                            error!(error = %e, "transfer outcome not written");
                        }
                    }
                    .in_current_span(),
                );
            }
            Action::CountTransfer { kind, outcome } => self.ctx.metrics.add(
                "ivr311_transfers_total",
                "Transfers operators and admins asked for, by target kind and outcome.",
                &[("outcome", outcome), ("target", kind)],
                1,
            ),
            Action::HandOver(joined, legs) => {
                let (transfer, connected) = *joined;
                let ios: Vec<LegIo> = legs.iter().filter_map(|l| self.legs.remove(*l)).collect();
                let joined = Joined {
                    transfer: Box::new(transfer),
                    connected,
                    legs: ios,
                };
                match self.hand_over.take() {
                    Some(reply) => {
                        if let Err(Ok(back)) = reply.send(Ok(joined)) {
                            // The caller's call is gone meanwhile: the target is hung up.
                            warn!("the held caller's call ended before the hand-over");
                            for io in back.legs {
                                self.legs.add(io);
                            }
                        }
                    }
                    None => {
                        for io in joined.legs {
                            self.legs.add(io);
                        }
                    }
                }
            }
            Action::RefuseHandOver(code, why) => {
                if let Some(reply) = self.hand_over.take() {
                    let _ = reply.send(Err((code, why)));
                }
            }
            Action::End => {
                debug!("consultation done");
                self.ended = true;
            }
        }
        None
    }
}

/// Spawn the consultation of an agent's INVITE on the server's tracker.
pub(crate) fn spawn(
    call: IncomingCall,
    agent: String,
    ctx: CallContext,
    tracker: &tokio_util::task::TaskTracker,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("operator_call", call_id = %call.call_id, %agent);
    tracker.spawn(run_consult(call, agent, ctx, cancel).instrument(span));
}

#[cfg(test)]
mod tests {
    //! Every path of an operator's own call on virtual time.

    use super::*;
    use crate::call::dialplan::TransferLine;
    use crate::call::leg::{Dial, LegSdp};
    use crate::dispatch::emergency::{EmergencyConfig, EmergencyMethod};
    use crate::media::g711::Codec;

    const CALLER: &str = "+12125550123";
    const PHONE_SDP: &[u8] = b"v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";
    const TARGET_SDP: &[u8] = b"v=0\r\no=t 1 1 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";

    fn context() -> transfer::Context {
        transfer::Context {
            call_id: "caller-1@test".into(),
            number: CALLER.into(),
            asserted: Some(CALLER.into()),
            line: "311".into(),
            language: "en".into(),
            queue: "general".into(),
            headers: vec![
                ("X-311-Call-ID".into(), "caller-1@test".into()),
                ("X-311-Transferred-By".into(), "1001".into()),
            ],
            by: "1001".into(),
            codec: Codec::Pcmu,
            local_ip: "127.0.0.1".parse().unwrap(),
        }
    }

    fn crisis() -> Destination {
        Destination::Line(TransferLine {
            name: "crisis".into(),
            number: "988".into(),
            uri: "sip:988@192.0.2.30".into(),
            headers: Default::default(),
            ring_timeout_seconds: 20,
            crisis: true,
        })
    }

    fn emergency() -> EmergencyConfig {
        EmergencyConfig {
            method: Some(EmergencyMethod::Bridge),
            uri: Some("sip:911@192.0.2.20".into()),
            ..EmergencyConfig::default()
        }
    }

    struct Run {
        c: ConsultCore,
        t0: Instant,
        now: Instant,
    }

    impl Run {
        fn start(dest: Destination) -> (Run, Vec<Action>) {
            let t0 = Instant::now();
            let neg = sdp::negotiate(&sdp::parse(PHONE_SDP).unwrap(), &SUPPORTED_CODECS).unwrap();
            let media = PhoneMedia {
                local: "127.0.0.1:30000".parse().unwrap(),
                session_id: 1,
                neg,
            };
            let c = ConsultCore::new(
                t0,
                "1001".into(),
                dest,
                &context(),
                Some("caller-1@test".into()),
                (&emergency(), Duration::from_secs(20), "main:0"),
                media,
            );
            let mut r = Run { c, t0, now: t0 };
            let out = r.out();
            (r, out)
        }

        fn out(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.c.poll_action()).collect()
        }

        fn input(&mut self, i: Input) -> Vec<Action> {
            self.c.handle(self.now, i);
            self.out()
        }

        fn at(&mut self, secs: u64) -> Vec<Action> {
            self.now = self.t0 + Duration::from_secs(secs);
            self.c.handle_timeout(self.now);
            self.out()
        }

        fn placed(&mut self, leg: LegId) -> Vec<Action> {
            let p = Placed {
                sdp: LegSdp::new("127.0.0.1:40000".parse().unwrap()),
                toward: None,
                looked_up: None,
            };
            self.input(Input::Placed(leg, Ok(p)))
        }

        /// Place the target's leg and let it answer; the leg.
        fn answered_line(&mut self, out: &[Action]) -> (LegId, Vec<Action>) {
            let (leg, _) = place(out).expect("the line is called");
            self.placed(leg);
            let out = self.input(Input::Leg(
                leg,
                Some(LegEvent::Answered {
                    sdp: Bytes::from_static(TARGET_SDP),
                }),
            ));
            (leg, out)
        }
    }

    fn place(out: &[Action]) -> Option<(LegId, &PlaceLeg)> {
        out.iter().find_map(|a| match a {
            Action::PlaceLeg(p) => Some((p.leg, &**p)),
            _ => None,
        })
    }

    fn refused(out: &[Action]) -> Option<u16> {
        out.iter().find_map(|a| match a {
            Action::Refuse { code, .. } => Some(*code),
            _ => None,
        })
    }

    fn ends(out: &[Action]) -> bool {
        out.iter().any(|a| matches!(a, Action::End))
    }

    fn outcome(out: &[Action]) -> Option<&str> {
        out.iter().find_map(|a| match a {
            Action::TransferOutcome { outcome, .. } => Some(outcome.as_str()),
            _ => None,
        })
    }

    #[test]
    fn a_call_to_911_writes_the_audit_first_presents_the_held_callers_number_and_answers_with_911()
    {
        let (mut r, out) = Run::start(Destination::Emergency);
        assert!(out.iter().any(|a| matches!(a, Action::Ringing)), "{out:?}");
        assert!(place(&out).is_none(), "the audit comes first: {out:?}");
        let Some(Action::AuditStart(audit)) =
            out.iter().find(|a| matches!(a, Action::AuditStart(_)))
        else {
            panic!("{out:?}")
        };
        assert_eq!(audit.operator.as_deref(), Some("1001"));
        assert_eq!(audit.requested_via.as_deref(), Some("phone_call"));
        assert_eq!(audit.caller.as_deref(), Some(CALLER));
        let out = r.input(Input::Audited(Some(7)));
        let (leg, p) = place(&out).expect("911 is called");
        assert_eq!(
            p.asserted.as_deref(),
            Some(CALLER),
            "the caller's number, not the operator's"
        );
        assert!(matches!(&p.to, Dial::Uri { uri, .. } if uri == "sip:911@192.0.2.20"));
        r.placed(leg);
        let out = r.input(Input::Leg(
            leg,
            Some(LegEvent::Answered {
                sdp: Bytes::from_static(TARGET_SDP),
            }),
        ));
        assert!(out.iter().any(|a| matches!(a, Action::Answer)), "{out:?}");
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::SetBridge(Some(b)) if b.leg == leg && b.answered)),
            "the phone is bridged to 911: {out:?}"
        );
        assert!(!ends(&out));
    }

    #[test]
    fn every_911_route_failing_answers_the_phone_503_and_the_caller_stays_with_the_operator() {
        let (mut r, _) = Run::start(Destination::Emergency);
        let out = r.input(Input::Audited(Some(7)));
        let (leg, _) = place(&out).unwrap();
        r.placed(leg);
        let out = r.input(Input::Leg(
            leg,
            Some(LegEvent::Failed {
                code: 503,
                reason: "Service Unavailable".into(),
            }),
        ));
        assert_eq!(refused(&out), Some(503), "{out:?}");
        assert!(
            out.iter().any(|a| matches!(a, Action::AuditOutcome { outcome, .. } if outcome.starts_with("returned to operator"))),
            "{out:?}"
        );
        assert!(outcome(&out).is_some_and(|o| o.ends_with("the caller stays with the operator")));
        assert!(ends(&out));
    }

    #[test]
    fn a_line_that_says_nothing_is_unreachable_and_one_that_rings_is_relayed_as_ringing() {
        let (mut r, out) = Run::start(crisis());
        assert!(
            !out.iter().any(|a| matches!(a, Action::Ringing)),
            "not before it rings"
        );
        let (leg, p) = place(&out).unwrap();
        assert_eq!(p.from_user, CALLER);
        assert!(p
            .headers
            .iter()
            .any(|(k, v)| k == "X-311-Transferred-By" && v == "1001"));
        r.placed(leg);
        assert!(r.at(4).is_empty());
        let out = r.at(5);
        assert_eq!(refused(&out), Some(408), "{out:?}");
        assert!(ends(&out));

        let (mut r, out) = Run::start(crisis());
        let (leg, _) = place(&out).unwrap();
        r.placed(leg);
        let out = r.input(Input::Leg(
            leg,
            Some(LegEvent::Provisional {
                code: 180,
                sdp: None,
            }),
        ));
        assert!(out.iter().any(|a| matches!(a, Action::Ringing)), "{out:?}");
        // Rings past the line's 20 s: no answer.
        let out = r.at(21);
        assert_eq!(refused(&out), Some(480), "{out:?}");
    }

    #[test]
    fn the_operator_hanging_up_while_the_line_rings_lets_it_go() {
        let (mut r, out) = Run::start(crisis());
        let (leg, _) = place(&out).unwrap();
        r.placed(leg);
        let out = r.input(Input::Phone(Some(DialogEvent::Cancelled)));
        assert!(
            out.iter().any(|a| matches!(a, Action::DropLeg { leg: l, how: LegEnd::HangUpAndRelease } if *l == leg)),
            "{out:?}"
        );
        assert!(!out.iter().any(|a| matches!(a, Action::Answer)));
        assert!(outcome(&out).is_some_and(|o| o.starts_with("consultation ended by the operator")));
        assert!(
            out.iter().any(
                |a| matches!(a, Action::ShowTransfer(v) if v.done && v.state.starts_with("consultation ended"))
            ),
            "/admin/transfers shows it over: {out:?}"
        );
        assert!(ends(&out));
        assert_eq!(r.c.next_deadline(), None);
    }

    #[test]
    fn the_target_is_handed_over_only_once_it_answered() {
        let (mut r, out) = Run::start(crisis());
        let (leg, _) = place(&out).unwrap();
        r.placed(leg);
        let out = r.input(Input::HandOver);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::RefuseHandOver(480, _))),
            "{out:?}"
        );
        assert!(!ends(&out), "the consultation goes on");
        let out = r.input(Input::Leg(
            leg,
            Some(LegEvent::Answered {
                sdp: Bytes::from_static(TARGET_SDP),
            }),
        ));
        assert!(out.iter().any(|a| matches!(a, Action::Answer)));
        let out = r.input(Input::HandOver);
        let Some(Action::HandOver(joined, legs)) =
            out.iter().find(|a| matches!(a, Action::HandOver(..)))
        else {
            panic!("{out:?}")
        };
        assert_eq!(legs, &vec![leg]);
        assert!(matches!(&joined.1, Connected::Line { name, .. } if name == "crisis"));
        assert_eq!(joined.0.outcome.as_deref(), Some("connected"));
        assert!(out.iter().any(|a| matches!(a, Action::HangUpPhone)));
        assert!(
            outcome(&out).is_none(),
            "the caller's call records the transfer"
        );
        assert!(ends(&out));
    }

    #[test]
    fn the_consulted_party_hanging_up_hangs_up_the_phone() {
        let (mut r, out) = Run::start(crisis());
        let (leg, _) = r.answered_line(&out);
        let out = r.input(Input::Leg(leg, Some(LegEvent::Dialog(DialogEvent::Bye))));
        assert!(
            out.iter().any(|a| matches!(a, Action::HangUpPhone)),
            "{out:?}"
        );
        assert!(ends(&out));
    }

    #[test]
    fn the_phone_holding_the_consultation_is_answered_from_the_same_session() {
        let (mut r, out) = Run::start(crisis());
        r.answered_line(&out);
        let hold = b"v=0\r\no=phone 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n";
        let out = r.input(Input::Phone(Some(DialogEvent::Reoffer {
            txn: 3,
            method: crate::sip::message::Method::Invite,
            content_type: Some("application/sdp".into()),
            body: Bytes::from_static(hold),
        })));
        let Some(Action::ReplyPhone {
            txn: 3,
            code: 200,
            body: Some((_, sdp)),
        }) = out.iter().find(|a| matches!(a, Action::ReplyPhone { .. }))
        else {
            panic!("{out:?}")
        };
        let sdp = String::from_utf8_lossy(sdp);
        assert!(sdp.contains("a=recvonly"), "{sdp}");
        let origin: Vec<&str> = sdp
            .lines()
            .find(|l| l.starts_with("o="))
            .unwrap()
            .split(' ')
            .collect();
        assert_eq!(
            (origin[1], origin[2]),
            ("1", "2"),
            "same session, next version: {sdp}"
        );
        assert!(out.iter().any(|a| matches!(a, Action::Renegotiate(_))));
    }
}
